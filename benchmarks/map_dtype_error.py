"""The error float16 and uint8 map storage (``--map-dtype float16`` / ``uint8``) introduce,
measured on the shipped sample.

    .venv/bin/python benchmarks/map_dtype_error.py        # CPU, a few minutes

Writes the sample's maps again through ``CaptureWriter`` with ``map_dtype="float16"`` and with
``map_dtype="uint8"`` (every map rounded or coded on its way to the file, checked by the writer as
a capture's are; meanpool's score served from L, as a capture of this release stores it), then
compares each copy with the float32 file on every (step, layer, order, head, query block) of the
cond branch:

* recall of the top-k mask of every method and of the oracle (top-k of m) at gamma 0.1 / 0.2 /
  0.3, each mask measured on its own file's m: max and mean absolute change;
* the number of top-k masks (one per query block) of every method and the oracle that select
  another set of key blocks;
* the maps' bytes, compressed on disk and uncompressed;
* the claims report's bound checks (``build_report``): Bounds 2 and 3 on every row, Bound 1
  on the stored Q/K.

Writes benchmarks/results/map_dtype_error.json (machine, versions, the sample's capture settings,
the numbers per storage dtype).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path

import h5py
import torch

import dfsviz
from provenance import load, run_header, utc_now  # benchmarks/ is the script's folder
from dfsviz.analysis.report import ReportConfig, build_report
from dfsviz.capture.schema import AFFINE_SUFFIX, MAP_NAMES, STAT_NAMES, STEP_GROUP
from dfsviz.capture.writer import CaptureWriter
from dfsviz.sparse.select import select_topk

BUDGETS = (0.1, 0.2, 0.3)
COPIES = ("float16", "uint8")
# root attributes the writer sets itself (format, layout, completeness)
_WRITER_ATTRS = {"format", "format_version", "created_utc", "complete", "dfsviz_version", "finished_utc"}


def write_copy(reader, path: Path, map_dtype: str) -> None:
    """Every completed step of ``reader`` written again into ``path`` with ``map_dtype`` maps and
    the scores this release stores (the default ``stored_scores``: meanpool's is L)."""
    layout = dataclasses.replace(reader.layout, map_dtype=map_dtype, stored_scores=None)
    own = set(layout.to_attrs()) | _WRITER_ATTRS
    attrs = {k: v for k, v in reader.attrs.items() if k not in own}
    attrs["capture_config"] = {**reader.config, "map_dtype": map_dtype}
    perms = {order: reader.perm(order) for order in layout.orders}
    with CaptureWriter.create(path, layout, attrs, perms) as writer:
        for step in reader.steps:
            writer.begin_step(step, reader.step_attrs(step))
            for layer in layout.layers:
                for branch in layout.branches:
                    for order in layout.orders:
                        stored = reader.block_stats(step, layer, order, branch=branch)
                        stats = {name: getattr(stored, name)[0] for name in STAT_NAMES}
                        scores = {m: reader.scores(step, layer, order, m, branch=branch)[0] for m in layout.score_methods}
                        w_q, w_k = reader.variance_ratios(step, layer, order, branch=branch)
                        writer.write_maps(layer, branch, order, stats, scores, w_q[0], w_k[0])
                        if layout.footprints:
                            pairs = [reader.footprints(step, layer, order, h, branch=branch) for h in layout.heads]
                            writer.write_footprints(layer, branch, order, torch.stack([b for b, _ in pairs]),
                                                    torch.stack([a for _, a in pairs]))
                    if layout.has_qkv(step):
                        for layer_qkv in layout.qkv_layers:
                            if layer_qkv == layer:
                                q, k, v = reader.qkv(step, layer, branch=branch)
                                writer.write_qkv(layer, branch, q[0], k[0], v[0])
            writer.end_step()
        writer.finish()


def compare(full, copy) -> dict:
    """Recall changes and changed masks between the float32 file and a copy (cond branch)."""
    n, block = full.grid.num_tokens, full.block
    names = (*full.methods, "oracle")
    recall = {f"{name}@{g:g}": [] for name in names for g in BUDGETS}
    changed = {f"{name}@{g:g}": 0 for name in names for g in BUDGETS}
    masks = 0
    for step in full.steps:
        for layer in full.layers:
            for order in full.orders:
                m32, m_copy = full.block_mass(step, layer, order), copy.block_mass(step, layer, order)
                scores = {name: (full.scores(step, layer, order, name), copy.scores(step, layer, order, name))
                          for name in full.methods}
                scores["oracle"] = (m32, m_copy)
                for g in BUDGETS:
                    for name, (s32, s_copy) in scores.items():
                        k32 = select_topk(s32, g, seq_len=n, block=block).to_dense()
                        k_copy = select_topk(s_copy, g, seq_len=n, block=block).to_dense()
                        changed[f"{name}@{g:g}"] += int((k32 != k_copy).any(dim=-1).sum())
                        r32 = (m32.double() * k32).sum(-1)
                        r_copy = (m_copy.double() * k_copy).sum(-1)
                        recall[f"{name}@{g:g}"].append((r_copy - r32).abs().flatten())
                masks += m32[..., 0].numel()
    out = {"query_block_rows": masks, "recall_abs_change": {}, "masks_changed": changed}
    for key, parts in recall.items():
        diff = torch.cat(parts)
        out["recall_abs_change"][key] = {"max": float(diff.max()), "mean": float(diff.mean())}
    return out


def map_bytes(path: Path) -> dict:
    """Bytes of the maps (m, L, r, J, scores, and the rows' offsets and scales of uint8 maps) on
    disk (compressed) and uncompressed, all steps."""
    disk = raw = 0
    with h5py.File(path, "r") as f:
        for group in f[STEP_GROUP].values():
            for name in (n for n in (*MAP_NAMES, *(m + AFFINE_SUFFIX for m in MAP_NAMES)) if n in group):
                disk += group[name].id.get_storage_size()
                raw += group[name].size * group[name].dtype.itemsize
    return {"compressed": disk, "uncompressed": raw}


def bounds(path: Path) -> dict:
    report = build_report(str(path), ReportConfig(budgets=BUDGETS))
    return {"violations": report.data["violations"], "bound1": report.data["bound1"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--capture", default=None, help="a float32 capture (default: dfsviz.sample_capture())")
    parser.add_argument("--out", default="benchmarks/results/map_dtype_error.json")
    args = parser.parse_args()
    source = Path(args.capture or dfsviz.sample_capture())
    result = {
        "benchmark": "map_dtype_error",
        **run_header(torch.device("cpu")),
    }
    with tempfile.TemporaryDirectory() as folder:
        paths = {dtype: Path(folder) / f"{dtype}.h5" for dtype in COPIES}
        result["validate"], result["error"] = {}, {}
        with dfsviz.open(source) as full:
            if full.layout.map_dtype != "float32":
                raise SystemExit(f"{source} holds {full.layout.map_dtype} maps; give a float32 capture")
            result["capture"] = {"file": source.name, "capture_config": full.config, "summary": full.summary()}
            for dtype, path in paths.items():
                write_copy(full, path, dtype)
                with dfsviz.open(path) as copy:
                    result["validate"][dtype] = copy.validate()
                    result["error"][dtype] = compare(full, copy)
        result["map_bytes"] = {"float32": map_bytes(source), **{dtype: map_bytes(path) for dtype, path in paths.items()}}
        result["bounds"] = {"float32": bounds(source), **{dtype: bounds(path) for dtype, path in paths.items()}}
    result["machine"]["load_end"] = load()
    result["finished"] = utc_now()
    Path(args.out).write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(json.dumps({k: result[k] for k in ("error", "bounds", "validate", "map_bytes")}, indent=2, default=str))


if __name__ == "__main__":
    main()

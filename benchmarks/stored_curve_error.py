"""The recall curves a capture stores against the curves recomputed from the maps it stores, per
map dtype, on the embedded model.

    .venv/bin/python benchmarks/stored_curve_error.py      # CPU, about 5 minutes on 2 cores

Captures the embedded model with its default settings and all four methods (meanpool, dfs_tile,
antidiagonal, oracle) three times, with ``--map-dtype`` float32, float16 and uint8 (the same run:
the curves are computed from the same maps before their storage rounding), then compares, for every
(step, layer, order, method, head) of each file, the stored curve with
``dfsviz.analysis.recall_curve`` of the file's stored m and scores: the largest and the mean
absolute difference over all k and at gamma 0.1 / 0.2 / 0.3 (k = max(1, int(gamma x Mk))). Also
times the curves' computation alone (the writer's functions, on the float32 file's maps, every
step) and each capture.

Writes benchmarks/results/stored_curve_error.json (machine, versions, the numbers per map dtype).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from calibrate_embedded import Clock  # benchmarks/ is the script's folder
from provenance import load, run_header
from dfsviz.analysis.curves import recall_curve
from dfsviz.capture import CaptureConfig, run_capture
from dfsviz.capture.reader import CaptureReader
from dfsviz.sparse._topk import topk_order, topk_recall
from dfsviz.sparse.select import topk_count

BUDGETS = (0.1, 0.2, 0.3)
METHODS = ("meanpool", "dfs_tile", "antidiagonal", "oracle")
MAP_DTYPES = ("float32", "float16", "uint8")


def differences(reader) -> dict:
    """|stored - recomputed| of every curve, per method: max and mean over all k and at each budget."""
    mk = reader.layout.num_blocks
    per_method = {method: [] for method in reader.methods}
    for step in reader.steps:
        for layer in reader.layers:
            for branch in reader.branches:
                for order in reader.orders:
                    m = reader.block_mass(step, layer, order, branch=branch)
                    for method in reader.methods:
                        scores = reader.scores(step, layer, order, method, branch=branch)
                        recomputed = recall_curve(m, scores, seq_len=reader.grid.num_tokens, block=reader.block).recall
                        stored = reader.recall_curve(step, layer, order, method, branch=branch).double()
                        per_method[method].append((stored - recomputed).abs()[0])
    out = {}
    for method, parts in per_method.items():
        diff = torch.stack(parts)  # [curves / heads, heads, Mk]
        row = {"max": float(diff.max()), "mean": float(diff.mean())}
        for g in BUDGETS:
            at = diff[..., topk_count(g, mk) - 1]
            row[f"max@{g:g}"], row[f"mean@{g:g}"] = float(at.max()), float(at.mean())
        out[method] = row
    out["curves"] = sum(len(p) for p in per_method.values()) * len(reader.heads)
    return out


def curve_seconds(reader) -> float:
    """Seconds to compute every curve of ``reader`` from its maps as the writer does (reads not counted)."""
    spent = 0.0
    for step in reader.steps:
        for layer in reader.layers:
            for branch in reader.branches:
                for order in reader.orders:
                    m = reader.block_mass(step, layer, order, branch=branch)[0]
                    scores = [reader.scores(step, layer, order, method, branch=branch)[0] for method in reader.methods]
                    start = time.perf_counter()
                    for score in scores:
                        topk_recall(m, topk_order(score), reader.grid.num_tokens, reader.block)
                    spent += time.perf_counter() - start
    return spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/stored_curve_error.json")
    args = parser.parse_args()
    result = {
        "benchmark": "stored_curve_error",
        **run_header(torch.device("cpu")),
        "capture": {"model": "the embedded tiny model", "methods": list(METHODS), "other settings": "defaults"},
        "budgets": list(BUDGETS),
        "map_dtypes": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in MAP_DTYPES:
            path = Path(tmp) / f"{dtype}.h5"
            clock = Clock()
            run_capture(CaptureConfig(out=str(path), methods=METHODS, map_dtype=dtype), progress=False)
            entry = {"capture": clock.stop()}
            with CaptureReader(path) as reader:
                entry["stored_minus_recomputed"] = differences(reader)
                if dtype == "float32":
                    entry["curve_compute_s"] = round(curve_seconds(reader), 3)
            result["map_dtypes"][dtype] = entry
    result["machine"]["load_end"] = load()
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["map_dtypes"], indent=1))


if __name__ == "__main__":
    main()

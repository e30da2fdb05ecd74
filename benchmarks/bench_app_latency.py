"""Interaction latency of the dashboard on a capture file of at least 1 GB.

    # make the capture (tiny random-weight Wan transformer, real run_capture; GPU advised) and measure
    PYTHONPATH=$PWD python3 benchmarks/bench_app_latency.py --make --capture /tmp/big/big.h5 \\
        --out benchmarks/results/app_latency.json
    # the same with 8-bit maps (a quarter of the map bytes: more layers for >= 1 GB)
    PYTHONPATH=$PWD python3 benchmarks/bench_app_latency.py --make --map-dtype uint8 --layers 16 \\
        --capture /tmp/big8/big8.h5 --out benchmarks/results/app_latency_uint8.json

The capture comes from ``dfsviz.capture.runner.run_capture`` on a diffusers
``WanTransformer3DModel`` with seeded random weights at the Wan2.1-1.3B 480p token grid
(latent 21x60x104 -> 21x30x52 = 32,760 tokens, 256 blocks of 128): block statistics,
three scoring methods and footprints of two orders for every captured (step, layer, head),
its maps stored as ``--map-dtype`` (float32 unless asked: ``uint8`` stores the 8-bit codes
the capture's default chooses for a step beyond its budget, ``docs/format.md``).

The Masks page's callback is then driven exactly as the browser drives it: JSON POSTs
to Dash's ``/_dash-update-component`` through the Flask test client (callback, figure
building and JSON encoding included; the browser's drawing is not), with the key of the
view on screen it answered last (so a change of method or budget gets its Patch, as in the
browser). For each control (step, layer, head, method, budget) the script makes
``--changes`` random changes from the page's defaults, each to a value different from the
current one, and times the one request a change makes ("view": the two block-mass maps and
the two footprints). Each call is also tagged cold when it had to read a map from the file
(the catalog's cache missed), warm otherwise.

Before that, the file's opening is timed three ways: the reader alone (``dfsviz.open``: the
structure is checked, no map read); the dashboard's catalog opening it (a file up to its
``full_check_bytes`` is validated, every map read once, before any view may read it; a larger
one is usable once everything but its maps is checked); and, for a larger file, its whole check
in the catalog's background thread, waited for before the controls are timed.
After the controls, the first view of the other pages (cold caches for what they read).
Target: p95 <= 150 ms for changes of step, layer, head, method and budget.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from dfsviz.capture.schema import MAP_DTYPES
from provenance import load, run_header  # this script's folder

log = logging.getLogger("bench_app_latency")

CONTROLS = ("step", "layer", "head", "method", "budget")
TARGET_P95_MS = 150.0
WAN = dict(patch_size=(1, 2, 2), attention_head_dim=64, in_channels=16, out_channels=16, text_dim=64, freq_dim=64,
           ffn_dim=256, rope_max_seq_len=1024)


def make_capture(path: Path, *, latent: str, heads: int, layers: int, steps: int, seed: int, block: int = 128,
                 map_dtype: str = "float32") -> dict:
    """Run a real capture of a seeded random-weight tiny Wan transformer into ``path``."""
    import diffusers
    import torch

    from dfsviz.capture.runner import CaptureConfig, run_capture

    model_dir = Path(tempfile.mkdtemp(prefix="dfsviz_wan_"))
    torch.manual_seed(seed)
    diffusers.WanTransformer3DModel(num_attention_heads=heads, num_layers=layers, **WAN).eval().save_pretrained(model_dir)
    cfg = CaptureConfig(out=str(path), model=str(model_dir), embeddings="random", num_steps=steps,
                        capture_steps=tuple(range(steps)), latent=latent, block=block, tile=min(16, block // 4),
                        stride=min(8, block // 2), footprints=4, map_dtype=map_dtype,
                        seed=seed, overwrite=True)
    t0 = time.perf_counter()
    result = run_capture(cfg, progress=False)
    return {"seconds": time.perf_counter() - t0, "file_bytes": result.file_bytes, "latent": latent, "heads": heads,
            "layers": layers, "steps": steps, "block": block, "map_dtype": map_dtype, "model": "WanTransformer3DModel, random weights", "seed": seed}


def _parse_outputs(key: str) -> list[dict]:
    parts = key[2:-2].split("...") if key.startswith("..") else [key]
    outs = []
    for part in parts:
        ident, prop = part.rsplit(".", 1)
        outs.append({"id": json.loads(ident) if ident.startswith("{") else ident, "property": prop})
    return outs


class Driver:
    """POST callbacks to a Dash app the way dash-renderer does."""

    def __init__(self, app) -> None:
        self.app = app
        self.client = app.server.test_client()
        self.client.get("/masks")  # the first request registers the pages router

    def key_for(self, output_id: str, *also: str) -> str:
        """The callback writing ``output_id`` (and every one of ``also``)."""
        for key in self.app.callback_map:
            if output_id in key and all(a in key for a in also):
                return key
        raise KeyError(output_id)

    def call(self, key: str, values: dict, changed: str) -> tuple[float, dict]:
        spec = self.app.callback_map[key]

        def fill(deps):
            return [{"id": d["id"], "property": d["property"], "value": values.get((d["id"], d["property"]))} for d in deps]

        outputs = _parse_outputs(key)
        body = {"output": key, "outputs": outputs if len(outputs) > 1 else outputs[0], "inputs": fill(spec["inputs"]),
                "state": fill(spec["state"]), "changedPropIds": [changed]}
        t0 = time.perf_counter()
        resp = self.client.post("/_dash-update-component", json=body)
        dt = time.perf_counter() - t0
        if resp.status_code != 200:
            raise RuntimeError(f"callback {key} answered {resp.status_code}: {resp.get_data(as_text=True)[:300]}")
        return dt, resp.get_json()


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, int(round(q * (len(xs) - 1)))))]


def _summary(ms: list[float]) -> dict:
    return {"n": len(ms), "p50_ms": round(_pct(ms, 0.5), 2), "p95_ms": round(_pct(ms, 0.95), 2),
            "max_ms": round(max(ms), 2), "mean_ms": round(statistics.fmean(ms), 2)} if ms else {"n": 0}


def measure(capture: Path, changes: int, seed: int) -> dict:
    from dfsviz.app import create_app
    from dfsviz.app.pages import common, masks

    import dfsviz

    root = capture.parent
    t0 = time.perf_counter()
    dfsviz.open(capture).close()  # the reader alone: the file's structure is checked, no map is read
    reader_ms = (time.perf_counter() - t0) * 1e3
    app = create_app(root)
    catalog = app.server.config["DFSVIZ_CATALOG"]
    cid = f"{next(iter(catalog.roots))}/{capture.name}"
    driver = Driver(app)
    with app.server.app_context():
        t0 = time.perf_counter()
        reader = catalog.reader(cid)  # what the dashboard does first: open, and check what it checks first
        catalog_ms = (time.perf_counter() - t0) * 1e3
        catalog.wait_checked(cid)  # a large file's whole check: the controls are timed after it
        checked_ms = (time.perf_counter() - t0) * 1e3
        log.info("open: reader %.0f ms, catalog %.0f ms, checked %.0f ms", reader_ms, catalog_ms, checked_ms)
        options = {"step": reader.steps, "layer": reader.layers, "head": reader.heads,
                   "method": common.method_choices(reader), "budget": [0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5]}
        left, right = masks.order_pair(reader.orders)
        info = {"grid": reader.grid.name, "num_tokens": reader.grid.num_tokens, "block": reader.block,
                "num_blocks": reader.layout.num_blocks, "steps": len(reader.steps), "layers": len(reader.layers),
                "heads": len(reader.heads), "orders": reader.orders, "methods": reader.methods}
    state = {"file": cid, "step": reader.steps[-1], "layer": reader.layers[len(reader.layers) // 2],
             "head": reader.heads[0], "method": "dfs_tile", "budget": 0.2}
    # the one callback that draws the maps and the footprints
    key = driver.key_for('"mk-left"', "mk-fp-note")
    drawn = None  # the key of the view on screen, as the page's store keeps it

    def values():
        v = {(f"mk-{k}", "value"): state[k] for k in ("file", "step", "layer", "head", "method", "budget")}
        v[("mk-orders", "data")] = [left, right]
        v[("mk-scale", "value")] = "shared"
        v[("mk-qorder", "data")] = None
        v[("mk-qb", "data")] = None
        v[("mk-drawn", "data")] = drawn
        return v

    def view(changed: str) -> tuple[float, dict]:
        nonlocal drawn
        dt, payload = driver.call(key, values(), changed)
        drawn = payload["response"]["mk-drawn"]["data"]
        return dt, payload

    # the first view of the page: opens the file, reads the permutations and coordinates
    first = {"view": view("mk-file.value")[0] * 1e3}
    rng = random.Random(seed)
    results = {}
    for control in CONTROLS:
        rows, sizes, cold = [], [], []
        for _ in range(changes):
            state[control] = rng.choice([v for v in options[control] if v != state[control]])
            misses = catalog.cache_info()["maps"]["misses"]
            dt, payload = view(f"mk-{control}.value")
            text = json.dumps(payload)
            sizes.append(len(text) / 1e3)
            if "dfs-banner-error" in text:
                raise RuntimeError(f"the Masks callback showed an error banner for {state}: {text[:400]}")
            rows.append(dt * 1e3)
            if catalog.cache_info()["maps"]["misses"] > misses:
                cold.append(dt * 1e3)
        results[control] = {"view": _summary(rows), "view_cold": _summary(cold),
                            "view_response_kB": round(statistics.median(sizes), 1)}
        log.info("%s: p95 %.1f ms", control, results[control]["view"]["p95_ms"])
    # first view of the other pages (cold caches for what they read beyond the Masks page)
    from dfsviz.app.pages import overview

    with app.server.app_context():
        sched = overview.default_schedule(reader)
    mid = reader.layers[len(reader.layers) // 2]
    pages = {
        "overview: schedule replay": ('"ov-schedule"', {"ov-order": "hilbert3d", "ov-method": "dfs_tile",
                                                        "ov-skip": sched["skip"], "ov-interval": sched["interval"],
                                                        "ov-gamma0": 0.3, "ov-decrement": 0.1}),
        "overview: recall per layer x step": ('"ov-recall"', {"ov-order": "hilbert3d", "ov-budget": 0.2}),
        "recall: curves, all layers and heads": ('"rc-curves"', {"rc-step": reader.steps[-1], "rc-layer": "all",
                                                                 "rc-head": "all", "rc-orders": reader.orders,
                                                                 "rc-methods": reader.methods, "rc-target": 0.9}),
        "theory: bounds and factors, one layer": ('"th-bound2"', {"th-step": reader.steps[-1], "th-layer": mid,
                                                                  "th-method": "dfs_tile", "th-budget": 0.2,
                                                                  "th-orders": reader.orders, "th-kind": "violin"}),
        "drift: one layer, all heads": ('"dr-recall"', {"dr-layer": mid, "dr-head": "all", "dr-order": "hilbert3d",
                                                        "dr-method": "dfs_tile", "dr-budget": 0.2}),
    }
    other = {}
    for label, (output, controls) in pages.items():
        prefix = next(iter(controls)).split("-")[0]
        vals = {(k, "value"): v for k, v in controls.items()}
        vals[(f"{prefix}-file", "value")] = cid
        dt, payload = driver.call(driver.key_for(output), vals, f"{prefix}-file.value")
        if "dfs-banner-error" in json.dumps(payload):
            raise RuntimeError(f"{label} showed an error banner: {json.dumps(payload)[:400]}")
        other[label] = round(dt * 1e3, 1)
        log.info("%s: %.0f ms", label, dt * 1e3)
    catalog.close()
    met = all(results[c]["view"]["p95_ms"] <= TARGET_P95_MS for c in CONTROLS)
    return {"capture": info, "open_ms": {"reader": round(reader_ms, 1), "catalog": round(catalog_ms, 1),
                                          "catalog_whole_check": round(checked_ms, 1)},
            "first_view_ms": {k: round(v, 1) for k, v in first.items()}, "controls": results,
            "other_pages_first_view_ms": other, "target_p95_ms": TARGET_P95_MS, "target_met": met}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--capture", type=Path, required=True, help="capture file (made with --make if missing)")
    parser.add_argument("--make", action="store_true", help="(re)make the capture first")
    parser.add_argument("--latent", default="21x60x104", help="latent FxHxW (Wan patches 1x2x2); default: Wan 480p")
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--block", type=int, default=128, help="tokens per block (Mk = ceil(N / block))")
    parser.add_argument("--map-dtype", choices=MAP_DTYPES, default="float32",
                        help="storage dtype of the maps of a capture made with --make")
    parser.add_argument("--changes", type=int, default=40, help="changes per control")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-bytes", type=int, default=10**9, help="refuse a smaller capture (the target is set on >= 1 GB)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/app_latency.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import torch

    made = None
    if args.make or not args.capture.exists():
        args.capture.parent.mkdir(parents=True, exist_ok=True)
        made = make_capture(args.capture, latent=args.latent, heads=args.heads, layers=args.layers, steps=args.steps,
                            seed=args.seed, block=args.block, map_dtype=args.map_dtype)
        log.info("capture: %.1f s, %.2f GB", made["seconds"], made["file_bytes"] / 1e9)
    size = args.capture.stat().st_size
    if size < args.min_bytes:
        print(f"capture {args.capture} has {size / 1e9:.2f} GB < {args.min_bytes / 1e9:.2f} GB: raise --steps/--layers",
              file=sys.stderr)
        return 2
    torch.set_num_threads(1)  # as `dfsviz app` serves (see dfsviz/cli/app.py)
    header = run_header(torch.device("cpu"))  # its load average: other jobs on the same cores slow every number down
    result = {**header, **measure(args.capture, args.changes, args.seed)}
    result["machine"]["load_end"] = load()
    result.update({
        "file_bytes": size, "made": made, "changes_per_control": args.changes,
        "note": "server-side latency of Dash callbacks (test client, JSON in and out); browser drawing not included",
    })
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps({c: {k: v["p95_ms"] for k, v in r.items() if isinstance(v, dict) and "p95_ms" in v} for c, r in result["controls"].items()},
                     indent=1))
    print("target p95 <= 150 ms met:", result["target_met"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""CPU budget check of the sparse core on the Wan 480p latent grid.

Random Q/K on the Wan2.1 480p grid 21x30x52 (N = 32,760 tokens), H = 2, D = 64,
float32: for the raster and hilbert3d orders, reorder Q/K, run the exact block
statistics pass (``block_stats_ref``: m, L, r, J, lse) and the DFSAttn tile scores
(``block_scores_ref(method="dfs_tile")``). Requirement: everything in under 60 s with a
peak RSS under 4 GB on the 2-core CI machine. Writes
``benchmarks/results/sparse_cpu.json`` (machine, versions, shapes, seconds per part,
peak RSS) and prints a summary; exits 1 when a requirement is missed.

Run: ``.venv/bin/python benchmarks/bench_sparse_cpu.py [--out PATH]``.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

from dfsviz.sparse.grid import LatentGrid
from dfsviz.sparse.orders import make_order
from dfsviz.sparse.scoring import block_scores_ref
from dfsviz.sparse.stats import block_stats_ref
from provenance import load, run_header  # this script's folder

GRID = "21x30x52"
HEADS = 2
HEAD_DIM = 64
BLOCK = 128
TILE = 16
ORDERS = ("raster", "hilbert3d")
LIMIT_SECONDS = 60.0
LIMIT_RSS_BYTES = 4 * 2**30


def _peak_rss_bytes() -> int:
    # ru_maxrss is in kilobytes on Linux and in bytes on macOS.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def run(out: Path) -> dict:
    header = run_header(torch.device("cpu"))
    grid = LatentGrid.parse(GRID)
    n = grid.num_tokens
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, HEADS, n, HEAD_DIM, generator=gen)
    k = torch.randn(1, HEADS, n, HEAD_DIM, generator=gen)
    parts: dict[str, float] = {}
    total_start = time.perf_counter()
    for name in ORDERS:
        start = time.perf_counter()
        order = make_order(name, grid)
        qo, ko = order.apply(q), order.apply(k)
        parts[f"{name}/order"] = time.perf_counter() - start

        start = time.perf_counter()
        stats = block_stats_ref(qo, ko, block=BLOCK)
        parts[f"{name}/block_stats_ref"] = time.perf_counter() - start
        # The mass rows must sum to 1: a cheap guard that the timed pass computed something real.
        row_sum_error = float((stats.m.sum(dim=-1) - 1).abs().max())

        start = time.perf_counter()
        scores = block_scores_ref(qo, ko, "dfs_tile", tile=TILE, block=BLOCK)
        parts[f"{name}/dfs_tile"] = time.perf_counter() - start
        parts[f"{name}/max_row_sum_error"] = row_sum_error
        del stats, scores, qo, ko
    total = time.perf_counter() - total_start
    peak = _peak_rss_bytes()
    header["machine"]["load_end"] = load()
    result = {
        **header,
        "benchmark": "sparse_cpu",
        "shapes": {"grid": GRID, "B": 1, "H": HEADS, "N": n, "D": HEAD_DIM, "block": BLOCK, "tile": TILE,
                   "dtype": "float32", "orders": list(ORDERS)},
        "seconds": {key: value for key, value in parts.items() if not key.endswith("error")},
        "max_row_sum_error": {key.split("/")[0]: value for key, value in parts.items() if key.endswith("error")},
        "total_seconds": total,
        "peak_rss_bytes": peak,
        "peak_rss_gib": peak / 2**30,
        "limits": {"seconds": LIMIT_SECONDS, "rss_bytes": LIMIT_RSS_BYTES},
        "passed": total < LIMIT_SECONDS and peak < LIMIT_RSS_BYTES,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "sparse_cpu.json")
    args = parser.parse_args()
    result = run(args.out)
    for key, value in result["seconds"].items():
        print(f"{key:28s} {value:7.2f} s")
    print(f"{'total':28s} {result['total_seconds']:7.2f} s (limit {LIMIT_SECONDS:.0f} s)")
    print(f"{'peak RSS':28s} {result['peak_rss_gib']:7.2f} GiB (limit 4 GiB)")
    print(f"wrote {args.out}; {'PASS' if result['passed'] else 'FAIL'}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())

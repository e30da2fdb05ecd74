"""Per-head budgets (a calibrated DFSAttn config) against one uniform budget, at equal attention work.

    PYTHONPATH=$PWD python3 benchmarks/bench_head_budgets.py --out benchmarks/results/head_budgets_<card>.json

``dfsviz calibrate`` gives every (layer, head) its own kept fraction gamma_h, so the block-sparse
kernel sees heads with very different numbers of key blocks per query block. This checks that
the load imbalance costs nothing: for each shape, a uniform top-k mask at gamma = 0.2 and
per-head masks that keep exactly as many key blocks in all (the same attention FLOPs), with
budgets

* ``spread``: gamma_h log-uniform over a 12x range (seeded),
* ``bimodal``: alternate heads at 1/7 of each other's budget,
* ``dense_heads``: one head in eight dense (gamma 1), the others sharing the rest,

are timed with ``bench_kernels.bench`` (the GPU's time, median of at least 10 calls) in
this process, B = 1 and 2 (CFG shares its mask). Scores are dfs_tile (tile 16) on hilbert3d-ordered
token-model Q/K, as in ``bench_kernels.py``; timed inputs are random bf16. Target: per-head <= 1.05x uniform.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys

from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import bench  # noqa: E402
from provenance import run_header  # noqa: E402

from dfsviz.accel.plan import select_topk_heads  # noqa: E402
from dfsviz.kernels.block_scores import block_scores  # noqa: E402
from dfsviz.kernels.block_sparse_attention import block_sparse_attention  # noqa: E402
from dfsviz.sparse.grid import LatentGrid  # noqa: E402
from dfsviz.sparse.masks import BlockMask  # noqa: E402
from dfsviz.sparse.orders import make_order  # noqa: E402
from dfsviz.sparse.select import select_topk  # noqa: E402
from dfsviz.sparse.tokenmodel import TokenModelConfig, sample_qk  # noqa: E402

log = logging.getLogger("bench_head_budgets")

SHAPES = {
    "wan1.3b-480p": (LatentGrid(21, 30, 52), 12),
    "wan14b-720p": (LatentGrid(21, 45, 80), 40),
    "smoke": (LatentGrid(5, 16, 24), 8),
}
D, BLOCK, GAMMA, TARGET = 128, 128, 0.2, 1.05
PROFILES = ("spread", "bimodal", "dense_heads")


def head_counts(profile: str, heads: int, mk: int, total: int, seed: int = 0) -> list[int]:
    """Key blocks per query block for each head, summing to ``total`` (equal work), each in [1, mk]."""
    gen = torch.Generator().manual_seed(seed)
    if profile == "spread":
        weights = torch.exp(torch.empty(heads).uniform_(math.log(1.0), math.log(12.0), generator=gen)).tolist()
    elif profile == "bimodal":
        weights = [1.0 if h % 2 else 7.0 for h in range(heads)]
    elif profile == "dense_heads":
        dense = set(range(0, heads, 8))
        rest = (total - mk * len(dense)) / (heads - len(dense))
        return _fix_sum([mk if h in dense else rest for h in range(heads)], total, mk, dense)
    else:
        raise ValueError(f"unknown profile {profile!r}")
    scale = total / sum(weights)
    return _fix_sum([w * scale for w in weights], total, mk, set())


def _fix_sum(values: list[float], total: int, mk: int, frozen: set[int]) -> list[int]:
    counts = [min(mk, max(1, round(v))) for v in values]
    free = [h for h in range(len(counts)) if h not in frozen]
    while sum(counts) != total:  # rounding: move single blocks until the totals match exactly
        step = 1 if sum(counts) < total else -1
        pick = max(free, key=lambda h: (values[h] - counts[h]) * step)
        if not 1 <= counts[pick] + step <= mk:
            free.remove(pick)
            continue
        counts[pick] += step
    return counts


def masks_for(grid: LatentGrid, heads: int) -> tuple[BlockMask, dict[str, tuple[BlockMask, list[int]]]]:
    cfg = TokenModelConfig(grid=grid, heads=min(4, heads), head_dim=D, dtype=torch.bfloat16, seed=0)
    q, k = sample_qk(cfg, device="cuda")
    order = make_order("hilbert3d", grid)
    scores = block_scores(order.apply(q), order.apply(k), method="dfs_tile", tile=16, block=BLOCK)
    scores = scores.repeat(1, -(-heads // scores.shape[1]), 1, 1)[:, :heads].contiguous()
    n, mk = grid.num_tokens, scores.shape[-1]
    uniform = select_topk(scores, GAMMA, seq_len=n, block=BLOCK)
    k_uniform = int(uniform.kv_num_blocks[0, 0, 0])
    per_head = {}
    for profile in PROFILES:
        counts = head_counts(profile, heads, mk, k_uniform * heads)
        gammas = [None if c == mk else (c + 0.5) / mk for c in counts]  # int(gamma * Mk) == c
        mask = select_topk_heads(scores, gammas, seq_len=n, block=BLOCK)
        got = mask.kv_num_blocks[0, :, 0].tolist()
        if got != counts:
            raise RuntimeError(f"{profile}: selected {got} key blocks per head, wanted {counts}")
        per_head[profile] = (mask, counts)
    return uniform, per_head


def batched(mask: BlockMask, bsz: int) -> BlockMask:
    return BlockMask(mask.kv_num_blocks.expand(bsz, -1, -1).contiguous(),
                     mask.kv_indices.expand(bsz, -1, -1, -1).contiguous(), mask.seq_len, mask.block)


def run_shape(name: str, batches: list[int]) -> list[dict]:
    grid, heads = SHAPES[name]
    uniform, per_head = masks_for(grid, heads)
    rows = []
    for bsz in batches:
        q, k, v = (torch.randn(bsz, heads, grid.num_tokens, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        um = batched(uniform, bsz)
        row = {"shape": name, "grid": grid.name, "N": grid.num_tokens, "H": heads, "D": D, "B": bsz,
               "dtype": "bfloat16", "gamma": GAMMA, "uniform_density": float(um.density().mean())}
        # uniform timed before and after the per-head masks: its spread is the noise floor
        first = bench(lambda: block_sparse_attention(q, k, v, um), rep_ms=300)
        row["profiles"] = []
        for profile, (mask, counts) in per_head.items():
            pm = batched(mask, bsz)
            ms = bench(lambda: block_sparse_attention(q, k, v, pm), rep_ms=300)
            row["profiles"].append({"profile": profile, "blocks_per_head": counts, "density": float(pm.density().mean()),
                                    "density_per_head": [round(float(x), 4) for x in pm.density()[0]], "ms": ms})
        second = bench(lambda: block_sparse_attention(q, k, v, um),
                       rep_ms=300)
        row["uniform_ms"], row["uniform_ms_runs"] = min(first, second), [first, second]
        for p in row["profiles"]:
            p["vs_uniform"] = p["ms"] / row["uniform_ms"]
            p["met"] = p["vs_uniform"] <= TARGET
            log.info("%s B=%d %-11s density %.4f (uniform %.4f): %.3f ms vs %.3f ms = %.3fx", name, bsz, p["profile"],
                     p["density"], row["uniform_density"], p["ms"], row["uniform_ms"], p["vs_uniform"])
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="results JSON (benchmarks/results/head_budgets_<card>.json)")
    parser.add_argument("--shapes", nargs="+", default=["wan1.3b-480p", "wan14b-720p"], choices=sorted(SHAPES))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 2])
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    header = run_header(torch.device("cuda"))
    rows = [row for name in args.shapes for row in run_shape(name, args.batches)]
    worst = max(p["vs_uniform"] for row in rows for p in row["profiles"])
    result = {
        **header,
        "benchmark": "per-head budgets vs one uniform budget at equal kept blocks (block_sparse_attention, no order)",
        "target": f"per-head <= {TARGET}x uniform", "worst_vs_uniform": worst, "met": worst <= TARGET, "rows": rows,
    }
    print(f"worst per-head / uniform: {worst:.3f}x (target <= {TARGET}x)")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()

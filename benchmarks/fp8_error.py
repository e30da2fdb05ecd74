"""The error of FP8 attention's arithmetic against float64 attention of the unquantized inputs:
the table of docs/kernels.md's FP8 section.

    .venv/bin/python benchmarks/fp8_error.py      # CPU, under a minute on 2 cores

The PyTorch references of each precision (``block_sparse_attention_ref`` for bf16,
``block_sparse_attention_fp8_ref`` for ``"fp8"`` and ``"fp8_pv"``; the kernels are checked
against these elsewhere: tests/kernels/test_fp8.py, benchmarks/check_gpu.py) on unit-variance q
and v and keys that share an offset (3 x a standard normal vector over the channels, as the keys
of video models do), bfloat16 inputs, N 1000, 2 heads, D 64 and 128, block 128 with 60 % of the
blocks kept at random (the diagonal always), five seeds: the largest absolute error over the seeds
and the mean of the seeds' mean absolute errors, of the output and of the LSE.

Writes benchmarks/results/fp8_error_cpu.json (machine, versions, the numbers).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from provenance import run_header  # benchmarks/ is the script's folder
from dfsviz.kernels.fp8 import block_sparse_attention_fp8_ref
from dfsviz.sparse.attention import block_sparse_attention_ref
from dfsviz.sparse.masks import BlockMask

N, HEADS, BLOCK, KEEP, KEY_OFFSET = 1000, 2, 128, 0.6, 3.0
PRECISIONS = ("native", "fp8", "fp8_pv")


def case(d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, BlockMask]:
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, HEADS, N, d, generator=gen) for _ in range(3))
    k = k + KEY_OFFSET * torch.randn(d, generator=gen)
    m = -(-N // BLOCK)
    keep = torch.rand(1, HEADS, m, m, generator=gen) < KEEP
    keep[..., torch.arange(m), torch.arange(m)] = True
    return q.bfloat16(), k.bfloat16(), v.bfloat16(), BlockMask.from_dense(keep, N, BLOCK)


def attention(precision: str, q, k, v, mask) -> tuple[torch.Tensor, torch.Tensor]:
    if precision == "native":
        return block_sparse_attention_ref(q, k, v, mask, return_lse=True)
    return block_sparse_attention_fp8_ref(q, k, v, mask, return_lse=True, precision=precision)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="example: .venv/bin/python benchmarks/fp8_error.py --seeds 5")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "fp8_error_cpu.json")
    args = ap.parse_args()
    if args.seeds < 1:
        ap.error("--seeds must be at least 1")
    header = run_header(torch.device("cpu"))
    rows = []
    for d in (64, 128):
        errors = {p: {"out_max": 0.0, "out_means": [], "lse_max": 0.0} for p in PRECISIONS}
        for seed in range(args.seeds):
            q, k, v, mask = case(d, seed)
            gold, gold_lse = block_sparse_attention_ref(q.double(), k.double(), v.double(), mask, return_lse=True)
            finite = torch.isfinite(gold_lse)
            for precision in PRECISIONS:
                out, lse = attention(precision, q, k, v, mask)
                err = (out.double() - gold).abs()
                e = errors[precision]
                e["out_max"] = max(e["out_max"], float(err.max()))
                e["out_means"].append(float(err.mean()))
                e["lse_max"] = max(e["lse_max"], float((lse.double() - gold_lse)[finite].abs().max()))
        for precision, e in errors.items():
            rows.append({"D": d, "precision": precision, "out_max": e["out_max"],
                         "out_mean": sum(e["out_means"]) / len(e["out_means"]), "lse_max": e["lse_max"]})
            print(f"D {d} {precision:7s} out max {e['out_max']:.4f} mean {rows[-1]['out_mean']:.5f} "
                  f"lse max {e['lse_max']:.4f}")
    result = {**header, "setup": {"N": N, "heads": HEADS, "block": BLOCK, "keep": KEEP, "key_offset": KEY_OFFSET,
                        "seeds": args.seeds, "dtype": "bfloat16"}, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out} ({len(rows)} rows)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""FP8 linear layers against the bfloat16 layer at the video models' shapes (GPU, same process).

    PYTHONPATH=$PWD python3 benchmarks/bench_fp8_linear.py --out benchmarks/results/fp8_linear_<card>.json

Per layer shape (M token rows x K -> N; Wan2.1-1.3B 480p, Wan2.1-14B 720p, HunyuanVideo 720p: the
attention projections and the FFN's two layers) it times, with bench_kernels.bench (the GPU's time, median
of at least 10 calls):

* bf16: ``torch.nn.functional.linear`` (cuBLAS), the baseline;
* fp8: ``dfsviz.kernels.fp8_linear.fp8_linear`` (the Triton row pass, then torch._scaled_mm with
  row-wise scales), what ``DFSConfig.linear_precision="fp8"`` runs;
* the row pass and the scaled product alone.

TFLOP/s count 2 M K N per call. Also the RMS error of both outputs against the float64 product of
the unquantized inputs (unit-variance x, weights of std 1 / sqrt(K), a unit bias), relative to the
output's RMS. Writes the card, versions and every timing to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import bench  # noqa: E402
from provenance import run_header  # noqa: E402

from dfsviz.kernels._jit.fp8 import quantize_rows_fp8_fwd  # noqa: E402
from dfsviz.kernels.fp8_linear import fp8_linear, quantize_weight_fp8  # noqa: E402

#: model -> (token rows M, [(K, N, what)]): self-attention q/k/v/out (one shape), FFN up and down.
SHAPES = {
    "wan-1.3b-480p": (32760, [(1536, 1536, "attention projection"), (1536, 8960, "FFN up"),
                              (8960, 1536, "FFN down")]),
    "wan-14b-720p": (75600, [(5120, 5120, "attention projection"), (5120, 13824, "FFN up"),
                             (13824, 5120, "FFN down")]),
    "hunyuan-720p": (119056, [(3072, 3072, "attention projection"), (3072, 12288, "FFN up"),
                              (12288, 3072, "FFN down"), (15360, 3072, "single-stream proj_out")]),
}


def measure(m: int, k: int, n: int, gen: torch.Generator) -> dict:
    x = torch.randn(m, k, generator=gen, device="cuda").bfloat16()
    w = (torch.randn(n, k, generator=gen, device="cuda") / k ** 0.5).bfloat16()
    b = torch.randn(n, generator=gen, device="cuda").bfloat16()
    weight = quantize_weight_fp8(w, b)
    x8, x_scale = quantize_rows_fp8_fwd(x)
    times = {
        "bf16_ms": bench(lambda: F.linear(x, w, b)),
        "fp8_ms": bench(lambda: fp8_linear(x, weight)),
        "row_pass_ms": bench(lambda: quantize_rows_fp8_fwd(x)),
        "scaled_mm_ms": bench(lambda: torch._scaled_mm(x8, weight.w8.t(), scale_a=x_scale,
                                                       scale_b=weight.scale[None, :], bias=b,
                                                       out_dtype=torch.bfloat16)),
    }
    flop = 2.0 * m * k * n
    rows = slice(0, min(m, 4096))  # the float64 product of a slice of rows
    exact = F.linear(x[rows].double(), w.double(), b.double())
    rms = exact.pow(2).mean().sqrt()
    errors = {name: float((y[rows].double() - exact).pow(2).mean().sqrt() / rms)
              for name, y in (("bf16", F.linear(x, w, b)), ("fp8", fp8_linear(x, weight)))}
    return {"M": m, "K": k, "N": n, **times, "speedup_fp8_vs_bf16": times["bf16_ms"] / times["fp8_ms"],
            "tflops_bf16": flop / times["bf16_ms"] / 1e9, "tflops_fp8": flop / times["fp8_ms"] / 1e9,
            "tflops_scaled_mm": flop / times["scaled_mm_ms"] / 1e9, "rms_error": errors}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="JSON file to write")
    ap.add_argument("--models", default=",".join(SHAPES), help=f"comma list of {list(SHAPES)}")
    args = ap.parse_args(argv)
    names = [s.strip() for s in args.models.split(",") if s.strip()]
    bad = [s for s in names if s not in SHAPES]
    if bad:
        ap.error(f"--models: unknown {bad}; choose from {list(SHAPES)}")
    if not torch.cuda.is_available():
        ap.error("no CUDA device: run this on the GPU machine")
    gen = torch.Generator(device="cuda").manual_seed(0)
    result = {**run_header(torch.device("cuda")), "models": {}}
    for name in names:
        m, layers = SHAPES[name]
        rows = []
        for k, n, what in layers:
            row = {"layer": what, **measure(m, k, n, gen)}
            rows.append(row)
            print(f"{name} {what} M{m} K{k} N{n}: bf16 {row['bf16_ms']:.3f} ms ({row['tflops_bf16']:.0f} TFLOP/s), "
                  f"fp8 {row['fp8_ms']:.3f} ms ({row['tflops_fp8']:.0f}), {row['speedup_fp8_vs_bf16']:.2f}x; row pass "
                  f"{row['row_pass_ms']:.3f} ms; RMS error bf16 {row['rms_error']['bf16']:.4f} fp8 "
                  f"{row['rms_error']['fp8']:.4f}", flush=True)
        result["models"][name] = rows
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

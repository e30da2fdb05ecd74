"""The GPU's exponential in float32 against half precision two values an instruction (GPU).

Why: the FP8 attention kernel is bound by the softmax's exponentials (docs/kernels.md, FP8). P is
rounded to e4m3 there, so half precision would do; ``ex2.approx.f16x2`` takes two values an
instruction. Whether that lifts the bound depends on the exponential unit's rate for it, which
this times: one kernel per variant, every thread evaluating ``--iters`` exponentials of each of
its values, with an add and a multiply per value beside each (as the softmax has), on 1 << 24
values; time per value, float32 (``ex2.approx.ftz.f32``) against half precision
(``ex2.approx.f16x2``, and ``ex2.approx.ftz.bf16x2``), same process. Writes
benchmarks/results/exp2_<card>.json (card, versions, the SASS instruction each variant compiled
to, times and ratios).

    PYTHONPATH=$PWD python3 benchmarks/bench_exp2.py
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_e2e import card_slug  # noqa: E402
from provenance import run_header  # noqa: E402

VALUES = 1 << 24
BLOCK = 1024
# name -> (PTX of one instruction, element dtype, values per instruction)
VARIANTS = {
    "f32": ("ex2.approx.ftz.f32 $0, $1;", torch.float32, 1),
    "f16x2": ("ex2.approx.f16x2 $0, $1;", torch.float16, 2),
    "bf16x2": ("ex2.approx.ftz.bf16x2 $0, $1;", torch.bfloat16, 2),
}


@triton.jit
def _exp2_loop(X, OUT, ITERS: tl.constexpr, ASM: tl.constexpr, PACK: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(X + offs)
    acc = tl.zeros([BLOCK], X.dtype.element_ty)
    for _ in range(ITERS):
        y = tl.inline_asm_elementwise(ASM, "=r,r", [x], dtype=X.dtype.element_ty, is_pure=True, pack=PACK)
        acc += y
        x = x * 0.5  # a new argument each step: nothing to hoist out of the loop
    tl.store(OUT + offs, acc)


def run(iters: int) -> dict:
    device = torch.device("cuda")
    rows = {}
    for name, (asm, dtype, pack) in VARIANTS.items():
        x = -torch.rand(VALUES, device=device).to(dtype)
        out = torch.empty_like(x)
        grid = (VALUES // BLOCK,)
        kernel = _exp2_loop[grid](x, out, ITERS=iters, ASM=asm, PACK=pack, BLOCK=BLOCK)
        ms = do_bench(lambda: _exp2_loop[grid](x, out, ITERS=iters, ASM=asm, PACK=pack, BLOCK=BLOCK))
        try:
            sass = kernel.asm["sass"]  # disassembled on first use, by the nvdisasm Triton bundles
        except Exception as exc:  # noqa: BLE001 - the times stand without it; say why it is missing
            sass = f"(no SASS: {type(exc).__name__}: {exc})"
        mufu = sorted(set(re.findall(r"MUFU\.EX2[.\w]*", sass)))
        rows[name] = {"ptx": asm, "dtype": str(dtype), "values_per_instruction": pack, "sass_mufu": mufu,
                      "sass_mufu_count": len(re.findall(r"MUFU\.EX2", sass)), "ms": ms,
                      "ns_per_value_per_sm": ms * 1e6 * torch.cuda.get_device_properties(0).multi_processor_count
                      / (VALUES * iters)}
    for row in rows.values():
        row["time_vs_f32"] = row["ms"] / rows["f32"]["ms"]
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=256, help="exponentials per value (default 256)")
    ap.add_argument("--out", type=Path, default=None, help="default benchmarks/results/exp2_<card>.json")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU")
    result = {**run_header(torch.device("cuda")), "values": VALUES, "iters": args.iters, "block": BLOCK, "variants": run(args.iters)}
    out = args.out or Path(__file__).resolve().parent / "results" / f"exp2_{card_slug(torch.device('cuda'))}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    for name, row in result["variants"].items():
        print(f"{name}: {row['ms']:.3f} ms, {row['time_vs_f32']:.2f}x float32's time, SASS {row['sass_mufu']}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

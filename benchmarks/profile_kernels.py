"""Where the kernels' time goes: per-launch GPU times (torch.profiler) and an Nsight Compute region.

    PYTHONPATH=$PWD python3 benchmarks/profile_kernels.py --out benchmarks/results/profile_kernels_<card>.json
    ncu --clock-control none --profile-from-start off --set full -o kernels \\
        python3 benchmarks/profile_kernels.py --ncu-region

Shape: Wan2.1-1.3B 480p (N = 32760, H = 12, D = 128, bf16, B = 1), the hilbert3d dfs_tile
mask at gamma 0.2 (bench_kernels.realistic_masks). Cases: cuDNN dense SDPA, our block-sparse
kernel with and without order and with the full mask, in bf16 and with FP8 Q and K
(``precision="fp8"``), sparse with P . V in FP8 too (``"fp8_pv"``), and block_scores (dfs_tile,
tile 16); ``--cases`` picks some of them.
For each case the JSON lists every GPU kernel launched by one call (name, count, device
microseconds, from CUPTI), the call's device time between CUDA events, and the host time
to enqueue it while the GPU is busy (launch overhead that a GPU-bound pipeline hides).
``--ncu-region`` runs each case once, after warm-up and autotuning, between
cudaProfilerStart/Stop so that ``ncu --profile-from-start off`` profiles only those launches.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import BLOCK, SHAPES, bench, host_enqueue_ms, realistic_masks  # noqa: E402
from provenance import run_header  # noqa: E402

from dfsviz.kernels.block_scores import block_scores  # noqa: E402
from dfsviz.kernels.block_sparse_attention import block_sparse_attention  # noqa: E402
from dfsviz.sparse.masks import BlockMask  # noqa: E402
from dfsviz.sparse.orders import make_order  # noqa: E402

GAMMA = 0.2


def _cudnn_dense(x):
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return torch.nn.functional.scaled_dot_product_attention(x.q, x.k, x.v)


#: Case name -> the call it times, on the inputs that ``cases`` draws.
CASES = {
    "cudnn_dense": _cudnn_dense,
    "sparse": lambda x: block_sparse_attention(x.q, x.k, x.v, x.mask),
    "sparse_order": lambda x: block_sparse_attention(x.q, x.k, x.v, x.mask, order=x.order),
    "full_mask": lambda x: block_sparse_attention(x.q, x.k, x.v, x.full),
    "full_mask_order": lambda x: block_sparse_attention(x.q, x.k, x.v, x.full, order=x.order),
    "sparse_fp8": lambda x: block_sparse_attention(x.q, x.k, x.v, x.mask, precision="fp8"),
    "full_mask_fp8": lambda x: block_sparse_attention(x.q, x.k, x.v, x.full, precision="fp8"),
    "sparse_fp8_pv": lambda x: block_sparse_attention(x.q, x.k, x.v, x.mask, precision="fp8_pv"),
    "block_scores": lambda x: block_scores(x.q, x.k, method="dfs_tile", tile=16, block=BLOCK),
}


def cases(shape: str, names) -> tuple[dict, float]:
    """Name -> zero-argument callable for each of ``names`` (keys of CASES), on freshly drawn
    inputs of ``shape``; and the mask's density."""
    grid, heads, d = SHAPES[shape]
    n = grid.num_tokens
    q, k, v = (torch.randn(1, heads, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    mask = realistic_masks(grid, heads, d, (GAMMA,), "cuda")[GAMMA]
    inputs = SimpleNamespace(q=q, k=k, v=v, mask=mask, full=BlockMask.full(1, heads, n, BLOCK, device="cuda"),
                             order=make_order("hilbert3d", grid))
    return {name: functools.partial(CASES[name], inputs) for name in names}, float(mask.density().mean())


def kernel_table(fn, calls: int) -> list[dict]:
    """GPU kernels of ``calls`` calls of ``fn`` (CUPTI), per call: name, count, microseconds."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    per = defaultdict(lambda: [0, 0.0])
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            per[ev.name][0] += 1
            per[ev.name][1] += ev.device_time_total
    rows = [{"kernel": name, "launches_per_call": c / calls, "us_per_call": t / calls} for name, (c, t) in per.items()]
    return sorted(rows, key=lambda r: -r["us_per_call"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="wan1.3b-480p", choices=sorted(SHAPES))
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES, help="which cases to run (default: all)")
    ap.add_argument("--ncu-region", action="store_true", help="one call per case inside cudaProfilerStart/Stop")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: run this on the GPU machine", file=sys.stderr)
        return 2
    fns, density = cases(args.shape, args.cases)
    for fn in fns.values():  # compile and autotune outside any measurement
        fn()
    torch.cuda.synchronize()
    if args.ncu_region:
        torch.cuda.profiler.start()
        for fn in fns.values():
            fn()
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
        return 0
    result = {**run_header(torch.device("cuda")), "shape": args.shape, "B": 1, "D": SHAPES[args.shape][2], "dtype": "bfloat16", "gamma": GAMMA,
              "mask_density": density,
              "cases": {}}
    for name, fn in fns.items():
        ms = bench(fn)
        kernels = kernel_table(fn, args.calls)
        result["cases"][name] = {"device_ms": ms, "kernels": kernels,
                                 "kernel_us_sum": sum(r["us_per_call"] for r in kernels),
                                 "host_enqueue_us": host_enqueue_ms(fn, args.calls) * 1e3}
        print(f"{name}: {ms * 1e3:.1f} us per call (kernels {result['cases'][name]['kernel_us_sum']:.1f} us, "
              f"host enqueue {result['cases'][name]['host_enqueue_us']:.1f} us)")
        for r in kernels:
            print(f"   {r['us_per_call']:9.1f} us  x{r['launches_per_call']:.0f}  {r['kernel'][:100]}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

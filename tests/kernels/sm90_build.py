"""Build the attention kernels for an sm_90 target without a GPU and print what they compiled
to, as JSON (run by test_attention_sm90.py in a process of its own: Triton's interpreter, which
the test process runs, turns Triton's library functions into interpreted ones that Gluon's
compiler cannot call).

    TRITON_INTERPRET=0 python tests/kernels/sm90_build.py gluon N D DTYPE RETURN_LSE ORDER [PRECISION]
    TRITON_INTERPRET=0 python tests/kernels/sm90_build.py desc N D

"gluon": the Gluon kernel for these inputs, PRECISION "native" (the default), "fp8" or "fp8_pv"
(e4m3 q and k, and v with "fp8_pv", as the FP8 launcher passes them; DTYPE is the output's).
"desc": every WARP_SPECIALIZE candidate of the Triton descriptor kernel that the autotuner keeps
for N (bfloat16, no order), each built on its own.
"""

import importlib
import json
import sys

import torch
from triton.backends.compiler import GPUTarget
from triton.runtime import driver

from dfsviz.sparse.masks import BlockMask


class HopperTarget:
    """The part of Triton's driver that compiling reads: an sm_90 target on device 0."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")


def gluon(n: int, d: int, dtype: torch.dtype, return_lse: bool, order: bool, precision: str = "native") -> dict:
    sm90 = importlib.import_module("dfsviz.kernels._jit.attention_sm90")
    bsz, heads, block = 2, 3, sm90.SM90_BLOCK
    q = k = v = torch.zeros(bsz, n, heads, d, dtype=dtype).transpose(1, 2)  # diffusers' [B, N, H, D] memory
    m = -(-n // block)
    scales = None
    if precision != "native":  # ordered, contiguous e4m3 copies with their scales
        q = k = torch.zeros(bsz, heads, n, d, dtype=torch.float8_e4m3fn)
        v_scale = None
        if precision == "fp8_pv":  # the [B, H, N', D] view of a [B, H, D, N'] buffer, N' = N rounded up to 32
            v = torch.zeros(bsz, heads, d, -(-n // 32) * 32, dtype=torch.float8_e4m3fn).transpose(-1, -2)
            v_scale = torch.ones(bsz, heads, d)
        else:
            v = torch.zeros(bsz, heads, n, d, dtype=dtype)
        scales = (torch.ones(bsz, heads, m), torch.ones(bsz, heads, m), v_scale)
    out = torch.zeros(bsz, n, heads, d, dtype=dtype).transpose(1, 2)
    mask = BlockMask.full(bsz, heads, n, block)
    perm = torch.randperm(n).to(torch.int32) if order else None
    grid, args, meta = sm90.sm90_launch_args(q, k, v, out, torch.zeros(bsz, heads, n), mask.kv_num_blocks,
                                             mask.kv_indices, perm, torch.arange(bsz * heads, dtype=torch.int32), m,
                                             m, 0.125, return_lse, scales)
    kernel = sm90._block_sparse_attention_sm90_kernel.warmup(*args, grid=grid, **meta)
    return {"grid": list(grid), "ptx": kernel.asm["ptx"], "shared": kernel.metadata.shared,
            "cubin": "cubin" in kernel.asm}


def desc(n: int, d: int) -> list[dict]:
    jit = importlib.import_module("dfsviz.kernels._jit.attention")
    q = torch.zeros(2, 3, n, d, dtype=torch.bfloat16)
    mask = BlockMask.full(2, 3, n, 128)
    meta = jit.kernel_meta(q.dtype, d, n, 128, has_order=False, return_lse=False)
    args = jit.desc_kernel_args(q, q, q, q, q, mask, None, (mask.kv_num_blocks,) * 3, 0.125)
    kernel = jit._block_sparse_attention_desc_kernel
    built = []
    for cfg in jit.ATTENTION_CONFIGS:
        if not cfg.get("WARP_SPECIALIZE") or not jit.attention_config_fits(cfg, 128, d, descriptors=True,
                                                                            even_n=meta["EVEN_N"]):
            continue
        tiles = dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], **{f: cfg.get(f, False) for f in jit.DESC_FLAGS})
        jit._set_tile_shapes(dict(zip(kernel.arg_names, args)) | meta | tiles)
        try:
            kernel.warmup(*args, grid=(1,), **meta, **tiles, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
            built.append({"config": cfg, "error": None})
        except Exception as exc:  # what the autotuner would meet: recorded, the next candidate built
            built.append({"config": cfg, "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
    return built


if __name__ == "__main__":
    driver.set_active(HopperTarget())
    if sys.argv[1] == "gluon":
        n, d, dtype, lse, order, *precision = sys.argv[2:]
        print(json.dumps(gluon(int(n), int(d), getattr(torch, dtype), lse == "1", order == "1", *precision)))
    else:
        n, d = sys.argv[2:]
        print(json.dumps(desc(int(n), int(d))))

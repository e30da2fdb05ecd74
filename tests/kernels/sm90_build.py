"""Build the Gluon attention kernel for an sm_90 target without a GPU and print what it compiled
to, as JSON (run by test_attention_sm90.py in a process of its own: Triton's interpreter, which
the test process runs, turns Triton's library functions into interpreted ones that Gluon's
compiler cannot call).

    TRITON_INTERPRET=0 python tests/kernels/sm90_build.py N D DTYPE RETURN_LSE
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


def main(n: int, d: int, dtype: torch.dtype, return_lse: bool) -> dict:
    driver.set_active(HopperTarget())
    sm90 = importlib.import_module("dfsviz.kernels._jit.attention_sm90")
    bsz, heads, block = 2, 3, sm90.SM90_BLOCK
    q = torch.zeros(bsz, n, heads, d, dtype=dtype).transpose(1, 2)  # diffusers' [B, N, H, D] memory
    m = -(-n // block)
    mask = BlockMask.full(bsz, heads, n, block)
    grid, args, meta = sm90.sm90_launch_args(q, q, q, torch.empty_like(q), torch.zeros(bsz, heads, n),
                                             mask.kv_num_blocks, mask.kv_indices,
                                             torch.arange(bsz * heads, dtype=torch.int32), m, m, 0.125, return_lse)
    kernel = sm90._block_sparse_attention_sm90_kernel.warmup(*args, grid=grid, **meta)
    return {"grid": list(grid), "ptx": kernel.asm["ptx"], "shared": kernel.metadata.shared,
            "cubin": "cubin" in kernel.asm}


if __name__ == "__main__":
    n, d, dtype, lse = sys.argv[1:]
    print(json.dumps(main(int(n), int(d), getattr(torch, dtype), lse == "1")))

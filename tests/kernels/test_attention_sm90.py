"""The Gluon attention kernel for Hopper (``dfsviz.kernels._jit.attention_sm90``) on a machine
without one: Triton's interpreter does not run Gluon, so these tests build the kernel for an
sm_90 target (Triton's compiler and its bundled ptxas, no GPU; sm90_build.py, in a process of
its own) and check what it compiles to; that the launcher keeps it to Hopper; and that a CPU
call keeps the Triton kernels. Its values are checked on the GPU (benchmarks/check_gpu.py, whose
attention group names the kernel that ran each case)."""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dfsviz.kernels.block_sparse_attention import block_sparse_attention
from dfsviz.sparse.masks import BlockMask

jit_attention = importlib.import_module("dfsviz.kernels._jit.attention")

# Shared memory per block on the H100 / H200 (227 KB).
HOPPER_SHARED_BYTES = 232448


def _compiled(n: int, d: int, dtype: str, return_lse: bool) -> dict:
    """What the kernel compiles to for sm_90 on inputs in diffusers' [B, N, H, D] memory (B 2, H 3)."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    run = subprocess.run([sys.executable, str(Path(__file__).with_name("sm90_build.py")), str(n), str(d), dtype,
                          "1" if return_lse else "0"], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout)


@pytest.mark.parametrize("n, d, dtype, return_lse", [
    (1000, 128, "bfloat16", True),  # ragged N: the short last key block is masked
    (1024, 64, "float16", False),
], ids=["n1000-d128-bf16-lse", "n1024-d64-fp16"])
def test_kernel_compiles_for_hopper_with_its_schedule(n, d, dtype, return_lse):
    kernel = _compiled(n, d, dtype, return_lse)
    ptx = kernel["ptx"]
    assert kernel["grid"] == [-(-n // 128), 2 * 3]  # one CTA per query block of each (batch, head)
    assert ".target sm_90a" in ptx
    # warpgroup MMAs, asynchronous: a wait that leaves one in flight (P.V under the next softmax)
    assert "wgmma.mma_async" in ptx and "wgmma.wait_group.sync.aligned 1" in ptx
    assert "cp.async.bulk.tensor" in ptx  # the loader's tile copies (TMA)
    assert "setmaxnreg.dec" in ptx and "setmaxnreg.inc" in ptx  # the loader gives registers to the consumers
    assert ".reqntid 384" in ptx  # two consumer warpgroups and the loader's
    assert kernel["shared"] <= HOPPER_SHARED_BYTES
    assert ("st.global" in ptx) == return_lse  # out goes by the copy engine; only the LSE by stores
    assert kernel["cubin"]  # ptxas accepted it


def test_cpu_calls_keep_the_triton_kernels(launched_kernels):
    """The Gluon kernel is Hopper's alone: never chosen off a CUDA device of capability 9."""
    q, k, v = (torch.randn(1, 2, 256, 64, dtype=torch.bfloat16) for _ in range(3))
    mask = BlockMask.full(1, 2, 256, 128)
    assert not jit_attention.sm90_kernel_runs(q, mask)
    block_sparse_attention(q, k, v, mask, backend="triton")
    assert launched_kernels == ["_block_sparse_attention_desc_kernel"]


def test_the_gluon_kernel_needs_the_triton_it_is_written_against(monkeypatch):
    """Gluon's API moves between Triton releases: an older Triton keeps every call on the Triton
    kernels instead of failing to import or build the Gluon one."""
    assert jit_attention.sm90_module() is not None  # this Triton (3.6 or later) builds it
    jit_attention.sm90_module.cache_clear()
    monkeypatch.setattr(jit_attention.triton, "__version__", "3.5.1")
    try:
        assert jit_attention.sm90_module() is None
    finally:
        jit_attention.sm90_module.cache_clear()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_gluon_kernel_runs_exactly_on_hopper():
    q = torch.randn(1, 2, 256, 64, dtype=torch.bfloat16, device="cuda")
    hopper = torch.cuda.get_device_capability()[0] == 9
    assert jit_attention.sm90_kernel_runs(q, BlockMask.full(1, 2, 256, 128, device="cuda")) == hopper
    assert not jit_attention.sm90_kernel_runs(q, BlockMask.full(1, 2, 256, 64, device="cuda"))
    assert not jit_attention.sm90_kernel_runs(q.float(), BlockMask.full(1, 2, 256, 128, device="cuda"))

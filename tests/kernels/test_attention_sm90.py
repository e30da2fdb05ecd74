"""The Gluon attention kernel for Hopper (``dfsviz.kernels._jit.attention_sm90``) on a machine
without one: Triton's interpreter does not run Gluon, so these tests build the kernel for an
sm_90 target (Triton's compiler and its bundled ptxas, no GPU; sm90_build.py, in a process of
its own) and check what it compiles to; that the launcher keeps it to Hopper; and that a CPU
call keeps the Triton kernels. Its values are checked on the GPU (benchmarks/check_gpu.py, whose
attention group names the kernel that ran each case)."""

import importlib
import json
import os
import re
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


def _built(*argv: str):
    """sm90_build.py's JSON for these arguments, run in a process of its own without the interpreter."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    run = subprocess.run([sys.executable, str(Path(__file__).with_name("sm90_build.py")), *argv], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout)


def _compiled(n: int, d: int, dtype: str, return_lse: bool, order: bool, precision: str = "native") -> dict:
    """What the kernel compiles to for sm_90 on inputs in diffusers' [B, N, H, D] memory (B 2, H 3;
    FP8: e4m3 q and k, and v with "fp8_pv", as the FP8 launcher passes them)."""
    return _built("gluon", str(n), str(d), dtype, "1" if return_lse else "0", "1" if order else "0", precision)


@pytest.mark.parametrize("n, d, dtype, return_lse, order", [
    (1000, 128, "bfloat16", True, False),  # ragged N: the short last key block is masked
    (1024, 64, "float16", False, False),
    (1000, 128, "bfloat16", False, True),  # q's and the output's rows through the order
], ids=["n1000-d128-bf16-lse", "n1024-d64-fp16", "n1000-d128-bf16-order"])
def test_kernel_compiles_for_hopper_with_its_schedule(n, d, dtype, return_lse, order):
    kernel = _compiled(n, d, dtype, return_lse, order)
    ptx = kernel["ptx"]
    assert kernel["grid"] == [-(-n // 128), 2 * 3]  # one CTA per query block of each (batch, head)
    assert ".target sm_90a" in ptx
    # warpgroup MMAs, asynchronous: a wait that leaves one in flight (P.V under the next softmax)
    assert "wgmma.mma_async" in ptx and "wgmma.wait_group.sync.aligned 1" in ptx
    assert "cp.async.bulk.tensor" in ptx  # the loader's K and V tile copies (TMA)
    assert "setmaxnreg.dec" in ptx and "setmaxnreg.inc" in ptx  # the loader gives registers to the consumers
    assert ".reqntid 384" in ptx  # two consumer warpgroups and the loader's
    assert kernel["shared"] <= HOPPER_SHARED_BYTES
    # Without an order q and out go by the copy engine, only the LSE by stores; with one, q's rows
    # are gathered (16-byte loads) and the output's stored through the order.
    assert ("st.global" in ptx) == (return_lse or order)
    assert ("ld.global.v4" in ptx) == order
    assert kernel["cubin"]  # ptxas accepted it


@pytest.mark.parametrize("n, d, pv, order", [
    (1000, 128, True, True),  # e4m3 P . V, output stored through the order
    (1024, 64, True, False),
    (1000, 128, False, True),  # P . V in bfloat16 on the launcher's ordered copy of v
], ids=["fp8_pv-n1000-d128-order", "fp8_pv-n1024-d64", "fp8-n1000-d128-order"])
def test_fp8_kernel_compiles_for_hopper_with_its_schedule(n, d, pv, order):
    kernel = _compiled(n, d, "bfloat16", True, order, "fp8_pv" if pv else "fp8")
    ptx = kernel["ptx"]
    assert kernel["grid"] == [-(-n // 128), 2 * 3]
    # Q . K^T in e4m3 (32 keys' channels a step), P . V in e4m3 or bfloat16, asynchronous as without FP8
    assert "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3" in ptx
    assert (f"wgmma.mma_async.sync.aligned.m64n{d}k16.f32.bf16.bf16" in ptx) == (not pv)
    if d != 128:  # (at D 128 P . V's instruction reads as Q . K^T's)
        assert (f"wgmma.mma_async.sync.aligned.m64n{d}k32.f32.e4m3.e4m3" in ptx) == pv
    assert "wgmma.wait_group.sync.aligned 1" in ptx
    # with e4m3 P (16 registers a thread, bf16 P's 32 would spill) Q is held in registers too:
    # no e4m3 MMA reads both operands from shared memory
    assert (re.search(r"e4m3\.e4m3 \{[^}]*\}, %rd\d+, %rd\d+", ptx) is None) == pv
    assert "cvt.rn.satfinite.e4m3x2.f32" not in ptx  # P is never an exponential rounded to e4m3
    if pv:  # e4m3 P is relabelled in registers (v8 in the MMA's key order), and its row sums come
        # from an MMA: fewer shuffles than bf16 P (whose row sums are reduced across threads)
        bf16_p = _compiled(n, d, "bfloat16", True, order, "fp8")["ptx"]
        assert 0 < ptx.count("shfl.sync") < bf16_p.count("shfl.sync")
        # P's bytes without exponentials: exponentials are left for the rescaling factors (2 rows a
        # thread), not P's 64 values a thread. Each two values become float16 subnormals (the byte
        # is their count of 2^-24 steps) in one conversion that also clamps at 0, four joined by one
        # byte permute: no float32 max clamps them (the old rounding constant 1.5 * 2^23 is gone)
        assert 16 * ptx.count("ex2.approx") <= bf16_p.count("ex2.approx")
        assert "cvt.rn.relu.f16x2.f32" in ptx and re.search(r"prmt\.b32\s+%r\d+, lo, hi, 0x6420;", ptx)
        assert "0f4B400000" not in ptx
        # the output's rescaling skipped by each warp whose 16 rows kept their (integer) running max:
        # a vote over the warp and a uniform branch around each 16 products
        assert "vote.sync.any.pred" in ptx and "bra.uni SKIP" in ptx
        # relabelled before they are packed: the permutes that pack them build the operand's
        # registers, with no second permute per register to move bytes between them
        assert re.search(r"prmt\.b32\s+%r\d+, %r\d+, %r\d+, 0x[0-9a-f]+U;", ptx) is None
        # P's row sums by a second MMA, P times a tile of ones (all four bytes of each 32-bit store
        # 1.0's e4m3 byte: ptxas drops the upper half of a converted splat), in place of a shift
        # and an add per value
        assert "wgmma.mma_async.sync.aligned.m64n8k32.f32.e4m3.e4m3" in ptx
        four_ones = str(0x38383838)  # as an immediate (Triton 3.6) or through a register (3.7)
        ones = set(re.findall(rf"mov\.b32\s+(%r\d+), {four_ones};", ptx)) | {four_ones}
        stores = re.findall(r"st\.shared\.v4\.b32\s+\[[^\]]*\],\s*\{([^}]*)\}", ptx)
        tiles = [words for words in stores if all(word.strip() in ones for word in words.split(","))]
        assert len(tiles) == 2  # one tile for each consumer
    assert ("cvt.rpi" in ptx) == pv  # the running max rounded up to an integer
    assert "cp.async.bulk.tensor" in ptx and "ld.global.v4" not in ptx  # every input is an ordered copy: TMA
    assert "st.global.v4" in ptx  # output rows by plain stores (an e4m3 tile cannot stage them)
    assert kernel["shared"] <= HOPPER_SHARED_BYTES
    assert kernel["cubin"]


@pytest.mark.parametrize("n, d", [(300, 128), (256, 64)], ids=["ragged-d128", "d64"])
def test_the_launcher_s_ordered_copies_of_k_and_v_hold_the_order_s_rows(n, d):
    """With an order, the Gluon kernel's launcher hands it ordered copies of k and v (its copy
    engine moves whole tiles of contiguous rows), or of v alone ("fp8": q and k are quantized
    into ordered copies): row i of each is row perm[i]."""
    gen = torch.Generator().manual_seed(0)
    k, v = (torch.randn(2, n, 3, d, generator=gen).to(torch.bfloat16).transpose(1, 2) for _ in range(2))
    perm = torch.randperm(n, generator=gen).to(torch.int32)
    k_out, v_out = jit_attention.gather_kv(k, v, perm)
    for x, x_out in ((k, k_out), (v, v_out)):
        assert x_out.is_contiguous() and x_out.dtype == x.dtype
        assert torch.equal(x_out, x.index_select(2, perm))
    none, v_alone = jit_attention.gather_kv(None, v, perm)
    assert none is None and torch.equal(v_alone, v_out)


def test_every_warp_specialized_descriptor_candidate_kept_for_an_even_n_compiles():
    """With N a multiple of the block, Triton's warp specialization fails to build the 4-warp
    WARP_SPECIALIZE candidates of the descriptor kernel (an error the autotuner does not catch:
    the call failed); the autotuner must be left only candidates that build."""
    built = _built("desc", "4096", "128")
    assert built, "no warp-specialized candidate kept: the test checks nothing"
    assert [b for b in built if b["error"]] == []


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

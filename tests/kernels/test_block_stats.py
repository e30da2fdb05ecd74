"""Streaming block statistics: Triton kernel (interpreter on CPU) vs reference.

Each of m, L, r, J and lse is compared with the float64 reference: the kernel's error may
be at most 2x the reference's own error in the test dtype plus a small floor.
"""

import pytest
import torch

from dfsviz.kernels._check import compare_to_golden
from dfsviz.kernels.block_stats import block_stats
from dfsviz.sparse.stats import block_stats_ref

# (N, D, dtype, block); B = 2, H = 2 throughout.
CASES = [
    (1, 64, torch.float32, 128),
    (127, 128, torch.float16, 128),
    (129, 64, torch.float32, 64),
    (211, 64, torch.float16, 64),
    (257, 128, torch.float32, 128),
    (256, 64, torch.float32, 128),
    (100, 64, torch.float32, 32),
    (129, 64, torch.bfloat16, 64),
]
FIELDS = ("m", "L", "r", "J", "lse")


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"n{c[0]}-d{c[1]}-{str(c[2]).split('.')[-1]}-b{c[3]}")
def test_kernel_matches_reference(case):
    n, d, dtype, block = case
    gen = torch.Generator().manual_seed(n * 3 + d)
    # Larger logits than unit Gaussians give non-trivial masses and diversities.
    q = (2.0 * torch.randn(2, 2, n, d, generator=gen)).to(dtype)
    k = torch.randn(2, 2, n, d, generator=gen).to(dtype)
    out = block_stats(q, k, block=block, backend="triton")
    ref = block_stats_ref(q, k, block=block)
    gold = block_stats_ref(q.double(), k.double(), block=block)
    assert (out.block, out.seq_len) == (block, n)
    failures = []
    for field in FIELDS:
        got = getattr(out, field)
        assert got.dtype == torch.float32 and got.shape == getattr(gold, field).shape
        # J and lse subtract logits of size ~10: allow float32 rounding of that size.
        check = compare_to_golden(field, got, getattr(ref, field), getattr(gold, field), floor=2e-5)
        if not check.ok:
            failures.append(str(check))
    assert not failures, "\n".join(failures)


def test_mass_rows_sum_to_one_and_match_dense_softmax():
    gen = torch.Generator().manual_seed(8)
    q, k = (torch.randn(1, 2, 90, 64, generator=gen) for _ in range(2))
    out = block_stats(q, k, block=32, backend="triton")
    probs = torch.softmax((q.double() @ k.double().transpose(-1, -2)) / 8.0, dim=-1)  # [1, 2, 90, 90]
    block_of = torch.arange(90) // 32
    per_block = torch.zeros(1, 2, 90, 3, dtype=torch.float64).index_add_(3, block_of, probs)
    counts = torch.bincount(block_of).double()
    dense_m = torch.zeros(1, 2, 3, 3, dtype=torch.float64).index_add_(2, block_of, per_block) / counts[:, None]
    torch.testing.assert_close(out.m.double(), dense_m, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.m.sum(-1), torch.ones(1, 2, 3), rtol=0, atol=1e-5)


def test_errors():
    q = torch.randn(1, 1, 64, 96)
    with pytest.raises(ValueError, match=r"head dim D must be one of \(64, 128\).*backend='ref'"):
        block_stats(q, q, block=32, backend="triton")
    q = torch.randn(1, 1, 64, 64, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"float16, bfloat16 or float32 for the Triton kernel"):
        block_stats(q, q, block=32, backend="triton")
    q = torch.randn(1, 1, 64, 64)
    with pytest.raises(ValueError, match=r"`block` must be a power of two in \[16, 256\] \(got 48\); DFSAttn uses 128"):
        block_stats(q, q, block=48, backend="triton")
    with pytest.raises(ValueError, match=r"`q` and `k` must have the same shape"):
        block_stats(q, q[:, :, :32], block=32, backend="triton")
    with pytest.raises(ValueError, match=r"`q` and `k` must be on one device"):
        block_stats(q, q.to("meta"), block=32, backend="triton")


def test_non_finite_inputs_are_refused_by_the_reference_only(no_host_reads):
    """The reference backend checks values; the Triton backend must not (a check would sync
    the host on every call), so NaN flows through it as through dense attention."""
    gen = torch.Generator().manual_seed(4)
    q, k = (torch.randn(1, 2, 64, 64, generator=gen) for _ in range(2))
    q[0, 1, 40, 3] = float("nan")
    with pytest.raises(ValueError, match=r"`q` has 1 non-finite value \(NaN/inf\), first at \[0, 1, 40, 3\] \(nan\)"):
        block_stats(q, k, block=32, backend="ref")
    with no_host_reads():
        out = block_stats(q, k, block=32, backend="triton")
    assert torch.isnan(out.m[0, 1]).any() and torch.isfinite(out.m[0, 0]).all()


@pytest.mark.parametrize("backend", ["ref", "triton"])
@pytest.mark.parametrize("shape", [(1, 0, 64, 64), (0, 2, 64, 64), (1, 2, 64, 0)], ids=["H0", "B0", "D0"])
def test_empty_axes_are_refused_on_both_backends(backend, shape):
    q = torch.randn(shape)
    with pytest.raises(ValueError, match=r"`q` must have at least one batch element, head and channel"):
        block_stats(q, q, block=32, backend=backend)

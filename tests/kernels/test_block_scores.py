"""Fused block scoring (dfs_tile, meanpool): Triton kernel (interpreter on CPU) vs reference.

The kernel's error against the float64 reference may be at most 2x the reference's own
error in the test dtype plus a small floor (dfsviz.kernels._check).
"""

import pytest
import torch

from dfsviz.kernels._check import compare_to_golden
from dfsviz.kernels.block_scores import block_scores
from dfsviz.sparse.scoring import block_scores_ref

# (method, N, D, dtype, block, tile); B = 2, H = 2 throughout.
CASES = [
    ("dfs_tile", 1, 64, torch.float32, 128, 16),
    ("dfs_tile", 127, 128, torch.float16, 128, 16),
    ("dfs_tile", 129, 64, torch.float32, 64, 16),
    ("dfs_tile", 211, 64, torch.float16, 32, 4),
    ("dfs_tile", 257, 128, torch.float32, 128, 32),
    ("dfs_tile", 200, 64, torch.float32, 16, 16),  # tile = block: one tile per block
    ("meanpool", 1, 64, torch.float32, 128, None),
    ("meanpool", 129, 128, torch.float16, 64, None),
    ("meanpool", 257, 64, torch.float32, 32, None),
    ("dfs_tile", 129, 64, torch.bfloat16, 64, 16),
]


def _case_id(case):
    method, n, d, dtype, block, tile = case
    return f"{method}-n{n}-d{d}-{str(dtype).split('.')[-1]}-b{block}-t{tile}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_kernel_matches_reference(case):
    method, n, d, dtype, block, tile = case
    gen = torch.Generator().manual_seed(n + d + block)
    # A shared direction makes some key tiles clearly preferred, so scores are not flat.
    shared = torch.randn(d, generator=gen)
    q = (torch.randn(2, 2, n, d, generator=gen) + 0.7 * shared).to(dtype)
    k = (torch.randn(2, 2, n, d, generator=gen) + 0.7 * shared).to(dtype)
    out = block_scores(q, k, method=method, tile=tile, block=block, backend="triton")
    ref = block_scores_ref(q, k, method=method, tile=tile, block=block)
    gold = block_scores_ref(q.double(), k.double(), method=method, tile=tile, block=block)
    m = -(-n // block)
    assert out.dtype == torch.float32 and out.shape == (2, 2, m, m)
    check = compare_to_golden(method, out, ref, gold, floor=1e-6)
    assert check.ok, str(check)


def test_dfs_tile_rows_sum_to_tiles_per_block():
    """Each query block holds block/tile softmax rows (pad tiles included), so rows sum to that."""
    gen = torch.Generator().manual_seed(2)
    q, k = (torch.randn(1, 2, 150, 64, generator=gen) for _ in range(2))
    out = block_scores(q, k, method="dfs_tile", tile=16, block=64, backend="triton")
    torch.testing.assert_close(out.sum(-1), torch.full((1, 2, 3), 4.0), rtol=0, atol=1e-5)


def test_other_methods_run_their_reference():
    gen = torch.Generator().manual_seed(4)
    q, k = (torch.randn(1, 1, 64, 64, generator=gen) for _ in range(2))
    out = block_scores(q, k, method="antidiagonal", tile=8, block=32, backend="triton")
    assert torch.equal(out, block_scores_ref(q, k, method="antidiagonal", tile=8, block=32))


def test_errors():
    q = torch.randn(1, 1, 64, 96)
    with pytest.raises(ValueError, match=r"head dim D must be one of \(64, 128\).*backend='ref'"):
        block_scores(q, q, backend="triton")
    q = torch.randn(1, 1, 64, 64, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"float16, bfloat16 or float32 for the Triton kernel"):
        block_scores(q, q, backend="triton")
    q = torch.randn(1, 1, 64, 64)
    with pytest.raises(ValueError, match=r"`tile` \(tile of dfs_tile\) must be a power of two"):
        block_scores(q, q, tile=24, block=64, backend="triton")
    with pytest.raises(ValueError, match=r"`method` must be one of"):
        block_scores(q, q, method="mean", backend="triton")
    with pytest.raises(ValueError, match=r"`q` and `k` must be on one device"):
        block_scores(q, q.to("meta"), backend="triton")
    with pytest.raises(ValueError, match=r"`scale` must be a positive finite number"):
        block_scores(q, q, block=64, scale=0.0, backend="triton")


def test_dfs_tile_means_beyond_float16_fall_back_to_float32_tiles():
    """Tile means of 1e5 overflow the fp16 hi/lo split; the kernel must notice and stay exact."""
    gen = torch.Generator().manual_seed(6)
    q = torch.randn(1, 2, 100, 64, generator=gen) * 1e-3
    q[:, :, :16] += 1e5  # the first tile's mean is ~1e5 in every coordinate
    k = torch.randn(1, 2, 100, 64, generator=gen)
    out = block_scores(q, k, method="dfs_tile", tile=16, block=32, backend="triton")
    gold = block_scores_ref(q.double(), k.double(), method="dfs_tile", tile=16, block=32)
    ref = block_scores_ref(q, k, method="dfs_tile", tile=16, block=32)
    assert torch.isfinite(out).all()
    check = compare_to_golden("dfs_tile fallback", out, ref, gold, floor=1e-6)
    assert check.ok, str(check)

"""Every public function of dfsviz.sparse that takes queries and keys refuses non-finite
values and empty B / H / D axes at its boundary, with one message (dfsviz.sparse._validate)
naming the argument, how many entries are bad and where the first one is."""

from __future__ import annotations

import re

import pytest
import torch

from dfsviz.sparse.attention import block_sparse_attention_ref
from dfsviz.sparse.masks import BlockMask
from dfsviz.sparse.scoring import block_scores_ref
from dfsviz.sparse.select import select_topk
from dfsviz.sparse.stats import block_stats_ref, row_attention_ref, row_recall_ref, variance_ratio
from dfsviz.sparse.theory import row_bound

N, BLOCK = 40, 16


def _full_mask(q: torch.Tensor) -> BlockMask:
    # A mask needs B, H >= 1; the inputs are checked before the mask, so empty q still reach their check.
    return BlockMask.full(max(1, q.shape[0]), max(1, q.shape[1]), q.shape[2], BLOCK)


def _attention(q, k):
    v = torch.randn(q.shape, generator=torch.Generator().manual_seed(3), dtype=q.dtype)
    return block_sparse_attention_ref(q, k, v, _full_mask(q))


# Every public entry point taking (q, k); block_stats_ref runs inside the oracle scorer too.
QK_CALLS = {
    "block_stats_ref": lambda q, k: block_stats_ref(q, k, block=BLOCK),
    "block_scores_ref-dfs_tile": lambda q, k: block_scores_ref(q, k, "dfs_tile", block=BLOCK),
    "block_scores_ref-meanpool": lambda q, k: block_scores_ref(q, k, "meanpool", block=BLOCK),
    "block_scores_ref-antidiagonal": lambda q, k: block_scores_ref(q, k, "antidiagonal", block=BLOCK),
    "block_scores_ref-oracle": lambda q, k: block_scores_ref(q, k, "oracle", block=BLOCK),
    "row_attention_ref": lambda q, k: row_attention_ref(q, k, [0, 17]),
    "row_recall_ref": lambda q, k: row_recall_ref(q, k, _full_mask(q)),
    "row_bound": lambda q, k: row_bound(q, k, _full_mask(q)),
    "block_sparse_attention_ref": _attention,
}


def _qk(shape=(1, 2, N, 8), dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(shape, generator=gen).to(dtype) for _ in range(2))


@pytest.mark.parametrize("call", QK_CALLS.values(), ids=QK_CALLS.keys())
def test_nan_in_q_is_refused_with_its_place(call):
    q, k = _qk()
    q[0, 1, 17, 4] = float("nan")
    with pytest.raises(ValueError, match=r"`q` has 1 non-finite value \(NaN/inf\), first at \[0, 1, 17, 4\] \(nan\); "
                                         r".*float16 overflow"):
        call(q, k)


@pytest.mark.parametrize("call", QK_CALLS.values(), ids=QK_CALLS.keys())
def test_infinities_in_k_are_counted_and_located(call):
    q, k = _qk(dtype=torch.bfloat16)
    k[0, 1, 30, 0] = float("-inf")
    k[0, 0, 3, 7] = float("inf")
    k[0, 1, 2, 2] = float("inf")
    with pytest.raises(ValueError, match=r"`k` has 3 non-finite values \(NaN/inf\), first at \[0, 0, 3, 7\] \(inf\)"):
        call(q, k)


@pytest.mark.parametrize("call", QK_CALLS.values(), ids=QK_CALLS.keys())
@pytest.mark.parametrize("shape", [(1, 2, N, 0), (1, 0, N, 8), (0, 2, N, 8)], ids=["D0", "H0", "B0"])
def test_empty_head_dim_heads_or_batch_are_refused(call, shape):
    q, k = _qk(shape)
    expected = (f"`q` must have at least one batch element, head and channel: [B, H, N, D] with B, H, D >= 1 "
                f"(got {shape})")
    with pytest.raises(ValueError, match=re.escape(expected)):
        call(q, k)


def test_nan_in_v_is_refused():
    q, k = _qk()
    v = torch.randn(q.shape)
    v[0, 0, 39, 1] = float("nan")
    with pytest.raises(ValueError, match=r"`v` has 1 non-finite value \(NaN/inf\), first at \[0, 0, 39, 1\] \(nan\)"):
        block_sparse_attention_ref(q, k, v, _full_mask(q))


def test_variance_ratio_refuses_non_finite_and_empty_inputs():
    x, _ = _qk()
    x[0, 0, 5, 5] = float("inf")
    with pytest.raises(ValueError, match=r"`x` has 1 non-finite value \(NaN/inf\), first at \[0, 0, 5, 5\] \(inf\)"):
        variance_ratio(x, block=BLOCK)
    with pytest.raises(ValueError, match=r"`x` must have at least one batch element, head and channel"):
        variance_ratio(torch.zeros(1, 1, N, 0), block=BLOCK)
    # a caller that checks the result instead (the capture's writer) skips the pass: NaN out
    x[0, 0, 5, 5] = float("nan")
    w = variance_ratio(x, block=BLOCK, check_values=False)
    assert torch.isnan(w[0, 0]) and torch.isfinite(w[0, 1:]).all()


def test_finite_extremes_still_pass():
    """Large finite values are legitimate input: only NaN and inf are refused."""
    q, k = _qk(dtype=torch.float16)
    q[0, 0, 0, 0] = 65504.0  # float16's largest finite value
    k[0, 1, 1, 1] = -65504.0
    for call in QK_CALLS.values():
        call(q, k)


def test_finite_values_whose_sum_overflows_pass():
    """The check first sums the tensor; a sum that overflows on finite entries is not a refusal."""
    x = torch.full((1, 1, N, 8), 3e38)
    x[..., ::2] = 1e38
    assert torch.isinf(x.sum())
    ratio = variance_ratio(x, block=BLOCK)
    assert torch.isfinite(ratio).all()
    scores = torch.full((1, 1, 3, 3), 3e38)
    scores[0, 0, :, 1] = float("-inf")  # allowed by the selectors; the sum is inf here too
    assert select_topk(scores, 0.34, seq_len=N, block=BLOCK).to_dense().sum() == 3

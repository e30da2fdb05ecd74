"""Bounds 1-3 of docs/theory.md: brute-force formulas, validity on thousands of draws, tightness."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dfsviz.sparse.grid import LatentGrid
from dfsviz.sparse.masks import BlockMask
from dfsviz.sparse.stats import BlockStats, block_stats_ref
from dfsviz.sparse.theory import (
    bound3,
    closed_form_bound,
    effective_gap,
    factor_summary,
    recall_bound,
    row_bound,
    similarity_gap,
)
from dfsviz.sparse.tokenmodel import TokenModelConfig, sample_qk

# Rounding slack for "bound <= recall": everything is float64, so 1e-12 is far above the
# arithmetic error and far below any real violation.
SLACK = 1e-12


def _blocks(n: int, block: int) -> list[slice]:
    return [slice(s, min(n, s + block)) for s in range(0, n, block)]


def _measured(q: torch.Tensor, k: torch.Tensor, mask: BlockMask) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact float64 recall from a dense softmax: per row [B, H, N] and per query block [B, H, Mq]."""
    n = q.shape[2]
    attn = torch.softmax(q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    dense = mask.to_dense()
    tokens = dense.repeat_interleave(mask.block, 2).repeat_interleave(mask.block, 3)[:, :, :n, :n]
    rows = (attn * tokens).sum(dim=-1)
    per_block = torch.stack([rows[:, :, s].mean(dim=-1) for s in _blocks(n, mask.block)], dim=-1)
    return rows, per_block


def _random_masks(shape, n: int, block: int, gen: torch.Generator, count: int) -> list[BlockMask]:
    """Masks with a random density per row, including some empty and some full rows."""
    masks = []
    for _ in range(count):
        p = torch.rand(*shape[:3], 1, generator=gen)
        p = torch.where(torch.rand(p.shape, generator=gen) < 0.1, torch.zeros_like(p), p)
        p = torch.where(torch.rand(p.shape, generator=gen) < 0.1, torch.ones_like(p), p)
        dense = torch.rand(shape, generator=gen) < p
        masks.append(BlockMask.from_dense(dense, n, block))
    return masks


def _check_all_bounds(q: torch.Tensor, k: torch.Tensor, masks: list[BlockMask], block: int) -> None:
    stats = block_stats_ref(q, k, block=block)
    for mask in masks:
        rows, per_block = _measured(q, k, mask)
        b1 = row_bound(q, k, mask)
        b2 = recall_bound(stats, mask)
        b3 = bound3(stats, mask)
        assert (b1 <= rows + SLACK).all(), f"Bound 1 above the row recall by {float((b1 - rows).max()):.3g}"
        assert (b2 <= per_block + SLACK).all(), f"Bound 2 above the recall by {float((b2 - per_block).max()):.3g}"
        assert (b3 <= b2 + SLACK).all(), f"Bound 3 above Bound 2 by {float((b3 - b2).max()):.3g}"
        # Bound 2 also lower-bounds every row's Bound 1 in its block (docs/theory.md's derivation).
        for u, s in enumerate(_blocks(q.shape[2], block)):
            assert (b2[..., u, None] <= b1[..., s] + SLACK).all()
        for value in (b1, b2, b3):
            assert ((value >= 0) & (value <= 1)).all()


def test_bounds_hold_on_token_model_draws():
    """1,200 (draw, mask) pairs: token-model Q/K with varying noise, gap and locality."""
    gen = torch.Generator().manual_seed(0)
    grid = LatentGrid(2, 8, 9)  # 144 tokens: a short last block for block 16 and 32
    for draw in range(300):
        config = TokenModelConfig(
            grid,
            heads=2,
            head_dim=(16, 64)[draw % 2],
            num_regions=1 + draw % 4,
            delta=float(torch.rand(1, generator=gen)) * 2.0,
            centre_spread=float(torch.rand(1, generator=gen)) * 2.5,
            locality=float(torch.rand(1, generator=gen)) * 2.0,
            speed=float(torch.rand(1, generator=gen)) * 3.0,
            seed=draw,
            dtype=torch.float64,
        )
        q, k = sample_qk(config)
        block = (16, 32)[draw % 2]
        stats_shape = (1, 2, -(-grid.num_tokens // block), -(-grid.num_tokens // block))
        _check_all_bounds(q, k, _random_masks(stats_shape, grid.num_tokens, block, gen, 4), block)


@settings(max_examples=120, deadline=None)
@given(
    n=st.integers(1, 200),
    block=st.sampled_from([16, 32]),
    log_spread=st.floats(-1.5, 1.35),
    seed=st.integers(0, 2**31 - 1),
)
def test_bounds_hold_on_arbitrary_qk(n, block, log_spread, seed):
    # Spreads up to ~22 give logit deviations beyond exp's float64 range (exact fallback path).
    gen = torch.Generator().manual_seed(seed)
    spread = 10.0**log_spread
    q = spread * torch.randn(1, 2, n, 32, generator=gen, dtype=torch.float64)
    k = spread * torch.randn(1, 2, n, 32, generator=gen, dtype=torch.float64) + torch.randn(32, generator=gen, dtype=torch.float64)
    mb = -(-n // block)
    _check_all_bounds(q, k, _random_masks((1, 2, mb, mb), n, block, gen, 2), block)


def test_bounds_match_bruteforce_formulas():
    n, block = 100, 16
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 2, n, 16, generator=gen, dtype=torch.float64)
    k = torch.randn(1, 2, n, 16, generator=gen, dtype=torch.float64)
    stats = block_stats_ref(q, k, block=block)
    (mask,) = _random_masks(stats.shape, n, block, gen, 1)
    dense = mask.to_dense()
    blocks = _blocks(n, block)
    sizes = torch.tensor([s.stop - s.start for s in blocks], dtype=torch.float64)
    logits = q @ k.transpose(-1, -2) / 4.0
    # Bound 1 directly as the ratio of docs/theory.md (logits are small: no overflow here).
    lbar = torch.stack([logits[..., s].mean(dim=-1) for s in blocks], dim=-1)  # [B, H, N, Mk]
    jrow = torch.stack(
        [torch.log(torch.exp(logits[..., s] - lbar[..., v, None]).mean(dim=-1)) for v, s in enumerate(blocks)], dim=-1
    )
    keep_rows = torch.cat(
        [dense[:, :, u : u + 1].expand(-1, -1, s.stop - s.start, -1) for u, s in enumerate(blocks)], dim=2
    )
    x = (sizes * torch.exp(lbar) * keep_rows).sum(dim=-1)
    y = (sizes * torch.exp(lbar + jrow) * ~keep_rows).sum(dim=-1)
    torch.testing.assert_close(row_bound(q, k, mask), x / (x + y), rtol=1e-10, atol=1e-12)
    # Bound 2 directly.
    big_l, r, jb = stats.L, stats.r, stats.J
    x2 = (sizes * torch.exp(big_l - r) * dense).sum(dim=-1)
    y2 = (sizes * torch.exp(big_l + r + jb) * ~dense).sum(dim=-1)
    torch.testing.assert_close(recall_bound(stats, mask), x2 / (x2 + y2), rtol=1e-10, atol=1e-12)
    # Bound 3 directly (rows with something kept and something dropped).
    both = dense.any(-1) & (~dense).any(-1)
    assert int(both.sum()) >= 4  # the comparison below must not be vacuous
    gap = torch.zeros(both.shape, dtype=torch.float64)
    for h in range(2):
        for u in range(len(blocks)):
            if both[0, h, u]:
                kept, dropped = big_l[0, h, u][dense[0, h, u]], big_l[0, h, u][~dense[0, h, u]]
                gap[0, h, u] = float(kept.min()) - float(dropped.max())
    r_u = r.amax(dim=-1)
    j_u = torch.where(~dense, jb, torch.zeros_like(jb)).amax(dim=-1)
    ratio = (sizes * ~dense).sum(-1) / (sizes * dense).sum(-1)
    expected3 = 1.0 / (1.0 + ratio * torch.exp(-(gap - 2 * r_u - j_u)))
    torch.testing.assert_close(bound3(stats, mask)[both], expected3[both], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(effective_gap(stats, mask)[both], (gap - 2 * r_u - j_u)[both], rtol=1e-12, atol=1e-12)


def _aligned_model(delta: float, seed: int = 0):
    """Token-model Q/K where every 16-token raster block holds a single class."""
    grid = LatentGrid(2, 8, 16)
    labels = (torch.arange(grid.num_tokens) // 16) % 5
    config = TokenModelConfig(
        grid, heads=2, head_dim=32, delta=delta, centre_spread=1.0, locality=0.0, seed=seed, dtype=torch.float64
    )
    return sample_qk(config, labels=labels)


def test_bound2_is_tight_when_delta_vanishes_and_blocks_are_pure():
    gen = torch.Generator().manual_seed(1)
    errors = []
    for delta in (1e-1, 1e-3, 1e-6):
        q, k = _aligned_model(delta)
        stats = block_stats_ref(q, k, block=16)
        masks = _random_masks(stats.shape, q.shape[2], 16, gen, 3)
        worst = 0.0
        for mask in masks:
            _, measured = _measured(q, k, mask)
            beta = recall_bound(stats, mask)
            worst = max(worst, float((measured - beta).abs().max()))
            assert (beta <= measured + SLACK).all()
        errors.append(worst)
    assert errors[-1] < 1e-3, errors
    assert errors[0] > errors[-1], errors  # the bound tightens as the diversity goes


def test_closed_form_bound_values():
    gammas = torch.tensor([0.05, 0.1, 0.3, 0.7])
    # effective gap 0: the bound is gamma itself (a random mask on uniform attention).
    torch.testing.assert_close(closed_form_bound(gammas, 0.0), gammas.double())
    torch.testing.assert_close(
        closed_form_bound(0.2, torch.tensor([1.0, -2.0])),
        1.0 / (1.0 + 4.0 * torch.exp(-torch.tensor([1.0, -2.0], dtype=torch.float64))),
    )
    assert float(closed_form_bound(1.0, -5.0)) == 1.0
    assert float(closed_form_bound(0.0, 5.0)) == 0.0
    assert float(closed_form_bound(0.5, math.inf)) == 1.0
    assert float(closed_form_bound(0.5, -math.inf)) == 0.0
    gaps = torch.linspace(-3, 3, 7)
    assert (closed_form_bound(0.2, gaps).diff() > 0).all()
    assert (closed_form_bound(torch.linspace(0.1, 0.9, 5), 1.0).diff() > 0).all()


def test_similarity_gap_of_topk_by_pooled_logit():
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(1, 2, 160, 16, generator=gen, dtype=torch.float64)
    k = torch.randn(1, 2, 160, 16, generator=gen, dtype=torch.float64)
    stats = block_stats_ref(q, k, block=16)
    for kk in (1, 4, 9):
        top = torch.topk(stats.L, kk, dim=-1).indices
        dense = torch.zeros(stats.shape, dtype=torch.bool).scatter_(-1, top, True)
        mask = BlockMask.from_dense(dense, 160, 16)
        ordered = torch.sort(stats.L, dim=-1, descending=True).values
        expected = ordered[..., kk - 1] - ordered[..., kk]
        torch.testing.assert_close(similarity_gap(stats.L, mask), expected)
        torch.testing.assert_close(similarity_gap(stats, mask), expected)
        assert (similarity_gap(stats, mask) >= 0).all()


def test_degenerate_masks_follow_the_conventions():
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(1, 1, 64, 16, generator=gen, dtype=torch.float64)
    k = torch.randn(1, 1, 64, 16, generator=gen, dtype=torch.float64)
    stats = block_stats_ref(q, k, block=16)
    full = BlockMask.full(1, 1, 64, 16)
    empty = BlockMask.from_dense(torch.zeros(stats.shape, dtype=torch.bool), 64, 16)
    assert torch.isposinf(similarity_gap(stats, full)).all() and torch.isposinf(effective_gap(stats, full)).all()
    assert torch.isneginf(similarity_gap(stats, empty)).all() and torch.isneginf(effective_gap(stats, empty)).all()
    for fn in (recall_bound, bound3):
        assert (fn(stats, full) == 1).all() and (fn(stats, empty) == 0).all()
    assert (row_bound(q, k, full) == 1).all() and (row_bound(q, k, empty) == 0).all()
    summary = factor_summary(stats, full)
    assert (summary["J_u"] == 0).all() and (summary["gamma"] == 1).all()


def test_factor_summary_is_consistent():
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(2, 2, 150, 16, generator=gen, dtype=torch.float64)
    k = torch.randn(2, 2, 150, 16, generator=gen, dtype=torch.float64)
    stats = block_stats_ref(q, k, block=16)
    (mask,) = _random_masks(stats.shape, 150, 16, gen, 1)
    s = factor_summary(stats, mask)
    assert set(s) == {"gamma", "gap", "r_u", "J_u", "effective_gap", "bound2", "bound3", "recall"}
    for value in s.values():
        assert value.shape == (2, 2, 10) and value.dtype == torch.float64
    torch.testing.assert_close(s["effective_gap"], effective_gap(stats, mask))
    torch.testing.assert_close(s["bound2"], recall_bound(stats, mask))
    torch.testing.assert_close(s["bound3"], bound3(stats, mask))
    torch.testing.assert_close(s["gamma"], mask.kv_num_blocks.double() / 10)
    torch.testing.assert_close(s["recall"], _measured(q, k, mask)[1], rtol=1e-10, atol=1e-12)
    assert (s["bound3"] <= s["bound2"] + SLACK).all() and (s["bound2"] <= s["recall"] + SLACK).all()


def test_errors():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 40, 8, generator=gen)
    k = torch.randn(1, 2, 40, 8, generator=gen)
    stats = block_stats_ref(q, k, block=16)
    mask = BlockMask.full(1, 2, 40, 16)
    with pytest.raises(TypeError, match=r"`stats` must be a BlockStats from block_stats_ref"):
        recall_bound(stats.m, mask)
    with pytest.raises(TypeError, match=r"`mask` must be a dfsviz BlockMask"):
        bound3(stats, mask.to_dense())
    with pytest.raises(ValueError, match=r"must describe the same blocks; compute both for the same Q/K"):
        effective_gap(stats, BlockMask.full(1, 2, 48, 16))
    with pytest.raises(ValueError, match=r"`stats` and `mask` must be on one device"):
        factor_summary(BlockStats(*(t.to("meta") for t in (stats.m, stats.L, stats.r, stats.J, stats.lse)), 16, 40), mask)
    with pytest.raises(TypeError, match=r"`mask` must be a dfsviz BlockMask"):
        similarity_gap(stats.L, None)
    with pytest.raises(TypeError, match=r"`L` must be a torch.Tensor \[B, H, Mq, Mk\] or BlockStats"):
        similarity_gap([0.0], mask)
    with pytest.raises(ValueError, match=r"`L` must be a float tensor of the mask's shape"):
        similarity_gap(stats.L[:, :1], mask)
    with pytest.raises(ValueError, match=r"`L` and `mask` must be on one device"):
        similarity_gap(stats.L.to("meta"), mask)
    with pytest.raises(ValueError, match=r"`gamma` must lie in \[0, 1\] \(got values in \[1.5, 1.5\]\)"):
        closed_form_bound(1.5, 0.0)
    with pytest.raises(ValueError, match=r"`gamma` must lie in \[0, 1\]"):
        closed_form_bound(float("nan"), 0.0)
    with pytest.raises(ValueError, match=r"`effective_gap` must not be NaN"):
        closed_form_bound(0.5, float("nan"))
    with pytest.raises(ValueError, match=r"`gamma` \(shape \(2,\)\) and `effective_gap` \(shape \(3,\)\) must broadcast"):
        closed_form_bound(torch.tensor([0.1, 0.2]), torch.zeros(3))
    with pytest.raises(ValueError, match=r"`mask.seq_len` must equal N = q.shape\[2\] = 40"):
        row_bound(q, k, BlockMask.full(1, 2, 48, 16))
    with pytest.raises(ValueError, match=r"`max_chunk_elements` must be a positive integer"):
        row_bound(q, k, mask, max_chunk_elements=-1)

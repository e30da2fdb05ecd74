"""The recall pipeline: measure_topk against select_topk + the recall functions computed by hand,
and measure_orders against the pipeline run step by step (order -> stats -> scores -> top-k)."""

from __future__ import annotations

import pytest
import torch

from dfsviz.analysis.factors import factor_rows
from dfsviz.analysis.measures import ORACLE, measure_orders, measure_topk
from dfsviz.sparse.grid import LatentGrid
from dfsviz.sparse.orders import make_order
from dfsviz.sparse.scoring import block_scores_ref
from dfsviz.sparse.stats import block_stats_ref, variance_ratio
from dfsviz.sparse.tokenmodel import TokenModelConfig, sample_qk


def _kept_mass(m: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """float64 [B, H, Mq]: sum of m over the kept key blocks, by brute force."""
    return (m.double() * kept).sum(dim=-1)


@pytest.mark.parametrize("gamma", [0.05, 0.3, 1.0])
def test_measure_topk_keeps_the_k_best_blocks_and_measures_them(case, gamma):
    stats, scores = case.stats, case.scores["dfs_tile"]
    measured = measure_topk(stats, scores, gamma)
    mk = stats.num_blocks
    k = max(1, int(gamma * mk))
    kept = measured.mask.to_dense()
    assert measured.k == k and bool((kept.sum(dim=-1) == k).all())
    # Every kept block scores at least as high as every dropped one of its row.
    low_kept = scores.masked_fill(~kept, float("inf")).amin(dim=-1)
    high_dropped = scores.masked_fill(kept, float("-inf")).amax(dim=-1)
    assert bool((low_kept >= high_dropped).all())
    sizes = torch.tensor([min(case.block, case.seq_len - v * case.block) for v in range(mk)], dtype=torch.float64)
    per_query = _kept_mass(stats.m, kept)
    torch.testing.assert_close(measured.recall_per_query, per_query, rtol=0, atol=1e-12)
    torch.testing.assert_close(measured.recall, (per_query * sizes / case.seq_len).sum(dim=-1), rtol=0, atol=1e-12)
    density = ((kept.double() * sizes).sum(dim=-1) * sizes).sum(dim=-1) / case.seq_len**2
    torch.testing.assert_close(measured.density, density, rtol=0, atol=1e-12)
    best = torch.sort(stats.m.double(), dim=-1, descending=True).values[..., :k].sum(dim=-1)
    torch.testing.assert_close(measured.oracle_recall, (best * sizes / case.seq_len).sum(dim=-1), rtol=0, atol=1e-12)
    assert bool((measured.recall <= measured.oracle_recall + 1e-12).all())


def test_measure_topk_factors_are_the_factor_rows(case):
    measured = measure_topk(case.stats, case.scores["meanpool"], 0.2)
    table = measured.rows(order="raster", method="meanpool", step=3)
    expected = factor_rows(case.stats, measured.mask, order="raster", method="meanpool", step=3)
    assert table.names == expected.names
    for name in table.names:
        assert (table.column(name) == expected.column(name)).all(), name
    assert torch.equal(measured.factors["recall"], measured.recall_per_query)


def test_measure_topk_on_a_block_mass_alone(case):
    """The dashboard has m and scores only: recall and density need no L, r, J; factors say what they need."""
    with_stats = measure_topk(case.stats, case.scores["antidiagonal"], 0.25)
    mass_only = measure_topk(case.stats.m, case.scores["antidiagonal"], 0.25, seq_len=case.seq_len, block=case.block)
    assert torch.equal(mass_only.mask.to_dense(), with_stats.mask.to_dense())
    assert torch.equal(mass_only.recall, with_stats.recall)
    assert torch.equal(mass_only.density, with_stats.density)
    with pytest.raises(ValueError, match="need the block statistics"):
        mass_only.factors


def test_measure_topk_errors(case):
    stats, scores = case.stats, case.scores["dfs_tile"]
    with pytest.raises(TypeError, match="`stats` must be a BlockStats or a block mass tensor"):
        measure_topk(stats.m.tolist(), scores, 0.2)
    with pytest.raises(ValueError, match="`seq_len` and `block` are required"):
        measure_topk(stats.m, scores, 0.2)
    with pytest.raises(ValueError, match="`seq_len` and `block` must be None"):
        measure_topk(stats, scores, 0.2, seq_len=case.seq_len, block=case.block)
    with pytest.raises(ValueError, match="`stats` and `scores` must have one shape"):
        measure_topk(stats.m[:, :1], scores, 0.2, seq_len=case.seq_len, block=case.block)
    with pytest.raises(ValueError, match="`gamma` must be a fraction"):
        measure_topk(stats, scores, 1.5)


def test_measure_orders_is_the_pipeline_step_by_step():
    grid = LatentGrid(3, 10, 11)
    q, k = sample_qk(TokenModelConfig(grid, heads=2, head_dim=16, seed=4, dtype=torch.float64))
    gammas = (0.1, 0.3)
    seen = []
    for measured in measure_orders(q, k, grid, ["hilbert3d", "raster"], ["meanpool", "dfs_tile", ORACLE], gammas,
                                   block=32, tile=8):
        seen.append(measured.order)
        order = make_order(measured.order, grid)
        qo, ko = order.apply(q), order.apply(k)
        stats = block_stats_ref(qo, ko, block=32)
        assert torch.equal(measured.stats.m, stats.m)
        assert torch.equal(measured.W_q, variance_ratio(qo, 32)) and torch.equal(measured.W_k, variance_ratio(ko, 32))
        assert list(measured.topk) == ["meanpool", "dfs_tile", ORACLE]
        for method, per_budget in measured.topk.items():
            scores = stats.m if method == ORACLE else block_scores_ref(qo, ko, method, tile=8, block=32)
            assert [t.gamma for t in per_budget] == list(gammas)
            for topk in per_budget:
                expected = measure_topk(stats, scores, topk.gamma)
                assert torch.equal(topk.mask.to_dense(), expected.mask.to_dense())
                assert torch.equal(topk.recall, expected.recall)
        # The oracle's top-k mask is the best mask of its size.
        for topk in measured.topk[ORACLE]:
            torch.testing.assert_close(topk.recall, topk.oracle_recall, rtol=0, atol=1e-12)
    assert seen == ["hilbert3d", "raster"]

"""Factor tables: layout, aggregation, violation counting, order comparisons, the direction
claim (Hilbert blocks are more compact than raster blocks) and every error message."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dfsviz.analysis.factors import (
    BLOCK_FACTORS,
    KEY_COLUMNS,
    FactorTable,
    factor_rows,
    order_change,
    variance_rows,
)
from dfsviz.capture.reader import StoredStats
from dfsviz.sparse.grid import LatentGrid
from dfsviz.sparse.masks import BlockMask
from dfsviz.sparse.orders import make_order
from dfsviz.sparse.select import select_topk
from dfsviz.sparse.stats import block_stats_ref, variance_ratio
from dfsviz.sparse.theory import factor_summary
from dfsviz.sparse.tokenmodel import TokenModelConfig, sample_qk


def _rows(case, gamma=0.2, **keys):
    mask = select_topk(case.scores["dfs_tile"], gamma, seq_len=case.seq_len, block=case.block)
    return mask, factor_rows(case.stats, mask, **keys)


def test_factor_rows_layout_matches_factor_summary(case):
    mask, table = _rows(case, order="raster", method="dfs_tile", selector="topk_g0.20", step=7, layer=2)
    b, h, mq = mask.kv_num_blocks.shape
    assert len(table) == b * h * mq
    assert set(KEY_COLUMNS) | set(BLOCK_FACTORS) == set(table.names)
    summary = factor_summary(case.stats, mask)
    for row in (0, 5, mq + 3, len(table) - 1):
        bb, hh, uu = (int(table.column(c)[row]) for c in ("batch", "head", "u"))
        assert row == (bb * h + hh) * mq + uu
        for name in BLOCK_FACTORS:
            assert table.column(name)[row] == summary[name][bb, hh, uu].item()
    assert set(table.column("order")) == {"raster"} and set(table.column("step")) == {7}
    assert set(table.column("layer")) == {2} and set(table.column("selector")) == {"topk_g0.20"}


def test_bounds_never_exceed_recall_on_random_token_models_and_masks():
    """Validity through the aggregation path, float64: 20 token models x 32 heads (each head an
    independent draw of centres, features and noise) x 4 random masks = 2560 (draw, mask) pairs."""
    grid = LatentGrid(2, 8, 9)  # 144 tokens: 9 blocks of 16, the last one short
    gen = torch.Generator().manual_seed(1)
    tables = []
    for seed in range(20):
        delta = float(torch.rand(1, generator=gen)) * 2.0
        spread = float(torch.rand(1, generator=gen)) * 2.0
        cfg = TokenModelConfig(grid, heads=32, head_dim=8, delta=delta, centre_spread=spread, seed=seed,
                               num_regions=seed % 4, dtype=torch.float64)
        q, k = sample_qk(cfg)
        stats = block_stats_ref(q, k, block=16)
        for draw in range(4):
            keep_p = float(torch.rand(1, generator=gen))
            dense = torch.rand(stats.shape, generator=gen) < keep_p
            mask = BlockMask.from_dense(dense, stats.seq_len, 16)
            tables.append(factor_rows(stats, mask, step=seed, layer=draw))
    table = FactorTable.concat(tables)
    assert len(table) == 20 * 4 * 32 * 9
    report = table.violations(atol=1e-12)
    assert report["bound2"] == 0 and report["bound3"] == 0 and report["bound3_over_bound2"] == 0, report
    assert report["max_excess"] <= 1e-12
    # The draws cover the extremes: rows that keep nothing, rows that keep everything.
    assert (table.column("gamma") == 0).any() and (table.column("gamma") == 1).any()


def test_violation_counting_finds_injected_violations(case):
    _, table = _rows(case, order="hilbert3d")
    cols = {n: c.copy() for n, c in table.columns.items()}
    bad = np.array([1, 4, 9])
    cols["bound2"][bad] = cols["recall"][bad] + 0.01
    cols["bound3"][bad[:1]] = cols["recall"][bad[:1]] + 0.05
    injected = FactorTable(cols)
    report = injected.violations()
    assert report["bound2"] == 3 and report["bound3"] == 1 and report["rows"] == len(table)
    assert report["max_excess"] == pytest.approx(0.05)
    assert report["worst"]["u"] == int(table.column("u")[1]) and report["worst"]["order"] == "hilbert3d"
    assert injected.violations(atol=0.02)["bound2"] == 0
    clean = table.violations()
    assert clean["bound2"] == clean["bound3"] == 0


def test_stored_statistics_convert_with_nan_lse(case):
    """Capture readers give m, L, r, J without lse: rows equal those of the full BlockStats."""
    s = case.stats
    stored = StoredStats(m=s.m, L=s.L, r=s.r, J=s.J, block=s.block, seq_len=s.seq_len)
    converted = stored.to_block_stats()
    assert bool(torch.isnan(converted.lse).all()) and converted.lse.shape == s.lse.shape
    mask = select_topk(case.scores["meanpool"], 0.3, seq_len=s.seq_len, block=s.block)
    a, b = factor_rows(stored, mask), factor_rows(s, mask)
    for name in BLOCK_FACTORS:
        np.testing.assert_array_equal(a.column(name), b.column(name))


def test_table_operations():
    table = FactorTable({
        "order": np.array(["raster", "raster", "hilbert3d", "hilbert3d", "raster"], dtype=object),
        "head": np.array([0, 1, 0, 1, 0]),
        "gap": np.array([1.0, 3.0, 2.0, np.inf, 5.0]),
    })
    assert len(table.select(order="raster")) == 3
    groups = table.groups("order")
    assert list(groups) == [("raster",), ("hilbert3d",)]
    rows = {r["order"]: r for r in table.summary("order", ["gap"])}
    assert rows["raster"]["count"] == 3 and rows["raster"]["gap_mean"] == pytest.approx(3.0)
    assert rows["raster"]["gap_median"] == 3.0 and rows["raster"]["gap_q05"] == pytest.approx(1.2)
    assert rows["hilbert3d"]["gap_nonfinite"] == 1 and rows["hilbert3d"]["gap_mean"] == 2.0
    both = FactorTable.concat([table, table.select(head=1)])
    assert len(both) == 7
    assert len(table.subsample(2, seed=3)) == 2 and table.subsample(10) is table
    assert table.to_records()[1] == {"order": "raster", "head": 1, "gap": 3.0}
    assert len(table.groups(["order", "head"])) == 4


def test_variance_rows_and_order_change(case, build_case):
    rows = variance_rows(case.q, case.k, block=case.block, order="raster", step=1, layer=0)
    assert len(rows) == 2 and set(rows.column("u")) == {-1}
    np.testing.assert_array_equal(rows.column("W_k"), variance_ratio(case.k, case.block)[0].numpy())
    given = variance_rows(W_q=torch.tensor([[0.5, 0.25]]), W_k=torch.tensor([[0.5, 0.75]]), order="hilbert3d", step=1, layer=0)
    table = FactorTable.concat([rows, given])
    change = order_change(table, "W_k")
    base = rows.column("W_k").mean()
    assert change["pairs"] == 2
    assert change["relative_change"] == pytest.approx((0.625 - base) / base)
    lower = np.array([0.5, 0.75]) < rows.column("W_k")
    assert change["other_lower"] == int(lower.sum()) and change["other_lower_share"] == float(lower.mean())
    assert change["difference"] == pytest.approx(0.625 - base)


def test_direction_hilbert3d_has_lower_intra_block_variance_than_raster():
    """Token model with moving regions, Wan-like aspect: W_k and W_q drop by more than 15%."""
    grid = LatentGrid(5, 16, 24)
    tables = []
    for seed in range(3):
        cfg = TokenModelConfig(grid, heads=2, head_dim=16, num_regions=4, speed=1.5, seed=seed, dtype=torch.float64)
        q, k = sample_qk(cfg)
        for name in ("raster", "hilbert3d"):
            order = make_order(name, grid)
            tables.append(variance_rows(order.apply(q), order.apply(k), block=64, order=name, step=seed))
    table = FactorTable.concat(tables)
    for factor in ("W_k", "W_q"):
        change = order_change(table, factor)
        assert change["pairs"] == 6
        assert change["relative_change"] < -0.15, change
        assert change["other_lower_share"] == 1.0, change


# ----------------------------------------------------------------------------- errors
def test_errors(case):
    mask, table = _rows(case)
    with pytest.raises(ValueError, match=r"unknown key column\(s\) \['orders'\]"):
        factor_rows(case.stats, mask, orders="raster")
    with pytest.raises(TypeError, match="`order` must be a str"):
        factor_rows(case.stats, mask, order=3)
    with pytest.raises(ValueError, match="`step` must be an integer >= 0"):
        factor_rows(case.stats, mask, step=1.5)
    with pytest.raises(TypeError, match="`stats` must be a BlockStats or stored block statistics"):
        factor_rows(case.stats.m, mask)
    s = case.stats
    with pytest.raises(TypeError, match=r"`stats` must be a BlockStats or stored block statistics \(StoredStats\) "
                                        r"\(got SimpleNamespace\)"):
        factor_rows(SimpleNamespace(m=s.m, L=s.L, r=s.r, J=s.J, block=s.block, seq_len=s.seq_len), mask)
    with pytest.raises(ValueError, match=r"`m` must be a tensor \[B, H, Mq, Mk\]"):
        StoredStats(m=s.m[0], L=s.L[0], r=s.r[0], J=s.J[0], block=32, seq_len=330)
    with pytest.raises(ValueError, match="`columns` must be a non-empty dict"):
        FactorTable({})
    with pytest.raises(ValueError, match="`columns` must all be 1-D arrays of one length"):
        FactorTable({"a": np.zeros(3), "b": np.zeros(2)})
    with pytest.raises(ValueError, match="`name` must be a column of this table"):
        table.column("delta")
    with pytest.raises(ValueError, match="`keep` must be a bool array of one flag per row"):
        table.where(np.ones(3, dtype=bool))
    with pytest.raises(ValueError, match="`tables` must be a non-empty sequence of FactorTable"):
        FactorTable.concat([])
    with pytest.raises(ValueError, match="tables must share their columns"):
        FactorTable.concat([table, FactorTable({"a": np.zeros(2)})])
    with pytest.raises(ValueError, match="`by` must name at least one column"):
        table.groups([])
    with pytest.raises(ValueError, match=r"`atol` must be a tolerance in \[0, 1\)"):
        table.violations(atol=-1)
    with pytest.raises(ValueError, match="`name` must be a column of this table"):
        FactorTable({"W_k": np.zeros(2)}).violations()
    with pytest.raises(ValueError, match="`max_rows` must be a positive integer"):
        table.subsample(0)
    with pytest.raises(ValueError, match="pass either `q` and `k` \\(tokens\\) or `W_q` and `W_k`"):
        variance_rows()
    with pytest.raises(ValueError, match="`q` and `k` must be given together"):
        variance_rows(case.q)
    with pytest.raises(ValueError, match="`W_q` and `W_k` must be given together"):
        variance_rows(W_q=torch.zeros(1, 2))
    with pytest.raises(ValueError, match=r"`W_k` must be a float tensor \[B, H\]"):
        variance_rows(W_q=torch.zeros(1, 2), W_k=torch.zeros(2))
    with pytest.raises(ValueError, match="`W_q` and `W_k` must have one shape"):
        variance_rows(W_q=torch.zeros(1, 2), W_k=torch.zeros(1, 3))
    with pytest.raises(ValueError, match="no rows of order 'hilbert3d' pair with order 'raster'"):
        order_change(table, "gap")
    both = FactorTable.concat([
        variance_rows(W_q=torch.zeros(1, 1), W_k=torch.full((1, 1), float("inf")), order="raster"),
        variance_rows(W_q=torch.zeros(1, 1), W_k=torch.full((1, 1), float("inf")), order="hilbert3d"),
    ])
    with pytest.raises(ValueError, match="every paired value of 'W_k' is infinite"):
        order_change(both, "W_k")

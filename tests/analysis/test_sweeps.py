"""Token-model sweeps over delta and the centre spread, for every order."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from dfsviz.analysis.sweeps import SWEEP_QUANTITIES, SweepConfig, sweep_token_model, write_token_model_capture
from dfsviz.sparse.grid import LatentGrid
from dfsviz.sparse.orders import make_order, order_names
from dfsviz.sparse.stats import variance_ratio
from dfsviz.sparse.tokenmodel import TokenModelConfig, sample_qk

BASE = TokenModelConfig(LatentGrid(4, 12, 16), heads=2, head_dim=16, num_regions=3, speed=1.0)


@pytest.fixture(scope="module")
def delta_sweep():
    return sweep_token_model(SweepConfig(BASE, "delta", values=(0.1, 0.5, 1.0), block=32, seeds=(0, 1)))


def test_sweep_table_shape_and_invariants(delta_sweep):
    cfg = delta_sweep.config
    table = delta_sweep.table
    assert cfg.orders == tuple(order_names())
    assert len(table) == 3 * 2 * len(cfg.orders) * 2 * BASE.heads
    assert set(table.column("value")) == {0.1, 0.5, 1.0}
    # Every bound stays below the recall it bounds, and the oracle is the best top-k.
    assert table.column("violations").sum() == 0
    assert bool((table.column("oracle") >= table.column("recall") - 1e-9).all())
    assert bool((table.column("bound2") <= table.column("recall") + 1e-6).all())


def test_sweep_w_k_equals_a_direct_measurement(delta_sweep):
    """One cell of the table recomputed by hand from the token model."""
    model = dataclasses.replace(BASE, delta=0.5, seed=1)
    q, k = sample_qk(model)
    order = make_order("hilbert3d", BASE.grid)
    expected = variance_ratio(order.apply(k), 32)[0]
    rows = delta_sweep.table.select(value=0.5, seed=1, order="hilbert3d", method="meanpool")
    np.testing.assert_allclose(rows.column("W_k"), expected.numpy(), rtol=1e-6)


def test_series_direction_hilbert3d_below_raster(delta_sweep):
    xs, means, bands = delta_sweep.series("W_k")
    np.testing.assert_array_equal(xs, [0.1, 0.5, 1.0])
    assert bool((means["hilbert3d"] < 0.9 * means["raster"]).all()), means
    lo, hi = bands["raster"]
    assert bool((lo <= means["raster"]).all() and (means["raster"] <= hi).all())
    # Recall of the DFSAttn scorer at the same budget is higher on Hilbert blocks here.
    _, recall, _ = delta_sweep.series("recall", "dfs_tile")
    assert bool((recall["hilbert3d"] > recall["raster"]).all()), recall


def test_centre_spread_sweep_runs_every_quantity():
    result = sweep_token_model(SweepConfig(BASE, "centre_spread", values=(0.5, 2.0), orders=("raster", "hilbert3d"),
                                           methods=("meanpool",), block=64, gamma=0.3))
    for quantity in SWEEP_QUANTITIES:
        xs, means, _ = result.series(quantity)
        assert xs.tolist() == [0.5, 2.0] and set(means) == {"raster", "hilbert3d"}
        assert all(np.isfinite(m).all() for m in means.values()), quantity
    assert result.config.runs == 2


def test_errors():
    with pytest.raises(TypeError, match="`base` must be a TokenModelConfig"):
        SweepConfig("model")
    with pytest.raises(ValueError, match="`parameter` must be one of delta, centre_spread"):
        SweepConfig(BASE, "speed")
    with pytest.raises(ValueError, match="`values` must be a non-empty tuple of numbers"):
        SweepConfig(BASE, values=())
    with pytest.raises(ValueError, match="`delta` must be a finite number >= 0"):
        SweepConfig(BASE, values=(0.5, -1.0))
    with pytest.raises(ValueError, match=r"`orders` must hold names from .* \(got unknown \['zigzag'\]\)"):
        SweepConfig(BASE, orders=("raster", "zigzag"))
    with pytest.raises(ValueError, match="`methods` must be a non-empty tuple of names"):
        SweepConfig(BASE, methods="meanpool")
    with pytest.raises(ValueError, match="`gamma` must be a fraction"):
        SweepConfig(BASE, gamma=0.0)
    with pytest.raises(ValueError, match="`block` must be a power of two"):
        SweepConfig(BASE, block=100)
    with pytest.raises(ValueError, match="`tile` must be a power of two"):
        SweepConfig(BASE, block=32, tile=64)
    with pytest.raises(ValueError, match="`seeds` must be a non-empty tuple of integers"):
        SweepConfig(BASE, seeds=3)
    with pytest.raises(ValueError, match="`seeds` must hold integers >= 0"):
        SweepConfig(BASE, seeds=(0, -2))
    with pytest.raises(TypeError, match="`config` must be a SweepConfig"):
        sweep_token_model(BASE)
    result = sweep_token_model(SweepConfig(BASE, values=(0.5,), orders=("raster",), methods=("meanpool",), block=64))
    with pytest.raises(ValueError, match="`quantity` must be one of"):
        result.series("W")
    with pytest.raises(ValueError, match=r"`method` must be one of the sweep's methods \['meanpool'\]"):
        result.series("recall", "dfs_tile")


def test_token_model_capture_holds_the_reference_statistics(token_capture):
    from dfsviz.capture import open_capture
    from dfsviz.sparse.scoring import block_scores_ref
    from dfsviz.sparse.stats import block_stats_ref

    with open_capture(token_capture) as r:
        assert r.validate() == [] and r.complete and r.steps == [0, 2, 3, 5, 6, 9]
        assert r.layers == [0, 1] and r.orders == ["raster", "hilbert3d"] and r.methods == ["meanpool", "dfs_tile", "antidiagonal"]
        assert list(r.layout.qkv_layers) == [1]
        # Step 5, layer 1: the token model at noise 1.0 + (0.25 - 1.0) * 5 / 9 with seed 1000, in Hilbert order.
        model = dataclasses.replace(TokenModelConfig(LatentGrid(4, 12, 16), heads=2, head_dim=32),
                                    delta=1.0 + (0.25 - 1.0) * 5 / 9, seed=1000)
        q, k = sample_qk(model)
        order = make_order("hilbert3d", model.grid)
        qo, ko = order.apply(q), order.apply(k)
        stats = block_stats_ref(qo, ko, block=32)
        stored = r.block_stats(5, 1, "hilbert3d")
        for name in ("m", "L", "r", "J"):
            torch.testing.assert_close(getattr(stored, name), getattr(stats, name), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r.scores(5, 1, "hilbert3d", "dfs_tile"),
                                   block_scores_ref(qo, ko, method="dfs_tile", tile=16, block=32), rtol=1e-5, atol=1e-7)
        w_q, w_k = r.variance_ratios(5, 1, "hilbert3d")
        torch.testing.assert_close(w_k, variance_ratio(ko, 32), rtol=1e-6, atol=0)
        blocks, attention = r.footprints(5, 1, "hilbert3d", 0)
        assert blocks.shape == (2,)
        torch.testing.assert_close(attention.sum(dim=-1), torch.ones(2), rtol=0, atol=2e-3)


def test_token_model_capture_errors(tmp_path):
    base = TokenModelConfig(LatentGrid(2, 8, 8), heads=1, head_dim=8)
    with pytest.raises(TypeError, match="`base` must be a TokenModelConfig"):
        write_token_model_capture(tmp_path / "a.h5", "model")
    with pytest.raises(ValueError, match="`num_steps` must be a positive integer"):
        write_token_model_capture(tmp_path / "a.h5", base, num_steps=0)
    with pytest.raises(ValueError, match=r"`steps` must be ascending distinct integers in \[0, 10\)"):
        write_token_model_capture(tmp_path / "a.h5", base, steps=(3, 2))
    with pytest.raises(ValueError, match="`layers` must be a positive integer"):
        write_token_model_capture(tmp_path / "a.h5", base, layers=0)
    with pytest.raises(ValueError, match="`delta` must be a pair"):
        write_token_model_capture(tmp_path / "a.h5", base, delta=0.5)
    with pytest.raises(ValueError, match="`delta` must be a finite number >= 0"):
        write_token_model_capture(tmp_path / "a.h5", base, delta=(0.5, -1.0))
    with pytest.raises(ValueError, match=r"`orders` must hold names from"):
        write_token_model_capture(tmp_path / "a.h5", base, orders=("zigzag",))
    with pytest.raises(ValueError, match=r"`methods` must hold names from"):
        write_token_model_capture(tmp_path / "a.h5", base, methods=("mean",))
    with pytest.raises(ValueError, match="`block` must be a power of two"):
        write_token_model_capture(tmp_path / "a.h5", base, block=24)
    with pytest.raises(ValueError, match=r"`qkv_layers` must hold layer indices in \[0, 2\)"):
        write_token_model_capture(tmp_path / "a.h5", base, qkv_layers=(2,))
    write_token_model_capture(tmp_path / "a.h5", base, steps=(0,), num_steps=1, block=16)
    with pytest.raises(ValueError, match="exists; pass --overwrite"):
        write_token_model_capture(tmp_path / "a.h5", base, steps=(0,), num_steps=1, block=16)


def test_token_model_capture_stores_qk_of_the_model(token_capture):
    from dfsviz.capture import open_capture

    with open_capture(token_capture) as r:
        q, k, v = r.qkv(3, 1)
    model = dataclasses.replace(TokenModelConfig(LatentGrid(4, 12, 16), heads=2, head_dim=32),
                                delta=1.0 + (0.25 - 1.0) * 3 / 9, seed=1000)
    q_ref, k_ref = sample_qk(model)
    torch.testing.assert_close(q, q_ref)
    torch.testing.assert_close(k, k_ref)
    assert v.shape == q.shape and abs(float(v.std()) - 1.0) < 0.1

"""The token model: determinism, layout, the factors it controls, and Hilbert vs raster blocks."""

from __future__ import annotations

import math

import pytest
import torch

from dfsviz.sparse.grid import LatentGrid
from dfsviz.sparse.orders import make_order
from dfsviz.sparse.stats import block_stats_ref, variance_ratio
from dfsviz.sparse.tokenmodel import TokenModelConfig, sample_qk, token_classes

GRID = LatentGrid(4, 12, 16)


def test_shapes_dtype_and_determinism():
    config = TokenModelConfig(GRID, heads=3, head_dim=16, seed=7)
    q, k = sample_qk(config)
    assert q.shape == k.shape == (1, 3, GRID.num_tokens, 16) and q.dtype == torch.float32
    q2, k2 = sample_qk(config)
    assert torch.equal(q, q2) and torch.equal(k, k2)
    q3, _ = sample_qk(TokenModelConfig(GRID, heads=3, head_dim=16, seed=8))
    assert not torch.allclose(q, q3)
    q64, k64 = sample_qk(TokenModelConfig(GRID, heads=3, head_dim=16, seed=7, dtype=torch.float64))
    assert q64.dtype == torch.float64
    torch.testing.assert_close(q64.float(), q)  # one float64 draw, cast: dtype-independent
    torch.testing.assert_close(k64.float(), k)


def test_classes_are_the_layout_of_the_draw():
    # Without noise and locality, tokens share a key exactly when they share a class.
    config = TokenModelConfig(GRID, heads=1, head_dim=8, num_regions=3, delta=0.0, locality=0.0, seed=3)
    classes = token_classes(config)
    assert classes.dtype == torch.int64 and classes.shape == (GRID.num_tokens,)
    assert set(classes.unique().tolist()) <= {0, 1, 2, 3} and len(classes.unique()) >= 2
    _, k = sample_qk(config)
    _, groups = torch.unique(k[0, 0], dim=0, return_inverse=True)
    same_class = classes[:, None] == classes[None, :]
    same_key = groups[:, None] == groups[None, :]
    assert torch.equal(same_class, same_key)


def test_regions_move_only_with_speed():
    still = token_classes(TokenModelConfig(GRID, num_regions=3, speed=0.0, seed=1)).view(4, 12, 16)
    assert all(torch.equal(still[0], still[f]) for f in range(4))
    moving = token_classes(TokenModelConfig(GRID, num_regions=3, speed=2.0, seed=1)).view(4, 12, 16)
    assert not torch.equal(moving[0], moving[-1])
    assert torch.equal(moving[0], still[0])  # same start, then motion


def test_text_tokens_get_their_own_class_and_place():
    for text_first in (False, True):
        grid = LatentGrid(2, 4, 4, text_len=10, text_first=text_first)
        config = TokenModelConfig(grid, num_regions=2, delta=0.0, locality=1.0, seed=0)
        classes = token_classes(config)
        assert config.num_classes == 4
        assert (classes[grid.text_slice] == 3).all() and (classes[grid.video_slice] < 3).all()
        q, k = sample_qk(config)
        assert q.shape[2] == 42
        # text has no positional feature: with no noise all its keys coincide
        text_keys = k[0, 0, grid.text_slice]
        assert torch.allclose(text_keys, text_keys[:1].expand_as(text_keys))


def test_attention_concentrates_within_a_class():
    config = TokenModelConfig(GRID, heads=2, head_dim=64, num_regions=3, delta=0.2, locality=0.0, seed=2, dtype=torch.float64)
    classes = token_classes(config)
    q, k = sample_qk(config)
    attn = torch.softmax(q @ k.transpose(-1, -2) / 8.0, dim=-1)
    same = (classes[:, None] == classes[None, :]).double()
    own_mass = (attn * same).sum(dim=-1).mean()
    own_share = same.sum(dim=-1).mean() / GRID.num_tokens
    assert own_mass > 2 * own_share, (float(own_mass), float(own_share))


def test_delta_sets_the_diversity_and_spread_sets_the_gap():
    def stats(**kw):
        config = TokenModelConfig(GRID, heads=2, head_dim=64, locality=0.0, seed=4, dtype=torch.float64, **kw)
        q, k = sample_qk(config, labels=(torch.arange(GRID.num_tokens) // 32) % 4)
        return block_stats_ref(q, k, block=32)

    low, high = stats(delta=0.05), stats(delta=1.0)
    assert high.J.mean() > 10 * low.J.mean() and high.r.mean() > 10 * low.r.mean()

    def top_gap(s):
        ordered = torch.sort(s.L, dim=-1, descending=True).values
        return float((ordered[..., 0] - ordered[..., -1]).mean())

    assert top_gap(stats(delta=0.1, centre_spread=2.0)) > 3 * top_gap(stats(delta=0.1, centre_spread=1.0))


def test_labels_override():
    labels = torch.arange(GRID.num_tokens) % 2
    config = TokenModelConfig(GRID, heads=1, head_dim=8, delta=0.0, locality=0.0, seed=0)
    _, k = sample_qk(config, labels=labels)
    assert torch.equal(k[0, 0, 0], k[0, 0, 2]) and not torch.equal(k[0, 0, 0], k[0, 0, 1])


def test_hilbert3d_blocks_hold_less_key_variance_than_raster():
    # Moving regions plus locality: 3D-compact Hilbert blocks keep less of the key variance
    # inside blocks than raster blocks, which cut rows of the frame.
    grid = LatentGrid(8, 16, 24)
    for seed in (0, 1):
        q, k = sample_qk(TokenModelConfig(grid, heads=2, head_dim=32, num_regions=4, speed=1.5, seed=seed))
        w = {name: variance_ratio(make_order(name, grid).apply(k), 128) for name in ("raster", "hilbert3d")}
        assert (w["hilbert3d"] < w["raster"] - 0.1).all(), w
        wq = {name: variance_ratio(make_order(name, grid).apply(q), 128) for name in ("raster", "hilbert3d")}
        assert (wq["hilbert3d"] < wq["raster"] - 0.1).all(), wq


def test_name_encodes_the_parameters():
    config = TokenModelConfig(LatentGrid(13, 24, 40), delta=0.25, seed=3)
    assert config.name == "tokenmodel_f13h24w40_h2d64_r4_delta0.25_s1.5_a1_l4_v1_rho0.8_seed3"


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("heads", 0, r"`heads` must be an integer >= 1 \(got 0\)"),
        ("head_dim", 2.0, r"`head_dim` must be an integer >= 1 \(got 2.0\)"),
        ("num_regions", -1, r"`num_regions` must be an integer >= 0 \(got -1\)"),
        ("seed", True, r"`seed` must be an integer >= 0 \(got True\)"),
        ("delta", -0.1, r"`delta` must be a finite number >= 0.0 \(got -0.1\)"),
        ("centre_spread", math.nan, r"`centre_spread` must be a finite number >= 0.0 \(got nan\)"),
        ("locality", math.inf, r"`locality` must be a finite number >= 0.0 \(got inf\)"),
        ("length_scale", 0.0, r"`length_scale` must be a finite number > 0.0 \(got 0.0\)"),
        ("speed", "fast", r"`speed` must be a finite number >= 0.0 \(got 'fast'\)"),
        ("qk_correlation", 1.5, r"`qk_correlation` must be a finite number >= -1.0 and <= 1.0 \(got 1.5\)"),
        ("dtype", torch.int32, r"`dtype` must be torch.float16, bfloat16, float32 or float64 \(got torch.int32\)"),
    ],
)
def test_config_validation(field, value, message):
    with pytest.raises(ValueError, match=message):
        TokenModelConfig(GRID, **{field: value})


def test_type_errors():
    with pytest.raises(TypeError, match=r"`grid` must be a LatentGrid \(got str\); use LatentGrid.parse"):
        TokenModelConfig("13x24x40")
    with pytest.raises(TypeError, match=r"`config` must be a TokenModelConfig \(got dict\)"):
        sample_qk({})
    with pytest.raises(TypeError, match=r"`config` must be a TokenModelConfig \(got NoneType\)"):
        token_classes(None)
    config = TokenModelConfig(GRID)
    with pytest.raises(TypeError, match=r"`labels` must be an int64 tensor \[N\] \(got torch.int32\)"):
        sample_qk(config, labels=torch.zeros(GRID.num_tokens, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"`labels` must have shape \[N\] = \(768,\) for grid f4h12w16 \(got \(10,\)\)"):
        sample_qk(config, labels=torch.zeros(10, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"`labels` must be >= 0 \(got minimum -1\)"):
        sample_qk(config, labels=torch.full((GRID.num_tokens,), -1, dtype=torch.int64))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_draws_beyond_the_dtype_range_are_refused(dtype):
    """A scale that overflows the requested dtype would hand inf to every statistic downstream."""
    big = 2.0 * torch.finfo(dtype).max
    config = TokenModelConfig(GRID, heads=1, head_dim=8, centre_spread=big, dtype=dtype)
    with pytest.raises(ValueError, match=rf"`dtype` {dtype} cannot hold the drawn q and k \(largest \|value\| "
                                         r"[0-9.e+]+ > [0-9.e+]+\); lower `centre_spread`, `locality` or `delta`"):
        sample_qk(config)
    q, k = sample_qk(TokenModelConfig(GRID, heads=1, head_dim=8, centre_spread=5e3, dtype=torch.float16))
    assert torch.isfinite(q).all() and torch.isfinite(k).all()

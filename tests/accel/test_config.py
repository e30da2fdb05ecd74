"""DFSConfig validation: every message, and the self-describing name."""

from __future__ import annotations

import pytest

from dfsviz.accel.config import DFSConfig
from dfsviz.sparse.schedule import DFSSchedule


def test_defaults_are_the_paper_settings():
    c = DFSConfig()
    assert (c.order, c.block, c.tile, c.score_method, c.cfg, c.permute_once) == (
        "hilbert3d", 128, 16, "dfs_tile", "share", False)
    assert c.schedule == DFSSchedule()
    assert c.name == "dfsattn_hilbert3d_dfs_tile_b128_t16_share_dfs_n50_s12_i12_g0.30_d0.10_c1_L0"
    assert DFSConfig(permute_once=True, cfg="separate").name.startswith("dfsattn_hilbert3d_dfs_tile_b128_t16_separate_once_")
    assert c.fused_ops and DFSConfig(fused_ops=False).name.startswith("dfsattn_hilbert3d_dfs_tile_b128_t16_share_unfused_")
    assert c.precision == "native" and "_fp8" not in c.name
    assert DFSConfig(precision="fp8").name.startswith("dfsattn_hilbert3d_dfs_tile_b128_t16_share_fp8_dfs_n50_")
    assert DFSConfig(precision="fp8_dense").name.startswith("dfsattn_hilbert3d_dfs_tile_b128_t16_share_fp8_dense_dfs_")


@pytest.mark.parametrize("precision, kernel, dense_calls", [
    ("native", "native", False), ("native_dense", "native", True), ("fp8", "fp8", False),
    ("fp8_dense", "fp8", True), ("fp8_pv", "fp8_pv", False), ("fp8_pv_dense", "fp8_pv", True)])
def test_a_precision_s_arithmetic_and_which_calls_it_serves(precision, kernel, dense_calls):
    config = DFSConfig(precision=precision)
    assert config.kernel_precision == kernel
    assert config.dense_calls_through_kernel is dense_calls


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(order="zigzag"), ValueError, r"`order` must be one of .*hilbert3d.*got 'zigzag'"),
        (dict(block=96), ValueError, r"`block` must be a power of two in \[16, 256\] \(got 96\)"),
        (dict(tile=3), ValueError, r"`tile` must be a power of two in \[1, 256\] \(got 3\)"),
        (dict(block=16, tile=32), ValueError, r"`tile` must not exceed `block` = 16 \(got 32\)"),
        (dict(score_method="magic"), ValueError, r"`score_method` must be one of .*dfs_tile.*got 'magic'"),
        (dict(schedule={"skip_steps": 12}), TypeError, r"`schedule` must be a dfsviz.sparse.schedule.DFSSchedule"),
        (dict(cfg="both"), ValueError, r"`cfg` must be one of \['separate', 'share'\] \(got 'both'\)"),
        (dict(cond_index=2), ValueError, r"`cond_index` must be 0, 1 or None"),
        (dict(cond_index=True), ValueError, r"`cond_index` must be 0, 1 or None"),
        (dict(permute_once="yes"), TypeError, r"`permute_once` must be a bool \(got str 'yes'\)"),
        (dict(measure_recall=1), TypeError, r"`measure_recall` must be a bool \(got int 1\)"),
        (dict(fused_ops=None), TypeError, r"`fused_ops` must be a bool \(got NoneType None\)"),
        (dict(backend="cuda"), ValueError, r"`backend` must be one of \['ref', 'triton'\] or None"),
        (dict(precision="int8"), ValueError, r"`precision` must be one of \['fp8', 'fp8_dense', 'fp8_pv', 'fp8_pv_dense', 'native', 'native_dense'\] "
                                              r"\(got 'int8'\)"),
    ],
)
def test_invalid_config(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        DFSConfig(**kwargs)

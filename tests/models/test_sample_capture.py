"""The sample capture shipped in dfsviz/data/captures opens, validates, has the current format and
holds what dfsviz/data/README.md says; its statistics agree with its own stored Q/K."""

from __future__ import annotations

from pathlib import Path

import torch

import dfsviz
from dfsviz.capture.schema import FORMAT_VERSION
from dfsviz.sparse.stats import block_stats_ref

SAMPLE = Path(__file__).resolve().parents[2] / "dfsviz" / "data" / "captures" / "tiny-wan-sample.h5"


def test_sample_capture_is_complete_valid_current_and_small():
    assert SAMPLE.stat().st_size <= 20 * 2**20
    with dfsviz.open(SAMPLE) as run:
        assert int(run.attrs["format_version"]) == FORMAT_VERSION
        assert run.complete and run.validate() == []
        assert run.attrs["model_id"] == "dfsviz-embedded:tiny-wan"
        assert run.grid.name == "f9h18w32" and run.layers == list(range(8)) and run.heads == [0, 1, 2]
        assert run.steps == [0, 6, 13, 19] and run.orders == ["raster", "hilbert3d"]
        assert run.methods == ["meanpool", "dfs_tile", "antidiagonal"]
        assert run.layout.qkv_layers == (1,) and run.layout.qkv_steps == (13,)


def test_sample_statistics_match_its_stored_qkv():
    with dfsviz.open(SAMPLE) as run:
        q, k, _ = run.qkv(13, 1)
        scale = float(run.attrs["softmax_scale"])
        for order in run.orders:
            perm = run.perm(order)
            # Q/K are stored in float16, the statistics were computed from the float32 originals.
            want = block_stats_ref(q[:, :, perm].float(), k[:, :, perm].float(), run.block, scale)
            got = run.block_stats(13, 1, order)
            torch.testing.assert_close(got.m, want.m, atol=2e-3, rtol=2e-2)
            torch.testing.assert_close(got.L, want.L, atol=2e-2, rtol=1e-2)
        hilbert = run.recall(13, 1, "hilbert3d", "dfs_tile", gamma=0.1)
        raster = run.recall(13, 1, "raster", "dfs_tile", gamma=0.1)
        assert bool((hilbert > 0).all()) and bool((raster > 0).all())

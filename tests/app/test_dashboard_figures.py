"""The figure builders the dashboard draws with (dfsviz.figures): the footprint mosaic."""

from __future__ import annotations

import json
import re

import numpy as np
import plotly.graph_objects as go
import pytest

from dfsviz import figures
from dfsviz.sparse.grid import LatentGrid


def test_footprint_mosaic_tiles_every_frame_in_place():
    grid = LatentGrid.parse("5x2x3")
    rng = np.random.default_rng(0)
    fp = rng.random(grid.num_tokens)
    fp /= fp.sum()
    kept = np.zeros(grid.num_tokens, dtype=bool)
    kept[6:12] = True  # frame 1, all of it
    fig = figures.footprint_mosaic(fp, grid, kept_tokens=kept, query_tokens=kept, cols=2, floor=1e-9)
    (heat,) = fig.data
    query, outline = fig.layout.shapes
    z = np.asarray(heat.z, dtype=np.float64)
    where = np.asarray(heat.customdata)
    assert z.shape == (3 * 3 - 1, 2 * 4 - 1)  # 3 rows x 2 columns of 2x3 frames, one empty cell between
    video = fp.reshape(5, 2, 3)
    for f in range(5):
        r, c = divmod(f, 2)
        tile = z[r * 3: r * 3 + 2, c * 4: c * 4 + 3]
        np.testing.assert_allclose(tile, np.log10(video[f]), rtol=1e-6)
        assert (where[r * 3: r * 3 + 2, c * 4: c * 4 + 3, 0] == f).all()
        assert (where[r * 3: r * 3 + 2, c * 4: c * 4 + 3, 1] == [[0] * 3, [1] * 3]).all()
    assert np.isnan(z).sum() == z.size - grid.num_video
    assert [a.text for a in fig.layout.annotations] == [f"frame {f}" for f in range(5)]
    # put together without plotly's checks (for speed), yet what a checked figure holds
    assert json.loads(go.Figure(fig.to_dict()).to_json()) == json.loads(fig.to_json())
    # frame 1 (row 0, column 1) outlined as one rectangle: 4 segments around x in [3.5, 6.5], y in [-0.5, 1.5],
    # one SVG path shape each (a browser draws a path at once, a line trace of as many segments slowly)
    for shape in (query, outline):
        assert shape.type == "path" and shape.xref == "x" and shape.yref == "y"
        ends = [float(v) for v in re.findall(r"-?\d+(?:\.\d+)?", shape.path)]
        assert sorted(zip(ends[0::4], ends[1::4], ends[2::4], ends[3::4])) == sorted([
            (3.5, -0.5, 6.5, -0.5), (3.5, 1.5, 6.5, 1.5), (3.5, -0.5, 3.5, 1.5), (6.5, -0.5, 6.5, 1.5)])
    assert (query.name, query.line.color) == ("query block", "#00E5FF")
    assert (outline.name, outline.line.color) == ("kept keys", "#FFFFFF")
    alone = figures.footprint_mosaic_outline(kept, grid, cols=2)
    assert alone == outline.to_plotly_json()

def test_footprint_mosaic_names_bad_arguments():
    grid = LatentGrid.parse("2x3x4")
    fp = np.full(grid.num_tokens, 1 / grid.num_tokens)
    with pytest.raises(TypeError, match="`grid` must be a dfsviz LatentGrid"):
        figures.footprint_mosaic(fp, "2x3x4")
    with pytest.raises(ValueError, match="`footprint length` = 23 tokens does not match grid 2x3x4"):
        figures.footprint_mosaic(fp[:-1], grid)
    with pytest.raises(ValueError, match=r"`cols` must be a positive integer \(got 0\)"):
        figures.footprint_mosaic(fp, grid, cols=0)
    with pytest.raises(ValueError, match=r"`kept_tokens` must hold one flag per token \(24\) \(got 3\)"):
        figures.footprint_mosaic(fp, grid, kept_tokens=np.ones(3, dtype=bool))

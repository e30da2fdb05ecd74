"""The plotly figure builders: traces, shapes and the numbers they carry."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import plotly.graph_objects as go
import pytest
import torch

from dfsviz import figures
from dfsviz.analysis.curves import oracle_curve, recall_curve
from dfsviz.sparse.grid import LatentGrid
from dfsviz.sparse.schedule import DFSSchedule


def _segments(xs, ys):
    """[(x0, y0, x1, y1), ...] from NaN-separated float coordinate arrays."""
    xs, ys = np.asarray(xs), np.asarray(ys)
    assert xs.dtype.kind == "f" and xs.shape == ys.shape and xs.size % 3 == 0
    out = []
    for i in range(0, len(xs), 3):
        assert math.isnan(xs[i + 2]) and math.isnan(ys[i + 2])
        assert not np.isnan([xs[i], ys[i], xs[i + 1], ys[i + 1]]).any()
        out.append((float(xs[i]), float(ys[i]), float(xs[i + 1]), float(ys[i + 1])))
    return out


def test_outline_segments_single_cell_rectangle_and_l_shape():
    one = np.zeros((3, 4), dtype=bool)
    one[1, 2] = True
    assert sorted(_segments(*figures.outline_segments(one))) == sorted([
        (1.5, 0.5, 2.5, 0.5), (1.5, 1.5, 2.5, 1.5), (1.5, 0.5, 1.5, 1.5), (2.5, 0.5, 2.5, 1.5),
    ])
    rect = np.zeros((5, 6), dtype=bool)
    rect[1:4, 2:6] = True  # touches the right border
    segs = _segments(*figures.outline_segments(rect))
    assert sorted(segs) == sorted([
        (1.5, 0.5, 5.5, 0.5), (1.5, 3.5, 5.5, 3.5), (1.5, 0.5, 1.5, 3.5), (5.5, 0.5, 5.5, 3.5),
    ])
    ell = np.array([[1, 0], [1, 1]], dtype=bool)
    assert len(_segments(*figures.outline_segments(ell))) == 6
    assert [a.size for a in figures.outline_segments(np.zeros((2, 2), dtype=bool))] == [0, 0]
    two = np.zeros((1, 5), dtype=bool)
    two[0, [0, 3]] = True
    assert len(_segments(*figures.outline_segments(two))) == 8


def _png(uri: str) -> np.ndarray:
    """uint8 [R, C, 4] RGBA pixels of a ``data:image/png;base64,`` URI."""
    import base64
    import io

    from PIL import Image

    assert uri.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGBA"))


def _path_segments(path: str):
    """[(x0, y0, x1, y1), ...] of an SVG path made of "M x,y L x,y" moves and lines."""
    numbers = [float(v) for v in re.findall(r"-?\d+(?:\.\d+)?", path)]
    assert path.count("M") == path.count("L") == len(numbers) // 4
    return [tuple(numbers[i:i + 4]) for i in range(0, len(numbers), 4)]


def test_mask_heatmap(case):
    from plotly.colors import sample_colorscale

    m = case.stats.m[0, 1]
    kept = torch.zeros_like(m, dtype=torch.bool)
    kept[2, 3] = True
    fig = figures.mask_heatmap(m, kept, title="raster", floor=1e-4, query_block=2)
    image, scale = fig.data
    logs = np.log10(np.maximum(m.numpy(), 1e-4))
    # the block mass drawn as an image: its hover and its CSV read the values from customdata
    assert isinstance(image, go.Image) and image.name == "log10 block mass"
    np.testing.assert_allclose(np.asarray(image.customdata, dtype=np.float64), logs, rtol=1e-6)
    assert "%{customdata:.2f}" in image.hovertemplate and "query block %{y}" in image.hovertemplate
    # each pixel has the colour plotly's Viridis gives the cell's value (one 8-bit step of error)
    pixels = _png(image.source)
    assert pixels.shape == (*m.shape, 4) and (pixels[..., 3] == 255).all()
    unit = (logs - logs.min()) / (logs.max() - logs.min())
    want = np.array([[int(c) for c in rgb[4:-1].split(",")]
                     for rgb in sample_colorscale("Viridis", unit.ravel().tolist(), colortype="rgb")])
    assert np.abs(pixels[..., :3].reshape(-1, 3).astype(int) - want).max() <= 3
    # the colour bar: a trace with no points
    assert scale.hoverinfo == "skip" and scale.marker.showscale and scale.marker.colorbar.title.text == "log10 m"
    assert (scale.marker.cmin, scale.marker.cmax) == pytest.approx((logs.min(), logs.max()), abs=1e-6)
    # the kept blocks outlined by one path shape, the query row marked by query_row_shape: one way to mark a row
    outline, row = fig.layout.shapes
    assert outline.name == "kept blocks" and outline.type == "path"
    assert sorted(_path_segments(outline.path)) == sorted([
        (2.5, 1.5, 3.5, 1.5), (2.5, 2.5, 3.5, 2.5), (2.5, 1.5, 2.5, 2.5), (3.5, 1.5, 3.5, 2.5)])
    assert row.to_plotly_json() == figures.query_row_shape(2, m.shape[1])
    assert f"kept {1 / m.numel():.1%} of blocks" in fig.layout.title.text
    # put together without plotly's checks (for speed), yet what a checked figure holds
    assert json.loads(go.Figure(fig.to_dict()).to_json()) == json.loads(fig.to_json())
    assert fig.layout.yaxis.autorange == "reversed"
    assert len(figures.mask_heatmap(m).data) == 2 and not figures.mask_heatmap(m).layout.shapes
    # a colour range given (two maps side by side): colours and colour bar follow it
    ranged = figures.mask_heatmap(m, zrange=(-8.0, 0.0))
    assert (ranged.data[1].marker.cmin, ranged.data[1].marker.cmax) == (-8.0, 0.0)
    unit = (logs + 8.0) / 8.0
    want = np.array([[int(c) for c in rgb[4:-1].split(",")]
                     for rgb in sample_colorscale("Viridis", unit.ravel().tolist(), colortype="rgb")])
    assert np.abs(_png(ranged.data[0].source)[..., :3].reshape(-1, 3).astype(int) - want).max() <= 3


def test_recall_budget_puts_oracles_last(case):
    n, b = case.seq_len, case.block
    curves = {f"{name} · raster": recall_curve(case.stats.m, case.scores[name], seq_len=n, block=b) for name in ("meanpool", "dfs_tile")}
    oracle = {"oracle · raster": oracle_curve(case.stats.m, seq_len=n, block=b)}
    fig = figures.recall_budget(curves, oracle, targets=(0.9, 0.95))
    assert [t.name for t in fig.data] == ["meanpool · raster", "dfs_tile · raster", "oracle · raster"]
    np.testing.assert_allclose(fig.data[1].y, curves["dfs_tile · raster"].mean_recall().numpy())
    np.testing.assert_allclose(fig.data[2].x, np.arange(1, case.stats.num_blocks + 1) / case.stats.num_blocks)
    assert fig.data[2].line.dash == "dash"
    assert sorted(s.y0 for s in fig.layout.shapes) == [0.9, 0.95]
    pair = figures.recall_budget({"a": ([0.1, 0.5, 1.0], [0.2, 0.7, 1.0])}, targets=())
    assert list(pair.data[0].y) == [0.2, 0.7, 1.0] and not pair.layout.shapes


def _checked_alike(fig: go.Figure) -> None:
    """A figure put together without plotly's checks (for speed) holds what a checked one would,
    the plotly_white template included."""
    assert json.loads(go.Figure(fig.to_dict()).to_json()) == json.loads(fig.to_json())
    assert fig.layout.template.layout.paper_bgcolor == "white"


def test_bound_scatter_marks_exactly_the_violations():
    bound = np.array([0.1, 0.5, 0.9, 0.3])
    measured = np.array([0.2, 0.4, 0.95, 0.3])
    fig = figures.bound_scatter(bound, measured, groups=["raster", "raster", "hilbert3d", "hilbert3d"])
    names = [t.name for t in fig.data]
    assert names == ["raster", "hilbert3d", "y = x", "violations"]
    bad = fig.data[-1]
    assert list(bad.x) == [0.4] and list(bad.y) == [0.5]
    assert "1 violations of 4" in fig.layout.title.text
    assert "0 violations" in figures.bound_scatter(bound, measured, atol=0.2).layout.title.text
    assert list(fig.layout.xaxis.range) == [0, 1.02] and list(fig.layout.yaxis.range) == [0, 1.02]
    _checked_alike(fig)


def test_recall_vs_gap_draws_bound3_per_budget():
    gap = np.array([-2.0, 0.0, 1.0, 3.0])
    fig = figures.recall_vs_gap(gap, [0.2, 0.3, 0.6, 0.9], [0.1, 0.1, 0.3, 0.3], num_points=50)
    curves = [t for t in fig.data if t.name.startswith("Bound 3")]
    assert [t.name for t in curves] == ["Bound 3, γ = 0.1", "Bound 3, γ = 0.3"]
    x = np.asarray(curves[1].x)
    assert x.size == 50 and x.min() == -2.0 and x.max() == 3.0
    expected = 1.0 / (1.0 + (0.7 / 0.3) * np.exp(-x))  # theory.md Bound 3 written out
    np.testing.assert_allclose(curves[1].y, expected, rtol=1e-12)
    assert figures.bound3_curve(np.zeros(3), 0.25).tolist() == pytest.approx([0.25] * 3)
    assert fig.layout.xaxis.title.text == figures.FACTOR_LABELS["effective_gap"]
    _checked_alike(fig)


def test_factor_distributions_kinds():
    values = {"raster": np.array([0.8, 0.9, np.inf]), "hilbert3d": np.array([0.5, 0.6])}
    for kind, cls in (("violin", go.Violin), ("box", go.Box), ("histogram", go.Histogram)):
        fig = figures.factor_distributions(values, factor="W_k", kind=kind)
        assert [type(t) for t in fig.data] == [cls, cls]
        data = fig.data[0].x if kind == "histogram" else fig.data[0].y
        assert list(data) == [0.8, 0.9]  # the infinite sample is left out
        _checked_alike(fig)
    assert "intra-block variance ratio W_k" in fig.layout.xaxis.title.text
    assert fig.layout.barmode == "overlay" and fig.layout.yaxis.title.text == "density"


def test_drift_heatmap():
    mat = np.array([[1.0, 0.8], [0.7, 1.0]])
    fig = figures.drift_heatmap([12, 24], mat, quantity="jaccard")
    heat = fig.data[0]
    np.testing.assert_array_equal(heat.z, mat)
    assert list(heat.x) == ["12", "24"] and heat.zmin == 0 and heat.zmax == 1
    assert heat.colorbar.title.text == "jaccard" and "jaccard" in fig.layout.title.text


def test_schedule_figure_from_dfs_schedule():
    sched = DFSSchedule(num_steps=10, skip_steps=2, interval=3)
    plans = [sched.at_step(s) for s in range(10)]
    fig = figures.schedule_figure(range(10), [p.gamma for p in plans], [p.refresh for p in plans],
                                  series={"recall": np.linspace(0.5, 1.0, 10)})
    bar, refresh, line = fig.data
    assert list(bar.y[:2]) == [1.0, 1.0] and bar.y[2] == pytest.approx(0.3)
    assert list(refresh.x) == [2, 5, 8]
    np.testing.assert_allclose(line.y, np.linspace(0.5, 1.0, 10))


def test_footprint_frames_in_video_space():
    grid = LatentGrid(3, 4, 5, text_len=6)
    n = grid.num_tokens
    fp = np.full(n, 1.0 / n)
    fp[grid.text_slice] = 0.0
    fp[grid.video_index(1, 2, 3)] = 0.5
    kept = np.zeros(n, dtype=bool)
    kept[: grid.frame_tokens] = True  # every key of frame 0
    query = np.zeros(n, dtype=bool)
    query[grid.video_index(1, 0, 0)] = True
    fig = figures.footprint_frames(fp, grid, kept_tokens=kept, query_tokens=query, cols=2, floor=1e-6)
    heats = [t for t in fig.data if isinstance(t, go.Heatmap)]
    assert [h.name for h in heats] == ["frame 0", "frame 1", "frame 2"]
    z1 = np.asarray(heats[1].z)
    assert z1.shape == (4, 5) and z1[2, 3] == pytest.approx(math.log10(0.5))
    outlines = {t.name: t for t in fig.data if isinstance(t, go.Scatter)}
    assert len(_segments(outlines["kept keys, frame 0"].x, outlines["kept keys, frame 0"].y)) == 4
    assert len(outlines["kept keys, frame 1"].x) == 0  # nothing kept on frame 1
    assert len(_segments(outlines["query block, frame 1"].x, outlines["query block, frame 1"].y)) == 4
    assert "text tokens hold 0.0%" in fig.layout.title.text
    picked = figures.footprint_frames(fp, grid, frames=[2])
    assert len(picked.data) == 1


def test_sweep_lines():
    fig = figures.sweep_lines([0.1, 0.5], {"raster": [0.8, 0.9], "hilbert3d": [0.5, 0.6]}, x_name="delta",
                              y_name="W_k", bands={"raster": ([0.7, 0.8], [0.9, 1.0])})
    assert [t.name for t in fig.data] == ["raster range", "raster", "hilbert3d"]
    assert list(fig.data[0].y) == [0.9, 1.0, 0.8, 0.7]
    assert fig.layout.xaxis.title.text == "token-model noise δ"


def test_errors():
    m = np.full((3, 3), 1 / 3)
    with pytest.raises(ValueError, match=r"`mass` must have 2 dimension\(s\)"):
        figures.mask_heatmap(np.zeros(3))
    with pytest.raises(TypeError, match="`mass` must be an array of numbers"):
        figures.mask_heatmap({"a": 1})
    with pytest.raises(ValueError, match="`mass` must be non-negative"):
        figures.mask_heatmap(-m)
    with pytest.raises(ValueError, match=r"`kept` must have the shape of `mass` \(3, 3\)"):
        figures.mask_heatmap(m, np.zeros((2, 3), dtype=bool))
    with pytest.raises(ValueError, match=r"`floor` must be a number in \(0, 1\)"):
        figures.mask_heatmap(m, floor=0)
    with pytest.raises(ValueError, match=r"`query_block` must be an integer in \[0, 3\)"):
        figures.mask_heatmap(m, query_block=3)
    with pytest.raises(ValueError, match=r"`zrange` must be two finite numbers low < high, the log10 colour range \(got \(0.0, 0.0\)\)"):
        figures.mask_heatmap(m, zrange=(0.0, 0.0))
    with pytest.raises(ValueError, match="`curves` must be a non-empty mapping"):
        figures.recall_budget({})
    with pytest.raises(TypeError, match="curve 'a' must be a RecallCurve or a"):
        figures.recall_budget({"a": 3})
    with pytest.raises(ValueError, match="curve 'a': budgets and recall must have one length"):
        figures.recall_budget({"a": ([0.1, 0.2], [0.3])})
    with pytest.raises(ValueError, match=r"`targets` must hold recall levels in \(0, 1\]"):
        figures.recall_budget({"a": ([0.1], [0.3])}, targets=(1.5,))
    with pytest.raises(ValueError, match="`bound` and `measured` must have one length"):
        figures.bound_scatter([0.1], [0.1, 0.2])
    with pytest.raises(ValueError, match=r"`groups` must hold one label per point \(1\)"):
        figures.bound_scatter([0.1], [0.2], groups=["a", "b"])
    with pytest.raises(ValueError, match="`eff_gap` and `measured` must have one length"):
        figures.recall_vs_gap([0.1], [0.1, 0.2], 0.2)
    with pytest.raises(ValueError, match=r"`gamma` must be a scalar or one budget per point \(1\)"):
        figures.recall_vs_gap([0.1], [0.2], [0.1, 0.2])
    with pytest.raises(ValueError, match="`num_points` must be an integer >= 2"):
        figures.recall_vs_gap([0.1], [0.2], 0.1, num_points=1)
    with pytest.raises(ValueError, match=r"`gamma` must be a kept fraction in \(0, 1\]"):
        figures.bound3_curve([0.0], 0.0)
    with pytest.raises(ValueError, match="`kind` must be one of violin, box, histogram"):
        figures.factor_distributions({"a": [1.0]}, factor="r", kind="strip")
    with pytest.raises(ValueError, match="`values` must be a non-empty mapping"):
        figures.factor_distributions({}, factor="r")
    with pytest.raises(ValueError, match=r"`matrix` must be \[S, S\] with S = len\(steps\) = 3"):
        figures.drift_heatmap([1, 2, 3], np.eye(2))
    with pytest.raises(ValueError, match="`quantity` must be 'recall' or 'jaccard'"):
        figures.drift_heatmap([1, 2], np.eye(2), quantity="iou")
    with pytest.raises(ValueError, match="`steps`, `gamma` and `refresh` must have one length"):
        figures.schedule_figure([0, 1], [None], [False, True])
    with pytest.raises(ValueError, match=r"`series\['r'\]` must have one value per step \(2\)"):
        figures.schedule_figure([0, 1], [None, 0.3], [False, True], series={"r": [1.0]})
    grid = LatentGrid(2, 3, 4)
    fp = np.ones(grid.num_tokens)
    with pytest.raises(TypeError, match="`grid` must be a dfsviz LatentGrid"):
        figures.footprint_frames(fp, "2x3x4")
    with pytest.raises(ValueError, match="`footprint length` = 23 tokens does not match grid 2x3x4"):
        figures.footprint_frames(fp[:-1], grid)
    with pytest.raises(ValueError, match=r"`frames` must be a non-empty list of frames in \[0, 2\)"):
        figures.footprint_frames(fp, grid, frames=[2])
    with pytest.raises(ValueError, match="`cols` must be a positive integer"):
        figures.footprint_frames(fp, grid, cols=0)
    with pytest.raises(ValueError, match="`max_frames` must be a positive integer"):
        figures.footprint_frames(fp, grid, max_frames=0)
    with pytest.raises(ValueError, match=r"`kept_tokens` must hold one flag per token \(24\)"):
        figures.footprint_frames(fp, grid, kept_tokens=np.ones(3, dtype=bool))
    with pytest.raises(ValueError, match="`series` must be a non-empty mapping"):
        figures.sweep_lines([1.0], {}, x_name="delta", y_name="W_k")
    with pytest.raises(ValueError, match=r"`series\['a'\]` must have one value per x \(2\)"):
        figures.sweep_lines([1.0, 2.0], {"a": [1.0]}, x_name="delta", y_name="W_k")


def test_kept_blocks_layer_styles():
    kept = np.zeros((80, 80), dtype=bool)
    kept[3, 5:9] = True
    traces, shapes = figures.kept_blocks_layer(kept)
    (outline,) = shapes
    assert traces == [] and outline["name"] == "kept blocks" and outline["line"]["color"] == "#FFFFFF"
    assert sorted(_path_segments(outline["path"])) == sorted([
        (4.5, 2.5, 8.5, 2.5), (4.5, 3.5, 8.5, 3.5), (4.5, 2.5, 4.5, 3.5), (8.5, 2.5, 8.5, 3.5),
    ])
    (shade,), shapes = figures.kept_blocks_layer(kept, style="shade")
    assert shapes == [] and isinstance(shade, go.Image) and shade.hoverinfo == "skip" and shade.name == "kept blocks"
    pixels = _png(shade.source)  # white, half transparent on the kept blocks, transparent elsewhere
    np.testing.assert_array_equal(pixels[..., 3] > 0, kept)
    assert (pixels[kept][:, :3] == 255).all()
    # "auto" outlines up to OUTLINE_MAX_BLOCKS key blocks and shades above
    assert isinstance(figures.kept_blocks_layer(kept, style="auto")[0][0], go.Image)
    small = kept[:, : figures.OUTLINE_MAX_BLOCKS]
    assert figures.kept_blocks_layer(small, style="auto")[0] == []
    m = np.full((80, 80), 1 / 80)
    fig = figures.mask_heatmap(m, kept, kept_style="auto", title="t")
    assert fig.data[2].name == "kept blocks" and fig.layout.title.text == f"t · kept {4 / 6400:.1%} of blocks"
    assert figures.kept_caption(kept) == f"kept {4 / 6400:.1%} of blocks"
    assert np.asarray(fig.data[0].customdata).dtype == np.float32
    with pytest.raises(ValueError, match="`style` must be one of outline, shade, auto"):
        figures.kept_blocks_layer(kept, style="fill")


def test_footprint_panels_match_make_subplots_and_outlines_sit_on_their_panel():
    from plotly.subplots import make_subplots

    grid = LatentGrid(21, 3, 4)
    fp = np.full(grid.num_tokens, 1.0 / grid.num_tokens)
    frames = list(range(0, 21, 2))  # 11 panels: a last row with one empty cell
    fig = figures.footprint_frames(fp, grid, frames=frames, cols=4).to_dict()["layout"]
    ref = make_subplots(rows=3, cols=4, subplot_titles=[f"frame {f}" for f in frames], horizontal_spacing=0.02,
                        vertical_spacing=0.08).to_dict()["layout"]
    for i in range(12):
        suffix = "" if i == 0 else str(i + 1)
        for axis in ("xaxis", "yaxis"):
            np.testing.assert_allclose(fig[axis + suffix]["domain"], ref[axis + suffix]["domain"], atol=1e-12)
            assert fig[axis + suffix]["anchor"] == ref[axis + suffix]["anchor"]
    assert [(a["text"], round(a["x"], 9), round(a["y"], 9)) for a in fig["annotations"]] == \
        [(a["text"], round(a["x"], 9), round(a["y"], 9)) for a in ref["annotations"]]
    kept = np.zeros(grid.num_tokens, dtype=bool)
    kept[grid.video_index(4, 1, 2)] = True
    lines = figures.footprint_outlines(kept, grid, frames)
    assert [t.name for t in lines] == [f"kept keys, frame {f}" for f in frames]
    assert (lines[2].xaxis, lines[2].yaxis) == ("x3", "y3") and (lines[0].xaxis, lines[0].yaxis) == ("x", "y")
    assert _segments(lines[2].x, lines[2].y) == [(1.5, 0.5, 2.5, 0.5), (1.5, 1.5, 2.5, 1.5), (1.5, 0.5, 1.5, 1.5),
                                                 (2.5, 0.5, 2.5, 1.5)]
    assert all(len(t.x) == 0 for j, t in enumerate(lines) if j != 2)
    assert figures.footprint_frame_indices(grid) == [0, 3, 6, 9, 11, 14, 17, 20]
    with pytest.raises(ValueError, match=r"`tokens` must hold one flag per token \(252\) \(got 251\)"):
        figures.footprint_outlines(kept[:-1], grid, frames)


def test_recall_grid_figure():
    grids = {"meanpool": np.array([[0.5, 0.6, 0.7], [0.8, 0.9, 1.0]]), "dfs_tile": np.full((2, 3), 0.25)}
    fig = figures.recall_grid_figure([3, 7], [0, 10, 20], grids, title="R")
    assert [t.name for t in fig.data] == ["meanpool", "dfs_tile"]
    np.testing.assert_array_equal(fig.data[0].z, grids["meanpool"])
    assert list(fig.data[0].x) == ["0", "10", "20"] and list(fig.data[0].y) == ["3", "7"]
    assert (fig.data[1].xaxis, fig.data[1].yaxis) == ("x2", "y2")
    assert fig.layout.coloraxis.cmin == 0 and fig.layout.coloraxis.cmax == 1
    assert fig.layout.yaxis.autorange == "reversed" and fig.layout.yaxis.title.text == "layer"
    assert [a.text for a in fig.layout.annotations] == ["meanpool", "dfs_tile"] and fig.layout.title.text == "R"
    with pytest.raises(ValueError, match="`grids` must be a non-empty mapping"):
        figures.recall_grid_figure([3], [0], {})
    with pytest.raises(ValueError, match=r"`grids\['a'\]` must be \[layers, steps\] = \[2, 3\] \(got \[3, 2\]\)"):
        figures.recall_grid_figure([3, 7], [0, 10, 20], {"a": np.zeros((3, 2))})


def test_outline_segments_cover_exactly_the_boundary_unit_edges():
    """Brute force: a unit edge is on the boundary iff exactly one of its two cells is kept."""
    rng = np.random.default_rng(5)
    for shape, p in (((7, 9), 0.5), ((16, 16), 0.2), ((1, 12), 0.6), ((13, 1), 0.4)):
        kept = rng.random(shape) < p
        rows, cols = shape

        def cell(u, v):
            return 0 <= u < rows and 0 <= v < cols and bool(kept[u, v])

        want = set()
        for u in range(-1, rows + 1):
            for v in range(-1, cols + 1):
                if cell(u, v) != cell(u + 1, v):  # horizontal edge below cell (u, v)
                    want.add(("h", u + 0.5, v - 0.5))
                if cell(u, v) != cell(u, v + 1):  # vertical edge right of cell (u, v)
                    want.add(("v", v + 0.5, u - 0.5))
        got = []
        for x0, y0, x1, y1 in _segments(*figures.outline_segments(kept)):
            if y0 == y1:
                got += [("h", y0, x) for x in np.arange(x0, x1)]
            else:
                assert x0 == x1
                got += [("v", x0, y) for y in np.arange(y0, y1)]
        assert len(got) == len(set(got)) and set(got) == want, shape

"""The Video page's figure builder on clips made here: every video frame is an animation
frame showing its own pixels and the maps of its latent frame, cells land on the pixels they
cover, the colour range runs from uniform attention to the largest value, and every bad input
is refused with a message naming it."""

from __future__ import annotations

import base64
import io
import math

import numpy as np
import pytest
from PIL import Image

from dfsviz.app.video_figures import FootprintPanel, check_video, frame_png, video_footprint_figure
from dfsviz.sparse.grid import LatentGrid

GRID = LatentGrid(3, 4, 6)  # 3 latent frames of 4 x 6 cells, N = 72
H, W = 8, 12  # every cell covers 2 x 2 pixels
LATENT = np.array([0, 1, 1, 2, 2])  # 5 video frames


def clip(t: int = 5) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(t, H, W, 3), dtype=np.uint8)


def panel(title: str, grid: LatentGrid = GRID, seed: int = 1) -> FootprintPanel:
    rng = np.random.default_rng(seed)
    fp = rng.random(grid.num_tokens)
    fp /= fp.sum()
    query = np.zeros(grid.num_tokens, dtype=bool)
    kept = np.zeros(grid.num_tokens, dtype=bool)
    return FootprintPanel(title, fp, query, kept)


def decode(uri: str) -> np.ndarray:
    head, data = uri.split(",", 1)
    assert head == "data:image/png;base64"
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))


def z_of(trace) -> np.ndarray:
    return np.asarray(trace.z, dtype=np.float64)


def test_frame_png_round_trips_the_pixels():
    frame = clip()[2]
    assert np.array_equal(decode(frame_png(frame)), frame)


def test_every_video_frame_shows_its_pixels_and_the_maps_of_its_latent_frame():
    frames = clip()
    left, right = panel("raster", seed=1), panel("hilbert3d", seed=2)
    fig = video_footprint_figure(frames, LATENT, 4.0, GRID, [left, right])
    assert [fr.name for fr in fig.frames] == ["0", "1", "2", "3", "4"]
    assert [list(s.args[0]) for s in fig.layout.sliders[0].steps] == [["0"], ["1"], ["2"], ["3"], ["4"]]
    for t, fr in enumerate(fig.frames):
        assert len(fr.data) == 8  # image, heat, query, kept keys per panel
        for side, p in enumerate((left, right)):
            image, heat = fr.data[4 * side], fr.data[4 * side + 1]
            assert np.array_equal(decode(image.source), frames[t])
            expected = np.log10(p.footprint.reshape(3, 4, 6)[LATENT[t]])
            np.testing.assert_allclose(z_of(heat), expected, rtol=1e-6)
    # the still figure shows frame 0 (default start)
    assert np.array_equal(decode(fig.data[0].source), frames[0])


def test_start_frame_and_play_speed():
    fig = video_footprint_figure(clip(), LATENT, 4.0, GRID, [panel("raster")], start=3)
    assert fig.layout.sliders[0].active == 3
    np.testing.assert_allclose(z_of(fig.data[1]), np.log10(panel("raster").footprint.reshape(3, 4, 6)[2]), rtol=1e-6)
    play = fig.layout.updatemenus[0].buttons[0]
    assert play.args[1]["frame"]["duration"] == 250.0  # 4 frames per second
    assert fig.layout.meta["fps"] == 4.0


def test_without_buttons_the_slider_takes_the_whole_width():
    fig = video_footprint_figure(clip(), LATENT, 4.0, GRID, [panel("raster")], buttons=False)
    assert fig.layout.updatemenus == ()
    assert (fig.layout.sliders[0].x, fig.layout.sliders[0].len) == (0.0, 1.0)
    assert fig.layout.meta["fps"] == 4.0


def test_cells_cover_their_pixels_and_outlines_follow_the_tokens():
    p = panel("raster")
    query = np.zeros(GRID.num_tokens, dtype=bool)
    query[1 * 24 + 3 * 6 + 5] = True  # latent frame 1, row 3, column 5
    kept = np.zeros(GRID.num_tokens, dtype=bool)
    kept[1 * 24:1 * 24 + 6] = True  # latent frame 1, the whole row 0
    fig = video_footprint_figure(clip(), LATENT, 4.0, GRID, [FootprintPanel("raster", p.footprint, query, kept)])
    heat, outline_q, outline_k = fig.frames[1].data[1:4]
    # cell (row y, column x) spans pixels 2y .. 2y + 1 and 2x .. 2x + 1: centre at 2x + 0.5
    assert (heat.x0, heat.dx, heat.y0, heat.dy) == (0.5, 2, 0.5, 2)
    xs = np.asarray(outline_q.x, dtype=np.float64)
    ys = np.asarray(outline_q.y, dtype=np.float64)
    # the query token's box: pixels 10..11 x 6..7, edges half a pixel out
    assert (np.nanmin(xs), np.nanmax(xs), np.nanmin(ys), np.nanmax(ys)) == (9.5, 11.5, 5.5, 7.5)
    xs = np.asarray(outline_k.x, dtype=np.float64)
    ys = np.asarray(outline_k.y, dtype=np.float64)
    assert (np.nanmin(xs), np.nanmax(xs), np.nanmin(ys), np.nanmax(ys)) == (-0.5, 11.5, -0.5, 1.5)
    # latent frame 0 has neither: no outline drawn on video frame 0
    assert np.asarray(fig.frames[0].data[2].x).size == 0 and np.asarray(fig.frames[0].data[3].x).size == 0


def test_one_colour_range_from_uniform_attention_to_the_largest_value():
    left, right = panel("raster", seed=1), panel("hilbert3d", seed=2)
    fig = video_footprint_figure(clip(), LATENT, 4.0, GRID, [left, right])
    axis = fig.layout.coloraxis
    assert math.isclose(axis.cmin, -math.log10(72))
    assert math.isclose(axis.cmax, math.log10(max(left.footprint.max(), right.footprint.max())), rel_tol=1e-6)
    assert all(t.coloraxis == "coloraxis" for fr in fig.frames for t in fr.data if t.type == "heatmap")


def test_text_tokens_are_left_out_of_the_frames():
    grid = LatentGrid(3, 4, 6, text_len=5, text_first=True)
    p = panel("raster", grid)
    fig = video_footprint_figure(clip(), LATENT, 4.0, grid, [p])
    np.testing.assert_allclose(z_of(fig.frames[0].data[1]), np.log10(p.footprint[5:].reshape(3, 4, 6)[0]), rtol=1e-6)


@pytest.mark.parametrize("frames, latent, fps, match", [
    ([[0]], LATENT, 4.0, r"`frames` must be a numpy array uint8 \[T, H, W, 3\] \(got list\)"),
    (clip().astype(np.float32), LATENT, 4.0, r"`frames` must be RGB video frames, uint8 \[T, H, W, 3\].*got float32"),
    (clip()[..., :1], LATENT, 4.0, r"`frames` must be RGB video frames.*\[5, 8, 12, 1\]"),
    (clip(), LATENT[:4], 4.0, r"`latent_frame` must be integers \[T\] = \[5\].*got int64 \[4\]"),
    (clip(), LATENT.astype(float), 4.0, r"`latent_frame` must be integers"),
    (clip(), np.array([0, 1, 1, 2, 3]), 4.0, r"`latent_frame` must be non-decreasing .* \[0, F - 1 = 2\]"),
    (clip(), np.array([0, 2, 1, 2, 2]), 4.0, r"`latent_frame` must be non-decreasing"),
    (clip(), LATENT, 0.0, r"`fps` must be a positive number of frames per second \(got 0.0\)"),
    (clip(), LATENT, float("nan"), r"`fps` must be a positive number"),
    (clip(), LATENT, True, r"`fps` must be a positive number"),
])
def test_bad_clips_are_refused(frames, latent, fps, match):
    with pytest.raises((ValueError, TypeError), match=match):
        check_video(frames, latent, fps, GRID)


def test_bad_grid_panels_and_start_are_refused():
    with pytest.raises(TypeError, match=r"`grid` must be a dfsviz LatentGrid \(got str\)"):
        check_video(clip(), LATENT, 4.0, "3x4x6")
    with pytest.raises(ValueError, match=r"`panels` must be a non-empty list of FootprintPanel"):
        video_footprint_figure(clip(), LATENT, 4.0, GRID, [])
    with pytest.raises(TypeError, match=r"`panels\[0\]` must be a FootprintPanel \(got dict\)"):
        video_footprint_figure(clip(), LATENT, 4.0, GRID, [{}])
    p = panel("raster")
    with pytest.raises(ValueError, match=r"`panels\[0\].footprint length` = 71 tokens does not match grid 3x4x6"):
        video_footprint_figure(clip(), LATENT, 4.0, GRID, [FootprintPanel("r", p.footprint[:71], p.query_tokens,
                                                                          p.kept_tokens)])
    with pytest.raises(ValueError, match=r"`panels\[0\].kept_tokens` must be bool flags \(got float64\)"):
        video_footprint_figure(clip(), LATENT, 4.0, GRID, [FootprintPanel("r", p.footprint, p.query_tokens,
                                                                          p.footprint)])
    with pytest.raises(ValueError, match=r"`panels\[0\].query_tokens` must be one value per token, \[N\]"):
        video_footprint_figure(clip(), LATENT, 4.0, GRID, [FootprintPanel("r", p.footprint, p.query_tokens[None],
                                                                          p.kept_tokens)])
    bad = p.footprint.copy()
    bad[3] = np.nan
    with pytest.raises(ValueError, match=r"`panels\[0\].footprint` must hold finite attention >= 0"):
        video_footprint_figure(clip(), LATENT, 4.0, GRID, [FootprintPanel("r", bad, p.query_tokens, p.kept_tokens)])
    with pytest.raises(ValueError, match=r"`start` must be a video frame index in \[0, 5\) \(got 5\)"):
        video_footprint_figure(clip(), LATENT, 4.0, GRID, [p], start=5)
    with pytest.raises(TypeError, match=r"`buttons` must be a bool \(got str\)"):
        video_footprint_figure(clip(), LATENT, 4.0, GRID, [p], buttons="no")

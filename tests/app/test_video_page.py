"""The Video page in a real headless browser (Playwright on Debian's /usr/bin/chromium), on a
real capture of the embedded model that stores its decoded clip: the clip plays frame by
frame with the query block's stored footprint on the frame's latent frame and its kept key
blocks, raster and Hilbert side by side; play and pause move and stop the frame slider; a
new query block or budget redraws the overlay and lands in the address; a deep link restores
the view; a capture without a clip says so in one line. Expected values come from the
capture file itself (``dfsviz.open``), never from the page's code.

Every wait is on the condition the test then checks (``expect`` or a wait on the drawn
figure), never a sleep.
"""

from __future__ import annotations

import base64
import io
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import dfsviz
from dfsviz.capture import CaptureConfig, run_capture

pytest.importorskip("playwright")
from playwright.sync_api import expect  # noqa: E402
from test_browser import choose, no_traceback, wait_changed, wait_drawn  # noqa: E402

OLD = Path(__file__).resolve().parents[1] / "data" / "format_v1.h5"  # written before captures held a clip
CLIP = "clips/embedded.h5"
# the embedded model on CPU: 2 steps, the second captured, 2 of its 8 layers
SETTINGS = dict(model=None, num_steps=2, capture_steps=(1,), layers=(0, 3), footprints=3, device="cpu")


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("video-app")
    clips, old = base / "clips", base / "old"
    clips.mkdir()
    old.mkdir()
    run_capture(CaptureConfig(out=str(clips / "embedded.h5"), **SETTINGS), progress=False)
    shutil.copy(OLD, old / "format_v1.h5")
    return clips, old


@pytest.fixture(scope="module")
def url(roots, serve):
    with serve(list(roots)) as address:
        yield address


@pytest.fixture(scope="module")
def capture(roots):
    reader = dfsviz.open(roots[0] / "embedded.h5")
    yield reader
    reader.close()


def plot(page, script: str, arg=None):
    """Evaluate ``script`` on the video figure's plotly element ``g``."""
    return page.evaluate("a => { const g = document.querySelector('#vd-video-card .js-plotly-plot'); return "
                         + script + "; }", arg)


def shown_frame(page) -> np.ndarray:
    uri = plot(page, "g.data[0].source")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB"))


def heat(page, side: int) -> np.ndarray:
    rows = plot(page, "g._fullData[a].z.map(r => Array.from(r))", 4 * side + 1)
    return np.asarray(rows, dtype=np.float64)


def stored_footprint(capture, step, layer, head, block) -> np.ndarray:
    blocks, attention = capture.footprints(step, layer, "raster", head)
    return attention[blocks.tolist().index(block)].double().numpy()


def latent_map(capture, footprint: np.ndarray, latent: int) -> np.ndarray:
    grid = capture.grid
    return np.log10(np.maximum(footprint.reshape(grid.frames, grid.height, grid.width)[latent], 1e-8))


def test_the_clip_plays_with_the_stored_footprint_on_each_frame(page, url, capture, console, artifacts):
    video = capture.video()
    page.goto(url + f"/video?file={CLIP}")
    wait_drawn(page, "vd-video")
    expect(page.locator("#vd-note")).to_contain_text("raster query block")
    assert plot(page, "g.data.length") == 8
    step, layer, head = capture.steps[-1], capture.layers[len(capture.layers) // 2], capture.heads[0]
    block = int(page.locator("#vd-qb").inner_text())
    np.testing.assert_array_equal(shown_frame(page), video.frames[0])
    footprint = stored_footprint(capture, step, layer, head, block)
    np.testing.assert_allclose(heat(page, 0), latent_map(capture, footprint, int(video.latent_frame[0])), atol=1e-3)
    page.screenshot(path=str(artifacts / "video.png"), full_page=True)

    page.locator("#vd-play").click()
    page.wait_for_function("() => document.querySelector('#vd-video-card .js-plotly-plot')"
                           "._fullLayout.sliders[0].active >= 2", timeout=20000)
    page.locator("#vd-pause").click()
    # paused: plotly's animation loop has stopped (no queued or current frame: while it plays, the
    # drawn frame matches the slider between frames too, and the pause reaches plotly through a
    # Dash callback, later on a loaded machine), and the frame drawn is the one the slider stopped at
    page.wait_for_function("() => { const g = document.querySelector('#vd-video-card .js-plotly-plot');"
                           " const a = g._transitionData, t = String(g._fullLayout.sliders[0].active);"
                           " return !a._animationRaf && !a._currentFrame && a._frameQueue.length === 0"
                           " && g.data[0].source === a._frameHash[t].data[0].source; }")
    t = plot(page, "g._fullLayout.sliders[0].active")
    assert t >= 2
    expect(page.locator("#vd-video-card")).to_contain_text(f"video frame {t}")
    np.testing.assert_array_equal(shown_frame(page), video.frames[t])
    np.testing.assert_allclose(heat(page, 0), latent_map(capture, footprint, int(video.latent_frame[t])), atol=1e-3)
    no_traceback(page)
    assert console == []


def test_query_block_and_budget_redraw_and_land_in_the_address(page, url, capture, console):
    page.goto(url + f"/video?file={CLIP}")
    wait_drawn(page, "vd-video")
    step, layer, head = capture.steps[-1], capture.layers[len(capture.layers) // 2], capture.heads[0]
    blocks = capture.footprints(step, layer, "raster", head)[0].tolist()
    other = sorted(blocks)[1]
    before = plot(page, "JSON.stringify(g.data[1].z)")
    choose(page, "vd-qb", str(other))
    expect(page).to_have_url(re.compile(rf"[?&]qb={other}(&|$)"))
    wait_changed(page, "vd-video", before)
    expect(page.locator("#vd-note")).to_contain_text(f"raster query block {other}")
    video = capture.video()
    footprint = stored_footprint(capture, step, layer, head, other)
    np.testing.assert_allclose(heat(page, 0), latent_map(capture, footprint, int(video.latent_frame[0])), atol=1e-3)
    # the budget moves the kept-key outline, not the footprint
    kept_before = plot(page, "JSON.stringify([g.data[3].x, g.data[3].y])")
    choose(page, "vd-budget", "0.5")
    expect(page).to_have_url(re.compile(r"[?&]budget=0\.5(&|$)"))
    page.wait_for_function("b => JSON.stringify((g => [g.data[3].x, g.data[3].y])(document.querySelector("
                           "'#vd-video-card .js-plotly-plot'))) !== b", arg=kept_before, timeout=20000)
    np.testing.assert_allclose(heat(page, 0), latent_map(capture, footprint, int(video.latent_frame[0])), atol=1e-3)
    assert console == []


def test_a_deep_link_restores_the_view(page, url, capture, console):
    step, layer, head = capture.steps[-1], capture.layers[0], capture.heads[-1]
    block = sorted(capture.footprints(step, layer, "raster", head)[0].tolist())[-1]
    page.goto(url + f"/video?file={CLIP}&step={step}&layer={layer}&head={head}&method=meanpool&budget=0.3&qb={block}")
    wait_drawn(page, "vd-video")
    for control, value in (("vd-layer", layer), ("vd-head", head), ("vd-method", "meanpool"), ("vd-budget", "0.3"),
                           ("vd-qb", block)):
        expect(page.locator(f"#{control}")).to_contain_text(str(value))
    expect(page.locator("#vd-video-card .gtitle")).to_contain_text(
        f"step {step} · layer {layer} · head {head} · meanpool · γ = 0.3")
    footprint = stored_footprint(capture, step, layer, head, block)
    np.testing.assert_allclose(heat(page, 0), latent_map(capture, footprint, int(capture.video().latent_frame[0])),
                               atol=1e-3)
    assert console == []


def test_a_capture_without_a_clip_says_so_in_one_line(page, url, console):
    page.goto(url + "/video?file=old/format_v1.h5")
    banner = page.locator("#vd-no-video")
    expect(banner).to_have_text(re.compile(r"^This capture holds no decoded video.*dfsviz capture"))
    expect(page.locator(".js-plotly-plot")).to_have_count(0)
    expect(page.locator(".dfs-banner-error")).to_have_count(0)
    no_traceback(page)
    assert console == []


def test_the_colour_range_starts_at_uniform_attention(page, url, capture, console):
    page.goto(url + f"/video?file={CLIP}")
    wait_drawn(page, "vd-video")
    low = plot(page, "g._fullLayout.coloraxis.cmin")
    assert math.isclose(low, -math.log10(capture.grid.num_tokens), rel_tol=1e-9)
    assert console == []

"""The dashboard in a real headless browser (Playwright on Debian's /usr/bin/chromium).

Every page loads with no console error; each Masks control changes what is drawn; a
deep link restores the view; clicking a query block updates both footprints; invalid,
unreadable, incomplete and out-of-root files give banners while the rest stays usable; CSV
downloads hold the plotted numbers; the Live page runs attention in the background.
Screenshots go to test-artifacts/app/.

Every wait is on the condition the test then checks: Playwright's auto-retrying ``expect``
or ``wait_for_function`` on the drawn figure, never a sleep and never "network idle"
followed by a count (callbacks of a busy server may still be on their way then).
"""

from __future__ import annotations

import csv
import io
import math
import re

import numpy as np
import pytest

pytest.importorskip("playwright")
from playwright.sync_api import TimeoutError as PlaywrightTimeout  # noqa: E402
from playwright.sync_api import expect  # noqa: E402

# The tiny random-weight model attends almost uniformly: no sparse budget keeps the Calibrate
# page's default target recall 0.9, so its entry asks for 0.7.
PAGES = {"overview": ("/", 2), "masks": ("/masks", 4), "recall": ("/recall", 1), "theory": ("/theory", 6),
         "drift": ("/drift", 2), "calibrate": ("/calibrate?target_recall=0.7", 6), "live": ("/live", 1)}


def figure_json(page, name: str) -> str:
    return page.evaluate(
        "n => { const g = document.querySelector('#' + n + '-card .js-plotly-plot');"
        " return g && g.data ? JSON.stringify([g.data, g.layout.title]) : ''; }", name)


def wait_drawn(page, name: str, timeout: float = 20000) -> None:
    page.wait_for_function(
        "n => { const g = document.querySelector('#' + n + '-card .js-plotly-plot');"
        " return g && g.data && g.data.length > 0; }", arg=name, timeout=timeout)


def wait_changed(page, name: str, before: str, timeout: float = 20000) -> None:
    page.wait_for_function(
        "([n, b]) => { const g = document.querySelector('#' + n + '-card .js-plotly-plot');"
        " return g && g.data && g.data.length > 0 && JSON.stringify([g.data, g.layout.title]) !== b; }",
        arg=[name, before], timeout=timeout)


def wait_equal(page, name: str, expected: str, timeout: float = 20000) -> None:
    """Wait until figure ``name`` shows exactly ``expected`` (a :func:`figure_json`)."""
    page.wait_for_function(
        "([n, e]) => { const g = document.querySelector('#' + n + '-card .js-plotly-plot');"
        " return g && g.data && JSON.stringify([g.data, g.layout.title]) === e; }",
        arg=[name, expected], timeout=timeout)


def title_of(page, name: str):
    """The title of figure ``name`` (a locator: ``expect`` retries it until it matches)."""
    return page.locator(f"#{name}-card .gtitle").first


def choose(page, control_id: str, label: str) -> None:
    page.locator(f"#{control_id}").click()
    page.locator("[role=listbox] [role=option]").filter(has_text=re.compile(f"^{re.escape(label)}$")).first.click()
    page.keyboard.press("Escape")


def no_traceback(page) -> None:
    text = page.locator("body").inner_text()
    assert "Traceback" not in text and 'File "' not in text


@pytest.mark.parametrize("name", list(PAGES))
def test_every_page_loads_without_console_errors(page, app_url, console, artifacts, name):
    path, figures = PAGES[name]
    page.goto(app_url + path)
    if name == "live":
        page.locator("#lv-run").click()
        expect(page.locator("#lv-table")).to_be_visible(timeout=60000)
    cards = page.locator(".dfs-card:visible")  # a second run's cards stay hidden until one is chosen
    expect(cards).to_have_count(figures)
    for i in range(figures):
        card_id = cards.nth(i).get_attribute("id")
        wait_drawn(page, card_id.removesuffix("-card"))
    expect(page.locator(".dfs-banner-error")).to_have_count(0)
    no_traceback(page)
    # the address bar holds the whole selection: capture and every control of the page
    selection = r"[?&]file=runs/good\.h5(&[^&=]+=[^&]*)*$" if name == "live" else r"[?&]file=runs/good\.h5(&[^&=]+=[^&]*){3,}$"
    expect(page).to_have_url(re.compile(selection))
    page.screenshot(path=str(artifacts / f"{name}.png"), full_page=True)
    assert console == []


def test_masks_controls_change_the_drawing_and_the_url(page, app_url, console):
    page.goto(app_url + "/masks")
    maps, both = ("mk-left", "mk-right"), ("mk-left", "mk-right", "mk-fp-left", "mk-fp-right")
    for n in both:
        wait_drawn(page, n)
    # the footprint's attention does not depend on the scoring method, and its kept blocks may
    # coincide for two methods; every other control changes all four figures
    for control, label, key, changed in (("mk-step", "2", "step=2", both), ("mk-layer", "0", "layer=0", both),
                                         ("mk-head", "1", "head=1", both), ("mk-method", "meanpool", "method=meanpool", maps),
                                         ("mk-budget", "0.5", "budget=0.5", both)):
        before = {n: figure_json(page, n) for n in changed}
        choose(page, control, label)
        for n in changed:
            wait_changed(page, n, before[n])
        expect(page).to_have_url(re.compile(re.escape(key)))
    expect(title_of(page, "mk-left")).to_contain_text("meanpool")
    expect(title_of(page, "mk-left")).to_contain_text("γ = 0.5")
    assert console == []


def test_deep_link_restores_the_view(page, app_url, console, context):
    link = "/masks?file=runs/good.h5&step=2&layer=0&head=1&method=meanpool&budget=0.3&qorder=hilbert3d&qb=5"
    page.goto(app_url + link)
    for c, value in zip(("step", "layer", "head", "method", "budget"), ("2", "0", "1", "meanpool", "0.3")):
        expect(page.locator(f"#mk-{c}")).to_have_text(value)
    expect(title_of(page, "mk-fp-right")).to_contain_text("hilbert3d · query block 5")
    expect(title_of(page, "mk-right")).to_contain_text("γ = 0.3")
    # a view reached by clicking reproduces exactly from its URL in a fresh tab
    names = ("mk-left", "mk-right", "mk-fp-left", "mk-fp-right")
    for n in names:
        wait_drawn(page, n)
    before = {n: figure_json(page, n) for n in names}
    choose(page, "mk-layer", "1")
    expect(page).to_have_url(re.compile("layer=1"))
    # one change of layer redraws each figure once (no other input of theirs changes)
    for n in names:
        wait_changed(page, n, before[n])
    shown = {n: figure_json(page, n) for n in names}
    fresh = context.new_page()
    fresh.goto(page.url)
    try:
        for n, expected in shown.items():
            wait_equal(fresh, n, expected)
    except PlaywrightTimeout:
        pass  # the assertion below shows what differs
    assert {n: figure_json(fresh, n) for n in shown} == shown
    assert console == []


def test_clicking_a_query_block_updates_both_footprints(page, app_url, console):
    page.goto(app_url + "/masks?file=runs/good.h5&step=3&layer=1&head=0")
    wait_drawn(page, "mk-left")
    expect(title_of(page, "mk-fp-left")).to_contain_text("raster · query block 0")
    expect(title_of(page, "mk-fp-right")).to_contain_text("hilbert3d · query block")
    before = figure_json(page, "mk-fp-right")
    x, y = page.evaluate(
        "() => { const g = document.querySelector('#mk-left-card .js-plotly-plot'); const f = g._fullLayout;"
        " const r = g.getBoundingClientRect();"
        " return [r.left + f.xaxis._offset + f.xaxis.l2p(3), r.top + f.yaxis._offset + f.yaxis.l2p(7)]; }")
    page.mouse.click(x, y)
    expect(page).to_have_url(re.compile(r"qorder=raster.*qb=7"))
    expect(title_of(page, "mk-fp-left")).to_contain_text("raster · query block 7")
    # the other order shows the block nearest to the clicked one
    wait_changed(page, "mk-fp-right", before)
    expect(title_of(page, "mk-fp-right")).to_contain_text("hilbert3d · query block")
    assert console == []


def test_bad_files_give_banners_and_the_rest_stays_usable(page, app_url, capture_root, console):
    server_paths = str(capture_root.parent)  # the folder holding the root and the file outside it
    # not HDF5: error banner naming the file by its id, the default capture is shown instead
    page.goto(app_url + "/?file=runs/broken.h5")
    banner = page.locator("#ov-file-banner")
    expect(banner).to_contain_text("runs/broken.h5")
    expect(banner).to_contain_text("showing runs/good.h5 instead")
    expect(page.locator("#ov-files")).to_contain_text("error")
    wait_drawn(page, "ov-recall")
    assert server_paths not in banner.inner_text() + page.locator("#ov-files").inner_text()
    # paths outside the root: refused, nothing of them is read
    for bad in ("runs/escape.h5", "runs/../secret/secret.h5", "/etc/passwd", "runs/%2e%2e/secret/secret.h5"):
        page.goto(app_url + "/masks?file=" + bad)
        expect(page.locator("#mk-file-banner")).to_contain_text(re.compile("refused|not a served root"))
        expect(page.locator("#mk-file")).to_have_text("runs/good.h5")
        wait_drawn(page, "mk-left")
    # an interrupted capture: warning, only its completed steps are offered
    page.goto(app_url + "/masks?file=runs/partial.h5")
    expect(page.locator("#mk-link-banner")).to_contain_text("incomplete")
    wait_drawn(page, "mk-left")
    page.locator("#mk-step").click()
    expect(page.locator("[role=listbox] [role=option]")).to_have_text(["0", "2"])
    page.keyboard.press("Escape")
    # a file that fails validation (step 2's block mass is NaN): refused with its problems,
    # none of it drawn (not even its sound steps), the default capture shown instead
    page.goto(app_url + "/masks?file=runs/damaged.h5&step=3")
    banner = page.locator("#mk-file-banner")
    expect(banner).to_contain_text("runs/damaged.h5: invalid capture, not drawn: step_0002/m")
    expect(banner).to_contain_text("showing runs/good.h5 instead")
    expect(page.locator("#mk-file")).to_have_text("runs/good.h5")
    wait_drawn(page, "mk-left")
    expect(page.locator("#mk-banner .dfs-banner-error")).to_have_count(0)
    page.goto(app_url + "/")
    expect(page.locator("#ov-files")).to_contain_text(re.compile(r"runs/damaged\.h5\s*invalid"))
    no_traceback(page)
    assert server_paths not in page.locator("#ov-files").inner_text()
    assert console == []


def test_csv_download_holds_the_plotted_block_mass_and_the_mask(page, app_url, capture_root, console):
    from dfsviz.capture.reader import CaptureReader
    from dfsviz.sparse.select import select_topk

    page.goto(app_url + "/masks?file=runs/good.h5&step=3&layer=1&head=1&method=dfs_tile&budget=0.2")
    wait_drawn(page, "mk-left")
    with page.expect_download() as info:
        page.locator("#mk-left-card .dfs-button").click()
    text = open(info.value.path(), encoding="utf-8").read()
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[1] == ["trace", "x", "y", "z", "kept"]
    cells = {(int(r[1]), int(r[2])): float(r[3]) for r in rows[2:] if r[0] == "log10 block mass"}
    kept = {(int(r[1]), int(r[2])): r[4] for r in rows[2:] if r[0] == "log10 block mass"}
    with CaptureReader(capture_root / "good.h5") as reader:
        m = reader.block_stats(3, 1, "raster", 1).m[0, 0].double().numpy()
        scores = reader.scores(3, 1, "raster", "dfs_tile", 1)
        mask = select_topk(scores, 0.2, seq_len=reader.grid.num_tokens, block=reader.block).to_dense()[0, 0].numpy()
    assert len(cells) == m.size
    got = np.array([[cells[(v, u)] for v in range(m.shape[1])] for u in range(m.shape[0])])
    np.testing.assert_allclose(got, np.log10(np.maximum(m, 1e-6)), atol=1e-6)
    # the mask drawn over the map: 1 where the top-k mask keeps the block
    assert [[kept[(v, u)] for v in range(m.shape[1])] for u in range(m.shape[0])] == \
        [["1" if k else "0" for k in row] for row in mask]
    assert console == []


def test_live_run_reports_time_error_and_recall(page, app_url, console):
    page.goto(app_url + "/live?file=runs/good.h5&step=3&layer=1&order=hilbert3d&method=dfs_tile&budget=1.0")
    page.locator("#lv-run").click()
    expect(page.locator("#lv-status")).to_contain_text("done", timeout=60000)
    text = page.locator("#lv-table").inner_text()
    recall = float(re.search(r"recall R / density ρ\s+([0-9.]+) / ([0-9.]+)", text).group(1))
    error = float(re.search(r"relative L2 / max abs\)\s+([0-9.e+-]+)", text).group(1))
    # budget 1 keeps every block: DFSAttn is dense attention, recall 1 and float32-level error
    assert math.isclose(recall, 1.0, abs_tol=1e-5) and error < 1e-5
    # the result names the settings that produced it
    assert re.search(r"capture\s+runs/good\.h5", text) and re.search(r"step · layer · order\s+3 · 1 · hilbert3d", text)
    assert re.search(r"scoring method · budget γ\s+dfs_tile · 1\b", text)
    assert console == []

"""The dashboard in a real headless browser (Playwright on Debian's /usr/bin/chromium).

Every page loads with no console error; each Masks control changes what is drawn; a
deep link restores the view; clicking a query block updates both footprints; damaged,
incomplete and out-of-root files give banners while the rest stays usable; CSV downloads
hold the plotted numbers; the Live page runs attention in the background.
Screenshots go to test-artifacts/app/.
"""

from __future__ import annotations

import csv
import io
import math
import re

import numpy as np
import pytest

pytest.importorskip("playwright")

PAGES = {"overview": ("/", 2), "masks": ("/masks", 4), "recall": ("/recall", 1), "theory": ("/theory", 6),
         "drift": ("/drift", 2), "live": ("/live", 1)}


def figure_json(page, name: str) -> str:
    return page.evaluate(
        "n => { const g = document.querySelector('#' + n + '-card .js-plotly-plot');"
        " return g && g.data ? JSON.stringify([g.data, g.layout.title]) : ''; }", name)


def title(page, name: str) -> str:
    return page.locator(f"#{name}-card .gtitle").first.text_content()


def wait_drawn(page, name: str, timeout: float = 20000) -> None:
    page.wait_for_function(
        "n => { const g = document.querySelector('#' + n + '-card .js-plotly-plot');"
        " return g && g.data && g.data.length > 0; }", arg=name, timeout=timeout)


def wait_changed(page, name: str, before: str, timeout: float = 20000) -> None:
    page.wait_for_function(
        "([n, b]) => { const g = document.querySelector('#' + n + '-card .js-plotly-plot');"
        " return g && g.data && g.data.length > 0 && JSON.stringify([g.data, g.layout.title]) !== b; }",
        arg=[name, before], timeout=timeout)


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
    page.wait_for_load_state("networkidle")
    if name == "live":
        page.locator("#lv-run").click()
        page.locator("#lv-table").wait_for(timeout=60000)
    cards = page.locator(".dfs-card")
    assert cards.count() == figures
    for i in range(figures):
        card_id = cards.nth(i).get_attribute("id")
        wait_drawn(page, card_id.removesuffix("-card"))
    assert page.locator(".dfs-banner-error").count() == 0, page.locator(".dfs-banner-error").all_inner_texts()
    no_traceback(page)
    page.screenshot(path=str(artifacts / f"{name}.png"), full_page=True)
    assert console == []
    # the address bar holds the whole selection: capture and every control of the page
    assert "file=runs/good.h5" in page.url and (name == "live" or page.url.count("=") >= 4)


def test_masks_controls_change_the_drawing_and_the_url(page, app_url, console):
    page.goto(app_url + "/masks")
    wait_drawn(page, "mk-left")
    wait_drawn(page, "mk-fp-left")
    maps, both = ("mk-left", "mk-right"), ("mk-left", "mk-right", "mk-fp-left", "mk-fp-right")
    # the footprint's attention does not depend on the scoring method, and its kept blocks may
    # coincide for two methods; every other control changes all four figures
    for control, label, key, changed in (("mk-step", "2", "step=2", both), ("mk-layer", "0", "layer=0", both),
                                         ("mk-head", "1", "head=1", both), ("mk-method", "meanpool", "method=meanpool", maps),
                                         ("mk-budget", "0.5", "budget=0.5", both)):
        before = {n: figure_json(page, n) for n in changed}
        choose(page, control, label)
        for n in changed:
            wait_changed(page, n, before[n])
        page.wait_for_function("k => window.location.search.includes(k)", arg=key)
    assert "meanpool" in title(page, "mk-left") and "γ = 0.5" in title(page, "mk-left")
    assert console == []


def test_deep_link_restores_the_view(page, app_url, console, context):
    link = "/masks?file=runs/good.h5&step=2&layer=0&head=1&method=meanpool&budget=0.3&qorder=hilbert3d&qb=5"
    page.goto(app_url + link)
    wait_drawn(page, "mk-fp-right")
    page.wait_for_function("() => document.querySelector('#mk-fp-right-card .gtitle') !== null")
    assert [page.locator(f"#mk-{c}").inner_text() for c in ("step", "layer", "head", "method", "budget")] == \
        ["2", "0", "1", "meanpool", "0.3"]
    assert "hilbert3d · query block 5" in title(page, "mk-fp-right")
    assert "γ = 0.3" in title(page, "mk-right")
    # a view reached by clicking reproduces exactly from its URL in a fresh tab
    names = ("mk-left", "mk-right", "mk-fp-left", "mk-fp-right")
    before = {n: figure_json(page, n) for n in names}
    choose(page, "mk-layer", "1")
    page.wait_for_function("() => window.location.search.includes('layer=1')")
    for n in names:
        wait_changed(page, n, before[n])
    page.wait_for_load_state("networkidle")
    shown = {n: figure_json(page, n) for n in names}
    fresh = context.new_page()
    fresh.goto(page.url)
    for n in shown:
        wait_drawn(fresh, n)
    fresh.wait_for_load_state("networkidle")
    assert {n: figure_json(fresh, n) for n in shown} == shown
    assert console == []


def test_clicking_a_query_block_updates_both_footprints(page, app_url, console):
    page.goto(app_url + "/masks?file=runs/good.h5&step=3&layer=1&head=0")
    wait_drawn(page, "mk-fp-left")
    page.wait_for_load_state("networkidle")
    assert "raster · query block 0" in title(page, "mk-fp-left")
    before = figure_json(page, "mk-fp-right")
    x, y = page.evaluate(
        "() => { const g = document.querySelector('#mk-left-card .js-plotly-plot'); const f = g._fullLayout;"
        " const r = g.getBoundingClientRect();"
        " return [r.left + f.xaxis._offset + f.xaxis.l2p(3), r.top + f.yaxis._offset + f.yaxis.l2p(7)]; }")
    page.mouse.click(x, y)
    page.wait_for_function("() => window.location.search.includes('qb=7')")
    page.wait_for_function(
        "() => { const t = document.querySelector('#mk-fp-left-card .gtitle'); return t && t.textContent.includes('query block 7'); }")
    wait_changed(page, "mk-fp-right", before)
    assert "qorder=raster" in page.url
    assert "query block 7" not in title(page, "mk-fp-right") or "hilbert3d" in title(page, "mk-fp-right")
    assert console == []


def test_bad_files_give_banners_and_the_rest_stays_usable(page, app_url, console):
    # not HDF5: error banner, the default capture is shown instead
    page.goto(app_url + "/?file=runs/broken.h5")
    wait_drawn(page, "ov-recall")
    assert "broken.h5" in page.locator("#ov-file-banner").inner_text()
    assert "showing runs/good.h5 instead" in page.locator("#ov-file-banner").inner_text()
    assert "error" in page.locator("#ov-files").inner_text()
    # paths outside the root: refused, nothing of them is read
    for bad in ("runs/escape.h5", "runs/../secret/secret.h5", "/etc/passwd", "runs/%2e%2e/secret/secret.h5"):
        page.goto(app_url + "/masks?file=" + bad)
        wait_drawn(page, "mk-left")
        text = page.locator("#mk-file-banner").inner_text()
        assert "refused" in text or "not a served root" in text, text
        assert page.locator("#mk-file").inner_text() == "runs/good.h5"
    # an interrupted capture: warning, only its completed steps are offered
    page.goto(app_url + "/masks?file=runs/partial.h5")
    wait_drawn(page, "mk-left")
    assert "incomplete" in page.locator("#mk-link-banner").inner_text()
    page.locator("#mk-step").click()
    assert page.locator("[role=listbox] [role=option]").all_inner_texts() == ["0", "2"]
    page.keyboard.press("Escape")
    # a step whose maps are NaN: the callback's error becomes a banner; other steps still draw
    page.goto(app_url + "/masks?file=runs/damaged.h5&step=2")
    page.locator("#mk-banner .dfs-banner-error").wait_for(timeout=20000)
    assert "NaN" in page.locator("#mk-banner").inner_text()
    assert "damaged" in page.locator("#mk-link-banner").inner_text()
    choose(page, "mk-step", "3")
    page.wait_for_function("() => document.querySelectorAll('#mk-banner .dfs-banner-error').length === 0")
    wait_drawn(page, "mk-left")
    assert "R = " in title(page, "mk-left")
    no_traceback(page)
    assert console == []


def test_csv_download_holds_the_plotted_block_mass(page, app_url, capture_root, console):
    from dfsviz.capture.store import CaptureReader

    page.goto(app_url + "/masks?file=runs/good.h5&step=3&layer=1&head=1&method=dfs_tile&budget=0.2")
    wait_drawn(page, "mk-left")
    with page.expect_download() as info:
        page.locator("#mk-left-card .dfs-button").click()
    text = open(info.value.path(), encoding="utf-8").read()
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[1] == ["trace", "x", "y", "z"]
    cells = {(int(r[1]), int(r[2])): float(r[3]) for r in rows[2:] if r[0] == "log10 block mass"}
    with CaptureReader(capture_root / "good.h5") as reader:
        m = reader.block_stats(3, 1, "raster", 1).m[0, 0].double().numpy()
    assert len(cells) == m.size
    got = np.array([[cells[(v, u)] for v in range(m.shape[1])] for u in range(m.shape[0])])
    np.testing.assert_allclose(got, np.log10(np.maximum(m, 1e-6)), atol=1e-6)
    assert console == []


def test_live_run_reports_time_error_and_recall(page, app_url, console):
    page.goto(app_url + "/live?file=runs/good.h5&step=3&layer=1&order=hilbert3d&method=dfs_tile&budget=1.0")
    page.locator("#lv-run").click()
    page.locator("#lv-table").wait_for(timeout=60000)
    text = page.locator("#lv-table").inner_text()
    recall = float(re.search(r"recall R / density ρ\s+([0-9.]+) / ([0-9.]+)", text).group(1))
    error = float(re.search(r"relative L2 / max abs\)\s+([0-9.e+-]+)", text).group(1))
    # budget 1 keeps every block: DFSAttn is dense attention, recall 1 and float32-level error
    assert math.isclose(recall, 1.0, abs_tol=1e-5) and error < 1e-5
    assert "done" in page.locator("#lv-status").inner_text()
    assert console == []

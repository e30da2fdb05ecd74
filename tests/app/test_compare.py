"""Comparing two runs in a real browser: a second capture ("compare with") beside the first.

The served root holds two real captures of the tiny model: ``runs/a.h5`` (seed 0, steps 0, 2
and 3) and ``runs/b.h5`` (another seed, steps 0 and 2 only). On Masks the second run's maps
are drawn under the first with the same controls, equal to what the page draws for that run
alone; on Recall both runs' curves share one figure, the run in the legend. The choice is kept
in the address (``compare=``) and a deep link restores it; a selection the second run lacks
says so in one line while the first run still shows; an unknown id gives the file banner.
Every wait is on the condition checked.
"""

from __future__ import annotations

import re
import shutil

import pytest
from conftest import make_capture, save_tiny_wan

pytest.importorskip("playwright")
from playwright.sync_api import expect  # noqa: E402
from test_browser import choose, figure_json, title_of, wait_drawn  # noqa: E402

SLOW = 60_000


@pytest.fixture(scope="module")
def url(tmp_path_factory, capture_root, serve):
    base = tmp_path_factory.mktemp("compare")
    root = base / "runs"
    root.mkdir()
    shutil.copy(capture_root / "good.h5", root / "a.h5")
    make_capture(root / "b.h5", save_tiny_wan(base / "model"), seed=5, capture_steps=(0, 2))
    with serve(root) as address:
        yield address


def data_json(page, name: str) -> str:
    """The traces of figure ``name`` as drawn (its title left out)."""
    return page.evaluate(
        "n => { const g = document.querySelector('#' + n + '-card .js-plotly-plot');"
        " return g && g.data && g.data.length ? JSON.stringify(g.data) : ''; }", name)


def trace_names(page, name: str) -> list[str]:
    return page.evaluate(
        "n => document.querySelector('#' + n + '-card .js-plotly-plot').data.map(t => t.name)", name)


def test_masks_draws_the_second_run_beside_the_first(page, url, console):
    view = "step=2&layer=1&head=1&method=dfs_tile&budget=0.2"
    # what the page draws for run b alone
    page.goto(f"{url}/masks?file=runs/b.h5&{view}")
    alone = {}
    for side in ("left", "right"):
        wait_drawn(page, f"mk-{side}")
        alone[side] = data_json(page, f"mk-{side}")
    expect(page.locator("#mk-compare-section")).to_be_hidden()

    page.goto(f"{url}/masks?file=runs/a.h5&{view}")
    wait_drawn(page, "mk-left")
    first = data_json(page, "mk-left")
    choose(page, "mk-compare", "runs/b.h5")
    expect(page).to_have_url(re.compile(r"[?&]compare=runs/b\.h5(&|$)"))
    expect(page.locator("#mk-compare-section")).to_be_visible()
    for side in ("left", "right"):
        page.wait_for_function(
            "([n, e]) => { const g = document.querySelector('#' + n + '-card .js-plotly-plot');"
            " return g && g.data && JSON.stringify(g.data) === e; }", arg=[f"mk-cmp-{side}", alone[side]], timeout=SLOW)
        expect(title_of(page, f"mk-cmp-{side}")).to_contain_text("runs/b.h5")
    # the first run is still drawn, and differs from the second (another seed)
    assert data_json(page, "mk-left") == first != alone["left"]
    expect(page.locator("#mk-compare-heading")).to_contain_text("runs/b.h5")

    # a deep link restores the comparison
    link = page.url
    page.goto("about:blank")
    page.goto(link)
    expect(page.locator("#mk-compare")).to_have_text("runs/b.h5")
    page.wait_for_function(
        "e => { const g = document.querySelector('#mk-cmp-left-card .js-plotly-plot');"
        " return g && g.data && JSON.stringify(g.data) === e; }", arg=alone["left"], timeout=SLOW)

    # a step the second run lacks: one line says so, the first run still shows
    before = figure_json(page, "mk-left")
    choose(page, "mk-step", "3")
    expect(page.locator("#mk-compare-note")).to_contain_text(re.compile(r"runs/b\.h5 has no step 3 \(steps \[0, 2\]\)"),
                                                             timeout=SLOW)
    page.wait_for_function(
        "b => { const g = document.querySelector('#mk-left-card .js-plotly-plot');"
        " return g && g.data && g.data.length && JSON.stringify([g.data, g.layout.title]) !== b; }",
        arg=before, timeout=SLOW)
    expect(page.locator("#mk-cmp-left-card")).to_be_hidden()
    expect(page.locator(".dfs-banner-error")).to_have_count(0)
    assert console == []


def test_recall_overlays_both_runs_with_the_run_in_the_legend(page, url, console):
    page.goto(f"{url}/recall?file=runs/a.h5&step=2&layer=1&head=all&orders=raster&methods=dfs_tile")
    wait_drawn(page, "rc-curves")
    assert trace_names(page, "rc-curves") == ["dfs_tile · raster", "oracle · raster"]
    choose(page, "rc-compare", "runs/b.h5")
    expect(page).to_have_url(re.compile(r"[?&]compare=runs/b\.h5(&|$)"))
    expected = ["runs/a.h5 · dfs_tile · raster", "runs/b.h5 · dfs_tile · raster",
                "runs/a.h5 · oracle · raster", "runs/b.h5 · oracle · raster"]
    page.wait_for_function(
        "e => { const g = document.querySelector('#rc-curves-card .js-plotly-plot');"
        " return g && g.data && JSON.stringify(g.data.map(t => t.name)) === JSON.stringify(e); }",
        arg=expected, timeout=SLOW)
    # two different runs: their curves differ
    ys = page.evaluate("() => document.querySelector('#rc-curves-card .js-plotly-plot')._fullData.map(t => Array.from(t.y))")
    assert ys[0] != ys[1]
    table = page.locator("#rc-needed")
    for label in expected:
        expect(table).to_contain_text(label)

    # a deep link with a step the second run lacks: the note, and the first run's curves alone
    page.goto(f"{url}/recall?file=runs/a.h5&compare=runs/b.h5&step=3&layer=1&head=all&orders=raster&methods=dfs_tile")
    expect(page.locator("#rc-compare")).to_have_text("runs/b.h5")
    expect(page.locator("#rc-compare-note")).to_contain_text("runs/b.h5 has no step 3 (steps [0, 2])", timeout=SLOW)
    page.wait_for_function(
        "() => { const g = document.querySelector('#rc-curves-card .js-plotly-plot');"
        " return g && g.data && g.data.length === 2 && g.data[0].name === 'runs/a.h5 · dfs_tile · raster'; }",
        timeout=SLOW)
    # clearing the picker drops the comparison and the address forgets it
    page.locator("#rc-compare .dash-dropdown-clear").click()
    expect(page).not_to_have_url(re.compile("compare="))
    page.wait_for_function(
        "() => { const g = document.querySelector('#rc-curves-card .js-plotly-plot');"
        " return g && g.data && g.data.length === 2 && g.data[0].name === 'dfs_tile · raster'; }", timeout=SLOW)
    expect(page.locator("#rc-compare-note")).to_have_text("")
    assert console == []


@pytest.mark.parametrize("bad, why", [("runs/nope.h5", "does not exist"), ("../secret.h5", "refused|not a served root")])
def test_an_unknown_second_capture_gives_the_banner_and_the_page_stays_usable(page, url, console, bad, why):
    page.goto(f"{url}/masks?file=runs/a.h5&compare={bad}&step=2")
    banner = page.locator("#mk-file-banner")
    expect(banner).to_contain_text(re.compile(why))
    expect(banner).to_contain_text("no comparison shown")
    wait_drawn(page, "mk-left")
    expect(page.locator("#mk-compare-section")).to_be_hidden()
    expect(page.locator("#mk-compare")).not_to_contain_text("runs/")


@pytest.mark.parametrize("path, prefix", [("/", "ov"), ("/theory", "th"), ("/drift", "dr"), ("/calibrate", "cb"),
                                          ("/video", "vd")])
def test_pages_that_do_not_compare_offer_no_second_picker_and_say_so(page, url, path, prefix):
    page.goto(f"{url}{path}?file=runs/a.h5")
    expect(page.locator(f"#{prefix}-file")).to_be_visible()
    expect(page.locator(f"#{prefix}-compare")).to_have_count(0)

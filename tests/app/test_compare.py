"""Comparing two runs in a real browser: a second capture ("compare with") beside the first.

The served root holds two real captures of the tiny model: ``runs/a.h5`` (seed 0, steps 0, 2
and 3, three scoring methods) and ``runs/b.h5`` (another seed, steps 0 and 2 only, without
the antidiagonal method); a second root holds two captures of the embedded model with their
clips (``clips/a.h5`` steps 0 and 1, ``clips/b.h5`` another seed, step 1 only). On every page
that shows a capture the second run is drawn with the same controls and equals what the page
draws for that run alone: maps, plans and clips in a row under the first run's (Masks, Drift,
Calibrate, Video, Overview's recall grid), curves and points in the first run's figures with
the run in the legend (Recall, Overview's schedule, Theory). The choice is kept in the address
(``compare=``) and a deep link restores it; a selection the second run lacks says so in one
line while the first run still shows; an unknown id gives the file banner; Live offers no
second picker. Every wait is on the condition checked.
"""

from __future__ import annotations

import re
import shutil

import pytest
from app_captures import CAPTURE, make_capture, save_tiny_wan

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
    make_capture(root / "b.h5", save_tiny_wan(base / "model"), seed=5, capture_steps=(0, 2),
                 methods=tuple(m for m in CAPTURE["methods"] if m != "antidiagonal"))
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


def test_live_offers_no_second_picker(page, url):
    page.goto(f"{url}/live?file=runs/a.h5")
    expect(page.locator("#lv-file")).to_be_visible()
    expect(page.locator("#lv-compare")).to_have_count(0)


# --------------------------------------------------------------------------- the other pages
def traces(page, name: str) -> dict[str, str]:
    """The traces of figure ``name`` as drawn: legend name -> JSON of its x, y and z."""
    return page.evaluate(
        "n => Object.fromEntries(document.querySelector('#' + n + '-card .js-plotly-plot').data"
        ".map(t => [t.name, JSON.stringify([t.x, t.y, t.z])]))", name)


def wait_traces(page, name: str, expected: dict[str, str]) -> None:
    """Wait until figure ``name`` draws exactly the traces ``expected`` (a :func:`traces`)."""
    page.wait_for_function(
        "([n, e]) => { const g = document.querySelector('#' + n + '-card .js-plotly-plot');"
        " if (!g || !g.data) return false;"
        " const got = Object.fromEntries(g.data.map(t => [t.name, JSON.stringify([t.x, t.y, t.z])]));"
        " return JSON.stringify(Object.keys(got).sort()) === JSON.stringify(Object.keys(e).sort())"
        "   && Object.keys(e).every(k => got[k] === e[k]); }", arg=[name, expected], timeout=SLOW)


def wait_data(page, name: str, expected: str) -> None:
    """Wait until figure ``name`` draws exactly the traces ``expected`` (a :func:`data_json`)."""
    page.wait_for_function(
        "([n, e]) => { const g = document.querySelector('#' + n + '-card .js-plotly-plot');"
        " return g && g.data && JSON.stringify(g.data) === e; }", arg=[name, expected], timeout=SLOW)


def alone(page, address: str, names: tuple[str, ...]) -> dict[str, str]:
    """What the page at ``address`` (one capture) draws in figures ``names`` (a :func:`data_json` each)."""
    page.goto(address)
    drawn = {}
    for name in names:
        wait_drawn(page, name, timeout=SLOW)
        drawn[name] = data_json(page, name)
    return drawn


def headed(drawn: dict[str, str], run: str) -> dict[str, str]:
    """:func:`traces` of one run as a comparison names them: each legend entry headed by its run."""
    return {f"{run} · {name}": value for name, value in drawn.items()}


def says_what_it_lacks(page, prefix: str, line, hidden: str) -> None:
    """The page says in one line what the second run lacks (``line``, a text or a pattern), hides
    its figure ``hidden`` and shows no error."""
    expect(page.locator(f"#{prefix}-compare-note")).to_contain_text(line)
    expect(page.locator(f"#{hidden}-card")).to_be_hidden()
    expect(page.locator(".dfs-banner-error")).to_have_count(0)


def test_drift_draws_the_second_run_under_the_first(page, url, console):
    view = "layer=1&head=all&order=hilbert3d&method=dfs_tile&budget=0.2"
    second = alone(page, f"{url}/drift?file=runs/b.h5&{view}", ("dr-recall", "dr-jaccard"))
    second_table = page.locator("#dr-lag-table").text_content()
    expect(page.locator("#dr-compare-section")).to_be_hidden()

    page.goto(f"{url}/drift?file=runs/a.h5&{view}")
    wait_drawn(page, "dr-recall", timeout=SLOW)
    first = data_json(page, "dr-recall")
    choose(page, "dr-compare", "runs/b.h5")
    expect(page).to_have_url(re.compile(r"[?&]compare=runs/b\.h5(&|$)"))
    for name in ("recall", "jaccard"):
        wait_data(page, f"dr-cmp-{name}", second[f"dr-{name}"])
        expect(title_of(page, f"dr-cmp-{name}")).to_contain_text("runs/b.h5")
    expect(page.locator("#dr-cmp-lag-table")).to_have_text(second_table)
    assert data_json(page, "dr-recall") == first != second["dr-recall"]

    # a deep link restores it; a method the second run lacks: the line, the first run alone
    page.goto("about:blank")
    page.goto(f"{url}/drift?file=runs/a.h5&compare=runs/b.h5&{view.replace('dfs_tile', 'antidiagonal')}")
    expect(page.locator("#dr-compare")).to_have_text("runs/b.h5")
    says_what_it_lacks(page, "dr", re.compile(r"runs/b\.h5 has no method antidiagonal \(methods \[.*\]\): "
                                              r"nothing drawn for it here"), "dr-cmp-recall")
    wait_drawn(page, "dr-recall", timeout=SLOW)
    assert console == []


def test_overview_replays_the_schedule_on_both_runs(page, url, console):
    view = "order=hilbert3d&method=dfs_tile&budget=0.2&skip=0&interval=1&gamma0=0.3&decrement=0.1"
    page.goto(f"{url}/?file=runs/b.h5&{view}")
    wait_drawn(page, "ov-recall", timeout=SLOW)
    grid = data_json(page, "ov-recall")
    wait_drawn(page, "ov-schedule", timeout=SLOW)
    schedule = traces(page, "ov-schedule")
    series = {k: v for k, v in schedule.items() if k not in ("budget γ", "refresh")}
    assert len(series) == 3

    page.goto(f"{url}/?file=runs/a.h5&compare=runs/b.h5&{view}")
    expect(page.locator("#ov-compare")).to_have_text("runs/b.h5")
    wait_data(page, "ov-cmp-recall", grid)
    expect(title_of(page, "ov-cmp-recall")).to_contain_text("runs/b.h5")
    page.wait_for_function(
        "() => { const g = document.querySelector('#ov-schedule-card .js-plotly-plot');"
        " return g && g.data && g.data.length === 8; }", timeout=SLOW)
    both = traces(page, "ov-schedule")
    assert {k: both[k] for k in headed(series, "runs/b.h5")} == headed(series, "runs/b.h5")
    assert sorted(both) == sorted(["budget γ", "refresh", *headed(series, "runs/a.h5"), *headed(series, "runs/b.h5")])
    assert both["runs/a.h5 · recall, cached mask"] != both["runs/b.h5 · recall, cached mask"]
    assert data_json(page, "ov-recall") != grid

    # a method the second run lacks: the line, the first run's curves alone
    choose(page, "ov-method", "antidiagonal")
    says_what_it_lacks(page, "ov", "runs/b.h5 has no method antidiagonal", "ov-cmp-recall")
    page.wait_for_function(
        "() => { const g = document.querySelector('#ov-schedule-card .js-plotly-plot');"
        " return g && g.data && g.data.length === 5"
        " && g.data.slice(2).every(t => t.name.startsWith('runs/a.h5 · ')); }",
        timeout=SLOW)
    assert console == []


def test_theory_draws_both_runs_in_every_figure(page, url, console):
    view = "step=2&layer=1&method=dfs_tile&budget=0.2&orders=raster,hilbert3d&kind=violin"
    names = ("th-bound2", "th-gap", "th-dist-gap", "th-dist-W")
    page.goto(f"{url}/theory?file=runs/b.h5&{view}")
    second = {}
    for name in names:
        wait_drawn(page, name, timeout=SLOW)
        second[name] = {k: v for k, v in traces(page, name).items() if k in
                        ("raster", "hilbert3d", "W_q · raster", "W_k · hilbert3d")}
        assert second[name]

    page.goto(f"{url}/theory?file=runs/a.h5&compare=runs/b.h5&{view}")
    expect(page.locator("#th-compare")).to_have_text("runs/b.h5")
    for name in names:
        page.wait_for_function(
            "n => { const g = document.querySelector('#' + n + '-card .js-plotly-plot');"
            " return g && g.data && g.data.some(t => (t.name || '').startsWith('runs/b.h5 · ')); }", arg=name,
            timeout=SLOW)
        drawn = traces(page, name)
        assert {k: drawn[k] for k in headed(second[name], "runs/b.h5")} == headed(second[name], "runs/b.h5")
        assert any(k.startswith("runs/a.h5 · ") for k in drawn)
    expect(page.locator("#th-summary")).to_contain_text("runs/b.h5 · ")

    # a step the second run lacks: the line, the first run's points alone
    choose(page, "th-step", "3")
    expect(page.locator("#th-compare-note")).to_contain_text("runs/b.h5 has no step 3 (steps [0, 2])")
    page.wait_for_function(
        "() => { const g = document.querySelector('#th-bound2-card .js-plotly-plot');"
        " const named = g && g.data ? g.data.filter(t => t.name && t.name.includes(' · ')) : [];"
        " return named.length > 0 && named.every(t => t.name.startsWith('runs/a.h5 · ')); }", timeout=SLOW)
    expect(page.locator(".dfs-banner-error")).to_have_count(0)
    assert console == []


def test_calibrate_draws_the_second_plan_under_the_first(page, url, console):
    # the tiny random-weight model keeps no target recall 0.9 (see test_browser.PAGES)
    view = "target_recall=0.7&order=hilbert3d"
    names = ("cb-gamma", "cb-drift", "cb-candidates")
    second = alone(page, f"{url}/calibrate?file=runs/b.h5&{view}", names)
    expect(page.locator("#cb-summary-table")).to_be_visible()

    page.goto(f"{url}/calibrate?file=runs/a.h5&compare=runs/b.h5&{view}")
    expect(page.locator("#cb-compare")).to_have_text("runs/b.h5")
    for name in names:
        wait_data(page, name.replace("cb-", "cb-cmp-"), second[name])
    expect(title_of(page, "cb-cmp-gamma")).to_contain_text("runs/b.h5")
    expect(page.locator("#cb-cmp-summary-table")).to_contain_text("predicted recall")
    wait_drawn(page, "cb-gamma", timeout=SLOW)
    assert data_json(page, "cb-gamma") != second["cb-gamma"]

    # a scoring method the second run lacks: the line, the first run's plan alone
    choose(page, "cb-method", "antidiagonal")
    says_what_it_lacks(page, "cb", "runs/b.h5 has no method antidiagonal", "cb-cmp-gamma")
    expect(title_of(page, "cb-gamma")).to_contain_text("antidiagonal")
    assert console == []


@pytest.fixture(scope="module")
def clips_url(tmp_path_factory, serve):
    """Two captures of the embedded model with their clips: clips/a.h5 (steps 0 and 1) and
    clips/b.h5 (another seed, step 1 only); layer 0's Q/K stored, so every query block shows."""
    from dfsviz.capture import CaptureConfig, run_capture

    root = tmp_path_factory.mktemp("compare-clips") / "clips"
    root.mkdir()
    for name, seed, steps in (("a.h5", 0, (0, 1)), ("b.h5", 3, (1,))):
        run_capture(CaptureConfig(out=str(root / name), model=None, num_steps=2, capture_steps=steps, layers=(0, 3),
                                  save_qkv=(0,), seed=seed, device="cpu"), progress=False)
    with serve(root) as address:
        yield address


def test_video_draws_the_second_clip_under_the_first(page, clips_url, console):
    view = "step=1&layer=0&head=0&method=dfs_tile&budget=0.2&qb=5"
    second = alone(page, f"{clips_url}/video?file=clips/b.h5&{view}", ("vd-video",))["vd-video"]

    page.goto(f"{clips_url}/video?file=clips/a.h5&compare=clips/b.h5&{view}")
    expect(page.locator("#vd-compare")).to_have_text("clips/b.h5")
    wait_data(page, "vd-cmp-video", second)
    expect(title_of(page, "vd-cmp-video")).to_contain_text("clips/b.h5")
    expect(page.locator("#vd-cmp-note")).to_contain_text("raster query block 5")
    wait_drawn(page, "vd-video", timeout=SLOW)
    assert data_json(page, "vd-video") != second
    # play moves both clips
    page.locator("#vd-play").click()
    for card in ("vd-video", "vd-cmp-video"):
        page.wait_for_function(f"() => document.querySelector('#{card}-card .js-plotly-plot')"
                               "._fullLayout.sliders[0].active >= 1", timeout=SLOW)
    page.locator("#vd-pause").click()

    # a step the second run lacks: the line, the first run's clip alone
    choose(page, "vd-step", "0")
    says_what_it_lacks(page, "vd", "clips/b.h5 has no step 0 (steps [1])", "vd-cmp-video")
    expect(title_of(page, "vd-video")).to_contain_text("step 0")
    assert console == []

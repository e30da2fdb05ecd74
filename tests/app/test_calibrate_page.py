"""The Calibrate page in a real headless browser (Playwright on Debian's /usr/bin/chromium),
on the shipped sample capture: a change of the target redraws the budgets, the downloaded
config is the file ``dfsviz calibrate`` writes for the same settings, a deep link restores
every setting, and a refused calibration shows a banner, never a traceback.

The served roots are the sample's own folder (``captures/``, as ``dfsviz app`` serves it)
and a folder holding a capture of one step (``refusals/``). Every wait is on the condition
the test then checks (``expect`` or a wait for the figure drawn or changed), never a sleep.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest

import dfsviz
from dfsviz.accel.plan import CalibratedPlan
from dfsviz.analysis.calibrate import CalibrationConfig, calibrate

pytest.importorskip("playwright")
from playwright.sync_api import expect  # noqa: E402
from test_browser import choose, figure_json, no_traceback, wait_changed, wait_drawn, wait_equal  # noqa: E402

SAMPLE = "captures/tiny-wan-sample.h5"
ONE_STEP = Path(__file__).resolve().parents[1] / "data" / "format_v1.h5"  # a capture of one step
FIGURES = ("cb-gamma", "cb-recall", "cb-density", "cb-drift", "cb-methods", "cb-candidates")
# Calibration runs in the callback: seconds on a quiet 2-core CPU, several times that under load.
SLOW = 120_000


@pytest.fixture(scope="module")
def refusals(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("calibrate-app") / "refusals"
    folder.mkdir()
    shutil.copy(ONE_STEP, folder / "one-step.h5")
    return folder


@pytest.fixture(scope="module")
def url(refusals, serve):
    """The dashboard over the sample's folder and ``refusals``."""
    with serve([dfsviz.sample_capture().parent, refusals]) as address:
        yield address


def heatmap_values(page, name: str) -> list[list[float]]:
    """The z of the first trace of figure ``name`` as drawn (NaN where no value)."""
    rows = page.evaluate(
        "n => { const g = document.querySelector('#' + n + '-card .js-plotly-plot');"
        " return g._fullData[0].z.map(r => Array.from(r, v => (v === null || Number.isNaN(v)) ? null : v)); }", name)
    return [[math.nan if v is None else v for v in row] for row in rows]


def summary_row(page, name: str):
    """The row of the chosen-plan table whose first cell is ``name`` (a locator)."""
    first = page.locator("td:first-child", has_text=re.compile(f"^{re.escape(name)}$"))
    return page.locator("#cb-summary-table tr").filter(has=first)


def gammas(plan: CalibratedPlan) -> list[list[float]]:
    return [[math.nan if g is None else g for g in lb.gamma] for lb in plan.layers]


def same(a: list[list[float]], b: list[list[float]]) -> bool:
    return len(a) == len(b) and all(
        len(x) == len(y) and all((math.isnan(u) and math.isnan(v)) or math.isclose(u, v, rel_tol=1e-12)
                                 for u, v in zip(x, y)) for x, y in zip(a, b))


def test_target_change_redraws_and_the_download_is_the_cli_file(page, url, console, artifacts, tmp_path):
    page.goto(url + "/calibrate?file=" + SAMPLE)
    for n in FIGURES:
        wait_drawn(page, n, timeout=SLOW)
    expect(page.locator("#cb-summary")).to_be_visible()
    expect(page).to_have_url(re.compile(r"target_recall=0\.9\b"))
    page.screenshot(path=str(artifacts / "calibrate_sample.png"), full_page=True)  # docs/img/dashboard_calibrate.png
    before = figure_json(page, "cb-gamma")
    choose(page, "cb-target", "0.8")
    expect(page).to_have_url(re.compile(r"target_recall=0\.8\b"))
    wait_changed(page, "cb-gamma", before, timeout=SLOW)

    reference = calibrate(dfsviz.sample_capture(), CalibrationConfig(target_recall=0.8))
    assert same(heatmap_values(page, "cb-gamma"), gammas(reference.plan))
    expect(summary_row(page, "scoring method")).to_contain_text(reference.plan.method)
    expect(page.locator("#cb-download-button")).to_be_enabled()
    with page.expect_download() as info:
        page.locator("#cb-download-button").click()
    download = info.value
    assert download.suggested_filename == "dfsattn.json"
    got_text = Path(download.path()).read_text(encoding="utf-8")
    want_text = reference.save(tmp_path / "dfsattn.json").read_text(encoding="utf-8")
    got, want = json.loads(got_text), json.loads(want_text)
    # what differs between two runs of `dfsviz calibrate` (time of writing, wall time), and the
    # capture's path, which the dashboard gives as its id (the path `dfsviz calibrate` records
    # when run in the folder above the root), never as a path of the server
    assert got["provenance"]["captures"][0]["path"] == SAMPLE
    volatile = {"created_utc": (want["created_utc"], got["created_utc"]),
                "seconds": (want["provenance"]["seconds"], got["provenance"]["seconds"]),
                "path": (want["provenance"]["captures"][0]["path"], SAMPLE)}
    for key, (old, new) in volatile.items():
        want_text = want_text.replace(f'"{key}": {json.dumps(old)}', f'"{key}": {json.dumps(new)}', 1)
    for doc in (got, want):
        doc.pop("created_utc")
        doc["provenance"].pop("seconds")
        doc["provenance"]["captures"][0].pop("path")
    assert got == want  # field for field first: a readable diff
    assert got_text == want_text  # then byte for byte
    CalibratedPlan.load(download.path())  # and apply_dfsattn reads it
    no_traceback(page)
    assert console == []


def test_deep_link_restores_every_setting(page, url, console, context):
    link = (f"/calibrate?file={SAMPLE}&goal=max_density&target_recall=0.95&max_density=0.5&order=hilbert3d"
            "&method=dfs_tile&branch=cond&warmup=6&interval=4&dense_above=0.9&refresh_cost=0.09")
    page.goto(url + link)
    for control, shown in (("target", "0.95"), ("density", "0.5"), ("order", "hilbert3d"), ("method", "dfs_tile"),
                           ("branch", "cond"), ("warmup", "6"), ("interval", "4"), ("dense-above", "0.9"),
                           ("refresh-cost", "0.09")):
        expect(page.locator(f"#cb-{control}")).to_have_text(shown)
    expect(page.locator("#cb-goal input[value=max_density]")).to_be_checked()
    # the target applies only to the other goal: it is there (in the link), but not in use
    expect(page.locator("#cb-target")).to_be_disabled()
    expect(page.locator("#cb-dense-above")).to_be_disabled()
    expect(page.locator("#cb-density")).to_be_enabled()
    for n in FIGURES:
        wait_drawn(page, n, timeout=SLOW)
    reference = calibrate(dfsviz.sample_capture(), CalibrationConfig(
        max_density=0.5, order="hilbert3d", method="dfs_tile", warmup_steps=6, interval=4, dense_above=0.9,
        refresh_cost=0.09))
    expect(summary_row(page, "warm-up")).to_contain_text("6 of 20 steps dense")
    expect(summary_row(page, "refresh interval")).to_contain_text("every 4 steps")
    expect(summary_row(page, "attention work")).to_contain_text(
        f"{reference.plan.predicted['attention_work']:.3f} of dense attention")
    assert same(heatmap_values(page, "cb-gamma"), gammas(reference.plan))
    # every setting is in the address bar, and that link reproduces the view in a fresh tab
    for key in ("goal=max_density", "max_density=0.5", "method=dfs_tile", "warmup=6", "interval=4",
                "dense_above=0.9", "refresh_cost=0.09"):
        expect(page).to_have_url(re.compile(re.escape(key)))
    shown = {n: figure_json(page, n) for n in FIGURES}
    fresh = context.new_page()
    fresh.goto(page.url)
    for n, expected in shown.items():
        wait_equal(fresh, n, expected, timeout=SLOW)
    assert console == []


def test_a_refused_calibration_shows_a_banner(page, url, refusals, console):
    page.goto(url + "/calibrate?file=refusals/one-step.h5")
    banner = page.locator("#cb-banner")
    expect(banner).to_contain_text("needs at least two captured steps for drift", timeout=SLOW)
    expect(banner).to_contain_text("refusals/one-step.h5")
    assert str(refusals.parent) not in banner.inner_text()
    expect(page.locator("#cb-download-button")).to_be_disabled()
    expect(page.locator("#cb-gamma-card .gtitle, #cb-gamma-card .annotation-text").first).to_contain_text("no data")
    no_traceback(page)
    # a budget no plan fits, on a capture that calibrates: refused, then the page recovers
    page.goto(url + f"/calibrate?file={SAMPLE}&goal=max_density&max_density=0.01")
    expect(banner).to_contain_text("max density 0.01 cannot be met", timeout=SLOW)
    expect(page.locator("#cb-download-button")).to_be_disabled()
    choose(page, "cb-density", "0.5")
    expect(page.locator("#cb-banner .dfs-banner-error")).to_have_count(0, timeout=SLOW)
    wait_drawn(page, "cb-gamma", timeout=SLOW)
    expect(page.locator("#cb-download-button")).to_be_enabled()
    no_traceback(page)
    assert console == []

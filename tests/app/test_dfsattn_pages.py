"""The masks DFSAttn used, on the dashboard, in a real browser: Overview's "DFSAttn as run" and
Drift's "DFSAttn (used)" on real recordings of the tiny Wan pipeline with ``apply_dfsattn``
active (``app_captures.record_dfsattn``).

The served root holds ``runs/sparse.h5`` (4 steps: step 0 dense, a refresh at steps 1 and 3,
step 2 on the cached mask), ``runs/other.h5`` (another seed, a refresh at every sparse step)
and ``runs/dense.h5`` (a capture without DFSAttn). The numbers shown equal those computed here
from the file through ``dfsviz.open`` (``dfsattn_recall``, the density of ``dfsattn_mask``,
``dfsattn_kept``); a capture without DFSAttn's masks shows none of it. Every wait is on the
condition checked.
"""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
from app_captures import record_dfsattn

import dfsviz

pytest.importorskip("playwright")
from playwright.sync_api import expect  # noqa: E402
from test_browser import choose, title_of, wait_drawn  # noqa: E402

SLOW = 60_000
# what the schedule of runs/sparse.h5 does at its steps 0 .. 3 (warm-up 1, interval 2)
SPARSE_PLANS = ["dense", "refresh", "cached", "refresh"]


@pytest.fixture(scope="module")
def root(tmp_path_factory, capture_root):
    root = tmp_path_factory.mktemp("dfsattn") / "runs"
    root.mkdir()
    record_dfsattn(root / "sparse.h5")
    record_dfsattn(root / "other.h5", interval=1, gamma0=0.5, seed=3)
    shutil.copy(capture_root / "good.h5", root / "dense.h5")
    return root


@pytest.fixture(scope="module")
def url(root, serve):
    with serve(root) as address:
        yield address


def used(path) -> dict[str, np.ndarray]:
    """Per step of the recording at ``path``: the recall and density of the masks DFSAttn
    attended (cond branch), over every layer and head, from the file."""
    with dfsviz.open(path) as run:
        recall = np.array([[run.dfsattn_recall(s, layer).numpy().ravel() for layer in run.layers] for s in run.steps])
        density = np.array([[run.dfsattn_mask(s, layer).density().numpy().ravel() for layer in run.layers]
                            for s in run.steps])
        steps = run.steps
    recall, density = recall.reshape(len(steps), -1), density.reshape(len(steps), -1)
    return {"steps": np.array(steps), "recall, mean": recall.mean(1), "recall, lowest": recall.min(1),
            "recall, highest": recall.max(1), "density, mean": density.mean(1)}


def traces(page, name: str) -> dict[str, list]:
    """Trace name -> y values of figure ``name`` as drawn."""
    return page.evaluate(
        "n => Object.fromEntries(document.querySelector('#' + n + '-card .js-plotly-plot')._fullData"
        ".map(t => [t.name, Array.from(t.y)]))", name)


def table_rows(page, table_id: str) -> list[list[str]]:
    return page.evaluate(
        "id => Array.from(document.querySelectorAll('#' + id + ' tr')).slice(1)"
        ".map(r => Array.from(r.cells).map(c => c.innerText))", table_id)


def assert_shows(page, name: str, table_id: str, want: dict) -> None:
    drawn = traces(page, name)
    for key in ("recall, mean", "recall, lowest", "recall, highest", "density, mean"):
        np.testing.assert_allclose(drawn[key], want[key], rtol=1e-12, err_msg=key)
    rows = table_rows(page, table_id)
    assert [int(r[0]) for r in rows] == want["steps"].tolist()
    for col, key in [(3, "recall, mean"), (4, "recall, lowest"), (5, "recall, highest"), (6, "density, mean")]:
        np.testing.assert_allclose([float(r[col]) for r in rows], want[key], rtol=1e-3, err_msg=key)


def test_overview_shows_the_recall_and_density_of_the_masks_dfsattn_used(page, url, root, console):
    want = used(root / "sparse.h5")
    page.goto(f"{url}/?file=runs/sparse.h5")
    wait_drawn(page, "ov-dfsattn")
    wait_drawn(page, "ov-schedule")
    expect(title_of(page, "ov-dfsattn")).to_contain_text("DFSAttn as run")
    assert_shows(page, "ov-dfsattn", "ov-dfsattn-table", want)
    rows = table_rows(page, "ov-dfsattn-table")
    assert [r[1] for r in rows] == SPARSE_PLANS
    # the budget as run: none at the dense step, gamma0 = 0.4 from the first refresh, 0.3 after the next
    assert [r[2] for r in rows] == ["", "0.4", "0.4", "0.3"]
    # the cached step attended the refreshed step's mask: the same density
    assert want["density, mean"][2] == want["density, mean"][1] < want["density, mean"][0] == 1.0
    # the figure marks the refreshes where DFSAttn made its masks
    refreshes = page.evaluate("() => Array.from(document.querySelector('#ov-dfsattn-card .js-plotly-plot')"
                              "._fullData.find(t => t.name === 'refresh').x)")
    assert refreshes == [1, 3]
    assert console == []


def test_overview_compares_what_dfsattn_did_in_two_runs(page, url, root, console):
    want = used(root / "other.h5")
    page.goto(f"{url}/?file=runs/other.h5")
    wait_drawn(page, "ov-dfsattn")
    alone = traces(page, "ov-dfsattn")
    page.goto(f"{url}/?file=runs/sparse.h5")
    wait_drawn(page, "ov-dfsattn")
    expect(page.locator("#ov-dfsattn-compare-section")).to_be_hidden()
    choose(page, "ov-compare", "runs/other.h5")
    expect(page).to_have_url(re.compile(r"[?&]compare=runs/other\.h5(&|$)"))
    expect(page.locator("#ov-dfsattn-compare-section")).to_be_visible()
    expect(title_of(page, "ov-cmp-dfsattn")).to_contain_text("runs/other.h5 · DFSAttn as run", timeout=SLOW)
    assert traces(page, "ov-cmp-dfsattn") == alone
    assert_shows(page, "ov-cmp-dfsattn", "ov-cmp-dfsattn-table", want)
    assert [r[1] for r in table_rows(page, "ov-cmp-dfsattn-table")] == ["dense", "refresh", "refresh", "refresh"]

    # a second run recorded without DFSAttn: one line says so, the first run's part still shows
    choose(page, "ov-compare", "runs/dense.h5")
    expect(page.locator("#ov-dfsattn-compare-note")).to_contain_text(
        "runs/dense.h5 holds no DFSAttn masks", timeout=SLOW)
    expect(page.locator("#ov-cmp-dfsattn-card")).to_be_hidden()
    expect(page.locator("#ov-dfsattn-card")).to_be_visible()
    expect(page.locator(".dfs-banner-error")).to_have_count(0)
    assert console == []


def test_a_capture_without_dfsattn_masks_shows_none_of_it(page, url, console):
    page.goto(f"{url}/?file=runs/dense.h5&compare=runs/sparse.h5")
    wait_drawn(page, "ov-schedule")
    wait_drawn(page, "ov-cmp-recall")
    for part in ("#ov-dfsattn-card", "#ov-dfsattn-part"):
        expect(page.locator(part)).to_be_hidden()
    expect(page.locator("body")).not_to_contain_text("DFSAttn as run")
    expect(page.locator("body")).not_to_contain_text("holds no DFSAttn masks")
    page.goto(f"{url}/drift?file=runs/dense.h5")
    wait_drawn(page, "dr-jaccard")
    page.locator("#dr-method").click()
    expect(page.locator("[role=listbox] [role=option]").filter(has_text="dfs_tile")).to_have_count(1)
    expect(page.locator("[role=listbox] [role=option]").filter(has_text="DFSAttn")).to_have_count(0)
    assert console == []


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over heads and query blocks (12 blocks of 16 tokens: equal weights) of |a ∩ b| / |a ∪ b|."""
    return float(((a & b).sum(-1) / (a | b).sum(-1)).mean())


def test_drift_of_the_masks_dfsattn_used(page, url, root, console):
    with dfsviz.open(root / "sparse.h5") as run:
        kept = [run.dfsattn_kept(s, 1).numpy()[0] for s in run.steps]
    want = np.array([[jaccard(a, b) for b in kept] for a in kept])
    # the cached step attended its refresh's mask; the dense step attends every block
    assert want[1, 2] == 1.0 and want[0, 1] == pytest.approx(kept[1].mean())
    page.goto(f"{url}/drift?file=runs/sparse.h5&layer=1")
    wait_drawn(page, "dr-jaccard")
    choose(page, "dr-method", "DFSAttn (used)")
    expect(page).to_have_url(re.compile(r"[?&]method=dfsattn_used(&|$)"))
    expect(title_of(page, "dr-jaccard")).to_contain_text("DFSAttn (used)", timeout=SLOW)
    z = page.evaluate("() => document.querySelector('#dr-jaccard-card .js-plotly-plot')._fullData[0].z"
                      ".map(r => Array.from(r))")
    np.testing.assert_allclose(np.array(z, dtype=float), want, rtol=1e-12)
    # the budget does not apply to masks DFSAttn chose itself
    expect(page.locator("#dr-budget")).to_be_disabled()
    expect(page.locator("#dr-order")).to_be_disabled()

    # a second run without DFSAttn's masks: one line, the first run still shows
    choose(page, "dr-compare", "runs/dense.h5")
    expect(page.locator("#dr-compare-note")).to_contain_text("runs/dense.h5 has no method dfsattn_used", timeout=SLOW)
    expect(page.locator("#dr-jaccard-card")).to_be_visible()
    assert console == []

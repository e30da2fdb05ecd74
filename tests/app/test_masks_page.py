"""The Masks page's footprints on the shipped sample (9 latent frames of 18 x 32 tokens), in a
real browser: every frame drawn, the figure inside its card, the row whose footprint is shown
marked on both maps, and no claim of a click before one. Waits are on the checked condition."""

from __future__ import annotations

import re

import numpy as np
import pytest

import dfsviz

pytest.importorskip("playwright")
from playwright.sync_api import expect  # noqa: E402
from test_browser import title_of, wait_drawn  # noqa: E402

SAMPLE = "captures/" + dfsviz.sample_capture().name


@pytest.fixture(scope="module")
def url(serve):
    with serve([dfsviz.sample_capture().parent]) as address:
        yield address


def drawn_frames(page, name: str) -> tuple[list[str], int]:
    """(frame labels, finite cells of the attention heatmap) of footprint figure ``name``."""
    return page.evaluate(
        "n => { const g = document.querySelector('#' + n + '-card .js-plotly-plot');"
        " const z = g._fullData.find(t => t.type === 'heatmap').z;"
        " let cells = 0; for (const row of z) for (const v of row) if (v !== null && Number.isFinite(v)) cells++;"
        " return [g.layout.annotations.map(a => a.text), cells]; }", name)


def marked_rows(page, name: str) -> list[float]:
    """The rows marked by query-row shapes on map ``name`` (shape centres)."""
    return page.evaluate(
        "n => ((document.querySelector('#' + n + '-card .js-plotly-plot').layout.shapes) || [])"
        ".filter(s => s.name.startsWith('query block')).map(s => (s.y0 + s.y1) / 2)", name)


def shown_block(page, name: str) -> int:
    return int(re.search(r"query block (\d+)", title_of(page, name).text_content()).group(1))


def wait_marked(page, name: str, row: int) -> None:
    page.wait_for_function(
        "([n, r]) => { const g = document.querySelector('#' + n + '-card .js-plotly-plot');"
        " const s = g && g.layout && (g.layout.shapes || []).filter(s => s.name.startsWith('query block'));"
        " return !!s && s.length === 1 && (s[0].y0 + s[0].y1) / 2 === r; }",
        arg=[name, row], timeout=30000)


def test_footprints_draw_every_frame_inside_their_card_and_mark_their_rows(page, url, console):
    with dfsviz.open(dfsviz.sample_capture()) as reader:
        grid = reader.grid
    page.goto(f"{url}/masks?file={SAMPLE}&step=13&layer=1&head=1")
    for n in ("mk-fp-left", "mk-fp-right"):
        wait_drawn(page, n)
        assert drawn_frames(page, n) == [[f"frame {f}" for f in range(grid.frames)], grid.num_video]
        card = page.locator(f"#{n}-card").bounding_box()
        plot = page.locator(f"#{n}-card .main-svg").first.bounding_box()
        assert plot["y"] + plot["height"] <= card["y"] + card["height"] + 1, (plot, card)
        assert plot["x"] + plot["width"] <= card["x"] + card["width"] + 1, (plot, card)
    # before a click: what is shown, and no claim of a click
    note = page.locator("#mk-fp-note")
    expect(note).to_contain_text("click a row of either map")
    expect(note).not_to_contain_text("Clicked")
    for side in ("left", "right"):
        wait_marked(page, f"mk-{side}", shown_block(page, f"mk-fp-{side}"))
    # a click on row 7 of the raster map moves both markers to the rows the footprints show
    x, y = page.evaluate(
        "() => { const g = document.querySelector('#mk-left-card .js-plotly-plot'); const f = g._fullLayout;"
        " const r = g.getBoundingClientRect();"
        " return [r.left + f.xaxis._offset + f.xaxis.l2p(3), r.top + f.yaxis._offset + f.yaxis.l2p(7)]; }")
    page.mouse.click(x, y)
    expect(note).to_contain_text("Clicked: raster query block 7")
    expect(title_of(page, "mk-fp-left")).to_contain_text("raster · query block 7")
    wait_marked(page, "mk-left", 7)
    wait_marked(page, "mk-right", shown_block(page, "mk-fp-right"))
    assert marked_rows(page, "mk-left") == [7]
    assert console == []


def test_query_row_shape_outlines_one_row_and_names_bad_arguments():
    from dfsviz.figures import query_row_shape

    shape = query_row_shape(3, 10)
    assert (shape["x0"], shape["x1"], shape["y0"], shape["y1"]) == (-0.5, 9.5, 2.5, 3.5)
    with pytest.raises(ValueError, match=r"`query_block` must be an integer >= 0 \(got -1\)"):
        query_row_shape(-1, 10)
    with pytest.raises(ValueError, match=r"`num_kv_blocks` must be an integer >= 1 \(got 0\)"):
        query_row_shape(0, 0)


def colour_ranges(page) -> dict:
    """(cmin, cmax) of each map's colour bar and of each footprint's colour axis, as drawn."""
    return page.evaluate(
        "() => { const g = n => document.querySelector('#' + n + '-card .js-plotly-plot');"
        " const out = {};"
        " for (const n of ['mk-left', 'mk-right']) { const m = g(n)._fullData[1].marker; out[n] = [m.cmin, m.cmax]; }"
        " for (const n of ['mk-fp-left', 'mk-fp-right']) { const a = g(n)._fullLayout.coloraxis; out[n] = [a.cmin, a.cmax]; }"
        " return out; }")


def test_side_by_side_figures_share_one_colour_range_by_default(page, url, console):
    from test_browser import choose, figure_json, wait_changed


    page.goto(f"{url}/masks?file={SAMPLE}&step=13&layer=1&head=1")
    names = ("mk-left", "mk-right", "mk-fp-left", "mk-fp-right")
    for n in names:
        wait_drawn(page, n)
    with dfsviz.open(dfsviz.sample_capture()) as reader:
        logs = [np.log10(np.maximum(reader.block_stats(13, 1, o, 1).m[0, 0].double().numpy(), 1e-6))
                for o in ("raster", "hilbert3d")]
    shared = colour_ranges(page)
    assert shared["mk-left"] == shared["mk-right"] == pytest.approx([min(x.min() for x in logs),
                                                                     max(x.max() for x in logs)], abs=1e-6)
    assert shared["mk-fp-left"] == shared["mk-fp-right"]
    before = {n: figure_json(page, n) for n in names[:2]}
    choose(page, "mk-scale", "per map")
    for n in names[:2]:
        wait_changed(page, n, before[n])
    for n in names[2:]:  # the footprints' own ranges: the colour axis without bounds
        page.wait_for_function(
            "n => { const g = document.querySelector('#' + n + '-card .js-plotly-plot');"
            " return g.layout.coloraxis && g.layout.coloraxis.cmin === undefined; }", arg=n, timeout=30000)
    expect(page).to_have_url(re.compile("scale=per"))
    own = colour_ranges(page)
    for n, log in zip(("mk-left", "mk-right"), logs):
        assert own[n] == pytest.approx([log.min(), log.max()], abs=1e-4)
    assert own["mk-left"] != own["mk-right"]
    assert console == []


# Installed once the page is drawn: counts the redraws Dash asks of each figure (its
# Plotly.react calls) and the Dash requests that answer with a figure of the first run.
_PROBE = """
() => {
  const p = window.__probe = {draws: {}, requests: 0, inflight: 0};
  const react0 = Plotly.react;
  Plotly.react = function(gd) {
    const card = gd.closest('.dfs-card');
    if (card) p.draws[card.id.replace(/-card$/, '')] = (p.draws[card.id.replace(/-card$/, '')] || 0) + 1;
    return react0.apply(this, arguments);
  };
  const fetch0 = window.fetch;
  window.fetch = function(url, opts) {
    if (!String(url).includes('_dash-update-component')) return fetch0.apply(this, arguments);
    if (/mk-left|mk-fp-left/.test(JSON.parse(opts.body).output)) p.requests++;
    p.inflight++;
    return fetch0.apply(this, arguments).then(r => { p.inflight--; return r; }, e => { p.inflight--; throw e; });
  };
}
"""


@pytest.mark.parametrize("control, label, title", [("mk-budget", "0.5", "γ = 0.5"), ("mk-step", "6", None)])
def test_a_change_is_one_request_and_draws_each_figure_once(page, url, console, control, label, title):
    from test_browser import choose, figure_json, wait_changed

    page.goto(f"{url}/masks?file={SAMPLE}&step=13&layer=1&head=1&budget=0.2")
    names = ("mk-left", "mk-right", "mk-fp-left", "mk-fp-right")
    for side in ("left", "right"):
        wait_marked(page, f"mk-{side}", shown_block(page, f"mk-fp-{side}"))
    before = {n: figure_json(page, n) for n in names}
    page.evaluate(_PROBE)
    choose(page, control, label)
    for n in names:
        wait_changed(page, n, before[n])
    if title:
        expect(title_of(page, "mk-left")).to_contain_text(title)
    page.wait_for_function("() => window.__probe.inflight === 0")
    probe = page.evaluate("() => window.__probe")
    assert probe["requests"] == 1
    assert {n: probe["draws"].get(n, 0) for n in names} == {n: 1 for n in names}
    # the row markers came with the maps
    for side in ("left", "right"):
        assert marked_rows(page, f"mk-{side}") == [shown_block(page, f"mk-fp-{side}")]
    assert console == []


def test_hovering_a_map_cell_shows_its_block_mass(page, url, console):
    with dfsviz.open(dfsviz.sample_capture()) as reader:
        m = reader.block_stats(13, 1, "hilbert3d", 1).m[0, 0].double().numpy()
    page.goto(f"{url}/masks?file={SAMPLE}&step=13&layer=1&head=1")
    # the final figure (its row marked) with its image drawn
    wait_marked(page, "mk-right", shown_block(page, "mk-fp-right"))
    page.wait_for_function("() => { const i = document.querySelector('#mk-right-card .im image');"
                           " return !!i && (i.getAttribute('href') || '').startsWith('data:image/png'); }")
    x, y = page.evaluate(
        "() => { const g = document.querySelector('#mk-right-card .js-plotly-plot'); const f = g._fullLayout;"
        " const r = g.getBoundingClientRect();"
        " return [r.left + f.xaxis._offset + f.xaxis.l2p(5), r.top + f.yaxis._offset + f.yaxis.l2p(9)]; }")
    page.mouse.move(x - 20, y)
    page.mouse.move(x, y)
    label = page.locator("#mk-right-card .hoverlayer .hovertext")
    expect(label).to_contain_text("query block 9")
    expect(label).to_contain_text("key block 5")
    expect(label).to_contain_text(f"log10 m = {np.log10(max(m[9, 5], 1e-6)):.2f}")
    assert console == []

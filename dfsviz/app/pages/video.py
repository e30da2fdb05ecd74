"""Video: the decoded clip of the captured run with one query block's attention laid over it.

Raster and Hilbert side by side (the same orders as the Masks page): each panel plays the clip
frame by frame with the query block's footprint on the latent frame of the shown video frame
(a heat overlay, transparent at or below uniform attention), the block's own tokens outlined
in cyan and the tokens of its kept key blocks (top-k of the chosen scoring method at budget
γ) in white. The query block is picked in the raster order; the Hilbert panel shows the
block whose tokens lie closest to it in the video, as the Masks page does. Playing and
scrubbing run in the browser (:func:`dfsviz.app.video_figures.video_footprint_figure`).
A capture without a decoded clip gets one line saying so and how to get one.

With a second capture chosen ("compare with"), its clip is drawn under the first run's with
the same controls (step, layer, head, query block, method, budget); play and pause move both.
What it lacks of the selection (or a clip) is said in one line and the first run still shows.
"""

from __future__ import annotations

import dash
from dash import Input, Output, dcc, html

from dfsviz.app.data import get_catalog
from dfsviz.app.glossary import TERMS
from dfsviz.app.pages import common
from dfsviz.app.pages.masks import footprint_views, order_pair

NAME, PATH, PREFIX = "Video", "/video", "vd"

#: What the page says for a capture without a decoded clip.
NO_VIDEO = ("This capture holds no decoded video. `dfsviz capture` stores the clip of a run of the embedded model, "
            "which denoises pixels (no --model, e.g. `dfsviz capture --out run.h5`); captures of other models, runs "
            "interrupted before their end and files written before dfsviz stored clips have none.")


def capture_clip(cid: str):
    """The capture's decoded clip as (frames uint8 [T, H, W, 3], latent_frame int64 [T], fps), or
    None when the capture holds none (memoised per file version, counted in bytes)."""

    def read(reader):
        video = reader.video()
        return None if video is None else (video.frames, video.latent_frame, float(video.fps))

    return get_catalog().cached(cid, ("video",), read)


def query_blocks(cid: str, step: int, layer: int, head: int, order: str) -> list[int]:
    """The query blocks of ``order`` whose footprint the page can show: every block when the
    layer's Q/K are stored at ``step``, else the capture's sampled blocks (ascending)."""
    cat = get_catalog()
    reader = cat.reader(cid)
    if layer in reader.layout.qkv_layers and step in reader.layout.qkv_steps:
        return list(range(reader.layout.num_blocks))
    if not reader.layout.footprints:
        return []
    return sorted(int(u) for u in cat.footprints(cid, step, layer, order, head)[0].tolist())


#: The glossary terms of what the video figure draws (its info icon).
VIDEO_TERMS = ("footprint", "kept_key_blocks", "latent_frame")


def _control(label: str, component, term: str):
    """A control with its glossary term's short definition under it and the full one on its info icon."""
    return common.control(label, component, help=TERMS[term].short, term=term)


@common.guarded_layout("Video")
def layout(**query):
    page = common.PageContext(PREFIX, query)
    if page.reader is None:
        return html.Div([html.H2("Video"), page.header()])
    if capture_clip(page.cid) is None:
        return html.Div([html.H2("Video"), page.header(), common.banner([NO_VIDEO], "info", id=f"{PREFIX}-no-video")])
    r, q = page.reader, page.query
    methods, step, layer, head, method, budget = common.head_selection(r, q)
    left, right = order_pair(r.orders)
    blocks = query_blocks(page.cid, step, layer, head, left)
    qb = q.choice("qb", blocks, blocks[0] if blocks else None)
    controls = html.Div([
        _control("step", common.dropdown(f"{PREFIX}-step", r.steps, step), "step"),
        _control("layer", common.dropdown(f"{PREFIX}-layer", r.layers, layer), "layer"),
        _control("head", common.dropdown(f"{PREFIX}-head", r.heads, head), "head"),
        _control(f"query block ({left})", common.dropdown(f"{PREFIX}-qb", blocks, qb), "query_block"),
        _control("scoring method", common.dropdown(f"{PREFIX}-method", methods, method), "method"),
        _control("budget γ (kept fraction)", common.dropdown(f"{PREFIX}-budget", common.budget_options(budget), budget),
                 "gamma"),
    ], className="dfs-controls dfs-controls-help")
    return html.Div([
        html.H2(f"Video: {left} vs {right}"),
        page.header(),
        controls,
        dcc.Store(id=f"{PREFIX}-url"),
        html.Div(id=f"{PREFIX}-banner"),
        html.Div([html.Button("▶ play", id=f"{PREFIX}-play", className="dfs-button"),
                  html.Button("❚❚ pause", id=f"{PREFIX}-pause", className="dfs-button"),
                  dcc.Store(id=f"{PREFIX}-playing", data=False)], style={"display": "flex", "gap": "6px"}),
        common.figure_card(f"{PREFIX}-video", 560, terms=VIDEO_TERMS),
        html.Div(id=f"{PREFIX}-note", className="dfs-note"),
        common.compare_section(PREFIX, [common.figure_card(f"{PREFIX}-cmp-video", 560, terms=VIDEO_TERMS),
                                        html.Div(id=f"{PREFIX}-cmp-note", className="dfs-note")],
                               page.compare_id is not None),
    ])


def video_figure(cid: str, step: int, layer: int, head: int, method: str, budget: float, qb: int,
                 run: str = "") -> tuple[dict, str]:
    """The page's figure (memoised per setting) and the note under it; ``run`` (the capture
    compared, "" for the first) heads the title."""
    from dfsviz.app.video_figures import FootprintPanel, video_footprint_figure

    cat = get_catalog()
    reader = cat.reader(cid)
    orders = list(order_pair(reader.orders))
    views, _ = footprint_views(cid, step, layer, head, method, budget, orders, orders[0], qb)

    def build(_reader):
        frames, latent_frame, fps = capture_clip(cid)
        panels = [FootprintPanel(f"{v['order']} · query block {v['block']} · R_u = {v['row_recall']:.3f}",
                                 v["attention"].numpy(), v["query"].numpy(), v["kept"].numpy()) for v in views]
        title = f"step {step} · layer {layer} · head {head} · {method} · γ = {budget:g}"
        title = f"{run} · {title}" if run else title
        return video_footprint_figure(frames, latent_frame, fps, reader.grid, panels, title=title,
                                      buttons=False).to_dict()

    figure = cat.cached(cid, ("video_figure", step, layer, head, method, budget, qb, run), build)
    source = "computed exactly from the stored Q/K" if views[0]["exact"] else "the capture's sampled footprints"
    note = (f"{orders[0]} query block {views[0]['block']}; {orders[1]}: block {views[1]['block']}, the block whose "
            f"tokens lie closest to it in the video. Footprints: {source}. Colour: the block's attention log10 a, "
            "clear at or below uniform attention 1/N; cyan: the query block's tokens; white: its kept key blocks. "
            "R_u: the share of the block's attention its kept key blocks hold.")
    return figure, note


def register(app) -> None:
    dash.register_page(__name__, path=PATH, name=NAME, title=f"dfsviz · {NAME}", layout=layout, order=7)
    ids = ("file", "step", "layer", "head", "method", "budget", "qb")

    # One callback picks the query block and draws: a step, layer or head without the chosen
    # block among its footprints moves to its first one, and the figure is drawn once.
    @app.callback(Output(f"{PREFIX}-qb", "options"), Output(f"{PREFIX}-qb", "value"),
                  common.fig_output(f"{PREFIX}-video"), Output(f"{PREFIX}-note", "children"),
                  Output(f"{PREFIX}-banner", "children"), *[Input(f"{PREFIX}-{c}", "value") for c in ids])
    @common.guarded(5, 4, figures=(2,))
    def _draw(cid, step, layer, head, method, budget, qb):
        left = order_pair(get_catalog().reader(cid).orders)[0]
        blocks = query_blocks(cid, step, layer, head, left)
        # no block at all: footprint_views says why (neither footprints nor Q/K captured)
        qb = qb if qb in blocks else (blocks[0] if blocks else None)
        figure, note = video_figure(cid, step, layer, head, method, float(budget), qb)
        options = [{"label": str(u), "value": u} for u in blocks]
        return options, qb, figure, note, []

    def second_run(compare, step, layer, head, method, budget, qb):
        reader = get_catalog().reader(compare)
        if capture_clip(compare) is None:
            return (), f"{compare} holds no decoded video: nothing drawn for it here"
        where = [("step", step, reader.steps), ("layer", layer, reader.layers), ("head", head, reader.heads),
                 ("method", method, common.method_choices(reader))]
        missing = common.lacking(compare, where)
        if not missing:
            blocks = query_blocks(compare, step, layer, head, order_pair(reader.orders)[0])
            missing = common.lacking(compare, [("query block", qb, blocks)])
        if missing:
            return (), missing
        return video_figure(compare, step, layer, head, method, float(budget), qb, run=compare), ""

    common.register_compare(app, PREFIX, [f"{PREFIX}-cmp-video"], [Output(f"{PREFIX}-cmp-note", "children")],
                            [Input(f"{PREFIX}-{c}", "value") for c in ids[1:]], second_run)

    # Play and pause in the browser: plotly animates the figures' frames (the slider follows) at
    # the clip's fps (layout.meta.fps), the second run's clip too when one is shown; an animation
    # interrupted by pause or by the slider rejects its promise, caught here so that it is no
    # error. Play at the last frame restarts.
    app.clientside_callback(
        """
        function(play, pause) {
            const trig = window.dash_clientside.callback_context.triggered_id;
            const shown = ['#%(p)s-video-card', '#%(p)s-cmp-video-card']
                .map(card => document.querySelector(card + ' .js-plotly-plot'))
                .filter(gd => gd && gd.offsetParent !== null && gd._fullLayout && gd._fullLayout.sliders);
            if (!shown.length || !trig) { return window.dash_clientside.no_update; }
            const ignore = () => {};
            if (trig === '%(p)s-pause') {
                for (const gd of shown) {
                    Plotly.animate(gd, [null], {frame: {duration: 0, redraw: true}, transition: {duration: 0},
                                                mode: 'immediate'}).catch(ignore);
                }
                return false;
            }
            for (const gd of shown) {
                const slider = gd._fullLayout.sliders[0];
                const names = slider.steps.map(s => s.args[0][0]);
                const from = slider.active >= names.length - 1 ? 0 : slider.active + 1;
                Plotly.animate(gd, names.slice(from), {frame: {duration: 1000 / gd.layout.meta.fps, redraw: true},
                                                       transition: {duration: 0}, mode: 'immediate'}).catch(ignore);
            }
            return true;
        }
        """ % {"p": PREFIX},
        Output(f"{PREFIX}-playing", "data"),
        Input(f"{PREFIX}-play", "n_clicks"), Input(f"{PREFIX}-pause", "n_clicks"),
        prevent_initial_call=True,
    )

    common.register_url_sync(app, PREFIX, [(c, f"{PREFIX}-{c}", "value") for c in (*ids[:1], "compare", *ids[1:])])

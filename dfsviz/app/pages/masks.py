"""Masks: one step/layer/head/method/budget in raster and Hilbert order side by side.

Left and right: log10 block mass m with the top-k mask of the chosen scoring method
outlined, recall R(S) and density rho(S) in the titles, one colour range for both unless
"per map" is chosen. Below, for both orders, one query block's attention footprint in video
space (every latent frame tiled in one image, ``figures.footprint_mosaic``) with the kept key
blocks' tokens outlined; its row is marked on each map. Clicking a query block chooses it;
the other order shows the block whose tokens lie closest (centroid in (frame, row, column))
to the clicked one, so both panels look at the same spot of the video. With stored Q/K
(``--save-qkv``) any block is computed exactly; otherwise the nearest sampled footprint of
the capture is shown.

With a second capture chosen ("compare with"), its two maps are drawn under the first run's
with the same controls (step, layer, head, method, budget, colour range; its own pair of
orders); a selection it lacks is said in one line and the first run still shows. Footprints
and clicks stay with the first run.

One callback draws the maps and the footprints (one request per change, each figure drawn
once: the row markers come with the maps). It keeps the key of the views on screen, so a
change that leaves the block-mass images alone (method, budget, a click) sends only the
overlay and the row markers as a Patch.
"""

from __future__ import annotations

import math

import dash
import numpy as np
import torch
from dash import Input, Output, Patch, State, dcc, html, no_update

from dfsviz.app.data import CaptureError, exact_footprint, get_catalog
from dfsviz.app.pages import common

NAME, PATH, PREFIX = "Masks", "/masks", "mk"
_SIDES = ("left", "right")
#: Colour ranges of the side-by-side figures: one shared by both orders (comparable colours), or each its own.
SCALES = ("shared", "per map")
# the glossary terms of what the maps' and the footprints' axes and colours show (their info icons)
_MAP_TERMS = ("block_mass", "query_block", "key_block", "mask", "recall", "density")
_FOOTPRINT_TERMS = ("footprint", "latent_frame", "kept_key_blocks")
_MASS_FLOOR, _ATTENTION_FLOOR = 1e-6, 1e-8  # the floors of figures.mask_heatmap and figures.footprint_mosaic


def order_pair(orders: list[str]) -> tuple[str, str]:
    """The two orders compared: raster and hilbert3d when captured, else the first two."""
    if "raster" in orders and "hilbert3d" in orders:
        return "raster", "hilbert3d"
    if len(orders) >= 2:
        return orders[0], orders[1]
    return orders[0], orders[0]


@common.guarded_layout("Masks")
def layout(**query):
    page = common.PageContext(PREFIX, query, compare=True)
    if page.reader is None:
        return html.Div([html.H2("Masks"), page.header()])
    r, q = page.reader, page.query
    methods, step, layer, head, method, budget = common.head_selection(r, q)
    scale = q.choice("scale", SCALES, SCALES[0])
    left, right = order_pair(r.orders)
    qorder = q.choice("qorder", [left, right], None)
    qb = q.integer("qb", 0, r.layout.num_blocks - 1, None)
    controls = html.Div([
        common.control("step", common.dropdown(f"{PREFIX}-step", r.steps, step), term="step"),
        common.control("layer", common.dropdown(f"{PREFIX}-layer", r.layers, layer), term="layer"),
        common.control("head", common.dropdown(f"{PREFIX}-head", r.heads, head), term="head"),
        common.control("scoring method", common.dropdown(f"{PREFIX}-method", methods, method), term="method"),
        common.control("budget γ (kept fraction)", common.dropdown(f"{PREFIX}-budget", common.budget_options(budget), budget), term="gamma"),
        common.control("colour range", common.dropdown(f"{PREFIX}-scale", SCALES, scale)),
    ], className="dfs-controls")
    return html.Div([
        html.H2("Masks: raster vs Hilbert"),
        page.header(),
        controls,
        dcc.Store(id=f"{PREFIX}-orders", data=[left, right]),
        dcc.Store(id=f"{PREFIX}-qorder", data=qorder),
        dcc.Store(id=f"{PREFIX}-qb", data=qb),
        dcc.Store(id=f"{PREFIX}-drawn"),  # the views the maps and the footprints on screen show
        dcc.Store(id=f"{PREFIX}-url"),
        html.Div(id=f"{PREFIX}-banner"),
        html.Div([common.figure_card(f"{PREFIX}-{side}", 520, terms=_MAP_TERMS) for side in _SIDES], className="dfs-row"),
        common.compare_section(PREFIX, [html.Div([common.figure_card(f"{PREFIX}-cmp-{side}", 520, terms=_MAP_TERMS)
                                                  for side in _SIDES], className="dfs-row")], page.compare_id is not None),
        html.P("Click a query block (a row) in either map to see where its attention lands in the video.",
               className="dfs-note"),
        html.Div(id=f"{PREFIX}-fp-banner"),
        html.Div(id=f"{PREFIX}-fp-note", className="dfs-note"),
        html.Div([common.figure_card(f"{PREFIX}-fp-{side}", footprint_grid(r.grid)[1], terms=_FOOTPRINT_TERMS) for side in _SIDES],
                 className="dfs-row"),
    ])


# --------------------------------------------------------------------------- computations
def mask_view(cid: str, step: int, layer: int, head: int, order: str, method: str, budget: float) -> dict:
    """Block mass, top-k mask, recall and density of one head in one order (memoised per view:
    the maps and the footprints of a change share one selection).

    Returns {"m": float32 [Mq, Mk], "kept": bool [Mq, Mk], "recall": float, "density": float,
    "row_recall": float64 [Mq]}.
    """
    from dfsviz.analysis.measures import measure_topk

    cat = get_catalog()

    def compute(reader):
        measured = measure_topk(cat.mass(cid, step, layer, order, head), cat.scores(cid, step, layer, order, method, head),
                                budget, seq_len=reader.grid.num_tokens, block=reader.block)
        return {
            "m": measured.m[0, 0],
            "kept": measured.mask.to_dense()[0, 0],
            "recall": float(measured.recall[0, 0]),
            "density": float(measured.density[0, 0]),
            "row_recall": measured.recall_per_query[0, 0],
        }

    return cat.cached(cid, ("mask_view", step, layer, head, order, method, budget), compute)


def _base_figure(cid: str, step: int, layer: int, head: int, order: str, zrange: tuple[float, float] | None) -> dict:
    """``figures.mask_heatmap`` of the block mass in colour range ``zrange``, without a mask,
    as a plotly dict (memoised per view and range: a change of method or budget redraws only
    the mask over it)."""
    from dfsviz.figures import mask_heatmap

    def build(_reader):
        return mask_heatmap(get_catalog().mass(cid, step, layer, order, head)[0, 0], zrange=zrange).to_dict()

    return get_catalog().cached(cid, ("mask_figure", step, layer, order, head, zrange), build)


def mask_overlay(view: dict, order: str, method: str, budget: float) -> dict:
    """What is drawn over the cached block-mass map: the kept blocks of ``view["kept"]`` by
    ``figures.kept_blocks_layer`` (style "auto": outlined up to ``figures.OUTLINE_MAX_BLOCKS``
    key blocks, shaded above), the mask itself for the CSV and the title with the recall and
    density. A change of method or budget sends only these.

    Returns {"traces": [trace dicts], "shapes": [shape dicts], "meta": common.cell_flags, "title": str}.
    """
    from dfsviz.figures import kept_blocks_layer, kept_caption

    kept = view["kept"].numpy()
    traces, shapes = kept_blocks_layer(kept, style="auto")
    title = (f"{order} · {method} · γ = {budget:g}<br>recall R = {view['recall']:.3f} · density ρ = {view['density']:.3f}"
             f" · {kept_caption(kept)}")
    return {"traces": [t.to_plotly_json() for t in traces], "shapes": shapes, "meta": common.cell_flags(kept),
            "title": title}


#: Plot width of a footprint card at a 1400 px wide window (two cards side by side), px.
_CARD_WIDTH = 620


def footprint_grid(grid) -> tuple[int, int]:
    """(columns, figure height in px) of the footprint figure: every latent frame drawn, in a
    grid about as wide as it is tall (in panels of the frame's aspect), sized to its card."""
    frames = grid.frames
    cols = max(1, min(frames, math.ceil(math.sqrt(frames * 1.6 * grid.height / grid.width))))
    rows = math.ceil(frames / cols)
    panel = _CARD_WIDTH * 0.9 / cols * grid.height / grid.width
    return cols, int(rows * (panel + 28) + 90)


def _block_tokens(perm: torch.Tensor, u: int, block: int) -> torch.Tensor:
    """Original token indices of query block u of an order (int64 [<= block])."""
    return perm[u * block: (u + 1) * block]


def _centroid(tokens: torch.Tensor, coords: torch.Tensor, video_start: int, num_video: int) -> np.ndarray:
    """Mean (frame, row, column) of the block's video tokens (NaN when it holds only text)."""
    vid = tokens - video_start
    vid = vid[(vid >= 0) & (vid < num_video)]
    if vid.numel() == 0:
        return np.full(3, np.nan)
    return coords[vid].double().mean(dim=0).numpy()


def footprint_views(cid: str, step: int, layer: int, head: int, method: str, budget: float,
                    orders: list[str], qorder: str | None, qb: int | None) -> tuple[list[dict], list[str]]:
    """The footprint shown for each order and notes on how the blocks were picked.

    ``qorder``/``qb``: the clicked order and query block, or None before a click (the first
    candidate block of the first order is shown, and the notes say so).

    Returns one dict per order: {"order", "block", "attention" float32 [N], "kept" bool [N],
    "query" bool [N], "row_recall" float, "exact" bool}.
    """
    cat = get_catalog()
    reader = cat.reader(cid)
    grid, block, n = reader.grid, reader.block, reader.grid.num_tokens
    exact = layer in reader.layout.qkv_layers and step in reader.layout.qkv_steps
    if not exact and not reader.layout.footprints:
        raise CaptureError("this capture has neither footprints nor Q/K of this layer: capture with --footprints or --save-qkv")
    coords = cat.coords(cid)
    notes: list[str] = []
    num_blocks = reader.layout.num_blocks
    if qb is not None and not (type(qb) is int and 0 <= qb < num_blocks):  # the page sends none such
        notes.append(f"Query block {str(qb)[:20]!r} is not one of this capture's {num_blocks} blocks; ignored.")
        qb = None
    candidates: dict[str, list[int]] = {}
    stored: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for order in orders:
        if exact:
            candidates[order] = list(range(reader.layout.num_blocks))
        else:
            stored[order] = cat.footprints(cid, step, layer, order, head)
            candidates[order] = stored[order][0].tolist()
    clicked = qorder in orders and qb is not None
    if not clicked:
        qorder, qb = orders[0], candidates[orders[0]][0]
    anchor = _centroid(_block_tokens(cat.perm(cid, qorder), qb, block), coords, grid.video_start, grid.num_video)
    views = []
    for order in orders:
        perm = cat.perm(cid, order)
        if order == qorder and qb in candidates[order]:
            u = qb
        else:
            dist = [np.nansum((_centroid(_block_tokens(perm, c, block), coords, grid.video_start, grid.num_video)
                               - anchor) ** 2) for c in candidates[order]]
            u = candidates[order][int(np.argmin(dist))]
            if order == qorder:
                notes.append(f"{order}: block {qb} has no stored footprint; showing the nearest sampled block {u}.")
        if exact:
            att = exact_footprint(cat, cid, step, layer, order, head, u)
        else:
            blocks, rows = stored[order]
            att = rows[blocks.tolist().index(u)]
        kept_blocks = torch.nonzero(mask_view(cid, step, layer, head, order, method, budget)["kept"][u]).flatten()
        kept = torch.zeros(n, dtype=torch.bool)
        for v in kept_blocks.tolist():
            kept[_block_tokens(perm, v, block)] = True
        query = torch.zeros(n, dtype=torch.bool)
        query[_block_tokens(perm, u, block)] = True
        m = cat.mass(cid, step, layer, order, head)[0, 0, u].double()
        views.append({"order": order, "block": u, "attention": att, "kept": kept, "query": query,
                      "row_recall": float(m[kept_blocks].sum()), "exact": exact})
    source = "computed exactly from the stored Q/K" if exact else "the capture's sampled footprints"
    shown = (f"Clicked: {qorder} query block {qb}" if clicked
             else f"Showing {qorder} query block {qb}; click a row of either map to choose another")
    notes.insert(0, f"{shown}; footprints: {source}.")
    notes.append("Cyan: the query block's own tokens; white: tokens of its kept key blocks.")
    return views, notes


def footprint_base(cid: str, step: int, layer: int, head: int, view: dict, grid) -> dict:
    """``figures.footprint_mosaic`` of the query block without its kept keys: every latent
    frame in one image, :func:`footprint_grid`'s columns, sized to its card (memoised per block)."""
    from dfsviz.figures import footprint_mosaic

    cols, height = footprint_grid(grid)

    def build(_reader):
        fig = footprint_mosaic(view["attention"], grid, query_tokens=view["query"], cols=cols,
                               title=f"{view['order']} · query block {view['block']}")
        fig.update_layout(height=height, margin={"l": 10, "r": 10, "t": 60, "b": 10})
        return fig.to_dict()

    return get_catalog().cached(cid, ("footprint_mosaic", step, layer, view["order"], head, view["block"], view["exact"]),
                                build)


def footprint_overlay(base: dict, view: dict, grid) -> tuple[dict, str]:
    """(shape, title) drawn over :func:`footprint_base`: the outline of the kept keys
    (``figures.footprint_mosaic_outline``, a layout shape) and the title with the block's
    recall. A change of method or budget sends only these."""
    from dfsviz.figures import footprint_mosaic_outline

    outline = footprint_mosaic_outline(view["kept"], grid, cols=footprint_grid(grid)[0])
    return outline, f"{base['layout']['title']['text']} · its recall {view['row_recall']:.3f}"


def shared_range(values: list, floor: float, low: str, high: str) -> dict:
    """{low: min, high: max} of log10(max(x, floor)) over all ``values`` (tensors): one colour
    range for figures drawn side by side, named as the trace or colour axis wants it."""
    logs = [torch.log10(torch.clamp(v.double(), min=floor)) for v in values]
    return {low: float(min(x.min() for x in logs)), high: float(max(x.max() for x in logs))}


# the map's traces before the mask's: the block-mass image, then its colour bar (which carries the mask for the CSV)
_MASS_TRACES, _FLAGS_TRACE = 2, 1


def _row_shapes(order: str, rows: dict, num_blocks: int) -> list[dict]:
    """The cyan outline of the query block whose footprint is shown for ``order`` (``rows``:
    order -> block), or none."""
    from dfsviz.figures import query_row_shape

    return [query_row_shape(rows[order], num_blocks)] if order in rows else []


def _with_overlay(base: dict, overlay: dict, rows: list[dict], title: str) -> dict:
    """The cached map ``base`` with ``overlay`` (:func:`mask_overlay`) drawn over it, the
    ``rows`` shapes and ``title``."""
    data = [*base["data"], *overlay["traces"]]
    data[_FLAGS_TRACE] = {**data[_FLAGS_TRACE], "meta": overlay["meta"]}  # plotly does not draw meta
    layout = {**base["layout"], "title": {**base["layout"].get("title", {}), "text": title},
              "shapes": [*overlay["shapes"], *rows]}
    return {"data": data, "layout": layout}


def _overlay_patch(overlay: dict, rows: list[dict]) -> Patch:
    """What :func:`_with_overlay` changes, as a Patch of the map on screen: the block-mass
    image is not sent again, and the browser does not decode it again."""
    patch = Patch()
    for i, trace in enumerate(overlay["traces"]):
        patch["data"][_MASS_TRACES + i] = trace
    patch["data"][_FLAGS_TRACE]["meta"] = overlay["meta"]
    patch["layout"]["shapes"] = [*overlay["shapes"], *rows]
    patch["layout"]["title"]["text"] = overlay["title"]
    return patch


def map_figures(cid: str, step: int, layer: int, head: int, scale: str, method: str, budget: float,
                orders: list[str], run: str = "", rows: dict | None = None) -> list[dict]:
    """The two maps of one run, whole: the cached block-mass images (one colour range for both
    when ``scale`` is "shared") with the mask overlay of :func:`mask_overlay` and, for an order
    in ``rows`` (order -> query block), that block's row outlined; ``run`` (the capture
    compared, "" for the first) heads their titles."""
    cat = get_catalog()
    zrange = None
    if scale == "shared":
        bounds = shared_range([cat.mass(cid, step, layer, order, head) for order in orders], _MASS_FLOOR, "low", "high")
        zrange = (bounds["low"], bounds["high"])
    figs = []
    for order in orders:
        overlay = mask_overlay(mask_view(cid, step, layer, head, order, method, budget), order, method, budget)
        base = _base_figure(cid, step, layer, head, order, zrange)
        title = f"{run} · {overlay['title']}" if run else overlay["title"]
        figs.append(_with_overlay(base, overlay, _row_shapes(order, rows or {}, cat.reader(cid).layout.num_blocks), title))
    return figs


def _footprint_patch(index: int, shape: dict, title: str) -> Patch:
    """The kept keys' outline (layout shape ``index``) and the title of the footprint on screen,
    as a Patch (the attention heatmap is not sent again)."""
    patch = Patch()
    patch["layout"]["shapes"][index] = shape
    patch["layout"]["title"]["text"] = title
    return patch


# --------------------------------------------------------------------------- callbacks
def register(app) -> None:
    dash.register_page(__name__, path=PATH, name=NAME, title=f"dfsviz · {NAME}", layout=layout, order=1)
    controls = [Input(f"{PREFIX}-{c}", "value") for c in ("file", "step", "layer", "head", "scale", "method", "budget")]

    # The second run's maps, under the first's, with the same controls (whole figures: a
    # comparison is looked at, not tuned, so no Patch path).
    def compared(compare, step, layer, head, scale, method, budget):
        reader = get_catalog().reader(compare)
        missing = common.lacking(compare, [("step", step, reader.steps), ("layer", layer, reader.layers),
                                           ("head", head, reader.heads),
                                           ("method", method, common.method_choices(reader))])
        if missing:
            return (), missing
        return map_figures(compare, step, layer, head, scale, method, float(budget), list(order_pair(reader.orders)),
                           run=compare), ""

    common.register_compare(app, PREFIX, [f"{PREFIX}-cmp-{side}" for side in _SIDES], [], controls[1:], compared)

    @app.callback(Output(f"{PREFIX}-qorder", "data"), Output(f"{PREFIX}-qb", "data"),
                  Input({"type": "fig", "name": f"{PREFIX}-left"}, "clickData"),
                  Input({"type": "fig", "name": f"{PREFIX}-right"}, "clickData"),
                  State(f"{PREFIX}-orders", "data"), prevent_initial_call=True)
    def _click(left, right, orders):
        trig = dash.ctx.triggered_id
        data = left if isinstance(trig, dict) and trig.get("name") == f"{PREFIX}-left" else right
        if not data or not data.get("points"):
            return no_update, no_update
        y = data["points"][0].get("y")
        if not isinstance(y, (int, float)):
            return no_update, no_update
        order = orders[0] if isinstance(trig, dict) and trig.get("name") == f"{PREFIX}-left" else orders[1]
        return order, int(round(y))

    # The maps and the footprints of a change in one request: the footprints first (they say
    # which row each map marks), then the maps with their row markers, so each figure is drawn
    # once. Each part has its own banner: a capture without footprints still shows its maps.
    @common.guarded(6, 2, figures=(0, 1), on_error={4: {}, 5: None})
    def footprints(cid, step, layer, head, scale, method, budget, qorder, qb, orders, drawn):
        views, notes = footprint_views(cid, step, layer, head, method, float(budget), orders, qorder, qb)
        grid = get_catalog().reader(cid).grid
        rows = {view["order"]: view["block"] for view in views}
        key = [cid, step, layer, head, scale, rows]
        video = grid.video_slice
        colour = (shared_range([v["attention"][video] for v in views], _ATTENTION_FLOOR, "cmin", "cmax")
                  if scale == "shared" else {})
        figs = []
        for view in views:
            base = footprint_base(cid, step, layer, head, view, grid)
            shape, title = footprint_overlay(base, view, grid)
            shapes = base["layout"].get("shapes", [])
            if drawn == key:
                figs.append(_footprint_patch(len(shapes), shape, title))
            else:
                axis = {**base["layout"]["coloraxis"], **colour}
                figs.append({"data": base["data"], "layout": {**base["layout"], "coloraxis": axis, "shapes": [*shapes, shape],
                                                              "title": {**base["layout"]["title"], "text": title}}})
        return figs[0], figs[1], [], " ".join(notes), rows, key

    @common.guarded(4, 2, figures=(0, 1), on_error={3: None})
    def maps(cid, step, layer, head, scale, method, budget, orders, rows, drawn):
        budget = float(budget)
        key = [cid, step, layer, head, scale, method, budget, rows]
        if drawn == key:
            return no_update, no_update, [], key
        if drawn is None or drawn[:5] != key[:5]:
            return (*map_figures(cid, step, layer, head, scale, method, budget, orders, rows=rows), [], key)
        mk = get_catalog().reader(cid).layout.num_blocks
        patches = [_overlay_patch(mask_overlay(mask_view(cid, step, layer, head, order, method, budget), order, method, budget),
                                  _row_shapes(order, rows, mk)) for order in orders]
        return patches[0], patches[1], [], key

    @app.callback(common.fig_output(f"{PREFIX}-left"), common.fig_output(f"{PREFIX}-right"),
                  common.fig_output(f"{PREFIX}-fp-left"), common.fig_output(f"{PREFIX}-fp-right"),
                  Output(f"{PREFIX}-banner", "children"), Output(f"{PREFIX}-fp-banner", "children"),
                  Output(f"{PREFIX}-fp-note", "children"), Output(f"{PREFIX}-drawn", "data"),
                  *controls, Input(f"{PREFIX}-qorder", "data"), Input(f"{PREFIX}-qb", "data"),
                  State(f"{PREFIX}-orders", "data"), State(f"{PREFIX}-drawn", "data"))
    def _view(cid, step, layer, head, scale, method, budget, qorder, qb, orders, drawn):
        drawn = drawn or {}
        fp_left, fp_right, fp_banner, note, rows, fp_key = footprints(
            cid, step, layer, head, scale, method, budget, qorder, qb, orders, drawn.get("footprints"))
        left, right, banner, maps_key = maps(cid, step, layer, head, scale, method, budget, orders, rows, drawn.get("maps"))
        return left, right, fp_left, fp_right, banner, fp_banner, note, {"maps": maps_key, "footprints": fp_key}

    common.register_url_sync(app, PREFIX, [
        ("file", f"{PREFIX}-file", "value"), ("step", f"{PREFIX}-step", "value"), ("layer", f"{PREFIX}-layer", "value"),
        ("compare", f"{PREFIX}-compare", "value"), ("head", f"{PREFIX}-head", "value"), ("method", f"{PREFIX}-method", "value"),
        ("budget", f"{PREFIX}-budget", "value"), ("scale", f"{PREFIX}-scale", "value"), ("qorder", f"{PREFIX}-qorder", "data"), ("qb", f"{PREFIX}-qb", "data"),
    ])

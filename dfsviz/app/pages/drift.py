"""Drift: how well a mask chosen at step s still serves step t (DFSAttn reuses masks between
refreshes). Recall R(S^(s); m^(t)) and the Jaccard index of S^(s) and S^(t), as s x t
matrices for one layer, order, scoring method and budget, plus their means per lag t - s. On
a recording made with ``apply_dfsattn`` active, the method "DFSAttn (used)" takes the masks
DFSAttn attended (in its order's blocks, at its own budget) instead of masks chosen here.

With a second capture chosen ("compare with"), its two matrices and lag table are drawn under
the first run's with the same controls; what it lacks of the selection (layer, head, order,
method) is said in one line and the first run still shows."""

from __future__ import annotations

import dash
from dash import Input, Output, dcc, html

from dfsviz.app.data import get_catalog
from dfsviz.app.pages import common

NAME, PATH, PREFIX = "Drift", "/drift", "dr"
#: The method choice of the masks DFSAttn used (a recording with apply_dfsattn active).
USED = "dfsattn_used"


def method_choices(reader) -> list[str]:
    """The page's scoring methods (:func:`common.method_choices`), and :data:`USED` when the
    capture holds DFSAttn's masks."""
    return common.method_choices(reader) + ([USED] if reader.dfsattn_order else [])


def _method_label(method: str) -> str:
    return "DFSAttn (used)" if method == USED else method


@common.guarded_layout("Drift")
def layout(**query):
    page = common.PageContext(PREFIX, query)
    if page.reader is None:
        return html.Div([html.H2("Drift"), page.header()])
    r, q = page.reader, page.query
    methods = method_choices(r)
    layer = q.choice("layer", r.layers, r.layers[len(r.layers) // 2])
    order = q.choice("order", r.orders, "hilbert3d" if "hilbert3d" in r.orders else r.orders[0])
    method = q.choice("method", methods, "dfs_tile" if "dfs_tile" in methods else methods[0])
    budget = q.number("budget", 1e-3, 1.0, 0.2)
    head = q.choice("head", ["all", *r.heads], "all")
    controls = html.Div([
        common.control("layer", common.dropdown(f"{PREFIX}-layer", r.layers, layer), term="layer"),
        common.control("head", common.dropdown(f"{PREFIX}-head", ["all", *r.heads], head), term="head"),
        common.control("order", common.dropdown(f"{PREFIX}-order", r.orders, order), term="order"),
        common.control("scoring method", common.dropdown(f"{PREFIX}-method", methods, method, fmt=_method_label),
                       term="method"),
        common.control("budget γ", common.dropdown(f"{PREFIX}-budget", common.budget_options(budget), budget), term="gamma"),
    ], className="dfs-controls")
    return html.Div([
        html.H2("Mask drift across steps"),
        page.header(),
        controls,
        dcc.Store(id=f"{PREFIX}-url"),
        html.Div(id=f"{PREFIX}-banner"),
        html.Div([common.figure_card(f"{PREFIX}-recall", 480, terms=("reused_recall", "step")),
                  common.figure_card(f"{PREFIX}-jaccard", 480, terms=("jaccard", "step"))],
                 className="dfs-row"),
        html.H4("by lag t − s (mean over step pairs)"),
        html.Div(id=f"{PREFIX}-lags"),
        common.compare_section(PREFIX, [
            html.Div([common.figure_card(f"{PREFIX}-cmp-recall", 480, terms=("reused_recall", "step")),
                      common.figure_card(f"{PREFIX}-cmp-jaccard", 480, terms=("jaccard", "step"))],
                     className="dfs-row"),
            html.Div(id=f"{PREFIX}-cmp-lags"),
        ], page.compare_id is not None),
    ])


def drift_matrix(cid: str, layer: int, order: str, method: str, budget: float, head):
    """DriftMatrix over the captured steps of one layer: top-k masks of ``method`` at ``budget``,
    or with ``method`` :data:`USED` the masks DFSAttn attended (in its order, at its budget;
    ``order`` and ``budget`` do not apply)."""
    from dfsviz.analysis.drift import mask_drift
    from dfsviz.sparse.select import select_topk

    cat = get_catalog()
    r = cat.reader(cid)
    h = None if head == "all" else int(head)
    steps = r.steps
    if method == USED:
        order = r.dfsattn_order
        masks = [common.dfsattn_mask(cid, s, layer, h) for s in steps]
        label = f"layer {layer} · DFSAttn (used) · {order} · head {head}"
    else:
        masks = [select_topk(cat.scores(cid, s, layer, order, method, h), budget, seq_len=r.grid.num_tokens,
                             block=r.block) for s in steps]
        label = f"layer {layer} · {order} · {method} · γ = {budget:g} · head {head}"
    masses = [cat.mass(cid, s, layer, order, h) for s in steps]
    return mask_drift(masses, masks, steps, label=label)


def drift_view(cid: str, layer: int, head, order: str, method: str, budget: float, compared: bool = False) -> tuple:
    """The page's two matrices and lag table for capture ``cid``; ``compared``: it is the second
    run (its id heads the titles, the table is the compare section's)."""
    from dfsviz.figures import drift_heatmap

    dm = drift_matrix(cid, int(layer), order, method, float(budget), head)
    run = cid if compared else ""
    figs = [drift_heatmap(dm.steps, dm.mean_recall(), quantity="recall",
                          title=common.card_title("Recall of the reused mask", run, dm.label)),
            drift_heatmap(dm.steps, dm.mean_jaccard(), quantity="jaccard",
                          title=common.card_title("Jaccard with the fresh mask", run, dm.label))]
    lags = sorted({t - s for s in dm.steps for t in dm.steps if t >= s})
    rows = []
    for lag in lags:
        stat = dm.at_lag(lag)
        rows.append((lag, len(stat["pairs"]), stat["recall"], stat["fresh_recall"], stat["relative_recall"],
                     stat["jaccard"]))
    tab = common.table(rows, ["lag (steps)", "pairs", "recall, reused", "recall, fresh", "reused / fresh", "Jaccard"],
                       id=f"{PREFIX}-cmp-lag-table" if compared else f"{PREFIX}-lag-table")
    return figs[0], figs[1], tab


def register(app) -> None:
    dash.register_page(__name__, path=PATH, name=NAME, title=f"dfsviz · {NAME}", layout=layout, order=4)
    ids = ("file", "layer", "head", "order", "method", "budget")

    @app.callback(common.fig_output(f"{PREFIX}-recall"), common.fig_output(f"{PREFIX}-jaccard"),
                  Output(f"{PREFIX}-lags", "children"), Output(f"{PREFIX}-banner", "children"),
                  *[Input(f"{PREFIX}-{c}", "value") for c in ids])
    @common.guarded(4, 3, figures=(0, 1))
    def _drift(cid, layer, head, order, method, budget):
        return (*drift_view(cid, layer, head, order, method, budget), [])

    def second_run(compare, layer, head, order, method, budget):
        reader = get_catalog().reader(compare)
        heads = [] if head == "all" else [("head", head, reader.heads)]
        missing = common.lacking(compare, [("layer", layer, reader.layers), *heads, ("order", order, reader.orders),
                                           ("method", method, method_choices(reader))])
        if missing:
            return (), missing
        return drift_view(compare, layer, head, order, method, budget, compared=True), ""

    @app.callback(Output(f"{PREFIX}-order", "disabled"), Output(f"{PREFIX}-budget", "disabled"),
                  Input(f"{PREFIX}-method", "value"))
    def _used_takes_no_order_or_budget(method):
        # DFSAttn chose the used masks in its own order and at its own budget
        return method == USED, method == USED

    common.register_compare(app, PREFIX, [f"{PREFIX}-cmp-recall", f"{PREFIX}-cmp-jaccard"],
                            [Output(f"{PREFIX}-cmp-lags", "children")],
                            [Input(f"{PREFIX}-{c}", "value") for c in ids[1:]], second_run)
    common.register_url_sync(app, PREFIX, [(c, f"{PREFIX}-{c}", "value") for c in (*ids[:1], "compare", *ids[1:])])

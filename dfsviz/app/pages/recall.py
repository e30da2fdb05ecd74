"""Recall: recall against budget per scoring method and token order, with the oracle curve
(the best any mask of that budget can do) on top, and the budget each curve needs to reach
a chosen recall.

With a second capture chosen ("compare with"), both runs' curves share the figure and the
table, each label headed by its run; what the second run lacks of the selection (step, layer,
head, orders, methods) is said in one line and the first run's curves still show."""

from __future__ import annotations

import dash
from dash import Input, Output, dcc, html

from dfsviz.app.data import get_catalog
from dfsviz.app.pages import common

NAME, PATH, PREFIX = "Recall", "/recall", "rc"
TARGETS = (0.5, 0.8, 0.9, 0.95, 0.99)
ALL = "all"


@common.guarded_layout("Recall")
def layout(**query):
    page = common.PageContext(PREFIX, query, compare=True)
    if page.reader is None:
        return html.Div([html.H2("Recall"), page.header()])
    r, q = page.reader, page.query
    methods = list(r.methods)
    step = q.choice("step", r.steps, r.steps[-1])
    layer = q.choice("layer", [ALL, *r.layers], ALL)
    head = q.choice("head", [ALL, *r.heads], ALL)
    orders = q.many("orders", r.orders, r.orders)
    chosen = q.many("methods", methods, methods)
    target = q.number("target", 0.01, 1.0, 0.9)
    controls = html.Div([
        common.control("step", common.dropdown(f"{PREFIX}-step", r.steps, step), term="step"),
        common.control("layer", common.dropdown(f"{PREFIX}-layer", [ALL, *r.layers], layer), term="layer"),
        common.control("head", common.dropdown(f"{PREFIX}-head", [ALL, *r.heads], head), term="head"),
        common.control("orders", common.dropdown(f"{PREFIX}-orders", r.orders, orders, multi=True), "dfs-control dfs-file", term="order"),
        common.control("methods", common.dropdown(f"{PREFIX}-methods", methods, chosen, multi=True), "dfs-control dfs-file", term="method"),
        common.control("target recall", common.dropdown(f"{PREFIX}-target", sorted(set(TARGETS) | {target}), target), term="target_recall"),
    ], className="dfs-controls")
    return html.Div([
        html.H2("Recall against budget"),
        page.header(),
        controls,
        dcc.Store(id=f"{PREFIX}-url"),
        html.Div(id=f"{PREFIX}-banner"),
        html.Div(id=f"{PREFIX}-compare-note"),
        html.Div([common.figure_card(f"{PREFIX}-curves", 520, terms=("gamma", "recall", "oracle_recall"))], className="dfs-row"),
        html.H4("budget needed for the target recall"),
        html.Div(id=f"{PREFIX}-table"),
    ])


def curves(cid: str, step: int, layer, head, orders: list[str], methods: list[str]):
    """Recall curves per (method, order) and the oracle per order (averaged over heads and,
    for layer "all", over layers), from the curves the capture stores where it stores them, else
    from the maps. Returns (curves dict label -> RecallCurve, oracle dict).
    Each layer's curve is memoised (``CaptureCatalog.cached``): a change of target, methods or
    orders, and a return to a view, recompute nothing."""
    from dfsviz.analysis.curves import RecallCurve, oracle_curve, recall_curve, stack_curves

    cat = get_catalog()
    r = cat.reader(cid)
    layers = list(r.layers) if layer == ALL else [int(layer)]
    h = None if head == ALL else int(head)
    n, block = r.grid.num_tokens, r.block

    def one(lay: int, order: str, method: str | None):
        label = f"oracle · {order}" if method is None else f"{method} · {order}"

        def compute(_reader):
            if r.stored_recall:  # the curves the capture stored: no map read
                recall, density = cat.curves(cid, step, lay, order, "oracle" if method is None else method, h)
                return RecallCurve(recall.double(), density.double(), n, block, label)
            m = cat.mass(cid, step, lay, order, h)
            if method is None:
                return oracle_curve(m, seq_len=n, block=block, label=label)
            return recall_curve(m, cat.scores(cid, step, lay, order, method, h), seq_len=n, block=block, label=label)

        return cat.cached(cid, ("recall_curve", step, lay, h, order, method), compute)

    def stacked(order: str, method: str | None):
        per_layer = [one(lay, order, method) for lay in layers]
        return stack_curves(per_layer) if len(per_layer) > 1 else per_layer[0]

    out = {f"{method} · {order}": stacked(order, method) for order in orders for method in methods}
    oracle = {f"oracle · {order}": stacked(order, None) for order in orders}
    return out, oracle


def _with_compared(cid: str, compare: str, found: dict, oracle: dict, step: int, layer, head, orders, methods):
    """The first run's curves and the second run's, each label headed by its run, and the line
    saying what of the selection the second run lacks ("" when nothing): (curves, oracle, note).
    The second run draws the orders and methods it holds; nothing when it lacks the step, the
    layer or the head, or holds none of the orders or methods."""
    reader = get_catalog().reader(compare)
    where = [("step", step, reader.steps)]
    where += [] if layer == ALL else [("layer", int(layer), reader.layers)]
    where += [] if head == ALL else [("head", int(head), reader.heads)]
    which = [("order", o, reader.orders) for o in orders] + [("method", m, reader.methods) for m in methods]
    held_orders = [o for o in orders if o in reader.orders]
    held_methods = [m for m in methods if m in reader.methods]
    if common.lacking(compare, where) or not held_orders or not held_methods:
        second, second_oracle, note = {}, {}, common.lacking(compare, where + which)
    else:
        second, second_oracle = curves(compare, step, layer, head, held_orders, held_methods)
        note = common.lacking(compare, which, drawn="its other curves are drawn")

    def runs(first: dict, other: dict) -> dict:
        return {**{f"{cid} · {k}": v for k, v in first.items()}, **{f"{compare} · {k}": v for k, v in other.items()}}

    return runs(found, second), runs(oracle, second_oracle), note


def register(app) -> None:
    dash.register_page(__name__, path=PATH, name=NAME, title=f"dfsviz · {NAME}", layout=layout, order=2)
    ids = ("file", "compare", "step", "layer", "head", "orders", "methods", "target")

    @app.callback(common.fig_output(f"{PREFIX}-curves"), Output(f"{PREFIX}-table", "children"),
                  Output(f"{PREFIX}-banner", "children"), Output(f"{PREFIX}-compare-note", "children"),
                  *[Input(f"{PREFIX}-{c}", "value") for c in ids])
    @common.guarded(4, 2, figures=(0,), on_error={3: []})
    def _curves(cid, compare, step, layer, head, orders, methods, target):
        from dfsviz.figures import recall_budget

        if not orders or not methods:
            raise ValueError("pick at least one order and one method")
        found, oracle = curves(cid, step, layer, head, list(orders), list(methods))
        note = []
        if compare:
            found, oracle, missing = _with_compared(cid, compare, found, oracle, step, layer, head, orders, methods)
            note = common.banner([missing], "info") if missing else []
        where = f"step {step} · layer {layer} · head {head}"
        fig = recall_budget(found, oracle, targets=(float(target),), title=f"Recall against budget · {where}")
        rows = []
        for label, c in {**found, **oracle}.items():
            mean = c.mean()
            need = float(mean.needed_budget(float(target)))
            rows.append((label, need, float(mean.density_at(need)), float(mean.at(0.1)), float(mean.at(0.2))))
        tab = common.table(rows, ["curve", f"budget γ for R ≥ {float(target):g}", "density ρ there", "R at γ = 0.1",
                                  "R at γ = 0.2"], id=f"{PREFIX}-needed")
        return fig, tab, [], note

    common.register_url_sync(app, PREFIX, [(c, f"{PREFIX}-{c}", "value") for c in ids])

"""Theory: the recall bounds of docs/theory.md checked on the capture, and the three factors per order.

* Bound 2 (beta_u) against the measured recall of every query block, with y = x: every
  point must lie on the recall side (a violation is a bug, counted in red).
* Measured recall against the effective gap Delta - 2r - J, with Bound 3 in closed form.
* Distributions per order of the gap Delta, the diversities r and J, and the intra-block
  variance ratios W_q, W_k.

With a second capture chosen ("compare with"), both runs share every figure, each legend entry
headed by its run (``runs/b.h5 · hilbert3d``), and the summary line; what the second run lacks
of the selection (step, layer, method, orders) is said in one line and the first run still
shows (the orders it holds are drawn).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import dash
import numpy as np
from dash import Input, Output, dcc, html

from dfsviz.app.data import get_catalog
from dfsviz.app.pages import common

NAME, PATH, PREFIX = "Theory", "/theory", "th"
ALL = "all"
#: Points drawn per scatter (a fixed-seed subsample beyond this keeps the browser fast).
MAX_POINTS = 20000
_FACTORS = ("gap", "r_u", "J_u")  # factor-table columns: Delta_u, r_u, J_u
# the distribution figures and the glossary terms of what they show (their info icons)
_DISTRIBUTION_TERMS = {"gap": ("gap",), "r_u": ("r",), "J_u": ("J",), "W": ("W_q", "W_k")}


@common.guarded_layout("Theory")
def layout(**query):
    from dfsviz.figures import DISTRIBUTION_KINDS

    page = common.PageContext(PREFIX, query)
    if page.reader is None:
        return html.Div([html.H2("Theory"), page.header()])
    r, q = page.reader, page.query
    methods = common.method_choices(r)
    step = q.choice("step", r.steps, r.steps[-1])
    layer = q.choice("layer", [ALL, *r.layers], r.layers[len(r.layers) // 2])
    method = q.choice("method", methods, "dfs_tile" if "dfs_tile" in methods else methods[0])
    budget = q.number("budget", 1e-3, 1.0, 0.2)
    orders = q.many("orders", r.orders, r.orders)
    kind = q.choice("kind", list(DISTRIBUTION_KINDS), "violin")
    controls = html.Div([
        common.control("step", common.dropdown(f"{PREFIX}-step", r.steps, step), term="step"),
        common.control("layer", common.dropdown(f"{PREFIX}-layer", [ALL, *r.layers], layer), term="layer"),
        common.control("scoring method", common.dropdown(f"{PREFIX}-method", methods, method), term="method"),
        common.control("budget γ", common.dropdown(f"{PREFIX}-budget", common.budget_options(budget), budget), term="gamma"),
        common.control("orders", common.dropdown(f"{PREFIX}-orders", r.orders, orders, multi=True), "dfs-control dfs-file", term="order"),
        common.control("distribution plot", common.dropdown(f"{PREFIX}-kind", list(DISTRIBUTION_KINDS), kind)),
    ], className="dfs-controls")
    return html.Div([
        html.H2("Theory: bounds and factors"),
        page.header(),
        controls,
        dcc.Store(id=f"{PREFIX}-url"),
        html.Div(id=f"{PREFIX}-banner"),
        html.Div(id=f"{PREFIX}-compare-note"),
        html.Div(id=f"{PREFIX}-summary", className="dfs-note"),
        html.Div([common.figure_card(f"{PREFIX}-bound2", 460, terms=("bound2", "query_block_recall")),
                  common.figure_card(f"{PREFIX}-gap", 460, terms=("effective_gap", "bound3", "query_block_recall"))],
                 className="dfs-row"),
        html.Div([common.figure_card(f"{PREFIX}-dist-{name}", 360, terms=terms)
                  for name, terms in _DISTRIBUTION_TERMS.items()],
                 className="dfs-row"),
    ])


def factor_tables(cid: str, step: int, layer, method: str, budget: float, orders: list[str]):
    """(block table, head table): factor rows per query block and variance ratios per head."""
    from dfsviz.analysis.factors import FactorTable, factor_rows, variance_rows
    from dfsviz.sparse.select import select_topk, selector_key

    cat = get_catalog()
    r = cat.reader(cid)
    layers = list(r.layers) if layer == ALL else [int(layer)]
    selector = selector_key("topk", budget)

    def rows(order: str, lay: int):
        stats = cat.stats(cid, step, lay, order).to_block_stats()
        mask = select_topk(cat.scores(cid, step, lay, order, method), budget, seq_len=r.grid.num_tokens, block=r.block)
        w_q, w_k = cat.variance_ratios(cid, step, lay, order)
        return (factor_rows(stats, mask, order=order, method=method, selector=selector, step=step, layer=lay),
                variance_rows(W_q=w_q, W_k=w_k, order=order, method=method, step=step, layer=lay))

    # two at a time: one's tensor work (which releases the GIL) overlaps the other's reads
    with ThreadPoolExecutor(max_workers=2) as pool:
        done = list(pool.map(lambda pair: rows(*pair), [(o, lay) for o in orders for lay in layers]))
    return FactorTable.concat([b for b, _ in done]), FactorTable.concat([h for _, h in done])


def _second_run(compare: str, step: int, layer, method: str, orders: list[str]) -> tuple[list[str], str]:
    """The orders of the selection capture ``compare`` can draw ([] when it lacks the step, the
    layer or the method) and the line saying what it lacks ("" when nothing)."""
    reader = get_catalog().reader(compare)
    where = [("step", step, reader.steps), *([] if layer == ALL else [("layer", int(layer), reader.layers)]),
             ("method", method, common.method_choices(reader))]
    which = [("order", o, reader.orders) for o in orders]
    held = [o for o in orders if o in reader.orders]
    if common.lacking(compare, where) or not held:
        return [], common.lacking(compare, where + which)
    return held, common.lacking(compare, which, drawn="its other orders are drawn")


def register(app) -> None:
    dash.register_page(__name__, path=PATH, name=NAME, title=f"dfsviz · {NAME}", layout=layout, order=3)
    ids = ("file", "compare", "step", "layer", "method", "budget", "orders", "kind")
    figs = [f"{PREFIX}-bound2", f"{PREFIX}-gap"] + [f"{PREFIX}-dist-{n}" for n in ("gap", "r_u", "J_u", "W")]

    @app.callback(*[common.fig_output(f) for f in figs], Output(f"{PREFIX}-summary", "children"),
                  Output(f"{PREFIX}-banner", "children"), Output(f"{PREFIX}-compare-note", "children"),
                  *[Input(f"{PREFIX}-{c}", "value") for c in ids])
    @common.guarded(len(figs) + 3, len(figs) + 1, figures=tuple(range(len(figs))), on_error={len(figs) + 2: []})
    def _theory(cid, compare, step, layer, method, budget, orders, kind):
        from dfsviz.figures import FACTOR_LABELS, bound_scatter, factor_distributions, recall_vs_gap

        if not orders:
            raise ValueError("pick at least one order")
        runs, note = [(cid, list(orders))], []
        if compare:
            held, missing = _second_run(compare, step, layer, method, list(orders))
            runs += [(compare, held)] if held else []
            note = common.banner([missing], "info") if missing else []
        # per run: its tables, the scatter's subsample and the label of each order (headed by the
        # run when two are compared)
        drawn = []
        for run, run_orders in runs:
            table, heads = factor_tables(run, step, layer, method, float(budget), run_orders)
            drawn.append((f"{run} · " if compare else "", table, heads, table.subsample(MAX_POINTS)))

        def joined(column: str):
            return np.concatenate([np.asarray(shown.column(column)) for _, _, _, shown in drawn])

        groups = np.concatenate([[head + o for o in shown.column("order")] for head, _, _, shown in drawn])
        where = f"step {step} · layer {layer} · {method} · γ = {float(budget):g}"
        out = [
            bound_scatter(joined("bound2"), joined("recall"), groups=groups, title=f"Bound 2 · {where}"),
            recall_vs_gap(joined("effective_gap"), joined("recall"), joined("gamma"), groups=groups,
                          title=f"Recall against the effective gap · {where}"),
        ]
        for column in _FACTORS:
            values = {head + o: sub.column(column) for head, table, _, _ in drawn
                      for (o,), sub in table.groups("order").items()}
            label = FACTOR_LABELS.get(column, column)
            out.append(factor_distributions(values, factor=column, kind=kind,
                                            title=common.card_title(f"{label} per order", where)))
        w_values = {}
        for head, _, heads, _ in drawn:
            for (o,), sub in heads.groups("order").items():
                w_values[f"{head}W_q · {o}"] = sub.column("W_q")
                w_values[f"{head}W_k · {o}"] = sub.column("W_k")
        out.append(factor_distributions(w_values, factor="intra-block variance ratio W", kind=kind,
                                        title=f"intra-block variance ratios W_q, W_k per order · step {step}"))
        summaries, violated = [], 0
        for head, table, _, shown in drawn:
            check = table.violations()
            violated += check["bound2"] + check["bound3"]
            sampled = f" (scatter: {len(shown)} of {len(table)} query blocks)" if len(shown) < len(table) else ""
            summaries.append(f"{head}{check['rows']} query blocks{sampled}; Bound 2 violations: {check['bound2']}, "
                             f"Bound 3 violations: {check['bound3']} (tolerance {check['atol']:g}); largest bound − "
                             f"recall: {check['max_excess']:.3g}")
        banner = common.banner([f"bound violated on {violated} rows: this is a bug"], "error") if violated else []
        return (*out, ". ".join(summaries), banner, note)

    common.register_url_sync(app, PREFIX, [(c, f"{PREFIX}-{c}", "value") for c in ids])

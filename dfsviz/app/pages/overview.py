"""Overview: the captures under the roots, one capture's settings and completeness, the
DFSAttn schedule replayed on it (budget, refreshes, recall and density per step), and the
recall of every (layer, step) per scoring method at one budget. A recording made with
``apply_dfsattn`` active (its ``dfsattn_mask``) adds what DFSAttn did, beside the replay: per
captured step its plan (dense, refresh or cached), its budget, and the recall and density of
the masks it attended (mean over layers and heads, and the lowest and highest).

With a second capture chosen ("compare with"), the schedule is replayed on it too (both runs'
curves in one figure, each label headed by its run) and its recall per (layer, step) is drawn
under the first run's; what it lacks of the selection (order, method) is said in one line and
the first run still shows. Where the first run holds DFSAttn's masks, the second run's are
drawn under them (or one line says it holds none)."""

from __future__ import annotations

import dash
import numpy as np
from dash import Input, Output, dcc, html

from dfsviz.app.data import get_catalog
from dfsviz.app.pages import common

NAME, PATH, PREFIX = "Overview", "/", "ov"
_DECREMENTS = (0.0, 0.05, 0.1, 0.2)


def default_schedule(reader) -> dict:
    """The schedule the Overview opens on: the paper's (12 of 50 steps dense, refresh every
    12, γ 0.3 - 0.1) scaled to the run's steps, moved to the nearest warm-up and interval
    that the capture can replay.

    A replay needs each captured sparse step's mask refresh among the captured steps; a
    capture of a few steps (the shipped sample keeps 4 of 20) rarely has the scaled paper's.
    Candidates are ranked by their distance to the scaled paper's (warm-up + interval); the
    first that replays with at least one sparse captured step wins (the scaled paper's when
    none does: the page then says which steps are missing).
    """
    from dfsviz.sparse.schedule import DFSSchedule

    steps = int(reader.attrs.get("num_steps") or (max(reader.planned_steps) + 1))
    warm = int(round(steps * 12 / 50))
    base = {"num_steps": steps, "gamma0": 0.3, "decrement": 0.1,
            "dense_layers": (0,) if reader.attrs.get("adapter") == "wan" else ()}
    captured = set(reader.steps)

    def replays(skip: int, interval: int) -> bool:
        schedule = DFSSchedule(num_steps=steps, skip_steps=skip, interval=interval, gamma0=base["gamma0"],
                               decrement=base["decrement"], dense_layers=base["dense_layers"])
        refreshed = None
        for step in range(steps):
            plan = schedule.at_step(step)
            refreshed = step if plan.refresh else refreshed
            if step in captured and not plan.dense and refreshed not in captured:
                return False
        return True

    # the first sparse step refreshes its mask, so a replayable warm-up is a captured step
    candidates = sorted(((skip, interval) for skip in captured if skip < steps for interval in range(1, steps + 1)),
                        key=lambda c: (abs(c[0] - warm) + abs(c[1] - max(1, warm)), c))
    skip, interval = next((c for c in candidates if replays(*c)), (warm, max(1, warm)))
    return {**base, "skip": skip, "interval": interval}


def _summary_rows(reader) -> list[tuple[str, str]]:
    s = reader.summary()
    keys = ("model_id", "model_class", "grid", "num_tokens", "block", "num_blocks", "orders", "methods", "layers",
            "heads", "branches", "prompt", "seed", "scheduler", "dtype", "device", "footprints", "qkv_layers",
            "dfsviz_version", "created_utc")
    rows = [(k, s.get(k)) for k in keys if k in s]
    rows.append(("file size", f"{s['file_bytes'] / 2**20:.1f} MiB"))
    return rows


def _completeness(reader, status: str) -> html.Div:
    done = set(reader.steps)
    marks = [html.Span(f"{s} {'✓' if s in done else '✗'}", style={"marginRight": "10px",
                                                                   "color": "#15803d" if s in done else "#b91c1c"})
             for s in reader.planned_steps]
    state = "complete" if reader.complete else f"incomplete: {len(done)} of {len(reader.planned_steps)} steps written"
    # a file that failed validation is never shown; a large one is shown while the catalog checks
    # it in the background (status "checking"), each map checked as a view reads it
    checked = "validation: running" if status == "checking" else "validation: no problems"
    return html.Div([
        html.Div([html.B("completeness: "), state], id=f"{PREFIX}-complete"),
        html.Div([html.B("planned steps: ")] + marks),
        html.Div(checked, className="dfs-note", id=f"{PREFIX}-validation"),
    ])


@common.guarded_layout("Overview")
def layout(**query):
    page = common.PageContext(PREFIX, query)
    files = common.table([(e.id, e.status, f"{e.size / 2**20:.1f} MiB", e.message) for e in page.entries],
                         ["capture", "status", "size", "message"], id=f"{PREFIX}-files")
    if page.reader is None:
        return html.Div([html.H2("Overview"), page.header(), files])
    r, q = page.reader, page.query
    methods = list(r.methods)
    sched = default_schedule(r)
    n = sched["num_steps"]
    order = q.choice("order", r.orders, "hilbert3d" if "hilbert3d" in r.orders else r.orders[0])
    method = q.choice("method", methods, "dfs_tile" if "dfs_tile" in methods else methods[0])
    budget = q.number("budget", 1e-3, 1.0, 0.2)
    skip = q.integer("skip", 0, n, sched["skip"])
    interval = q.integer("interval", 1, max(1, n), sched["interval"])
    gamma0 = q.number("gamma0", 1e-3, 1.0, sched["gamma0"])
    decrement = q.number("decrement", 0.0, 1.0, sched["decrement"])
    controls = html.Div([
        common.control("order", common.dropdown(f"{PREFIX}-order", r.orders, order), term="order"),
        common.control("scoring method (schedule)", common.dropdown(f"{PREFIX}-method", methods, method), term="method"),
        common.control("budget γ (heatmap)", common.dropdown(f"{PREFIX}-budget", common.budget_options(budget), budget), term="gamma"),
        common.control("dense warm-up steps", common.dropdown(f"{PREFIX}-skip", list(range(n + 1)), skip), term="warmup"),
        common.control("refresh interval", common.dropdown(f"{PREFIX}-interval", list(range(1, max(1, n) + 1)), interval), term="refresh_interval"),
        common.control("γ0", common.dropdown(f"{PREFIX}-gamma0", common.budget_options(gamma0), gamma0), term="gamma0"),
        common.control("γ decrement", common.dropdown(f"{PREFIX}-decrement", sorted(set(_DECREMENTS) | {decrement}), decrement), term="gamma_decrement"),
    ], className="dfs-controls")
    return html.Div([
        html.H2("Overview"),
        page.header(),
        html.Details([html.Summary(f"captures under the roots ({len(page.entries)})"), files], open=True),
        html.Div([html.Div([html.H4("run settings"), common.table(_summary_rows(r), id=f"{PREFIX}-settings")]),
                  html.Div([html.H4("file"), _completeness(r, page.catalog.entry(page.cid).status)])],
                 className="dfs-row"),
        controls,
        dcc.Store(id=f"{PREFIX}-url"),
        html.Div(id=f"{PREFIX}-banner"),
        html.Div(id=f"{PREFIX}-note", className="dfs-note"),
        html.Div([common.figure_card(f"{PREFIX}-schedule", 420, terms=("schedule", "recall", "density")),
                  _dfsattn_card(f"{PREFIX}-dfsattn", shown=r.dfsattn_order is not None)], className="dfs-row"),
        _dfsattn_part(page),
        html.Div([common.figure_card(f"{PREFIX}-recall", 420, terms=("recall", "layer", "step"))], className="dfs-row"),
        common.compare_section(PREFIX, [
            html.Div([common.figure_card(f"{PREFIX}-cmp-recall", 420, terms=("recall", "layer", "step"))],
                     className="dfs-row")], page.compare_id is not None),
    ])


def _dfsattn_card(name: str, shown: bool = True) -> html.Div:
    """The figure card of what DFSAttn did (:func:`dfsattn_view`); not ``shown``: in the page,
    hidden (its callback's output must exist), for a capture without DFSAttn's masks."""
    card = common.figure_card(name, 420, terms=("dfsattn_used", "dfsattn_plan", "recall", "density"))
    card.style = None if shown else common.HIDDEN
    return card


def _dfsattn_part(page) -> html.Div:
    """The table of what DFSAttn did in the first run and the section of the second run's;
    hidden for a first run without DFSAttn's masks."""
    return html.Div([
        html.Div(id=f"{PREFIX}-dfsattn-table"),
        common.compare_section(PREFIX, [
            html.Div([_dfsattn_card(f"{PREFIX}-cmp-dfsattn")], className="dfs-row"),
            html.Div(id=f"{PREFIX}-cmp-dfsattn-table"),
        ], page.compare_id is not None, part="dfsattn-compare"),
    ], id=f"{PREFIX}-dfsattn-part", style=None if page.reader.dfsattn_order else common.HIDDEN)


# --------------------------------------------------------------------------- computations
def dfsattn_used(cid: str, branch: str = "cond") -> dict:
    """What DFSAttn did at each captured step of a recording with ``apply_dfsattn`` active.

    Returns {"steps": [S], "plan": [S] ("dense", "refresh" or "cached"), "gamma": [S] (None
    where dense), "recall": float64 [S, L * H], "density": float64 [S, L * H]}: the recall of
    the mask DFSAttn attended at each (layer, head) of ``branch`` (from the stored block mass of
    its order) and that mask's density.
    """
    from dfsviz.sparse.stats import block_recall

    cat = get_catalog()
    r = cat.reader(cid)
    recall, density, plans, gammas = [], [], [], []
    for step in r.steps:
        attrs = r.step_attrs(step)
        plans.append(str(attrs["dfsattn_plan"]))
        gammas.append(float(attrs["dfsattn_gamma"]) if "dfsattn_gamma" in attrs else None)
        rec, den = [], []
        for layer in r.layers:
            mask = common.dfsattn_mask(cid, step, layer, branch=branch)
            rec.append(block_recall(cat.mass(cid, step, layer, r.dfsattn_order, branch=branch), mask).ravel())
            den.append(mask.density().ravel())
        recall.append(np.concatenate([x.numpy() for x in rec]))
        density.append(np.concatenate([x.numpy() for x in den]))
    return {"steps": list(r.steps), "plan": plans, "gamma": gammas, "recall": np.asarray(recall, dtype=np.float64),
            "density": np.asarray(density, dtype=np.float64)}


def dfsattn_view(cid: str, run: str = "") -> tuple:
    """The figure and table of what DFSAttn did in capture ``cid`` (:func:`dfsattn_used`);
    ``run`` (the capture compared, "" for the first) heads the title."""
    from dfsviz.figures import schedule_figure

    used = dfsattn_used(cid)
    recall, density = used["recall"], used["density"]
    series = {"recall, mean": recall.mean(1), "recall, lowest": recall.min(1), "recall, highest": recall.max(1),
              "density, mean": density.mean(1)}
    r = get_catalog().reader(cid)
    title = (f"DFSAttn as run · the masks it attended ({r.dfsattn_order}, cond) · "
             f"over {len(r.layers)} layers × {len(r.heads)} heads")
    fig = schedule_figure(used["steps"], used["gamma"], [p == "refresh" for p in used["plan"]], series=series,
                          title=f"{run} · {title}" if run else title)
    rows = [(step, plan, "" if gamma is None else gamma, *(float(v[i]) for v in series.values()))
            for i, (step, plan, gamma) in enumerate(zip(used["steps"], used["plan"], used["gamma"]))]
    return fig, common.table(rows, ["step", "plan", "budget γ", *series])


def schedule_series(cid: str, order: str, method: str, schedule) -> tuple[dict, list[str]]:
    """Replay ``schedule`` on every captured layer; per-step means over layers and heads.

    Where the capture stores its top-k curves (``reader.stored_recall``) a dense step is the top-k
    at k = Mk, a refresh step and the fresh series of every step the curves at
    k = ``topk_count(γ, Mk)`` (from the exact maps), and a cached step the mask chosen from its
    refresh step's stored scores applied to its own stored block mass: the only maps read. Else
    ``analysis.drift.replay_schedule`` on the maps. Both follow ``analysis.drift.replay_plan``.

    Returns ({"recall, cached mask": [S], "recall, refreshed every step": [S], "density, cached mask": [S]}
    or {} when the capture lacks a refresh step, notes).
    """
    from dfsviz.analysis.drift import replay_plan, replay_schedule

    cat = get_catalog()
    r = cat.reader(cid)
    steps = r.steps
    try:
        plans = {layer: replay_plan(schedule, steps, layer=layer) for layer in r.layers}
    except ValueError as exc:
        return {}, [f"Schedule replay skipped: {exc}; or pick a warm-up and interval whose refresh steps were captured."]
    if r.stored_recall:
        per_layer = _replayed_from_curves(cid, order, method, plans)
    else:
        per_layer = {}
        for layer in r.layers:
            masses = [cat.mass(cid, s, layer, order) for s in steps]
            scores = [cat.scores(cid, s, layer, order, method) for s in steps]
            per_layer[layer] = replay_schedule(schedule, steps, masses, scores, layer=layer,
                                               seq_len=r.grid.num_tokens, block=r.block).mean_series()
    shown = {"recall, cached mask": "recall_cached", "recall, refreshed every step": "recall_fresh",
             "density, cached mask": "density_cached"}
    return {name: np.mean([per_layer[layer][key] for layer in r.layers], axis=0) for name, key in shown.items()}, []


def _replayed_from_curves(cid: str, order: str, method: str, plans: dict) -> dict[int, dict[str, list[float]]]:
    """The replay of ``plans`` (layer -> ``replay_plan``) on a capture with stored curves (see
    :func:`schedule_series`): layer -> {"recall_cached", "recall_fresh", "density_cached"}, each
    S per-step means over heads, as ``ScheduleReplay.mean_series`` gives them."""
    from dfsviz.sparse.select import select_topk, topk_count
    from dfsviz.sparse.stats import block_recall

    cat = get_catalog()
    r = cat.reader(cid)
    mk = r.layout.num_blocks
    mi = list(r.layout.curve_methods).index(method)

    def of_method(curves):  # one step's [layers, curve methods, heads, Mk] -> float64 [layers, Mk], mean over heads
        return curves[:, mi].double().mean(1)

    # one read per step and curve
    recall = {s: of_method(cat.step_curves(cid, s, order)) for s in r.steps}
    density = {s: of_method(cat.step_curves(cid, s, order, name="density")) for s in r.steps}
    masks = {}  # (layer, mask step) -> the cached mask, shared by the steps that reuse it

    out = {}
    for li, layer in enumerate(r.layers):
        series = {"recall_cached": [], "recall_fresh": [], "density_cached": []}
        for p in plans[layer]:
            k = mk if p.dense else topk_count(p.gamma, mk)  # a dense step keeps every block: the top-k at k = Mk
            fresh = (float(recall[p.step][li, k - 1]), float(density[p.step][li, k - 1]))
            if p.dense or p.refresh:
                cached = fresh
            else:
                key = (layer, p.mask_step)
                if key not in masks:
                    masks[key] = select_topk(cat.scores(cid, p.mask_step, layer, order, method), p.mask_gamma,
                                             seq_len=r.grid.num_tokens, block=r.block)
                mass = cat.mass(cid, p.step, layer, order)
                cached = (float(block_recall(mass, masks[key]).mean()), float(masks[key].density().mean()))
            series["recall_cached"].append(cached[0])
            series["recall_fresh"].append(fresh[0])
            series["density_cached"].append(cached[1])
        out[layer] = series
    return out


def recall_grid(cid: str, order: str, budget: float) -> tuple[list[int], list[int], dict[str, np.ndarray]]:
    """Recall of every method's top-k mask at ``budget``, mean over heads: method -> float64 [layers, steps].

    From the recall curves the capture stores (one read per step: every layer's and method's)
    where it stores them; else from the maps (every map of the order read once)."""
    from dfsviz.sparse.select import select_topk, topk_count
    from dfsviz.sparse.stats import block_recall

    cat = get_catalog()
    r = cat.reader(cid)
    k = topk_count(budget, r.layout.num_blocks)

    if r.stored_recall:  # one read per step: [layers, curve methods, heads, Mk]
        at_k = np.stack([cat.step_curves(cid, step, order)[..., k - 1].double().mean(-1).numpy() for step in r.steps],
                        axis=-1)  # [layers, curve methods, steps]
        methods = list(r.layout.curve_methods)
        return list(r.layers), list(r.steps), {method: at_k[:, methods.index(method)] for method in r.methods}

    def cell(step: int, layer: int, method: str) -> float:
        mask = select_topk(cat.scores(cid, step, layer, order, method), budget, seq_len=r.grid.num_tokens,
                           block=r.block)
        return float(block_recall(cat.mass(cid, step, layer, order), mask).mean())

    out = {method: np.array([[cell(step, layer, method) for step in r.steps] for layer in r.layers])
           for method in r.methods}
    return list(r.layers), list(r.steps), out


def _lacking(compare: str, order: str, method: str) -> str:
    """The line of what capture ``compare`` lacks of the page's order and method ("" when nothing)."""
    reader = get_catalog().reader(compare)
    return common.lacking(compare, [("order", order, reader.orders), ("method", method, reader.methods)])


def recall_grid_figure_of(cid: str, order: str, budget: float, run: str = ""):
    """The page's recall per (layer, step) of capture ``cid``; ``run`` (the capture compared,
    "" for the first) heads the title."""
    from dfsviz.figures import recall_grid_figure

    layers, steps, grids = recall_grid(cid, order, budget)
    title = f"Recall per layer × step · {order} · top-k at γ = {budget:g}"
    return recall_grid_figure(layers, steps, grids, title=f"{run} · {title}" if run else title)


# --------------------------------------------------------------------------- callbacks
def register(app) -> None:
    dash.register_page(__name__, path=PATH, name=NAME, title=f"dfsviz · {NAME}", layout=layout, order=0)
    ids = ("file", "compare", "order", "method", "budget", "skip", "interval", "gamma0", "decrement")

    @app.callback(common.fig_output(f"{PREFIX}-schedule"), Output(f"{PREFIX}-note", "children"),
                  Output(f"{PREFIX}-banner", "children"),
                  *[Input(f"{PREFIX}-{c}", "value") for c in ("file", "compare", "order", "method", "skip", "interval",
                                                             "gamma0", "decrement")])
    @common.guarded(3, 2, figures=(0,))
    def _schedule(cid, compare, order, method, skip, interval, gamma0, decrement):
        from dfsviz.figures import schedule_figure
        from dfsviz.sparse.schedule import DFSSchedule

        r = get_catalog().reader(cid)
        base = default_schedule(r)
        schedule = DFSSchedule(num_steps=base["num_steps"], skip_steps=int(skip), interval=int(interval),
                               gamma0=float(gamma0), decrement=float(decrement), dense_layers=base["dense_layers"])
        steps = list(range(schedule.num_steps))
        # the second run replays the same schedule (its lacking order or method: the compare section says)
        runs = [cid] + ([compare] if compare and not _lacking(compare, order, method) else [])
        full, notes = {}, []
        for run in runs:
            series, said = schedule_series(run, order, method, schedule)
            captured = {s: i for i, s in enumerate(get_catalog().reader(run).steps)}
            head = f"{run} · " if compare else ""
            notes += [f"{head}{n}" for n in said]
            full.update({f"{head}{name}": [float(v[captured[s]]) if s in captured else float("nan") for s in steps]
                         for name, v in series.items()})
        plans = [schedule.at_step(s) for s in steps]
        fig = schedule_figure(steps, [None if p.dense else p.gamma for p in plans], [p.refresh for p in plans],
                              series=full, title=f"DFSAttn schedule {schedule.name} · {method} · {order} "
                                                 f"(lines: captured steps, mean over layers and heads)")
        notes.append(f"Dense layers: {list(schedule.dense_layers) or 'none'}; captured steps: {r.steps}.")
        return fig, " ".join(notes), []

    @app.callback(common.fig_output(f"{PREFIX}-recall"), Output(f"{PREFIX}-banner", "children", allow_duplicate=True),
                  *[Input(f"{PREFIX}-{c}", "value") for c in ("file", "order", "budget")], prevent_initial_call="initial_duplicate")
    @common.guarded(2, 1, figures=(0,))
    def _recall(cid, order, budget):
        return recall_grid_figure_of(cid, order, float(budget)), dash.no_update

    def second_run(compare, order, method, budget):
        missing = _lacking(compare, order, method)
        return ((), missing) if missing else ((recall_grid_figure_of(compare, order, float(budget), run=compare),), "")

    common.register_compare(app, PREFIX, [f"{PREFIX}-cmp-recall"], [],
                            [Input(f"{PREFIX}-{c}", "value") for c in ("order", "method", "budget")], second_run)

    @app.callback(common.fig_output(f"{PREFIX}-dfsattn"), Output(f"{PREFIX}-dfsattn-table", "children"),
                  Output(f"{PREFIX}-banner", "children", allow_duplicate=True), Input(f"{PREFIX}-file", "value"),
                  prevent_initial_call="initial_duplicate")
    @common.guarded(3, 2, figures=(0,))
    def _dfsattn(cid):
        if get_catalog().reader(cid).dfsattn_order is None:  # the part is hidden: nothing to draw
            return dash.no_update, dash.no_update, dash.no_update
        return (*dfsattn_view(cid), dash.no_update)

    def second_dfsattn(compare, cid):
        if get_catalog().reader(cid).dfsattn_order is None:  # the part is hidden: nothing to draw
            return (dash.no_update, dash.no_update), ""
        if get_catalog().reader(compare).dfsattn_order is None:
            return (), (f"{compare} holds no DFSAttn masks (recorded without apply_dfsattn): nothing drawn for it "
                        "here")
        return dfsattn_view(compare, run=compare), ""

    common.register_compare(app, PREFIX, [f"{PREFIX}-cmp-dfsattn"], [Output(f"{PREFIX}-cmp-dfsattn-table", "children")],
                            [Input(f"{PREFIX}-file", "value")], second_dfsattn, part="dfsattn-compare")
    common.register_url_sync(app, PREFIX, [(c, f"{PREFIX}-{c}", "value") for c in ids])


__all__ = ["NAME", "PATH", "PREFIX", "layout", "register", "recall_grid", "schedule_series", "default_schedule",
           "dfsattn_used"]

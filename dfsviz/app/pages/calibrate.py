"""Calibrate: ``dfsviz calibrate`` on one capture, in the browser.

Choose the goal (a recall every sparse head keeps, or a budget of attention work for the
whole run), the token order, the scoring method (or the best of those captured), the CFG
branch, and optionally fix the dense warm-up and the refresh interval. The page shows the
kept fraction γ of every (layer, head) with the dense heads marked, each head's predicted
recall and density, the dense layers, the recall a cached mask keeps against the steps
since its refresh with the chosen interval marked, each scoring method's best plan, every
(warm-up, interval) weighed, and the chosen schedule with its predicted recall and attention
work. The download button gives the config file that ``dfsviz calibrate`` writes for the
same settings (the text of ``CalibratedPlan.dumps``; the capture is named by its id).
Calibrations are memoised by the data layer per file version and settings
(``CaptureCatalog.calibration``); a refusal (one captured step, a goal no plan meets) is a
red banner. docs/calibration.md explains every number.

With a second capture chosen ("compare with"), it is calibrated with the same settings and its
plan (summary and figures) drawn under the first run's; what it lacks of the settings (order,
scoring method, branch) is said in one line and the first run still shows. A refusal for it
is a red banner there. The download stays the first run's.
"""

from __future__ import annotations

import math
import shlex

import dash
from dash import Input, Output, State, dcc, html, no_update

from dfsviz.analysis.calibrate import DEFAULT_DENSE_ABOVE, DEFAULT_REFRESH_COST, CalibrationConfig
from dfsviz.app.data import get_catalog
from dfsviz.app.pages import common
from dfsviz.sparse.scoring import scorer_names

NAME, PATH, PREFIX = "Calibrate", "/calibrate", "cb"
#: The goals, as CalibrationConfig fields, and their labels.
GOALS = {"target_recall": "target recall", "max_density": "max density"}
#: Values offered in the pickers; a deep link may add others.
TARGETS = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99)
DENSITIES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
DENSE_ABOVE = (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0)
REFRESH_COSTS = (0.0, 0.025, 0.05, 0.09, 0.1, 0.2)
AUTO, BEST = "auto", "best"
#: The name the config file downloads under (the name the docs and `dfsviz calibrate --help` use).
CONFIG_NAME = "dfsattn.json"
# (query key, component id suffix) of every setting, in the order the callbacks take them.
_SETTINGS = (("goal", "goal"), ("target_recall", "target"), ("max_density", "density"), ("order", "order"),
             ("method", "method"), ("branch", "branch"), ("warmup", "warmup"), ("interval", "interval"),
             ("dense_above", "dense-above"), ("refresh_cost", "refresh-cost"))
_FIGURES = ("gamma", "recall", "density", "drift", "methods", "candidates")
_HEATMAPS = ("gamma", "recall", "density")
# the glossary terms of what each figure's axes and colours show (its info icon)
_FIGURE_TERMS = {"gamma": ("gamma", "layer", "head"), "recall": ("predicted_recall", "layer", "head"),
                 "density": ("density", "layer", "head"), "drift": ("reuse_factor", "refresh_interval"),
                 "methods": ("method", "density", "predicted_recall"), "candidates": ("warmup", "refresh_interval")}
# What each setting means, in the words of docs/calibration.md.
HELP = {
    "goal": "Target recall: the least attention work that keeps every head's recall. Max density: the best "
            "recall within a budget of attention work.",
    "target": "Recall every sparse (layer, head) keeps: the share of its attention mass inside the kept blocks, "
              "at its oldest cached mask. Each head gets the smallest budget that reaches it.",
    "density": "Attention work of the whole run as a fraction of dense attention at every step: dense warm-up "
               "steps count 1, each refresh adds the refresh cost.",
    "order": "Token order the blocks are cut from (hilbert3d keeps neighbouring video tokens in one block).",
    "method": "Block scoring that ranks the key blocks; best: every captured method is calibrated and the best "
              "plan kept.",
    "branch": "CFG branch whose maps are calibrated on.",
    "warmup": "Dense steps 0 … W − 1 before the first mask; auto: chosen among the captured steps.",
    "interval": "Steps between mask refreshes; auto: the one with the least work (target) or the best recall "
                "(max density).",
    "dense-above": "Heads that need a larger kept fraction run dense (target recall): above about 85 % the "
                   "block-sparse kernel gains nothing on dense attention.",
    "refresh-cost": "Work of one mask refresh, in dense attention calls of the layer (measured 0.025–0.09 on "
                    "one H200).",
}


def _num_steps(reader) -> int:
    """Steps of the captured run's schedule (the capture's ``num_steps``)."""
    return int(reader.attrs.get("num_steps") or max(reader.planned_steps) + 1)


def _options(values, value) -> list:
    return sorted(set(values) | {float(value)})


@common.guarded_layout("Calibrate")
def layout(**query):
    page = common.PageContext(PREFIX, query)
    if page.reader is None:
        return html.Div([html.H2("Calibrate"), page.header()])
    r, q = page.reader, page.query
    steps = _num_steps(r)
    methods = [m for m in r.methods if m in scorer_names()]
    goal = q.choice("goal", list(GOALS), "target_recall")
    target = q.number("target_recall", 1e-3, 1.0, 0.9)
    density = q.number("max_density", 1e-3, 1.0, 0.4)
    order = q.choice("order", r.orders, "hilbert3d" if "hilbert3d" in r.orders else r.orders[0])
    method = q.choice("method", [BEST, *methods], BEST)
    branch = q.choice("branch", r.branches, "cond" if "cond" in r.branches else r.branches[0])
    warmup = q.choice("warmup", [AUTO, *range(steps)], AUTO)
    interval = q.choice("interval", [AUTO, *range(1, steps + 1)], AUTO)
    dense_above = q.number("dense_above", 1e-3, 1.0, DEFAULT_DENSE_ABOVE)
    refresh_cost = q.number("refresh_cost", 0.0, 0.99, DEFAULT_REFRESH_COST)
    by_target = goal == "target_recall"

    def picker(name: str, options, value, disabled: bool = False):
        drop = common.dropdown(f"{PREFIX}-{name}", options, value)
        drop.disabled = disabled
        return drop

    radio = dcc.RadioItems(id=f"{PREFIX}-goal", options=[{"label": v, "value": k} for k, v in GOALS.items()],
                           value=goal, inline=True, inputStyle={"marginRight": "4px"},
                           labelStyle={"marginRight": "10px"})
    controls = html.Div([
        common.control("goal", radio, help=HELP["goal"]),
        common.control("target recall", picker("target", _options(TARGETS, target), target, not by_target),
                       help=HELP["target"], term="target_recall"),
        common.control("max density", picker("density", _options(DENSITIES, density), density, by_target),
                       help=HELP["density"], term="max_density"),
        common.control("order", picker("order", r.orders, order), help=HELP["order"], term="order"),
        common.control("scoring method", picker("method", [BEST, *methods], method), help=HELP["method"], term="method"),
        common.control("branch", picker("branch", r.branches, branch), help=HELP["branch"], term="branch"),
        common.control("dense warm-up steps", picker("warmup", [AUTO, *range(steps)], warmup), help=HELP["warmup"], term="warmup"),
        common.control("refresh interval", picker("interval", [AUTO, *range(1, steps + 1)], interval),
                       help=HELP["interval"], term="refresh_interval"),
        common.control("dense above γ", picker("dense-above", _options(DENSE_ABOVE, dense_above), dense_above,
                                                not by_target), help=HELP["dense-above"], term="dense_above"),
        common.control("refresh cost", picker("refresh-cost", _options(REFRESH_COSTS, refresh_cost), refresh_cost),
                       help=HELP["refresh-cost"], term="refresh_cost"),
    ], className="dfs-controls dfs-controls-help")
    download = html.Div([
        html.Button(f"Download config ({CONFIG_NAME})", id=f"{PREFIX}-download-button", className="dfs-button",
                    disabled=True, title="the file dfsviz calibrate writes for these settings; "
                                         'apply it with apply_dfsattn(pipe, "dfsattn.json")'),
        dcc.Download(id=f"{PREFIX}-download"),
        html.Div(id=f"{PREFIX}-command", className="dfs-note", style={"marginTop": "8px"}),
    ])
    # one heatmap row per layer: about 24 px each (Wan2.1's 30 layers get 900 px)
    heat = max(440, 24 * len(r.layers) + 180)

    def cards(run: str) -> list:
        return [common.figure_card(f"{PREFIX}-{run}{name}", heat if name in _HEATMAPS else 440,
                                   terms=_FIGURE_TERMS[name]) for name in _FIGURES]

    return html.Div([
        html.H2("Calibrate: per-head DFSAttn budgets from the capture"),
        page.header(),
        html.P("Every number below is a prediction from the captured steps: it holds for other prompts and seeds "
               "only as far as their attention resembles this capture's.", className="dfs-note"),
        controls,
        dcc.Store(id=f"{PREFIX}-url"),
        html.Div(id=f"{PREFIX}-banner"),
        html.Div(id=f"{PREFIX}-notes"),
        html.Div([html.Div([html.H4("chosen plan"), dcc.Loading(html.Div(id=f"{PREFIX}-summary"))]),
                  html.Div([html.H4("config file"), download])], className="dfs-row"),
        html.Div(cards(""), className="dfs-row"),
        common.compare_section(PREFIX, [
            html.H4("its plan"), dcc.Loading(html.Div(id=f"{PREFIX}-cmp-summary")),
            html.Div(cards("cmp-"), className="dfs-row")], page.compare_id is not None),
    ])


# --------------------------------------------------------------------------- computations
def settings(goal, target, density, order, method, branch, warmup, interval, dense_above,
             refresh_cost) -> CalibrationConfig:
    """The CalibrationConfig of the page's controls (in the order of ``_SETTINGS``)."""
    return CalibrationConfig(
        target_recall=float(target) if goal == "target_recall" else None,
        max_density=float(density) if goal == "max_density" else None,
        order=order, method=None if method == BEST else method, branch=branch,
        warmup_steps=None if warmup == AUTO else int(warmup), interval=None if interval == AUTO else int(interval),
        dense_above=float(dense_above), refresh_cost=float(refresh_cost),
    )


def config_bytes(plan) -> bytes:
    """The config file of ``plan``: ``CalibratedPlan.dumps``, what ``dfsviz calibrate`` writes."""
    return plan.dumps().encode()


def command_line(cid: str, config: CalibrationConfig) -> str:
    """The ``dfsviz calibrate`` call that writes the same file, run in the folder above the capture root."""
    args = ["dfsviz", "calibrate", cid]
    args += (["--target-recall", f"{config.target_recall:g}"] if config.mode == "target_recall"
             else ["--max-density", f"{config.max_density:g}"])
    for flag, value, default in (("--order", config.order, None), ("--method", config.method, None),
                                 ("--branch", config.branch, "cond"), ("--warmup", config.warmup_steps, None),
                                 ("--interval", config.interval, None),
                                 ("--dense-above", config.dense_above, DEFAULT_DENSE_ABOVE),
                                 ("--refresh-cost", config.refresh_cost, DEFAULT_REFRESH_COST)):
        if value is not None and value != default:
            args += [flag, f"{value:g}" if isinstance(value, float) else str(value)]
    return shlex.join(args + ["--out", CONFIG_NAME])


def head_grids(plan) -> dict:
    """Per (layer, head) lists of a plan: gamma (NaN = dense), kept_blocks, recall, density, dense."""
    rows = plan.layers
    return {
        "layers": [lb.layer for lb in rows],
        "gamma": [[math.nan if g is None else g for g in lb.gamma] for lb in rows],
        "kept_blocks": [list(lb.kept_blocks) for lb in rows],
        "recall": [list(lb.predicted_recall) for lb in rows],
        "density": [list(lb.density) for lb in rows],
        "dense": [[g is None for g in lb.gamma] for lb in rows],
    }


def summary_rows(result) -> list[tuple[str, str]]:
    """The chosen plan in words: method, schedule, predictions, dense heads and layers."""
    from dfsviz.figures import method_label

    plan, p = result.plan, result.plan.predicted
    prov = plan.provenance
    refreshes = f"{p['refreshes']} refresh" + ("" if p["refreshes"] == 1 else "es")
    rows = [
        ("goal", f"every head's recall ≥ {prov['target_recall']:g}" if prov["mode"] == "target_recall"
         else f"attention work ≤ {prov['max_density']:g} of dense"),
        ("scoring method", method_label(plan.method, plan.tile)),
        ("order · block", f"{plan.order} · {plan.block} tokens ({plan.num_kv_blocks} key blocks per query block)"),
        ("warm-up", f"{plan.warmup_steps} of {plan.num_steps} steps dense"),
        ("refresh interval", f"every {plan.interval} step{'s' if plan.interval != 1 else ''} ({refreshes})"),
        ("predicted recall", f"{p['mean_recall']:.3f} on the sparse steps, {p['run_recall']:.3f} over the run"),
        ("density", f"{p['mean_density']:.3f} on the sparse steps, {p['run_density']:.3f} over the run"),
        ("attention work", f"{p['attention_work']:.3f} of dense attention (refreshes at {prov['refresh_cost']:g} "
                           "each included)"),
        ("cached mask at its oldest", f"keeps {p['reuse_factor']:.1%} of a fresh mask's recall"),
        ("dense heads", f"{p['dense_heads']} of {p['heads']}"),
        ("dense layers", ", ".join(str(x) for x in plan.dense_layers) or "none"),
    ]
    if p["dense_query_blocks"]:
        rows.append(("text query blocks kept dense", ", ".join(str(b) for b in p["dense_query_blocks"])))
    rows.append(("calibration time", f"{result.seconds:.1f} s"))
    return rows


def figures_of(result, run: str = "") -> list:
    """The page's figures of one calibration, in the order of ``_FIGURES``; ``run`` (the capture
    compared, "" for the first) heads the titles."""
    from dfsviz.figures import cached_mask_decay, calibration_heatmap, method_comparison, schedule_candidates

    plan, p = result.plan, result.plan.predicted
    grids = head_grids(plan)
    where = f"{plan.method} · {plan.order}"
    layers, dense = grids["layers"], grids["dense"]
    drift = p["drift"]

    def titled(title: str, *details: str) -> str:
        return common.card_title(title, run, *details)  # the capture compared heads the details

    return [
        calibration_heatmap(grids["gamma"], dense, quantity="gamma", layers=layers, kept_blocks=grids["kept_blocks"],
                            num_kv_blocks=plan.num_kv_blocks, title=titled("Budget per head: kept fraction γ", where)),
        calibration_heatmap(grids["recall"], dense, quantity="recall", layers=layers,
                            title=titled("Predicted recall per head", "oldest cached mask", where)),
        calibration_heatmap(grids["density"], dense, quantity="density", layers=layers,
                            title=titled("Density per head", "sparse steps", where)),
        cached_mask_decay(drift["lags"], drift["relative_recall"], interval=plan.interval, samples=drift["samples"],
                          reuse_factor=p["reuse_factor"], title=titled("Recall kept by a cached mask", where)),
        method_comparison(p["methods"], chosen=plan.method, title=titled("Each scoring method's best plan")),
        schedule_candidates(result.candidates, chosen=(plan.warmup_steps, plan.interval),
                            mode=plan.provenance["mode"], title=titled("Schedules weighed", plan.method)),
    ]


# --------------------------------------------------------------------------- callbacks
def register(app) -> None:
    dash.register_page(__name__, path=PATH, name=NAME, title=f"dfsviz · {NAME}", layout=layout, order=5)
    inputs = [Input(f"{PREFIX}-file", "value")] + [Input(f"{PREFIX}-{c}", "value") for _, c in _SETTINGS]
    outputs = len(_FIGURES) + 5
    banner_at = len(_FIGURES) + 3

    @app.callback(*[common.fig_output(f"{PREFIX}-{n}") for n in _FIGURES], Output(f"{PREFIX}-summary", "children"),
                  Output(f"{PREFIX}-command", "children"), Output(f"{PREFIX}-notes", "children"),
                  Output(f"{PREFIX}-banner", "children"), Output(f"{PREFIX}-download-button", "disabled"), *inputs)
    @common.guarded(outputs, banner_at, figures=range(len(_FIGURES)),
                    on_error={len(_FIGURES): [], len(_FIGURES) + 1: [], len(_FIGURES) + 2: [], outputs - 1: True})
    def _calibrate(cid, *values):
        config = settings(*values)
        result = get_catalog().calibration(cid, config)
        command = [html.Div("The same file (but for its time stamps), from the folder above the capture root:"),
                   html.Code(command_line(cid, config), className="dfs-command")]
        notes = common.banner(result.notes, "info")
        return (*figures_of(result), common.table(summary_rows(result), id=f"{PREFIX}-summary-table"), command,
                notes, [], False)

    def second_run(compare, *values):
        config = settings(*values)
        reader = get_catalog().reader(compare)
        methods = [] if config.method is None else [("method", config.method, list(reader.methods))]
        missing = common.lacking(compare, [("order", config.order, reader.orders), *methods,
                                           ("branch", config.branch, reader.branches)])
        if missing:
            return (), missing
        result = get_catalog().calibration(compare, config)
        summary = common.table(summary_rows(result), id=f"{PREFIX}-cmp-summary-table")
        return (*figures_of(result, run=compare), summary), ""

    common.register_compare(app, PREFIX, [f"{PREFIX}-cmp-{n}" for n in _FIGURES],
                            [Output(f"{PREFIX}-cmp-summary", "children")], inputs[1:], second_run)

    @app.callback(Output(f"{PREFIX}-target", "disabled"), Output(f"{PREFIX}-density", "disabled"),
                  Output(f"{PREFIX}-dense-above", "disabled"), Input(f"{PREFIX}-goal", "value"),
                  prevent_initial_call=True)
    def _goal(goal):
        by_target = goal == "target_recall"
        return not by_target, by_target, not by_target

    @app.callback(Output(f"{PREFIX}-download", "data"), Output(f"{PREFIX}-banner", "children", allow_duplicate=True),
                  Input(f"{PREFIX}-download-button", "n_clicks"), State(f"{PREFIX}-file", "value"),
                  *[State(f"{PREFIX}-{c}", "value") for _, c in _SETTINGS], prevent_initial_call=True)
    @common.guarded(2, 1)
    def _download(_clicks, cid, *values):
        # memoised: the calibration on screen, so the file holds the numbers shown
        result = get_catalog().calibration(cid, settings(*values))
        return dcc.send_bytes(config_bytes(result.plan), CONFIG_NAME), no_update

    common.register_url_sync(app, PREFIX, [("file", f"{PREFIX}-file", "value"),
                                           ("compare", f"{PREFIX}-compare", "value")]
                             + [(key, f"{PREFIX}-{c}", "value") for key, c in _SETTINGS])


__all__ = ["NAME", "PATH", "PREFIX", "layout", "register", "settings", "config_bytes", "command_line", "figures_of",
           "summary_rows"]

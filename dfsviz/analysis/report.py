"""The claims report of one capture: Markdown + JSON + figures (HTML, and PNG when Chromium is present).

:func:`build_report` reads a capture (``dfsviz.open``) once, step by step and layer by
layer, and checks the claims of docs/theory.md and the DFSAttn paper on it:

1. **Bounds** - Bounds 2 and 3 never exceed the measured recall, on every
   (step, layer, head, order, method, budget, query block), and Bound 1 never exceeds the
   exact row recall on the layers whose Q/K were stored; the count of violations must be
   0 (a violation is a bug). The tolerance covers float32 storage.
2. **Hilbert vs raster** - paired changes (same step, layer, head) of W_q and W_k (the
   paper reports about -20% intra-block variance), and of the gap Delta, the
   diversities r and J and the effective gap (per method and budget).
3. **Recall** - at budgets gamma = 0.1 / 0.2 / 0.3 per method and order, the oracle
   recall R*(k) and the oracle gap R* - R, and the budget needed for recall 0.9 / 0.95.
4. **Drift** - recall and Jaccard of a mask reused ``interval`` steps later (the
   schedule's refresh interval), and the DFSAttn schedule replayed on the captured steps
   (cached masks against refreshing every step).
5. **Ordering ablation** - W_q, W_k and the recall of the report's method per captured order,
   against the paper's ranking raster < hilbert2d ~ tiled < hilbert3d (needs ``--orders all``).
6. **Tile size** - dfs_tile at tiles 8 / 16 / 32 (the paper picks 16), scored again from the
   stored Q/K (``--save-qkv``): a capture stores one tile per method.
7. **Recall across steps** - recall at fixed budgets per captured step (the paper: it rises as
   denoising proceeds).
8. **Text blocks** - the attention mass video queries give the text key blocks DFSAttn forces
   into every mask, where the model has text in its self-attention.

Sections 5-8 end in a verdict: confirmed, refuted, or not measurable on this capture (with the
capture settings it lacks).

Large captures are reduced as they are read: violations are counted on every row,
factor comparisons use per-head means, and scatter figures draw a fixed-seed sample of
at most ``max_points`` rows. Only :meth:`ClaimsReport.write` touches the file system.

Each claim is one class (:class:`_Claim`) in :data:`_CLAIMS`: it sees every (step, layer,
order) the single read of the capture yields, then gives its numbers, its Markdown (from the
numbers alone) and its figures. A new claim is a new class in that tuple.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import math
import os
import shutil
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dfsviz import figures
from dfsviz.accel.plan import text_blocks
from dfsviz.analysis.curves import DEFAULT_BUDGETS, DEFAULT_TARGETS, RecallCurve, oracle_curve, recall_curve
from dfsviz.analysis.drift import mask_drift, mask_source_step, replay_schedule
from dfsviz.analysis.factors import DEFAULT_ATOL, KEY_COLUMNS, FactorTable, order_change, variance_rows
from dfsviz.analysis.measures import TopkMeasure, measure_topk
from dfsviz.kernels import block_scores
from dfsviz.sparse.schedule import DFSSchedule
from dfsviz.sparse.select import select_topk, selector_key, topk_count
from dfsviz.sparse.stats import BlockStats, block_recall, oracle_recall, row_recall_ref
from dfsviz.sparse.theory import row_bound

__all__ = ["ReportConfig", "ClaimsReport", "build_report", "check_report_folder", "chromium_available",
           "png_export_available", "default_schedule", "REPORT_FACTORS"]

log = logging.getLogger(__name__)

#: Block factors compared between orders (per-head means of the per-query-block values).
REPORT_FACTORS: tuple[str, ...] = ("gap", "r_u", "J_u", "effective_gap")
_SIGNED_FACTORS = ("gap", "effective_gap")
_HEAD_MEANS = ("gap", "r_u", "J_u", "effective_gap", "bound2", "bound3", "recall")
_BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
# The paper's defaults: 12 dense warm-up steps and a refresh every 12 steps of 50.
_PAPER_STEPS, _PAPER_SKIP, _PAPER_INTERVAL = 50, 12, 12


def chromium_available() -> bool:
    """True when a Chromium/Chrome executable is on PATH (kaleido 1.x needs one for PNG export)."""
    return any(shutil.which(name) for name in _BROWSERS)


def _kaleido_installed() -> bool:
    return importlib.util.find_spec("kaleido") is not None


def png_export_available() -> bool:
    """True when PNG figures can be written: kaleido is installed (``pip install 'dfsviz[png]'``)
    and a Chromium/Chrome executable is on PATH."""
    return _kaleido_installed() and chromium_available()


def default_schedule(num_steps: int) -> DFSSchedule:
    """The DFSAttn schedule scaled to ``num_steps``: warm-up and interval 12/50 of the steps, no dense layers."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"`num_steps` must be a positive integer (got {num_steps!r})")
    interval = max(1, round(_PAPER_INTERVAL * num_steps / _PAPER_STEPS))
    skip = min(num_steps, round(_PAPER_SKIP * num_steps / _PAPER_STEPS))
    return DFSSchedule(num_steps=num_steps, skip_steps=skip, interval=interval, dense_layers=())


@dataclass(frozen=True)
class ReportConfig:
    """Settings of the claims report.

    Fields:
        budgets: kept fractions gamma in (0, 1] tabulated and checked (0.1, 0.2, 0.3).
        targets: recall levels in (0, 1] whose needed budget is reported (0.9, 0.95).
        atol: tolerance of the violation count, in [0, 1) (1e-5 suits float32 statistics).
        schedule: the DFSAttn schedule replayed; None = :func:`default_schedule` of the
            capture's number of steps.
        method: scoring method of the drift, schedule and mask figures; None = dfs_tile
            when captured, else the first method.
        order: order of the drift and schedule analysis; None = hilbert3d when captured,
            else the first order.
        max_points: most query-block rows drawn in scatter figures (>= 100).
        branch: captured branch to analyse ("cond" or "uncond").
        bound1: check Bound 1 against the exact row recall on the layers whose Q/K the capture
            stored (one O(N^2) pass per step, layer and order, for ``method`` at the middle budget).
    """

    budgets: tuple[float, ...] = DEFAULT_BUDGETS
    targets: tuple[float, ...] = DEFAULT_TARGETS
    atol: float = DEFAULT_ATOL
    schedule: DFSSchedule | None = None
    method: str | None = None
    order: str | None = None
    max_points: int = 20000
    branch: str = "cond"
    bound1: bool = True

    def __post_init__(self) -> None:
        for name in ("budgets", "targets"):
            values = getattr(self, name)
            if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
                raise ValueError(f"`{name}` must be a non-empty tuple of fractions in (0, 1] (got {values!r})")
            if any(isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 < float(v) <= 1.0 for v in values):
                raise ValueError(f"`{name}` must hold fractions in (0, 1] (got {list(values)})")
            object.__setattr__(self, name, tuple(sorted(float(v) for v in values)))
        if isinstance(self.atol, bool) or not isinstance(self.atol, (int, float)) or not 0.0 <= float(self.atol) < 1.0:
            raise ValueError(f"`atol` must be a tolerance in [0, 1) (got {self.atol!r}); 1e-5 suits float32 statistics")
        if self.schedule is not None and not isinstance(self.schedule, DFSSchedule):
            raise TypeError(f"`schedule` must be a DFSSchedule or None (got {type(self.schedule).__name__})")
        for name in ("method", "order"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise TypeError(f"`{name}` must be a str or None (got {type(getattr(self, name)).__name__})")
        if isinstance(self.max_points, bool) or not isinstance(self.max_points, int) or self.max_points < 100:
            raise ValueError(f"`max_points` must be an integer >= 100 (got {self.max_points!r})")
        if self.branch not in ("cond", "uncond"):
            raise ValueError(f"`branch` must be 'cond' or 'uncond' (got {self.branch!r})")
        if not isinstance(self.bound1, bool):
            raise TypeError(f"`bound1` must be a bool (got {type(self.bound1).__name__})")


def _json_ready(x: object) -> object:
    """Python scalars / lists / dicts only; non-finite floats become None (strict JSON)."""
    if isinstance(x, dict):
        return {str(k): _json_ready(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_ready(v) for v in x]
    if isinstance(x, torch.Tensor):
        return _json_ready(x.tolist())
    if isinstance(x, np.ndarray):
        return _json_ready(x.tolist())
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _fmt(x: object, digits: int = 3, pct: bool = False) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    if pct:
        return f"{100 * float(x):+.1f}%"
    if x != 0 and abs(float(x)) < 10.0 ** -digits:
        return f"{float(x):.2g}"  # small values keep two significant digits instead of rounding to 0
    return f"{float(x):.{digits}f}"


def _violation_count(data: dict) -> int:
    """Rows where Bound 2 or 3 (query blocks) or Bound 1 (query rows) exceeds the measured recall."""
    v = data["violations"]
    b1 = data.get("bound1")
    return int(v["bound2"] + v["bound3"] + (b1["violations"] if b1 else 0))


@dataclass(frozen=True, eq=False)
class ClaimsReport:
    """The result of :func:`build_report`.

    Fields:
        data: JSON-ready dict of every number (see ``docs/analysis.md`` for the keys).
        figures: name -> plotly Figure (from :mod:`dfsviz.figures`).
        notes: caveats met while building (e.g. a replay that skipped steps).
    """

    data: dict
    figures: dict
    notes: list[str] = field(default_factory=list)

    @property
    def violations(self) -> int:
        """Rows where Bound 2 or Bound 3 (query blocks) or Bound 1 (query rows, when Q/K were stored)
        exceeds the measured recall (must be 0)."""
        return _violation_count(self.data)

    def markdown(self, figure_dir: str = "figures") -> str:
        """The report as Markdown; figures are linked as ``figure_dir/<name>.html``."""
        lines = _render_run(self.data["run"])
        for claim in _CLAIMS:
            lines += claim.render(self.data)
        if self.figures:
            lines += ["## Figures", ""]
            lines += [f"- [{name}]({figure_dir}/{name}.html)" for name in self.figures]
            lines.append("")
        if self.notes:
            lines += ["## Notes", ""] + [f"- {n}" for n in self.notes] + [""]
        return "\n".join(lines)

    def write(self, out_dir: str | os.PathLike, *, png: bool | None = None, overwrite: bool = False
              ) -> dict[str, list[str]]:
        """Write ``report.md``, ``report.json`` and ``figures/<name>.html`` (+ ``.png``) under ``out_dir``.

        The HTML files share ``figures/plotly.min.js`` (written once), so they open offline.
        ``out_dir`` must be new, empty, or (with ``overwrite``) a report's folder, whose files are
        removed first so that none of the old report's figures stays
        (:func:`check_report_folder`).

        ``png``: True forces PNG export (ValueError without kaleido or Chromium), False skips
        it, None exports when both are present (:func:`png_export_available`). PNGs go through
        one kaleido sync server.
        Returns {"markdown": [...], "json": [...], "html": [...], "png": [...]} of written paths.
        """
        if png is not None and not isinstance(png, bool):
            raise TypeError(f"`png` must be True, False or None (got {type(png).__name__})")
        if png and not _kaleido_installed():
            raise ValueError("PNG export needs kaleido: install it with `pip install 'dfsviz[png]'`, or pass --no-png")
        if png and not chromium_available():
            raise ValueError(
                "PNG export needs Chromium (kaleido 1.x has no bundled browser): install it, e.g. "
                "`apt-get install chromium`, or pass --no-png"
            )
        out = Path(out_dir)
        for old in check_report_folder(out, overwrite):
            old.unlink()
        fig_dir = out / "figures"
        fig_dir.mkdir(parents=True, exist_ok=True)
        (out / "report.md").write_text(self.markdown("figures"), encoding="utf-8")
        (out / "report.json").write_text(json.dumps(_json_ready(self.data), indent=2, allow_nan=False), encoding="utf-8")
        html, pngs = _export_figures(self.figures, fig_dir, png_export_available() if png is None else png)
        return {"markdown": [str(out / "report.md")], "json": [str(out / "report.json")], "html": html, "png": pngs}


_REPORT_FILES = ("report.md", "report.json")
_FIGURE_SUFFIXES = (".html", ".png", ".js")


def check_report_folder(out_dir: str | os.PathLike, overwrite: bool) -> list[Path]:
    """The files of an earlier report in ``out_dir`` that writing a report there replaces (none
    for a new or empty folder). ValueError for a folder holding anything else (a user's files are
    never replaced), for a report's folder without ``overwrite``, and for a file."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"`out_dir` {str(out)!r} exists and is not a directory; pick a folder path")
    if not out.exists() or not any(out.iterdir()):
        return []
    figures = out / "figures"
    others = [p.name for p in out.iterdir()
              if not (p.name in _REPORT_FILES and p.is_file() or p.name == "figures" and p.is_dir())]
    if figures.is_dir():
        others += [f"figures/{p.name}" for p in figures.iterdir()
                   if not p.is_file() or p.suffix not in _FIGURE_SUFFIXES]
    if others:
        shown = ", ".join(sorted(others)[:3]) + (", ..." if len(others) > 3 else "")
        raise ValueError(f"`out_dir` {str(out)!r} holds files that are not a dfsviz report's ({shown}): they are kept; "
                         "pick a new or empty folder")
    if not overwrite:
        raise ValueError(f"`out_dir` {str(out)!r} holds an earlier report; pass `overwrite` to replace it")
    return [p for p in out.iterdir() if p.is_file()] + (sorted(figures.iterdir()) if figures.is_dir() else [])


def _export_figures(figs: dict, fig_dir: Path, png: bool) -> tuple[list[str], list[str]]:
    """Write every figure as ``fig_dir/<name>.html`` and, when ``png``, ``<name>.png``; return both path lists."""
    html, pngs = [], []
    for name, fig in figs.items():
        path = fig_dir / f"{name}.html"
        # "directory": one local plotly.min.js beside the pages, no network needed to view them.
        fig.write_html(path, include_plotlyjs="directory", full_html=True)
        html.append(str(path))
    if png and figs:
        import kaleido

        kaleido.start_sync_server(silence_warnings=True)
        try:
            with warnings.catch_warnings():
                # plotly warns that its per-call kaleido options are ignored by a running server.
                warnings.simplefilter("ignore", UserWarning)
                for name, fig in figs.items():
                    path = fig_dir / f"{name}.png"
                    fig.write_image(path)
                    pngs.append(str(path))
        finally:
            kaleido.stop_sync_server()
    return html, pngs


def _render_run(run: dict) -> list[str]:
    """The title and the line that names the capture."""
    return [
        f"# dfsviz claims report: {Path(run['path']).name}",
        "",
        f"Model `{run['model']}` · grid {run['grid']} (N = {run['num_tokens']}, {run['num_blocks']} blocks of "
        f"{run['block']}) · steps {run['steps']} · {len(run['layers'])} layers · {len(run['heads'])} heads · "
        f"orders {', '.join(run['orders'])} · methods {', '.join(run['methods'])} · "
        f"{'complete' if run['complete'] else 'INCOMPLETE capture'} · branch {run['branch']}",
        "",
    ]


# --------------------------------------------------------------------------------- reading
@dataclass(frozen=True, eq=False)
class _Budget:
    """One method's top-k mask at one budget, and its factor rows (all, per-head means, a sample)."""

    gamma: float
    topk: TopkMeasure
    rows: FactorTable
    head_means: FactorTable
    sample: FactorTable


@dataclass(frozen=True, eq=False)
class _Method:
    """One scoring method of a cell: its recall curve [B, H, Mk] and its masks at the report's budgets."""

    name: str
    curve: RecallCurve
    budgets: list[_Budget]


@dataclass(frozen=True, eq=False)
class _Cell:
    """What the report reads of one (step, layer, order)."""

    step: int
    layer: int
    order: str
    stats: BlockStats
    variance: FactorTable
    oracle: RecallCurve
    methods: list[_Method]


@dataclass(frozen=True, eq=False)
class _Context:
    """The capture and the choices every claim shares."""

    reader: object
    config: ReportConfig
    method: str
    order: str
    schedule: DFSSchedule
    branch: str
    notes: list[str]

    @property
    def n(self) -> int:
        return self.reader.grid.num_tokens

    @property
    def block(self) -> int:
        return self.reader.block

    @property
    def mid_step(self) -> int:
        return self.reader.steps[len(self.reader.steps) // 2]

    @property
    def mid_layer(self) -> int:
        return self.reader.layers[len(self.reader.layers) // 2]

    @property
    def mid_gamma(self) -> float:
        return self.config.budgets[len(self.config.budgets) // 2]


def _read(ctx: _Context) -> Iterator[_Cell]:
    """Every (step, layer, order) of the capture, once: statistics, variance ratios, recall curves,
    and every method's top-k masks at every budget with their factor rows."""
    reader, config = ctx.reader, ctx.config
    n, block = ctx.n, ctx.block
    rows_per_chunk = len(reader.heads) * -(-n // block)
    chunks = len(reader.steps) * len(reader.layers) * len(reader.orders) * len(reader.methods) * len(config.budgets)
    keep_per_chunk = max(1, config.max_points // max(1, chunks))
    chunk_id = 0
    for step in reader.steps:
        for layer in reader.layers:
            for order in reader.orders:
                stats = reader.block_stats(step, layer, order, branch=ctx.branch).to_block_stats()
                w_q, w_k = reader.variance_ratios(step, layer, order, branch=ctx.branch)
                methods = []
                for meth in reader.methods:
                    scores = reader.scores(step, layer, order, meth, branch=ctx.branch)
                    budgets = []
                    for gamma in config.budgets:
                        topk = measure_topk(stats, scores, gamma)
                        rows = topk.rows(order=order, method=meth, selector=selector_key("topk", gamma), step=step,
                                         layer=layer)
                        budgets.append(_Budget(gamma, topk, rows, _head_means(rows),
                                               rows.subsample(min(keep_per_chunk, rows_per_chunk), seed=chunk_id)))
                        chunk_id += 1
                    methods.append(_Method(meth, recall_curve(stats.m, scores, seq_len=n, block=block), budgets))
                yield _Cell(step, layer, order, stats,
                            variance_rows(W_q=w_q, W_k=w_k, order=order, step=step, layer=layer),
                            oracle_curve(stats.m, seq_len=n, block=block), methods)
        log.info("report: step %d read", step)


def _head_means(table: FactorTable) -> FactorTable:
    """One row per (batch, head) of a factor_rows table: finite means of the block factors."""
    cols: dict[str, list] = {name: [] for name in (*KEY_COLUMNS, *_HEAD_MEANS)}
    for _, sub in table.groups(["batch", "head"]).items():
        for name in KEY_COLUMNS:
            cols[name].append(-1 if name == "u" else sub.column(name)[0])
        for name in _HEAD_MEANS:
            x = sub.column(name)
            x = x[np.isfinite(x)]
            cols[name].append(float(x.mean()) if x.size else float("nan"))
    out = {}
    for name, values in cols.items():
        dtype = object if name in ("order", "method", "selector") else (np.int64 if name in KEY_COLUMNS else np.float64)
        out[name] = np.asarray(values, dtype=dtype)
    return FactorTable(out)


# --------------------------------------------------------------------------------- claims
class _Claim:
    """One claim of the report: what it gathers from each cell of the single read (:meth:`add`),
    its numbers (:meth:`data`, keys of ``ClaimsReport.data``), its Markdown from those numbers
    alone (:meth:`render`) and its figures (:meth:`figures`, called after :meth:`data`)."""

    #: The report's headline figure comes first in the figure list.
    headline = False

    def __init__(self, ctx: _Context) -> None:
        self.ctx = ctx

    def add(self, cell: _Cell) -> None:
        """Take what the claim needs of one (step, layer, order)."""

    def data(self) -> dict:
        return {}

    @staticmethod
    def render(data: dict) -> list[str]:
        return []

    def figures(self) -> dict:
        return {}


class _Bounds(_Claim):
    """1. Bounds 2 and 3 never exceed the measured recall; Bound 1 neither, on stored Q/K."""

    def __init__(self, ctx: _Context) -> None:
        super().__init__(ctx)
        self.atol = ctx.config.atol
        self.counts = {"rows": 0, "bound2": 0, "bound3": 0, "bound3_over_bound2": 0}
        self.max_excess = -math.inf
        self.worst = None
        self.samples: list[FactorTable] = []

    def add(self, cell: _Cell) -> None:
        for method in cell.methods:
            for budget in method.budgets:
                v = budget.rows.violations(self.atol)
                for key in self.counts:
                    self.counts[key] += v[key]
                if v["max_excess"] is not None and v["max_excess"] > self.max_excess:
                    self.max_excess, self.worst = v["max_excess"], v["worst"]
                self.samples.append(budget.sample)

    def data(self) -> dict:
        ctx = self.ctx
        violations = {**self.counts, "atol": self.atol, "max_excess": self.max_excess if self.counts["rows"] else None,
                      "worst": self.worst}
        bound1 = (_bound1_check(ctx.reader, ctx.reader.steps, ctx.reader.orders, ctx.method, ctx.mid_gamma, ctx.branch,
                                self.atol) if ctx.config.bound1 else None)
        return {"violations": violations, "bound1": bound1}

    @staticmethod
    def render(data: dict) -> list[str]:
        v = data["violations"]
        status = "PASS" if _violation_count(data) == 0 else "FAIL (a violation is a bug)"
        lines = [
            "## 1. Bound violations",
            "",
            f"**{v['bound2'] + v['bound3']} violations of Bounds 2 and 3 ({status})** over {v['rows']:,} query-block rows "
            f"(orders x methods x budgets {data['config']['budgets']} x steps x layers x heads x query blocks), "
            f"tolerance {v['atol']:g}: Bound 2 > recall in {v['bound2']} rows, Bound 3 > recall in {v['bound3']}, "
            f"Bound 3 > Bound 2 in {v['bound3_over_bound2']}. Largest bound - recall: {_fmt(v['max_excess'], 6)}.",
            "",
        ]
        b1 = data.get("bound1")
        if b1 is None:
            return lines + ["Bound 1 (row-wise) not checked: it needs Q/K at a completed step (capture with --save-qkv) "
                            "and `bound1` on.", ""]
        return lines + [
            f"Bound 1 (row-wise) on the stored Q/K of layers {b1['layers']} at steps {b1['steps']}, {b1['method']} "
            f"at γ = {b1['budget']:g}: **{b1['violations']} violations** over {b1['rows']:,} query rows (every "
            f"order); largest bound - recall: {_fmt(b1['max_excess'], 6)}.",
            "",
        ]

    def figures(self) -> dict:
        table = FactorTable.concat(self.samples)
        groups = [f"{o} · {m}" for o, m in zip(table.column("order"), table.column("method"))]
        return {
            "bound_vs_measured": figures.bound_scatter(table.column("bound2"), table.column("recall"), groups=groups,
                                                       atol=self.atol),
            "recall_vs_gap": figures.recall_vs_gap(table.column("effective_gap"), table.column("recall"),
                                                   table.column("gamma"), groups=table.column("order")),
        }


class _OrderComparison(_Claim):
    """2. Hilbert vs raster: paired changes of W_q, W_k and the block factors; the factor
    distributions and the masks of both orders."""

    def __init__(self, ctx: _Context) -> None:
        super().__init__(ctx)
        self.variance: list[FactorTable] = []
        self.head_means: list[FactorTable] = []
        self.samples: list[FactorTable] = []
        self.mask_views: dict[str, tuple] = {}

    def add(self, cell: _Cell) -> None:
        ctx = self.ctx
        self.variance.append(cell.variance)
        for method in cell.methods:
            for budget in method.budgets:
                self.head_means.append(budget.head_means)
                self.samples.append(budget.sample)
                if (method.name, budget.gamma, cell.step, cell.layer) == (ctx.method, ctx.mid_gamma, ctx.mid_step,
                                                                          ctx.mid_layer):
                    self.mask_views[cell.order] = (cell.stats.m[0, 0], budget.topk.mask.to_dense()[0, 0])

    def data(self) -> dict:
        ctx = self.ctx
        head_table, var_table = FactorTable.concat(self.head_means), FactorTable.concat(self.variance)
        summary = {
            "block": head_table.summary(["order", "method", "selector"], list(REPORT_FACTORS) + ["recall", "bound2"]),
            "head": var_table.summary(["order"], ["W_q", "W_k"]),
        }
        if not ("raster" in ctx.reader.orders and "hilbert3d" in ctx.reader.orders):
            ctx.notes.append("Hilbert vs raster needs both orders in the capture (--orders raster,hilbert3d).")
            return {"order_comparison": None, "factor_summary": summary}
        # W from the head table, block factors as per-head means.
        rows = [_change(var_table, f, match=("step", "layer", "batch", "head")) for f in ("W_q", "W_k")]
        sub = head_table.select(method=ctx.method, selector=selector_key("topk", ctx.mid_gamma))
        rows += [_change(sub, f) for f in REPORT_FACTORS]
        every = {}
        for meth in ctx.reader.methods:
            for gamma in ctx.config.budgets:
                part = head_table.select(method=meth, selector=selector_key("topk", gamma))
                every[f"{meth}/{selector_key('topk', gamma)}"] = [_change(part, f) for f in REPORT_FACTORS]
        return {"order_comparison": {"method": ctx.method, "budget": ctx.mid_gamma, "rows": rows, "all": every},
                "factor_summary": summary}

    @staticmethod
    def render(data: dict) -> list[str]:
        lines = ["## 2. Hilbert vs raster", ""]
        cmp_ = data["order_comparison"]
        if cmp_ is None:
            return lines + ["Not available: the capture needs both the raster and the hilbert3d orders.", ""]
        lines += [
            f"Paired over steps, layers and heads; factors of the query blocks are per-head means "
            f"(method {cmp_['method']}, budget {cmp_['budget']}). Negative = hilbert3d lower. "
            "The paper reports about -20% intra-block variance.",
            "",
            "| factor | raster | hilbert3d | difference | relative change | hilbert3d lower in |",
            "|---|---|---|---|---|---|",
        ]
        for row in cmp_["rows"]:
            # Relative change only for non-negative (ratio-scale) factors; Δ and the effective
            # gap are signed and often near 0, where a percentage says nothing.
            rel = "—" if row["factor"] in _SIGNED_FACTORS else _fmt(row["relative_change"], pct=True)
            lines.append(
                f"| {figures.FACTOR_LABELS.get(row['factor'], row['factor'])} | {_fmt(row['base_mean'])} | "
                f"{_fmt(row['other_mean'])} | {_fmt(row['difference'])} | {rel} | "
                f"{row['other_lower']} of {row['pairs']} pairs |"
            )
        return lines + [""]

    def figures(self) -> dict:
        ctx = self.ctx
        figs = {}
        var_table = FactorTable.concat(self.variance)
        for factor in ("W_q", "W_k"):
            figs[f"factor_{factor}"] = figures.factor_distributions(
                {o: sub.column(factor) for (o,), sub in var_table.groups("order").items()}, factor=factor)
        sel = FactorTable.concat(self.samples).select(method=ctx.method, selector=selector_key("topk", ctx.mid_gamma))
        if len(sel):
            for factor in REPORT_FACTORS:
                figs[f"factor_{factor}"] = figures.factor_distributions(
                    {o: sub.column(factor) for (o,), sub in sel.groups("order").items()}, factor=factor,
                    title=f"{figures.FACTOR_LABELS[factor]} per order ({ctx.method}, γ = {ctx.mid_gamma:g})")
        for order, (m, kept) in self.mask_views.items():
            figs[f"mask_{order}"] = figures.mask_heatmap(
                m, kept, title=f"{order} · step {ctx.mid_step} · layer {ctx.mid_layer} · head {ctx.reader.heads[0]} · "
                               f"{ctx.method} γ={ctx.mid_gamma:g}")
        return figs


class _Recall(_Claim):
    """3. Recall at fixed budgets per method and order, the oracle recall and gap, the budget needed
    for each recall target; curves are means over steps, layers and heads."""

    headline = True

    def __init__(self, ctx: _Context) -> None:
        super().__init__(ctx)
        # Sums of (recall, density) curves [Mk] over (step, layer), each already a mean over heads.
        self.curve_sum: dict[tuple[str, str], tuple] = {}
        self.oracle_sum: dict[str, tuple] = {}
        self.count: dict[str, int] = {}
        self.by_step: dict[tuple[str, str, float], dict[int, list[float]]] = {}
        self.curves: dict[str, RecallCurve] = {}
        self.oracles: dict[str, RecallCurve] = {}

    def add(self, cell: _Cell) -> None:
        _add_curve(self.oracle_sum, cell.order, cell.oracle)
        self.count[cell.order] = self.count.get(cell.order, 0) + 1
        for method in cell.methods:
            _add_curve(self.curve_sum, (cell.order, method.name), method.curve)
            for budget in method.budgets:
                self.by_step.setdefault((cell.order, method.name, budget.gamma), {}).setdefault(cell.step, []).append(
                    float(method.curve.at(budget.gamma).mean()))

    def _averaged(self, total: tuple, order: str, label: str) -> RecallCurve:
        ctx = self.ctx
        return RecallCurve(total[0] / self.count[order], total[1] / self.count[order], ctx.n, ctx.block, label)

    def data(self) -> dict:
        budgets, targets = self.ctx.config.budgets, self.ctx.config.targets
        recall, oracle = [], []
        for (order, meth), total in self.curve_sum.items():
            mean = self._averaged(total, order, f"{meth} · {order}")
            self.curves[mean.label] = mean
            orc = self._averaged(self.oracle_sum[order], order, f"oracle · {order}")
            recall.append({
                "method": meth, "order": order,
                "recall": {f"{g:g}": float(mean.at(g)) for g in budgets},
                "density": {f"{g:g}": float(mean.density_at(g)) for g in budgets},
                "oracle_gap": {f"{g:g}": float(orc.at(g) - mean.at(g)) for g in budgets},
                "needed_budget": {f"{t:g}": float(mean.needed_budget(t)) for t in targets},
                "by_step": {f"{g:g}": {str(s): float(np.mean(v)) for s, v in self.by_step[(order, meth, g)].items()}
                            for g in budgets},
            })
        for order, total in self.oracle_sum.items():
            orc = self._averaged(total, order, f"oracle · {order}")
            self.oracles[orc.label] = orc
            oracle.append({"order": order, "recall": {f"{g:g}": float(orc.at(g)) for g in budgets},
                           "needed_budget": {f"{t:g}": float(orc.needed_budget(t)) for t in targets}})
        return {"recall": recall, "oracle": oracle}

    @staticmethod
    def render(data: dict) -> list[str]:
        budgets, targets = data["config"]["budgets"], data["config"]["targets"]
        head = "| method | order | " + " | ".join(f"R @ γ={g:g}" for g in budgets) + " | " + " | ".join(
            f"oracle gap @ {g:g}" for g in budgets) + " | " + " | ".join(f"γ for R={t:g}" for t in targets) + " |"
        lines = ["## 3. Recall at fixed budgets", "", head, "|" + "---|" * (2 + 2 * len(budgets) + len(targets))]
        for row in data["recall"]:
            cells = [row["method"], row["order"]]
            cells += [_fmt(row["recall"][f"{g:g}"]) for g in budgets]
            cells += [_fmt(row["oracle_gap"][f"{g:g}"]) for g in budgets]
            cells += [_fmt(row["needed_budget"][f"{t:g}"]) for t in targets]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        lines.append("Oracle recall R*(k) per order: " + "; ".join(
            f"{o['order']}: " + ", ".join(f"γ={g:g} → {_fmt(o['recall'][f'{g:g}'])}" for g in budgets)
            for o in data["oracle"]
        ))
        return lines + [""]

    def figures(self) -> dict:
        return {"recall_budget": figures.recall_budget(self.curves, self.oracles, targets=self.ctx.config.targets,
                                                       title="Recall against budget (mean over steps, layers, heads)")}


def _add_curve(sums: dict, key: object, curve: RecallCurve) -> None:
    """Add the head mean of ``curve`` to the (recall, density) sums under ``key``."""
    mean = curve.mean()
    total = sums.get(key, (0, 0))
    sums[key] = (total[0] + mean.recall, total[1] + mean.density)


class _Drift(_Claim):
    """4. Recall and Jaccard of a mask reused ``interval`` steps later, and the DFSAttn schedule
    replayed on the captured steps (cached masks against refreshing every step)."""

    def __init__(self, ctx: _Context) -> None:
        super().__init__(ctx)
        self.drifts: dict = {}
        self.replay: dict = {}

    def data(self) -> dict:
        # One layer at a time, re-read from the file, so that only one layer's maps of every step
        # are in memory at once.
        ctx = self.ctx
        reader, schedule, steps, n, block = ctx.reader, ctx.schedule, ctx.reader.steps, ctx.n, ctx.block
        gamma0 = schedule.gamma0
        replay_steps = [s for s in steps if _replayable(schedule, s, steps)]
        skipped = [s for s in steps if s not in replay_steps]
        replay_idx = [steps.index(s) for s in replay_steps]
        series, plan_replay = [], None
        for layer in reader.layers:
            masses = [reader.block_stats(s, layer, ctx.order, branch=ctx.branch).m for s in steps]
            scores = [reader.scores(s, layer, ctx.order, ctx.method, branch=ctx.branch) for s in steps]
            masks = [select_topk(sc, gamma0, seq_len=n, block=block) for sc in scores]
            self.drifts[layer] = mask_drift(masses, masks, steps, label=f"layer {layer}")
            if replay_steps:
                rp = replay_schedule(schedule, replay_steps, [masses[i] for i in replay_idx],
                                     [scores[i] for i in replay_idx], layer=layer, seq_len=n, block=block)
                series.append(rp.mean_series())
                # The plan shown is that of a sparse layer when there is one (dense layers are dense throughout).
                if plan_replay is None or (plan_replay.layer in schedule.dense_layers and layer not in schedule.dense_layers):
                    plan_replay = rp
        lags = sorted({t - s for s in steps for t in steps if t > s})
        interval = schedule.interval
        nearest = min(lags, key=lambda g: (abs(g - interval), g)) if lags else None
        replay = {"steps": replay_steps, "skipped": skipped, "mask_step": [], "gamma": [], "recall_cached": [],
                  "recall_fresh": [], "density_cached": [], "density_fresh": []}
        if plan_replay is not None:
            # Every sparse layer shares the plan; the series are means over all layers.
            replay["mask_step"], replay["gamma"] = list(plan_replay.mask_step), list(plan_replay.gamma)
            for key in ("recall_cached", "recall_fresh", "density_cached", "density_fresh"):
                replay[key] = np.mean([sr[key] for sr in series], axis=0).tolist()
        if skipped:
            ctx.notes.append(f"Schedule replay skipped steps {skipped}: they reuse masks refreshed at uncaptured steps.")
        self.replay = replay
        return {"drift": {
            "schedule": schedule.name, "interval": interval, "method": ctx.method, "order": ctx.order, "gamma": gamma0,
            "at_interval": self._lag_mean(interval) if interval in lags else None,
            "nearest": self._lag_mean(nearest) if nearest is not None else None,
            "per_layer_recall": {str(l): d.mean_recall().tolist() for l, d in self.drifts.items()},
            "per_layer_jaccard": {str(l): d.mean_jaccard().tolist() for l, d in self.drifts.items()},
            "replay": replay,
        }}

    def _lag_mean(self, lag: int) -> dict | None:
        per_layer = [d.at_lag(lag) for d in self.drifts.values()]
        if per_layer[0] is None:
            return None
        out = {k: float(np.mean([p[k] for p in per_layer])) for k in ("recall", "jaccard", "relative_recall", "fresh_recall")}
        return {"lag": lag, "pairs": per_layer[0]["pairs"], **out}

    @staticmethod
    def render(data: dict) -> list[str]:
        dr = data["drift"]
        lines = ["## 4. Mask drift and the DFSAttn schedule", ""]
        lines.append(f"Schedule `{dr['schedule']}`; masks of {dr['method']} on {dr['order']} at γ = {dr['gamma']:g}.")
        lines.append("")
        lag = dr["at_interval"]
        if lag is None:
            lines.append(f"No two captured steps are {dr['interval']} steps (the refresh interval) apart.")
        else:
            lines.append(
                f"A mask reused {lag['lag']} steps later (pairs {lag['pairs']}): recall {_fmt(lag['recall'])} vs "
                f"{_fmt(lag['fresh_recall'])} fresh ({_fmt(lag['relative_recall'])} of it), Jaccard {_fmt(lag['jaccard'])}."
            )
        if dr["nearest"] is not None and (lag is None or dr["nearest"]["lag"] != lag["lag"]):
            near = dr["nearest"]
            lines.append(
                f"Nearest captured lag {near['lag']} steps: recall {_fmt(near['recall'])} vs {_fmt(near['fresh_recall'])} "
                f"fresh, Jaccard {_fmt(near['jaccard'])}."
            )
        lines.append("")
        rep = dr["replay"]
        if rep["steps"]:
            lines += ["| step | mask from step | γ | recall, cached | recall, refreshed every step |", "|---|---|---|---|---|"]
            for i, s in enumerate(rep["steps"]):
                src = rep["mask_step"][i]
                lines.append(
                    f"| {s} | {'dense' if src is None else src} | {_fmt(rep['gamma'][i], 2)} | "
                    f"{_fmt(rep['recall_cached'][i])} | {_fmt(rep['recall_fresh'][i])} |"
                )
            lines.append("")
        if rep["skipped"]:
            lines.append(f"Steps {rep['skipped']} were not replayed: the mask they reuse was refreshed at a step the capture lacks.")
            lines.append("")
        return lines

    def figures(self) -> dict:
        ctx = self.ctx
        schedule, replay = ctx.schedule, self.replay
        drift = self.drifts[ctx.mid_layer]
        figs = {
            "drift_recall": figures.drift_heatmap(drift.steps, drift.mean_recall(), quantity="recall",
                                                  title=f"Mask drift, layer {ctx.mid_layer}: recall of the step-s mask at step t"),
            "drift_jaccard": figures.drift_heatmap(drift.steps, drift.mean_jaccard(), quantity="jaccard",
                                                   title=f"Mask drift, layer {ctx.mid_layer}: Jaccard of the step-s and step-t masks"),
        }
        plans = [schedule.at_step(s) for s in range(schedule.num_steps)]
        series = {}
        if replay["steps"]:
            for key, name in (("recall_cached", "recall, cached masks"), ("recall_fresh", "recall, refreshed every step"),
                              ("density_cached", "density, cached masks")):
                full = np.full(schedule.num_steps, np.nan)
                full[replay["steps"]] = replay[key]
                series[name] = full
        figs["schedule"] = figures.schedule_figure(range(schedule.num_steps), [p.gamma for p in plans],
                                                   [p.refresh for p in plans], series=series,
                                                   title=f"DFSAttn schedule replayed on the capture<br><sup>{schedule.name}, "
                                                         f"{ctx.method} on {ctx.order}, mean over layers and heads</sup>")
        return figs


#: The orders of the paper's ordering ablation, in the order it ranks them (raster worst).
_ABLATION_ORDERS = ("raster", "hilbert2d", "tiled", "hilbert3d")
#: dfs_tile pooling tiles of the tile-size claim (the paper's ablation picks 16).
_CLAIM_TILES = (8, 16, 32)
_CONFIRMED, _REFUTED, _NOT_MEASURABLE = "confirmed", "refuted", "not measurable"


def _verdict(verdict: str, reason: str) -> dict:
    return {"verdict": verdict, "reason": reason}


def _render_verdict(v: dict) -> str:
    return f"**Verdict: {v['verdict']}** ({v['reason']})."


def _claim_section(title: str, paper: str, here: str) -> list[str]:
    """The heading of a claim's section and what the paper reports beside what is measured here."""
    return [f"## {title}", "", f"Paper: {paper} Here: {here}", ""]


def _chain_verdict(values: dict[str, float], higher_is_better: bool, what: str) -> dict:
    """Does raster < {hilbert2d, tiled} < hilbert3d hold for ``values`` (per order)?"""
    missing = [o for o in _ABLATION_ORDERS if o not in values]
    if missing:
        return _verdict(_NOT_MEASURABLE, f"the capture lacks the orders {missing}; capture with --orders all")
    sign = 1.0 if higher_is_better else -1.0
    better = "above" if higher_is_better else "below"
    failed = [f"{b} is not {better} {a} ({_fmt(values[b])} vs {_fmt(values[a])})"
              for a, b in (("raster", "hilbert2d"), ("raster", "tiled"), ("hilbert2d", "hilbert3d"), ("tiled", "hilbert3d"))
              if not sign * values[b] > sign * values[a]]
    if failed:
        return _verdict(_REFUTED, f"{what}: " + "; ".join(failed))
    return _verdict(_CONFIRMED, f"{what}: raster, then hilbert2d and tiled, then hilbert3d")


class _OrderAblation(_Claim):
    """5. The ordering ablation: raster < hilbert2d ~ tiled < hilbert3d in recall at a fixed budget
    and in intra-block variance (lower W is better), over every captured order."""

    def __init__(self, ctx: _Context) -> None:
        super().__init__(ctx)
        self.w: dict[str, dict[str, list[float]]] = {}
        self.recall: dict[str, dict[float, list[float]]] = {}

    def add(self, cell: _Cell) -> None:
        w = self.w.setdefault(cell.order, {"W_q": [], "W_k": []})
        for name in w:
            w[name] += cell.variance.column(name).tolist()
        for method in cell.methods:
            if method.name == self.ctx.method:
                for budget in method.budgets:
                    self.recall.setdefault(cell.order, {}).setdefault(budget.gamma, []).append(
                        float(budget.topk.recall.mean()))

    def data(self) -> dict:
        ctx = self.ctx
        gamma = ctx.mid_gamma
        orders = {o: {"W_q": float(np.mean(self.w[o]["W_q"])), "W_k": float(np.mean(self.w[o]["W_k"])),
                      "recall": {f"{g:g}": float(np.mean(v)) for g, v in self.recall[o].items()}}
                  for o in ctx.reader.orders}
        recall = {o: row["recall"][f"{gamma:g}"] for o, row in orders.items()}
        return {"order_ablation": {
            "method": ctx.method, "budget": gamma, "orders": orders,
            "verdict": {
                "recall": _chain_verdict(recall, True, f"recall of {ctx.method} at γ = {gamma:g}"),
                "W_q": _chain_verdict({o: r["W_q"] for o, r in orders.items()}, False, "W_q"),
                "W_k": _chain_verdict({o: r["W_k"] for o, r in orders.items()}, False, "W_k"),
            },
        }}

    @staticmethod
    def render(data: dict) -> list[str]:
        ab = data["order_ablation"]
        budgets = list(next(iter(ab["orders"].values()))["recall"])
        lines = _claim_section(
            "5. Ordering ablation",
            "in its ordering ablation (video quality against dense attention) raster order is clearly worst (PSNR "
            "27.8), 2D Hilbert per frame (29.3) and 4x4x4 bricks (29.2, our `tiled`) are close, and 3D Hilbert is "
            "best (29.4); it credits Hilbert order with about 20% lower intra-block Q/K variance.",
            "recall of the masks and the variance ratios W per order (means over steps, layers, heads).")
        lines += [
            "| order | W_q | W_k | " + " | ".join(f"R @ γ={g} ({ab['method']})" for g in budgets) + " |",
            "|---|---|---|" + "---|" * len(budgets),
        ]
        for order, row in ab["orders"].items():
            lines.append(f"| {order} | {_fmt(row['W_q'])} | {_fmt(row['W_k'])} | "
                         + " | ".join(_fmt(row["recall"][g]) for g in budgets) + " |")
        lines.append("")
        for name in ("recall", "W_q", "W_k"):
            lines.append(f"- {name}: {_render_verdict(ab['verdict'][name])}")
        return lines + [""]


class _TileSize(_Claim):
    """6. dfs_tile at tiles 8 / 16 / 32, scored again from the stored Q/K (a capture stores one tile
    per method): recall at each budget, on the report's order."""

    def data(self) -> dict:
        ctx = self.ctx
        reader, n, block = ctx.reader, ctx.n, ctx.block
        captured_tile = reader.config.get("tile")
        base = {"order": ctx.order, "budget": ctx.mid_gamma, "captured_tile": captured_tile}
        qkv_steps = [s for s in reader.steps if reader.layout.has_qkv(s)]
        layers = [l for l in reader.layout.qkv_layers if l in reader.layers]
        if not qkv_steps or not layers:
            return {"tile_size": {**base, "tiles": {}, "verdict": _verdict(
                _NOT_MEASURABLE, f"the capture stores dfs_tile at tile {captured_tile} only and no Q/K to score "
                                 "other tiles; capture with --save-qkv")}}
        tiles = [t for t in _CLAIM_TILES if t <= block and block % t == 0]
        scale = reader.attrs.get("softmax_scale")
        scale = None if scale is None else float(scale)
        tok = reader.token_order(ctx.order)
        sums = {t: {g: [] for g in ctx.config.budgets} for t in tiles}
        oracle = {g: [] for g in ctx.config.budgets}
        for step in qkv_steps:
            for layer in layers:
                q, k, _ = reader.qkv(step, layer, branch=ctx.branch)
                qo, ko = tok.apply(q.float()), tok.apply(k.float())
                m = reader.block_mass(step, layer, ctx.order, branch=ctx.branch)
                for t in tiles:
                    scores = block_scores(qo, ko, "dfs_tile", tile=t, block=block, scale=scale)
                    for g in ctx.config.budgets:
                        sums[t][g].append(float(block_recall(m, select_topk(scores, g, seq_len=n, block=block)).mean()))
                for g in ctx.config.budgets:
                    oracle[g].append(float(oracle_recall(m, topk_count(g, -(-n // block)), seq_len=n, block=block).mean()))
        table = {str(t): {f"{g:g}": float(np.mean(v)) for g, v in sums[t].items()} for t in tiles}
        at = {t: table[str(t)][f"{ctx.mid_gamma:g}"] for t in tiles}
        if 16 not in at or len(at) < len(_CLAIM_TILES):
            verdict = _verdict(_NOT_MEASURABLE, f"blocks of {block} tokens take the tiles {tiles} only, not "
                                                f"{list(_CLAIM_TILES)}")
        else:
            best = max(at, key=lambda t: (at[t], t == 16))
            verdict = _verdict(_CONFIRMED if best == 16 else _REFUTED,
                               f"tile {best} keeps the most attention at γ = {ctx.mid_gamma:g}: "
                               + ", ".join(f"tile {t} {_fmt(at[t])}" for t in tiles))
        return {"tile_size": {**base, "steps": qkv_steps, "layers": layers, "tiles": table,
                              "oracle": {f"{g:g}": float(np.mean(v)) for g, v in oracle.items()}, "verdict": verdict}}

    @staticmethod
    def render(data: dict) -> list[str]:
        ts = data["tile_size"]
        lines = _claim_section(
            "6. Tile size of dfs_tile",
            "a pooling tile of 16 tokens gives the best video quality (PSNR 29.4) at no extra cost; it gives no "
            "numbers for other tiles.",
            "recall of dfs_tile's top-k masks at tiles 8 / 16 / 32, scored again from the stored Q/K.")
        if not ts["tiles"]:
            return lines + [_render_verdict(ts["verdict"]), ""]
        budgets = list(ts["oracle"])
        lines += [f"Order {ts['order']}, Q/K of layers {ts['layers']} at steps {ts['steps']} (the capture scored "
                  f"tile {ts['captured_tile']}). Scoring work grows as 1 / tile².", "",
                  "| tile | " + " | ".join(f"R @ γ={g}" for g in budgets) + " |", "|---|" + "---|" * len(budgets)]
        for tile, row in ts["tiles"].items():
            lines.append(f"| {tile} | " + " | ".join(_fmt(row[g]) for g in budgets) + " |")
        lines.append("| oracle | " + " | ".join(_fmt(ts["oracle"][g]) for g in budgets) + " |")
        return lines + ["", _render_verdict(ts["verdict"]), ""]


def _rank_correlation(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation of two equally long sequences (no ties expected)."""
    rx, ry = (np.argsort(np.argsort(np.asarray(v))).astype(float) for v in (x, y))
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


class _StepTrend(_Claim):
    """7. Recall at fixed budgets across the denoising steps (the paper: it rises as denoising
    proceeds), per method on the report's order."""

    def __init__(self, ctx: _Context) -> None:
        super().__init__(ctx)
        self.by_step: dict[str, dict[float, dict[int, list[float]]]] = {}

    def add(self, cell: _Cell) -> None:
        if cell.order != self.ctx.order:
            return
        for method in cell.methods:
            for budget in method.budgets:
                self.by_step.setdefault(method.name, {}).setdefault(budget.gamma, {}).setdefault(cell.step, []).append(
                    float(budget.topk.recall.mean()))

    def data(self) -> dict:
        ctx = self.ctx
        steps = ctx.reader.steps
        methods = {}
        for meth, per_gamma in self.by_step.items():
            series = {f"{g:g}": [float(np.mean(per_step[s])) for s in steps] for g, per_step in per_gamma.items()}
            mid = series[f"{ctx.mid_gamma:g}"]
            if len(steps) < 2:
                verdict = _verdict(_NOT_MEASURABLE, "one captured step; capture several (--capture-steps)")
            else:
                rho = _rank_correlation(steps, mid)
                monotone = bool(np.all(np.diff(mid) >= 0))
                rises = mid[-1] > mid[0] and rho > 0
                verdict = _verdict(_CONFIRMED if rises else _REFUTED,
                                   f"γ = {ctx.mid_gamma:g}: {_fmt(mid[0])} at step {steps[0]}, {_fmt(mid[-1])} at step "
                                   f"{steps[-1]}, rank correlation with the step {_fmt(rho, 2)}, "
                                   f"{'monotone' if monotone else 'not monotone'}")
            methods[meth] = {"recall": series, "verdict": verdict}
        return {"step_trend": {"order": ctx.order, "budget": ctx.mid_gamma, "steps": steps, "methods": methods}}

    @staticmethod
    def render(data: dict) -> list[str]:
        st = data["step_trend"]
        gamma = f"{st['budget']:g}"
        lines = _claim_section(
            "7. Recall across denoising steps",
            "the recall of block mean pooling at a fixed sparsity rises monotonically as denoising proceeds "
            "(attention diffuse at high noise, concentrated later), the reason its budget shrinks over the steps; "
            "it plots the trend without giving values.",
            f"recall at γ = {gamma} per captured step, {st['order']} order, means over layers and heads.")
        lines += ["| method | " + " | ".join(f"step {s}" for s in st["steps"]) + " | verdict |",
                 "|---|" + "---|" * (len(st["steps"]) + 1)]
        for meth, row in st["methods"].items():
            lines.append(f"| {meth} | " + " | ".join(_fmt(r) for r in row["recall"][gamma]) + f" | "
                         f"{row['verdict']['verdict']} |")
        lines.append("")
        lines += [f"- {meth}: {_render_verdict(row['verdict'])}" for meth, row in st["methods"].items()]
        return lines + [""]


class _TextBlocks(_Claim):
    """8. The share of attention mass that video queries give the text key blocks (the blocks
    DFSAttn forces into every mask), against their share of the tokens, and what plain top-k
    would leave out of them."""

    def __init__(self, ctx: _Context) -> None:
        super().__init__(ctx)
        grid = ctx.reader.grid
        self.text = text_blocks(grid, ctx.n, ctx.block)
        self.share: dict[int, list[float]] = {}
        self.missed: list[float] = []
        self.lost: list[float] = []

    def add(self, cell: _Cell) -> None:
        ctx = self.ctx
        if not self.text or cell.order != ctx.order:
            return
        mk = cell.stats.m.shape[-1]
        video = [u for u in range(mk) if u not in self.text]
        m = cell.stats.m.double()[:, :, video]
        text_mass = m[..., self.text].sum(-1)                                       # [B, H, video rows]
        self.share.setdefault(cell.step, []).append(float(text_mass.mean()))
        for method in cell.methods:
            if method.name == ctx.method:
                budget = next(b for b in method.budgets if b.gamma == ctx.mid_gamma)
                kept = budget.topk.mask.to_dense()[:, :, video][..., self.text]     # [B, H, rows, text blocks]
                self.missed.append(float((~kept.all(-1)).double().mean()))
                self.lost.append(float((m[..., self.text] * (~kept)).sum(-1).mean()))

    def data(self) -> dict:
        ctx = self.ctx
        grid = ctx.reader.grid
        if not self.text:
            return {"text_blocks": {"blocks": [], "verdict": _verdict(
                _NOT_MEASURABLE, f"the model ({ctx.reader.attrs.get('model_class')}) has no text tokens in its "
                                 "self-attention (text, where a model has it, enters through cross-attention, "
                                 "which DFSAttn leaves dense)")}}
        n, block = ctx.n, ctx.block
        tokens = sum(min(block, n - b * block) for b in self.text)
        share = float(np.mean([v for vs in self.share.values() for v in vs]))
        token_share = tokens / n
        verdict = _verdict(_CONFIRMED if share > token_share else _REFUTED,
                           f"video queries give the text blocks {_fmt(share)} of their attention, "
                           f"{share / token_share:.1f}x their {_fmt(token_share)} share of the tokens")
        return {"text_blocks": {
            "blocks": self.text, "text_tokens": grid.text_len, "block_tokens": tokens, "token_share": token_share,
            "mass_share": share, "by_step": {str(s): float(np.mean(v)) for s, v in self.share.items()},
            "method": ctx.method, "budget": ctx.mid_gamma, "order": ctx.order,
            "rows_missing_a_text_block": float(np.mean(self.missed)), "mass_left_out": float(np.mean(self.lost)),
            "verdict": verdict}}

    @staticmethod
    def render(data: dict) -> list[str]:
        tb = data["text_blocks"]
        lines = _claim_section(
            "8. Text blocks",
            "with text in the self-attention sequence (HunyuanVideo) the text key blocks are kept in every video "
            "query block's mask, inside the budget, and text query rows stay dense; it gives no measured share "
            "of attention.",
            "the mass video queries give those blocks.")
        if not tb["blocks"]:
            return lines + [_render_verdict(tb["verdict"]), ""]
        lines += [
            f"Text key blocks {tb['blocks']} ({tb['text_tokens']} text tokens, {tb['block_tokens']} tokens in the "
            f"blocks, {_fmt(tb['token_share'])} of the sequence) take {_fmt(tb['mass_share'])} of the video queries' "
            f"attention mass ({tb['order']}; per step: "
            + ", ".join(f"{s}: {_fmt(v)}" for s, v in tb["by_step"].items()) + ").",
            f"Plain top-k of {tb['method']} at γ = {tb['budget']:g}, without forcing, leaves a text block out of "
            f"{_fmt(tb['rows_missing_a_text_block'])} of the video query blocks and "
            f"{_fmt(tb['mass_left_out'])} of their attention mass with it.", "",
            _render_verdict(tb["verdict"]), ""]
        return lines


class _Footprint(_Claim):
    """A figure only: where one query block's attention lands in the video, with the kept keys."""

    def figures(self) -> dict:
        ctx = self.ctx
        reader = ctx.reader
        if not reader.layout.footprints:
            return {}
        head, step, layer, order, gamma = reader.heads[0], ctx.mid_step, ctx.mid_layer, ctx.order, ctx.mid_gamma
        blocks, attention = reader.footprints(step, layer, order, head, branch=ctx.branch)
        u = int(blocks[0])
        perm = reader.perm(order)
        scores = reader.scores(step, layer, order, ctx.method, head=head, branch=ctx.branch)
        n, block = ctx.n, ctx.block
        kept_blocks = select_topk(scores, gamma, seq_len=n, block=block).to_dense()[0, 0, u]
        ordered_kept = kept_blocks.repeat_interleave(block)[:n]
        kept = torch.zeros(n, dtype=torch.bool)
        kept[perm[ordered_kept]] = True
        query = torch.zeros(n, dtype=torch.bool)
        query[perm[u * block:(u + 1) * block]] = True
        return {"footprint": figures.footprint_frames(
            attention[0], reader.grid, kept_tokens=kept, query_tokens=query,
            title=f"Query block {u} ({order}), step {step}, layer {layer}, head {head}<br>"
                  f"<sup>keys kept by {ctx.method} at γ = {gamma:g} outlined white, the query block cyan</sup>")}


#: The claims in the order of the report's sections.
_CLAIMS: tuple[type[_Claim], ...] = (_Bounds, _OrderComparison, _Recall, _Drift, _OrderAblation, _TileSize, _StepTrend,
                                      _TextBlocks, _Footprint)


# --------------------------------------------------------------------------------- building
def _pick(value: str | None, available: list[str], preferred: str, name: str) -> str:
    if value is None:
        return preferred if preferred in available else available[0]
    if value not in available:
        raise ValueError(f"`{name}` must be one of the capture's {name}s {available} (got {value!r})")
    return value


def build_report(capture, config: ReportConfig | None = None, *, progress: bool = False) -> ClaimsReport:
    """Check the claims of docs/theory.md and the DFSAttn paper on one capture.

    Args:
        capture: a path to a capture file or an open ``CaptureReader`` (``dfsviz.open``).
        config: :class:`ReportConfig` (defaults: budgets 0.1/0.2/0.3, targets 0.9/0.95).
        progress: show a tqdm bar over the (step, layer, order) maps read.

    Returns:
        :class:`ClaimsReport` (numbers in ``.data``, figures in ``.figures``); nothing is written.

    Raises ValueError when the file fails ``CaptureReader.validate()`` (a report of damaged
    maps would be wrong): the message names the first problems.
    """
    from dfsviz.capture.reader import CaptureReader, open_capture

    config = ReportConfig() if config is None else config
    if not isinstance(config, ReportConfig):
        raise TypeError(f"`config` must be a ReportConfig (got {type(config).__name__})")
    own = not isinstance(capture, CaptureReader)
    if own:
        if not isinstance(capture, (str, os.PathLike)):
            raise TypeError(f"`capture` must be a file path or a CaptureReader (got {type(capture).__name__})")
        reader = open_capture(capture)
    else:
        reader = capture
    try:
        return _build(reader, config, progress)
    finally:
        if own:
            reader.close()


def _context(reader, config: ReportConfig) -> _Context:
    """Check that the capture can be reported on and make the choices every claim shares."""
    reader.require_valid("report")
    steps, methods = reader.steps, reader.methods
    if not methods:
        raise ValueError("the capture holds no scoring method; capture with --methods meanpool,dfs_tile")
    if not steps:
        raise ValueError(f"capture {str(reader.path)!r} holds no completed step; nothing to report")
    if config.branch not in reader.branches:
        raise ValueError(f"`branch` must be one of the capture's branches {reader.branches} (got {config.branch!r})")
    method = _pick(config.method, methods, "dfs_tile", "method")
    order = _pick(config.order, reader.orders, "hilbert3d", "order")
    num_steps = int(reader.attrs.get("num_steps", max(steps) + 1))
    schedule = config.schedule or default_schedule(max(num_steps, max(steps) + 1))
    notes: list[str] = []
    if not reader.complete:
        notes.append(f"The capture is incomplete: steps {reader.steps} of {reader.planned_steps} were analysed.")
    return _Context(reader, config, method, order, schedule, config.branch, notes)


def _build(reader, config: ReportConfig, progress: bool) -> ClaimsReport:
    from tqdm.auto import tqdm

    ctx = _context(reader, config)
    claims = [claim(ctx) for claim in _CLAIMS]
    cells = len(reader.steps) * len(reader.layers) * len(reader.orders)
    for cell in tqdm(_read(ctx), total=cells, unit="map", desc="report", disable=not progress):
        for claim in claims:
            claim.add(cell)
    grid, block = reader.grid, reader.block
    data: dict = {
        "run": {
            "path": str(reader.path), "model": reader.attrs.get("model_id"), "grid": grid.name, "num_tokens": ctx.n,
            "block": block, "num_blocks": -(-ctx.n // block), "steps": reader.steps, "layers": reader.layers,
            "heads": reader.heads, "orders": reader.orders, "methods": reader.methods, "complete": reader.complete,
            "branch": ctx.branch,
        },
        "config": {"budgets": list(config.budgets), "targets": list(config.targets), "atol": config.atol,
                   "method": ctx.method, "order": ctx.order, "max_points": config.max_points, "bound1": config.bound1},
    }
    for claim in claims:
        data.update(claim.data())
    figs: dict = {}
    for claim in sorted(claims, key=lambda c: not c.headline):
        figs.update(claim.figures())
    return ClaimsReport(data=data, figures=figs, notes=ctx.notes)


def _bound1_check(reader, steps, orders, method, gamma, branch, atol) -> dict | None:
    """Bound 1 (row-wise) against the exact row recall, on the layers and steps whose Q/K the
    capture stored (``--save-qkv``, ``--qkv-steps``): every such step and order, ``method``'s
    mask at budget ``gamma``. Returns None when no completed step holds Q/K."""
    layers = list(reader.layout.qkv_layers)
    qkv_steps = [s for s in steps if reader.layout.has_qkv(s)]
    if not qkv_steps:
        return None
    scale = reader.attrs.get("softmax_scale")
    scale = None if scale is None else float(scale)
    n, block = reader.grid.num_tokens, reader.block
    rows = bad = 0
    worst = -math.inf
    for step in qkv_steps:
        for layer in layers:
            q, k, _ = reader.qkv(step, layer, branch=branch)
            q, k = q.float(), k.float()
            for order in orders:
                tok = reader.token_order(order)
                qo, ko = tok.apply(q), tok.apply(k)
                mask = select_topk(reader.scores(step, layer, order, method, branch=branch), gamma, seq_len=n, block=block)
                excess = row_bound(qo, ko, mask, scale) - row_recall_ref(qo, ko, mask, scale)
                rows += excess.numel()
                bad += int((excess > atol).sum())
                worst = max(worst, float(excess.max()))
    return {"layers": layers, "steps": qkv_steps, "method": method, "budget": gamma, "rows": rows, "violations": bad,
            "atol": atol, "max_excess": worst}


def _change(table: FactorTable, factor: str, **kw) -> dict:
    """order_change, or a row of None with the reason when nothing can be compared (e.g. a budget
    of 1 keeps every block, so every gap is +inf)."""
    try:
        return order_change(table, factor, **kw)
    except ValueError as err:
        return {"factor": factor, "base": "raster", "other": "hilbert3d", "pairs": 0, "base_mean": None,
                "other_mean": None, "difference": None, "relative_change": None, "other_lower": 0,
                "other_lower_share": None, "reason": str(err)}


def _replayable(schedule: DFSSchedule, step: int, captured: list[int]) -> bool:
    """True when ``step`` is dense or the refresh step whose mask it uses was captured."""
    if step >= schedule.num_steps:
        return False
    # Layer 0 of a schedule without dense layers stands for every sparse layer here.
    source = mask_source_step(dataclasses.replace(schedule, dense_layers=()), step)
    return source is None or source in captured

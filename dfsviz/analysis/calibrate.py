"""Calibration: from one or more captures to a per-(layer, head) DFSAttn plan (``dfsviz calibrate``).

For the chosen order and each scoring method the captures hold, every pair of captured steps
s <= t of a capture (a clip) gives, per (layer, head), the recall of the top-k-by-score mask of
step s measured with the block mass of step t, for every k = 1..Mk at once
(:func:`dfsviz.analysis.curves.recall_curve` with the scores of s and the mass of t): s = t is
the fresh recall curve, s < t the recall of a mask cached for t - s steps. From these:

* fresh curve F(k): the mean over clips and captured steps t >= W (the sparse part of the
  schedule) of the fresh recall; density rho(k) likewise (docs/theory.md: short last block and
  text rows counted exactly);
* reuse factor rho_d(k): the mean over clips and captured pairs W <= s < t with t - s = d of
  recall(s -> t) / recall(t -> t), linear between captured lags (1 at lag 0), capped at 1;
* predicted recall of a head at budget k under warm-up W and refresh interval I:
  P(k) = F(k) * min_{d < min(I, T - W)} rho_d(k), its recall at the last step before each
  refresh, where the cached mask is oldest.

Budgets (``CalibrationConfig``):

* ``target_recall`` R: per head. Every sparse (layer, head) gets the smallest k with P(k) >= R;
  heads are independent, so this is the smallest total density. A head that needs a kept
  fraction above ``dense_above`` runs dense.
* ``max_density`` D: the attention work of the whole run, as a fraction of dense attention at
  every step (warm-up steps count 1, each refresh ``refresh_cost``). The work left to the sparse
  steps is allocated greedily across all heads by marginal recall per unit of density
  (:func:`allocate_max_recall`): a knapsack over the recall curves, solved on each curve's
  upper concave hull.

The schedule: W runs over the captured steps (a plan's first mask is computed at a captured
step), I over the intervals whose oldest cached mask a captured pair covers; every candidate
gets its own budgets, and the plan keeps the one with the least attention work (target) or the
best recall of the run (max density). The scoring method is chosen the same way among the
captured methods. ``docs/calibration.md`` gives the file format and the reasoning.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from dfsviz.accel.plan import (
    CalibratedPlan,
    LayerBudget,
    ModelIdentity,
    gamma_for_count,
    public_config,
    select_topk_heads,
    text_blocks,
)
from dfsviz.analysis.curves import RecallCurve, recall_curve
from dfsviz.analysis.drift import mask_drift, mask_source_step
from dfsviz.analysis.measures import ORACLE
from dfsviz.sparse._validate import block_flags
from dfsviz.sparse.schedule import DFSSchedule

__all__ = ["Calibration", "CalibrationConfig", "allocate_max_recall", "allocate_target", "calibrate"]

log = logging.getLogger(__name__)

#: Attention work of one mask refresh (block scoring + top-k selection) in units of one dense
#: attention call of the layer. Measured end to end on one H200 (docs/accel.md): 0.025
#: (Wan2.1-14B, 720p) to 0.09 (Wan2.1-1.3B, 480p).
DEFAULT_REFRESH_COST = 0.05
#: Above this kept fraction the block-sparse kernel gains nothing on cuDNN dense attention
#: (its effective throughput is 0.81-0.88x cuDNN's, docs/kernels.md): such heads run dense.
DEFAULT_DENSE_ABOVE = 0.85
# Density sums that exceed a budget by less than this fit it; recalls below it are zero.
_SLACK = 1e-9
# Heads whose hull slopes ([heads, Mk, Mk] float64) are computed at once.
_HULL_CHUNK = 16
# Objectives closer than this are ties (then the larger interval, then the earlier warm-up wins).
_TIE = 1e-12


# --------------------------------------------------------------------------- settings
def _fraction(value: object, name: str, hint: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) <= 1.0:
        raise ValueError(f"`{name}` must be a fraction in (0, 1] (got {value!r}); {hint}")
    return float(value)


@dataclass(frozen=True)
class CalibrationConfig:
    """Settings of :func:`calibrate` (exactly one of ``target_recall`` and ``max_density``).

    Fields:
        target_recall: recall every sparse (layer, head) must keep, in (0, 1], e.g. 0.9.
        max_density: attention work of the whole run, in (0, 1], as a fraction of dense
            attention at every step (dense warm-up steps count 1, each refresh ``refresh_cost``).
        order: token order; None = hilbert3d when every capture holds it, else their first common order.
        method: scoring method; None = every method the captures hold, the best one kept.
        branch: captured CFG branch to calibrate on ("cond" or "uncond").
        warmup_steps: fix the dense warm-up steps (>= 0); None = choose among the captured steps.
        interval: fix the refresh interval in steps (>= 1); None = choose.
        dense_above: heads needing a larger kept fraction run dense (target mode), in (0, 1].
        refresh_cost: work of one refresh in dense attention calls of the layer, in [0, 1).
    """

    target_recall: float | None = None
    max_density: float | None = None
    order: str | None = None
    method: str | None = None
    branch: str = "cond"
    warmup_steps: int | None = None
    interval: int | None = None
    dense_above: float = DEFAULT_DENSE_ABOVE
    refresh_cost: float = DEFAULT_REFRESH_COST

    def __post_init__(self) -> None:
        if (self.target_recall is None) == (self.max_density is None):
            raise ValueError(
                f"pass exactly one of `target_recall` (recall every head keeps) or `max_density` (attention work "
                f"of the run); got {'neither' if self.target_recall is None else 'both'}"
            )
        if self.target_recall is not None:
            _fraction(self.target_recall, "target_recall", "e.g. 0.9")
        if self.max_density is not None:
            _fraction(self.max_density, "max_density", "e.g. 0.3: the run computes 30% of dense attention")
        for name in ("order", "method"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise TypeError(f"`{name}` must be a str or None (got {type(getattr(self, name)).__name__})")
        if self.branch not in ("cond", "uncond"):
            raise ValueError(f"`branch` must be 'cond' or 'uncond' (got {self.branch!r})")
        for name, low in (("warmup_steps", 0), ("interval", 1)):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
                raise ValueError(f"`{name}` must be an integer >= {low} (got {value!r}); leave it out to have it chosen")
        _fraction(self.dense_above, "dense_above", "heads needing a larger kept fraction run dense; 0.85 by default")
        c = self.refresh_cost
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not 0.0 <= float(c) < 1.0:
            raise ValueError(f"`refresh_cost` must be in [0, 1), in dense attention calls (got {c!r}); 0.05 by default")

    @property
    def mode(self) -> str:
        """"target_recall" or "max_density"."""
        return "target_recall" if self.target_recall is not None else "max_density"


# --------------------------------------------------------------------------- allocation
def allocate_target(curve: RecallCurve, target: float, k_min: int = 1) -> torch.Tensor:
    """Per head, the smallest k >= ``k_min`` whose recall reaches ``target``.

    Args:
        curve: predicted recall of every k (:class:`~dfsviz.analysis.curves.RecallCurve`, [*, Mk]).
        target: recall in (0, 1]; k = Mk always qualifies (:meth:`RecallCurve.needed_k`).
        k_min: smallest allowed k (1, or the forced text blocks + 1).

    Returns:
        int64 [*]: k in [k_min, Mk].
    """
    recall = curve.recall.clone()
    recall[..., : k_min - 1] = 0.0  # budgets below k_min are not allowed: they never count as reaching it
    return RecallCurve(recall, curve.density, curve.seq_len, curve.block).needed_k(target)


def _hull_segments(x: torch.Tensor, y: torch.Tensor, k_min: int) -> list[tuple[int, int, int, float, float]]:
    """Segments (head, k_from, k_to, gain, cost) of the upper concave hull of each head's points
    (x[h, k - 1], y[h, k - 1]), k = k_min..Mk (x strictly increasing in k)."""
    heads, mk = x.shape
    j = torch.arange(mk)
    later = j[None, :] > j[:, None]                        # [i, j]: j after i
    out = []
    for lo in range(0, heads, _HULL_CHUNK):
        xs, ys = x[lo:lo + _HULL_CHUNK], y[lo:lo + _HULL_CHUNK]
        dx = xs[:, None, :] - xs[:, :, None]               # [h, i, j] = x_j - x_i
        slope = (ys[:, None, :] - ys[:, :, None]) / torch.where(later, dx, torch.ones_like(dx))
        slope = torch.where(later, slope, torch.full_like(slope, -math.inf))
        # The farthest point of the largest slope, so collinear points make one segment.
        best = slope.max(dim=-1, keepdim=True).values
        nxt = ((mk - 1) - torch.flip(slope >= best - 1e-15, dims=[-1]).to(torch.int8).argmax(dim=-1)).tolist()
        xl, yl = xs.tolist(), ys.tolist()
        for h in range(len(xl)):
            cur = k_min - 1
            while cur < mk - 1:
                to = nxt[h][cur]
                out.append((lo + h, cur + 1, to + 1, yl[h][to] - yl[h][cur], xl[h][to] - xl[h][cur]))
                cur = to
    return out


def allocate_max_recall(curve: RecallCurve, budget: float, k_min: int = 1) -> torch.Tensor | None:
    """Per head, k maximising the summed recall under a summed-density budget (greedy knapsack).

    Each head starts at ``k_min``; then the segments of every head's upper concave recall curve
    (density on x) are taken in order of recall gained per density spent; a segment that does not
    fit the budget left ends its head's allocation, the other heads go on. Greedy is exactly
    optimal when every curve is concave and every block costs the same density (N a multiple of
    the block): each segment is then one block, and adding the block of largest marginal recall
    is the classical optimum of a separable concave maximisation under a cardinality budget.
    Otherwise its summed recall is within the gain of one hull segment of the optimum (the
    fractional knapsack bound); its k always lie on the curves (hull vertices).

    Args:
        curve: predicted recall and density of every k (:class:`~dfsviz.analysis.curves.RecallCurve`,
            [*, Mk]; every leading entry is a head), density strictly increasing in k.
        budget: the largest density summed over the heads.
        k_min: every head's smallest k.

    Returns:
        int64 [*] in [k_min, Mk], or None when even k_min everywhere exceeds ``budget``.
    """
    mk = curve.num_kv_blocks
    x, y = curve.density.reshape(-1, mk), curve.recall.reshape(-1, mk)
    k = torch.full((x.shape[0],), k_min, dtype=torch.int64)
    left = budget - float(x[:, k_min - 1].sum())
    if left < -_SLACK:
        return None
    segments = sorted(_hull_segments(x, y, k_min), key=lambda s: s[3] / max(s[4], 1e-300), reverse=True)
    closed = set()  # heads whose next segment did not fit: their later segments start from it
    for head, _, to, _, cost in segments:
        if head in closed:
            continue
        if cost > left + _SLACK:
            closed.add(head)
            continue
        left -= cost
        k[head] = to
    return k.reshape(curve.recall.shape[:-1])


# --------------------------------------------------------------------------- captures
@dataclass
class _Clip:
    """The recall curves of one capture for one method: fresh and cached, every k."""

    steps: tuple[int, ...]
    fresh: torch.Tensor                                    # float64 [S, L, H, Mk]
    density: torch.Tensor                                  # float64 [S, L, H, Mk]
    pairs: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)  # (s, t) -> [L, H, Mk]


def _tile_of(reader, method: str) -> int | None:
    raw = reader.attrs.get("method_tiles")
    if raw is not None:
        return json.loads(raw).get(method)
    cfg = reader.config
    return {"dfs_tile": cfg.get("tile"), "antidiagonal": cfg.get("stride")}.get(method)


def _plain(value):
    """JSON-ready scalars and lists (h5py hands back numpy types)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


def _num_steps(reader) -> int:
    """Steps of the captured run's schedule (the capture's ``num_steps``)."""
    return int(reader.attrs.get("num_steps", max(reader.steps) + 1))


def _check_pool(readers: list, config: CalibrationConfig) -> None:
    """One clear line when captures cannot be pooled or lack what calibration needs."""
    first = readers[0]
    seen: dict = {}
    for r in readers:
        key = Path(r.path).resolve()
        if key in seen:
            raise ValueError(f"capture {str(r.path)!r} is listed twice; pool each capture once")
        seen[key] = r
        if not r.steps:
            raise ValueError(f"capture {str(r.path)!r} holds no completed step; capture at least two steps")
        if len(r.steps) < 2:
            raise ValueError(
                f"capture {str(r.path)!r} has one captured step ({r.steps[0]}); calibration needs at least two "
                "captured steps for drift (the recall of a mask reused at a later step): capture with "
                "--capture-steps listing two or more steps"
            )
        if not r.methods:
            raise ValueError(f"capture {str(r.path)!r} holds no block scores; capture with --methods dfs_tile")
        if config.branch not in r.branches:
            raise ValueError(f"capture {str(r.path)!r} has branches {r.branches}, not {config.branch!r}; "
                             "pass --branch cond or capture with --branches both")

    def facts(r) -> dict:
        return {"models": f"{r.attrs.get('model_id')} ({r.attrs.get('model_class')})", "grids": r.grid.name,
                "blocks": r.block, "layers": r.layers, "heads": r.heads, "numbers of steps": _num_steps(r)}

    mine = facts(first)
    for r in readers[1:]:
        for what, theirs in facts(r).items():
            if mine[what] != theirs:
                raise ValueError(
                    f"captures of different {what} cannot be pooled: {str(first.path)!r} has {mine[what]}, "
                    f"{str(r.path)!r} has {theirs}; calibrate each model and setting apart"
                )


def _pick_order(readers: list, order: str | None) -> str:
    common = [o for o in readers[0].orders if all(o in r.orders for r in readers)]
    if order is not None:
        missing = [str(r.path) for r in readers if order not in r.orders]
        if missing:
            raise ValueError(f"`order` {order!r} is not in capture(s) {missing}; captured orders: {common}")
        return order
    if not common:
        raise ValueError("the captures share no token order; capture them with the same --orders")
    return "hilbert3d" if "hilbert3d" in common else common[0]


@contextlib.contextmanager
def _named_damage(readers: list):
    """A map that fails a check as it is read (a damaged capture): the ValueError names the file
    and its problems as ``dfsviz inspect`` does, not the check's own words."""
    try:
        yield
    except ValueError:
        for r in readers:
            r.require_valid("calibration")
        raise


def _pick_methods(readers: list, method: str | None) -> list[str]:
    # the oracle scores blocks by their exact mass, a dense attention pass at every refresh: the
    # reference a plan is measured against, never a plan's method
    common = [m for m in readers[0].methods if m != ORACLE and all(m in r.methods for r in readers)]
    if method == ORACLE:
        raise ValueError(f"`method` {ORACLE!r} scores blocks by a dense attention pass at every refresh: it is the "
                         f"reference, not a method to calibrate; pick one of {common}" if common else
                         f"`method` {ORACLE!r} is the reference, not a method to calibrate")
    if method is not None:
        if method not in common:
            raise ValueError(f"`method` {method!r} is not in every capture; methods they all hold: {common}")
        return [method]
    if not common:
        raise ValueError("the captures share no scoring method other than the oracle (the dense reference); capture "
                         "them with the same --methods, e.g. dfs_tile")
    tiles = {m: [_tile_of(r, m) for r in readers] for m in common}
    mixed = [m for m, t in tiles.items() if len(set(t)) > 1]
    if mixed:
        shown = "; ".join(f"{m}: {tiles[m]}" for m in mixed)
        raise ValueError(f"the captures scored with different tiles ({shown}, capture by capture); calibrate "
                         "captures of one tile together")
    return common


def _read_clip(reader, order: str, methods: list[str], branch: str, forced, dense_q, bar) -> dict[str, _Clip]:
    """Fresh and cached recall curves of every method, from one capture (one read of each map)."""
    steps, layers = tuple(reader.steps), reader.layers
    n, block = reader.grid.num_tokens, reader.block
    kw = dict(seq_len=n, block=block, forced_kv=forced, dense_q=dense_q)
    fresh = {m: [[None] * len(layers) for _ in steps] for m in methods}
    dens = {m: [[None] * len(layers) for _ in steps] for m in methods}
    pairs = {m: {} for m in methods}
    for li, layer in enumerate(layers):
        masses = [reader.block_mass(t, layer, order, branch=branch) for t in steps]
        for m in methods:
            scores = [reader.scores(t, layer, order, m, branch=branch) for t in steps]
            for i, s in enumerate(steps):
                for j in range(i, len(steps)):
                    curve = recall_curve(masses[j], scores[i], **kw)
                    if i == j:
                        fresh[m][i][li], dens[m][i][li] = curve.recall[0], curve.density[0]
                    else:
                        pairs[m].setdefault((s, steps[j]), [None] * len(layers))[li] = curve.recall[0]
        if bar is not None:
            bar.update(1)
    return {
        m: _Clip(steps, torch.stack([torch.stack(r) for r in fresh[m]]), torch.stack([torch.stack(r) for r in dens[m]]),
                 {key: torch.stack(v) for key, v in pairs[m].items()})
        for m in methods
    }


# --------------------------------------------------------------------------- prediction
@dataclass
class _Pooled:
    """Curves pooled over clips for one warm-up W: fresh recall, density and the reuse factor by lag."""

    fresh: torch.Tensor            # [L, H, Mk]
    density: torch.Tensor          # [L, H, Mk]
    by_clip: list                  # per clip: fresh [L, H, Mk] or None (no captured step >= W)
    reuse: torch.Tensor            # [D + 1, L, H, Mk]: cumulative min over lags 0..d of the reuse factor
    lags: tuple[int, ...]          # captured lags (> 0) from pairs with s >= W
    seq_len: int
    block: int


def _pool(clips: list[_Clip], warmup: int, seq_len: int, block: int) -> _Pooled | None:
    fresh, dens, by_clip, ratios = [], [], [], {}
    for clip in clips:
        keep = [i for i, t in enumerate(clip.steps) if t >= warmup]
        by_clip.append(clip.fresh[keep].mean(dim=0) if keep else None)
        fresh += [clip.fresh[i] for i in keep]
        dens += [clip.density[i] for i in keep]
        index = {t: i for i, t in enumerate(clip.steps)}
        for (s, t), rec in clip.pairs.items():
            if s >= warmup:
                base = clip.fresh[index[t]]
                ratio = torch.where(base > _SLACK, rec / base.clamp_min(_SLACK), torch.ones_like(rec))
                ratios.setdefault(t - s, []).append(ratio)
    if not fresh:
        return None
    lags = tuple(sorted(ratios))
    shape = fresh[0].shape
    points = {0: torch.ones(shape, dtype=torch.float64)}
    points.update({d: torch.stack(ratios[d]).mean(dim=0).clamp(max=1.0) for d in lags})
    known = sorted(points)
    reuse = []
    for d in range(known[-1] + 1):
        hi = next(b for b in known if b >= d)
        lo = max(a for a in known if a <= d)
        value = points[d] if d in points else points[lo] + (points[hi] - points[lo]) * (d - lo) / (hi - lo)
        reuse.append(value if not reuse else torch.minimum(reuse[-1], value))
    return _Pooled(torch.stack(fresh).mean(dim=0), torch.stack(dens).mean(dim=0), by_clip, torch.stack(reuse), lags,
                   seq_len, block)


@dataclass
class _Candidate:
    """One (method, W, I) with its budgets and predictions."""

    method: str
    warmup: int
    interval: int
    k: torch.Tensor                # int64 [L, H]
    dense: torch.Tensor            # bool [L, H]
    recall: torch.Tensor           # [L, H] predicted (1 for dense heads)
    density: torch.Tensor          # [L, H] (1 for dense heads)
    by_clip: list                  # per clip: [L, H] or None
    reuse: torch.Tensor            # [L, H] reuse factor at the chosen k
    num_steps: int
    refresh_cost: float

    @property
    def sparse_steps(self) -> int:
        return self.num_steps - self.warmup

    @property
    def refreshes(self) -> int:
        return -(-self.sparse_steps // self.interval)

    @property
    def mean_recall(self) -> float:
        return float(self.recall.mean())

    @property
    def mean_density(self) -> float:
        return float(self.density.mean())

    @property
    def run_recall(self) -> float:
        return (self.warmup + self.sparse_steps * self.mean_recall) / self.num_steps

    @property
    def run_density(self) -> float:
        return (self.warmup + self.sparse_steps * self.mean_density) / self.num_steps

    @property
    def work(self) -> float:
        # Every layer with a sparse head scores all its heads at a refresh; dense layers score nothing.
        scored = float((~self.dense).any(dim=1).to(torch.float64).mean())
        return self.run_density + self.refreshes * self.refresh_cost * scored / self.num_steps

    def summary(self) -> dict:
        return {"warmup_steps": self.warmup, "interval": self.interval, "refreshes": self.refreshes,
                "mean_recall": self.mean_recall, "mean_density": self.mean_density, "run_recall": self.run_recall,
                "run_density": self.run_density, "attention_work": self.work,
                "dense_heads": int(self.dense.sum()), "heads": self.dense.numel()}


def _evaluate(method: str, pooled: _Pooled, warmup: int, interval: int, T: int, k_min: int,
              config: CalibrationConfig) -> _Candidate | None:
    oldest = min(interval, T - warmup) - 1
    reuse = pooled.reuse[oldest]
    pred = pooled.fresh * reuse                                       # [L, H, Mk]
    layers, heads, mk = pred.shape
    curve = RecallCurve(pred, pooled.density, pooled.seq_len, pooled.block, method)
    if config.target_recall is not None:
        k = allocate_target(curve, config.target_recall, k_min)
        dense = (k.to(torch.float64) / mk > config.dense_above) | (k == mk)
    else:
        # The run's work D pays for the warm-up and the refreshes (of every layer, an upper bound)
        # first; the rest buys kept blocks.
        sparse = T - warmup
        refresh = -(-sparse // interval) * config.refresh_cost
        budget = (config.max_density * T - warmup - refresh) / sparse * layers * heads
        k = allocate_max_recall(curve, budget, k_min)
        if k is None:
            return None
        dense = k == mk
    k = torch.where(dense, torch.full_like(k, mk), k)
    idx = (k - 1).unsqueeze(-1)

    def at(x: torch.Tensor) -> torch.Tensor:
        return torch.where(dense, torch.ones((), dtype=torch.float64), x.gather(-1, idx).squeeze(-1))

    by_clip = [None if f is None else at(f * reuse) for f in pooled.by_clip]
    return _Candidate(method, warmup, interval, k, dense, at(pred), at(pooled.density), by_clip, at(reuse), T,
                      config.refresh_cost)


def _better(a: _Candidate, b: _Candidate | None, mode: str) -> bool:
    """True when candidate a beats b (least work / best run recall; ties: larger interval, earlier warm-up)."""
    if b is None:
        return True
    primary = (b.work - a.work) if mode == "target_recall" else (a.run_recall - b.run_recall)
    if abs(primary) > _TIE:
        return primary > 0
    if mode == "max_density" and abs(a.work - b.work) > _TIE:
        return a.work < b.work
    return (a.interval, -a.warmup) > (b.interval, -b.warmup)


def _search(method: str, clips: list[_Clip], T: int, k_min: int, seq_len: int, block: int, config: CalibrationConfig,
            notes: list[str]) -> tuple[_Candidate | None, list[_Candidate]]:
    """Every (W, I) candidate of one method; the best and all feasible ones."""
    captured = sorted({t for c in clips for t in c.steps})
    warmups = [config.warmup_steps] if config.warmup_steps is not None else captured
    best, tried = None, []
    for w in warmups:
        if w >= T:
            raise ValueError(f"`warmup_steps` must be below the {T} steps of the captured schedule (got {w})")
        pooled = _pool(clips, w, seq_len, block)
        if pooled is None:
            raise ValueError(f"`warmup_steps` {w} leaves no captured step to calibrate on (captured: {captured}); "
                             "choose a warm-up at or before the last captured step")
        sparse = T - w
        # An interval is predictable when a captured pair covers its oldest cached mask.
        longest = min(sparse, len(pooled.reuse))
        if config.interval is not None:
            if min(config.interval, sparse) > longest:
                raise ValueError(
                    f"`interval` {config.interval} reuses a mask for {min(config.interval, sparse) - 1} steps, but the "
                    f"captures measure reuse over at most {len(pooled.reuse) - 1} steps from step {w} (captured: "
                    f"{captured}); choose a smaller interval or capture steps further apart"
                )
            intervals = [config.interval]
        else:
            intervals = list(range(1, longest + 1))
            if longest < sparse and config.warmup_steps is None:
                notes.append(f"{method}, warm-up {w}: intervals above {longest} are not predictable (captured lags "
                             f"{list(pooled.lags)}); capture steps further apart to consider them")
        for i in intervals:
            cand = _evaluate(method, pooled, w, i, T, k_min, config)
            if cand is None:
                continue
            tried.append(cand)
            if _better(cand, best, config.mode):
                best = cand
    return best, tried


# --------------------------------------------------------------------------- result
@dataclass(frozen=True, eq=False)
class Calibration:
    """The result of :func:`calibrate`.

    Fields:
        plan: the :class:`~dfsviz.accel.plan.CalibratedPlan` (``save`` writes it).
        candidates: every feasible (warm-up, interval) of the chosen method, as summary dicts.
        replay: per capture, the chosen plan replayed on its captured steps: ``steps``,
            ``mask_step`` (the step whose scores chose the mask in use; None at dense steps),
            ``layers`` and ``recall`` (float64 [S, L, H]; 1 at dense steps and dense heads, NaN
            where the mask's step was not captured).
        notes: caveats met while calibrating.
        seconds: wall time of the calibration.
    """

    plan: CalibratedPlan
    candidates: list[dict]
    replay: list[dict]
    notes: list[str]
    seconds: float

    def save(self, path: str | os.PathLike) -> Path:
        """Write the plan (``dfsattn.json``); see docs/calibration.md."""
        return self.plan.save(path)


def _replay(clips: list[_Clip], best: _Candidate, layers: list[int]) -> list[dict]:
    """The plan replayed on each capture's captured steps, from the same curves (mask_source_step rule)."""
    schedule = DFSSchedule(num_steps=best.num_steps, skip_steps=best.warmup, interval=best.interval, gamma0=1.0,
                           decrement=0.0, dense_layers=())
    out = []
    idx = (best.k - 1).unsqueeze(-1)
    for clip in clips:
        index = {t: i for i, t in enumerate(clip.steps)}
        sources, rows = [], []
        for t in clip.steps:
            src = mask_source_step(schedule, t, 0)
            if src is None:
                rows.append(torch.ones(best.k.shape, dtype=torch.float64))
            elif src in index:
                curve = clip.fresh[index[t]] if src == t else clip.pairs[(src, t)]
                rows.append(torch.where(best.dense, 1.0, curve.gather(-1, idx).squeeze(-1)))
            else:
                rows.append(torch.where(best.dense, 1.0, torch.full(best.k.shape, math.nan, dtype=torch.float64)))
            sources.append(src)
        out.append({"steps": list(clip.steps), "mask_step": sources, "recall": torch.stack(rows), "layers": list(layers)})
    return out


def _drift_at_budgets(readers: list, order: str, method: str, branch: str, best: _Candidate, forced, dense_q) -> dict:
    """Recall kept by a cached mask against steps since its refresh, at the chosen budgets
    (``mask_drift`` on masks chosen with the plan's per-head budgets; sparse heads only)."""
    sparse = ~best.dense
    by_lag: dict[int, list[float]] = {}
    for reader in readers:
        steps = [t for t in reader.steps if t >= best.warmup]
        if len(steps) < 2:
            continue
        for li, layer in enumerate(reader.layers):
            if not bool(sparse[li].any()):
                continue
            mk = -(-reader.grid.num_tokens // reader.block)
            budgets = [None if d else gamma_for_count(int(k), mk) for k, d in zip(best.k[li], best.dense[li])]
            masses = [reader.block_mass(t, layer, order, branch=branch) for t in steps]
            masks = [select_topk_heads(reader.scores(t, layer, order, method, branch=branch), budgets,
                                       seq_len=reader.grid.num_tokens, block=reader.block,
                                       forced_kv=forced, dense_q=dense_q) for t in steps]
            rel = mask_drift(masses, masks, steps).relative_recall()[:, :, 0][..., sparse[li]]  # [S, S, Hs]
            for i, s in enumerate(steps):
                for j, t in enumerate(steps):
                    if t >= s:
                        by_lag.setdefault(t - s, []).extend(rel[i, j].tolist())
    lags = sorted(by_lag)
    return {"lags": lags, "relative_recall": [sum(by_lag[d]) / len(by_lag[d]) for d in lags],
            "samples": [len(by_lag[d]) for d in lags], "interval": best.interval}


def _open(captures, allow_incomplete: bool) -> tuple[list, list]:
    from dfsviz.capture.runset import open_run_set
    from dfsviz.capture.reader import CaptureReader, open_capture

    if isinstance(captures, (str, os.PathLike, CaptureReader)):
        captures = [captures]
    if not isinstance(captures, Sequence) or not captures:
        raise ValueError("`captures` must be one or more capture files or run-set directories (paths or dfsviz.open "
                         "readers)")
    readers, owned = [], []
    try:
        for c in captures:
            if isinstance(c, CaptureReader):
                readers.append(c)
            elif isinstance(c, (str, os.PathLike)):
                paths = open_run_set(c).capture_files(allow_incomplete=allow_incomplete) if Path(c).is_dir() else [c]
                for path in paths:
                    r = open_capture(path)
                    readers.append(r)
                    owned.append(r)
            else:
                raise TypeError(f"`captures` must hold file paths or CaptureReader objects (got {type(c).__name__})")
    except Exception:
        for r in owned:
            r.close()
        raise
    return readers, owned


def calibrate(captures, config: CalibrationConfig, *, progress: bool = False,
              allow_incomplete: bool = False) -> Calibration:
    """Calibrate DFSAttn from captures of one model at one grid (several prompts/seeds pool).

    Args:
        captures: a capture path or reader, or a run-set directory (``dfsviz capture --seeds``
            / ``--prompts``: its clip files, in clip order), or a sequence of them.
        config: :class:`CalibrationConfig` (target recall or work budget, order, method, ...).
        progress: show a tqdm bar over the (capture, layer) reads.
        allow_incomplete: pool the complete clips of a run set whose other clips are not
            complete; otherwise such a run set is refused.

    Returns:
        :class:`Calibration`; ``result.save("dfsattn.json")`` writes the plan that
        ``apply_dfsattn(pipe, "dfsattn.json")`` applies.

    Raises:
        ValueError: captures that cannot be pooled (different models, grids, blocks, layers, heads
        or step counts), missing statistics (one captured step, no scores, an order or method not
        captured), a target that no sparse budget meets, a directory that is not a run set or a
        run set with incomplete clips (without ``allow_incomplete``).
    """
    from dfsviz._version import __version__

    if not isinstance(config, CalibrationConfig):
        raise TypeError(f"`config` must be a CalibrationConfig (got {type(config).__name__})")
    start = time.perf_counter()
    readers, owned = _open(captures, allow_incomplete)
    try:
        _check_pool(readers, config)
        first = readers[0]
        order = _pick_order(readers, config.order)
        methods = _pick_methods(readers, config.method)
        grid, block = first.grid, first.block
        n, mk = grid.num_tokens, -(-grid.num_tokens // block)
        T = _num_steps(first)
        forced_list = text_blocks(grid, n, block)
        forced = block_flags(forced_list or None, "forced_kv", mk, "cpu") if forced_list else None
        k_min = min(mk, len(forced_list) + 1)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(readers) * len(first.layers), unit="layer", desc="calibrate")
        try:
            per_method: dict[str, list[_Clip]] = {m: [] for m in methods}
            for r in readers:
                with _named_damage([r]):
                    clips = _read_clip(r, order, methods, config.branch, forced, forced, bar)
                for m, clip in clips.items():
                    per_method[m].append(clip)
        finally:
            if bar is not None:
                bar.close()
        notes: list[str] = []
        results = {m: _search(m, per_method[m], T, k_min, n, block, config, notes) for m in methods}
        feasible = {m: r for m, r in results.items() if r[0] is not None}
        if not feasible:
            raise ValueError(_infeasible(config, per_method, k_min))
        best = None
        for m, (cand, _) in feasible.items():
            if _better(cand, best, config.mode):
                best = cand
        if config.target_recall is not None and bool(best.dense.all()):
            raise ValueError(
                f"target recall {config.target_recall:g} cannot be met by any sparse budget: every (layer, head) "
                f"needs a kept fraction above dense_above = {config.dense_above:g}; lower --target-recall"
                + (" or raise --dense-above (at most 1)" if config.dense_above < 1 else "")
            )
        model_layers = first.attrs.get("model_layers")
        if isinstance(model_layers, (int, np.integer)) and model_layers > len(first.layers):
            covered = len(first.layers)
            whole = (best.work * covered + (model_layers - covered)) / model_layers
            notes.append(f"the captures hold {covered} of the model's {model_layers} self-attention layers: "
                         f"apply_dfsattn runs the other {model_layers - covered} dense, so the model's attention work "
                         f"is about {whole:.3f} of dense (layers of equal cost), not {best.work:.3f}; capture every "
                         "layer to calibrate them all")
        replay = _replay(per_method[best.method], best, first.layers)
        identity = ModelIdentity(str(first.attrs.get("model_id")), str(first.attrs.get("model_class")),
                                 str(first.attrs.get("adapter", "")),
                                 public_config(json.loads(first.attrs["model_config"]))
                                 if "model_config" in first.attrs else {})
        with _named_damage(readers):  # the block masses are read here first
            drift = _drift_at_budgets(readers, order, best.method, config.branch, best, forced, forced)
        predicted = {
            **best.summary(),
            "reuse_factor": float(best.reuse[~best.dense].mean()) if bool((~best.dense).any()) else 1.0,
            "dense_query_blocks": forced_list,
            "methods": {m: ({"tile": _tile_of(first, m), **r[0].summary()} if r[0] is not None else None)
                        for m, r in results.items()},
            "drift": drift,
            "replay": [{"steps": r["steps"], "mask_step": r["mask_step"],
                        "recall": [_nan_none(float(row[~best.dense].mean())) for row in r["recall"]]}
                       for r in replay],
        }
        provenance = {
            "mode": config.mode, "target_recall": config.target_recall, "max_density": config.max_density,
            "dense_above": config.dense_above, "refresh_cost": config.refresh_cost, "branch": config.branch,
            "fixed_warmup_steps": config.warmup_steps, "fixed_interval": config.interval,
            "captures": [{"path": str(r.path), "model_id": r.attrs.get("model_id"), "prompt": r.attrs.get("prompt"),
                          "seed": _plain(r.attrs.get("seed")), "steps": r.steps, "complete": r.complete,
                          "created_utc": r.attrs.get("created_utc")} for r in readers],
        }
        seconds = time.perf_counter() - start
        provenance["seconds"] = round(seconds, 3)
        plan = CalibratedPlan(
            model=identity, grid=grid, block=block, order=order, method=best.method, tile=_tile_of(first, best.method),
            num_steps=T, warmup_steps=best.warmup, interval=best.interval, layers=_layer_budgets(first, best, mk),
            predicted=predicted, provenance=provenance,
            dfsviz_version=__version__, created_utc=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )
        log.info("calibrated %s on %d capture(s) in %.2f s: %s, warm-up %d, interval %d, work %.3f",
                 identity.id, len(readers), seconds, best.method, best.warmup, best.interval, best.work)
        return Calibration(plan, [c.summary() for c in results[best.method][1]], replay, notes, seconds)
    finally:
        for r in owned:
            r.close()


def _nan_none(x: float) -> float | None:
    return None if math.isnan(x) else x


def _infeasible(config: CalibrationConfig, per_method: dict, k_min: int) -> str:
    """The one line for a work budget that no warm-up and interval fit."""
    smallest = min(float(c.density[..., k_min - 1].mean()) for clips in per_method.values() for c in clips)
    return (f"max density {config.max_density:g} cannot be met by any warm-up and interval: the smallest masks "
            f"({k_min} key block(s) per query block) have density {smallest:.3f} on their own, and the warm-up steps "
            f"and refreshes ({config.refresh_cost:g} each) add to it; raise --max-density")


def _layer_budgets(reader, best: _Candidate, mk: int) -> tuple[LayerBudget, ...]:
    names = reader.layer_names
    out = []
    for li, layer in enumerate(reader.layers):
        k = [int(x) for x in best.k[li]]
        dense = [bool(x) for x in best.dense[li]]
        by_clip = [[None if c is None else float(c[li, h]) for c in best.by_clip] for h in range(len(k))]
        out.append(LayerBudget(
            layer=layer, name=str(names[layer]),
            gamma=tuple(None if d else gamma_for_count(kk, mk) for kk, d in zip(k, dense)),
            kept_blocks=tuple(k), predicted_recall=tuple(float(x) for x in best.recall[li]),
            density=tuple(float(x) for x in best.density[li]), recall_by_clip=tuple(tuple(r) for r in by_clip),
        ))
    return tuple(out)

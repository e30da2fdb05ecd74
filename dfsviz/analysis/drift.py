"""Mask drift across denoising steps, and the DFSAttn cache schedule replayed on a capture.

DFSAttn chooses a block mask at a refresh step s and reuses it until the next refresh.
How much attention does the stale mask still cover at a later step t? With the block
mass m^(t) of step t (docs/theory.md), the mask S^(s) chosen at step s keeps

    R(S^(s); m^(t)) = sum_u (|U_u| / N) sum_{v in S^(s)_u} m^(t)_uv

and it overlaps the mask S^(t) that step t would have chosen by the row Jaccard index
|S^(s)_u ∩ S^(t)_u| / |S^(s)_u ∪ S^(t)_u| (averaged over rows with weights |U_u| / N).
:func:`mask_drift` returns both as s x t matrices (one per layer when called per layer);
the diagonal is the fresh recall R(S^(t); m^(t)) and a Jaccard of 1.

:func:`replay_schedule` walks a :class:`~dfsviz.sparse.schedule.DFSSchedule` over the
captured steps of one layer: dense steps and dense layers keep everything; refresh steps
choose a top-k mask from that step's block scores; other steps reuse the cached mask.
Beside it runs the "refresh every step" variant (a fresh top-k mask at the step's own
budget), so the cost of caching is the difference of the two recall series.
:func:`replay_plan` says which masks each step needs (the one rule of the replay, also
followed by the dashboard where a capture stores its top-k curves).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dfsviz.analysis._validate import check_block_map, check_seq_block, check_steps
from dfsviz.sparse._validate import block_flags, block_sizes, check_block_mass
from dfsviz.sparse.masks import BlockMask
from dfsviz.sparse.schedule import DFSSchedule
from dfsviz.sparse.select import select_topk
from dfsviz.sparse.stats import block_recall

__all__ = ["DriftMatrix", "ReplayStep", "ScheduleReplay", "mask_drift", "mask_jaccard", "mask_source_step",
           "replay_plan", "replay_schedule"]


def _check_masks_alike(a: object, b: object) -> tuple[BlockMask, BlockMask]:
    for name, x in (("a", a), ("b", b)):
        if not isinstance(x, BlockMask):
            raise TypeError(f"`{name}` must be a dfsviz BlockMask (got {type(x).__name__}); use BlockMask.from_dense")
    if a.shape != b.shape or (a.seq_len, a.block) != (b.seq_len, b.block):
        raise ValueError(
            f"masks `a` and `b` must describe the same blocks (got shape {a.shape}, seq_len {a.seq_len}, block "
            f"{a.block} and shape {b.shape}, seq_len {b.seq_len}, block {b.block}); compare masks of one layer"
        )
    return a, b.to(a.device)


def mask_jaccard(a: BlockMask, b: BlockMask) -> torch.Tensor:
    """Row Jaccard index of two masks, averaged over query blocks with weights |U_u| / N.

    For each (b, h, u): |S_u ∩ T_u| / |S_u ∪ T_u|, and 1 when both rows are empty.

    Args:
        a, b: BlockMask of one shape [B, H, Mq, Mk], seq_len and block.

    Returns:
        float64 [B, H] in [0, 1]; 1 iff the masks are equal.
    """
    a, b = _check_masks_alike(a, b)
    da, db = a.to_dense(), b.to_dense()
    inter = (da & db).sum(dim=-1).to(torch.float64)
    union = (da | db).sum(dim=-1).to(torch.float64)
    per_row = torch.where(union > 0, inter / union.clamp_min(1.0), torch.ones_like(union))
    weights = block_sizes(a.seq_len, a.block, device=per_row.device).to(torch.float64) / a.seq_len
    return (per_row * weights).sum(dim=-1)


@dataclass(frozen=True, eq=False)
class DriftMatrix:
    """Recall and Jaccard of the mask chosen at step s used at step t, for one layer.

    Fields:
        steps: the S step indices, ascending.
        recall: float64 [S, S, B, H]; [i, j] = R(mask of steps[i]; m of steps[j]).
        jaccard: float64 [S, S, B, H]; [i, j] = Jaccard(mask of steps[i], mask of steps[j]).
        label: name, e.g. ``"layer 3 · dfs_tile · topk_g0.20"``.
    """

    steps: tuple[int, ...]
    recall: torch.Tensor
    jaccard: torch.Tensor
    label: str = ""

    def mean_recall(self) -> torch.Tensor:
        """float64 [S, S]: recall averaged over batch and heads."""
        return self.recall.mean(dim=(2, 3))

    def mean_jaccard(self) -> torch.Tensor:
        """float64 [S, S]: Jaccard averaged over batch and heads."""
        return self.jaccard.mean(dim=(2, 3))

    def relative_recall(self) -> torch.Tensor:
        """float64 [S, S, B, H]: recall[i, j] / recall[j, j], the share of the fresh mask's recall kept."""
        fresh = torch.diagonal(self.recall, dim1=0, dim2=1).permute(2, 0, 1)  # [S, B, H], entry j = recall[j, j]
        return self.recall / fresh.clamp_min(torch.finfo(torch.float64).tiny).unsqueeze(0)

    def at_lag(self, lag: int) -> dict[str, float] | None:
        """Mean recall, Jaccard and relative recall over the pairs with steps[j] - steps[i] == ``lag``.

        Returns ``{"lag", "pairs", "recall", "jaccard", "relative_recall", "fresh_recall"}`` or None
        when no captured pair is ``lag`` steps apart. ``fresh_recall`` averages recall[j, j] over
        the same pairs.
        """
        if isinstance(lag, bool) or not isinstance(lag, int) or lag < 0:
            raise ValueError(f"`lag` must be an integer >= 0, a number of steps (got {lag!r})")
        pairs = [(i, j) for i, s in enumerate(self.steps) for j, t in enumerate(self.steps) if t - s == lag]
        if not pairs:
            return None
        ii = torch.tensor([p[0] for p in pairs])
        jj = torch.tensor([p[1] for p in pairs])
        return {
            "lag": lag,
            "pairs": [(self.steps[i], self.steps[j]) for i, j in pairs],
            "recall": float(self.recall[ii, jj].mean()),
            "jaccard": float(self.jaccard[ii, jj].mean()),
            "relative_recall": float(self.relative_recall()[ii, jj].mean()),
            "fresh_recall": float(self.recall[jj, jj].mean()),
        }


def mask_drift(
    masses: Sequence[torch.Tensor],
    masks: Sequence[BlockMask],
    steps: Sequence[int],
    *,
    label: str = "",
) -> DriftMatrix:
    """Every captured step's mask applied to every captured step's block mass (one layer).

    Args:
        masses: S block masses m^(t), float [B, H, Mq, Mk] each (``BlockStats.m``).
        masks: S masks S^(t) chosen at the same steps (e.g. ``select_topk`` of that step's scores).
        steps: the S step indices, strictly ascending.
        label: name of the result.

    Returns:
        DriftMatrix with recall and Jaccard float64 [S, S, B, H].
    """
    if isinstance(masses, torch.Tensor) or not isinstance(masses, Sequence):
        raise TypeError("`masses` must be a sequence of block-mass tensors, one per step (got a single object)")
    if isinstance(masks, BlockMask) or not isinstance(masks, Sequence):
        raise TypeError("`masks` must be a sequence of BlockMask, one per step (got a single object)")
    steps = check_steps(steps, len(masses), "block mass in `masses`")
    if len(masks) != len(masses):
        raise ValueError(f"`masks` must have one mask per step ({len(masses)}) (got {len(masks)})")
    if not all(isinstance(mk, BlockMask) for mk in masks):
        raise TypeError("`masks` must hold dfsviz BlockMask objects only; build them with select_topk")
    first = masks[0]
    for mk in masks[1:]:
        _check_masks_alike(first, mk)
    for t, m in enumerate(masses):
        check_block_map(m, f"masses[{t}]", first.seq_len, first.block, nonneg=True)
        if tuple(m.shape) != first.shape:
            raise ValueError(f"`masses[{t}]` must have the masks' shape {first.shape} (got {tuple(m.shape)})")
        check_block_mass(m)
    # All S x S pairs at once, one head at a time (memory: S maps of one head in float64): per
    # query block a [S, Mk] x [Mk, S] product of the masks (0/1, exact in float64) with the
    # masses, and with the masks themselves for the overlaps: the sums block_recall and
    # mask_jaccard take pair by pair.
    n = len(steps)
    bsz, heads = first.shape[:2]
    weights = block_sizes(first.seq_len, first.block).to(torch.float64) / first.seq_len
    recall = torch.empty(n, n, bsz, heads, dtype=torch.float64)
    jaccard = torch.empty(n, n, bsz, heads, dtype=torch.float64)
    dense = [mk.to_dense() for mk in masks]
    for b in range(bsz):
        for h in range(heads):
            rows = torch.stack([d[b, h].cpu() for d in dense], dim=1).to(torch.float64)  # [Mq, S, Mk]
            mass = torch.stack([m[b, h].detach().cpu() for m in masses], dim=2).to(torch.float64)  # [Mq, Mk, S]
            kept = (rows @ mass).clamp_(max=1.0).permute(1, 2, 0).contiguous()  # [S(mask), S(mass), Mq]
            inter = rows @ rows.transpose(1, 2)
            sizes = rows.sum(dim=-1)  # [Mq, S]
            union = sizes[:, :, None] + sizes[:, None, :] - inter
            overlap = torch.where(union > 0, inter / union.clamp_min(1.0), torch.ones_like(union))
            # summed over query blocks last, contiguous: block_recall's and mask_jaccard's order
            recall[:, :, b, h] = (kept * weights).sum(dim=-1).clamp_(max=1.0)
            jaccard[:, :, b, h] = (overlap.permute(1, 2, 0).contiguous() * weights).sum(dim=-1)
    return DriftMatrix(steps, recall, jaccard, label)


@dataclass(frozen=True, eq=False)
class ScheduleReplay:
    """A DFSSchedule replayed over the captured steps of one layer.

    Fields:
        steps: captured steps replayed, ascending (S of them).
        layer: the self-attention layer index.
        schedule: the replayed schedule.
        dense: per step, True when attention is dense there (warm-up step or dense layer).
        refresh: per step, True when the schedule recomputes the mask there.
        gamma: per step, the kept fraction (None when dense).
        mask_step: per step, the step whose scores chose the mask in use (None when dense).
        recall_cached: float64 [S, B, H], recall with the schedule's cached masks.
        recall_fresh: float64 [S, B, H], recall when the mask is recomputed every step
            at that step's budget (equal to ``recall_cached`` on refresh and dense steps).
        density_cached, density_fresh: float64 [S, B, H], the densities of the same masks.
    """

    steps: tuple[int, ...]
    layer: int
    schedule: DFSSchedule
    dense: tuple[bool, ...]
    refresh: tuple[bool, ...]
    gamma: tuple[float | None, ...]
    mask_step: tuple[int | None, ...]
    recall_cached: torch.Tensor
    recall_fresh: torch.Tensor
    density_cached: torch.Tensor
    density_fresh: torch.Tensor

    def mean_series(self) -> dict[str, list[float]]:
        """Per-step means over batch and heads: recall/density, cached and fresh (lists of S floats)."""
        return {
            name: getattr(self, name).mean(dim=(1, 2)).tolist()
            for name in ("recall_cached", "recall_fresh", "density_cached", "density_fresh")
        }


def mask_source_step(schedule: DFSSchedule, step: int, layer: int = 0) -> int | None:
    """The step whose block scores chose the mask ``layer`` uses at ``step`` under ``schedule``.

    None when attention is dense there (warm-up step or a layer in ``dense_layers``); else the
    latest refresh step at or before ``step`` (``step`` itself on a refresh step).
    """
    if not isinstance(schedule, DFSSchedule):
        raise TypeError(f"`schedule` must be a DFSSchedule (got {type(schedule).__name__})")
    if schedule.at_step(step).dense or schedule.layer_is_dense(layer):
        return None
    source = step
    # The first sparse step always refreshes (r = 0), so the walk stops at skip_steps at the latest.
    while not schedule.at_step(source).refresh:
        source -= 1
    return source


@dataclass(frozen=True)
class ReplayStep:
    """What the replay of one captured step needs (:func:`replay_plan`).

    Fields:
        step: the captured step.
        mask_step: the step whose block scores chose the mask in use (:func:`mask_source_step`):
            ``step`` itself on a refresh step, an earlier refresh step on a cached one, None
            where attention is dense (warm-up step or dense layer: every block kept).
        gamma: the step's own budget, that of the fresh mask ("refresh every step"); None when dense.
        mask_gamma: the budget the mask in use was chosen with, its refresh step's; None when dense.
    """

    step: int
    mask_step: int | None
    gamma: float | None
    mask_gamma: float | None

    @property
    def dense(self) -> bool:
        """True where attention is dense (no mask)."""
        return self.mask_step is None

    @property
    def refresh(self) -> bool:
        """True where the step chooses its mask itself: the cached mask is the fresh one."""
        return self.mask_step == self.step


def replay_plan(schedule: DFSSchedule, steps: Sequence[int], *, layer: int) -> tuple[ReplayStep, ...]:
    """Which masks the replay of ``schedule`` on the captured ``steps`` of ``layer`` needs, per step.

    A dense step needs none; a refresh step one, the top-k of its scores at its budget; a cached
    step the top-k of its mask step's scores at that step's budget (applied to its own block
    mass) and, for "refresh every step", the top-k of its own scores at its own budget.

    Args:
        schedule: the DFSSchedule (plans of the cond call of each step, ``schedule.at_step``).
        steps: captured step indices, strictly ascending, each in [0, schedule.num_steps).
        layer: self-attention layer index (layers in ``schedule.dense_layers`` are dense).

    Returns:
        One :class:`ReplayStep` per step. Raises ValueError when a sparse step reuses a mask
        refreshed at a step ``steps`` lacks (the message lists the steps to capture).
    """
    if not isinstance(schedule, DFSSchedule):
        raise TypeError(f"`schedule` must be a DFSSchedule (got {type(schedule).__name__})")
    steps = check_steps(steps, len(steps) if isinstance(steps, Sequence) else 0, "block map")
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
        raise ValueError(f"`layer` must be an integer >= 0, the self-attention layer index (got {layer!r})")
    if steps[-1] >= schedule.num_steps:
        raise ValueError(
            f"`steps` must lie in [0, schedule.num_steps = {schedule.num_steps}) (got {steps[-1]}); "
            "use the schedule of the captured run"
        )
    # Find every step's mask source first so a capture lacking several refresh steps fails
    # with the full list, not at the first gap.
    source = [mask_source_step(schedule, t, layer) for t in steps]
    missing = sorted({r for r in source if r is not None and r not in steps})
    if missing:
        raise ValueError(
            f"the schedule reuses masks refreshed at steps {missing}, which the capture lacks (captured: "
            f"{list(steps)}); capture those steps too, or replay only steps before them"
        )
    return tuple(
        ReplayStep(t, None, None, None) if r is None else ReplayStep(t, r, schedule.at_step(t).gamma,
                                                                     schedule.at_step(r).gamma)
        for t, r in zip(steps, source)
    )


def replay_schedule(
    schedule: DFSSchedule,
    steps: Sequence[int],
    masses: Sequence[torch.Tensor],
    scores: Sequence[torch.Tensor],
    *,
    layer: int,
    seq_len: int,
    block: int,
    forced_kv: torch.Tensor | Sequence[int] | None = None,
    dense_q: torch.Tensor | Sequence[int] | None = None,
) -> ScheduleReplay:
    """Replay DFSAttn's mask cache over captured steps of one layer; compare with refreshing every step.

    Args:
        schedule: the DFSSchedule (plans come from ``schedule.at_step``: the cond call of a step).
        steps: captured step indices, strictly ascending, each in [0, schedule.num_steps).
        masses: one block mass float [B, H, Mq, Mk] per step.
        scores: one block-score tensor [B, H, Mq, Mk] per step (the method DFSAttn uses,
            ``dfs_tile``, or any other).
        layer: self-attention layer index (layers in ``schedule.dense_layers`` are dense).
        seq_len, block: N and the block size of the maps.
        forced_kv, dense_q: as in :func:`dfsviz.sparse.select.select_topk`.

    Returns:
        ScheduleReplay. Raises ValueError when a replayed sparse step reuses a mask refreshed
        at a step the capture lacks (the message lists the steps to capture).
    """
    seq_len, block = check_seq_block(seq_len, block)
    if isinstance(masses, torch.Tensor) or not isinstance(masses, Sequence):
        raise TypeError("`masses` must be a sequence of block-mass tensors, one per step")
    if isinstance(scores, torch.Tensor) or not isinstance(scores, Sequence):
        raise TypeError("`scores` must be a sequence of block-score tensors, one per step")
    steps = check_steps(steps, len(masses), "block mass in `masses`")
    if len(scores) != len(masses):
        raise ValueError(f"`scores` must have one tensor per step ({len(masses)}) (got {len(scores)})")
    plan = replay_plan(schedule, steps, layer=layer)
    for t, (m, s) in enumerate(zip(masses, scores)):
        check_block_map(m, f"masses[{t}]", seq_len, block, nonneg=True)
        check_block_map(s, f"scores[{t}]", seq_len, block)
        if m.shape != masses[0].shape or s.shape != m.shape:
            raise ValueError(
                f"`masses` and `scores` must all have one shape {tuple(masses[0].shape)} "
                f"(got {tuple(m.shape)} and {tuple(s.shape)} at step {steps[t]})"
            )
    bsz, heads, nb, _ = masses[0].shape
    forced = block_flags(forced_kv, "forced_kv", nb, masses[0].device)
    dense_rows = block_flags(dense_q, "dense_q", nb, masses[0].device)

    full = BlockMask.full(bsz, heads, seq_len, block, device=masses[0].device)
    index = {t: i for i, t in enumerate(steps)}
    fresh_masks: dict[int, BlockMask] = {}

    def fresh(i: int, gamma: float) -> BlockMask:
        key = (i, gamma)
        if key not in fresh_masks:
            fresh_masks[key] = select_topk(scores[i], gamma, seq_len=seq_len, block=block,
                                           forced_kv=forced if bool(forced.any()) else None,
                                           dense_q=dense_rows if bool(dense_rows.any()) else None)
        return fresh_masks[key]

    rc, rf, dc, df = [], [], [], []
    for i, p in enumerate(plan):
        if p.dense:
            cached = now = full
        else:
            cached = fresh(index[p.mask_step], p.mask_gamma)
            now = fresh(i, p.gamma)
        rc.append(block_recall(masses[i], cached).cpu())
        dc.append(cached.density().cpu())
        # dense and refresh steps use the fresh mask itself: its numbers are the cached ones
        rf.append(rc[-1] if now is cached else block_recall(masses[i], now).cpu())
        df.append(dc[-1] if now is cached else now.density().cpu())
    return ScheduleReplay(
        steps=steps,
        layer=layer,
        schedule=schedule,
        dense=tuple(p.dense for p in plan),
        refresh=tuple(p.refresh for p in plan),
        gamma=tuple(p.gamma for p in plan),
        mask_step=tuple(p.mask_step for p in plan),
        recall_cached=torch.stack(rc),
        recall_fresh=torch.stack(rf),
        density_cached=torch.stack(dc),
        density_fresh=torch.stack(df),
    )

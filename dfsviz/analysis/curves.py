"""Recall against budget: the top-k mask of a scoring method at every budget, and the oracle.

For block mass m [B, H, Mq, Mk] (docs/theory.md) and any block scores of the same shape, the
top-k mask of a query block u keeps its k best-scoring key blocks, and its recall is the
sum of m_uv over them. Sorting each row once by score and taking a cumulative sum of m
in that order gives the recall of *every* k = 1..Mk in one pass, exactly (float64):

    R(k) = sum_u (|U_u| / N) sum_{first k of row u in score order} m_uv

The oracle curve sorts by m itself, so it is R*(k) of docs/theory.md, the best recall any mask
keeping k blocks per row can have; every method's curve lies below it at every k. The
density of the same masks (token pairs kept, short last block counted exactly) comes out
of the same pass. Budgets follow DFSAttn's rule k = max(1, int(gamma * Mk))
(:func:`dfsviz.sparse.select.topk_count`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dfsviz.analysis._validate import check_block_map, check_seq_block, check_target
from dfsviz.sparse._topk import topk_density, topk_order, topk_recall
from dfsviz.sparse._validate import block_flags
from dfsviz.sparse.select import topk_count

__all__ = ["RecallCurve", "recall_curve", "oracle_curve", "stack_curves", "DEFAULT_BUDGETS", "DEFAULT_TARGETS"]

#: Budgets the claims report tabulates (kept fraction gamma).
DEFAULT_BUDGETS: tuple[float, ...] = (0.1, 0.2, 0.3)
#: Recall targets whose needed budget the report gives.
DEFAULT_TARGETS: tuple[float, ...] = (0.9, 0.95)

# Recall sums of float32 masses miss 1 by rounding; a target of 1.0 is reached within this.
_TARGET_SLACK = 1e-9


@dataclass(frozen=True, eq=False)
class RecallCurve:
    """Recall and density of the top-k-by-score mask for every k = 1..Mk.

    Fields:
        recall: float64 [*, Mk]; entry [..., k - 1] is R of the mask keeping k key blocks
            per query block (leading dims: [B, H] from :func:`recall_curve`, more after
            :func:`stack_curves`, none after :meth:`mean`).
        density: float64 [*, Mk]; rho(S) of the same masks.
        seq_len: N, tokens.
        block: tokens per block.
        label: name for legends and tables, e.g. ``"dfs_tile · hilbert3d"``.
    """

    recall: torch.Tensor
    density: torch.Tensor
    seq_len: int
    block: int
    label: str = ""

    def __post_init__(self) -> None:
        check_seq_block(self.seq_len, self.block)
        for name in ("recall", "density"):
            x = getattr(self, name)
            if not isinstance(x, torch.Tensor) or x.dtype != torch.float64 or x.dim() < 1:
                raise ValueError(f"`{name}` must be a float64 tensor [*, Mk] (got {getattr(x, 'dtype', type(x).__name__)})")
        m = -(-self.seq_len // self.block)
        if self.recall.shape != self.density.shape or self.recall.shape[-1] != m:
            raise ValueError(
                f"`recall` and `density` must both have shape [*, Mk] with Mk = {m} "
                f"(got {tuple(self.recall.shape)} and {tuple(self.density.shape)})"
            )
        if not isinstance(self.label, str):
            raise TypeError(f"`label` must be a str (got {type(self.label).__name__})")

    @property
    def num_kv_blocks(self) -> int:
        """Mk, key blocks; the curve has one point per k = 1..Mk."""
        return self.recall.shape[-1]

    @property
    def gamma(self) -> torch.Tensor:
        """float64 [Mk]: the budget k / Mk of each point."""
        m = self.num_kv_blocks
        return torch.arange(1, m + 1, dtype=torch.float64) / m

    def k_for(self, gamma: float) -> int:
        """k = max(1, int(gamma * Mk)), the blocks DFSAttn keeps at budget ``gamma``."""
        return topk_count(gamma, self.num_kv_blocks)

    def at(self, gamma: float) -> torch.Tensor:
        """float64 [*]: recall at budget ``gamma`` (kept fraction in (0, 1])."""
        return self.recall[..., self.k_for(gamma) - 1]

    def density_at(self, gamma: float) -> torch.Tensor:
        """float64 [*]: density of the mask kept at budget ``gamma``."""
        return self.density[..., self.k_for(gamma) - 1]

    def mean(self) -> "RecallCurve":
        """The curve averaged over all leading dims (heads, layers, steps): recall float64 [Mk]."""
        dims = tuple(range(self.recall.dim() - 1))
        if not dims:
            return self
        return RecallCurve(self.recall.mean(dim=dims), self.density.mean(dim=dims), self.seq_len, self.block, self.label)

    def mean_recall(self) -> torch.Tensor:
        """float64 [Mk]: recall averaged over the leading dims (what figures draw)."""
        return self.mean().recall

    def needed_k(self, target: float) -> torch.Tensor:
        """int64 [*]: the smallest k whose recall reaches ``target`` (Mk when only the full mask does)."""
        target = check_target(target)
        reached = self.recall >= target - _TARGET_SLACK
        # The full mask has recall 1 up to rounding; count it as reaching any target.
        reached[..., -1] = True
        return reached.to(torch.int8).argmax(dim=-1) + 1

    def needed_budget(self, target: float) -> torch.Tensor:
        """float64 [*]: the smallest budget k / Mk whose recall reaches ``target`` (e.g. 0.9, 0.95).

        ``curve.mean().needed_budget(t)`` is the budget of the averaged curve;
        ``curve.needed_budget(t)`` gives one value per head (and layer, step, ...).
        """
        return self.needed_k(target).to(torch.float64) / self.num_kv_blocks


def recall_curve(
    m: torch.Tensor,
    scores: torch.Tensor,
    *,
    seq_len: int,
    block: int,
    forced_kv: torch.Tensor | Sequence[int] | None = None,
    dense_q: torch.Tensor | Sequence[int] | None = None,
    label: str = "",
) -> RecallCurve:
    """Recall and density of the top-k-by-``scores`` mask for every k = 1..Mk, in one pass.

    Args:
        m: float [B, H, Mq, Mk], block mass (``BlockStats.m``), non-negative.
        scores: float [B, H, Mq, Mk], any scorer's output (higher = keep first).
        seq_len: N, tokens; block: tokens per block (Mq = Mk = ceil(N / block)).
        forced_kv: key blocks kept first by every row, inside the budget, as in
            :func:`dfsviz.sparse.select.select_topk` (bool [Mk] or indices). For
            k < number forced the curve keeps the k best-scoring forced blocks (a budget
            ``select_topk`` refuses).
        dense_q: query blocks whose rows keep every key block (recall 1 at every k).
        label: the curve's name.

    Returns:
        RecallCurve with recall and density float64 [B, H, Mk]. At each k it equals
        ``block_recall(m, select_topk(scores, k / Mk, ...))`` up to tie-breaking among equal scores.
    """
    seq_len, block = check_seq_block(seq_len, block)
    check_block_map(m, "m", seq_len, block, nonneg=True)
    check_block_map(scores, "scores", seq_len, block)
    if m.shape != scores.shape:
        raise ValueError(f"`m` and `scores` must have one shape [B, H, Mq, Mk] (got {tuple(m.shape)} and {tuple(scores.shape)})")
    if m.device != scores.device:
        raise ValueError(f"`m` and `scores` must be on one device (got {m.device} and {scores.device})")
    nb = m.shape[3]
    device = m.device
    forced = block_flags(forced_kv, "forced_kv", nb, device)
    dense_rows = block_flags(dense_q, "dense_q", nb, device)
    forced = forced if bool(forced.any()) else None
    dense_rows = dense_rows if bool(dense_rows.any()) else None

    # one sort per row gives the top-k mask of every k (forced blocks first); the capture writer
    # stores the recall and density of the same masks with the same functions
    order = topk_order(scores, forced)
    recall = topk_recall(m, order, seq_len, block, dense_rows)
    density = topk_density(order, seq_len, block, dense_rows)
    return RecallCurve(recall.cpu(), density.cpu(), seq_len, block, label)


def oracle_curve(
    m: torch.Tensor,
    *,
    seq_len: int,
    block: int,
    dense_q: torch.Tensor | Sequence[int] | None = None,
    label: str = "oracle",
) -> RecallCurve:
    """R*(k) of docs/theory.md for every k: each row keeps its k largest block masses.

    ``m``: float [B, H, Mq, Mk]. ``dense_q`` as in :func:`recall_curve` (give the same rows
    the methods treat as dense, so the oracle stays an upper bound for them). Returns a
    RecallCurve [B, H, Mk] that is >= every method's curve at every k.
    """
    return recall_curve(m, m, seq_len=seq_len, block=block, dense_q=dense_q, label=label)


def stack_curves(curves: Sequence[RecallCurve], label: str | None = None) -> RecallCurve:
    """Stack curves of one (N, block) along a new leading dim (e.g. over layers or steps).

    Returns a RecallCurve with recall [len(curves), *, Mk]; ``label`` defaults to the first curve's.
    """
    if isinstance(curves, RecallCurve) or not isinstance(curves, Sequence) or not curves:
        raise ValueError("`curves` must be a non-empty sequence of RecallCurve; build them with recall_curve")
    if not all(isinstance(c, RecallCurve) for c in curves):
        bad = next(type(c).__name__ for c in curves if not isinstance(c, RecallCurve))
        raise TypeError(f"`curves` must hold RecallCurve objects only (got a {bad})")
    first = curves[0]
    for c in curves[1:]:
        if (c.seq_len, c.block) != (first.seq_len, first.block) or c.recall.shape != first.recall.shape:
            raise ValueError(
                "`curves` must share seq_len, block and shape to be stacked (got "
                f"{(first.seq_len, first.block, tuple(first.recall.shape))} and "
                f"{(c.seq_len, c.block, tuple(c.recall.shape))}); stack one grid and head set at a time"
            )
    return RecallCurve(
        torch.stack([c.recall for c in curves]),
        torch.stack([c.density for c in curves]),
        first.seq_len,
        first.block,
        first.label if label is None else label,
    )

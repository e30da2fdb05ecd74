"""Selectors: turn block scores [B, H, Mq, Mk] into a :class:`BlockMask`.

- ``topk``: DFSAttn's rule. Every query block keeps k = max(1, int(gamma * Mk)) key
  blocks, the k highest-scoring ones (``torch.topk``), per batch element and head.
  ``int`` truncates the float product exactly as the reference code does, so
  gamma = 0.19999999999999998 (0.3 - 0.1 in floating point) keeps 118 of 591 blocks.
- ``cumulative``: per row, the smallest set of key blocks whose normalised score mass
  reaches tau (top-p). Mass scores (``dfs_tile``, ``antidiagonal``, ``oracle``) are
  normalised by the row sum; logit scores (``meanpool``) by a softmax over the row.

Both accept ``forced_kv``, key blocks every non-dense row keeps (HunyuanVideo's text
blocks in the DFSAttn reference code), and ``dense_q``, query blocks whose rows keep every
key block (HunyuanVideo's rows from ``dense_start_block`` on). Forced blocks count inside
the budget: top-k picks only k - n_forced further blocks.

Scores must not hold NaN or +inf (ValueError naming the first): a NaN makes the ranking
meaningless, and +inf is no score (use ``forced_kv`` to keep a block always). -inf is
allowed and means "leave this block out": top-k takes such blocks last, only when a row has
fewer finite scores than its budget; as a logit it gets no mass in the cumulative softmax.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from dfsviz.sparse._validate import (
    block_flags,
    check_block_map_shape,
    check_finite,
    check_fraction,
    first_true_index,
)
from dfsviz.sparse.masks import BlockMask

__all__ = [
    "SELECTORS",
    "SelectorSpec",
    "select_cumulative",
    "select_topk",
    "selector_key",
    "selector_names",
    "topk_count",
]


def topk_count(gamma: float, num_kv_blocks: int) -> int:
    """k = max(1, int(gamma * Mk)), the reference's per-row budget (float product, truncated)."""
    gamma = check_fraction(gamma, "gamma")
    if isinstance(num_kv_blocks, bool) or not isinstance(num_kv_blocks, int) or num_kv_blocks < 1:
        raise ValueError(f"`num_kv_blocks` must be a positive integer Mk (got {num_kv_blocks!r})")
    return max(1, int(gamma * num_kv_blocks))


_NON_FINITE_SCORES_FIX = (
    "check q and k for NaN/inf (the Triton scorer does not check them); to keep a block always "
    "pass it in `forced_kv`, to leave it out score it -inf"
)


def _check_scores(scores: object, seq_len: int, block: int) -> torch.Tensor:
    """Scores [B, H, Mq, Mk] of the blocks of (seq_len, block), without NaN or +inf."""
    check_block_map_shape(scores, "scores", seq_len, block)
    check_finite(scores, "scores", _NON_FINITE_SCORES_FIX, allow_neg_inf=True)
    return scores


def _finish(keep: torch.Tensor, forced: torch.Tensor, dense_q: torch.Tensor, seq_len: int, block: int) -> BlockMask:
    keep = keep | forced
    keep[:, :, dense_q, :] = True
    return BlockMask.from_dense(keep, seq_len, block)


def select_topk(
    scores: torch.Tensor,
    gamma: float,
    *,
    seq_len: int,
    block: int,
    forced_kv: torch.Tensor | Sequence[int] | None = None,
    dense_q: torch.Tensor | Sequence[int] | None = None,
    out: BlockMask | None = None,
) -> BlockMask:
    """Keep the k = max(1, int(gamma * Mk)) best key blocks of every query block.

    Args:
        scores: float [B, H, Mq, Mk], higher = more important (any scorer's output); no NaN
            or +inf; -inf blocks are taken last (only when a row has too few finite scores).
        gamma: kept fraction in (0, 1] (DFSAttn's "sparsity").
        seq_len: N, tokens; block: tokens per block (Mq = Mk = ceil(N / block)).
        forced_kv: key blocks every row keeps, inside the budget (bool [Mk] or indices);
            the remaining k - n_forced blocks are the best of the others.
        dense_q: query blocks whose rows keep all Mk key blocks (bool [Mq] or indices).
        out: a mask of the scores' shape, device, seq_len and block to fill in place
            (:meth:`BlockMask.copy_dense_`) by device ops only: the scores' values are trusted
            (not checked for NaN or +inf) and nothing is read back to the host, so the refresh
            of a cached mask can be captured in a CUDA graph. Takes no ``forced_kv`` or ``dense_q``.

    Returns:
        BlockMask [B, H, Mq, Mk] (``out`` when given). Ties are broken by ``torch.topk``.
    """
    if out is not None:
        _check_out(out, scores, seq_len, block, forced_kv, dense_q)
        return out.copy_dense_(_keep_topk(scores, topk_count(gamma, out.num_kv_blocks)))
    scores = _check_scores(scores, seq_len, block)
    m = scores.shape[3]
    k = topk_count(gamma, m)
    forced = block_flags(forced_kv, "forced_kv", m, scores.device)
    dense_rows = block_flags(dense_q, "dense_q", m, scores.device)
    n_forced = int(forced.sum())
    k_free = k - n_forced
    if k_free < 1:
        raise ValueError(
            f"`gamma` keeps k = max(1, int({gamma} * {m})) = {k} blocks, which leaves {k_free} after the "
            f"{n_forced} `forced_kv` blocks (must be >= 1); raise gamma or force fewer blocks"
        )
    # Forced blocks are taken out of the race so that top-k fills the rest of the budget.
    return _finish(_keep_topk(scores.masked_fill(forced, float("-inf")), k_free), forced, dense_rows, seq_len, block)


def _keep_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """bool [B, H, Mq, Mk]: the k highest scores of every row (device ops only)."""
    top = torch.topk(scores, k, dim=-1).indices
    return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device).scatter_(-1, top, True)


def _check_out(out: object, scores: object, seq_len: int, block: int, forced_kv: object, dense_q: object) -> None:
    """The in-place path of :func:`select_topk`: ``out`` fits the scores; no argument it cannot honour."""
    if not isinstance(out, BlockMask):
        raise TypeError(f"`out` must be a dfsviz BlockMask to fill in place (got {type(out).__name__})")
    if forced_kv is not None or dense_q is not None:
        raise ValueError(
            "`out` takes no `forced_kv` or `dense_q` (their flags need host work); select into a new mask "
            "without `out`"
        )
    check_block_map_shape(scores, "scores", seq_len, block)
    if (seq_len, block) != (out.seq_len, out.block) or tuple(scores.shape) != out.shape or scores.device != out.device:
        raise ValueError(
            f"`out` must match the scores: shape {tuple(scores.shape)} on {scores.device}, seq_len={seq_len}, "
            f"block={block} (got {out!r}); build it once with select_topk and pass it back"
        )


def select_cumulative(
    scores: torch.Tensor,
    tau: float,
    *,
    seq_len: int,
    block: int,
    forced_kv: torch.Tensor | Sequence[int] | None = None,
    dense_q: torch.Tensor | Sequence[int] | None = None,
    scores_are_logits: bool = False,
) -> BlockMask:
    """Keep, per row, the smallest set of key blocks whose normalised score mass reaches tau.

    Each row is turned into a distribution p over key blocks: ``softmax(row)`` when
    ``scores_are_logits`` (meanpool; pass ``SCORERS[method].is_logit``), else
    ``row / row.sum()`` for non-negative mass scores (dfs_tile rows sum to block / tile,
    antidiagonal to about block / stride, oracle to 1). Blocks are added in descending p
    (forced blocks first, their mass counts) while the mass already kept is below tau;
    so the set is the smallest reaching tau, at least one block, computed in float64.
    With tau = 1 rounding can keep blocks of zero mass.

    Args:
        scores: float [B, H, Mq, Mk], no NaN or +inf; -inf logits get no mass (a row of only
            -inf logits is refused unless ``dense_q`` keeps it whole), -inf masses are refused
            as negative.
        tau: target mass in (0, 1]; others as :func:`select_topk`.

    Returns:
        BlockMask [B, H, Mq, Mk].
    """
    scores = _check_scores(scores, seq_len, block)
    tau = check_fraction(tau, "tau")
    if not isinstance(scores_are_logits, bool):
        raise TypeError(f"`scores_are_logits` must be a bool (got {type(scores_are_logits).__name__})")
    m = scores.shape[3]
    forced = block_flags(forced_kv, "forced_kv", m, scores.device)
    dense_rows = block_flags(dense_q, "dense_q", m, scores.device)
    s = scores.to(torch.float64)
    if scores_are_logits:
        # Rows kept whole by dense_q need no distribution; any other row of only -inf has none.
        empty = torch.isneginf(s).all(dim=-1) & ~dense_rows
        if bool(empty.any()):
            raise ValueError(
                f"row {first_true_index(empty)} of `scores` is all -inf: its softmax is undefined; give every "
                "row at least one finite logit, or list the query block in `dense_q`"
            )
        p = torch.softmax(s, dim=-1)
    else:
        if bool((s < 0).any()):
            raise ValueError(
                f"`scores` must be non-negative masses when scores_are_logits=False (min {float(s.min()):.4g}); "
                "pass scores_are_logits=True for logit scorers such as meanpool"
            )
        total = s.sum(dim=-1, keepdim=True)
        if bool((total <= 0).any()):
            raise ValueError(
                "`scores` rows must have a positive sum to be normalised (got an all-zero row); "
                "check the scorer output or pass scores_are_logits=True"
            )
        p = s / total
    # Forced blocks sort ahead of every other block (priority > any probability).
    priority = torch.where(forced, p + 2.0, p)
    order = torch.argsort(priority, dim=-1, descending=True, stable=True)
    p_sorted = torch.gather(p, -1, order)
    mass_before = torch.cumsum(p_sorted, dim=-1) - p_sorted
    take_sorted = mass_before < tau
    take_sorted[..., 0] = True
    keep = torch.zeros_like(take_sorted).scatter_(-1, order, take_sorted)
    return _finish(keep, forced, dense_rows, seq_len, block)


@dataclass(frozen=True)
class SelectorSpec:
    """A registered selector.

    Fields:
        name: registry key ("topk", "cumulative").
        fn: callable(scores, value, *, seq_len, block, forced_kv=None, dense_q=None, ...) -> BlockMask.
        param: what ``value`` is: "gamma" (kept fraction of key blocks) or "tau" (target mass).
        key_letter: letter of the value in :func:`selector_key` ("g" or "t").
        summary: one line for CLI help and dashboard tooltips.
    """

    name: str
    fn: Callable[..., BlockMask]
    param: str
    key_letter: str
    summary: str

    def __call__(self, scores: torch.Tensor, value: float, **kwargs) -> BlockMask:
        return self.fn(scores, value, **kwargs)


SELECTORS: dict[str, SelectorSpec] = {
    spec.name: spec
    for spec in (
        SelectorSpec("topk", select_topk, "gamma", "g", "k = max(1, int(gamma * Mk)) best key blocks per query block"),
        SelectorSpec("cumulative", select_cumulative, "tau", "t", "smallest key-block set holding score mass tau"),
    )
}


def selector_names() -> list[str]:
    """Registered selector names, in registry order."""
    return list(SELECTORS)


def selector_key(kind: str, value: float) -> str:
    """Self-describing selector name: ("topk", 0.1) -> "topk_g0.10", ("cumulative", 0.9) -> "cumulative_t0.90".

    Values with more than two significant decimals keep them (0.125 -> "topk_g0.125");
    float noise such as 0.19999999999999998 prints as 0.20.
    """
    if not isinstance(kind, str) or kind not in SELECTORS:
        raise ValueError(f"`kind` must be one of {selector_names()} (got {kind!r})")
    spec = SELECTORS[kind]
    value = check_fraction(value, spec.param)
    text = f"{value:.2f}" if math.isclose(value, round(value, 2), abs_tol=1e-9) else f"{value:.4g}"
    return f"{spec.name}_{spec.key_letter}{text}"

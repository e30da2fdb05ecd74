"""The recall lower bounds of docs/theory.md: Bound 1 (row-wise), Bound 2 (block-level) and
Bound 3 (closed form in the three factors: budget, similarity gap, diversity).

Every bound is a lower bound on the measured recall of the same mask, for every
input, with no unknown constants: a bound above the recall is a bug. All bounds are
computed in float64 in log space: a ratio X / (X + Y) of sums of exponentials is
evaluated as sigmoid(log X - log Y) with log-sum-exp, so huge or tiny logits neither
overflow nor lose the bound.

Conventions for degenerate masks (query block u):

- nothing dropped (S_u holds every key block): Delta_u = +inf, J_u = 0, every bound 1;
- nothing kept (S_u empty): Delta_u = -inf, every bound 0.
"""

from __future__ import annotations

import torch

from dfsviz.sparse._validate import block_sizes, check_qk, resolve_scale
from dfsviz.sparse.masks import BlockMask, check_mask_for
from dfsviz.sparse.stats import (
    BlockStats,
    _check_chunk,
    _iter_row_chunks,
    block_recall_per_query,
)

__all__ = [
    "bound3",
    "closed_form_bound",
    "effective_gap",
    "factor_summary",
    "recall_bound",
    "row_bound",
    "similarity_gap",
]

_NEG_INF = float("-inf")


def _log_block_sizes(mask: BlockMask) -> torch.Tensor:
    """float64 [Mk]: log n_v, the log token count of each key block of the mask's sequence."""
    return block_sizes(mask.seq_len, mask.block, device=mask.device).to(torch.float64).log()


def _check_stats_mask(stats: object, mask: object) -> tuple[BlockStats, BlockMask]:
    if not isinstance(stats, BlockStats):
        raise TypeError(f"`stats` must be a BlockStats from block_stats_ref (got {type(stats).__name__})")
    if not isinstance(mask, BlockMask):
        raise TypeError(f"`mask` must be a dfsviz BlockMask (got {type(mask).__name__}); use BlockMask.from_dense")
    if (stats.seq_len, stats.block) != (mask.seq_len, mask.block) or stats.shape != mask.shape:
        raise ValueError(
            f"`stats` (shape {stats.shape}, seq_len={stats.seq_len}, block={stats.block}) and `mask` "
            f"(shape {mask.shape}, seq_len={mask.seq_len}, block={mask.block}) must describe the same "
            "blocks; compute both for the same Q/K, order and block size"
        )
    if stats.m.device != mask.device:
        raise ValueError(
            f"`stats` and `mask` must be on one device (got {stats.m.device} and {mask.device}); "
            "use mask.to(stats.m.device)"
        )
    return stats, mask


def _log_ratio_bound(log_kept: torch.Tensor, log_dropped: torch.Tensor) -> torch.Tensor:
    """X / (X + Y) from log X and log Y (either may be -inf): sigmoid(log X - log Y)."""
    return torch.sigmoid(log_kept - log_dropped)


def _masked_lse(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """log sum over the last dim of exp(x) where ``keep`` (-inf for an empty set)."""
    return torch.logsumexp(x.masked_fill(~keep, _NEG_INF), dim=-1)


def row_bound(
    q: torch.Tensor,
    k: torch.Tensor,
    mask: BlockMask,
    scale: float | None = None,
    *,
    max_chunk_elements: int | None = None,
) -> torch.Tensor:
    """Bound 1 (row-wise) of docs/theory.md for every query row, streaming over the keys.

    R_i(S) >= sum_{v in S_u} n_v e^{Lbar_iv}
              / (sum_{v in S_u} n_v e^{Lbar_iv} + sum_{w not in S_u} n_w e^{Lbar_iw + J_iw}),

    where u is the block of row i; the dropped terms n_w e^{Lbar_iw + J_iw} are exactly
    sum_{j in V_w} e^{l_ij}, so only the kept side is loosened (by dropping J_iv >= 0).

    Args:
        q, k: [B, H, N, D], any float dtype, in the order the mask's blocks were cut on.
        mask: :class:`BlockMask` with seq_len N and the B, H of q.
        scale: softmax scale, default D ** -0.5.
        max_chunk_elements: most logits held at once (see ``block_stats_ref``).

    Returns:
        float64 [B, H, N] lower bounds, each <= the row's recall (``row_recall_ref``).

    Raises ValueError for NaN or inf in q or k (naming the first), or an empty B, H or D.
    """
    check_qk(q, k)
    check_mask_for(mask, q)
    scale = resolve_scale(scale, q.shape[3])
    chunk = _check_chunk(max_chunk_elements)
    b, h, n, _ = q.shape
    dense = mask.to_dense().reshape(1, b * h, *mask.shape[2:])
    log_sizes = _log_block_sizes(mask)
    out = torch.empty((1, b * h, n), dtype=torch.float64, device=q.device)
    for c in _iter_row_chunks(q, k, mask.block, scale, chunk):
        kept = dense[:, c.heads, c.u0 : c.u1].repeat_interleave(mask.block, dim=2)  # [1, G, R, Mk]
        log_kept = _masked_lse(c.Lbar.to(torch.float64) + log_sizes, kept)
        log_dropped = _masked_lse(c.lse_iv.to(torch.float64), ~kept)
        start = c.u0 * mask.block
        out[:, c.heads, start : start + c.rows_valid] = _log_ratio_bound(log_kept, log_dropped)[:, :, : c.rows_valid]
    return out.view(b, h, n)


def recall_bound(stats: BlockStats, mask: BlockMask) -> torch.Tensor:
    """Bound 2 (block level) of docs/theory.md: beta_u(S) <= R_u(S) = sum_{v in S_u} m_uv.

    beta_u = sum_{v in S_u} n_v e^{L_uv - r_uv}
             / (sum_{v in S_u} n_v e^{L_uv - r_uv} + sum_{w not in S_u} n_w e^{L_uw + r_uw + J_uw}).

    Uses only L, r, J and the block sizes n_v (the short last block counts its true size).

    Args:
        stats: :class:`BlockStats` from ``block_stats_ref``.
        mask: :class:`BlockMask` for the same blocks.

    Returns:
        float64 [B, H, Mq]: beta_u in [0, 1].
    """
    stats, mask = _check_stats_mask(stats, mask)
    dense = mask.to_dense()
    log_sizes = _log_block_sizes(mask)
    big_l, r, jgap = (t.to(torch.float64) for t in (stats.L, stats.r, stats.J))
    log_kept = _masked_lse(log_sizes + big_l - r, dense)
    log_dropped = _masked_lse(log_sizes + big_l + r + jgap, ~dense)
    return _log_ratio_bound(log_kept, log_dropped)


def similarity_gap(L: torch.Tensor | BlockStats, mask: BlockMask) -> torch.Tensor:
    """Inter-block similarity gap Delta_u(S) = min_{v in S_u} L_uv - max_{w not in S_u} L_uw.

    For a top-k mask chosen by pooled score it is the k-th minus the (k+1)-th largest
    pooled logit (>= 0); for other selectors it may be negative. Conventions: +inf when
    nothing is dropped, -inf when nothing is kept.

    Args:
        L: float [B, H, Mq, Mk] pooled logits (or a :class:`BlockStats`).
        mask: :class:`BlockMask` of the same shape.

    Returns:
        float64 [B, H, Mq].
    """
    if isinstance(L, BlockStats):
        L = _check_stats_mask(L, mask)[0].L
    if not isinstance(mask, BlockMask):
        raise TypeError(f"`mask` must be a dfsviz BlockMask (got {type(mask).__name__}); use BlockMask.from_dense")
    if not isinstance(L, torch.Tensor):
        raise TypeError(f"`L` must be a torch.Tensor [B, H, Mq, Mk] or BlockStats (got {type(L).__name__})")
    if tuple(L.shape) != mask.shape or not L.is_floating_point():
        raise ValueError(
            f"`L` must be a float tensor of the mask's shape [B, H, Mq, Mk] = {mask.shape} "
            f"(got {tuple(L.shape)}, {L.dtype}); use the same block size and sequence length"
        )
    if L.device != mask.device:
        raise ValueError(f"`L` and `mask` must be on one device (got {L.device} and {mask.device}); use mask.to(L.device)")
    dense = mask.to_dense()
    pooled = L.to(torch.float64)
    low_kept = pooled.masked_fill(~dense, float("inf")).amin(dim=-1)
    high_dropped = pooled.masked_fill(dense, _NEG_INF).amax(dim=-1)
    gap = low_kept - high_dropped  # +inf when nothing is dropped
    return gap.masked_fill(~dense.any(dim=-1), _NEG_INF)


def _diversities(stats: BlockStats, dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """r_u = max_v r_uv and J_u = max_{w not in S_u} J_uw (0 when nothing is dropped), float64 [B, H, Mq]."""
    r_u = stats.r.to(torch.float64).amax(dim=-1)
    # J >= 0, so filling kept entries with 0 makes the max over dropped blocks 0 when none are dropped.
    j_u = stats.J.to(torch.float64).masked_fill(dense, 0.0).amax(dim=-1)
    return r_u, j_u


def effective_gap(stats: BlockStats, mask: BlockMask) -> torch.Tensor:
    """Effective gap Delta_u(S) - 2 r_u - J_u (docs/theory.md, Bound 3).

    r_u = max_v r_uv over all key blocks, J_u = max_{w not in S_u} J_uw. Conventions of
    :func:`similarity_gap`: +inf when nothing is dropped, -inf when nothing is kept.

    Returns:
        float64 [B, H, Mq].
    """
    stats, mask = _check_stats_mask(stats, mask)
    r_u, j_u = _diversities(stats, mask.to_dense())
    return similarity_gap(stats.L, mask) - 2.0 * r_u - j_u


def closed_form_bound(gamma: float | torch.Tensor, effective_gap: float | torch.Tensor) -> torch.Tensor:
    """Bound 3 of docs/theory.md: 1 / (1 + ((1 - gamma) / gamma) * exp(-effective_gap)).

    Evaluated as sigmoid(effective_gap + log gamma - log(1 - gamma)), so gamma = 1 or an
    infinite gap gives 1 and gamma = 0 or a gap of -inf gives 0. For masks with a short
    last block pass the key-token fraction gamma = sum_{v in S} n_v / N, which turns
    (1 - gamma) / gamma into sum_{w not in S} n_w / sum_{v in S} n_v (docs/theory.md).

    Args:
        gamma: kept fraction in [0, 1], a float or a tensor.
        effective_gap: Delta - 2r - J, a float or a tensor broadcastable with gamma.

    Returns:
        float64 tensor of the broadcast shape: the lower bound on recall.
    """
    g = torch.as_tensor(gamma, dtype=torch.float64)
    gap = torch.as_tensor(effective_gap, dtype=torch.float64, device=g.device)
    if g.numel() and (bool(torch.isnan(g).any()) or float(g.min()) < 0.0 or float(g.max()) > 1.0):
        raise ValueError(
            f"`gamma` must lie in [0, 1] (got values in [{float(g.min())}, {float(g.max())}]); it is the kept fraction"
        )
    if bool(torch.isnan(gap).any()):
        raise ValueError("`effective_gap` must not be NaN (got NaN); use +inf / -inf for all kept / none kept")
    try:
        g, gap = torch.broadcast_tensors(g, gap)
    except RuntimeError:
        raise ValueError(
            f"`gamma` (shape {tuple(g.shape)}) and `effective_gap` (shape {tuple(gap.shape)}) must broadcast"
        ) from None
    return torch.sigmoid(gap + torch.log(g) - torch.log1p(-g))


def _kept_token_fraction(mask: BlockMask) -> torch.Tensor:
    """float64 [B, H, Mq]: sum_{v in S_u} n_v / N, the kept share of key tokens."""
    return mask.kept_key_tokens().to(torch.float64) / mask.seq_len


def bound3(stats: BlockStats, mask: BlockMask) -> torch.Tensor:
    """Bound 3 (closed form) per query block with the short-block variant of docs/theory.md.

    1 / (1 + (sum_{w not in S_u} n_w / sum_{v in S_u} n_v) * exp(-(Delta_u - 2 r_u - J_u))),
    which is <= Bound 2 (``recall_bound``) <= the measured recall.

    Returns:
        float64 [B, H, Mq].
    """
    stats, mask = _check_stats_mask(stats, mask)
    return closed_form_bound(_kept_token_fraction(mask), effective_gap(stats, mask))


def factor_summary(stats: BlockStats, mask: BlockMask) -> dict[str, torch.Tensor]:
    """The three factors, the bounds and the measured recall of every query block.

    Returns a dict of float64 [B, H, Mq] tensors:
        "gamma": budget gamma_u = |S_u| / Mk;
        "gap": Delta_u(S); "r_u": max_v r_uv; "J_u": max_{w not in S_u} J_uw;
        "effective_gap": Delta_u - 2 r_u - J_u;
        "bound2": beta_u (Bound 2); "bound3": the closed form (Bound 3, short-block variant);
        "recall": R_u(S) = sum_{v in S_u} m_uv.
    On every entry bound3 <= bound2 <= recall (up to the rounding of m).
    """
    stats, mask = _check_stats_mask(stats, mask)
    dense = mask.to_dense()
    r_u, j_u = _diversities(stats, dense)
    gap = similarity_gap(stats.L, mask)
    eff = gap - 2.0 * r_u - j_u
    return {
        "gamma": mask.budget(),
        "gap": gap,
        "r_u": r_u,
        "J_u": j_u,
        "effective_gap": eff,
        "bound2": recall_bound(stats, mask),
        "bound3": closed_form_bound(_kept_token_fraction(mask), eff),
        "recall": block_recall_per_query(stats.m, mask),
    }

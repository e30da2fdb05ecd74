"""Block statistics of exact attention and the recall of block masks (docs/theory.md).

One streaming pass over the keys gives, for every (batch, head, query block u, key
block v), the four block statistics of docs/theory.md:

- ``m``  block mass m_uv = (1/|U_u|) sum_{i in U_u} sum_{j in V_v} A_ij (rows sum to 1),
- ``L``  pooled logit L_uv = mean_{i in U_u} Lbar_iv = qbar_u . kbar_v * scale,
- ``r``  query-side diversity r_uv = max_{i in U_u} |Lbar_iv - L_uv|,
- ``J``  block diversity J_uv = max_{i in U_u} J_iv, with the Jensen gap
  J_iv = log((1/n_v) sum_{j in V_v} exp(l_ij - Lbar_iv)) >= 0,

plus the log-partition lse_i = log sum_j exp(l_ij) of every query row. The pass
never holds more than one chunk of logits (``max_chunk_elements``), so memory is
O(N * Mk + chunk), never N x N for real sequence lengths.

The logits of a chunk are computed directly as deviations from the row-block mean,
l_ij - Lbar_iv = q_i . (k_j - kbar_v) * scale, so that J_iv is log of a mean of
exponentials of mean-zero numbers (no cancellation of large logits) and
lse_iv = Lbar_iv + log sum_j exp(l_ij - Lbar_iv) needs no running maximum: the
largest deviation of a row on a block is >= 0 (the deviations average to 0), so the
sum is >= 1 and cannot underflow, and it cannot overflow while
|q_i| * max_j |k_j - kbar_v| * scale stays under :data:`_SAFE_SHIFT`; the rare
(row, block) pairs above that fall back to an exact max-shifted logsumexp.

Recall of a mask comes from m alone (``block_recall``), without touching Q/K again.

Inputs are checked at the boundary: Q/K (and x of ``variance_ratio``) must be finite with
B, H, D >= 1, and a block mass given to the recall functions must be a distribution per row
(finite, non-negative, rows summing to 1 within ``_validate.MASS_ROW_SUM_TOLERANCE``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dfsviz.sparse._validate import (
    NON_FINITE_QKV_FIX,
    block_sizes,
    check_bhnd,
    check_block,
    check_block_mass,
    check_finite,
    check_qk,
    check_seq_len,
    compute_dtype,
    num_blocks,
    resolve_scale,
)
from dfsviz.sparse.masks import BlockMask, check_mask_for

__all__ = [
    "BlockStats",
    "block_recall",
    "block_recall_per_query",
    "block_stats_ref",
    "mask_density",
    "oracle_recall",
    "row_attention_ref",
    "row_recall_ref",
    "variance_ratio",
]

# 16 Mi logits per chunk: 64 MB in float32. Large enough that every chunk is a few big
# matmuls (BLAS efficiency), small enough that peak memory stays far below 1 GB.
DEFAULT_CHUNK_ELEMENTS = 1 << 24

# Largest |l_ij - Lbar_iv| bound for which exp() of every deviation of a block, summed over
# up to 256 tokens, stays finite: e^80 * 256 < 3.4e38 (float32), e^700 * 256 < 1.8e308 (float64).
_SAFE_SHIFT = {torch.float32: 80.0, torch.float64: 700.0}


def _check_chunk(max_chunk_elements: object) -> int:
    if max_chunk_elements is None:
        return DEFAULT_CHUNK_ELEMENTS
    if isinstance(max_chunk_elements, bool) or not isinstance(max_chunk_elements, int) or max_chunk_elements < 1:
        raise ValueError(
            f"`max_chunk_elements` must be a positive integer or None for {DEFAULT_CHUNK_ELEMENTS} "
            f"(got {max_chunk_elements!r}); it caps the logits held at once"
        )
    return max_chunk_elements


@dataclass(frozen=True, eq=False)
class BlockStats:
    """Block statistics of one attention call (docs/theory.md), from :func:`block_stats_ref`.

    Fields (float32, or float64 when computed from float64 inputs):
        m: [B, H, Mq, Mk] block mass m_uv; each row sums to 1.
        L: [B, H, Mq, Mk] pooled logit L_uv = qbar_u . kbar_v * scale.
        r: [B, H, Mq, Mk] query-side diversity r_uv >= 0.
        J: [B, H, Mq, Mk] block diversity J_uv >= 0.
        lse: [B, H, N] log sum_j exp(l_ij) of every query row.
        block: tokens per block (power of two in [16, 256]); Mq = Mk = ceil(N / block).
        seq_len: N, tokens in the sequence.

    Construction validates shapes and raises ValueError on a mismatch. Equality is
    identity (tensors have no single truth value).
    """

    m: torch.Tensor
    L: torch.Tensor
    r: torch.Tensor
    J: torch.Tensor
    lse: torch.Tensor
    block: int
    seq_len: int

    def __post_init__(self) -> None:
        block = check_block(self.block)
        check_seq_len(self.seq_len)
        mb = num_blocks(self.seq_len, block)
        for name in ("m", "L", "r", "J", "lse"):
            if not isinstance(getattr(self, name), torch.Tensor):
                raise TypeError(f"`{name}` must be a torch.Tensor (got {type(getattr(self, name)).__name__})")
        if self.m.dim() != 4 or tuple(self.m.shape[2:]) != (mb, mb):
            raise ValueError(
                f"`m` must have shape [B, H, {mb}, {mb}] for seq_len={self.seq_len}, block={block} "
                f"(got {tuple(self.m.shape)})"
            )
        for name in ("L", "r", "J"):
            if getattr(self, name).shape != self.m.shape:
                raise ValueError(
                    f"`{name}` must have the shape of `m` {tuple(self.m.shape)} (got {tuple(getattr(self, name).shape)})"
                )
        expected = (*self.m.shape[:2], self.seq_len)
        if tuple(self.lse.shape) != expected:
            raise ValueError(f"`lse` must have shape [B, H, N] = {expected} (got {tuple(self.lse.shape)})")

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(B, H, Mq, Mk)."""
        return tuple(self.m.shape)  # type: ignore[return-value]

    @property
    def num_blocks(self) -> int:
        """Mq = Mk."""
        return self.m.shape[-1]

    def block_sizes(self) -> torch.Tensor:
        """int64 [Mk]: tokens per block, n_v (all ``block`` but a possibly short last one)."""
        return block_sizes(self.seq_len, self.block, device=self.m.device)


@dataclass
class _RowChunk:
    """Per-row statistics of query blocks [u0, u1) against all key blocks, for some heads.

    ``heads`` selects the heads of the flattened batch x head axis (length B * H) that the
    chunk covers. Rows are the padded rows u0*block .. u1*block; ``rows_valid`` of them are
    real tokens (only the last chunk of a ragged sequence has padding rows). Tensors
    [1, G, R, Mk] (G heads of the group) in the compute dtype: Lbar (row-block logit), J
    (Jensen gap J_iv, clamped at 0) and lse_iv = log sum_{j in V_v} exp(l_ij).
    """

    heads: slice
    u0: int
    u1: int
    rows_valid: int
    Lbar: torch.Tensor
    J: torch.Tensor
    lse_iv: torch.Tensor


def _iter_row_chunks(
    q: torch.Tensor, k: torch.Tensor, block: int, scale: float, max_chunk_elements: int
) -> Iterator[_RowChunk]:
    """Stream the per-row block statistics over head groups and chunks of query blocks.

    Heads (the flattened B * H axis) go in groups small enough that the group's padded
    float copies of q and k hold at most ``max_chunk_elements`` elements each (at least
    one head), so many-head inputs never need a full-precision copy of all heads at once.
    """
    b, h, n, d = q.shape
    mb = num_blocks(n, block)
    padded = mb * block
    q_all = q.reshape(1, b * h, n, d)
    k_all = k.reshape(1, b * h, n, d)
    group = max(1, min(b * h, max_chunk_elements // (padded * d)))
    for g0 in range(0, b * h, group):
        heads = slice(g0, min(b * h, g0 + group))
        yield from _iter_group_chunks(q_all[:, heads], k_all[:, heads], heads, block, scale, max_chunk_elements)


def _iter_group_chunks(
    q: torch.Tensor, k: torch.Tensor, heads: slice, block: int, scale: float, max_chunk_elements: int
) -> Iterator[_RowChunk]:
    """The streaming pass of the module docstring for q, k [1, G, N, D] (one head group)."""
    b, h, n, d = q.shape
    cdt = compute_dtype(q)
    mb = num_blocks(n, block)
    padded = mb * block
    sizes_c = block_sizes(n, block, device=q.device).to(cdt)
    # Zero padding to whole blocks: padding keys are excluded by -inf logits below and
    # padding rows by the row count, so their values never reach a result.
    qs = F.pad(q.to(cdt) * scale, (0, 0, 0, padded - n))
    kf = F.pad(k.to(cdt), (0, 0, 0, padded - n))
    kbar = kf.view(b, h, mb, block, d).sum(dim=3) / sizes_c[:, None]  # [1, G, Mk, D]
    kc = (kf.view(b, h, mb, block, d) - kbar.unsqueeze(3)).view(b, h, padded, d)
    del kf
    if padded > n:
        kc[:, :, n:] = 0
    kc_norm = kc.view(b, h, mb, block, d).norm(dim=-1).amax(dim=-1)  # [1, G, Mk]
    kct = kc.transpose(-1, -2)  # [1, G, D, Np]
    kbart = kbar.transpose(-1, -2)  # [1, G, D, Mk]
    log_sizes = sizes_c.log()
    safe = _SAFE_SHIFT[cdt]

    per_pair = h * block * block
    kv_step = min(mb, max(1, max_chunk_elements // per_pair))
    q_step = min(mb, max(1, max_chunk_elements // (per_pair * kv_step)))
    # One logit buffer reused by every chunk: a fresh allocation per chunk costs page
    # faults and zeroing that took as long as the matmul itself on the CPU.
    buffer = torch.empty(per_pair * kv_step * q_step, dtype=cdt, device=q.device)
    for u0 in range(0, mb, q_step):
        u1 = min(mb, u0 + q_step)
        rows = (u1 - u0) * block
        qc = qs[:, :, u0 * block : u1 * block]  # [1, G, R, D]
        lbar = torch.matmul(qc, kbart)  # [1, G, R, Mk]: Lbar_iv = q_i . kbar_v * scale
        q_norm = qc.norm(dim=-1)  # [1, G, R]
        log_sum = torch.empty((b, h, rows, mb), dtype=cdt, device=q.device)
        for v0 in range(0, mb, kv_step):
            v1 = min(mb, v0 + kv_step)
            out = buffer[: h * rows * (v1 - v0) * block].view(b, h, rows, (v1 - v0) * block)
            dev = torch.matmul(qc, kct[..., v0 * block : v1 * block], out=out).view(b, h, rows, v1 - v0, block)
            if v1 == mb and padded > n:
                dev[..., -1, block - (padded - n) :] = float("-inf")
            # Cauchy-Schwarz: |l_ij - Lbar_iv| <= |q_i| * |k_j - kbar_v| * scale (scale is in q);
            # one scalar test clears the whole chunk in the common case.
            unsafe = None
            if float(q_norm.max()) * float(kc_norm[..., v0:v1].max()) > safe:
                unsafe = q_norm[..., None] * kc_norm[:, :, None, v0:v1] > safe
                exact = torch.logsumexp(dev[unsafe], dim=-1)
            part = dev.exp_().sum(dim=-1).log_()  # [1, G, R, v1 - v0]
            if unsafe is not None:
                part[unsafe] = exact
            log_sum[..., v0:v1] = part
        # J_iv >= 0 by Jensen; the clamp only removes rounding noise, on the safe side for the bounds.
        jgap = (log_sum - log_sizes).clamp_min_(0)
        rows_valid = min(rows, n - u0 * block)
        yield _RowChunk(heads, u0, u1, rows_valid, lbar, jgap, lbar + log_sum)


def block_stats_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    block: int = 128,
    scale: float | None = None,
    *,
    max_chunk_elements: int | None = None,
) -> BlockStats:
    """Block mass m, pooled logit L, diversities r and J, and row lse of exact attention.

    Args:
        q, k: [B, H, N, D] queries and keys (self-attention: same N), any float dtype,
            already in the token order whose blocks are studied.
        block: tokens per block (power of two in [16, 256]); Mq = Mk = ceil(N / block),
            the last block holds N - (Mk - 1) * block tokens.
        scale: softmax scale, default D ** -0.5.
        max_chunk_elements: most logits held at once (default 16 Mi; a chunk is never
            smaller than one block pair of one head); heads are also processed in groups
            whose float copies of q and k stay under it. Results do not depend on it
            beyond float rounding.

    Returns:
        :class:`BlockStats` with m, L, r, J [B, H, Mq, Mk] and lse [B, H, N], in float32
        (float64 for float64 inputs; half inputs are upcast to float32).

    Raises ValueError for NaN or inf in q or k (naming the first), or an empty B, H or D.
    """
    check_qk(q, k)
    block = check_block(block)
    scale = resolve_scale(scale, q.shape[3])
    return _block_stats(q, k, block, scale, _check_chunk(max_chunk_elements))


def _block_stats(q: torch.Tensor, k: torch.Tensor, block: int, scale: float, chunk: int) -> BlockStats:
    """:func:`block_stats_ref` on checked arguments (the oracle scorer has checked them already)."""
    b, h, n, d = q.shape
    cdt = compute_dtype(q)
    mb = num_blocks(n, block)
    sizes_c = block_sizes(n, block, device=q.device).to(cdt)
    # Outputs live on the flattened [1, B*H, ...] head axis that the chunks index.
    shape = (1, b * h, mb, mb)
    m = torch.empty(shape, dtype=cdt, device=q.device)
    big_l = torch.empty_like(m)
    r = torch.empty_like(m)
    jmax = torch.empty_like(m)
    lse = torch.empty((1, b * h, n), dtype=cdt, device=q.device)
    for c in _iter_row_chunks(q, k, block, scale, chunk):
        nu, g = c.u1 - c.u0, c.lse_iv.shape[1]
        lse_i = torch.logsumexp(c.lse_iv, dim=-1)  # [1, G, R]
        probs = torch.exp(c.lse_iv - lse_i[..., None])  # m_iv: row i's mass on key block v
        lbar, jgap = c.Lbar, c.J
        if c.rows_valid < nu * block:
            # Padding rows of a short last query block must not enter means or maxima.
            pad = slice(c.rows_valid, None)
            probs[:, :, pad] = 0
            lbar = lbar.clone()
            lbar[:, :, pad] = 0
            jgap[:, :, pad] = 0
        n_u = sizes_c[c.u0 : c.u1, None]
        m[:, c.heads, c.u0 : c.u1] = probs.view(1, g, nu, block, mb).sum(dim=3) / n_u
        pooled = lbar.view(1, g, nu, block, mb).sum(dim=3) / n_u
        big_l[:, c.heads, c.u0 : c.u1] = pooled
        spread = (c.Lbar.view(1, g, nu, block, mb) - pooled.unsqueeze(3)).abs_()
        if c.rows_valid < nu * block:
            spread.view(1, g, nu * block, mb)[:, :, c.rows_valid :] = 0
        r[:, c.heads, c.u0 : c.u1] = spread.amax(dim=3)
        jmax[:, c.heads, c.u0 : c.u1] = jgap.view(1, g, nu, block, mb).amax(dim=3)
        lse[:, c.heads, c.u0 * block : c.u0 * block + c.rows_valid] = lse_i[:, :, : c.rows_valid]
    m, big_l, r, jmax = (t.view(b, h, mb, mb) for t in (m, big_l, r, jmax))
    lse = lse.view(b, h, n)
    return BlockStats(m=m, L=big_l, r=r, J=jmax, lse=lse, block=block, seq_len=n)


def _check_mask(mask: object) -> BlockMask:
    if not isinstance(mask, BlockMask):
        raise TypeError(f"`mask` must be a dfsviz BlockMask (got {type(mask).__name__}); use BlockMask.from_dense")
    return mask


def _mass_and_mask(m: object, mask: object) -> tuple[torch.Tensor, BlockMask]:
    """Validate a block-mass tensor (or BlockStats) against a mask, and its values
    (``check_block_mass``); return m as float64."""
    mask = _check_mask(mask)
    if isinstance(m, BlockStats):
        if (m.seq_len, m.block) != (mask.seq_len, mask.block):
            raise ValueError(
                f"`m` (BlockStats with seq_len={m.seq_len}, block={m.block}) and `mask` (seq_len="
                f"{mask.seq_len}, block={mask.block}) must describe the same blocks; build the mask "
                "from these statistics' scores"
            )
        m = m.m
    if not isinstance(m, torch.Tensor):
        raise TypeError(f"`m` must be a torch.Tensor [B, H, Mq, Mk] or BlockStats (got {type(m).__name__})")
    if tuple(m.shape) != mask.shape:
        raise ValueError(
            f"`m` must have the mask's shape [B, H, Mq, Mk] = {mask.shape} (got {tuple(m.shape)}); "
            "use the block size and sequence length of the mask"
        )
    if not m.is_floating_point():
        raise ValueError(f"`m` must be a floating-point block mass (got {m.dtype})")
    if m.device != mask.device:
        raise ValueError(f"`m` and `mask` must be on one device (got {m.device} and {mask.device}); use mask.to(m.device)")
    check_block_mass(m)
    return m.to(torch.float64), mask


def _query_weights(seq_len: int, block: int, device: torch.device) -> torch.Tensor:
    """float64 [Mq]: |U_u| / N, each query block's share of the query rows."""
    return block_sizes(seq_len, block, device=device).to(torch.float64) / seq_len


def block_recall_per_query(m: torch.Tensor | BlockStats, mask: BlockMask) -> torch.Tensor:
    """Recall of each query block, R_u(S) = sum_{v in S_u} m_uv (docs/theory.md).

    Args:
        m: float [B, H, Mq, Mk] block mass (or a :class:`BlockStats`): finite, non-negative,
            each row summing to 1 within 1e-2 (so float16 / bfloat16-stored masses pass),
            else ValueError.
        mask: :class:`BlockMask` of the same shape.

    Returns:
        float64 [B, H, Mq] in [0, 1]: a row sum the rounding of m put above 1 is clipped to 1.
    """
    mass, mask = _mass_and_mask(m, mask)
    kept = torch.where(mask.to_dense(), mass, torch.zeros((), dtype=torch.float64, device=mass.device)).sum(dim=-1)
    # m's rounding (up to the row-sum tolerance) may lift a kept sum past 1: recall stays in [0, 1].
    return kept.clamp_(max=1.0)


def block_recall(m: torch.Tensor | BlockStats, mask: BlockMask) -> torch.Tensor:
    """Recall R(S) = sum_u (|U_u| / N) sum_{v in S_u} m_uv of a mask (docs/theory.md).

    The share of all attention probability (averaged over the N query rows) that the
    mask keeps; a short last query block weighs its true row count.

    Args:
        m: float [B, H, Mq, Mk] block mass (or a :class:`BlockStats`), checked as in
            :func:`block_recall_per_query`.
        mask: :class:`BlockMask` of the same shape; its seq_len and block give |U_u|.

    Returns:
        float64 [B, H] in [0, 1].
    """
    per_query = block_recall_per_query(m, mask)
    # Weights summing to 1 only up to float64 rounding could lift an all-kept recall past 1.
    return (per_query * _query_weights(mask.seq_len, mask.block, per_query.device)).sum(dim=-1).clamp_(max=1.0)


def oracle_recall(
    m: torch.Tensor | BlockStats,
    k: int | torch.Tensor,
    *,
    seq_len: int | None = None,
    block: int | None = None,
) -> torch.Tensor:
    """Oracle recall R*(k): per query block the sum of its k largest m_uv, averaged over rows.

    The best recall any mask keeping k key blocks per query block can reach.

    Args:
        m: a :class:`BlockStats`, or a float [B, H, Mq, Mk] block mass together with
            ``seq_len`` and ``block`` (needed for the row weights |U_u| / N); its values are
            checked as in :func:`block_recall_per_query`.
        k: kept key blocks per query block: an int in [0, Mk], or an integer tensor
            broadcastable to [B, H, Mq] with values in [0, Mk].
        seq_len, block: N and the block size, only when ``m`` is a tensor.

    Returns:
        float64 [B, H] in [0, 1] (a row sum the rounding of m put above 1 counts as 1).
    """
    if isinstance(m, BlockStats):
        if seq_len is not None or block is not None:
            raise ValueError("`seq_len` and `block` must be None when `m` is a BlockStats (it carries both)")
        seq_len, block, mass = m.seq_len, m.block, m.m
    else:
        if not isinstance(m, torch.Tensor):
            raise TypeError(f"`m` must be a torch.Tensor [B, H, Mq, Mk] or BlockStats (got {type(m).__name__})")
        if seq_len is None or block is None:
            raise ValueError(
                "`seq_len` and `block` are required when `m` is a tensor (got "
                f"seq_len={seq_len!r}, block={block!r}); pass them or pass the BlockStats itself"
            )
        block = check_block(block)
        check_seq_len(seq_len)
        mb = num_blocks(seq_len, block)
        if m.dim() != 4 or tuple(m.shape[2:]) != (mb, mb):
            raise ValueError(
                f"`m` must have shape [B, H, {mb}, {mb}] for seq_len={seq_len}, block={block} (got {tuple(m.shape)})"
            )
        if not m.is_floating_point():
            raise ValueError(f"`m` must be a floating-point block mass (got {m.dtype})")
        mass = m
    check_block_mass(mass)
    b, h, mq, mk = mass.shape
    if isinstance(k, torch.Tensor):
        if k.dtype.is_floating_point or k.dtype == torch.bool or k.is_complex():
            raise ValueError(f"`k` must be an integer tensor (got {k.dtype}); use k.long()")
        try:
            kk = torch.broadcast_to(k.to(device=mass.device, dtype=torch.int64), (b, h, mq))
        except RuntimeError:
            raise ValueError(
                f"`k` must be broadcastable to [B, H, Mq] = {(b, h, mq)} (got shape {tuple(k.shape)})"
            ) from None
    elif isinstance(k, int) and not isinstance(k, bool):
        kk = torch.full((b, h, mq), k, dtype=torch.int64, device=mass.device)
    else:
        raise TypeError(f"`k` must be an int or an integer tensor (got {type(k).__name__})")
    if kk.numel() and (int(kk.min()) < 0 or int(kk.max()) > mk):
        raise ValueError(
            f"`k` must lie in [0, Mk] = [0, {mk}] (got values in [{int(kk.min())}, {int(kk.max())}]); "
            "for a budget gamma use max(1, int(gamma * Mk))"
        )
    top = torch.sort(mass.to(torch.float64), dim=-1, descending=True).values.cumsum(dim=-1)
    top = torch.cat([torch.zeros((b, h, mq, 1), dtype=torch.float64, device=mass.device), top], dim=-1)
    per_query = torch.gather(top, -1, kk.unsqueeze(-1)).squeeze(-1)
    # m's rounding (up to the row-sum tolerance) may lift a top-k sum past 1: recall stays in [0, 1].
    return (per_query * _query_weights(seq_len, block, mass.device)).sum(dim=-1).clamp_(max=1.0)


def mask_density(mask: BlockMask) -> torch.Tensor:
    """Density rho(S) of a mask, float64 [B, H] (same as ``mask.density()``)."""
    return _check_mask(mask).density()


def variance_ratio(x: torch.Tensor, block: int = 128, *, check_values: bool = True) -> torch.Tensor:
    """Intra-block variance ratio W (docs/theory.md): the share of variance that stays in blocks.

    W = sum_v sum_{j in V_v} ||x_j - xbar_v||^2 / sum_j ||x_j - xbar||^2, computed in
    float64. W_q for queries, W_k for keys; lower means more compact blocks. A head with
    zero total variance (all tokens equal) has W = 0: no variance to keep inside blocks.

    Args:
        x: [B, H, N, D] queries or keys, in the token order whose blocks are studied; finite,
            B, H, D >= 1, else ValueError.
        block: tokens per block (power of two in [16, 256]); the last block may be short.
        check_values: refuse non-finite ``x`` (one pass; on a GPU it waits for the device).
            False is for callers that check the result instead (the capture checks every W
            it writes), so that nothing here waits for the GPU; a non-finite ``x`` then gives NaN.

    Returns:
        float64 [B, H] in [0, 1].
    """
    check_bhnd(x, "x")
    block = check_block(block)
    if check_values:
        check_finite(x, "x", NON_FINITE_QKV_FIX)
    b, h, n, d = x.shape
    mb = num_blocks(n, block)
    padded = mb * block
    sizes = block_sizes(n, block, device=x.device).to(torch.float64)
    flat = x.reshape(b * h, n, d)
    out = torch.empty(b * h, dtype=torch.float64, device=x.device)
    # One head at a time: a float64 copy of all heads of a 720p capture would take gigabytes.
    for g in range(b * h):
        # Variance does not move with a shift; shifted by its first token, a head of equal tokens
        # is exactly 0, so its total is exactly 0 (the mean of equal numbers may round off them).
        xd = flat[g].to(torch.float64)
        xd = xd - xd[0]
        blocks = F.pad(xd, (0, 0, 0, padded - n)).view(mb, block, d)
        means = blocks.sum(dim=1, keepdim=True) / sizes[:, None, None]
        within = ((blocks - means) ** 2).sum(dim=-1).view(padded)[:n].sum()
        total = ((xd - xd.mean(dim=0)) ** 2).sum()
        # no host sync: where() instead of testing `total` in Python (one per head on a GPU);
        # only a zero total means "no variance": a NaN total (unchecked input) stays NaN
        out[g] = torch.where(total == 0, torch.zeros_like(total), within / total)
    return out.view(b, h)


def _check_rows(rows: object, n: int, device: torch.device) -> torch.Tensor:
    if isinstance(rows, torch.Tensor):
        if rows.dtype.is_floating_point or rows.dtype == torch.bool or rows.is_complex():
            raise ValueError(f"`rows` must hold integer token indices (got dtype {rows.dtype}); use rows.long()")
        idx = rows.to(device=device, dtype=torch.int64)
    elif isinstance(rows, Sequence) and all(isinstance(i, int) and not isinstance(i, bool) for i in rows):
        idx = torch.tensor(list(rows), dtype=torch.int64, device=device)
    else:
        raise TypeError(f"`rows` must be a 1-D integer tensor or a sequence of ints (got {type(rows).__name__})")
    if idx.dim() != 1 or idx.numel() == 0:
        raise ValueError(f"`rows` must be a non-empty 1-D list of query indices (got shape {tuple(idx.shape)})")
    if int(idx.min()) < 0 or int(idx.max()) >= n:
        raise ValueError(
            f"`rows` must lie in [0, N) = [0, {n}) (got values in [{int(idx.min())}, {int(idx.max())}])"
        )
    return idx


def row_attention_ref(
    q: torch.Tensor, k: torch.Tensor, rows: torch.Tensor | Sequence[int], scale: float | None = None
) -> torch.Tensor:
    """Exact attention probabilities of chosen query rows over all N keys (footprints).

    Args:
        q, k: [B, H, N, D], any float dtype.
        rows: int [R] query token indices in [0, N) (a tensor or a list of ints).
        scale: softmax scale, default D ** -0.5.

    Returns:
        [B, H, R, N] softmax rows, float32 (float64 for float64 inputs); memory B*H*R*N.

    Raises ValueError for NaN or inf in q or k (naming the first), or an empty B, H or D.
    """
    check_qk(q, k)
    scale = resolve_scale(scale, q.shape[3])
    idx = _check_rows(rows, q.shape[2], q.device)
    cdt = compute_dtype(q)
    logits = torch.matmul(q.index_select(2, idx).to(cdt), k.to(cdt).transpose(-1, -2)) * scale
    return torch.softmax(logits, dim=-1)


def row_recall_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    mask: BlockMask,
    scale: float | None = None,
    *,
    max_chunk_elements: int | None = None,
) -> torch.Tensor:
    """Recall of every query row, R_i(S) = sum_{j : block(j) in S_block(i)} A_ij, streaming.

    Args:
        q, k: [B, H, N, D], any float dtype, in the order the mask's blocks were cut on.
        mask: :class:`BlockMask` with seq_len N, matching B and H.
        scale: softmax scale, default D ** -0.5.
        max_chunk_elements: most logits held at once (see :func:`block_stats_ref`).

    Returns:
        float64 [B, H, N]; its mean over the rows is ``block_recall`` of the mask.

    Raises ValueError for NaN or inf in q or k (naming the first), or an empty B, H or D.
    """
    check_qk(q, k)
    check_mask_for(mask, q)
    scale = resolve_scale(scale, q.shape[3])
    chunk = _check_chunk(max_chunk_elements)
    b, h, n, _ = q.shape
    dense = mask.to_dense().reshape(1, b * h, *mask.shape[2:])
    out = torch.empty((1, b * h, n), dtype=torch.float64, device=q.device)
    for c in _iter_row_chunks(q, k, mask.block, scale, chunk):
        kept = dense[:, c.heads, c.u0 : c.u1].repeat_interleave(mask.block, dim=2)  # [1, G, R, Mk]
        lse = c.lse_iv.to(torch.float64)
        lse_kept = torch.logsumexp(lse.masked_fill(~kept, float("-inf")), dim=-1)
        lse_all = torch.logsumexp(lse, dim=-1)
        start = c.u0 * mask.block
        out[:, c.heads, start : start + c.rows_valid] = torch.exp(lse_kept - lse_all)[:, :, : c.rows_valid]
    return out.view(b, h, n)


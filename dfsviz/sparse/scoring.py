"""Block scores: cheap estimates of how much attention each (query block, key block) gets.

Every scorer maps queries and keys q, k [B, H, N, D] to float32 scores
[B, H, Mq, Mk] (Mq = Mk = ceil(N / block)); a selector (``select.py``) turns them
into a :class:`~dfsviz.sparse.masks.BlockMask`. Scorers live in the
:data:`SCORERS` registry with metadata saying whether their scores are
probability masses (``kind="mass"``, normalise by the row sum) or logits
(``kind="logit"``, normalise with a softmax).

Methods:

- ``meanpool``: pooled logit L_uv = qbar_u . kbar_v * scale (docs/theory.md), block means
  over the true token count of each block (the short last block is not diluted).
- ``dfs_tile``: DFSAttn's hierarchical scoring, reproducing the DFSAttn reference code's
  ``_compute_tile_score`` plus its block aggregation (the paper leaves the softmax scope
  and precision unstated; the code fixes them): q and k are zero-padded to
  ceil(N / block) * block tokens, mean-pooled over tiles of ``tile`` tokens (pad zeros
  included in the means), tile logits qbar_i' . kbar_j' * scale go through a softmax over
  ALL key tiles of the padded sequence (whole pad tiles have logit 0 and take some mass),
  and the tile scores are summed over the (block / tile)^2 tile pairs of each block pair.
  Each query block's row therefore sums to block / tile. Difference from the reference: it computes in the
  input dtype (bf16 in both pipelines); this computes in float32 (float64 for float64
  inputs), so scores on bf16 inputs differ by bf16 rounding and near-ties may rank
  differently.
- ``antidiagonal``: XAttention's strided antidiagonal scoring with stride S = ``tile``
  (default 8). Tokens are zero-padded to ceil(N / block) * block. Strided row i holds
  the S queries of positions iS .. iS+S-1 in reversed order, strided column j the S keys
  of positions jS .. jS+S-1 in order, so their dot product is the antidiagonal sum
  sum_{t<S} q_{iS+S-1-t} . k_{jS+t} of the S x S sub-square (i, j) of QK^T. Logits are
  that sum * scale / S (the mean antidiagonal logit), a softmax runs over all strided
  key positions of the padded sequence (pad keys included with their logit 0, as
  XAttention's non-causal path does), strided query rows made only of pad tokens are
  zeroed (as XAttention does), and the probabilities are summed over the
  (block / S)^2 sub-squares of each block pair; full rows sum to block / S.
  XAttention pads to its chunk size (a multiple of the block, 2048+ tokens); we pad only
  to the block multiple, so for ragged N fewer pad keys share the softmax than there.
- ``oracle``: the exact block mass m_uv of docs/theory.md from
  ``dfsviz.sparse.stats.block_stats_ref`` (dense attention, for upper-bound curves).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from dfsviz.sparse._validate import block_sizes, check_block, check_qk, compute_dtype, num_blocks, resolve_scale

__all__ = ["SCORERS", "ScorerSpec", "block_scores_ref", "scorer_key", "scorer_names"]

# Largest tile-logit slab held at once; bigger problems loop over heads and chunks of
# query blocks so a Wan-size head (4,728^2 tiles) never needs its whole matrix in memory.
_SCORE_CHUNK_BYTES = 256 * 2**20


def _pad_to_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """Zero-pad [B, H, N, D] along N to ceil(N / block) * block tokens."""
    pad = num_blocks(x.shape[2], block) * block - x.shape[2]
    return F.pad(x, (0, 0, 0, pad)) if pad else x


def _softmax_block_sums(
    qt: torch.Tensor, kt: torch.Tensor, scale: float, per_block: int, row_weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Sum of softmax(qt kt^T * scale) over per_block x per_block cells of each block pair.

    qt: [B, H, Tq, E], kt: [B, H, Tk, E] with Tq, Tk multiples of ``per_block``;
    row_weight: optional [Tq] factor applied to each softmax row (0 drops a row).
    Returns [B, H, Tq / per_block, Tk / per_block] in qt's dtype.
    """
    b, h, tq, e = qt.shape
    tk = kt.shape[2]
    mq, mk = tq // per_block, tk // per_block
    qf, kf = qt.reshape(b * h, tq, e), kt.reshape(b * h, tk, e)
    out = torch.empty(b * h, mq, mk, dtype=qt.dtype, device=qt.device)
    limit = max(1, _SCORE_CHUNK_BYTES // qt.element_size())
    if tq * tk <= limit:
        heads_per_chunk, rows = max(1, limit // (tq * tk)), tq
    else:
        heads_per_chunk, rows = 1, max(per_block, (limit // tk) // per_block * per_block)
    for h0 in range(0, b * h, heads_per_chunk):
        hs = slice(h0, h0 + heads_per_chunk)
        for r0 in range(0, tq, rows):
            probs = torch.softmax(torch.matmul(qf[hs, r0 : r0 + rows], kf[hs].transpose(1, 2)) * scale, dim=-1)
            if row_weight is not None:
                probs = probs * row_weight[r0 : r0 + rows, None]
            g, nr = probs.shape[0], probs.shape[1]
            sums = probs.view(g, nr // per_block, per_block, mk, per_block).sum(dim=(2, 4))
            out[hs, r0 // per_block : (r0 + nr) // per_block] = sums
    return out.view(b, h, mq, mk)


def _meanpool(q: torch.Tensor, k: torch.Tensor, *, tile: int | None, block: int, scale: float) -> torch.Tensor:
    del tile  # block means need no tile size
    n = q.shape[2]
    m = num_blocks(n, block)
    counts = block_sizes(n, block, device=q.device).to(compute_dtype(q))
    dt = compute_dtype(q)
    # Pad zeros add nothing to the sums; dividing by the true counts gives real means.
    qbar = _pad_to_blocks(q.to(dt), block).view(*q.shape[:2], m, block, q.shape[3]).sum(3) / counts[:, None]
    kbar = _pad_to_blocks(k.to(dt), block).view(*k.shape[:2], m, block, k.shape[3]).sum(3) / counts[:, None]
    return torch.matmul(qbar, kbar.transpose(-1, -2)) * scale


def _dfs_tile(q: torch.Tensor, k: torch.Tensor, *, tile: int, block: int, scale: float) -> torch.Tensor:
    dt = compute_dtype(q)
    qp, kp = _pad_to_blocks(q.to(dt), block), _pad_to_blocks(k.to(dt), block)
    b, h, npad, d = qp.shape
    # Mean over `tile` tokens including pad zeros, exactly as the reference pools.
    qt = qp.view(b, h, npad // tile, tile, d).mean(3)
    kt = kp.view(b, h, npad // tile, tile, d).mean(3)
    return _softmax_block_sums(qt, kt, scale, block // tile)


def _antidiagonal(q: torch.Tensor, k: torch.Tensor, *, tile: int, block: int, scale: float) -> torch.Tensor:
    stride = tile
    n = q.shape[2]
    dt = compute_dtype(q)
    qp, kp = _pad_to_blocks(q.to(dt), block), _pad_to_blocks(k.to(dt), block)
    b, h, npad, d = qp.shape
    ns = npad // stride
    # Strided row i = concat_t q[iS + S-1-t]; strided column j = concat_t k[jS + t]; their
    # dot product is the antidiagonal sum of the S x S sub-square (i, j).
    q_rev = qp.view(b, h, ns, stride, d).flip(3).reshape(b, h, ns, stride * d)
    k_str = kp.view(b, h, ns, stride, d).reshape(b, h, ns, stride * d)
    # Strided rows whose S queries are all padding are dropped, as XAttention zeroes them.
    row_weight = (torch.arange(ns, device=q.device) * stride < n).to(dt)
    return _softmax_block_sums(q_rev, k_str, scale / stride, block // stride, row_weight)


def _oracle(q: torch.Tensor, k: torch.Tensor, *, tile: int | None, block: int, scale: float) -> torch.Tensor:
    del tile  # exact masses need no tile size
    # Imported here so that scoring stays importable without stats and no import cycle can form.
    from dfsviz.sparse.stats import DEFAULT_CHUNK_ELEMENTS, _block_stats

    # block_scores_ref has checked q, k (values included): no second pass over them.
    return _block_stats(q, k, block, scale, DEFAULT_CHUNK_ELEMENTS).m


@dataclass(frozen=True)
class ScorerSpec:
    """A registered block scorer.

    Fields:
        name: registry key ("meanpool", "dfs_tile", "antidiagonal", "oracle").
        fn: callable(q, k, *, tile, block, scale) -> [B, H, Mq, Mk] in the compute dtype.
        kind: "mass" (non-negative scores proportional to attention mass; normalise a row
            by its sum) or "logit" (normalise a row with a softmax).
        tile_role: what ``tile`` means: "tile" (pooling tile b), "stride" (antidiagonal
            stride S) or None (ignored).
        default_tile: the tile/stride used when ``tile`` is None (None when ignored).
        min_tile: smallest allowed tile/stride (a power of two; at most ``block``).
        summary: one line for CLI help and dashboard tooltips.
    """

    name: str
    fn: Callable[..., torch.Tensor]
    kind: str
    tile_role: str | None
    default_tile: int | None
    min_tile: int | None
    summary: str

    def resolve_tile(self, tile: object, block: int) -> int | None:
        """The tile (or stride) this scorer uses: ``tile``, or its default when None; None for
        scorers without one. Raises ValueError unless it is a power of two in [min_tile, block]."""
        if self.tile_role is None:
            return None
        if tile is None:
            tile = self.default_tile
        if isinstance(tile, bool) or not isinstance(tile, int) or tile < self.min_tile or tile > block or tile & (tile - 1):
            raise ValueError(
                f"`tile` ({self.tile_role} of {self.name}) must be a power of two in [{self.min_tile}, block={block}] "
                f"so that it divides the block (got {tile!r}); the default is {self.default_tile}"
            )
        return tile

    @property
    def is_logit(self) -> bool:
        """True when scores are logits (cumulative selection must softmax them first)."""
        return self.kind == "logit"

    def __call__(self, q: torch.Tensor, k: torch.Tensor, *, tile: int | None, block: int, scale: float) -> torch.Tensor:
        return self.fn(q, k, tile=tile, block=block, scale=scale)


SCORERS: dict[str, ScorerSpec] = {
    spec.name: spec
    for spec in (
        ScorerSpec("meanpool", _meanpool, "logit", None, None, None, "pooled logit qbar_u . kbar_v * scale"),
        ScorerSpec(
            "dfs_tile", _dfs_tile, "mass", "tile", 16, 4, "DFSAttn tile softmax summed per block pair (b = tile)"
        ),
        ScorerSpec(
            "antidiagonal", _antidiagonal, "mass", "stride", 8, 2, "XAttention strided antidiagonal softmax sums"
        ),
        ScorerSpec("oracle", _oracle, "mass", None, None, None, "exact block attention mass m_uv (dense)"),
    )
}


def scorer_names() -> list[str]:
    """Registered scorer names, in registry order."""
    return list(SCORERS)


def _get_spec(method: object) -> ScorerSpec:
    if not isinstance(method, str) or method not in SCORERS:
        raise ValueError(f"`method` must be one of {scorer_names()} (got {method!r})")
    return SCORERS[method]


def scorer_key(method: str, tile: int | None = None) -> str:
    """Self-describing scorer name: "meanpool", "dfs_tile_b16", "antidiagonal_s8", "oracle".

    ``tile`` None means the method's default; it is ignored for meanpool and oracle.
    """
    spec = _get_spec(method)
    if spec.tile_role is None:
        return spec.name
    tile = spec.resolve_tile(tile, 256)
    prefix = "b" if spec.tile_role == "tile" else "s"
    return f"{spec.name}_{prefix}{tile}"


def block_scores_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    method: str = "dfs_tile",
    tile: int | None = None,
    block: int = 128,
    scale: float | None = None,
) -> torch.Tensor:
    """Score every (query block, key block) pair with a registered method (PyTorch reference).

    Args:
        q, k: [B, H, N, D], float16/bfloat16/float32/float64, same shape, dtype and device,
            already in the token order whose blocks are scored.
        method: a name from :func:`scorer_names`.
        tile: dfs_tile pooling tile b (default 16) or antidiagonal stride S (default 8); a
            power of two dividing ``block``; ignored by meanpool and oracle.
        block: tokens per block, a power of two in [16, 256].
        scale: softmax scale, default D ** -0.5.

    Returns:
        float32 [B, H, Mq, Mk], Mq = Mk = ceil(N / block). Computed in float32 (float64 for
        float64 inputs). See the module docstring for each method's exact definition.

    Raises ValueError for NaN or inf in q or k (naming the first), or an empty B, H or D.
    """
    check_qk(q, k)
    spec = _get_spec(method)
    check_block(block)
    tile = spec.resolve_tile(tile, block)
    scale = resolve_scale(scale, q.shape[3])
    return spec(q, k, tile=tile, block=block, scale=scale).to(torch.float32)

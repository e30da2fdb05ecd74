"""Fused block scoring in Triton, twin of ``dfsviz.sparse.scoring.block_scores_ref``.

Methods ``dfs_tile`` (DFSAttn hierarchical scoring) and ``meanpool``; the other
registered scorers (``antidiagonal``, ``oracle``) run their reference.

dfs_tile without the tile-score matrix. The scores are
S_uv = sum_{i' in u} sum_{j' in v} exp(s_i'j' - lse_i'), s = qbar . kbar * scale over
tiles of the zero-padded sequence. The softmax normaliser lse_i' needs every key tile
of the row, but the block sums need it before rows may be added up. Two options:

1. two passes over the key tiles (first lse_i', then the normalised block sums), which
   computes every tile logit twice;
2. a two-level scheme (used here): one pass keeps FlashAttention's running max m_i' and
   sum l_i' per query tile and, for each slice of BLOCK_TK key tiles, writes the slice's
   per-(query tile, key block) sum of exp(s - m_i'(now)) as m_i'(now) + log(sum), so the
   running max it used travels with it. A second, tiny kernel turns each entry into
   exp(entry - m_i'(final)) / l_i' and adds the rows of each query block.

Because each entry carries its own max, the key tiles of a row can be shared out: when the
heads and query tiles alone leave the GPU short of programs (Wan2.1-1.3B: 384 programs on
132 multiprocessors), SPLITS programs each walk a contiguous share of the key slices and
store their own (m, l); the block-sum kernel combines them (m = max, l = sum l_s 2^(m_s - m))
before rescaling. The entries and their sums are the same whatever SPLITS is.

Option 2 computes each tile logit once; its scratch is O(T x Mk) floats (T = N / tile
tiles), 1/tile of the O(N x Mk) the statistics pass may use, and never T x T.
Pooling is a separate memory-bound kernel (q and k in one launch): every query tile
needs all key tiles. Four launches in all (zeroing one flag, pool, partials, block sums)
and no host sync: the call is asynchronous and can be captured in a CUDA graph.

Precision: tiles are pooled in float32 like the reference. Each mean x is then split into
float16 parts hi = fp16(x), lo = fp16(x - hi) (22 significant bits together) and the tile
logits are hi.hi + hi.lo + lo.hi on fp16 tensor cores with float32 accumulation: float32-
level logits at three fp16 matrix products, about half the cost of 3xTF32 and without
its per-iteration operand splitting. A tile whose mean reaches float16's largest value
(max |x| >= 65504, from bfloat16 or float32 inputs) is split as x 2^-e instead, the power
of two chosen on the device per tile: e = ceil(log2(max |x| / 2^14)), so |hi| <= 2^14.
The partials kernel multiplies the logits back by the query tile's 2^e (on the row,
folded into the softmax scale) and the key tile's (on the column), exactly; the column
multiply runs only if the pool kernel flagged a scaled key tile (a flag read on the
device). All other tiles keep e = 0, the unscaled parts: where no mean overflows, the
scores are those of the unscaled split bit for bit. The interpreter computes the same
products exactly in float32.
"""

from __future__ import annotations

import torch

from dfsviz.kernels._dispatch import kernel_qk, resolve_backend
from dfsviz.sparse.scoring import SCORERS, block_scores_ref

__all__ = ["block_scores", "FUSED_METHODS"]

#: Methods with a Triton kernel; other registered scorers run their PyTorch reference.
FUSED_METHODS = ("dfs_tile", "meanpool")


def block_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    method: str = "dfs_tile",
    tile: int | None = None,
    block: int = 128,
    scale: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Block scores of every (query block, key block) pair (Triton kernel or reference).

    Args:
        q, k: [B, H, N, D] float16 / bfloat16 / float32 (D in {64, 128} for Triton), one
            device, already in the token order whose blocks are scored.
        method: "dfs_tile" or "meanpool" run fused kernels; any other name from
            ``dfsviz.sparse.scoring.scorer_names()`` runs its reference.
        tile: dfs_tile pooling tile b (default 16), a power of two dividing ``block``.
        block: tokens per block, a power of two in [16, 256].
        scale: softmax scale, default D**-0.5.
        backend: None (Triton on CUDA, else reference; env DFSVIZ_KERNEL_BACKEND),
            "triton" or "ref".

    Returns:
        float32 [B, H, Mq, Mk], Mq = Mk = ceil(N / block), as ``block_scores_ref``.

    Both backends refuse empty B, H or D; non-finite inputs are refused by the reference
    backend, the Triton backend does not check them (no host sync).
    """
    tensors = [x for x in (q, k) if isinstance(x, torch.Tensor)]
    which = resolve_backend(backend, *tensors) if len(tensors) == 2 else "ref"
    if which == "ref" or method not in FUSED_METHODS:
        return block_scores_ref(q, k, method=method, tile=tile, block=block, scale=scale)
    q, k, scale = kernel_qk(q, k, block, scale)
    tile = SCORERS[method].resolve_tile(tile, block)
    from dfsviz.kernels._jit.scores import block_scores_fwd

    return block_scores_fwd(q, k, method, tile, block, scale)

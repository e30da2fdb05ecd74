"""Streaming block statistics in Triton, twin of ``dfsviz.sparse.stats.block_stats_ref``.

For every (batch, head, query block u, key block v) the pass yields docs/theory.md's block
mass m_uv, pooled logit L_uv, query-side diversity r_uv and block diversity J_uv, plus
every row's lse_i. One program owns one query block and streams over all key blocks
once, computing each logit once:

- per row i and key block v, from the logit tile: Lbar_iv (row mean), the block
  log-sum-exp lse_iv (row max + log sum exp2), and J_iv = lse_iv - log n_v - Lbar_iv;
- per block pair, reductions over the rows of u: L_uv = mean_i Lbar_iv,
  r_uv = max_i |Lbar_iv - L_uv|, J_uv = max_i J_iv;
- lse_i = log sum_v exp(lse_iv), combined online over v.

Only m needs lse_i, which is known after the last key block. Instead of a second pass
over the keys (twice the matrix work), lse_iv is kept in a float32 scratch of
[Mq, Mk, block] per head, i.e. O(N x Mk) memory, and re-read at the
end: m_uv = (1 / |U_u|) sum_i exp(lse_iv - lse_i). Heads are launched in groups so
the scratch stays under ``dfsviz.kernels._jit.stats.SCRATCH_BYTES`` (2 GiB).
"""

from __future__ import annotations

import torch

from dfsviz.kernels._dispatch import kernel_qk, resolve_backend
from dfsviz.sparse.stats import BlockStats, block_stats_ref

__all__ = ["block_stats"]


def block_stats(
    q: torch.Tensor,
    k: torch.Tensor,
    block: int = 128,
    scale: float | None = None,
    backend: str | None = None,
) -> BlockStats:
    """Block mass m, pooled logit L, diversities r and J, and row lse (Triton kernel or reference).

    Args:
        q, k: [B, H, N, D] float16 / bfloat16 / float32 (D in {64, 128} for Triton), one
            device, already in the token order whose blocks are studied.
        block: tokens per block, a power of two in [16, 256]; Mq = Mk = ceil(N / block).
        scale: softmax scale, default D**-0.5.
        backend: None (Triton on CUDA, else reference; env DFSVIZ_KERNEL_BACKEND),
            "triton" or "ref".

    Returns:
        BlockStats with m, L, r, J float32 [B, H, Mq, Mk] and lse float32 [B, H, N]. The
        kernel's scratch is float32 [min(B*H, fits), Mq, Mk, block] (O(N x Mk) per head).

    Both backends refuse empty B, H or D; non-finite inputs are refused by the reference
    backend, the Triton backend does not check them (no host sync).
    """
    tensors = [x for x in (q, k) if isinstance(x, torch.Tensor)]
    which = resolve_backend(backend, *tensors) if len(tensors) == 2 else "ref"
    if which == "ref":
        return block_stats_ref(q, k, block=block, scale=scale)
    q, k, scale = kernel_qk(q, k, block, scale)
    from dfsviz.kernels._jit.stats import block_stats_fwd

    return block_stats_fwd(q, k, block, scale)

"""Block-sparse attention, the PyTorch reference of ``dfsviz.kernels.block_sparse_attention``.

Attention is computed on the *ordered* sequence (blocks are cut after the token
order is applied, docs/theory.md): with a :class:`~dfsviz.sparse.orders.TokenOrder`
the inputs arrive in the model's original order, are permuted, attended with the
block mask, and the output (and LSE) is put back in the original order.

Memory stays bounded: the loop runs over query blocks and gathers only the kept
key blocks of that query block, so the largest temporary is
B x H x block x (max kept blocks x block) logits, never N x N.
"""

from __future__ import annotations

import torch

from dfsviz.sparse._validate import NON_FINITE_QKV_FIX, check_bhnd, check_finite, resolve_scale
from dfsviz.sparse.masks import BlockMask, check_mask_for

__all__ = ["block_sparse_attention_ref", "check_attention_inputs", "check_order_for"]


def check_attention_inputs(q: object, k: object, v: object, mask: object, *, values: bool = True) -> None:
    """Check q, k, v [B, H, N, D] (same shape, dtype, device; B, H, N, D >= 1) against a BlockMask
    and (``values``) that they are finite; raise ValueError/TypeError. The Triton launcher passes
    ``values=False``: reading the values back would sync the host in every layer."""
    check_bhnd(q, "q")
    check_bhnd(k, "k")
    check_bhnd(v, "v")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(
            f"`q`, `k` and `v` must share one shape [B, H, N, D] (got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}); block-sparse self-attention needs N_q = N_k and one head dim"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(
            f"`q`, `k` and `v` must share one dtype (got {q.dtype}, {k.dtype}, {v.dtype}); cast them to one"
        )
    if not (q.device == k.device == v.device):
        raise ValueError(
            f"`q`, `k` and `v` must be on one device (got {q.device}, {k.device}, {v.device}); move them to one"
        )
    check_mask_for(mask, q)
    if values:
        for name, x in (("q", q), ("k", k), ("v", v)):
            check_finite(x, name, NON_FINITE_QKV_FIX)


def check_order_for(order: object, n: int) -> None:
    """Raise unless ``order`` is a TokenOrder over N tokens (callers then take ``order.perm_on``)."""
    from dfsviz.sparse.orders import TokenOrder

    if not isinstance(order, TokenOrder):
        raise TypeError(
            f"`order` must be a dfsviz TokenOrder or None (got {type(order).__name__}); "
            "build one with dfsviz.sparse.orders.make_order(name, grid)"
        )
    perm = order.perm
    if perm.dim() != 1 or perm.numel() != n:
        raise ValueError(
            f"`order` must permute N = q.shape[2] = {n} tokens (got {order.key!r} over {perm.numel()}); "
            "build the order for the grid whose token count is N"
        )


def block_sparse_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: BlockMask,
    order=None,
    scale: float | None = None,
    return_lse: bool = False,
):
    """Block-sparse softmax attention, forward, in PyTorch.

    Args:
        q, k, v: [B, H, N, D], one float dtype and device, in the model's original token
            order when ``order`` is given, else already ordered.
        mask: BlockMask over the ordered sequence, shape (B, H, Mq, Mk), ``seq_len`` = N.
            Query block u attends to the tokens of its kept key blocks only.
        order: optional TokenOrder over N tokens; the inputs are permuted with it, and the
            output and LSE are returned in the original order.
        scale: softmax scale, default D**-0.5.
        return_lse: also return the log-sum-exp of each row's kept logits.

    Returns:
        out [B, H, N, D] in the input dtype, or (out, lse) with lse float32 [B, H, N]
        (natural log; -inf for a query block that keeps no key block, whose output is 0).

    Raises ValueError for NaN or inf in q, k or v (naming the first), or an empty B, H or D.

    Precision mirrors a flash kernel: logits and P @ V are matrix products in the input
    dtype (float accumulation), the softmax runs in float32 (float64 for float64 inputs).
    """
    check_attention_inputs(q, k, v, mask)
    if not isinstance(return_lse, bool):
        raise TypeError(f"`return_lse` must be a bool (got {type(return_lse).__name__})")
    bsz, heads, n, d = q.shape
    scale = resolve_scale(scale, d)
    if order is not None:
        check_order_for(order, n)
        perm = order.perm_on(q.device)
        q, k, v = (x.index_select(2, perm) for x in (q, k, v))

    block = mask.block
    mk = mask.num_kv_blocks
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    pad = mk * block - n
    # Zero-padding to whole blocks lets one gather fetch every kept block; padded keys get -inf.
    k_blocks = torch.nn.functional.pad(k, (0, 0, 0, pad)).view(bsz, heads, mk, block, d)
    v_blocks = torch.nn.functional.pad(v, (0, 0, 0, pad)).view(bsz, heads, mk, block, d)
    key_valid = (torch.arange(mk * block, device=q.device) < n).view(mk, block)

    out = torch.empty_like(q)
    lse = torch.empty((bsz, heads, n), dtype=torch.float32, device=q.device)
    counts = mask.kv_num_blocks.to(q.device).long()  # [B, H, Mq]
    indices = mask.kv_indices.to(q.device).long()  # [B, H, Mq, Mk]
    for u in range(mask.num_q_blocks):
        rows = slice(u * block, min(n, (u + 1) * block))
        count_u = counts[:, :, u]  # [B, H]
        kmax = int(count_u.max())
        if kmax == 0:
            out[:, :, rows] = 0
            lse[:, :, rows] = float("-inf")
            continue
        idx = indices[:, :, u, :kmax]  # [B, H, kmax]; entries past a row's count are 0 (masked below)
        gather = idx[..., None, None].expand(bsz, heads, kmax, block, d)
        kk = torch.gather(k_blocks, 2, gather).reshape(bsz, heads, kmax * block, d)
        vv = torch.gather(v_blocks, 2, gather).reshape(bsz, heads, kmax * block, d)
        kept = torch.arange(kmax, device=q.device) < count_u[..., None]  # [B, H, kmax]
        valid = (kept[..., None] & key_valid[idx]).reshape(bsz, heads, 1, kmax * block)

        logits = torch.matmul(q[:, :, rows], kk.transpose(-1, -2)).to(acc_dtype) * scale
        logits = logits.masked_fill(~valid, float("-inf"))
        row_lse = torch.logsumexp(logits, dim=-1, keepdim=True)  # -inf for an empty row
        probs = torch.exp(logits - row_lse)
        empty = (count_u == 0)[..., None, None]
        # An empty row gives 0/0; it attends to nothing, so its output is 0 (FlexAttention's choice).
        probs = torch.where(empty, torch.zeros((), dtype=acc_dtype, device=q.device), probs)
        out[:, :, rows] = torch.matmul(probs.to(q.dtype), vv).to(q.dtype)
        lse[:, :, rows] = row_lse.squeeze(-1).to(torch.float32)

    if order is not None:
        inv = order.inv.to(q.device)
        out = out.index_select(2, inv)
        lse = lse.index_select(2, inv)
    return (out, lse) if return_lse else out

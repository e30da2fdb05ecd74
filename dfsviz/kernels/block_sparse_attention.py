"""Block-sparse attention forward in Triton, twin of ``dfsviz.sparse.attention.block_sparse_attention_ref``.

One program owns BLOCK_M query rows of one (batch, head) and runs FlashAttention's
online softmax over the kept key blocks of its query block only, read straight from
the BlockMask's ``kv_num_blocks`` / ``kv_indices`` (FlexAttention's layout). With a
token order the program loads q, k and v rows through ``perm`` and stores output rows
(and LSE) at their original positions, so no gather or scatter pass runs outside.
Without an order, on Hopper-class GPUs and 16-byte aligned tensors, a second kernel moves
whole tiles with tensor descriptors (the bulk copy engine); the two share the softmax step.
FP8 runs there too, with an order as well for "fp8_pv" (its quantized q, k and v are ordered
copies; the output rows go back through the order); "fp8" with an order gathers v through
the order in the pointer kernel.
On Hopper (compute capability 9.x) a Gluon kernel with FlashAttention-3's schedule runs the
float16 / bfloat16 calls at block 128 and D 64 / 128, with or without an order (with one, after
ordered copies of k and v: ``dfsviz.kernels._jit.attention_sm90``).
The kernels and their launcher live in ``dfsviz.kernels._jit.attention``, imported only when
Triton runs; this module validates once and dispatches.
"""

from __future__ import annotations

import torch

from dfsviz.kernels._dispatch import (
    check_fp8_capability,
    check_kernel_input,
    check_precision,
    cuda_properties,
    resolve_backend,
    unit_stride_d,
)
from dfsviz.kernels.fp8 import FP8_PRECISIONS, block_sparse_attention_fp8_ref
from dfsviz.sparse._validate import resolve_scale
from dfsviz.sparse.attention import block_sparse_attention_ref, check_attention_inputs, check_order_for
from dfsviz.sparse.masks import BlockMask

__all__ = ["block_sparse_attention"]

# Row offsets inside one head are int32 in the kernel (batch/head offsets are int64).
_MAX_HEAD_SPAN = 2**31


def _kernel_inputs(q, k, v, mask, order, scale):
    """Validate once for the Triton backend (shapes, not values: reading values back would sync
    the host in every layer) and return (q, k, v with unit stride along D, perm int32 or None, scale)."""
    check_attention_inputs(q, k, v, mask, values=False)
    check_kernel_input(q)
    n, d = q.shape[2], q.shape[3]
    scale = resolve_scale(scale, d)
    q, k, v = (unit_stride_d(x) for x in (q, k, v))
    if max(x.stride(2) for x in (q, k, v)) * n >= _MAX_HEAD_SPAN:
        raise ValueError(
            f"one head of q, k or v spans more than 2**31 elements (N = {n}, row strides "
            f"{[x.stride(2) for x in (q, k, v)]}); pass [B, H, N, D]-contiguous tensors"
        )
    perm = None
    if order is not None:
        check_order_for(order, n)
        perm = order.perm_on(q.device, torch.int32)
    return q, k, v, perm, scale


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: BlockMask,
    order=None,
    scale: float | None = None,
    return_lse: bool = False,
    precision: str = "native",
    backend: str | None = None,
):
    """Block-sparse softmax attention, forward (Triton kernel or its PyTorch reference).

    Args:
        q, k, v: [B, H, N, D], float16 / bfloat16 (float32 too; the reference also takes
            float64 and any D), one device; original token order when ``order`` is given.
            Any strides with unit stride along D (e.g. diffusers' [B, N, H, D] transposed).
        mask: dfsviz BlockMask (B, H, Mq, Mk) over the ordered sequence, seq_len = N,
            block in [16, 256] (128 in DFSAttn). Ragged N is handled with load masks.
        order: optional TokenOrder over N tokens; the kernel gathers q/k/v rows through
            ``order.perm`` (on Hopper from ordered copies of k and v made first) and writes
            output rows back to their original positions.
        scale: softmax scale, default D**-0.5.
        return_lse: also return lse float32 [B, H, N] (natural log, original order).
        precision: "native" (products in the input dtype), "fp8": Q and K smoothed and
            quantized to float8 e4m3 per block (``dfsviz.kernels.fp8``; float16 / bfloat16
            inputs, GPUs of compute capability >= 8.9, or the CPU under TRITON_INTERPRET=1),
            or "fp8_pv": P . V in e4m3 too (V with one power-of-two scale per channel, P
            formed in e4m3 by ``p_e4m3``; its lse is that of the e4m3 P, up to ln 1.108 above
            the exact one); the "ref" backend runs their PyTorch simulation
            ``block_sparse_attention_fp8_ref``.
        backend: None (Triton on CUDA, else reference; env DFSVIZ_KERNEL_BACKEND),
            "triton" or "ref".

    Returns:
        out [B, H, N, D] in the input dtype (in q's memory layout when q is dense, e.g. a
        transposed [B, N, H, D] buffer), or (out, lse).

    Both backends refuse empty B, H or D; non-finite inputs are refused by the reference
    backend, the Triton backend does not check them (no host sync: it runs in every layer).
    """
    fp8 = check_precision(precision) in FP8_PRECISIONS
    which = resolve_backend(backend, q, k, v) if isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) \
        and isinstance(v, torch.Tensor) else "ref"
    if which == "ref":
        if fp8:
            return block_sparse_attention_fp8_ref(q, k, v, mask, order=order, scale=scale, return_lse=return_lse,
                                                  precision=precision)
        return block_sparse_attention_ref(q, k, v, mask, order=order, scale=scale, return_lse=return_lse)
    if not isinstance(return_lse, bool):
        raise TypeError(f"`return_lse` must be a bool (got {type(return_lse).__name__})")
    q, k, v, perm, scale = _kernel_inputs(q, k, v, mask, order, scale)
    if not fp8:
        from dfsviz.kernels._jit.attention import block_sparse_attention_fwd

        return block_sparse_attention_fwd(q, k, v, mask, perm, scale, return_lse)
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(
            f"precision={precision!r} takes float16 or bfloat16 q, k, v (got {q.dtype}); cast with .to(torch.bfloat16)"
        )
    if q.is_cuda:  # on the CPU the interpreter runs it (resolve_backend refused the CPU otherwise)
        check_fp8_capability(cuda_properties(q.device))
    from dfsviz.kernels._jit.attention import block_sparse_attention_fp8_fwd

    return block_sparse_attention_fp8_fwd(q, k, v, mask, perm, scale, return_lse, fp8_pv=precision == "fp8_pv")

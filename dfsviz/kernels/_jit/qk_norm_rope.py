"""Fused QK-RMSNorm + Wan RoPE: the Triton kernel and its launcher (described, validated and
dispatched in ``dfsviz.kernels.qk_norm_rope``)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dfsviz.kernels._dispatch import interpreting
from dfsviz.kernels._jit.rows import rounded, row_block, row_launch_shape

__all__ = ["qk_norm_rope_fwd"]


@triton.jit
def _qk_norm_rope_kernel(
    X, W, COS, SIN, OUT,
    stride_xb, stride_xn, stride_cb, stride_cn, stride_cd, stride_sb, stride_sn, stride_sd,
    N, C, eps,
    HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, RTNE_BF16: tl.constexpr,
):
    """BLOCK_R token rows of batch element program_id(1) x BLOCK_C >= C channels (BLOCK_C / HEAD_DIM
    head slots, both powers of two), loaded and stored contiguously; the (even, odd) pairs are
    split in registers, and each row's table entries, loaded once, serve all its heads."""
    b = tl.program_id(1)
    cols = tl.arange(0, BLOCK_C)
    col_ok = cols < C
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    dtype = OUT.dtype.element_ty
    t, row_ok = row_block(0, N, BLOCK_R, 1)
    ok = row_ok[:, None] & col_ok[None, :]
    # Everything is upcast right after the load (the interpreter has no bf16 arithmetic).
    x = tl.load(X + (b * stride_xb + t * stride_xn)[:, None] + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    ms = tl.sum(x * x, 1) / C
    # IEEE-rounded sqrt and division (1 / sqrt, as torch computes rsqrt on the CPU).
    rstd = tl.div_rn(tl.full([BLOCK_R], 1.0, tl.float32), tl.sqrt_rn(ms + eps))[:, None]
    # torch.nn.RMSNorm rounds (x * rstd * w) once, to x's dtype; today's path rotates that.
    y = rounded(x * rstd * w, dtype, RTNE_BF16)
    y1, y2 = tl.split(tl.reshape(y, [BLOCK_R, BLOCK_C // HEAD_DIM, HEAD_DIM // 2, 2]))  # [rows, heads, pairs]
    ev = tl.arange(0, HEAD_DIM // 2) * 2  # even channel of each pair within a head; its odd partner is ev + 1
    cos = tl.load(COS + (b * stride_cb + t * stride_cn)[:, None] + ev[None, :] * stride_cd, mask=row_ok[:, None],
                  other=0.0)[:, None, :]
    sin = tl.load(SIN + (b * stride_sb + t * stride_sn)[:, None] + (ev + 1)[None, :] * stride_sd,
                  mask=row_ok[:, None], other=0.0)[:, None, :]
    out = tl.join(rounded(y1 * cos - y2 * sin, dtype, RTNE_BF16), rounded(y1 * sin + y2 * cos, dtype, RTNE_BF16))
    out_rows = OUT + ((b * N + t) * C)[:, None] + cols[None, :]
    tl.store(out_rows, tl.reshape(out, [BLOCK_R, BLOCK_C]).to(dtype), mask=ok)


#: Launch shape, as data: channels per program and per warp on the GPU (one 5,120-wide Wan2.1-14B
#: row on 8 warps, two 1,536-wide Wan2.1-1.3B rows on 4: the fastest in a sweep on an H100); the
#: interpreter pays per program, so it takes more rows per program.
_ELEMENTS_PER_PROGRAM = 4096
_ELEMENTS_PER_PROGRAM_INTERPRETED = 32768
_ELEMENTS_PER_WARP = 1024


def qk_norm_rope_fwd(x, weight, eps: float, cos, sin):
    """Launch on validated inputs (``eps`` resolved; dtypes the kernel takes)."""
    bsz, n, c = x.shape
    d = cos.shape[-1]
    if x.stride(-1) != 1:
        x = x.contiguous()
    weight = weight.contiguous()
    out = torch.empty((bsz, n, c), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    # A table of batch 1 serves every batch element (stride 0).
    stride_cb = cos.stride(0) if cos.shape[0] > 1 else 0
    stride_sb = sin.stride(0) if sin.shape[0] > 1 else 0
    block_c = triton.next_power_of_2(c)
    per_program = _ELEMENTS_PER_PROGRAM_INTERPRETED if interpreting() else _ELEMENTS_PER_PROGRAM
    block_r, warps = row_launch_shape(n, block_c, per_program, _ELEMENTS_PER_WARP)
    _qk_norm_rope_kernel[(triton.cdiv(n, block_r), bsz)](
        x, weight, cos, sin, out,
        x.stride(0), x.stride(1), stride_cb, cos.stride(1), cos.stride(3), stride_sb, sin.stride(1), sin.stride(3),
        n, c, eps,
        HEAD_DIM=d, BLOCK_R=block_r, BLOCK_C=block_c,
        RTNE_BF16=interpreting() and x.dtype == torch.bfloat16,
        num_warps=warps,
    )
    return out

"""Fused QK-RMSNorm + Wan RoPE: the Triton kernel and its launcher (described, validated and
dispatched in ``dfsviz.kernels.qk_norm_rope``)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dfsviz.kernels._dispatch import interpreting
from dfsviz.kernels._jit.rows import rounded, row_launch_shape, token_rows

__all__ = ["qk_norm_rope_fwd"]


@triton.jit
def _qk_norm_rope_kernel(
    X, W, COS, SIN, OUT,
    stride_xb, stride_xn, stride_cb, stride_cn, stride_cd, stride_sb, stride_sn, stride_sd,
    ROWS, N, C, eps,
    HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr, RTNE_BF16: tl.constexpr,
):
    """BLOCK_R token rows (of B * N) x BLOCK_P >= C / 2 (even, odd) channel pairs."""
    rows, row_ok, b, t = token_rows(ROWS, N, BLOCK_R)
    ev = tl.arange(0, BLOCK_P) * 2  # even channel of each pair; its odd partner is ev + 1
    ok = row_ok[:, None] & (ev < C)[None, :]
    x_ptrs = X + (b * stride_xb + t * stride_xn)[:, None] + ev[None, :]
    # Everything is upcast right after the load (the interpreter has no bf16 arithmetic).
    x1 = tl.load(x_ptrs, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptrs + 1, mask=ok, other=0.0).to(tl.float32)
    ms = (tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / C
    # IEEE-rounded sqrt and division (1 / sqrt, as torch computes rsqrt on the CPU).
    rstd = tl.div_rn(tl.full([BLOCK_R], 1.0, tl.float32), tl.sqrt_rn(ms + eps))[:, None]
    w1 = tl.load(W + ev, mask=ev < C, other=0.0).to(tl.float32)[None, :]
    w2 = tl.load(W + ev + 1, mask=ev < C, other=0.0).to(tl.float32)[None, :]
    # torch.nn.RMSNorm rounds (x * rstd * w) once, to x's dtype; today's path rotates that.
    dtype = OUT.dtype.element_ty
    y1 = rounded(x1 * rstd * w1, dtype, RTNE_BF16)
    y2 = rounded(x2 * rstd * w2, dtype, RTNE_BF16)
    d = (ev % HEAD_DIM)[None, :]
    cos = tl.load(COS + (b * stride_cb + t * stride_cn)[:, None] + d * stride_cd, mask=ok, other=0.0)
    sin = tl.load(SIN + (b * stride_sb + t * stride_sn)[:, None] + (d + 1) * stride_sd, mask=ok, other=0.0)
    o_ptrs = OUT + (rows * C)[:, None] + ev[None, :]
    tl.store(o_ptrs, rounded(y1 * cos - y2 * sin, dtype, RTNE_BF16).to(dtype), mask=ok)
    tl.store(o_ptrs + 1, rounded(y1 * sin + y2 * cos, dtype, RTNE_BF16).to(dtype), mask=ok)


#: Launch shape, as data: elements (pairs) per program and pairs per warp on the GPU; the
#: interpreter pays per program, so it takes more rows per program.
_PAIRS_PER_PROGRAM = 2048
_PAIRS_PER_PROGRAM_INTERPRETED = 16384
_PAIRS_PER_WARP = 256


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
    block_p = triton.next_power_of_2(c // 2)
    per_program = _PAIRS_PER_PROGRAM_INTERPRETED if interpreting() else _PAIRS_PER_PROGRAM
    block_r, warps = row_launch_shape(bsz * n, block_p, per_program, _PAIRS_PER_WARP)
    _qk_norm_rope_kernel[(triton.cdiv(bsz * n, block_r),)](
        x, weight, cos, sin, out,
        x.stride(0), x.stride(1), stride_cb, cos.stride(1), cos.stride(3), stride_sb, sin.stride(1), sin.stride(3),
        bsz * n, n, c, eps,
        HEAD_DIM=d, BLOCK_R=block_r, BLOCK_P=block_p, RTNE_BF16=interpreting() and x.dtype == torch.bfloat16,
        num_warps=warps,
    )
    return out



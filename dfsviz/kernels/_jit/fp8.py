"""Block-wise e4m3 quantization of the FP8 attention inputs in one Triton pass per tensor: the
launcher twin of :func:`dfsviz.kernels.fp8.quantize_qk_fp8`, bit for bit (scales, e4m3 bytes,
key mean), which replaces its chain of PyTorch element-wise kernels on the FP8 path."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dfsviz.kernels._dispatch import interpreting
from dfsviz.kernels.fp8 import Fp8QK, key_mean

__all__ = ["quantize_qk_fp8_fwd"]


@triton.jit
def _pow2(e):
    """2^e as float32 for integer e in [-126, 127] (exact, from the exponent bits)."""
    return ((e + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _quantize_blocks_kernel(
    X, PERM, MEAN, OUT, SCALE,
    stride_xb, stride_xh, stride_xn, H, N, M,
    BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_PERM: tl.constexpr, HAS_MEAN: tl.constexpr,
):
    """One block of BLOCK ordered tokens of one (batch, head): smooth, scale, round to e4m3."""
    blk = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    pos = blk * BLOCK + tl.arange(0, BLOCK)
    ok = pos < N
    src = tl.load(PERM + pos, mask=ok, other=0).to(tl.int64) if HAS_PERM else pos.to(tl.int64)
    d = tl.arange(0, HEAD_DIM)
    x = tl.load(X + b * stride_xb + h * stride_xh + src[:, None] * stride_xn + d[None, :], mask=ok[:, None],
                other=0.0).to(tl.float32)
    if HAS_MEAN:
        x = tl.where(ok[:, None], x - tl.load(MEAN + bh * HEAD_DIM + d)[None, :], 0.0)
    ax = tl.abs(x)
    amax = tl.max(tl.max(ax, axis=1), axis=0)
    nan = tl.max(tl.max((x != x).to(tl.int32), axis=1), axis=0) > 0  # tl.max drops NaN; torch's amax keeps it
    amax = tl.where(nan, float("nan"), amax)
    # The smallest 2^e with amax / 2^e <= 448 = 1.75 x 2^8: amax = m 2^p (m in [1, 2)) gives
    # e = p - 8 when m <= 1.75, else p - 7 (what frexp of amax / 448 gives, without the division).
    # A subnormal amax is scaled up by 2^64 first, so its exponent bits are those of a normal number.
    tiny = amax < 1.1754944e-38
    bits = tl.where(tiny, amax * 18446744073709551616.0, amax).to(tl.int32, bitcast=True)
    p = ((bits >> 23) & 0xFF) - 127 - tl.where(tiny, 64, 0)
    e = p - 8 + ((bits & 0x7FFFFF) > 0x600000).to(tl.int32)
    # 2^e for e below -126 (subnormal scales) as a product of two powers of two, exact when representable
    lo = tl.maximum(e, -126)
    scale = _pow2(lo) * _pow2(tl.maximum(e - lo, -126))
    finite = amax < float("inf")  # False for inf and NaN
    # zero blocks keep 1, as do blocks so small that amax / 448 underflows to 0 in the simulation
    scale = tl.where(finite, tl.where((amax > 0) & (scale > 0), scale, 1.0), amax)
    y = tl.div_rn(x, scale)  # exact for a power of two; NaN / inf follow IEEE division as in torch
    # Round to nearest even on e4m3's grid (step 2^(exponent - 3), 2^-9 below 2^-6), then write
    # the e4m3 byte from the float32 bits (the interpreter's float8 cast gets NaN wrong).
    ey = ((tl.abs(y).to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    step = _pow2(tl.maximum(ey, -6) - 3)
    y = ((tl.div_rn(y, step) + 12582912.0) - 12582912.0) * step
    ay = tl.abs(y).to(tl.int32, bitcast=True)
    ey = ((ay >> 23) & 0xFF) - 127  # again: rounding may reach the next power of two
    normal = ((ey + 7) << 3) | ((ay >> 20) & 0x7)
    subnormal = (tl.abs(y) * 512.0).to(tl.int32)  # multiples of 2^-9 below 2^-6: 0 .. 7
    byte = tl.where(ey >= -6, normal, subnormal) | ((y.to(tl.int32, bitcast=True) >> 24) & 0x80)
    byte = tl.where(y == y, byte, 0x7F)  # NaN
    out = OUT + bh * N * HEAD_DIM + pos[:, None] * HEAD_DIM + d[None, :]
    tl.store(out, byte.to(tl.uint8), mask=ok[:, None])
    tl.store(SCALE + bh * M + blk, scale)


def _quantize(x: torch.Tensor, block: int, perm, mean) -> tuple[torch.Tensor, torch.Tensor]:
    bsz, heads, n, d = x.shape
    m = triton.cdiv(n, block)
    out = torch.empty((bsz, heads, n, d), dtype=torch.uint8, device=x.device)  # e4m3 bytes
    scales = torch.empty((bsz, heads, m), dtype=torch.float32, device=x.device)
    _quantize_blocks_kernel[(m, bsz * heads)](
        x, perm if perm is not None else scales, mean if mean is not None else scales, out, scales,
        x.stride(0), x.stride(1), x.stride(2), heads, n, m,
        BLOCK=block, HEAD_DIM=d, HAS_PERM=perm is not None, HAS_MEAN=mean is not None,
        num_warps=1 if interpreting() else 4,
    )
    return out.view(torch.float8_e4m3fn), scales


def quantize_qk_fp8_fwd(q: torch.Tensor, k: torch.Tensor, block: int, perm: torch.Tensor | None) -> Fp8QK:
    """:func:`~dfsviz.kernels.fp8.quantize_qk_fp8` on validated kernel inputs: q, k [B, H, N, D]
    with unit stride along D (original order), ``perm`` int32 [N] or None; k's mean over the
    tokens is taken as the simulation takes it (:func:`~dfsviz.kernels.fp8.key_mean`)."""
    mean = key_mean(k)
    q8, q_scale = _quantize(q, block, perm, None)
    k8, k_scale = _quantize(k, block, perm, mean.contiguous())
    return Fp8QK(q8, q_scale, k8, k_scale, mean, block)

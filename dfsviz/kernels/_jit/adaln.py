"""Wan's fused adaLN norms and gated residuals: the Triton kernels and their launchers
(described, validated and dispatched in ``dfsviz.kernels.adaln``)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dfsviz.kernels._dispatch import KERNEL_DTYPES, interpreting
from dfsviz.kernels._jit.rows import rounded, row_block, row_launch_shape, token_rows

__all__ = ["gated_residual_fwd", "modulated_layer_norm_fwd"]


@triton.jit
def _layer_norm_affine(cols, col_ok, W, BIAS, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """The LayerNorm weight and bias at ``cols`` as float32 rows [1, BLOCK_C] (0.0 when absent)."""
    w = 0.0
    bias = 0.0
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        bias = tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return w, bias


@triton.jit
def _modulation(cols, col_ok, SCALE, SHIFT, s_off, h_off, HAS_MOD: tl.constexpr):
    """(1 + scale) and shift at ``cols`` as float32 [R, BLOCK_C], R = len(s_off): one row per token,
    or one row for all when the table is shared (0.0 when absent)."""
    one_plus_scale = 0.0
    shift = 0.0
    if HAS_MOD:
        # torch rounds (1 + scale) to float32 first, then the product, then the sum.
        one_plus_scale = 1.0 + tl.load(SCALE + s_off[:, None] + cols[None, :], mask=col_ok[None, :], other=0.0)
        shift = tl.load(SHIFT + h_off[:, None] + cols[None, :], mask=col_ok[None, :], other=0.0)
    return one_plus_scale, shift


@triton.jit
def _normalise_store(d, rstd, w, bias, one_plus_scale, shift, out_ptrs, ok, HAS_WEIGHT: tl.constexpr,
                     HAS_BIAS: tl.constexpr, HAS_MOD: tl.constexpr, RTNE_BF16: tl.constexpr):
    """Store (d * rstd [* w] [+ b]) [* (1 + scale) + shift] for deviations d [BLOCK_R, BLOCK_C]."""
    y = d * rstd[:, None]
    if HAS_WEIGHT:
        y = y * w
    if HAS_BIAS:
        y = y + bias
    if HAS_MOD:
        y = y * one_plus_scale + shift
    dtype = out_ptrs.dtype.element_ty
    tl.store(out_ptrs, rounded(y, dtype, RTNE_BF16).to(dtype), mask=ok)


@triton.jit
def _modulated_layer_norm_kernel(
    X, W, BIAS, SCALE, SHIFT, OUT,
    stride_xb, stride_xn, stride_sb, stride_sn, stride_hb, stride_hn,
    N, C, eps,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MOD: tl.constexpr, MOD_ONCE: tl.constexpr,
    BLOCK_R: tl.constexpr, ROW_BLOCKS: tl.constexpr, BLOCK_C: tl.constexpr, NUM_CHUNKS: tl.constexpr,
    RTNE_BF16: tl.constexpr,
):
    """ROW_BLOCKS x BLOCK_R token rows of batch element program_id(1) x C channels, in NUM_CHUNKS
    chunks of BLOCK_C. Whole rows (one chunk) load the affine weight and bias once per program,
    and the modulation too when every token shares it (MOD_ONCE)."""
    b = tl.program_id(1)
    x_batch = X + b * stride_xb
    o_batch = OUT + b * N * C
    # IEEE-rounded division and sqrt (torch's CPU and CUDA layer_norm round each step).
    count = tl.zeros([BLOCK_R], tl.float32) + C
    cols = tl.arange(0, BLOCK_C)
    col_ok = cols < C
    w, bias = _layer_norm_affine(cols, col_ok, W, BIAS, HAS_WEIGHT, HAS_BIAS)
    shared = tl.zeros([1], tl.int64)
    one_plus_scale, shift = _modulation(cols, col_ok, SCALE, SHIFT, shared + b * stride_sb, shared + b * stride_hb,
                                        MOD_ONCE)
    for i in range(ROW_BLOCKS):
        t, row_ok = row_block(i, N, BLOCK_R, ROW_BLOCKS)
        x_row = x_batch + t * stride_xn
        o_row = o_batch + t * C
        s_off = b * stride_sb + t * stride_sn
        h_off = b * stride_hb + t * stride_hn
        if NUM_CHUNKS == 1:
            # The whole row stays in registers: one read of x. Upcast right after the load (the
            # interpreter has no bf16 arithmetic).
            ok = row_ok[:, None] & col_ok[None, :]
            x = tl.load(x_row[:, None] + cols[None, :], mask=ok, other=0.0).to(tl.float32)
            mean = tl.div_rn(tl.sum(x, 1), count)
            d = tl.where(ok, x - mean[:, None], 0.0)
            var = tl.div_rn(tl.sum(d * d, 1), count)
            rstd = tl.div_rn(tl.full([BLOCK_R], 1.0, tl.float32), tl.sqrt_rn(var + eps))
            if MOD_ONCE:
                row_scale, row_shift = one_plus_scale, shift
            else:
                row_scale, row_shift = _modulation(cols, col_ok, SCALE, SHIFT, s_off, h_off, HAS_MOD)
            _normalise_store(d, rstd, w, bias, row_scale, row_shift, o_row[:, None] + cols[None, :], ok,
                             HAS_WEIGHT, HAS_BIAS, HAS_MOD, RTNE_BF16)
        else:
            # Rows too long for registers: three passes over chunks (sum, squared deviations, store).
            acc = tl.zeros([BLOCK_R], tl.float32)
            for j in range(NUM_CHUNKS):
                chunk = j * BLOCK_C + cols
                ok = row_ok[:, None] & (chunk < C)[None, :]
                acc += tl.sum(tl.load(x_row[:, None] + chunk[None, :], mask=ok, other=0.0).to(tl.float32), 1)
            mean = tl.div_rn(acc, count)
            acc = tl.zeros([BLOCK_R], tl.float32)
            for j in range(NUM_CHUNKS):
                chunk = j * BLOCK_C + cols
                ok = row_ok[:, None] & (chunk < C)[None, :]
                x = tl.load(x_row[:, None] + chunk[None, :], mask=ok, other=0.0).to(tl.float32)
                d = tl.where(ok, x - mean[:, None], 0.0)
                acc += tl.sum(d * d, 1)
            rstd = tl.div_rn(tl.full([BLOCK_R], 1.0, tl.float32), tl.sqrt_rn(tl.div_rn(acc, count) + eps))
            for j in range(NUM_CHUNKS):
                chunk = j * BLOCK_C + cols
                chunk_ok = chunk < C
                ok = row_ok[:, None] & chunk_ok[None, :]
                x = tl.load(x_row[:, None] + chunk[None, :], mask=ok, other=0.0).to(tl.float32)
                cw, cb = _layer_norm_affine(chunk, chunk_ok, W, BIAS, HAS_WEIGHT, HAS_BIAS)
                c_scale, c_shift = _modulation(chunk, chunk_ok, SCALE, SHIFT, s_off, h_off, HAS_MOD)
                _normalise_store(x - mean[:, None], rstd, cw, cb, c_scale, c_shift,
                                 o_row[:, None] + chunk[None, :], ok, HAS_WEIGHT, HAS_BIAS, HAS_MOD, RTNE_BF16)


@triton.jit
def _gated_residual_kernel(
    X, Y, G, OUT,
    stride_xb, stride_xn, stride_yb, stride_yn, stride_gb, stride_gn,
    ROWS, N, C,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, RTNE_BF16: tl.constexpr,
):
    """A BLOCK_R x BLOCK_C tile of token rows (of B * N) x channels."""
    rows, row_ok, b, t = token_rows(ROWS, N, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = row_ok[:, None] & (cols < C)[None, :]
    x = tl.load(X + (b * stride_xb + t * stride_xn)[:, None] + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    y = tl.load(Y + (b * stride_yb + t * stride_yn)[:, None] + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    g = tl.load(G + (b * stride_gb + t * stride_gn)[:, None] + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    dtype = OUT.dtype.element_ty
    out = rounded(x + y * g, dtype, RTNE_BF16).to(dtype)
    tl.store(OUT + (rows * C)[:, None] + cols[None, :], out, mask=ok)


#: Launch shape, as data. The norm: elements per row block and per warp on the GPU, and rows per
#: program (its weight, bias and shared modulation loaded once): one 5,120-wide Wan2.1-14B row a
#: block on 4 warps, 4 blocks a program; four 1,536-wide Wan2.1-1.3B rows a block, one a program
#: (the fastest in a sweep on an H100). The residual: elements per program and per warp. The
#: interpreter pays per program, so it takes more rows per block or program; rows longer than
#: _MAX_BLOCK_C channels are normalised in chunks of that size; the residual's tiles are at most
#: _RESIDUAL_BLOCK_C wide.
_NORM_ELEMENTS_PER_BLOCK = 8192
_NORM_ELEMENTS_PER_WARP = 2048
_NORM_ROWS_PER_PROGRAM = 4
_NORM_ROWS_PER_PROGRAM_INTERPRETED = 1
_ELEMENTS_PER_PROGRAM = 4096
_ELEMENTS_PER_PROGRAM_INTERPRETED = 65536
_ELEMENTS_PER_WARP = 512
_MAX_BLOCK_C = 16384
_RESIDUAL_BLOCK_C = 2048


def _output_and_tiles(x: torch.Tensor, max_block_c: int) -> tuple[torch.Tensor, int, int, int]:
    """The [B, N, C] output in x's dtype and the launch shape over its rows: (out, channels per
    tile (a power of two, at most ``max_block_c``), rows per program, warps)."""
    bsz, n, c = x.shape
    out = torch.empty((bsz, n, c), dtype=x.dtype, device=x.device)
    block_c = min(triton.next_power_of_2(c), max_block_c)
    per_program = _ELEMENTS_PER_PROGRAM_INTERPRETED if interpreting() else _ELEMENTS_PER_PROGRAM
    return (out, block_c, *row_launch_shape(bsz * n, block_c, per_program, _ELEMENTS_PER_WARP))


def _row_strides(t: torch.Tensor) -> tuple[int, int]:
    """(batch, token) strides of a [B or 1, N or 1, C] operand; 0 along a broadcast dim."""
    return (t.stride(0) if t.shape[0] > 1 else 0), (t.stride(1) if t.shape[1] > 1 else 0)


def _unit_c(t: torch.Tensor) -> torch.Tensor:
    """t with unit stride along C (any other strides kept)."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _affine(t: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """The LayerNorm weight / bias as the kernel loads it: contiguous, a kernel dtype (other
    float dtypes are cast to float32 here, as FP32LayerNorm does)."""
    if t is None:
        return x  # a dummy pointer; the HAS_* flag keeps the kernel from reading it
    return (t if t.dtype in KERNEL_DTYPES else t.float()).contiguous()


def modulated_layer_norm_fwd(x, eps, weight, bias, scale, shift):
    """Launch on validated inputs (kernel dtypes; float32 scale and shift)."""
    has_mod = scale is not None
    if has_mod:
        scale, shift = _unit_c(scale), _unit_c(shift)
    x = _unit_c(x)
    bsz, n, c = x.shape
    out = torch.empty((bsz, n, c), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    block_c = min(triton.next_power_of_2(c), _MAX_BLOCK_C)
    num_chunks = triton.cdiv(c, block_c)
    per_block = _ELEMENTS_PER_PROGRAM_INTERPRETED if interpreting() else _NORM_ELEMENTS_PER_BLOCK
    block_r, warps = row_launch_shape(n, block_c, per_block, _NORM_ELEMENTS_PER_WARP)
    rows_per_program = _NORM_ROWS_PER_PROGRAM_INTERPRETED if interpreting() else _NORM_ROWS_PER_PROGRAM
    row_blocks = min(max(1, rows_per_program // block_r), triton.cdiv(n, block_r))
    stride_s = _row_strides(scale) if has_mod else (0, 0)
    stride_h = _row_strides(shift) if has_mod else (0, 0)
    _modulated_layer_norm_kernel[(triton.cdiv(n, block_r * row_blocks), bsz)](
        x, _affine(weight, x), _affine(bias, x), scale if has_mod else x, shift if has_mod else x, out,
        x.stride(0), x.stride(1), *stride_s, *stride_h,
        n, c, float(eps),
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, HAS_MOD=has_mod,
        MOD_ONCE=has_mod and num_chunks == 1 and stride_s[1] == 0 and stride_h[1] == 0,
        BLOCK_R=block_r, ROW_BLOCKS=row_blocks, BLOCK_C=block_c, NUM_CHUNKS=num_chunks,
        RTNE_BF16=interpreting() and x.dtype == torch.bfloat16,
        num_warps=warps, enable_fp_fusion=False,
    )
    return out


def gated_residual_fwd(x, y, gate):
    """Launch on validated inputs (kernel dtypes)."""
    x, y, gate = _unit_c(x), _unit_c(y), _unit_c(gate)
    bsz, n, c = x.shape
    out, block_c, block_r, warps = _output_and_tiles(x, _RESIDUAL_BLOCK_C)
    if out.numel() == 0:
        return out
    _gated_residual_kernel[(triton.cdiv(bsz * n, block_r), triton.cdiv(c, block_c))](
        x, y, gate, out,
        x.stride(0), x.stride(1), y.stride(0), y.stride(1), *_row_strides(gate),
        bsz * n, n, c,
        BLOCK_R=block_r, BLOCK_C=block_c, RTNE_BF16=interpreting() and x.dtype == torch.bfloat16,
        num_warps=warps, enable_fp_fusion=False,
    )
    return out



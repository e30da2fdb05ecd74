"""Fused adaLN elementwise passes of Wan's transformer block in Triton, twins of
:func:`modulated_layer_norm_ref` and :func:`gated_residual_ref` (today's torch code).

Diffusers' ``WanTransformerBlock.forward`` runs its norms and residuals as float32 torch
expressions over [B, N, C] token rows: ``FP32LayerNorm`` (upcast, layer_norm), then
``* (1 + scale) + shift`` and a cast back for norm1 and norm3; ``x.float() + y * gate`` and
a cast back for the two gated residuals. Each is several full passes with float32
temporaries. Here each tensor is read once and the result written once in x's dtype:

- ``modulated_layer_norm``: a program holds whole rows (BLOCK_C = next power of two >= C
  with a mask; short rows are packed several to a program; rows longer than
  ``_MAX_BLOCK_C`` are walked in chunks, reading x three times), computes the mean and then
  the variance as the mean of squared deviations in float32 (torch's biased variance),
  normalises, applies the optional LayerNorm weight and bias, then the optional
  modulation ``* (1 + scale) + shift``, and rounds once to x's dtype.
- ``gated_residual``: a tile of rows x channels, ``x + y * gate`` in float32, rounded once.

Both launch with floating-point contraction off, so each multiply and add rounds in
float32 as torch's separate kernels do: ``gated_residual`` is bit-identical to the torch
path, and ``modulated_layer_norm`` differs only through the row statistics (torch uses a
Welford scheme, here two exact passes over the row in registers).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from dfsviz.kernels._dispatch import KERNEL_DTYPES, check_kernel_dtype, interpreting, resolve_backend
from dfsviz.kernels._rows import rounded, row_launch_shape, token_rows

__all__ = ["gated_residual", "gated_residual_ref", "modulated_layer_norm", "modulated_layer_norm_ref"]


def modulated_layer_norm_ref(x: torch.Tensor, eps: float, weight: torch.Tensor | None = None,
                             bias: torch.Tensor | None = None, scale: torch.Tensor | None = None,
                             shift: torch.Tensor | None = None) -> torch.Tensor:
    """``(FP32LayerNorm(x) * (1 + scale) + shift).to(x.dtype)``, diffusers' Wan norm1 / norm3
    (norm2 without scale and shift, with the affine weight and bias)."""
    y = torch.nn.functional.layer_norm(
        x.float(), (x.shape[-1],), weight.float() if weight is not None else None,
        bias.float() if bias is not None else None, eps,
    )
    if scale is not None:
        y = y * (1 + scale) + shift
    return y.to(x.dtype)


def gated_residual_ref(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``(x.float() + y.float() * gate).to(x.dtype)``, Wan's gated residual after attn1 and the FFN."""
    return (x.float() + y.float() * gate).to(x.dtype)


def _check_rows(x, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"`{name}` must be a torch tensor (got {type(x).__name__})")
    if x.dim() != 3:
        raise ValueError(f"`{name}` must be [B, N, C] token rows (got shape {tuple(x.shape)}); "
                         "flatten the leading dims with .flatten(0, -3) or add a batch dim with [None]")
    if not x.is_floating_point():
        raise ValueError(f"`{name}` must be a floating-point tensor (got {x.dtype}); cast with .to(torch.bfloat16)")


def _check_modulation(t, name: str, x: torch.Tensor, hint: str) -> None:
    """``t`` broadcasts against x [B, N, C] as [B or 1, N or 1, C] (Wan2.1's [B, 1, C] chunks,
    Wan2.2 TI2V's per-token [B, N, C] chunks)."""
    bsz, n, c = x.shape
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"`{name}` must be a torch tensor (got {type(t).__name__})")
    if t.dim() != 3 or t.shape[0] not in (1, bsz) or t.shape[1] not in (1, n) or t.shape[2] != c:
        raise ValueError(f"`{name}` must be [B, 1, C] or [1, 1, C] (or per token [B, N, C]) with B = {bsz}, "
                         f"N = {n}, C = {c} (got shape {tuple(t.shape)}); {hint}")


def _check_devices(**tensors) -> None:
    present = {k: t for k, t in tensors.items() if t is not None}
    devices = {t.device for t in present.values()}
    if len(devices) != 1:
        names = ", ".join(f"`{k}`" for k in present)
        raise ValueError(f"{names} must be on one device (got {sorted(map(str, devices))}); "
                         "move them with .to(x.device)")


_TABLE_HINT = "pass a chunk of (scale_shift_table + temb.float()).chunk(6, dim=1)"


def _check_norm_inputs(x, eps, weight, bias, scale, shift) -> None:
    _check_rows(x)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"`eps` must be a finite float >= 0 (got {eps!r}); pass the norm's eps, e.g. block.norm1.eps")
    c = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or t.shape != (c,) or not t.is_floating_point():
            got = f"shape {tuple(t.shape)}, {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"`{name}` must be a floating-point LayerNorm {name} of shape ({c},) over x's last dim "
                             f"(got {got}); pass norm.{name} of a LayerNorm(C) or None")
    if (scale is None) != (shift is None):
        given, missing = ("scale", "shift") if shift is None else ("shift", "scale")
        raise ValueError(f"`scale` and `shift` must be given together (got `{given}` without `{missing}`); "
                         "pass both modulation chunks, or neither for a plain LayerNorm")
    if scale is not None:
        _check_modulation(scale, "scale", x, _TABLE_HINT)
        _check_modulation(shift, "shift", x, _TABLE_HINT)
    _check_devices(x=x, weight=weight, bias=bias, scale=scale, shift=shift)


def _check_residual_inputs(x, y, gate) -> None:
    _check_rows(x)
    _check_rows(y, "y")
    if y.shape != x.shape:
        raise ValueError(f"`y` must have x's shape {tuple(x.shape)} (got {tuple(y.shape)}); "
                         "pass the attention or FFN output of the same tokens")
    _check_modulation(gate, "gate", x, _TABLE_HINT)
    if not gate.is_floating_point():
        raise ValueError(f"`gate` must be a floating-point tensor (got {gate.dtype}); cast with .float()")
    _check_devices(x=x, y=y, gate=gate)


def _check_float32(name: str, t: torch.Tensor) -> None:
    if t.dtype != torch.float32:
        raise ValueError(f"`{name}` must be float32 for the Triton kernel (got {t.dtype}), as Wan's modulation "
                         "table is; cast with .float() or use backend='ref'")


@triton.jit
def _normalise_store(d, rstd, cols, ok, col_ok, W, BIAS, SCALE, SHIFT, s_row, h_row, o_row,
                     HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MOD: tl.constexpr,
                     RTNE_BF16: tl.constexpr):
    """Store (d * rstd [* w] [+ b]) [* (1 + scale) + shift] for deviations d [BLOCK_R, BLOCK_C]."""
    y = d * rstd[:, None]
    if HAS_WEIGHT:
        y = y * tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y = y + tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_MOD:
        scale = tl.load(SCALE + s_row[:, None] + cols[None, :], mask=ok, other=0.0)
        shift = tl.load(SHIFT + h_row[:, None] + cols[None, :], mask=ok, other=0.0)
        # torch rounds (1 + scale) to float32 first, then the product, then the sum.
        y = y * (1.0 + scale) + shift
    dtype = o_row.dtype.element_ty
    tl.store(o_row[:, None] + cols[None, :], rounded(y, dtype, RTNE_BF16).to(dtype), mask=ok)


@triton.jit
def _modulated_layer_norm_kernel(
    X, W, BIAS, SCALE, SHIFT, OUT,
    stride_xb, stride_xn, stride_sb, stride_sn, stride_hb, stride_hn,
    ROWS, N, C, eps,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MOD: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, NUM_CHUNKS: tl.constexpr, RTNE_BF16: tl.constexpr,
):
    """BLOCK_R token rows (of B * N) x C channels, in NUM_CHUNKS chunks of BLOCK_C."""
    rows, row_ok, b, t = token_rows(ROWS, N, BLOCK_R)
    x_row = X + b * stride_xb + t * stride_xn
    s_row = b * stride_sb + t * stride_sn  # stride 0 along a broadcast dim of scale / shift
    h_row = b * stride_hb + t * stride_hn
    o_row = OUT + rows * C
    # IEEE-rounded division and sqrt (torch's CPU and CUDA layer_norm round each step).
    count = tl.zeros([BLOCK_R], tl.float32) + C
    if NUM_CHUNKS == 1:
        # The whole row stays in registers: one read of x. Upcast right after the load (the
        # interpreter has no bf16 arithmetic).
        cols = tl.arange(0, BLOCK_C)
        col_ok = cols < C
        ok = row_ok[:, None] & col_ok[None, :]
        x = tl.load(x_row[:, None] + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        mean = tl.div_rn(tl.sum(x, 1), count)
        d = tl.where(ok, x - mean[:, None], 0.0)
        var = tl.div_rn(tl.sum(d * d, 1), count)
        rstd = tl.div_rn(tl.full([BLOCK_R], 1.0, tl.float32), tl.sqrt_rn(var + eps))
        _normalise_store(d, rstd, cols, ok, col_ok, W, BIAS, SCALE, SHIFT, s_row, h_row, o_row,
                         HAS_WEIGHT, HAS_BIAS, HAS_MOD, RTNE_BF16)
    else:
        # Rows too long for registers: three passes over chunks (sum, squared deviations, store).
        acc = tl.zeros([BLOCK_R], tl.float32)
        for i in range(NUM_CHUNKS):
            cols = i * BLOCK_C + tl.arange(0, BLOCK_C)
            ok = row_ok[:, None] & (cols < C)[None, :]
            acc += tl.sum(tl.load(x_row[:, None] + cols[None, :], mask=ok, other=0.0).to(tl.float32), 1)
        mean = tl.div_rn(acc, count)
        acc = tl.zeros([BLOCK_R], tl.float32)
        for i in range(NUM_CHUNKS):
            cols = i * BLOCK_C + tl.arange(0, BLOCK_C)
            ok = row_ok[:, None] & (cols < C)[None, :]
            x = tl.load(x_row[:, None] + cols[None, :], mask=ok, other=0.0).to(tl.float32)
            d = tl.where(ok, x - mean[:, None], 0.0)
            acc += tl.sum(d * d, 1)
        rstd = tl.div_rn(tl.full([BLOCK_R], 1.0, tl.float32), tl.sqrt_rn(tl.div_rn(acc, count) + eps))
        for i in range(NUM_CHUNKS):
            cols = i * BLOCK_C + tl.arange(0, BLOCK_C)
            col_ok = cols < C
            ok = row_ok[:, None] & col_ok[None, :]
            x = tl.load(x_row[:, None] + cols[None, :], mask=ok, other=0.0).to(tl.float32)
            _normalise_store(x - mean[:, None], rstd, cols, ok, col_ok, W, BIAS, SCALE, SHIFT, s_row, h_row,
                             o_row, HAS_WEIGHT, HAS_BIAS, HAS_MOD, RTNE_BF16)


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


#: Launch shape, as data: elements per program and per warp on the GPU (the interpreter pays
#: per program, so it takes more rows per program); rows longer than _MAX_BLOCK_C channels are
#: normalised in chunks of that size; the residual's tiles are at most _RESIDUAL_BLOCK_C wide.
_ELEMENTS_PER_PROGRAM = 4096
_ELEMENTS_PER_PROGRAM_INTERPRETED = 65536
_ELEMENTS_PER_WARP = 512
_MAX_BLOCK_C = 16384
_RESIDUAL_BLOCK_C = 2048


def _launch_shape(rows: int, block_c: int) -> tuple[int, int]:
    per_program = _ELEMENTS_PER_PROGRAM_INTERPRETED if interpreting() else _ELEMENTS_PER_PROGRAM
    return row_launch_shape(rows, block_c, per_program, _ELEMENTS_PER_WARP)


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


def _modulated_layer_norm_fwd(x, eps, weight, bias, scale, shift):
    check_kernel_dtype(x, "x")
    has_mod = scale is not None
    if has_mod:
        _check_float32("scale", scale)
        _check_float32("shift", shift)
        scale, shift = _unit_c(scale), _unit_c(shift)
    x = _unit_c(x)
    bsz, n, c = x.shape
    out = torch.empty((bsz, n, c), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    block_c = min(triton.next_power_of_2(c), _MAX_BLOCK_C)
    block_r, warps = _launch_shape(bsz * n, block_c)
    stride_s = _row_strides(scale) if has_mod else (0, 0)
    stride_h = _row_strides(shift) if has_mod else (0, 0)
    _modulated_layer_norm_kernel[(triton.cdiv(bsz * n, block_r),)](
        x, _affine(weight, x), _affine(bias, x), scale if has_mod else x, shift if has_mod else x, out,
        x.stride(0), x.stride(1), *stride_s, *stride_h,
        bsz * n, n, c, float(eps),
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, HAS_MOD=has_mod,
        BLOCK_R=block_r, BLOCK_C=block_c, NUM_CHUNKS=triton.cdiv(c, block_c),
        RTNE_BF16=interpreting() and x.dtype == torch.bfloat16,
        num_warps=warps, enable_fp_fusion=False,
    )
    return out


def _gated_residual_fwd(x, y, gate):
    check_kernel_dtype(x, "x")
    check_kernel_dtype(y, "y")
    # y * gate promotes a float16 / bfloat16 gate to float32 exactly, so any kernel dtype is the torch result.
    check_kernel_dtype(gate, "gate")
    x, y, gate = _unit_c(x), _unit_c(y), _unit_c(gate)
    bsz, n, c = x.shape
    out = torch.empty((bsz, n, c), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    block_c = min(triton.next_power_of_2(c), _RESIDUAL_BLOCK_C)
    block_r, warps = _launch_shape(bsz * n, block_c)
    _gated_residual_kernel[(triton.cdiv(bsz * n, block_r), triton.cdiv(c, block_c))](
        x, y, gate, out,
        x.stride(0), x.stride(1), y.stride(0), y.stride(1), *_row_strides(gate),
        bsz * n, n, c,
        BLOCK_R=block_r, BLOCK_C=block_c, RTNE_BF16=interpreting() and x.dtype == torch.bfloat16,
        num_warps=warps, enable_fp_fusion=False,
    )
    return out


def modulated_layer_norm(x: torch.Tensor, eps: float, weight: torch.Tensor | None = None,
                         bias: torch.Tensor | None = None, scale: torch.Tensor | None = None,
                         shift: torch.Tensor | None = None, backend: str | None = None) -> torch.Tensor:
    """Float32 LayerNorm over C, optional affine and adaLN modulation, in one pass (Triton or reference).

    Serves Wan's norm1 / norm3 (``scale``, ``shift``, no affine) and norm2 (affine, no modulation).

    Args:
        x: [B, N, C] token rows, float16 / bfloat16 / float32 for the kernel, unit stride
            along C (any B, N strides).
        eps: the norm's eps (``FP32LayerNorm.eps``).
        weight, bias: optional [C] LayerNorm weight and bias in any float dtype (cast to
            float32, as ``FP32LayerNorm``).
        scale, shift: both or neither; float32 [B, 1, C] or [1, 1, C] (per token [B, N, C]
            too), unit stride along C and any other strides, e.g. chunks of
            ``(scale_shift_table + temb.float()).chunk(6, dim=1)``.
        backend: None (Triton on CUDA, else reference; env DFSVIZ_KERNEL_BACKEND),
            "triton" or "ref".

    Returns:
        [B, N, C] in x's dtype: ``(layer_norm(x.float(), (C,), weight, bias, eps) * (1 + scale)
        + shift).to(x.dtype)``, rounded once.
    """
    _check_norm_inputs(x, eps, weight, bias, scale, shift)
    tensors = [t for t in (x, weight, bias, scale, shift) if t is not None]
    if resolve_backend(backend, *tensors) == "ref":
        return modulated_layer_norm_ref(x, eps, weight, bias, scale, shift)
    return _modulated_layer_norm_fwd(x, eps, weight, bias, scale, shift)


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """Wan's gated residual ``x + y * gate`` in float32, in one pass (Triton or reference).

    Args:
        x: [B, N, C] residual stream, float16 / bfloat16 / float32 for the kernel.
        y: [B, N, C] branch output (attention or FFN), any kernel dtype (may differ from x's).
        gate: [B, 1, C] or [1, 1, C] (per token [B, N, C] too), float32 (float16 / bfloat16
            also exact), any strides, e.g. a chunk of ``(scale_shift_table + temb.float()).chunk(6, dim=1)``.
        backend: None (Triton on CUDA, else reference; env DFSVIZ_KERNEL_BACKEND),
            "triton" or "ref".

    Returns:
        [B, N, C] in x's dtype: ``(x.float() + y.float() * gate).to(x.dtype)``; the kernel
        rounds as torch does (bit-identical).
    """
    _check_residual_inputs(x, y, gate)
    if resolve_backend(backend, x, y, gate) == "ref":
        return gated_residual_ref(x, y, gate)
    return _gated_residual_fwd(x, y, gate)

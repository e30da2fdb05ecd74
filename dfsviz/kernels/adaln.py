"""Fused adaLN elementwise passes of Wan's transformer block in Triton, twins of
:func:`modulated_layer_norm_ref` and :func:`gated_residual_ref` (today's torch code).

Diffusers' ``WanTransformerBlock.forward`` runs its norms and residuals as float32 torch
expressions over [B, N, C] token rows: ``FP32LayerNorm`` (upcast, layer_norm), then
``* (1 + scale) + shift`` and a cast back for norm1 and norm3; ``x.float() + y * gate`` and
a cast back for the two gated residuals. Each is several full passes with float32
temporaries. Here each tensor is read once and the result written once in x's dtype:

- ``modulated_layer_norm``: a program walks blocks of whole rows of one batch element
  (BLOCK_C = next power of two >= C with a mask; short rows are packed several to a block;
  the LayerNorm weight and bias, and a modulation shared by every token, are loaded once per
  program; rows longer than ``_MAX_BLOCK_C`` are walked in chunks, reading x three times),
  computes the mean and then the variance as the mean of squared deviations in float32
  (torch's biased variance), normalises, applies the optional LayerNorm weight and bias,
  then the optional modulation ``* (1 + scale) + shift``, and rounds once to x's dtype.
- ``gated_residual``: a tile of rows x channels, ``x + y * gate`` in float32, rounded once.

Both launch with floating-point contraction off, so each multiply and add rounds in
float32 as torch's separate kernels do: ``gated_residual`` is bit-identical to the torch
path, and ``modulated_layer_norm`` differs only through the row statistics (torch uses a
Welford scheme, here two exact passes over the row in registers).
"""

from __future__ import annotations

import math

import torch

from dfsviz.kernels._dispatch import check_kernel_dtype, resolve_backend

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
    check_kernel_dtype(x, "x")
    if scale is not None:
        _check_float32("scale", scale)
        _check_float32("shift", shift)
    from dfsviz.kernels._jit.adaln import modulated_layer_norm_fwd

    return modulated_layer_norm_fwd(x, eps, weight, bias, scale, shift)


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
    check_kernel_dtype(x, "x")
    check_kernel_dtype(y, "y")
    # y * gate promotes a float16 / bfloat16 gate to float32 exactly, so any kernel dtype is the torch result.
    check_kernel_dtype(gate, "gate")
    from dfsviz.kernels._jit.adaln import gated_residual_fwd

    return gated_residual_fwd(x, y, gate)

"""Fused QK-RMSNorm + Wan RoPE in Triton, twin of :func:`qk_norm_rope_ref` (today's torch code).

Wan's self-attention normalises q (and k) with ``torch.nn.RMSNorm`` over the whole inner
dim C = H * D and then applies interleaved RoPE per head in float32
(:func:`wan_rope`, diffusers' ``WanAttnProcessor``). In PyTorch that is several full
passes over q and k; here each token row of x [B, N, C] is read once and written once.
A program holds whole rows (BLOCK_C = next power of two >= C channels with a mask; short
rows are packed several to a program), loads them contiguously, computes each row's RMS in
float32, rounds the normalised and weighted row to x's dtype (``torch.nn.RMSNorm`` returns
the input dtype, so today's path rounds there too), splits it into heads and (even, odd)
pairs in registers, rotates each pair of every head with the table entries cos[token,
d_even] and sin[token, d_odd] in float32 (each row's D table entries loaded once, for all
its heads: the kernel needs D to be a power of two) and stores the rows contiguously in x's
dtype.
"""

from __future__ import annotations

import torch

from dfsviz.kernels._dispatch import check_kernel_dtype, resolve_backend

__all__ = ["qk_norm_rope", "qk_norm_rope_ref", "wan_rope"]


def wan_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's interleaved RoPE on x [B, N, H, D] with tables [1, N, 1, D] (as WanAttnProcessor)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


def _resolve_eps(eps: float | None, dtype: torch.dtype) -> float:
    """``torch.nn.RMSNorm``'s rule: eps=None means torch.finfo(dtype).eps."""
    return torch.finfo(dtype).eps if eps is None else float(eps)


def qk_norm_rope_ref(x: torch.Tensor, weight: torch.Tensor, eps: float | None, cos: torch.Tensor,
                     sin: torch.Tensor) -> torch.Tensor:
    """``wan_rope(rms_norm(x).unflatten(-1, (H, D)), cos, sin).flatten(-2)``, H = C // D (D = cos.shape[-1])."""
    d = cos.shape[-1]
    y = torch.nn.functional.rms_norm(x, (x.shape[-1],), weight, _resolve_eps(eps, x.dtype))
    return wan_rope(y.unflatten(-1, (-1, d)), cos, sin).flatten(-2)


def _check_inputs(x, weight, cos, sin) -> None:
    if not all(isinstance(t, torch.Tensor) for t in (x, weight, cos, sin)):
        raise ValueError("`x`, `weight`, `cos` and `sin` must be torch tensors")
    if x.dim() != 3:
        raise ValueError(f"`x` must be [B, N, C] with C = heads * head_dim (got shape {tuple(x.shape)}); "
                         "flatten the heads with x.flatten(2)")
    bsz, n, c = x.shape
    if weight.shape != (c,):
        raise ValueError(f"`weight` must be the RMSNorm weight of shape ({c},) over x's last dim "
                         f"(got {tuple(weight.shape)}); the norm must span all heads (Wan's norm_q / norm_k)")
    if weight.dtype != x.dtype:
        raise ValueError(f"`weight` dtype {weight.dtype} must equal `x` dtype {x.dtype}; "
                         "cast the norm with .to(x.dtype)")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dim() != 4 or t.shape[0] not in (1, bsz) or t.shape[1] != n or t.shape[2] != 1:
            raise ValueError(f"`{name}` must be Wan's rotary table [1, N, 1, D] with N = {n} (got shape "
                             f"{tuple(t.shape)}); pass the `rotary_emb` tables the Wan transformer hands its blocks")
    d = cos.shape[-1]
    if sin.shape[-1] != d or d % 2 or d == 0 or c % d:
        raise ValueError(f"the head dim D = cos.shape[-1] = {d} must be even, equal sin.shape[-1] = {sin.shape[-1]} "
                         f"and divide C = {c}; pass tables of the attention's head dim")
    devices = {t.device for t in (x, weight, cos, sin)}
    if len(devices) != 1:
        raise ValueError(f"`x`, `weight`, `cos` and `sin` must be on one device (got {sorted(map(str, devices))}); "
                         "move them with .to(x.device)")


def _check_kernel_inputs(x, cos, sin) -> None:
    check_kernel_dtype(x, "x")
    if cos.dtype != torch.float32 or sin.dtype != torch.float32:
        raise ValueError(f"`cos` and `sin` must be float32 for the Triton kernel (got {cos.dtype}, {sin.dtype}), "
                         "as Wan's rope module keeps them; cast with .float() or use backend='ref'")
    d = cos.shape[-1]
    if d & (d - 1):
        raise ValueError(f"the head dim D = {d} must be a power of two for the Triton kernel (Wan's is 128); "
                         "use backend='ref'")


def qk_norm_rope(x: torch.Tensor, weight: torch.Tensor, eps: float | None, cos: torch.Tensor, sin: torch.Tensor,
                 backend: str | None = None) -> torch.Tensor:
    """RMSNorm over the inner dim, then Wan's interleaved RoPE per head, in one pass (Triton or reference).

    Args:
        x: [B, N, C] with C = H * D, float16 / bfloat16 / float32, unit stride along C (any
            B, N strides, e.g. a chunk of a fused qkv projection).
        weight: [C] RMSNorm weight (``torch.nn.RMSNorm(C).weight``) in x's dtype.
        eps: the norm's eps; None means ``torch.finfo(x.dtype).eps`` (as torch.nn.RMSNorm).
        cos, sin: Wan's rotary tables [1, N, 1, D] (batch B also accepted), float32 and D a
            power of two for the kernel, any strides (permute-once passes tables permuted
            along N).
        backend: None (Triton on CUDA, else reference; env DFSVIZ_KERNEL_BACKEND),
            "triton" or "ref".

    Returns:
        [B, N, C] in x's dtype: ``wan_rope(rms_norm(x).unflatten(-1, (H, D)), cos, sin).flatten(-2)``,
        the norm's output rounded to x's dtype before the rotation, as today's torch path.
    """
    _check_inputs(x, weight, cos, sin)
    if resolve_backend(backend, x, weight, cos, sin) == "ref":
        return qk_norm_rope_ref(x, weight, eps, cos, sin)
    _check_kernel_inputs(x, cos, sin)
    from dfsviz.kernels._jit.qk_norm_rope import qk_norm_rope_fwd

    return qk_norm_rope_fwd(x, weight, _resolve_eps(eps, x.dtype), cos, sin)

"""Fused QK-RMSNorm + Wan RoPE in Triton, twin of :func:`qk_norm_rope_ref` (today's torch code).

Wan's self-attention normalises q (and k) with ``torch.nn.RMSNorm`` over the whole inner
dim C = H * D and then applies interleaved RoPE per head in float32
(:func:`wan_rope`, diffusers' ``WanAttnProcessor``). In PyTorch that is several full
passes over q and k; here each token row of x [B, N, C] is read once and written once.
A program holds whole rows (BLOCK_P = next power of two >= C / 2 (even, odd) channel
pairs with a mask; short rows are packed several to a program), computes each row's RMS
in float32, rounds the normalised and weighted row to x's dtype (``torch.nn.RMSNorm``
returns the input dtype, so today's path rounds there too), rotates each (even, odd) pair
of every head with the table entries cos[token, d_even] and sin[token, d_odd] in float32
and stores the row in x's dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dfsviz.kernels._dispatch import check_kernel_dtype, interpreting, resolve_backend
from dfsviz.kernels._rows import rounded, row_launch_shape, token_rows

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


def _check_kernel_dtypes(x, cos, sin) -> None:
    check_kernel_dtype(x, "x")
    if cos.dtype != torch.float32 or sin.dtype != torch.float32:
        raise ValueError(f"`cos` and `sin` must be float32 for the Triton kernel (got {cos.dtype}, {sin.dtype}), "
                         "as Wan's rope module keeps them; cast with .float() or use backend='ref'")


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


def _qk_norm_rope_fwd(x, weight, eps, cos, sin):
    _check_kernel_dtypes(x, cos, sin)
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
        bsz * n, n, c, _resolve_eps(eps, x.dtype),
        HEAD_DIM=d, BLOCK_R=block_r, BLOCK_P=block_p, RTNE_BF16=interpreting() and x.dtype == torch.bfloat16,
        num_warps=warps,
    )
    return out


def qk_norm_rope(x: torch.Tensor, weight: torch.Tensor, eps: float | None, cos: torch.Tensor, sin: torch.Tensor,
                 backend: str | None = None) -> torch.Tensor:
    """RMSNorm over the inner dim, then Wan's interleaved RoPE per head, in one pass (Triton or reference).

    Args:
        x: [B, N, C] with C = H * D, float16 / bfloat16 / float32, unit stride along C (any
            B, N strides, e.g. a chunk of a fused qkv projection).
        weight: [C] RMSNorm weight (``torch.nn.RMSNorm(C).weight``) in x's dtype.
        eps: the norm's eps; None means ``torch.finfo(x.dtype).eps`` (as torch.nn.RMSNorm).
        cos, sin: Wan's rotary tables [1, N, 1, D] (batch B also accepted), float32 for the
            kernel, any strides (permute-once passes tables permuted along N).
        backend: None (Triton on CUDA, else reference; env DFSVIZ_KERNEL_BACKEND),
            "triton" or "ref".

    Returns:
        [B, N, C] in x's dtype: ``wan_rope(rms_norm(x).unflatten(-1, (H, D)), cos, sin).flatten(-2)``,
        the norm's output rounded to x's dtype before the rotation, as today's torch path.
    """
    _check_inputs(x, weight, cos, sin)
    if resolve_backend(backend, x, weight, cos, sin) == "ref":
        return qk_norm_rope_ref(x, weight, eps, cos, sin)
    return _qk_norm_rope_fwd(x, weight, eps, cos, sin)

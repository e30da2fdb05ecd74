"""FP8 linear layers: ``y = x W^T + b`` with x and W in float8 e4m3, one power-of-two scale per
row of x (per token) and per output channel of W, float32 accumulation, y rounded once to
bfloat16; and its PyTorch simulation (the 'ref' backend, any device and dtype).

The scheme (per-token activations, per-channel weights: the "row-wise" scaling of FP8 GEMMs):

1. W [N, K] is quantized once (:func:`quantize_weight_fp8`): output channel n gets the
   smallest power of two s_n with max_k |W_nk| / s_n <= 448 (e4m3's largest finite value),
   and W8 = fp8(W / s_n), rounded to nearest even.
2. Each call quantizes x [M, K] the same way per row (:func:`quantize_rows_fp8`; on the GPU one
   Triton pass, bit for bit the same bytes and scales): scales t_m, x8 = fp8(x / t_m).
3. ``y_mn = t_m s_n sum_k x8_mk W8_nk + b_n``: the products of two e4m3 values are exact in
   float32, so the simulation differs from the GPU's FP8 matrix product only in the order of the
   float32 sums. On CUDA the product is ``torch._scaled_mm`` (cuBLAS / CUTLASS row-wise scaled
   FP8 GEMM; GPUs of compute capability >= 8.9), which writes bfloat16.

Error: each quantized entry is within 2^-4 (relative) of its input. For unit-variance x,
weights at a trained scale (std 1 / sqrt(K)) and a unit bias, the output's RMS error against the
exact product is 2.6-2.7 % of the output's RMS at the video models' layer shapes (K 1,536-15,360),
where the bfloat16 layer's own rounding gives 0.17 % (docs/kernels.md, "FP8 linear layers").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dfsviz.kernels._dispatch import check_fp8_capability, cuda_properties, resolve_backend
from dfsviz.kernels.fp8 import FP8_DTYPE, _pow2_scales

__all__ = ["FP8_LINEAR_ALIGN", "Fp8Weight", "fp8_linear", "fp8_linear_ref", "quantize_rows_fp8", "quantize_weight_fp8"]

#: K and N must be multiples of this for the FP8 matrix product (cuBLAS's 16-byte rule for e4m3).
FP8_LINEAR_ALIGN = 16


@dataclass(frozen=True)
class Fp8Weight:
    """A linear layer's weight in e4m3 (:func:`quantize_weight_fp8`).

    Fields:
        w8: float8_e4m3fn [N, K], contiguous.
        scale: float32 [N], one power of two per output channel.
        bias: the layer's bias [N] (its own dtype) or None.
    """

    w8: torch.Tensor
    scale: torch.Tensor
    bias: torch.Tensor | None

    @property
    def shape(self) -> tuple[int, int]:
        """(N, K): output and input features."""
        return tuple(self.w8.shape)


def _check_matrix(x: object, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"`{name}` must be a torch tensor (got {type(x).__name__})")
    if x.dim() != 2 or not x.is_floating_point() or x.shape[1] == 0:
        raise ValueError(f"`{name}` must be a floating-point [rows, K] matrix, K >= 1 (got {x.dtype} {tuple(x.shape)})")
    return x


def quantize_rows_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row e4m3 quantization of x [M, K] (any float dtype): (x8 float8_e4m3fn [M, K]
    contiguous, scales float32 [M, 1]), scale = the smallest power of two with max |x_m| / scale
    <= 448 (1 for an all-zero row; NaN flows on), x8 = fp8(x / scale) rounded to nearest even."""
    xf = _check_matrix(x, "x").float()
    scales = _pow2_scales(xf.abs().amax(dim=1, keepdim=True))
    return (xf / scales).to(FP8_DTYPE).contiguous(), scales


def quantize_weight_fp8(weight: torch.Tensor, bias: torch.Tensor | None = None) -> Fp8Weight:
    """A linear layer's weight [N, K] in e4m3 with one power-of-two scale per output channel (the
    row rule of :func:`quantize_rows_fp8`, applied to W's rows), keeping ``bias`` as given."""
    w8, scale = quantize_rows_fp8(_check_matrix(weight, "weight").detach())
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != (weight.shape[0],)):
        raise ValueError(f"`bias` must be None or a [{weight.shape[0]}] tensor (got "
                         f"{getattr(bias, 'shape', type(bias).__name__)})")
    return Fp8Weight(w8, scale[:, 0].contiguous(), None if bias is None else bias.detach())


def _rows(x: object, weight: Fp8Weight) -> torch.Tensor:
    """x [..., K] as a [M, K] matrix (a view when it can be one)."""
    if not isinstance(weight, Fp8Weight):
        raise TypeError(f"`weight` must be an Fp8Weight from quantize_weight_fp8 (got {type(weight).__name__})")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1:
        raise ValueError(f"`x` must be a floating-point tensor [..., K] (got {getattr(x, 'dtype', type(x).__name__)})")
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"`x` has {x.shape[-1]} features in its last dim; the weight takes K = {k} "
                         f"(weight [{n}, {k}])")
    if x.device != weight.w8.device:
        raise ValueError(f"`x` is on {x.device} and the weight on {weight.w8.device}; move one of them")
    return x.reshape(-1, k)


def fp8_linear_ref(x: torch.Tensor, weight: Fp8Weight) -> torch.Tensor:
    """The PyTorch simulation of :func:`fp8_linear` (any device and float dtype): x [..., K] quantized
    per row as the kernel quantizes it, the e4m3 product in float32, scales and bias applied in
    float32, rounded once to x's dtype. Returns [..., N]."""
    rows = _rows(x, weight)
    x8, x_scale = quantize_rows_fp8(rows)
    y = (x8.float() @ weight.w8.float().t()) * x_scale * weight.scale
    if weight.bias is not None:
        y = y + weight.bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


def fp8_linear(x: torch.Tensor, weight: Fp8Weight, backend: str | None = None) -> torch.Tensor:
    """``x W^T + b`` in FP8 (module docstring): x [..., K] bfloat16 on a GPU of compute
    capability >= 8.9 (or the CPU under TRITON_INTERPRET=1), ``weight`` from
    :func:`quantize_weight_fp8` with K and N multiples of 16. Returns bfloat16 [..., N].

    The 'triton' backend quantizes x's rows in one Triton pass and multiplies with
    ``torch._scaled_mm``; 'ref' runs :func:`fp8_linear_ref` (any dtype, any device)."""
    rows = _rows(x, weight)
    if resolve_backend(backend, x) == "ref":
        return fp8_linear_ref(x, weight)
    n, k = weight.shape
    if k % FP8_LINEAR_ALIGN or n % FP8_LINEAR_ALIGN:
        raise ValueError(f"the FP8 matrix product needs K and N multiples of {FP8_LINEAR_ALIGN} (weight [{n}, {k}]); "
                         "use backend='ref' to simulate other shapes")
    if x.dtype != torch.bfloat16:
        raise ValueError(f"`x` must be bfloat16 for the FP8 matrix product, which writes bfloat16 (got {x.dtype}); "
                         "cast the model with .to(torch.bfloat16) or use backend='ref'")
    if x.is_cuda:  # CPU tensors reach here only under TRITON_INTERPRET=1 (resolve_backend)
        check_fp8_capability(cuda_properties(x.device), "fp8_linear", "a bfloat16 F.linear")
    from dfsviz.kernels._jit.fp8 import quantize_rows_fp8_fwd

    x8, x_scale = quantize_rows_fp8_fwd(rows if rows.stride(-1) == 1 else rows.contiguous())
    bias = weight.bias if weight.bias is None or weight.bias.dtype == torch.bfloat16 else weight.bias.bfloat16()
    y = torch._scaled_mm(x8, weight.w8.t(), scale_a=x_scale, scale_b=weight.scale[None, :], bias=bias,
                         out_dtype=torch.bfloat16)
    return y.reshape(*x.shape[:-1], n)

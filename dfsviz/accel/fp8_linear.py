"""The linear layers of the transformer blocks as FP8 matrix products (``DFSConfig.linear_precision``).

At 14B / 720p about 2.3 s of a 4.4 s cached Wan call are the bfloat16 projections and FFN, at
the card's bf16 matrix rate (docs/accel.md): the sparse attention cannot take those. Here each
``nn.Linear`` of the blocks gets an instance ``forward`` that runs
:func:`dfsviz.kernels.fp8_linear.fp8_linear` on an e4m3 copy of its weight made once, at apply.
The module, its parameters and its state dict are untouched; ``DFSHandle.remove()`` deletes the
instance ``forward`` again.
"""

from __future__ import annotations

import torch

from dfsviz.kernels._dispatch import check_fp8_capability, cuda_properties, resolve_backend
from dfsviz.kernels.fp8_linear import FP8_LINEAR_ALIGN, fp8_linear, quantize_weight_fp8

__all__ = ["MIN_ROWS", "check_fp8_linears", "fp8_linear_forward", "fp8_linears"]

#: Calls with fewer token rows keep the bfloat16 product: AdaLN modulation and pooled-text layers
#: (one row per sample) gain nothing from FP8 and would only take its rounding.
MIN_ROWS = 128


def fp8_linears(blocks: list[torch.nn.Module]) -> list[torch.nn.Module]:
    """The linear layers of ``blocks`` that FP8 serves: plain ``nn.Linear`` (not a subclass such as a
    LoRA or quantized layer) with K and N multiples of 16, whose ``forward`` is not already set on
    the instance (diffusers' or accelerate's hooks: offloading, block caches, which stay in charge)."""
    return [m for block in blocks for m in block.modules()
            if type(m) is torch.nn.Linear and "forward" not in vars(m)
            and m.in_features % FP8_LINEAR_ALIGN == 0 and m.out_features % FP8_LINEAR_ALIGN == 0]


def check_fp8_linears(linears: list[torch.nn.Module], backend: str | None) -> None:
    """Raise ValueError, before anything is installed, when the FP8 product cannot run these layers:
    weights that are not bfloat16, or a GPU without FP8 tensor cores (the 'ref' backend, and the CPU,
    simulate any dtype)."""
    for linear in linears:
        weight = linear.weight
        if resolve_backend(backend, weight) == "ref":
            continue
        if weight.dtype != torch.bfloat16:
            raise ValueError(
                f"linear_precision='fp8' multiplies in FP8 and writes bfloat16; this model's linear weights are "
                f"{weight.dtype}: cast it with .to(torch.bfloat16), or use linear_precision='native'"
            )
        if weight.is_cuda:
            check_fp8_capability(cuda_properties(weight.device), "linear_precision='fp8'", "linear_precision='native'")


def fp8_linear_forward(linear: torch.nn.Linear, backend: str | None):
    """The FP8 ``forward`` of ``linear`` (its weight quantized now): calls of at least
    :data:`MIN_ROWS` rows run :func:`~dfsviz.kernels.fp8_linear.fp8_linear`, shorter ones the stock
    product."""
    weight = quantize_weight_fp8(linear.weight, linear.bias)
    stock = linear.forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        if x.numel() < MIN_ROWS * linear.in_features:
            return stock(x)
        return fp8_linear(x, weight, backend=backend)

    return forward

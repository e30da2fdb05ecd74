"""Wan transformer blocks with fused AdaLN norms and gated residuals (``DFSConfig.fused_ops``).

diffusers' ``WanTransformerBlock.forward`` runs its modulated LayerNorms and gated residual
adds as chains of float32 element-wise passes over [B, N, C] (about 27 ms per block on an
H200 at Wan2.1-14B 720p, where a read and a write of each tensor take about 3 ms; see
``benchmarks/profile_wan_block.py``). :func:`fused_block_forward`
returns the same forward with those chains as single ``dfsviz.kernels.adaln`` passes; the
attention, cross-attention and FFN modules are called exactly as before, so the DFSAttn
processors, hooks and the permute-once bindings see the same calls. On the reference backend
(CPU runs) the result is bit-identical to the stock forward.
"""

from __future__ import annotations

import inspect

import torch

from dfsviz.kernels.adaln import gated_residual, modulated_layer_norm

__all__ = ["fused_block_forward"]

_PARAMETERS = ["hidden_states", "encoder_hidden_states", "temb", "rotary_emb"]


def _plain_layer_norm(norm, affine: bool) -> bool:
    """diffusers' FP32LayerNorm over the last dim, with (affine) or without an elementwise weight."""
    if type(norm).__name__ != "FP32LayerNorm" or len(norm.normalized_shape) != 1:
        return False
    return (norm.weight is not None) == affine and (norm.bias is not None) == affine


def fused_block_forward(block: torch.nn.Module, backend: str | None):
    """The fused forward for a diffusers ``WanTransformerBlock``, or None when ``block`` is
    not one whose structure this module knows (the caller then leaves it alone).

    Per-token modulation (Wan 2.2 TI2V, ``temb`` [B, N, 6, C]) runs the stock forward."""
    if type(block).__name__ != "WanTransformerBlock" or not hasattr(block, "scale_shift_table"):
        return None
    if list(inspect.signature(block.forward).parameters) != _PARAMETERS:
        return None
    cross_norm = block.norm2
    if not (_plain_layer_norm(block.norm1, False) and _plain_layer_norm(block.norm3, False)
            and (isinstance(cross_norm, torch.nn.Identity) or _plain_layer_norm(cross_norm, True))):
        return None
    stock = block.forward

    def forward(hidden_states, encoder_hidden_states, temb, rotary_emb):
        if temb.ndim == 4:
            return stock(hidden_states, encoder_hidden_states, temb, rotary_emb)
        shift, scale, gate, c_shift, c_scale, c_gate = (block.scale_shift_table + temb.float()).chunk(6, dim=1)
        x = hidden_states
        h = modulated_layer_norm(x, block.norm1.eps, scale=scale, shift=shift, backend=backend)
        x = gated_residual(x, block.attn1(h, None, None, rotary_emb), gate, backend=backend)
        if isinstance(cross_norm, torch.nn.Identity):
            h = x
        else:
            h = modulated_layer_norm(x, cross_norm.eps, weight=cross_norm.weight, bias=cross_norm.bias,
                                     backend=backend)
        x = x + block.attn2(h, encoder_hidden_states, None, None)
        h = modulated_layer_norm(x, block.norm3.eps, scale=c_scale, shift=c_shift, backend=backend)
        return gated_residual(x, block.ffn(h), c_gate, backend=backend)

    return forward

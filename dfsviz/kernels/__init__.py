"""Triton kernels: block-sparse attention, fused DFSAttn block scoring, streaming block
statistics, Wan's fused QK-RMSNorm + RoPE, Wan's fused adaLN norms and gated residuals, and
FP8 linear layers. Each public function has a PyTorch twin (in ``dfsviz.sparse``;
``qk_norm_rope_ref``, ``modulated_layer_norm_ref``, ``gated_residual_ref`` and ``fp8_linear_ref``
next to their kernels) with the same signature minus ``backend=``: Triton runs when the tensors
are on CUDA (or on CPU under TRITON_INTERPRET=1 when forced), the reference otherwise;
``backend="triton" | "ref"`` or the environment variable DFSVIZ_KERNEL_BACKEND override the choice."""

from dfsviz.kernels._dispatch import BACKENDS, ENV_VAR, resolve_backend
from dfsviz.kernels.adaln import gated_residual, modulated_layer_norm
from dfsviz.kernels.block_scores import block_scores
from dfsviz.kernels.block_sparse_attention import block_sparse_attention
from dfsviz.kernels.block_stats import block_stats
from dfsviz.kernels.fp8_linear import fp8_linear
from dfsviz.kernels.qk_norm_rope import qk_norm_rope

__all__ = ["BACKENDS", "ENV_VAR", "block_scores", "block_sparse_attention", "block_stats", "fp8_linear",
           "gated_residual", "modulated_layer_norm", "qk_norm_rope", "resolve_backend"]

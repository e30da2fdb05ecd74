"""Triton kernels: block-sparse attention, fused DFSAttn block scoring, streaming block
statistics and Wan's fused QK-RMSNorm + RoPE. Each public function has a PyTorch twin (in
``dfsviz.sparse``; ``qk_norm_rope_ref`` next to its kernel) with the same signature minus
``backend=``: Triton runs when the tensors are on CUDA (or on CPU under TRITON_INTERPRET=1
when forced), the reference otherwise; ``backend="triton" | "ref"``
or the environment variable DFSVIZ_KERNEL_BACKEND override the choice."""

from dfsviz.kernels._dispatch import BACKENDS, ENV_VAR, resolve_backend
from dfsviz.kernels.block_scores import block_scores
from dfsviz.kernels.block_sparse_attention import block_sparse_attention
from dfsviz.kernels.block_stats import block_stats
from dfsviz.kernels.qk_norm_rope import qk_norm_rope

__all__ = ["BACKENDS", "ENV_VAR", "block_scores", "block_sparse_attention", "block_stats", "qk_norm_rope",
           "resolve_backend"]

"""Pure-PyTorch sparse-attention core: grids, token orders, block masks, scoring,
selection, the DFSAttn schedule, block statistics and the recall bounds.

Imports without dash, diffusers or triton.
"""

from dfsviz.sparse.grid import LatentGrid

__all__ = ["LatentGrid"]

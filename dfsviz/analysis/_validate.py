"""Boundary checks shared by the analysis modules. Messages name the argument, the value,
what is allowed and how to fix it."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dfsviz.sparse._validate import check_block, check_block_map_shape, check_seq_len


def check_seq_block(seq_len: object, block: object) -> tuple[int, int]:
    """Validate N (>= 1) and the block size (power of two in [16, 256])."""
    return check_seq_len(seq_len), check_block(block)


def check_block_map(x: object, name: str, seq_len: int, block: int, *, nonneg: bool = False) -> torch.Tensor:
    """Check a per-block-pair map [B, H, Mq, Mk] (block mass m or block scores) for (N, block):
    its type, dtype and shape (``check_block_map_shape``), no NaN and (``nonneg``) no negative entry.

    Returns ``x`` unchanged. Raises TypeError for non-tensors, ValueError otherwise.
    """
    check_block_map_shape(x, name, seq_len, block)
    if bool(torch.isnan(x).any()):
        raise ValueError(f"`{name}` must not contain NaN (got at least one); check the captured q and k")
    if nonneg and bool((x < 0).any()):
        raise ValueError(
            f"`{name}` must be non-negative block mass (min {float(x.min()):.4g}); pass m from block_stats_ref"
        )
    return x


def check_steps(steps: object, count: int, what: str) -> tuple[int, ...]:
    """Strictly ascending non-negative step indices, one per entry of ``what``."""
    if isinstance(steps, (str, bytes)) or not isinstance(steps, Sequence):
        raise TypeError(f"`steps` must be a sequence of step indices (got {type(steps).__name__})")
    out = tuple(steps)
    if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in out):
        raise ValueError(f"`steps` must hold non-negative integers (got {list(out)})")
    if len(out) != count:
        raise ValueError(f"`steps` must have one entry per {what} ({count}) (got {len(out)})")
    if count == 0:
        raise ValueError(f"`steps` must not be empty; pass at least one step and its {what}")
    if any(b <= a for a, b in zip(out, out[1:])):
        raise ValueError(f"`steps` must be strictly ascending (got {list(out)}); sort the steps and their {what}")
    return out


def check_target(target: object) -> float:
    """A recall target in (0, 1]."""
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0.0 < float(target) <= 1.0:
        raise ValueError(f"`target` must be a recall level in (0, 1] (got {target!r}); e.g. 0.9 or 0.95")
    return float(target)

"""Boundary checks shared by the sparse core. Messages name the argument, the value,
what is allowed and how to fix it."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_power_of_two(value: object, name: str, low: int, high: int) -> int:
    """Return ``value`` if it is a power of two in [low, high], else raise ValueError."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low or value > high or value & (value - 1):
        raise ValueError(f"`{name}` must be a power of two in [{low}, {high}] (got {value!r})")
    return value


def resolve_scale(scale: object, head_dim: int) -> float:
    """The softmax scale: ``scale`` if given (a positive finite number), else ``head_dim ** -0.5``."""
    if scale is None:
        return head_dim**-0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"`scale` must be a positive finite number or None for D ** -0.5 (got {scale!r})")
    return float(scale)


def check_fraction(value: object, name: str) -> float:
    """Return ``value`` as a float if it lies in (0, 1], else raise ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) <= 1.0:
        raise ValueError(f"`{name}` must be a fraction in (0, 1] (got {value!r}); 0.2 keeps a fifth")
    return float(value)


def check_bhnd(x: object, name: str) -> torch.Tensor:
    """Check one [B, H, N, D] floating-point tensor."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor of shape [B, H, N, D] (got {type(x).__name__})")
    if x.dim() != 4:
        raise ValueError(
            f"`{name}` must have shape [B, H, N, D] (got {tuple(x.shape)}); "
            "diffusers gives [B, N, H, D]: use .transpose(1, 2)"
        )
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"`{name}` must be float16, bfloat16, float32 or float64 (got {x.dtype})")
    if x.shape[2] < 1:
        raise ValueError(f"`{name}` must hold at least one token (got N = {x.shape[2]})")
    return x


def check_qk(q: object, k: object) -> None:
    """Check a query/key pair: both [B, H, N, D], same shape, dtype and device."""
    check_bhnd(q, "q")
    check_bhnd(k, "k")
    if q.shape != k.shape:
        raise ValueError(
            f"`q` and `k` must have the same shape [B, H, N, D] (got {tuple(q.shape)} and {tuple(k.shape)});"
            " self-attention only"
        )
    if q.dtype != k.dtype:
        raise ValueError(f"`q` and `k` must share a dtype (got {q.dtype} and {k.dtype}); cast one of them")
    if q.device != k.device:
        raise ValueError(f"`q` and `k` must be on one device (got {q.device} and {k.device}); move one of them")


def num_blocks(n: int, block: int) -> int:
    """Blocks of ``block`` tokens covering ``n`` tokens; the last may be short."""
    return -(-n // block)


def block_sizes(n: int, block: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Token count of each block, int64 [ceil(n / block)]; every block holds ``block`` but the last."""
    starts = torch.arange(num_blocks(n, block), dtype=torch.int64, device=device) * block
    # Made on the device: a host list copied to a GPU would wait for the stream (pageable copy).
    return (n - starts).clamp_(max=block)


def block_flags(value: object, name: str, m: int, device: torch.device) -> torch.Tensor:
    """bool [m] flags of blocks given as None (no block), a bool tensor [m], or a sequence /
    1-D integer tensor of block indices (the ``forced_kv`` / ``dense_q`` arguments of the
    selectors and of ``dfsviz.analysis``), on ``device``."""
    out = torch.zeros(m, dtype=torch.bool, device=device)
    if value is None:
        return out
    if isinstance(value, torch.Tensor) and value.dtype == torch.bool:
        if value.shape != (m,):
            raise ValueError(f"`{name}` as a bool tensor must have shape [{m}] (got {tuple(value.shape)})")
        return value.to(device)
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() or value.dim() != 1:
            raise ValueError(
                f"`{name}` must be a bool [{m}] tensor or 1-D integer block indices "
                f"(got {value.dtype}, shape {tuple(value.shape)})"
            )
        idx = [int(i) for i in value.tolist()]
    elif isinstance(value, Sequence) and not isinstance(value, str):
        idx = list(value)
        if any(isinstance(i, bool) or not isinstance(i, int) for i in idx):
            raise ValueError(f"`{name}` must hold integer block indices (got {value!r})")
    else:
        raise TypeError(
            f"`{name}` must be None, a bool [{m}] tensor or a list of block indices "
            f"(got {type(value).__name__})"
        )
    bad = [i for i in idx if not 0 <= i < m]
    if bad:
        raise ValueError(f"`{name}` indices must lie in [0, {m}) (got {bad[:5]}); they are block, not token, indices")
    if idx:
        out[torch.tensor(idx, dtype=torch.long, device=device)] = True
    return out

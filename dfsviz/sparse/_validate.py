"""Boundary checks shared by the sparse core. Messages name the argument, the value,
what is allowed and how to fix it."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

#: Tokens per block: a power of two in [BLOCK_MIN, BLOCK_MAX].
BLOCK_MIN, BLOCK_MAX = 16, 256


def check_power_of_two(value: object, name: str, low: int, high: int) -> int:
    """Return ``value`` if it is a power of two in [low, high], else raise ValueError."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low or value > high or value & (value - 1):
        raise ValueError(f"`{name}` must be a power of two in [{low}, {high}] (got {value!r})")
    return value


def check_block(block: object) -> int:
    """Return ``block`` if it is a block size, a power of two in [16, 256], else raise ValueError."""
    try:
        return check_power_of_two(block, "block", BLOCK_MIN, BLOCK_MAX)
    except ValueError as err:
        raise ValueError(f"{err}; DFSAttn uses 128") from None


def check_int(value: object, name: str, low: int, hint: str = "", high: int | None = None) -> int:
    """Return ``value`` if it is an integer in [``low``, ``high``] (a bool is not; no ``high``:
    no upper bound), else raise ValueError ending in ``hint`` (what the value means, e.g.
    "dense warm-up steps, e.g. 12")."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        allowed = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
        shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
        raise ValueError(f"`{name}` must be {allowed} (got {shown})" + (f"; {hint}" if hint else ""))
    return value


def check_seq_len(seq_len: object) -> int:
    """Return ``seq_len`` if it is a token count N >= 1, else raise ValueError."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(
            f"`seq_len` must be a positive integer, the number of tokens N (got {seq_len!r}); pass q.shape[2]"
        )
    return seq_len


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the references compute in: float64 for float64 inputs, float32 for the others."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def check_block_map_shape(x: object, name: str, seq_len: object, block: object) -> torch.Tensor:
    """Check the type, dtype and shape of a per-block-pair map [B, H, Mq, Mk] (block mass m or
    block scores) for (N, block), and those two; not its values (no host read). Returns ``x``."""
    seq_len, block = check_seq_len(seq_len), check_block(block)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor of shape [B, H, Mq, Mk] (got {type(x).__name__})")
    if not x.is_floating_point():
        raise ValueError(f"`{name}` must be a floating-point tensor (got {x.dtype})")
    m = num_blocks(seq_len, block)
    if x.dim() != 4 or x.shape[2] != m or x.shape[3] != m or x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(
            f"`{name}` must have shape [B, H, {m}, {m}] for seq_len={seq_len}, block={block} "
            f"(got {tuple(x.shape)}); compute it with the same block size"
        )
    return x


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


#: How to mend non-finite attention inputs; shared by every function that takes Q/K (or V).
NON_FINITE_QKV_FIX = (
    "attention of non-finite inputs is undefined; find where the NaN/inf first appears upstream "
    "(a float16 overflow is common: run the model in bfloat16 or float32)"
)


def first_true_index(flags: torch.Tensor) -> list[int]:
    """Index of the first True of a bool tensor, in row-major order (for error messages; an
    argmax, so no list of every True entry is built)."""
    flat = int(flags.reshape(-1).to(torch.uint8).argmax())
    return [int(i) for i in torch.unravel_index(torch.tensor(flat), flags.shape)]


def check_finite(x: torch.Tensor, name: str, fix: str, *, allow_neg_inf: bool = False) -> None:
    """Raise ValueError if ``x`` holds NaN or +-inf (NaN or +inf when ``allow_neg_inf``), naming
    how many entries are bad, the first one's index and value, and ``fix``.

    One reduction over ``x`` on the happy path; counting and locating run only on failure. On
    a CUDA tensor the test reads one value back (a host sync): keep it off per-layer hot paths.
    """
    # The sum is NaN or inf whenever an entry is, and it reads x once without writing a bool
    # tensor (7-50x cheaper than isfinite().all() on the CPU). Only a sum that overflowed on
    # finite entries, or allowed -inf entries, fall through to the exact elementwise test.
    if bool(torch.isfinite(x.sum(dtype=torch.float64 if x.dtype == torch.float64 else torch.float32))):
        return
    ok = x < math.inf if allow_neg_inf else torch.isfinite(x)
    if bool(ok.all()):
        return
    bad = ~ok
    count = int(bad.sum())
    where = first_true_index(bad)
    plural = "" if count == 1 else "s"
    what = f"NaN or +inf value{plural}" if allow_neg_inf else f"non-finite value{plural} (NaN/inf)"
    raise ValueError(f"`{name}` has {count} {what}, first at {where} ({float(x[tuple(where)])}); {fix}")


def check_bhnd(x: object, name: str) -> torch.Tensor:
    """Check one [B, H, N, D] floating-point tensor's type, shape and dtype (not its values:
    :func:`check_finite` reads them)."""
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
    if min(x.shape[0], x.shape[1], x.shape[3]) < 1:
        raise ValueError(
            f"`{name}` must have at least one batch element, head and channel: [B, H, N, D] with B, H, D >= 1 "
            f"(got {tuple(x.shape)}); pass the attention's real q, k, v"
        )
    return x


def check_qk(q: object, k: object, *, values: bool = True) -> None:
    """Check a query/key pair: both [B, H, N, D] with B, H, N, D >= 1, same shape, dtype and
    device, and (``values``) finite. The Triton launchers pass ``values=False``: reading the
    values back would sync the host on every call."""
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
    if values:
        check_finite(q, "q", NON_FINITE_QKV_FIX)
        check_finite(k, "k", NON_FINITE_QKV_FIX)


# Largest |row sum - 1| accepted for block mass. A valid float32 m is within ~1e-6 of 1; a mass
# stored in float16 moves each entry by at most 2^-11 of itself (so the row sum by <= 2^-11,
# ~4.9e-4, plus subnormal steps of 2^-25 per block), bfloat16 by 2^-8 (~3.9e-3). 1e-2 accepts
# both with room and still refuses what is not a mass: scores (dfs_tile rows sum to
# block / tile), masses not divided by |U_u|, or rows missing blocks.
MASS_ROW_SUM_TOLERANCE = 1e-2

_MASS_FIX = (
    "pass m of block_stats_ref (BlockStats.m) or of a capture, not block scores; each row is the "
    "distribution of one query block's attention over the key blocks"
)


def check_block_mass(m: torch.Tensor, name: str = "m") -> None:
    """Raise ValueError unless block mass ``m`` [..., Mk] is finite, non-negative, and every
    row (last axis) sums to 1 within :data:`MASS_ROW_SUM_TOLERANCE`.

    Three reductions and one host read on the happy path (amin and amax propagate NaN, +inf
    makes its row sum inf); the diagnosis of what is wrong runs only on failure.
    """
    if m.numel() == 0:
        return
    sums = m.sum(dim=-1, dtype=torch.float64)
    if bool((m.amin() >= 0) & ((sums - 1).abs().amax() <= MASS_ROW_SUM_TOLERANCE)):
        return
    check_finite(m, name, _MASS_FIX)
    negative = m < 0
    if bool(negative.any()):
        where = first_true_index(negative)
        raise ValueError(
            f"`{name}` must be non-negative block mass (got {float(m[tuple(where)]):.4g} at {where}); {_MASS_FIX}"
        )
    off = (sums - 1).abs() > MASS_ROW_SUM_TOLERANCE
    where = first_true_index(off)
    raise ValueError(
        f"`{name}` rows must each sum to 1 within {MASS_ROW_SUM_TOLERANCE} (row {where} sums to "
        f"{float(sums[tuple(where)]):.4g}); {_MASS_FIX}"
    )


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

"""Kernel backend choice: the Triton kernel or its PyTorch reference twin.

Default: Triton when every tensor is on a CUDA device and Triton imports, else the
reference. ``backend="triton" | "ref"`` forces one; the environment variable
``DFSVIZ_KERNEL_BACKEND`` (same values) replaces the default for calls that pass
``backend=None``. With ``TRITON_INTERPRET=1`` set before dfsviz.kernels is imported,
Triton's interpreter runs the real kernels on CPU tensors (that is how CI tests them),
so ``"triton"`` is accepted for CPU tensors then.
"""

from __future__ import annotations

import functools
import logging
import os

import torch

from dfsviz.sparse._validate import check_block, check_qk, resolve_scale

logger = logging.getLogger(__name__)

__all__ = ["BACKENDS", "ENV_VAR", "HEAD_DIMS", "KERNEL_DTYPES", "check_kernel_dtype", "check_kernel_input",
           "FP8_CAPABILITY", "PRECISIONS", "check_fp8_capability", "check_precision", "cuda_properties", "interpreting",
           "kernel_qk", "resolve_backend", "triton_available", "unit_stride_d"]

#: Registry of kernel backends: name -> what runs.
BACKENDS = {
    "triton": "the Triton kernel (CUDA, or CPU under TRITON_INTERPRET=1)",
    "ref": "the PyTorch reference from dfsviz.sparse (any device)",
}
ENV_VAR = "DFSVIZ_KERNEL_BACKEND"
#: Registry of attention precisions: name -> what runs in it.
PRECISIONS = {
    "native": "Q . K^T and P . V in the inputs' dtype, float32 accumulation",
    "fp8": "Q and smoothed K in float8 e4m3 with one power-of-two scale per block (GPUs of compute "
           "capability >= 8.9; the 'ref' backend simulates it anywhere), P . V in the inputs' dtype",
    "fp8_pv": "as 'fp8', and P . V in float8 e4m3 too: V with one power-of-two scale per channel, P scaled by 2^8",
}
#: Compute capability from which GPUs multiply float8 e4m3 matrices (Ada, Hopper and later).
FP8_CAPABILITY = (8, 9)
#: Head dims and dtypes the Triton kernels are built for; the references take any.
HEAD_DIMS = (64, 128)
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Triton reads TRITON_INTERPRET when a @triton.jit function is decorated, i.e. when the
# dispatchers first import a dfsviz.kernels._jit module, so read it once, at import, here too.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreting() -> bool:
    """True when the kernels were built for Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return _INTERPRET


@functools.cache
def triton_available() -> bool:
    """True when Triton imports (the kernels' compiler or interpreter)."""
    try:
        import triton  # noqa: F401
    except Exception as exc:  # an ImportError, or a broken install raising at import
        logger.info("Triton unavailable, kernels fall back to the PyTorch reference: %s", exc)
        return False
    return True


@functools.cache
def cuda_properties(device: torch.device):
    """``torch.cuda.get_device_properties(device)``, read once per device (the kernels' launch choices)."""
    return torch.cuda.get_device_properties(device)


def _check_name(backend: object, source: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(
            f"{source} must be one of {sorted(BACKENDS)} or None for automatic (got {backend!r}); "
            "'triton' runs the kernel, 'ref' the PyTorch reference"
        )
    return backend  # type: ignore[return-value]


def resolve_backend(backend: object, *tensors: torch.Tensor) -> str:
    """Pick "triton" or "ref" for a call on ``tensors``; raise ValueError if the forced one cannot run."""
    if backend is None:
        env = os.environ.get(ENV_VAR, "").strip()
        if env:
            backend = _check_name(env, f"environment variable {ENV_VAR}")
    else:
        backend = _check_name(backend, "`backend`")
    on_cuda = all(t.is_cuda for t in tensors)
    runnable = triton_available() and (on_cuda or (_INTERPRET and not any(t.is_cuda for t in tensors)))
    if backend is None:
        return "triton" if on_cuda and runnable else "ref"
    if backend == "triton" and not runnable:
        devices = sorted({str(t.device) for t in tensors})
        raise ValueError(
            f"backend 'triton' cannot run on tensors on {devices}: Triton needs CUDA tensors "
            "(or TRITON_INTERPRET=1 set before importing dfsviz.kernels, for CPU tensors) and an "
            "importable triton; move the tensors with .cuda() or use backend='ref'"
        )
    return backend


def check_kernel_dtype(x: torch.Tensor, name: str) -> None:
    """Raise ValueError unless tensor ``name`` has a dtype the Triton kernels take."""
    if x.dtype not in KERNEL_DTYPES:
        raise ValueError(
            f"`{name}` dtype must be float16, bfloat16 or float32 for the Triton kernel (got {x.dtype}); "
            "cast with .to(torch.bfloat16) or use backend='ref'"
        )


def check_kernel_input(q: torch.Tensor) -> None:
    """Raise ValueError unless ``q`` [B, H, N, D] has a head dim and dtype the Triton kernels take."""
    d = q.shape[-1]
    if d not in HEAD_DIMS:
        raise ValueError(
            f"`q` head dim D must be one of {HEAD_DIMS} for the Triton kernel (got {d}); "
            "use backend='ref' for other head dims"
        )
    check_kernel_dtype(q, "q")


def unit_stride_d(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself if its last axis has unit stride (the kernels need that; any other strides
    are fine), else a contiguous copy."""
    return x if x.stride(-1) == 1 else x.contiguous()


def kernel_qk(q: object, k: object, block: object, scale: object) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The launcher preamble of ``block_scores`` and ``block_stats``: validate a query/key pair
    once for the Triton kernels (shapes, dtype, head dim, block; not values, which would sync
    the host) and return (q, k with unit stride along D, the resolved softmax scale)."""
    check_qk(q, k, values=False)
    check_block(block)
    check_kernel_input(q)
    return unit_stride_d(q), unit_stride_d(k), resolve_scale(scale, q.shape[-1])


def check_precision(precision: object) -> str:
    """Return ``precision`` if it names an entry of :data:`PRECISIONS`, else raise ValueError."""
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ValueError(
            f"`precision` must be one of {sorted(PRECISIONS)} (got {precision!r}); 'native' computes in the "
            "inputs' dtype, 'fp8' quantizes Q and K to float8 e4m3, 'fp8_pv' P and V too"
        )
    return precision


def check_fp8_capability(props, option: str = "precision='fp8' (and 'fp8_pv')",
                         native: str = "precision='native'") -> None:
    """Raise ValueError unless a GPU with these ``torch.cuda.get_device_properties`` multiplies
    float8 e4m3 matrices (compute capability >= 8.9); the message names the ``option`` that asked
    for FP8 and its ``native`` alternative."""
    if (props.major, props.minor) < FP8_CAPABILITY:
        raise ValueError(
            f"{option} needs a GPU with FP8 tensor cores, compute capability >= "
            f"{FP8_CAPABILITY[0]}.{FP8_CAPABILITY[1]} (Ada, Hopper or later); {props.name} has "
            f"{props.major}.{props.minor}: use {native}, or backend='ref' to simulate FP8"
        )

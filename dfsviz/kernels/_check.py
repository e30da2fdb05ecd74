"""Accuracy rule shared by the kernel tests and ``benchmarks/check_gpu.py`` (the house rule for kernel tests).

A kernel passes when its largest error against a float64 golden result is at most
``factor`` times the largest error of the PyTorch reference run in the test dtype
(the precision the kernel is asked to reproduce), plus a small absolute floor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["GoldenCheck", "compare_to_golden", "rotated_pair_steps"]


@dataclass(frozen=True)
class GoldenCheck:
    """Outcome of one comparison: errors are max |x - golden| over finite golden entries."""

    name: str
    kernel_err: float
    ref_err: float
    bound: float
    where: tuple[int, ...]
    nan_mismatch: int

    @property
    def ok(self) -> bool:
        return self.nan_mismatch == 0 and self.kernel_err <= self.bound

    def __str__(self) -> str:
        verdict = "ok" if self.ok else "FAIL"
        return (
            f"{self.name}: kernel err {self.kernel_err:.3e} at {self.where}, reference err {self.ref_err:.3e}, "
            f"bound {self.bound:.3e}, NaN/inf mismatches {self.nan_mismatch} -> {verdict}"
        )


def compare_to_golden(
    name: str,
    kernel: torch.Tensor,
    ref: torch.Tensor,
    golden: torch.Tensor,
    factor: float = 2.0,
    floor: float = 1e-5,
) -> GoldenCheck:
    """Compare ``kernel`` and ``ref`` (test dtype) with ``golden`` (float64), same shape.

    Non-finite golden entries (e.g. -inf LSE of empty rows) must be matched exactly by
    the kernel; they are left out of the error maxima.
    """
    if kernel.shape != golden.shape or ref.shape != golden.shape:
        raise ValueError(
            f"`kernel`, `ref` and `golden` must share a shape (got {tuple(kernel.shape)}, {tuple(ref.shape)}, "
            f"{tuple(golden.shape)})"
        )
    g = golden.detach().double().cpu()
    kk = kernel.detach().double().cpu()
    rr = ref.detach().double().cpu()
    finite = torch.isfinite(g)
    same_special = torch.where(finite, torch.isfinite(kk), (kk == g) | (torch.isnan(kk) & torch.isnan(g)))
    nan_mismatch = int((~same_special).sum())
    zero = torch.zeros((), dtype=torch.float64)
    k_err = torch.where(finite, (kk - g).abs().nan_to_num(float("inf")), zero)
    r_err = torch.where(finite, (rr - g).abs().nan_to_num(float("inf")), zero)
    kernel_err = float(k_err.max()) if k_err.numel() else 0.0
    ref_err = float(r_err.max()) if r_err.numel() else 0.0
    where = tuple(int(i) for i in torch.unravel_index(k_err.argmax(), k_err.shape)) if k_err.numel() else ()
    return GoldenCheck(name, kernel_err, ref_err, factor * ref_err + floor, where, nan_mismatch)


def rotated_pair_steps(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest |out - ref| in units of eps(dtype) x |pair| for outputs of a rotation of
    (even, odd) channel pairs (RoPE), |pair| = the pair's norm in ``ref`` (a rotation keeps it).

    Rounding an input pair to the dtype (one step, <= eps |pair| per channel) and rounding
    the output (<= eps |pair|) move an output by at most 2 such units, so a kernel within
    one rounding step of the reference scores <= 2; a zero pair must match exactly.
    """
    eps = torch.finfo(ref.dtype).eps
    r = ref.detach().double().cpu()
    diff = (out.detach().double().cpu() - r).abs()
    pair = r.unflatten(-1, (-1, 2)).norm(dim=-1).repeat_interleave(2, dim=-1)
    units = torch.where(pair > 0, diff / (eps * pair), torch.where(diff > 0, float("inf"), 0.0))
    return float(units.nan_to_num(float("inf")).max()) if units.numel() else 0.0

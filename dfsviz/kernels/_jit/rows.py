"""Pieces shared by the row-wise kernels (``qk_norm_rope``, ``adaln``): which token rows a
program owns (flat over B * N, or in row blocks of one batch element), the interpreter-safe
rounding, and the launch shape."""

from __future__ import annotations

import triton
import triton.language as tl

from dfsviz.kernels._dispatch import interpreting

__all__ = ["rounded", "row_block", "row_launch_shape", "token_rows"]


@triton.jit
def token_rows(ROWS, N, BLOCK_R: tl.constexpr):
    """This program's BLOCK_R rows of the B * N token rows: (row index, in range, batch, token);
    out-of-range rows are clamped to row 0 (loads stay in bounds; stores use the mask)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < ROWS
    rows = tl.where(row_ok, rows, 0).to(tl.int64)
    return rows, row_ok, rows // N, rows % N


@triton.jit
def row_block(i, N, BLOCK_R: tl.constexpr, ROW_BLOCKS: tl.constexpr):
    """Row block ``i`` of the ROW_BLOCKS this program walks over one batch element's N token
    rows: (token index, in range); out-of-range rows are clamped to row 0 (loads stay in
    bounds; stores use the mask)."""
    t = (tl.program_id(0) * ROW_BLOCKS + i) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = t < N
    return tl.where(row_ok, t, 0).to(tl.int64), row_ok


@triton.jit
def rounded(v, DTYPE: tl.constexpr, RTNE_BF16: tl.constexpr):
    """v (float32) rounded to DTYPE, as float32. The interpreter's float32 -> bfloat16 cast
    truncates, so there (RTNE_BF16) bfloat16 rounds to nearest even on the bits instead."""
    if RTNE_BF16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return tl.where(v != v, v, bits.to(tl.float32, bitcast=True))
    else:
        return v.to(DTYPE).to(tl.float32)


def row_launch_shape(rows: int, width: int, per_program: int, per_warp: int) -> tuple[int, int]:
    """(rows per program, warps) of the row-wise kernels: whole rows of ``width`` elements, several
    short rows to a program up to about ``per_program`` elements, one warp per ``per_warp``
    elements (at most 16; one in the interpreter)."""
    fit = max(1, per_program // width)
    block_r = min(1 << (fit.bit_length() - 1), triton.next_power_of_2(rows))  # a power of two (tl.arange)
    warps = 1 if interpreting() else max(1, min(16, block_r * width // per_warp))
    return block_r, warps

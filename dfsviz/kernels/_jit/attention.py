"""Block-sparse attention forward: the Triton kernels and their launcher (the public function,
its validation and the module's description are in ``dfsviz.kernels.block_sparse_attention``)."""

from __future__ import annotations

import functools
import importlib
import logging
import re
import weakref

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from dfsviz.kernels._dispatch import cuda_properties, interpreting
from dfsviz.kernels._jit.fp8 import p_e4m3, quantize_attention_fp8_fwd
from dfsviz.kernels.fp8 import P_SCALE
from dfsviz.sparse.masks import BlockMask

logger = logging.getLogger(__name__)

__all__ = ["ATTENTION_CONFIGS", "DESC_FLAGS", "attention_config_fits", "block_sparse_attention_fp8_fwd",
           "block_sparse_attention_fwd", "desc_kernel_args", "gather_kv", "head_order", "kernel_meta"]

_LOG2E = 1.4426950408889634
# a global read inside a compiled kernel must be a constexpr (the interpreter reads any global)
_P_SCALE = tl.constexpr(P_SCALE)


@triton.jit
def _softmax_step(acc, l_i, m_i, q, k, v, qk_scale, col_ok,
                  MASKED: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, P_FP8: tl.constexpr):
    """One BLOCK_N slice of keys k, v [BLOCK_N, D]: logits, online-softmax update, P @ V accumulation.

    P_FP8 (v in e4m3): the running max is rounded up to an integer (log2 domain), so rescaling
    is by exact powers of two, and P_SCALE * P is formed in e4m3 (p_e4m3, dfsviz.kernels.fp8)."""
    # The interpreter's bf16 dot is wrong: it runs fp32 operands instead (exact for bf16/fp16 values).
    if UPCAST:
        qk = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision=DOT_PRECISION)
    else:
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    if MASKED:
        qk = tl.where(col_ok[None, :], qk, float("-inf"))
    # Scale and log2(e) are folded into one multiply so the softmax uses exp2.
    if P_FP8:
        m_new = tl.maximum(m_i, tl.math.ceil(tl.max(qk, 1) * qk_scale))
        p = p_e4m3(qk * qk_scale - m_new[:, None])  # P_SCALE * P, e4m3 values
        row_sum = tl.sum(p, 1) * (1.0 / _P_SCALE)
    else:
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_new[:, None])
        row_sum = tl.sum(p, 1)
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + row_sum
    acc = acc * alpha[:, None]
    if UPCAST:
        acc = tl.dot(p, v.to(tl.float32), acc, input_precision=DOT_PRECISION)
    elif P_FP8:  # exact: p holds e4m3 values
        acc = tl.dot(p.to(v.dtype), v, acc)
    else:
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _attention_step(
    acc, l_i, m_i, q, k_base, v_base, perm_ptr, offs_n, offs_d, stride_kn, stride_vn, stride_vd, N, qk_scale,
    HAS_ORDER: tl.constexpr, FP8: tl.constexpr, FP8_PV: tl.constexpr, MASKED: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One BLOCK_N slice of keys loaded through pointers: v (and k) gathered through ``perm``
    with an order, unless already ordered (FP8's k, FP8_PV's v)."""
    col_ok = offs_n < N
    if HAS_ORDER:
        if MASKED:
            rows_n = tl.load(perm_ptr + offs_n, mask=col_ok, other=0)
        else:
            rows_n = tl.load(perm_ptr + offs_n)
    else:
        rows_n = offs_n
    if FP8:
        k_ptrs = k_base + offs_n[:, None] * stride_kn + offs_d[None, :]
    else:
        k_ptrs = k_base + rows_n[:, None] * stride_kn + offs_d[None, :]
    if FP8_PV:
        v_ptrs = v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
    else:
        v_ptrs = v_base + rows_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
    if MASKED:
        k = tl.load(k_ptrs, mask=col_ok[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=col_ok[:, None], other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    return _softmax_step(acc, l_i, m_i, q, k, v, qk_scale, col_ok, MASKED, UPCAST, DOT_PRECISION, FP8_PV)


@triton.jit
def _block_scaled(scale, SCALES, pid_bh, blk, NUM_BLOCKS, FP8: tl.constexpr):
    """``scale`` times block ``blk``'s FP8 scale (SCALES [B * H, NUM_BLOCKS]): the softmax scale
    of query block u's rows times Q_SCALE[u], then of their logits against key block v times
    K_SCALE[v]; unchanged without FP8."""
    if FP8:
        scale = scale * tl.load(SCALES + pid_bh.to(tl.int64) * NUM_BLOCKS + blk)
    return scale


@triton.jit
def _normalized(acc, l_i, num_kv, V_SCALE, pid_bh, HEAD_DIM: tl.constexpr, FP8_PV: tl.constexpr):
    """The output rows acc / l. A query block with no kept key block has l = 0 and acc = 0: divide
    by 1 to output 0; a NaN row keeps l = NaN and stays NaN, as dense attention would. FP8_PV:
    acc holds P_SCALE * P . (V / channel scales), undone here."""
    l_safe = tl.where(num_kv > 0, l_i, 1.0)
    if FP8_PV:
        l_safe = l_safe * _P_SCALE
        acc = acc * tl.load(V_SCALE + pid_bh.to(tl.int64) * HEAD_DIM + tl.arange(0, HEAD_DIM))[None, :]
    return acc / l_safe[:, None]


@triton.jit
def _store_rows(O, out, b, h, rows_m, row_ok, stride_ob, stride_oh, stride_on, HEAD_DIM: tl.constexpr):
    """Store out [BLOCK_M, D] at rows ``rows_m`` (original positions) of (b, h) through pointers."""
    o_base = O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    offs_d = tl.arange(0, HEAD_DIM)
    tl.store(o_base + rows_m[:, None] * stride_on + offs_d[None, :], out.to(O.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _store_lse(LSE, m_i, l_i, pid_bh, rows_m, row_ok, N):
    """Store the rows' natural-log LSE at rows ``rows_m`` (original positions) of LSE [B * H, N]."""
    lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453  # log2 domain back to natural log
    tl.store(LSE + pid_bh.to(tl.int64) * N + rows_m, lse, mask=row_ok)


@triton.jit
def _kept_blocks(KV_NUM, KV_IDX, pid_bh, u, NUM_Q_BLOCKS, NUM_KV_BLOCKS, EVEN_N: tl.constexpr):
    """Query block u's kept key blocks: (count, pointer to their ascending indices, count of
    full blocks). Kept blocks ascend, so the one short block (the last, Mk - 1) can only be
    the last entry: every other block runs without load masks or -inf fills."""
    mask_row = pid_bh.to(tl.int64) * NUM_Q_BLOCKS + u
    num_kv = tl.load(KV_NUM + mask_row)
    idx_ptr = KV_IDX + mask_row * NUM_KV_BLOCKS
    n_full = num_kv
    if not EVEN_N:
        last = tl.load(idx_ptr + tl.maximum(num_kv - 1, 0))
        n_full = tl.where((num_kv > 0) & (last == NUM_KV_BLOCKS - 1), num_kv - 1, num_kv)
    return num_kv, idx_ptr, n_full


@triton.jit
def _block_sparse_attention_kernel(
    Q, K, V, O, LSE, KV_NUM, KV_IDX, PERM, BH_ORDER, Q_SCALE, K_SCALE, V_SCALE,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on,
    H, N, NUM_Q_BLOCKS, NUM_KV_BLOCKS, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_ORDER: tl.constexpr, RETURN_LSE: tl.constexpr, EVEN_N: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, FP8: tl.constexpr, FP8_PV: tl.constexpr,
):
    """Pointer kernel. FP8 (dfsviz.kernels.fp8): q and k are e4m3 copies already in the ordered
    sequence with one power-of-two scale per block (Q_SCALE [B, H, Mq], K_SCALE [B, H, Mk]);
    the logits are their product (float32 accumulation) times both blocks' scales, folded into
    the softmax scale. v, out and LSE stay in the original order (through ``perm``), except
    with FP8_PV: v is an ordered e4m3 copy (any strides) with one power-of-two scale per
    channel (V_SCALE [B, H, D]), applied with 1 / P_SCALE to the accumulator at the end."""
    pid_m = tl.program_id(0)
    pid_bh = tl.load(BH_ORDER + tl.program_id(1))  # heads with the most kept blocks run first
    b = pid_bh // H
    h = pid_bh % H
    u = (pid_m * BLOCK_M) // BLOCK  # the mask's query block holding these rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # positions in the ordered sequence
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < N
    if HAS_ORDER:
        rows_m = tl.load(PERM + offs_m, mask=row_ok, other=0)  # original rows of these positions
    else:
        rows_m = offs_m
    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    k_base = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    if FP8:
        q = tl.load(q_base + offs_m[:, None] * stride_qn + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    else:
        q = tl.load(q_base + rows_m[:, None] * stride_qn + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    row_scale = _block_scaled(qk_scale, Q_SCALE, pid_bh, u, NUM_Q_BLOCKS, FP8)

    num_kv, idx_ptr, n_full = _kept_blocks(KV_NUM, KV_IDX, pid_bh, u, NUM_Q_BLOCKS, NUM_KV_BLOCKS, EVEN_N)
    CHUNKS: tl.constexpr = BLOCK // BLOCK_N

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for it in range(0, n_full * CHUNKS):
        kv_block = tl.load(idx_ptr + it // CHUNKS)
        offs_n = kv_block * BLOCK + (it % CHUNKS) * BLOCK_N + tl.arange(0, BLOCK_N)
        step_scale = _block_scaled(row_scale, K_SCALE, pid_bh, kv_block, NUM_KV_BLOCKS, FP8)
        acc, l_i, m_i = _attention_step(
            acc, l_i, m_i, q, k_base, v_base, PERM, offs_n, offs_d, stride_kn, stride_vn, stride_vd, N, step_scale,
            HAS_ORDER, FP8, FP8_PV, False, UPCAST, DOT_PRECISION,
        )
    if not EVEN_N:
        if n_full < num_kv:
            tail_start = (NUM_KV_BLOCKS - 1) * BLOCK
            step_scale = _block_scaled(row_scale, K_SCALE, pid_bh, NUM_KV_BLOCKS - 1, NUM_KV_BLOCKS, FP8)
            # Only slices that start before N hold a real key; the first always does.
            for c in range(0, tl.cdiv(N - tail_start, BLOCK_N)):
                offs_n = tail_start + c * BLOCK_N + tl.arange(0, BLOCK_N)
                acc, l_i, m_i = _attention_step(
                    acc, l_i, m_i, q, k_base, v_base, PERM, offs_n, offs_d, stride_kn, stride_vn, stride_vd, N,
                    step_scale, HAS_ORDER, FP8, FP8_PV, True, UPCAST, DOT_PRECISION,
                )

    out = _normalized(acc, l_i, num_kv, V_SCALE, pid_bh, HEAD_DIM, FP8_PV)
    _store_rows(O, out, b, h, rows_m, row_ok, stride_ob, stride_oh, stride_on, HEAD_DIM)
    if RETURN_LSE:
        _store_lse(LSE, m_i, l_i, pid_bh, rows_m, row_ok, N)


@triton.jit
def _desc_kv(desc_k, desc_v, b, h, start, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, FP8_PV: tl.constexpr):
    """The key and value tiles [BLOCK_N, D] of keys [start, start + BLOCK_N) (zeros past N).
    FP8_PV's v is stored transposed: its descriptor moves [D, BLOCK_N] tiles, stride 1 along
    the keys as Hopper's FP8 matrix instructions take P . V's second operand, and the
    transpose back is a view."""
    k = desc_k.load([b, h, start, 0]).reshape(BLOCK_N, HEAD_DIM)
    if FP8_PV:
        v = tl.trans(desc_v.load([b, h, 0, start]).reshape(HEAD_DIM, BLOCK_N))
    else:
        v = desc_v.load([b, h, start, 0]).reshape(BLOCK_N, HEAD_DIM)
    return k, v


@triton.jit
def _desc_tile(
    desc_q, desc_k, desc_v, desc_o, O, LSE, KV_NUM, KV_IDX, PERM, BH_ORDER, Q_SCALE, K_SCALE, V_SCALE, tile, num_m,
    stride_ob, stride_oh, stride_on, H, N, NUM_Q_BLOCKS, NUM_KV_BLOCKS, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_ORDER: tl.constexpr, RETURN_LSE: tl.constexpr, EVEN_N: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr, FP8: tl.constexpr, FP8_PV: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
):
    """Work item ``tile`` of the descriptor kernel: query rows [pid_m BLOCK_M, + BLOCK_M) of the
    (batch, head) BH_ORDER[tile // num_m], pid_m = tile % num_m."""
    pid_m = tile % num_m
    pid_bh = tl.load(BH_ORDER + tile // num_m)
    b = pid_bh // H
    h = pid_bh % H
    u = (pid_m * BLOCK_M) // BLOCK
    q = desc_q.load([b, h, pid_m * BLOCK_M, 0]).reshape(BLOCK_M, HEAD_DIM)
    row_scale = _block_scaled(qk_scale, Q_SCALE, pid_bh, u, NUM_Q_BLOCKS, FP8)
    num_kv, idx_ptr, n_full = _kept_blocks(KV_NUM, KV_IDX, pid_bh, u, NUM_Q_BLOCKS, NUM_KV_BLOCKS, EVEN_N)
    CHUNKS: tl.constexpr = BLOCK // BLOCK_N

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    all_ok = tl.full([BLOCK_N], True, tl.int1)
    # Warp specialization (an autotune candidate on Hopper) lets some warps issue the tile
    # copies while the others run the products and the softmax.
    for it in tl.range(0, n_full * CHUNKS, warp_specialize=WARP_SPECIALIZE):
        kv_block = tl.load(idx_ptr + it // CHUNKS)
        k, v = _desc_kv(desc_k, desc_v, b, h, kv_block * BLOCK + (it % CHUNKS) * BLOCK_N, BLOCK_N, HEAD_DIM, FP8_PV)
        step_scale = _block_scaled(row_scale, K_SCALE, pid_bh, kv_block, NUM_KV_BLOCKS, FP8)
        acc, l_i, m_i = _softmax_step(acc, l_i, m_i, q, k, v, step_scale, all_ok, False, UPCAST, DOT_PRECISION,
                                      FP8_PV)
    if not EVEN_N:
        if n_full < num_kv:
            tail_start = (NUM_KV_BLOCKS - 1) * BLOCK
            step_scale = _block_scaled(row_scale, K_SCALE, pid_bh, NUM_KV_BLOCKS - 1, NUM_KV_BLOCKS, FP8)
            for c in range(0, tl.cdiv(N - tail_start, BLOCK_N)):
                start = tail_start + c * BLOCK_N
                k, v = _desc_kv(desc_k, desc_v, b, h, start, BLOCK_N, HEAD_DIM, FP8_PV)
                col_ok = start + tl.arange(0, BLOCK_N) < N
                acc, l_i, m_i = _softmax_step(acc, l_i, m_i, q, k, v, step_scale, col_ok, True, UPCAST,
                                              DOT_PRECISION, FP8_PV)

    out = _normalized(acc, l_i, num_kv, V_SCALE, pid_bh, HEAD_DIM, FP8_PV)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < N
    if HAS_ORDER:
        # Only FP8_PV runs here with an order: q, k and v were quantized in the ordered
        # sequence, and only the output rows go back to their original positions.
        rows_m = tl.load(PERM + offs_m, mask=row_ok, other=0)
        _store_rows(O, out, b, h, rows_m, row_ok, stride_ob, stride_oh, stride_on, HEAD_DIM)
    else:
        rows_m = offs_m
        desc_o.store([b, h, pid_m * BLOCK_M, 0], out.to(desc_o.dtype).reshape(1, 1, BLOCK_M, HEAD_DIM))
    if RETURN_LSE:
        _store_lse(LSE, m_i, l_i, pid_bh, rows_m, row_ok, N)


@triton.jit
def _block_sparse_attention_desc_kernel(
    desc_q, desc_k, desc_v, desc_o, O, LSE, KV_NUM, KV_IDX, PERM, BH_ORDER, Q_SCALE, K_SCALE, V_SCALE,
    stride_ob, stride_oh, stride_on, H, BH, N, NUM_Q_BLOCKS, NUM_KV_BLOCKS, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_ORDER: tl.constexpr, RETURN_LSE: tl.constexpr, EVEN_N: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr, FP8: tl.constexpr, FP8_PV: tl.constexpr,
    PERSISTENT: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
):
    """The kernel above with q, k, v and out tiles moved by tensor descriptors ([B, H, N, D] of
    any 16-byte strides; the copy engine on Hopper) when the keys of a block are contiguous
    rows: without a token order, or with FP8_PV, whose q, k and v are ordered copies (the output
    is then stored through ``perm``, O [B, H, N, D] with strides stride_o*). FP8 / FP8_PV as in
    the pointer kernel, with FP8_PV's v described as its [B, H, D, N] transposed buffer. Rows
    past N load as zeros and are not stored, so only the short last key block needs a -inf fill.

    Grid (query tiles, B * H), one work item per program; or PERSISTENT (an autotune candidate):
    a fixed number of programs, each walking the work items program_id, + programs, ...: items
    run heads in LPT order, so the ragged block lists are dealt out as programs finish."""
    num_m = tl.cdiv(N, BLOCK_M)
    if PERSISTENT:
        for tile in range(tl.program_id(0), num_m * BH, tl.num_programs(0)):
            _desc_tile(desc_q, desc_k, desc_v, desc_o, O, LSE, KV_NUM, KV_IDX, PERM, BH_ORDER, Q_SCALE, K_SCALE,
                       V_SCALE, tile, num_m, stride_ob, stride_oh, stride_on, H, N, NUM_Q_BLOCKS, NUM_KV_BLOCKS,
                       qk_scale, HEAD_DIM, BLOCK, BLOCK_M, BLOCK_N, HAS_ORDER, RETURN_LSE, EVEN_N, UPCAST,
                       DOT_PRECISION, FP8, FP8_PV, WARP_SPECIALIZE)
    else:
        _desc_tile(desc_q, desc_k, desc_v, desc_o, O, LSE, KV_NUM, KV_IDX, PERM, BH_ORDER, Q_SCALE, K_SCALE, V_SCALE,
                   tl.program_id(1) * num_m + tl.program_id(0), num_m, stride_ob, stride_oh, stride_on, H, N,
                   NUM_Q_BLOCKS, NUM_KV_BLOCKS, qk_scale, HEAD_DIM, BLOCK, BLOCK_M, BLOCK_N, HAS_ORDER, RETURN_LSE,
                   EVEN_N, UPCAST, DOT_PRECISION, FP8, FP8_PV, WARP_SPECIALIZE)


#: The descriptor kernel's grid and loop flags (Hopper only, where it runs): a persistent grid
#: and warp-specialized key loops.
DESC_FLAGS = ("PERSISTENT", "WARP_SPECIALIZE")
#: Autotune space, as data: (BLOCK_M, BLOCK_N, num_warps, num_stages) candidates for Hopper,
#: some with DESC_FLAGS, so the autotuner picks what this Triton compiles best. ``fp8_only``
#: candidates pipeline one stage deeper than bfloat16's shared memory allows: e4m3 tiles are
#: half the bytes (at D 128 four stages take about 150 KB with "fp8_pv", 210 KB with "fp8",
#: 290 KB in bfloat16, of the H200's 227 KB).
ATTENTION_CONFIGS = [
    dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2),
    dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=4),
    dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=4),
    dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2),
    dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=2),
    dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=2),
    dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2, PERSISTENT=True),
    dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3, WARP_SPECIALIZE=True),
    dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2, PERSISTENT=True, WARP_SPECIALIZE=True),
    dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3, WARP_SPECIALIZE=True),
    dict(BLOCK_M=128, BLOCK_N=128, num_warps=4, num_stages=2, WARP_SPECIALIZE=True),
    dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=4, fp8_only=True),
    dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=4, WARP_SPECIALIZE=True, fp8_only=True),
]
#: Programs per multiprocessor of the persistent grid.
_PERSISTENT_PROGRAMS_PER_SM = 2


def attention_config_fits(config: dict, block: int, head_dim: int, fp8: bool = False, descriptors: bool = False,
                          even_n: bool = False) -> bool:
    """Pruning predicate: a program's query rows and its key slice must lie inside one mask
    block (rows of one program share one mask row; a slice never straddles two key blocks);
    FP8 products need tiles of at least 64 rows and 32 keys (Hopper's FP8 matrix instructions);
    candidates with DESC_FLAGS are for the descriptor (Hopper) kernel only, and
    ``fp8_only`` ones for FP8 inputs. With N a multiple of the block (``even_n``: no tail loop)
    Triton's warp specialization (3.6, 3.7) fails to compile the 4-warp WARP_SPECIALIZE
    candidates ("PassManager::run failed"), which the autotuner would not survive: left out."""
    del head_dim  # every config compiles for D in {64, 128}
    fits = config["BLOCK_M"] <= block and config["BLOCK_N"] <= block
    hopper_only = any(config.get(flag, False) for flag in DESC_FLAGS)
    if fp8:
        fits = fits and config["BLOCK_M"] >= 64 and config["BLOCK_N"] >= 32
    if even_n and config.get("WARP_SPECIALIZE", False) and config["num_warps"] < 8:
        fits = False
    return fits and (descriptors or not hopper_only) and (fp8 or not config.get("fp8_only", False))


def _prune(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}  # constexprs arrive as keyword arguments
    return [c for c in configs if attention_config_fits(c.all_kwargs(), args["BLOCK"], args["HEAD_DIM"],
                                                        args.get("FP8", False), "desc_q" in args, args["EVEN_N"])]


def _set_tile_shapes(nargs: dict) -> None:
    """Tensor descriptors move [1, 1, rows, D] tiles: BLOCK_M rows of q / out, BLOCK_N of k / v;
    FP8_PV's transposed v [1, 1, D, BLOCK_N] tiles."""
    d = nargs["HEAD_DIM"]
    for name, rows in (("desc_q", "BLOCK_M"), ("desc_o", "BLOCK_M"), ("desc_k", "BLOCK_N"), ("desc_v", "BLOCK_N")):
        nargs[name].block_shape = [1, 1, nargs[rows], d]
    if nargs["FP8_PV"]:
        nargs["desc_v"].block_shape = [1, 1, d, nargs["BLOCK_N"]]


def _tuned(kernel, key: list[str], descriptors: bool = False, pre_hook=None):
    def tiles(c: dict) -> dict:
        flags = {flag: c.get(flag, False) for flag in DESC_FLAGS}
        return dict(BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"], **(flags if descriptors else {}))

    return triton.autotune(
        configs=[triton.Config(tiles(c), num_warps=c["num_warps"], num_stages=c["num_stages"], pre_hook=pre_hook)
                 for c in ATTENTION_CONFIGS if descriptors or not any(c.get(flag) for flag in DESC_FLAGS)],
        key=key,
        prune_configs_by={"early_config_prune": _prune},
    )(kernel)


_TUNED_KERNEL = _tuned(_block_sparse_attention_kernel,
                       ["N", "HEAD_DIM", "BLOCK", "HAS_ORDER", "RETURN_LSE", "EVEN_N", "FP8", "FP8_PV"])
# Descriptors carry no dtype into the autotune key; the output O does (the autotuner adds every
# tensor argument's), and FP8 / FP8_PV tell the quantized inputs apart.
_TUNED_DESC_KERNEL = _tuned(_block_sparse_attention_desc_kernel,
                            ["N", "HEAD_DIM", "BLOCK", "HAS_ORDER", "RETURN_LSE", "EVEN_N", "FP8", "FP8_PV"],
                            descriptors=True, pre_hook=_set_tile_shapes)


def _copy_engine(device: torch.device) -> bool:
    """Tensor descriptors run on Hopper-class GPUs (compute capability 9+) and in the interpreter."""
    return interpreting() or cuda_properties(device).major >= 9


def _describable(x: torch.Tensor) -> bool:
    """A tensor descriptor needs a 16-byte aligned base and non-zero 16-byte multiples for
    every stride but the last."""
    size = x.element_size()
    return x.data_ptr() % 16 == 0 and all(s > 0 and s * size % 16 == 0 for s in x.stride()[:-1])


def _descriptors(*tensors: torch.Tensor) -> bool:
    """Whether the descriptor kernel can move these tiles: a copy engine and describable tensors."""
    return _copy_engine(tensors[0].device) and all(_describable(x) for x in tensors)


#: The descriptor kernel's grid and loop flags in the interpreter (which does not tune), and the
#: multiprocessors it assumes for a persistent grid.
_INTERPRETED_DESC_FLAGS = dict.fromkeys(DESC_FLAGS, False)
_INTERPRETED_SMS = 2


def _launch(kernel, tuned, args, meta: dict, n: int, programs_bh: int, block: int, d: int, device: torch.device,
            pre_hook=None) -> None:
    descriptors = kernel is _block_sparse_attention_desc_kernel
    sms = _INTERPRETED_SMS if interpreting() else cuda_properties(device).multi_processor_count

    def grid(META):
        tiles = triton.cdiv(n, META["BLOCK_M"])
        if META.get("PERSISTENT", False):
            return (min(tiles * programs_bh, sms * _PERSISTENT_PROGRAMS_PER_SM), 1)
        return (tiles, programs_bh)

    if not interpreting():
        tuned[grid](*args, **meta)
        return
    # The interpreter pays per program, so take the largest tile that fits instead of tuning.
    cfg = next(c for c in ATTENTION_CONFIGS if attention_config_fits(c, block, d))
    tiles = dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], **(_INTERPRETED_DESC_FLAGS if descriptors else {}))
    if pre_hook is not None:
        pre_hook(dict(zip(kernel.arg_names, args)) | meta | tiles)
    kernel[grid(tiles)](*args, **meta, **tiles)


# The LPT head order of a mask, computed once per BlockMask object: a cached mask (the
# processor reuses one for every call of its refresh interval) then costs no launches for it.
# Any permutation of the heads is a correct schedule, so a mask whose tensors are later
# rewritten in place (a CUDA graph's static mask) stays correct, only perhaps less balanced.
_HEAD_ORDERS: "weakref.WeakKeyDictionary[BlockMask, torch.Tensor]" = weakref.WeakKeyDictionary()


def head_order(mask: BlockMask) -> torch.Tensor:
    """int32 [B * H]: the (batch, head) pairs by kept blocks, most first (device ops, no host sync).

    Programs start in grid order, a head's query rows together. Per-head budgets (a calibrated
    config, dense heads) make some heads many times longer than others: starting the longest
    first keeps them from forming a tail after the short ones (longest-processing-time-first)."""
    order = _HEAD_ORDERS.get(mask)
    if order is None:
        work = mask.kv_num_blocks.reshape(-1, mask.num_q_blocks).sum(dim=-1)
        order = torch.argsort(work, descending=True, stable=True).to(torch.int32)
        _HEAD_ORDERS[mask] = order
    return order


#: Whether the Gluon kernel for Hopper (``dfsviz.kernels._jit.attention_sm90``) runs the calls it
#: is built for; benchmarks turn it off to time the Triton descriptor kernel in the same process.
SM90_ENABLED = True
#: The Triton release the Gluon kernel is written against and checked with (Gluon's API moves
#: between releases); with an older one the Triton kernels run every call.
SM90_MIN_TRITON = (3, 6)


@functools.cache
def sm90_module():
    """``dfsviz.kernels._jit.attention_sm90``, or None where this Triton cannot build it."""
    version = tuple(int(part) for part in re.findall(r"\d+", triton.__version__)[:2])
    if version < SM90_MIN_TRITON:
        logger.info("Triton %s is older than %s: the Gluon attention kernel for Hopper is off", triton.__version__,
                    ".".join(map(str, SM90_MIN_TRITON)))
        return None
    try:
        return importlib.import_module("dfsviz.kernels._jit.attention_sm90")
    except ImportError as exc:
        logger.warning("the Gluon attention kernel for Hopper is off: %s", exc)
        return None


def sm90_kernel_runs(q: torch.Tensor, mask: BlockMask) -> bool:
    """Whether a call on describable tensors, with or without an order, native or FP8 (``q`` the
    caller's float16 / bfloat16 input), runs the Gluon kernel for Hopper: compute capability 9.x
    (its warpgroup MMAs are Hopper's alone), a Triton that builds it, float16 / bfloat16, D and
    the mask's block as it is built for."""
    if not (SM90_ENABLED and not interpreting() and q.is_cuda and cuda_properties(q.device).major == 9):
        return False
    sm90 = sm90_module()
    return (sm90 is not None and q.dtype in sm90.SM90_DTYPES and q.shape[3] in sm90.SM90_HEAD_DIMS
            and mask.block == sm90.SM90_BLOCK)


@triton.jit
def _gather_kv_kernel(K, V, K_OUT, V_OUT, PERM, H, N, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                      HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, HAS_K: tl.constexpr):
    """Rows [r, r + BLOCK_R) of head program_id(1) of K_OUT (with HAS_K) and V_OUT
    ([B, H, N, D]-contiguous) are rows PERM[r] of K and V (unit stride along D)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < N
    src = tl.load(PERM + rows, mask=row_ok, other=0).to(tl.int64)
    bh = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    cols = tl.arange(0, HEAD_DIM)[None, :]
    dst = (bh.to(tl.int64) * N + rows[:, None]) * HEAD_DIM + cols
    if HAS_K:
        k = tl.load(K + b * stride_kb + h * stride_kh + src[:, None] * stride_kn + cols, mask=row_ok[:, None])
        tl.store(K_OUT + dst, k, mask=row_ok[:, None])
    v = tl.load(V + b * stride_vb + h * stride_vh + src[:, None] * stride_vn + cols, mask=row_ok[:, None])
    tl.store(V_OUT + dst, v, mask=row_ok[:, None])


def gather_kv(k: torch.Tensor | None, v: torch.Tensor, perm: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Ordered [B, H, N, D]-contiguous copies of k and v (unit stride along D, D a power of two;
    k None: v's alone): row i of each is row perm[i], in one launch of whole 16-byte rows
    (torch's ``index_select`` moved these rows at about 1.2 TB/s on an H200: bench_kernels)."""
    bsz, heads, n, d = v.shape
    v_out = torch.empty_like(v, memory_format=torch.contiguous_format)
    k_out = None if k is None else torch.empty_like(k, memory_format=torch.contiguous_format)
    k_src, k_dst = (k, k_out) if k is not None else (v, v_out)  # placeholders without k: nothing reads them
    block_r = 64
    _gather_kv_kernel[(triton.cdiv(n, block_r), bsz * heads)](
        k_src, v, k_dst, v_out, perm, heads, n, k_src.stride(0), k_src.stride(1), k_src.stride(2), v.stride(0),
        v.stride(1), v.stride(2), HEAD_DIM=d, BLOCK_R=block_r, HAS_K=k is not None, num_warps=4)
    return k_out, v_out


def kernel_meta(dtype: torch.dtype, d: int, n: int, block: int, has_order: bool, return_lse: bool, fp8: bool = False,
                fp8_pv: bool = False) -> dict:
    """The constexpr arguments of the pointer and descriptor kernels for inputs of ``dtype``
    (the caller's q, also for FP8 calls), head dim ``d``, ``n`` tokens and the mask's ``block``.
    The interpreter's 16-bit dot is wrong, so there products run in float32 (UPCAST, "ieee")."""
    return dict(HEAD_DIM=d, BLOCK=block, HAS_ORDER=has_order, RETURN_LSE=return_lse, EVEN_N=n % block == 0,
                UPCAST=interpreting() and dtype != torch.float32,
                DOT_PRECISION="ieee" if dtype == torch.float32 or interpreting() else "tf32", FP8=fp8, FP8_PV=fp8_pv)


def block_sparse_attention_fwd(q, k, v, mask: BlockMask, perm, scale: float, return_lse: bool):
    """Launch on validated inputs: q, k, v [B, H, N, D] with unit stride along D and heads
    spanning < 2**31 elements, ``perm`` int32 [N] on their device or None, ``scale`` resolved."""
    out, lse = _outputs(q, return_lse)
    if sm90_kernel_runs(q, mask) and _descriptors(q, k, v, out):
        # Hopper: the Gluon kernel. Its copy engine moves whole tiles of contiguous rows, so with
        # an order k and v go in as ordered copies (one gather each, against a gather per kept
        # block in the kernel); q's rows and the output's go through the order in the kernel.
        if perm is not None:
            k, v = gather_kv(k, v, perm)
        _launch_sm90(q, k, v, out, lse, mask, perm, scale * _LOG2E, return_lse)
        return (out, lse) if return_lse else out
    meta = kernel_meta(q.dtype, q.shape[3], q.shape[2], mask.block, perm is not None, return_lse)
    no_scales = (mask.kv_num_blocks,) * 3  # placeholders: FP8 is off, nothing reads them
    if perm is None and _descriptors(q, k, v, out):
        # Without an order the key blocks are contiguous rows: whole tiles through tensor descriptors.
        _launch_desc_kernel(q, k, v, out, lse, mask, perm, no_scales, scale * _LOG2E, meta)
    else:
        _launch_pointer_kernel(q, k, v, out, lse, mask, perm, no_scales, scale * _LOG2E, meta)
    return (out, lse) if return_lse else out


def _outputs(like: torch.Tensor, return_lse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse): out in ``like``'s layout when it is dense (diffusers' [B, N, H, D] memory: the
    caller's transpose back to [B, N, H * D] is then a view), else [B, H, N, D]-contiguous; lse
    float32 [B, H, N], or ``out`` as a placeholder without ``return_lse``."""
    out = torch.empty_like(like, memory_format=torch.preserve_format)
    lse = torch.empty(like.shape[:3], dtype=torch.float32, device=like.device) if return_lse else out
    return out, lse


def _mask_args(mask: BlockMask, perm) -> tuple:
    """(KV_NUM, KV_IDX, PERM, BH_ORDER) of both kernels; without an order PERM is a placeholder."""
    counts = mask.kv_num_blocks.contiguous()
    return counts, mask.kv_indices.contiguous(), perm if perm is not None else counts, head_order(mask)


def desc_kernel_args(q, k, v, out, lse, mask: BlockMask, perm, scales, qk_scale: float) -> tuple:
    """The descriptor kernel's positional arguments (its launcher's, and what a compile-only
    build for a Hopper target takes): q, k, out [B, H, N, D] and v [B, H, N, D] (FP8_PV:
    [B, H, D, N]), all describable. Tile shapes are placeholders until _set_tile_shapes."""
    bsz, heads, n, d = q.shape
    descs = [TensorDescriptor(x, list(x.shape), list(x.stride()), [1, 1, 16, d]) for x in (q, k, v, out)]
    counts, indices, perm_arg, bh_order = _mask_args(mask, perm)
    return (*descs, out, lse, counts, indices, perm_arg, bh_order, *scales, out.stride(0), out.stride(1),
            out.stride(2), heads, bsz * heads, n, mask.num_q_blocks, mask.num_kv_blocks, qk_scale)


def _launch_desc_kernel(q, k, v, out, lse, mask: BlockMask, perm, scales, qk_scale: float, meta: dict) -> None:
    bsz, heads, n, d = q.shape
    args = desc_kernel_args(q, k, v, out, lse, mask, perm, scales, qk_scale)
    _launch(_block_sparse_attention_desc_kernel, _TUNED_DESC_KERNEL, args, meta, n, bsz * heads, mask.block, d,
            q.device, pre_hook=_set_tile_shapes)


def _launch_sm90(q, k, v, out, lse, mask: BlockMask, perm, qk_scale: float, return_lse: bool,
                 scales: tuple | None = None) -> None:
    """The Gluon kernel for Hopper on these inputs (``block_sparse_attention_sm90_fwd``: k and v
    ordered when ``perm`` is given; ``scales`` for FP8). The kernel reads the order itself, so the
    mask's arguments go without it."""
    counts, indices, _, bh_order = _mask_args(mask, None)
    sm90_module().block_sparse_attention_sm90_fwd(q, k, v, out, lse, counts, indices, perm, bh_order,
                                                  mask.num_q_blocks, mask.num_kv_blocks, qk_scale, return_lse,
                                                  scales=scales)


def _launch_pointer_kernel(q, k, v, out, lse, mask: BlockMask, perm, scales, qk_scale: float, meta: dict) -> None:
    args = (
        q, k, v, out, lse, *_mask_args(mask, perm), *scales,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), v.stride(3),
        out.stride(0), out.stride(1), out.stride(2),
        q.shape[1], q.shape[2], mask.num_q_blocks, mask.num_kv_blocks, qk_scale,
    )
    _launch(_block_sparse_attention_kernel, _TUNED_KERNEL, args, meta, q.shape[2], q.shape[0] * q.shape[1],
            mask.block, q.shape[3], q.device)


def block_sparse_attention_fp8_fwd(q, k, v, mask: BlockMask, perm, scale: float, return_lse: bool,
                                   fp8_pv: bool = False):
    """Launch with FP8 q and k on validated inputs: q, k, v [B, H, N, D] float16 / bfloat16 with
    unit stride along D (original order), quantized here (``quantize_attention_fp8_fwd``: q and k,
    and v with ``fp8_pv``, for the kernel that runs); ``perm`` int32 [N] or None; out takes v's
    dtype and layout; the LSE (float32 [B, H, N]) is that of the logits before smoothing (the
    kernel's plus ``Fp8QK.lse_shift``).

    On Hopper the Gluon kernel runs where it runs for bfloat16 (D, block, describable tensors),
    "fp8" with an order on an ordered copy of v, "fp8_pv" on v8 in the MMA's key order.
    Elsewhere the descriptor kernel runs where it runs for bfloat16 (a copy engine, describable
    tensors) when the key blocks are contiguous rows of every input: always with "fp8_pv" (q8,
    k8 and v8 are ordered copies; the output is stored through ``perm``), without an order with
    "fp8". "fp8" with an order keeps the pointer kernel there, which gathers v's rows through
    ``perm``: the copy engine moves boxes, not gathered rows."""
    n, d = v.shape[2], v.shape[3]
    out, lse = _outputs(v, return_lse)
    # q8, k8 and "fp8_pv"'s v8 are buffers of their own (contiguous e4m3 rows of a D that the
    # Gluon kernel takes; v8 [B, H, D, N'], stride 1 along N): describable
    gluon = sm90_kernel_runs(v, mask) and _descriptors(out, *(() if fp8_pv else (v,)))
    quant, v8, v_scale = quantize_attention_fp8_fwd(q, k, v if fp8_pv else None, mask.block, perm, mma_order=gluon)
    if fp8_pv:
        v = v8
    if gluon:
        # Hopper: the Gluon kernel. Its copy engine moves key blocks of contiguous rows: q8, k8
        # and "fp8_pv"'s v8 are ordered copies already; "fp8" with an order gets one of v.
        if perm is not None and not fp8_pv:
            _, v = gather_kv(None, v, perm)
        _launch_sm90(quant.q8, quant.k8, v, out, lse, mask, perm, scale * _LOG2E, return_lse,
                     scales=(quant.q_scale, quant.k_scale, v_scale))
        return (out, lse + quant.lse_shift(q, scale)) if return_lse else out
    meta = kernel_meta(out.dtype, d, n, mask.block, perm is not None, return_lse, fp8=True, fp8_pv=fp8_pv)
    v_tiles = v.transpose(-1, -2) if fp8_pv else v  # v8's buffer: [B, H, D, N], stride 1 along N
    scales = (quant.q_scale, quant.k_scale, v_scale if fp8_pv else quant.k_scale)  # k_scale: a placeholder
    if (fp8_pv or perm is None) and _descriptors(quant.q8, quant.k8, v_tiles, out):
        _launch_desc_kernel(quant.q8, quant.k8, v_tiles, out, lse, mask, perm, scales, scale * _LOG2E, meta)
    else:
        _launch_pointer_kernel(quant.q8, quant.k8, v, out, lse, mask, perm, scales, scale * _LOG2E, meta)
    return (out, lse + quant.lse_shift(q, scale)) if return_lse else out

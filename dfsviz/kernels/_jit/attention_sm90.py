"""Block-sparse attention forward for Hopper (sm_90) in Gluon, Triton's explicit-layout dialect:
FlashAttention-3's schedule over a BlockMask's ragged key-block lists.

Why a second kernel: Triton's automatic pipelining does not overlap the softmax with the
tensor cores (measured: a rotated Q.K loop written in Triton runs no faster), so the Triton
kernel stops near 0.85 of cuDNN's dense rate. Gluon states the schedule itself:

- one CTA owns one query block (128 rows) of one (batch, head) and three partitions of warps:
  a one-warp loader that moves the kept key blocks' K and V tiles into a ring of shared-memory
  stages with the copy engine (TMA), and two consumer warpgroups of 64 rows each, which share
  those tiles (each stage is released when both have read it);
- each consumer issues Q . K^T of the next key block and P . V of the current one as
  asynchronous warpgroup MMAs, then computes the next block's softmax while P . V runs
  (FlashAttention-3's intra-warpgroup overlap); the two consumers drift into alternating their
  matrix and softmax phases (the ping-pong), as the tensor cores serve one at a time.

Inputs as the Triton descriptor kernel takes them: q, k, v, out [B, H, N, D] (any 16-byte
strides, unit stride along D) in float16 / bfloat16, D in {64, 128}, the mask's block 128 and
no token order (an ordered call has permuted q, k and v already). The launcher in
``dfsviz.kernels._jit.attention`` chooses this kernel on compute capability 9.x.
"""

from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from dfsviz.kernels.fp8 import P_SCALE

__all__ = ["SM90_BLOCK", "SM90_DTYPES", "SM90_HEAD_DIMS", "block_sparse_attention_sm90_fwd"]

#: What the kernel is built for: the mask's block (one CTA's query rows and one key tile),
#: head dims and dtypes.
SM90_BLOCK = 128
SM90_HEAD_DIMS = (64, 128)
SM90_DTYPES = (torch.float16, torch.bfloat16)
_GLUON_DTYPES = {torch.float16: gl.float16, torch.bfloat16: gl.bfloat16, torch.float8_e4m3fn: gl.float8e4nv}

# Rows per consumer warpgroup: Hopper's warpgroup MMA multiplies 64-row tiles.
_ROWS = gl.constexpr(64)
_LN2 = gl.constexpr(0.6931471805599453)
_P_SCALE = gl.constexpr(P_SCALE)
# Shared-memory stages of K and V: two stages of two 128-row tiles at D 128 are 128 KB, beside
# the 32 KB of Q (the H200 has 227 KB per CTA).
_NUM_STAGES = 2
# FP8's tiles are half the bytes: four stages take 128 KB.
_FP8_STAGES = 4
# Registers per thread: 12 warps (two consumer warpgroups, the loader's warpgroup) share the
# 64 K registers of a multiprocessor at 168 each; the loader gives most of its share away.
_MAXNREG = 168
_CONSUMER_REGS = 240
_LOADER_REGS = 24


@gluon.jit
def _loader(desc_q, desc_k, desc_v, q_bufs, k_bufs, v_bufs, q_ready, k_ready, k_empty, v_ready, v_empty,
            b, h, row0, idx_ptr, num_kv, BLOCK: gl.constexpr, NUM_STAGES: gl.constexpr, FP8: gl.constexpr):
    """The copy partition: both consumers' Q tiles, then K and V of each kept key block into
    stage j % NUM_STAGES once both consumers released that stage's previous tiles. FP8's v is
    its transposed [B, H, D, N] buffer: [D, BLOCK] tiles."""
    for i in gl.static_range(2):
        mbarrier.expect(q_ready.index(i), desc_q.block_type.nbytes)
        tma.async_copy_global_to_shared(desc_q, [b, h, row0 + i * _ROWS, 0], q_ready.index(i), q_bufs.index(i))
    for j in range(num_kv):
        stage = j % NUM_STAGES
        # Barriers start with their preceding phase (parity 1) complete: the first pass is free.
        free_phase = ((j // NUM_STAGES) & 1) ^ 1
        start = gl.load(idx_ptr + j) * BLOCK
        mbarrier.wait(k_empty.index(stage), free_phase)
        mbarrier.expect(k_ready.index(stage), desc_k.block_type.nbytes)
        tma.async_copy_global_to_shared(desc_k, [b, h, start, 0], k_ready.index(stage), k_bufs.index(stage))
        mbarrier.wait(v_empty.index(stage), free_phase)
        mbarrier.expect(v_ready.index(stage), desc_v.block_type.nbytes)
        if FP8:
            tma.async_copy_global_to_shared(desc_v, [b, h, 0, start], v_ready.index(stage), v_bufs.index(stage))
        else:
            tma.async_copy_global_to_shared(desc_v, [b, h, start, 0], v_ready.index(stage), v_bufs.index(stage))


@gluon.jit
def _block_logits(s, idx_ptr, j, N, row_scale, K_SCALE, scale_row, BLOCK: gl.constexpr, EVEN_N: gl.constexpr,
                  FP8: gl.constexpr, layout: gl.constexpr):
    """(logits s [64, BLOCK] of kept key block j with the keys at or past N set to -inf, their
    scale): only the short last block of a ragged N has such keys (their rows load as zeros).
    FP8: the scale carries the key block's scale too (K_SCALE [B * H, Mk], row scale_row)."""
    blk = gl.load(idx_ptr + j)
    scale = row_scale
    if FP8:
        scale = scale * gl.load(K_SCALE + scale_row + blk)
    if not EVEN_N:
        start = blk * BLOCK
        if start + BLOCK > N:
            cols = start + gl.arange(0, BLOCK, layout=gl.SliceLayout(0, layout))
            s = gl.where((cols < N)[None, :], s, float("-inf"))
    return s, scale


@gluon.jit
def _online_softmax(s, m_i, l_i, scale, FP8: gl.constexpr):
    """FlashAttention's online softmax in the log2 domain (scale holds log2(e)). FP8: the running
    max is rounded up to an integer, so rescaling is by exact powers of two (dfsviz.kernels.fp8)."""
    if FP8:
        m_new = gl.maximum(m_i, gl.ceil(gl.max(s, 1) * scale))
    else:
        m_new = gl.maximum(m_i, gl.max(s, 1) * scale)
    p = gl.exp2(s * scale - m_new[:, None])
    alpha = gl.exp2(m_i - m_new)
    l_i = l_i * alpha + gl.sum(p, 1)
    return p, alpha, m_new, l_i


@gluon.jit
def _p_operand(p, dtype: gl.constexpr, layout: gl.constexpr, FP8: gl.constexpr):
    """P as the register operand of P . V: rounded to the inputs' dtype, or FP8's P_SCALE * P to e4m3."""
    if FP8:
        p = p * _P_SCALE
    return gl.convert_layout(p.to(dtype), layout)


@gluon.jit
def _v_tile(v_bufs, stage, BLOCK: gl.constexpr, HEAD_DIM: gl.constexpr, FP8: gl.constexpr):
    """Stage ``stage``'s V tile as P . V's [BLOCK, D] operand (FP8's is stored [D, BLOCK]: a view)."""
    if FP8:
        tile = v_bufs.index(stage).reshape([HEAD_DIM, BLOCK]).permute((1, 0))
    else:
        tile = v_bufs.index(stage).reshape([BLOCK, HEAD_DIM])
    return tile


@gluon.jit
def _consumer(desc_o, O, LSE, PERM, Q_SCALE, K_SCALE, V_SCALE, q_bufs, k_bufs, v_bufs,
              q_ready, k_ready, k_empty, v_ready, v_empty, b, h, pid_bh, pid_m, idx_ptr, num_kv,
              stride_ob, stride_oh, stride_on, N, NUM_Q_BLOCKS, NUM_KV_BLOCKS, qk_scale,
              HALF: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK: gl.constexpr, NUM_STAGES: gl.constexpr,
              RETURN_LSE: gl.constexpr, EVEN_N: gl.constexpr, HAS_ORDER: gl.constexpr, FP8: gl.constexpr):
    """One consumer warpgroup: query rows [pid_m BLOCK + 64 HALF, + 64) against every kept key block."""
    k_width: gl.constexpr = 4 if FP8 else 2  # 32 bits of the register operand per thread
    instr_k: gl.constexpr = 32 if FP8 else 16  # the MMA's depth: 256 bits of the operands
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK, instr_k])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_DIM, instr_k])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=k_width)
    o_rows: gl.constexpr = gl.SliceLayout(1, o_layout)
    p_dtype: gl.constexpr = v_bufs.dtype

    row_scale = qk_scale
    if FP8:  # the query block's scale; its key blocks' scales follow per block
        row_scale = row_scale * gl.load(Q_SCALE + pid_bh.to(gl.int64) * NUM_Q_BLOCKS + pid_m)
    scale_row = pid_bh.to(gl.int64) * NUM_KV_BLOCKS
    q = q_bufs.index(HALF).reshape([_ROWS, HEAD_DIM])
    s_zero = gl.zeros([_ROWS, BLOCK], gl.float32, s_layout)
    m_i = gl.full([_ROWS], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
    l_i = gl.zeros([_ROWS], gl.float32, gl.SliceLayout(1, s_layout))
    acc = gl.zeros([_ROWS, HEAD_DIM], gl.float32, o_layout)
    mbarrier.wait(q_ready.index(HALF), 0)
    if num_kv > 0:
        mbarrier.wait(k_ready.index(0), 0)
        s = warpgroup_mma(q, k_bufs.index(0).reshape([BLOCK, HEAD_DIM]).permute((1, 0)), s_zero, use_acc=False)
        mbarrier.arrive(k_empty.index(0), count=1)
        s, scale = _block_logits(s, idx_ptr, 0, N, row_scale, K_SCALE, scale_row, BLOCK, EVEN_N, FP8, s_layout)
        p, alpha, m_i, l_i = _online_softmax(s, m_i, l_i, scale, FP8)
        for j in range(num_kv - 1):
            # Issue Q . K^T of block j + 1, then P . V of block j, both asynchronous ...
            nxt = (j + 1) % NUM_STAGES
            mbarrier.wait(k_ready.index(nxt), ((j + 1) // NUM_STAGES) & 1)
            k_next = k_bufs.index(nxt).reshape([BLOCK, HEAD_DIM]).permute((1, 0))
            s_token = warpgroup_mma(q, k_next, s_zero, use_acc=False, is_async=True)
            cur = j % NUM_STAGES
            mbarrier.wait(v_ready.index(cur), (j // NUM_STAGES) & 1)
            p_op = _p_operand(p, p_dtype, p_layout, FP8)
            acc_token = warpgroup_mma(p_op, _v_tile(v_bufs, cur, BLOCK, HEAD_DIM, FP8), acc, is_async=True)
            # ... and run block j + 1's softmax while P . V still runs (they complete in order).
            s = warpgroup_mma_wait(1, deps=[s_token])
            mbarrier.arrive(k_empty.index(nxt), count=1)
            s, scale = _block_logits(s, idx_ptr, j + 1, N, row_scale, K_SCALE, scale_row, BLOCK, EVEN_N, FP8,
                                     s_layout)
            p, alpha, m_i, l_i = _online_softmax(s, m_i, l_i, scale, FP8)
            if FP8:  # the wait keeps no 8-bit registers alive; ptxas guards them (no token in Gluon)
                acc = warpgroup_mma_wait(0, deps=[acc_token])
            else:
                acc, p_op = warpgroup_mma_wait(0, deps=[acc_token, p_op])
            mbarrier.arrive(v_empty.index(cur), count=1)
            acc = acc * gl.convert_layout(alpha, o_rows)[:, None]
        last = (num_kv - 1) % NUM_STAGES
        mbarrier.wait(v_ready.index(last), ((num_kv - 1) // NUM_STAGES) & 1)
        p_op = _p_operand(p, p_dtype, p_layout, FP8)
        acc = warpgroup_mma(p_op, _v_tile(v_bufs, last, BLOCK, HEAD_DIM, FP8), acc)
        mbarrier.arrive(v_empty.index(last), count=1)

    # A query block with no kept key block has l = 0 and acc = 0: divide by 1 to output 0.
    l_safe = gl.where(num_kv > 0, gl.convert_layout(l_i, o_rows), 1.0)
    channels = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
    if FP8:  # acc holds P_SCALE * P . (V / channel scales)
        l_safe = l_safe * _P_SCALE
        acc = acc * gl.load(V_SCALE + pid_bh.to(gl.int64) * HEAD_DIM + channels)[None, :]
    out = (acc / l_safe[:, None]).to(O.dtype.element_ty)
    row0 = pid_m * BLOCK + HALF * _ROWS
    if HAS_ORDER or FP8:
        # Rows go back through the order (FP8's quantized inputs are ordered copies); FP8's tile
        # of Q is too small to stage the output, so every FP8 output is stored from registers.
        offs = row0 + gl.arange(0, _ROWS, layout=o_rows)
        row_ok = offs < N
        rows = offs
        if HAS_ORDER:
            rows = gl.load(PERM + offs, mask=row_ok, other=0)
        o_base = O + b.to(gl.int64) * stride_ob + h.to(gl.int64) * stride_oh
        gl.store(o_base + rows[:, None] * stride_on + channels[None, :], out, mask=row_ok[:, None])
    else:
        # Q's tile is read by no MMA any more: it stages the output for the copy engine, which
        # drops the rows past N.
        o_tile = q_bufs.index(HALF)
        fence_async_shared()
        o_tile.reshape([_ROWS, HEAD_DIM]).store(out)
        fence_async_shared()
        tma.async_copy_shared_to_global(desc_o, [b, h, row0, 0], o_tile)
    if RETURN_LSE:
        offs_s = row0 + gl.arange(0, _ROWS, layout=gl.SliceLayout(1, s_layout))
        rows_s = offs_s
        if HAS_ORDER:
            rows_s = gl.load(PERM + offs_s, mask=offs_s < N, other=0)
        lse = (m_i + gl.log2(l_i)) * _LN2  # log2 domain back to natural log
        gl.store(LSE + pid_bh.to(gl.int64) * N + rows_s, lse, mask=offs_s < N)
    if not (HAS_ORDER or FP8):
        tma.store_wait(0)


@gluon.jit
def _block_sparse_attention_sm90_kernel(
    desc_q, desc_k, desc_v, desc_o, O, LSE, KV_NUM, KV_IDX, PERM, BH_ORDER, Q_SCALE, K_SCALE, V_SCALE,
    stride_ob, stride_oh, stride_on, H, N, NUM_Q_BLOCKS, NUM_KV_BLOCKS, qk_scale,
    HEAD_DIM: gl.constexpr, BLOCK: gl.constexpr, NUM_STAGES: gl.constexpr, RETURN_LSE: gl.constexpr,
    EVEN_N: gl.constexpr, HAS_ORDER: gl.constexpr, FP8: gl.constexpr,
    CONSUMER_REGS: gl.constexpr, LOADER_REGS: gl.constexpr,
):
    """Grid (Mq, B * H): query block program_id(0) of the (batch, head) BH_ORDER[program_id(1)]
    (heads with the most kept blocks first). The default partition (num_warps = 4) is the first
    consumer; the workers are the second consumer and the loader. FP8 ("fp8_pv"): q, k and v
    are e4m3 ordered copies with the scales of ``dfsviz.kernels.fp8`` (Q_SCALE [B * H, Mq],
    K_SCALE [B * H, Mk], V_SCALE [B * H, D]); out is stored through PERM with HAS_ORDER."""
    pid_m = gl.program_id(0)
    pid_bh = gl.load(BH_ORDER + gl.program_id(1))
    b = pid_bh // H
    h = pid_bh % H
    mask_row = pid_bh.to(gl.int64) * NUM_Q_BLOCKS + pid_m
    num_kv = gl.load(KV_NUM + mask_row)
    idx_ptr = KV_IDX + mask_row * NUM_KV_BLOCKS

    q_bufs = gl.allocate_shared_memory(desc_q.dtype, [2] + desc_q.block_type.shape, desc_q.layout)
    k_bufs = gl.allocate_shared_memory(desc_k.dtype, [NUM_STAGES] + desc_k.block_type.shape, desc_k.layout)
    v_bufs = gl.allocate_shared_memory(desc_v.dtype, [NUM_STAGES] + desc_v.block_type.shape, desc_v.layout)
    q_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(2):
        mbarrier.init(q_ready.index(i), count=1)
    for i in gl.static_range(NUM_STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        # both consumers release a stage
        mbarrier.init(k_empty.index(i), count=2)
        mbarrier.init(v_empty.index(i), count=2)

    gl.warp_specialize([
        (_consumer, (desc_o, O, LSE, PERM, Q_SCALE, K_SCALE, V_SCALE, q_bufs, k_bufs, v_bufs, q_ready, k_ready,
                     k_empty, v_ready, v_empty, b, h, pid_bh, pid_m, idx_ptr, num_kv, stride_ob, stride_oh,
                     stride_on, N, NUM_Q_BLOCKS, NUM_KV_BLOCKS, qk_scale, 0, HEAD_DIM, BLOCK, NUM_STAGES,
                     RETURN_LSE, EVEN_N, HAS_ORDER, FP8)),
        (_consumer, (desc_o, O, LSE, PERM, Q_SCALE, K_SCALE, V_SCALE, q_bufs, k_bufs, v_bufs, q_ready, k_ready,
                     k_empty, v_ready, v_empty, b, h, pid_bh, pid_m, idx_ptr, num_kv, stride_ob, stride_oh,
                     stride_on, N, NUM_Q_BLOCKS, NUM_KV_BLOCKS, qk_scale, 1, HEAD_DIM, BLOCK, NUM_STAGES,
                     RETURN_LSE, EVEN_N, HAS_ORDER, FP8)),
        (_loader, (desc_q, desc_k, desc_v, q_bufs, k_bufs, v_bufs, q_ready, k_ready, k_empty, v_ready, v_empty, b, h,
                   pid_m * BLOCK, idx_ptr, num_kv, BLOCK, NUM_STAGES, FP8)),
    ], [4, 1], [CONSUMER_REGS, LOADER_REGS])


def _descriptor(x: torch.Tensor, tile: list[int]) -> TensorDescriptor:
    """x [B, H, R, C] (unit stride along C) moved in [1, 1, *tile] tiles (zeros past its end on
    load, clipped on store)."""
    shape = [1, 1, *tile]
    layout = gl.NVMMASharedLayout.get_default_for(shape, _GLUON_DTYPES[x.dtype])
    return TensorDescriptor(x, list(x.shape), list(x.stride()), shape, layout)


def block_sparse_attention_sm90_fwd(q, k, v, out, lse, mask_args: tuple, perm, scales: tuple | None,
                                    num_q_blocks: int, num_kv_blocks: int, qk_scale: float, return_lse: bool) -> None:
    """Launch on validated, describable inputs: q, k [B, H, N, D] and out [B, H, N, D] (D in
    SM90_HEAD_DIMS); v [B, H, N, D], or with ``scales`` (precision "fp8_pv": q, k, v e4m3
    ordered copies, (q_scale, k_scale, v_scale) as the kernel documents them) v's transposed
    [B, H, D, N] buffer; lse float32 [B, H, N] (or a placeholder); ``mask_args`` the mask's
    int32 (kv_num [B, H, Mq], kv_idx [B, H, Mq, Mk], bh_order [B * H]) of block SM90_BLOCK;
    ``perm`` int32 [N] (FP8 only) or None; qk_scale = softmax scale * log2(e)."""
    bsz, heads, n, d = q.shape
    fp8 = scales is not None
    kv_num, kv_idx, bh_order = mask_args
    q_scale, k_scale, v_scale = scales if fp8 else (kv_num,) * 3  # placeholders: nothing reads them
    v_tile = [d, SM90_BLOCK] if fp8 else [SM90_BLOCK, d]
    # FP8's output is stored from registers: its descriptor is a placeholder
    desc_o = _descriptor(q if fp8 else out, [_ROWS.value, d])
    _block_sparse_attention_sm90_kernel[(num_q_blocks, bsz * heads)](
        _descriptor(q, [_ROWS.value, d]), _descriptor(k, [SM90_BLOCK, d]), _descriptor(v, v_tile), desc_o,
        out, lse, kv_num, kv_idx, perm if perm is not None else kv_num, bh_order, q_scale, k_scale, v_scale,
        out.stride(0), out.stride(1), out.stride(2), heads, n, num_q_blocks, num_kv_blocks, qk_scale,
        HEAD_DIM=d, BLOCK=SM90_BLOCK, NUM_STAGES=_FP8_STAGES if fp8 else _NUM_STAGES, RETURN_LSE=return_lse,
        EVEN_N=n % SM90_BLOCK == 0, HAS_ORDER=perm is not None, FP8=fp8, CONSUMER_REGS=_CONSUMER_REGS,
        LOADER_REGS=_LOADER_REGS, num_warps=4, maxnreg=_MAXNREG,
    )

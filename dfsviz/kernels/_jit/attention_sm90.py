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
  (FlashAttention-3's intra-warpgroup overlap). No barrier orders the two consumers (FA3's
  explicit ping-pong): while one computes its softmax, the other's MMAs can run.

Inputs as the Triton descriptor kernel takes them: q, k, v, out [B, H, N, D] (any 16-byte
strides, unit stride along D) in float16 / bfloat16, D in {64, 128}, the mask's block 128. With a
token order the copy engine, which moves boxes and not rows gathered through a permutation, still
moves K and V: the launcher passes ordered copies of them; each consumer gathers its query rows
through the order with plain loads and stores its output rows back the same way. The launcher in
``dfsviz.kernels._jit.attention`` chooses this kernel on compute capability 9.x, with Triton 3.6
or later (imported only then).
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

__all__ = ["SM90_BLOCK", "SM90_DTYPES", "SM90_HEAD_DIMS", "block_sparse_attention_sm90_fwd", "sm90_launch_args"]

#: What the kernel is built for: the mask's block (one CTA's query rows and one key tile),
#: head dims and dtypes.
SM90_BLOCK = 128
SM90_HEAD_DIMS = (64, 128)
SM90_DTYPES = {torch.float16: gl.float16, torch.bfloat16: gl.bfloat16}

# Rows per consumer warpgroup: Hopper's warpgroup MMA multiplies 64-row tiles.
_ROWS = gl.constexpr(64)
_LN2 = gl.constexpr(0.6931471805599453)
# Shared-memory stages of K and V: two stages of two 128-row tiles at D 128 are 128 KB, beside
# the 32 KB of Q (the H200 has 227 KB per CTA).
_NUM_STAGES = 2
# Registers per thread: 12 warps (two consumer warpgroups, the loader's warpgroup) share the
# 64 K registers of a multiprocessor at 168 each; the loader gives most of its share away.
_MAXNREG = 168
_CONSUMER_REGS = 240
_LOADER_REGS = 24


@gluon.jit
def _loader(desc_q, desc_k, desc_v, q_bufs, k_bufs, v_bufs, q_ready, k_ready, k_empty, v_ready, v_empty,
            b, h, row0, idx_ptr, num_kv, BLOCK: gl.constexpr, NUM_STAGES: gl.constexpr, HAS_ORDER: gl.constexpr):
    """The copy partition: both consumers' Q tiles (without an order: with one, each consumer
    gathers its own), then K and V of each kept key block into stage j % NUM_STAGES once both
    consumers released that stage's previous tiles."""
    if not HAS_ORDER:
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
        tma.async_copy_global_to_shared(desc_v, [b, h, start, 0], v_ready.index(stage), v_bufs.index(stage))


@gluon.jit
def _past_n_masked(s, idx_ptr, j, N, BLOCK: gl.constexpr, EVEN_N: gl.constexpr, layout: gl.constexpr):
    """Logits s [64, BLOCK] of kept key block j with the keys at or past N set to -inf: only the
    short last block of a ragged N has them (its rows load as zeros)."""
    if not EVEN_N:
        start = gl.load(idx_ptr + j) * BLOCK
        if start + BLOCK > N:
            cols = start + gl.arange(0, BLOCK, layout=gl.SliceLayout(0, layout))
            s = gl.where((cols < N)[None, :], s, float("-inf"))
    return s


@gluon.jit
def _online_softmax(s, m_i, l_i, qk_scale):
    """FlashAttention's online softmax in the log2 domain (qk_scale holds log2(e))."""
    m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
    p = gl.exp2(s * qk_scale - m_new[:, None])
    alpha = gl.exp2(m_i - m_new)
    l_i = l_i * alpha + gl.sum(p, 1)
    return p, alpha, m_new, l_i


@gluon.jit
def _original_rows(PERM, start, N, IO_LAYOUT: gl.constexpr):
    """(rows, in_range) of ordered rows [start, start + 64): their original positions perm[row]
    (0 past N) and whether they are below N, in the row slice of IO_LAYOUT."""
    rows = start + gl.arange(0, _ROWS, layout=gl.SliceLayout(1, IO_LAYOUT))
    in_range = rows < N
    return gl.load(PERM + rows, mask=in_range, other=0), in_range


@gluon.jit
def _row_pointers(X, b, h, rows, stride_b, stride_h, stride_n, HEAD_DIM: gl.constexpr, IO_LAYOUT: gl.constexpr):
    """Pointers [64, HEAD_DIM] to ``rows`` of head (b, h) of X [B, H, N, D] with unit stride along
    D (a head spans < 2**31 elements: the launcher checks)."""
    cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, IO_LAYOUT))
    head = X + (b.to(gl.int64) * stride_b + h.to(gl.int64) * stride_h)
    return head + (rows * stride_n)[:, None] + cols[None, :]


@gluon.jit
def _consumer(desc_o, Q, OUT, PERM, LSE, q_bufs, k_bufs, v_bufs, q_ready, k_ready, k_empty, v_ready, v_empty,
              b, h, pid_bh, row0, idx_ptr, num_kv, N, qk_scale, stride_qb, stride_qh, stride_qn,
              stride_ob, stride_oh, stride_on,
              HALF: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK: gl.constexpr, NUM_STAGES: gl.constexpr,
              RETURN_LSE: gl.constexpr, EVEN_N: gl.constexpr, HAS_ORDER: gl.constexpr, IO_LAYOUT: gl.constexpr):
    """One consumer warpgroup: query rows [row0 + 64 HALF, + 64) against every kept key block.
    With an order these are ordered rows: the consumer gathers them from Q through PERM and
    stores its output rows (and LSE) back at their original positions."""
    dtype: gl.constexpr = desc_o.dtype
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    o_rows: gl.constexpr = gl.SliceLayout(1, o_layout)

    q = q_bufs.index(HALF).reshape([_ROWS, HEAD_DIM])
    s_zero = gl.zeros([_ROWS, BLOCK], gl.float32, s_layout)
    m_i = gl.full([_ROWS], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
    l_i = gl.zeros([_ROWS], gl.float32, gl.SliceLayout(1, s_layout))
    acc = gl.zeros([_ROWS, HEAD_DIM], gl.float32, o_layout)
    if HAS_ORDER:
        src, in_range = _original_rows(PERM, row0 + HALF * _ROWS, N, IO_LAYOUT)
        rows = _row_pointers(Q, b, h, src, stride_qb, stride_qh, stride_qn, HEAD_DIM, IO_LAYOUT)
        q.store(gl.load(rows, mask=in_range[:, None], other=0.0))
        fence_async_shared()
    else:
        mbarrier.wait(q_ready.index(HALF), 0)
    if num_kv > 0:
        mbarrier.wait(k_ready.index(0), 0)
        s = warpgroup_mma(q, k_bufs.index(0).reshape([BLOCK, HEAD_DIM]).permute((1, 0)), s_zero, use_acc=False)
        mbarrier.arrive(k_empty.index(0), count=1)
        s = _past_n_masked(s, idx_ptr, 0, N, BLOCK, EVEN_N, s_layout)
        p, alpha, m_i, l_i = _online_softmax(s, m_i, l_i, qk_scale)
        for j in range(num_kv - 1):
            # Issue Q . K^T of block j + 1, then P . V of block j, both asynchronous ...
            nxt = (j + 1) % NUM_STAGES
            mbarrier.wait(k_ready.index(nxt), ((j + 1) // NUM_STAGES) & 1)
            k_next = k_bufs.index(nxt).reshape([BLOCK, HEAD_DIM]).permute((1, 0))
            s_token = warpgroup_mma(q, k_next, s_zero, use_acc=False, is_async=True)
            cur = j % NUM_STAGES
            mbarrier.wait(v_ready.index(cur), (j // NUM_STAGES) & 1)
            p_op = gl.convert_layout(p.to(dtype), p_layout)
            acc_token = warpgroup_mma(p_op, v_bufs.index(cur).reshape([BLOCK, HEAD_DIM]), acc, is_async=True)
            # ... and run block j + 1's softmax while P . V still runs (they complete in order).
            s = warpgroup_mma_wait(1, deps=[s_token])
            mbarrier.arrive(k_empty.index(nxt), count=1)
            s = _past_n_masked(s, idx_ptr, j + 1, N, BLOCK, EVEN_N, s_layout)
            p, alpha, m_i, l_i = _online_softmax(s, m_i, l_i, qk_scale)
            acc, p_op = warpgroup_mma_wait(0, deps=[acc_token, p_op])
            mbarrier.arrive(v_empty.index(cur), count=1)
            acc = acc * gl.convert_layout(alpha, o_rows)[:, None]
        last = (num_kv - 1) % NUM_STAGES
        mbarrier.wait(v_ready.index(last), ((num_kv - 1) // NUM_STAGES) & 1)
        p_op = gl.convert_layout(p.to(dtype), p_layout)
        acc = warpgroup_mma(p_op, v_bufs.index(last).reshape([BLOCK, HEAD_DIM]), acc)
        mbarrier.arrive(v_empty.index(last), count=1)

    # A query block with no kept key block has l = 0 and acc = 0: divide by 1 to output 0.
    l_safe = gl.where(num_kv > 0, gl.convert_layout(l_i, o_rows), 1.0)
    out = (acc / l_safe[:, None]).to(dtype)
    lse = (m_i + gl.log2(l_i)) * _LN2  # log2 domain back to natural log
    if HAS_ORDER:
        # the rows' positions again: keeping them from the Q gather through the loop, which uses
        # all the consumers' registers, spills more (76 bytes against 32 at D 128)
        dst, in_range = _original_rows(PERM, row0 + HALF * _ROWS, N, IO_LAYOUT)
        rows = _row_pointers(OUT, b, h, dst, stride_ob, stride_oh, stride_on, HEAD_DIM, IO_LAYOUT)
        gl.store(rows, gl.convert_layout(out, IO_LAYOUT), mask=in_range[:, None])
        if RETURN_LSE:
            gl.store(LSE + pid_bh.to(gl.int64) * N + dst, gl.convert_layout(lse, dst.type.layout), mask=in_range)
    else:
        # Q's tile is read by no MMA any more: it stages the output for the copy engine, which
        # drops the rows past N.
        o_tile = q_bufs.index(HALF)
        fence_async_shared()
        o_tile.reshape([_ROWS, HEAD_DIM]).store(out)
        fence_async_shared()
        tma.async_copy_shared_to_global(desc_o, [b, h, row0 + HALF * _ROWS, 0], o_tile)
        if RETURN_LSE:
            rows = row0 + HALF * _ROWS + gl.arange(0, _ROWS, layout=gl.SliceLayout(1, s_layout))
            gl.store(LSE + pid_bh.to(gl.int64) * N + rows, lse, mask=rows < N)
        tma.store_wait(0)


@gluon.jit
def _block_sparse_attention_sm90_kernel(
    desc_q, desc_k, desc_v, desc_o, Q, OUT, PERM, LSE, KV_NUM, KV_IDX, BH_ORDER,
    stride_qb, stride_qh, stride_qn, stride_ob, stride_oh, stride_on, H, N, NUM_Q_BLOCKS, NUM_KV_BLOCKS, qk_scale,
    HEAD_DIM: gl.constexpr, BLOCK: gl.constexpr, NUM_STAGES: gl.constexpr, RETURN_LSE: gl.constexpr,
    EVEN_N: gl.constexpr, HAS_ORDER: gl.constexpr, IO_LAYOUT: gl.constexpr, CONSUMER_REGS: gl.constexpr,
    LOADER_REGS: gl.constexpr,
):
    """Grid (Mq, B * H): query block program_id(0) of the (batch, head) BH_ORDER[program_id(1)]
    (heads with the most kept blocks first). The default partition (num_warps = 4) is the first
    consumer; the workers are the second consumer and the loader. With HAS_ORDER, k and v are
    ordered (the launcher's copies) while Q and OUT stay in the original order: the consumers
    move their rows through PERM with plain loads and stores (IO_LAYOUT), the copy engine moves
    whole boxes only."""
    pid_m = gl.program_id(0)
    pid_bh = gl.load(BH_ORDER + gl.program_id(1))
    b = pid_bh // H
    h = pid_bh % H
    mask_row = pid_bh.to(gl.int64) * NUM_Q_BLOCKS + pid_m
    num_kv = gl.load(KV_NUM + mask_row)
    idx_ptr = KV_IDX + mask_row * NUM_KV_BLOCKS
    row0 = pid_m * BLOCK

    dtype: gl.constexpr = desc_q.dtype
    q_bufs = gl.allocate_shared_memory(dtype, [2] + desc_q.block_type.shape, desc_q.layout)
    k_bufs = gl.allocate_shared_memory(dtype, [NUM_STAGES] + desc_k.block_type.shape, desc_k.layout)
    v_bufs = gl.allocate_shared_memory(dtype, [NUM_STAGES] + desc_v.block_type.shape, desc_v.layout)
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

    # Gluon's code generator takes no starred arguments: each partition's list is spelled out.
    gl.warp_specialize([
        (_consumer, (desc_o, Q, OUT, PERM, LSE, q_bufs, k_bufs, v_bufs, q_ready, k_ready, k_empty, v_ready, v_empty,
                     b, h, pid_bh, row0, idx_ptr, num_kv, N, qk_scale, stride_qb, stride_qh, stride_qn, stride_ob,
                     stride_oh, stride_on, 0, HEAD_DIM, BLOCK, NUM_STAGES, RETURN_LSE, EVEN_N, HAS_ORDER, IO_LAYOUT)),
        (_consumer, (desc_o, Q, OUT, PERM, LSE, q_bufs, k_bufs, v_bufs, q_ready, k_ready, k_empty, v_ready, v_empty,
                     b, h, pid_bh, row0, idx_ptr, num_kv, N, qk_scale, stride_qb, stride_qh, stride_qn, stride_ob,
                     stride_oh, stride_on, 1, HEAD_DIM, BLOCK, NUM_STAGES, RETURN_LSE, EVEN_N, HAS_ORDER, IO_LAYOUT)),
        (_loader, (desc_q, desc_k, desc_v, q_bufs, k_bufs, v_bufs, q_ready, k_ready, k_empty, v_ready, v_empty, b, h,
                   row0, idx_ptr, num_kv, BLOCK, NUM_STAGES, HAS_ORDER)),
    ], [4, 1], [CONSUMER_REGS, LOADER_REGS])


def _descriptor(x: torch.Tensor, rows: int) -> TensorDescriptor:
    """x [B, H, N, D] (float16 / bfloat16, unit stride along D) moved in [1, 1, rows, D] tiles
    (zeros past N on load, clipped on store)."""
    shape = [1, 1, rows, x.shape[3]]
    layout = gl.NVMMASharedLayout.get_default_for(shape, SM90_DTYPES[x.dtype])
    return TensorDescriptor(x, list(x.shape), list(x.stride()), shape, layout)


def sm90_launch_args(q, k, v, out, lse, kv_num, kv_idx, perm, bh_order, num_q_blocks: int, num_kv_blocks: int,
                     qk_scale: float, return_lse: bool) -> tuple[tuple, tuple, dict]:
    """(grid, positional arguments, keyword arguments) of the kernel for these inputs (the
    launcher's, and what a compile-only build for a Hopper target takes)."""
    bsz, heads, n, d = q.shape
    args = (_descriptor(q, _ROWS.value), _descriptor(k, SM90_BLOCK), _descriptor(v, SM90_BLOCK),
            _descriptor(out, _ROWS.value), q, out, perm if perm is not None else kv_num, lse, kv_num, kv_idx,
            bh_order, q.stride(0), q.stride(1), q.stride(2), out.stride(0), out.stride(1), out.stride(2), heads, n,
            num_q_blocks, num_kv_blocks, qk_scale)
    # Gathered rows: 16 bytes a thread, a row's D elements across consecutive threads.
    io_layout = gl.BlockedLayout([1, 8], [32 * 8 // d, d // 8], [4, 1], [1, 0])
    meta = dict(HEAD_DIM=d, BLOCK=SM90_BLOCK, NUM_STAGES=_NUM_STAGES, RETURN_LSE=return_lse,
                EVEN_N=n % SM90_BLOCK == 0, HAS_ORDER=perm is not None, IO_LAYOUT=io_layout,
                CONSUMER_REGS=_CONSUMER_REGS, LOADER_REGS=_LOADER_REGS, num_warps=4, maxnreg=_MAXNREG)
    return (num_q_blocks, bsz * heads), args, meta


def block_sparse_attention_sm90_fwd(q, k, v, out, lse, kv_num, kv_idx, perm, bh_order, num_q_blocks: int,
                                    num_kv_blocks: int, qk_scale: float, return_lse: bool) -> None:
    """Launch on validated, describable inputs: q, k, v, out [B, H, N, D] (float16 / bfloat16,
    D in SM90_HEAD_DIMS), lse float32 [B, H, N] (or a placeholder), the mask's int32 kv_num
    [B, H, Mq] and kv_idx [B, H, Mq, Mk] of block SM90_BLOCK, perm int32 [N] or None,
    bh_order int32 [B * H]; qk_scale = softmax scale * log2(e). With ``perm``, k and v are
    ordered (ordered row i is original row perm[i]) and q, out and lse are not."""
    grid, args, meta = sm90_launch_args(q, k, v, out, lse, kv_num, kv_idx, perm, bh_order, num_q_blocks,
                                        num_kv_blocks, qk_scale, return_lse)
    _block_sparse_attention_sm90_kernel[grid](*args, **meta)

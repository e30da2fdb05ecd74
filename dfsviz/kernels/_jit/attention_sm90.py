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
through the order with plain loads and stores its output rows back the same way (their positions
loaded once, into shared memory).

FP8 (``dfsviz.kernels.fp8``): q and k are ordered e4m3 copies with one power-of-two scale per
block, folded into the softmax scale (the query block's once, each key block's per step); with
``fp8_pv`` v is an ordered e4m3 copy stored transposed ([B, H, D, N'], stride 1 along N: Hopper's
FP8 MMAs take P . V's second operand so) with one scale per channel and each 32 keys in the MMA's
order (``mma_key_order``), and P_SCALE * P is formed in e4m3 without an exponential (``p_e4m3``:
the byte round(8 (t - M)) + P_BYTE_ONE, M the running row max rounded up to an integer), as the
PyTorch simulation forms it, and relabelled into that order in registers; its row sums come from
a second MMA, P times a tile of e4m3 ones, beside P . V, and each consumer holds its Q rows in
registers (Q . K^T reads only K's tile from shared memory); otherwise v is
float16 / bfloat16 (ordered) and P . V runs in that dtype. Every FP8 output row is stored with
plain stores (through the order when there is one). The launcher in
``dfsviz.kernels._jit.attention`` chooses this kernel on compute capability 9.x, with Triton 3.6
or later (imported only then).
"""

from __future__ import annotations

import math

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

from dfsviz.kernels.fp8 import P_BYTE_ONE, P_SCALE

__all__ = ["SM90_BLOCK", "SM90_DTYPES", "SM90_HEAD_DIMS", "block_sparse_attention_sm90_fwd", "sm90_launch_args"]

#: What the kernel is built for: the mask's block (one CTA's query rows and one key tile),
#: head dims and dtypes.
SM90_BLOCK = 128
SM90_HEAD_DIMS = (64, 128)
SM90_DTYPES = {torch.float16: gl.float16, torch.bfloat16: gl.bfloat16}
# what the copy engine moves: the 16-bit inputs, and e4m3 for the FP8 calls
_DESCRIBED_DTYPES = SM90_DTYPES | {torch.float8_e4m3fn: gl.float8e4nv}

# Rows per consumer warpgroup: Hopper's warpgroup MMA multiplies 64-row tiles.
_ROWS = gl.constexpr(64)
_LN2 = gl.constexpr(0.6931471805599453)
# FP8_PV's P and l carry P_SCALE (a power of two): log2(P_SCALE) comes off the LSE
_LOG2_P_SCALE = gl.constexpr(math.log2(P_SCALE))
# FP8_PV's row sums: P times a [BLOCK, _ONES_COLS] tile of e4m3 ones, a second MMA beside P . V
# (every column holds the row sum; 8, the narrowest MMA, the least work), in place of a shift and
# an add per value in the softmax
_ONES_COLS = gl.constexpr(8)
_E4M3_ONE = gl.constexpr(0x38)  # the e4m3 byte of 1.0
_F16_STEP = gl.constexpr(2.0**-24)  # float16's subnormal step
_P_BYTE_ONE = gl.constexpr(float(P_BYTE_ONE))
# Shared-memory stages of K and V: two stages of two 128-row tiles at D 128 are 128 KB, beside
# the 32 KB of Q (the H200 has 227 KB per CTA). e4m3 tiles are half the bytes: FP8 calls take a
# third stage (a sweep of 2, 3 and 4 stages on one H200 at Wan2.1-14B 720p, gamma 0.2: "fp8" ran
# 7 % faster with the third, "fp8_pv" the same; the fourth added nothing:
# benchmarks/results/kernels_sm90_fp8_stages_h200.json).
_NUM_STAGES = 2
_FP8_NUM_STAGES = 3
# Registers per thread: 12 warps (two consumer warpgroups, the loader's warpgroup) share the
# 64 K registers of a multiprocessor at 168 each; the loader gives most of its share away.
_MAXNREG = 168
_CONSUMER_REGS = 240
_LOADER_REGS = 24
# A barrier over the calling partition's warps (Gluon renamed it in Triton 3.7)
_partition_barrier = gl.barrier if hasattr(gl, "barrier") else gl.thread_barrier


@gluon.jit
def _loader(desc_q, desc_k, desc_v, q_bufs, k_bufs, v_bufs, q_ready, k_ready, k_empty, v_ready, v_empty,
            b, h, row0, idx_ptr, num_kv, BLOCK: gl.constexpr, NUM_STAGES: gl.constexpr, GATHER_Q: gl.constexpr,
            V_TRANSPOSED: gl.constexpr):
    """The copy partition: both consumers' Q tiles (unless each consumer gathers its own through
    the order), then K and V of each kept key block into stage j % NUM_STAGES once both
    consumers released that stage's previous tiles (V_TRANSPOSED: v is [B, H, D, N])."""
    if not GATHER_Q:
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
        if V_TRANSPOSED:
            tma.async_copy_global_to_shared(desc_v, [b, h, 0, start], v_ready.index(stage), v_bufs.index(stage))
        else:
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
def _row_max(s):
    """The row maxima of s [64, BLOCK] (an MMA accumulator) in a shorter chain: each thread holds
    32 of a row's values, which one reduction folds one after another (32 dependent maxima);
    keys split as [4, BLOCK / 32, 8] (8: the quad's 2 x 4 of each 8 keys), each thread first
    folds 8 independent partial maxima of 4 values each, then those, then the quad shuffles as
    before. The same maxima (max is exact) and the same count of instructions."""
    BLOCK: gl.constexpr = s.shape[1]
    parts = gl.max(s.reshape([_ROWS, 4, BLOCK // 32, 8]), 2)
    return gl.convert_layout(gl.max(gl.max(parts, 1), 1), gl.SliceLayout(1, s.type.layout), assert_trivial=True)


@gluon.jit
def _online_softmax(s, m_i, l_i, qk_scale, P_FP8: gl.constexpr):
    """FlashAttention's online softmax in the log2 domain (qk_scale holds log2(e)). P_FP8: the
    running max is rounded up to an integer, so rescaling is by exact powers of two, and p holds
    P_SCALE * P's e4m3 byte without an exponential: 2^-24 (8 x + P_BYTE_ONE) in float32, x the
    log2-domain logit less the max, in one multiply-add with the softmax scale, which
    _e4m3_from_f16_steps rounds and clamps into the byte (dfsviz.kernels.fp8.p_e4m3's). Its row
    sums are left to the consumer's ones MMA and l_i is returned as it came."""
    if P_FP8:
        m_new = gl.maximum(m_i, gl.ceil(_row_max(s) * qk_scale))
        # float16's subnormals are steps of 2^-24: this value's count of them is the byte
        p = s * (qk_scale * (8.0 * _F16_STEP)) + ((_P_BYTE_ONE - 8.0 * m_new) * _F16_STEP)[:, None]
    else:
        m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
        p = gl.exp2(s * qk_scale - m_new[:, None])
        row_sum = gl.sum(p, 1)
    alpha = gl.exp2(m_i - m_new)
    if not P_FP8:
        l_i = l_i * alpha + row_sum
    return p, alpha, m_new, l_i

# _rescaled_unless_ones's products of 16 values, skipped when the warp's flag ($48) is 0
_RESCALE_16 = gl.constexpr("{ .reg .pred p; setp.ne.u32 p, $48, 0; @!p bra.uni SKIP; "
                           + " ".join(f"mul.f32 ${i}, ${16 + i}, ${32 + i};" for i in range(16)) + " SKIP: }")
_RESCALE_16_CONSTRAINTS = gl.constexpr(",".join(["=r"] * 16 + [str(i) for i in range(16)] + ["r"] * 32))


@gluon.jit
def _rescaled_unless_ones(acc, alpha):
    """acc [64, D] times alpha [64] per row, skipped by each warp whose 16 rows all have alpha
    exactly 1 (FP8_PV's running max moves by whole numbers, so most key blocks move none): a vote
    over the warp, then one branch per 16 values around their products."""
    # a thread's two rows (r and r + 8) in one vote: the flag covers the warp's 16
    moved = gl.inline_asm_elementwise(
        "{ .reg .pred p, q; setp.neu.f32 p, $2, 0f3F800000; setp.neu.f32 q, $3, 0f3F800000; or.pred p, p, q; "
        "vote.sync.any.pred p, p, -1; selp.u32 $0, 1, 0, p; selp.u32 $1, 1, 0, p; }",
        "=r,=r,r,r", [alpha], dtype=gl.int32, is_pure=True, pack=2)
    acc, scale = gl.broadcast(acc, alpha[:, None])
    acc, flag = gl.broadcast(acc, moved[:, None])
    return gl.inline_asm_elementwise(_RESCALE_16, _RESCALE_16_CONSTRAINTS, [acc, scale, flag], dtype=gl.float32,
                                     is_pure=True, pack=16)


@gluon.jit
def _e4m3_from_f16_steps(y):
    """The e4m3 values whose bits are round(y / 2^-24) (0 below 0; y < 2^-16): each two values
    converted to float16 with negatives clamped to 0 in one instruction (float16's subnormals are
    steps of 2^-24, so their bits are the rounded count), the four low bytes joined by one permute."""
    packed = gl.inline_asm_elementwise(
        "{ .reg .b32 lo, hi; cvt.rn.relu.f16x2.f32 lo, $2, $1; cvt.rn.relu.f16x2.f32 hi, $4, $3; "
        "prmt.b32 $0, lo, hi, 0x6420; }", "=r,f,f,f,f", [y], dtype=gl.int8, is_pure=True, pack=4)
    return packed.to(gl.float8e4nv, bitcast=True)


@gluon.jit
def _p_operand(p, p_dtype: gl.constexpr, p_layout: gl.constexpr, BLOCK: gl.constexpr, FP8_PV: gl.constexpr):
    """P as P . V's register operand. FP8_PV (p: _online_softmax's 2^-24 byte values): the keys of each
    32 relabelled in the order v8 stores them (``mma_key_order``), in which every thread's
    operand registers are its own accumulator values: a conversion without data movement
    (asserted), where moving P into the 8-bit operand layout took shuffles between threads. The
    values are relabelled, then packed: each packing builds an operand register (packed first, a
    byte permute more per two registers moved their halves)."""
    if FP8_PV:
        p = p.reshape([_ROWS, BLOCK // 32, 2, 2, 4, 2]).permute((0, 1, 2, 4, 3, 5)).reshape([_ROWS, BLOCK])
        p = _e4m3_from_f16_steps(gl.convert_layout(p, p_layout, assert_trivial=True))
    else:
        p = gl.convert_layout(p.to(p_dtype), p_layout)
    return p


@gluon.jit
def _stash_original_rows(PERM, start, N, rows_buf):
    """perm[start : start + 64] (0 past N), the original positions of a consumer's ordered rows, into
    rows_buf [64] in shared memory, one load a thread. Loaded in the rows' own layout, where each
    thread holds 8 of them, the loads went one after another (ptxas had one register for them):
    up to 8 trips to memory before the output's first store."""
    rows = start + gl.arange(0, _ROWS, layout=gl.BlockedLayout([1], [32], [4], [0]))
    rows_buf.store(gl.load(PERM + rows, mask=rows < N, other=0))
    _partition_barrier()


@gluon.jit
def _original_rows(rows_buf, start, N, HAS_ORDER: gl.constexpr, IO_LAYOUT: gl.constexpr):
    """(rows, in_range) of ordered rows [start, start + 64): their original positions (from
    _stash_original_rows's rows_buf; the rows themselves without an order) and whether they are
    below N, in the row slice of IO_LAYOUT."""
    rows = start + gl.arange(0, _ROWS, layout=gl.SliceLayout(1, IO_LAYOUT))
    in_range = rows < N
    if HAS_ORDER:
        rows = rows_buf.load(gl.SliceLayout(1, IO_LAYOUT))
    return rows, in_range


@gluon.jit
def _key_block_scaled(qk_scale, k_scale_ptr, idx_ptr, j, FP8: gl.constexpr):
    """The softmax scale of kept key block j: times its FP8 scale K_SCALE[b, h, idx[j]]."""
    if FP8:
        qk_scale = qk_scale * gl.load(k_scale_ptr + gl.load(idx_ptr + j))
    return qk_scale


@gluon.jit
def _row_pointers(X, b, h, rows, stride_b, stride_h, stride_n, HEAD_DIM: gl.constexpr, IO_LAYOUT: gl.constexpr):
    """Pointers [64, HEAD_DIM] to ``rows`` of head (b, h) of X [B, H, N, D] with unit stride along
    D (a head spans < 2**31 elements: the launcher checks)."""
    cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, IO_LAYOUT))
    head = X + (b.to(gl.int64) * stride_b + h.to(gl.int64) * stride_h)
    return head + (rows * stride_n)[:, None] + cols[None, :]


@gluon.jit
def _consumer(desc_o, Q, OUT, PERM, LSE, V_SCALE, q_bufs, k_bufs, v_bufs, ones_bufs, rows_bufs, q_ready, k_ready,
              k_empty, v_ready, v_empty, b, h, pid_bh, row0, idx_ptr, k_scale_ptr, num_kv, N, qk_scale, stride_qb,
              stride_qh, stride_qn, stride_ob, stride_oh, stride_on,
              HALF: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK: gl.constexpr, NUM_STAGES: gl.constexpr,
              RETURN_LSE: gl.constexpr, EVEN_N: gl.constexpr, HAS_ORDER: gl.constexpr, FP8: gl.constexpr,
              FP8_PV: gl.constexpr, IO_LAYOUT: gl.constexpr):
    """One consumer warpgroup: query rows [row0 + 64 HALF, + 64) against every kept key block.
    With an order these are ordered rows: the consumer gathers them from Q through PERM (unless
    FP8: q is an ordered copy, which the loader moves) and stores its output rows (and LSE) back
    at their original positions."""
    out_dtype: gl.constexpr = OUT.dtype.element_ty
    # one step of Hopper's MMAs covers 32 bytes of K: 16 elements of 16 bits, 32 of e4m3
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK, 32 if FP8 else 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_DIM, 32 if FP8_PV else 16])
    p_dtype: gl.constexpr = gl.float8e4nv if FP8_PV else out_dtype
    # P as the MMA's register operand: 32 bits of consecutive keys a register
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=4 if FP8_PV else 2)
    o_rows: gl.constexpr = gl.SliceLayout(1, o_layout)
    if FP8_PV:
        # P's row sums by P . ones, its own tile of ones (every column a row's sums): each key
        # block's on its own (use_acc=False), added up in float32 here (l_tile). Accumulated in
        # the MMA across blocks they would carry its sums, which keep fewer mantissa bits than
        # float32 with FP8 operands on Hopper (check_gpu's bounds), through every step.
        l_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, _ONES_COLS, 32])
        pl_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=l_layout, k_width=4)
        l_rows: gl.constexpr = gl.SliceLayout(1, l_layout)
        l_zero = gl.zeros([_ROWS, _ONES_COLS], gl.float32, l_layout)
        l_tile = l_zero
        ones = ones_bufs.index(HALF)
        # 1.0's byte bitcast: ptxas compiles the e4m3 conversion of a splat to a pack whose upper
        # half comes from an unset register (two bytes of each four wrong)
        ones_bits = gl.full([_ONES_COLS, BLOCK], _E4M3_ONE, gl.int8, gl.BlockedLayout([1, 16], [4, 8], [4, 1], [1, 0]))
        ones.store(ones_bits.to(gl.float8e4nv, bitcast=True))
        fence_async_shared()
        ones = ones.permute((1, 0))
    GATHER_Q: gl.constexpr = HAS_ORDER and not FP8
    # the output by the copy engine through Q's tile, or by plain stores (through the order, or
    # from an FP8 tile too small to stage it)
    STORE_ROWS: gl.constexpr = HAS_ORDER or FP8

    q = q_bufs.index(HALF).reshape([_ROWS, HEAD_DIM])
    s_zero = gl.zeros([_ROWS, BLOCK], gl.float32, s_layout)
    m_i = gl.full([_ROWS], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
    l_i = gl.zeros([_ROWS], gl.float32, gl.SliceLayout(1, s_layout))
    acc = gl.zeros([_ROWS, HEAD_DIM], gl.float32, o_layout)
    rows_buf = rows_bufs.index(HALF)
    if HAS_ORDER:
        _stash_original_rows(PERM, row0 + HALF * _ROWS, N, rows_buf)
    if GATHER_Q:
        src, in_range = _original_rows(rows_buf, row0 + HALF * _ROWS, N, True, IO_LAYOUT)
        rows = _row_pointers(Q, b, h, src, stride_qb, stride_qh, stride_qn, HEAD_DIM, IO_LAYOUT)
        q.store(gl.load(rows, mask=in_range[:, None], other=0.0))
        fence_async_shared()
    else:
        mbarrier.wait(q_ready.index(HALF), 0)
    if FP8_PV:  # Q . K^T's first operand held in registers (16 a thread): each step reads only K's
        # tile from shared memory. Not with bf16 P . V, whose P takes twice the registers: spills
        q = q.load(gl.DotOperandLayout(operand_index=0, parent=s_layout, k_width=4))
    if num_kv > 0:
        step_scale = _key_block_scaled(qk_scale, k_scale_ptr, idx_ptr, 0, FP8)
        mbarrier.wait(k_ready.index(0), 0)
        s = warpgroup_mma(q, k_bufs.index(0).reshape([BLOCK, HEAD_DIM]).permute((1, 0)), s_zero, use_acc=False)
        mbarrier.arrive(k_empty.index(0), count=1)
        s = _past_n_masked(s, idx_ptr, 0, N, BLOCK, EVEN_N, s_layout)
        p, alpha, m_i, l_i = _online_softmax(s, m_i, l_i, step_scale, FP8_PV)
        for j in range(num_kv - 1):
            # Issue Q . K^T of block j + 1, then P . V of block j, both asynchronous ...
            nxt = (j + 1) % NUM_STAGES
            step_scale = _key_block_scaled(qk_scale, k_scale_ptr, idx_ptr, j + 1, FP8)
            mbarrier.wait(k_ready.index(nxt), ((j + 1) // NUM_STAGES) & 1)
            k_next = k_bufs.index(nxt).reshape([BLOCK, HEAD_DIM]).permute((1, 0))
            s_token = warpgroup_mma(q, k_next, s_zero, use_acc=False, is_async=True)
            if FP8_PV:  # block j's factor, for the row sums up to block j - 1
                alpha_l = gl.convert_layout(alpha, l_rows)
            cur = j % NUM_STAGES
            mbarrier.wait(v_ready.index(cur), (j // NUM_STAGES) & 1)
            p_op = _p_operand(p, p_dtype, p_layout, BLOCK, FP8_PV)
            acc_token = warpgroup_mma(p_op, _v_operand(v_bufs, cur, HEAD_DIM, BLOCK, FP8_PV), acc, is_async=True)
            if FP8_PV:
                l_token = warpgroup_mma(gl.convert_layout(p_op, pl_layout, assert_trivial=True), ones, l_zero,
                                        use_acc=False, is_async=True)
            # ... and run block j + 1's softmax while P . V still runs (they complete in order).
            s = warpgroup_mma_wait(1, deps=[s_token])
            mbarrier.arrive(k_empty.index(nxt), count=1)
            s = _past_n_masked(s, idx_ptr, j + 1, N, BLOCK, EVEN_N, s_layout)
            p, alpha, m_i, l_i = _online_softmax(s, m_i, l_i, step_scale, FP8_PV)
            if FP8_PV:
                # Triton 3.6 does not lower an 8-bit operand of the wait: P's registers are left
                # to ptxas, which keeps a register operand of an asynchronous MMA live until its wait
                acc, l_blk = warpgroup_mma_wait(0, deps=[acc_token, l_token])
                l_tile = l_tile * alpha_l[:, None] + l_blk
            else:
                acc, p_op = warpgroup_mma_wait(0, deps=[acc_token, p_op])
            mbarrier.arrive(v_empty.index(cur), count=1)
            if FP8_PV:
                acc = _rescaled_unless_ones(acc, gl.convert_layout(alpha, o_rows))
            else:
                acc = acc * gl.convert_layout(alpha, o_rows)[:, None]
        last = (num_kv - 1) % NUM_STAGES
        mbarrier.wait(v_ready.index(last), ((num_kv - 1) // NUM_STAGES) & 1)
        p_op = _p_operand(p, p_dtype, p_layout, BLOCK, FP8_PV)
        acc = warpgroup_mma(p_op, _v_operand(v_bufs, last, HEAD_DIM, BLOCK, FP8_PV), acc)
        if FP8_PV:
            l_blk = warpgroup_mma(gl.convert_layout(p_op, pl_layout, assert_trivial=True), ones, l_zero,
                                  use_acc=False)
            l_tile = l_tile * gl.convert_layout(alpha, l_rows)[:, None] + l_blk
        mbarrier.arrive(v_empty.index(last), count=1)
    if FP8_PV:
        l_i = gl.convert_layout(gl.max(l_tile, 1), gl.SliceLayout(1, s_layout))

    # A query block with no kept key block has l = 0 and acc = 0: divide by 1 to output 0.
    l_safe = gl.where(num_kv > 0, gl.convert_layout(l_i, o_rows), 1.0)
    if FP8_PV:  # acc holds P_SCALE P . (V / channel scales); l carries P_SCALE too
        cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
        acc = acc * gl.load(V_SCALE + pid_bh.to(gl.int64) * HEAD_DIM + cols)[None, :]
        m_i = m_i - _LOG2_P_SCALE
    out = (acc / l_safe[:, None]).to(out_dtype)
    lse = (m_i + gl.log2(l_i)) * _LN2  # log2 domain back to natural log
    if STORE_ROWS:
        # the rows' positions again, from shared memory: keeping them from the Q gather through the
        # loop, which uses all the consumers' registers, spills more (76 bytes against 32 at D 128)
        dst, in_range = _original_rows(rows_buf, row0 + HALF * _ROWS, N, HAS_ORDER, IO_LAYOUT)
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
def _v_operand(v_bufs, stage, HEAD_DIM: gl.constexpr, BLOCK: gl.constexpr, V_TRANSPOSED: gl.constexpr):
    """Stage ``stage``'s V tile as P . V's second operand [BLOCK, HEAD_DIM]: a [HEAD_DIM, BLOCK]
    tile (keys contiguous, as FP8 MMAs take it) seen transposed, or the [BLOCK, HEAD_DIM] tile."""
    if V_TRANSPOSED:
        tile = v_bufs.index(stage).reshape([HEAD_DIM, BLOCK]).permute((1, 0))
    else:
        tile = v_bufs.index(stage).reshape([BLOCK, HEAD_DIM])
    return tile


@gluon.jit
def _block_sparse_attention_sm90_kernel(
    desc_q, desc_k, desc_v, desc_o, Q, OUT, PERM, LSE, KV_NUM, KV_IDX, BH_ORDER, Q_SCALE, K_SCALE, V_SCALE,
    stride_qb, stride_qh, stride_qn, stride_ob, stride_oh, stride_on, H, N, NUM_Q_BLOCKS, NUM_KV_BLOCKS, qk_scale,
    HEAD_DIM: gl.constexpr, BLOCK: gl.constexpr, NUM_STAGES: gl.constexpr, RETURN_LSE: gl.constexpr,
    EVEN_N: gl.constexpr, HAS_ORDER: gl.constexpr, FP8: gl.constexpr, FP8_PV: gl.constexpr,
    IO_LAYOUT: gl.constexpr, CONSUMER_REGS: gl.constexpr, LOADER_REGS: gl.constexpr,
):
    """Grid (Mq, B * H): query block program_id(0) of the (batch, head) BH_ORDER[program_id(1)]
    (heads with the most kept blocks first). The default partition (num_warps = 4) is the first
    consumer; the workers are the second consumer and the loader. With HAS_ORDER, k and v are
    ordered (the launcher's copies) while OUT stays in the original order, and so does Q unless
    FP8: the consumers move their rows through PERM with plain loads and stores (IO_LAYOUT), the
    copy engine moves whole boxes only. FP8: Q_SCALE [B * H, Mq] and K_SCALE [B * H, Mk] (and
    V_SCALE [B * H, D] with FP8_PV) scale the e4m3 inputs; placeholders otherwise."""
    pid_m = gl.program_id(0)
    pid_bh = gl.load(BH_ORDER + gl.program_id(1))
    b = pid_bh // H
    h = pid_bh % H
    mask_row = pid_bh.to(gl.int64) * NUM_Q_BLOCKS + pid_m
    num_kv = gl.load(KV_NUM + mask_row)
    idx_ptr = KV_IDX + mask_row * NUM_KV_BLOCKS
    k_scale_ptr = K_SCALE + pid_bh.to(gl.int64) * NUM_KV_BLOCKS
    if FP8:  # the query block's scale, once for all its logits
        qk_scale = qk_scale * gl.load(Q_SCALE + mask_row)
    row0 = pid_m * BLOCK

    q_bufs = gl.allocate_shared_memory(desc_q.dtype, [2] + desc_q.block_type.shape, desc_q.layout)
    k_bufs = gl.allocate_shared_memory(desc_k.dtype, [NUM_STAGES] + desc_k.block_type.shape, desc_k.layout)
    v_bufs = gl.allocate_shared_memory(desc_v.dtype, [NUM_STAGES] + desc_v.block_type.shape, desc_v.layout)
    # each consumer's [_ONES_COLS, BLOCK] tile of ones (FP8_PV's row sums; 2 KB, unread otherwise)
    ones_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([_ONES_COLS, BLOCK], gl.float8e4nv)
    ones_bufs = gl.allocate_shared_memory(gl.float8e4nv, [2, _ONES_COLS, BLOCK], ones_layout)
    # each consumer's original row positions (HAS_ORDER; 256 bytes, unread otherwise)
    rows_bufs = gl.allocate_shared_memory(gl.int32, [2, _ROWS], gl.SwizzledSharedLayout(1, 1, 1, [0]))
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
        (_consumer, (desc_o, Q, OUT, PERM, LSE, V_SCALE, q_bufs, k_bufs, v_bufs, ones_bufs, rows_bufs, q_ready,
                     k_ready, k_empty, v_ready, v_empty, b, h, pid_bh, row0, idx_ptr, k_scale_ptr, num_kv, N, qk_scale,
                     stride_qb, stride_qh, stride_qn, stride_ob, stride_oh, stride_on, 0, HEAD_DIM, BLOCK, NUM_STAGES,
                     RETURN_LSE, EVEN_N, HAS_ORDER, FP8, FP8_PV, IO_LAYOUT)),
        (_consumer, (desc_o, Q, OUT, PERM, LSE, V_SCALE, q_bufs, k_bufs, v_bufs, ones_bufs, rows_bufs, q_ready,
                     k_ready, k_empty, v_ready, v_empty, b, h, pid_bh, row0, idx_ptr, k_scale_ptr, num_kv, N, qk_scale,
                     stride_qb, stride_qh, stride_qn, stride_ob, stride_oh, stride_on, 1, HEAD_DIM, BLOCK, NUM_STAGES,
                     RETURN_LSE, EVEN_N, HAS_ORDER, FP8, FP8_PV, IO_LAYOUT)),
        (_loader, (desc_q, desc_k, desc_v, q_bufs, k_bufs, v_bufs, q_ready, k_ready, k_empty, v_ready, v_empty, b, h,
                   row0, idx_ptr, num_kv, BLOCK, NUM_STAGES, HAS_ORDER and not FP8, FP8_PV)),
    ], [4, 1], [CONSUMER_REGS, LOADER_REGS])


def _descriptor(x: torch.Tensor, rows: int, cols: int | None = None) -> TensorDescriptor:
    """x [B, H, R, C] (float16 / bfloat16 / e4m3, unit stride along C) moved in [1, 1, rows, cols]
    tiles (cols = C unless given; zeros past R and C on load, clipped on store)."""
    shape = [1, 1, rows, cols or x.shape[3]]
    layout = gl.NVMMASharedLayout.get_default_for(shape, _DESCRIBED_DTYPES[x.dtype])
    return TensorDescriptor(x, list(x.shape), list(x.stride()), shape, layout)


def sm90_launch_args(q, k, v, out, lse, kv_num, kv_idx, perm, bh_order, num_q_blocks: int, num_kv_blocks: int,
                     qk_scale: float, return_lse: bool, scales: tuple | None = None) -> tuple[tuple, tuple, dict]:
    """(grid, positional arguments, keyword arguments) of the kernel for these inputs (the
    launcher's, and what a compile-only build for a Hopper target takes). ``scales``: FP8's
    (q_scale, k_scale, v_scale or None) (block_sparse_attention_sm90_fwd)."""
    bsz, heads, n, d = q.shape
    fp8 = scales is not None
    fp8_pv = fp8 and scales[2] is not None
    q_scale, k_scale, v_scale = scales if fp8 else (kv_num, kv_num, None)  # placeholders without FP8
    # FP8_PV's v is [B, H, D, N]: its tiles hold D rows of a key block's keys
    v_tiles = _descriptor(v.transpose(-1, -2), d, SM90_BLOCK) if fp8_pv else _descriptor(v, SM90_BLOCK)
    args = (_descriptor(q, _ROWS.value), _descriptor(k, SM90_BLOCK), v_tiles, _descriptor(out, _ROWS.value), q, out,
            perm if perm is not None else kv_num, lse, kv_num, kv_idx, bh_order, q_scale, k_scale,
            v_scale if fp8_pv else kv_num, q.stride(0), q.stride(1), q.stride(2), out.stride(0), out.stride(1),
            out.stride(2), heads, n, num_q_blocks, num_kv_blocks, qk_scale)
    # Gathered rows: 16 bytes a thread, a row's D elements across consecutive threads.
    io_layout = gl.BlockedLayout([1, 8], [32 * 8 // d, d // 8], [4, 1], [1, 0])
    meta = dict(HEAD_DIM=d, BLOCK=SM90_BLOCK, NUM_STAGES=_FP8_NUM_STAGES if fp8 else _NUM_STAGES,
                RETURN_LSE=return_lse, EVEN_N=n % SM90_BLOCK == 0, HAS_ORDER=perm is not None, FP8=fp8, FP8_PV=fp8_pv,
                IO_LAYOUT=io_layout, CONSUMER_REGS=_CONSUMER_REGS, LOADER_REGS=_LOADER_REGS, num_warps=4,
                maxnreg=_MAXNREG)
    return (num_q_blocks, bsz * heads), args, meta


def block_sparse_attention_sm90_fwd(q, k, v, out, lse, kv_num, kv_idx, perm, bh_order, num_q_blocks: int,
                                    num_kv_blocks: int, qk_scale: float, return_lse: bool,
                                    scales: tuple | None = None) -> None:
    """Launch on validated, describable inputs: q, k, v, out [B, H, N, D] (float16 / bfloat16,
    D in SM90_HEAD_DIMS), lse float32 [B, H, N] (or a placeholder), the mask's int32 kv_num
    [B, H, Mq] and kv_idx [B, H, Mq, Mk] of block SM90_BLOCK, perm int32 [N] or None,
    bh_order int32 [B * H]; qk_scale = softmax scale * log2(e). With ``perm``, k and v are
    ordered (ordered row i is original row perm[i]) and q, out and lse are not.

    FP8 (``scales`` = (q_scale [B, H, Mq], k_scale [B, H, Mk], v_scale [B, H, D] or None), float32
    powers of two): q and k are e4m3 and ordered (``quantize_qk_fp8``'s); with v_scale v is the
    ordered e4m3 [B, H, N', D] view of a [B, H, D, N'] buffer in the MMA's key order
    (``quantize_attention_fp8_fwd(..., mma_order=True)``'s), else
    float16 / bfloat16 and ordered; out keeps the original order."""
    grid, args, meta = sm90_launch_args(q, k, v, out, lse, kv_num, kv_idx, perm, bh_order, num_q_blocks,
                                        num_kv_blocks, qk_scale, return_lse, scales)
    _block_sparse_attention_sm90_kernel[grid](*args, **meta)

"""Fused block scoring: the Triton kernels and their launcher (the method, the public function
and its validation are described in ``dfsviz.kernels.block_scores``)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dfsviz.kernels._dispatch import cuda_properties, interpreting
from dfsviz.sparse._validate import num_blocks

__all__ = ["SCORE_CONFIGS", "block_scores_fwd", "score_config_fits"]

_LOG2E = 1.4426950408889634


@triton.jit
def _tile_pool_kernel(
    Q, K, OUT, OUT_LO, UNSCALE, K_SCALED, stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, H, N, T,
    HEAD_DIM: tl.constexpr, TILE: tl.constexpr, SUB: tl.constexpr, BLOCK_T: tl.constexpr,
    TRUE_COUNT: tl.constexpr, SPLIT: tl.constexpr,
):
    """OUT[x, bh, t] = mean of the TILE tokens of tile t of x = q (axis 2 = 0) or k (1); tokens
    >= N count as zeros.

    SPLIT: the float32 mean row x is stored as float16 hi = fp16(x 2^-e) in OUT and
    lo = fp16(x 2^-e - hi) in OUT_LO (22 significant bits together), UNSCALE[x, bh, t] = 2^e:
    e = 0 while max|x| < 65504 (fits float16), else e = ceil(log2(max|x| / 2^14)), so that
    |hi| <= 2^14; K_SCALED (zeroed by the caller) becomes max e over k's tiles. Otherwise OUT
    is float32."""
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    which = tl.program_id(2)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    base = tl.where(which == 0, Q + b * stride_qb + h * stride_qh, K + b * stride_kb + h * stride_kh)
    stride_n = tl.where(which == 0, stride_qn, stride_kn)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_s = tl.arange(0, SUB)
    offs_d = tl.arange(0, HEAD_DIM)
    acc = tl.zeros([BLOCK_T, HEAD_DIM], dtype=tl.float32)
    # SUB consecutive rows per tile per step: whole 16-row runs are contiguous loads.
    for r0 in range(0, TILE, SUB):
        rows = offs_t[:, None] * TILE + r0 + offs_s[None, :]  # [BLOCK_T, SUB]
        x = tl.load(base + rows[:, :, None] * stride_n + offs_d[None, None, :],
                    mask=(rows < N)[:, :, None], other=0.0)
        acc += tl.sum(x.to(tl.float32), 1)
    if TRUE_COUNT:
        count = tl.minimum(tl.maximum(N - offs_t * TILE, 1), TILE).to(tl.float32)
        acc = acc / count[:, None]
    else:
        acc = acc / TILE  # the reference pools pad zeros into the mean
    row = which * tl.num_programs(1) + pid_bh  # (x, bh) of the [2, B * H] outputs
    t_ok = offs_t < T
    offs_out = row.to(tl.int64) * T * HEAD_DIM + offs_t[:, None] * HEAD_DIM + offs_d[None, :]
    if SPLIT:
        amax = tl.max(tl.abs(acc), 1)
        # The exponent of the largest float below max|x| is ceil(log2(max|x|)) - 1.
        below = amax.to(tl.int32, bitcast=True) - 1
        e = tl.where(amax < 65504.0, 0, (below >> 23) - (127 + 13))
        acc = acc * ((127 - e) << 23).to(tl.float32, bitcast=True)[:, None]  # x 2^-e, exact
        hi = acc.to(tl.float16)
        lo = (acc - hi.to(tl.float32)).to(tl.float16)
        tl.store(OUT + offs_out, hi, mask=t_ok[:, None])
        tl.store(OUT_LO + offs_out, lo, mask=t_ok[:, None])
        tl.store(UNSCALE + row.to(tl.int64) * T + offs_t, ((127 + e) << 23).to(tl.float32, bitcast=True), mask=t_ok)
        e_max = tl.max(e, 0)
        tl.atomic_max(K_SCALED, e_max, mask=(e_max > 0) & (which == 1))  # only for scaled key tiles
    else:
        tl.store(OUT + offs_out, acc, mask=t_ok[:, None])


@triton.jit
def _partials_slice(
    q, q_lo, row_scale, m_i, l_i, c, KT, KT_LO, K_UNSCALE, LP, head, offs_q, q_ok, T, MK,
    HEAD_DIM: tl.constexpr, TPB: tl.constexpr, BLOCK_TQ: tl.constexpr, BLOCK_TK: tl.constexpr,
    PRECISION: tl.constexpr, MASKED: tl.constexpr, COL_SCALE: tl.constexpr,
):
    """Slice c (BLOCK_TK key tiles) of _tile_partials_kernel: returns the new (m_i, l_i).
    MASKED: the last slice, which may cross T; the others need no masks. COL_SCALE: some
    key tile is scaled, so each logit column is multiplied by its tile's 2^e."""
    VPC: tl.constexpr = BLOCK_TK // TPB  # key blocks per slice
    offs_k = c * BLOCK_TK + tl.arange(0, BLOCK_TK)
    offs_d = tl.arange(0, HEAD_DIM)
    k_ptrs = (head + offs_k[:, None]) * HEAD_DIM + offs_d[None, :]
    offs_v = c * VPC + tl.arange(0, VPC)
    lp_ptrs = LP + (head + offs_q[:, None]) * MK + offs_v[None, :]
    if MASKED:
        k_ok = offs_k < T
        k = tl.load(KT + k_ptrs, mask=k_ok[:, None], other=0.0)
        k_lo = tl.load(KT_LO + k_ptrs, mask=k_ok[:, None], other=0.0)
    else:
        k = tl.load(KT + k_ptrs)
        k_lo = tl.load(KT_LO + k_ptrs)
    # fp16 hi/lo products: hi.hi + hi.lo + lo.hi on tensor cores, float32-level logits
    # (the dropped lo.lo term is ~2^-22 of the product); small terms first.
    if PRECISION == "ieee":  # the interpreter: exact float32 products of the fp16 parts
        s = tl.dot(q_lo.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
        s = tl.dot(q.to(tl.float32), tl.trans(k_lo.to(tl.float32)), s, input_precision="ieee")
        s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), s, input_precision="ieee")
    else:
        s = tl.dot(q_lo, tl.trans(k))
        s = tl.dot(q, tl.trans(k_lo), s)
        s = tl.dot(q, tl.trans(k), s)
    if COL_SCALE:  # the key tiles' 2^e; the query tiles' is in row_scale
        s = s * tl.load(K_UNSCALE + head + offs_k, mask=offs_k < T, other=1.0)[None, :]
    if MASKED:
        s = tl.where(k_ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1) * row_scale)
    p = tl.math.exp2(s * row_scale[:, None] - m_new[:, None])
    l_i = l_i * tl.math.exp2(m_i - m_new) + tl.sum(p, 1)
    # Each key block's partial sum, stored as m + log2(part): the running max travels
    # inside the value (log2 units).
    lp = m_new[:, None] + tl.math.log2(tl.sum(tl.reshape(p, [BLOCK_TQ, VPC, TPB]), 2))
    if MASKED:
        tl.store(lp_ptrs, lp, mask=q_ok[:, None] & (offs_v < MK)[None, :])
    else:
        tl.store(lp_ptrs, lp, mask=q_ok[:, None])
    return m_new, l_i


@triton.jit
def _partials_row(
    q, q_lo, row_scale, KT, KT_LO, K_UNSCALE, LP, head, offs_q, q_ok, T, MK, c0, c1,
    HEAD_DIM: tl.constexpr, TPB: tl.constexpr, BLOCK_TQ: tl.constexpr, BLOCK_TK: tl.constexpr,
    PRECISION: tl.constexpr, COL_SCALE: tl.constexpr, SPLIT: tl.constexpr,
):
    """Key slices [c0, c1) of _tile_partials_kernel for one program's query tiles: their (m_i, l_i).
    Without SPLIT the program walks them all (c0 = 0, c1 = the slice count)."""
    m_i = tl.full([BLOCK_TQ], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_TQ], dtype=tl.float32)
    full = T // BLOCK_TK  # slices that lie wholly inside T
    stop = full
    if SPLIT:
        stop = tl.minimum(c1, full)
    for c in range(c0, stop):
        m_i, l_i = _partials_slice(q, q_lo, row_scale, m_i, l_i, c, KT, KT_LO, K_UNSCALE, LP, head, offs_q, q_ok,
                                   T, MK, HEAD_DIM, TPB, BLOCK_TQ, BLOCK_TK, PRECISION, False, COL_SCALE)
    last = full * BLOCK_TK < T  # a short last slice exists
    if SPLIT:
        last = last & (c0 <= full) & (full < c1)  # ... and is this program's
    if last:
        m_i, l_i = _partials_slice(q, q_lo, row_scale, m_i, l_i, full, KT, KT_LO, K_UNSCALE, LP, head, offs_q, q_ok,
                                   T, MK, HEAD_DIM, TPB, BLOCK_TQ, BLOCK_TK, PRECISION, True, COL_SCALE)
    return m_i, l_i


@triton.jit
def _tile_partials_kernel(
    QT, KT, QT_LO, KT_LO, Q_UNSCALE, K_UNSCALE, K_SCALED, LP, MF, LF, T, MK, qk_scale,
    HEAD_DIM: tl.constexpr, TPB: tl.constexpr, BLOCK_TQ: tl.constexpr, BLOCK_TK: tl.constexpr,
    PRECISION: tl.constexpr, SPLITS: tl.constexpr,
):
    """Level one: online softmax over this program's share of the key tiles (split ``program_id(2)``
    of SPLITS); per slice, each key block's partial sum as a log; the split's (m_i, l_i)."""
    pid_q = tl.program_id(0)
    pid_bh = tl.program_id(1)
    split = tl.program_id(2)
    c0 = 0  # without splits one program walks every key slice (c0, c1 unused)
    c1 = 0
    if SPLITS > 1:
        slices = tl.cdiv(T, BLOCK_TK)
        per_split = tl.cdiv(slices, SPLITS)
        c0 = split * per_split
        c1 = tl.minimum(c0 + per_split, slices)
    offs_q = pid_q * BLOCK_TQ + tl.arange(0, BLOCK_TQ)
    offs_d = tl.arange(0, HEAD_DIM)
    q_ok = offs_q < T
    head = pid_bh.to(tl.int64) * T
    q_ptrs = (head + offs_q[:, None]) * HEAD_DIM + offs_d[None, :]
    q = tl.load(QT + q_ptrs, mask=q_ok[:, None], other=0.0)
    q_lo = tl.load(QT_LO + q_ptrs, mask=q_ok[:, None], other=0.0)
    # The parts hold x 2^-e per tile (e = 0 unless a mean overflows float16): the logits are
    # multiplied back by the query tile's 2^e on the row, the key tile's on the column, exactly.
    row_scale = tl.load(Q_UNSCALE + head + offs_q, mask=q_ok, other=1.0) * qk_scale
    if tl.load(K_SCALED) == 0:  # no key tile scaled (the usual case): no per-column multiply
        m_i, l_i = _partials_row(q, q_lo, row_scale, KT, KT_LO, K_UNSCALE, LP, head, offs_q, q_ok, T, MK, c0, c1,
                                 HEAD_DIM, TPB, BLOCK_TQ, BLOCK_TK, PRECISION, False, SPLITS > 1)
    else:
        m_i, l_i = _partials_row(q, q_lo, row_scale, KT, KT_LO, K_UNSCALE, LP, head, offs_q, q_ok, T, MK, c0, c1,
                                 HEAD_DIM, TPB, BLOCK_TQ, BLOCK_TK, PRECISION, True, SPLITS > 1)
    # A split with no slices (more splits than slices) stores m = -inf, l = 0: it adds nothing.
    if SPLITS > 1:
        head = (split * tl.num_programs(1) + pid_bh).to(tl.int64) * T
    tl.store(MF + head + offs_q, m_i, mask=q_ok)
    tl.store(LF + head + offs_q, l_i, mask=q_ok)


@triton.jit
def _tile_block_sum_kernel(
    LP, MF, LF, OUT, T, MQ, MK, BH,
    TPB: tl.constexpr, BLOCK_V: tl.constexpr, SPLITS: tl.constexpr,
):
    """Level two: combine the splits' (m, l), rescale each partial to the final max, normalise,
    add the rows of a query block."""
    pid_v = tl.program_id(0)
    pid_bh = tl.program_id(1)
    u = tl.program_id(2)
    head = pid_bh.to(tl.int64) * T
    offs_i = u * TPB + tl.arange(0, TPB)  # the query tiles of block u (all < T)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    v_ok = offs_v < MK
    log_part = tl.load(LP + (head + offs_i[:, None]) * MK + offs_v[None, :], mask=v_ok[None, :],
                       other=float("-inf"))
    m_fin = tl.load(MF + head + offs_i)  # split 0 always holds key tiles: m_fin is finite
    l_fin = tl.load(LF + head + offs_i)
    if SPLITS > 1:
        for s in tl.static_range(1, SPLITS):
            m_fin = tl.maximum(m_fin, tl.load(MF + (s * BH + pid_bh).to(tl.int64) * T + offs_i))
        l_fin = l_fin * tl.math.exp2(tl.load(MF + head + offs_i) - m_fin)
        for s in tl.static_range(1, SPLITS):
            split_head = (s * BH + pid_bh).to(tl.int64) * T
            l_fin += tl.load(LF + split_head + offs_i) * tl.math.exp2(tl.load(MF + split_head + offs_i) - m_fin)
    w = tl.math.exp2(log_part - m_fin[:, None]) / l_fin[:, None]
    out_ptrs = OUT + (pid_bh.to(tl.int64) * MQ + u) * MK + offs_v
    tl.store(out_ptrs, tl.sum(w, 0), mask=v_ok)


@triton.jit
def _pooled_logits_kernel(
    QB, KB, OUT, MQ, MK, scale,
    HEAD_DIM: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_V: tl.constexpr, PRECISION: tl.constexpr,
):
    """meanpool: OUT[bh, u, v] = qbar_u . kbar_v * scale."""
    pid_u = tl.program_id(0)
    pid_v = tl.program_id(1)
    pid_bh = tl.program_id(2)
    offs_u = pid_u * BLOCK_U + tl.arange(0, BLOCK_U)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    offs_d = tl.arange(0, HEAD_DIM)
    head_q = pid_bh.to(tl.int64) * MQ
    head_k = pid_bh.to(tl.int64) * MK
    qb = tl.load(QB + (head_q + offs_u[:, None]) * HEAD_DIM + offs_d[None, :], mask=(offs_u < MQ)[:, None], other=0.0)
    kb = tl.load(KB + (head_k + offs_v[:, None]) * HEAD_DIM + offs_d[None, :], mask=(offs_v < MK)[:, None], other=0.0)
    logits = tl.dot(qb, tl.trans(kb), input_precision=PRECISION) * scale
    tl.store(OUT + (head_q + offs_u[:, None]) * MK + offs_v[None, :], logits,
             mask=(offs_u < MQ)[:, None] & (offs_v < MK)[None, :])


#: Launch space, as data: one entry per kernel stage (tile sizes, warps, pipeline stages).
SCORE_CONFIGS = [
    dict(stage="pool", BLOCK_T=4, num_warps=2, num_stages=1),
    dict(stage="partials", BLOCK_TQ=128, BLOCK_TK=64, num_warps=8, num_stages=2),
    dict(stage="partials", BLOCK_TQ=128, BLOCK_TK=64, num_warps=4, num_stages=2),
    dict(stage="partials", BLOCK_TQ=64, BLOCK_TK=128, num_warps=4, num_stages=2),
    dict(stage="partials", BLOCK_TQ=64, BLOCK_TK=64, num_warps=4, num_stages=3),
    dict(stage="partials", BLOCK_TQ=64, BLOCK_TK=32, num_warps=4, num_stages=3),
    dict(stage="partials", BLOCK_TQ=32, BLOCK_TK=64, num_warps=4, num_stages=2),
    dict(stage="partials", BLOCK_TQ=64, BLOCK_TK=64, num_warps=4, num_stages=2),
    dict(stage="block_sum", BLOCK_V=64, num_warps=4, num_stages=1),
    dict(stage="logits", BLOCK_U=64, BLOCK_V=64, num_warps=4, num_stages=1),
]


def score_config_fits(config: dict, tiles_per_block: int) -> bool:
    """Pruning predicate: a partials slice must hold whole key blocks (BLOCK_TK % tiles per block)."""
    return config["stage"] != "partials" or config["BLOCK_TK"] % tiles_per_block == 0


def _prune_partials(configs, named_args, **kwargs):
    tpb = {**named_args, **kwargs}["TPB"]
    return [c for c in configs if score_config_fits({"stage": "partials", **c.all_kwargs()}, tpb)]


_TUNED_PARTIALS = triton.autotune(
    configs=[
        triton.Config({"BLOCK_TQ": c["BLOCK_TQ"], "BLOCK_TK": c["BLOCK_TK"]}, num_warps=c["num_warps"],
                      num_stages=c["num_stages"])
        for c in SCORE_CONFIGS if c["stage"] == "partials"
    ],
    key=["T", "HEAD_DIM", "TPB", "SPLITS"],
    prune_configs_by={"early_config_prune": _prune_partials},
)(_tile_partials_kernel)


#: Key-tile splits: enough partials programs for about this many per multiprocessor (counted
#: at 64 query tiles a program), at most _MAX_KEY_SPLITS; the interpreter assumes a few SMs.
_PROGRAMS_PER_SM = 8
_MAX_KEY_SPLITS = 8
_INTERPRETED_SMS = 2


def _key_splits(num_tiles: int, batch_heads: int, device: torch.device) -> int:
    """How many programs share one query-tile row's key tiles: 1 when the B x H heads and their
    query tiles alone fill the GPU (Wan2.1-14B), more for short sequences and few heads (Wan2.1-1.3B)."""
    sms = _INTERPRETED_SMS if interpreting() else cuda_properties(device).multi_processor_count
    programs = triton.cdiv(num_tiles, 64) * batch_heads
    return max(1, min(_MAX_KEY_SPLITS, triton.cdiv(_PROGRAMS_PER_SM * sms, programs)))


def _config(stage: str, tiles_per_block: int = 1) -> dict:
    fits = [c for c in SCORE_CONFIGS if c["stage"] == stage and score_config_fits(c, tiles_per_block)]
    # The interpreter pays per program and per loop step, so it takes the last (smallest) fit.
    return fits[-1] if interpreting() else fits[0]


def _pool(q: torch.Tensor, k: torch.Tensor, tile: int, num_tiles: int, true_count: bool, split: bool = False):
    """Tile means of q and k, one launch: float32 [2, B, H, T, D] (q's, k's), or when ``split``
    float16 parts (hi, lo) of x 2^-e, the power-of-two unscales 2^e (float32 [2, B, H, T]) and
    the largest e of k's tiles (int32 [1])."""
    bsz, heads, n, d = q.shape
    shape = (2, bsz, heads, num_tiles, d)
    out = torch.empty(shape, dtype=torch.float16 if split else torch.float32, device=q.device)
    out_lo = torch.empty(shape, dtype=torch.float16, device=q.device) if split else out
    unscale = torch.empty(shape[:-1], dtype=torch.float32, device=q.device) if split else out
    k_scaled = torch.zeros(1, dtype=torch.int32, device=q.device) if split else out
    cfg = _config("pool")
    grid = (triton.cdiv(num_tiles, cfg["BLOCK_T"]), bsz * heads, 2)
    _tile_pool_kernel[grid](
        q, k, out, out_lo, unscale, k_scaled, *q.stride()[:3], *k.stride()[:3], heads, n, num_tiles,
        HEAD_DIM=d, TILE=tile, SUB=min(tile, 16), BLOCK_T=cfg["BLOCK_T"], TRUE_COUNT=true_count, SPLIT=split,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return (out, out_lo, unscale, k_scaled) if split else out


def block_scores_fwd(q, k, method: str, tile: int, block: int, scale: float) -> torch.Tensor:
    """Launch on validated inputs: q, k [B, H, N, D] with unit stride along D, ``method`` in
    FUSED_METHODS, ``tile`` resolved (dfs_tile), ``block`` a power of two, ``scale`` resolved."""
    bsz, heads, n, d = q.shape
    m = num_blocks(n, block)
    precision = "ieee" if interpreting() else "tf32x3"
    out = torch.empty((bsz, heads, m, m), dtype=torch.float32, device=q.device)

    if method == "meanpool":
        qb, kb = _pool(q, k, block, m, True)  # Mq x Mk logits: float32 is cheap
        cfg = _config("logits")
        grid = (triton.cdiv(m, cfg["BLOCK_U"]), triton.cdiv(m, cfg["BLOCK_V"]), bsz * heads)
        _pooled_logits_kernel[grid](
            qb, kb, out, m, m, float(scale), HEAD_DIM=d, BLOCK_U=cfg["BLOCK_U"], BLOCK_V=cfg["BLOCK_V"],
            PRECISION=precision, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
        return out

    # Four launches (zeroing, pool, partials, block sums), no host sync: the scales stay on the device.
    tpb = block // tile
    num_tiles = m * tpb  # tiles of the sequence zero-padded to m * block tokens
    hi, lo, unscale, k_scaled = _pool(q, k, tile, num_tiles, False, split=True)
    log_partials = torch.empty((bsz, heads, num_tiles, m), dtype=torch.float32, device=q.device)
    splits = _key_splits(num_tiles, bsz * heads, q.device)
    m_split = torch.empty((splits, bsz, heads, num_tiles), dtype=torch.float32, device=q.device)
    l_split = torch.empty_like(m_split)
    args = (hi[0], hi[1], lo[0], lo[1], unscale[0], unscale[1], k_scaled, log_partials, m_split, l_split, num_tiles, m)
    meta = dict(HEAD_DIM=d, TPB=tpb, PRECISION=precision, SPLITS=splits)
    if interpreting():
        cfg = _config("partials", tpb)
        grid = (triton.cdiv(num_tiles, cfg["BLOCK_TQ"]), bsz * heads, splits)
        _tile_partials_kernel[grid](*args, float(scale) * _LOG2E, **meta, BLOCK_TQ=cfg["BLOCK_TQ"],
                                    BLOCK_TK=cfg["BLOCK_TK"], num_warps=cfg["num_warps"],
                                    num_stages=cfg["num_stages"])
    else:
        grid = lambda META: (triton.cdiv(num_tiles, META["BLOCK_TQ"]), bsz * heads, splits)  # noqa: E731
        _TUNED_PARTIALS[grid](*args, float(scale) * _LOG2E, **meta)
    cfg2 = _config("block_sum")
    grid = (triton.cdiv(m, cfg2["BLOCK_V"]), bsz * heads, m)
    _tile_block_sum_kernel[grid](
        log_partials, m_split, l_split, out, num_tiles, m, m, bsz * heads,
        TPB=tpb, BLOCK_V=cfg2["BLOCK_V"], SPLITS=splits, num_warps=cfg2["num_warps"], num_stages=cfg2["num_stages"],
    )
    return out



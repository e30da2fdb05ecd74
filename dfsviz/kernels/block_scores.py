"""Fused block scoring in Triton, twin of ``dfsviz.sparse.scoring.block_scores_ref``.

Methods ``dfs_tile`` (DFSAttn hierarchical scoring) and ``meanpool``; the other
registered scorers (``antidiagonal``, ``oracle``) run their reference.

dfs_tile without the tile-score matrix. The scores are
S_uv = sum_{i' in u} sum_{j' in v} exp(s_i'j' - lse_i'), s = qbar . kbar * scale over
tiles of the zero-padded sequence. The softmax normaliser lse_i' needs every key tile
of the row, but the block sums need it before rows may be added up. Two options:

1. two passes over the key tiles (first lse_i', then the normalised block sums), which
   computes every tile logit twice;
2. a two-level scheme (used here): one pass keeps FlashAttention's running max m_i' and
   sum l_i' per query tile and, for each slice of BLOCK_TK key tiles, writes the slice's
   per-(query tile, key block) sum of exp(s - m_i'(now)) as m_i'(now) + log(sum), so the
   running max it used travels with it. A second, tiny kernel turns each entry into
   exp(entry - m_i'(final)) / l_i' and adds the rows of each query block.

Option 2 computes each tile logit once; its scratch is O(T x Mk) floats (T = N / tile
tiles), 1/tile of the O(N x Mk) the statistics pass may use, and never T x T.
Pooling is a separate memory-bound kernel: every query tile needs all key tiles.

Precision: tiles are pooled in float32 like the reference. Each mean x is then split into
float16 parts hi = fp16(x), lo = fp16(x - hi) (22 significant bits together) and the tile
logits are hi.hi + hi.lo + lo.hi on fp16 tensor cores with float32 accumulation: float32-
level logits at three fp16 matrix products, about half the cost of 3xTF32 and without
its per-iteration operand splitting. Means that overflow float16 (|x| >= 65504, never for
float16 inputs; checked with one flag read otherwise) fall back to float32 tiles with
3xTF32 products. The interpreter computes the same products exactly in float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dfsviz.kernels._dispatch import check_kernel_input, interpreting, resolve_backend
from dfsviz.sparse._validate import check_power_of_two, check_qk, num_blocks
from dfsviz.sparse.scoring import SCORERS, block_scores_ref, scorer_names

__all__ = ["block_scores", "FUSED_METHODS", "SCORE_CONFIGS", "score_config_fits"]

_LOG2E = 1.4426950408889634
#: Methods with a Triton kernel; other registered scorers run their PyTorch reference.
FUSED_METHODS = ("dfs_tile", "meanpool")


@triton.jit
def _tile_pool_kernel(
    X, OUT, OUT_LO, FLAG, stride_xb, stride_xh, stride_xn, H, N, T,
    HEAD_DIM: tl.constexpr, TILE: tl.constexpr, SUB: tl.constexpr, BLOCK_T: tl.constexpr,
    TRUE_COUNT: tl.constexpr, SPLIT: tl.constexpr,
):
    """OUT[bh, t] = mean of the TILE tokens of tile t; tokens >= N count as zeros.

    SPLIT: the float32 mean x is stored as float16 hi = fp16(x) in OUT and lo = fp16(x - hi)
    in OUT_LO (22 significant bits together); FLAG is raised if |x| overflows float16.
    Otherwise OUT is float32."""
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_s = tl.arange(0, SUB)
    offs_d = tl.arange(0, HEAD_DIM)
    base = X + b.to(tl.int64) * stride_xb + h.to(tl.int64) * stride_xh
    acc = tl.zeros([BLOCK_T, HEAD_DIM], dtype=tl.float32)
    # SUB consecutive rows per tile per step: whole 16-row runs are contiguous loads.
    for r0 in range(0, TILE, SUB):
        rows = offs_t[:, None] * TILE + r0 + offs_s[None, :]  # [BLOCK_T, SUB]
        x = tl.load(base + rows[:, :, None] * stride_xn + offs_d[None, None, :],
                    mask=(rows < N)[:, :, None], other=0.0)
        acc += tl.sum(x.to(tl.float32), 1)
    if TRUE_COUNT:
        count = tl.minimum(tl.maximum(N - offs_t * TILE, 1), TILE).to(tl.float32)
        acc = acc / count[:, None]
    else:
        acc = acc / TILE  # the reference pools pad zeros into the mean
    offs_out = pid_bh.to(tl.int64) * T * HEAD_DIM + offs_t[:, None] * HEAD_DIM + offs_d[None, :]
    if SPLIT:
        hi = acc.to(tl.float16)
        lo = (acc - hi.to(tl.float32)).to(tl.float16)
        tl.store(OUT + offs_out, hi, mask=(offs_t < T)[:, None])
        tl.store(OUT_LO + offs_out, lo, mask=(offs_t < T)[:, None])
        too_big = tl.max(tl.max(tl.abs(acc), 1), 0) >= 65504.0
        tl.atomic_max(FLAG, too_big.to(tl.int32))
    else:
        tl.store(OUT + offs_out, acc, mask=(offs_t < T)[:, None])


@triton.jit
def _tile_partials_kernel(
    QT, KT, QT_LO, KT_LO, LP, MF, LF, T, MK, qk_scale,
    HEAD_DIM: tl.constexpr, TPB: tl.constexpr, BLOCK_TQ: tl.constexpr, BLOCK_TK: tl.constexpr,
    SPLIT: tl.constexpr, PRECISION: tl.constexpr,
):
    """Level one: online softmax over key tiles; per slice, each key block's partial sum as a log."""
    pid_q = tl.program_id(0)
    pid_bh = tl.program_id(1)
    VPC: tl.constexpr = BLOCK_TK // TPB  # key blocks per slice
    offs_q = pid_q * BLOCK_TQ + tl.arange(0, BLOCK_TQ)
    offs_d = tl.arange(0, HEAD_DIM)
    q_ok = offs_q < T
    head = pid_bh.to(tl.int64) * T
    q_ptrs = (head + offs_q[:, None]) * HEAD_DIM + offs_d[None, :]
    q = tl.load(QT + q_ptrs, mask=q_ok[:, None], other=0.0)
    if SPLIT:
        q_lo = tl.load(QT_LO + q_ptrs, mask=q_ok[:, None], other=0.0)
    m_i = tl.full([BLOCK_TQ], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_TQ], dtype=tl.float32)
    for c in range(0, tl.cdiv(T, BLOCK_TK)):
        offs_k = c * BLOCK_TK + tl.arange(0, BLOCK_TK)
        k_ok = offs_k < T
        k_ptrs = (head + offs_k[:, None]) * HEAD_DIM + offs_d[None, :]
        k = tl.load(KT + k_ptrs, mask=k_ok[:, None], other=0.0)
        if SPLIT:
            # fp16 hi/lo products: hi.hi + hi.lo + lo.hi on tensor cores, float32-level logits
            # (the dropped lo.lo term is ~2^-22 of the product); small terms first.
            k_lo = tl.load(KT_LO + k_ptrs, mask=k_ok[:, None], other=0.0)
            if PRECISION == "ieee":  # the interpreter: exact float32 products of the fp16 parts
                s = tl.dot(q_lo.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
                s = tl.dot(q.to(tl.float32), tl.trans(k_lo.to(tl.float32)), s, input_precision="ieee")
                s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), s, input_precision="ieee")
            else:
                s = tl.dot(q_lo, tl.trans(k))
                s = tl.dot(q, tl.trans(k_lo), s)
                s = tl.dot(q, tl.trans(k), s)
        else:
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        s = tl.where(k_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        p = tl.math.exp2(s * qk_scale - m_new[:, None])
        l_i = l_i * tl.math.exp2(m_i - m_new) + tl.sum(p, 1)
        m_i = m_new
        part = tl.sum(tl.reshape(p, [BLOCK_TQ, VPC, TPB]), 2)  # [BLOCK_TQ, VPC] per key block
        # Stored as m + log2(part): the running max travels inside the value (log2 units).
        offs_v = c * VPC + tl.arange(0, VPC)
        tl.store(LP + (head + offs_q[:, None]) * MK + offs_v[None, :], m_new[:, None] + tl.math.log2(part),
                 mask=q_ok[:, None] & (offs_v < MK)[None, :])
    tl.store(MF + head + offs_q, m_i, mask=q_ok)
    tl.store(LF + head + offs_q, l_i, mask=q_ok)


@triton.jit
def _tile_block_sum_kernel(
    LP, MF, LF, OUT, T, MQ, MK,
    TPB: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Level two: rescale each partial to the final max, normalise, add the rows of a query block."""
    pid_v = tl.program_id(0)
    pid_bh = tl.program_id(1)
    u = tl.program_id(2)
    head = pid_bh.to(tl.int64) * T
    offs_i = u * TPB + tl.arange(0, TPB)  # the query tiles of block u (all < T)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    v_ok = offs_v < MK
    log_part = tl.load(LP + (head + offs_i[:, None]) * MK + offs_v[None, :], mask=v_ok[None, :],
                       other=float("-inf"))
    m_fin = tl.load(MF + head + offs_i)
    l_fin = tl.load(LF + head + offs_i)
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
    dict(stage="pool", BLOCK_T=4, num_warps=4, num_stages=1),
    dict(stage="partials", BLOCK_TQ=128, BLOCK_TK=64, num_warps=8, num_stages=2),
    dict(stage="partials", BLOCK_TQ=128, BLOCK_TK=64, num_warps=4, num_stages=2),
    dict(stage="partials", BLOCK_TQ=64, BLOCK_TK=128, num_warps=4, num_stages=2),
    dict(stage="partials", BLOCK_TQ=64, BLOCK_TK=64, num_warps=4, num_stages=3),
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
    key=["T", "HEAD_DIM", "TPB", "SPLIT"],
    prune_configs_by={"early_config_prune": _prune_partials},
)(_tile_partials_kernel)


def _config(stage: str, tiles_per_block: int = 1) -> dict:
    fits = [c for c in SCORE_CONFIGS if c["stage"] == stage and score_config_fits(c, tiles_per_block)]
    # The interpreter pays per program and per loop step, so it takes the last (smallest) fit.
    return fits[-1] if interpreting() else fits[0]


def _pool(x: torch.Tensor, tile: int, num_tiles: int, true_count: bool, split: bool = False):
    """Tile means [B, H, T, D]: float32, or (hi, lo, overflow flag) float16 parts when ``split``."""
    bsz, heads, n, d = x.shape
    shape = (bsz, heads, num_tiles, d)
    out = torch.empty(shape, dtype=torch.float16 if split else torch.float32, device=x.device)
    out_lo = torch.empty(shape, dtype=torch.float16, device=x.device) if split else out
    flag = torch.zeros(1, dtype=torch.int32, device=x.device)
    cfg = _config("pool")
    grid = (triton.cdiv(num_tiles, cfg["BLOCK_T"]), bsz * heads)
    _tile_pool_kernel[grid](
        x, out, out_lo, flag, x.stride(0), x.stride(1), x.stride(2), heads, n, num_tiles,
        HEAD_DIM=d, TILE=tile, SUB=min(tile, 16), BLOCK_T=cfg["BLOCK_T"], TRUE_COUNT=true_count, SPLIT=split,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return (out, out_lo, flag) if split else out


def _block_scores_fwd(q, k, method="dfs_tile", tile=None, block=128, scale=None):
    check_qk(q, k)
    if method not in SCORERS:
        raise ValueError(f"`method` must be one of {scorer_names()} (got {method!r})")
    check_power_of_two(block, "block", 16, 256)
    tile = SCORERS[method].resolve_tile(tile, block)
    check_kernel_input(q)
    bsz, heads, n, d = q.shape
    if scale is None:
        scale = d**-0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale < float("inf"):
        raise ValueError(f"`scale` must be a positive finite number or None for D ** -0.5 (got {scale!r})")
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    m = num_blocks(n, block)
    precision = "ieee" if interpreting() else "tf32x3"
    out = torch.empty((bsz, heads, m, m), dtype=torch.float32, device=q.device)

    if method == "meanpool":
        qb, kb = _pool(q, block, m, True), _pool(k, block, m, True)  # Mq x Mk logits: float32 is cheap
        cfg = _config("logits")
        grid = (triton.cdiv(m, cfg["BLOCK_U"]), triton.cdiv(m, cfg["BLOCK_V"]), bsz * heads)
        _pooled_logits_kernel[grid](
            qb, kb, out, m, m, float(scale), HEAD_DIM=d, BLOCK_U=cfg["BLOCK_U"], BLOCK_V=cfg["BLOCK_V"],
            PRECISION=precision, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
        return out

    tpb = block // tile
    num_tiles = m * tpb  # tiles of the sequence zero-padded to m * block tokens
    qt, qt_lo, q_flag = _pool(q, tile, num_tiles, False, split=True)
    kt, kt_lo, k_flag = _pool(k, tile, num_tiles, False, split=True)
    # fp16 means of fp16 inputs cannot overflow; for others one flag read (a sync) checks it.
    if q.dtype != torch.float16 and bool((q_flag + k_flag).item()):
        qt = qt_lo = _pool(q, tile, num_tiles, False)
        kt = kt_lo = _pool(k, tile, num_tiles, False)
        split = False
    else:
        split = True
    log_partials = torch.empty((bsz, heads, num_tiles, m), dtype=torch.float32, device=q.device)
    m_fin = torch.empty((bsz, heads, num_tiles), dtype=torch.float32, device=q.device)
    l_fin = torch.empty_like(m_fin)
    args = (qt, kt, qt_lo, kt_lo, log_partials, m_fin, l_fin, num_tiles, m)
    meta = dict(HEAD_DIM=d, TPB=tpb, SPLIT=split, PRECISION=precision)
    if interpreting():
        cfg = _config("partials", tpb)
        grid = (triton.cdiv(num_tiles, cfg["BLOCK_TQ"]), bsz * heads)
        _tile_partials_kernel[grid](*args, float(scale) * _LOG2E, **meta, BLOCK_TQ=cfg["BLOCK_TQ"],
                                    BLOCK_TK=cfg["BLOCK_TK"], num_warps=cfg["num_warps"],
                                    num_stages=cfg["num_stages"])
    else:
        grid = lambda META: (triton.cdiv(num_tiles, META["BLOCK_TQ"]), bsz * heads)  # noqa: E731
        _TUNED_PARTIALS[grid](*args, float(scale) * _LOG2E, **meta)
    cfg2 = _config("block_sum")
    grid = (triton.cdiv(m, cfg2["BLOCK_V"]), bsz * heads, m)
    _tile_block_sum_kernel[grid](
        log_partials, m_fin, l_fin, out, num_tiles, m, m,
        TPB=tpb, BLOCK_V=cfg2["BLOCK_V"], num_warps=cfg2["num_warps"], num_stages=cfg2["num_stages"],
    )
    return out


def block_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    method: str = "dfs_tile",
    tile: int | None = None,
    block: int = 128,
    scale: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Block scores of every (query block, key block) pair (Triton kernel or reference).

    Args:
        q, k: [B, H, N, D] float16 / bfloat16 / float32 (D in {64, 128} for Triton), one
            device, already in the token order whose blocks are scored.
        method: "dfs_tile" or "meanpool" run fused kernels; any other name from
            ``dfsviz.sparse.scoring.scorer_names()`` runs its reference.
        tile: dfs_tile pooling tile b (default 16), a power of two dividing ``block``.
        block: tokens per block, a power of two in [16, 256].
        scale: softmax scale, default D**-0.5.
        backend: None (Triton on CUDA, else reference; env DFSVIZ_KERNEL_BACKEND),
            "triton" or "ref".

    Returns:
        float32 [B, H, Mq, Mk], Mq = Mk = ceil(N / block), as ``block_scores_ref``.
    """
    tensors = [x for x in (q, k) if isinstance(x, torch.Tensor)]
    which = resolve_backend(backend, *tensors) if len(tensors) == 2 else "ref"
    if which == "ref" or method not in FUSED_METHODS:
        return block_scores_ref(q, k, method=method, tile=tile, block=block, scale=scale)
    return _block_scores_fwd(q, k, method=method, tile=tile, block=block, scale=scale)

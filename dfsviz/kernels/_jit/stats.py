"""Streaming block statistics: the Triton kernel and its launcher (the method, the public
function and its validation are described in ``dfsviz.kernels.block_stats``)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dfsviz.kernels._dispatch import interpreting
from dfsviz.sparse._validate import num_blocks
from dfsviz.sparse.stats import BlockStats

__all__ = ["SCRATCH_BYTES", "STATS_CONFIGS", "block_stats_fwd", "stats_config_fits"]

_LOG2E = 1.4426950408889634
#: Most scratch bytes (lse_iv of the heads in flight) one launch may allocate.
SCRATCH_BYTES = 2 * 2**30


@triton.jit
def _stats_block(
    q, k_base, offs_d, kv_start, stride_kn, N, qk_scale, scale,
    BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Per row of q against key block [kv_start, kv_start + BLOCK): (lse_iv in log2 units, row logit sum)."""
    t_max = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    sum_exp = tl.zeros([BLOCK], dtype=tl.float32)
    sum_l = tl.zeros([BLOCK], dtype=tl.float32)
    for c in range(0, BLOCK // BLOCK_N):
        offs_n = kv_start + c * BLOCK_N + tl.arange(0, BLOCK_N)
        k_ptrs = k_base + offs_n[:, None] * stride_kn + offs_d[None, :]
        if MASKED:
            k = tl.load(k_ptrs, mask=(offs_n < N)[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs)
        if UPCAST:
            s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision=PRECISION)
        else:
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        if MASKED:
            # Padding keys: 0 in the logit sum (k = 0 gives s = 0), -inf in the max and the exponentials.
            s_max = tl.where((offs_n < N)[None, :], s, float("-inf"))
        else:
            s_max = s
        # log2 units (scale * log2 e folded into one multiply) so the exponentials are exp2.
        new_max = tl.maximum(t_max, tl.max(s_max, 1) * qk_scale)
        p = tl.math.exp2(s_max * qk_scale - new_max[:, None])
        sum_exp = sum_exp * tl.math.exp2(t_max - new_max) + tl.sum(p, 1)
        t_max = new_max
        sum_l += tl.sum(s, 1)
    return t_max + tl.math.log2(sum_exp), sum_l * scale


@triton.jit
def _block_stats_kernel(
    Q, K, M, L, R, J, LSE, SCR,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    H, N, MB, head0, qk_scale, scale,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_N: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_u = tl.program_id(0)
    local_bh = tl.program_id(1)
    bh = head0 + local_bh
    b = bh // H
    h = bh % H
    LN2: tl.constexpr = 0.6931471805599453

    offs_m = pid_u * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < N
    n_u = tl.minimum(N - pid_u * BLOCK, BLOCK).to(tl.float32)
    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    k_base = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    q = tl.load(q_base + offs_m[:, None] * stride_qn + offs_d[None, :], mask=row_ok[:, None], other=0.0)

    out_row = (bh.to(tl.int64) * MB + pid_u) * MB  # row (b, h, u) of the [B, H, Mq, Mk] outputs
    scr_row = SCR + (local_bh.to(tl.int64) * MB + pid_u) * MB * BLOCK
    run_max = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros([BLOCK], dtype=tl.float32)
    # Every key block but the last is whole; the last is short unless N % BLOCK == 0.
    for v in range(0, MB):
        if EVEN_N:
            lse2_iv, sum_l = _stats_block(q, k_base, offs_d, v * BLOCK, stride_kn, N, qk_scale, scale,
                                          BLOCK, BLOCK_N, False, UPCAST, PRECISION)
            n_v = BLOCK * 1.0
        else:
            if v < MB - 1:
                lse2_iv, sum_l = _stats_block(q, k_base, offs_d, v * BLOCK, stride_kn, N, qk_scale, scale,
                                              BLOCK, BLOCK_N, False, UPCAST, PRECISION)
            else:
                lse2_iv, sum_l = _stats_block(q, k_base, offs_d, v * BLOCK, stride_kn, N, qk_scale, scale,
                                              BLOCK, BLOCK_N, True, UPCAST, PRECISION)
            n_v = tl.minimum(N - v * BLOCK, BLOCK).to(tl.float32)
        lbar = sum_l / n_v
        # J_iv = lse_iv - log n_v - Lbar_iv >= 0 (Jensen); the clamp drops rounding noise as the reference does.
        j_iv = tl.maximum(lse2_iv * LN2 - tl.log(n_v) - lbar, 0.0)
        pooled = tl.sum(tl.where(row_ok, lbar, 0.0), 0) / n_u
        spread = tl.max(tl.where(row_ok, tl.abs(lbar - pooled), 0.0), 0)
        j_max = tl.max(tl.where(row_ok, j_iv, 0.0), 0)
        tl.store(L + out_row + v, pooled)
        tl.store(R + out_row + v, spread)
        tl.store(J + out_row + v, j_max)
        tl.store(scr_row + v * BLOCK + tl.arange(0, BLOCK), lse2_iv)
        new_max = tl.maximum(run_max, lse2_iv)
        run_sum = run_sum * tl.math.exp2(run_max - new_max) + tl.math.exp2(lse2_iv - new_max)
        run_max = new_max

    lse2_i = run_max + tl.math.log2(run_sum)
    tl.store(LSE + bh.to(tl.int64) * N + offs_m, lse2_i * LN2, mask=row_ok)
    # m_uv needs the final lse_i: re-read this program's own scratch (still in L2, mostly).
    for v in range(0, MB):
        lse2_iv = tl.load(scr_row + v * BLOCK + tl.arange(0, BLOCK))
        mass = tl.sum(tl.where(row_ok, tl.math.exp2(lse2_iv - lse2_i), 0.0), 0) / n_u
        tl.store(M + out_row + v, mass)


#: Autotune space, as data: key slice per step, warps, pipeline stages.
STATS_CONFIGS = [
    dict(BLOCK_N=128, num_warps=8, num_stages=2),
    dict(BLOCK_N=128, num_warps=8, num_stages=3),
    dict(BLOCK_N=64, num_warps=8, num_stages=3),
    dict(BLOCK_N=64, num_warps=4, num_stages=3),
    dict(BLOCK_N=32, num_warps=4, num_stages=2),
    dict(BLOCK_N=16, num_warps=4, num_stages=2),
]


def stats_config_fits(config: dict, block: int) -> bool:
    """Pruning predicate: the key slice divides the block, and one logit tile
    (block rows x BLOCK_N keys, float32) stays at most 128 x 128 so it fits in registers."""
    return config["BLOCK_N"] <= block and block * config["BLOCK_N"] <= 128 * 128


def _prune(configs, named_args, **kwargs):
    block = {**named_args, **kwargs}["BLOCK"]
    return [c for c in configs if stats_config_fits(c.all_kwargs(), block)]


_TUNED_KERNEL = triton.autotune(
    configs=[
        triton.Config({"BLOCK_N": c["BLOCK_N"]}, num_warps=c["num_warps"], num_stages=c["num_stages"])
        for c in STATS_CONFIGS
    ],
    key=["N", "HEAD_DIM", "BLOCK", "EVEN_N"],
    prune_configs_by={"early_config_prune": _prune},
)(_block_stats_kernel)


def block_stats_fwd(q, k, block: int, scale: float) -> BlockStats:
    """Launch on validated inputs: q, k [B, H, N, D] with unit stride along D, ``block`` a power
    of two in [16, 256], ``scale`` resolved."""
    bsz, heads, n, d = q.shape
    mb = num_blocks(n, block)
    shape = (bsz, heads, mb, mb)
    m, big_l, r, jmax = (torch.empty(shape, dtype=torch.float32, device=q.device) for _ in range(4))
    lse = torch.empty((bsz, heads, n), dtype=torch.float32, device=q.device)
    per_head = mb * mb * block * 4
    group = max(1, min(bsz * heads, SCRATCH_BYTES // per_head))
    scratch = torch.empty((group, mb, mb, block), dtype=torch.float32, device=q.device)
    meta = dict(
        HEAD_DIM=d, BLOCK=block, EVEN_N=n % block == 0, UPCAST=interpreting() and q.dtype != torch.float32,
        PRECISION="ieee" if interpreting() else ("tf32x3" if q.dtype == torch.float32 else "tf32"),
    )
    for head0 in range(0, bsz * heads, group):
        count = min(group, bsz * heads - head0)
        args = (
            q, k, m, big_l, r, jmax, lse, scratch,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            heads, n, mb, head0, scale * _LOG2E, scale,
        )
        if interpreting():
            cfg = next(c for c in STATS_CONFIGS if stats_config_fits(c, block))
            _block_stats_kernel[(mb, count)](*args, **meta, BLOCK_N=cfg["BLOCK_N"])
        else:
            _TUNED_KERNEL[(mb, count)](*args, **meta)
    return BlockStats(m=m, L=big_l, r=r, J=jmax, lse=lse, block=block, seq_len=n)



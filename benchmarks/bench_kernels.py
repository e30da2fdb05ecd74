"""Speed of dfsviz.kernels against cuDNN SDPA, FlashAttention-2 SDPA and FlexAttention.

    PYTHONPATH=$PWD python3 benchmarks/bench_kernels.py --out benchmarks/results/kernels_<card>.json

Shapes (bf16, D = 128 unless said): Wan2.1-1.3B 480p (grid 21x30x52, N = 32760, H = 12) and
Wan2.1-14B 720p (grid 21x45x80, N = 75600, H = 40), B = 1 and 2; HunyuanVideo 720p x 129
(grid 33x45x80 + 256 text, N = 119056, H = 24) with --shapes hunyuan-720p, CogVideoX-5B 480p x 49
(grid 13x30x45 after 226 text tokens, N = 17776, H = 48, D = 64) with --shapes cogvideox5b-480p. Masks: dfs_tile
(tile 16) top-k at gamma 0.1 / 0.2 / 0.3 on the hilbert3d order, scored on queries and
keys of the token model (dfsviz.sparse.tokenmodel; 4 heads drawn, cycled over H) so that
the kept blocks have real structure; timed inputs are random. Every baseline runs in
this process, timed by bench(): the median of at least 10 calls between CUDA events, the L2 cache flushed before
each, and the host's launch path hidden behind a spin on the GPU, so that a time is the GPU's alone (the small
section's calls include it: there it is the point); the calls that a ratio target compares
(with and without the order; bf16 against FP8) run in --rounds interleaved rounds (default 3), and each
one's best round is its time, every round recorded beside it (``*_rounds``). On Hopper the bf16 calls, with and without
an order, run the Gluon kernel (dfsviz.kernels._jit.attention_sm90); the Triton kernels it
replaced there are timed beside it (sparse_triton_ms and full_mask_triton_ms: the descriptor
kernel; sparse_order_triton_ms: the pointer kernel, which gathers through the order). Our kernel also runs with the
full mask (density 1, with and without order): its TFLOP/s against cuDNN is the
ceiling of the FlashAttention loop itself, apart from sparsity. The recorded configs name the
autotuner's choice (for the descriptor kernel: its DESC_FLAGS: PERSISTENT, WARP_SPECIALIZE). Sections "small"
(N 1,006 and 4,096: eager vs CUDA-graph replay vs FlexAttention, cached and refresh paths) and
"fp8" (bf16 vs FP8 sparse attention at gamma 0.2, Q.K only and with P.V in FP8 too, and the
FP8 kernels with the full mask vs cuDNN dense). Section "candidates" times every descriptor
autotune candidate on its own (no tuning) at --shapes, B 1: bf16 at gamma 0.2 and with the full
mask against cuDNN dense, and "fp8_pv" at gamma 0.2, so the margin of the autotuner's choice over
each alternative is on record. Targets, as ratios: sparse <= 0.8 x
FlexAttention; effective TFLOP/s >= 0.95 x cuDNN dense; with order <= 1.03 x without;
block_scores <= 0.02 x cuDNN dense; block_stats <= 1.5 x cuDNN dense; small cached path <= 1.0 x
Flex; FP8 >= 1.6 x bf16 sparse.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import json
import logging
import math
import statistics
import sys
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import flex_attention

from dfsviz.kernels.block_scores import block_scores
from dfsviz.kernels.block_sparse_attention import block_sparse_attention
from dfsviz.kernels.block_stats import block_stats
from dfsviz.sparse.grid import LatentGrid
from dfsviz.sparse.masks import BlockMask
from dfsviz.sparse.orders import make_order
from dfsviz.sparse.select import select_topk
from dfsviz.sparse.tokenmodel import TokenModelConfig, sample_qk

import check_gpu  # noqa: E402  (its one-candidate context; this directory is on sys.path)
from provenance import run_header  # noqa: E402

# The Triton side of the kernels (autotuners and their chosen configs).
jit_attention = importlib.import_module("dfsviz.kernels._jit.attention")
jit_stats = importlib.import_module("dfsviz.kernels._jit.stats")
jit_fp8 = importlib.import_module("dfsviz.kernels._jit.fp8")
log = logging.getLogger("bench_kernels")

# name: (grid, H, D)
SHAPES = {
    "wan1.3b-480p": (LatentGrid(21, 30, 52), 12, 128),
    "wan14b-720p": (LatentGrid(21, 45, 80), 40, 128),
    "hunyuan-720p": (LatentGrid(33, 45, 80, text_len=256), 24, 128),  # N = 119,056 (HunyuanVideo 720p x 129)
    # N = 17,776 (CogVideoX-5B 720x480 x 49: 13 latent frames, 226 text tokens first)
    "cogvideox5b-480p": (LatentGrid(13, 30, 45, text_len=226, text_first=True), 48, 64),
    "smoke": (LatentGrid(5, 16, 24), 4, 128),  # N = 1920, for a quick check of the script
}
D = 128  # the small section's head dim
BLOCK = 128
TARGETS = {"sparse_vs_flex": 0.8, "eff_vs_cudnn": 0.95, "order_overhead": 1.03, "scores_vs_cudnn": 0.02,
           "stats_vs_cudnn": 1.5, "small_vs_flex": 1.0, "fp8_speedup": 1.6}


@functools.lru_cache(maxsize=None)
def _spin_cycles_per_ms() -> float:
    """Clock cycles that ``torch.cuda._sleep`` spins per millisecond on this card (at its clock now)."""
    cycles = 10_000_000
    torch.cuda._sleep(cycles)  # warm-up
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(cycles)
    end.record()
    torch.cuda.synchronize()
    return cycles / start.elapsed_time(end)


def host_enqueue_ms(fn, calls: int = 1) -> float:
    """Host milliseconds per call to enqueue ``calls`` calls of ``fn`` behind a 50 ms spin on the
    GPU, so that no launch waits for the device (unless the call itself synchronizes)."""
    torch.cuda._sleep(int(50 * _spin_cycles_per_ms()))
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    ms = (time.perf_counter() - t0) * 1e3 / calls
    torch.cuda.synchronize()
    return ms


def bench(fn, rep_ms=200, min_calls=10, hide_host=True):
    """Median time of ``fn`` in ms over at least ``min_calls`` timed calls (enough to fill rep_ms),
    each after a flush of the L2 cache, between CUDA events, as triton.testing.do_bench times.

    With ``hide_host`` (the default) a spin on the GPU, longer than the host takes to enqueue the
    call, runs before each timed call, so the time is the GPU's alone, as in a pipeline whose host
    runs ahead. Without it the GPU idles while the host runs the call's Python and launches (about
    0.2 ms before the Gluon kernel starts on an H100), and that wait is timed too: what a lone
    eager call costs, which is what the small section compares with CUDA-graph replays. do_bench
    times that way, so before this the bf16 call at Wan2.1-1.3B read 2.16-2.22 ms against 1.97 ms
    of kernel (CUPTI), while an FP8 call's launch path ran behind its quantization kernels."""
    fn()  # compile / autotune outside the timing
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    call_ms = (time.perf_counter() - t0) * 1e3
    for _ in range(max(1, math.ceil(25 / call_ms))):  # warm-up, about 25 ms
        fn()
    spin = 0
    if hide_host:
        host_ms = host_enqueue_ms(fn)
        if host_ms > 25:  # the call waited for the GPU: no spin can run ahead of it
            raise RuntimeError(f"the timed call synchronizes with the GPU ({host_ms:.1f} ms to enqueue behind a 50 ms "
                               "spin): time it with hide_host=False")
        spin = int((3 * host_ms + 0.05) * _spin_cycles_per_ms())
    torch.cuda.synchronize()
    calls = max(min_calls, math.ceil(rep_ms / call_ms))
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(calls)]
    for start, end in events:
        flush.zero_()
        if spin:
            torch.cuda._sleep(spin)
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def bench_rounds(row: dict, calls: dict, rounds: int) -> None:
    """Each of ``calls`` (name: thunk) timed by ``bench`` in ``rounds`` interleaved rounds, the
    order of the calls reversed every other round; into ``row`` each call's best round as
    ``<name>`` (ms) and every round as ``<name>_rounds``. The calls whose ratio is a target are
    timed this way, so that the card's clock, which can move a call by 10 % from one timing window
    to the next (an H100 at its power limit), weighs on both sides of a ratio alike."""
    times = {name: [] for name in calls}
    for r in range(rounds):
        for name in (calls if r % 2 == 0 else reversed(list(calls))):
            times[name].append(bench(calls[name]))
    for name, ms in times.items():
        row[name] = min(ms)
        row[f"{name}_rounds"] = ms


@functools.lru_cache(maxsize=None)
def realistic_masks(grid: LatentGrid, heads: int, d: int, gammas: tuple, device: str) -> dict[float, BlockMask]:
    """dfs_tile top-k masks on the hilbert3d order from token-model q/k (4 heads cycled to H)."""
    cfg = TokenModelConfig(grid=grid, heads=min(4, heads), head_dim=d, dtype=torch.bfloat16, seed=0)
    q, k = sample_qk(cfg, device=device)
    order = make_order("hilbert3d", grid)
    q, k = order.apply(q), order.apply(k)
    scores = block_scores(q, k, method="dfs_tile", tile=16, block=BLOCK)
    reps = -(-heads // scores.shape[1])
    scores = scores.repeat(1, reps, 1, 1)[:, :heads].contiguous()
    return {g: select_topk(scores, g, seq_len=grid.num_tokens, block=BLOCK) for g in gammas}


def batched(mask: BlockMask, bsz: int) -> BlockMask:
    """The same mask for every batch element (CFG reuses the conditional pass's mask)."""
    return BlockMask(mask.kv_num_blocks.expand(bsz, -1, -1).contiguous(),
                     mask.kv_indices.expand(bsz, -1, -1, -1).contiguous(), mask.seq_len, mask.block)


def run_shape(name, batches, gammas, flex, skip_fa2, parts, rounds, rows: list, save) -> None:
    """Time ``name`` at each batch size into ``rows``: a row is added when its batch starts and
    ``save()`` runs after every measurement group, so a run cut off mid-shape keeps its gammas.
    The calls with and without the order are timed in ``rounds`` interleaved rounds."""
    grid, heads, d = SHAPES[name]
    n = grid.num_tokens
    order = make_order("hilbert3d", grid)
    t0 = time.time()
    masks = realistic_masks(grid, heads, d, tuple(gammas), "cuda") if "attention" in parts else {}
    log.info("%s: N=%d H=%d D=%d, masks built in %.1f s", name, n, heads, d, time.time() - t0)
    for bsz in batches:
        q, k, v = (torch.randn(bsz, heads, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        dense_flops = 4.0 * bsz * heads * n * n * d
        row = {"shape": name, "grid": grid.name, "N": n, "H": heads, "D": d, "B": bsz, "dtype": "bfloat16"}
        rows.append(row)
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            row["cudnn_ms"] = bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
        if not skip_fa2:
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                row["fa2_ms"] = bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
        row["cudnn_tflops"] = dense_flops / row["cudnn_ms"] * 1e-9
        if "scores" in parts:
            row["scores_ms"] = bench(lambda: block_scores(q, k, method="dfs_tile", tile=16, block=BLOCK))
            row["scores_vs_cudnn"] = row["scores_ms"] / row["cudnn_ms"]
        if "stats" in parts:
            row["stats_ms"] = bench(lambda: block_stats(q, k, block=BLOCK), rep_ms=100)
            row["stats_config"] = str(jit_stats._TUNED_KERNEL.best_config)
            row["stats_vs_cudnn"] = row["stats_ms"] / row["cudnn_ms"]
        row["gammas"] = []
        for gamma in gammas if "attention" in parts else ():
            mask = batched(masks[gamma], bsz)
            density = float(mask.density().mean())
            fmask = mask.to_flex_block_mask()
            g = {"gamma": gamma, "density": density}
            g["flex_ms"] = bench(lambda: flex(q, k, v, block_mask=fmask))
            bench_rounds(g, {
                "sparse_ms": lambda: block_sparse_attention(q, k, v, mask),
                "sparse_order_ms": lambda: block_sparse_attention(q, k, v, mask, order=order)}, rounds)
            g["sparse_kernel"] = "gluon-sm90" if jit_attention.sm90_kernel_runs(q, mask) else "triton-descriptors"
            perm = order.perm_on("cuda", torch.int32)
            # what the Gluon kernel's launcher adds with an order: ordered copies of k and v
            g["order_gather_kv_ms"] = bench(lambda: jit_attention.gather_kv(k, v, perm))
            g["order_index_select_kv_ms"] = bench(lambda: (k.index_select(2, perm), v.index_select(2, perm)))
            with check_gpu.triton_kernels():
                # in Triton: the descriptor kernel (its config names the DESC_FLAGS that won), and
                # with the order the pointer kernel
                g["sparse_triton_ms"] = bench(lambda: block_sparse_attention(q, k, v, mask))
                g["sparse_triton_config"] = str(jit_attention._TUNED_DESC_KERNEL.best_config)
                g["sparse_order_triton_ms"] = bench(lambda: block_sparse_attention(q, k, v, mask, order=order))
                g["sparse_order_triton_config"] = str(jit_attention._TUNED_KERNEL.best_config)
            g["sparse_lse_ms"] = bench(lambda: block_sparse_attention(q, k, v, mask, return_lse=True))
            g["sparse_eff_tflops"] = dense_flops * density / g["sparse_ms"] * 1e-9
            g["flex_eff_tflops"] = dense_flops * density / g["flex_ms"] * 1e-9
            g["sparse_vs_flex"] = g["sparse_ms"] / g["flex_ms"]
            g["eff_vs_cudnn"] = g["sparse_eff_tflops"] / row["cudnn_tflops"]
            g["order_overhead"] = g["sparse_order_ms"] / g["sparse_ms"]
            g["sparse_vs_triton"] = g["sparse_ms"] / g["sparse_triton_ms"]
            g["sparse_order_vs_triton"] = g["sparse_order_ms"] / g["sparse_order_triton_ms"]
            row["gammas"].append(g)
            save()
            log.info("%s B=%d gamma=%.1f density=%.3f flex %.2f ms ours %.2f ms (order %.2f) eff %.0f TFLOP/s",
                     name, bsz, gamma, density, g["flex_ms"], g["sparse_ms"], g["sparse_order_ms"],
                     g["sparse_eff_tflops"])
        if "attention" in parts:  # after the gammas: the autotuner chose on real masks
            full = BlockMask.full(bsz, heads, n, BLOCK, device="cuda")
            bench_rounds(row, {
                "full_mask_ms": lambda: block_sparse_attention(q, k, v, full),
                "full_mask_order_ms": lambda: block_sparse_attention(q, k, v, full, order=order)}, rounds)
            with check_gpu.triton_kernels():
                row["full_mask_triton_ms"] = bench(lambda: block_sparse_attention(q, k, v, full))
            row["full_mask_tflops"] = dense_flops / row["full_mask_ms"] * 1e-9
            row["full_mask_vs_cudnn"] = row["full_mask_tflops"] / row["cudnn_tflops"]
            row["full_mask_order_overhead"] = row["full_mask_order_ms"] / row["full_mask_ms"]
            del full
        log.info("%s B=%d cuDNN %.2f ms (%.0f TFLOP/s) ours full mask %s ms FA2 %s ms scores %s ms stats %s ms",
                 name, bsz, row["cudnn_ms"], row["cudnn_tflops"],
                 f"{row['full_mask_ms']:.2f}" if "full_mask_ms" in row else "-",
                 f"{row['fa2_ms']:.2f}" if "fa2_ms" in row else "-",
                 f"{row['scores_ms']:.3f}" if "scores_ms" in row else "-",
                 f"{row['stats_ms']:.2f}" if "stats_ms" in row else "-")
        save()
        del q, k, v
        torch.cuda.empty_cache()


# Small sequences: N = 1,006 (B 2, H 4) and N = 4,096, D 128, bf16, gamma 0.3.
SMALL_SHAPES = {"n1006": (LatentGrid(4, 15, 16, text_len=46), 2, 4), "n4096": (LatentGrid(4, 32, 32), 2, 12)}


def graphed(fn):
    """``fn`` captured in a CUDA graph after a warm-up call (compile, autotune, uploads): a
    thunk that replays it. The graph reads and writes the buffers ``fn`` used when captured."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def run_small(flex, gamma=0.3):
    """Eager vs CUDA-graph-replayed vs FlexAttention at small N: the cached path (attention on a
    kept mask, with the hilbert3d order), the refresh path (scoring, selection, attention) and the
    permute-once call (ordered inputs, no order); on Hopper the cached and permute-once calls also
    with the Gluon kernel off (``*_triton``)."""
    rows = []
    for name, (grid, bsz, heads) in SMALL_SHAPES.items():
        n = grid.num_tokens
        order = make_order("hilbert3d", grid)
        q, k, v = (torch.randn(bsz, heads, n, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        scores = block_scores(order.apply(q), order.apply(k), method="dfs_tile", tile=16, block=BLOCK)
        mask = select_topk(scores, gamma, seq_len=n, block=BLOCK)
        fmask = mask.to_flex_block_mask()
        row = {"shape": name, "N": n, "B": bsz, "H": heads, "D": D, "gamma": gamma,
               "density": float(mask.density().mean())}

        def cached():
            return block_sparse_attention(q, k, v, mask, order=order)

        def refresh():
            qo, ko = order.apply(q), order.apply(k)
            select_topk(block_scores(qo, ko, method="dfs_tile", tile=16, block=BLOCK), gamma, seq_len=n, block=BLOCK,
                        out=mask)
            return block_sparse_attention(q, k, v, mask, order=order)

        def permuted():  # permute-once: q, k and v already ordered
            return block_sparse_attention(qo, ko, vo, mask)

        qo, ko, vo = order.apply(q), order.apply(k), order.apply(v)
        row["flex_ms"] = bench(lambda: flex(qo, ko, vo, block_mask=fmask), hide_host=False)
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            row["cudnn_dense_ms"] = bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v),
                                          hide_host=False)
        calls = [("cached", cached), ("refresh", refresh), ("permuted", permuted)]
        for label, fn in calls + [(f"{label}_triton", fn) for label, fn in calls if label != "refresh"]:
            with check_gpu.triton_kernels() if label.endswith("_triton") else contextlib.nullcontext():
                # host included: an eager call's launch path is what a graph replay saves
                for mode, timed in (("eager", lambda: bench(fn, hide_host=False)),
                                    ("graph", lambda: bench(graphed(fn), hide_host=False))):
                    try:
                        row[f"{label}_{mode}_ms"] = timed()
                    except Exception as exc:  # not compilable or capturable: record why, keep measuring
                        row[f"{label}_{mode}_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        for mode in ("graph", "eager"):
            row[f"cached_{mode}_vs_flex"] = row.get(f"cached_{mode}_ms", float("nan")) / row["flex_ms"]
        log.info("small %s: flex %.3f ms, cached eager %s / graph %s ms, refresh eager %s / graph %s ms", name,
                 row["flex_ms"], *(row.get(f"{call}_ms") for call in ("cached_eager", "cached_graph", "refresh_eager",
                                                                      "refresh_graph")))
        rows.append(row)
    return rows


def run_fp8(name, bsz, rounds, gamma=0.2):
    """bf16 against FP8 sparse attention at gamma, precisions "fp8" and "fp8_pv", without and with
    the Hilbert order (each FP8 call whole: quantization and attention; the six calls timed in
    ``rounds`` interleaved rounds); on Hopper the same calls
    with the Gluon kernel off (``*_triton``); the quantization passes alone; and both FP8
    precisions with the full mask against cuDNN dense."""
    grid, heads, d = SHAPES[name]
    n = grid.num_tokens
    mask = batched(realistic_masks(grid, heads, d, (gamma,), "cuda")[gamma], bsz)
    full = BlockMask.full(bsz, heads, n, BLOCK, device="cuda")
    q, k, v = (torch.randn(bsz, heads, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    order = make_order("hilbert3d", grid)
    perm = order.perm_on("cuda", torch.int32)
    row = {"shape": name, "N": n, "H": heads, "D": d, "B": bsz, "gamma": gamma,
           "density": float(mask.density().mean()),
           "sparse_kernel": "gluon-sm90" if jit_attention.sm90_kernel_runs(q, mask) else "triton"}
    precisions = {"bf16": "native", "fp8": "fp8", "fp8_pv": "fp8_pv"}  # row key: the call's precision
    variants = {"": {}, "_order": {"order": order}}
    bench_rounds(row, {
        f"{key}{suffix}_ms": functools.partial(block_sparse_attention, q, k, v, mask, **orders, precision=precision)
        for key, precision in precisions.items() for suffix, orders in variants.items()}, rounds)
    for key in ("fp8", "fp8_pv"):
        for suffix in variants:
            row[f"{key}{suffix}_speedup"] = row[f"bf16{suffix}_ms"] / row[f"{key}{suffix}_ms"]
    with check_gpu.triton_kernels():
        for key, precision in precisions.items():
            row[f"{key}_triton_ms"] = bench(lambda: block_sparse_attention(q, k, v, mask, precision=precision))
    row["quantize_qk_ms"] = bench(lambda: jit_fp8.quantize_attention_fp8_fwd(q, k, None, BLOCK, perm))  # "fp8"'s
    mma_order = row["sparse_kernel"] == "gluon-sm90"  # V as "fp8_pv" quantizes it
    row["quantize_qkv_ms"] = bench(lambda: jit_fp8.quantize_attention_fp8_fwd(q, k, v, BLOCK, perm, mma_order=mma_order))
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        row["cudnn_dense_ms"] = bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
    for precision in ("fp8", "fp8_pv"):
        row[f"{precision}_dense_ms"] = bench(lambda: block_sparse_attention(q, k, v, full, precision=precision))
        row[f"{precision}_dense_vs_cudnn"] = row[f"{precision}_dense_ms"] / row["cudnn_dense_ms"]
    log.info("fp8 %s B=%d: bf16 %.2f ms, fp8 %.2f ms (%.2fx), fp8_pv %.2f ms (%.2fx); with the order bf16 %.2f, fp8 "
             "%.2fx, fp8_pv %.2fx; Triton fp8_pv %.2f ms; quantization %.2f (q, k) / %.2f ms (q, k, v); dense: cuDNN %.1f ms, fp8 %.1f "
             "ms, fp8_pv %.1f ms", name, bsz, row["bf16_ms"], row["fp8_ms"], row["fp8_speedup"], row["fp8_pv_ms"],
             row["fp8_pv_speedup"], row["bf16_order_ms"], row["fp8_order_speedup"], row["fp8_pv_order_speedup"],
             row["fp8_pv_triton_ms"], row["quantize_qk_ms"], row["quantize_qkv_ms"], row["cudnn_dense_ms"],
             row["fp8_dense_ms"], row["fp8_pv_dense_ms"])
    return row


def run_candidates(name, gamma=0.2):
    """Every descriptor candidate of ATTENTION_CONFIGS on its own (B 1, no order): bf16 at gamma and
    with the full mask (TFLOP/s against cuDNN dense, measured here), "fp8_pv" at gamma. A candidate
    this Triton cannot compile or fit is recorded with its error."""
    grid, heads, d = SHAPES[name]
    n = grid.num_tokens
    mask = realistic_masks(grid, heads, d, (gamma,), "cuda")[gamma]
    full = BlockMask.full(1, heads, n, BLOCK, device="cuda")
    q, k, v = (torch.randn(1, heads, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    dense_flops = 4.0 * heads * n * n * d
    density = float(mask.density().mean())
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        cudnn_ms = bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
    rows = []
    for cfg in jit_attention.ATTENTION_CONFIGS:
        if not jit_attention.attention_config_fits(cfg, BLOCK, d, fp8=cfg.get("fp8_only", False), descriptors=True):
            continue
        row = {"shape": name, "N": n, "H": heads, "gamma": gamma, "density": density, "config": cfg,
               "cudnn_ms": cudnn_ms}
        calls = {}
        if not cfg.get("fp8_only"):
            calls["bf16_ms"] = lambda: block_sparse_attention(q, k, v, mask)
            calls["bf16_full_ms"] = lambda: block_sparse_attention(q, k, v, full)
        if jit_attention.attention_config_fits(cfg, BLOCK, d, fp8=True, descriptors=True):
            calls["fp8_pv_ms"] = lambda: block_sparse_attention(q, k, v, mask, precision="fp8_pv")
        with check_gpu.only_descriptor_config(cfg):
            for key, call in calls.items():
                try:
                    row[key] = bench(call)
                except Exception as exc:  # out of shared memory, or a compile failure of this Triton
                    row[key.removesuffix("_ms") + "_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        if "bf16_ms" in row:
            row["bf16_eff_vs_cudnn"] = dense_flops * density / row["bf16_ms"] / (dense_flops / cudnn_ms)
        if "bf16_full_ms" in row:
            row["bf16_full_vs_cudnn"] = cudnn_ms / row["bf16_full_ms"]
        log.info("candidate %s %s: bf16 %s ms, full %s ms, fp8_pv %s ms", name, cfg,
                 *(f"{row[k]:.2f}" if k in row else "-" for k in ("bf16_ms", "bf16_full_ms", "fp8_pv_ms")))
        rows.append(row)
    return rows


def verdicts(rows):
    """Every target as measured / target, with met = True/False."""
    out = []
    for r in rows:
        tag = f"{r['shape']} B={r['B']}"
        if "scores_vs_cudnn" in r:
            out.append({"what": f"{tag} block_scores / cuDNN", "value": r["scores_vs_cudnn"],
                        "target": f"<= {TARGETS['scores_vs_cudnn']}",
                        "met": r["scores_vs_cudnn"] <= TARGETS["scores_vs_cudnn"]})
        if "stats_vs_cudnn" in r:
            out.append({"what": f"{tag} block_stats / cuDNN", "value": r["stats_vs_cudnn"],
                        "target": f"<= {TARGETS['stats_vs_cudnn']}",
                        "met": r["stats_vs_cudnn"] <= TARGETS["stats_vs_cudnn"]})
        for g in r.get("gammas", []):
            gt = f"{tag} gamma={g['gamma']}"
            out.append({"what": f"{gt} sparse / Flex", "value": g["sparse_vs_flex"],
                        "target": f"<= {TARGETS['sparse_vs_flex']}", "met": g["sparse_vs_flex"] <= TARGETS["sparse_vs_flex"]})
            out.append({"what": f"{gt} eff TFLOP/s / cuDNN", "value": g["eff_vs_cudnn"],
                        "target": f">= {TARGETS['eff_vs_cudnn']}", "met": g["eff_vs_cudnn"] >= TARGETS["eff_vs_cudnn"]})
            out.append({"what": f"{gt} with order / without", "value": g["order_overhead"],
                        "target": f"<= {TARGETS['order_overhead']}", "met": g["order_overhead"] <= TARGETS["order_overhead"]})
    return out


def small_fp8_verdicts(small, fp8):
    out = []
    for r in small:
        value = r.get("cached_graph_ms", r.get("cached_eager_ms", float("nan"))) / r["flex_ms"]
        out.append({"what": f"small {r['shape']} cached (graph) / Flex", "value": value,
                    "target": f"<= {TARGETS['small_vs_flex']}", "met": value <= TARGETS["small_vs_flex"]})
    for r in fp8:
        for precision in ("fp8", "fp8_pv"):
            for suffix, how in (("", ""), ("_order", " with the order")):
                value = r[f"{precision}{suffix}_speedup"]
                out.append({"what": f"{precision} {r['shape']} B={r['B']} speedup over bf16 sparse{how}",
                            "value": value, "target": f">= {TARGETS['fp8_speedup']}",
                            "met": value >= TARGETS["fp8_speedup"]})
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["wan1.3b-480p", "wan14b-720p"], choices=sorted(SHAPES))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--gammas", nargs="+", type=float, default=[0.1, 0.2, 0.3])
    parser.add_argument("--skip-fa2", action="store_true", help="leave out FlashAttention-2 (slowest baseline)")
    parser.add_argument("--parts", nargs="+", default=["attention", "scores", "stats"],
                        choices=["attention", "scores", "stats"], help="which kernels to time")
    parser.add_argument("--sections", nargs="+", default=["shapes", "small", "fp8"],
                        choices=["shapes", "small", "fp8", "candidates"],
                        help="shapes: the Wan shapes; small: N 1,006 / 4,096 eager vs CUDA graph vs Flex; "
                             "fp8: bf16 vs FP8 sparse attention ('fp8', 'fp8_pv') at gamma 0.2 and the FP8 dense calls; "
                             "candidates: every descriptor autotune candidate on its own at --shapes (not by default)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved rounds for the calls compared by a ratio target (with and without the "
                             "order; bf16 against FP8): each call's best round is its time")
    parser.add_argument("--quick", action="store_true",
                        help="reduced set for one device session: Wan-1.3B B 1 at gamma 0.2, no FA2, no stats; "
                             "small; FP8 at both Wan shapes, B 1")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.quick:
        args.shapes, args.batches, args.gammas, args.skip_fa2 = ["wan1.3b-480p"], [1], [0.2], True
        args.parts = ["attention", "scores"]
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not torch.cuda.is_available():
        log.error("no CUDA device: run this on the GPU machine")
        return 2
    flex = torch.compile(flex_attention, dynamic=False)
    rows, small, fp8, candidates = [], [], [], []
    result = run_header(torch.device("cuda"))
    result["timing"] = ("bench(): GPU time, the host's launch path hidden behind a GPU spin (the small section: "
                        "host included); ratio pairs in --rounds interleaved rounds, best round")

    def write():
        result.update({
            "targets": TARGETS,
            "rows": rows,
            "small": small,
            "fp8": fp8,
            "candidates": candidates,
            "verdicts": verdicts(rows) + small_fp8_verdicts(small, fp8),
        })
        if args.out:  # after every measurement, so a cut-off run keeps what it measured
            with open(args.out, "w") as fh:
                json.dump(result, fh, indent=1)

    def shapes():
        for name in args.shapes:
            for bsz in args.batches:
                run_shape(name, [bsz], args.gammas, flex, args.skip_fa2, tuple(args.parts), args.rounds, rows, write)

    def fp8_rows():
        for name in args.shapes:
            fp8.append(run_fp8(name, 1, args.rounds))
            write()

    def candidate_rows():
        for name in args.shapes:
            candidates.extend(run_candidates(name))
            write()

    sections = {"shapes": shapes, "small": lambda: (small.extend(run_small(flex)), write()), "fp8": fp8_rows,
                "candidates": candidate_rows}
    for section in args.sections:
        try:
            sections[section]()
        except Exception:  # one failing section must not lose the others
            log.exception("section %s failed", section)
            result.setdefault("failed_sections", []).append(section)
            write()
    for v in result["verdicts"]:
        log.info("%-5s %-45s %.3f (target %s)", "met" if v["met"] else "MISS", v["what"], v["value"], v["target"])
    return 0


if __name__ == "__main__":
    sys.exit(main())

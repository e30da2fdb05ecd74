"""End-to-end DFSAttn speed in the Wan2.1 transformer (GPU; baselines in the same process).

    PYTHONPATH=$PWD python3 benchmarks/bench_e2e.py                       # 1.3B/480p and 14B/720p
    PYTHONPATH=$PWD python3 benchmarks/bench_e2e.py --models 14b-720p --reps 3 --dense cudnn
    PYTHONPATH=$PWD python3 benchmarks/bench_e2e.py --models tiny --device cpu   # checks the script on CPU

Models: the diffusers ``WanTransformer3DModel`` with the Wan2.1-T2V-1.3B architecture at 480p x 81
frames (latent 16 x 21 x 60 x 104, 21 x 30 x 52 = 32,760 tokens) and the Wan2.1-14B architecture at
720p x 81 frames (latent 16 x 21 x 90 x 160, 21 x 45 x 80 = 75,600 tokens); random bf16 weights
(normal, std 0.02, so activations stay finite through 30-40 layers), one random latent and a
512-token random text embedding, batch 1 (the diffusers Wan pipeline runs cond and uncond as two
calls).

Per model it times one transformer call (CUDA events, median of --reps after a warm-up call):

* dense: stock processors, SDPA forced to cuDNN (``sdpa_kernel(CUDNN_ATTENTION)``); also FLASH (``--dense``);
* DFSAttn's own dense call (its warm-up steps): ``DFSConfig.fused_ops`` (fused QK-RMSNorm + RoPE,
  fused AdaLN norms and gated residuals) around the same dense SDPA;
* DFSAttn (hilbert3d, dfs_tile tile 16, block 128, layer 0 dense) at gamma 0.3 / 0.2 / 0.1, a
  refresh call (scoring + selection + sparse attention) and a cached call (sparse attention with
  the layer's cached mask), per-call permutation and permute-once;
* where the time goes in one call of each kind: attention (block-sparse kernel or SDPA),
  scoring (block_scores + select_topk), permutation (TokenOrder.apply for scoring, the
  permute-once hooks), the fused ops, and the rest (projections, norms, FFN, cross-attention,
  launch gaps);
* for the models in ``--quality`` (default 1.3b-480p): per gamma, one refresh call's output error
  against the dense output (relative L2) and the recall of each sparse layer's mask;
* the schedule-weighted time of the default 50-step schedule with CFG (DFSSchedule(
  calls_per_step=2): 24 dense calls, refresh on the cond call of steps 12/24/36, every other call
  cached; DFSAttn's warm-up calls at its own dense-call time), and the end-to-end transformer
  speedup over 100 stock dense calls; also over 100 dense calls with the fused ops, which is
  what the sparse attention alone gives.

Writes benchmarks/results/e2e_<card>.json (card, versions, shapes, every timing, the speedups).
Also HunyuanVideo 720p x 129 frames (13B architecture, latent 16 x 33 x 90 x 160: 118,800 video and
256 text tokens). ``--precisions native,fp8,fp8_pv`` times every DFSAttn run also with FP8 Q and K
(``DFSConfig(precision="fp8")``: the sparse calls; the warm-up calls stay stock) and with P . V in
FP8 too (``"fp8_pv"``); ``"native_dense"``, ``"fp8_dense"`` and ``"fp8_pv_dense"`` also time DFSAttn's
warm-up call as dfsviz's kernel at that precision with every block kept and weigh the schedule's
warm-up calls with it. A precision followed by ``+linear_fp8`` (``native+linear_fp8``,
``fp8_pv_dense+linear_fp8``) also runs the linear layers of every block but the first and the last
as FP8 matrix products (``DFSConfig(linear_precision="fp8")``, every call, warm-up calls too, which
are timed for it); ``+linear_fp8_all`` those of every block. Precisions that differ only in the
warm-up calls (``native`` and ``native_dense``) share one timing of their sparse calls.
Without ``--quick`` the results file is rewritten after every measurement; a model's entry holds
``"complete": true`` once it has finished (a run killed by a time limit keeps what it measured).
``--quick`` times 2 and 3 repeating units of each model (Wan: blocks; HunyuanVideo: one
dual-stream and two single-stream blocks), one call each unless ``--reps``, and composes every
call time at full depth from the per-unit difference (units past the first are identical sparse
layers; the measured calls stay in the JSON). The composition multiplies a single call's noise
by the depth (38 at Wan-14B): quote full-depth runs.

The paper reports 1.79x end to end on Wan2.1-14B 720p and 2.1x on HunyuanVideo 720p (whole
pipeline); our targets on the transformer: Wan-14B 720p >= 2.0x in bf16 and >= 2.5x with
FP8, HunyuanVideo 720p >= 2.1x in bf16 (recorded as "targets" beside the results).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import json
import logging
import re
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dfsviz.accel import DFSConfig, apply_dfsattn
from dfsviz.accel.config import PRECISION_MODES
from dfsviz.sparse.orders import TokenOrder
from dfsviz.sparse.schedule import DFSSchedule

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import run_header  # noqa: E402
from quality_embedded import LINEAR_FP8, parse_variant, rel_l2  # noqa: E402

processors_module = importlib.import_module("dfsviz.accel.processors")
handle_module = importlib.import_module("dfsviz.accel.handle")
wan_block_module = importlib.import_module("dfsviz.accel.wan_block")
log = logging.getLogger("bench_e2e")

WAN_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
                text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
WAN_14B = {**WAN_1_3B, "num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 40}
TINY = {**WAN_1_3B, "num_attention_heads": 2, "attention_head_dim": 64, "ffn_dim": 256, "num_layers": 2,
        "text_dim": 64, "freq_dim": 32}
# HunyuanVideo 13B (diffusers' defaults: 20 dual-stream and 40 single-stream blocks, 24 heads x 128).
HUNYUAN = dict(in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128, num_layers=20,
               num_single_layers=40, num_refiner_layers=2, patch_size=2, patch_size_t=1, text_embed_dim=4096,
               pooled_projection_dim=768, rope_axes_dim=(16, 56, 56))
# name -> (family, config, latent [C, F, H, W], text tokens)
MODELS = {
    "1.3b-480p": ("wan", WAN_1_3B, (16, 21, 60, 104), 512),
    "14b-720p": ("wan", WAN_14B, (16, 21, 90, 160), 512),
    "hunyuan-720p": ("hunyuan", HUNYUAN, (16, 33, 90, 160), 256),  # 720p x 129 frames: 118,800 + 256 tokens
    "tiny": ("wan", TINY, (16, 3, 32, 32), 16),  # 768 tokens: runs on CPU with the reference kernels
}
# The depth of each family, as repeating units: Wan one block, HunyuanVideo one dual-stream and
# two single-stream blocks (20 units = 20 + 40 blocks). --quick times 2 and 3 units and composes
# every call time at full depth linearly (units past the first, whose layer 0 DFSAttn keeps
# dense, are identical sparse layers).
QUICK_UNITS = (2, 3)
UNIT_KEYS = {"wan": {"num_layers": 1}, "hunyuan": {"num_layers": 1, "num_single_layers": 2}}
FULL_UNITS = {"wan": "num_layers", "hunyuan": "num_layers"}
#: What the paper reports and what we target, per model (end-to-end speedup over dense).
TARGETS = {"14b-720p": {"paper": 1.79, "bf16": 2.0, "fp8": 2.5}, "hunyuan-720p": {"paper": 2.1, "bf16": 2.1}}
GAMMAS = (0.3, 0.2, 0.1)
# DFSConfig.fused_ops' kernels, where the processor and the fused block forward call them: one category.
FUSED_OPS = ((processors_module, "qk_norm_rope"), (wan_block_module, "modulated_layer_norm"),
             (wan_block_module, "gated_residual"))


# --------------------------------------------------------------------------- timing helpers
class Timer:
    """Wall time of a region: CUDA events on GPU (read after synchronize), perf_counter on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def start(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def stop(self, start) -> callable:
        """Returns a thunk giving milliseconds (call it after synchronize)."""
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            return lambda: start.elapsed_time(end)
        ms = (time.perf_counter() - start) * 1e3
        return lambda: ms


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Breakdown:
    """Wraps the functions DFSAttn and the stock processors call to time each category."""

    CATEGORIES = ("attention", "scoring", "permutation", "fused_ops")

    def __init__(self, device: torch.device) -> None:
        self.timer = Timer(device)
        self.device = device
        self.pending: dict[str, list] = {c: [] for c in self.CATEGORIES}
        self.active = False

    def wrap(self, fn, category: str):
        def timed(*args, **kwargs):
            if not self.active:
                return fn(*args, **kwargs)
            t = self.timer.start()
            out = fn(*args, **kwargs)
            self.pending[category].append(self.timer.stop(t))
            return out

        return timed

    @contextlib.contextmanager
    def installed(self):
        saved = []

        def patch(owner, name, category):
            orig = getattr(owner, name)
            saved.append((owner, name, orig))
            setattr(owner, name, self.wrap(orig, category))

        patch(processors_module, "block_sparse_attention", "attention")
        patch(processors_module, "block_scores", "scoring")
        patch(processors_module, "select_topk", "scoring")
        patch(TokenOrder, "apply", "permutation")
        for owner, name in FUSED_OPS:
            patch(owner, name, "fused_ops")
        patch(F, "scaled_dot_product_attention", "attention")  # dense steps/layers, cross-attention
        try:
            yield self
        finally:
            for owner, name, orig in reversed(saved):
                setattr(owner, name, orig)

    def collect(self) -> dict[str, float]:
        sync(self.device)
        out = {c: sum(t() for t in self.pending[c]) for c in self.CATEGORIES}
        self.pending = {c: [] for c in self.CATEGORIES}
        return out


def permute_hook_timing(breakdown: Breakdown):
    """Time the permute-once hooks as 'permutation' (patched on the class before apply)."""
    cls = handle_module.DFSHandle
    saved = (cls._permute, cls._restore)

    def wrap(fn):
        def hook(self, *args, **kwargs):
            return breakdown.wrap(lambda: fn(self, *args, **kwargs), "permutation")()
        return hook

    cls._permute, cls._restore = wrap(saved[0]), wrap(saved[1])
    return lambda: (setattr(cls, "_permute", saved[0]), setattr(cls, "_restore", saved[1]))


# --------------------------------------------------------------------------- model
def build(name: str, device: torch.device, dtype: torch.dtype, seed: int, units: int | None = None):
    """The model with random weights (``units`` repeating units instead of the full depth) and its inputs."""
    import diffusers

    family, cfg, latent, text_len = MODELS[name]
    if units is not None:
        cfg = {**cfg, **{key: per_unit * units for key, per_unit in UNIT_KEYS[family].items()}}
    cls = diffusers.WanTransformer3DModel if family == "wan" else diffusers.HunyuanVideoTransformer3DModel
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are created in bf16 directly (14B fp32 would not fit)
    try:
        with torch.device(device):
            model = cls(**cfg).eval()
    finally:
        torch.set_default_dtype(default)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02)
    g = torch.Generator(device="cpu").manual_seed(seed + 1)
    x = torch.randn(1, *latent, generator=g).to(device, dtype)
    text_dim = cfg["text_dim"] if family == "wan" else cfg["text_embed_dim"]
    text = torch.randn(1, text_len, text_dim, generator=g).to(device, dtype)
    t = torch.tensor([500.0], device=device)
    inputs = dict(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)
    if family == "hunyuan":
        inputs.update(encoder_attention_mask=torch.ones(1, text_len, dtype=torch.bool, device=device),
                      pooled_projections=torch.randn(1, cfg["pooled_projection_dim"], generator=g).to(device, dtype),
                      guidance=torch.tensor([6000.0], device=device, dtype=dtype))
    return model, inputs


def time_calls(model, inputs, device, reps: int, before=None) -> list[float]:
    """Milliseconds of ``reps`` transformer calls after one warm-up call; ``before()`` runs before each."""
    timer = Timer(device)
    out = []
    with torch.no_grad():
        for i in range(reps + 1):
            if before is not None:
                before()
            sync(device)
            t = timer.start()
            y = model(**inputs)[0]
            stop = timer.stop(t)
            sync(device)
            if i > 0:
                out.append(stop())
            if not bool(torch.isfinite(y).all()):
                raise RuntimeError("non-finite transformer output; lower the weight scale")
    return out


def sdpa_backend(name: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if name == "math":
        return sdpa_kernel(SDPBackend.MATH)
    return sdpa_kernel({"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[name])


def run_model(name: str, device: torch.device, reps: int, modes: list[str], backend: str | None, seed: int,
              dense_backends: list[str], quality: bool, precisions: list[str] = ("native",),
              units: int | None = None, prepare=None, checkpoint=None) -> dict:
    """``prepare(model)``, when given, runs on the built model before anything is timed (e.g.
    ``bench_multigpu.py`` enables diffusers' Ulysses attention there); ``checkpoint(result)``,
    when given, receives the result so far after each measurement (a killed run keeps them).
    Runs whose sparse calls are the same (``sparse_calls``) time them once."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    t0 = time.perf_counter()
    model, inputs = build(name, device, dtype, seed, units)
    if prepare is not None:
        prepare(model)
    log.info("%s built in %.1f s", name, time.perf_counter() - t0)
    family, cfg, latent, text_len = MODELS[name]
    grid = (latent[1], latent[2] // 2, latent[3] // 2)
    result = {"model": name, "config": cfg, "units": units, "latent": list(latent), "grid": list(grid),
              "tokens": grid[0] * grid[1] * grid[2], "text_tokens": text_len, "dtype": str(dtype), "batch": 1,
              "reps": reps}
    dense_backends = dense_backends if device.type == "cuda" else ["math"]
    breakdown = Breakdown(device)

    # ---- dense baselines
    dense = {}
    for b in dense_backends:
        with sdpa_backend(b):
            ms = time_calls(model, inputs, device, reps)
            with breakdown.installed():
                parts = timed_breakdown(model, inputs, device, breakdown)
        dense[b] = {"ms": ms, "median_ms": statistics.median(ms), "breakdown_ms": parts}
        log.info("%s dense %s: %.1f ms", name, b, dense[b]["median_ms"])
    result["dense"] = dense
    base = dense[dense_backends[0]]["median_ms"]
    save = checkpoint or (lambda partial: None)
    save(result)

    # ---- DFSAttn's dense call (warm-up steps): its fused ops around dense attention
    handle = apply_dfsattn(model, DFSConfig(schedule=DFSSchedule(num_steps=1, skip_steps=1), backend=backend))
    try:
        with sdpa_backend(dense_backends[0]):
            ms = time_calls(model, inputs, device, reps, before=lambda: handle.state.set_step(0))
            with breakdown.installed():
                handle.state.set_step(0)
                parts = timed_breakdown(model, inputs, device, breakdown)
    finally:
        handle.remove()
    result["dfsattn_dense"] = {"ms": ms, "median_ms": statistics.median(ms), "breakdown_ms": parts,
                               "speedup_vs_dense": base / statistics.median(ms)}
    log.info("%s DFSAttn dense call: %.1f ms", name, result["dfsattn_dense"]["median_ms"])
    save(result)
    fused_dense = result["dfsattn_dense"]["median_ms"]
    # precisions "..._dense" run DFSAttn's warm-up calls as dfsviz's kernel with every block kept,
    # "...+linear_fp8" with FP8 linear layers: those time their own
    warm_up = {p: fused_dense for p in precisions}
    for precision in precisions:
        config = DFSConfig(schedule=DFSSchedule(num_steps=1, skip_steps=1), backend=backend, **parse_variant(precision))
        if not config.dense_calls_through_kernel and config.linear_precision == "native":
            continue
        handle = apply_dfsattn(model, config)
        try:
            with sdpa_backend(dense_backends[0]):
                ms = time_calls(model, inputs, device, reps, before=lambda: handle.state.set_step(0))
        finally:
            handle.remove()
        warm_up[precision] = statistics.median(ms)
        result[f"dfsattn_dense_{precision}"] = {"ms": ms, "median_ms": warm_up[precision],
                                                "speedup_vs_dense": base / warm_up[precision]}
        log.info("%s DFSAttn dense call, %s: %.1f ms", name, precision, warm_up[precision])
        save(result)
    if quality:
        with torch.no_grad(), sdpa_backend(dense_backends[0]):
            y_dense = model(**inputs)[0]
        result["quality"] = {f"g{g:.1f}": output_quality(model, inputs, y_dense, g, backend, dense_backends[0])
                             for g in GAMMAS}
        del y_dense

    # ---- DFSAttn
    dfs = result["dfsattn"] = {}
    for mode, precision in ((m, p) for m in modes for p in precisions):
        twin = next((p for p in precisions[:precisions.index(precision)] if sparse_calls(p) == sparse_calls(precision)),
                    None)
        if twin is not None:  # the same sparse calls, timed under twin
            for gamma in GAMMAS:
                dfs[f"{run_key(mode, precision)}_g{gamma:.1f}"] = {
                    **dfs[f"{run_key(mode, twin)}_g{gamma:.1f}"], "precision": precision, "sparse_calls_timed_as": twin}
            continue
        once = mode == "permute_once"
        for gamma in GAMMAS:
            schedule = DFSSchedule(num_steps=2, skip_steps=0, interval=2, gamma0=gamma, decrement=0.0,
                                   dense_layers=(0,))
            config = DFSConfig(schedule=schedule, permute_once=once, backend=backend, **parse_variant(precision))
            restore_hooks = permute_hook_timing(breakdown)
            handle = apply_dfsattn(model, config)
            try:
                with sdpa_backend(dense_backends[0]):
                    def refresh():
                        handle.state.reset()
                        handle.state.set_step(0)

                    def cached():
                        handle.state.set_step(1)

                    t_refresh = time_calls(model, inputs, device, reps, before=refresh)
                    t_cached = time_calls(model, inputs, device, reps, before=cached)
                    density = handle.state.records[-1]["density"]
                    row = {"gamma": gamma, "mode": mode, "precision": precision, "refresh_ms": t_refresh,
                           "cached_ms": t_cached,
                           "refresh_median_ms": statistics.median(t_refresh),
                           "cached_median_ms": statistics.median(t_cached),
                           "mask_density": density, "breakdown_ms": {}}
                    with breakdown.installed():
                        for kind, before in (("refresh", refresh), ("cached", cached)):
                            before()
                            row["breakdown_ms"][kind] = timed_breakdown(model, inputs, device, breakdown)
            finally:
                handle.remove()
                restore_hooks()
            row["speedup_cached_vs_dense"] = base / row["cached_median_ms"]
            row["speedup_refresh_vs_dense"] = base / row["refresh_median_ms"]
            dfs[f"{run_key(mode, precision)}_g{gamma:.1f}"] = row
            log.info("%s %s %s gamma %.1f: refresh %.1f ms, cached %.1f ms (dense %.1f)", name, mode, precision,
                     gamma, row["refresh_median_ms"], row["cached_median_ms"], base)
            save(result)
    result["schedule_weighted"] = {run_key(m, p): schedule_weighted(dfs, run_key(m, p), base, fused_dense, warm_up[p])
                                   for m in modes for p in precisions}
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def sparse_calls(run: str) -> str:
    """The run whose sparse calls ``run``'s are (``DFSConfig.kernel_precision``: "_dense" changes
    only DFSAttn's warm-up calls): "native_dense" -> "native", "fp8_pv_dense+linear_fp8" ->
    "fp8_pv+linear_fp8"."""
    precision, plus, linear = run.partition("+")
    return DFSConfig(precision=precision).kernel_precision + plus + linear


def run_key(mode: str, precision: str) -> str:
    """Row key prefix of one DFSAttn run: the mode, and the precision unless native."""
    return mode if precision == "native" else f"{mode}_{precision}"


def compose_depth(shallow: dict, deep: dict, units: tuple[int, int], full_units: int) -> dict:
    """Every median of ``deep`` (at units[1]) carried to ``full_units`` with the per-unit time
    (deep - shallow) / (units[1] - units[0]); the schedule recomputed from those medians."""
    u1, u2 = units

    def carry(a, b):
        if isinstance(b, dict):
            return {key: carry(a[key], value) for key, value in b.items()}
        return b + (b - a) / (u2 - u1) * (full_units - u2)

    out = {key: deep[key] for key in ("model", "config", "latent", "grid", "tokens", "text_tokens", "dtype", "batch",
                                      "reps")}
    out["composed_from_units"] = list(units)
    out["full_units"] = full_units
    out["dense"] = {b: {"median_ms": carry(shallow["dense"][b]["median_ms"], row["median_ms"])}
                    for b, row in deep["dense"].items()}
    out["dfsattn_dense"] = {"median_ms": carry(shallow["dfsattn_dense"]["median_ms"],
                                               deep["dfsattn_dense"]["median_ms"])}
    out["dfsattn"] = {key: {**row, **{kind: carry(shallow["dfsattn"][key][kind], row[kind])
                                      for kind in ("refresh_median_ms", "cached_median_ms")}}
                      for key, row in deep["dfsattn"].items()}
    base = next(iter(out["dense"].values()))["median_ms"]
    for row in out["dfsattn"].values():
        for kind in ("refresh", "cached"):
            row.pop(f"{kind}_ms", None)  # the measured calls stay under "measured"
            row[f"speedup_{kind}_vs_dense"] = base / row[f"{kind}_median_ms"]
        row.pop("breakdown_ms", None)
    out["dfsattn_dense"]["speedup_vs_dense"] = base / out["dfsattn_dense"]["median_ms"]
    kernel_warm_up = {}  # precision "..._dense" or "...+linear_fp8" -> its own warm-up call
    for key in (k for k in deep if k.startswith("dfsattn_dense_")):
        ms = carry(shallow[key]["median_ms"], deep[key]["median_ms"])
        out[key] = {"median_ms": ms, "speedup_vs_dense": base / ms}
        kernel_warm_up[key.removeprefix("dfsattn_dense_")] = ms

    def warm_up(run: str) -> float:  # run = run_key(mode, precision)
        return next((ms for p, ms in kernel_warm_up.items() if run.endswith(f"_{p}")), out["dfsattn_dense"]["median_ms"])

    out["schedule_weighted"] = {key: schedule_weighted(out["dfsattn"], key, base, out["dfsattn_dense"]["median_ms"],
                                                       warm_up(key))
                                for key in deep["schedule_weighted"]}
    out["measured"] = {"shallow": shallow, "deep": deep}
    return out


def output_quality(model, inputs, y_dense: torch.Tensor, gamma: float, backend: str | None, sdpa: str) -> dict:
    """One refresh call at ``gamma`` with recall measured: the transformer output's relative L2
    error against the dense output, and the mean recall (and oracle recall) of each sparse layer."""
    schedule = DFSSchedule(num_steps=1, skip_steps=0, interval=1, gamma0=gamma, decrement=0.0, dense_layers=(0,))
    handle = apply_dfsattn(model, DFSConfig(schedule=schedule, backend=backend, measure_recall=True))
    try:
        handle.state.set_step(0)
        with torch.no_grad(), sdpa_backend(sdpa):
            y = model(**inputs)[0]
        records = handle.state.records
    finally:
        handle.remove()
    err = rel_l2(y, y_dense)
    recall = {r["layer"]: float(r["recall"].mean()) for r in records}
    oracle = {r["layer"]: float(r["oracle_recall"].mean()) for r in records}
    return {"gamma": gamma, "rel_l2_vs_dense": err, "recall_per_layer": recall, "oracle_recall_per_layer": oracle,
            "recall_mean": sum(recall.values()) / len(recall), "oracle_recall_mean": sum(oracle.values()) / len(oracle),
            "mask_density_mean": sum(float(r["density"]) for r in records) / len(records)}


def timed_breakdown(model, inputs, device: torch.device, breakdown: Breakdown) -> dict:
    """One model call with the breakdown timers active: ms per part, plus total and rest."""
    breakdown.active = True
    with torch.no_grad():
        timer = Timer(device)
        t = timer.start()
        model(**inputs)
        total = timer.stop(t)
    parts = breakdown.collect()
    breakdown.active = False
    parts["total"] = total()
    return _with_rest(parts)


def _with_rest(parts: dict) -> dict:
    parts = dict(parts)
    parts["rest"] = parts["total"] - sum(parts[c] for c in Breakdown.CATEGORIES)
    return parts


def schedule_weighted(dfs: dict, mode: str, dense_ms: float, dfs_dense_ms: float, warm_up_ms: float) -> dict:
    """Transformer time of the default 50-step schedule with CFG as two calls per step.

    DFSAttn's warm-up calls take ``warm_up_ms`` (``dfs_dense_ms``, its fused ops around dense
    attention, or its kernel's full-mask call under a precision "..._dense"). The speedup is over
    stock dense calls; ``speedup_vs_fused_dense`` is over dense calls with the fused ops
    (``dfs_dense_ms``), i.e. what the sparse attention (and the kernel's warm-up calls) give."""
    schedule = DFSSchedule(calls_per_step=2)
    total = 0.0
    counts = {"dense": 0, "refresh": 0, "cached": 0}
    for plan in schedule.plan():
        if plan.dense:
            total += warm_up_ms
            counts["dense"] += 1
            continue
        row = dfs[f"{mode}_g{round(plan.gamma, 1):.1f}"]  # 0.19999999999999998 is the 0.2 row
        kind = "refresh" if plan.refresh else "cached"
        total += row[f"{kind}_median_ms"]
        counts[kind] += 1
    calls = len(schedule.plan())
    return {"schedule": schedule.name, "calls": counts, "dfsattn_s": total / 1e3, "dense_s": dense_ms * calls / 1e3,
            "speedup": dense_ms * calls / total, "fused_dense_s": dfs_dense_ms * calls / 1e3,
            "speedup_vs_fused_dense": dfs_dense_ms * calls / total}


def write(out: Path, result: dict, name: str, model: dict) -> None:
    """``result`` with ``model`` as model ``name``'s entry, written to ``out`` (an entry without
    ``"complete": True`` is what a killed run left)."""
    result["models"][name] = {"complete": False, **model}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))


def card_slug(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    m = re.search(r"(h100|h200|a100|l40s|b200|gh200)", name)
    return m.group(1) if m else re.sub(r"[^a-z0-9]+", "_", name).strip("_")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="1.3b-480p,14b-720p", help=f"comma list of {list(MODELS)}")
    ap.add_argument("--reps", type=int, default=None,
                    help="timed calls per measurement, after one warm-up (default 2; 1 with --quick)")
    ap.add_argument("--modes", default=None,
                    help="per_call, permute_once or both (default both; permute_once with --quick)")
    ap.add_argument("--dense", default="cudnn,flash",
                    help="dense SDPA backends timed on GPU (cudnn, flash); the first is the speedup baseline")
    ap.add_argument("--quality", default="1.3b-480p,tiny",
                    help="models whose output error and per-layer recall are measured (one extra call per gamma)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--backend", default=None, choices=[None, "triton", "ref"], help="kernel backend (default auto)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--precisions", default="native",
                    help="DFSAttn precisions, comma list of DFSConfig.precision values (native, native_dense, fp8, "
                         f"fp8_dense, fp8_pv, fp8_pv_dense), each optionally with {LINEAR_FP8!r} or "
                         f"{LINEAR_FP8 + '_all'!r}: the linear layers in FP8 too")
    ap.add_argument("--quick", action="store_true",
                    help="time 2 and 3 repeating units of each model (one timed call each unless --reps, "
                         "permute-once unless --modes, cuDNN dense, no quality) and compose every call at full depth: "
                         "14B/720p and HunyuanVideo 720p in bf16 and FP8 in about 4 minutes on one H200")
    ap.add_argument("--out", type=Path, default=None, help="default benchmarks/results/e2e_<card>.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.quick:
        args.dense, args.quality = "cudnn", ""
    if args.reps is None:
        args.reps = 1 if args.quick else 2
    if args.reps < 1:
        ap.error(f"--reps: at least 1 (got {args.reps})")
    args.modes = args.modes or ("permute_once" if args.quick else "per_call,permute_once")
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    bad = [n for n in names if n not in MODELS]
    if bad:
        ap.error(f"--models: unknown {bad}; choose from {list(MODELS)}")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if any(m not in ("per_call", "permute_once") for m in modes):
        ap.error(f"--modes: choose from per_call, permute_once (got {modes})")
    dense = [b.strip() for b in args.dense.split(",") if b.strip()]
    if not dense or any(b not in ("cudnn", "flash") for b in dense):
        ap.error(f"--dense: choose from cudnn, flash (got {dense})")
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    if not precisions or any(parse_variant(p) is None for p in precisions):
        ap.error(f"--precisions: choose from {', '.join(PRECISION_MODES)}, each optionally with {LINEAR_FP8!r} or "
                 f"{LINEAR_FP8 + '_all'!r} (got {precisions})")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no GPU visible; use --device cpu --models tiny to check the script")
    out = args.out or Path(__file__).resolve().parent / "results" / f"e2e_{card_slug(device)}.json"
    result = {
        **run_header(device),
        "targets": TARGETS, "quick": args.quick, "precisions": precisions, "models": {},
    }
    for name in names:
        run = functools.partial(run_model, name, device, args.reps, modes, args.backend, args.seed, dense,
                                name in args.quality.split(","), precisions)
        if args.quick:
            family, cfg = MODELS[name][:2]
            result["models"][name] = compose_depth(run(units=QUICK_UNITS[0]), run(units=QUICK_UNITS[1]), QUICK_UNITS,
                                                   cfg[FULL_UNITS[family]])
        else:  # written after each measurement, marked incomplete until the model finishes
            result["models"][name] = run(checkpoint=lambda partial: write(out, result, name, partial))
        write(out, result, name, {**result["models"][name], "complete": True, "targets": TARGETS.get(name, {})})
    for name, r in result["models"].items():
        for mode, s in r["schedule_weighted"].items():
            print(f"{name} {mode}: 50-step CFG schedule {s['dfsattn_s']:.1f} s vs dense {s['dense_s']:.1f} s "
                  f"-> {s['speedup']:.2f}x ({s['speedup_vs_fused_dense']:.2f}x over dense with the fused ops)")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

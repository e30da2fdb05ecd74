"""Capture overhead on the Wan2.1 transformer architectures (random bf16 weights).

``--model 1.3b-480p`` (the default): 480p x 81 frames, latent 21 x 60 x 104 -> tokens
21 x 30 x 52, N = 32760, all 30 layers. ``--model 14b-720p --depth 4``: Wan2.1-14B's width
(40 heads of 128) at 720p x 81 frames, latent 21 x 90 x 160 -> tokens 21 x 45 x 80, N = 75600,
built with 4 of its 40 layers (one H200 call cannot build and time all 40): time and bytes are
reported for the built depth and scaled to 40 layers (both grow linearly with the layers captured;
the time's fixed part, embeddings and the scheduler, is small at this length). One denoising
step with CFG (conditional + unconditional pass, as Wan's pipeline runs it):

* uncaptured: the plain step (diffusers' default attention backend), median of 3 after warm-up;
* captured: ``run_capture`` on the same model, every one of the 30 layers, orders raster +
  hilbert3d, methods meanpool + dfs_tile, 2 footprints per head (the default), HDF5 written
  and flushed; also without footprints and with 4;
* breakdown: one more captured run (default settings) with timers around
  ``AttentionReducer.__call__`` (reduction GPU work and queueing to the writer; CUDA synchronised at
  entry and exit) and ``CaptureWriter.end_step`` (draining the compression backlog). The
  synchronisation perturbs the timing, so the ratio comes from the runs without timers.

Reports the ratio (target <= 4), the peak GPU memory of each, the file size per step and
the time breakdown.
Run on a GPU machine:

    python benchmarks/bench_capture.py --out benchmarks/results/capture_wan13b.json
    python benchmarks/bench_capture.py --model 14b-720p --depth 4 --quick --out benchmarks/results/capture_wan14b.json

``--quick`` skips the footprint variants and the breakdown.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from provenance import run_header  # this script's folder

WAN_13B = dict(
    patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
    eps=1e-6, image_dim=None, added_kv_proj_dim=None, rope_max_seq_len=1024,
)
LATENT = (21, 60, 104)  # 480 x 832 x 81 frames through Wan's VAE (8x spatial, 4x temporal)
WAN_14B = dict(WAN_13B, num_attention_heads=40, ffn_dim=13824, num_layers=40)
# name -> (config, latent F x H x W): 720 x 1280 x 81 frames for the 14B
MODELS = {"1.3b-480p": (WAN_13B, LATENT), "14b-720p": (WAN_14B, (21, 90, 160))}
TEXT_LEN = 512  # Wan pads T5 prompts to 512 tokens
GUIDANCE = 5.0
# --smoke: a tiny CPU run of this script's logic (no numbers worth reporting)
SMOKE = dict(WAN_13B, num_attention_heads=2, attention_head_dim=64, text_dim=16, freq_dim=32, ffn_dim=64, num_layers=2,
             in_channels=4, out_channels=4, rope_max_seq_len=32)
DEVICE = "cuda"


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _reset_peak():
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()


def _peak() -> int:
    return torch.cuda.max_memory_allocated() if DEVICE == "cuda" else 0


def build_source(config: dict, seed: int = 0):
    import diffusers

    from dfsviz.capture.adapters import Conditioning, get_adapter
    from dfsviz.capture.sources import ModelSource

    torch.manual_seed(seed)
    with torch.device(DEVICE):
        model = diffusers.WanTransformer3DModel(**config).to(torch.bfloat16).eval()
    # as from_pretrained(torch_dtype=bfloat16) does: Wan keeps these modules in float32
    keep = getattr(model, "_keep_in_fp32_modules", None) or ()
    for name, param in model.named_parameters():
        if any(k in name.split(".") for k in keep):
            param.data = param.data.float()
    text_dim = config["text_dim"]
    gen = torch.Generator().manual_seed(seed + 1)
    cond = Conditioning(torch.randn(1, TEXT_LEN, text_dim, generator=gen))
    uncond = Conditioning(torch.randn(1, TEXT_LEN, text_dim, generator=gen))
    source = ModelSource(
        transformer=model, adapter=get_adapter("wan"),
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=5.0),
        model_id=f"wan2.1-{config['num_attention_heads']}-heads-{config['num_layers']}-layers-random-bf16", cond=cond, uncond=uncond, num_steps=50, guidance_scale=GUIDANCE,
    )
    return source


def plain_step_seconds(source, repeats: int = 3) -> tuple[float, list[float], int]:
    """Median wall time of one uncaptured CFG step (2 forwards + scheduler step) and its peak memory."""
    model, adapter, sched = source.transformer, source.adapter, source.scheduler
    sched.set_timesteps(50, device=DEVICE)
    t = sched.timesteps[0]
    gen = torch.Generator().manual_seed(0)
    latents = adapter.make_latents(LATENT, model.config, gen, DEVICE, torch.bfloat16)
    cond = source.cond.to(DEVICE, torch.bfloat16)
    uncond = source.uncond.to(DEVICE, torch.bfloat16)
    grid = adapter.token_grid(model.config, LATENT)
    times = []
    _reset_peak()
    with torch.no_grad():
        for i in range(repeats + 1):
            _sync()
            t0 = time.perf_counter()
            pc = adapter.forward(model, latents, t, cond, guidance=GUIDANCE, grid=grid).float()
            pu = adapter.forward(model, latents, t, uncond, guidance=GUIDANCE, grid=grid).float()
            pred = pu + GUIDANCE * (pc - pu)
            sched._step_index = None  # same step again: the scheduler must not advance past its schedule
            sched.step(pred, t, latents.float(), return_dict=False)
            _sync()
            if i:  # the first run is warm-up
                times.append(time.perf_counter() - t0)
    return statistics.median(times), times, _peak()


def captured_step(source, out: Path, layers=None, footprints: int = 2, backend: str | None = None) -> dict:
    from dfsviz.capture import CaptureConfig, run_capture

    cfg = CaptureConfig(
        out=str(out), num_steps=50, capture_steps=(0,), layers=layers, latent="x".join(map(str, LATENT)),
        orders=("raster", "hilbert3d"), methods=("meanpool", "dfs_tile"), footprints=footprints, device=DEVICE,
        dtype="bfloat16", guidance_scale=GUIDANCE, overwrite=True, kernel_backend=backend,
    )
    _reset_peak()
    result = run_capture(cfg, progress=False, source=source)
    return {
        "step_seconds": result.step_seconds[0],
        "run_seconds": result.seconds,
        "file_bytes": result.file_bytes,
        "peak_gpu_bytes": _peak(),
    }


def breakdown_step(source, out: Path, backend: str | None = None) -> dict:
    """Seconds of one captured step inside ``AttentionReducer.__call__``, inside ``CaptureWriter.end_step``
    and elsewhere (the model's forwards, hooks, scheduler), from a run with timers that
    synchronise CUDA at their entry and exit."""
    from dfsviz.capture.reduce import AttentionReducer
    from dfsviz.capture.writer import CaptureWriter

    spent = {"reducer": 0.0, "end_step_drain": 0.0}

    def timed(key, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            _sync()
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                _sync()
                spent[key] += time.perf_counter() - t0

        return wrapper

    originals = {(AttentionReducer, "__call__"): "reducer", (CaptureWriter, "end_step"): "end_step_drain"}
    saved = {target: getattr(*target) for target in originals}
    for (cls, name), key in originals.items():
        setattr(cls, name, timed(key, saved[(cls, name)]))
    try:
        res = captured_step(source, out, backend=backend)
    finally:
        for (cls, name), fn in saved.items():
            setattr(cls, name, fn)
    return {**spent, "other": res["step_seconds"] - sum(spent.values()), "step": res["step_seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results/capture_wan13b.json")
    parser.add_argument("--tmp", default=None, help="folder for the capture files (default: a temp dir)")
    parser.add_argument("--model", choices=sorted(MODELS), default="1.3b-480p")
    parser.add_argument("--depth", type=int, default=None, help="layers to build (default: the model's all)")
    parser.add_argument("--quick", action="store_true", help="skip the footprint variants and the breakdown")
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run that checks the script, reports nothing")
    args = parser.parse_args()
    global LATENT, TEXT_LEN, DEVICE
    config, LATENT = MODELS[args.model]
    full_depth = config["num_layers"]
    if args.depth is not None:
        if not 1 <= args.depth <= full_depth:
            parser.error(f"--depth must be in [1, {full_depth}] for {args.model} (got {args.depth})")
        config = dict(config, num_layers=args.depth)
    if args.smoke:
        config, LATENT, TEXT_LEN, DEVICE = SMOKE, (3, 16, 16), 8, "cpu"
        full_depth = config["num_layers"]
    depth = config["num_layers"]
    header = run_header(torch.device(DEVICE))
    from dfsviz.kernels._dispatch import triton_available

    source = build_source(config)
    base_median, base_times, base_peak = plain_step_seconds(source)
    print(f"uncaptured step: {base_median:.3f} s (runs {[round(t, 3) for t in base_times]})", flush=True)
    tmp = Path(args.tmp or tempfile.mkdtemp(prefix="dfsviz-bench-"))
    tmp.mkdir(parents=True, exist_ok=True)
    # warm-up: compiles and autotunes the Triton kernels for these shapes (one layer)
    backend, triton_error = None, None
    try:
        warm = captured_step(source, tmp / "warm.h5", layers=(0,))
    except Exception as exc:  # a kernel failing on this GPU: measure with the references, and say so
        triton_error = f"{type(exc).__name__}: {exc}"
        print(f"Triton statistics failed ({triton_error}); falling back to the PyTorch references", flush=True)
        backend = "ref"
        warm = captured_step(source, tmp / "warm.h5", layers=(0,), backend=backend)
    print(f"warm-up capture (1 layer): {warm['step_seconds']:.3f} s", flush=True)
    runs = []
    for i in range(2 if backend is None else 1):
        res = captured_step(source, tmp / f"cap{i}.h5", backend=backend)
        runs.append(res)
        print(f"captured step ({depth} layers): {res['step_seconds']:.3f} s, file {res['file_bytes'] / 2**20:.1f} MiB, "
              f"peak {res['peak_gpu_bytes'] / 2**30:.2f} GiB", flush=True)
    best = min(runs, key=lambda r: r["step_seconds"])
    scale = full_depth / depth
    result = {
        **header,
        "benchmark": f"capture overhead, one denoising step with CFG, all {depth} built layers captured (cond pass)",
        "smoke": args.smoke,
        "statistics_backend": "reference" if backend == "ref" or not triton_available() else "triton",
        "triton_error": triton_error,
        "model": f"WanTransformer3DModel, Wan2.1 {args.model} config, random bf16 weights",
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()},
        "depth_built": depth,
        "full_depth": full_depth,
        "latent": list(LATENT),
        "grid": source.adapter.token_grid(source.transformer.config, LATENT).name,
        "num_tokens": source.adapter.token_grid(source.transformer.config, LATENT).num_tokens,
        "text_len": TEXT_LEN,
        "guidance_scale": GUIDANCE,
        "capture": {"orders": ["raster", "hilbert3d"], "methods": ["meanpool", "dfs_tile"], "block": 128,
                    "tile": 16, "footprints": 2, "layers": depth,
                    "heads": config["num_attention_heads"], "branches": ["cond"], "map_dtype": "float32"},
        "uncaptured_step_seconds": base_median,
        "uncaptured_step_runs": base_times,
        "uncaptured_peak_gpu_bytes": base_peak,
        "captured_step_seconds": best["step_seconds"],
        "captured_step_runs": [r["step_seconds"] for r in runs],
        "captured_peak_gpu_bytes": best["peak_gpu_bytes"],
        "ratio_captured_over_uncaptured": best["step_seconds"] / base_median,
        "target_ratio": 4.0,
        "meets_target": best["step_seconds"] / base_median <= 4.0,
        "file_bytes_per_step": best["file_bytes"],
        "scaled_to_full_depth": {"uncaptured_step_seconds": base_median * scale,
                                 "captured_step_seconds": best["step_seconds"] * scale,
                                 "file_bytes_per_step": best["file_bytes"] * scale},
        "warmup_capture_one_layer_seconds": warm["step_seconds"],
    }
    if not args.quick:
        nofp = captured_step(source, tmp / "nofp.h5", footprints=0, backend=backend)
        print(f"captured step without footprints: {nofp['step_seconds']:.3f} s", flush=True)
        fp4 = captured_step(source, tmp / "fp4.h5", footprints=4, backend=backend)
        print(f"captured step with 4 footprints: {fp4['step_seconds']:.3f} s", flush=True)
        breakdown = breakdown_step(source, tmp / "breakdown.h5", backend=backend)
        print("breakdown (timed run, synchronised): " + ", ".join(f"{k} {v:.3f} s" for k, v in breakdown.items()),
              flush=True)
        result.update({
            "captured_step_seconds_without_footprints": nofp["step_seconds"],
            "file_bytes_per_step_without_footprints": nofp["file_bytes"],
            "captured_step_seconds_with_4_footprints": fp4["step_seconds"],
            "file_bytes_per_step_with_4_footprints": fp4["file_bytes"],
            "breakdown_seconds": {k: breakdown[k] for k in ("reducer", "end_step_drain", "other")},
            "breakdown_step_seconds": breakdown["step"],
        })
    out = Path(args.out if not args.smoke else tmp / "smoke.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("card", "uncaptured_step_seconds", "captured_step_seconds",
                                             "ratio_captured_over_uncaptured", "file_bytes_per_step",
                                             "captured_peak_gpu_bytes", "scaled_to_full_depth")}, indent=1))


if __name__ == "__main__":
    main()

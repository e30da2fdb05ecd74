"""DFSAttn quality on CPU: transformer-output error and recall per step and layer, clip PSNR/SSIM.

Two models:

* ``embedded``: the shipped tiny Wan (``data/models/tiny-wan``, 9 x 36 x 64 pixels, 9 x 18 x 32 =
  5,184 tokens, 41 blocks of 128). A dense sampling run (Euler flow matching, CFG batch of 2)
  drives the steps; at every step the same transformer input goes through the dense model and
  through a DFSAttn copy (teacher forcing: errors do not compound), giving the relative L2
  error of the transformer output and the recall of every sparse layer's mask. Then a full
  DFSAttn sampling run from the same seed gives the clip, compared with the dense clip frame by
  frame (PSNR, SSIM).
* ``wan13b``: the Wan2.1-T2V-1.3B transformer architecture with seeded random float32 weights at
  a reduced resolution that fits the CPU (latent 3 x 16 x 64 -> 3 x 8 x 32 = 768 tokens, blocks of
  64 so that there are 12 blocks); one forward per budget gamma 0.3 / 0.2 / 0.1 (each a refresh),
  dense vs DFSAttn on the same random latent and text. Random weights give nearly uniform
  attention, so this part checks plumbing and the error scale at full width and depth, not quality.
* ``precisions`` (``--device cuda`` runs the Triton kernels, ``cpu`` their PyTorch simulation): the
  embedded model in bfloat16, one full sampling run per ``DFSConfig.precision`` (bf16 DFSAttn,
  FP8 Q . K, FP8 Q . K and P . V, each also with FP8 dense warm-up calls; a precision followed by
  ``+linear_fp8`` or ``+linear_fp8_all`` also runs the blocks' linear layers in FP8,
  ``DFSConfig.linear_precision``) from
  the same seed and schedule, each clip's PSNR / SSIM against the bf16 dense clip and against the
  bf16 DFSAttn clip; the float32 dense clip gives the scale of bfloat16's own rounding.

Writes benchmarks/results/quality_embedded.json (embedded, wan13b) and
benchmarks/results/quality_precisions_<card or cpu>.json (precisions). Run:
    .venv/bin/python benchmarks/quality_embedded.py                 # embedded and wan13b
    .venv/bin/python benchmarks/quality_embedded.py --part embedded
    python3 benchmarks/quality_embedded.py --part precisions --device cuda   # GPU machine
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dfsviz.accel import DFSConfig, apply_dfsattn
from dfsviz.accel.config import LINEAR_PRECISIONS, PRECISION_MODES
from dfsviz.models.sampler import encode_labels, load_embedded_model, sample_videos
from dfsviz.sparse.schedule import DFSSchedule
from provenance import run_header  # this script's folder

RESULTS = Path(__file__).resolve().parent / "results" / "quality_embedded.json"
#: The precisions part's default: bf16 DFSAttn first (the other clips are also scored against it).
PRECISIONS = ("native", "fp8", "fp8_pv", "fp8_dense", "fp8_pv_dense")
#: Appended to a precision: the run's linear layers in FP8 too (DFSConfig.linear_precision "fp8", or
#: "fp8_all" with ``+linear_fp8_all``).
LINEAR_FP8 = "+linear_fp8"


def parse_variant(token: str) -> dict | None:
    """The DFSConfig fields of a run named ``precision``, ``precision+linear_fp8`` or
    ``precision+linear_fp8_all``, None if invalid."""
    precision, plus, linear = token.partition("+")
    linear_precision = linear.removeprefix("linear_") if linear.startswith("linear_") else None
    if precision not in PRECISION_MODES or (plus and linear_precision not in set(LINEAR_PRECISIONS) - {"native"}):
        return None
    return {"precision": precision, "linear_precision": linear_precision if plus else "native"}

WAN13B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
              text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
              qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float) -> float:
    """PSNR in dB of images x, y [C, H, W] with the given value range."""
    mse = float(((x.double() - y.double()) ** 2).mean())
    return math.inf if mse == 0 else 10.0 * math.log10(data_range**2 / mse)


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float, window: int = 11, sigma: float = 1.5) -> float:
    """Mean SSIM (Wang et al. 2004: Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03) of x, y [C, H, W],
    averaged over channels and the valid (unpadded) window positions."""
    c = x.shape[0]
    coords = torch.arange(window, dtype=torch.float64) - (window - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = (g / g.sum())
    kernel = (g[:, None] * g[None, :]).expand(c, 1, window, window)
    x, y = x.double()[None], y.double()[None]

    def blur(t):
        return F.conv2d(t, kernel, groups=c)

    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
    return float(s.mean())


def summarize_records(records: list[dict]) -> dict:
    """Per step: mean recall over sparse layers (and per layer), the oracle recall at the same kept
    counts (the best any mask of that size could reach), mask density, refreshes."""
    steps: dict[int, dict] = {}
    for r in records:
        s = steps.setdefault(r["step"], {"recall_per_layer": {}, "oracle_recall_per_layer": {},
                                         "density_per_layer": {}, "refreshed_layers": 0})
        if "recall" in r:
            s["recall_per_layer"][r["layer"]] = float(r["recall"].mean())
            s["oracle_recall_per_layer"][r["layer"]] = float(r["oracle_recall"].mean())
        s["density_per_layer"][r["layer"]] = r["density"]
        s["gamma"] = r["gamma"]
        s["refreshed_layers"] += int(r["refresh"])
    for s in steps.values():
        rec = list(s["recall_per_layer"].values())
        s["recall_mean"] = sum(rec) / len(rec) if rec else None
        s["recall_min"] = min(rec) if rec else None
        orc = list(s["oracle_recall_per_layer"].values())
        s["oracle_recall_mean"] = sum(orc) / len(orc) if orc else None
    return steps


def embedded_schedule(num_steps: int) -> DFSSchedule:
    """The schedule both embedded parts run: a quarter of the steps dense, a refresh every quarter,
    gamma 0.3 decreasing by 0.1, layer 0 dense, one transformer call per step (CFG as a batch of 2)."""
    return DFSSchedule(num_steps=num_steps, skip_steps=num_steps // 4, interval=num_steps // 4,
                       gamma0=0.3, decrement=0.1, dense_layers=(0,), calls_per_step=1)


def clip_scores(clip: torch.Tensor, reference: torch.Tensor, labels: list[str]) -> list[dict]:
    """Per label: PSNR and SSIM of every frame of ``clip`` against ``reference`` ([B, 3, F, H, W] in
    [-1, 1]) and their means over the frames."""
    out = []
    for b, label in enumerate(labels):
        frames = []
        for f in range(reference.shape[2]):
            x, y = clip[b, :, f].cpu(), reference[b, :, f].cpu()
            frames.append({"psnr": psnr(x, y, 2.0), "ssim": ssim((x + 1) / 2, (y + 1) / 2, 1.0)})
        out.append({"label": label, "frames": frames,
                    "psnr_mean": sum(fr["psnr"] for fr in frames) / len(frames),
                    "ssim_mean": sum(fr["ssim"] for fr in frames) / len(frames)})
    return out


def run_embedded(num_steps: int, seed: int, guidance: float, labels: list[str]) -> dict:
    model = load_embedded_model()
    schedule = embedded_schedule(num_steps)
    config = DFSConfig(schedule=schedule, measure_recall=True)
    sparse_tf = copy.deepcopy(model.transformer)
    handle = apply_dfsattn(sparse_tf, config)

    cond = encode_labels(model, labels)
    null = model.class_embeddings[model.null_label].expand_as(cond)
    text = torch.cat([cond, null]) if guidance != 1 else cond
    per_step = []

    def teacher(step):
        if schedule.at_step(step.index).dense:  # warm-up: DFSAttn runs the stock processor, bit for bit
            per_step.append({"step": step.index, "sigma": step.sigma, "dense": True, "rel_l2": 0.0})
            return
        inp = torch.cat([step.latents, step.latents]) if guidance != 1 else step.latents
        ts = torch.full((inp.shape[0],), step.timestep, dtype=torch.float32)
        with torch.no_grad():
            dense = model.transformer(inp, ts, text, return_dict=False)[0]
            handle.state.set_step(step.index)
            sparse = sparse_tf(inp, ts, text, return_dict=False)[0]
        per_step.append({"step": step.index, "sigma": step.sigma, "dense": False, "rel_l2": rel_l2(sparse, dense)})

    t0 = time.perf_counter()
    with torch.no_grad():
        dense_clip = sample_videos(model, labels, num_steps=num_steps, seed=seed, guidance_scale=guidance,
                                   callback_on_step_begin=teacher)
    t_teacher = time.perf_counter() - t0
    summary = summarize_records(handle.state.records)
    for row in per_step:
        row.update({k: v for k, v in summary.get(row["step"], {}).items()})
        row.setdefault("gamma", None)

    # Full DFSAttn sampling run: the schedule follows the transformer call count.
    handle.state.reset()
    handle.state.use_call_count()
    sparse_model = dataclasses.replace(model, transformer=sparse_tf)
    t0 = time.perf_counter()
    with torch.no_grad():
        sparse_clip = sample_videos(sparse_model, labels, num_steps=num_steps, seed=seed, guidance_scale=guidance)
    t_sample = time.perf_counter() - t0
    handle.remove()

    clips = clip_scores(sparse_clip, dense_clip, labels)
    sparse_steps = [r for r in per_step if not r["dense"]]
    return {
        "model": "data/models/tiny-wan", "grid": model.config.latent_grid().name,
        "tokens": model.config.latent_grid().num_tokens, "labels": labels, "seed": seed,
        "guidance_scale": guidance, "cfg": "batch of 2, share", "config": config.name,
        "schedule_table": schedule.table(), "per_step": per_step, "clips": clips,
        "rel_l2_mean_sparse_steps": sum(r["rel_l2"] for r in sparse_steps) / max(1, len(sparse_steps)),
        "scorer_calls_full_run": handle.state.scorer_calls,
        "seconds": {"teacher_forced_pass": t_teacher, "dfs_sampling": t_sample},
    }


def run_precisions(num_steps: int, seed: int, guidance: float, labels: list[str], device: torch.device,
                   precisions: list[str]) -> dict:
    """The embedded model in bfloat16 sampled densely and under DFSAttn at every precision (same seed
    and schedule); each clip scored against the bf16 dense clip and the bf16 DFSAttn clip."""
    model = load_embedded_model(device=device, dtype=torch.bfloat16)
    schedule = embedded_schedule(num_steps)
    runs = dict(seed=seed, guidance_scale=guidance, num_steps=num_steps)
    seconds, clips, configs, linears = {}, {}, {}, {}
    with torch.no_grad():
        t0 = time.perf_counter()
        clips["dense"] = sample_videos(model, labels, **runs)
        seconds["dense"] = time.perf_counter() - t0
        clips["dense_float32"] = sample_videos(load_embedded_model(device=device), labels, **runs)
        for precision in precisions:
            transformer = copy.deepcopy(model.transformer)
            config = DFSConfig(schedule=schedule, **parse_variant(precision))
            handle = apply_dfsattn(transformer, config)
            linears[precision] = len(handle.fp8_linears)
            try:
                handle.state.use_call_count()
                t0 = time.perf_counter()
                clips[precision] = sample_videos(dataclasses.replace(model, transformer=transformer), labels, **runs)
                seconds[precision] = time.perf_counter() - t0
            finally:
                handle.remove()
            configs[precision] = config.name
    rows = {}
    for name, clip in clips.items():
        rows[name] = {"vs_dense_bf16": clip_scores(clip, clips["dense"], labels)}
        if "native" in clips and name != "native":
            rows[name]["vs_dfsattn_bf16"] = clip_scores(clip, clips["native"], labels)
        if name in configs:
            rows[name]["config"] = configs[name]
            rows[name]["fp8_linear_layers"] = linears[name]
    return {"model": "data/models/tiny-wan in bfloat16", "grid": model.config.latent_grid().name,
            "tokens": model.config.latent_grid().num_tokens, "labels": labels, "seed": seed,
            "guidance_scale": guidance, "cfg": "batch of 2, share", "schedule_table": schedule.table(),
            "clips": rows, "seconds_per_clip": seconds,
            "note": "seconds include compilation and autotuning of the first call of each kind"}


def run_wan13b(seed: int) -> dict:
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    t0 = time.perf_counter()
    model = WanTransformer3DModel(**WAN13B).eval()
    t_init = time.perf_counter() - t0
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 16, 3, 16, 64, generator=g)
    text = torch.randn(1, 64, 4096, generator=g)
    schedule = DFSSchedule(num_steps=3, skip_steps=0, interval=1, gamma0=0.3, decrement=0.1, dense_layers=(0,))
    config = DFSConfig(block=64, tile=16, schedule=schedule, measure_recall=True)
    rows = []
    with torch.no_grad():
        for step, t in enumerate((800, 500, 200)):
            ts = torch.tensor([t])
            t0 = time.perf_counter()
            dense = model(latents, ts, text, return_dict=False)[0]
            t_dense = time.perf_counter() - t0
            handle = apply_dfsattn(model, config)
            handle.state.set_step(step)
            t0 = time.perf_counter()
            sparse = model(latents, ts, text, return_dict=False)[0]
            t_sparse = time.perf_counter() - t0
            handle.remove()
            summary = summarize_records(handle.state.records)[step]
            rows.append({"step": step, "timestep": t, "rel_l2": rel_l2(sparse, dense), **summary,
                         "seconds_dense": t_dense, "seconds_dfs_cpu_ref": t_sparse})
    return {"model": "Wan2.1-T2V-1.3B architecture, random float32 weights (seed %d)" % seed,
            "latent": [16, 3, 16, 64], "grid": "f3h8w32", "tokens": 768, "block": 64, "tile": 16,
            "config": config.name, "per_step": rows, "seconds_init": t_init}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["all", "embedded", "wan13b", "precisions"], default="all",
                    help="all = embedded and wan13b (CPU); precisions runs on --device")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--guidance", type=float, default=2.0)
    ap.add_argument("--labels", nargs="+", default=["red_disc_translate"])
    ap.add_argument("--device", default="cpu", help="precisions part: cuda runs the Triton kernels, cpu their "
                                                    "PyTorch simulation")
    ap.add_argument("--precisions", default=",".join(PRECISIONS),
                    help="precisions part: comma list of DFSConfig.precision values, each optionally with "
                         f"{LINEAR_FP8!r} or {LINEAR_FP8 + '_all'!r} (the linear layers in FP8 too); native first")
    ap.add_argument("--out", type=Path, default=None,
                    help="default benchmarks/results/quality_embedded.json, or quality_precisions_<card>.json")
    args = ap.parse_args(argv)
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    if not precisions or precisions[0] != "native" or any(parse_variant(p) is None for p in precisions):
        ap.error(f"--precisions: a comma list of {sorted(PRECISION_MODES)}, each optionally with {LINEAR_FP8!r} or "
                 f"{LINEAR_FP8 + '_all'!r}, starting with native (got {precisions})")
    if args.part == "precisions":
        run_precisions_part(args, precisions)
        return
    args.out = args.out or RESULTS
    meta = {**run_header(torch.device("cpu")), "kernel_backend": "ref (PyTorch reference on CPU)"}

    def save(key: str, value: dict) -> None:
        # re-read right before writing: the two parts may run as two processes
        out = json.loads(args.out.read_text()) if args.out.exists() else {}
        out.update(meta)
        out[key] = value
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1, default=str))

    if args.part in ("all", "embedded"):
        save("embedded", run_embedded(args.steps, args.seed, args.guidance, args.labels))
    if args.part in ("all", "wan13b"):
        save("wan13b_random", run_wan13b(args.seed))
    print(f"wrote {args.out}")


def run_precisions_part(args: argparse.Namespace, precisions: list[str]) -> None:
    import bench_e2e  # imports this module: import it only here

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here; --device cpu runs the kernels' PyTorch simulation")
    out = args.out or RESULTS.with_name(f"quality_precisions_{bench_e2e.card_slug(device)}.json")
    result = {
        **run_header(device),
        "kernel_backend": "triton" if device.type == "cuda" else "ref (PyTorch simulation of the kernels)",
        "precisions": run_precisions(args.steps, args.seed, args.guidance, args.labels, device, precisions),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

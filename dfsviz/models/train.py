"""Train an embedded video DiT by flow matching on procedural clips.

``python -m dfsviz.models.train --out dfsviz/data/models/tiny-wan --minutes 8`` trains a
``diffusers.WanTransformer3DModel`` (config from ``dfsviz.models.config``) on clips
from ``dfsviz.models.videos``: a clip x0 and Gaussian noise n give
x_sigma = (1 - sigma) x0 + sigma n, and the model, conditioned on the timestep
1000 sigma and on its class's learned embedding tokens (``encoder_hidden_states``),
regresses the velocity n - x0. Classes are dropped to a null embedding 10% of the
time so the sampler can use classifier-free guidance.

Before and after training it measures, on held-out clips (seeds never used for
training), the flow-matching loss and the oracle recall at budget gamma of the
self-attention maps (Q/K captured by wrapping ``F.scaled_dot_product_attention``),
so "it learned" is a number: the trained model against the same initialisation.
It writes the model folder (``save_embedded_model``, float16 EMA weights), a
training log JSON and, with ``--results``, a results JSON for ``benchmarks/results/``.

On CUDA the training forward runs under bfloat16 autocast, and every attention call
(training and evaluation) may use only the flash and memory-efficient SDPA kernels:
at the medium preset's 32,760 tokens the math kernel's N x N scores would not fit.
``--preset medium-wan`` takes its own batch size and evaluation sizes
(:data:`PRESET_TRAINING`); options given on the command line override them.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import math
import platform
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from dfsviz.models.config import EmbeddedModelConfig, get_preset
from dfsviz.models.sampler import load_embedded_model, save_embedded_model
from dfsviz.models.videos import make_videos, sample_labels
from dfsviz.sparse._validate import check_block
from dfsviz.sparse.stats import block_stats_ref, oracle_recall

__all__ = [
    "PRESET_TRAINING",
    "TrainConfig",
    "attention_recall",
    "build_transformer",
    "capture_self_attention",
    "flow_matching_loss",
    "heldout_loss",
    "main",
    "make_heldout",
    "train",
]

logger = logging.getLogger(__name__)

# Held-out clips use seeds from here on; training clip seeds are seed * 2**32 + step,
# below 2**63 for every allowed seed, so the two never meet.
HELDOUT_SEED = 2**63
_TIMESTEP_SCALE = 1000.0          # Wan (and the scheduler) take sigma * 1000 as the timestep
# Attention kernels allowed in mixed precision: never the math kernel, whose N x N scores do not fit at
# the medium preset's length (32,760^2 x 3 heads x 8 clips in bfloat16 is about 50 GB).
_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]

#: Training settings of a preset that differ from :class:`TrainConfig`'s defaults (those suit tiny-wan):
#: the medium model's clips hold 6.3x the tokens, so fewer per step, fewer held-out clips.
PRESET_TRAINING: dict[str, dict[str, object]] = {
    "medium-wan": {"batch_size": 8, "warmup_steps": 40, "eval_clips": 16, "recall_clips": 2, "log_every": 10},
}


@dataclass(frozen=True)
class TrainConfig:
    """One training run.

    Fields:
        preset: model preset name (``dfsviz.models.config.PRESETS``).
        minutes: wall-clock budget of the optimisation loop in minutes (> 0).
        max_steps: stop after this many optimiser steps (>= 1), or None for the time budget only.
        batch_size: clips per step (>= 1).
        lr: peak AdamW learning rate (> 0); linear warm-up, cosine decay to lr / 10.
        warmup_steps: warm-up steps (>= 0).
        weight_decay: AdamW decay of matrices (>= 0).
        ema_decay: decay of the weight average that is saved, in [0, 1).
        uncond_prob: probability of replacing a clip's class by the null class, in [0, 1).
        seed: initialisation and data seed, in [0, 2**31).
        eval_clips: held-out clips for the loss (>= 1; labels cycle over the classes).
        recall_clips: held-out clips for the attention recall (1 .. eval_clips).
        recall_sigmas: noise levels in (0, 1) at which attention is captured.
        gammas: budgets in (0, 1] at which oracle recall is reported.
        block: tokens per block for the recall, a power of two in [16, 256].
        log_every: steps between log lines (>= 1).
        mixed_precision: bfloat16 autocast for training and flash / memory-efficient attention
            kernels only; None (default) = on CUDA, off elsewhere.
    """

    preset: str = "tiny-wan"
    minutes: float = 8.0
    max_steps: int | None = None
    batch_size: int = 32
    lr: float = 6e-4
    warmup_steps: int = 100
    weight_decay: float = 0.01
    ema_decay: float = 0.998
    uncond_prob: float = 0.1
    seed: int = 0
    eval_clips: int = 64
    recall_clips: int = 8
    recall_sigmas: tuple[float, ...] = (0.25, 0.5, 0.75)
    gammas: tuple[float, ...] = (0.1, 0.2)
    block: int = 128
    log_every: int = 25
    mixed_precision: bool | None = None

    @classmethod
    def for_preset(cls, preset: str, **overrides: object) -> "TrainConfig":
        """The config of ``preset`` with its :data:`PRESET_TRAINING` settings, then ``overrides``."""
        return cls(preset=preset, **{**PRESET_TRAINING.get(preset, {}), **overrides})

    def __post_init__(self) -> None:
        get_preset(self.preset)
        for field in ("minutes", "lr"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"`{field}` must be a number > 0 (got {value!r})")
        for field in ("batch_size", "eval_clips", "recall_clips", "log_every"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{field}` must be an integer >= 1 (got {value!r})")
        if self.max_steps is not None and (isinstance(self.max_steps, bool) or not isinstance(self.max_steps, int)
                                           or self.max_steps < 1):
            raise ValueError(f"`max_steps` must be an integer >= 1 or None (got {self.max_steps!r})")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"`warmup_steps` must be an integer >= 0 (got {self.warmup_steps!r})")
        if not 0 <= self.weight_decay:
            raise ValueError(f"`weight_decay` must be >= 0 (got {self.weight_decay!r})")
        for field in ("ema_decay", "uncond_prob"):
            if not 0 <= getattr(self, field) < 1:
                raise ValueError(f"`{field}` must lie in [0, 1) (got {getattr(self, field)!r})")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**31:
            raise ValueError(f"`seed` must be an integer in [0, 2**31) (got {self.seed!r})")
        if self.recall_clips > self.eval_clips:
            raise ValueError(f"`recall_clips` must be <= eval_clips={self.eval_clips} (got {self.recall_clips})")
        if not self.recall_sigmas or not all(0 < s < 1 for s in self.recall_sigmas):
            raise ValueError(f"`recall_sigmas` must be a non-empty tuple of noise levels in (0, 1) "
                             f"(got {self.recall_sigmas!r})")
        if not self.gammas or not all(0 < g <= 1 for g in self.gammas):
            raise ValueError(f"`gammas` must be a non-empty tuple of budgets in (0, 1] (got {self.gammas!r})")
        check_block(self.block)
        if self.mixed_precision is not None and not isinstance(self.mixed_precision, bool):
            raise TypeError(f"`mixed_precision` must be True, False or None (got {type(self.mixed_precision).__name__})")


def build_transformer(config: EmbeddedModelConfig, seed: int) -> torch.nn.Module:
    """A freshly initialised ``WanTransformer3DModel`` for ``config`` (float32, CPU, same weights for a seed)."""
    from diffusers import WanTransformer3DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return WanTransformer3DModel(**config.transformer_kwargs())


def _init_class_embeddings(config: EmbeddedModelConfig, seed: int) -> torch.Tensor:
    """float32 [C + 1, text_len, text_dim], unit Gaussian (the text projection's expected input scale)."""
    gen = torch.Generator().manual_seed(seed + 1)
    return torch.randn((config.num_classes + 1, config.text_len, config.text_dim), generator=gen)


def flow_matching_loss(transformer: torch.nn.Module, cond: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor,
                       sigma: torch.Tensor) -> torch.Tensor:
    """Mean squared error of the predicted velocity.

    Args:
        transformer: the Wan model.
        cond: float [B, text_len, text_dim] class embeddings.
        x0: float32 [B, 3, F, H, W] clean clips in [-1, 1].
        noise: float32 [B, 3, F, H, W] standard Gaussian.
        sigma: float32 [B] noise levels in [0, 1].

    Returns:
        float32 scalar, mean over all elements of (v - (noise - x0))^2.
    """
    s = sigma.view(-1, 1, 1, 1, 1)
    xt = (1 - s) * x0 + s * noise
    v = transformer(xt, sigma * _TIMESTEP_SCALE, cond, return_dict=False)[0]
    return F.mse_loss(v.float(), noise - x0)


def make_heldout(config: EmbeddedModelConfig, clips: int, device: torch.device | str) -> dict[str, torch.Tensor]:
    """Held-out clips, noise and noise levels, identical on every device.

    Returns a dict of x0 float32 [clips, 3, F, H, W], noise (same shape), labels int64 [clips]
    (cycling over the classes) and sigma float32 [clips] (stratified over (0, 1), shuffled).
    """
    labels = torch.arange(clips) % config.num_classes
    x0 = torch.cat([make_videos(labels[i:i + 1], seed=HELDOUT_SEED + i, **config.clip_kwargs()) for i in range(clips)])
    gen = torch.Generator().manual_seed(HELDOUT_SEED % 2**31)
    noise = torch.randn(x0.shape, generator=gen)
    sigma = ((torch.arange(clips, dtype=torch.float32) + 0.5) / clips)[torch.randperm(clips, generator=gen)]
    return {k: v.to(device) for k, v in dict(x0=x0, noise=noise, labels=labels, sigma=sigma).items()}


@torch.no_grad()
def heldout_loss(transformer: torch.nn.Module, class_embeddings: torch.Tensor, heldout: dict[str, torch.Tensor],
                 batch_size: int = 16) -> float:
    """Mean flow-matching loss over a ``make_heldout`` set (float32 forward, conditional)."""
    total, n = 0.0, heldout["x0"].shape[0]
    for i in range(0, n, batch_size):
        sl = slice(i, i + batch_size)
        loss = flow_matching_loss(transformer, class_embeddings[heldout["labels"][sl]], heldout["x0"][sl],
                                  heldout["noise"][sl], heldout["sigma"][sl])
        total += float(loss) * heldout["x0"][sl].shape[0]
    return total / n


@contextlib.contextmanager
def capture_self_attention(transformer: torch.nn.Module) -> Iterator[dict[int, list[tuple[torch.Tensor, ...]]]]:
    """Record post-RoPE self-attention Q and K of every block while the context is open.

    Wraps ``torch.nn.functional.scaled_dot_product_attention`` (diffusers' native backend
    looks it up at call time) and marks which block's ``attn1`` is running with forward
    hooks; cross-attention (``attn2``) is not recorded. Everything is restored on exit.

    Yields:
        dict layer -> list of (q, k, scale) per call; q, k detached [B, H, N, D] as the model
        computed them; scale is the softmax scale passed (None: D**-0.5).
    """
    records: dict[int, list[tuple[torch.Tensor, ...]]] = {}
    current: list[int | None] = [None]
    handles = []
    for i, block in enumerate(transformer.blocks):
        handles.append(block.attn1.register_forward_pre_hook(lambda mod, args, i=i: current.__setitem__(0, i)))
        handles.append(block.attn1.register_forward_hook(lambda mod, args, out: current.__setitem__(0, None)))
    original = torch.nn.functional.scaled_dot_product_attention

    def spy(query, key, value, *args, **kwargs):
        if current[0] is not None:
            records.setdefault(current[0], []).append((query.detach(), key.detach(), kwargs.get("scale")))
        return original(query, key, value, *args, **kwargs)

    torch.nn.functional.scaled_dot_product_attention = spy
    try:
        yield records
    finally:
        torch.nn.functional.scaled_dot_product_attention = original
        for h in handles:
            h.remove()


@torch.no_grad()
def attention_recall(transformer: torch.nn.Module, class_embeddings: torch.Tensor, heldout: dict[str, torch.Tensor],
                     *, clips: int, sigmas: Sequence[float], gammas: Sequence[float], block: int) -> dict:
    """Oracle recall of the self-attention maps on held-out clips (raster token order).

    Runs a float32 forward for each of the first ``clips`` held-out clips at each noise
    level in ``sigmas``, captures Q/K of every block, computes the exact block mass with
    ``dfsviz.sparse.stats.block_stats_ref`` (``block`` tokens per block) and the oracle
    recall R*(k), k = max(1, int(gamma * Mk)), with ``oracle_recall``.

    Returns:
        {"gamma_<g>": {"mean": float, "per_layer": [float] * layers, "per_sigma": {sigma: float}}}
        for each budget g, averaged over heads, clips (and noise levels where not split),
        plus "num_tokens", "key_blocks" and "k" (kept blocks per budget).
    """
    check_block(block)
    per: dict[float, dict[float, list[torch.Tensor]]] = {g: {s: [] for s in sigmas} for g in gammas}
    n = None
    for s in sigmas:
        for i in range(clips):
            x0, noise = heldout["x0"][i:i + 1], heldout["noise"][i:i + 1]
            xt = (1 - s) * x0 + s * noise
            ts = torch.full((1,), s * _TIMESTEP_SCALE, device=x0.device)
            with capture_self_attention(transformer) as records:
                transformer(xt, ts, class_embeddings[heldout["labels"][i:i + 1]], return_dict=False)
            layer_recalls = {g: [] for g in gammas}
            for layer in sorted(records):
                q, k, scale = records[layer][0]
                n = q.shape[2]
                stats = block_stats_ref(q.float(), k.float(), block=block, scale=scale)
                mk = stats.m.shape[-1]
                for g in gammas:
                    layer_recalls[g].append(oracle_recall(stats, max(1, int(g * mk))).mean())
            for g in gammas:
                per[g][s].append(torch.stack(layer_recalls[g]))                        # [layers]
    mk = -(-n // block)
    out: dict = {"num_tokens": n, "key_blocks": mk, "block": block, "clips": clips, "sigmas": list(sigmas)}
    for g in gammas:
        stacked = {s: torch.stack(v) for s, v in per[g].items()}                        # sigma -> [clips, layers]
        everything = torch.cat(list(stacked.values()))
        out[f"gamma_{g:g}"] = {
            "k": max(1, int(g * mk)),
            "mean": float(everything.mean()),
            "per_layer": [float(x) for x in everything.mean(0)],
            "per_sigma": {f"{s:g}": float(v.mean()) for s, v in stacked.items()},
        }
    return out


def _param_groups(transformer: torch.nn.Module, class_embeddings: torch.Tensor, weight_decay: float) -> list[dict]:
    """Decay matrices only; biases, norms, modulation tables and class embeddings are not decayed."""
    decay, no_decay = [], []
    for name, p in transformer.named_parameters():
        (decay if p.ndim >= 2 and "scale_shift_table" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay + [class_embeddings], "weight_decay": 0.0}]


def _lr_at(tcfg: TrainConfig, step: int, progress: float) -> float:
    if step < tcfg.warmup_steps:
        return tcfg.lr * (step + 1) / tcfg.warmup_steps
    return tcfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def _sample_sigmas(batch: int, shift: float, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """Logit-normal noise levels (mass in the middle, where the velocity is hardest), then the shift."""
    u = torch.sigmoid(torch.randn(batch, generator=gen, device=device))
    return shift * u / (1 + (shift - 1) * u)


def _attention_kernels(enabled: bool) -> contextlib.AbstractContextManager:
    """Flash / memory-efficient SDPA only when ``enabled`` (mixed precision), else no restriction."""
    return sdpa_kernel(_SDPA_BACKENDS) if enabled else contextlib.nullcontext()


def _versions() -> dict[str, str]:
    import diffusers

    out = {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = "not installed"
    return out


def train(tcfg: TrainConfig, out_dir: str | Path, *, device: str | torch.device | None = None,
          results_path: str | Path | None = None) -> dict:
    """Train, evaluate against the untrained initialisation, save; return the results dict.

    Writes ``out_dir`` (the model folder, see ``save_embedded_model``) plus
    ``out_dir/training_log.json``; with ``results_path`` also the results JSON.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    mixed = cuda if tcfg.mixed_precision is None else tcfg.mixed_precision
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    cfg = get_preset(tcfg.preset)
    out_dir = Path(out_dir)
    t_start = time.perf_counter()

    transformer = build_transformer(cfg, tcfg.seed).to(device)
    class_emb = torch.nn.Parameter(_init_class_embeddings(cfg, tcfg.seed).to(device))
    heldout = make_heldout(cfg, tcfg.eval_clips, device)
    recall_kw = dict(clips=tcfg.recall_clips, sigmas=tcfg.recall_sigmas, gammas=tcfg.gammas, block=tcfg.block)
    transformer.eval()
    with _attention_kernels(mixed):
        untrained = {"heldout_loss": heldout_loss(transformer, class_emb.detach(), heldout),
                     "recall": attention_recall(transformer, class_emb.detach(), heldout, **recall_kw)}
    logger.info("untrained: held-out loss %.4f, oracle recall@%.2g %.3f", untrained["heldout_loss"],
                tcfg.gammas[0], untrained["recall"][f"gamma_{tcfg.gammas[0]:g}"]["mean"])

    params = [p for p in transformer.parameters()] + [class_emb]
    ema_model = copy.deepcopy(transformer).eval().requires_grad_(False)
    ema_emb = class_emb.detach().clone()
    ema_params = [p for p in ema_model.parameters()] + [ema_emb]
    opt = torch.optim.AdamW(_param_groups(transformer, class_emb, tcfg.weight_decay), lr=tcfg.lr,
                            betas=(0.9, 0.99), **({"fused": True} if cuda else {}))
    noise_gen = torch.Generator(device=device).manual_seed(tcfg.seed)
    label_gen = torch.Generator().manual_seed(tcfg.seed)

    budget = tcfg.minutes * 60.0
    log: list[dict] = []
    window: list[torch.Tensor] = []
    step = 0
    transformer.train()
    t_loop = time.perf_counter()
    bar = tqdm(total=tcfg.max_steps, desc="train", unit="step", mininterval=10.0)
    while True:
        elapsed = time.perf_counter() - t_loop
        if elapsed >= budget or (tcfg.max_steps is not None and step >= tcfg.max_steps):
            break
        progress = max(elapsed / budget, step / tcfg.max_steps if tcfg.max_steps else 0.0)
        lr = _lr_at(tcfg, step, progress)
        for group in opt.param_groups:
            group["lr"] = lr
        clip_seed = tcfg.seed * 2**32 + step
        labels = sample_labels(tcfg.batch_size, clip_seed)
        x0 = make_videos(labels, seed=clip_seed, device=device, **cfg.clip_kwargs())
        drop = torch.rand(tcfg.batch_size, generator=label_gen) < tcfg.uncond_prob
        cond_labels = torch.where(drop, torch.full_like(labels, cfg.num_classes), labels).to(device)
        noise = torch.randn(x0.shape, generator=noise_gen, device=device)
        sigma = _sample_sigmas(tcfg.batch_size, cfg.shift, noise_gen, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=mixed), _attention_kernels(mixed):
            loss = flow_matching_loss(transformer, class_emb[cond_labels], x0, noise, sigma)
        opt.zero_grad(set_to_none=True)
        loss.backward()          # the backward of the attention kernel the forward chose
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(tcfg.ema_decay, (1 + step) / (10 + step))      # short memory while the weights move fast
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, [p.detach() for p in params], 1 - decay)
        window.append(loss.detach())
        step += 1
        bar.update(1)
        if step % tcfg.log_every == 0:
            mean = float(torch.stack(window).mean())
            window.clear()
            entry = {"step": step, "seconds": round(time.perf_counter() - t_loop, 2), "loss": mean, "lr": lr}
            log.append(entry)
            bar.set_postfix(loss=f"{mean:.4f}")
            logger.info("step %d  %.0fs  loss %.4f  lr %.2e", step, entry["seconds"], mean, lr)
    bar.close()
    if cuda:
        torch.cuda.synchronize()
    train_seconds = time.perf_counter() - t_loop
    logger.info("trained %d steps in %.1fs", step, train_seconds)

    transformer.eval()
    with _attention_kernels(mixed):
        trained = {"heldout_loss": heldout_loss(ema_model, ema_emb, heldout),
                   "heldout_loss_raw_weights": heldout_loss(transformer, class_emb.detach(), heldout),
                   "recall": attention_recall(ema_model, ema_emb, heldout, **recall_kw)}
    summary = {
        "steps": step, "train_seconds": round(train_seconds, 1), "batch_size": tcfg.batch_size,
        "clips_seen": step * tcfg.batch_size, "train_config": asdict(tcfg),
        "heldout_loss_untrained": untrained["heldout_loss"], "heldout_loss_trained": trained["heldout_loss"],
        "device": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
    }
    save_embedded_model(ema_model, ema_emb, cfg, out_dir, training=summary)
    reloaded = load_embedded_model(out_dir, device=device)
    with _attention_kernels(mixed):
        trained["heldout_loss_reloaded"] = heldout_loss(reloaded.transformer, reloaded.class_embeddings, heldout)
    weights = out_dir / "diffusion_pytorch_model.safetensors"
    g0 = f"gamma_{tcfg.gammas[0]:g}"
    results = {
        "benchmark": "embedded_model",
        "model": cfg.name,
        "device": summary["device"],
        "versions": _versions(),
        "config": cfg.to_dict(),
        "token_grid": list(cfg.token_grid),
        "num_tokens": cfg.num_tokens,
        "parameters": sum(p.numel() for p in ema_model.parameters()),
        "weights_bytes": weights.stat().st_size,
        "train": {k: summary[k] for k in ("steps", "train_seconds", "batch_size", "clips_seen", "train_config")},
        "total_seconds": round(time.perf_counter() - t_start, 1),
        "untrained": untrained,
        "trained": trained,
        "loss_ratio_trained_over_untrained": trained["heldout_loss"] / untrained["heldout_loss"],
        "recall_gain": {f"gamma_{g:g}": trained["recall"][f"gamma_{g:g}"]["mean"]
                        - untrained["recall"][f"gamma_{g:g}"]["mean"] for g in tcfg.gammas},
        "loss_curve": log,
    }
    (out_dir / "training_log.json").write_text(json.dumps(
        {"summary": summary, "loss_curve": log, "untrained": untrained, "trained": trained}, indent=1) + "\n")
    if results_path is not None:
        Path(results_path).parent.mkdir(parents=True, exist_ok=True)
        Path(results_path).write_text(json.dumps(results, indent=1) + "\n")
    logger.info("held-out loss %.4f -> %.4f (ratio %.3f); oracle recall@%s %.3f -> %.3f",
                untrained["heldout_loss"], trained["heldout_loss"], results["loss_ratio_trained_over_untrained"],
                g0, untrained["recall"][g0]["mean"], trained["recall"][g0]["mean"])
    return results


def main(argv: Sequence[str] | None = None) -> None:
    """Command line of ``python -m dfsviz.models.train``."""
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(
        description="Train an embedded Wan video DiT by flow matching on procedural clips.",
        epilog="example: python -m dfsviz.models.train --out dfsviz/data/models/tiny-wan --minutes 8 "
               "--results benchmarks/results/embedded_model.json")
    parser.add_argument("--out", required=True, help="model folder to write")
    parser.add_argument("--preset", default=defaults.preset,
                        help="tiny-wan (shipped), medium-wan (Wan2.1 480p's token grid) or smoke (CPU test size)")
    parser.add_argument("--minutes", type=float, default=defaults.minutes, help="training wall-clock budget")
    parser.add_argument("--steps", type=int, default=None, help="stop after this many steps")
    # Left out, these take the preset's value (PRESET_TRAINING, else TrainConfig's default).
    for flag, kind in (("--batch-size", int), ("--lr", float), ("--seed", int), ("--eval-clips", int),
                       ("--recall-clips", int), ("--log-every", int)):
        parser.add_argument(flag, type=kind, default=None, help="default: the preset's")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--mixed-precision", action=argparse.BooleanOptionalAction, default=None,
                        help="bfloat16 autocast and flash / memory-efficient attention (default: on CUDA)")
    parser.add_argument("--results", default=None, help="also write the results JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    given = {name: getattr(args, name) for name in ("batch_size", "lr", "seed", "eval_clips", "recall_clips",
                                                    "log_every") if getattr(args, name) is not None}
    tcfg = TrainConfig.for_preset(args.preset, minutes=args.minutes, max_steps=args.steps,
                                  mixed_precision=args.mixed_precision, **given)
    results = train(tcfg, args.out, device=args.device, results_path=args.results)
    print(json.dumps({k: results[k] for k in ("model", "device", "loss_ratio_trained_over_untrained",
                                              "recall_gain", "weights_bytes")}, indent=1))


if __name__ == "__main__":
    main()

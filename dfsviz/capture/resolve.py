"""A capture's settings made concrete: :func:`resolve_capture` turns a :class:`CaptureConfig`
and its model into the grid, steps, layers, heads, conditioning and file layout
(:class:`ResolvedCapture`); :func:`run_identity` is what ``--resume`` compares.

:func:`pipeline_rules` says what a family's diffusers pipeline does around its transformer that
a capture must do alike: the sigmas it hands the scheduler, and whether ``guidance_scale``
means classifier-free guidance (an unconditional pass per step) or a transformer input
(embedded guidance). ``dfsviz capture``'s loop follows them, so that it reproduces a pipeline
call step for step, and :func:`dfsviz.record` reads from them which branches a call runs. They
are read from diffusers 0.42's pipelines; a family without an entry runs as ``WanPipeline`` and
``CogVideoXPipeline`` do: the scheduler's own timesteps, CFG when ``guidance_scale`` > 1.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from dfsviz.capture.adapters import Conditioning
from dfsviz.capture.config import CaptureConfig, default_capture_steps, format_size
from dfsviz.capture.schema import MAP_DTYPES, StoreLayout
from dfsviz.capture.sources import ModelSource, load_embeddings, load_model_source
from dfsviz.sparse.grid import LatentGrid

__all__ = ["PipelineRules", "ResolvedCapture", "check_capture_steps", "choose_map_dtype", "pipeline_rules", "resolve_capture",
           "resolve_layout", "run_attrs", "run_identity", "weights_fingerprint"]


@dataclass(frozen=True)
class PipelineRules:
    """How one family's pipeline drives its transformer.

    Fields:
        title: the family's pipeline, for messages ("HunyuanVideoPipeline").
        sigmas: ``num_steps -> sigmas`` the pipeline passes to ``scheduler.set_timesteps``, or
            None when it takes the scheduler's own timesteps.
        embedded_guidance: ``guidance_scale`` is a transformer input (x 1000, for
            guidance-distilled checkpoints) and runs no unconditional pass; the pipeline's
            separate ``true_cfg_scale`` > 1 with a negative prompt runs one.
    """

    title: str = "the pipeline"
    sigmas: Callable[[int], np.ndarray] | None = None
    embedded_guidance: bool = False

    def set_timesteps(self, scheduler, num_steps: int, device) -> None:
        """Set ``scheduler``'s timesteps for ``num_steps`` steps as the pipeline does."""
        if self.sigmas is None:
            scheduler.set_timesteps(num_steps, device=device)
        else:  # as diffusers' retrieve_timesteps passes custom sigmas
            scheduler.set_timesteps(sigmas=self.sigmas(num_steps), device=device)

    def runs_cfg(self, guidance_scale: float) -> bool:
        """True when dfsviz's loop runs an unconditional pass for ``guidance_scale``."""
        return guidance_scale > 1 and not self.embedded_guidance

    def call_runs_cfg(self, pipe, call: dict) -> bool:
        """True when the pipeline call ``call`` (its bound arguments) runs an unconditional pass."""
        if self.embedded_guidance:  # HunyuanVideoPipeline's do_true_cfg
            negative = call.get("negative_prompt") is not None or (
                call.get("negative_prompt_embeds") is not None and call.get("negative_pooled_prompt_embeds") is not None)
            return float(call.get("true_cfg_scale") or 1.0) > 1 and negative
        guidance = float(call.get("guidance_scale") or 1.0)
        return bool(getattr(pipe, "do_classifier_free_guidance", guidance > 1))

    def no_uncond_hint(self) -> str:
        """How to get an unconditional pass, for a refusal of ``branches='both'``."""
        if self.embedded_guidance:
            return f"call {self.title} with true_cfg_scale > 1 and a negative prompt"
        return "call the pipeline with guidance_scale > 1"


def _linear_sigmas(num_steps: int) -> np.ndarray:
    return np.linspace(1.0, 0.0, num_steps + 1)[:-1]


_RULES = {
    "hunyuanvideo": PipelineRules(title="HunyuanVideoPipeline", sigmas=_linear_sigmas, embedded_guidance=True),
}
_DEFAULT = PipelineRules()


def pipeline_rules(adapter) -> PipelineRules:
    """The rules of the family of ``adapter`` (a capture adapter; the defaults for a family
    without an entry and for the generic entry)."""
    return _RULES.get(getattr(adapter, "name", None), _DEFAULT)


@dataclass
class ResolvedCapture:
    """A config turned into concrete settings: model, grid, steps, layers and file layout."""

    config: CaptureConfig
    source: ModelSource
    grid: LatentGrid
    latent: tuple[int, int, int]
    num_steps: int
    guidance_scale: float
    capture_steps: tuple[int, ...]
    layer_map: dict[str, int]  # captured module name -> layer index
    heads: tuple[int, ...]
    layout: StoreLayout
    cond: Conditioning
    uncond: Conditioning | None
    attrs: dict = field(default_factory=dict)

    @property
    def cfg(self) -> bool:
        """The loop runs an unconditional pass per step (classifier-free guidance), as the
        family's pipeline does for ``guidance_scale`` (:func:`pipeline_rules`)."""
        return pipeline_rules(self.source.adapter).runs_cfg(self.guidance_scale)

    def describe(self) -> dict:
        """The resolved settings, JSON-ready (``--dry-run`` prints it)."""
        lay = self.layout
        return {
            "model": self.source.model_id,
            "architecture": type(self.source.transformer).__name__,
            "adapter": self.source.adapter.name,
            "device": str(self.config.torch_device),
            "dtype": str(self.config.torch_dtype).replace("torch.", ""),
            "latent": "x".join(map(str, self.latent)),
            "grid": self.grid.name,
            "tokens": self.grid.num_tokens,
            "blocks": lay.num_blocks,
            "num_steps": self.num_steps,
            "capture_steps": list(self.capture_steps),
            "guidance_scale": self.guidance_scale,
            "branches": list(lay.branches),
            "layers": list(lay.layers),
            "heads": list(lay.heads),
            "orders": list(lay.orders),
            "methods": list(lay.methods),
            "block": lay.block,
            "footprints": lay.footprints,
            "save_qkv": list(lay.qkv_layers),
            "qkv_steps": list(lay.qkv_steps) if lay.qkv_layers else [],
            "map_dtype": lay.map_dtype,
            "map_dtype_choice": self.attrs["map_dtype_choice"],
            "out": self.config.out,
            "estimated_file_bytes_uncompressed": lay.total_bytes(),
        }


def _num_heads(config) -> int:
    return int(config.num_attention_heads)


def _spans(values: list[int]) -> str:
    """Sorted indices as the options write them: [3, 5, 6, 7, 9] -> "3,5-7,9"."""
    runs: list[list[int]] = []
    for v in sorted(values):
        if runs and v == runs[-1][1] + 1:
            runs[-1][1] = v
        else:
            runs.append([v, v])
    return ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in runs)


def resolve_capture(config: CaptureConfig, *, source: ModelSource | None = None, load_weights: bool = True) -> ResolvedCapture:
    """Load (or take) the model and derive the grid, steps, layers and file layout.

    Raises ValueError for settings that do not fit the model (grid mismatch, unknown layer
    or head, missing embeddings) with the fix in the message.
    """
    if source is None:
        source = load_model_source(config, load_weights=load_weights)
    adapter, model = source.adapter, source.transformer
    mcfg = model.config
    num_steps = config.num_steps or source.num_steps
    guidance = float(config.guidance_scale if config.guidance_scale is not None else source.guidance_scale)
    rules = pipeline_rules(adapter)
    if config.branches == "both" and rules.embedded_guidance:
        raise ValueError(
            f"`branches`='both' needs an unconditional pass; {rules.title} sends guidance_scale as embedded guidance "
            "and runs none, and dfsviz capture follows it: use --branches cond, or record a pipeline call with "
            "true_cfg_scale > 1 and a negative prompt through dfsviz.record"
        )
    if config.branches == "both" and not rules.runs_cfg(guidance):
        raise ValueError("`branches`='both' needs an unconditional pass: pass --guidance-scale > 1")
    steps = config.capture_steps or default_capture_steps(num_steps)
    check_capture_steps(steps, num_steps)

    # conditioning
    prompt = config.prompt
    if config.embeddings == "random":
        gen = torch.Generator().manual_seed(config.seed + 1)
        cond = adapter.random_conditioning(mcfg, gen)
        uncond = adapter.random_conditioning(mcfg, gen)
    elif config.embeddings is not None:
        cond, uncond = load_embeddings(config.embeddings, adapter, mcfg)
    elif source.encode_prompt is not None:
        cond, uncond, prompt = source.encode_prompt(config.prompt)
    elif source.cond is not None:
        cond, uncond = source.cond, source.uncond
    else:
        raise ValueError(
            f"model {source.model_id!r} needs text embeddings: pass --embeddings FILE.safetensors (prompt_embeds, "
            "negative_prompt_embeds, ... from the pipeline's encode_prompt) or --embeddings random; a whole pipeline "
            "folder or repo also captures one clip from --prompt, through its own text encoders (not with --dry-run)"
        )
    if rules.runs_cfg(guidance) and uncond is None:
        raise ValueError(
            "guidance_scale > 1 needs unconditional embeddings: add 'negative_prompt_embeds' to the embeddings file "
            "or pass --guidance-scale 1"
        )
    text_len = adapter.text_len(cond)
    if config.branches == "both" and adapter.text_len(uncond) != text_len:
        raise ValueError(
            f"conditional and unconditional prompts have {text_len} and {adapter.text_len(uncond)} real text tokens; "
            "--branches both needs equal sequence lengths (use --branches cond)"
        )

    # grid
    if config.latent is not None:
        lg = LatentGrid.parse(config.latent)
        latent = (lg.frames, lg.height, lg.width)
    else:
        f, h, w = source.default_size
        latent = adapter.latent_shape(
            config.frames or f, config.height or h, config.width or w, source.vae_spatial, source.vae_temporal
        )
    grid = adapter.token_grid(mcfg, latent, text_len)

    layer_map, heads, layout, map_dtype_choice = resolve_layout(config, adapter, model, grid, tuple(steps))
    attrs = {**run_attrs(config, source, latent, num_steps, guidance, prompt, config.negative_prompt),
             "embeddings": config.embeddings or "model", "map_dtype_choice": map_dtype_choice}
    return ResolvedCapture(
        config, source, grid, latent, num_steps, guidance, tuple(steps), layer_map, heads, layout, cond, uncond, attrs
    )


def run_attrs(config: CaptureConfig, source: ModelSource, latent: tuple[int, int, int], num_steps: int,
              guidance: float, prompt: str, negative_prompt: str) -> dict:
    """The root attributes that describe a run: model, prompts, schedule, latent size and the
    capture settings (a capture and a recording add their own)."""
    model, sched = source.transformer, source.scheduler
    return {
        "model_id": source.model_id,
        "model_class": type(model).__name__,
        "model_layers": len(source.adapter.select_layers(model)),  # of which `layers` are captured
        "adapter": source.adapter.name,
        "model_config": dict(model.config),
        "prompt": prompt,
        "negative_prompt": negative_prompt,
        "seed": config.seed,
        "guidance_scale": guidance,
        "num_steps": num_steps,
        "scheduler": type(sched).__name__,
        "scheduler_config": dict(getattr(sched, "config", {})),
        "latent": "x".join(map(str, latent)),
        "tile": config.tile,
        "stride": config.stride,
        "method_tiles": {m: config.tile_for(m) for m in config.methods},
        "capture_config": config.to_json(),
        "dtype": str(config.torch_dtype).replace("torch.", ""),
        "device": str(config.torch_device),
    }


def check_capture_steps(steps, num_steps: int, schedule: str = "") -> None:
    """ValueError unless every captured step lies in the ``num_steps`` steps of the schedule
    (``schedule`` says whose, e.g. " of this pipeline call")."""
    if max(steps) >= num_steps:
        raise ValueError(
            f"`capture_steps` must lie in [0, {num_steps - 1}] for the {num_steps} steps{schedule} (got {list(steps)})"
        )


def resolve_layout(config: CaptureConfig, adapter, model: torch.nn.Module, grid: LatentGrid, steps: tuple[int, ...],
                   dfsattn_order: str | None = None) -> tuple[dict[str, int], tuple[int, ...], StoreLayout, str]:
    """The captured layers (module name -> layer index), heads and file layout of ``config`` on
    ``model`` with token grid ``grid`` (holding DFSAttn's masks in the blocks of ``dfsattn_order``
    when given: ``dfsviz.record`` with ``apply_dfsattn`` active), and why the layout stores its maps as it does (the root
    attribute ``map_dtype_choice``: what :func:`choose_map_dtype` says for "auto"); ValueError
    naming an unknown layer or head."""
    mcfg = model.config
    all_layers = adapter.select_layers(model)
    by_index = {i: n for n, i in all_layers.items()}
    wanted = config.layers if config.layers is not None else tuple(sorted(by_index))
    bad = [i for i in wanted if i not in by_index]
    if bad:
        raise ValueError(f"`layers` {_spans(bad)} do not exist; this model has layers 0..{len(by_index) - 1}")
    qkv_bad = [i for i in config.save_qkv if i not in wanted]
    if qkv_bad:
        raise ValueError(f"`save_qkv` layers {qkv_bad} are not captured layers")
    layer_map = {by_index[i]: i for i in wanted}
    num_heads = _num_heads(mcfg)
    heads = config.heads if config.heads is not None else tuple(range(num_heads))
    if max(heads) >= num_heads:
        raise ValueError(f"`heads` {_spans([h for h in heads if h >= num_heads])} do not exist; this model has heads "
                         f"0..{num_heads - 1}")
    num_blocks = -(-grid.num_tokens // config.block)
    layout = StoreLayout(
        grid=grid,
        block=config.block,
        orders=config.orders,
        methods=config.methods,
        layers=tuple(wanted),
        layer_names=tuple(by_index[i] for i in wanted),
        heads=tuple(heads),
        branches=("cond", "uncond") if config.branches == "both" else ("cond",),
        steps=tuple(steps),
        footprints=min(config.footprints, num_blocks),
        qkv_layers=tuple(config.save_qkv),
        qkv_steps=config.qkv_steps,
        head_dim=int(mcfg.attention_head_dim),
        qkv_dtype=config.stored_qkv_dtype,
        map_dtype="float32" if config.map_dtype == "auto" else config.map_dtype,
        dfsattn_order=dfsattn_order,
    )
    if config.map_dtype == "auto":
        layout, why = choose_map_dtype(layout, config.step_budget)
    else:
        why = f"{config.map_dtype} as asked (map_dtype={config.map_dtype!r})"
    return layer_map, tuple(heads), layout, why


def choose_map_dtype(layout: StoreLayout, budget: int) -> tuple[StoreLayout, str]:
    """``map_dtype="auto"``: ``layout`` with the widest map dtype (float32, float16, uint8) whose
    largest step (``bytes_per_step``, uncompressed) fits ``budget`` bytes, or uint8 when none
    does; and why, in words (the root attribute ``map_dtype_choice``, logged when the file is created)."""
    sizes = {}
    for dtype in MAP_DTYPES:
        candidate = dataclasses.replace(layout, map_dtype=dtype)
        sizes[dtype] = max(candidate.bytes_per_step(step) for step in candidate.steps)
        if sizes[dtype] <= budget:
            break
    chosen = candidate.map_dtype
    tried = ", ".join(f"{format_size(size)} in {dtype}" for dtype, size in sizes.items())
    if sizes[chosen] <= budget:
        why = f"auto: {chosen}, the widest map dtype whose largest step fits the step budget of {format_size(budget)} ({tried})"
    else:
        why = (f"auto: uint8, and even uint8 exceeds the step budget of {format_size(budget)} ({tried}): capture fewer "
               "layers, heads, orders or methods, or raise --step-budget")
    return candidate, why


def weights_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 of a model's weights: every state-dict tensor's name, dtype, shape and bytes.

    ``--resume`` compares it, so a run is never continued with other weights. CPU tensors
    are hashed in place; GPU tensors are copied to the host one at a time. About 1-2 s per
    GB of weights (the embedded model: milliseconds).
    """
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            digest.update(t.contiguous().cpu().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def run_identity(rc: ResolvedCapture, fingerprint: str) -> dict:
    """What makes two runs the same run (``--resume`` refuses any difference).

    The capture settings as resolved, not as typed: "auto" device and dtype, the default
    kernel backend, the default steps, layers and heads are replaced by what they resolve
    to, so ``--device cpu`` and the default on a CPU machine are one run. How the run was
    started (``out``, ``overwrite``, ``resume``) does not count; the weights do.
    """
    from dfsviz.kernels._dispatch import resolve_backend

    cfg = rc.config
    device = cfg.torch_device
    # the map dtype as resolved ("auto" and the budget resolve to one), and as before files named it: float32 unnamed
    identity = {k: v for k, v in cfg.to_json().items() if k not in ("out", "overwrite", "resume", "map_dtype", "step_budget")}
    if rc.layout.map_dtype != "float32":
        identity["map_dtype"] = rc.layout.map_dtype
    identity.update(
        device=device.type,
        dtype=str(cfg.torch_dtype).replace("torch.", ""),
        kernel_backend=resolve_backend(cfg.kernel_backend, torch.empty(0, device=device)),
        qkv_dtype=cfg.stored_qkv_dtype,
        num_steps=rc.num_steps,
        guidance_scale=rc.guidance_scale,
        capture_steps=list(rc.capture_steps),
        layers=list(rc.layout.layers),
        heads=list(rc.layout.heads),
        prompt=rc.attrs["prompt"],
        footprints=rc.layout.footprints,
        weights_sha256=fingerprint,
    )
    return identity

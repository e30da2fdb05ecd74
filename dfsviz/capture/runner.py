"""Run a capture: load a model, denoise with a real diffusers scheduler, record and store.

``run_capture(CaptureConfig(...))`` is what ``dfsviz capture`` calls. For every captured
(step, layer) the SDPA inputs of the conditional pass (and of the unconditional one with
``branches="both"``) are reduced on the spot, for every token order, to:

* block statistics m, L, r, J ([H, Mq, Mk], one streaming pass, never N x N),
* block scores of every scoring method,
* variance ratios W_q, W_k,
* footprints: the exact attention of K sampled query blocks per head over all N keys,
  mean over the block's queries, in original token order,
* optionally Q/K/V of chosen layers,

and queued to the HDF5 writer, which compresses on worker threads. Statistics use the
Triton kernels of ``dfsviz.kernels`` (on CUDA) and their PyTorch references otherwise.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from dfsviz.capture.adapters import (
    ADAPTERS,
    Conditioning,
    ModelAdapter,
    get_adapter,
    input_dtype,
    supported_architectures,
)
from dfsviz.capture.hooks import AttentionCapture, AttentionRecord
from dfsviz.capture.file_safety import CaptureLock
from dfsviz.capture.schema import MAX_INDEX
from dfsviz.capture.store import CaptureReader, CaptureWriter, StoreLayout
from dfsviz.sparse.footprints import block_footprints, sample_query_blocks
from dfsviz.sparse.grid import LatentGrid

__all__ = [
    "CaptureConfig",
    "CaptureResult",
    "ModelSource",
    "ResolvedCapture",
    "load_model_source",
    "resolve_capture",
    "run_capture",
    "default_capture_steps",
    "run_identity",
    "weights_fingerprint",
]

logger = logging.getLogger(__name__)

BRANCHES = ("cond", "both")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
QKV_DTYPES = ("auto", "float16", "float32")
# seeds round-trip through HDF5 int64 attributes
MAX_SEED = (1 << 63) - 1
# what each scoring method's `tile` argument means in a capture (dfs_tile: the pooling tile
# b; antidiagonal: the stride S); the others take none
_TILE_FIELD = {"dfs_tile": "tile", "antidiagonal": "stride"}


def _int_tuple(value, name: str, low: int = 0) -> tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,)
    if not isinstance(value, (tuple, list)) or not value or not all(
        isinstance(v, int) and not isinstance(v, bool) and low <= v <= MAX_INDEX for v in value
    ):
        raise ValueError(
            f"`{name}` must be a non-empty list of integers in [{low}, {MAX_INDEX}] or None for all (got {_short(value)})"
        )
    if len(set(value)) != len(value):
        raise ValueError(f"`{name}` lists a value twice (got {list(value)})")
    return tuple(sorted(value))


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _check_int(value, name: str, low: int, hint: str = "", high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        allowed = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
        raise ValueError(f"`{name}` must be {allowed} (got {_short(value)}){hint}")


@dataclass(frozen=True)
class CaptureConfig:
    """Settings of one capture run (validated on construction).

    Fields:
        out: output HDF5 path (one file per run).
        model: hub id, local diffusers directory (pipeline or transformer folder), or None
            for the embedded model (``dfsviz.models``).
        prompt: text prompt; for the embedded model a class name ("" = its first class).
        negative_prompt: unconditional prompt (recorded; used by embeddings you computed).
        embeddings: precomputed conditioning: a .safetensors file with ``prompt_embeds``
            [1, T, C] (and ``negative_prompt_embeds``, ``prompt_attention_mask``,
            ``pooled_prompt_embeds``, ... as the model needs), or "random" for seeded
            Gaussian embeddings (random-weight models, benchmarks). None = the model's own
            (only the embedded model has one inside dfsviz's loop).
        num_steps: denoising steps of the schedule (>= 1); None = the model's default.
        capture_steps: 0-based steps to capture; None = 5 spread over the schedule.
            The loop stops after the last captured step.
        layers: layer indices to capture (adapter numbering); None = all.
        heads: head indices to capture; None = all.
        height, width, frames: video size in pixels; None = the model's default.
        latent: "FxHxW" latent size in latent cells (before patching); overrides the
            pixel size (use it for transformer-only folders with an unknown VAE).
        seed: seed of the initial noise, random embeddings and footprint sampling (>= 0).
        guidance_scale: classifier-free guidance weight (>= 1; 1 = no unconditional pass);
            None = the model's default.
        branches: "cond" captures the conditional pass, "both" also the unconditional one.
        orders: token orders (``dfsviz.sparse.orders.order_names()``).
        methods: scoring methods (``dfsviz.sparse.scoring.scorer_names()``).
        block: tokens per block, a power of two in [16, 256].
        tile: dfs_tile pooling tile b (power of two in [4, block]).
        stride: antidiagonal stride S (power of two in [2, block]).
        footprints: query blocks per head whose exact attention is stored (0 = none).
        save_qkv: layers whose Q/K/V are stored (empty = none).
        qkv_steps: captured steps at which Q/K/V are stored; None = every captured step.
        qkv_dtype: storage dtype of saved Q/K/V: "auto" (float16 for float16 models, else
            float32), "float16" (half the size; values beyond +-65504 are refused) or "float32".
        device: "auto" (cuda when available), "cpu", "cuda" or "cuda:N".
        dtype: model dtype: "auto" (bfloat16 on CUDA, float32 on CPU), "float32", "float16", "bfloat16".
        overwrite: replace an existing output file.
        resume: continue an interrupted capture in ``out`` (same settings).
        kernel_backend: None (Triton on CUDA), "triton" or "ref" for the statistics kernels.
    """

    out: str
    model: str | None = None
    prompt: str = ""
    negative_prompt: str = ""
    embeddings: str | None = None
    num_steps: int | None = None
    capture_steps: tuple[int, ...] | None = None
    layers: tuple[int, ...] | None = None
    heads: tuple[int, ...] | None = None
    height: int | None = None
    width: int | None = None
    frames: int | None = None
    latent: str | None = None
    seed: int = 0
    guidance_scale: float | None = None
    branches: str = "cond"
    orders: tuple[str, ...] = ("raster", "hilbert3d")
    methods: tuple[str, ...] = ("meanpool", "dfs_tile", "antidiagonal")
    block: int = 128
    tile: int = 16
    stride: int = 8
    footprints: int = 2
    save_qkv: tuple[int, ...] = ()
    qkv_steps: tuple[int, ...] | None = None
    qkv_dtype: str = "auto"
    device: str = "auto"
    dtype: str = "auto"
    overwrite: bool = False
    resume: bool = False
    kernel_backend: str | None = None

    def __post_init__(self) -> None:
        from dfsviz.sparse._validate import check_power_of_two
        from dfsviz.sparse.orders import order_names
        from dfsviz.sparse.scoring import scorer_names

        if not isinstance(self.out, (str, os.PathLike)) or not str(self.out):
            raise ValueError(f"`out` must be an output file path, e.g. capture.h5 (got {self.out!r})")
        object.__setattr__(self, "out", str(self.out))
        if self.model is not None and (not isinstance(self.model, str) or not self.model.strip()):
            raise ValueError(f"`model` must be a hub id, a local directory or None (got {self.model!r})")
        for name in ("prompt", "negative_prompt"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"`{name}` must be a str (got {type(getattr(self, name)).__name__})")
        if self.embeddings is not None and self.embeddings != "random":
            if not isinstance(self.embeddings, str) or not Path(self.embeddings).is_file():
                raise ValueError(
                    f"`embeddings` must be a .safetensors file, 'random' or None (got {self.embeddings!r}); "
                    "the file does not exist"
                )
        if self.num_steps is not None:
            _check_int(self.num_steps, "num_steps", 1, "; 50 is the usual schedule", high=MAX_INDEX)
        object.__setattr__(self, "capture_steps", _int_tuple(self.capture_steps, "capture_steps"))
        if self.num_steps is not None and self.capture_steps and max(self.capture_steps) >= self.num_steps:
            raise ValueError(
                f"`capture_steps` must lie in [0, num_steps - 1] = [0, {self.num_steps - 1}] (got {list(self.capture_steps)})"
            )
        object.__setattr__(self, "layers", _int_tuple(self.layers, "layers"))
        object.__setattr__(self, "heads", _int_tuple(self.heads, "heads"))
        for name in ("height", "width", "frames"):
            if getattr(self, name) is not None:
                _check_int(getattr(self, name), name, 1, " pixels/frames", high=MAX_INDEX)
        if self.latent is not None:
            LatentGrid.parse(self.latent)  # raises with the expected format
        _check_int(self.seed, "seed", 0, "; seeds are stored as 64-bit signed integers", high=MAX_SEED)
        if self.guidance_scale is not None and (
            isinstance(self.guidance_scale, bool)
            or not isinstance(self.guidance_scale, (int, float))
            or not math.isfinite(self.guidance_scale)
            or self.guidance_scale < 1
        ):
            raise ValueError(f"`guidance_scale` must be a number >= 1 (got {self.guidance_scale!r}); 1 disables guidance")
        if self.branches not in BRANCHES:
            raise ValueError(f"`branches` must be one of {list(BRANCHES)} (got {self.branches!r})")
        if self.branches == "both" and self.guidance_scale is not None and self.guidance_scale == 1:
            raise ValueError("`branches`='both' needs an unconditional pass: set `guidance_scale` > 1")
        for name, allowed in (("orders", order_names()), ("methods", scorer_names())):
            value = getattr(self, name)
            if isinstance(value, str):
                value = (value,)
            if not isinstance(value, (tuple, list)) or not value or len(set(value)) != len(value):
                raise ValueError(f"`{name}` must be a non-empty list without repeats from {allowed} (got {value!r})")
            bad = [v for v in value if v not in allowed]
            if bad:
                raise ValueError(f"`{name}` has unknown entries {bad}; choose from {allowed}")
            object.__setattr__(self, name, tuple(value))
        check_power_of_two(self.block, "block", 16, 256)
        check_power_of_two(self.tile, "tile", 4, self.block)
        check_power_of_two(self.stride, "stride", 2, self.block)
        _check_int(self.footprints, "footprints", 0, "; query blocks per head, 0 = none")
        save_qkv = () if not self.save_qkv else _int_tuple(self.save_qkv, "save_qkv")
        object.__setattr__(self, "save_qkv", save_qkv)
        if self.layers is not None and set(save_qkv) - set(self.layers):
            raise ValueError(
                f"`save_qkv` layers {sorted(set(save_qkv) - set(self.layers))} are not captured (`layers` = {list(self.layers)})"
            )
        object.__setattr__(self, "qkv_steps", _int_tuple(self.qkv_steps, "qkv_steps"))
        if self.qkv_steps is not None and not save_qkv:
            raise ValueError("`qkv_steps` needs `save_qkv`: name the layers whose Q/K/V to store (--save-qkv)")
        if self.qkv_steps is not None and self.capture_steps and set(self.qkv_steps) - set(self.capture_steps):
            raise ValueError(
                f"`qkv_steps` {sorted(set(self.qkv_steps) - set(self.capture_steps))} are not captured steps "
                f"(`capture_steps` = {list(self.capture_steps)})"
            )
        if self.qkv_dtype not in QKV_DTYPES:
            raise ValueError(f"`qkv_dtype` must be one of {list(QKV_DTYPES)} (got {self.qkv_dtype!r})")
        if not isinstance(self.device, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"`device` must be 'auto', 'cpu', 'cuda' or 'cuda:N' (got {self.device!r})")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"`device` {self.device!r} asked but no CUDA GPU is visible; use --device cpu")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"`dtype` must be 'auto' or one of {list(DTYPES)} (got {self.dtype!r})")
        if self.overwrite and self.resume:
            raise ValueError("`overwrite` and `resume` exclude each other: --resume continues the file, --overwrite replaces it")
        if self.kernel_backend not in (None, "triton", "ref"):
            raise ValueError(f"`kernel_backend` must be None, 'triton' or 'ref' (got {self.kernel_backend!r})")

    def to_json(self) -> dict:
        """JSON-ready dict (the ``capture_config`` root attribute)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @property
    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    @property
    def stored_qkv_dtype(self) -> str:
        """numpy dtype name of stored Q/K/V ("auto" resolved against the model dtype)."""
        if self.qkv_dtype != "auto":
            return self.qkv_dtype
        return "float16" if self.torch_dtype == torch.float16 else "float32"

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if self.torch_device.type == "cuda" else torch.float32
        return DTYPES[self.dtype]

    def tile_for(self, method: str) -> int | None:
        """The tile/stride argument of ``method`` (None when it takes none)."""
        name = _TILE_FIELD.get(method)
        return None if name is None else getattr(self, name)


def default_capture_steps(num_steps: int, count: int = 5) -> tuple[int, ...]:
    """``count`` steps spread evenly over [0, num_steps - 1], first and last included."""
    if num_steps <= count:
        return tuple(range(num_steps))
    return tuple(sorted({round(i * (num_steps - 1) / (count - 1)) for i in range(count)}))


@dataclass
class ModelSource:
    """A model ready to denoise: what :func:`load_model_source` returns.

    Pass one to :func:`run_capture` (``source=``) to capture a transformer already in
    memory. Fields:
        transformer: the diffusers transformer, on its device, eval mode.
        adapter: its :class:`ModelAdapter`.
        scheduler: a diffusers scheduler (``set_timesteps`` / ``step``).
        model_id: label stored in the file.
        vae_spatial, vae_temporal: pixels per latent cell.
        default_size: (frames, height, width) pixels when the config gives none.
        encode_prompt: the conditioning of a prompt, ``prompt -> (cond, uncond, prompt
            encoded)``, for a model that encodes prompts itself (the embedded model: a class
            name, "" for its first class); None when the conditioning comes from ``cond`` or
            from the config's ``embeddings``. One loaded source serves every prompt of a run set.
        cond, uncond: fixed conditioning of the two branches, whatever the prompt (a source
            built around a transformer and its embeddings); None: from ``encode_prompt`` or
            the config's ``embeddings``.
        num_steps, guidance_scale: the model's defaults.
        weights_sha256: :func:`weights_fingerprint` of ``transformer`` when already computed
            (a run set hashes the weights once for all its clips); None = hashed by each capture.
    """

    transformer: torch.nn.Module
    adapter: ModelAdapter
    scheduler: object
    model_id: str
    vae_spatial: int = 8
    vae_temporal: int = 4
    default_size: tuple[int, int, int] = (81, 480, 832)
    encode_prompt: Callable[[str], tuple[Conditioning, Conditioning | None, str]] | None = None
    cond: Conditioning | None = None
    uncond: Conditioning | None = None
    num_steps: int = 50
    guidance_scale: float = 5.0
    weights_sha256: str | None = None


# ----------------------------------------------------------------------------------------
# model loading
# ----------------------------------------------------------------------------------------
_DEFAULTS = {  # per adapter: (default size (frames, height, width), flow shift or None)
    "wan": ((81, 480, 832), 5.0),
    "hunyuanvideo": ((129, 720, 1280), 7.0),
    "cogvideox": ((49, 480, 720), None),
    "generic": ((1, 8, 8), None),
}


def _default_scheduler(adapter: ModelAdapter):
    import diffusers

    shift = _DEFAULTS[adapter.name][1]
    if adapter.name == "cogvideox":
        # CogVideoX-2b's scheduler settings (v-prediction, zero-terminal-SNR, trailing spacing)
        return diffusers.CogVideoXDDIMScheduler(
            beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction",
            rescale_betas_zero_snr=True, timestep_spacing="trailing", snr_shift_scale=3.0, clip_sample=False,
            set_alpha_to_one=True, steps_offset=0,
        )
    return diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift or 1.0)


def _read_json(path: Path) -> dict:
    with open(path) as fh:
        return json.load(fh)


def _vae_factors(cfg: dict, adapter: ModelAdapter) -> tuple[int, int]:
    spatial = cfg.get("scale_factor_spatial") or cfg.get("spatial_compression_ratio")
    if spatial is None and cfg.get("block_out_channels"):
        spatial = 2 ** (len(cfg["block_out_channels"]) - 1)
    temporal = cfg.get("scale_factor_temporal") or cfg.get("temporal_compression_ratio")
    return int(spatial or adapter.vae_spatial), int(temporal or adapter.vae_temporal)


def _transformer_class(name: str):
    import diffusers

    cls = getattr(diffusers, name, None)
    adapters = [a for a in ADAPTERS.values() if name in a.classes]
    if cls is None or not adapters:
        raise ValueError(f"unsupported architecture {name}; supported: {supported_architectures()}")
    return cls, adapters[0]


def _embedded_source(device) -> ModelSource:
    import diffusers

    try:
        from dfsviz.models import encode_labels, load_embedded_model
    except ImportError as exc:
        raise ValueError(
            f"the embedded model is not available in this dfsviz ({exc}); pass --model <hub id or diffusers directory>"
        ) from None
    model = load_embedded_model(device=device)
    uncond = Conditioning(model.class_embeddings[model.null_label][None])

    def encode_prompt(prompt: str) -> tuple[Conditioning, Conditioning, str]:
        """A class name's embedding; "" is the first class."""
        prompt = prompt or model.classes[0]
        return Conditioning(encode_labels(model, [prompt])), uncond, prompt

    cfg = model.config
    return ModelSource(
        transformer=model.transformer,
        adapter=get_adapter("wan"),
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=float(cfg.shift)),
        model_id=f"dfsviz-embedded:{cfg.name}",
        vae_spatial=1,  # the embedded model denoises pixels
        vae_temporal=1,
        default_size=(cfg.frames, cfg.height, cfg.width),
        encode_prompt=encode_prompt,
        num_steps=20,
        guidance_scale=1.0,
    )


def load_model_source(config: CaptureConfig, *, load_weights: bool = True) -> ModelSource:
    """Load the transformer and scheduler named by ``config.model``.

    ``config.model`` may be a local folder holding a diffusers pipeline (``model_index.json``;
    its ``transformer``, ``scheduler`` and ``vae`` configs are used), a transformer folder
    (``config.json`` with ``_class_name``), a hub id of either kind, or None for the
    embedded model. With ``load_weights=False`` the transformer is built on the meta device
    (for ``--dry-run``: shapes only, no memory).

    Raises ValueError for an unknown model or an unsupported architecture (listing the
    supported ones).
    """
    device, dtype = config.torch_device, config.torch_dtype
    if config.model is None:
        return _embedded_source(device)
    import diffusers

    path = Path(config.model).expanduser()
    local = path.is_dir()
    if not local and (path.exists() or not re.fullmatch(r"[\w.-]+/[\w.-]+", config.model)):
        raise ValueError(
            f"unknown model {config.model!r}: not a local diffusers directory nor a hub id (org/name); "
            f"supported architectures: {supported_architectures()}"
        )

    def load_config(subfolder: str | None) -> dict | None:
        """A config dict of the folder/repo (``subfolder`` None = its root), or None when absent."""
        name = "scheduler_config.json" if subfolder == "scheduler" else "config.json"
        if local:
            file = (path / subfolder / name) if subfolder else path / name
            return _read_json(file) if file.is_file() else None
        try:
            loader = diffusers.SchedulerMixin if subfolder == "scheduler" else diffusers.ModelMixin
            return dict(loader.load_config(config.model, subfolder=subfolder))
        except Exception as exc:  # network, missing repo or file
            logger.info("no %s config in %s: %s", subfolder or "root", config.model, exc)
            return None

    if local:
        is_pipeline = (path / "model_index.json").is_file()
        tcfg = load_config("transformer" if is_pipeline else None)
    else:
        tcfg = load_config("transformer")
        is_pipeline = tcfg is not None
        if tcfg is None:
            tcfg = load_config(None)
            if tcfg is None:
                raise ValueError(
                    f"cannot load model {config.model!r}: no local directory of that name and the hub did not "
                    f"answer (offline?); supported architectures: {supported_architectures()}"
                )
    sub = "transformer" if is_pipeline else None
    if tcfg is None or "_class_name" not in tcfg:
        raise ValueError(
            f"{config.model!r} holds no diffusers transformer config (config.json with _class_name); "
            f"supported architectures: {supported_architectures()}"
        )
    cls, adapter = _transformer_class(tcfg["_class_name"])
    if load_weights:
        kwargs = {"torch_dtype": dtype}
        if sub:
            kwargs["subfolder"] = sub
        transformer = cls.from_pretrained(str(path) if local else config.model, **kwargs).to(device).eval()
    else:
        from accelerate import init_empty_weights

        with init_empty_weights():
            transformer = cls.from_config(tcfg)
    scheduler = None
    vae = None
    if is_pipeline:
        scfg = load_config("scheduler")
        if scfg is not None and hasattr(diffusers, scfg.get("_class_name", "")):
            scheduler = getattr(diffusers, scfg["_class_name"]).from_config(scfg)
        vae = load_config("vae")
    spatial, temporal = _vae_factors(vae or {}, adapter)
    return ModelSource(
        transformer=transformer,
        adapter=adapter,
        scheduler=scheduler or _default_scheduler(adapter),
        model_id=config.model,
        vae_spatial=spatial,
        vae_temporal=temporal,
        default_size=_DEFAULTS[adapter.name][0],
    )


def _load_embeddings(file: str, adapter: ModelAdapter) -> tuple[Conditioning, Conditioning | None]:
    from safetensors.torch import load_file

    data = load_file(file)

    def branch(prefix: str) -> Conditioning | None:
        key = f"{prefix}prompt_embeds"
        if key not in data:
            return None
        embeds = data[key]
        embeds = embeds[None] if embeds.dim() == 2 else embeds
        mask = data.get(f"{prefix}prompt_attention_mask")
        pooled = data.get(f"{prefix}pooled_prompt_embeds")
        if mask is not None and mask.dim() == 1:
            mask = mask[None]
        if pooled is not None and pooled.dim() == 1:
            pooled = pooled[None]
        return Conditioning(embeds[:1].float(), None if mask is None else mask[:1], None if pooled is None else pooled[:1].float())

    cond = branch("")
    if cond is None:
        raise ValueError(
            f"embeddings file {file!r} has no 'prompt_embeds' tensor (keys: {sorted(data)}); save the pipeline's "
            "encode_prompt outputs under diffusers' names"
        )
    return cond, branch("negative_")


# ----------------------------------------------------------------------------------------
# resolution
# ----------------------------------------------------------------------------------------
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
            "out": self.config.out,
            "estimated_file_bytes_uncompressed": lay.total_bytes(),
        }


def _num_heads(config) -> int:
    return int(config.num_attention_heads)


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
    if config.branches == "both" and guidance == 1:
        raise ValueError("`branches`='both' needs an unconditional pass: pass --guidance-scale > 1")
    steps = config.capture_steps or default_capture_steps(num_steps)
    if max(steps) >= num_steps:
        raise ValueError(f"`capture_steps` must lie in [0, {num_steps - 1}] for {num_steps} steps (got {list(steps)})")

    # conditioning
    prompt = config.prompt
    if config.embeddings == "random":
        gen = torch.Generator().manual_seed(config.seed + 1)
        cond = adapter.random_conditioning(mcfg, gen)
        uncond = adapter.random_conditioning(mcfg, gen)
    elif config.embeddings is not None:
        cond, uncond = _load_embeddings(config.embeddings, adapter)
    elif source.encode_prompt is not None:
        cond, uncond, prompt = source.encode_prompt(config.prompt)
    elif source.cond is not None:
        cond, uncond = source.cond, source.uncond
    else:
        raise ValueError(
            f"model {source.model_id!r} needs text embeddings: pass --embeddings FILE.safetensors (prompt_embeds, "
            "negative_prompt_embeds, ... from the pipeline's encode_prompt) or --embeddings random"
        )
    if guidance > 1 and uncond is None:
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

    # layers and heads
    all_layers = adapter.select_layers(model)
    by_index = {i: n for n, i in all_layers.items()}
    wanted = config.layers if config.layers is not None else tuple(sorted(by_index))
    bad = [i for i in wanted if i not in by_index]
    if bad:
        raise ValueError(f"`layers` {bad} do not exist; this model has layers 0..{len(by_index) - 1}")
    qkv_bad = [i for i in config.save_qkv if i not in wanted]
    if qkv_bad:
        raise ValueError(f"`save_qkv` layers {qkv_bad} are not captured layers")
    layer_map = {by_index[i]: i for i in wanted}
    num_heads = _num_heads(mcfg)
    heads = config.heads if config.heads is not None else tuple(range(num_heads))
    if max(heads) >= num_heads:
        raise ValueError(f"`heads` {[h for h in heads if h >= num_heads]} do not exist; this model has heads 0..{num_heads - 1}")
    head_dim = int(mcfg.attention_head_dim)
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
        head_dim=head_dim,
        qkv_dtype=config.stored_qkv_dtype,
    )
    sched = source.scheduler
    attrs = {
        "model_id": source.model_id,
        "model_class": type(model).__name__,
        "adapter": adapter.name,
        "model_config": {k: v for k, v in dict(mcfg).items()},
        "prompt": prompt,
        "negative_prompt": config.negative_prompt,
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
        "embeddings": config.embeddings or "model",
    }
    return ResolvedCapture(
        config, source, grid, latent, num_steps, guidance, tuple(steps), layer_map, tuple(heads), layout, cond, uncond, attrs
    )


# ----------------------------------------------------------------------------------------
# per-record reduction
# ----------------------------------------------------------------------------------------
def _kernels():
    """(block_stats, block_scores): the Triton dispatchers when importable, else the references."""
    try:
        from dfsviz.kernels.block_scores import block_scores
        from dfsviz.kernels.block_stats import block_stats

        return block_stats, block_scores, True
    except ImportError:
        from dfsviz.sparse.scoring import block_scores_ref
        from dfsviz.sparse.stats import block_stats_ref

        logger.info("dfsviz.kernels has no block_stats/block_scores: using the PyTorch references")
        return block_stats_ref, block_scores_ref, False


class _Reducer:
    """Turns each captured SDPA call into statistics and queues them to the writer."""

    def __init__(self, rc: ResolvedCapture, writer: CaptureWriter, progress) -> None:
        from dfsviz.sparse.orders import make_order

        self.rc = rc
        self.writer = writer
        self.progress = progress
        self.branch = "cond"
        self.orders = [make_order(name, rc.grid) for name in rc.layout.orders]
        self.block_stats, self.block_scores, self.triton = _kernels()
        self.heads = torch.tensor(rc.heads, dtype=torch.int64)
        self.scale: float | None = None
        self.seen: set[tuple[int, str]] = set()

    def __call__(self, rec: AttentionRecord) -> None:
        if not rec.is_self_attention:
            return
        try:
            self._reduce(rec)
        except ValueError as exc:
            raise ValueError(f"step {self.writer.open_step}, layer {rec.layer} ({rec.name}): {exc}") from None

    def _reduce(self, rec: AttentionRecord) -> None:
        if rec.call > 0:
            raise ValueError(
                f"layer {rec.name} called SDPA {rec.call + 1} times in one forward (per-sample loops are not supported)"
            )
        from dfsviz.sparse.stats import variance_ratio

        cfg, lay, grid = self.rc.config, self.rc.layout, self.rc.grid
        q, k, v = rec.q[:1], rec.k[:1], rec.v[:1]  # the runner sends one sample per call
        valid = self.rc.source.adapter.valid_tokens(rec.attn_mask, q.shape[2], 0)
        if valid is not None:
            q, k, v = (x.index_select(2, valid) for x in (q, k, v))
        if q.shape[2] != grid.num_tokens:
            raise ValueError(
                f"layer {rec.name} attends over {q.shape[2]} tokens but the grid {grid.name} has {grid.num_tokens}; "
                "check --height/--width/--frames/--latent against the model's patching"
            )
        if self.heads.device != q.device:  # uploaded once: a blocking upload per call would stall the GPU
            self.heads = self.heads.to(q.device)
        q, k, v = (x.index_select(1, self.heads) for x in (q, k, v))
        scale = rec.softmax_scale
        self.scale = scale
        backend = {"backend": cfg.kernel_backend} if self.triton else {}
        for oi, order in enumerate(self.orders):
            qo, ko = order.apply(q), order.apply(k)
            st = self.block_stats(qo, ko, block=lay.block, scale=scale, **backend)
            scores = {}
            for method in lay.methods:
                if method == "oracle":
                    scores[method] = st.m[0]
                else:
                    scores[method] = self.block_scores(
                        qo, ko, method=method, tile=cfg.tile_for(method), block=lay.block, scale=scale, **backend
                    )[0]
            # the writer checks every W (and every map) it writes: no value check here, which
            # would wait for the GPU twice per order and layer
            wq = variance_ratio(qo, lay.block, check_values=False)[0]
            wk = variance_ratio(ko, lay.block, check_values=False)[0]
            self.writer.write_maps(
                rec.layer, self.branch, order.name, {"m": st.m[0], "L": st.L[0], "r": st.r[0], "J": st.J[0]}, scores, wq, wk
            )
            del qo, ko, st, scores
            if lay.footprints:
                # the same blocks at every step and branch, so footprints compare across steps
                seed = (cfg.seed * 7919 + rec.layer * 31 + oi) % (1 << 63)  # within torch's seed range for any seed
                blocks = sample_query_blocks(lay.num_blocks, lay.footprints, len(self.rc.heads), seed)
                att = block_footprints(q, k, order.perm_on(q.device), blocks, lay.block, scale)
                self.writer.write_footprints(rec.layer, self.branch, order.name, blocks, att)
        if rec.layer in lay.qkv_layers and lay.has_qkv(self.writer.open_step):
            self.writer.write_qkv(rec.layer, self.branch, q[0], k[0], v[0])
        self.seen.add((rec.layer, self.branch))
        if self.progress is not None:
            self.progress.update(1)


# ----------------------------------------------------------------------------------------
# the loop
# ----------------------------------------------------------------------------------------
@dataclass
class CaptureResult:
    """What a capture run did.

    Fields:
        path: the HDF5 file.
        steps: steps written by this run; skipped: steps already complete (resume).
        complete: True when every planned step is in the file.
        seconds: wall time of the run; step_seconds: wall time of each captured step
            (all its transformer passes, reduction and writing).
        file_bytes: file size at the end.
    """

    path: str
    steps: list[int]
    skipped: list[int]
    complete: bool
    seconds: float
    step_seconds: dict[int, float]
    file_bytes: int


def _scheduler_step(scheduler, pred, t, latents, state: dict):
    import diffusers

    if isinstance(scheduler, getattr(diffusers, "CogVideoXDPMScheduler", ())):
        # the DPM variant needs the previous x0 estimate and timestep (as its pipeline passes them)
        out, state["x0"] = scheduler.step(
            pred, state.get("x0"), t, state.get("t_prev"), latents, return_dict=False
        )
        state["t_prev"] = t
        return out
    return scheduler.step(pred, t, latents, return_dict=False)[0]


def run_capture(
    config: CaptureConfig,
    progress: bool = True,
    *,
    source: ModelSource | None = None,
    on_step: Callable[[int], None] | None = None,
) -> CaptureResult:
    """Run one capture and write ``config.out``.

    Args:
        config: the settings.
        progress: show a tqdm bar over captured (step, layer, branch) records.
        source: a model already in memory (skips loading ``config.model``).
        on_step: called with the step index after each captured step is flushed.

    Returns:
        A :class:`CaptureResult`.

    Raises:
        ValueError: bad settings, unknown model, unsupported architecture, grid mismatch,
            existing output without ``overwrite``, out of GPU memory. An interrupted run
            leaves its file marked incomplete; ``resume=True`` continues it.
    """
    start = time.perf_counter()
    out = Path(config.out)
    if not out.parent.is_dir():
        raise ValueError(f"output directory {str(out.parent)!r} does not exist; create it first")
    lock = CaptureLock(out)  # before anything loads or is created: a second writer of `out` stops here
    try:
        if out.exists() and not (config.overwrite or config.resume):
            raise ValueError(f"output {config.out!r} exists; pass --overwrite to replace it or --resume to continue it")
        rc = resolve_capture(config, source=source)
        identity = run_identity(rc, rc.source.weights_sha256 or weights_fingerprint(rc.source.transformer))
        if config.resume:
            writer = CaptureWriter.resume(out, rc.layout, identity, lock=lock)
        else:
            from dfsviz.sparse.orders import make_order

            perms = {name: make_order(name, rc.grid).perm for name in rc.layout.orders}
            attrs = {**rc.attrs, "run_identity": identity}
            writer = CaptureWriter.create(out, rc.layout, attrs, perms, overwrite=config.overwrite, lock=lock)
    except BaseException:
        lock.release()
        raise
    device = config.torch_device
    model = rc.source.transformer
    adapter = rc.source.adapter
    skipped = sorted(writer.completed)
    todo = [s for s in rc.capture_steps if s not in writer.completed]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo) * len(rc.layer_map) * len(rc.layout.branches), unit="layer", desc="capture")
    reducer = _Reducer(rc, writer, bar)
    capture = AttentionCapture(model, rc.layer_map, reducer, force_native=True)
    step_seconds: dict[int, float] = {}
    written: list[int] = []
    try:
        scheduler = rc.source.scheduler
        scheduler.set_timesteps(rc.num_steps, device=device)
        timesteps = scheduler.timesteps
        dtype = input_dtype(model)
        cond = rc.cond.to(device, dtype)
        uncond = rc.uncond.to(device, dtype) if rc.uncond is not None and rc.guidance_scale > 1 else None
        gen = torch.Generator().manual_seed(config.seed)
        latents = adapter.make_latents(rc.latent, model.config, gen, device, dtype) * float(
            getattr(scheduler, "init_noise_sigma", 1.0)
        )
        last = max(todo) if todo else -1
        sched_state: dict = {}
        sigmas = getattr(scheduler, "sigmas", None)
        with torch.no_grad(), capture:
            capture.enabled = False
            for i, t in enumerate(timesteps):
                if i > last:
                    break
                t0 = time.perf_counter()
                captured = i in todo
                if captured:
                    step_attrs = {"timestep": float(t)}
                    if sigmas is not None and i < len(sigmas):
                        step_attrs["sigma"] = float(sigmas[i])
                    writer.begin_step(i, step_attrs)
                    if bar is not None:
                        bar.set_description(f"capture step {i}")
                x_in = scheduler.scale_model_input(latents, t) if hasattr(scheduler, "scale_model_input") else latents
                reducer.branch = "cond"
                capture.enabled = captured
                pred = adapter.forward(model, x_in, t, cond, guidance=rc.guidance_scale, grid=rc.grid).float()
                if uncond is not None:
                    reducer.branch = "uncond"
                    capture.enabled = captured and "uncond" in rc.layout.branches
                    pred_u = adapter.forward(model, x_in, t, uncond, guidance=rc.guidance_scale, grid=rc.grid).float()
                    pred = pred_u + rc.guidance_scale * (pred - pred_u)
                capture.enabled = False
                latents = _scheduler_step(scheduler, pred, t, latents, sched_state).float()
                if captured:
                    missing = {(l, b) for l in rc.layer_map.values() for b in rc.layout.branches} - reducer.seen
                    if missing:
                        raise ValueError(
                            f"step {i}: no self-attention call reached SDPA for (layer, branch) {sorted(missing)[:4]}; "
                            "the model's attention bypasses torch SDPA (unsupported backend)"
                        )
                    reducer.seen.clear()
                    writer.end_step()
                    if reducer.scale is not None and not writer.has_attr("softmax_scale"):
                        writer.set_attr("softmax_scale", reducer.scale)
                    step_seconds[i] = time.perf_counter() - t0
                    written.append(i)
                    logger.info("captured step %d in %.2f s", i, step_seconds[i])
                    if on_step is not None:
                        on_step(i)
        complete = set(rc.capture_steps) <= writer.completed
        if complete:
            writer.finish()
    except torch.cuda.OutOfMemoryError:
        raise ValueError(
            "out of GPU memory; capture fewer --layers/--heads/--footprints or a smaller --height/--width/--frames "
            f"(the file {config.out!r} keeps the completed steps; --resume continues it)"
        ) from None
    finally:
        if bar is not None:
            bar.close()
        writer.close()
    with CaptureReader(out) as reader:  # success only for a file that opens and holds what was written
        missing = sorted(set(written) - set(reader.steps))
        if missing or reader.complete != complete:
            raise ValueError(f"{config.out!r} does not hold the steps {missing} this run wrote; capture it again")
    return CaptureResult(
        path=str(out),
        steps=written,
        skipped=skipped,
        complete=complete,
        seconds=time.perf_counter() - start,
        step_seconds=step_seconds,
        file_bytes=out.stat().st_size,
    )


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
    identity = {k: v for k, v in cfg.to_json().items() if k not in ("out", "overwrite", "resume")}
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

"""The settings of one capture run: :class:`CaptureConfig`, validated on construction."""

from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from dfsviz.capture.ranks import check_rank_device
from dfsviz.capture.schema import MAP_DTYPE_CHOICES, MAX_INDEX
from dfsviz.sparse._validate import check_block, check_int, check_power_of_two
from dfsviz.sparse.grid import LatentGrid

__all__ = ["CaptureConfig", "default_capture_steps", "format_size", "BRANCHES", "MAX_SEED", "STEP_BUDGET"]

BRANCHES = ("cond", "both")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
QKV_DTYPES = ("auto", "float16", "float32")
# seeds round-trip through HDF5 int64 attributes
MAX_SEED = (1 << 63) - 1
# 8 GB per step: a Wan2.1-14B 720p step with both default orders fits it in uint8 (docs/format.md)
STEP_BUDGET = 8 * 10**9
# units of a size: decimal (kB = 1000 B, what disks and the budget's default count in) and binary
_SIZE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
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
        grid: "FxHxW" token grid after patching, for a transformer class the architecture
            registry does not describe (the generic entry); None for the registry's classes.
        text_len: with ``grid``: text tokens in the self-attention sequence (None = 0).
        text_first: with ``grid``: the text precedes the video (None = it follows it).
        seed: seed of the initial noise, random embeddings and footprint sampling (>= 0).
        guidance_scale: classifier-free guidance weight (>= 1; 1 = no unconditional pass);
            HunyuanVideo: embedded guidance, as its pipeline sends it (no unconditional pass);
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
        map_dtype: storage dtype of the maps m, L, r, J and scores: "auto" (the widest of
            float32, float16 and uint8 whose largest step fits ``step_budget``), "float32",
            "float16" (half their bytes, rounded to 11 significant bits; values beyond +-65504
            are refused) or "uint8" (a quarter: 256 levels per map row, docs/format.md).
        step_budget: with ``map_dtype`` "auto", the bytes one step may take (uncompressed, as
            ``StoreLayout.bytes_per_step`` counts them): an int > 0 or a size such as "8GB",
            "500MB", "2GiB" (kept as the int). Default 8 GB (8 x 10^9 bytes).
        device: "auto" (cuda when available), "cpu", "cuda" or "cuda:N".
        dtype: model dtype: "auto" (bfloat16 on CUDA, float32 on CPU), "float32", "float16", "bfloat16".
        overwrite: replace an existing output file.
        resume: continue an interrupted capture in ``out`` (same settings).
        kernel_backend: None (Triton on CUDA), "triton" or "ref" for the statistics kernels.
        context_parallel: None (one process) or "ulysses": under ``torchrun --nproc-per-node P``
            diffusers' Ulysses attention splits the model over the P ranks (P must divide the
            heads); each rank reduces its heads, rank 0 writes ``out``.
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
    grid: str | None = None
    text_len: int | None = None
    text_first: bool | None = None
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
    map_dtype: str = "auto"
    step_budget: int | str = STEP_BUDGET
    device: str = "auto"
    dtype: str = "auto"
    overwrite: bool = False
    resume: bool = False
    kernel_backend: str | None = None
    context_parallel: str | None = None

    def __post_init__(self) -> None:
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
            check_int(self.num_steps, "num_steps", 1, "50 is the usual schedule", high=MAX_INDEX)
        object.__setattr__(self, "capture_steps", _int_tuple(self.capture_steps, "capture_steps"))
        if self.num_steps is not None and self.capture_steps and max(self.capture_steps) >= self.num_steps:
            raise ValueError(
                f"`capture_steps` must lie in [0, num_steps - 1] = [0, {self.num_steps - 1}] (got {list(self.capture_steps)})"
            )
        object.__setattr__(self, "layers", _int_tuple(self.layers, "layers"))
        object.__setattr__(self, "heads", _int_tuple(self.heads, "heads"))
        for name in ("height", "width", "frames"):
            if getattr(self, name) is not None:
                check_int(getattr(self, name), name, 1, "a video size in pixels or frames", high=MAX_INDEX)
        if self.latent is not None:
            try:
                LatentGrid.parse(self.latent)
            except ValueError:
                raise ValueError(f"`latent` must look like FRAMESxHEIGHTxWIDTH in latent cells (before patching), each "
                                 f"at least 1, e.g. 21x60x104 (got {self.latent!r})") from None
        self._check_generic_grid()
        check_int(self.seed, "seed", 0, "seeds are stored as 64-bit signed integers", high=MAX_SEED)
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
        check_block(self.block)
        check_power_of_two(self.tile, "tile", 4, self.block)
        check_power_of_two(self.stride, "stride", 2, self.block)
        check_int(self.footprints, "footprints", 0, "query blocks per head, 0 = none")
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
        if self.map_dtype not in MAP_DTYPE_CHOICES:
            raise ValueError(f"`map_dtype` must be one of {list(MAP_DTYPE_CHOICES)} (got {self.map_dtype!r})")
        object.__setattr__(self, "step_budget", _size(self.step_budget, "step_budget"))
        if not isinstance(self.device, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"`device` must be 'auto', 'cpu', 'cuda' or 'cuda:N' (got {self.device!r})")
        if self.context_parallel not in (None, "ulysses"):
            raise ValueError(f"`context_parallel` must be None or 'ulysses' (got {self.context_parallel!r})")
        if self.context_parallel is not None:
            check_rank_device(self.device, "under --context-parallel")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"`device` {self.device!r} asked but no CUDA GPU is visible; use --device cpu")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"`dtype` must be 'auto' or one of {list(DTYPES)} (got {self.dtype!r})")
        if self.overwrite and self.resume:
            raise ValueError("`overwrite` and `resume` exclude each other: --resume continues the file, --overwrite replaces it")
        if self.kernel_backend not in (None, "triton", "ref"):
            raise ValueError(f"`kernel_backend` must be None, 'triton' or 'ref' (got {self.kernel_backend!r})")

    def _check_generic_grid(self) -> None:
        if self.grid is None:
            if self.text_len is not None or self.text_first is not None:
                raise ValueError("`text_len` and `text_first` describe a `grid`: pass --grid FxHxW with them")
            return
        LatentGrid.parse(self.grid)  # raises with the expected format
        if self.latent is not None or any(getattr(self, n) is not None for n in ("height", "width", "frames")):
            raise ValueError(
                "`grid` gives the token grid itself: drop --latent/--height/--width/--frames (they size a latent "
                "the registry turns into a grid)"
            )
        if self.text_len is not None:
            check_int(self.text_len, "text_len", 0, "text tokens in the self-attention sequence", high=MAX_INDEX)
        if self.text_first is not None and not isinstance(self.text_first, bool):
            raise TypeError(f"`text_first` must be a bool or None (got {type(self.text_first).__name__})")
        if self.text_first and not self.text_len:
            raise ValueError("`text_first` needs text: pass --text-len N (> 0) with --text-first")

    def to_json(self) -> dict:
        """JSON-ready dict (the ``capture_config`` root attribute).

        The generic entry's ``grid``, ``text_len`` and ``text_first``, and ``context_parallel``,
        appear only when set, and ``map_dtype`` and ``step_budget`` only when not the default,
        so the settings of a one-process default capture of a registry model read as they did
        before these fields existed (``--resume`` of such a file compares equal)."""
        generic = ("grid", "text_len", "text_first", "context_parallel")
        defaults = {"map_dtype": "auto", "step_budget": STEP_BUDGET}
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()
                if not (k in generic and v is None) and not (k in defaults and v == defaults[k])}

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


def _size(value, name: str) -> int:
    """Bytes of ``value``: an int > 0, or a str "8GB", "500 MB", "1.5GiB", "2e9" (see _SIZE_UNITS)."""
    bytes_ = None
    if isinstance(value, int) and not isinstance(value, bool):
        bytes_ = value
    elif isinstance(value, str):
        found = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*", value)
        if found and found.group(2).lower() in ("", *_SIZE_UNITS):
            bytes_ = int(float(found.group(1)) * _SIZE_UNITS.get(found.group(2).lower(), 1))
    if bytes_ is None or bytes_ <= 0:
        raise ValueError(
            f"`{name}` must be a size in bytes > 0, a whole number or a number with a unit (B, kB, MB, GB, TB, KiB, MiB, "
            f"GiB, TiB), e.g. 8GB (got {value!r})"
        )
    return bytes_


def format_size(num_bytes: int) -> str:
    """``8_000_000_000`` -> ``"8.00 GB"`` (decimal units, as a step budget is given); ``"999 B"``."""
    for unit in ("B", "kB", "MB", "GB"):
        if num_bytes < 1000:
            return f"{num_bytes} {unit}" if unit == "B" else f"{num_bytes:.2f} {unit}"
        num_bytes /= 1000
    return f"{num_bytes:.2f} TB"


def default_capture_steps(num_steps: int, count: int = 5) -> tuple[int, ...]:
    """``count`` steps spread evenly over [0, num_steps - 1], first and last included."""
    if num_steps <= count:
        return tuple(range(num_steps))
    return tuple(sorted({round(i * (num_steps - 1) / (count - 1)) for i in range(count)}))

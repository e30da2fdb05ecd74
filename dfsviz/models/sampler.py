"""Save, load and sample the embedded tiny video DiT.

A model folder (``dfsviz/data/models/tiny-wan``) holds what ``save_pretrained`` writes
(``config.json``, ``diffusion_pytorch_model.safetensors``), the learned class
embeddings (``class_embeddings.safetensors``, float32 [C + 1, text_len, text_dim],
the last row is the null class used for classifier-free guidance) and a model card
(``dfsviz_model.json``: format version, ``EmbeddedModelConfig``, class table,
training summary). Loading reads safetensors only, never pickles.

Sampling integrates the flow-matching ODE from noise (sigma = 1) to a clip
(sigma = 0) with diffusers' ``FlowMatchEulerDiscreteScheduler``; the model predicts
the velocity ``noise - clip``. Hooks called before and after every step let a
capture observe each step (see ``DenoiseStep``).

Example::

    from dfsviz.models.sampler import load_embedded_model, sample_videos
    model = load_embedded_model()                      # dfsviz/data/models/tiny-wan, CPU, float32
    clips = sample_videos(model, ["red_disc_translate"], num_steps=20, seed=0,
                          callback_on_step_begin=lambda s: print(s.index, s.timestep))
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from dfsviz._package_data import DATA_DIR
from dfsviz.models.config import EmbeddedModelConfig
from dfsviz.models.videos import class_names, class_table, make_videos

__all__ = [
    "CLASS_EMBEDDINGS_FILE",
    "DEFAULT_GUIDANCE",
    "MODEL_CARD_FILE",
    "MODEL_FORMAT",
    "MODEL_FORMAT_VERSION",
    "DenoiseStep",
    "EmbeddedModel",
    "EMBEDDED_MODELS",
    "EMBEDDED_PREFIX",
    "embedded_model_dir",
    "embedded_model_name",
    "encode_labels",
    "frame_strip",
    "load_embedded_model",
    "sample_videos",
    "save_embedded_model",
    "video_to_uint8",
]

logger = logging.getLogger(__name__)

CLASS_EMBEDDINGS_FILE = "class_embeddings.safetensors"
MODEL_CARD_FILE = "dfsviz_model.json"
MODEL_FORMAT = "dfsviz-embedded-model"
MODEL_FORMAT_VERSION = 1
# Default classifier-free guidance of ``sample_videos``: 1 disables guidance, so each
# step is one forward on B clips, which keeps a CPU capture cheap.
DEFAULT_GUIDANCE = 1.0
_EMBEDDINGS_KEY = "class_embeddings"


#: Model ids of the embedded models: ``dfsviz capture --model dfsviz-embedded:medium``; no ``--model`` is tiny.
EMBEDDED_PREFIX = "dfsviz-embedded:"
#: The embedded models shipped inside the package: short name -> folder under ``dfsviz/data/models/``.
EMBEDDED_MODELS = {"tiny": "tiny-wan", "medium": "medium-wan"}


def embedded_model_dir(name: str = "tiny") -> Path:
    """The folder of the shipped embedded model ``name``: ``tiny`` (``dfsviz/data/models/tiny-wan``,
    the default) or ``medium`` (``medium-wan``); the folder names are accepted too.

    Raises ValueError for any other name.
    """
    folder = EMBEDDED_MODELS.get(name, name)
    if folder not in EMBEDDED_MODELS.values():
        raise ValueError(f"unknown embedded model {name!r}; choose one of {sorted(EMBEDDED_MODELS)} "
                         f"(e.g. --model {EMBEDDED_PREFIX}medium)")
    return DATA_DIR / "models" / folder


def embedded_model_name(model: str | None) -> str | None:
    """The embedded model a capture's ``model`` names: ``None`` (the default) is ``tiny``,
    ``dfsviz-embedded:<name>`` is ``<name>``; None for any other model (a hub id or a folder)."""
    if model is None:
        return "tiny"
    return model.removeprefix(EMBEDDED_PREFIX) if model.startswith(EMBEDDED_PREFIX) else None


@dataclass(frozen=True)
class EmbeddedModel:
    """A loaded embedded model.

    Fields:
        transformer: ``diffusers.WanTransformer3DModel`` in eval mode.
        class_embeddings: float32 [C + 1, text_len, text_dim]; row C is the null class.
        config: the ``EmbeddedModelConfig`` it was built from.
        classes: class names; label i is ``classes[i]``.
        card: the parsed ``dfsviz_model.json`` (training summary included).
    """

    transformer: torch.nn.Module
    class_embeddings: torch.Tensor
    config: EmbeddedModelConfig
    classes: tuple[str, ...]
    card: dict

    @property
    def null_label(self) -> int:
        """Label of the unconditional (null) class embedding."""
        return len(self.classes)

    @property
    def device(self) -> torch.device:
        return self.class_embeddings.device

    @property
    def dtype(self) -> torch.dtype:
        """The transformer's dtype (``load_embedded_model(dtype=...)``; diffusers keeps a few small
        modules, e.g. the time embedder and the norms' affine tables, in float32)."""
        return self.transformer.dtype


@dataclass(frozen=True)
class DenoiseStep:
    """What the step hooks of ``sample_videos`` see.

    Fields:
        index: step number, 0 .. num_steps - 1.
        num_steps: steps in this run.
        timestep: the model's timestep input, sigma * 1000 (float).
        sigma: noise level entering the step (1 = pure noise).
        sigma_next: noise level after the step (0 after the last).
        latents: float32 [B, 3, F, H, W], the noisy clips entering the step.
        velocity: the (guided) predicted velocity [B, 3, F, H, W]; None before the step.
        next_latents: the clips after the step; None before the step.
    """

    index: int
    num_steps: int
    timestep: float
    sigma: float
    sigma_next: float
    latents: torch.Tensor
    velocity: torch.Tensor | None = None
    next_latents: torch.Tensor | None = None


StepHook = Callable[[DenoiseStep], None]


def save_embedded_model(transformer: torch.nn.Module, class_embeddings: torch.Tensor, config: EmbeddedModelConfig,
                        out_dir: str | Path, *, weights_dtype: torch.dtype = torch.float16,
                        training: dict | None = None) -> Path:
    """Write a model folder that ``load_embedded_model`` reads back.

    Args:
        transformer: a ``WanTransformer3DModel`` built from ``config.transformer_kwargs()``.
        class_embeddings: float [C + 1, text_len, text_dim] (row C: null class).
        config: the model's config.
        out_dir: folder to create or overwrite.
        weights_dtype: storage dtype of the transformer weights (float16 halves the size;
            ``load_embedded_model`` upcasts to float32).
        training: JSON-ready training summary stored in the model card.

    Returns:
        The folder path.
    """
    from diffusers.utils import logging as diffusers_logging
    from safetensors.torch import save_file

    expected = (config.num_classes + 1, config.text_len, config.text_dim)
    if tuple(class_embeddings.shape) != expected:
        raise ValueError(f"`class_embeddings` must have shape {expected} (classes + null, text_len, text_dim) "
                         f"(got {tuple(class_embeddings.shape)})")
    if weights_dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"`weights_dtype` must be float16, bfloat16 or float32 (got {weights_dtype})")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # A copy, so the caller's float32 weights are not rounded. diffusers warns that a plain
    # `.to()` also casts its keep-in-float32 modules: intended here, loading upcasts all.
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        copy.deepcopy(transformer).to(weights_dtype).save_pretrained(out, safe_serialization=True)
    finally:
        diffusers_logging.set_verbosity(verbosity)
    save_file({_EMBEDDINGS_KEY: class_embeddings.detach().to("cpu", torch.float32).contiguous()},
              str(out / CLASS_EMBEDDINGS_FILE))
    card = {
        "format": MODEL_FORMAT,
        "format_version": MODEL_FORMAT_VERSION,
        "config": config.to_dict(),
        "token_grid": list(config.token_grid),
        "num_tokens": config.num_tokens,
        "classes": class_table(),
        "null_label": config.num_classes,
        "weights_dtype": str(weights_dtype).removeprefix("torch."),
        "training": training or {},
    }
    (out / MODEL_CARD_FILE).write_text(json.dumps(card, indent=1) + "\n")
    return out


#: Transformer dtypes ``load_embedded_model`` takes.
MODEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def load_embedded_model(path: str | Path | None = None, *, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> EmbeddedModel:
    """Load a model folder written by ``save_embedded_model`` (safetensors only).

    Args:
        path: the folder; None means ``embedded_model_dir()`` (``dfsviz/data/models/tiny-wan``).
        device: where to put the model.
        dtype: the transformer's weights and activations: float32 (default), bfloat16 or float16
            (``sample_videos`` casts its inputs; latents, guidance and scheduler stay float32).

    Returns:
        An ``EmbeddedModel`` whose transformer is in eval mode.
    """
    from diffusers import WanTransformer3DModel
    from safetensors.torch import load_file

    if dtype not in MODEL_DTYPES:
        raise ValueError(f"`dtype` must be one of {[str(d) for d in MODEL_DTYPES]} (got {dtype!r})")
    folder = Path(path) if path is not None else embedded_model_dir()
    card_path = folder / MODEL_CARD_FILE
    if not card_path.is_file():
        raise ValueError(f"`path` must be an embedded-model folder holding {MODEL_CARD_FILE} (got {str(folder)!r}); "
                         "train one with `python -m dfsviz.models.train --out DIR`")
    card = json.loads(card_path.read_text())
    if card.get("format") != MODEL_FORMAT or card.get("format_version") != MODEL_FORMAT_VERSION:
        raise ValueError(f"{card_path} is format {card.get('format')!r} version {card.get('format_version')!r}; "
                         f"this dfsviz reads {MODEL_FORMAT!r} version {MODEL_FORMAT_VERSION}: retrain the model")
    config = EmbeddedModelConfig.from_dict(card["config"])
    names = tuple(c["name"] for c in card["classes"])
    if list(names) != class_names():
        raise ValueError(f"{card_path} was trained on classes {list(names)}, but this dfsviz generates "
                         f"{class_names()}: retrain the model")
    transformer = WanTransformer3DModel.from_pretrained(folder, torch_dtype=dtype, use_safetensors=True,
                                                        local_files_only=True)
    for key, value in config.transformer_kwargs().items():
        stored = transformer.config[key]
        if (list(stored) if isinstance(stored, (list, tuple)) else stored) != (
                list(value) if isinstance(value, tuple) else value):
            raise ValueError(f"{folder / 'config.json'} has {key}={stored!r} but {MODEL_CARD_FILE} implies "
                             f"{value!r}; the folder mixes two models")
    emb = load_file(str(folder / CLASS_EMBEDDINGS_FILE))[_EMBEDDINGS_KEY].to(torch.float32)
    expected = (config.num_classes + 1, config.text_len, config.text_dim)
    if tuple(emb.shape) != expected:
        raise ValueError(f"{folder / CLASS_EMBEDDINGS_FILE} has shape {tuple(emb.shape)}, expected {expected}")
    transformer = transformer.to(device).eval()
    return EmbeddedModel(transformer, emb.to(device), config, names, card)


def _labels_tensor(model: EmbeddedModel, labels: Sequence[int | str] | torch.Tensor) -> torch.Tensor:
    if isinstance(labels, torch.Tensor):
        items = labels.tolist()
    elif isinstance(labels, (int, str)):
        raise TypeError(f"`labels` must be a sequence of class labels or names, e.g. [0] (got {labels!r})")
    else:
        items = list(labels)
    if not items:
        raise ValueError("`labels` must hold at least one class label or name (got an empty sequence)")
    out = []
    for item in items:
        if isinstance(item, str):
            if item not in model.classes:
                raise ValueError(f"unknown class name {item!r}; choose one of {list(model.classes)}")
            out.append(model.classes.index(item))
        elif isinstance(item, int) and not isinstance(item, bool) and 0 <= item <= model.null_label:
            out.append(item)
        else:
            raise ValueError(f"class labels must be integers in [0, {model.null_label}] ({model.null_label} is the "
                             f"null class) or names from {list(model.classes)} (got {item!r})")
    return torch.tensor(out, dtype=torch.int64)


def encode_labels(model: EmbeddedModel, labels: Sequence[int | str] | torch.Tensor) -> torch.Tensor:
    """Class embeddings as ``encoder_hidden_states``: float32 [B, text_len, text_dim]."""
    return model.class_embeddings[_labels_tensor(model, labels).to(model.device)]


@torch.no_grad()
def sample_videos(model: EmbeddedModel, labels: Sequence[int | str] | torch.Tensor, *, num_steps: int = 20,
                  seed: int = 0, guidance_scale: float = DEFAULT_GUIDANCE, shift: float | None = None,
                  callback_on_step_begin: StepHook | None = None,
                  callback_on_step_end: StepHook | None = None) -> torch.Tensor:
    """Generate one clip per label by Euler flow-matching steps.

    Args:
        model: from ``load_embedded_model``.
        labels: B class labels (ints) or names.
        num_steps: denoising steps (>= 1).
        seed: >= 0; the initial noise is drawn on the CPU, so a seed gives the same run on any device
            (bit-identical on one machine).
        guidance_scale: classifier-free guidance weight (>= 1); above 1 each step runs the model on
            2B clips (conditional first, then null-class).
        shift: scheduler timestep shift; None uses ``model.config.shift``.
        callback_on_step_begin: called with a ``DenoiseStep`` (velocity None) before each model call.
        callback_on_step_end: called with the full ``DenoiseStep`` after each step.

    Returns:
        float32 [B, 3, F, H, W], clips in [-1, 1] (clamped).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"`num_steps` must be an integer >= 1 (got {num_steps!r}); 20 is a good default")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"`seed` must be an integer >= 0 (got {seed!r})")
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) or guidance_scale < 1:
        raise ValueError(f"`guidance_scale` must be a number >= 1 (got {guidance_scale!r}); 1 disables guidance")
    shift = model.config.shift if shift is None else shift
    if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not shift > 0:
        raise ValueError(f"`shift` must be a number > 0 or None (got {shift!r})")

    cond = encode_labels(model, labels)
    batch = cond.shape[0]
    guided = guidance_scale != 1
    if guided:
        null = model.class_embeddings[model.null_label].expand_as(cond)
        cond = torch.cat([cond, null], dim=0)
    dtype = model.dtype
    cond = cond.to(dtype)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, *model.config.video_shape), generator=gen).to(model.device)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=float(shift))
    scheduler.set_timesteps(num_steps, device=model.device)
    sigmas = scheduler.sigmas.tolist()
    for i, t in enumerate(scheduler.timesteps):
        step = DenoiseStep(i, num_steps, float(t), sigmas[i], sigmas[i + 1], x)
        if callback_on_step_begin is not None:
            callback_on_step_begin(step)
        inp = torch.cat([x, x], dim=0) if guided else x
        ts = t.to(torch.float32).expand(inp.shape[0])
        v = model.transformer(inp.to(dtype), ts, cond, return_dict=False)[0].float()
        if guided:
            v_cond, v_null = v.chunk(2)
            v = v_null + guidance_scale * (v_cond - v_null)
        x_next = scheduler.step(v, t, x, return_dict=False)[0]
        if callback_on_step_end is not None:
            callback_on_step_end(DenoiseStep(i, num_steps, float(t), sigmas[i], sigmas[i + 1], x, v, x_next))
        x = x_next
    return x.clamp(-1.0, 1.0)


def video_to_uint8(video: torch.Tensor) -> torch.Tensor:
    """float [..., 3, F, H, W] in [-1, 1] -> uint8 [..., F, H, W, 3] (values outside are clamped)."""
    if not isinstance(video, torch.Tensor) or video.dim() < 4 or video.shape[-4] != 3:
        raise ValueError(f"`video` must be a float tensor [..., 3, F, H, W] (got "
                         f"{tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__})")
    x = ((video.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.movedim(-4, -1).cpu()


def frame_strip(videos: torch.Tensor, *, gap: int = 2, scale: int = 2) -> torch.Tensor:
    """Tile clips into one image: one row per clip, frames left to right.

    Args:
        videos: float [R, 3, F, H, W] in [-1, 1].
        gap: white pixels between frames and rows (>= 0, before scaling).
        scale: nearest-neighbour upscaling factor (>= 1).

    Returns:
        uint8 [R * (H + gap) - gap, F * (W + gap) - gap, 3] times ``scale``.
    """
    if isinstance(gap, bool) or not isinstance(gap, int) or gap < 0:
        raise ValueError(f"`gap` must be an integer >= 0 (got {gap!r})")
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise ValueError(f"`scale` must be an integer >= 1 (got {scale!r})")
    if not isinstance(videos, torch.Tensor) or videos.dim() != 5:
        raise ValueError(f"`videos` must be [R, 3, F, H, W] (got "
                         f"{tuple(videos.shape) if isinstance(videos, torch.Tensor) else type(videos).__name__})")
    frames = video_to_uint8(videos)                                         # [R, F, H, W, 3]
    rows, nf, h, w, _ = frames.shape
    out = torch.full((rows * (h + gap) - gap, nf * (w + gap) - gap, 3), 255, dtype=torch.uint8)
    for r in range(rows):
        for f in range(nf):
            out[r * (h + gap): r * (h + gap) + h, f * (w + gap): f * (w + gap) + w] = frames[r, f]
    return out.repeat_interleave(scale, 0).repeat_interleave(scale, 1)


def _write_strips(model: EmbeddedModel, out_dir: Path, *, num_steps: int, seeds: Sequence[int],
                  guidance_scale: float, data_seed: int) -> list[Path]:
    """One PNG per class: a training clip of that class on top, then one generated clip per seed."""
    from PIL import Image

    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    written = []
    for label, name in enumerate(model.classes):
        real = make_videos([label], seed=data_seed + label, **cfg.clip_kwargs())
        fakes = [sample_videos(model, [label], num_steps=num_steps, seed=s, guidance_scale=guidance_scale).cpu()
                 for s in seeds]
        strip = frame_strip(torch.cat([real, *fakes], dim=0))
        path = out_dir / f"embedded_{cfg.name}_{name}.png"
        # A 128-colour palette keeps each strip near 40 KB in git; the clips have few colours.
        image = Image.fromarray(strip.numpy()).quantize(colors=128, method=Image.Quantize.MEDIANCUT,
                                                         dither=Image.Dither.NONE)
        image.save(path, optimize=True)
        written.append(path)
        logger.info("wrote %s", path)
    return written


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m dfsviz.models.sampler``: write per-class frame strips of a model."""
    parser = argparse.ArgumentParser(
        description="Write one frame-strip PNG per class (top row: a procedural training clip; below: samples).",
        epilog="example: python -m dfsviz.models.sampler --model dfsviz/data/models/tiny-wan --out-dir docs/img")
    parser.add_argument("--model", default=None, help="model folder (default dfsviz/data/models/tiny-wan)")
    parser.add_argument("--out-dir", required=True, help="folder for embedded_<model>_<class>.png")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="one generated row per seed")
    parser.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance weight (1 = off)")
    parser.add_argument("--data-seed", type=int, default=10_000, help="seed of the training-clip row")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    model = load_embedded_model(args.model, device=args.device)
    for path in _write_strips(model, Path(args.out_dir), num_steps=args.steps, seeds=args.seeds,
                              guidance_scale=args.guidance, data_seed=args.data_seed):
        print(path)


if __name__ == "__main__":
    main()

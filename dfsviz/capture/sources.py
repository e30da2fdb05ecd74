"""Models a capture runs: :class:`ModelSource` and :func:`load_model_source`.

A source is a diffusers transformer with its adapter, scheduler, VAE compression and the
conditioning it takes (a prompt encoder for the embedded model, or fixed embeddings).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from types import SimpleNamespace
from pathlib import Path
from typing import Callable

import torch

from dfsviz.capture.adapters import Conditioning, GenericAdapter, ModelAdapter, adapter_for, get_adapter, supported_architectures
from dfsviz.capture.config import CaptureConfig
from dfsviz.models.sampler import embedded_model_dir, embedded_model_name, encode_labels, load_embedded_model

__all__ = ["ModelSource", "load_model_source", "load_embeddings"]

logger = logging.getLogger(__name__)


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


def _default_scheduler(adapter: ModelAdapter):
    import diffusers

    if adapter.name == "cogvideox":
        # CogVideoX-2b's scheduler settings (v-prediction, zero-terminal-SNR, trailing spacing)
        return diffusers.CogVideoXDDIMScheduler(
            beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction",
            rescale_betas_zero_snr=True, timestep_spacing="trailing", snr_shift_scale=3.0, clip_sample=False,
            set_alpha_to_one=True, steps_offset=0,
        )
    shift = adapter.arch.flow_shift if adapter.arch is not None else None
    return diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift or 1.0)


def _read_json(path: Path) -> dict:
    with open(path) as fh:
        return json.load(fh)


def _vae_factors(cfg: dict, adapter: ModelAdapter) -> dict[str, int]:
    """``vae_spatial`` / ``vae_temporal`` of a pipeline folder's VAE config, else of the adapter's
    family; the generic entry (its grid is given) has none, so ModelSource's defaults stay."""
    spatial = cfg.get("scale_factor_spatial") or cfg.get("spatial_compression_ratio")
    if spatial is None and cfg.get("block_out_channels"):
        spatial = 2 ** (len(cfg["block_out_channels"]) - 1)
    temporal = cfg.get("scale_factor_temporal") or cfg.get("temporal_compression_ratio")
    if adapter.arch is not None:
        spatial, temporal = spatial or adapter.vae_spatial, temporal or adapter.vae_temporal
    return {name: int(value) for name, value in (("vae_spatial", spatial), ("vae_temporal", temporal)) if value}


def _transformer_class(name: str, config: CaptureConfig, patch: tuple[int, int, int]):
    """The diffusers class named ``name`` and its adapter: the registry's entry, or the generic
    entry bound to ``--grid`` for a class the registry does not describe."""
    import diffusers

    cls = getattr(diffusers, name, None)
    try:
        adapter = adapter_for(name)
    except ValueError as exc:
        if config.grid is None or cls is None:
            hint = "" if cls is None else "; or pass --grid FxHxW (with --text-len/--text-first) to capture it with the generic entry"
            raise ValueError(f"{exc}{hint}") from None
        return cls, GenericAdapter(config.grid, config.text_len or 0, bool(config.text_first), patch=patch)
    if config.grid is not None:
        raise ValueError(
            f"`grid` is for classes the registry does not describe; the grid of {name} ({adapter.arch.title}) follows "
            "from --frames/--height/--width or --latent: drop --grid"
        )
    return cls, adapter


def _embedded_source(name: str, device) -> ModelSource:
    import diffusers

    model = load_embedded_model(embedded_model_dir(name), device=device)
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
    (``config.json`` with ``_class_name``), a hub id of either kind, ``dfsviz-embedded:medium``
    (or ``:tiny``) for a shipped embedded model, or None for the tiny embedded model. With ``load_weights=False`` the transformer is built on the meta device
    (for ``--dry-run``: shapes only, no memory).

    Raises ValueError for an unknown model or an unsupported architecture (listing the
    supported ones).
    """
    device, dtype = config.torch_device, config.torch_dtype
    embedded = embedded_model_name(config.model)
    if embedded is not None:
        if config.grid is not None:
            raise ValueError(f"`grid` is for classes the registry does not describe; the grid of the embedded model "
                             f"{embedded!r} follows from --frames/--height/--width or --latent: drop --grid")
        return _embedded_source(embedded, device)
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
    cls, adapter = _transformer_class(tcfg["_class_name"], config, GenericAdapter.patch_of(SimpleNamespace(**tcfg)))
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
    return ModelSource(
        transformer=transformer,
        adapter=adapter,
        scheduler=scheduler or _default_scheduler(adapter),
        model_id=config.model,
        **_vae_factors(vae or {}, adapter),
        # the generic entry's grid is given (--grid), so it needs no default video size
        **({"default_size": adapter.arch.default_size} if adapter.arch is not None else {}),
    )


def load_embeddings(file: str, adapter: ModelAdapter, config) -> tuple[Conditioning, Conditioning | None]:
    """(conditional, unconditional or None) embeddings from a .safetensors ``file`` saved under
    diffusers' names, checked against what the transformer of ``config`` takes (the width of the
    text embeddings, and of the pooled one where the family has it); ValueError names what
    does not fit."""
    from safetensors.torch import load_file

    try:
        data = load_file(file)
    except FileNotFoundError:
        raise ValueError(f"embeddings file {file!r} does not exist") from None
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type for a bad header
        raise ValueError(f"embeddings file {file!r} is not a readable .safetensors file ({exc})") from None
    try:
        width = adapter.text_dim(config)
    except ValueError:  # the generic entry found no width in the config: the file sets it
        width = None
    pooled_dim = None if adapter.arch is None or adapter.arch.pooled_dim is None else adapter.arch.pooled_dim(config)

    def tensor(key: str, dims: tuple[int, ...], last: int | None, size: str = "width {}"):
        value = data.get(key)
        if value is None:
            return None
        if value.dim() not in dims or (last is not None and value.shape[-1] != last):
            want = " or ".join(f"{d}-D" for d in dims) + ("" if last is None else " of " + size.format(last))
            raise ValueError(f"embeddings file {file!r}: {key!r} has shape {list(value.shape)}; this model takes "
                             f"{want}")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ValueError(f"embeddings file {file!r}: {key!r} holds NaN or infinite values")
        return value if value.dim() == dims[-1] else value[None]

    def branch(prefix: str) -> Conditioning | None:
        embeds = tensor(f"{prefix}prompt_embeds", (2, 3), width)
        if embeds is None:
            return None
        mask = tensor(f"{prefix}prompt_attention_mask", (1, 2), embeds.shape[1],
                      f"length {{}} (the text tokens of {prefix}prompt_embeds)")
        pooled = tensor(f"{prefix}pooled_prompt_embeds", (1, 2), pooled_dim)
        if pooled_dim is not None and pooled is None:
            raise ValueError(f"embeddings file {file!r} has no {prefix + 'pooled_prompt_embeds'!r}, which "
                             f"{adapter.name} needs (width {pooled_dim})")
        return Conditioning(embeds[:1].float(), None if mask is None else mask[:1],
                            None if pooled is None else pooled[:1].float())

    cond = branch("")
    if cond is None:
        raise ValueError(
            f"embeddings file {file!r} has no 'prompt_embeds' tensor (keys: {sorted(data)}); save the pipeline's "
            "encode_prompt outputs under diffusers' names"
        )
    return cond, branch("negative_")

"""Model adapters: what dfsviz must know about each diffusers video transformer.

An adapter maps pipeline settings to the token grid of the self-attention sequence,
picks the self-attention modules and numbers them, drives one forward pass of the
transformer with precomputed conditioning, and says which tokens of a captured
SDPA call are real (HunyuanVideo pads its text and masks the padding).

Token layouts (as measured on tiny random-weight models of diffusers 0.42):
* Wan: self-attention ``blocks.N.attn1`` sees video tokens only (text is cross-attention).
* HunyuanVideo: ``transformer_blocks.N.attn`` (dual stream) and
  ``single_transformer_blocks.N.attn`` see [video, text]; the text is padded and a
  boolean key mask [B, 1, 1, N] marks the real tokens; the token refiner's text-only
  attention is not a video self-attention and is excluded.
* CogVideoX: ``transformer_blocks.N.attn1`` sees [text, video]; no mask.
* generic: any transformer whose attention reaches SDPA; the grid is given.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from dfsviz.sparse.grid import LatentGrid

__all__ = [
    "Conditioning",
    "ModelAdapter",
    "WanAdapter",
    "HunyuanVideoAdapter",
    "CogVideoXAdapter",
    "GenericAdapter",
    "ADAPTERS",
    "adapter_names",
    "get_adapter",
    "adapter_for",
    "supported_architectures",
    "input_dtype",
]


@dataclass(frozen=True)
class Conditioning:
    """Precomputed conditioning of one branch (conditional or unconditional).

    Fields:
        embeds: text embeddings [1, T, text_dim].
        mask: text attention mask [1, T] (1 = real token) or None (every token real).
        pooled: pooled text embedding [1, P] (HunyuanVideo) or None.
    """

    embeds: torch.Tensor
    mask: torch.Tensor | None = None
    pooled: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.embeds, torch.Tensor) or self.embeds.dim() != 3 or self.embeds.shape[0] != 1:
            shape = tuple(self.embeds.shape) if isinstance(self.embeds, torch.Tensor) else type(self.embeds).__name__
            raise ValueError(f"`embeds` must be a tensor [1, T, text_dim] (got {shape}); one prompt per capture")
        if self.mask is not None and tuple(self.mask.shape) != tuple(self.embeds.shape[:2]):
            raise ValueError(
                f"`mask` must have shape {tuple(self.embeds.shape[:2])} like the embeddings (got {tuple(self.mask.shape)})"
            )

    def to(self, device, dtype) -> "Conditioning":
        """Move to ``device``; floating tensors to ``dtype``, the mask keeps its dtype."""
        return Conditioning(
            self.embeds.to(device=device, dtype=dtype),
            None if self.mask is None else self.mask.to(device),
            None if self.pooled is None else self.pooled.to(device=device, dtype=dtype),
        )

    @property
    def valid_text(self) -> int:
        """Number of real text tokens."""
        return int(self.embeds.shape[1] if self.mask is None else self.mask.sum().item())


def input_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype a transformer expects its inputs in: that of its patch embedding.

    Not ``next(model.parameters())``: Wan keeps some modules in float32
    (``_keep_in_fp32_modules``) whatever the model dtype.
    """
    for name in ("patch_embedding", "x_embedder", "patch_embed"):
        module = getattr(model, name, None)
        for p in (module.parameters() if module is not None else ()):
            if p.is_floating_point():
                return p.dtype
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


def _int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer (got {value!r})")
    return value


class ModelAdapter:
    """Base class. Subclasses set ``name``, ``classes`` and the model-specific methods.

    Attributes:
        name: registry key ("wan", ...).
        classes: diffusers transformer class names this adapter drives.
        layer_pattern: regex over qualified module names selecting the self-attention modules.
        vae_spatial, vae_temporal: the VAE compression of the model family's usual pipeline
            (pixels per latent cell); a loaded pipeline's VAE config overrides them.
        channels_first: latent layout [B, C, F, H, W] (True) or [B, F, C, H, W] (CogVideoX).
    """

    name = ""
    classes: tuple[str, ...] = ()
    layer_pattern = ""
    vae_spatial = 8
    vae_temporal = 4
    channels_first = True
    text_first = False

    # -- layers ---------------------------------------------------------------------------
    def select_layers(self, model: torch.nn.Module) -> dict[str, int]:
        """Qualified module name -> integer layer index of every captured self-attention."""
        pattern = re.compile(self.layer_pattern)
        names = [n for n, m in model.named_modules() if hasattr(m, "processor") and pattern.fullmatch(n)]
        if not names:
            raise ValueError(
                f"adapter {self.name!r} found no self-attention module matching {self.layer_pattern!r} in "
                f"{type(model).__name__}; pick the adapter of this architecture ({', '.join(adapter_names())})"
            )
        return {n: i for i, n in enumerate(sorted(names, key=self._layer_sort_key))}

    def _layer_sort_key(self, name: str):
        return tuple(int(p) if p.isdigit() else p for p in name.split("."))

    # -- geometry -------------------------------------------------------------------------
    def patch(self, config) -> tuple[int, int, int]:
        """(pt, ph, pw) latent cells per token."""
        raise NotImplementedError

    def latent_shape(self, frames: int, height: int, width: int, vae_spatial: int, vae_temporal: int) -> tuple[int, int, int]:
        """Latent (F, H, W) of a video of ``frames`` x ``height`` x ``width`` pixels.

        Frames follow the causal-VAE rule of these models: (frames - 1) / temporal + 1.
        """
        _int(frames, "frames"), _int(height, "height"), _int(width, "width")
        if (frames - 1) % vae_temporal:
            raise ValueError(
                f"`frames` = {frames} must be 1 + a multiple of the VAE's temporal compression {vae_temporal} "
                f"(e.g. {((frames - 1) // vae_temporal) * vae_temporal + 1})"
            )
        for value, arg in ((height, "height"), (width, "width")):
            if value % vae_spatial:
                raise ValueError(
                    f"`{arg}` = {value} must be a multiple of the VAE's spatial compression {vae_spatial}"
                )
        return (frames - 1) // vae_temporal + 1, height // vae_spatial, width // vae_spatial

    def token_grid(self, config, latent: tuple[int, int, int], text_len: int = 0) -> LatentGrid:
        """The self-attention token grid of a latent (F, H, W) with ``text_len`` real text tokens."""
        pt, ph, pw = self.patch(config)
        f, h, w = latent
        for value, p, arg in ((f, pt, "latent frames"), (h, ph, "latent height"), (w, pw, "latent width")):
            if value % p:
                raise ValueError(
                    f"{arg} = {value} must be a multiple of the patch size {p} of this {self.name} model; "
                    "change --frames/--height/--width"
                )
        return LatentGrid(f // pt, h // ph, w // pw, text_len=text_len, text_first=self.text_first and text_len > 0)

    def latent_channels(self, config) -> int:
        return int(config.in_channels)

    def make_latents(self, latent: tuple[int, int, int], config, generator, device, dtype) -> torch.Tensor:
        """Gaussian latents in the model's layout, float32 (the loop keeps latents in float32)."""
        f, h, w = latent
        c = self.latent_channels(config)
        shape = (1, c, f, h, w) if self.channels_first else (1, f, c, h, w)
        return torch.randn(shape, generator=generator, dtype=torch.float32).to(device)

    # -- conditioning ---------------------------------------------------------------------
    def text_dim(self, config) -> int:
        raise NotImplementedError

    def random_conditioning(self, config, generator, text_len: int = 16) -> Conditioning:
        """Seeded Gaussian embeddings (for random-weight models, tests and benchmarks)."""
        return Conditioning(torch.randn(1, text_len, self.text_dim(config), generator=generator))

    def text_len(self, cond: Conditioning) -> int:
        """Text tokens this model puts into its self-attention sequence."""
        return 0

    # -- forward --------------------------------------------------------------------------
    def forward(self, model, latents: torch.Tensor, timestep: torch.Tensor, cond: Conditioning, *, guidance: float, grid: LatentGrid) -> torch.Tensor:
        """One transformer call; returns the prediction in the latents' layout."""
        raise NotImplementedError

    def valid_tokens(self, mask: torch.Tensor | None, n: int, batch: int) -> torch.Tensor | None:
        """Sequence positions that are real tokens of batch element ``batch`` (int64), or None for all.

        Only boolean key masks (shape [B, 1, 1, N] or [B, N]) are understood: padded keys are
        dropped from queries and keys. Any other mask raises, because its block statistics
        would not be those of plain softmax attention.
        """
        if mask is None:
            return None
        if mask.dtype != torch.bool or mask.shape[-1] != n or any(s != 1 for s in mask.shape[1:-1]):
            raise ValueError(
                f"captured an attention mask of shape {tuple(mask.shape)} and dtype {mask.dtype}; dfsviz handles "
                "only boolean key-padding masks [B, 1, 1, N]"
            )
        row = mask.reshape(mask.shape[0], n)[batch if mask.shape[0] > 1 else 0]
        if bool(row.all()):
            return None
        return row.nonzero().squeeze(1)


class WanAdapter(ModelAdapter):
    name = "wan"
    classes = ("WanTransformer3DModel", "SkyReelsV2Transformer3DModel")
    layer_pattern = r"blocks\.\d+\.attn1"

    def patch(self, config):
        return tuple(int(p) for p in config.patch_size)

    def text_dim(self, config):
        return int(config.text_dim)

    def forward(self, model, latents, timestep, cond, *, guidance, grid):
        dtype = input_dtype(model)
        return model(
            hidden_states=latents.to(dtype),
            timestep=timestep.expand(latents.shape[0]),
            encoder_hidden_states=cond.embeds,
            return_dict=False,
        )[0]


class HunyuanVideoAdapter(ModelAdapter):
    name = "hunyuanvideo"
    classes = ("HunyuanVideoTransformer3DModel",)
    # dual-stream then single-stream blocks; `context_embedder.token_refiner...attn` is text-only
    layer_pattern = r"(transformer_blocks|single_transformer_blocks)\.\d+\.attn"

    def _layer_sort_key(self, name):
        kind, index = name.split(".")[:2]
        return (0 if kind == "transformer_blocks" else 1, int(index))

    def patch(self, config):
        return int(config.patch_size_t), int(config.patch_size), int(config.patch_size)

    def text_dim(self, config):
        return int(config.text_embed_dim)

    def random_conditioning(self, config, generator, text_len=16):
        # real prompts are shorter than the padded length: keep 3/4 real to exercise the mask
        mask = torch.zeros(1, text_len, dtype=torch.int64)
        mask[:, : max(1, (3 * text_len) // 4)] = 1
        return Conditioning(
            torch.randn(1, text_len, self.text_dim(config), generator=generator),
            mask,
            torch.randn(1, int(config.pooled_projection_dim), generator=generator),
        )

    def text_len(self, cond):
        return cond.valid_text

    def forward(self, model, latents, timestep, cond, *, guidance, grid):
        if cond.pooled is None:
            raise ValueError("HunyuanVideo needs pooled text embeddings (`pooled_prompt_embeds`)")
        dtype = input_dtype(model)
        mask = cond.mask if cond.mask is not None else torch.ones(cond.embeds.shape[:2], dtype=torch.int64, device=latents.device)
        extra = {}
        if getattr(model.config, "guidance_embeds", False):
            # guidance-distilled checkpoints take the scale x 1000 as an embedding input
            extra["guidance"] = torch.full((latents.shape[0],), guidance * 1000.0, device=latents.device, dtype=dtype)
        return model(
            hidden_states=latents.to(dtype),
            timestep=timestep.expand(latents.shape[0]).to(dtype),
            encoder_hidden_states=cond.embeds,
            encoder_attention_mask=mask,
            pooled_projections=cond.pooled,
            return_dict=False,
            **extra,
        )[0]


def _crop_region(src: tuple[int, int], tgt_width: int, tgt_height: int):
    """Resize-crop region of the CogVideoX 1.0 RoPE grid (same arithmetic as its pipeline)."""
    h, w = src
    if h / w > tgt_height / tgt_width:
        rh, rw = tgt_height, int(round(tgt_height / h * w))
    else:
        rw, rh = tgt_width, int(round(tgt_width / w * h))
    top, left = int(round((tgt_height - rh) / 2.0)), int(round((tgt_width - rw) / 2.0))
    return (top, left), (top + rh, left + rw)


class CogVideoXAdapter(ModelAdapter):
    name = "cogvideox"
    classes = ("CogVideoXTransformer3DModel",)
    layer_pattern = r"transformer_blocks\.\d+\.attn1"
    channels_first = False
    text_first = True

    def patch(self, config):
        return int(config.patch_size_t or 1), int(config.patch_size), int(config.patch_size)

    def text_dim(self, config):
        return int(config.text_embed_dim)

    def random_conditioning(self, config, generator, text_len=16):
        return Conditioning(torch.randn(1, int(config.max_text_seq_length), self.text_dim(config), generator=generator))

    def text_len(self, cond):
        return int(cond.embeds.shape[1])  # CogVideoX attends to every (padded) text token

    def _rotary(self, model, grid: LatentGrid, device):
        from diffusers.models.embeddings import get_3d_rotary_pos_embed

        cfg = model.config
        p = int(cfg.patch_size)
        base_w, base_h = cfg.sample_width // p, cfg.sample_height // p
        if cfg.patch_size_t is None:
            return get_3d_rotary_pos_embed(
                embed_dim=cfg.attention_head_dim,
                crops_coords=_crop_region((grid.height, grid.width), base_w, base_h),
                grid_size=(grid.height, grid.width),
                temporal_size=grid.frames,
                device=device,
            )
        return get_3d_rotary_pos_embed(
            embed_dim=cfg.attention_head_dim,
            crops_coords=None,
            grid_size=(grid.height, grid.width),
            temporal_size=grid.frames,
            grid_type="slice",
            max_size=(base_h, base_w),
            device=device,
        )

    def forward(self, model, latents, timestep, cond, *, guidance, grid):
        dtype = input_dtype(model)
        rotary = self._rotary(model, grid, latents.device) if model.config.use_rotary_positional_embeddings else None
        ofs = None if model.config.ofs_embed_dim is None else latents.new_full((latents.shape[0],), 2.0)
        return model(
            hidden_states=latents.to(dtype),
            encoder_hidden_states=cond.embeds,
            timestep=timestep.expand(latents.shape[0]),
            ofs=ofs,
            image_rotary_emb=rotary,
            return_dict=False,
        )[0]


class GenericAdapter(ModelAdapter):
    """Any transformer whose attention reaches SDPA; the caller gives the grid.

    It selects every attention module (``processor`` attribute) except those flagged
    ``is_cross_attention`` and cannot drive a denoising loop (the forward signature is
    unknown): use :class:`dfsviz.capture.AttentionCapture` inside your own pipeline.
    """

    name = "generic"
    classes = ()
    layer_pattern = r".*"

    def select_layers(self, model):
        names = [
            n
            for n, m in model.named_modules()
            if hasattr(m, "processor") and not getattr(m, "is_cross_attention", False) and "refiner" not in n
        ]
        if not names:
            raise ValueError(f"no attention module with a `processor` found in {type(model).__name__}")
        return {n: i for i, n in enumerate(names)}

    def patch(self, config):
        p = getattr(config, "patch_size", 1)
        if isinstance(p, (tuple, list)):
            return tuple(int(x) for x in p)
        return int(getattr(config, "patch_size_t", 1) or 1), int(p), int(p)

    def forward(self, model, latents, timestep, cond, *, guidance, grid):
        raise ValueError(
            f"the generic adapter cannot run a denoising loop for {type(model).__name__}; supported "
            f"architectures: {supported_architectures()}; or wrap your own pipeline call in AttentionCapture"
        )


ADAPTERS: dict[str, ModelAdapter] = {
    a.name: a for a in (WanAdapter(), HunyuanVideoAdapter(), CogVideoXAdapter(), GenericAdapter())
}


def adapter_names() -> list[str]:
    """Registry keys of the adapters."""
    return list(ADAPTERS)


def supported_architectures() -> str:
    """Comma-separated transformer classes a capture run can drive."""
    return ", ".join(c for a in ADAPTERS.values() for c in a.classes)


def get_adapter(name: str) -> ModelAdapter:
    """The adapter registered as ``name``."""
    if name not in ADAPTERS:
        raise ValueError(f"unknown adapter {name!r}; choose one of {adapter_names()}")
    return ADAPTERS[name]


def adapter_for(model: torch.nn.Module) -> ModelAdapter:
    """The adapter of ``model``'s class (subclasses match their diffusers base)."""
    for cls in type(model).__mro__:
        for adapter in ADAPTERS.values():
            if cls.__name__ in adapter.classes:
                return adapter
    raise ValueError(
        f"unsupported architecture {type(model).__name__}; supported: {supported_architectures()}"
    )

"""Model adapters: the capture loop's view of a video transformer, built on the architecture
registry (:mod:`dfsviz.architectures`).

An adapter maps pipeline settings to the token grid of the self-attention sequence,
picks the self-attention modules and numbers them, drives one forward pass of the
transformer with precomputed conditioning, and says which tokens of a captured
SDPA call are real (HunyuanVideo pads its text and masks the padding). One
:class:`ModelAdapter` per registry entry (``ADAPTERS``), plus :class:`GenericAdapter` for a class
the registry does not describe, given its token grid (``--grid``, ``--text-len``, ``--text-first``).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from dfsviz.architectures import (
    ARCHITECTURES,
    Architecture,
    architecture_for,
    get_architecture,
    input_dtype,
    supported_classes,
)
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


class ModelAdapter:
    """The capture loop's methods over one registry entry (:class:`~dfsviz.architectures.Architecture`).

    Attributes:
        arch: the entry.
        name: registry key ("wan", ...).
        vae_spatial, vae_temporal: the VAE compression of the family's usual pipeline
            (pixels per latent cell); a loaded pipeline's VAE config overrides them.
    """

    def __init__(self, arch: Architecture) -> None:
        self.arch = arch
        self.name = arch.name
        self.vae_spatial = arch.vae_spatial
        self.vae_temporal = arch.vae_temporal

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    # -- layers ---------------------------------------------------------------------------
    def select_layers(self, model: torch.nn.Module) -> dict[str, int]:
        """Qualified module name -> integer layer index of every captured self-attention."""
        return self.arch.select_layers(model)

    # -- geometry -------------------------------------------------------------------------
    def patch(self, config) -> tuple[int, int, int]:
        """(pt, ph, pw) latent cells per token."""
        return self.arch.patch(config)

    def latent_shape(self, frames: int, height: int, width: int, vae_spatial: int, vae_temporal: int) -> tuple[int, int, int]:
        """Latent (F, H, W) of a video of ``frames`` x ``height`` x ``width`` pixels."""
        return self.arch.latent_shape(frames, height, width, vae_spatial, vae_temporal)

    def token_grid(self, config, latent: tuple[int, int, int], text_len: int = 0) -> LatentGrid:
        """The self-attention token grid of a latent (F, H, W) with ``text_len`` real text tokens."""
        return self.arch.token_grid(config, latent, text_len)

    def make_latents(self, latent: tuple[int, int, int], config, generator, device, dtype) -> torch.Tensor:
        """Gaussian latents in the model's layout, float32 (the loop keeps latents in float32)."""
        return self.arch.make_latents(latent, config, generator, device)

    # -- conditioning ---------------------------------------------------------------------
    def text_dim(self, config) -> int:
        return self.arch.text_dim(config)

    def random_conditioning(self, config, generator, text_len: int = 16) -> Conditioning:
        """Seeded Gaussian embeddings (for random-weight models, tests and benchmarks).

        Families that mask padded text get 3/4 real tokens, so that the mask is exercised."""
        arch = self.arch
        if arch.fixed_text_len is not None:
            text_len = arch.fixed_text_len(config)
        embeds = torch.randn(1, text_len, self.text_dim(config), generator=generator)
        mask = None
        if arch.text_tokens == "real":
            mask = torch.zeros(1, text_len, dtype=torch.int64)
            mask[:, : max(1, (3 * text_len) // 4)] = 1
        pooled = None if arch.pooled_dim is None else torch.randn(1, arch.pooled_dim(config), generator=generator)
        return Conditioning(embeds, mask, pooled)

    def text_len(self, cond: Conditioning) -> int:
        """Text tokens this model puts into its self-attention sequence."""
        if self.arch.text == "none":
            return 0
        return cond.valid_text if self.arch.text_tokens == "real" else int(cond.embeds.shape[1])

    # -- forward --------------------------------------------------------------------------
    def forward(self, model, latents: torch.Tensor, timestep: torch.Tensor, cond: Conditioning, *, guidance: float, grid: LatentGrid) -> torch.Tensor:
        """One transformer call; returns the prediction in the latents' layout."""
        return self.arch.forward(model, latents, timestep, cond, guidance=guidance, grid=grid)

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


# Named adapters of three entries, for code that subclasses one (``ADAPTERS`` holds plain
# ModelAdapters of every entry).
class WanAdapter(ModelAdapter):
    """Wan 2.1 / 2.2, SkyReels-V2, ChronoEdit (registry entry "wan")."""

    def __init__(self) -> None:
        super().__init__(get_architecture("wan"))


class HunyuanVideoAdapter(ModelAdapter):
    """HunyuanVideo (registry entry "hunyuanvideo")."""

    def __init__(self) -> None:
        super().__init__(get_architecture("hunyuanvideo"))


class CogVideoXAdapter(ModelAdapter):
    """CogVideoX 1.0 / 1.5, ConsisID (registry entry "cogvideox")."""

    def __init__(self) -> None:
        super().__init__(get_architecture("cogvideox"))


_TEXT_DIM_FIELDS = ("text_dim", "text_embed_dim", "caption_channels", "cross_attention_dim", "joint_attention_dim")


class GenericAdapter(ModelAdapter):
    """Any transformer whose attention reaches SDPA, given its token grid.

    It selects every attention module (``processor`` attribute) except those flagged
    ``is_cross_attention`` (and text refiners), and drives a loop through the common diffusers
    call ``model(hidden_states=[B, C, F, H, W], timestep=, encoder_hidden_states=)`` when the
    class takes those arguments; otherwise it refuses in one line (wrap your own pipeline call
    in :class:`dfsviz.capture.AttentionCapture`).

    Args:
        grid: the token grid "FxHxW" after patching (``--grid``), or None when only the layer
            selection is used (``AttentionCapture`` in your own pipeline).
        text_len: text tokens in the self-attention sequence (``--text-len``; 0 = none).
        text_first: the text precedes the video (``--text-first``).
        patch: (pt, ph, pw) latent cells per token of the model (:meth:`patch_of` its config).
    """

    def __init__(self, grid: str | None = None, text_len: int = 0, text_first: bool = False,
                 patch: tuple[int, int, int] = (1, 1, 1)) -> None:
        self.name = "generic"
        self.grid = None if grid is None else LatentGrid.parse(grid, text_len, text_first and text_len > 0)
        self.patch_size = patch
        self.arch = None

    def __repr__(self) -> str:
        return f"GenericAdapter({None if self.grid is None else self.grid.name!r})"

    def _grid(self, model_name: str = "this model") -> LatentGrid:
        if self.grid is None:
            raise ValueError(
                f"the generic entry needs the token grid of {model_name}: pass --grid FxHxW (tokens after patching), "
                "with --text-len N [--text-first] when text shares the self-attention sequence"
            )
        return self.grid

    def select_layers(self, model):
        names = [
            n for n, m in model.named_modules()
            if hasattr(m, "processor") and not getattr(m, "is_cross_attention", False) and "refiner" not in n
        ]
        if not names:
            raise ValueError(f"no attention module with a `processor` found in {type(model).__name__}")
        return {n: i for i, n in enumerate(names)}

    @staticmethod
    def patch_of(config) -> tuple[int, int, int]:
        """(pt, ph, pw) from the usual diffusers config fields ``patch_size`` (int or triple) and ``patch_size_t``."""
        p = getattr(config, "patch_size", 1) or 1
        if isinstance(p, (tuple, list)):
            return tuple(int(x) for x in p)
        return int(getattr(config, "patch_size_t", 1) or 1), int(p), int(p)

    def patch(self, config):
        return self.patch_of(config)

    def latent_shape(self, frames, height, width, vae_spatial, vae_temporal):
        """The latent of the given grid: grid x patch (pixel sizes do not apply, the grid is given)."""
        grid = self._grid()
        return grid.frames * self.patch_size[0], grid.height * self.patch_size[1], grid.width * self.patch_size[2]

    def token_grid(self, config, latent, text_len=0):
        return self._grid()

    def make_latents(self, latent, config, generator, device, dtype):
        f, h, w = latent
        return torch.randn((1, int(config.in_channels), f, h, w), generator=generator, dtype=torch.float32).to(device)

    def text_dim(self, config):
        for name in _TEXT_DIM_FIELDS:
            value = getattr(config, name, None)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        raise ValueError(
            f"the generic entry found no text width in the model config (none of {list(_TEXT_DIM_FIELDS)}); "
            "pass --embeddings FILE.safetensors"
        )

    def random_conditioning(self, config, generator, text_len=16):
        return Conditioning(torch.randn(1, text_len, self.text_dim(config), generator=generator))

    def text_len(self, cond):
        return self.grid.text_len if self.grid is not None else 0

    def forward(self, model, latents, timestep, cond, *, guidance, grid):
        params = inspect.signature(model.forward).parameters
        needed = ("hidden_states", "timestep", "encoder_hidden_states")
        missing = [p for p in needed if p not in params]
        required = [n for n, p in params.items() if p.default is inspect.Parameter.empty and n not in needed
                    and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        if missing or required:
            raise ValueError(
                f"the generic entry cannot run a denoising loop for {type(model).__name__}: its forward "
                f"{'lacks ' + str(missing) if missing else 'also requires ' + str(required)}; supported "
                f"architectures: {supported_architectures()}; or wrap your own pipeline call in AttentionCapture"
            )
        out = model(hidden_states=latents.to(input_dtype(model)), timestep=timestep.expand(latents.shape[0]),
                    encoder_hidden_states=cond.embeds, return_dict=False)
        return out[0]


ADAPTERS: dict[str, ModelAdapter] = {**{arch.name: ModelAdapter(arch) for arch in ARCHITECTURES},
                                     "generic": GenericAdapter()}


def adapter_names() -> list[str]:
    """Registry keys of the adapters."""
    return list(ADAPTERS)


def supported_architectures() -> str:
    """Comma-separated transformer classes a capture run can drive."""
    return ", ".join(supported_classes())


def get_adapter(name: str) -> ModelAdapter:
    """The adapter registered as ``name``."""
    if name not in ADAPTERS:
        raise ValueError(f"unknown adapter {name!r}; choose one of {adapter_names()}")
    return ADAPTERS[name]


def adapter_for(model_or_class) -> ModelAdapter:
    """The adapter of a transformer (or class name); subclasses match their diffusers base.

    Raises ValueError for a class the registry does not drive (naming why, for a video
    transformer dfsviz refuses)."""
    return ADAPTERS[architecture_for(model_or_class).name]

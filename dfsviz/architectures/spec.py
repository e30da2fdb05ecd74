"""What dfsviz knows about one family of diffusers video transformers: :class:`Architecture`,
and :class:`Unsupported` for a video transformer class dfsviz refuses, with the reason.

Everything that differs between DiT families lives in one entry: the self-attention layers
(and what is skipped), how the latent grid follows from the pipeline inputs (VAE compression,
patch sizes, latent layout), where text tokens sit in the self-attention sequence and how they
are masked, how one transformer call is made, and what DFSAttn needs (stock processors, the
block lists, the module after them, the RoPE and per-token modulation inputs permute-once
must reorder). Capture, ``apply_dfsattn``, the CLI and ``docs/models.md`` read these entries.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from dfsviz.sparse.grid import LatentGrid

__all__ = ["Architecture", "Unsupported", "TEXT_PLACES", "LATENT_LAYOUTS", "PARALLEL_REFUSALS"]

TEXT_PLACES = ("none", "before", "after")
#: BCFHW: [B, C, F, H, W]; BFCHW: [B, F, C, H, W] (CogVideoX); BNC: packed tokens [B, N, C] (LTX-Video)
LATENT_LAYOUTS = ("BCFHW", "BFCHW", "BNC")
#: Why ``apply_dfsattn`` refuses each kind of diffusers parallelism other than plain Ulysses context
#: parallelism (``ContextParallelConfig(ulysses_degree=P)``); docs/models.md and the refusals read it.
PARALLEL_REFUSALS = {
    "ring": "ring attention splits the keys of every head over the ranks and merges partial softmaxes; DFSAttn's "
            "token order, block scores and sparse kernel need all keys of a head on one rank, which Ulysses gives",
    "ulysses_anything": "ulysses_anything pads the heads and splits the sequence unevenly, so a rank's heads and "
                        "token order are not the model's; use ulysses_anything=False with a head count and token "
                        "count divisible by the Ulysses degree",
    "tensor": "tensor parallelism shards the projection weights, not the attention: DFSAttn runs only under "
              "context parallelism",
    "no_plan": "diffusers has no context-parallel plan (`_cp_plan`) for this class, and DFSAttn relies on the plans "
               "diffusers ships (the sequence split before the first block, gathered after the last)",
}


def _positive(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer (got {value!r})")


@dataclass(frozen=True)
class Architecture:
    """One family of diffusers video transformers, described once.

    Fields:
        name: registry key ("wan", ...), also the capture adapter's name.
        title: family name for people ("Wan 2.1 / 2.2", ...).
        classes: diffusers transformer class names of the family (subclasses match too).
        layer_pattern: regex over qualified module names selecting the self-attention modules.
        skipped: what the pattern leaves out, for the docs (e.g. "attn2: cross-attention").
        dual_stream: the layers are dual-stream ``transformer_blocks`` then single-stream
            ``single_transformer_blocks`` (numbered in that order).
        latent_layout: one of :data:`LATENT_LAYOUTS`.
        patch: ``config -> (pt, ph, pw)`` latent cells per token.
        text: where text tokens sit in the self-attention sequence: "none", "before", "after".
        text_mask: how padded text is handled, for the docs.
        text_dim: ``config -> int`` width of the text embeddings the transformer takes.
        text_tokens: "all" (every text token enters the self-attention) or "real" (padding is
            masked or dropped, so the real ones count).
        fixed_text_len: ``config -> int`` text length the family always uses (CogVideoX's
            ``max_text_seq_length``), or None.
        pooled_dim: ``config -> int`` width of a pooled text embedding the forward needs, or None.
        vae_spatial, vae_temporal: pixels per latent cell of the family's usual VAE (a pipeline
            folder's VAE config overrides them).
        default_size: (frames, height, width) pixels of the family's usual video.
        flow_shift: shift of the flow-matching scheduler used for a transformer-only folder, or
            None for CogVideoX's DDIM schedule (a pipeline folder's own scheduler wins).
        forward: ``(model, latents, timestep, cond, guidance, grid) -> prediction`` one
            transformer call in the latents' layout; ``cond`` has ``embeds``, ``mask``, ``pooled``.
        stock: class names of the stock attention processors of the selected layers.
        tuned: ``processor class name -> DFSAttn processor key`` for processors DFSAttn computes
            q/k/v of itself ("wan", "hunyuanvideo", "cogvideox"); any other stock processor gets
            the SDPA-level DFSAttn processor (same q/k/v as stock, attention replaced at SDPA).
        cond_index: batch half of the conditional branch in the family's pipelines.
        pipeline_transformers: attributes of the family's diffusers pipelines that hold a
            transformer of it, in the order a denoising run uses them (Wan 2.2 A14B: the
            high-noise ``transformer``, then ``transformer_2`` below the pipeline's boundary
            timestep, ``boundary_ratio``); ``apply_dfsattn(pipe)`` accelerates each one present.
        blocks: attribute names of the block lists, in the order the model runs them.
        restore: the module right after the block stack (its first input: the video tokens).
        rotary: (block argument names of the RoPE tables, their sequence dim).
        rotary_part: None when every element of a RoPE argument is a per-token table; else the
            index of its element that holds the per-token tensors (Allegro: (per-axis tables,
            per-token positions) -> 1; the per-axis tables stay as they are).
        token_args: other block arguments that may carry a per-token dim: name -> (dim, ndim);
            a tensor of that ndim whose ``dim`` has one entry per video token is reordered
            (per-token modulation or timesteps; a per-sample one is left alone).
        permute_once: None when permute-once is supported, else why it is refused.
        permute_refuse: config values under which the blocks are not token-wise between
            attention calls: config attribute -> value (permute-once refuses them).
        capture: None when ``dfsviz capture`` drives the family, else why not.
        dfsattn: None when ``apply_dfsattn`` supports the family, else why not.
    """

    name: str
    title: str
    classes: tuple[str, ...]
    layer_pattern: str
    skipped: str
    latent_layout: str
    patch: Callable
    text: str
    text_mask: str
    text_dim: Callable
    forward: Callable
    vae_spatial: int = 8
    vae_temporal: int = 4
    default_size: tuple[int, int, int] = (81, 480, 832)
    flow_shift: float | None = 1.0
    dual_stream: bool = False
    text_tokens: str = "all"
    fixed_text_len: Callable | None = None
    pooled_dim: Callable | None = None
    stock: tuple[str, ...] = ()
    tuned: dict = field(default_factory=dict)
    cond_index: int = 0
    pipeline_transformers: tuple[str, ...] = ("transformer",)
    blocks: tuple[str, ...] = ("transformer_blocks",)
    restore: str = "norm_out"
    rotary: tuple[tuple[str, ...], int] = ((), 1)
    rotary_part: int | None = None
    token_args: dict = field(default_factory=dict)
    permute_once: str | None = None
    permute_refuse: dict = field(default_factory=dict)
    capture: str | None = None
    dfsattn: str | None = None

    def __post_init__(self) -> None:
        if self.text not in TEXT_PLACES:
            raise ValueError(f"`text` must be one of {TEXT_PLACES} (got {self.text!r})")
        if self.latent_layout not in LATENT_LAYOUTS:
            raise ValueError(f"`latent_layout` must be one of {LATENT_LAYOUTS} (got {self.latent_layout!r})")
        if self.text_tokens not in ("all", "real"):
            raise ValueError(f"`text_tokens` must be 'all' or 'real' (got {self.text_tokens!r})")

    # -- layers ---------------------------------------------------------------------------
    def select_layers(self, model: torch.nn.Module) -> dict[str, int]:
        """Qualified module name -> integer layer index of every self-attention layer."""
        pattern = re.compile(self.layer_pattern)
        names = [n for n, m in model.named_modules() if hasattr(m, "processor") and pattern.fullmatch(n)]
        if not names:
            raise ValueError(
                f"architecture {self.name!r} found no self-attention module matching {self.layer_pattern!r} in "
                f"{type(model).__name__}; is it a {self.title} transformer?"
            )
        return {n: i for i, n in enumerate(sorted(names, key=self._layer_sort_key))}

    def _layer_sort_key(self, name: str):
        if self.dual_stream:
            kind, index = name.split(".")[:2]
            return (0 if kind == "transformer_blocks" else 1, int(index))
        return tuple(int(p) if p.isdigit() else p for p in name.split("."))

    # -- geometry -------------------------------------------------------------------------
    def latent_shape(self, frames: int, height: int, width: int, vae_spatial: int, vae_temporal: int) -> tuple[int, int, int]:
        """Latent (F, H, W) of a video of ``frames`` x ``height`` x ``width`` pixels.

        Frames follow the causal-VAE rule of these models: (frames - 1) / temporal + 1.
        """
        _positive(frames, "frames"), _positive(height, "height"), _positive(width, "width")
        if (frames - 1) % vae_temporal:
            raise ValueError(
                f"`frames` = {frames} must be 1 + a multiple of the VAE's temporal compression {vae_temporal} "
                f"(e.g. {((frames - 1) // vae_temporal) * vae_temporal + 1})"
            )
        for value, arg in ((height, "height"), (width, "width")):
            if value % vae_spatial:
                raise ValueError(f"`{arg}` = {value} must be a multiple of the VAE's spatial compression {vae_spatial}")
        return (frames - 1) // vae_temporal + 1, height // vae_spatial, width // vae_spatial

    def token_grid(self, config, latent: tuple[int, int, int], text_len: int = 0) -> LatentGrid:
        """The self-attention token grid of a latent (F, H, W) with ``text_len`` text tokens."""
        pt, ph, pw = self.patch(config)
        f, h, w = latent
        for value, p, arg in ((f, pt, "latent frames"), (h, ph, "latent height"), (w, pw, "latent width")):
            if value % p:
                raise ValueError(
                    f"{arg} = {value} must be a multiple of the patch size {p} of this {self.name} model; "
                    "change --frames/--height/--width"
                )
        return LatentGrid(f // pt, h // ph, w // pw, text_len=text_len, text_first=self.text == "before" and text_len > 0)

    def latent_of_call(self, hidden: torch.Tensor, arguments: dict) -> tuple[int, int, int]:
        """Latent (F, H, W) of one transformer call from its ``hidden_states`` and other arguments."""
        if self.latent_layout == "BNC":
            dims = tuple(arguments.get(k) for k in ("num_frames", "height", "width"))
            if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3 or not all(isinstance(d, int) for d in dims):
                raise ValueError(
                    f"{self.title}: the transformer call needs packed `hidden_states` [B, N, C] and integer "
                    "`num_frames`, `height`, `width` (the latent size); the token grid comes from them"
                )
            return dims
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 5:
            raise ValueError(
                f"{self.title}: the transformer was called without a 5-D `hidden_states` latent "
                f"(got {type(hidden).__name__}); the token grid comes from its shape"
            )
        shape = tuple(hidden.shape)
        return shape[2:5] if self.latent_layout == "BCFHW" else (shape[1], shape[3], shape[4])

    def make_latents(self, latent: tuple[int, int, int], config, generator, device) -> torch.Tensor:
        """Gaussian latents in the family's layout, float32 (the capture loop keeps latents in float32)."""
        f, h, w = latent
        c = int(config.in_channels)
        if self.latent_layout == "BNC":
            grid = self.token_grid(config, latent)
            shape = (1, grid.num_video, c)
        else:
            shape = (1, c, f, h, w) if self.latent_layout == "BCFHW" else (1, f, c, h, w)
        return torch.randn(shape, generator=generator, dtype=torch.float32).to(device)


@dataclass(frozen=True)
class Unsupported:
    """A diffusers video transformer class dfsviz refuses, and why (one line)."""

    cls: str
    title: str
    reason: str

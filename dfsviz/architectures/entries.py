"""The entries of the architecture registry: one :class:`Architecture` per supported family,
one :class:`Unsupported` per video transformer class of diffusers 0.42 that dfsviz refuses.

Token layouts were measured on tiny random-weight models of diffusers 0.42 (the tests build
them): the SDPA calls of every attention module, their sequence lengths and masks.
"""

from __future__ import annotations

import dataclasses

import torch

from dfsviz.architectures.spec import Architecture, Unsupported

__all__ = ["ARCHITECTURES", "UNSUPPORTED", "input_dtype"]


def input_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype a transformer expects its inputs in: that of its patch embedding.

    Not ``next(model.parameters())``: Wan keeps some modules in float32
    (``_keep_in_fp32_modules``) whatever the model dtype.
    """
    for name in ("patch_embedding", "x_embedder", "patch_embed", "proj_in", "proj"):
        module = getattr(model, name, None)
        for p in (module.parameters() if isinstance(module, torch.nn.Module) else ()):
            if p.is_floating_point():
                return p.dtype
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


def _mask_or_ones(cond, latents: torch.Tensor) -> torch.Tensor:
    if cond.mask is not None:
        return cond.mask
    return torch.ones(cond.embeds.shape[:2], dtype=torch.int64, device=latents.device)


def _patch_3d(config) -> tuple[int, int, int]:
    return tuple(int(p) for p in config.patch_size)


def _patch_t_and_square(config) -> tuple[int, int, int]:
    return int(getattr(config, "patch_size_t", None) or 1), int(config.patch_size), int(config.patch_size)


# -- forwards (one transformer call, prediction in the latents' layout) ------------------------
def _wan_forward(model, latents, timestep, cond, *, guidance, grid):
    return model(hidden_states=latents.to(input_dtype(model)), timestep=timestep.expand(latents.shape[0]),
                 encoder_hidden_states=cond.embeds, return_dict=False)[0]


def _hunyuan_forward(model, latents, timestep, cond, *, guidance, grid):
    if cond.pooled is None:
        raise ValueError("HunyuanVideo needs pooled text embeddings (`pooled_prompt_embeds`)")
    dtype = input_dtype(model)
    extra = {}
    if getattr(model.config, "guidance_embeds", False):
        # guidance-distilled checkpoints take the scale x 1000 as an embedding input
        extra["guidance"] = torch.full((latents.shape[0],), guidance * 1000.0, device=latents.device, dtype=dtype)
    return model(hidden_states=latents.to(dtype), timestep=timestep.expand(latents.shape[0]).to(dtype),
                 encoder_hidden_states=cond.embeds, encoder_attention_mask=_mask_or_ones(cond, latents),
                 pooled_projections=cond.pooled, return_dict=False, **extra)[0]


def _crop_region(src: tuple[int, int], tgt_width: int, tgt_height: int):
    """Resize-crop region of the CogVideoX 1.0 RoPE grid (same arithmetic as its pipeline)."""
    h, w = src
    if h / w > tgt_height / tgt_width:
        rh, rw = tgt_height, int(round(tgt_height / h * w))
    else:
        rw, rh = tgt_width, int(round(tgt_width / w * h))
    top, left = int(round((tgt_height - rh) / 2.0)), int(round((tgt_width - rw) / 2.0))
    return (top, left), (top + rh, left + rw)


def _cogvideox_rotary(model, grid, device):
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    cfg = model.config
    p = int(cfg.patch_size)
    base_w, base_h = cfg.sample_width // p, cfg.sample_height // p
    if getattr(cfg, "patch_size_t", None) is None:
        return get_3d_rotary_pos_embed(embed_dim=cfg.attention_head_dim,
                                       crops_coords=_crop_region((grid.height, grid.width), base_w, base_h),
                                       grid_size=(grid.height, grid.width), temporal_size=grid.frames, device=device)
    return get_3d_rotary_pos_embed(embed_dim=cfg.attention_head_dim, crops_coords=None,
                                   grid_size=(grid.height, grid.width), temporal_size=grid.frames, grid_type="slice",
                                   max_size=(base_h, base_w), device=device)


def _cogvideox_forward(model, latents, timestep, cond, *, guidance, grid):
    cfg = model.config
    rotary = _cogvideox_rotary(model, grid, latents.device) if cfg.use_rotary_positional_embeddings else None
    extra = {}
    if getattr(cfg, "ofs_embed_dim", None) is not None:  # CogVideoX 1.5 I2V
        extra["ofs"] = latents.new_full((latents.shape[0],), 2.0)
    return model(hidden_states=latents.to(input_dtype(model)), encoder_hidden_states=cond.embeds,
                 timestep=timestep.expand(latents.shape[0]), image_rotary_emb=rotary, return_dict=False, **extra)[0]


def _ltx_forward(model, latents, timestep, cond, *, guidance, grid):
    pt, ph, pw = _patch_t_and_square(model.config)
    return model(hidden_states=latents.to(input_dtype(model)), encoder_hidden_states=cond.embeds,
                 timestep=timestep.expand(latents.shape[0]), encoder_attention_mask=_mask_or_ones(cond, latents),
                 num_frames=grid.frames * pt, height=grid.height * ph, width=grid.width * pw, return_dict=False)[0]


def _mochi_forward(model, latents, timestep, cond, *, guidance, grid):
    return model(hidden_states=latents.to(input_dtype(model)), encoder_hidden_states=cond.embeds,
                 timestep=timestep.expand(latents.shape[0]), encoder_attention_mask=_mask_or_ones(cond, latents),
                 return_dict=False)[0]


def _easyanimate_forward(model, latents, timestep, cond, *, guidance, grid):
    return model(hidden_states=latents.to(input_dtype(model)), encoder_hidden_states=cond.embeds,
                 timestep=timestep.expand(latents.shape[0]), return_dict=False)[0]


def _allegro_rotary(model, grid, frames: int, device):
    """Allegro's RoPE as its pipeline builds it: (per-axis (cos, sin) tables, per-token t/h/w
    positions [1, N] each)."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed_allegro

    cfg = model.config
    freqs_t, freqs_h, freqs_w, grid_t, grid_h, grid_w = get_3d_rotary_pos_embed_allegro(
        embed_dim=cfg.attention_head_dim, crops_coords=((0, 0), (grid.height, grid.width)),
        grid_size=(grid.height, grid.width), temporal_size=frames,
        interpolation_scale=(cfg.interpolation_scale_t, cfg.interpolation_scale_h, cfg.interpolation_scale_w),
        device=device)
    pos = torch.cartesian_prod(grid_t.long(), grid_h.long(), grid_w.long())
    return (freqs_t, freqs_h, freqs_w), tuple(pos.transpose(0, 1).reshape(3, 1, -1).contiguous())


def _allegro_forward(model, latents, timestep, cond, *, guidance, grid):
    rotary = _allegro_rotary(model, grid, latents.shape[2], latents.device)
    return model(hidden_states=latents.to(input_dtype(model)), encoder_hidden_states=cond.embeds,
                 timestep=timestep.expand(latents.shape[0]), image_rotary_emb=rotary, return_dict=False)[0]


def _cosmos_forward(model, latents, timestep, cond, *, guidance, grid):
    extra = {}
    if model.config.concat_padding_mask:
        try:
            import torchvision  # noqa: F401  (diffusers resizes Cosmos' padding mask with it)
        except ImportError:
            raise ValueError(
                "this Cosmos transformer has concat_padding_mask=True, whose forward needs torchvision; "
                "pip install torchvision"
            ) from None
        extra["padding_mask"] = latents.new_zeros(1, 1, latents.shape[-2], latents.shape[-1])
    return model(hidden_states=latents.to(input_dtype(model)), timestep=timestep.expand(latents.shape[0]),
                 encoder_hidden_states=cond.embeds, return_dict=False, **extra)[0]


_COGVIDEOX = Architecture(
    name="cogvideox", title="CogVideoX 1.0 / 1.5", classes=("CogVideoXTransformer3DModel",),
    layer_pattern=r"transformer_blocks\.\d+\.attn1", skipped="none",
    latent_layout="BFCHW", patch=_patch_t_and_square, text="before", text_mask="none (every padded token attends)",
    text_dim=lambda c: int(c.text_embed_dim), fixed_text_len=lambda c: int(c.max_text_seq_length),
    forward=_cogvideox_forward, default_size=(49, 480, 720), flow_shift=None,
    stock=("CogVideoXAttnProcessor2_0",), tuned={"CogVideoXAttnProcessor2_0": "cogvideox"}, cond_index=1,
    blocks=("transformer_blocks",), restore="norm_final", rotary=(("image_rotary_emb",), 0),
)

ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture(
        name="wan", title="Wan 2.1 / 2.2, SkyReels-V2, ChronoEdit",
        classes=("WanTransformer3DModel", "SkyReelsV2Transformer3DModel", "ChronoEditTransformer3DModel"),
        layer_pattern=r"blocks\.\d+\.attn1", skipped="attn2 (cross-attention to the text and image)",
        latent_layout="BCFHW", patch=_patch_3d, text="none", text_mask="text only in cross-attention",
        text_dim=lambda c: int(c.text_dim), forward=_wan_forward, default_size=(81, 480, 832), flow_shift=5.0,
        stock=("WanAttnProcessor", "SkyReelsV2AttnProcessor"), tuned={"WanAttnProcessor": "wan"},
        pipeline_transformers=("transformer", "transformer_2"),  # Wan 2.2 A14B: high-, then low-noise expert
        blocks=("blocks",), restore="norm_out", rotary=(("rotary_emb",), 1),
        token_args={"temb": (1, 4)},  # Wan 2.2 TI2V: per-token modulation [B, N, 6, C]
    ),
    Architecture(
        name="hunyuanvideo", title="HunyuanVideo", classes=("HunyuanVideoTransformer3DModel",),
        # dual-stream then single-stream blocks; `context_embedder.token_refiner...attn` is text-only
        layer_pattern=r"(transformer_blocks|single_transformer_blocks)\.\d+\.attn",
        skipped="the token refiner's text-only attention", dual_stream=True,
        latent_layout="BCFHW", patch=_patch_t_and_square, text="after",
        text_mask="padded text masked by a boolean key mask [B, 1, 1, N]", text_tokens="real",
        text_dim=lambda c: int(c.text_embed_dim), pooled_dim=lambda c: int(c.pooled_projection_dim),
        forward=_hunyuan_forward, default_size=(129, 720, 1280), flow_shift=7.0,
        stock=("HunyuanVideoAttnProcessor2_0",), tuned={"HunyuanVideoAttnProcessor2_0": "hunyuanvideo"},
        blocks=("transformer_blocks", "single_transformer_blocks"), restore="norm_out",
        rotary=(("freqs_cis", "image_rotary_emb"), 0),
        # I2V token replace modulates the first frame's tokens apart: not token-wise
        permute_refuse={"image_condition_type": "token_replace"},
    ),
    _COGVIDEOX,
    dataclasses.replace(
        _COGVIDEOX, name="consisid", title="ConsisID", classes=("ConsisIDTransformer3DModel",),
        skipped="the face perceiver cross-attention",
        # the text rejoins the video before norm_final: norm_out is the first video-only module
        restore="norm_out",
        # face training adds perceiver cross-attention of face latents between blocks
        permute_refuse={"is_train_face": True},
    ),
    Architecture(
        name="ltx", title="LTX-Video", classes=("LTXVideoTransformer3DModel",),
        layer_pattern=r"transformer_blocks\.\d+\.attn1", skipped="attn2 (cross-attention to the text)",
        latent_layout="BNC", patch=_patch_t_and_square, text="none", text_mask="text only in cross-attention",
        text_dim=lambda c: int(c.caption_channels), forward=_ltx_forward, vae_spatial=32, vae_temporal=8,
        default_size=(161, 512, 704), stock=("LTXVideoAttnProcessor",), rotary=(("image_rotary_emb",), 1),
        token_args={"temb": (1, 3)},  # per-token timesteps (conditioned frames): [B, N, 6C]
    ),
    Architecture(
        name="mochi", title="Mochi 1", classes=("MochiTransformer3DModel",),
        layer_pattern=r"transformer_blocks\.\d+\.attn1", skipped="none",
        latent_layout="BCFHW", patch=lambda c: (1, int(c.patch_size), int(c.patch_size)), text="after",
        text_mask="padded text dropped per sample (one SDPA call per batch element)", text_tokens="real",
        text_dim=lambda c: int(c.text_embed_dim), forward=_mochi_forward, vae_spatial=8, vae_temporal=6,
        default_size=(163, 480, 848), stock=("MochiAttnProcessor2_0",), rotary=(("image_rotary_emb",), 0),
    ),
    Architecture(
        name="allegro", title="Allegro", classes=("AllegroTransformer3DModel",),
        layer_pattern=r"transformer_blocks\.\d+\.attn1", skipped="attn2 (cross-attention to the text)",
        latent_layout="BCFHW", patch=_patch_t_and_square, text="none", text_mask="text only in cross-attention",
        text_dim=lambda c: int(c.caption_channels), forward=_allegro_forward, default_size=(89, 720, 1280),
        stock=("AllegroAttnProcessor2_0",), rotary=(("image_rotary_emb",), 1), rotary_part=1,
    ),
    Architecture(
        name="easyanimate", title="EasyAnimate", classes=("EasyAnimateTransformer3DModel",),
        layer_pattern=r"transformer_blocks\.\d+\.attn1", skipped="none",
        latent_layout="BCFHW", patch=lambda c: (1, int(c.patch_size), int(c.patch_size)), text="before",
        text_mask="none", text_dim=lambda c: int(c.text_embed_dim), forward=_easyanimate_forward,
        default_size=(49, 512, 512), stock=("EasyAnimateAttnProcessor2_0",), rotary=(("image_rotary_emb",), 0),
        restore="norm_final",
    ),
    Architecture(
        name="cosmos", title="Cosmos 1.0 / 2.0 (Predict)", classes=("CosmosTransformer3DModel",),
        layer_pattern=r"transformer_blocks\.\d+\.attn1", skipped="attn2 (cross-attention to the text)",
        latent_layout="BCFHW", patch=_patch_3d, text="none", text_mask="text only in cross-attention",
        text_dim=lambda c: int(c.text_embed_dim), forward=_cosmos_forward, vae_temporal=8,
        default_size=(121, 704, 1280), stock=("CosmosAttnProcessor2_0",), rotary=(("image_rotary_emb",), 0),
        # per-frame timesteps (Video2World) expand to [B, N, C]; the learnable position embedding
        # and a ControlNet's residual are [B, N, C] too
        token_args={"temb": (1, 3), "embedded_timestep": (1, 3), "extra_pos_emb": (1, 3),
                    "controlnet_residual": (1, 3)},
    ),
)

_ENCODER_ONLY = "its forward needs inputs the capture loop does not make ({}); capture it inside your own pipeline " \
                "with AttentionCapture and the generic entry"

UNSUPPORTED: tuple[Unsupported, ...] = (
    Unsupported("WanVACETransformer3DModel", "Wan VACE", _ENCODER_ONLY.format("control_hidden_states, the VACE context")),
    Unsupported("WanAnimateTransformer3DModel", "Wan Animate", _ENCODER_ONLY.format("pose latents and face pixels")),
    Unsupported("WanAnimate2Transformer3DModel", "Wan Animate 2",
                "takes lists of per-clip latents and a KV cache (autoregressive), not one latent grid per call"),
    Unsupported("HeliosTransformer3DModel", "Helios",
                "denoises chunk by chunk with history latents (indices_*, latents_history_*): no single latent grid"),
    Unsupported("AnyFlowTransformer3DModel", "AnyFlow",
                "a two-time flow map (timestep and r_timestep): the capture loop's scheduler gives one time per step"),
    Unsupported("AnyFlowFARTransformer3DModel", "AnyFlow FAR",
                "autoregressive chunks under a FlexAttention block mask with a KV cache: attention bypasses SDPA"),
    Unsupported("HunyuanVideo15Transformer3DModel", "HunyuanVideo 1.5",
                _ENCODER_ONLY.format("two text encoders' embeddings and masks, and image embeddings")),
    Unsupported("HunyuanVideoFramepackTransformer3DModel", "HunyuanVideo Framepack",
                "samples section by section with image embeddings, latent indices and 2x/4x history latents"),
    Unsupported("LTX2VideoTransformer3DModel", "LTX-2",
                "joint audio-video streams (audio latents, audio-video cross-attention) in every block"),
    Unsupported("Kandinsky5Transformer3DModel", "Kandinsky 5",
                _ENCODER_ONLY.format("visual and text RoPE positions") + "; its 'nabla' attention bypasses SDPA"),
    Unsupported("Kandinsky6Transformer3DModel", "Kandinsky 6", "joint audio-video streams in every block"),
    Unsupported("Kandinsky6SRTransformer3DModel", "Kandinsky 6 SR",
                "super-resolution under NABLA sparse attention (FlexAttention): attention bypasses SDPA"),
    Unsupported("SanaVideoTransformer3DModel", "Sana-Video",
                "its self-attention is linear attention (SanaLinearAttnProcessor3_0): no softmax attention to sparsify"),
    Unsupported("SanaWMTransformer3DModel", "Sana-WM",
                "linear attention in most blocks and camera conditions: no softmax self-attention over the video"),
    Unsupported("LatteTransformer3DModel", "Latte",
                "factorised attention: spatial per frame and temporal per pixel, never one 3D self-attention"),
    Unsupported("MotifVideoTransformer3DModel", "Motif-Video",
                "not described in the registry yet (dual/single-stream blocks like HunyuanVideo, no tiny-model test)"),
    Unsupported("MiniMaxH3Transformer3DModel", "MiniMax H3",
                "joint audio-video sequence addressed by token tags and index tensors, not one latent grid"),
    Unsupported("SanaWMLTX2RefinerTransformer3DModel", "Sana-WM refiner",
                "LTX-2 style joint audio-video blocks refining Sana-WM latents, not one video latent grid"),
    Unsupported("JoyImageEditTransformer3DModel", "JoyImage Edit",
                "an image-editing transformer: its frames are source and target images, not a video"),
    Unsupported("JoyImageEditPlusTransformer3DModel", "JoyImage Edit Plus",
                "an image-editing transformer: its frames are source and target images, not a video"),
    Unsupported("Cosmos3OmniTransformer", "Cosmos 3 Omni",
                "an omni model over token ids and packed vision tokens (LLM-style), not a latent-grid DiT call"),
)

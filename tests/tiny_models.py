"""Tiny random-weight video transformers shared by the test packages: real diffusers classes of
every family the architecture registry describes (reference/environment.md section 3 for Wan,
HunyuanVideo and CogVideoX). `tests/` is on sys.path (rootdir conftest), so any test module can
`import tiny_models`.

Every model takes the latent 3 x 16 x 16 (LTX-Video: 3 x 8 x 8, its patch is 1) and makes
192 video tokens, 3 x 8 x 8, from it; text embeddings are 16 wide."""

from __future__ import annotations

import torch

WAN = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4,
           text_dim=16, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=32)
HUNYUAN = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=32, num_layers=1,
               num_single_layers=1, num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1,
               text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(8, 12, 12))
COGVIDEOX = dict(num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4, time_embed_dim=16,
                 text_embed_dim=16, num_layers=2, sample_width=16, sample_height=16, sample_frames=9, patch_size=2,
                 temporal_compression_ratio=4, max_text_seq_length=8, use_rotary_positional_embeddings=True)
CONSISID = {**COGVIDEOX, "cross_attn_interval": 1}
LTX = dict(in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=32, cross_attention_dim=64,
           num_layers=2, caption_channels=16)
MOCHI = dict(patch_size=2, num_attention_heads=2, attention_head_dim=32, num_layers=2, pooled_projection_dim=16,
             in_channels=4, text_embed_dim=16, time_embed_dim=4, activation_fn="swiglu", max_sequence_length=8)
ALLEGRO = dict(patch_size=2, patch_size_t=1, num_attention_heads=2, attention_head_dim=48, in_channels=4,
               out_channels=4, num_layers=2, cross_attention_dim=96, caption_channels=16, sample_height=16,
               sample_width=16, sample_frames=3)
EASYANIMATE = dict(num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4, time_embed_dim=16,
                   text_embed_dim=16, num_layers=2, mmdit_layers=2, sample_width=16, sample_height=16, patch_size=2)
# concat_padding_mask=False: with True, diffusers resizes the padding mask with torchvision
COSMOS = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=32, num_layers=2, mlp_ratio=2,
              text_embed_dim=16, adaln_lora_dim=4, max_size=(4, 32, 32), patch_size=(1, 2, 2),
              concat_padding_mask=False)

#: diffusers class name -> tiny config, one per class of the architecture registry
MODELS = {
    "WanTransformer3DModel": WAN, "SkyReelsV2Transformer3DModel": WAN, "ChronoEditTransformer3DModel": WAN,
    "HunyuanVideoTransformer3DModel": HUNYUAN, "CogVideoXTransformer3DModel": COGVIDEOX,
    "ConsisIDTransformer3DModel": CONSISID, "LTXVideoTransformer3DModel": LTX, "MochiTransformer3DModel": MOCHI,
    "AllegroTransformer3DModel": ALLEGRO, "EasyAnimateTransformer3DModel": EASYANIMATE,
    "CosmosTransformer3DModel": COSMOS,
}
#: adapter name -> (diffusers class name, config): the three families with hand-written DFSAttn processors
CONFIGS = {"wan": ("WanTransformer3DModel", WAN), "hunyuanvideo": ("HunyuanVideoTransformer3DModel", HUNYUAN),
           "cogvideox": ("CogVideoXTransformer3DModel", COGVIDEOX)}


def latent_of(cls_name: str) -> tuple[int, int, int]:
    """The latent (F, H, W) of the tiny model of ``cls_name``: 192 video tokens."""
    return (3, 8, 8) if cls_name == "LTXVideoTransformer3DModel" else (3, 16, 16)


def build_class(cls_name: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A seeded random-weight tiny transformer of the diffusers class ``cls_name`` in eval mode."""
    import diffusers

    torch.manual_seed(seed)
    model = getattr(diffusers, cls_name)(**{**MODELS[cls_name], **overrides}).eval()
    if cls_name == "MochiTransformer3DModel":
        # diffusers initialises Mochi's RoPE frequencies to zero (RoPE the identity); random ones
        # make the RoPE matter, as in the checkpoints, so that the tests see it
        with torch.no_grad():
            model.pos_frequencies.normal_()
    return model


def build_tiny(arch: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A seeded random-weight tiny transformer of the family ``arch`` (a CONFIGS key) in eval mode."""
    return build_class(CONFIGS[arch][0], seed, **overrides)


def wan_pipeline(transformer: torch.nn.Module, transformer_2: torch.nn.Module | None = None,
                 boundary_ratio: float | None = None, shift: float = 3.0):
    """A tiny real WanPipeline (no text encoder: pass prompt_embeds) around tiny transformers: a
    4-channel Wan VAE (8x spatial, 4x temporal: 9 frames of 64 x 64 pixels are a 3 x 8 x 8 latent)
    and a flow-matching scheduler. With ``transformer_2`` and ``boundary_ratio`` it is Wan 2.2
    A14B's two-expert pipeline (``expand_timesteps`` False, as in its diffusers config)."""
    import diffusers

    torch.manual_seed(0)
    vae = diffusers.AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                     temperal_downsample=[False, True, True], latents_mean=[0.0] * 4,
                                     latents_std=[1.0] * 4).eval()
    return diffusers.WanPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                                 transformer_2=transformer_2, boundary_ratio=boundary_ratio, expand_timesteps=False,
                                 scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=shift))

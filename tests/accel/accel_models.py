"""Tiny random-weight Wan, HunyuanVideo and CogVideoX transformers (real diffusers classes) and
one input per architecture. Blocks of 16 tokens so that 200-token sequences have 12-13 blocks."""

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
CLASSES = {"wan": ("WanTransformer3DModel", WAN), "hunyuanvideo": ("HunyuanVideoTransformer3DModel", HUNYUAN),
           "cogvideox": ("CogVideoXTransformer3DModel", COGVIDEOX)}
ARCHS = list(CLASSES)


def build(arch: str, seed: int = 0, **overrides) -> torch.nn.Module:
    import diffusers

    cls_name, cfg = CLASSES[arch]
    torch.manual_seed(seed)
    return getattr(diffusers, cls_name)(**{**cfg, **overrides}).eval()


def make_inputs(arch: str, batch: int = 1, seed: int = 1, valid_text: int = 6) -> dict:
    """Keyword inputs of one transformer call: latent 3 x 16 x 16 (192 video tokens), 8 text tokens.

    HunyuanVideo: the last 8 - valid_text text tokens are padding (masked)."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(batch, 8, 16, generator=g)
    t = torch.full((batch,), 500)
    if arch == "wan":
        return dict(hidden_states=torch.randn(batch, 4, 3, 16, 16, generator=g), timestep=t,
                    encoder_hidden_states=text, return_dict=False)
    if arch == "hunyuanvideo":
        mask = torch.zeros(batch, 8, dtype=torch.int64)
        mask[:, :valid_text] = 1
        return dict(hidden_states=torch.randn(batch, 4, 3, 16, 16, generator=g), timestep=t,
                    encoder_hidden_states=text, encoder_attention_mask=mask,
                    pooled_projections=torch.randn(batch, 8, generator=g),
                    guidance=torch.full((batch,), 6000.0), return_dict=False)
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    rot = get_3d_rotary_pos_embed(embed_dim=32, crops_coords=((0, 0), (8, 8)), grid_size=(8, 8), temporal_size=3)
    return dict(hidden_states=torch.randn(batch, 3, 4, 16, 16, generator=g), encoder_hidden_states=text,
                timestep=t, image_rotary_emb=rot, return_dict=False)

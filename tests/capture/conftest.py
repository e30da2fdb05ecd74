"""Tiny random-weight video transformers (configs of reference/environment.md section 3),
saved with save_pretrained so tests load them back through the real from_pretrained."""

from __future__ import annotations

import pytest
import torch

WAN = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4,
           text_dim=16, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=32)
HUNYUAN = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=32, num_layers=1,
               num_single_layers=1, num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1,
               text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(8, 12, 12))
COGVIDEOX = dict(num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4, time_embed_dim=16,
                 text_embed_dim=16, num_layers=2, sample_width=16, sample_height=16, sample_frames=9, patch_size=2,
                 temporal_compression_ratio=4, max_text_seq_length=8, use_rotary_positional_embeddings=True)
CONFIGS = {"wan": ("WanTransformer3DModel", WAN), "hunyuanvideo": ("HunyuanVideoTransformer3DModel", HUNYUAN),
           "cogvideox": ("CogVideoXTransformer3DModel", COGVIDEOX)}


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    """adapter name -> folder of a saved tiny transformer (seeded random weights)."""
    import diffusers

    root = tmp_path_factory.mktemp("models")
    out = {}
    for i, (name, (cls_name, cfg)) in enumerate(CONFIGS.items()):
        torch.manual_seed(100 + i)
        model = getattr(diffusers, cls_name)(**cfg).eval()
        model.save_pretrained(root / name)
        out[name] = root / name
    return out


@pytest.fixture(scope="session")
def loaded_models(model_dirs):
    """adapter name -> transformer loaded back with from_pretrained (float32, eval)."""
    import diffusers

    return {name: getattr(diffusers, CONFIGS[name][0]).from_pretrained(model_dirs[name]).eval() for name in CONFIGS}

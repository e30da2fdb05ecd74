"""Tiny random-weight video transformers shared by the test packages: the configs of
reference/environment.md section 3 for real diffusers classes (Wan, HunyuanVideo, CogVideoX).
`tests/` is on sys.path (rootdir conftest), so any test module can `import tiny_models`."""

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
#: adapter name -> (diffusers class name, config)
CONFIGS = {"wan": ("WanTransformer3DModel", WAN), "hunyuanvideo": ("HunyuanVideoTransformer3DModel", HUNYUAN),
           "cogvideox": ("CogVideoXTransformer3DModel", COGVIDEOX)}


def build_tiny(arch: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A seeded random-weight tiny transformer of ``arch`` in eval mode."""
    import diffusers

    cls_name, cfg = CONFIGS[arch]
    torch.manual_seed(seed)
    return getattr(diffusers, cls_name)(**{**cfg, **overrides}).eval()

"""Model adapters: token grids from pipeline settings, layer selection, registry."""

from __future__ import annotations

import pytest
import torch
from types import SimpleNamespace

from dfsviz.capture.adapters import (
    ADAPTERS,
    Conditioning,
    adapter_for,
    adapter_names,
    get_adapter,
    supported_architectures,
)
from dfsviz.sparse.grid import LatentGrid

WAN13B = SimpleNamespace(patch_size=(1, 2, 2))
HUNYUAN = SimpleNamespace(patch_size=2, patch_size_t=1)
COG2B = SimpleNamespace(patch_size=2, patch_size_t=None)
COG15 = SimpleNamespace(patch_size=2, patch_size_t=2)


def test_wan_480p_81_frames_is_21x30x52():
    wan = get_adapter("wan")
    latent = wan.latent_shape(81, 480, 832, 8, 4)
    assert latent == (21, 60, 104)
    grid = wan.token_grid(WAN13B, latent)
    assert grid == LatentGrid(21, 30, 52) and grid.num_tokens == 32760


def test_hunyuan_720p_129_frames_text_after_video():
    hy = get_adapter("hunyuanvideo")
    grid = hy.token_grid(HUNYUAN, hy.latent_shape(129, 720, 1280, 8, 4), text_len=256)
    assert grid == LatentGrid(33, 45, 80, text_len=256, text_first=False)
    assert grid.text_slice == slice(33 * 45 * 80, 33 * 45 * 80 + 256)


def test_cogvideox_text_first_and_temporal_patch():
    cog = get_adapter("cogvideox")
    grid = cog.token_grid(COG2B, cog.latent_shape(49, 480, 720, 8, 4), text_len=226)
    assert grid == LatentGrid(13, 30, 45, text_len=226, text_first=True) and grid.video_start == 226
    # CogVideoX 1.5: patch_size_t = 2 halves the latent frames (13 is odd -> rejected)
    with pytest.raises(ValueError, match="latent frames = 13 must be a multiple of the patch size 2"):
        cog.token_grid(COG15, (13, 60, 90), text_len=226)
    assert cog.token_grid(COG15, (22, 60, 90), 226).frames == 11


def test_latent_shape_errors():
    wan = get_adapter("wan")
    with pytest.raises(ValueError, match=r"`frames` = 80 must be 1 \+ a multiple of the VAE's temporal compression 4"):
        wan.latent_shape(80, 480, 832, 8, 4)
    with pytest.raises(ValueError, match="`height` = 484 must be a multiple of the VAE's spatial compression 8"):
        wan.latent_shape(81, 484, 832, 8, 4)
    with pytest.raises(ValueError, match="`width` must be a positive integer"):
        wan.latent_shape(81, 480, 0, 8, 4)
    with pytest.raises(ValueError, match="latent height = 15 must be a multiple of the patch size 2"):
        wan.token_grid(WAN13B, (3, 15, 16))


def test_registry_and_lookup(loaded_models):
    assert adapter_names() == list(ADAPTERS) == ["wan", "hunyuanvideo", "cogvideox", "consisid", "ltx",
                                                 "mochi", "allegro", "easyanimate", "cosmos", "generic"]
    for name, model in loaded_models.items():
        assert adapter_for(model).name == name
    with pytest.raises(ValueError, match="unknown adapter 'flux'"):
        get_adapter("flux")
    with pytest.raises(ValueError, match="unsupported architecture Linear; supported: WanTransformer3DModel"):
        adapter_for(torch.nn.Linear(2, 2))
    assert "CogVideoXTransformer3DModel" in supported_architectures()


def test_layer_selection(loaded_models):
    assert get_adapter("wan").select_layers(loaded_models["wan"]) == {"blocks.0.attn1": 0, "blocks.1.attn1": 1}
    assert get_adapter("cogvideox").select_layers(loaded_models["cogvideox"]) == {
        "transformer_blocks.0.attn1": 0,
        "transformer_blocks.1.attn1": 1,
    }
    # generic: every attention but Wan's cross-attention attn2
    generic = get_adapter("generic").select_layers(loaded_models["wan"])
    assert generic == {"blocks.0.attn1": 0, "blocks.1.attn1": 1}
    with pytest.raises(ValueError, match="found no self-attention module"):
        get_adapter("wan").select_layers(loaded_models["cogvideox"])


def test_generic_refuses_a_forward_it_cannot_call(loaded_models):
    with pytest.raises(ValueError, match=r"the generic entry cannot run a denoising loop for HunyuanVideoTransformer3DModel: "
                                         r"its forward also requires \['encoder_attention_mask', 'pooled_projections'\]"):
        get_adapter("generic").forward(loaded_models["hunyuanvideo"], None, None, None, guidance=1.0, grid=None)


def test_valid_tokens_rejects_non_key_masks():
    wan = get_adapter("wan")
    assert wan.valid_tokens(None, 10, 0) is None
    key = torch.tensor([[True] * 7 + [False] * 3]).view(1, 1, 1, 10)
    assert torch.equal(wan.valid_tokens(key, 10, 0), torch.arange(7))
    with pytest.raises(ValueError, match="only boolean key-padding masks"):
        wan.valid_tokens(torch.zeros(1, 1, 10, 10), 10, 0)


def test_conditioning_validation():
    with pytest.raises(ValueError, match=r"`embeds` must be a tensor \[1, T, text_dim\]"):
        Conditioning(torch.zeros(2, 4, 8))
    with pytest.raises(ValueError, match="`mask` must have shape"):
        Conditioning(torch.zeros(1, 4, 8), torch.ones(1, 5))
    assert Conditioning(torch.zeros(1, 4, 8), torch.tensor([[1, 1, 0, 0]])).valid_text == 2

"""AttentionCapture on real diffusers transformers loaded through from_pretrained."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dfsviz.capture.adapters import adapter_for
from dfsviz.capture.hooks import AttentionCapture

LATENT = (3, 16, 16)  # latent cells -> 3 x 8 x 8 = 192 video tokens after 2 x 2 patching


def _inputs(name, model, seed=0):
    adapter = adapter_for(model)
    gen = torch.Generator().manual_seed(seed)
    cond = adapter.random_conditioning(model.config, gen, 8)
    grid = adapter.token_grid(model.config, LATENT, adapter.text_len(cond))
    latents = adapter.make_latents(LATENT, model.config, gen, "cpu", torch.float32)
    return adapter, cond, grid, latents


def _forward(adapter, model, latents, cond, grid):
    t = torch.tensor([500.0])
    with torch.no_grad():
        return adapter.forward(model, latents, t, cond, guidance=5.0, grid=grid)


@pytest.mark.parametrize("name", ["wan", "hunyuanvideo", "cogvideox"])
def test_outputs_bit_identical_and_model_restored(loaded_models, name):
    model = loaded_models[name]
    adapter, cond, grid, latents = _inputs(name, model)
    before = _forward(adapter, model, latents, cond, grid)
    records = []
    sdpa = F.scaled_dot_product_attention
    with AttentionCapture(model, adapter.select_layers(model), records.append):
        during = _forward(adapter, model, latents, cond, grid)
    after = _forward(adapter, model, latents, cond, grid)
    assert torch.equal(before, during) and torch.equal(before, after)
    assert F.scaled_dot_product_attention is sdpa
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    # one record per captured layer, each a self-attention over the whole sequence
    assert [r.layer for r in records] == list(range(len(adapter.select_layers(model))))
    expected_n = grid.num_tokens + (2 if name == "hunyuanvideo" else 0)  # 2 padded text tokens of 8
    assert all(r.is_self_attention and r.q.shape == (1, 2, expected_n, 32) for r in records)


@pytest.mark.parametrize("name", ["wan", "cogvideox", "hunyuanvideo"])
def test_records_are_the_real_attention_inputs(loaded_models, name):
    """softmax(q k^T * scale + mask) v from the record, through to_out, equals the module output."""
    model = loaded_models[name]
    adapter, cond, grid, latents = _inputs(name, model, seed=1)
    layers = adapter.select_layers(model)
    target = next(n for n in layers if layers[n] == 0)
    module = dict(model.named_modules())[target]
    outputs = []
    handle = module.register_forward_hook(lambda mod, args, out: outputs.append(out))
    records = []
    try:
        with AttentionCapture(model, {target: 0}, records.append):
            _forward(adapter, model, latents, cond, grid)
    finally:
        handle.remove()
    (rec,) = records
    q, k, v = (x.double() for x in (rec.q, rec.k, rec.v))
    logits = q @ k.transpose(-1, -2) * rec.softmax_scale
    if rec.attn_mask is not None:
        logits = logits.masked_fill(~rec.attn_mask, float("-inf"))
    att = torch.softmax(logits, dim=-1) @ v  # [B, H, N, D]
    out = outputs[0][0] if isinstance(outputs[0], tuple) else outputs[0]
    hidden = att.transpose(1, 2).flatten(2).float()
    if name == "hunyuanvideo":
        # dual-stream: the module returns (video, text) outputs, each through its own projection
        nv = grid.num_video
        video = module.to_out[0](hidden[:, :nv])
        text = module.to_add_out(hidden[:, nv:])
        torch.testing.assert_close(video, outputs[0][0], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(text, outputs[0][1], atol=2e-5, rtol=1e-4)
    else:
        expected = module.to_out[0](hidden)
        if name == "cogvideox":  # CogVideoX splits [text, video] after the projection
            expected = expected[:, grid.text_len :]
            out = outputs[0][0]
        torch.testing.assert_close(expected, out, atol=2e-5, rtol=1e-4)


def test_hunyuan_layers_exclude_refiner_and_mask_marks_padding(loaded_models):
    model = loaded_models["hunyuanvideo"]
    adapter, cond, grid, latents = _inputs("hunyuanvideo", model)
    layers = adapter.select_layers(model)
    assert layers == {"transformer_blocks.0.attn": 0, "single_transformer_blocks.0.attn": 1}
    assert not any("refiner" in n for n in layers)
    records = []
    with AttentionCapture(model, layers, records.append):
        _forward(adapter, model, latents, cond, grid)
    valid = adapter.valid_tokens(records[0].attn_mask, records[0].q.shape[2], 0)
    # video (192) then the 6 real text tokens; the 2 padded ones are dropped
    assert torch.equal(valid, torch.arange(192 + 6))
    assert grid.num_tokens == 198 and not grid.text_first


def test_native_backend_forced_then_restored(loaded_models):
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    model = loaded_models["wan"]
    adapter = adapter_for(model)
    processors = [m.processor for m in model.modules() if hasattr(getattr(m, "processor", None), "_attention_backend")]
    active = _AttentionBackendRegistry._active_backend
    model.set_attention_backend("_native_math")
    try:
        seen = []
        with AttentionCapture(model, adapter.select_layers(model), lambda r: None):
            seen = {p._attention_backend for p in processors}
            seen_active = _AttentionBackendRegistry._active_backend
        assert seen == {AttentionBackendName.NATIVE} and seen_active == AttentionBackendName.NATIVE
        assert {p._attention_backend for p in processors} == {AttentionBackendName._NATIVE_MATH}
    finally:
        model.reset_attention_backend()
        _AttentionBackendRegistry.set_active_backend(active)


def test_restores_after_an_exception_inside(loaded_models):
    model = loaded_models["wan"]
    adapter, cond, grid, latents = _inputs("wan", model)
    sdpa = F.scaled_dot_product_attention

    def boom(record):
        raise RuntimeError("reducer failed")

    with pytest.raises(RuntimeError, match="reducer failed"):
        with AttentionCapture(model, adapter.select_layers(model), boom):
            _forward(adapter, model, latents, cond, grid)
    assert F.scaled_dot_product_attention is sdpa
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_disabled_capture_records_nothing(loaded_models):
    model = loaded_models["wan"]
    adapter, cond, grid, latents = _inputs("wan", model)
    records = []
    with AttentionCapture(model, adapter.select_layers(model), records.append) as cap:
        cap.enabled = False
        _forward(adapter, model, latents, cond, grid)
    assert records == []


def test_bad_arguments(loaded_models):
    model = loaded_models["wan"]
    with pytest.raises(TypeError, match="`model` must be a torch.nn.Module"):
        AttentionCapture("wan", {"blocks.0.attn1": 0}, print)
    with pytest.raises(ValueError, match="`layers` must be a non-empty mapping"):
        AttentionCapture(model, {}, print)
    with pytest.raises(ValueError, match="names modules the model does not have"):
        AttentionCapture(model, {"blocks.9.attn1": 0}, print)
    with pytest.raises(ValueError, match="its own index"):
        AttentionCapture(model, {"blocks.0.attn1": 0, "blocks.1.attn1": 0}, print)
    with pytest.raises(TypeError, match="`on_record` must be callable"):
        AttentionCapture(model, {"blocks.0.attn1": 0}, None)

"""Wan blocks with fused AdaLN norms and gated residuals (DFSConfig.fused_ops) inside DFSAttn."""

from __future__ import annotations

import importlib

import pytest
import torch
from accel_models import make_inputs
from tiny_models import build_tiny

from dfsviz.accel import DFSConfig, apply_dfsattn
from dfsviz.accel.wan_block import fused_block_forward
from dfsviz.sparse.schedule import DFSSchedule

wan_block_module = importlib.import_module("dfsviz.accel.wan_block")


def _config(**kw):
    # Step 0 dense, steps 1-3 sparse at half the key blocks.
    schedule = DFSSchedule(num_steps=4, skip_steps=1, interval=1, gamma0=0.5, decrement=0.0, dense_layers=())
    return DFSConfig(**{**dict(block=16, tile=4, schedule=schedule), **kw})


def _steps(model, inputs, config, steps=(0, 1)):
    """Outputs of one dense and one sparse call under ``config``; the handle after removal."""
    outs = []
    with apply_dfsattn(model, config) as handle, torch.no_grad():
        for step in steps:
            handle.state.set_step(step)
            outs.append(model(**inputs)[0])
        fused = [block for block, _ in handle.fused_blocks]
    return outs, fused, handle


@pytest.mark.parametrize("cross_attn_norm", [False, True], ids=["identity_norm2", "affine_norm2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_fused_blocks_equal_stock_blocks(dtype, cross_attn_norm):
    model = build_tiny("wan", cross_attn_norm=cross_attn_norm, attention_head_dim=64).to(dtype)  # a kernel D
    model.rope.float()
    inputs = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v
              for k, v in make_inputs("wan").items()}
    stock, fused, _ = _steps(model, inputs, _config(fused_ops=False, backend="ref"))
    assert fused == []
    ref, fused, handle = _steps(model, inputs, _config(backend="ref"))
    assert fused == list(model.blocks)
    for a, b in zip(ref, stock):  # the references are the stock expressions: bit-identical
        assert torch.equal(a, b)
    # remove() deletes the instance attribute: the class forward runs again.
    assert all("forward" not in vars(block) for block in model.blocks) and handle.fused_blocks == []
    kernel, _, _ = _steps(model, inputs, _config(backend="triton"))
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.05, rtol=0.05)
    for a, b in zip(kernel, stock):
        torch.testing.assert_close(a, b, **tol)


def test_fused_ops_run_where_the_block_calls_them(monkeypatch):
    """Each block runs two modulated norms, one affine norm (cross_attn_norm) and two gated residuals."""
    calls = []
    for name in ("modulated_layer_norm", "gated_residual"):
        real = getattr(wan_block_module, name)
        monkeypatch.setattr(wan_block_module, name,
                            lambda *a, _real=real, _name=name, **kw: (calls.append(_name), _real(*a, **kw))[1])
    model = build_tiny("wan", cross_attn_norm=True)
    _steps(model, make_inputs("wan"), _config(backend="ref"), steps=(0,))
    assert calls == ["modulated_layer_norm", "gated_residual", "modulated_layer_norm", "modulated_layer_norm",
                     "gated_residual"] * len(model.blocks)


def test_blocks_with_a_forward_hook_keep_it():
    """A forward set on the instance (diffusers' hook registry, accelerate's offload hooks) stays
    in charge: that block is not fused, its hook runs under DFSAttn and after remove()."""
    from diffusers.hooks import HookRegistry, ModelHook

    class Count(ModelHook):
        calls = 0

        def pre_forward(self, module, *args, **kwargs):
            Count.calls += 1
            return args, kwargs

    model = build_tiny("wan")
    HookRegistry.check_if_exists_or_initialize(model.blocks[0]).register_hook(Count(), "count")
    inputs = make_inputs("wan")
    _, fused, _ = _steps(model, inputs, _config(backend="ref"))
    assert fused == list(model.blocks)[1:] and Count.calls == 2
    with torch.no_grad():
        model(**inputs)
    assert Count.calls == 3 and "forward" in vars(model.blocks[0]) and "forward" not in vars(model.blocks[1])


def test_per_token_modulation_runs_the_stock_forward():
    """Wan 2.2 TI2V hands temb [B, N, 6, C]: the fused forward defers to the stock one."""
    block = build_tiny("wan").blocks[0]
    forward = fused_block_forward(block, "ref")
    g = torch.Generator().manual_seed(0)
    n, c = 12, block.scale_shift_table.shape[-1]
    x, text = torch.randn(1, n, c, generator=g), torch.randn(1, 8, c, generator=g)
    temb = torch.randn(1, n, 6, c, generator=g)
    with torch.no_grad():
        assert torch.equal(forward(x, text, temb, None), block(x, text, temb, None))


def test_unknown_blocks_are_left_alone():
    assert fused_block_forward(torch.nn.Linear(4, 4), None) is None
    block = build_tiny("wan").blocks[0]
    block.norm1 = torch.nn.LayerNorm(block.scale_shift_table.shape[-1])  # not diffusers' FP32LayerNorm
    assert fused_block_forward(block, None) is None
    # Other architectures have no fused block: their blocks keep the class forward.
    with apply_dfsattn(build_tiny("cogvideox"), _config()) as handle:
        assert handle.fused_blocks == []

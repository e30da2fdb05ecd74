"""DFSConfig.linear_precision: the blocks' linear layers as FP8 matrix products, on the CPU
through the PyTorch simulation (``fp8_linear_ref``, the 'ref' backend) and, for a bfloat16 model,
through the Triton row pass and torch._scaled_mm (the 'triton' backend under the interpreter).

The reference is built by hand: forward hooks on the stock model's layers replace each output by
the simulated FP8 product of the layer's input."""

from __future__ import annotations

import contextlib

import pytest
import torch

from dfsviz.accel import DFSConfig, apply_dfsattn
from dfsviz.accel.fp8_linear import MIN_ROWS
from dfsviz.kernels.fp8_linear import fp8_linear_ref, quantize_weight_fp8
from dfsviz.sparse.schedule import DFSSchedule

from accel_models import make_inputs
from tiny_models import build_tiny

BLOCKS = {"wan": ["blocks"], "hunyuanvideo": ["transformer_blocks", "single_transformer_blocks"]}


def run(model, inputs):
    with torch.no_grad():
        return model(**inputs)[0]


def config(linear_precision: str = "fp8_all", skip_steps: int = 0, backend: str = "ref", **kw) -> DFSConfig:
    schedule = DFSSchedule(num_steps=2, skip_steps=skip_steps, interval=1, gamma0=0.3, decrement=0.0)
    return DFSConfig(block=16, tile=4, schedule=schedule, backend=backend, linear_precision=linear_precision, **kw)


def block_linears(model, arch):
    return {f"{attr}.{i}.{name}": m for attr in BLOCKS[arch] for i, block in enumerate(getattr(model, attr))
            for name, m in block.named_modules() if isinstance(m, torch.nn.Linear)}


@contextlib.contextmanager
def simulated_fp8_linears(linears):
    """Every layer's output replaced by the simulated FP8 product when its call has >= MIN_ROWS rows."""
    weights = {id(m): quantize_weight_fp8(m.weight, m.bias) for m in linears.values()}
    calls = []

    def hook(module, args, output):
        x = args[0]
        if x.numel() < MIN_ROWS * module.in_features:
            return None
        calls.append(x.numel() // module.in_features)
        return fp8_linear_ref(x, weights[id(module)])

    handles = [m.register_forward_hook(hook) for m in linears.values()]
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("arch", ["wan", "hunyuanvideo"])
@pytest.mark.parametrize("skip_steps", [0, 1])  # a sparse call (refresh) and a dense warm-up call
def test_fp8_linears_are_the_simulated_products(arch, skip_steps):
    model = build_tiny(arch)
    inputs = make_inputs(arch)
    linears = block_linears(model, arch)
    with apply_dfsattn(model, config("native", skip_steps)):
        native = run(model, inputs)
    with apply_dfsattn(model, config("fp8_all", skip_steps)) as handle:
        fp8 = run(model, inputs)
        installed = {id(m) for m, _ in handle.fp8_linears}
    assert installed == {id(m) for m in linears.values()}  # every block linear: the tiny dims are multiples of 16
    with simulated_fp8_linears(linears) as calls, apply_dfsattn(model, config("native", skip_steps)):
        reference = run(model, inputs)
    assert calls and min(calls) >= MIN_ROWS
    torch.testing.assert_close(fp8, reference, atol=1e-6, rtol=0)
    error = ((fp8 - native).norm() / native.norm()).item()
    assert 0 < error < 0.1, error  # FP8 is not native, and near it


def test_fp8_leaves_the_first_and_the_last_block_alone():
    model = build_tiny("wan", num_layers=4)
    with apply_dfsattn(model, config("fp8")) as handle:
        installed = {id(m) for m, _ in handle.fp8_linears}
    per_block = [{id(m) for m in block.modules() if isinstance(m, torch.nn.Linear)} for block in model.blocks]
    assert installed == per_block[1] | per_block[2] and len(per_block[1]) == 10


def test_short_calls_keep_the_stock_product():
    """Wan's cross-attention keys and values (8 text rows) and HunyuanVideo's modulation layers
    (one row per sample) are not quantized."""
    model = build_tiny("hunyuanvideo")
    with apply_dfsattn(model, config()):
        modulation = model.transformer_blocks[0].norm1.linear
        x = torch.randn(2, modulation.in_features)
        assert torch.equal(modulation(x), torch.nn.functional.linear(x, modulation.weight, modulation.bias))
        ffn = model.single_transformer_blocks[0].proj_mlp
        x = torch.randn(1, MIN_ROWS, ffn.in_features)
        assert not torch.equal(ffn(x), torch.nn.functional.linear(x, ffn.weight, ffn.bias))
    wan = build_tiny("wan")
    with apply_dfsattn(wan, config()):
        to_k = wan.blocks[0].attn2.to_k
        x = torch.randn(1, 8, to_k.in_features)
        assert torch.equal(to_k(x), torch.nn.functional.linear(x, to_k.weight, to_k.bias))


def test_remove_restores_the_model_bit_for_bit():
    model = build_tiny("wan")
    inputs = make_inputs("wan")
    stock = run(model, inputs)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    handle = apply_dfsattn(model, config(permute_once=True))
    assert sorted(model.state_dict()) == sorted(state)  # no parameter or buffer added
    run(model, inputs)
    handle.remove()
    assert not any("forward" in vars(m) for m in model.modules())
    assert torch.equal(run(model, inputs), stock)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_a_forward_set_on_the_instance_stays_in_charge():
    """A layer whose forward a hook already replaced (offloading, caches) keeps it."""
    model = build_tiny("wan")
    layer = model.blocks[0].ffn.net[2]
    own = layer.forward
    layer.forward = lambda x: own(x)
    with apply_dfsattn(model, config()) as handle:
        assert all(m is not layer for m, _ in handle.fp8_linears) and len(handle.fp8_linears) > 0
    assert "forward" in vars(layer)


def test_bfloat16_model_through_the_kernel_path():
    """backend 'triton' (interpreter): the Triton row pass and torch._scaled_mm, within bfloat16
    roundings of the simulation; warm-up steps only, so that the attention stays stock."""
    model = build_tiny("wan").to(torch.bfloat16)
    inputs = {k: v.to(torch.bfloat16) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
              for k, v in make_inputs("wan").items()}
    outs = {}
    for backend in ("ref", "triton"):
        with apply_dfsattn(model, config(skip_steps=1, backend=backend, fused_ops=False)):
            outs[backend] = run(model, inputs).float()
    error = ((outs["triton"] - outs["ref"]).norm() / outs["ref"].norm()).item()
    assert error < 2e-2, error


def test_refusals_leave_the_model_untouched():
    with pytest.raises(ValueError, match="linear_precision"):
        config("int8")
    assert config("fp8").name.endswith("_linear_fp8_" + config().schedule.name)
    assert config("fp8_all").name.endswith("_linear_fp8_all_" + config().schedule.name)
    model = build_tiny("wan")  # float32 weights: the FP8 product writes bfloat16
    with pytest.raises(ValueError, match="bfloat16"):
        apply_dfsattn(model, config(backend="triton"))
    assert not any("forward" in vars(m) for m in model.modules())
    assert all(type(m.processor).__name__ == "WanAttnProcessor" for m in model.modules() if hasattr(m, "processor"))

"""DFSConfig.precision through the DFSAttn processors, on the CPU through the kernels' PyTorch
simulation of FP8 attention (``block_sparse_attention_fp8_ref``, what the 'ref' backend runs).

The reference is built by hand: the stock Wan processor with its self-attention call replaced
by the quantized attention called directly, with the masks the DFSAttn run selected."""

from __future__ import annotations

import contextlib

import pytest
import torch

from dfsviz.accel import DFSConfig, apply_dfsattn
from dfsviz.kernels.fp8 import block_sparse_attention_fp8_ref
from dfsviz.sparse.grid import LatentGrid
from dfsviz.sparse.attention import block_sparse_attention_ref
from dfsviz.sparse.masks import BlockMask
from dfsviz.sparse.orders import make_order
from dfsviz.sparse.schedule import DFSSchedule

from accel_models import make_inputs

#: docs/kernels.md "FP8": the simulation's attention output is within 0.048 (max) of float64
#: attention for unit-variance inputs; the tiny model's layers are of that scale
FP8_MAX_ERROR = 0.048


def run(model, inputs):
    with torch.no_grad():
        return model(**inputs)[0]


def config(precision: str, skip_steps: int) -> DFSConfig:
    schedule = DFSSchedule(num_steps=2, skip_steps=skip_steps, interval=1, gamma0=0.3, decrement=0.0, dense_layers=())
    return DFSConfig(block=16, tile=4, schedule=schedule, backend="ref", fused_ops=False, precision=precision)


@contextlib.contextmanager
def wan_self_attention(attend):
    """The stock Wan processors with their self-attention replaced by ``attend(layer, q, k, v)``
    ([B, H, N, D] -> [B, H, N, D]); cross-attention stays stock."""
    from diffusers.models.transformers import transformer_wan

    stock = transformer_wan.dispatch_attention_fn
    calls = []

    def dispatch(query, key, value, **kwargs):
        if query.shape[1] != key.shape[1]:  # attn2: cross-attention to the text
            return stock(query, key, value, **kwargs)
        out = attend(len(calls) % 2, *(t.transpose(1, 2) for t in (query, key, value)))  # 2 layers, in order
        calls.append(query.shape[1])
        return out.transpose(1, 2)

    transformer_wan.dispatch_attention_fn = dispatch
    try:
        yield calls
    finally:
        transformer_wan.dispatch_attention_fn = stock


@pytest.fixture(scope="module")
def wan():
    from tiny_models import build_tiny

    return build_tiny("wan")


@pytest.mark.parametrize("precision", ["fp8", "fp8_pv"])
def test_fp8_sparse_calls_are_the_quantized_attention(wan, precision):
    inputs = make_inputs("wan")
    native, dense = [], run(wan, inputs)
    for mode in ("native", precision):
        with apply_dfsattn(wan, config(mode, skip_steps=0)) as handle:
            native.append(run(wan, inputs))
            masks = {layer: e.mask for (layer, _, _), e in handle.state.masks.items()}
    order = make_order("hilbert3d", LatentGrid(3, 8, 8))

    def quantized(layer, q, k, v):
        return block_sparse_attention_fp8_ref(q, k, v, masks[layer], order, precision=precision)

    with wan_self_attention(quantized) as calls:
        reference = run(wan, inputs)
    assert calls == [192, 192] and sorted(masks) == [0, 1]
    torch.testing.assert_close(native[1], reference, atol=2e-5, rtol=0)
    error = (native[1] - native[0]).abs().max().item()
    assert 0 < error < FP8_MAX_ERROR, error  # FP8 is not native, and within its documented error
    assert not torch.allclose(native[0], dense, atol=1e-4)  # the budget is real (0.3)


@pytest.mark.parametrize("precision", ["fp8", "fp8_dense", "fp8_pv", "fp8_pv_dense", "native_dense"])
def test_dense_warm_up_calls(wan, precision):
    """fp8, fp8_pv: warm-up steps stay stock; fp8_dense, fp8_pv_dense, native_dense: the kernel at
    that precision (FP8 Q . K, P . V too for fp8_pv_dense, the model's dtype for native_dense)
    with every block kept, no order."""
    inputs = make_inputs("wan")
    dense = run(wan, inputs)
    with apply_dfsattn(wan, config(precision, skip_steps=1)) as handle:
        warm = run(wan, inputs)  # step 0: dense
    assert handle.state.records == [] and handle.state.masks == {}  # nothing scored, cached or recorded
    if not precision.endswith("_dense"):
        assert torch.equal(warm, dense)
        return

    def full(layer, q, k, v):
        mask = BlockMask.full(q.shape[0], q.shape[1], q.shape[2], 16)
        if precision == "native_dense":
            return block_sparse_attention_ref(q, k, v, mask)
        return block_sparse_attention_fp8_ref(q, k, v, mask, precision=precision.removesuffix("_dense"))

    with wan_self_attention(full):
        reference = run(wan, inputs)
    torch.testing.assert_close(warm, reference, atol=2e-5, rtol=0)
    if precision == "native_dense":  # dense attention, computed by the block kernel
        torch.testing.assert_close(warm, dense, atol=1e-5, rtol=0)
    else:
        assert 0 < (warm - dense).abs().max().item() < FP8_MAX_ERROR

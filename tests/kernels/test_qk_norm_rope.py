"""Fused QK-RMSNorm + Wan RoPE: Triton kernel (interpreter on CPU) vs today's torch path, and the
fused path inside WanDFSProcessor on a tiny diffusers Wan.

The kernel must match the reference in the test dtype within one rounding step
(``rotated_pair_steps``), and against
the float64 golden result its error may be at most 2x the reference's own plus a small floor.
"""

import dataclasses
import importlib

import pytest
import torch

from dfsviz.accel import processors as accel_processor
from dfsviz.accel.config import DFSConfig
from dfsviz.accel import apply_dfsattn
from dfsviz.kernels._check import compare_to_golden, rotated_pair_steps
from dfsviz.kernels.qk_norm_rope import qk_norm_rope, qk_norm_rope_ref, wan_rope
from dfsviz.sparse.schedule import DFSSchedule

from tiny_models import build_tiny

jit_qk_norm_rope = importlib.import_module("dfsviz.kernels._jit.qk_norm_rope")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _tables(n, d, gen, permuted):
    """Wan-like float32 tables [1, N, 1, D] (pairs share an angle); permuted: rows in a random
    order and non-contiguous strides, as permute-once hands them over."""
    ang = (torch.rand(d // 2, n, generator=gen, dtype=torch.float64) * 6.0).repeat_interleave(2, dim=0)  # [D, N]
    if permuted:
        ang = ang[:, torch.randperm(n, generator=gen)]
    cos, sin = (f(ang).float().t()[None, :, None, :] for f in (torch.cos, torch.sin))  # strides (., 1, ., N)
    return (cos, sin) if permuted else (cos.contiguous(), sin.contiguous())


def _inputs(b, n, h, d, dtype, gen, permuted=False):
    c = h * d
    x = (3.0 * torch.randn(b, n, c, generator=gen)).to(dtype)
    w = (0.5 + torch.rand(c, generator=gen)).to(dtype)
    return (x, w, *_tables(n, d, gen, permuted))


def _assert_one_step(out, ref):
    """Within one rounding step of the reference (rotated_pair_steps <= 2; float32, where no
    intermediate rounding dominates, allows a few steps of arithmetic order)."""
    steps = rotated_pair_steps(out, ref)
    assert steps <= (8.0 if ref.dtype == torch.float32 else 2.0), f"{steps:.2f} rounding steps from the reference"


@pytest.mark.parametrize("permuted", [False, True], ids=["tables", "permuted_tables"])
@pytest.mark.parametrize("h", [1, 3])
@pytest.mark.parametrize("n", [1, 7, 129])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).split(".")[-1])
def test_kernel_matches_reference(dtype, d, n, h, permuted):
    gen = torch.Generator().manual_seed(n * 7 + d + h)
    x, w, cos, sin = _inputs(2, n, h, d, dtype, gen, permuted)
    assert cos.is_contiguous() is not (permuted and n > 1)
    out = qk_norm_rope(x, w, 1e-6, cos, sin, backend="triton")
    ref = qk_norm_rope_ref(x, w, 1e-6, cos, sin)
    gold = qk_norm_rope_ref(x.double(), w.double(), 1e-6, cos.double(), sin.double())
    assert out.dtype == dtype and out.shape == x.shape and out.is_contiguous()
    _assert_one_step(out, ref)
    check = compare_to_golden(f"qk_norm_rope {dtype} D{d} N{n} H{h}", out, ref, gold, floor=1e-5)
    assert check.ok, str(check)


@pytest.mark.parametrize("per_program", [1, 512], ids=["one_row_per_program", "two_rows_per_program"])
def test_rows_per_program(per_program, monkeypatch):
    """The GPU's launch shapes (one long row, or a few short rows, per program; the last program
    ragged over N = 7 rows) in the interpreter, B 2."""
    monkeypatch.setattr(jit_qk_norm_rope, "_ELEMENTS_PER_PROGRAM_INTERPRETED", per_program)
    gen = torch.Generator().manual_seed(per_program)
    x, w, cos, sin = _inputs(2, 7, 3, 64, torch.bfloat16, gen, permuted=True)
    out = qk_norm_rope(x, w, 1e-6, cos, sin, backend="triton")
    _assert_one_step(out, qk_norm_rope_ref(x, w, 1e-6, cos, sin))


def test_reference_is_todays_torch_path():
    """qk_norm_rope_ref = torch.nn.RMSNorm, unflatten, wan_rope (the code WanAttnProcessor runs)."""
    gen = torch.Generator().manual_seed(3)
    x, w, cos, sin = _inputs(2, 33, 3, 64, torch.bfloat16, gen)
    norm = torch.nn.RMSNorm(192, eps=1e-6).to(torch.bfloat16)
    norm.weight.data.copy_(w)
    with torch.no_grad():
        today = wan_rope(norm(x).unflatten(2, (3, -1)), cos, sin).flatten(2)
    assert torch.equal(qk_norm_rope_ref(x, w, 1e-6, cos, sin), today)
    assert torch.equal(qk_norm_rope(x, w, 1e-6, cos, sin, backend="triton"), today)


def test_strided_rows_batch_tables_and_default_eps():
    """x as a chunk of a fused qkv projection (row stride 3C), tables of batch B (expanded,
    stride 0), eps=None (torch.nn.RMSNorm's finfo eps)."""
    gen = torch.Generator().manual_seed(5)
    qkv = torch.randn(2, 50, 3 * 128, generator=gen).to(torch.bfloat16)
    x = qkv.chunk(3, dim=-1)[1]
    w = (0.5 + torch.rand(128, generator=gen)).to(torch.bfloat16)
    cos, sin = (t.expand(2, -1, -1, -1) for t in _tables(50, 64, gen, permuted=True))
    out = qk_norm_rope(x, w, None, cos, sin, backend="triton")
    ref = qk_norm_rope_ref(x, w, None, cos, sin)
    _assert_one_step(out, ref)


def test_nan_stays_in_its_row():
    gen = torch.Generator().manual_seed(9)
    x, w, cos, sin = _inputs(1, 5, 2, 64, torch.float16, gen)
    x[0, 3, 17] = float("nan")
    out = qk_norm_rope(x, w, 1e-6, cos, sin, backend="triton")
    assert torch.isnan(out[0, 3]).all() and not torch.isnan(out[0, [0, 1, 2, 4]]).any()


def test_errors():
    gen = torch.Generator().manual_seed(11)
    x, w, cos, sin = _inputs(1, 8, 2, 64, torch.float32, gen)
    with pytest.raises(ValueError, match=r"`x` must be \[B, N, C\].*x.flatten\(2\)"):
        qk_norm_rope(x.unflatten(2, (2, 64)), w, 1e-6, cos, sin)
    with pytest.raises(ValueError, match=r"`weight` must be the RMSNorm weight of shape \(128,\)"):
        qk_norm_rope(x, w[:64], 1e-6, cos, sin)
    with pytest.raises(ValueError, match=r"`weight` dtype torch.float16 must equal.*\.to\(x.dtype\)"):
        qk_norm_rope(x, w.half(), 1e-6, cos, sin)
    with pytest.raises(ValueError, match=r"`cos` must be Wan's rotary table \[1, N, 1, D\] with N = 8"):
        qk_norm_rope(x, w, 1e-6, cos[:, :4], sin)
    with pytest.raises(ValueError, match=r"`sin` must be Wan's rotary table"):
        qk_norm_rope(x, w, 1e-6, cos, sin[:, :, 0])
    with pytest.raises(ValueError, match=r"head dim D = cos.shape\[-1\] = 48 must be even.*divide C = 128"):
        qk_norm_rope(x, w, 1e-6, cos[..., :48], sin[..., :48])
    with pytest.raises(ValueError, match=r"must be on one device.*\.to\(x.device\)"):
        qk_norm_rope(x, w, 1e-6, cos.to("meta"), sin)
    with pytest.raises(ValueError, match=r"float16, bfloat16 or float32 for the Triton kernel.*backend='ref'"):
        qk_norm_rope(x.double(), w.double(), 1e-6, cos, sin, backend="triton")
    with pytest.raises(ValueError, match=r"`cos` and `sin` must be float32 for the Triton kernel.*\.float\(\)"):
        qk_norm_rope(x, w, 1e-6, cos.double(), sin.double(), backend="triton")
    x6, w6, cos6, sin6 = _inputs(1, 8, 2, 48, torch.float32, gen)  # D 48: not a power of two
    with pytest.raises(ValueError, match=r"head dim D = 48 must be a power of two for the Triton kernel.*'ref'"):
        qk_norm_rope(x6, w6, 1e-6, cos6, sin6, backend="triton")
    assert qk_norm_rope(x6, w6, 1e-6, cos6, sin6, backend="ref").shape == x6.shape
    # The reference takes what torch takes (float64 here).
    out = qk_norm_rope(x.double(), w.double(), 1e-6, cos.double(), sin.double(), backend="ref")
    assert out.dtype == torch.float64


# --------------------------------------------------------------------------- WanDFSProcessor
def _wan_call(model, inputs, config, monkeypatch, fused=True, force=None):
    """One sparse transformer call; returns the output and the backends of the fused calls.
    ``force`` runs the fused op on that backend (the rest of DFSAttn on the config's)."""
    calls = []
    real = accel_processor.qk_norm_rope

    def spy(*args, backend=None):
        calls.append(backend)
        return real(*args, backend=force or backend)

    monkeypatch.setattr(accel_processor, "qk_norm_rope", spy)
    try:
        with apply_dfsattn(model, dataclasses.replace(config, fused_ops=fused)), torch.no_grad():
            out = model(**inputs)[0]
    finally:
        monkeypatch.undo()
    return out, calls


def _wan(dtype, batch):
    model = build_tiny("wan", attention_head_dim=64).to(dtype)  # D = 64, 2 heads: C = 128
    model.rope.float()  # as from_pretrained keeps it (WanTransformer3DModel._keep_in_fp32_modules)
    g = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=torch.randn(batch, 4, 3, 16, 16, generator=g).to(dtype),
                  timestep=torch.full((batch,), 500),
                  encoder_hidden_states=torch.randn(batch, 8, 16, generator=g).to(dtype), return_dict=False)
    sched = DFSSchedule(num_steps=4, skip_steps=0, interval=1, gamma0=0.5, decrement=0.0, dense_layers=())
    return model, inputs, sched


@pytest.mark.parametrize("once", [False, True], ids=["per_call", "permute_once"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_wan_processor_fused_equals_unfused(dtype, once, monkeypatch):
    model, inputs, sched = _wan(dtype, batch=2)
    config = DFSConfig(block=16, tile=4, schedule=sched, backend="ref", permute_once=once)
    unfused, calls = _wan_call(model, inputs, config, monkeypatch, fused=False)
    assert calls == []
    fused_ref, calls = _wan_call(model, inputs, config, monkeypatch)
    assert calls == ["ref"] * 4  # q and k of both sparse layers, with the config's backend
    # The reference path is today's torch code, moved: bit-identical.
    assert torch.equal(fused_ref, unfused)
    fused_kernel, _ = _wan_call(model, inputs, config, monkeypatch, force="triton")
    tol = dict(atol=2e-5, rtol=0) if dtype == torch.float32 else dict(atol=0.02, rtol=0.02)
    torch.testing.assert_close(fused_kernel, unfused, **tol)


def test_wan_processor_dense_calls_fuse_too(monkeypatch):
    """Dense warm-up calls with fused_ops: the fused q/k path, then the stock attention dispatch;
    on the reference backend bit-identical to the untouched model."""
    model, inputs, _ = _wan(torch.float32, batch=1)
    with torch.no_grad():
        stock = model(**inputs)[0]
    dense = DFSSchedule(num_steps=4, skip_steps=4, dense_layers=())
    out, calls = _wan_call(model, inputs, DFSConfig(block=16, tile=4, schedule=dense, backend="ref"), monkeypatch)
    assert calls == ["ref"] * 4
    assert torch.equal(out, stock)
    out, calls = _wan_call(model, inputs, DFSConfig(block=16, tile=4, schedule=dense), monkeypatch, fused=False)
    assert calls == [] and torch.equal(out, stock)


def test_wan_processor_unfusable_keeps_torch_path(monkeypatch):
    """Tables not in float32 (a model cast as a whole), or a head dim that is not a power of two:
    the unfused path runs, as before."""
    model, inputs, sched = _wan(torch.float32, batch=1)
    model.rope.double()
    _, calls = _wan_call(model, inputs, DFSConfig(block=16, tile=4, schedule=sched), monkeypatch)
    assert calls == []
    model = build_tiny("wan", attention_head_dim=48).float()  # D = 48, 2 heads
    model.rope.float()
    _, calls = _wan_call(model, inputs, DFSConfig(block=16, tile=4, schedule=sched), monkeypatch)
    assert calls == []

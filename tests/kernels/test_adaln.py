"""Fused adaLN norms and gated residuals: the references against diffusers' WanTransformerBlock
(bit for bit), the Triton kernels (interpreter on CPU) against the references, and every
ValueError at the boundary.

``modulated_layer_norm`` must match the reference in the test dtype within one rounding step
(``_norm_steps`` <= 2; float32 allows a few steps of statistics arithmetic order) and, against
the float64 golden result, its error may be at most 2x the reference's own plus a small
floor. ``gated_residual`` rounds exactly as torch does, so it must equal the reference.
"""

import importlib

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.transformers.transformer_wan import WanTransformerBlock

from dfsviz.kernels import gated_residual, modulated_layer_norm
from dfsviz.kernels._check import compare_to_golden
from dfsviz.kernels.adaln import gated_residual_ref, modulated_layer_norm_ref

jit_adaln = importlib.import_module("dfsviz.kernels._jit.adaln")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
EPS = 1e-6
_dtype_id = lambda t: str(t).split(".")[-1]  # noqa: E731


def _table(b, c, gen, per_token_n=None):
    """Wan's modulation chunks (shift, scale, gate, c_shift, c_scale, c_gate), strided views of
    one float32 table: [b, 6, C] -> [b, 1, C] chunks, or per token [b, N, 6, C] -> [b, N, C]."""
    if per_token_n is None:
        return (0.5 * torch.randn(b, 6, c, generator=gen)).chunk(6, dim=1)
    return tuple(t.squeeze(2) for t in (0.5 * torch.randn(b, per_token_n, 6, c, generator=gen)).chunk(6, dim=2))


def _golden(x, eps, weight=None, bias=None, scale=None, shift=None):
    """The float64 result the kernel and the reference both approximate."""
    wd = weight.double() if weight is not None else None
    bd = bias.double() if bias is not None else None
    y = F.layer_norm(x.double(), (x.shape[-1],), wd, bd, eps)
    return y * (1 + scale.double()) + shift.double() if scale is not None else y


def _norm_steps(out, ref, x, eps, weight=None, bias=None, scale=None, shift=None):
    """Largest |out - ref| in units of eps(dtype) x the size of the terms that make the output:
    a = (|x| + |mean|) rstd + 1 (x - mean's operands and the row's std, in normalised units:
    float32 noise in the statistics is absolute at that scale), then a |w| + |b|, then
    x |1 + scale| + |shift|. Rounding the output moves it by at most one such unit."""
    xd = x.double()
    mean = xd.mean(-1, keepdim=True)
    rstd = (xd.var(-1, unbiased=False, keepdim=True) + eps).rsqrt()
    mag = (xd.abs() + mean.abs()) * rstd + 1.0
    mag = mag * (weight.double().abs() if weight is not None else 1.0)
    mag = mag + (bias.double().abs() if bias is not None else 0.0)
    if scale is not None:
        mag = mag * (1 + scale.double()).abs() + shift.double().abs()
    finfo = torch.finfo(ref.dtype)
    diff = (out.double() - ref.double()).abs()
    return float((diff / (finfo.eps * mag.clamp_min(finfo.tiny))).max())


def _assert_one_step(out, ref, *args, **kwargs):
    steps = _norm_steps(out, ref, *args, **kwargs)
    assert steps <= (8.0 if ref.dtype == torch.float32 else 2.0), f"{steps:.2f} rounding steps from the reference"


def _norm_case(kind, b, n, c, dtype, gen):
    """x [b, n, C] and the keyword arguments of one norm kind."""
    x = (3.0 * torch.randn(b, n, c, generator=gen) + 0.5).to(dtype)
    affine = dict(weight=(0.5 + torch.rand(c, generator=gen)).to(dtype), bias=(0.3 * torch.randn(c, generator=gen)))
    if kind == "plain":
        return x, {}
    if kind == "affine":  # norm2: weight in the model dtype, bias in float32 (FP32LayerNorm casts both)
        return x, affine
    if kind == "modulated":  # norm1 / norm3: strided [B, 1, C] chunks
        shift, scale = _table(b, c, gen)[:2]
        return x, dict(scale=scale, shift=shift)
    if kind == "batch1_table":  # one table for every batch element
        shift, scale = _table(1, c, gen)[:2]
        return x, dict(scale=scale, shift=shift)
    if kind == "per_token":  # Wan2.2 TI2V: [B, N, C] chunks of a [B, N, 6, C] table
        shift, scale = _table(b, c, gen, per_token_n=n)[:2]
        return x, dict(scale=scale, shift=shift)
    shift, scale = _table(b, c, gen)[:2]
    return x, dict(affine, scale=scale, shift=shift)


NORM_KINDS = ["plain", "affine", "modulated", "batch1_table", "per_token", "affine_modulated"]


def _check_norm(x, kwargs, label):
    out = modulated_layer_norm(x, EPS, **kwargs, backend="triton")
    ref = modulated_layer_norm_ref(x, EPS, **kwargs)
    assert out.dtype == x.dtype and out.shape == x.shape and out.is_contiguous()
    _assert_one_step(out, ref, x, EPS, **kwargs)
    check = compare_to_golden(label, out, ref, _golden(x, EPS, **kwargs), floor=1e-5)
    assert check.ok, str(check)


# --------------------------------------------------------------------------- references = diffusers
def _wan_block(dtype):
    """A tiny diffusers WanTransformerBlock (C = 64, 2 heads, norm2 affine with random weights),
    cast as from_pretrained casts Wan: scale_shift_table and the norms stay float32."""
    torch.manual_seed(0)
    block = WanTransformerBlock(64, 128, 2, cross_attn_norm=True, eps=EPS).eval()
    with torch.no_grad():
        block.norm2.weight.normal_(1.0, 0.3)
        block.norm2.bias.normal_(0.0, 0.3)
    block.to(dtype)
    block.scale_shift_table.data = block.scale_shift_table.data.float()
    block.norm2.float()
    return block


def _block_forward(block, hs, enc, temb, backend):
    """WanTransformerBlock.forward (rotary_emb=None) with its elementwise parts replaced by ours."""
    if temb.ndim == 4:
        mods = [t.squeeze(2) for t in (block.scale_shift_table.unsqueeze(0) + temb.float()).chunk(6, dim=2)]
    else:
        mods = (block.scale_shift_table + temb.float()).chunk(6, dim=1)
    shift, scale, gate, c_shift, c_scale, c_gate = mods
    h = modulated_layer_norm(hs, block.norm1.eps, scale=scale, shift=shift, backend=backend)
    hs = gated_residual(hs, block.attn1(h, None, None, None), gate, backend=backend)
    h = modulated_layer_norm(hs, block.norm2.eps, block.norm2.weight, block.norm2.bias, backend=backend)
    hs = hs + block.attn2(h, enc, None, None)
    h = modulated_layer_norm(hs, block.norm3.eps, scale=c_scale, shift=c_shift, backend=backend)
    return gated_residual(hs, block.ffn(h), c_gate, backend=backend)


@pytest.mark.parametrize("temb_ndim", [3, 4], ids=["wan2.1_temb", "ti2v_per_token_temb"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_dtype_id)
def test_reference_is_wan_block(dtype, temb_ndim):
    """The references run inside the block's forward give diffusers' output bit for bit; the
    kernels give it within the block's own low-precision noise."""
    block = _wan_block(dtype)
    gen = torch.Generator().manual_seed(1)
    hs = (2.0 * torch.randn(2, 37, 64, generator=gen)).to(dtype)
    enc = torch.randn(2, 5, 64, generator=gen).to(dtype)
    temb = torch.randn(2, 6, 64, generator=gen) if temb_ndim == 3 else torch.randn(2, 37, 6, 64, generator=gen)
    with torch.no_grad():
        stock = block(hs, enc, temb, None)
        ours_ref = _block_forward(block, hs, enc, temb, "ref")
        ours_kernel = _block_forward(block, hs, enc, temb, "triton")
    assert torch.equal(ours_ref, stock)
    tol = dict(atol=2e-5, rtol=0) if dtype == torch.float32 else dict(atol=0.05, rtol=0.02)
    torch.testing.assert_close(ours_kernel, stock, **tol)


def test_reference_is_each_stock_expression():
    """Each norm and residual expression of WanTransformerBlock.forward, one at a time."""
    block = _wan_block(torch.bfloat16)
    gen = torch.Generator().manual_seed(2)
    hs = (2.0 * torch.randn(2, 11, 64, generator=gen)).to(torch.bfloat16)
    branch = torch.randn(2, 11, 64, generator=gen).to(torch.bfloat16)
    shift, scale, gate, c_shift, c_scale, c_gate = (block.scale_shift_table + torch.randn(2, 6, 64,
                                                                                       generator=gen)).chunk(6, dim=1)
    with torch.no_grad():
        norm1 = (block.norm1(hs.float()) * (1 + scale) + shift).type_as(hs)
        norm2 = block.norm2(hs.float()).type_as(hs)
        norm3 = (block.norm3(hs.float()) * (1 + c_scale) + c_shift).type_as(hs)
        res1 = (hs.float() + branch * gate).type_as(hs)
        res3 = (hs.float() + branch.float() * c_gate).type_as(hs)
        assert torch.equal(modulated_layer_norm_ref(hs, EPS, scale=scale, shift=shift), norm1)
        assert torch.equal(modulated_layer_norm_ref(hs, EPS, block.norm2.weight, block.norm2.bias), norm2)
        assert torch.equal(modulated_layer_norm_ref(hs, EPS, scale=c_scale, shift=c_shift), norm3)
        assert torch.equal(gated_residual_ref(hs, branch, gate), res1)
        assert torch.equal(gated_residual_ref(hs, branch, c_gate), res3)
        # backend=None on CPU tensors runs the reference
        assert torch.equal(modulated_layer_norm(hs, EPS, scale=scale, shift=shift), norm1)
        assert torch.equal(gated_residual(hs, branch, gate), res1)


# --------------------------------------------------------------------------- modulated_layer_norm kernel
@pytest.mark.parametrize("kind", NORM_KINDS)
@pytest.mark.parametrize("c", [96, 320], ids=lambda c: f"C{c}")
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_norm_kernel_matches_reference(dtype, c, kind):
    gen = torch.Generator().manual_seed(c + len(kind))
    x, kwargs = _norm_case(kind, 2, 13, c, dtype, gen)
    _check_norm(x, kwargs, f"modulated_layer_norm {kind} {dtype} C{c}")


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_norm_kernel_wan14b_width(dtype):
    """C = 5120 (Wan2.1-14B): a non-power-of-two row in a 8192-wide block."""
    gen = torch.Generator().manual_seed(14)
    x, kwargs = _norm_case("affine_modulated", 1, 3, 5120, dtype, gen)
    _check_norm(x, kwargs, f"modulated_layer_norm C5120 {dtype}")


@pytest.mark.parametrize("b, n", [(1, 1), (3, 1), (1, 2)])
def test_norm_kernel_tiny_shapes(b, n):
    gen = torch.Generator().manual_seed(b * 10 + n)
    x, kwargs = _norm_case("modulated", b, n, 96, torch.bfloat16, gen)
    _check_norm(x, kwargs, f"modulated_layer_norm B{b} N{n}")


@pytest.mark.parametrize("per_program, rows_per_program, max_block_c, c",
                         [(128, 1, 16384, 96), (256, 1, 16384, 96), (128, 3, 16384, 96), (256, 8, 16384, 100),
                          (4096, 1, 32, 96), (4096, 16, 32, 100)],
                         ids=["one_row_per_block", "two_rows_per_block", "three_row_blocks_per_program",
                              "four_blocks_of_two_rows", "three_chunks", "ragged_chunks_two_row_blocks"])
def test_norm_launch_shapes(per_program, rows_per_program, max_block_c, c, monkeypatch):
    """The GPU's launch shapes (one or a few rows per block, several row blocks per program with
    a ragged last program over N = 7 rows) and the chunked path of rows longer than
    _MAX_BLOCK_C, in the interpreter, for every norm kind (modulation shared by the program's rows
    or per token, B 2)."""
    monkeypatch.setattr(jit_adaln, "_ELEMENTS_PER_PROGRAM_INTERPRETED", per_program)
    monkeypatch.setattr(jit_adaln, "_NORM_ROWS_PER_PROGRAM_INTERPRETED", rows_per_program)
    monkeypatch.setattr(jit_adaln, "_MAX_BLOCK_C", max_block_c)
    gen = torch.Generator().manual_seed(per_program + rows_per_program + c)
    for kind in NORM_KINDS:
        x, kwargs = _norm_case(kind, 2, 7, c, torch.bfloat16, gen)
        _check_norm(x, kwargs, f"modulated_layer_norm {kind} per_program {per_program} rows_per_program "
                               f"{rows_per_program} max_block_c {max_block_c}")


def test_norm_strided_x_and_any_weight_dtype():
    """x as a chunk of a wider tensor (row stride 2C, batch stride not a multiple of N rows),
    float64 affine parameters (cast to float32, as FP32LayerNorm)."""
    gen = torch.Generator().manual_seed(5)
    wide = torch.randn(9, 2, 2 * 96, generator=gen).to(torch.float16).transpose(0, 1)  # [2, 9, 192], strided
    x = wide[..., 96:]
    assert not x.is_contiguous() and x.stride(-1) == 1
    w = (0.5 + torch.rand(96, generator=gen, dtype=torch.float64))
    b = torch.randn(96, generator=gen, dtype=torch.float64)
    shift, scale = _table(2, 96, gen)[:2]
    _check_norm(x, dict(weight=w, bias=b, scale=scale, shift=shift), "modulated_layer_norm strided x")
    # a scale view without unit stride along C is copied, not misread
    scale_t = torch.randn(2, 96, 1, generator=gen).transpose(1, 2)
    _check_norm(x, dict(scale=scale_t, shift=shift), "modulated_layer_norm scale with C stride 2")


def test_norm_constant_and_nan_rows():
    """A constant row normalises to 0 (variance 0, rstd = 1 / sqrt(eps)); a NaN stays in its row."""
    x = torch.randn(1, 5, 96, generator=torch.Generator().manual_seed(9)).to(torch.bfloat16)
    x[0, 1] = 2.5
    x[0, 3, 17] = float("nan")
    out = modulated_layer_norm(x, EPS, backend="triton")
    assert torch.equal(out[0, 1], torch.zeros(96, dtype=torch.bfloat16))
    assert torch.isnan(out[0, 3]).all() and not torch.isnan(out[0, [0, 1, 2, 4]]).any()


# --------------------------------------------------------------------------- gated_residual kernel
@pytest.mark.parametrize("gate_kind", ["chunk", "batch1_table", "per_token", "bf16_gate"])
@pytest.mark.parametrize("x_dtype, y_dtype", [(torch.float32, torch.float32), (torch.float16, torch.float16),
                                              (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
                                              (torch.float32, torch.bfloat16)],
                         ids=lambda t: _dtype_id(t))
def test_residual_kernel_equals_reference(x_dtype, y_dtype, gate_kind):
    """x + y * gate rounds as torch does (one float32 product, one float32 sum, one cast): equal."""
    gen = torch.Generator().manual_seed(3)
    b, n, c = 2, 13, 96
    x = (3.0 * torch.randn(b, n, c, generator=gen)).to(x_dtype)
    y = torch.randn(b, n, c, generator=gen).to(y_dtype)
    if gate_kind == "per_token":
        gate = _table(b, c, gen, per_token_n=n)[2]
    else:
        gate = _table(1 if gate_kind == "batch1_table" else b, c, gen)[2]
    if gate_kind == "bf16_gate":
        gate = gate.to(torch.bfloat16)
    out = gated_residual(x, y, gate, backend="triton")
    ref = gated_residual_ref(x, y, gate)
    assert out.dtype == x_dtype and out.shape == x.shape and out.is_contiguous()
    assert torch.equal(out, ref), f"max |out - ref| = {(out.double() - ref.double()).abs().max():.3e}"
    gold = x.double() + y.double() * gate.double()
    check = compare_to_golden(f"gated_residual {x_dtype} {y_dtype} {gate_kind}", out, ref, gold, floor=1e-6)
    assert check.ok, str(check)


@pytest.mark.parametrize("per_program, block_c, c", [(32, 32, 96), (4096, 64, 100), (65536, 2048, 5120)],
                         ids=["tiles_of_one_row", "ragged_column_tiles", "wan14b_width"])
def test_residual_tiles_and_strides(per_program, block_c, c, monkeypatch):
    """Column tiles (ragged last tile), one row per program, strided x and y (chunks of wider
    tensors) and B > 1."""
    monkeypatch.setattr(jit_adaln, "_ELEMENTS_PER_PROGRAM_INTERPRETED", per_program)
    monkeypatch.setattr(jit_adaln, "_RESIDUAL_BLOCK_C", block_c)
    gen = torch.Generator().manual_seed(c)
    x = torch.randn(3, 5, 2 * c, generator=gen).to(torch.bfloat16)[..., :c]
    y = torch.randn(5, 3, c, generator=gen).to(torch.bfloat16).transpose(0, 1)
    gate = _table(3, c, gen)[5]
    assert torch.equal(gated_residual(x, y, gate, backend="triton"), gated_residual_ref(x, y, gate))


def test_empty_inputs():
    x = torch.randn(2, 0, 96).to(torch.bfloat16)
    shift, scale, gate = _table(2, 96, torch.Generator().manual_seed(0))[:3]
    assert modulated_layer_norm(x, EPS, scale=scale, shift=shift, backend="triton").shape == (2, 0, 96)
    assert gated_residual(x, x, gate, backend="triton").shape == (2, 0, 96)


# --------------------------------------------------------------------------- errors
def test_norm_errors():
    gen = torch.Generator().manual_seed(11)
    x, kw = _norm_case("affine_modulated", 2, 8, 96, torch.float32, gen)
    w, scale, shift = kw["weight"], kw["scale"], kw["shift"]
    with pytest.raises(ValueError, match=r"`x` must be a torch tensor \(got ndarray\)"):
        modulated_layer_norm(x.numpy(), EPS)
    with pytest.raises(ValueError, match=r"`x` must be \[B, N, C\] token rows \(got shape \(16, 96\)\).*flatten"):
        modulated_layer_norm(x.flatten(0, 1), EPS)
    with pytest.raises(ValueError, match=r"`x` must be a floating-point tensor \(got torch.int64\)"):
        modulated_layer_norm(x.long(), EPS)
    with pytest.raises(ValueError, match=r"`eps` must be a finite float >= 0 \(got -1.0\).*block.norm1.eps"):
        modulated_layer_norm(x, -1.0)
    with pytest.raises(ValueError, match=r"`eps` must be a finite float >= 0 \(got None\)"):
        modulated_layer_norm(x, None)
    with pytest.raises(ValueError, match=r"`weight` must be a floating-point LayerNorm weight of shape \(96,\).*"
                                         r"\(got shape \(64,\), torch.float32\)"):
        modulated_layer_norm(x, EPS, w[:64])
    with pytest.raises(ValueError, match=r"`bias` must be .* of shape \(96,\).*\(got list\)"):
        modulated_layer_norm(x, EPS, w, [0.0] * 96)
    with pytest.raises(ValueError, match=r"`scale` and `shift` must be given together \(got `scale` without "
                                         r"`shift`\).*neither"):
        modulated_layer_norm(x, EPS, scale=scale)
    with pytest.raises(ValueError, match=r"got `shift` without `scale`"):
        modulated_layer_norm(x, EPS, shift=shift)
    with pytest.raises(ValueError, match=r"`scale` must be \[B, 1, C\] or \[1, 1, C\] .*B = 2, N = 8, C = 96 "
                                         r"\(got shape \(2, 96\)\).*chunk\(6, dim=1\)"):
        modulated_layer_norm(x, EPS, scale=scale[:, 0], shift=shift)
    with pytest.raises(ValueError, match=r"`shift` must be \[B, 1, C\].*\(got shape \(3, 1, 96\)\)"):
        modulated_layer_norm(x, EPS, scale=scale, shift=shift.repeat(2, 1, 1)[:3])
    with pytest.raises(ValueError, match=r"`x`, `scale`, `shift` must be on one device.*\.to\(x.device\)"):
        modulated_layer_norm(x, EPS, scale=scale.to("meta"), shift=shift)
    with pytest.raises(ValueError, match=r"`x` dtype must be float16, bfloat16 or float32 for the Triton kernel"):
        modulated_layer_norm(x.double(), EPS, backend="triton")
    with pytest.raises(ValueError, match=r"`scale` must be float32 for the Triton kernel \(got torch.bfloat16\).*"
                                         r"\.float\(\) or use backend='ref'"):
        modulated_layer_norm(x, EPS, scale=scale.bfloat16(), shift=shift, backend="triton")
    with pytest.raises(ValueError, match=r"`shift` must be float32 for the Triton kernel"):
        modulated_layer_norm(x, EPS, scale=scale, shift=shift.double(), backend="triton")
    with pytest.raises(ValueError, match=r"`backend` must be one of"):
        modulated_layer_norm(x, EPS, backend="cuda")
    # The reference takes what torch takes (float64 here, computed in float32 as FP32LayerNorm).
    assert modulated_layer_norm(x.double(), EPS, scale=scale, shift=shift, backend="ref").dtype == torch.float64


def test_residual_errors():
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(2, 8, 96, generator=gen)
    gate = _table(2, 96, gen)[2]
    with pytest.raises(ValueError, match=r"`y` must be \[B, N, C\] token rows"):
        gated_residual(x, x[0], gate)
    with pytest.raises(ValueError, match=r"`y` must have x's shape \(2, 8, 96\) \(got \(2, 7, 96\)\)"):
        gated_residual(x, x[:, :7], gate)
    with pytest.raises(ValueError, match=r"`y` must be a floating-point tensor"):
        gated_residual(x, x.int(), gate)
    with pytest.raises(ValueError, match=r"`gate` must be \[B, 1, C\] or \[1, 1, C\].*\(got shape \(2, 1, 64\)\)"):
        gated_residual(x, x, gate[..., :64])
    with pytest.raises(ValueError, match=r"`gate` must be a torch tensor \(got float\)"):
        gated_residual(x, x, 0.5)
    with pytest.raises(ValueError, match=r"`gate` must be a floating-point tensor \(got torch.int32\)"):
        gated_residual(x, x, gate.int())
    with pytest.raises(ValueError, match=r"`x`, `y`, `gate` must be on one device"):
        gated_residual(x, x.to("meta"), gate)
    with pytest.raises(ValueError, match=r"`y` dtype must be float16, bfloat16 or float32 for the Triton kernel"):
        gated_residual(x, x.double(), gate, backend="triton")
    with pytest.raises(ValueError, match=r"`gate` dtype must be float16, bfloat16 or float32 for the Triton"):
        gated_residual(x, x, gate.double(), backend="triton")

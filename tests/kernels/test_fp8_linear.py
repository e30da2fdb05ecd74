"""FP8 linear layers: the row quantization (PyTorch rule and its Triton pass, interpreter on CPU),
the simulation against the float64 product of the unquantized inputs, and the kernel path
(Triton quantization + torch._scaled_mm, which the CPU also runs) against the simulation."""

import math
from types import SimpleNamespace

import pytest
import torch

from dfsviz.kernels._dispatch import check_fp8_capability
from dfsviz.kernels.fp8 import FP8_MAX
from dfsviz.kernels.fp8_linear import (
    Fp8Weight,
    fp8_linear,
    fp8_linear_ref,
    quantize_rows_fp8,
    quantize_weight_fp8,
)
from dfsviz.kernels._jit.fp8 import quantize_rows_fp8_fwd


def _rows(m, k, gen, spread=(-3, 3)):
    """Rows whose magnitudes span ``spread`` decades, one all-zero row."""
    x = torch.randn(m, k, generator=gen) * torch.logspace(*spread, m)[:, None]
    x[1] = 0.0
    return x


def test_row_scales_are_the_smallest_powers_of_two_that_fit():
    x = _rows(40, 96, torch.Generator().manual_seed(0), (-30, 30))
    x8, scales = quantize_rows_fp8(x)
    assert x8.dtype == torch.float8_e4m3fn and x8.shape == x.shape and scales.shape == (40, 1)
    for m in range(40):
        amax = float(x[m].abs().max())
        expected = 1.0 if amax == 0 else 2.0 ** math.ceil(math.log2(amax / FP8_MAX))
        assert float(scales[m, 0]) == expected, (m, amax)
    dequantized = x8.float() * scales
    assert bool(((dequantized - x).abs() <= x.abs().amax(dim=1, keepdim=True) * 2.0 ** -4).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("k", [96, 1040, 2100])  # one chunk; 2 chunks, the last short; 3 chunks
def test_triton_row_pass_is_the_rule_bit_for_bit(dtype, k):
    x = _rows(37, k, torch.Generator().manual_seed(k)).to(dtype)
    x[5, 7] = float("nan")  # a NaN row: scale NaN, as torch's amax keeps it
    want8, want_scale = quantize_rows_fp8(x)
    got8, got_scale = quantize_rows_fp8_fwd(x)
    assert got8.dtype == torch.float8_e4m3fn and got8.shape == x.shape and got8.is_contiguous()
    assert torch.isnan(got_scale[5]).all()
    finite = torch.ones(37, dtype=torch.bool)
    finite[5] = False
    assert torch.equal(got_scale[finite], want_scale[finite])
    # values, not bytes: the interpreter writes -0 as +0, which no product can tell apart
    assert torch.equal(got8[finite].float(), want8[finite].float())


def test_triton_row_pass_takes_a_row_stride():
    x = _rows(20, 256, torch.Generator().manual_seed(3))
    wide = torch.zeros(20, 300)
    wide[:, :256] = x
    got8, got_scale = quantize_rows_fp8_fwd(wide[:, :256])
    want8, want_scale = quantize_rows_fp8(x)
    assert torch.equal(got_scale, want_scale) and torch.equal(got8.float(), want8.float())


def _layer(n, k, gen, bias=True):
    """A linear layer at a trained scale (std 1 / sqrt(K)) in bfloat16, its FP8 weight and input."""
    w = (torch.randn(n, k, generator=gen) / math.sqrt(k)).bfloat16()
    b = torch.randn(n, generator=gen).bfloat16() if bias else None
    return w, b, quantize_weight_fp8(w, b)


@pytest.mark.parametrize("k", [256, 1024])
def test_simulation_against_float64(k):
    """docs/kernels.md "FP8 linear layers": the error of the e4m3 product against the exact product
    of the unquantized inputs, relative to the output's RMS."""
    gen = torch.Generator().manual_seed(k)
    w, b, weight = _layer(64, k, gen)
    x = torch.randn(3, 200, k, generator=gen).bfloat16()
    y = fp8_linear_ref(x, weight)
    exact = torch.nn.functional.linear(x.double(), w.double(), b.double())
    rms = exact.pow(2).mean().sqrt()
    assert y.dtype == torch.bfloat16 and y.shape == (3, 200, 64)
    assert float((y.double() - exact).pow(2).mean().sqrt() / rms) < 0.03
    assert float((y.double() - exact).abs().max() / rms) < 0.15
    bf16 = torch.nn.functional.linear(x, w, b)  # the bf16 layer itself is ~100x closer
    assert float((bf16.double() - exact).pow(2).mean().sqrt() / rms) < 0.005


def test_weight_scales_are_per_output_channel():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(32, 64, generator=gen) * torch.logspace(-2, 2, 32)[:, None]
    weight = quantize_weight_fp8(w)
    assert weight.shape == (32, 64) and weight.scale.shape == (32,) and weight.bias is None
    x8, scales = quantize_rows_fp8(w)
    assert torch.equal(weight.scale, scales[:, 0]) and torch.equal(weight.w8.float(), x8.float())


@pytest.mark.parametrize("bias", [True, False])
def test_kernel_path_against_simulation(bias):
    """The Triton row pass and torch._scaled_mm (run by the CPU here, by cuBLAS on the GPU) against
    the simulation: the same e4m3 operands and scales, float32 sums in another order, so within one
    bfloat16 rounding of the output."""
    gen = torch.Generator().manual_seed(7)
    _, _, weight = _layer(48, 1040, gen, bias)
    x = torch.randn(2, 150, 1040, generator=gen).bfloat16()
    got = fp8_linear(x, weight, backend="triton")
    want = fp8_linear_ref(x, weight)
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    assert bool(((got.float() - want.float()).abs() <= want.float().abs() * 2.0 ** -7 + 1e-6).all())


def test_ref_backend_runs_any_dtype_and_shape():
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(10, 30, generator=gen)
    weight = quantize_weight_fp8(w)
    x = torch.randn(4, 30, generator=gen, dtype=torch.float64)
    y = fp8_linear(x, weight, backend="ref")
    assert y.dtype == torch.float64 and y.shape == (4, 10)
    with pytest.raises(ValueError, match="multiples of 16"):
        fp8_linear(x.bfloat16(), weight, backend="triton")


def test_bad_inputs_are_refused_with_the_fix():
    gen = torch.Generator().manual_seed(4)
    _, _, weight = _layer(16, 32, gen)
    with pytest.raises(ValueError, match="32 features|K = 32"):
        fp8_linear(torch.randn(3, 31).bfloat16(), weight)
    with pytest.raises(ValueError, match="bfloat16"):
        fp8_linear(torch.randn(3, 32), weight, backend="triton")
    with pytest.raises(TypeError, match="Fp8Weight"):
        fp8_linear(torch.randn(3, 32), torch.randn(16, 32))
    with pytest.raises(ValueError, match="integer|floating-point"):
        fp8_linear(torch.ones(3, 32, dtype=torch.int64), weight)
    with pytest.raises(ValueError, match=r"\[16\]"):
        quantize_weight_fp8(torch.randn(16, 32), torch.randn(15))
    with pytest.raises(ValueError, match="K >= 1"):
        quantize_rows_fp8(torch.randn(3, 0))
    assert isinstance(weight, Fp8Weight)


def test_a_gpu_without_fp8_is_refused_naming_the_option_that_asked():
    """The accel layer asks for linear_precision='fp8'; the message names it and its alternative,
    not attention's precision='fp8'."""
    a100 = SimpleNamespace(major=8, minor=0, name="NVIDIA A100-SXM4-80GB")
    with pytest.raises(ValueError, match=r"^linear_precision='fp8' needs a GPU with FP8 tensor cores, .*A100-SXM4-80GB "
                                         r"has 8.0: use linear_precision='native', or backend='ref'"):
        check_fp8_capability(a100, "linear_precision='fp8'", "linear_precision='native'")

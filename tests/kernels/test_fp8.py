"""FP8 attention: the block quantization, its PyTorch simulation against the float64 golden,
and the Triton FP8 kernel (interpreter on CPU) against the simulation's arithmetic; the same for
P . V in FP8 (``precision="fp8_pv"``)."""

import importlib
import math
from types import SimpleNamespace

import pytest
import torch
import triton
import triton.language as tl

from dfsviz.kernels import _dispatch
from dfsviz.kernels._check import compare_to_golden
from dfsviz.kernels._jit.fp8 import p_e4m3 as p_e4m3_jit
from dfsviz.kernels.block_sparse_attention import block_sparse_attention
from dfsviz.kernels.fp8 import (
    FP8_MAX,
    P_SCALE,
    block_sparse_attention_fp8_ref,
    dequantize_fp8_blocks,
    key_mean,
    p_e4m3,
    quantize_fp8_blocks,
    quantize_qk_fp8,
    quantize_v_fp8,
)
from dfsviz.sparse.attention import block_sparse_attention_ref
from dfsviz.sparse.grid import LatentGrid
from dfsviz.sparse.masks import BlockMask
from dfsviz.sparse.orders import make_order

GRID_217 = LatentGrid(6, 6, 6, text_len=1)
GRID_256 = LatentGrid(4, 8, 8)  # an even N: 4 whole blocks of 64
jit_attention = importlib.import_module("dfsviz.kernels._jit.attention")
DESC, POINTER = "_block_sparse_attention_desc_kernel", "_block_sparse_attention_kernel"  # launched_kernels' names


def _inputs(n, d, dtype, gen, key_offset=3.0, heads=2, bsz=1):
    """Unit-variance q, v and keys that share an offset (as the keys of video models do)."""
    q, k, v = (torch.randn(bsz, heads, n, d, generator=gen) for _ in range(3))
    k = k + key_offset * torch.randn(d, generator=gen)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _mask(bsz, heads, n, block, gen):
    m = -(-n // block)
    dense = torch.rand(bsz, heads, m, m, generator=gen) < 0.6
    dense[..., 0, :] = False  # one query block keeps nothing: output 0, LSE -inf
    dense[..., -1, -1] = True  # the short last key block is kept somewhere
    return BlockMask.from_dense(dense, n, block)


def test_block_scales_are_the_smallest_powers_of_two_that_fit():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 70, 16, generator=gen) * torch.logspace(-8, 6, 70)[None, None, :, None]
    x[0, 0, :32] = 0.0  # an all-zero block
    x8, scales = quantize_fp8_blocks(x, 32)
    assert x8.dtype == torch.float8_e4m3fn and x8.shape == x.shape and scales.shape == (2, 3, 3)
    for b in range(2):
        for h in range(3):
            for u in range(3):
                amax = float(x[b, h, 32 * u:32 * (u + 1)].abs().max())
                expected = 1.0 if amax == 0 else 2.0 ** math.ceil(math.log2(amax / FP8_MAX))
                assert float(scales[b, h, u]) == expected, (b, h, u, amax)
    assert float(x8.float().abs().max()) <= FP8_MAX


def test_dequantization_is_within_half_an_fp8_step():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 2, 100, 64, generator=gen) * 5
    x8, scales = quantize_fp8_blocks(x, 32)
    back = dequantize_fp8_blocks(x8, scales, 32)
    per_token = scales.repeat_interleave(32, dim=2)[:, :, :100, None]
    # e4m3: 3 mantissa bits (relative step 2^-3, rounding error <= 2^-4 of |x|); subnormals
    # below 2^-6 have the absolute step 2^-9 (error <= 2^-10), times the block's scale.
    bound = torch.maximum(x.abs() * 2.0**-4, per_token * 2.0**-10)
    assert bool(((back - x).abs() <= bound).all())
    assert torch.equal(dequantize_fp8_blocks(*quantize_fp8_blocks(back, 32), 32), back)  # fp8 values round-trip


def test_smoothing_keeps_the_softmax_and_saves_the_accuracy():
    """A shared key offset changes no softmax; smoothed, it costs FP8 nothing, unsmoothed a lot."""
    n, d = 217, 64
    gen = torch.Generator().manual_seed(2)
    q, k, v = _inputs(n, d, torch.float32, gen, key_offset=0.0)
    mask = _mask(1, 2, n, 64, gen)
    shifted = k + 40.0 * torch.randn(d, generator=gen)
    gold = block_sparse_attention_ref(q.double(), k.double(), v.double(), mask)
    sim = block_sparse_attention_fp8_ref(q, shifted, v, mask)
    quant = quantize_qk_fp8(q, shifted - shifted.mean(dim=2, keepdim=True), 64)
    assert float(quant.k_mean.abs().max()) < 1e-5, "the helper sees keys already centred"
    q8, qs = quantize_fp8_blocks(q, 64)
    k8, ks = quantize_fp8_blocks(shifted, 64)  # no smoothing
    unsmoothed = block_sparse_attention_ref(dequantize_fp8_blocks(q8, qs, 64), dequantize_fp8_blocks(k8, ks, 64),
                                            v, mask)
    err_smoothed = float((sim.double() - gold).abs().max())
    err_unsmoothed = float((unsmoothed.double() - gold).abs().max())
    assert err_smoothed < 0.1 and err_unsmoothed > 5 * err_smoothed, (err_smoothed, err_unsmoothed)


@pytest.mark.parametrize("precision, max_err, max_lse_err", [("fp8", 0.1, 0.1), ("fp8_pv", 0.15, 0.15)])
@pytest.mark.parametrize("order_name", [None, "hilbert3d"], ids=lambda o: o or "noorder")
@pytest.mark.parametrize("d", [64, 128], ids=lambda d: f"d{d}")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_simulation_error_against_the_float64_golden(dtype, d, order_name, precision, max_err, max_lse_err):
    """The documented error of FP8 attention: for unit-variance q, v and keys with a shared
    offset, out within 0.1 (max; 0.15 with P . V in FP8) and 0.01 (mean) of float64 attention
    of the unquantized inputs; the LSE within 0.1 (0.15 with P . V in FP8: the log of the sum of
    the e4m3 P, up to ln 1.108 above the exact sum's)."""
    n = 217
    gen = torch.Generator().manual_seed(d + (order_name is None))
    q, k, v = _inputs(n, d, dtype, gen)
    mask = _mask(1, 2, n, 64, gen)
    order = make_order(order_name, GRID_217) if order_name else None
    out, lse = block_sparse_attention(q, k, v, mask, order=order, return_lse=True, precision=precision,
                                      backend="ref")
    gold, gold_lse = block_sparse_attention_ref(q.double(), k.double(), v.double(), mask, order=order,
                                                return_lse=True)
    assert out.dtype == dtype and lse.dtype == torch.float32
    err = (out.double() - gold).abs()
    finite = torch.isfinite(gold_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    lse_err = float((lse.double() - gold_lse)[finite].abs().max())
    assert float(err.max()) < max_err and float(err.mean()) < 0.01 and lse_err < max_lse_err, (
        float(err.max()), float(err.mean()), lse_err)


def _dequantized(q, k, block, order):
    """The kernel's exact inputs: dequantized q and smoothed k in the ordered sequence."""
    perm = order.perm if order is not None else None
    quant = quantize_qk_fp8(q, k, block, perm)
    qd = dequantize_fp8_blocks(quant.q8, quant.q_scale, block)
    kd = dequantize_fp8_blocks(quant.k8, quant.k_scale, block)
    return qd, kd, quant


def _grid_case(dtype, d: int, order_name: str | None, block: int, seed: int):
    """(q, k, v, mask, order) on the 217-token grid: random inputs, a random mask of ``block``,
    the order ``order_name`` (None: no order)."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = _inputs(217, d, dtype, gen)
    mask = _mask(1, 2, 217, block, gen)
    return q, k, v, mask, make_order(order_name, GRID_217) if order_name else None


@pytest.mark.parametrize("block", [32, 128], ids=lambda b: f"b{b}")
@pytest.mark.parametrize("order_name", [None, "hilbert3d"], ids=lambda o: o or "noorder")
@pytest.mark.parametrize("d", [64, 128], ids=lambda d: f"d{d}")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_kernel_matches_the_quantized_golden(dtype, d, order_name, block):
    """The FP8 kernel against float64 attention of its own (dequantized, exact) inputs: at most
    2x the error of the reference run on those inputs in the test dtype, plus a floor."""
    q, k, v, mask, order = _grid_case(dtype, d, order_name, block, seed=7 * d + block)
    out, lse = block_sparse_attention(q, k, v, mask, order=order, return_lse=True, precision="fp8",
                                      backend="triton")
    qd, kd, quant = _dequantized(q, k, block, order)
    vo = order.apply(v) if order is not None else v
    gold, gold_lse = block_sparse_attention_ref(qd.double(), kd.double(), vo.double(), mask, return_lse=True)
    ref, ref_lse = block_sparse_attention_ref(qd.to(dtype), kd.to(dtype), vo, mask, return_lse=True)
    if order is not None:
        gold, gold_lse, ref, ref_lse = (order.restore(x.unsqueeze(-1)).squeeze(-1) if x.dim() == 3 else
                                        order.restore(x) for x in (gold, gold_lse, ref, ref_lse))
    shift = quant.lse_shift(q, d**-0.5).double()
    failures = [str(c) for c in (compare_to_golden("out", out, ref, gold, floor=1e-5),
                                 compare_to_golden("lse", lse, ref_lse + shift, gold_lse + shift, floor=1e-4))
                if not c.ok]
    assert not failures, "\n".join(failures)


def _check_against_the_simulation(q, k, v, mask, order, precision: str):
    """The Triton kernel against the simulation of the same quantization: the same logits up to
    float32 summation order, so the LSE within 1e-4; "fp8" out within 2^-7 (P . V in the input
    dtype against float32), "fp8_pv" within one rounding of the output dtype (the kernel rounds
    P against its running row max, the simulation against the final one, in one product over all
    keys: both round to the same e4m3 values, the max being a whole power of two)."""
    out, lse = block_sparse_attention(q, k, v, mask, order=order, return_lse=True, precision=precision,
                                      backend="triton")
    sim, sim_lse = block_sparse_attention_fp8_ref(q, k, v, mask, order=order, return_lse=True, precision=precision)
    assert out.dtype == q.dtype and out.shape == q.shape
    if precision == "fp8":
        torch.testing.assert_close(out.float(), sim.float(), rtol=0, atol=2**-7)
    else:
        torch.testing.assert_close(out.float(), sim.float(), rtol=2**-7 if q.dtype == torch.bfloat16 else 2**-10,
                                   atol=1e-5)
    torch.testing.assert_close(lse, sim_lse, rtol=0, atol=1e-4)


def test_fp8_kernel_agrees_with_the_simulation():
    n, d = 217, 64
    gen = torch.Generator().manual_seed(5)
    q, k, v = _inputs(n, d, torch.bfloat16, gen, bsz=2)
    mask = _mask(2, 2, n, 64, gen)
    _check_against_the_simulation(q, k, v, mask, make_order("hilbert3d", GRID_217), "fp8")


def _budget_mask(bsz: int, heads: int, n: int, block: int, gen) -> BlockMask:
    """Per-head budgets: every (batch, head) keeps its own number of key blocks per query block,
    from one to all (as a calibrated config's heads and dense heads do); every head's first
    query block keeps nothing (output 0, LSE -inf) and its last query block keeps the last key
    block (the short one of a ragged N)."""
    m = -(-n // block)
    keep = torch.zeros(bsz, heads, m, m, dtype=torch.bool)
    budgets = torch.randint(1, m + 1, (bsz, heads), generator=gen)
    budgets.view(-1)[0] = m  # one dense head
    for b in range(bsz):
        for h in range(heads):
            for u in range(1, m):
                keep[b, h, u, torch.randperm(m, generator=gen)[:int(budgets[b, h])]] = True
            keep[b, h, -1, -1] = True
    return BlockMask.from_dense(keep, n, block)


@pytest.mark.parametrize("grid", [GRID_217, GRID_256], ids=lambda g: f"n{g.num_tokens}")
@pytest.mark.parametrize("order_name", [None, "hilbert3d"], ids=lambda o: o or "noorder")
@pytest.mark.parametrize("d", [64, 128], ids=lambda d: f"d{d}")
@pytest.mark.parametrize("precision", ["fp8", "fp8_pv"])
def test_descriptor_kernel_matches_the_simulation(precision, d, order_name, grid, launched_kernels):
    """Where a copy engine runs (Hopper; the interpreter), FP8 takes the tensor-descriptor kernel
    whenever every input's key blocks are contiguous rows: "fp8_pv" always (q8, k8 and the
    transposed v8 are ordered copies; the output goes back through the order), "fp8" without
    an order; "fp8" with an order gathers v through it in the pointer kernel. Ragged and even
    N, B 2, heads of very different budgets: the simulation's bounds."""
    n = grid.num_tokens
    gen = torch.Generator().manual_seed(n + d + len(precision))
    q, k, v = _inputs(n, d, torch.bfloat16, gen, heads=3, bsz=2)
    mask = _budget_mask(2, 3, n, 64, gen)
    order = make_order(order_name, grid) if order_name else None
    _check_against_the_simulation(q, k, v, mask, order, precision)
    assert launched_kernels == [POINTER if precision == "fp8" and order is not None else DESC]


@pytest.mark.parametrize("precision, order_name", [("fp8", None), ("fp8_pv", "hilbert3d")])
def test_fp8_descriptor_kernel_candidates(precision, order_name, monkeypatch, launched_kernels):
    """The Hopper candidates with FP8: a persistent grid walking several work items per program
    (heads in LPT order), with warp-specialized key loops, stays within the simulation's bounds."""
    monkeypatch.setattr(jit_attention, "_INTERPRETED_DESC_FLAGS", dict(PERSISTENT=True, WARP_SPECIALIZE=True))
    gen = torch.Generator().manual_seed(13)
    q, k, v = _inputs(217, 64, torch.bfloat16, gen, heads=3, bsz=2)
    mask = _budget_mask(2, 3, 217, 32, gen)
    _check_against_the_simulation(q, k, v, mask, make_order(order_name, GRID_217) if order_name else None, precision)
    assert launched_kernels == [DESC]


def test_fp8_descriptor_and_pointer_kernels_agree(monkeypatch, launched_kernels):
    """The pointer kernel keeps running FP8 where descriptors cannot: "fp8" with a v that is not
    16-byte aligned (one element into its buffer), and any FP8 call without a copy engine
    (Ada, compute capability 8.9). Same tiles in the interpreter, so the same values as the
    descriptor kernel's."""
    n, d = 217, 64
    gen = torch.Generator().manual_seed(14)
    q, k, v = _inputs(n, d, torch.bfloat16, gen, bsz=2)
    mask = _budget_mask(2, 2, n, 64, gen)
    order = make_order("hilbert3d", GRID_217)
    aligned = block_sparse_attention(q, k, v, mask, return_lse=True, precision="fp8", backend="triton")
    shifted = torch.empty(v.numel() + 1, dtype=v.dtype)[1:].view_as(v).copy_(v)
    assert shifted.data_ptr() % 16 != 0
    unaligned = block_sparse_attention(q, k, shifted, mask, return_lse=True, precision="fp8", backend="triton")
    described = block_sparse_attention(q, k, v, mask, order=order, return_lse=True, precision="fp8_pv",
                                       backend="triton")
    monkeypatch.setattr(jit_attention, "_copy_engine", lambda device: False)
    pointed = block_sparse_attention(q, k, v, mask, order=order, return_lse=True, precision="fp8_pv",
                                     backend="triton")
    assert launched_kernels == [DESC, POINTER, DESC, POINTER]
    for (out_a, lse_a), (out_b, lse_b) in ((aligned, unaligned), (described, pointed)):
        torch.testing.assert_close(out_a, out_b, rtol=0, atol=0)
        torch.testing.assert_close(lse_a, lse_b, rtol=0, atol=0)


def test_errors():
    q, k, v = (torch.randn(1, 2, 64, 64) for _ in range(3))
    mask = BlockMask.full(1, 2, 64, 32)
    with pytest.raises(ValueError, match=r"`precision` must be one of \['fp8', 'fp8_pv', 'native'\] \(got 'fp16'\)"):
        block_sparse_attention(q, k, v, mask, precision="fp16")
    for precision in ("fp8", "fp8_pv"):
        with pytest.raises(ValueError, match=rf"precision='{precision}' takes float16 or bfloat16 q, k, v \(got "
                                             r"torch.float32\)"):
            block_sparse_attention(q, k, v, mask, precision=precision, backend="triton")
    with pytest.raises(ValueError, match=r"`precision` must be one of \['fp8', 'fp8_pv'\] for the FP8 simulation "
                                         r"\(got 'native'\); use block_sparse_attention_ref"):
        block_sparse_attention_fp8_ref(q, k, v, mask, precision="native")
    a100 = SimpleNamespace(major=8, minor=0, name="NVIDIA A100-SXM4-80GB")
    with pytest.raises(ValueError, match=r"precision='fp8' \(and 'fp8_pv'\) needs .*compute capability >= 8.9 "
                                         r".*NVIDIA A100-SXM4-80GB has 8.0: use "
                                         r"precision='native', or backend='ref'"):
        _dispatch.check_fp8_capability(a100)
    _dispatch.check_fp8_capability(SimpleNamespace(major=9, minor=0, name="H200"))  # no error
    _dispatch.check_fp8_capability(SimpleNamespace(major=8, minor=9, name="L40S"))


def test_fp8_on_cpu_without_the_interpreter_names_the_simulation(monkeypatch):
    monkeypatch.setattr(_dispatch, "_INTERPRET", False)
    q, k, v = (torch.randn(1, 2, 64, 64, dtype=torch.bfloat16) for _ in range(3))
    with pytest.raises(ValueError, match=r"backend 'triton' cannot run on tensors on \['cpu'\].*backend='ref'"):
        block_sparse_attention(q, k, v, BlockMask.full(1, 2, 64, 32), precision="fp8", backend="triton")
    out = block_sparse_attention(q, k, v, BlockMask.full(1, 2, 64, 32), precision="fp8")  # auto: the simulation
    assert torch.equal(out, block_sparse_attention_fp8_ref(q, k, v, BlockMask.full(1, 2, 64, 32)))


@pytest.mark.parametrize("backend", ["ref", "triton"])
def test_diffusers_layout(backend):
    """diffusers hands [B, N, H, D]; its transpose(1, 2) view quantizes and attends like a copy."""
    n, d = 97, 64
    gen = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(2, n, 3, d, generator=gen).to(torch.bfloat16).transpose(1, 2) for _ in range(3))
    mask = _mask(2, 3, n, 32, gen)
    out = block_sparse_attention(q, k, v, mask, precision="fp8", backend=backend)
    dense = block_sparse_attention(q.contiguous(), k.contiguous(), v.contiguous(), mask, precision="fp8",
                                   backend=backend)
    assert torch.equal(out, dense)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("ordered", [False, True])
def test_the_quantization_kernels_equal_the_simulation_bit_for_bit(dtype, ordered, device):
    """The Triton passes (the FP8 kernel's inputs) against quantize_qk_fp8's PyTorch ops: the
    same e4m3 bytes and scales given the key mean, itself within float32 rounding of the
    simulation's, over blocks spanning 2^-20 .. 2^12 in size, a block of subnormal values on the
    GPU (a subnormal scale, in bfloat16), a rounding tie, a zero block, an inf key and a NaN
    query, a ragged last block."""
    from dfsviz.kernels._jit.fp8 import quantize_attention_fp8_fwd

    gen = torch.Generator().manual_seed(3)
    n, d, block = GRID_217.num_tokens, 64, 16  # 217 tokens: 14 blocks, the last one short
    q, k, _ = _inputs(n, d, torch.float32, gen)
    size = torch.logspace(-20, 12, n, base=2.0)[None, None, :, None]
    q, k = q * size, k * size.flip(2)
    q[0, 0, 16:32] = 0.0  # a zero block
    if device == "cuda":  # (the interpreter converts subnormal bfloat16 to float32 wrongly)
        q[0, 1, 48:64] = torch.randn(16, d, generator=gen) * 2.0**-130  # subnormal (zeros in float16)
    q[0, 1, 40, 3] = 448.0 * 2**-5 * 1.0625  # an e4m3 rounding tie (between 2 steps) once scaled
    k[0, 1, 100, 0] = float("inf")
    q[0, 0, 200, 7] = float("nan")
    q, k = q.to(device, dtype), k.to(device, dtype)
    perm = make_order("hilbert3d", GRID_217).perm_on(device, torch.int32) if ordered else None
    got, v8, v_scale = quantize_attention_fp8_fwd(q, k, None, block, perm)
    assert v8 is None and v_scale is None
    want = quantize_qk_fp8(q, k, block, None if perm is None else perm.long())
    finite = want.k_mean.isfinite()
    assert torch.equal(got.k_mean.isfinite(), finite) and bool(got.k_mean[~finite].isinf().all())
    torch.testing.assert_close(got.k_mean[finite], want.k_mean[finite], rtol=1e-6, atol=1e-30)
    keys = k if perm is None else k.index_select(2, perm.long())
    want_k8, want_k_scale = quantize_fp8_blocks(keys.float() - got.k_mean, block)  # the kernel's mean
    wants = {"q8": want.q8, "q_scale": want.q_scale, "k8": want_k8, "k_scale": want_k_scale}
    for name, expected in wants.items():
        a, b = getattr(got, name).float(), expected.float()
        assert torch.equal(a.isnan(), b.isnan()), name
        assert torch.equal(a.nan_to_num(), b.nan_to_num()), name
    # the NaN reaches its block only; the inf key makes the key mean inf, so every block of that head
    # is non-finite (inf, and NaN in the block of inf - inf)
    assert int(got.q_scale.isnan().sum()) == 1 and bool(got.q_scale[0, 1].isfinite().all())
    assert int(got.k_scale[0, 1].isnan().sum()) == 1 and int(got.k_scale[0, 1].isinf().sum()) == 13
    if not ordered:
        assert got.q_scale[0, 0, 1] == 1.0  # the zero block


def test_the_key_mean_sums_every_chunk_of_tokens():
    """More tokens than one program of the statistics pass takes (512): the mean and the
    channel scales cover all of them, the ragged last chunk included."""
    from dfsviz.kernels._jit.fp8 import quantize_attention_fp8_fwd

    gen = torch.Generator().manual_seed(12)
    n = 2500
    q, k, v = (torch.randn(1, 1, n, 16, generator=gen).to(torch.bfloat16) for _ in range(3))
    k[0, 0, 2400:] += 50.0  # only the last chunk moves the mean
    v[0, 0, 2450, 3] = 1000.0  # only the last chunk holds channel 3's max
    got, _, v_scale = quantize_attention_fp8_fwd(q, k, v, 64, None)
    torch.testing.assert_close(got.k_mean, key_mean(k), rtol=1e-6, atol=1e-6)
    assert float(v_scale[0, 0, 3]) == 4.0  # 1000 / 448 <= 4


def test_v_channel_scales_are_the_smallest_powers_of_two_that_fit():
    gen = torch.Generator().manual_seed(8)
    v = torch.randn(2, 3, 70, 16, generator=gen) * torch.logspace(-8, 6, 16)
    v[0, 0, :, 5] = 0.0  # an all-zero channel
    perm = torch.randperm(70, generator=gen)
    v8, scales = quantize_v_fp8(v, perm)
    assert v8.dtype == torch.float8_e4m3fn and v8.shape == v.shape and scales.shape == (2, 3, 16)
    for b in range(2):
        for h in range(3):
            for c in range(16):
                amax = float(v[b, h, :, c].abs().max())
                expected = 1.0 if amax == 0 else 2.0 ** math.ceil(math.log2(amax / FP8_MAX))
                assert float(scales[b, h, c]) == expected, (b, h, c, amax)
    back = v8.float() * scales[:, :, None, :]
    ordered = v[:, :, perm]
    assert bool(((back - ordered).abs() <= torch.maximum(ordered.abs() * 2.0**-4,
                                                          scales[:, :, None, :] * 2.0**-10)).all())


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("ordered", [False, True])
def test_the_fused_v_quantization_equals_the_simulation_bit_for_bit(dtype, ordered, device):
    """The Triton V pass against quantize_v_fp8: the same e4m3 values and channel scales over
    channels spanning 2^-20 .. 2^12, a channel of subnormal values on the GPU (a subnormal scale,
    in bfloat16), a zero channel, a NaN and an inf, a ragged last program; stored transposed
    (stride 1 along N, rows padded to 16 bytes)."""
    from dfsviz.kernels._jit.fp8 import quantize_attention_fp8_fwd

    gen = torch.Generator().manual_seed(9)
    n, d = GRID_217.num_tokens, 64
    v = torch.randn(2, 2, n, d, generator=gen) * torch.logspace(-20, 12, d, base=2.0)
    v[0, 0, :, 3] = 0.0
    if device == "cuda":  # (the interpreter converts subnormal bfloat16 to float32 wrongly)
        v[1, 0, :, 9] = torch.randn(n, generator=gen) * 2.0**-130
    v[1, 1, 17, 5] = float("nan")
    v[1, 0, 20, 6] = float("inf")
    v = v.to(device, dtype)
    perm = make_order("hilbert3d", GRID_217).perm_on(device, torch.int32) if ordered else None
    _, got, got_scales = quantize_attention_fp8_fwd(v, v, v, 16, perm)
    want, want_scales = quantize_v_fp8(v, None if perm is None else perm.long())
    assert got.shape == want.shape and got.stride(2) == 1 and got.stride(3) == 224  # 217 rounded up to 16
    torch.testing.assert_close(got_scales, want_scales, rtol=0, atol=0, equal_nan=True)
    a, b = got.float(), want.float()
    assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
    assert bool(got_scales[1, 1, 5].isnan()) and bool(got_scales[1, 0, 6].isinf()) and got_scales[0, 0, 3] == 1.0


def test_the_mma_key_order_puts_each_thread_s_accumulator_keys_where_its_operand_registers_are():
    """Hopper's FP8 MMA takes P from registers holding keys 4c .. 4c + 3 and 16 + 4c .. 16 + 4c + 3
    of each 32 (c: the thread's place in its row's quad); the accumulator that computed the logits
    holds keys 2c, 2c + 1 of every 8. Stored in mma_key_order, V's key at each operand position
    is the key the thread's accumulator holds there."""
    from dfsviz.kernels._jit.fp8 import mma_key_order

    order = mma_key_order(96)
    assert sorted(order.tolist()) == list(range(96)) and bool(((order // 32) == torch.arange(96) // 32).all())
    for c in range(4):
        accumulator_keys = {8 * g + 2 * c + e for g in range(4) for e in range(2)}
        operand_positions = [16 * h + 4 * c + i for h in range(2) for i in range(4)]
        assert {int(order[p]) for p in operand_positions} == accumulator_keys


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("n", [200, 256])
def test_the_v_pass_in_the_mma_key_order_stores_the_same_bytes_each_32_keys_permuted(n, device):
    """The Gluon kernel's V layout (mma_order=True): the plain pass's bytes and scales, each 32
    keys in mma_key_order, rows padded to a multiple of 32 with zeros past N, and the view spans
    the padded rows (the last 32 keys' order reaches past N)."""
    from dfsviz.kernels._jit.fp8 import mma_key_order, quantize_attention_fp8_fwd

    gen = torch.Generator().manual_seed(4)
    v = (torch.randn(2, 3, n, 64, generator=gen) * 3.0).to(device, torch.bfloat16)
    perm = torch.randperm(n, generator=gen).to(device, torch.int32)
    _, plain, plain_scales = quantize_attention_fp8_fwd(v, v, v, 64, perm)
    _, got, scales = quantize_attention_fp8_fwd(v, v, v, 64, perm, mma_order=True)
    npad = -(-n // 32) * 32
    assert got.shape == (2, 3, npad, 64) and got.stride(2) == 1 and got.stride(3) == npad
    want = torch.zeros(2, 3, npad, 64, device=device)
    want[:, :, :n] = plain.float()
    assert torch.equal(got.float(), want[:, :, mma_key_order(npad).to(device)])
    assert torch.equal(scales, plain_scales)


@pytest.mark.parametrize("block", [32, 64, 128], ids=lambda b: f"b{b}")
@pytest.mark.parametrize("order_name", [None, "hilbert3d"], ids=lambda o: o or "noorder")
@pytest.mark.parametrize("d", [64, 128], ids=lambda d: f"d{d}")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_fp8_pv_kernel_matches_the_simulation(dtype, d, order_name, block):
    """P . V in FP8: the kernel forms P against its running row max, the simulation against
    the final one, in one product over all keys; both give the same e4m3 values (the max is
    a whole power of two), so out agrees to one rounding of the output dtype and the LSE to
    float32 summation order."""
    q, k, v, mask, order = _grid_case(dtype, d, order_name, block, seed=11 * d + block)
    _check_against_the_simulation(q, k, v, mask, order, "fp8_pv")
    sim = block_sparse_attention_fp8_ref(q, k, v, mask, order=order, precision="fp8_pv")
    assert bool((sim != block_sparse_attention_fp8_ref(q, k, v, mask, order=order)).any()), "P . V is quantized"


@triton.jit
def _p_e4m3_kernel(X, P, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    tl.store(P + offs, p_e4m3_jit(tl.load(X + offs, mask=ok, other=0.0)), mask=ok)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_p_is_two_to_x_in_e4m3_within_one_step_and_the_kernels_form_it_bit_for_bit(device):
    """``"fp8_pv"``'s P_SCALE * P for x = t - M: 2^x times P_SCALE at whole x, the linear
    interpolation between whole powers on eighths, at most one e4m3 step from 2^x rounded to
    nearest in e4m3's normal range, 0 for -inf and far below the max; the Triton helper gives
    the same float32 bits (ties of 8 x to even, e4m3's subnormals included)."""
    x = torch.cat([torch.linspace(-16, 0, 160_001), torch.arange(-16, 0, 1 / 16), torch.tensor([-1e30, float("-inf")])])
    p = p_e4m3(x)
    assert torch.equal(p.to(torch.float8_e4m3fn).float(), p)  # e4m3 values
    whole = torch.arange(-14.0, 1.0)
    assert torch.equal(p_e4m3(whole), P_SCALE * torch.exp2(whole))
    assert torch.equal(p_e4m3(torch.tensor([-0.5, -0.25, -2.375])), torch.tensor([192.0, 224.0, 52.0]))
    assert torch.equal(p_e4m3(torch.tensor([-1 / 16, -3 / 16])), torch.tensor([256.0, 224.0]))  # ties to even
    assert float(p[-2:].abs().max()) == 0.0 and float(p_e4m3(torch.tensor([-15.07]))) == 0.0
    normal = x >= -14  # P_SCALE 2^x >= 2^-6, e4m3's smallest normal; below, P is linear from 0
    nearest = (P_SCALE * torch.exp2(x[normal])).to(torch.float8_e4m3fn).float()
    step = torch.exp2(torch.floor(torch.log2(torch.maximum(p[normal], nearest))) - 3)
    assert float(((p[normal] - nearest).abs() / step).max()) == 1.0
    xd = x.to(device)
    out = torch.empty_like(xd)
    _p_e4m3_kernel[(triton.cdiv(x.numel(), 1024),)](xd, out, x.numel(), BLOCK=1024)
    assert torch.equal(out.cpu().view(torch.int32), p.view(torch.int32))


def test_fp8_pv_diffusers_layout():
    """A [B, N, H, D] transpose(1, 2) view: quantized and attended like a copy, out in its layout."""
    n, d = 97, 64
    gen = torch.Generator().manual_seed(12)
    q, k, v = (torch.randn(2, n, 3, d, generator=gen).to(torch.bfloat16).transpose(1, 2) for _ in range(3))
    mask = _mask(2, 3, n, 32, gen)
    out = block_sparse_attention(q, k, v, mask, precision="fp8_pv", backend="triton")
    dense = block_sparse_attention(q.contiguous(), k.contiguous(), v.contiguous(), mask, precision="fp8_pv",
                                   backend="triton")
    assert torch.equal(out, dense) and out.transpose(1, 2).is_contiguous()

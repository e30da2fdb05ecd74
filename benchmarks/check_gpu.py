"""GPU correctness suite of dfsviz.kernels, run in one device call.

    PYTHONPATH=$PWD python3 benchmarks/check_gpu.py --out results/check_gpu.json

Checks, each against the float64 golden reference and the reference in the test dtype
(the kernel's error must be at most 2x the reference's own plus a small floor):
block-sparse attention (ragged N, D 64/128, fp16/bf16, B 1/2, with and without a token
order, LSE), agreement with FlexAttention on ``mask.to_flex_block_mask()``, NaN in one
query row staying in that row, the ValueErrors at the boundary, FP8 attention (against float64
of its dequantized inputs, the simulation and the unquantized inputs; with P . V in FP8 too,
against its simulation and the unquantized inputs; each check names the kernel that ran and
fails if it is not the one docs/kernels.md says runs: the Gluon kernel on Hopper, the
descriptor kernel after Hopper for "fp8" without an order and "fp8_pv", the pointer kernel for a
v that is not 16-byte aligned and without a copy engine), each persistent / warp-specialized
autotune candidate on its own, each descriptor candidate with FP8 on its own (``--only
fp8_candidates``; both candidate groups with the Gluon kernel off),
the GPU-only pytest cases (``-m cuda``: no host sync, CUDA-graph replay of scoring and
attention), fused block scoring
(dfs_tile, meanpool), the streaming block statistics and Wan's fused QK-RMSNorm + RoPE
(also within one rounding step of today's torch path), and Wan's fused adaLN norms and gated
residuals (the residual also bit-identical to today's torch path), and FP8 linear layers (the
row quantization bit for bit, the product against its simulation). Exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import sys
import time

import torch
import torch.nn.functional as F

from dfsviz.kernels._check import compare_to_golden, rotated_pair_steps
from dfsviz.kernels.adaln import gated_residual, gated_residual_ref, modulated_layer_norm, modulated_layer_norm_ref
from dfsviz.kernels.block_scores import block_scores
from dfsviz.kernels.block_sparse_attention import block_sparse_attention
from dfsviz.kernels.block_stats import block_stats
from dfsviz.kernels.qk_norm_rope import qk_norm_rope, qk_norm_rope_ref
from dfsviz.sparse.attention import block_sparse_attention_ref
from dfsviz.sparse.grid import LatentGrid
from dfsviz.sparse.masks import BlockMask
from dfsviz.sparse.orders import make_order
from dfsviz.sparse.scoring import block_scores_ref
from dfsviz.sparse.stats import block_stats_ref

from provenance import run_header  # this script's folder, on sys.path when it runs

log = logging.getLogger("check_gpu")
DEV = "cuda"
jit_attention = importlib.import_module("dfsviz.kernels._jit.attention")
DESC, POINTER = "_block_sparse_attention_desc_kernel", "_block_sparse_attention_kernel"
SM90 = "_block_sparse_attention_sm90_kernel"

# (grid, D, dtype, B, H, order name or None, keep fraction, memory): memory "bhnd" is contiguous
# [B, H, N, D], "bnhd" diffusers' [B, N, H, D] seen through a transpose
ATTENTION_CASES = [
    (LatentGrid(4, 32, 32, text_len=1), 128, torch.bfloat16, 1, 4, None, 0.3, "bhnd"),  # N = 4097
    (LatentGrid(4, 32, 32, text_len=1), 128, torch.bfloat16, 2, 3, "hilbert3d", 0.3, "bhnd"),
    (LatentGrid(5, 20, 30), 64, torch.float16, 2, 2, "hilbert3d", 0.5, "bnhd"),  # N = 3000
    (LatentGrid(3, 17, 23, text_len=7), 64, torch.bfloat16, 1, 2, None, 0.2, "bhnd"),
    (LatentGrid(1, 1, 1), 128, torch.float16, 1, 2, None, 1.0, "bhnd"),  # N = 1
    (LatentGrid(3, 17, 23, text_len=7), 128, torch.bfloat16, 2, 3, "hilbert3d", 0.4, "bnhd"),  # N = 1180
]


def _mask(bsz, heads, n, block, keep, gen):
    m = -(-n // block)
    dense = torch.rand(bsz, heads, m, m, generator=gen, device=DEV) < keep
    dense[..., torch.arange(m, device=DEV), torch.arange(m, device=DEV)] = True  # keep the diagonal
    if m > 2:
        dense[0, 0, 1] = False  # one empty query block: output 0, LSE -inf
    return BlockMask.from_dense(dense, n, block)


def check_attention(results):
    from torch.nn.attention.flex_attention import flex_attention

    flex = torch.compile(flex_attention, dynamic=False)
    gen = torch.Generator(device=DEV).manual_seed(0)
    for grid, d, dtype, bsz, heads, order_name, keep, memory in ATTENTION_CASES:
        n = grid.num_tokens
        shape = (bsz, heads, n, d) if memory == "bhnd" else (bsz, n, heads, d)
        q, k, v = (torch.randn(*shape, generator=gen, device=DEV).to(dtype) for _ in range(3))
        if memory == "bnhd":
            q, k, v = (x.transpose(1, 2) for x in (q, k, v))
        mask = _mask(bsz, heads, n, 128, keep, gen)
        order = make_order(order_name, grid) if order_name else None
        with _launched_kernels() as ran:
            out, lse = block_sparse_attention(q, k, v, mask, order=order, return_lse=True, backend="triton")
        expected = _attention_kernel(q, order)
        results.append({"check": f"attention {grid.name} D{d} {str(dtype)[6:]} {order_name or 'no order'} {memory} "
                                 f"runs {expected}", "message": "+".join(ran), "ok": ran == [expected]})
        ref, ref_lse = block_sparse_attention_ref(q, k, v, mask, order=order, return_lse=True)
        gold, gold_lse = block_sparse_attention_ref(q.double(), k.double(), v.double(), mask, order=order,
                                                    return_lse=True)
        label = f"attention {grid.name} D{d} {str(dtype)[6:]} B{bsz} H{heads} {order_name or 'no order'} {memory}"
        checks = [compare_to_golden(f"{label} out", out, ref, gold, floor=1e-4),
                  compare_to_golden(f"{label} lse", lse, ref_lse, gold_lse, floor=1e-4)]
        if order is None and n > 1:
            # FlexAttention on the same mask, as a second low-precision reference.
            fo = flex(q, k, v, block_mask=mask.to_flex_block_mask())
            checks.append(compare_to_golden(f"{label} vs FlexAttention", out, fo, gold, floor=1e-4))
            results.append({"check": f"{label} |kernel - flex|", "max_abs": float((out.float() - fo.float()).abs().max()),
                            "ok": True})
        for c in checks:
            results.append({"check": c.name, "kernel_err": c.kernel_err, "ref_err": c.ref_err, "bound": c.bound,
                            "where": c.where, "ok": c.ok})


def check_nan_row(results):
    n, d = 1000, 128
    q, k, v = (torch.randn(2, 2, n, d, device=DEV, dtype=torch.bfloat16) for _ in range(3))
    q[1, 0, 517, 3] = float("nan")
    out = block_sparse_attention(q, k, v, BlockMask.full(2, 2, n, 128, device=DEV), backend="triton")
    bad = torch.isnan(out).any(-1)
    expected = torch.zeros_like(bad)
    expected[1, 0, 517] = True
    results.append({"check": "NaN in q[1, 0, 517] reaches that row only", "ok": bool(torch.equal(bad, expected))})


def check_errors(results):
    q, k, v = (torch.randn(1, 2, 256, 128, device=DEV, dtype=torch.bfloat16) for _ in range(3))
    mask = BlockMask.full(1, 2, 256, 128, device=DEV)
    cases = {
        "wrong dtype": lambda: block_sparse_attention(q.double(), k.double(), v.double(), mask, backend="triton"),
        "head dim 96": lambda: block_sparse_attention(q[..., :96], k[..., :96], v[..., :96], mask, backend="triton"),
        "device mix": lambda: block_sparse_attention(q, k.cpu(), v, mask, backend="triton"),
        "mask on cpu": lambda: block_sparse_attention(q, k, v, mask.to("cpu"), backend="triton"),
        "mask shape": lambda: block_sparse_attention(q, k, v, BlockMask.full(1, 2, 300, 128, device=DEV),
                                                     backend="triton"),
    }
    for name, call in cases.items():
        try:
            call()
            outcome, ok = "no error raised", False
        except ValueError as exc:
            outcome, ok = str(exc), True
        except Exception as exc:  # anything but ValueError is a failure of the boundary checks
            outcome, ok = f"{type(exc).__name__}: {exc}", False
        results.append({"check": f"ValueError: {name}", "message": outcome, "ok": ok})


def check_scores_and_stats(results):
    gen = torch.Generator(device=DEV).manual_seed(1)
    for n, d, dtype in ((4097, 128, torch.bfloat16), (3000, 64, torch.float16)):
        shared = torch.randn(d, generator=gen, device=DEV)
        q = (torch.randn(2, 3, n, d, generator=gen, device=DEV) + shared).to(dtype)
        k = (torch.randn(2, 3, n, d, generator=gen, device=DEV) + shared).to(dtype)
        for method in ("dfs_tile", "meanpool"):
            out = block_scores(q, k, method=method, tile=16, block=128, backend="triton")
            ref = block_scores_ref(q, k, method=method, tile=16, block=128)
            gold = block_scores_ref(q.double(), k.double(), method=method, tile=16, block=128)
            c = compare_to_golden(f"block_scores {method} N{n} D{d} {str(dtype)[6:]}", out, ref, gold, floor=1e-5)
            results.append({"check": c.name, "kernel_err": c.kernel_err, "ref_err": c.ref_err, "bound": c.bound,
                            "where": c.where, "ok": c.ok})
        st = block_stats(q, k, block=128, backend="triton")
        st_ref = block_stats_ref(q, k, block=128)
        st_gold = block_stats_ref(q.double(), k.double(), block=128)
        for field in ("m", "L", "r", "J", "lse"):
            c = compare_to_golden(f"block_stats {field} N{n} D{d} {str(dtype)[6:]}", getattr(st, field),
                                  getattr(st_ref, field), getattr(st_gold, field), floor=5e-5)
            results.append({"check": c.name, "kernel_err": c.kernel_err, "ref_err": c.ref_err, "bound": c.bound,
                            "where": c.where, "ok": c.ok})


def check_qk_norm_rope(results):
    """Wan-like rows: C = 12 x 128 (two rows per program) and 40 x 128 (14B, one row per program),
    float32 tables permuted along N as permute-once passes them."""
    gen = torch.Generator(device=DEV).manual_seed(2)
    for bsz, n, heads, d, dtype in ((2, 4097, 12, 128, torch.bfloat16), (1, 3000, 40, 128, torch.float16)):
        c = heads * d
        x = (3.0 * torch.randn(bsz, n, c, generator=gen, device=DEV)).to(dtype)
        w = (0.5 + torch.rand(c, generator=gen, device=DEV)).to(dtype)
        ang = (6.0 * torch.rand(n, d // 2, generator=gen, device=DEV, dtype=torch.float64)).repeat_interleave(2, 1)
        perm = torch.randperm(n, generator=gen, device=DEV)
        cos, sin = (f(ang)[perm].float()[None, :, None, :] for f in (torch.cos, torch.sin))
        out = qk_norm_rope(x, w, 1e-6, cos, sin, backend="triton")
        ref = qk_norm_rope_ref(x, w, 1e-6, cos, sin)
        gold = qk_norm_rope_ref(x.double(), w.double(), 1e-6, cos.double(), sin.double())
        label = f"qk_norm_rope B{bsz} N{n} H{heads} D{d} {str(dtype)[6:]}"
        c_ = compare_to_golden(label, out, ref, gold, floor=1e-5)
        results.append({"check": c_.name, "kernel_err": c_.kernel_err, "ref_err": c_.ref_err, "bound": c_.bound,
                        "where": c_.where, "ok": c_.ok})
        steps = rotated_pair_steps(out, ref)  # <= 2: within one rounding step of the torch path
        results.append({"check": f"{label} within one rounding step of the torch path",
                        "message": f"{steps:.2f} steps (eps x |pair| units, bound 2)", "ok": steps <= 2.0})


def check_adaln(results):
    """Wan rows: C = 1536 (1.3B, two rows per program), 5120 (14B, one row per 8192-wide block)
    and 20480 (beyond _MAX_BLOCK_C: the chunked path), float32 modulation chunks of a
    [B, 6, C] table (strided views), norm1/3 (modulated) and norm2 (affine) forms."""
    gen = torch.Generator(device=DEV).manual_seed(3)
    for bsz, n, c, dtype in ((2, 4097, 1536, torch.bfloat16), (1, 3000, 5120, torch.bfloat16),
                             (1, 3000, 5120, torch.float16), (2, 1000, 5120, torch.float32),
                             (1, 257, 20480, torch.bfloat16)):
        x = (3.0 * torch.randn(bsz, n, c, generator=gen, device=DEV) + 0.5).to(dtype)
        shift, scale, gate = (0.5 * torch.randn(bsz, 6, c, generator=gen, device=DEV)).chunk(6, dim=1)[:3]
        w = (0.5 + torch.rand(c, generator=gen, device=DEV)).to(dtype)
        b = 0.3 * torch.randn(c, generator=gen, device=DEV)
        label = f"B{bsz} N{n} C{c} {str(dtype)[6:]}"
        for kind, kw in (("modulated", dict(scale=scale, shift=shift)), ("affine", dict(weight=w, bias=b))):
            out = modulated_layer_norm(x, 1e-6, **kw, backend="triton")
            ref = modulated_layer_norm_ref(x, 1e-6, **kw)
            wd, bd = (kw[k].double() if k in kw else None for k in ("weight", "bias"))
            gold = F.layer_norm(x.double(), (c,), wd, bd, 1e-6)
            if "scale" in kw:
                gold = gold * (1 + scale.double()) + shift.double()
            c_ = compare_to_golden(f"modulated_layer_norm {kind} {label}", out, ref, gold, floor=1e-5)
            results.append({"check": c_.name, "kernel_err": c_.kernel_err, "ref_err": c_.ref_err, "bound": c_.bound,
                            "where": c_.where, "ok": c_.ok})
        y = torch.randn(bsz, n, c, generator=gen, device=DEV).to(dtype)
        out = gated_residual(x, y, gate, backend="triton")
        ref = gated_residual_ref(x, y, gate)
        gold = x.double() + y.double() * gate.double()
        c_ = compare_to_golden(f"gated_residual {label}", out, ref, gold, floor=1e-6)
        results.append({"check": c_.name, "kernel_err": c_.kernel_err, "ref_err": c_.ref_err, "bound": c_.bound,
                        "where": c_.where, "ok": c_.ok})
        # Launched without FMA contraction, the kernel rounds as torch's mul and add kernels do.
        differ = int((out != ref).sum())
        results.append({"check": f"gated_residual {label} bit-identical to the torch path",
                        "message": f"{differ} elements differ (0 expected)", "ok": differ == 0})


def check_fp8_linear(results):
    """FP8 linear layers: the Triton row pass bit for bit against the PyTorch rule (scales and e4m3
    values), and ``fp8_linear`` (row pass + torch._scaled_mm) against its simulation: within one
    bfloat16 rounding of the output plus 2^-7 of the output's RMS (the GPU's FP8 matrix product sums
    in another order, and Hopper's accumulates with fewer mantissa bits than float32: about 2e-3 of
    the RMS beyond the rounding on an H200), and no farther than 1.1x the simulation's RMS error from
    the float64 product of the unquantized inputs. Rows of Wan2.1-14B's FFN (K 5120 / 13824) and
    1.3B's attention (K 1536), with and without bias."""
    from dfsviz.kernels._jit.fp8 import quantize_rows_fp8_fwd
    from dfsviz.kernels.fp8_linear import fp8_linear, fp8_linear_ref, quantize_rows_fp8, quantize_weight_fp8

    if torch.cuda.get_device_capability() < (8, 9):
        results.append({"check": "fp8_linear", "message": "skipped: compute capability < 8.9", "ok": True})
        return
    gen = torch.Generator(device=DEV).manual_seed(5)
    for m, k, n, bias in ((4097, 5120, 13824, True), (3000, 13824, 5120, True), (2049, 1536, 1536, False)):
        x = (torch.randn(1, m, k, generator=gen, device=DEV) * torch.logspace(-2, 2, m, device=DEV)[:, None]
             ).bfloat16()
        w = (torch.randn(n, k, generator=gen, device=DEV) / k ** 0.5).bfloat16()
        b = torch.randn(n, generator=gen, device=DEV).bfloat16() if bias else None
        label = f"fp8_linear M{m} K{k} N{n}{' bias' if bias else ''}"
        got8, got_scale = quantize_rows_fp8_fwd(x[0])
        want8, want_scale = quantize_rows_fp8(x[0])
        same = torch.equal(got_scale, want_scale) and torch.equal(got8.float(), want8.float())
        results.append({"check": f"{label} row pass equals the rule", "message": f"equal: {same}", "ok": same})
        weight = quantize_weight_fp8(w, b)
        out = fp8_linear(x, weight).double()
        sim = fp8_linear_ref(x, weight).double()
        exact = F.linear(x.double(), w.double(), None if b is None else b.double())
        rms = float(exact.pow(2).mean().sqrt())
        excess = float(((out - sim).abs() - sim.abs() * 2.0 ** -7).max()) / rms
        err, sim_err = (float((y - exact).pow(2).mean().sqrt()) / rms for y in (out, sim))
        results.append({"check": f"{label} against its simulation", "ok": excess <= 2.0 ** -7 and err <= 1.1 * sim_err,
                        "message": f"max |out - sim| beyond one bf16 rounding {excess:.2e} of the RMS (bound "
                                   f"{2.0 ** -7:.2e}); RMS error against float64 of the unquantized inputs {err:.4f}, "
                                   f"the simulation's {sim_err:.4f} (bound 1.1x)"})


@contextlib.contextmanager
def _launched_kernels():
    """The names of the attention kernels launched inside the block (spies on the launchers: the
    Triton kernels' one launch function and, where this Triton builds it, the Gluon kernel's
    launcher; all give the same values)."""
    names, launch, sm90 = [], jit_attention._launch, jit_attention.sm90_module()
    launch_sm90 = sm90.block_sparse_attention_sm90_fwd if sm90 else None

    def spy(kernel, *args, **kwargs):
        names.append(kernel.__name__)
        return launch(kernel, *args, **kwargs)

    def spy_sm90(*args, **kwargs):
        names.append(SM90)
        return launch_sm90(*args, **kwargs)

    jit_attention._launch = spy
    if sm90:
        sm90.block_sparse_attention_sm90_fwd = spy_sm90
    try:
        yield names
    finally:
        jit_attention._launch = launch
        if sm90:
            sm90.block_sparse_attention_sm90_fwd = launch_sm90


@contextlib.contextmanager
def _without_copy_engine():
    """FP8 as on a GPU without tensor descriptors (Ada, compute capability 8.9): the pointer kernel."""
    copy_engine = jit_attention._copy_engine
    jit_attention._copy_engine = lambda device: False
    try:
        yield
    finally:
        jit_attention._copy_engine = copy_engine


def _fp8_kernel(precision: str, order, v) -> str:
    """The kernel docs/kernels.md says runs FP8 on this GPU (D 64 / 128, block 128): on Hopper the
    Gluon kernel where the tensors it reads are describable ("fp8_pv" always: its v is a
    quantized copy; "fp8" with a 16-byte aligned v); after Hopper descriptors where every input's
    key blocks are contiguous rows ("fp8_pv" always, "fp8" without an order and an aligned v);
    else pointers."""
    major = torch.cuda.get_device_capability()[0]
    aligned = precision == "fp8_pv" or v.data_ptr() % 16 == 0
    if major == 9 and aligned and jit_attention.SM90_ENABLED:
        return SM90
    rows = precision == "fp8_pv" or (order is None and aligned)
    return DESC if major >= 9 and rows else POINTER


def _attention_kernel(q, order) -> str:
    """The kernel docs/kernels.md says runs a native call on this GPU: the Gluon kernel on Hopper
    (D 64 / 128, block 128, 16-bit inputs, with or without an order), descriptors on later GPUs
    without an order, else pointers."""
    major = torch.cuda.get_device_capability()[0]
    if major == 9 and q.dtype != torch.float32:
        return SM90
    return DESC if order is None and major >= 9 else POINTER


def _fp8_against_simulation(label, q, k, v, mask, order, precision, sim=None, expected=None):
    """(out, result row): the Triton kernel against the simulation of its quantization (``sim``:
    its (out, lse) when already computed), and that the expected kernel ran. "fp8": out within
    2^-7 (P . V in the input dtype against float32). "fp8_pv": one rounding of the output dtype
    (P formed against the running max here, the final one there: the same e4m3 values,
    docs/kernels.md), plus what the GPU's arithmetic adds: Hopper's FP8 tensor cores accumulate
    the logits with fewer mantissa bits than float32, so a logit near the midpoint between two
    eighths forms the neighbouring e4m3 P, one step (2^-3 relative) away. 2^-6: one H200
    measured 5.5e-3 - 1.22e-2 beyond one output rounding (the interpreter, with float32
    products, stays within one rounding: tests/kernels/test_fp8.py). The LSE within 1e-3 (the
    same logits up to summation order and the products' accumulation); with "fp8_pv" within
    2^-6, as l sums the same e4m3 P, steps included (2.4e-3 - 4.2e-3 on one H200, where the
    interpreter stays within 1e-4)."""
    with _launched_kernels() as ran:
        out, lse = block_sparse_attention(q, k, v, mask, order=order, return_lse=True, precision=precision,
                                          backend="triton")
    sim_out, sim_lse = sim if sim is not None else block_sparse_attention(
        q, k, v, mask, order=order, return_lse=True, precision=precision, backend="ref")
    if precision == "fp8":
        diff = float((out.float() - sim_out.float()).abs().max())
        message, ok = f"{diff:.3e} (bound 2^-7)", diff <= 2**-7
    else:
        ulp = 2**-7 if q.dtype == torch.bfloat16 else 2**-10
        excess = float(((out.float() - sim_out.float()).abs() - ulp * sim_out.float().abs()).max())
        message, ok = f"beyond one output rounding {excess:.3e} (bound 2^-6)", excess <= 2**-6
    lse_bound = 1e-3 if precision == "fp8" else 2**-6
    finite = torch.isfinite(sim_lse)
    lse_diff = float((lse - sim_lse)[finite].abs().max())
    same_inf = bool(torch.equal(torch.isfinite(lse), finite))
    expected = expected or _fp8_kernel(precision, order, v)
    return out, {"check": f"{label} {precision} |kernel - simulation| ({'+'.join(ran)})",
                 "message": f"{message}, lse {lse_diff:.3e} (bound {lse_bound:.3g}), expected {expected}",
                 "ok": ok and lse_diff <= lse_bound and same_inf and ran == [expected]}


def check_fp8(results):
    """FP8 attention against float64 attention of its own dequantized inputs (the 2x rule), the
    simulation (in each kernel that runs FP8: the descriptor kernel, and the pointer kernel with
    an order, an unaligned v and without a copy engine; and on rows of 591 key blocks), and the
    simulation's error against float64 attention of the unquantized inputs."""
    from dfsviz.kernels.fp8 import dequantize_fp8_blocks, quantize_qk_fp8

    if torch.cuda.get_device_capability() < (8, 9):
        results.append({"check": "fp8", "message": "skipped: compute capability < 8.9", "ok": True})
        return
    gen = torch.Generator(device=DEV).manual_seed(4)
    for grid, d, dtype, bsz, heads, order_name, keep, _ in ATTENTION_CASES[:4]:
        n = grid.num_tokens
        q, v = (torch.randn(bsz, heads, n, d, generator=gen, device=DEV).to(dtype) for _ in range(2))
        k = (torch.randn(bsz, heads, n, d, generator=gen, device=DEV) + 3 * torch.randn(d, generator=gen, device=DEV)
             ).to(dtype)
        mask = _mask(bsz, heads, n, 128, keep, gen)
        order = make_order(order_name, grid) if order_name else None
        label = f"fp8 attention {grid.name} D{d} {str(dtype)[6:]} B{bsz} H{heads} {order_name or 'no order'}"
        out, row = _fp8_against_simulation(label, q, k, v, mask, order, "fp8")
        results.append(row)
        quant = quantize_qk_fp8(q, k, 128, order.perm_on(DEV) if order else None)
        qd = dequantize_fp8_blocks(quant.q8, quant.q_scale, 128)
        kd = dequantize_fp8_blocks(quant.k8, quant.k_scale, 128)
        vo = order.apply(v) if order else v
        gold = block_sparse_attention_ref(qd.double(), kd.double(), vo.double(), mask)
        ref = block_sparse_attention_ref(qd.to(dtype), kd.to(dtype), vo, mask)
        if order:
            gold, ref = order.restore(gold), order.restore(ref)
        c = compare_to_golden(f"{label} vs its dequantized inputs", out, ref, gold, floor=1e-4)
        results.append({"check": c.name, "kernel_err": c.kernel_err, "ref_err": c.ref_err, "bound": c.bound,
                        "where": c.where, "ok": c.ok})
        full = block_sparse_attention_ref(q.double(), k.double(), v.double(), mask, order=order)
        err = float((out.double() - full).abs().max())
        results.append({"check": f"{label} error vs float64 unquantized", "message": f"{err:.3e} (documented <= 0.1)",
                        "ok": err <= 0.1})
        out_pv, row = _fp8_against_simulation(label, q, k, v, mask, order, "fp8_pv")
        results.append(row)
        err_pv = float((out_pv.double() - full).abs().max())
        results.append({"check": f"{label} fp8_pv error vs float64 unquantized",
                        "message": f"{err_pv:.3e} (documented <= 0.15)", "ok": err_pv <= 0.15})
        if order is None:  # the pointer kernel without an order: a v one element into its buffer
            shifted = torch.empty(v.numel() + 1, dtype=dtype, device=DEV)[1:].view_as(v).copy_(v)
            results.append(_fp8_against_simulation(f"{label} unaligned v", q, k, shifted, mask, None, "fp8")[1])
        else:  # "fp8_pv" in the pointer kernel, as on Ada
            with _without_copy_engine():
                results.append(_fp8_against_simulation(f"{label} no copy engine", q, k, v, mask, order, "fp8_pv",
                                                        expected=POINTER)[1])
    # Long rows: Wan2.1-14B 720p's N (591 key blocks a row), every block kept and a third, 2 heads.
    # The FP8 MMAs sum with fewer mantissa bits than float32 and "fp8_pv"'s output accumulator takes
    # one such sum per 32 kept keys: the same bounds against the simulation as the short cases.
    n = LatentGrid(21, 45, 80).num_tokens
    q, k, v = (torch.randn(1, 2, n, 128, generator=gen, device=DEV).to(torch.bfloat16) for _ in range(3))
    for kept, mask in (("every block", BlockMask.full(1, 2, n, 128, device=DEV)),
                       ("a third of the blocks", _mask(1, 2, n, 128, 0.3, gen))):
        label = f"fp8 attention long rows N {n} {kept}"
        for precision in ("fp8", "fp8_pv"):
            results.append(_fp8_against_simulation(label, q, k, v, mask, None, precision)[1])


def check_cuda_tests(results):
    """The GPU-only tests (pytest marker ``cuda``) of tests/kernels (graph capture, no host sync)
    and of the recording of DFSAttn's masks (tests/capture/test_record_loop.py)."""
    import os
    import subprocess

    try:
        import pytest  # noqa: F401
    except ImportError:
        results.append({"check": "pytest -m cuda tests/kernels tests/capture/test_record_loop.py", "message": "pytest is not installed", "ok": False})
        return
    # only our plugins: a pytest plugin of the GPU image may not load under this pytest
    env = dict(os.environ, TRITON_INTERPRET="0", PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda",
                          "tests/kernels", "tests/capture/test_record_loop.py"], capture_output=True, text=True, env=env)
    tail = (run.stdout + run.stderr).strip().splitlines()[-1:] or ["(no output)"]
    results.append({"check": "pytest -m cuda tests/kernels tests/capture/test_record_loop.py", "message": tail[0], "ok": run.returncode == 0,
                    "output": (run.stdout + run.stderr)[-6000:]})


@contextlib.contextmanager
def triton_kernels():
    """The Triton kernels run where the Gluon kernel for Hopper would (the kernels it replaced
    there): the descriptor kernel without an order, the pointer kernel with one (FP8: as on a GPU
    after Hopper)."""
    jit_attention.SM90_ENABLED = False
    try:
        yield
    finally:
        jit_attention.SM90_ENABLED = True


@contextlib.contextmanager
def only_descriptor_config(cfg: dict):
    """The descriptor kernel's autotuner restricted to one ``ATTENTION_CONFIGS`` entry (no
    tuning), with the Gluon kernel off so that the descriptor kernel runs on Hopper too."""
    import triton

    tuned = jit_attention._TUNED_DESC_KERNEL
    one = triton.Config({"BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"],
                         **{flag: cfg.get(flag, False) for flag in jit_attention.DESC_FLAGS}},
                        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
                        pre_hook=jit_attention._set_tile_shapes)
    saved = tuned.configs
    tuned.configs = [one]
    tuned.cache.clear()
    try:
        with triton_kernels():
            yield
    finally:
        tuned.configs = saved
        tuned.cache.clear()


def _candidate_case(seed: int, key_offset: float):
    """(grid, q, k, v, mask) of the candidate checks: N 4097, B 2, H 3, D 128, bfloat16, 30 % of
    the blocks kept; keys sharing an offset of ``key_offset`` standard deviations."""
    gen = torch.Generator(device=DEV).manual_seed(seed)
    grid = LatentGrid(4, 32, 32, text_len=1)
    q, k, v = (torch.randn(2, 3, grid.num_tokens, 128, generator=gen, device=DEV) for _ in range(3))
    k = k + key_offset * torch.randn(128, generator=gen, device=DEV)
    mask = _mask(2, 3, grid.num_tokens, 128, 0.3, gen)
    return grid, *(x.to(torch.bfloat16) for x in (q, k, v)), mask


def check_autotune_candidates(results):
    """Each Hopper candidate of the descriptor kernel (persistent grid, warp-specialized loops),
    launched on its own (no tuning) against the float64 reference."""
    if torch.cuda.get_device_capability()[0] < 9:
        results.append({"check": "descriptor candidates", "message": "skipped: not Hopper", "ok": True})
        return
    _, q, k, v, mask = _candidate_case(5, key_offset=0.0)
    gold = block_sparse_attention_ref(q.double(), k.double(), v.double(), mask)
    ref = block_sparse_attention_ref(q, k, v, mask)
    for cfg in jit_attention.ATTENTION_CONFIGS:
        if not any(cfg.get(flag) for flag in jit_attention.DESC_FLAGS) or cfg.get("fp8_only"):
            continue
        label = f"descriptor candidate {cfg}"
        try:
            with only_descriptor_config(cfg):
                out = block_sparse_attention(q, k, v, mask, backend="triton")
            c = compare_to_golden(label, out, ref, gold, floor=1e-4)
            results.append({"check": c.name, "kernel_err": c.kernel_err, "ref_err": c.ref_err, "bound": c.bound,
                            "where": c.where, "ok": c.ok})
        except Exception as exc:  # a candidate this Triton cannot compile: the autotuner must not pick it
            results.append({"check": label, "message": f"{type(exc).__name__}: {str(exc)[:300]}", "ok": False})


def check_fp8_candidates(results):
    """Each descriptor candidate the autotuner may pick for FP8 (block 128, D 128), launched on its
    own against the simulation: "fp8" without an order, "fp8_pv" with one (output stored
    through the order). A candidate that fails to compile fails here by name, not every call."""
    if torch.cuda.get_device_capability()[0] < 9:
        results.append({"check": "fp8 descriptor candidates", "message": "skipped: not Hopper", "ok": True})
        return
    grid, q, k, v, mask = _candidate_case(6, key_offset=3.0)
    for precision, order in (("fp8", None), ("fp8_pv", make_order("hilbert3d", grid))):
        sim = block_sparse_attention(q, k, v, mask, order=order, return_lse=True, precision=precision, backend="ref")
        for cfg in jit_attention.ATTENTION_CONFIGS:
            if not jit_attention.attention_config_fits(cfg, 128, 128, fp8=True, descriptors=True):
                continue
            label = f"fp8 descriptor candidate {cfg}"
            try:
                with only_descriptor_config(cfg):
                    results.append(_fp8_against_simulation(label, q, k, v, mask, order, precision, sim=sim,
                                                           expected=DESC)[1])
            except Exception as exc:  # a candidate this Triton cannot compile: the autotuner must not pick it
                results.append({"check": f"{label} {precision}", "message": f"{type(exc).__name__}: {str(exc)[:300]}",
                                "ok": False})


STEPS = {"attention": check_attention, "fp8": check_fp8, "candidates": check_autotune_candidates,
         "fp8_candidates": check_fp8_candidates,
         "cuda_tests": check_cuda_tests, "nan": check_nan_row, "errors": check_errors,
         "scores_stats": check_scores_and_stats, "qk_norm_rope": check_qk_norm_rope, "adaln": check_adaln,
         "fp8_linear": check_fp8_linear}

#: Groups that run only when --only names them: fp8_candidates compiles every FP8 descriptor
#: candidate for D 128 (minutes on a fresh machine; after the fp8 group, in the same call, the
#: compiled kernels are cached).
NAMED_ONLY = ("fp8_candidates",)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--only", nargs="+", choices=sorted(STEPS), default=sorted(set(STEPS) - set(NAMED_ONLY)),
                        help="run only these groups of checks (default: all but " + ", ".join(NAMED_ONLY) + ")")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not torch.cuda.is_available():
        log.error("no CUDA device: run this on the GPU machine")
        return 2
    header = run_header(torch.device("cuda"))
    results: list[dict] = []
    t0 = time.time()
    for step in (STEPS[name] for name in args.only):
        try:
            step(results)
        except Exception as exc:  # report the crash as a failed check and keep going
            log.exception("%s crashed", step.__name__)
            results.append({"check": f"{step.__name__} crashed", "message": f"{type(exc).__name__}: {exc}",
                            "ok": False})
    summary = {
        **header,
        "seconds": round(time.time() - t0, 1),
        "groups": args.only,
        "passed": sum(r["ok"] for r in results),
        "failed": sum(not r["ok"] for r in results),
        "results": results,
    }
    for r in results:
        detail = (f"kernel {r['kernel_err']:.2e} ref {r['ref_err']:.2e} bound {r['bound']:.2e}"
                  if "kernel_err" in r else r.get("message", r.get("max_abs", ""))) 
        log.info("%-4s %s  %s", "ok" if r["ok"] else "FAIL", r["check"], str(detail)[:160])
    log.info("%d passed, %d failed on %s in %.0f s", summary["passed"], summary["failed"], summary["card"],
             summary["seconds"])
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(summary, fh, indent=1)
    return 0 if summary["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

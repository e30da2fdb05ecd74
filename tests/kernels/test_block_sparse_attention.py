"""Block-sparse attention: Triton kernel (interpreter on CPU) and PyTorch reference.

The kernel's error against a float64 golden run of the reference may be at most 2x
the reference's own error in the test dtype plus a small floor (dfsviz.kernels._check).
"""

import importlib
import math

import pytest
import torch

from dfsviz.kernels import _dispatch
from dfsviz.kernels._check import compare_to_golden
from dfsviz.kernels.block_sparse_attention import block_sparse_attention
from dfsviz.sparse.attention import block_sparse_attention_ref
from dfsviz.sparse.grid import LatentGrid
from dfsviz.sparse.masks import BlockMask
from dfsviz.sparse.orders import make_order

bsa_module = importlib.import_module("dfsviz.kernels.block_sparse_attention")  # the package exports the function
jit_attention = importlib.import_module("dfsviz.kernels._jit.attention")

# Grids (with a text token where needed) whose token counts are the awkward lengths.
GRIDS = {
    113: LatentGrid(4, 4, 7, text_len=1),
    217: LatentGrid(6, 6, 6, text_len=1),
    127: LatentGrid(3, 6, 7, text_len=1),
    129: LatentGrid(2, 8, 8, text_len=1),
    211: LatentGrid(5, 6, 7, text_len=1),
    257: LatentGrid(4, 8, 8, text_len=1),
}

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}  # bf16 dots upcast in the interpreter


def _random_mask(bsz, heads, n, block, generator, keep=0.5):
    m = -(-n // block)
    dense = torch.rand(bsz, heads, m, m, generator=generator) < keep
    dense[..., 0, :] = False  # one query block keeps nothing: output 0, LSE -inf
    dense[0, 0, 0, -1] = True if m > 1 else False
    return BlockMask.from_dense(dense, n, block)


def _check_against_golden(q, k, v, mask, order, **kwargs):
    out, lse = block_sparse_attention(q, k, v, mask, order=order, return_lse=True, backend="triton", **kwargs)
    ref, ref_lse = block_sparse_attention_ref(q, k, v, mask, order=order, return_lse=True)
    gold, gold_lse = block_sparse_attention_ref(q.double(), k.double(), v.double(), mask, order=order,
                                                return_lse=True)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:3]
    failures = [str(c) for c in (compare_to_golden("out", out, ref, gold, floor=1e-5),
                                 compare_to_golden("lse", lse, ref_lse, gold_lse, floor=1e-5)) if not c.ok]
    assert not failures, "\n".join(failures)


# The cross-product dtype x head dim x ragged N x B x order x block (H = 1; 96 cases, about a
# minute in the interpreter on 2 cores). N = 113 and 217 are primes: no block is whole at
# block 128 and 113 < 128 (one short block); at block 32 every block but the last is whole.
@pytest.mark.parametrize("block", [32, 128], ids=lambda b: f"b{b}")
@pytest.mark.parametrize("order_name", [None, "hilbert3d"], ids=lambda o: o or "noorder")
@pytest.mark.parametrize("bsz", [1, 2], ids=lambda b: f"B{b}")
@pytest.mark.parametrize("n", [113, 217], ids=lambda n: f"n{n}")
@pytest.mark.parametrize("d", [64, 128], ids=lambda d: f"d{d}")
@pytest.mark.parametrize("dtype", list(DTYPES), ids=str)
def test_kernel_matches_reference(dtype, d, n, bsz, order_name, block):
    gen = torch.Generator().manual_seed(n * 7 + d + bsz)
    q, k, v = (torch.randn(bsz, 1, n, d, generator=gen).to(DTYPES[dtype]) for _ in range(3))
    mask = _random_mask(bsz, 1, n, block, gen)
    order = make_order(order_name, GRIDS[n]) if order_name else None
    _check_against_golden(q, k, v, mask, order)


@pytest.mark.parametrize("dtype", list(DTYPES), ids=str)
def test_single_token(dtype):
    q, k, v = (torch.randn(2, 2, 1, 64, generator=torch.Generator().manual_seed(i)).to(DTYPES[dtype])
               for i in range(3))
    _check_against_golden(q, k, v, BlockMask.full(2, 2, 1, 128), None)


@pytest.mark.parametrize("order_name", [None, "hilbert3d"])
def test_heads_of_very_different_budgets(order_name):
    # programs start with the heads that keep the most blocks (a calibrated config's per-head
    # budgets): the output and LSE of every (batch, head) must still land in its own place
    n, block = 257, 64
    gen = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(2, 3, n, 64, generator=gen).to(torch.float16) for _ in range(3))
    m = -(-n // block)
    keep = torch.zeros(2, 3, m, m, dtype=torch.bool)
    for (b, h), count in zip([(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)], [1, m, 3, m, 2, 1]):
        for u in range(m):
            keep[b, h, u, torch.randperm(m, generator=gen)[:count]] = True
    mask = BlockMask.from_dense(keep, n, block)
    _check_against_golden(q, k, v, mask, make_order(order_name, GRIDS[n]) if order_name else None)


def test_order_matches_explicit_permutation():
    """With an order, the kernel equals: permute, attend on the ordered sequence, restore."""
    n, block = 129, 32
    order = make_order("hilbert3d", GRIDS[n])
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, n, 64, generator=gen) for _ in range(3))
    mask = _random_mask(2, 2, n, block, gen)
    fused = block_sparse_attention(q, k, v, mask, order=order, backend="triton")
    ordered = block_sparse_attention(order.apply(q), order.apply(k), order.apply(v), mask, backend="triton")
    torch.testing.assert_close(fused, order.restore(ordered), rtol=0, atol=1e-6)
    assert not torch.equal(order.perm, torch.arange(n)), "the test needs a non-identity order"


def test_reference_matches_brute_force_masked_softmax():
    """The reference against a token-level masked softmax in float64 (independent path)."""
    n, block, d = 75, 16, 8
    gen = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(1, 3, n, d, generator=gen, dtype=torch.float64) for _ in range(3))
    mask = _random_mask(1, 3, n, block, gen, keep=0.4)
    tokens = torch.arange(n) // block
    allowed = mask.to_dense()[:, :, tokens][:, :, :, tokens]  # [B, H, N, N]
    logits = (q @ k.transpose(-1, -2)) / math.sqrt(d)
    logits = logits.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # empty rows: 0
    expected = probs @ v
    out, lse = block_sparse_attention_ref(q, k, v, mask, return_lse=True)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse.double(), torch.logsumexp(logits, -1), rtol=1e-6, atol=1e-6)


def test_full_mask_equals_dense_attention():
    n, d = 100, 64
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 2, n, d, generator=gen) for _ in range(3))
    mask = BlockMask.full(2, 2, n, 32)
    dense = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double())
    out = block_sparse_attention(q, k, v, mask, backend="triton")
    torch.testing.assert_close(out.double(), dense, rtol=0, atol=2e-6)


def test_nan_in_one_query_row_stays_in_that_row():
    n, d = 129, 64
    gen = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(1, 2, n, d, generator=gen) for _ in range(3))
    q[0, 1, 70, 5] = float("nan")
    out = block_sparse_attention(q, k, v, BlockMask.full(1, 2, n, 64), backend="triton")
    bad = torch.isnan(out).any(dim=-1)
    expected = torch.zeros_like(bad)
    expected[0, 1, 70] = True
    assert torch.equal(bad, expected)


def test_non_finite_inputs_are_refused_by_the_reference_only(no_host_reads):
    """The reference backend checks values; the Triton backend must not: apply_dfsattn calls
    it in every layer and a check would sync the host each time."""
    n, d = 129, 64
    gen = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(1, 2, n, d, generator=gen) for _ in range(3))
    v[0, 0, 100, 7] = float("-inf")
    mask = BlockMask.full(1, 2, n, 64)
    with pytest.raises(ValueError, match=r"`v` has 1 non-finite value \(NaN/inf\), first at \[0, 0, 100, 7\] \(-inf\)"):
        block_sparse_attention(q, k, v, mask, backend="ref")
    with no_host_reads():
        out = block_sparse_attention(q, k, v, mask, backend="triton")
    assert not torch.isfinite(out[0, 0, :, 7]).any() and torch.isfinite(out[0, 1]).all()


@pytest.mark.parametrize("backend", ["ref", "triton"])
@pytest.mark.parametrize("shape", [(1, 2, 64, 0), (1, 0, 64, 64)], ids=["D0", "H0"])
def test_empty_axes_are_refused_on_both_backends(backend, shape):
    q = torch.randn(shape)
    with pytest.raises(ValueError, match=r"`q` must have at least one batch element, head and channel"):
        block_sparse_attention(q, q, q, BlockMask.full(1, 2, 64, 32), backend=backend)


def test_strided_input_from_bnhd_layout():
    """diffusers hands [B, N, H, D]; its transpose(1, 2) view runs without a copy."""
    n, d = 97, 64
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, n, 3, d, generator=gen).transpose(1, 2) for _ in range(3))
    mask = _random_mask(2, 3, n, 32, gen)
    out = block_sparse_attention(q, k, v, mask, backend="triton")
    ref = block_sparse_attention_ref(q.contiguous(), k.contiguous(), v.contiguous(), mask)
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-6)
    assert out.transpose(1, 2).is_contiguous(), "the output keeps the [B, N, H, D] memory of q"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_descriptor_and_pointer_paths_agree(dtype, launched_kernels):
    """Without an order, 16-byte aligned tensors take the tensor-descriptor kernel and others
    the pointer kernel; both give the same output on a ragged N (the unaligned q starts one
    element into its buffer; an expanded k, stride 0, has no descriptor either)."""
    n, d = 211, 64
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 2, n, d, generator=gen).to(dtype) for _ in range(3))
    mask = _random_mask(2, 2, n, 64, gen)
    aligned, aligned_lse = block_sparse_attention(q, k, v, mask, return_lse=True, backend="triton")
    shifted = torch.empty(q.numel() + 1, dtype=dtype)[1:].view_as(q).copy_(q)
    assert shifted.data_ptr() % 16 != 0
    unaligned, unaligned_lse = block_sparse_attention(shifted, k, v, mask, return_lse=True, backend="triton")
    shared_k = k[:1].expand(2, -1, -1, -1)
    expanded = block_sparse_attention(q, shared_k, v, mask, backend="triton")
    assert launched_kernels == ["_block_sparse_attention_desc_kernel"] + ["_block_sparse_attention_kernel"] * 2
    torch.testing.assert_close(aligned, unaligned, rtol=0, atol=1e-6)
    torch.testing.assert_close(aligned_lse, unaligned_lse, rtol=0, atol=1e-6)
    ref = block_sparse_attention_ref(q, shared_k.contiguous(), v, mask)
    torch.testing.assert_close(expanded, ref, **(dict(rtol=0, atol=2e-6) if dtype == torch.float32 else
                                                 dict(rtol=0.02, atol=0.02)))


def _inputs(n=64, d=64, dtype=torch.float32, block=32):
    q, k, v = (torch.randn(1, 2, n, d, dtype=dtype) for _ in range(3))
    return q, k, v, BlockMask.full(1, 2, n, block)


def test_error_wrong_dtype():
    q, k, v, mask = _inputs(dtype=torch.float64)
    with pytest.raises(ValueError, match=r"float16, bfloat16 or float32 for the Triton kernel.*backend='ref'"):
        block_sparse_attention(q, k, v, mask, backend="triton")
    with pytest.raises(ValueError, match=r"`q`, `k` and `v` must share one dtype"):
        block_sparse_attention(q, k.float(), v, mask, backend="triton")


def test_error_head_dim():
    q, k, v, mask = _inputs(d=96)
    with pytest.raises(ValueError, match=r"head dim D must be one of \(64, 128\).*backend='ref'"):
        block_sparse_attention(q, k, v, mask, backend="triton")


def test_error_device_mix():
    q, k, v, mask = _inputs()
    with pytest.raises(ValueError, match=r"must be on one device.*move them to one"):
        block_sparse_attention(q, k.to("meta"), v, mask, backend="triton")
    with pytest.raises(ValueError, match=r"`mask` must be on q's device.*mask.to"):
        block_sparse_attention(q.to("meta"), k.to("meta"), v.to("meta"), mask, backend="triton")


def test_error_mask_shape():
    q, k, v, _ = _inputs()
    with pytest.raises(ValueError, match=r"`mask.seq_len` must equal N = q.shape\[2\] = 64"):
        block_sparse_attention(q, k, v, BlockMask.full(1, 2, 65, 32), backend="triton")
    with pytest.raises(ValueError, match=r"`mask` must have B, H = \(1, 2\)"):
        block_sparse_attention(q, k, v, BlockMask.full(1, 3, 64, 32), backend="triton")


def test_error_shapes_order_scale():
    q, k, v, mask = _inputs()
    with pytest.raises(ValueError, match=r"must share one shape"):
        block_sparse_attention(q, k[:, :, :32], v, mask)
    with pytest.raises(ValueError, match=r"`order` must permute N = q.shape\[2\] = 64 tokens"):
        block_sparse_attention(q, k, v, mask, order=make_order("hilbert3d", LatentGrid(1, 8, 9)))
    with pytest.raises(TypeError, match=r"`order` must be a dfsviz TokenOrder"):
        block_sparse_attention(q, k, v, mask, order=torch.arange(64))
    with pytest.raises(ValueError, match=r"`scale` must be a positive finite number"):
        block_sparse_attention(q, k, v, mask, scale=-1.0)


def test_backend_choice(monkeypatch):
    q, k, v, mask = _inputs()
    with pytest.raises(ValueError, match=r"`backend` must be one of \['ref', 'triton'\]"):
        block_sparse_attention(q, k, v, mask, backend="cuda")
    monkeypatch.setenv(_dispatch.ENV_VAR, "fast")
    with pytest.raises(ValueError, match=r"environment variable DFSVIZ_KERNEL_BACKEND must be one of"):
        block_sparse_attention(q, k, v, mask)
    monkeypatch.setenv(_dispatch.ENV_VAR, "triton")
    assert _dispatch.resolve_backend(None, q) == "triton"  # CPU tensors run under the interpreter
    monkeypatch.delenv(_dispatch.ENV_VAR)
    assert _dispatch.resolve_backend(None, q) == ("triton" if q.is_cuda else "ref")
    monkeypatch.setattr(_dispatch, "_INTERPRET", False)
    with pytest.raises(ValueError, match=r"backend 'triton' cannot run on tensors on \['cpu'\]"):
        _dispatch.resolve_backend("triton", q)


def test_error_head_span_beyond_int32(monkeypatch):
    """Row offsets are int32 inside a head; a head spanning more elements must be refused."""
    monkeypatch.setattr(bsa_module, "_MAX_HEAD_SPAN", 64 * 64)  # stands in for 2**31 at test size
    q, k, v, mask = _inputs()
    with pytest.raises(ValueError, match=r"one head of q, k or v spans more than 2\*\*31 elements"):
        block_sparse_attention(q, k, v, mask, backend="triton")


def test_error_return_lse_type():
    q, k, v, mask = _inputs()
    with pytest.raises(TypeError, match=r"`return_lse` must be a bool"):
        block_sparse_attention(q, k, v, mask, return_lse=1, backend="ref")


def test_golden_check_fails_on_large_error_and_nan():
    gold = torch.linspace(0, 1, 10, dtype=torch.float64)
    ref = gold + 1e-4
    assert compare_to_golden("close", gold + 1e-4, ref, gold).ok
    bad = compare_to_golden("far", gold + 1e-3, ref, gold)
    assert not bad.ok and "FAIL" in str(bad) and bad.kernel_err == pytest.approx(1e-3)
    with_nan = gold.clone()
    with_nan[3] = float("nan")
    assert compare_to_golden("nan", with_nan, ref, gold).nan_mismatch == 1
    with pytest.raises(ValueError, match=r"must share a shape"):
        compare_to_golden("shape", gold[:5], ref, gold)


@pytest.mark.parametrize("flags", [dict(PERSISTENT=True), dict(PERSISTENT=True, WARP_SPECIALIZE=True),
                                   dict(WARP_SPECIALIZE=True)], ids=["persistent", "persistent-ws", "ws"])
def test_descriptor_kernel_candidates(flags, monkeypatch, launched_kernels):
    """The Hopper autotune candidates: a persistent grid of fewer programs than work items
    (each walks several, heads in LPT order) and warp-specialized key loops give the result
    of one work item per program."""
    monkeypatch.setattr(jit_attention, "_INTERPRETED_DESC_FLAGS", dict.fromkeys(jit_attention.DESC_FLAGS, False) | flags)
    n, block = 217, 32
    gen = torch.Generator().manual_seed(12)
    q, k, v = (torch.randn(2, 3, n, 64, generator=gen).to(torch.bfloat16) for _ in range(3))
    mask = _random_mask(2, 3, n, block, gen)
    _check_against_golden(q, k, v, mask, None)
    assert launched_kernels == ["_block_sparse_attention_desc_kernel"]


@pytest.mark.cuda
@pytest.mark.skipif(_dispatch.interpreting(), reason="the interpreter copies tensors to the host; run with TRITON_INTERPRET=0")
@pytest.mark.parametrize("precision", ["native", "fp8"])
@pytest.mark.parametrize("order_name", [None, "hilbert3d"], ids=lambda o: o or "noorder")
def test_attention_is_asynchronous_and_graph_capturable(order_name, precision):
    """The cached path (attention on a kept mask): no synchronising call, and a CUDA graph of
    the call replays to the eager result on new inputs copied into the captured buffers."""
    if precision == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 needs compute capability >= 8.9")
    grid = LatentGrid(4, 15, 16, text_len=46)  # N = 1006, as issue 18's small case
    n = grid.num_tokens
    gen = torch.Generator(device="cuda").manual_seed(3)
    q, k, v = (torch.randn(2, 4, n, 128, generator=gen, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    m = -(-n // 128)
    mask = BlockMask.from_dense(torch.rand(2, 4, m, m, generator=gen, device="cuda") < 0.4, n, 128)
    order = make_order(order_name, grid) if order_name else None

    def call():
        return block_sparse_attention(q, k, v, mask, order=order, precision=precision, backend="triton")

    call()  # compiles, autotunes and uploads the order outside the checks
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        call()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = call()
    for x in (q, k, v):
        x.copy_(torch.randn(x.shape, generator=gen, device="cuda", dtype=x.dtype))
    eager = call()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)

"""Fused block scoring (dfs_tile, meanpool): Triton kernel (interpreter on CPU) vs reference.

The kernel's error against the float64 reference may be at most 2x the reference's own
error in the test dtype plus a small floor (dfsviz.kernels._check).
"""

import importlib
from types import SimpleNamespace

import pytest
import torch

from dfsviz.kernels._check import compare_to_golden
from dfsviz.kernels._dispatch import interpreting
from dfsviz.kernels.block_scores import block_scores
from dfsviz.sparse.scoring import block_scores_ref

jit_scores = importlib.import_module("dfsviz.kernels._jit.scores")

# (method, N, D, dtype, block, tile); B = 2, H = 2 throughout.
CASES = [
    ("dfs_tile", 1, 64, torch.float32, 128, 16),
    ("dfs_tile", 127, 128, torch.float16, 128, 16),
    ("dfs_tile", 129, 64, torch.float32, 64, 16),
    ("dfs_tile", 211, 64, torch.float16, 32, 4),
    ("dfs_tile", 257, 128, torch.float32, 128, 32),
    ("dfs_tile", 200, 64, torch.float32, 16, 16),  # tile = block: one tile per block
    ("meanpool", 1, 64, torch.float32, 128, None),
    ("meanpool", 129, 128, torch.float16, 64, None),
    ("meanpool", 257, 64, torch.float32, 32, None),
    ("dfs_tile", 129, 64, torch.bfloat16, 64, 16),
    ("dfs_tile", 1100, 64, torch.float32, 128, 16),  # 72 tiles: full key slices, then a short one
    ("dfs_tile", 1024, 64, torch.bfloat16, 64, 16),  # 64 tiles: full key slices only
]


def _case_id(case):
    method, n, d, dtype, block, tile = case
    return f"{method}-n{n}-d{d}-{str(dtype).split('.')[-1]}-b{block}-t{tile}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_kernel_matches_reference(case):
    method, n, d, dtype, block, tile = case
    gen = torch.Generator().manual_seed(n + d + block)
    # A shared direction makes some key tiles clearly preferred, so scores are not flat.
    shared = torch.randn(d, generator=gen)
    q = (torch.randn(2, 2, n, d, generator=gen) + 0.7 * shared).to(dtype)
    k = (torch.randn(2, 2, n, d, generator=gen) + 0.7 * shared).to(dtype)
    out = block_scores(q, k, method=method, tile=tile, block=block, backend="triton")
    ref = block_scores_ref(q, k, method=method, tile=tile, block=block)
    gold = block_scores_ref(q.double(), k.double(), method=method, tile=tile, block=block)
    m = -(-n // block)
    assert out.dtype == torch.float32 and out.shape == (2, 2, m, m)
    check = compare_to_golden(method, out, ref, gold, floor=1e-6)
    assert check.ok, str(check)


@pytest.mark.parametrize("splits", [1, 2, 3, 8], ids=lambda s: f"splits{s}")
def test_key_splits_give_the_same_scores(splits, monkeypatch):
    """Programs that share a row's key tiles (split 0 .. splits - 1; one holds the short last
    slice, and from 3 splits on some hold none) combine to the unsplit scores."""
    n = 1100  # 72 tiles of 16: in the interpreter's 64-tile slices, a full slice and a short one
    gen = torch.Generator().manual_seed(21)
    q, k = (torch.randn(1, 2, n, 64, generator=gen) * 2 for _ in range(2))
    monkeypatch.setattr(jit_scores, "_key_splits", lambda *a: 1)
    whole = block_scores(q, k, method="dfs_tile", tile=16, block=128, backend="triton")
    monkeypatch.setattr(jit_scores, "_key_splits", lambda *a: splits)
    split = block_scores(q, k, method="dfs_tile", tile=16, block=128, backend="triton")
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-6)


def test_key_splits_fill_the_gpu_only_where_needed(monkeypatch):
    monkeypatch.setattr(jit_scores, "interpreting", lambda: False)
    h200 = SimpleNamespace(multi_processor_count=132)
    monkeypatch.setattr(jit_scores, "cuda_properties", lambda device: h200)
    assert jit_scores._key_splits(2048, 12, "cuda") == 3  # Wan2.1-1.3B 480p, B = 1: 384 programs
    assert jit_scores._key_splits(4728, 40, "cuda") == 1  # Wan2.1-14B 720p: 2,960 programs
    assert jit_scores._key_splits(8, 1, "cuda") == jit_scores._MAX_KEY_SPLITS


def test_dfs_tile_rows_sum_to_tiles_per_block():
    """Each query block holds block/tile softmax rows (pad tiles included), so rows sum to that."""
    gen = torch.Generator().manual_seed(2)
    q, k = (torch.randn(1, 2, 150, 64, generator=gen) for _ in range(2))
    out = block_scores(q, k, method="dfs_tile", tile=16, block=64, backend="triton")
    torch.testing.assert_close(out.sum(-1), torch.full((1, 2, 3), 4.0), rtol=0, atol=1e-5)


def test_other_methods_run_their_reference():
    gen = torch.Generator().manual_seed(4)
    q, k = (torch.randn(1, 1, 64, 64, generator=gen) for _ in range(2))
    out = block_scores(q, k, method="antidiagonal", tile=8, block=32, backend="triton")
    assert torch.equal(out, block_scores_ref(q, k, method="antidiagonal", tile=8, block=32))


def test_errors():
    q = torch.randn(1, 1, 64, 96)
    with pytest.raises(ValueError, match=r"head dim D must be one of \(64, 128\).*backend='ref'"):
        block_scores(q, q, backend="triton")
    q = torch.randn(1, 1, 64, 64, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"float16, bfloat16 or float32 for the Triton kernel"):
        block_scores(q, q, backend="triton")
    q = torch.randn(1, 1, 64, 64)
    with pytest.raises(ValueError, match=r"`tile` \(tile of dfs_tile\) must be a power of two"):
        block_scores(q, q, tile=24, block=64, backend="triton")
    with pytest.raises(ValueError, match=r"`method` must be one of"):
        block_scores(q, q, method="mean", backend="triton")
    with pytest.raises(ValueError, match=r"`q` and `k` must be on one device"):
        block_scores(q, q.to("meta"), backend="triton")
    with pytest.raises(ValueError, match=r"`scale` must be a positive finite number"):
        block_scores(q, q, block=64, scale=0.0, backend="triton")


def test_dfs_tile_means_beyond_float16_are_scaled():
    """Tile means of 1e5 overflow the fp16 hi/lo split; the power-of-two scaling keeps them exact."""
    gen = torch.Generator().manual_seed(6)
    q = torch.randn(1, 2, 100, 64, generator=gen) * 1e-3
    q[:, :, :16] += 1e5  # the first tile's mean is ~1e5 in every coordinate
    k = torch.randn(1, 2, 100, 64, generator=gen)
    out = block_scores(q, k, method="dfs_tile", tile=16, block=32, backend="triton")
    gold = block_scores_ref(q.double(), k.double(), method="dfs_tile", tile=16, block=32)
    ref = block_scores_ref(q, k, method="dfs_tile", tile=16, block=32)
    assert torch.isfinite(out).all()
    check = compare_to_golden("dfs_tile scaled", out, ref, gold, floor=1e-6)
    assert check.ok, str(check)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=lambda t: str(t).split(".")[-1])
def test_dfs_tile_queries_of_1e6_match_float64(dtype):
    """Every query tile mean (~1e6) overflows float16, keys are normal. The scale is
    D**-0.5 / 1e6, so the logits are O(1) and the scores depend on the low bits of the
    scaled hi/lo parts. (With the default scale the logits reach ~1e7, where float32-level
    logits on the GPU, this kernel's and the old 3xTF32 fallback's alike, miss the float64
    scores by up to 1 while the float32 reference happens to match them.)"""
    gen = torch.Generator().manual_seed(7)
    shared = torch.randn(128, generator=gen)
    q = ((torch.randn(2, 2, 200, 128, generator=gen) + 0.7 * shared) * 1e6).to(dtype)
    k = (torch.randn(2, 2, 200, 128, generator=gen) + 0.7 * shared).to(dtype)
    kw = dict(method="dfs_tile", tile=16, block=64, scale=128**-0.5 * 1e-6)
    out = block_scores(q, k, backend="triton", **kw)
    ref = block_scores_ref(q, k, **kw)
    gold = block_scores_ref(q.double(), k.double(), **kw)
    check = compare_to_golden("dfs_tile q x 1e6", out, ref, gold, floor=1e-6)
    assert check.ok, str(check)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=lambda t: str(t).split(".")[-1])
def test_dfs_tile_overflow_scaling_is_exact(dtype):
    """Power-of-two scales are exact: q x 2^10 and k x 2^7 (tile means ~1.3e7 and ~1.6e6,
    beyond float16) with scale x 2^-17 give bit-identical scores to the unscaled inputs,
    whose tile means (max 12288 per tile) need no scaling."""
    gen = torch.Generator().manual_seed(8)
    q, k = (torch.randn(1, 2, 1088, 64, generator=gen) for _ in range(2))  # 68 tiles, no pad tiles
    q[..., 0] = 12288.0  # max |mean| of every tile in (2^13, 2^14]: scaled back to the same parts
    k[..., 1] = 12288.0
    q, k = q.to(dtype), k.to(dtype)
    kw = dict(method="dfs_tile", tile=16, block=64, backend="triton")
    out = block_scores(q, k, scale=1e-4, **kw)
    scaled = block_scores(q * 2.0**10, k * 2.0**7, scale=1e-4 * 2.0**-17, **kw)
    assert torch.isfinite(out).all() and out.amax(-1).min() < 2  # logits O(1): not one-hot rows
    assert torch.equal(scaled, out)


def test_dfs_tile_reads_nothing_back_to_the_host(no_host_reads):
    """Structural check for the missing host sync: no tensor value is read by Python (.item(),
    bool(tensor), ...) in a call whose means overflow float16. The interpreter itself copies
    tensors to the host, so this cannot see every sync; the CUDA test below can."""
    gen = torch.Generator().manual_seed(9)
    q, k = (torch.randn(1, 1, 64, 64, generator=gen, dtype=torch.bfloat16) for _ in range(2))
    q[:, :, :16] += 1e6
    with no_host_reads():
        out = block_scores(q, k, method="dfs_tile", tile=16, block=32, backend="triton")
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("method", ["dfs_tile", "meanpool"])
def test_non_finite_inputs_are_refused_by_the_reference_only(method, no_host_reads):
    """The reference backend checks values; the Triton backend must not (a check would sync
    the host on every call), so the NaN reaches the scores, where select_topk refuses it."""
    gen = torch.Generator().manual_seed(4)
    q, k = (torch.randn(1, 2, 64, 64, generator=gen) for _ in range(2))
    k[0, 0, 9, 1] = float("inf")
    with pytest.raises(ValueError, match=r"`k` has 1 non-finite value \(NaN/inf\), first at \[0, 0, 9, 1\] \(inf\)"):
        block_scores(q, k, method=method, block=32, backend="ref")
    with no_host_reads():
        out = block_scores(q, k, method=method, block=32, backend="triton")
    assert not torch.isfinite(out[0, 0]).all() and torch.isfinite(out[0, 1]).all()


@pytest.mark.parametrize("backend", ["ref", "triton"])
@pytest.mark.parametrize("method", ["dfs_tile", "meanpool"])
@pytest.mark.parametrize("shape", [(1, 0, 64, 64), (0, 2, 64, 64), (1, 2, 64, 0)], ids=["H0", "B0", "D0"])
def test_empty_axes_are_refused_on_both_backends(backend, method, shape):
    q = torch.randn(shape)
    with pytest.raises(ValueError, match=r"`q` must have at least one batch element, head and channel"):
        block_scores(q, q, method=method, block=32, backend=backend)


@pytest.mark.cuda
@pytest.mark.skipif(interpreting(), reason="the interpreter copies tensors to the host; run with TRITON_INTERPRET=0")
def test_dfs_tile_is_asynchronous_and_graph_capturable():
    """No synchronising call (torch's sync debug mode raises on one) and a CUDA graph of the
    call replays to the eager result, with tile means beyond float16."""
    gen = torch.Generator(device="cuda").manual_seed(10)
    q, k = (torch.randn(1, 2, 1000, 128, generator=gen, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    q[:, :, :16] += 1e6

    def call():
        return block_scores(q, k, method="dfs_tile", tile=16, block=128, backend="triton")

    eager = call()  # compiles and autotunes (which synchronises) outside the checks
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        again = call()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = call()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(again, eager) and torch.equal(captured, eager)

"""Block statistics, recall and oracle recall against brute force on a dense float64 softmax."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dfsviz.sparse.masks import BlockMask
from dfsviz.sparse.stats import (
    BlockStats,
    _iter_row_chunks,
    block_recall,
    block_recall_per_query,
    block_stats_ref,
    mask_density,
    oracle_recall,
    row_attention_ref,
    row_recall_ref,
    variance_ratio,
)

LENGTHS = (1, 113, 127, 129, 257)


def _qk(n: int, d: int, *, b: int = 1, h: int = 2, seed: int = 0, dtype=torch.float64, spread: float = 1.5):
    gen = torch.Generator().manual_seed(seed)
    q = spread * torch.randn(b, h, n, d, generator=gen, dtype=torch.float64)
    k = spread * torch.randn(b, h, n, d, generator=gen, dtype=torch.float64)
    return q.to(dtype), k.to(dtype)


def _blocks(n: int, block: int) -> list[slice]:
    return [slice(s, min(n, s + block)) for s in range(0, n, block)]


def _dense(q: torch.Tensor, k: torch.Tensor, block: int, scale: float | None = None) -> dict:
    """Everything of docs/theory.md by brute force: dense float64 logits, loops over block pairs."""
    q, k = q.double(), k.double()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = q @ k.transpose(-1, -2) * scale
    attn = torch.softmax(logits, dim=-1)
    blocks = _blocks(q.shape[2], block)
    mb = len(blocks)
    out = {name: torch.empty(*q.shape[:2], mb, mb, dtype=torch.float64) for name in "mLrJ"}
    for u, rows in enumerate(blocks):
        for v, cols in enumerate(blocks):
            tile = logits[:, :, rows, cols]
            lbar = tile.mean(dim=-1)  # [B, H, |U_u|]
            jgap = torch.logsumexp(tile - lbar[..., None], dim=-1) - math.log(cols.stop - cols.start)
            out["m"][:, :, u, v] = attn[:, :, rows, cols].sum(dim=(-1, -2)) / (rows.stop - rows.start)
            out["L"][:, :, u, v] = lbar.mean(dim=-1)
            out["r"][:, :, u, v] = (lbar - lbar.mean(dim=-1, keepdim=True)).abs().amax(dim=-1)
            out["J"][:, :, u, v] = jgap.amax(dim=-1)
    out["lse"] = torch.logsumexp(logits, dim=-1)
    out["attn"] = attn
    return out


def _random_mask(shape, n: int, block: int, seed: int, p: float = 0.4) -> BlockMask:
    gen = torch.Generator().manual_seed(seed)
    dense = torch.rand(shape, generator=gen) < p
    return BlockMask.from_dense(dense, n, block)


def _token_recall(attn: torch.Tensor, mask: BlockMask) -> torch.Tensor:
    """float64 [B, H, N]: per-row kept attention from the token-level expansion of the mask."""
    n = attn.shape[-1]
    dense = mask.to_dense()
    tokens = dense.repeat_interleave(mask.block, dim=2).repeat_interleave(mask.block, dim=3)[:, :, :n, :n]
    return (attn * tokens).sum(dim=-1)


# ------------------------------------------------------------------ block statistics


@pytest.mark.parametrize("d", (64, 128))
@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("block", (16, 128))
def test_block_stats_match_bruteforce_float64(n, d, block):
    q, k = _qk(n, d, seed=n + d)
    ref = _dense(q, k, block)
    stats = block_stats_ref(q, k, block=block)
    assert stats.m.dtype == torch.float64 and stats.shape == (1, 2, len(_blocks(n, block)), len(_blocks(n, block)))
    for name in ("m", "L", "r", "J", "lse"):
        torch.testing.assert_close(getattr(stats, name), ref[name], rtol=1e-10, atol=1e-10, msg=name)
    torch.testing.assert_close(stats.m.sum(dim=-1), torch.ones(1, 2, stats.num_blocks, dtype=torch.float64))


@pytest.mark.parametrize("n", (129, 257))
def test_block_stats_float32_and_half_inputs(n):
    q, k = _qk(n, 64, seed=3)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        qd, kd = q.to(dtype), k.to(dtype)
        ref = _dense(qd, kd, 16)  # the reference sees the same rounded inputs, in float64
        stats = block_stats_ref(qd, kd, block=16)
        assert stats.m.dtype == torch.float32
        for name in ("m", "L", "r", "J", "lse"):
            torch.testing.assert_close(getattr(stats, name).double(), ref[name], rtol=2e-4, atol=2e-4, msg=f"{dtype} {name}")


def test_custom_scale_and_batch():
    q, k = _qk(200, 64, b=2, h=3, seed=5)
    ref = _dense(q, k, 32, scale=0.3)
    stats = block_stats_ref(q, k, block=32, scale=0.3)
    for name in ("m", "L", "r", "J", "lse"):
        torch.testing.assert_close(getattr(stats, name), ref[name], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype, factor", [(torch.float64, 20.0), (torch.float32, 8.0)])
def test_extreme_logits_take_the_exact_fallback(dtype, factor):
    # Logit deviations inside a block beyond exp's range (~709 in float64, ~88 in float32):
    # the exact max-shifted logsumexp must take over, with no inf/NaN.
    q, k = _qk(150, 64, seed=11, spread=factor)
    ref = _dense(q.to(dtype), k.to(dtype), 16)
    stats = block_stats_ref(q.to(dtype), k.to(dtype), block=16)
    for name in ("m", "L", "r", "J", "lse"):
        value = getattr(stats, name).double()
        assert torch.isfinite(value).all(), name
        tol = 1e-9 if dtype == torch.float64 else 1e-3
        torch.testing.assert_close(value, ref[name], rtol=tol, atol=tol, msg=name)


def test_exact_identity_of_theory():
    # sum_{j in V_v} exp(l_ij) = n_v exp(Lbar_iv + J_iv) for every row and key block.
    n, block = 129, 16
    q, k = _qk(n, 64, b=2, h=2, seed=2)
    logits = q @ k.transpose(-1, -2) / 8.0
    blocks = _blocks(n, block)
    direct = torch.stack([torch.exp(logits[..., cols]).sum(dim=-1) for cols in blocks], dim=-1)  # [B, H, N, Mk]
    sizes = torch.tensor([c.stop - c.start for c in blocks], dtype=torch.float64)
    direct = direct.reshape(1, -1, n, len(blocks))  # the chunks index flattened B * H heads
    seen = torch.zeros(direct.shape[:3], dtype=torch.bool)
    for chunk in _iter_row_chunks(q, k, block, 1 / 8.0, 3000):  # several head groups and row chunks
        rows = slice(chunk.u0 * block, chunk.u0 * block + chunk.rows_valid)
        lbar, jgap = chunk.Lbar[:, :, : chunk.rows_valid], chunk.J[:, :, : chunk.rows_valid]
        assert (jgap >= 0).all()
        expected = direct[:, chunk.heads, rows]
        torch.testing.assert_close(sizes * torch.exp(lbar + jgap), expected, rtol=1e-11, atol=0)
        torch.testing.assert_close(torch.exp(chunk.lse_iv[:, :, : chunk.rows_valid]), expected, rtol=1e-11, atol=0)
        seen[:, chunk.heads, rows] = True
    assert seen.all()


def test_identical_keys_in_a_block_have_zero_diversity():
    n, block = 64, 16
    q, k = _qk(n, 64, seed=4)
    k = k[:, :, ::block].repeat_interleave(block, dim=2)  # each key block holds one key repeated
    stats = block_stats_ref(q, k, block=block)
    assert stats.J.abs().max() < 1e-12
    q = q[:, :, ::block].repeat_interleave(block, dim=2)
    assert block_stats_ref(q, k, block=block).r.abs().max() < 1e-12


def test_chunking_gives_the_single_chunk_result():
    q, k = _qk(257, 64, b=2, h=2, seed=6)
    whole = block_stats_ref(q, k, block=16, max_chunk_elements=1 << 30)
    for chunk in (1, 300, 5000, 70000):
        part = block_stats_ref(q, k, block=16, max_chunk_elements=chunk)
        for name in ("m", "L", "r", "J", "lse"):
            torch.testing.assert_close(getattr(part, name), getattr(whole, name), rtol=1e-13, atol=1e-13)


def test_logits_held_at_once_are_bounded(monkeypatch):
    # Above 4096 tokens the pass must never hold an N x N logit matrix.
    n = 4608
    q, k = _qk(n, 16, b=1, h=1, seed=7, dtype=torch.float32)
    largest = []
    real = torch.matmul

    def spy(a, b, *args, **kwargs):
        out = real(a, b, *args, **kwargs)
        largest.append(out.numel())
        return out

    monkeypatch.setattr(torch, "matmul", spy)
    block_stats_ref(q, k, block=128)
    assert max(largest) < n * n
    largest.clear()
    block_stats_ref(q, k, block=128, max_chunk_elements=128 * 128 * 4)
    assert max(largest) <= 128 * 128 * 4


# ------------------------------------------------------------------ recall


@pytest.mark.parametrize("n, block", [(1, 16), (113, 16), (257, 16), (129, 128), (127, 128)])
def test_block_recall_matches_dense_attention(n, block):
    q, k = _qk(n, 64, b=2, h=2, seed=n)
    ref = _dense(q, k, block)
    stats = block_stats_ref(q, k, block=block)
    mask = _random_mask(stats.shape, n, block, seed=n)
    rows = _token_recall(ref["attn"], mask)
    torch.testing.assert_close(block_recall(stats.m, mask), rows.mean(dim=-1), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(block_recall(stats, mask), rows.mean(dim=-1), rtol=1e-10, atol=1e-12)
    per_block = torch.stack([rows[:, :, s].mean(dim=-1) for s in _blocks(n, block)], dim=-1)
    torch.testing.assert_close(block_recall_per_query(stats.m, mask), per_block, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(row_recall_ref(q, k, mask), rows, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(row_recall_ref(q, k, mask, max_chunk_elements=1), rows, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("n", LENGTHS)
def test_full_mask_recall_is_one(n):
    q, k = _qk(n, 64, seed=1)
    stats = block_stats_ref(q, k, block=16)
    full = BlockMask.full(1, 2, n, 16)
    torch.testing.assert_close(block_recall(stats.m, full), torch.ones(1, 2, dtype=torch.float64))
    torch.testing.assert_close(row_recall_ref(q, k, full), torch.ones(1, 2, n, dtype=torch.float64))
    empty = BlockMask.from_dense(torch.zeros(stats.shape, dtype=torch.bool), n, 16)
    assert block_recall(stats.m, empty).abs().max() == 0


def _oracle_bruteforce(attn: torch.Tensor, block: int, counts: torch.Tensor) -> torch.Tensor:
    n = attn.shape[-1]
    blocks = _blocks(n, block)
    b, h = attn.shape[:2]
    total = torch.zeros(b, h, dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            for u, rows in enumerate(blocks):
                masses = sorted(
                    (float(attn[bi, hi, rows, cols].sum()) / (rows.stop - rows.start) for cols in blocks), reverse=True
                )
                total[bi, hi] += (rows.stop - rows.start) / n * sum(masses[: int(counts[bi, hi, u])])
    return total


@pytest.mark.parametrize("n", (113, 257))
def test_oracle_recall_matches_bruteforce(n):
    q, k = _qk(n, 64, b=2, h=2, seed=9)
    ref = _dense(q, k, 16)
    stats = block_stats_ref(q, k, block=16)
    mb = stats.num_blocks
    for kk in (0, 1, 3, mb):
        expected = _oracle_bruteforce(ref["attn"], 16, torch.full((2, 2, mb), kk))
        torch.testing.assert_close(oracle_recall(stats, kk), expected, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(oracle_recall(stats.m, kk, seq_len=n, block=16), expected, rtol=1e-10, atol=1e-12)
    per_row = torch.randint(0, mb + 1, (2, 2, mb), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(oracle_recall(stats, per_row), _oracle_bruteforce(ref["attn"], 16, per_row), rtol=1e-10, atol=1e-12)
    # a per-query-block k broadcast over batch and heads
    column = per_row[0, 0]
    expected = _oracle_bruteforce(ref["attn"], 16, column.expand(2, 2, mb))
    torch.testing.assert_close(oracle_recall(stats, column), expected, rtol=1e-10, atol=1e-12)


def test_oracle_beats_every_mask_of_the_same_size():
    q, k = _qk(257, 64, b=1, h=2, seed=13)
    stats = block_stats_ref(q, k, block=16)
    for seed in range(20):
        mask = _random_mask(stats.shape, 257, 16, seed=seed, p=0.3)
        best = oracle_recall(stats, mask.kv_num_blocks.long())
        assert (block_recall(stats, mask) <= best + 1e-12).all()


# ------------------------------------------------------------------ invalid block mass
# Masses that are not a distribution per row used to give recalls such as -0.27 or 1.33.
RECALLS = {
    "block_recall": lambda m, mask: block_recall(m, mask),
    "block_recall_per_query": lambda m, mask: block_recall_per_query(m, mask),
    "oracle_recall": lambda m, mask: oracle_recall(m, 2, seq_len=mask.seq_len, block=mask.block),
}


def _valid_mass() -> torch.Tensor:
    return _stats().m.clone()  # [1, 2, 3, 3], rows sum to 1


@pytest.mark.parametrize("recall", RECALLS.values(), ids=RECALLS.keys())
def test_negative_mass_is_refused(recall):
    m = _valid_mass()
    m[0, 1, 2] = torch.tensor([-0.27, 0.77, 0.5], dtype=m.dtype)  # still sums to 1
    with pytest.raises(ValueError, match=r"`m` must be non-negative block mass \(got -0.27 at \[0, 1, 2, 0\]\); "
                                         r"pass m of block_stats_ref"):
        recall(m, BlockMask.full(1, 2, 40, 16))


@pytest.mark.parametrize("recall", RECALLS.values(), ids=RECALLS.keys())
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_mass_is_refused(recall, bad):
    m = _valid_mass()
    m[0, 0, 1, 2] = bad
    with pytest.raises(ValueError, match=rf"`m` has 1 non-finite value \(NaN/inf\), first at \[0, 0, 1, 2\] \({bad}\)"):
        recall(m, BlockMask.full(1, 2, 40, 16))


@pytest.mark.parametrize("recall", RECALLS.values(), ids=RECALLS.keys())
def test_rows_that_do_not_sum_to_one_are_refused(recall):
    m = _valid_mass()
    m[0, 1, 1] *= 1.33
    with pytest.raises(ValueError, match=r"`m` rows must each sum to 1 within 0.01 \(row \[0, 1, 1\] sums to 1.33\); "
                                         r".*not block scores"):
        recall(m, BlockMask.full(1, 2, 40, 16))


def test_block_stats_with_invalid_mass_are_refused():
    s = _stats()
    bad = BlockStats(m=s.m * 2, L=s.L, r=s.r, J=s.J, lse=s.lse, block=16, seq_len=40)
    with pytest.raises(ValueError, match=r"`m` rows must each sum to 1 within 0.01 \(row \[0, 0, 0\] sums to 2\)"):
        block_recall(bad, BlockMask.full(1, 2, 40, 16))
    with pytest.raises(ValueError, match=r"`m` rows must each sum to 1"):
        oracle_recall(bad, 1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_stored_mass_passes_and_recall_stays_in_unit_interval(dtype):
    """A capture may keep m in float16 or bfloat16: rounding moves each row sum by up to
    2^-11 or 2^-8 (relative), inside the tolerance; recall is clipped to [0, 1]."""
    q, k = _qk(257, 64, b=1, h=2, seed=21, spread=3.0)
    stats = block_stats_ref(q, k, block=16)
    stored = stats.m.to(dtype)
    full = BlockMask.full(1, 2, 257, 16)
    for mask in (full, _random_mask(stats.shape, 257, 16, seed=4)):
        exact = block_recall(stats.m, mask)
        rounded = block_recall(stored, mask)
        assert ((rounded >= 0) & (rounded <= 1)).all()
        torch.testing.assert_close(rounded, exact, rtol=0, atol=4 * torch.finfo(dtype).eps)
        per_query = block_recall_per_query(stored, mask)
        assert ((per_query >= 0) & (per_query <= 1)).all()
    oracle = oracle_recall(stored, stats.num_blocks, seq_len=257, block=16)
    assert (oracle <= 1).all() and (oracle >= 1 - 4 * torch.finfo(dtype).eps).all()


@settings(max_examples=60, deadline=None)
@given(
    mk=st.integers(1, 12),
    seed=st.integers(0, 2**16),
    sharp=st.floats(0.0, 30.0),
    dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64]),
)
def test_recall_of_valid_mass_lies_in_unit_interval(mk, seed, sharp, dtype):
    gen = torch.Generator().manual_seed(seed)
    n = 16 * mk
    m = torch.softmax(sharp * torch.randn(1, 2, mk, mk, generator=gen, dtype=torch.float64), dim=-1).to(dtype)
    mask = _random_mask((1, 2, mk, mk), n, 16, seed=seed, p=0.6)
    for value in (block_recall(m, mask), block_recall_per_query(m, mask), oracle_recall(m, mk, seq_len=n, block=16)):
        assert ((value >= 0) & (value <= 1)).all(), value


def test_mask_density_is_the_mask_density():
    mask = _random_mask((1, 2, 9, 9), 129, 16, seed=2)
    kept = mask.to_dense().repeat_interleave(16, 2).repeat_interleave(16, 3)[:, :, :129, :129]
    torch.testing.assert_close(mask_density(mask), kept.double().mean(dim=(-1, -2)))


# ------------------------------------------------------------------ variance ratio and rows


@pytest.mark.parametrize("n", LENGTHS)
def test_variance_ratio_matches_bruteforce(n):
    x, _ = _qk(n, 32, b=2, h=2, seed=n, dtype=torch.float32)
    xd = x.double()
    within = sum(((xd[:, :, s] - xd[:, :, s].mean(dim=2, keepdim=True)) ** 2).sum(dim=(2, 3)) for s in _blocks(n, 16))
    total = ((xd - xd.mean(dim=2, keepdim=True)) ** 2).sum(dim=(2, 3))
    expected = torch.where(total > 0, within / total, torch.zeros_like(total))
    got = variance_ratio(x, 16)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_variance_ratio_extremes():
    # all tokens equal: no variance, W = 0 by convention; one distinct vector per block: W = 0;
    # blocks sharing the global mean (each block a copy of the whole pattern): W = 1.
    same = torch.ones(1, 1, 64, 8)
    assert variance_ratio(same, 16).item() == 0.0
    per_block = torch.randn(1, 1, 4, 8).repeat_interleave(16, dim=2)
    assert variance_ratio(per_block, 16).item() < 1e-12
    pattern = torch.randn(1, 1, 16, 8).repeat(1, 1, 4, 1)
    assert abs(variance_ratio(pattern, 16).item() - 1.0) < 1e-9


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [113, 217, 333])
def test_variance_ratio_of_identical_tokens_is_zero(n, dtype):
    """Every token the same vector: no variance at all, so W is exactly 0 (rounding of the mean of
    equal numbers must not turn 0 / 0 into a ratio)."""
    vectors = torch.cat([torch.full((2, 8), 0.3, dtype=dtype), torch.full((1, 8), 7.7, dtype=dtype),
                         torch.randn(2, 8, generator=torch.Generator().manual_seed(n), dtype=dtype)])
    x = vectors[None, :, None, :].expand(1, 5, n, 8).contiguous()
    assert torch.equal(variance_ratio(x, 16), torch.zeros(1, 5, dtype=torch.float64))


def test_row_attention_matches_dense_softmax():
    q, k = _qk(129, 64, b=2, h=2, seed=8)
    ref = _dense(q, k, 16)["attn"]
    rows = [0, 5, 128]
    got = row_attention_ref(q, k, rows)
    torch.testing.assert_close(got, ref[:, :, rows], rtol=1e-12, atol=1e-14)
    got32 = row_attention_ref(q.float(), k.float(), torch.tensor(rows))
    assert got32.dtype == torch.float32 and got32.shape == (2, 2, 3, 129)
    torch.testing.assert_close(got32.double(), ref[:, :, rows], rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------ error messages


def _stats(n: int = 40, block: int = 16) -> BlockStats:
    q, k = _qk(n, 8, seed=0)
    return block_stats_ref(q, k, block=block)


def test_block_stats_ref_errors():
    q, k = _qk(40, 8)
    with pytest.raises(ValueError, match=r"`block` must be a power of two in \[16, 256\] \(got 96\); DFSAttn uses 128"):
        block_stats_ref(q, k, block=96)
    with pytest.raises(ValueError, match=r"`scale` must be a positive finite number or None"):
        block_stats_ref(q, k, scale=-1.0)
    with pytest.raises(ValueError, match=r"`scale` must be a positive finite number or None"):
        block_stats_ref(q, k, scale=math.inf)
    with pytest.raises(ValueError, match=r"`max_chunk_elements` must be a positive integer or None"):
        block_stats_ref(q, k, max_chunk_elements=0)
    with pytest.raises(ValueError, match=r"`q` and `k` must have the same shape"):
        block_stats_ref(q, k[:, :, :20])


def test_block_stats_dataclass_errors():
    s = _stats()
    with pytest.raises(ValueError, match=r"`seq_len` must be a positive integer"):
        BlockStats(s.m, s.L, s.r, s.J, s.lse, block=16, seq_len=0)
    with pytest.raises(ValueError, match=r"`block` must be a power of two"):
        BlockStats(s.m, s.L, s.r, s.J, s.lse, block=20, seq_len=40)
    with pytest.raises(TypeError, match=r"`r` must be a torch.Tensor"):
        BlockStats(s.m, s.L, None, s.J, s.lse, block=16, seq_len=40)
    with pytest.raises(ValueError, match=r"`m` must have shape \[B, H, 3, 3\] for seq_len=40, block=16"):
        BlockStats(s.m[..., :2], s.L, s.r, s.J, s.lse, block=16, seq_len=40)
    with pytest.raises(ValueError, match=r"`J` must have the shape of `m`"):
        BlockStats(s.m, s.L, s.r, s.J[:, :1], s.lse, block=16, seq_len=40)
    with pytest.raises(ValueError, match=r"`lse` must have shape \[B, H, N\] = \(1, 2, 40\)"):
        BlockStats(s.m, s.L, s.r, s.J, s.lse[..., :5], block=16, seq_len=40)


def test_recall_errors():
    s = _stats()
    mask = BlockMask.full(1, 2, 40, 16)
    with pytest.raises(TypeError, match=r"`mask` must be a dfsviz BlockMask"):
        block_recall(s.m, s.m > 0)
    with pytest.raises(ValueError, match=r"must describe the same blocks"):
        block_recall(s, BlockMask.full(1, 2, 41, 16))
    with pytest.raises(TypeError, match=r"`m` must be a torch.Tensor \[B, H, Mq, Mk\] or BlockStats"):
        block_recall([1.0], mask)
    with pytest.raises(ValueError, match=r"`m` must have the mask's shape \[B, H, Mq, Mk\] = \(1, 2, 3, 3\)"):
        block_recall_per_query(s.m[:, :1], mask)
    with pytest.raises(ValueError, match=r"`m` must be a floating-point block mass"):
        block_recall(torch.ones(1, 2, 3, 3, dtype=torch.int64), mask)
    with pytest.raises(ValueError, match=r"`m` and `mask` must be on one device"):
        block_recall(s.m.to("meta"), mask)
    with pytest.raises(TypeError, match=r"`mask` must be a dfsviz BlockMask"):
        mask_density("dense")


def test_oracle_recall_errors():
    s = _stats()
    with pytest.raises(ValueError, match=r"`seq_len` and `block` must be None when `m` is a BlockStats"):
        oracle_recall(s, 1, seq_len=40)
    with pytest.raises(ValueError, match=r"`seq_len` and `block` are required when `m` is a tensor"):
        oracle_recall(s.m, 1)
    with pytest.raises(TypeError, match=r"`m` must be a torch.Tensor \[B, H, Mq, Mk\] or BlockStats"):
        oracle_recall("m", 1, seq_len=40, block=16)
    with pytest.raises(ValueError, match=r"`seq_len` must be a positive integer"):
        oracle_recall(s.m, 1, seq_len=-3, block=16)
    with pytest.raises(ValueError, match=r"`block` must be a power of two"):
        oracle_recall(s.m, 1, seq_len=40, block=15)
    with pytest.raises(ValueError, match=r"`m` must have shape \[B, H, 4, 4\] for seq_len=50, block=16"):
        oracle_recall(s.m, 1, seq_len=50, block=16)
    with pytest.raises(ValueError, match=r"`m` must be a floating-point block mass"):
        oracle_recall(torch.ones(1, 1, 3, 3, dtype=torch.int32), 1, seq_len=40, block=16)
    with pytest.raises(ValueError, match=r"`k` must be an integer tensor"):
        oracle_recall(s, torch.ones(3))
    with pytest.raises(ValueError, match=r"`k` must be broadcastable to \[B, H, Mq\] = \(1, 2, 3\)"):
        oracle_recall(s, torch.ones(4, dtype=torch.int64))
    with pytest.raises(TypeError, match=r"`k` must be an int or an integer tensor"):
        oracle_recall(s, 1.5)
    with pytest.raises(ValueError, match=r"`k` must lie in \[0, Mk\] = \[0, 3\] \(got values in \[4, 4\]\)"):
        oracle_recall(s, 4)


def test_variance_and_row_errors():
    q, k = _qk(40, 8)
    with pytest.raises(ValueError, match=r"`block` must be a power of two"):
        variance_ratio(q, 48)
    with pytest.raises(ValueError, match=r"`x` must have shape \[B, H, N, D\]"):
        variance_ratio(q[0], 16)
    with pytest.raises(ValueError, match=r"`rows` must hold integer token indices"):
        row_attention_ref(q, k, torch.tensor([0.5]))
    with pytest.raises(TypeError, match=r"`rows` must be a 1-D integer tensor or a sequence of ints"):
        row_attention_ref(q, k, [0, "1"])
    with pytest.raises(ValueError, match=r"`rows` must be a non-empty 1-D list of query indices"):
        row_attention_ref(q, k, torch.zeros(2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"`rows` must lie in \[0, N\) = \[0, 40\) \(got values in \[0, 40\]\)"):
        row_attention_ref(q, k, [0, 40])
    with pytest.raises(ValueError, match=r"`mask.seq_len` must equal N"):
        row_recall_ref(q, k, BlockMask.full(1, 2, 41, 16))

"""Block scorers against literal re-derivations of their definitions (the DFSAttn reference code, XAttention)."""

import math

import pytest
import torch

from dfsviz.sparse import scoring
from dfsviz.sparse.scoring import SCORERS, block_scores_ref, scorer_key, scorer_names

LENGTHS = [1, 113, 127, 129, 257]


def _qk(n, d=8, b=1, h=2, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed + n)
    q = torch.randn(b, h, n, d, generator=gen, dtype=torch.float64)
    k = torch.randn(b, h, n, d, generator=gen, dtype=torch.float64)
    return q.to(dtype), k.to(dtype)


def _softmax_row(values):
    top = max(values)
    e = [math.exp(x - top) for x in values]
    s = sum(e)
    return [x / s for x in e]


def _meanpool_literal(q, k, block, scale):
    """L_uv = mean q of block u . mean k of block v * scale, means over real tokens only."""
    b, h, n, _ = q.shape
    m = math.ceil(n / block)
    out = torch.zeros(b, h, m, m, dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            for u in range(m):
                qbar = q[bi, hi, u * block : min(n, (u + 1) * block)].double().mean(0)
                for v in range(m):
                    kbar = k[bi, hi, v * block : min(n, (v + 1) * block)].double().mean(0)
                    out[bi, hi, u, v] = float(qbar @ kbar) * scale
    return out


def _dfs_tile_literal(q, k, tile, block, scale):
    """The reference's tile scoring as the DFSAttn reference code computes it, written out step by step:
    zero-pad to ceil(N/B)*B, mean over tiles of `tile` tokens (zeros included), softmax over
    all key tiles of the padded sequence, sum the tile scores of each block pair."""
    b, h, n, d = q.shape
    npad = math.ceil(n / block) * block
    nt = npad // tile
    per = block // tile
    m = npad // block
    out = torch.zeros(b, h, m, m, dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            qp = torch.zeros(npad, d, dtype=torch.float64)
            kp = torch.zeros(npad, d, dtype=torch.float64)
            qp[:n] = q[bi, hi].double()
            kp[:n] = k[bi, hi].double()
            qbar = [sum(qp[t * tile + s] for s in range(tile)) / tile for t in range(nt)]
            kbar = [sum(kp[t * tile + s] for s in range(tile)) / tile for t in range(nt)]
            for i in range(nt):
                row = _softmax_row([float(qbar[i] @ kbar[j]) * scale for j in range(nt)])
                for j in range(nt):
                    out[bi, hi, i // per, j // per] += row[j]
    return out


def _antidiagonal_literal(q, k, stride, block, scale):
    """XAttention antidiagonal scoring from its definition on the full logit matrix: for the
    S x S sub-square (i, j) of the padded QK^T the score logit is the mean of its antidiagonal
    P[iS + S-1-t, jS + t]; softmax over j; rows of pure padding count 0; sum per block pair."""
    b, h, n, d = q.shape
    npad = math.ceil(n / block) * block
    ns = npad // stride
    per = block // stride
    m = npad // block
    out = torch.zeros(b, h, m, m, dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            qp = torch.zeros(npad, d, dtype=torch.float64)
            kp = torch.zeros(npad, d, dtype=torch.float64)
            qp[:n] = q[bi, hi].double()
            kp[:n] = k[bi, hi].double()
            full = (qp @ kp.T) * scale
            for i in range(ns):
                if i * stride >= n:
                    continue
                logits = []
                for j in range(ns):
                    anti = sum(float(full[i * stride + stride - 1 - t, j * stride + t]) for t in range(stride))
                    logits.append(anti / stride)
                row = _softmax_row(logits)
                for j in range(ns):
                    out[bi, hi, i // per, j // per] += row[j]
    return out


@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("block", [32, 128])
def test_meanpool_matches_literal(n, block):
    q, k = _qk(n)
    got = block_scores_ref(q, k, "meanpool", block=block)
    assert got.dtype == torch.float32
    want = _meanpool_literal(q, k, block, 8**-0.5)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("block,tile", [(32, 8), (64, 16), (128, 16)])
def test_dfs_tile_matches_literal(n, block, tile):
    q, k = _qk(n)
    got = block_scores_ref(q, k, "dfs_tile", tile=tile, block=block, scale=0.3)
    want = _dfs_tile_literal(q, k, tile, block, 0.3)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    # Every padded query tile's softmax sums to 1, so each block row sums to block / tile.
    torch.testing.assert_close(got.sum(-1).double(), torch.full(got.shape[:3], block / tile, dtype=torch.float64))


def test_dfs_tile_zero_tiles_take_softmax_mass():
    # N = 48, block 32: padded to 64 tokens = 4 tiles of 16, the last one all zeros. With all
    # logits 0 each of the 4 key tiles gets 1/4 from every query tile (pad tile included),
    # so every block pair (2 x 2 tile pairs) sums to 1. Leaving the zero tile out of the
    # softmax would give 4/3 and 2/3 instead.
    q = torch.zeros(1, 1, 48, 4)
    k = torch.zeros(1, 1, 48, 4)
    got = block_scores_ref(q, k, "dfs_tile", tile=16, block=32)
    assert torch.equal(got, torch.ones(1, 1, 2, 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dfs_tile_low_precision_inputs_compute_in_float32(dtype):
    q, k = _qk(129, dtype=dtype)
    got = block_scores_ref(q, k, "dfs_tile", tile=16, block=64)
    want = _dfs_tile_literal(q, k, 16, 64, 8**-0.5)
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("n", [1, 37, 64, 113])
@pytest.mark.parametrize("stride", [4, 8])
def test_antidiagonal_matches_brute_force(n, stride):
    q, k = _qk(n, h=1)
    got = block_scores_ref(q, k, "antidiagonal", tile=stride, block=32)
    want = _antidiagonal_literal(q, k, stride, 32, 8**-0.5)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)


def test_antidiagonal_default_stride_is_8():
    q, k = _qk(64, h=1)
    got = block_scores_ref(q, k, "antidiagonal", block=32)
    torch.testing.assert_close(got.double(), _antidiagonal_literal(q, k, 8, 32, 8**-0.5), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method,tile", [("dfs_tile", 4), ("antidiagonal", 4)])
def test_chunked_path_equals_one_shot(monkeypatch, method, tile):
    q, k = _qk(257, b=2, h=3, dtype=torch.float32)
    whole = block_scores_ref(q, k, method, tile=tile, block=32)
    # A 4 KiB limit forces one head at a time and a few query blocks per chunk.
    monkeypatch.setattr(scoring, "_SCORE_CHUNK_BYTES", 4096)
    chunked = block_scores_ref(q, k, method, tile=tile, block=32)
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("n", [1, 113, 129])
def test_oracle_is_exact_block_mass(n):
    pytest.importorskip("dfsviz.sparse.stats", reason="stats.py (block_stats_ref) is written by another helper")
    q, k = _qk(n)
    got = block_scores_ref(q, k, "oracle", block=32)
    a = torch.softmax((q @ k.transpose(-1, -2)) * 8**-0.5, dim=-1)
    m = math.ceil(n / 32)
    want = torch.zeros(1, 2, m, m, dtype=torch.float64)
    for u in range(m):
        rows = range(u * 32, min(n, (u + 1) * 32))
        for v in range(m):
            cols = slice(v * 32, min(n, (v + 1) * 32))
            want[:, :, u, v] = sum(a[:, :, i, cols].sum(-1) for i in rows) / len(rows)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_registry_and_keys():
    assert scorer_names() == ["meanpool", "dfs_tile", "antidiagonal", "oracle"]
    assert [scorer_key(m) for m in scorer_names()] == ["meanpool", "dfs_tile_b16", "antidiagonal_s8", "oracle"]
    assert scorer_key("dfs_tile", 32) == "dfs_tile_b32"
    assert scorer_key("antidiagonal", 16) == "antidiagonal_s16"
    assert scorer_key("meanpool", 16) == "meanpool"
    assert SCORERS["meanpool"].is_logit
    assert [SCORERS[m].kind for m in scorer_names()] == ["logit", "mass", "mass", "mass"]


def test_meanpool_ignores_tile():
    q, k = _qk(40)
    assert torch.equal(block_scores_ref(q, k, "meanpool", tile=4, block=16), block_scores_ref(q, k, "meanpool", block=16))


# ------------------------------------------------------------------------------ errors
def test_errors():
    q, k = _qk(40, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"`method` must be one of \['meanpool', 'dfs_tile', 'antidiagonal', 'oracle'\] \(got 'mean'\)"):
        block_scores_ref(q, k, "mean")
    with pytest.raises(ValueError, match=r"`tile` \(tile of dfs_tile\) must be a power of two in \[4, block=32\].*\(got 12\); the default is 16"):
        block_scores_ref(q, k, "dfs_tile", tile=12, block=32)
    with pytest.raises(ValueError, match=r"`tile` \(tile of dfs_tile\) must be a power of two in \[4, block=32\].*\(got 64\)"):
        block_scores_ref(q, k, "dfs_tile", tile=64, block=32)
    with pytest.raises(ValueError, match=r"`tile` \(stride of antidiagonal\) must be a power of two in \[2, block=16\].*\(got 1\); the default is 8"):
        block_scores_ref(q, k, "antidiagonal", tile=1, block=16)
    with pytest.raises(ValueError, match=r"`block` must be a power of two in \[16, 256\] \(got 48\)"):
        block_scores_ref(q, k, "meanpool", block=48)
    with pytest.raises(ValueError, match=r"`scale` must be a positive finite number or None for D \*\* -0.5 \(got -1.0\)"):
        block_scores_ref(q, k, "meanpool", block=16, scale=-1.0)
    with pytest.raises(ValueError, match=r"`scale` must be a positive finite number.*\(got nan\)"):
        block_scores_ref(q, k, "meanpool", block=16, scale=float("nan"))
    with pytest.raises(ValueError, match=r"`q` and `k` must have the same shape"):
        block_scores_ref(q, k[:, :, :20], "meanpool", block=16)
    with pytest.raises(ValueError, match=r"`method` must be one of .*\(got 'x'\)"):
        scorer_key("x")
    with pytest.raises(ValueError, match=r"`tile` \(tile of dfs_tile\) must be a power of two in \[4, block=256\]"):
        scorer_key("dfs_tile", 3)

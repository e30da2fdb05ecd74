"""BlockMask: layout round trips, density on ragged lengths, FlexAttention conversion, errors."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dfsviz.sparse.masks import BlockMask, check_mask_for


def _random_dense(b, h, m, p, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(b, h, m, m, generator=gen) < p


def _indices_by_hand(dense):
    """kv_num_blocks / kv_indices written with explicit loops (the contract's layout)."""
    b, h, mq, mk = dense.shape
    counts = torch.zeros(b, h, mq, dtype=torch.int32)
    idx = torch.zeros(b, h, mq, mk, dtype=torch.int32)
    for bi in range(b):
        for hi in range(h):
            for u in range(mq):
                kept = [v for v in range(mk) if dense[bi, hi, u, v]]
                counts[bi, hi, u] = len(kept)
                idx[bi, hi, u, : len(kept)] = torch.tensor(kept, dtype=torch.int32)
    return counts, idx


@pytest.mark.parametrize("seq_len,block,p", [(1, 16, 0.5), (113, 16, 0.3), (129, 32, 0.0), (257, 64, 1.0), (640, 128, 0.5)])
def test_from_dense_matches_hand_layout_and_round_trips(seq_len, block, p):
    m = math.ceil(seq_len / block)
    dense = _random_dense(2, 3, m, p, seed=seq_len)
    mask = BlockMask.from_dense(dense, seq_len, block)
    counts, idx = _indices_by_hand(dense)
    assert mask.kv_num_blocks.dtype == torch.int32 and mask.kv_indices.dtype == torch.int32
    assert torch.equal(mask.kv_num_blocks, counts)
    assert torch.equal(mask.kv_indices, idx)
    assert torch.equal(mask.to_dense(), dense)
    assert mask.shape == (2, 3, m, m) and mask.num_q_blocks == m and mask.num_kv_blocks == m
    # And back from the hand-built indices.
    assert torch.equal(BlockMask(counts, idx, seq_len, block).to_dense(), dense)


@settings(max_examples=40, deadline=None)
@given(
    b=st.integers(1, 2),
    h=st.integers(1, 3),
    seq_len=st.integers(1, 300),
    block=st.sampled_from([16, 32, 64]),
    p=st.floats(0.0, 1.0),
    seed=st.integers(0, 10_000),
)
def test_round_trip_property(b, h, seq_len, block, p, seed):
    m = math.ceil(seq_len / block)
    dense = _random_dense(b, h, m, p, seed)
    mask = BlockMask.from_dense(dense, seq_len, block)
    assert torch.equal(mask.to_dense(), dense)
    counts = mask.kv_num_blocks.long()
    for row_idx, row_count in zip(mask.kv_indices.reshape(-1, m), counts.reshape(-1)):
        kept = row_idx[:row_count]
        assert bool((kept[1:] > kept[:-1]).all())
        assert bool((row_idx[row_count:] == 0).all())


@pytest.mark.parametrize("seq_len,block", [(1, 16), (113, 16), (127, 32), (129, 64), (257, 128)])
def test_density_counts_real_token_pairs(seq_len, block):
    m = math.ceil(seq_len / block)
    dense = _random_dense(1, 2, m, 0.4, seed=7)
    dense[..., m - 1] = True  # make sure the short last block is kept somewhere
    mask = BlockMask.from_dense(dense, seq_len, block)
    got = mask.density()
    assert got.dtype == torch.float64 and got.shape == (1, 2)
    for hi in range(2):
        pairs = sum(1 for i in range(seq_len) for j in range(seq_len) if dense[0, hi, i // block, j // block])
        assert got[0, hi].item() == pytest.approx(pairs / seq_len**2, rel=0, abs=1e-15)


def _density_by_gather(mask):
    """rho(S) as the sum of the kept blocks' sizes gathered per index (float64 [B, H, Mq, Mk]): the
    written-out definition, sum_u |U_u| sum_{v in S_u} n_v / N^2."""
    sizes = torch.tensor([min(mask.block, mask.seq_len - v * mask.block) for v in range(mask.num_kv_blocks)],
                         dtype=torch.float64)
    listed = torch.arange(mask.num_kv_blocks) < mask.kv_num_blocks.unsqueeze(-1)  # the kept entries of each row
    kept = torch.where(listed, sizes[mask.kv_indices.long()], torch.zeros((), dtype=torch.float64))
    return (kept.sum(dim=-1) * sizes).sum(dim=-1) / float(mask.seq_len) ** 2


@pytest.mark.parametrize("seq_len,block", [(1, 16), (16, 16), (113, 16), (128, 32), (129, 64), (257, 128), (4096, 16)])
@pytest.mark.parametrize("p", [0.0, 0.3, 1.0], ids=["empty", "sparse", "full"])
def test_density_equals_the_gathered_sizes_exactly(seq_len, block, p):
    """Ragged and even N, empty rows (p = 0 and rows left empty at random), full masks: the
    density counts kept blocks times the block size less what a kept short last block lacks,
    and gives the gathered sum's float64 bit for bit."""
    m = math.ceil(seq_len / block)
    dense = _random_dense(2, 3, m, p, seed=seq_len)
    if 0.0 < p < 1.0:
        dense[0, 0, 0] = False  # an empty row
        dense[0, 1, :, m - 1] = True  # the short last block kept in every row of one head
    mask = BlockMask.from_dense(dense, seq_len, block)
    got = mask.density()
    assert got.dtype == torch.float64 and got.shape == (2, 3)
    assert torch.equal(got, _density_by_gather(mask))
    if p == 1.0:
        assert torch.equal(got, torch.ones(2, 3, dtype=torch.float64))


@settings(max_examples=60, deadline=None)
@given(seq_len=st.integers(1, 700), block=st.sampled_from([16, 32, 64, 128]), p=st.floats(0.0, 1.0),
       seed=st.integers(0, 10_000))
def test_density_property(seq_len, block, p, seed):
    mask = BlockMask.from_dense(_random_dense(1, 2, math.ceil(seq_len / block), p, seed), seq_len, block)
    assert torch.equal(mask.density(), _density_by_gather(mask))


def test_density_differs_from_block_fraction_on_ragged_length():
    # N = 129, block 128: keeping only the 1-token last key block is 1/129 of pairs, not 1/2.
    dense = torch.tensor([[[[False, True], [False, True]]]])
    mask = BlockMask.from_dense(dense, 129, 128)
    assert mask.density().item() == pytest.approx(129 / 129**2)
    assert torch.equal(mask.budget(), torch.tensor([[[0.5, 0.5]]], dtype=torch.float64))


def test_budget_is_kept_fraction():
    dense = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    dense[0, 0, 0, :1] = True
    dense[0, 0, 1, :3] = True
    dense[0, 0, 3, :] = True
    mask = BlockMask.from_dense(dense, 64, 16)
    assert torch.equal(mask.budget(), torch.tensor([[[0.25, 0.75, 0.0, 1.0]]], dtype=torch.float64))


def test_full_mask():
    mask = BlockMask.full(2, 3, 113, 16)
    assert bool(mask.to_dense().all())
    assert torch.equal(mask.density(), torch.ones(2, 3, dtype=torch.float64))
    assert torch.equal(mask.kv_num_blocks, torch.full((2, 3, 8), 8, dtype=torch.int32))


def test_to_device_keeps_mask():
    mask = BlockMask.from_dense(_random_dense(1, 2, 3, 0.5, 1), 40, 16)
    moved = mask.to("cpu")
    assert torch.equal(moved.to_dense(), mask.to_dense()) and moved.seq_len == 40 and moved.block == 16
    assert "Mq=3" in repr(mask)


def _dense_masked_attention(q, k, v, dense, block):
    n = q.shape[2]
    tok = torch.zeros(*dense.shape[:2], n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(n):
            tok[:, :, i, j] = dense[:, :, i // block, j // block]
    logits = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    return torch.softmax(logits.masked_fill(~tok, float("-inf")), dim=-1) @ v


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("seq_len,block", [(70, 16), (129, 32), (48, 16)])
def test_flex_block_mask_matches(seq_len, block):
    from torch.nn.attention.flex_attention import flex_attention

    m = math.ceil(seq_len / block)
    dense = _random_dense(2, 2, m, 0.4, seed=seq_len)
    dense[..., 0] = True  # every query row needs one key to have a defined softmax
    dense[0, 0, :, m - 1] = True  # the short last block kept in one head
    mask = BlockMask.from_dense(dense, seq_len, block)
    flex = mask.to_flex_block_mask()
    assert torch.equal(flex.to_dense().bool(), dense)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, seq_len, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    out = flex_attention(q, k, v, block_mask=flex)
    ref = _dense_masked_attention(q, k, v, dense, block)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_check_mask_for_accepts_matching_q():
    mask = BlockMask.full(1, 2, 40, 16)
    check_mask_for(mask, torch.zeros(1, 2, 40, 8))


# ------------------------------------------------------------------------------ errors
def _ok_parts(m=3):
    return torch.full((1, 1, m), 1, dtype=torch.int32), torch.zeros(1, 1, m, m, dtype=torch.int32)


@pytest.mark.parametrize("block", [96, 8, 512, True, 16.0])
def test_block_must_be_power_of_two(block):
    counts, idx = _ok_parts()
    with pytest.raises(ValueError, match=r"`block` must be a power of two in \[16, 256\] .*DFSAttn uses 128"):
        BlockMask(counts, idx, 40, block)


@pytest.mark.parametrize("seq_len", [0, -3, 4.0, None])
def test_seq_len_must_be_positive_int(seq_len):
    counts, idx = _ok_parts()
    with pytest.raises(ValueError, match=r"`seq_len` must be a positive integer.*pass q.shape\[2\]"):
        BlockMask(counts, idx, seq_len, 16)


def test_dtype_and_type_errors():
    counts, idx = _ok_parts()
    with pytest.raises(ValueError, match=r"`kv_num_blocks` must have dtype torch.int32 \(got torch.int64\)"):
        BlockMask(counts.long(), idx, 40, 16)
    with pytest.raises(ValueError, match=r"`kv_indices` must have dtype torch.int32"):
        BlockMask(counts, idx.long(), 40, 16)
    with pytest.raises(TypeError, match=r"`kv_indices` must be a torch.Tensor of shape \[B, H, Mq, Mk\] \(got list\)"):
        BlockMask(counts, [0], 40, 16)
    with pytest.raises(ValueError, match=r"`kv_num_blocks` must have shape \[B, H, Mq\] \(got \(1, 3\)\)"):
        BlockMask(counts[0], idx, 40, 16)


def test_shape_mismatch():
    counts, idx = _ok_parts(3)
    with pytest.raises(ValueError, match=r"Mq = Mk = ceil\(seq_len / block\) = ceil\(80 / 16\) = 5"):
        BlockMask(counts, idx, 80, 16)
    with pytest.raises(ValueError, match=r"must have B >= 1 and H >= 1"):
        BlockMask(counts[:, :0], idx[:, :0], 40, 16)


def test_device_mismatch():
    counts, idx = _ok_parts()
    with pytest.raises(ValueError, match=r"must be on one device \(got cpu and meta\)"):
        BlockMask(counts, idx.to("meta"), 40, 16)


def test_counts_and_indices_range():
    counts, idx = _ok_parts()
    with pytest.raises(ValueError, match=r"`kv_num_blocks` must lie in \[0, Mk\] = \[0, 3\] \(got values in \[1, 4\]\)"):
        BlockMask(torch.tensor([[[1, 4, 1]]], dtype=torch.int32), idx, 40, 16)
    with pytest.raises(ValueError, match=r"`kv_num_blocks` must lie in \[0, Mk\]"):
        BlockMask(torch.tensor([[[-1, 1, 1]]], dtype=torch.int32), idx, 40, 16)
    bad = idx.clone()
    bad[0, 0, 0, 0] = 3
    with pytest.raises(ValueError, match=r"`kv_indices` must lie in \[0, Mk\) = \[0, 3\) \(got values in \[0, 3\]\)"):
        BlockMask(counts, bad, 40, 16)


def test_padding_and_order():
    counts, idx = _ok_parts()
    bad = idx.clone()
    bad[0, 0, 0, 2] = 1  # after the single kept entry
    with pytest.raises(ValueError, match=r"entries after the first `kv_num_blocks` of each row must be 0"):
        BlockMask(counts, bad, 40, 16)
    two = torch.full((1, 1, 3), 2, dtype=torch.int32)
    desc = torch.tensor([[[[2, 1, 0], [0, 1, 0], [1, 1, 0]]]], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"strictly ascending within each row"):
        BlockMask(two, desc, 40, 16)


def test_from_dense_errors():
    with pytest.raises(ValueError, match=r"`dense` must have dtype torch.bool \(got torch.float32\)"):
        BlockMask.from_dense(torch.zeros(1, 1, 3, 3), 40, 16)
    with pytest.raises(ValueError, match=r"`dense` must have shape \[B, H, 3, 3\] for seq_len=40, block=16 \(got \(1, 1, 3, 2\)\)"):
        BlockMask.from_dense(torch.zeros(1, 1, 3, 2, dtype=torch.bool), 40, 16)
    with pytest.raises(TypeError, match=r"`dense` must be a torch.Tensor"):
        BlockMask.from_dense([[True]], 40, 16)


def test_full_errors():
    with pytest.raises(ValueError, match=r"`heads` must be an integer >= 1 \(got 0\)"):
        BlockMask.full(1, 0, 40, 16)


def test_check_mask_for_errors():
    mask = BlockMask.full(1, 2, 40, 16)
    with pytest.raises(ValueError, match=r"`mask.seq_len` must equal N = q.shape\[2\] = 41 \(got 40\)"):
        check_mask_for(mask, torch.zeros(1, 2, 41, 8))
    with pytest.raises(ValueError, match=r"`mask` must have B, H = \(1, 3\) like q \(got \(1, 2\)\)"):
        check_mask_for(mask, torch.zeros(1, 3, 40, 8))
    with pytest.raises(ValueError, match=r"`mask` must be on q's device meta .*use mask.to\(q.device\)"):
        check_mask_for(mask, torch.zeros(1, 2, 40, 8, device="meta"))
    with pytest.raises(ValueError, match=r"`q` must be a tensor of shape \[B, H, N, D\] \(got \(2, 40, 8\)\)"):
        check_mask_for(mask, torch.zeros(2, 40, 8))
    with pytest.raises(TypeError, match=r"`mask` must be a dfsviz BlockMask \(got Tensor\)"):
        check_mask_for(torch.zeros(1), torch.zeros(1, 2, 40, 8))


@pytest.mark.parametrize("seq_len,block", [(100, 16), (256, 32), (1006, 128)])
def test_copy_dense_fills_in_place_as_from_dense(seq_len, block):
    m = -(-seq_len // block)
    gen = torch.Generator().manual_seed(seq_len)
    mask = BlockMask.from_dense(torch.rand(2, 3, m, m, generator=gen) < 0.5, seq_len, block)
    counts, indices = mask.kv_num_blocks, mask.kv_indices
    dense = torch.rand(2, 3, m, m, generator=gen) < 0.3
    dense[0, 0, 0] = False  # an empty row
    assert mask.copy_dense_(dense) is mask and mask.kv_num_blocks is counts and mask.kv_indices is indices
    fresh = BlockMask.from_dense(dense, seq_len, block)
    assert torch.equal(mask.kv_num_blocks, fresh.kv_num_blocks) and torch.equal(mask.kv_indices, fresh.kv_indices)


def test_copy_dense_errors():
    mask = BlockMask.full(1, 2, 64, 16)
    with pytest.raises(TypeError, match="`dense` must be a torch.Tensor of shape"):
        mask.copy_dense_([[True]])
    with pytest.raises(ValueError, match="`dense` must have dtype torch.bool"):
        mask.copy_dense_(torch.ones(1, 2, 4, 4))
    with pytest.raises(ValueError, match=r"`dense` must have the mask's shape \(1, 2, 4, 4\)"):
        mask.copy_dense_(torch.ones(1, 1, 4, 4, dtype=torch.bool))

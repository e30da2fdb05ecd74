"""Selectors: the reference's top-k budget arithmetic, forced text blocks, cumulative sets."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dfsviz.sparse.select import (
    SELECTORS,
    select_cumulative,
    select_topk,
    selector_key,
    selector_names,
    topk_count,
)


def _scores(b, h, m, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(b, h, m, m, generator=gen)


# Literal budgets of the DFSAttn reference schedule: Wan has 591 key blocks, HunyuanVideo 931 (3 of them text).
@pytest.mark.parametrize(
    "gamma,mk,k",
    [
        (0.3, 591, 177),
        (0.3 - 0.1, 591, 118),  # 0.19999999999999998 * 591 = 118.19999999999999
        (0.3 - 0.1 - 0.1, 591, 59),
        (0.1, 591, 59),
        (0.3, 931, 279),
        (0.3 - 0.1, 931, 186),
        (0.3 - 0.2, 931, 93),
        (0.29, 100, 28),  # 0.29 * 100 = 28.999999999999996 truncates to 28
        (0.001, 100, 1),  # max(1, 0)
        (1.0, 7, 7),
    ],
)
def test_topk_count_is_reference_formula(gamma, mk, k):
    assert topk_count(gamma, mk) == k


@pytest.mark.parametrize("gamma,k", [(0.3, 177), (0.3 - 0.1, 118), (0.1, 59)])
def test_select_topk_row_counts_on_wan_size(gamma, k):
    scores = _scores(1, 1, 591)
    mask = select_topk(scores, gamma, seq_len=591 * 16, block=16)
    assert torch.equal(mask.kv_num_blocks, torch.full((1, 1, 591), k, dtype=torch.int32))


def test_select_topk_keeps_the_best_blocks():
    m = 12
    gen = torch.Generator().manual_seed(3)
    scores = torch.stack([torch.randperm(m, generator=gen).float() for _ in range(2 * 3 * m)]).view(2, 3, m, m)
    mask = select_topk(scores, 0.25, seq_len=m * 16 - 5, block=16)
    dense = mask.to_dense()
    for b in range(2):
        for h in range(3):
            for u in range(m):
                # Scores are a permutation of 0..m-1: the 3 best are m-1, m-2, m-3.
                want = {v for v in range(m) if scores[b, h, u, v] >= m - 3}
                assert {v for v in range(m) if dense[b, h, u, v]} == want


@pytest.mark.parametrize(
    "gamma,k,video_k,density",
    [(0.3, 279, 276, 0.3019), (0.3 - 0.1, 186, 183, 0.2024), (0.3 - 0.1 - 0.1, 93, 90, 0.1028)],
)
def test_hunyuan_text_blocks_inside_budget(gamma, k, video_k, density):
    m = 931
    scores = _scores(1, 2, m, seed=1)
    text = [928, 929, 930]
    mask = select_topk(scores, gamma, seq_len=m * 128, block=128, forced_kv=text, dense_q=list(range(928, 931)))
    dense = mask.to_dense()
    assert torch.equal(mask.kv_num_blocks[:, :, :928], torch.full((1, 2, 928), k, dtype=torch.int32))
    assert torch.equal(mask.kv_num_blocks[:, :, 928:], torch.full((1, 2, 3), m, dtype=torch.int32))
    assert bool(dense[:, :, :, 928:].all())
    assert torch.equal(dense[:, :, :928, :928].sum(-1), torch.full((1, 2, 928), video_k))
    # The DFSAttn paper's HunyuanVideo setting gives these densities (kept fraction over rows, 4 decimals).
    assert round(mask.budget().mean().item(), 4) == density


def test_forced_kv_as_bool_equals_list():
    scores = _scores(1, 2, 10, seed=2)
    forced = torch.zeros(10, dtype=torch.bool)
    forced[[2, 7]] = True
    a = select_topk(scores, 0.5, seq_len=150, block=16, forced_kv=forced, dense_q=torch.tensor([9]))
    b = select_topk(scores, 0.5, seq_len=150, block=16, forced_kv=[2, 7], dense_q=[9])
    assert torch.equal(a.to_dense(), b.to_dense())
    assert bool(a.to_dense()[..., [2, 7]].all()) and bool(a.to_dense()[:, :, 9].all())
    assert torch.equal(a.kv_num_blocks[:, :, :9], torch.full((1, 2, 9), 5, dtype=torch.int32))


def _row(values):
    """The same 4-block row for all 4 query blocks (seq_len 64, block 16)."""
    return torch.tensor(values, dtype=torch.float64).view(1, 1, 1, 4).expand(1, 1, 4, 4).clone()


def _kept(mask):
    rows = {tuple(v for v in range(4) if mask.to_dense()[0, 0, u, v]) for u in range(4)}
    assert len(rows) == 1
    return list(rows.pop())


@pytest.mark.parametrize(
    "row,tau,kept",
    [
        ([4.0, 2.0, 1.0, 1.0], 0.75, [0, 1]),  # 4/8 + 2/8 reaches 0.75 exactly
        ([4.0, 2.0, 1.0, 1.0], 0.76, [0, 1, 2]),  # a tie at 1/8: the lower index first
        ([1.0, 4.0, 1.0, 2.0], 0.75, [1, 3]),
        ([1.0, 4.0, 1.0, 2.0], 0.5, [1]),
        ([1.0, 4.0, 1.0, 2.0], 1.0, [0, 1, 2, 3]),
        ([0.0, 0.0, 3.0, 0.0], 1.0, [2]),
    ],
)
def test_cumulative_on_mass_rows(row, tau, kept):
    mask = select_cumulative(_row(row), tau, seq_len=64, block=16)
    assert _kept(mask) == kept


@pytest.mark.parametrize("tau,kept", [(0.4, [0]), (0.7, [0, 1]), (0.8, [0, 1, 2])])
def test_cumulative_on_logit_rows(tau, kept):
    row = [math.log(4.0), math.log(2.0), 0.0, 0.0]  # softmax: 0.5, 0.25, 0.125, 0.125
    assert _kept(select_cumulative(_row(row), tau, seq_len=64, block=16, scores_are_logits=True)) == kept
    # The same numbers read as masses would give other sets.
    assert _kept(select_cumulative(_row([4.0, 2.0, 1.0, 1.0]), 0.7, seq_len=64, block=16)) == [0, 1]


def test_cumulative_forced_mass_counts():
    mask = select_cumulative(_row([4.0, 2.0, 1.0, 1.0]), 0.6, seq_len=64, block=16, forced_kv=[3])
    assert _kept(mask) == [0, 3]  # 1/8 forced + 4/8 = 0.625 >= 0.6


def test_cumulative_dense_rows():
    scores = _scores(1, 1, 4)
    mask = select_cumulative(scores, 0.3, seq_len=64, block=16, dense_q=[2])
    assert bool(mask.to_dense()[0, 0, 2].all())


@settings(max_examples=40, deadline=None)
@given(
    m=st.integers(1, 20),
    gamma=st.floats(0.01, 1.0),
    tau=st.floats(0.01, 1.0),
    n_forced=st.integers(0, 3),
    seed=st.integers(0, 1000),
    logits=st.booleans(),
)
def test_selection_properties(m, gamma, tau, n_forced, seed, logits):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(1, 2, m, m, generator=gen, dtype=torch.float64)
    if not logits:
        scores = scores.abs() + 1e-3
    forced = sorted(torch.randperm(m, generator=gen)[: min(n_forced, m)].tolist())
    dense_q = [m - 1] if seed % 2 else None
    seq_len = m * 16 - seed % 16
    k = topk_count(gamma, m)
    free_rows = [u for u in range(m) if dense_q is None or u not in dense_q]
    if k - len(forced) >= 1:
        mask = select_topk(scores, gamma, seq_len=seq_len, block=16, forced_kv=forced, dense_q=dense_q)
        dense = mask.to_dense()
        assert bool((mask.kv_num_blocks[:, :, free_rows] == k).all())
        assert bool(dense[..., forced].all())
        if dense_q:
            assert bool(dense[:, :, m - 1].all())
    mask = select_cumulative(
        scores, tau, seq_len=seq_len, block=16, forced_kv=forced, dense_q=dense_q, scores_are_logits=logits
    )
    dense = mask.to_dense()
    p = torch.softmax(scores, -1) if logits else scores / scores.sum(-1, keepdim=True)
    for h in range(2):
        for u in free_rows:
            kept = [v for v in range(m) if dense[0, h, u, v]]
            mass = float(p[0, h, u, kept].sum())
            assert set(forced) <= set(kept)
            assert mass >= tau - 1e-12 or len(kept) == m
            optional = [v for v in kept if v not in forced]
            if optional:
                # Minimal: dropping the lightest optional block falls below tau.
                lightest = min(float(p[0, h, u, v]) for v in optional)
                assert mass - lightest < tau + 1e-12


def test_registry_and_keys():
    assert selector_names() == ["topk", "cumulative"]
    assert selector_key("topk", 0.1) == "topk_g0.10"
    assert selector_key("cumulative", 0.9) == "cumulative_t0.90"
    assert selector_key("topk", 0.3 - 0.1) == "topk_g0.20"
    assert selector_key("topk", 0.125) == "topk_g0.125"
    scores = _scores(1, 1, 5)
    via_registry = SELECTORS["topk"](scores, 0.4, seq_len=80, block=16)
    assert torch.equal(via_registry.to_dense(), select_topk(scores, 0.4, seq_len=80, block=16).to_dense())
    assert SELECTORS["cumulative"].param == "tau"


# ------------------------------------------------------------------- non-finite scores
@pytest.mark.parametrize("select", [select_topk, select_cumulative], ids=["topk", "cumulative"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_nan_and_plus_inf_scores_are_refused(select, bad):
    s = _scores(1, 2, 4)
    s[0, 1, 2, 3] = bad
    s[0, 1, 3, 0] = bad
    with pytest.raises(ValueError, match=rf"`scores` has 2 NaN or \+inf values, first at \[0, 1, 2, 3\] \({bad}\); "
                                         r".*check q and k"):
        select(s, 0.5, seq_len=64, block=16)


def test_topk_keeps_minus_inf_blocks_last():
    """-inf marks a key block to leave out: top-k keeps it only when the finite blocks run out."""
    s = _scores(1, 1, 4)
    s[0, 0, :, 1] = float("-inf")
    keep = select_topk(s, 0.75, seq_len=64, block=16).to_dense()
    assert not keep[..., 1].any() and torch.equal(keep.sum(-1), torch.full((1, 1, 4), 3))
    s[0, 0, 2, :] = float("-inf")  # a row with no finite score still gets its k blocks
    assert int(select_topk(s, 0.75, seq_len=64, block=16).to_dense()[0, 0, 2].sum()) == 3


def test_cumulative_logits_give_minus_inf_blocks_no_mass():
    logits = torch.tensor([[[[2.0, float("-inf"), 1.0, 0.0]] * 4]])
    keep = select_cumulative(logits, 0.99, seq_len=64, block=16, scores_are_logits=True).to_dense()
    assert torch.equal(keep[0, 0, 0], torch.tensor([True, False, True, True]))


def test_cumulative_refuses_a_row_of_minus_inf_logits():
    logits = torch.zeros(1, 2, 4, 4)
    logits[0, 1, 2] = float("-inf")
    with pytest.raises(ValueError, match=r"row \[0, 1, 2\] of `scores` is all -inf: its softmax is undefined"):
        select_cumulative(logits, 0.5, seq_len=64, block=16, scores_are_logits=True)
    kept = select_cumulative(logits, 0.5, seq_len=64, block=16, scores_are_logits=True, dense_q=[2]).to_dense()
    assert kept[0, 1, 2].all()  # a dense row needs no distribution


def test_cumulative_refuses_minus_inf_masses():
    s = _scores(1, 1, 4)
    s[0, 0, 0, 0] = float("-inf")
    with pytest.raises(ValueError, match=r"must be non-negative masses when scores_are_logits=False \(min -inf\)"):
        select_cumulative(s, 0.5, seq_len=64, block=16)


# ------------------------------------------------------------------------------ errors
def test_errors():
    s = _scores(1, 1, 4)
    kw = dict(seq_len=64, block=16)
    with pytest.raises(TypeError, match=r"`scores` must be a torch.Tensor of shape \[B, H, Mq, Mk\] \(got list\)"):
        select_topk([1.0], 0.5, **kw)
    with pytest.raises(ValueError, match=r"`scores` must be a floating-point tensor \(got torch.int64\)"):
        select_topk(s.long(), 0.5, **kw)
    with pytest.raises(ValueError, match=r"`scores` must have shape \[B, H, 5, 5\] for seq_len=65, block=16 \(got \(1, 1, 4, 4\)\)"):
        select_topk(s, 0.5, seq_len=65, block=16)
    with pytest.raises(ValueError, match=r"`seq_len` must be a positive integer, the number of tokens N \(got 0\); pass q.shape\[2\]"):
        select_topk(s, 0.5, seq_len=0, block=16)
    with pytest.raises(ValueError, match=r"`block` must be a power of two in \[16, 256\] \(got 24\)"):
        select_topk(s, 0.5, seq_len=64, block=24)
    nan = s.clone()
    nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"`scores` has 1 NaN or \+inf value, first at \[0, 0, 0, 0\] \(nan\)"):
        select_topk(nan, 0.5, **kw)
    with pytest.raises(ValueError, match=r"`gamma` must be a fraction in \(0, 1\] \(got 0\)"):
        select_topk(s, 0, **kw)
    with pytest.raises(ValueError, match=r"`gamma` must be a fraction in \(0, 1\] \(got 1.5\)"):
        select_topk(s, 1.5, **kw)
    with pytest.raises(ValueError, match=r"keeps k = max\(1, int\(0.5 \* 4\)\) = 2 blocks, which leaves 0 after the 2 `forced_kv` blocks"):
        select_topk(s, 0.5, forced_kv=[0, 1], **kw)
    with pytest.raises(ValueError, match=r"`forced_kv` as a bool tensor must have shape \[4\] \(got \(3,\)\)"):
        select_topk(s, 0.5, forced_kv=torch.zeros(3, dtype=torch.bool), **kw)
    with pytest.raises(ValueError, match=r"`forced_kv` indices must lie in \[0, 4\) \(got \[4\]\)"):
        select_topk(s, 0.5, forced_kv=[4], **kw)
    with pytest.raises(ValueError, match=r"`dense_q` must hold integer block indices \(got \[1.0\]\)"):
        select_topk(s, 0.5, dense_q=[1.0], **kw)
    with pytest.raises(ValueError, match=r"`dense_q` must be a bool \[4\] tensor or 1-D integer block indices"):
        select_topk(s, 0.5, dense_q=torch.tensor([1.0]), **kw)
    with pytest.raises(TypeError, match=r"`forced_kv` must be None, a bool \[4\] tensor or a list of block indices \(got int\)"):
        select_topk(s, 0.5, forced_kv=3, **kw)
    with pytest.raises(ValueError, match=r"`tau` must be a fraction in \(0, 1\] \(got 0.0\)"):
        select_cumulative(s, 0.0, **kw)
    with pytest.raises(TypeError, match=r"`scores_are_logits` must be a bool \(got str\)"):
        select_cumulative(s, 0.5, scores_are_logits="yes", **kw)
    with pytest.raises(ValueError, match=r"must be non-negative masses when scores_are_logits=False \(min -1\).*pass scores_are_logits=True"):
        select_cumulative(s - 2 * s - 1 + s, 0.5, **kw)
    with pytest.raises(ValueError, match=r"rows must have a positive sum to be normalised \(got an all-zero row\)"):
        select_cumulative(torch.zeros(1, 1, 4, 4), 0.5, **kw)
    with pytest.raises(ValueError, match=r"`kind` must be one of \['topk', 'cumulative'\] \(got 'top_p'\)"):
        selector_key("top_p", 0.5)
    with pytest.raises(ValueError, match=r"`tau` must be a fraction in \(0, 1\] \(got 2\)"):
        selector_key("cumulative", 2)
    with pytest.raises(ValueError, match=r"`num_kv_blocks` must be a positive integer Mk \(got 0\)"):
        topk_count(0.5, 0)


@pytest.mark.parametrize("gamma", [0.05, 0.3, 0.97, 1.0])
@pytest.mark.parametrize("seq_len,block", [(16 * 7, 16), (1006, 128), (113, 32)])
def test_select_topk_into_an_existing_mask_equals_the_checked_path(seq_len, block, gamma):
    m = -(-seq_len // block)
    out = select_topk(_scores(2, 3, m, seed=1), 0.5, seq_len=seq_len, block=block)
    counts, indices = out.kv_num_blocks, out.kv_indices
    scores = _scores(2, 3, m, seed=2)
    scores[0, 0, 0, :2] = float("-inf")  # taken last, as in the checked path
    filled = select_topk(scores, gamma, seq_len=seq_len, block=block, out=out)
    checked = select_topk(scores, gamma, seq_len=seq_len, block=block)
    assert filled is out and out.kv_num_blocks is counts and out.kv_indices is indices
    assert torch.equal(out.kv_num_blocks, checked.kv_num_blocks) and torch.equal(out.kv_indices, checked.kv_indices)


def test_select_topk_into_reads_no_value(monkeypatch):
    """The in-place path runs no value check (each would read the device back to the host)."""
    import dfsviz.sparse.select as select_module

    def refuse(*args, **kwargs):
        raise AssertionError("the in-place selection checked the scores' values")

    out = select_topk(_scores(1, 2, 5), 0.4, seq_len=80, block=16)
    monkeypatch.setattr(select_module, "check_finite", refuse)
    select_topk(_scores(1, 2, 5, seed=3), 0.4, seq_len=80, block=16, out=out)
    with pytest.raises(AssertionError, match="checked the scores"):
        select_topk(_scores(1, 2, 5, seed=3), 0.4, seq_len=80, block=16)


def test_select_topk_into_errors():
    scores = _scores(1, 2, 5)
    out = select_topk(scores, 0.4, seq_len=80, block=16)
    with pytest.raises(TypeError, match="`out` must be a dfsviz BlockMask"):
        select_topk(scores, 0.4, seq_len=80, block=16, out=out.to_dense())
    with pytest.raises(ValueError, match="`out` takes no `forced_kv` or `dense_q`"):
        select_topk(scores, 0.4, seq_len=80, block=16, out=out, forced_kv=[0])
    with pytest.raises(ValueError, match="`out` takes no `forced_kv` or `dense_q`"):
        select_topk(scores, 0.4, seq_len=80, block=16, out=out, dense_q=[1])
    with pytest.raises(ValueError, match=r"`out` must match the scores: shape \(1, 1, 5, 5\)"):
        select_topk(scores[:, :1], 0.4, seq_len=80, block=16, out=out)
    with pytest.raises(ValueError, match="`out` must match the scores: .* seq_len=79"):
        select_topk(scores, 0.4, seq_len=79, block=16, out=out)
    with pytest.raises(ValueError, match=r"`scores` must have shape \[B, H, 3, 3\]"):
        select_topk(scores, 0.4, seq_len=80, block=32, out=out)


@pytest.mark.cuda
def test_select_topk_into_is_asynchronous_and_graph_capturable():
    """The refresh of a cached mask: no synchronising call, and a CUDA graph of it replays to the
    checked selection of new scores copied into the captured buffer."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    scores = torch.rand(2, 4, 8, 8, generator=gen, device="cuda")
    out = select_topk(scores, 0.3, seq_len=1006, block=128)
    select_topk(scores, 0.3, seq_len=1006, block=128, out=out)  # warm-up outside the checks
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        select_topk(scores, 0.3, seq_len=1006, block=128, out=out)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        select_topk(scores, 0.3, seq_len=1006, block=128, out=out)
    scores.copy_(torch.rand(scores.shape, generator=gen, device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out.to_dense(), select_topk(scores, 0.3, seq_len=1006, block=128).to_dense())

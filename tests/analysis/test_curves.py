"""Recall-against-budget curves: agreement with select_topk + block_recall, with brute-force
token-level recall, monotonicity, the oracle on top, the needed budget, and every error."""

from __future__ import annotations

import pytest
import torch

from dfsviz.analysis.curves import RecallCurve, oracle_curve, recall_curve, stack_curves
from dfsviz.sparse.select import select_topk
from dfsviz.sparse.stats import block_recall, oracle_recall

METHODS = ("meanpool", "dfs_tile", "antidiagonal")


def _curve(case, method, **kw):
    return recall_curve(case.stats.m, case.scores[method], seq_len=case.seq_len, block=case.block, **kw)


@pytest.mark.parametrize("method", METHODS)
def test_curve_matches_select_topk_at_every_k(case, method):
    curve = _curve(case, method)
    mk = case.stats.num_blocks
    assert curve.recall.shape == (1, 2, mk)
    for k in range(1, mk + 1):
        mask = select_topk(case.scores[method], k / mk, seq_len=case.seq_len, block=case.block)
        assert int(mask.kv_num_blocks.min()) == int(mask.kv_num_blocks.max()) == k
        torch.testing.assert_close(curve.recall[..., k - 1], block_recall(case.stats.m, mask), rtol=0, atol=1e-12)
        torch.testing.assert_close(curve.density[..., k - 1], mask.density(), rtol=0, atol=1e-12)


def test_curve_matches_brute_force_token_recall(case):
    """Recall of the top-k mask from the dense attention matrix, no block statistics involved."""
    q, k = case.q, case.k
    attn = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)  # float64 [1, H, N, N]
    curve = _curve(case, "dfs_tile")
    for gamma in (0.1, 0.3, 0.5):
        mask = select_topk(case.scores["dfs_tile"], gamma, seq_len=case.seq_len, block=case.block).to_dense()
        token_mask = mask.repeat_interleave(case.block, 2).repeat_interleave(case.block, 3)[..., : case.seq_len, : case.seq_len]
        expected = (attn * token_mask).sum(dim=-1).mean(dim=-1)
        torch.testing.assert_close(curve.at(gamma), expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("method", METHODS)
def test_curves_monotone_and_full_mask_is_one(case, method):
    curve = _curve(case, method)
    assert bool((curve.recall.diff(dim=-1) >= -1e-15).all())
    assert bool((curve.density.diff(dim=-1) > 0).all())
    torch.testing.assert_close(curve.recall[..., -1], torch.ones(1, 2, dtype=torch.float64), rtol=0, atol=1e-9)
    torch.testing.assert_close(curve.density[..., -1], torch.ones(1, 2, dtype=torch.float64), rtol=0, atol=1e-12)


def test_oracle_on_top_of_every_method_and_equal_to_oracle_recall(case):
    oracle = oracle_curve(case.stats.m, seq_len=case.seq_len, block=case.block)
    for method in METHODS:
        assert bool((oracle.recall >= _curve(case, method).recall - 1e-12).all()), method
    for k in range(1, case.stats.num_blocks + 1):
        torch.testing.assert_close(oracle.recall[..., k - 1], oracle_recall(case.stats, k), rtol=0, atol=1e-12)
    assert oracle.label == "oracle"


def test_budget_rule_and_needed_budget_inverts_the_curve(case):
    curve = _curve(case, "meanpool")
    mk = curve.num_kv_blocks
    assert curve.k_for(0.19999999999999998) == max(1, int(0.19999999999999998 * mk))
    torch.testing.assert_close(curve.gamma, torch.arange(1, mk + 1, dtype=torch.float64) / mk)
    for target in (0.5, 0.9, 0.95, 1.0):
        k = curve.needed_k(target)
        reached = torch.gather(curve.recall, -1, (k - 1).unsqueeze(-1)).squeeze(-1)
        assert bool((reached >= target - 1e-9).all()) or bool((k == mk).all())
        below = k > 1
        previous = torch.gather(curve.recall, -1, (k - 2).clamp_min(0).unsqueeze(-1)).squeeze(-1)
        assert bool((previous[below] < target).all())
        torch.testing.assert_close(curve.needed_budget(target), k.double() / mk)
    mean = curve.mean()
    assert mean.recall.shape == (mk,)
    k_mean = int(mean.needed_k(0.9))
    assert mean.recall[k_mean - 1] >= 0.9 and (k_mean == 1 or mean.recall[k_mean - 2] < 0.9)


def test_forced_and_dense_rows_follow_select_topk(case):
    scores = case.scores["dfs_tile"]
    mk = case.stats.num_blocks
    forced, dense_q = [mk - 1], [0, 3]
    curve = _curve(case, "dfs_tile", forced_kv=forced, dense_q=dense_q)
    oracle = oracle_curve(case.stats.m, seq_len=case.seq_len, block=case.block, dense_q=dense_q)
    for k in range(2, mk + 1):
        mask = select_topk(scores, k / mk, seq_len=case.seq_len, block=case.block, forced_kv=forced, dense_q=dense_q)
        torch.testing.assert_close(curve.recall[..., k - 1], block_recall(case.stats.m, mask), rtol=0, atol=1e-12)
        torch.testing.assert_close(curve.density[..., k - 1], mask.density(), rtol=0, atol=1e-12)
        assert bool((oracle.recall[..., k - 1] >= curve.recall[..., k - 1] - 1e-12).all())


def test_stack_curves_adds_a_leading_dim(case):
    a, b = _curve(case, "meanpool"), _curve(case, "dfs_tile")
    both = stack_curves([a, b], label="two")
    assert both.recall.shape == (2, 1, 2, case.stats.num_blocks) and both.label == "two"
    torch.testing.assert_close(both.mean().recall, (a.mean().recall + b.mean().recall) / 2)
    torch.testing.assert_close(both.at(0.2), torch.stack([a.at(0.2), b.at(0.2)]))


def test_ragged_sequences_weigh_the_short_last_block(build_case):
    """N = 330, block 32: the last query block has 10 rows and weighs 10 / 330."""
    c = build_case(methods=("meanpool",))
    assert c.seq_len % c.block == 10
    m = torch.zeros_like(c.stats.m)
    m[..., 0] = 1.0  # every row puts all its mass on key block 0
    scores = torch.zeros_like(m)
    scores[..., 1] = 1.0  # every query block ranks key block 1 first ...
    scores[..., -1, 0] = 2.0  # ... but the short last one, which ranks block 0 first
    curve = recall_curve(m, scores, seq_len=c.seq_len, block=c.block)
    torch.testing.assert_close(curve.recall[..., 0], torch.full((1, 2), 10 / 330, dtype=torch.float64), rtol=0, atol=1e-15)
    # Density of k = 1: each query block keeps one full key block, the last keeps block 0 too.
    torch.testing.assert_close(curve.density[..., 0], torch.full((1, 2), 32 * 330 / 330**2, dtype=torch.float64))


# ----------------------------------------------------------------------------- errors
def test_errors(case):
    m, s, n, b = case.stats.m, case.scores["meanpool"], case.seq_len, case.block
    with pytest.raises(TypeError, match="`m` must be a torch.Tensor"):
        recall_curve(m.numpy(), s, seq_len=n, block=b)
    with pytest.raises(ValueError, match=r"`scores` must have shape \[B, H, 11, 11\]"):
        recall_curve(m, s[..., :-1], seq_len=n, block=b)
    with pytest.raises(ValueError, match="`m` must have shape"):
        recall_curve(m, s, seq_len=n + 40, block=b)
    with pytest.raises(ValueError, match="`m` must be non-negative"):
        recall_curve(-m, s, seq_len=n, block=b)
    with pytest.raises(ValueError, match="`scores` must not contain NaN"):
        recall_curve(m, torch.full_like(s, float("nan")), seq_len=n, block=b)
    with pytest.raises(ValueError, match="`m` must be a floating-point"):
        recall_curve(m.long(), s, seq_len=n, block=b)
    with pytest.raises(ValueError, match="`m` and `scores` must have one shape"):
        recall_curve(m, s[:, :1], seq_len=n, block=b)
    with pytest.raises(ValueError, match="`seq_len` must be a positive integer"):
        recall_curve(m, s, seq_len=0, block=b)
    with pytest.raises(ValueError, match="`block` must be a power of two"):
        recall_curve(m, s, seq_len=n, block=48)
    with pytest.raises(ValueError, match=r"`forced_kv` indices must lie in \[0, 11\) \(got \[11\]\); they are block, not token, indices"):
        recall_curve(m, s, seq_len=n, block=b, forced_kv=[11])
    with pytest.raises(ValueError, match=r"`dense_q` as a bool tensor must have shape \[11\]"):
        recall_curve(m, s, seq_len=n, block=b, dense_q=torch.ones(3, dtype=torch.bool))
    with pytest.raises(TypeError, match="`forced_kv` must be None"):
        recall_curve(m, s, seq_len=n, block=b, forced_kv=3.0)
    curve = recall_curve(m, s, seq_len=n, block=b)
    with pytest.raises(ValueError, match="`target` must be a recall level in"):
        curve.needed_budget(1.5)
    with pytest.raises(ValueError, match="`gamma` must be a fraction"):
        curve.at(0.0)
    with pytest.raises(ValueError, match="`recall` must be a float64 tensor"):
        RecallCurve(curve.recall.float(), curve.density, n, b)
    with pytest.raises(ValueError, match=r"with Mk = 11"):
        RecallCurve(curve.recall[..., :5], curve.density[..., :5], n, b)
    with pytest.raises(TypeError, match="`label` must be a str"):
        RecallCurve(curve.recall, curve.density, n, b, label=3)
    with pytest.raises(ValueError, match="`curves` must be a non-empty sequence"):
        stack_curves([])
    with pytest.raises(TypeError, match="`curves` must hold RecallCurve objects only"):
        stack_curves([curve, "x"])
    other = recall_curve(m[:, :1], s[:, :1], seq_len=n, block=b)
    with pytest.raises(ValueError, match="`curves` must share seq_len, block and shape"):
        stack_curves([curve, other])

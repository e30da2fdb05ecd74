"""Mask drift matrices and the DFSAttn schedule replay."""

from __future__ import annotations

import pytest
import torch

from dfsviz.analysis.drift import (
    DriftMatrix,
    ReplayStep,
    mask_drift,
    mask_jaccard,
    mask_source_step,
    replay_plan,
    replay_schedule,
)
from dfsviz.sparse.masks import BlockMask
from dfsviz.sparse.schedule import DFSSchedule
from dfsviz.sparse.select import select_topk
from dfsviz.sparse.stats import block_recall

STEPS = (2, 3, 4, 6, 7)  # with SCHEDULE: dense at 2, refresh at 3 and 6, reuse at 4 and 7
SCHEDULE = DFSSchedule(num_steps=10, skip_steps=3, interval=3, gamma0=0.3, decrement=0.1, dense_layers=(0,))


def _masks(cases, gamma=0.2):
    return [select_topk(c.scores["dfs_tile"], gamma, seq_len=c.seq_len, block=c.block) for c in cases]


def _brute_recall(m, mask):
    """R = sum_u |U_u|/N sum_{v in S_u} m_uv with the row weights written out by hand."""
    n, block = mask.seq_len, mask.block
    rows = torch.tensor([min(block, n - u * block) for u in range(mask.num_q_blocks)], dtype=torch.float64)
    per_row = (m.double() * mask.to_dense()).sum(dim=-1)
    return (per_row * rows / n).sum(dim=-1)


def _brute_jaccard(a, b):
    da, db = a.to_dense(), b.to_dense()
    n, block = a.seq_len, a.block
    out = torch.zeros(da.shape[:2], dtype=torch.float64)
    for bb in range(da.shape[0]):
        for h in range(da.shape[1]):
            total = 0.0
            for u in range(da.shape[2]):
                s = set(torch.nonzero(da[bb, h, u]).flatten().tolist())
                t = set(torch.nonzero(db[bb, h, u]).flatten().tolist())
                j = len(s & t) / len(s | t) if s | t else 1.0
                total += j * min(block, n - u * block) / n
            out[bb, h] = total
    return out


def test_drift_matrix_entries(steps_cases):
    masks = _masks(steps_cases)
    drift = mask_drift([c.stats.m for c in steps_cases], masks, STEPS, label="layer 1")
    s = len(STEPS)
    assert drift.recall.shape == drift.jaccard.shape == (s, s, 1, 2)
    for i in range(s):
        for j in range(s):
            torch.testing.assert_close(drift.recall[i, j], _brute_recall(steps_cases[j].stats.m, masks[i]), rtol=0, atol=1e-12)
            torch.testing.assert_close(drift.jaccard[i, j], _brute_jaccard(masks[i], masks[j]), rtol=0, atol=1e-12)
    # Diagonal: the fresh recall at t, and a Jaccard of exactly 1.
    for t in range(s):
        torch.testing.assert_close(drift.recall[t, t], block_recall(steps_cases[t].stats.m, masks[t]))
    assert bool((torch.diagonal(drift.jaccard, dim1=0, dim2=1) == 1).all())
    # The masks really change over the steps, so the test sees off-diagonal drift.
    assert float(drift.mean_jaccard()[0, -1]) < 1.0
    rel = drift.relative_recall()
    torch.testing.assert_close(torch.diagonal(rel, dim1=0, dim2=1), torch.ones(1, 2, s, dtype=torch.float64))
    torch.testing.assert_close(rel[0, 4], drift.recall[0, 4] / drift.recall[4, 4])


def test_drift_at_lag(steps_cases):
    drift = mask_drift([c.stats.m for c in steps_cases], _masks(steps_cases), STEPS)
    lag = drift.at_lag(3)  # pairs (3, 6) and (4, 7)
    assert lag["pairs"] == [(3, 6), (4, 7)]
    expected = (drift.recall[1, 3].mean() + drift.recall[2, 4].mean()) / 2
    assert lag["recall"] == pytest.approx(float(expected), abs=1e-14)
    assert lag["fresh_recall"] == pytest.approx(float((drift.recall[3, 3].mean() + drift.recall[4, 4].mean()) / 2))
    assert drift.at_lag(6) is None  # no captured pair is 6 steps apart
    assert drift.at_lag(0)["jaccard"] == 1.0
    with pytest.raises(ValueError, match="`lag` must be an integer >= 0"):
        drift.at_lag(-1)


def test_mask_jaccard_extremes(case):
    full = BlockMask.full(1, 2, case.seq_len, case.block)
    empty = BlockMask.from_dense(torch.zeros(full.shape, dtype=torch.bool), case.seq_len, case.block)
    torch.testing.assert_close(mask_jaccard(full, full), torch.ones(1, 2, dtype=torch.float64))
    torch.testing.assert_close(mask_jaccard(empty, empty), torch.ones(1, 2, dtype=torch.float64))
    torch.testing.assert_close(mask_jaccard(full, empty), torch.zeros(1, 2, dtype=torch.float64))


def test_replay_schedule(steps_cases):
    masses = [c.stats.m for c in steps_cases]
    scores = [c.scores["dfs_tile"] for c in steps_cases]
    c0 = steps_cases[0]
    replay = replay_schedule(SCHEDULE, STEPS, masses, scores, layer=1, seq_len=c0.seq_len, block=c0.block)
    assert replay.dense == (True, False, False, False, False)
    assert replay.refresh == (False, True, False, True, False)
    assert replay.mask_step == (None, 3, 3, 6, 6)
    assert replay.gamma == (None, 0.3, 0.3, pytest.approx(0.2), pytest.approx(0.2))
    ones = torch.ones(1, 2, dtype=torch.float64)
    # Dense step: everything kept.
    torch.testing.assert_close(replay.recall_cached[0], ones, rtol=0, atol=1e-9)
    torch.testing.assert_close(replay.density_cached[0], ones)
    # Refresh steps: caching and refreshing every step are the same mask.
    for i in (1, 3):
        torch.testing.assert_close(replay.recall_cached[i], replay.recall_fresh[i], rtol=0, atol=0)
        torch.testing.assert_close(replay.density_cached[i], replay.density_fresh[i], rtol=0, atol=0)
    # Reuse steps: the mask chosen at the refresh step with its budget, applied to this step's mass.
    for i, src in ((2, 1), (4, 3)):
        gamma = SCHEDULE.at_step(STEPS[src]).gamma
        cached = select_topk(scores[src], gamma, seq_len=c0.seq_len, block=c0.block)
        fresh = select_topk(scores[i], SCHEDULE.at_step(STEPS[i]).gamma, seq_len=c0.seq_len, block=c0.block)
        torch.testing.assert_close(replay.recall_cached[i], _brute_recall(masses[i], cached), rtol=0, atol=1e-12)
        torch.testing.assert_close(replay.recall_fresh[i], _brute_recall(masses[i], fresh), rtol=0, atol=1e-12)
    series = replay.mean_series()
    assert len(series["recall_cached"]) == len(STEPS)
    # A dense layer is dense at every step.
    dense = replay_schedule(SCHEDULE, STEPS, masses, scores, layer=0, seq_len=c0.seq_len, block=c0.block)
    assert all(dense.dense) and dense.mask_step == (None,) * len(STEPS)
    torch.testing.assert_close(dense.recall_cached, torch.ones(len(STEPS), 1, 2, dtype=torch.float64), rtol=0, atol=1e-9)


def test_replay_with_cfg_call_counting(steps_cases):
    """calls_per_step = 2 doubles warm-up and interval in calls; steps stay the same."""
    masses = [c.stats.m for c in steps_cases]
    scores = [c.scores["dfs_tile"] for c in steps_cases]
    sched = DFSSchedule(num_steps=10, skip_steps=3, interval=3, calls_per_step=2, dense_layers=())
    c0 = steps_cases[0]
    replay = replay_schedule(sched, STEPS, masses, scores, layer=0, seq_len=c0.seq_len, block=c0.block)
    assert replay.mask_step == (None, 3, 3, 6, 6)


def test_mask_source_step_against_the_plan():
    """Walk the schedule's own plan forward, remembering the last refresh: the independent answer."""
    for sched in (SCHEDULE, DFSSchedule(), DFSSchedule(num_steps=20, skip_steps=0, interval=7, decrement=0.0)):
        last = None
        for step in range(sched.num_steps):
            plan = sched.at_step(step)
            if plan.refresh:
                last = step
            expected = None if plan.dense else last
            assert mask_source_step(sched, step, layer=5) == expected, (sched.name, step)
            if 0 in sched.dense_layers:
                assert mask_source_step(sched, step, layer=0) is None
    assert mask_source_step(DFSSchedule(), 49, layer=1) == 36  # steps 48-49: no refresh after r_max
    with pytest.raises(TypeError, match="`schedule` must be a DFSSchedule"):
        mask_source_step("dfs", 3)


def test_replay_plan_names_what_each_step_needs():
    """Per captured step: the step whose scores chose the mask in use and that refresh's budget,
    and the step's own budget (the fresh mask's), written out from SCHEDULE's plan by hand."""
    g0, g1 = SCHEDULE.at_step(3).gamma, SCHEDULE.at_step(6).gamma
    assert (g0, g1) == (0.3, pytest.approx(0.2))
    assert replay_plan(SCHEDULE, STEPS, layer=1) == (
        ReplayStep(step=2, mask_step=None, gamma=None, mask_gamma=None),
        ReplayStep(step=3, mask_step=3, gamma=g0, mask_gamma=g0),
        ReplayStep(step=4, mask_step=3, gamma=g0, mask_gamma=g0),
        ReplayStep(step=6, mask_step=6, gamma=g1, mask_gamma=g1),
        ReplayStep(step=7, mask_step=6, gamma=g1, mask_gamma=g1),
    )
    plan = replay_plan(SCHEDULE, STEPS, layer=1)
    assert [p.dense for p in plan] == [True, False, False, False, False]
    assert [p.refresh for p in plan] == [False, True, False, True, False]
    # a dense layer needs no mask at any step
    assert all(p.dense and not p.refresh and p.gamma is None for p in replay_plan(SCHEDULE, STEPS, layer=0))
    # past the last budget interval (r_max = 2 of the defaults) steps keep the mask of step 36 and its budget
    late = replay_plan(DFSSchedule(), (36, 48, 49), layer=1)
    assert [(p.mask_step, p.mask_gamma) for p in late] == [(36, DFSSchedule().at_step(36).gamma)] * 3
    assert late[0].refresh and not late[2].refresh and late[2].gamma == pytest.approx(0.1)


def test_replay_plan_errors():
    with pytest.raises(TypeError, match="`schedule` must be a DFSSchedule"):
        replay_plan("dfs", STEPS, layer=1)
    with pytest.raises(ValueError, match=r"the schedule reuses masks refreshed at steps \[3, 6\], which the capture "
                                         r"lacks \(captured: \[2, 4, 7\]\); capture those steps too"):
        replay_plan(SCHEDULE, (2, 4, 7), layer=1)
    with pytest.raises(ValueError, match=r"`steps` must lie in \[0, schedule.num_steps = 10\) \(got 12\)"):
        replay_plan(SCHEDULE, (2, 3, 12), layer=1)
    with pytest.raises(ValueError, match=r"`layer` must be an integer >= 0, the self-attention layer index \(got -1\)"):
        replay_plan(SCHEDULE, STEPS, layer=-1)
    with pytest.raises(ValueError, match="`steps` must be strictly ascending"):
        replay_plan(SCHEDULE, (3, 2), layer=1)
    with pytest.raises(ValueError, match="`steps` must not be empty"):
        replay_plan(SCHEDULE, (), layer=1)


# ----------------------------------------------------------------------------- errors
def test_errors(steps_cases, case):
    masses = [c.stats.m for c in steps_cases]
    masks = _masks(steps_cases)
    scores = [c.scores["dfs_tile"] for c in steps_cases]
    n, b = case.seq_len, case.block
    with pytest.raises(TypeError, match="`masses` must be a sequence of block-mass tensors"):
        mask_drift(masses[0], masks, STEPS)
    with pytest.raises(TypeError, match="`masks` must be a sequence of BlockMask"):
        mask_drift(masses, masks[0], STEPS)
    with pytest.raises(ValueError, match=r"`steps` must have one entry per block mass in `masses` \(5\)"):
        mask_drift(masses, masks, STEPS[:3])
    with pytest.raises(ValueError, match="`steps` must be strictly ascending"):
        mask_drift(masses, masks, (2, 3, 3, 6, 7))
    with pytest.raises(ValueError, match="`steps` must hold non-negative integers"):
        mask_drift(masses, masks, (-1, 3, 4, 6, 7))
    with pytest.raises(TypeError, match="`steps` must be a sequence of step indices"):
        mask_drift(masses, masks, "23467")
    with pytest.raises(ValueError, match="`steps` must not be empty"):
        mask_drift([], [], ())
    with pytest.raises(ValueError, match=r"`masks` must have one mask per step \(5\)"):
        mask_drift(masses, masks[:4], STEPS)
    with pytest.raises(TypeError, match="`masks` must hold dfsviz BlockMask objects only"):
        mask_drift(masses, [*masks[:4], "mask"], STEPS)
    other = BlockMask.full(1, 2, n, 16)
    with pytest.raises(ValueError, match="masks `a` and `b` must describe the same blocks"):
        mask_drift(masses, [*masks[:4], other], STEPS)
    with pytest.raises(TypeError, match="`a` must be a dfsviz BlockMask"):
        mask_jaccard("a", masks[0])
    with pytest.raises(ValueError, match=r"`masses\[2\]` must be non-negative"):
        mask_drift([*masses[:2], -masses[2], *masses[3:]], masks, STEPS)
    kw = dict(layer=1, seq_len=n, block=b)
    with pytest.raises(TypeError, match="`schedule` must be a DFSSchedule"):
        replay_schedule("dfs", STEPS, masses, scores, **kw)
    with pytest.raises(ValueError, match=r"the schedule reuses masks refreshed at steps \[3\], which the capture lacks"):
        replay_schedule(SCHEDULE, (2, 4, 5, 6, 7), masses, scores, **kw)
    with pytest.raises(ValueError, match=r"`steps` must lie in \[0, schedule.num_steps = 10\)"):
        replay_schedule(SCHEDULE, (2, 3, 4, 6, 12), masses, scores, **kw)
    with pytest.raises(ValueError, match=r"`scores` must have one tensor per step \(5\)"):
        replay_schedule(SCHEDULE, STEPS, masses, scores[:2], **kw)
    with pytest.raises(ValueError, match="`layer` must be an integer >= 0"):
        replay_schedule(SCHEDULE, STEPS, masses, scores, layer=-1, seq_len=n, block=b)
    with pytest.raises(TypeError, match="`scores` must be a sequence of block-score tensors"):
        replay_schedule(SCHEDULE, STEPS, masses, scores[0], **kw)
    with pytest.raises(TypeError, match="`masses` must be a sequence of block-mass tensors"):
        replay_schedule(SCHEDULE, STEPS, masses[0], scores, **kw)
    with pytest.raises(ValueError, match="`masses` and `scores` must all have one shape"):
        replay_schedule(SCHEDULE, STEPS, masses, [*scores[:4], scores[4][:, :1]], **kw)
    assert isinstance(mask_drift(masses, masks, STEPS), DriftMatrix)

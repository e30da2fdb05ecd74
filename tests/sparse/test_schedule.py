"""DFSSchedule against the per-step table of the DFSAttn reference code's schedule, written out literally."""

import pytest

from dfsviz.sparse.schedule import DFSSchedule, StepPlan

# The reference schedule, step by step: "12-23 sparse 0.3", "24-35 sparse 0.19999999999999998",
# "36-49 sparse 0.09999999999999998"; refresh at steps 12, 24, 36 only.
PAPER_GAMMA = {**{s: 0.3 for s in range(12, 24)}, **{s: 0.19999999999999998 for s in range(24, 36)},
               **{s: 0.09999999999999998 for s in range(36, 50)}}
PAPER_TOPK_WAN = {0.3: 177, 0.19999999999999998: 118, 0.09999999999999998: 59}


def test_default_matches_paper_table():
    sched = DFSSchedule()
    for step in range(50):
        plan = sched.at_step(step)
        assert plan.step == step and plan.call == step
        if step < 12:
            assert plan.dense and not plan.refresh and plan.gamma is None
            assert plan.k_for(591) == 591
        else:
            assert not plan.dense
            assert plan.gamma == PAPER_GAMMA[step]  # exact float equality
            assert plan.refresh == (step in (12, 24, 36))
            assert plan.k_for(591) == PAPER_TOPK_WAN[plan.gamma]
    assert [p.step for p in sched.plan() if p.refresh] == [12, 24, 36]
    # Steps 48-49 are interval r = 3 > r_max = 2: no fourth refresh, gamma stays 0.1.
    assert sched.at_step(48).interval == 3 and not sched.at_step(48).refresh
    assert sched.max_interval == 2


def test_hunyuan_topk_with_text_blocks():
    sched = DFSSchedule(dense_layers=())
    assert [sched.at_step(s).k_for(931) for s in (12, 24, 36)] == [279, 186, 93]
    assert [sched.topk_for(g, 931) for g in (0.3, 0.19999999999999998, 0.09999999999999998)] == [279, 186, 93]


def test_wan_cfg_counts_calls():
    sched = DFSSchedule(calls_per_step=2)
    plans = sched.plan()
    assert len(plans) == 100
    assert sched.warmup_calls == 24 and sched.interval_calls == 24
    assert [p.call for p in plans if p.refresh] == [24, 48, 72]
    # The refresh is on the cond call (even call); the uncond call of that step reuses.
    assert [p.step for p in plans if p.refresh] == [12, 24, 36]
    assert all(not p.dense for p in plans[24:]) and all(p.dense for p in plans[:24])
    assert sched.at_call(25).step == 12 and not sched.at_call(25).refresh and sched.at_call(25).gamma == 0.3
    assert sched.at_call(97).gamma == 0.09999999999999998 and not sched.at_call(96).refresh
    # Per step it is the same schedule as without CFG.
    single = DFSSchedule()
    for s in range(50):
        a, b = sched.at_step(s), single.at_step(s)
        assert (a.dense, a.refresh, a.gamma) == (b.dense, b.refresh, b.gamma)


def test_zero_decrement_refreshes_every_interval():
    sched = DFSSchedule(num_steps=20, skip_steps=2, interval=5, gamma0=0.25, decrement=0.0)
    assert [p.step for p in sched.plan() if p.refresh] == [2, 7, 12, 17]
    assert {p.gamma for p in sched.plan() if not p.dense} == {0.25}
    assert sched.max_interval is None


def test_large_decrement_single_interval():
    # ceil(0.3 / 0.5) - 1 = 0: one refresh at the warm-up end, gamma 0.3 forever after.
    sched = DFSSchedule(num_steps=10, skip_steps=0, interval=3, gamma0=0.3, decrement=0.5)
    assert [p.step for p in sched.plan() if p.refresh] == [0]
    assert all(p.gamma == 0.3 for p in sched.plan())


def test_dense_layers_and_name_and_table():
    sched = DFSSchedule(dense_layers=[3, 0, 3])
    assert sched.dense_layers == (0, 3)
    assert sched.layer_is_dense(3) and not sched.layer_is_dense(1)
    assert sched.name == "dfs_n50_s12_i12_g0.30_d0.10_c1_L0-3"
    lines = sched.table(591).splitlines()
    assert lines[0].split() == ["step", "calls", "attention", "gamma", "refresh", "top-k/591"]
    assert lines[1].split() == ["0", "0", "dense", "-", "-", "591"]
    assert lines[13].split() == ["12", "12", "sparse", "0.3", "call", "12", "177"]
    assert lines[14].split() == ["13", "13", "sparse", "0.3", "reuse", "177"]
    assert lines[25].split() == ["24", "24", "sparse", "0.19999999999999998", "call", "24", "118"]
    assert lines[50].split() == ["49", "49", "sparse", "0.09999999999999998", "reuse", "59"]
    assert lines[51] == "dense layers: 0, 3; calls per step: 1"
    wan = DFSSchedule(calls_per_step=2).table().splitlines()
    assert wan[13].split() == ["12", "24,25", "sparse", "0.3", "call", "24"]


def test_step_plan_dense_k():
    assert StepPlan(0, 0, True, False, None, None).k_for(10) == 10


# ------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(num_steps=0), r"`num_steps` must be an integer >= 1 \(got 0\)"),
        (dict(skip_steps=-1), r"`skip_steps` must be an integer >= 0 \(got -1\)"),
        (dict(skip_steps=51), r"`skip_steps` must be in \[0, num_steps=50\] \(got 51\)"),
        (dict(interval=0), r"`interval` must be an integer >= 1 \(got 0\)"),
        (dict(interval=2.0), r"`interval` must be an integer >= 1 \(got 2.0\)"),
        (dict(calls_per_step=0), r"`calls_per_step` must be an integer >= 1 \(got 0\); 1 without CFG"),
        (dict(gamma0=0.0), r"`gamma0` must be a kept fraction in \(0, 1\] \(got 0.0\)"),
        (dict(gamma0=True), r"`gamma0` must be a kept fraction in \(0, 1\] \(got True\)"),
        (dict(decrement=-0.1), r"`decrement` must be in \[0, 1\] \(got -0.1\)"),
        (dict(dense_layers=(0, -1)), r"`dense_layers` must hold integers >= 0 \(got \(0, -1\)\)"),
    ],
)
def test_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DFSSchedule(**kwargs)


def test_query_errors():
    sched = DFSSchedule(calls_per_step=2)
    with pytest.raises(TypeError, match=r"`dense_layers` must be a tuple of layer indices \(got int\)"):
        DFSSchedule(dense_layers=0)
    with pytest.raises(ValueError, match=r"`step` must be an integer in \[0, num_steps = 50\) \(got 50\)"):
        sched.at_step(50)
    with pytest.raises(ValueError, match=r"`call` must be an integer in \[0, num_steps \* calls_per_step = 100\) \(got -1\)"):
        sched.at_call(-1)
    with pytest.raises(ValueError, match=r"`layer` must be an integer >= 0 \(got -2\)"):
        sched.layer_is_dense(-2)
    with pytest.raises(ValueError, match=r"`num_kv_blocks` must be a positive integer Mk \(got 0\)"):
        sched.at_step(0).k_for(0)
    with pytest.raises(ValueError, match=r"`num_kv_blocks` must be a positive integer Mk \(got 0\)"):
        sched.at_step(20).k_for(0)

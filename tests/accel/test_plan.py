"""Calibrated DFSAttn plans: the JSON file (round trip, every refusal), per-head top-k, DFSConfig.load,
and apply_dfsattn with a plan on a tiny real Wan (per-head budgets reach the kernel, full budget equals
dense, another model or grid is refused)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from dfsviz.accel import DFSConfig, apply_dfsattn
from dfsviz.accel.plan import (
    CalibratedPlan,
    gamma_for_count,
    public_config,
    select_topk_heads,
)
from dfsviz.sparse.grid import LatentGrid
from dfsviz.sparse.select import select_topk, topk_count

from accel_models import make_inputs, make_plan
from tiny_models import build_tiny

ATOL = 2e-5
MK = 12                     # blocks of 16


def run(model, inputs):
    with torch.no_grad():
        return model(**inputs)[0]


@pytest.fixture(scope="module")
def wan():
    return build_tiny("wan")


# ------------------------------------------------------------------------ budgets
def test_gamma_for_count_keeps_exactly_k():
    for mk in range(1, 300):
        for k in range(1, mk + 1):
            gamma = gamma_for_count(k, mk)
            assert topk_count(gamma, mk) == k, (k, mk)
            assert abs(gamma - k / mk) < 1e-12
    assert int(15 / 22 * 22) == 14 and gamma_for_count(15, 22) > 15 / 22  # 15 / 22 * 22 rounds below 15
    with pytest.raises(ValueError, match=r"`k` must be an integer in \[1, Mk = 4\] \(got 5\)"):
        gamma_for_count(5, 4)
    with pytest.raises(ValueError, match=r"`num_kv_blocks` must be a positive integer Mk \(got 0\)"):
        gamma_for_count(1, 0)


def test_select_topk_heads_is_select_topk_per_head():
    scores = torch.randn(2, 3, MK, MK, generator=torch.Generator().manual_seed(0))
    gammas = (0.25, None, 0.5)
    for kw in ({}, {"forced_kv": [11], "dense_q": [11]}):
        mask = select_topk_heads(scores, gammas, seq_len=192, block=16, **kw).to_dense()
        for h, g in enumerate(gammas):
            alone = select_topk(scores[:, h:h + 1], 1.0 if g is None else g, seq_len=192, block=16, **kw).to_dense()
            assert torch.equal(mask[:, h:h + 1], alone)
        assert mask[0, 1].all() and mask[:, 0, :11].sum(-1).unique().tolist() == [3]
    same = select_topk_heads(scores, (0.5, 0.5, 0.5), seq_len=192, block=16).to_dense()
    assert torch.equal(same, select_topk(scores, 0.5, seq_len=192, block=16).to_dense())


def test_select_topk_heads_errors():
    scores = torch.zeros(1, 3, MK, MK)
    with pytest.raises(ValueError, match=r"`gammas` must hold one budget per head \(3\) \(got 2\)"):
        select_topk_heads(scores, (0.5, 0.5), seq_len=192, block=16)
    with pytest.raises(ValueError, match=r"`scores` must have shape \[B, H, Mq, Mk\] \(got \(3, 12\)\)"):
        select_topk_heads(torch.zeros(3, 12), (0.5,), seq_len=192, block=16)
    with pytest.raises(TypeError, match=r"`scores` must be a torch.Tensor \[B, H, Mq, Mk\] \(got list\)"):
        select_topk_heads([0.5], (0.5,), seq_len=192, block=16)


# ------------------------------------------------------------------------ the file
def test_plan_round_trip_and_load(wan, tmp_path):
    plan = make_plan(wan, {0: (0.25, None), 1: (None, None)}, warmup=2, interval=3)
    assert plan.dense_layers == (1,) and plan.gammas(0) == (0.25, None) and plan.gammas(1) is None
    assert plan.gammas(7) is None  # not calibrated: dense
    path = plan.save(tmp_path / "dfsattn.json")
    back = CalibratedPlan.load(path)
    assert back.to_json() == plan.to_json()
    data = json.loads(path.read_text())
    assert data["format"] == "dfsviz-dfsattn-config" and data["format_version"] == 1
    assert data["layers"][0]["gamma"] == [0.25, None] and data["layers"][0]["kept_blocks"] == [3, 12]
    config = DFSConfig.load(path, calls_per_step=2, permute_once=True)
    assert (config.order, config.block, config.tile, config.score_method) == ("hilbert3d", 16, 4, "dfs_tile")
    s = config.schedule
    assert (s.num_steps, s.skip_steps, s.interval, s.decrement, s.dense_layers, s.calls_per_step) == (4, 2, 3, 0.0, (1,), 2)
    assert config.permute_once and config.name.endswith("_calibrated")
    # The calibrated schedule in DFSSchedule's terms: steps < warm-up dense, refresh at 2 (and 5, 8, ... beyond 4).
    assert [(p.dense, p.refresh) for p in (s.at_step(t) for t in range(4))] == [
        (True, False), (True, False), (False, True), (False, False)]


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda d: d.pop("format"), r"not a DFSAttn config \(no format='dfsviz-dfsattn-config'\)"),
        (lambda d: d.update(format_version=2, dfsviz_version="9.9"),
         r"has format version 2, written by dfsviz 9.9; this dfsviz .* reads version 1"),
        (lambda d: d.pop("block"), r"missing field 'block'"),
        (lambda d: d["schedule"].pop("interval"), r"missing field schedule.'interval'"),
        (lambda d: d.update(block="16"), r"field 'block' must be int \(got str '16'\)"),
        (lambda d: d.update(tile=True), r"field 'tile' must be int or null \(got bool True\)"),
        (lambda d: d.update(block=96), r"`block` must be a power of two in \[16, 256\] \(got 96\)"),
        (lambda d: d.update(order="zigzag"), r"`order` must be one of .*got 'zigzag'"),
        (lambda d: d.update(method="magic"), r"`method` must be one of .*got 'magic'"),
        (lambda d: d.update(tile=32), r"`tile` must be a power of two in \[1, 16\] \(got 32\)"),
        (lambda d: d["schedule"].update(warmup_steps=4), r"`warmup_steps` must be in \[0, num_steps = 4\) \(got 4\)"),
        (lambda d: d["schedule"].update(interval=0), r"`interval` must be an integer >= 1 \(got 0\)"),
        (lambda d: d["layers"][0].update(gamma=[1.5, None]), r"`gamma` of layer 0 must hold one kept fraction in \(0, 1\]"),
        (lambda d: d["layers"][0].update(kept_blocks=[4, 12]),
         r"`kept_blocks` of layer 0 must be max\(1, int\(gamma \* Mk\)\) with Mk = 12: \[3, 12\] \(got \[4, 12\]\)"),
        (lambda d: d["layers"][0].update(density=[0.5]), r"`density` of layer 0 must hold 2 numbers in \[0, 1\]"),
        (lambda d: d["layers"][0].update(recall_by_clip=[[2.0], [0.5]]), r"`recall_by_clip` of layer 0 must be empty"),
        (lambda d: d.update(layers=[d["layers"][1], d["layers"][0]]),
         r"`layers` must have ascending distinct layer indices \(got \[1, 0\]\)"),
        (lambda d: d.update(layers=[]), r"`layers` must hold at least one LayerBudget"),
        (lambda d: d.update(dense_layers=[]), r"`dense_layers` \[\] must list the layers whose every gamma is null \[1\]"),
        (lambda d: d["grid"].update(frames=0), r"DFSAttn config <dict>: .*frames"),
        (lambda d: d.update(predicted=[]), r"field 'predicted' must be dict \(got list \[\]\)"),
    ],
)
def test_plan_file_refusals(wan, edit, match):
    data = make_plan(wan, {0: (0.25, None), 1: (None, None)}).to_json()
    data = copy.deepcopy(data)
    edit(data)
    with pytest.raises(ValueError, match=match):
        CalibratedPlan.from_json(data)


def test_plan_load_refusals(tmp_path):
    with pytest.raises(ValueError, match=r"DFSAttn config '.*nope.json' does not exist; write one with `dfsviz calibrate`"):
        CalibratedPlan.load(tmp_path / "nope.json")
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"DFSAttn config '.*x.json' is not JSON"):
        CalibratedPlan.load(tmp_path / "x.json")
    with pytest.raises(TypeError, match=r"`path` must be the path of a DFSAttn config file \(got int\)"):
        CalibratedPlan.load(3)


def test_dfsconfig_calibration_checks(wan, tmp_path):
    plan = make_plan(wan, {0: (0.25, None)})
    good = DFSConfig(order="hilbert3d", block=16, tile=4, score_method="dfs_tile", schedule=plan.schedule(),
                     calibration=plan)
    assert good.calibration is plan
    with pytest.raises(ValueError, match=r"`order` must be 'hilbert3d', the value `calibration` was calibrated with "
                                         r"\(got 'raster'\)"):
        DFSConfig(order="raster", block=16, tile=4, schedule=plan.schedule(), calibration=plan)
    with pytest.raises(ValueError, match=r"`tile` must be 4, the value `calibration` was calibrated with \(got 16\)"):
        DFSConfig(block=16, schedule=plan.schedule(), calibration=plan)
    with pytest.raises(ValueError, match=r"`schedule` must be the calibrated schedule dfs_n4_s1_i1_g1.00_d0.00_c1_L"):
        DFSConfig(block=16, tile=4, calibration=plan)
    with pytest.raises(TypeError, match=r"`calibration` must be a dfsviz.accel.plan.CalibratedPlan or None \(got dict\)"):
        DFSConfig(calibration={})
    path = plan.save(tmp_path / "p.json")
    with pytest.raises(ValueError, match=r"\['order', 'schedule'\] come from the calibrated config .* cannot be overridden"):
        DFSConfig.load(path, order="raster", schedule=None)


# ------------------------------------------------------------------------ apply
def test_calibrated_full_budget_equals_dense(wan):
    """Every head of every layer at gamma 1: the sparse path keeps every block and reproduces dense attention."""
    plan = make_plan(wan, {0: (1.0, 1.0), 1: (1.0, 1.0)})
    inputs = make_inputs("wan")
    dense = run(wan, inputs)
    with apply_dfsattn(wan, _config(plan)) as h:
        warm = run(wan, inputs)    # step 0: dense warm-up
        sparse = run(wan, inputs)  # step 1: sparse, every block kept
    assert [r["gamma"] for r in h.state.records] == [(1.0, 1.0), (1.0, 1.0)]
    assert all(r["density"] == 1.0 and r["step"] == 1 for r in h.state.records)
    torch.testing.assert_close(warm, dense, atol=ATOL, rtol=0)
    torch.testing.assert_close(sparse, dense, atol=ATOL, rtol=0)


def _config(plan, **kw):
    return DFSConfig(order=plan.order, block=plan.block, tile=plan.tile, score_method=plan.method,
                     schedule=plan.schedule(), calibration=plan, **kw)


def test_per_head_budgets_reach_the_kernel(wan, tmp_path):
    """Layer 0 keeps 3 and 6 of 12 blocks per head, layer 1 only its second head is sparse; a plan
    with every head dense (or without the layer) leaves the stock processor in place."""
    plan = make_plan(wan, {0: (0.25, 0.5), 1: (None, 0.25)})
    path = plan.save(tmp_path / "dfsattn.json")
    inputs = make_inputs("wan")
    with apply_dfsattn(wan, str(path)) as h:  # the file path is accepted as the config
        assert h.config.calibration.to_json() == plan.to_json()
        h.state.set_step(1)
        run(wan, inputs)
        counts = {key[0]: e.mask.kv_num_blocks[0] for key, e in h.state.masks.items()}
    assert counts[0][0].unique().tolist() == [3] and counts[0][1].unique().tolist() == [6]
    assert counts[1][0].unique().tolist() == [MK] and counts[1][1].unique().tolist() == [3]
    stock = wan.blocks[1].attn1.processor
    with apply_dfsattn(wan, _config(make_plan(wan, {0: (0.25, 0.5), 1: (None, None)}))) as h:
        assert h.sparse_layers == ["blocks.0.attn1"] and wan.blocks[1].attn1.processor is stock
    with apply_dfsattn(wan, _config(make_plan(wan, {1: (0.5, 0.5)}))) as h:
        assert h.sparse_layers == ["blocks.1.attn1"]


def test_a_calibrated_config_is_for_one_transformer(wan):
    from tiny_models import wan_pipeline

    pipe = wan_pipeline(wan, build_tiny("wan", seed=1), boundary_ratio=0.875)
    with pytest.raises(ValueError, match=r"a calibrated config holds the budgets of one transformer; WanPipeline has 2 "
                                         r"\(transformer, transformer_2\): apply it to one of them"):
        apply_dfsattn(pipe, _config(make_plan(wan, {0: (0.5, 0.5)})))
    apply_dfsattn(pipe.transformer, _config(make_plan(wan, {0: (0.5, 0.5)}))).remove()


def test_refuses_another_model_or_grid(wan):
    hunyuan = build_tiny("hunyuanvideo")
    other = make_plan(hunyuan, {0: (0.5, 0.5)})
    with pytest.raises(ValueError, match=r"DFSAttn config calibrated for tiny-wan \(HunyuanVideoTransformer3DModel\); "
                                         r"this transformer is WanTransformer3DModel; calibrate"):
        apply_dfsattn(wan, _config(other))
    hunyuan.register_to_config(_name_or_path="org/tiny-hunyuan")  # as from_pretrained records it
    with pytest.raises(ValueError, match=r"this transformer is org/tiny-hunyuan \(HunyuanVideoTransformer3DModel\); "):
        apply_dfsattn(hunyuan, _config(make_plan(wan, {0: (0.5, 0.5)})))
    bigger = make_plan(wan, {0: (0.5, 0.5)}, config={**public_config(wan.config), "num_layers": 40})
    with pytest.raises(ValueError, match=r"this transformer is WanTransformer3DModel with "
                                         r"num_layers 40 != 2"):
        apply_dfsattn(wan, _config(bigger))
    before = {n: m.processor for n, m in wan.named_modules() if hasattr(m, "processor")}
    assert all(m.processor is before[n] for n, m in wan.named_modules() if hasattr(m, "processor"))
    wide = make_plan(wan, {0: (0.5, 0.5)}, grid=LatentGrid(3, 8, 16))
    with apply_dfsattn(wan, _config(wide)):
        with pytest.raises(ValueError, match=r"DFSAttn config calibrated for grid f3h8w16 of tiny-wan; this call's "
                                             r"latent gives grid f3h8w8: calibrate on a capture at this resolution"):
            run(wan, make_inputs("wan"))
    far = make_plan(wan, {5: (0.5, 0.5)})
    with pytest.raises(ValueError, match=r"DFSAttn config layer 5 \(blocks.5.attn1\) is not a self-attention layer of "
                                         r"WanTransformer3DModel \(layers 0..1\)"):
        apply_dfsattn(wan, _config(far))
    three = make_plan(wan, {0: (0.5, 0.5, 0.5)})
    with pytest.raises(ValueError, match=r"DFSAttn config layer 0 has budgets for 3 heads; blocks.0.attn1 has 2 heads"):
        apply_dfsattn(wan, _config(three))

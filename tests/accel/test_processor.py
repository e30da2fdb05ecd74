"""apply_dfsattn on tiny real diffusers transformers: exactness at full budget, recall against brute
force, schedule (refreshes and cache reuse counted), dense steps/layers, CFG share vs separate,
undo, permute-once, HunyuanVideo / CogVideoX text handling, and every error message."""

from __future__ import annotations

import logging

import pytest
import torch

from dfsviz.accel import DFSConfig, DFSState, apply_dfsattn, remove_dfsattn, text_blocks
from dfsviz.capture.hooks import AttentionCapture
from dfsviz.sparse.grid import LatentGrid
from dfsviz.sparse.orders import make_order
from dfsviz.sparse.schedule import DFSSchedule

from accel_models import ARCHS, make_inputs
from tiny_models import build_tiny

ATOL = 2e-5


def run(model, inputs):
    with torch.no_grad():
        return model(**inputs)[0]


def sched(**kw):
    base = dict(num_steps=4, skip_steps=1, interval=1, gamma0=1.0, decrement=0.0, dense_layers=())
    return DFSSchedule(**{**base, **kw})


def cfg(**kw):
    return DFSConfig(**{**dict(block=16, tile=4, schedule=sched()), **kw})


@pytest.mark.parametrize("once", [False, True], ids=["per_call", "permute_once"])
@pytest.mark.parametrize("arch", ARCHS)
def test_full_budget_equals_dense(models, arch, once):
    model, inputs = models[arch], make_inputs(arch)
    dense = run(model, inputs)
    with apply_dfsattn(model, cfg(permute_once=once)) as h:
        warm = run(model, inputs)  # step 0: dense warm-up
        sparse = run(model, inputs)  # step 1: every block kept
    assert [r["step"] for r in h.state.records] == [1] * len(h.layers)
    assert all(r["density"] == 1.0 for r in h.state.records)
    torch.testing.assert_close(warm, dense, atol=ATOL, rtol=0)
    torch.testing.assert_close(sparse, dense, atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_undo_is_bit_identical(models, arch):
    model, inputs = models[arch], make_inputs(arch)
    before = run(model, inputs)
    procs = {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")}
    hooks = (len(model._forward_pre_hooks), len(model._forward_hooks))
    h = apply_dfsattn(model, cfg(schedule=sched(skip_steps=0, gamma0=0.3), permute_once=True))
    changed = run(model, inputs)
    assert not torch.allclose(changed, before, atol=1e-4)  # a real budget changes the output
    h.remove()
    h.remove()  # idempotent
    after = run(model, inputs)
    assert torch.equal(after, before)
    assert all(m.processor is procs[n] for n, m in model.named_modules() if hasattr(m, "processor"))
    assert (len(model._forward_pre_hooks), len(model._forward_hooks)) == hooks


@pytest.mark.parametrize("arch", ARCHS)
def test_permute_once_matches_per_call_at_real_budget(models, arch):
    model, inputs = models[arch], make_inputs(arch)
    outs = []
    for once in (False, True):
        with apply_dfsattn(model, cfg(schedule=sched(skip_steps=0, gamma0=0.3), permute_once=once)) as h:
            outs.append(run(model, inputs))
            masks = {k: e.mask.to_dense() for k, e in h.state.masks.items()}
        outs.append(masks)
    torch.testing.assert_close(outs[2], outs[0], atol=ATOL, rtol=0)
    assert outs[1].keys() == outs[3].keys()
    assert all(torch.equal(outs[1][k], outs[3][k]) for k in outs[1])


def test_recall_matches_brute_force(models):
    """Layer 1 of Wan (layer 0 dense) sees the dense model's q, k; brute-force recall from softmax(QK^T)."""
    model, inputs = models["wan"], make_inputs("wan")
    records = []
    layers = {"blocks.1.attn1": 1}
    with AttentionCapture(model, layers, records.append):
        run(model, inputs)
    q, k = records[0].q.double(), records[0].k.double()
    config = cfg(schedule=sched(skip_steps=0, gamma0=0.25, dense_layers=(0,)), measure_recall=True)
    with apply_dfsattn(model, config) as h:
        run(model, inputs)
    (rec,) = h.state.records
    mask = h.state.masks[(1, 0, 192)].mask
    order = make_order("hilbert3d", LatentGrid(3, 8, 8))
    qo, ko = order.apply(q), order.apply(k)
    attn = torch.softmax(qo @ ko.transpose(-1, -2) / 32**0.5, dim=-1)  # [1, 2, 192, 192]
    keep = mask.to_dense().repeat_interleave(16, 2).repeat_interleave(16, 3)
    brute = (attn * keep).sum(-1).mean(-1)  # [1, 2]
    assert mask.kv_num_blocks.unique().tolist() == [3]  # k = int(0.25 * 12)
    torch.testing.assert_close(rec["recall"], brute, atol=1e-5, rtol=0)
    assert bool((brute < 0.999).all()) and bool((brute > 0.25).all())
    mass = attn.reshape(1, 2, 12, 16, 12, 16).sum(-1).mean(3)  # m_uv [1, 2, 12, 12]
    oracle = mass.topk(3, dim=-1).values.sum(-1).mean(-1)
    torch.testing.assert_close(rec["oracle_recall"], oracle, atol=1e-5, rtol=0)
    assert bool((rec["recall"] <= rec["oracle_recall"] + 1e-9).all())


def test_schedule_refreshes_and_reuse(models):
    """num_steps 7, skip 1, interval 2, gamma0 0.5, decrement 0.25: r_max = 1, so refreshes at steps 1
    and 3 only (gamma 0.5 then 0.25), steps 5-6 keep the step-3 mask; layer 0 always dense."""
    model, inputs = models["wan"], make_inputs("wan")
    s = DFSSchedule(num_steps=7, skip_steps=1, interval=2, gamma0=0.5, decrement=0.25, dense_layers=(0,))
    dense = run(model, inputs)
    layer0 = model.blocks[0].attn1.processor
    with apply_dfsattn(model, cfg(schedule=s)) as h:
        assert model.blocks[0].attn1.processor is layer0  # dense layer untouched
        outs, entries = [], []
        for step in range(7):
            before = h.state.scorer_calls
            outs.append(run(model, inputs))
            entries.append((h.state.scorer_calls - before, h.state.masks.get((1, 0, 192))))
    assert [n for n, _ in entries] == [0, 1, 0, 1, 0, 0, 0]
    assert entries[2][1] is entries[1][1] and entries[4][1] is entries[3][1] is entries[6][1]
    assert entries[1][1] is not entries[3][1]
    assert [r["step"] for r in h.state.records] == [1, 2, 3, 4, 5, 6]
    assert [r["refresh"] for r in h.state.records] == [True, False, True, False, False, False]
    assert [entries[i][1].mask.kv_num_blocks.unique().tolist() for i in (1, 3)] == [[6], [3]]
    assert torch.equal(outs[0], dense)  # the warm-up step is the stock processor, bit for bit


def test_explicit_step_and_wrap(models):
    model, inputs = models["wan"], make_inputs("wan")
    s = DFSSchedule(num_steps=3, skip_steps=1, interval=1, gamma0=0.5, decrement=0.0, dense_layers=())
    with apply_dfsattn(model, cfg(schedule=s)) as h:
        h.state.set_step(2)  # start mid-run: no mask cached yet, so one is computed
        run(model, inputs)
        assert h.state.scorer_calls == 2 and h.state.records[0]["step"] == 2
        h.state.set_step(0)
        run(model, inputs)
        assert h.state.scorer_calls == 2 and len(h.state.records) == 2  # dense step: no records
        h.state.reset()
        for _ in range(4):  # call counting wraps after 3 calls: call 3 is step 0 of a new video
            run(model, inputs)
        assert [r["step"] for r in h.state.records] == [1, 1, 2, 2]
        assert not h.state.masks  # the wrap dropped the cache; step 0 is dense


def test_counted_calls_past_the_schedule_are_refused(models):
    """At the wrap, a call whose timestep starts over is a new video; one that moves on the way the
    video's timesteps moved is a step past the schedule (either way of counting timesteps)."""
    model = models["wan"]
    s = DFSSchedule(num_steps=3, skip_steps=1, interval=1, gamma0=0.5, decrement=0.0, dense_layers=())

    def at(t: float) -> dict:
        return {**make_inputs("wan"), "timestep": torch.tensor([t])}

    for video, past in (((900.0, 600.0, 300.0), 100.0), ((0.0, 300.0, 600.0), 900.0)):
        with apply_dfsattn(model, cfg(schedule=s)) as h:
            for t in video + video:  # two videos: the second starts over at the wrap
                run(model, at(t))
            assert [r["step"] for r in h.state.records if r["layer"] == 0] == [1, 2, 1, 2]
            with pytest.raises(ValueError, match=rf"the pipeline runs more transformer calls than the DFSAttn schedule "
                                                 rf"counts for one video \(num_steps 3 x calls_per_step 1\): call 6 "
                                                 rf"continues the video's timesteps \({past:g} after {video[-1]:g}\) "
                                                 rf"where a new video would start over; pass num_inference_steps=3"):
                run(model, at(past))
            assert h.state.calls == 6  # the refused call counts nothing
            h.state.use_call_count()  # forgets the timesteps seen: the next call is taken as a new video
            records = len(h.state.records)
            run(model, at(past))
            assert h.state.calls == 7 and len(h.state.records) == records  # step 0 of a new video: dense


def test_counted_calls_start_over_with_a_new_video(models, caplog):
    """A call whose timestep starts over before the wrap is a new video (the last one ran fewer steps):
    counted from step 0, its cache dropped."""
    model = models["wan"]
    s = DFSSchedule(num_steps=3, skip_steps=1, interval=2, gamma0=0.5, decrement=0.0, dense_layers=())
    with apply_dfsattn(model, cfg(schedule=s)) as h:
        for t in (900.0, 600.0):  # two of the three steps
            run(model, {**make_inputs("wan"), "timestep": torch.tensor([t])})
        assert h.state.masks
        with caplog.at_level(logging.WARNING, logger="dfsviz.accel.state"):
            run(model, {**make_inputs("wan"), "timestep": torch.tensor([900.0])})
        assert ("transformer call 2 starts the timesteps over (900 after 600) after 2 of the 3 calls the schedule "
                "counts for one video (num_steps 3 x calls_per_step 1)") in caplog.text
        assert not h.state.masks and len(h.state.records) == 2  # step 0: dense, the cache dropped
        for t in (600.0, 300.0):
            run(model, {**make_inputs("wan"), "timestep": torch.tensor([t])})
        assert [(r["step"], r["refresh"]) for r in h.state.records if r["layer"] == 0] == [
            (1, True), (1, True), (2, False)]


def test_cfg_share_batch_equals_separate_calls_share(models):
    """A CFG batch [cond, uncond] under "share" equals two calls (cond, then uncond) of one step."""
    model = models["wan"]
    b2 = make_inputs("wan", batch=2, seed=3)
    one = [{**b2, "hidden_states": b2["hidden_states"][i:i + 1], "timestep": b2["timestep"][i:i + 1],
            "encoder_hidden_states": b2["encoder_hidden_states"][i:i + 1]} for i in range(2)]
    s = sched(skip_steps=0, gamma0=0.3)
    with apply_dfsattn(model, cfg(schedule=s)) as h:
        batched = run(model, b2)
        assert h.state.scorer_calls == 2 and h.state.masks[(0, 0, 192)].mask.shape[0] == 1
    with apply_dfsattn(model, cfg(schedule=s)) as h:
        h.state.set_step(0)
        split = torch.cat([run(model, one[0]), run(model, one[1])])
        assert h.state.scorer_calls == 2
        assert [r["refresh"] for r in h.state.records] == [True, True, False, False]
    torch.testing.assert_close(batched, split, atol=ATOL, rtol=0)


def test_cfg_separate_scores_each_branch(models):
    model = models["wan"]
    b2 = make_inputs("wan", batch=2, seed=3)
    s = sched(skip_steps=0, gamma0=0.3)
    with apply_dfsattn(model, cfg(schedule=s, cfg="separate")) as h:
        sep = run(model, b2)
        mask = h.state.masks[(0, 0, 192)].mask
        assert h.state.scorer_calls == 2 and mask.shape[0] == 2
        assert not torch.equal(mask.to_dense()[0], mask.to_dense()[1])  # different inputs, different masks
    with apply_dfsattn(model, cfg(schedule=s, cfg="share", cond_index=1)) as h:
        shared = run(model, b2)
        assert torch.equal(h.state.masks[(0, 0, 192)].mask.to_dense()[0], mask.to_dense()[1])
    # cond_index=1 scores the second half: that half matches "separate", the first does not
    torch.testing.assert_close(shared[1], sep[1], atol=ATOL, rtol=0)
    assert not torch.allclose(shared[0], sep[0], atol=1e-4)
    with apply_dfsattn(model, cfg(schedule=s, cfg="separate")) as h:
        h.state.set_step(0)
        run(model, {**b2, **{k: b2[k][:1] for k in ("hidden_states", "timestep", "encoder_hidden_states")}})
        run(model, {**b2, **{k: b2[k][1:] for k in ("hidden_states", "timestep", "encoder_hidden_states")}})
        assert h.state.scorer_calls == 4 and set(h.state.masks) == {(0, 0, 192), (0, 1, 192), (1, 0, 192), (1, 1, 192)}


@pytest.mark.parametrize("once", [False, True], ids=["per_call", "permute_once"])
def test_hunyuanvideo_text_blocks(models, once):
    """192 video + 8 text (6 real): the kernel sees 198 tokens = 13 blocks of 16; blocks >= 192 // 16 = 12
    are forced keys and dense rows."""
    model, inputs = models["hunyuanvideo"], make_inputs("hunyuanvideo", valid_text=6)
    with apply_dfsattn(model, cfg(schedule=sched(skip_steps=0, gamma0=0.25), permute_once=once)) as h:
        run(model, inputs)
    assert set(h.state.masks) == {(0, 0, 198), (1, 0, 198)}
    for entry in h.state.masks.values():
        dense = entry.mask.to_dense()[0]  # [H, 13, 13]
        assert bool(dense[:, :, 12].all()) and bool(dense[:, 12, :].all())
        assert dense[:, :12].sum(-1).unique().tolist() == [3]  # k = int(0.25 * 13) = 3, text inside it


def test_hunyuanvideo_padding_rows_match_dense(models):
    """At full budget the padded text rows (dense SDPA on real keys) reproduce the stock output."""
    model, inputs = models["hunyuanvideo"], make_inputs("hunyuanvideo", valid_text=3)
    dense = run(model, inputs)
    with apply_dfsattn(model, cfg(schedule=sched(skip_steps=0))):
        sparse = run(model, inputs)
    torch.testing.assert_close(sparse, dense, atol=ATOL, rtol=0)


def test_cogvideox_text_first(models):
    """8 text then 192 video tokens = 200 tokens, 13 blocks of 16; block 0 (8 text + 8 video) is forced."""
    model, inputs = models["cogvideox"], make_inputs("cogvideox")
    with apply_dfsattn(model, cfg(schedule=sched(skip_steps=0, gamma0=0.25))) as h:
        run(model, inputs)
    assert set(h.state.masks) == {(0, 0, 200), (1, 0, 200)}
    for entry in h.state.masks.values():
        dense = entry.mask.to_dense()[0]
        assert bool(dense[:, :, 0].all()) and bool(dense[:, 0, :].all())
        assert dense[:, 1:].sum(-1).unique().tolist() == [3]


def test_text_blocks_rule():
    assert text_blocks(LatentGrid(3, 8, 8), 192, 16) == []
    assert text_blocks(LatentGrid(3, 8, 8, text_len=70), 262, 16) == [12, 13, 14, 15, 16]
    assert text_blocks(LatentGrid(33, 45, 80, text_len=256), 119056, 128) == [928, 929, 930]  # paper.md 3.4
    assert text_blocks(LatentGrid(3, 8, 8, text_len=20, text_first=True), 212, 16) == [0, 1]


def test_pipeline_object_is_accepted(models):
    class Pipe:
        transformer = models["wan"]

    with apply_dfsattn(Pipe(), cfg()) as h:
        assert h.transformer is models["wan"] and h.sparse_layers == ["blocks.0.attn1", "blocks.1.attn1"]


# ------------------------------------------------------------------------ errors
def test_error_apply_twice(models):
    with apply_dfsattn(models["wan"], cfg()):
        with pytest.raises(ValueError, match=r"DFSAttn is already applied to WanTransformer3DModel"):
            apply_dfsattn(models["wan"], cfg())


def test_error_foreign_processor():
    from diffusers.models.attention_processor import AttnProcessor

    model = build_tiny("cogvideox")
    model.transformer_blocks[0].attn1.processor = AttnProcessor()
    with pytest.raises(ValueError, match=r"has processor AttnProcessor; DFSAttn replaces only \['CogVideoXAttnProcessor2_0'\]"):
        apply_dfsattn(model, cfg())


def test_error_dense_layers_out_of_range(models):
    with pytest.raises(ValueError, match=r"`schedule.dense_layers` \[0, 5\] has indices \[5\] >= the 2 self-attention"):
        apply_dfsattn(models["wan"], cfg(schedule=sched(dense_layers=(0, 5))))


def test_error_types(models):
    with pytest.raises(TypeError, match=r"`config` must be a DFSConfig or the path of a calibrated config file \(got dict\)"):
        apply_dfsattn(models["wan"], {"block": 16})
    with pytest.raises(TypeError, match=r"`pipe_or_transformer` must be a diffusers video transformer .*got int"):
        apply_dfsattn(3, cfg())
    with pytest.raises(TypeError, match=r"`handle` must be the DFSHandle apply_dfsattn returned \(got str\)"):
        remove_dfsattn("handle")
    with pytest.raises(TypeError, match=r"`schedule` must be a DFSSchedule \(got NoneType\)"):
        DFSState(None)


def test_error_unsupported_architecture():
    import diffusers

    from tiny_models import WAN

    model = diffusers.HeliosTransformer3DModel(**{k: v for k, v in WAN.items() if k != "rope_max_seq_len"},
                                               rope_dim=(8, 12, 12))
    with pytest.raises(ValueError, match=r"unsupported architecture HeliosTransformer3DModel: denoises chunk by chunk"):
        apply_dfsattn(model, cfg())
    with pytest.raises(TypeError, match=r"`pipe_or_transformer` must be a diffusers video transformer or a pipeline"):
        apply_dfsattn(object(), cfg())


def test_error_set_step(models):
    with apply_dfsattn(models["wan"], cfg()) as h:
        with pytest.raises(ValueError, match=r"`step` must be an integer in \[0, num_steps = 4\) \(got 4\)"):
            h.state.set_step(4)


def test_error_permute_once_token_replace():
    model = build_tiny("hunyuanvideo", image_condition_type="token_replace")
    with pytest.raises(ValueError, match=r"permute_once is not valid for HunyuanVideoTransformer3DModel with "
                                         r"image_condition_type='token_replace'"):
        apply_dfsattn(model, cfg(permute_once=True))
    apply_dfsattn(model, cfg(permute_once=False)).remove()  # per-call mode is fine


def test_error_latent_not_5d(models):
    with apply_dfsattn(models["wan"], cfg()):
        with pytest.raises(ValueError, match=r"called without a 5-D `hidden_states` latent \(got Tensor\)"):
            models["wan"](torch.zeros(1, 4, 16, 16), torch.tensor([1]), torch.zeros(1, 8, 16))


def test_error_mixed_text_lengths(models):
    model = models["hunyuanvideo"]
    inputs = make_inputs("hunyuanvideo", batch=2)
    inputs["encoder_attention_mask"][1, 5:] = 0
    with apply_dfsattn(model, cfg(schedule=sched(skip_steps=0))):
        with pytest.raises(ValueError, match=r"key mask must keep one common prefix .* \(got real lengths \[198, 197\]\)"):
            run(model, inputs)


def test_error_wan_attention_mask(models):
    model = models["wan"]
    with apply_dfsattn(model, cfg(schedule=sched(skip_steps=0))) as h:
        state = h.state
        state._begin(LatentGrid(3, 8, 8))
        attn = model.blocks[1].attn1
        with pytest.raises(ValueError, match=r"DFSAttn layer 1: this architecture's self-attention got an `attention_mask`"):
            attn.processor(attn, torch.zeros(1, 192, 64), None, torch.ones(1, 1, 192, 192, dtype=torch.bool), None)


def test_error_restore_skipped(models):
    model = models["wan"]
    with apply_dfsattn(model, cfg(permute_once=True)):
        norm_out = model.norm_out
        model.norm_out = torch.nn.LayerNorm(64, elementwise_affine=False, eps=1e-6)  # a module the hook is not on
        try:
            run(model, make_inputs("wan"))  # step 0 is dense: nothing is permuted, nothing to restore
            with pytest.raises(RuntimeError, match=r"token order was not restored before WanTransformer3DModel returned"):
                run(model, make_inputs("wan"))
        finally:
            model.norm_out = norm_out


def test_step_callback_drives_explicit_steps(models):
    """Two calls per step (cond, uncond) with calls_per_step=1: the callback keeps both in one step."""
    model, inputs = models["wan"], make_inputs("wan")
    s = DFSSchedule(num_steps=3, skip_steps=1, interval=1, gamma0=0.5, decrement=0.0, dense_layers=())
    with apply_dfsattn(model, cfg(schedule=s)) as h:
        h.state.set_step(0)
        for i in range(3):
            run(model, inputs)
            run(model, inputs)
            assert h.step_callback(None, i, None, {"latents": 1}) == {"latents": 1}
        assert h.state.step == 2  # the last step does not advance past num_steps
        # a pipeline that runs more steps than the schedule: stopped at the first one past it
        with pytest.raises(ValueError, match=r"the pipeline runs more steps than the DFSAttn schedule's num_steps = 3 "
                                             r"\(step 3 ended\): pass num_inference_steps=3"):
            h.step_callback(None, 3, None, {})
    assert [(r["step"], r["branch"], r["refresh"]) for r in h.state.records if r["layer"] == 0] == [
        (1, 0, True), (1, 1, False), (2, 0, True), (2, 1, False)]


def test_error_key_masks(models):
    model = models["hunyuanvideo"]
    with apply_dfsattn(model, cfg(schedule=sched(skip_steps=0))) as h:
        proc = model.transformer_blocks[0].attn.processor
        q = torch.zeros(1, 2, 200, 32)
        h.state._begin(LatentGrid(3, 8, 8, text_len=8))
        with pytest.raises(ValueError, match=r"DFSAttn layer 0: `attention_mask` must be a boolean key mask \[B, 1, 1, 200\]"):
            proc.attend(q, q, q, h.state.current, torch.ones(1, 1, 1, 200))
        short = torch.zeros(1, 1, 1, 200, dtype=torch.bool)
        short[..., :150] = True
        with pytest.raises(ValueError, match=r"the key mask drops video tokens \(real length 150 < 192 video tokens\)"):
            proc.attend(q, q, q, h.state.current, short)


def test_error_dense_step_has_no_mask():
    with pytest.raises(ValueError, match=r"step 0 is dense under dfs_n4_s1_i1_g1.00_d0.00_c1_Lnone; no mask serves it"):
        DFSState(sched()).epoch(0)


def test_error_registry_entry_problems(models, monkeypatch):
    import dataclasses

    from dfsviz import architectures

    by_class = architectures._BY_CLASS
    cog, wan = by_class["CogVideoXTransformer3DModel"], by_class["WanTransformer3DModel"]
    monkeypatch.setitem(by_class, "CogVideoXTransformer3DModel", dataclasses.replace(cog, dfsattn="its blocks say no"))
    with pytest.raises(ValueError, match=r"DFSAttn does not run in CogVideoXTransformer3DModel: its blocks say no"):
        apply_dfsattn(models["cogvideox"], cfg())
    monkeypatch.setitem(by_class, "WanTransformer3DModel", dataclasses.replace(wan, restore="head"))
    with pytest.raises(ValueError, match=r"permute_once needs the module 'head' after the block stack of WanTransformer3DModel"):
        apply_dfsattn(models["wan"], cfg(permute_once=True))
    monkeypatch.setitem(by_class, "WanTransformer3DModel", dataclasses.replace(wan, permute_once="its convs mix tokens"))
    with pytest.raises(ValueError, match=r"permute_once for WanTransformer3DModel: its convs mix tokens"):
        apply_dfsattn(models["wan"], cfg(permute_once=True))
    monkeypatch.setitem(by_class, "WanTransformer3DModel", dataclasses.replace(wan, blocks=("layers",)))
    with pytest.raises(ValueError, match=r"WanTransformer3DModel has no transformer blocks in \('layers',\)"):
        apply_dfsattn(models["wan"], cfg(permute_once=True))
    assert all(type(m.processor).__name__ == "WanAttnProcessor" for n, m in models["wan"].named_modules()
               if n.endswith("attn1"))  # a refused apply leaves the model untouched

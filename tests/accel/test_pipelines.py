"""apply_dfsattn on a whole pipeline: Wan 2.2 A14B's two transformers (high-noise `transformer`
above the boundary timestep, `transformer_2` below) under one handle, in a tiny real WanPipeline:
both accelerated, one step count over the run, a mask cache that the switch does not mix up,
remove() restoring both."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import diffusers
import pytest
import torch

from dfsviz.accel import DFSConfig, apply_dfsattn
from dfsviz.sparse.schedule import DFSSchedule

from tiny_models import build_tiny, wan_pipeline

pytest.importorskip("diffusers")

STEPS = 6
BOUNDARY = 0.875  # Wan2.2-T2V-A14B's boundary_ratio (model_index.json); expand_timesteps False


def _embeds(seed: int) -> torch.Tensor:
    return torch.randn(1, 6, 16, generator=torch.Generator().manual_seed(seed))


# 9 frames of 64 x 64 pixels: latent 3 x 8 x 8, tokens 3 x 4 x 4 = 48 (3 blocks of 16); CFG as two calls per step
CALL = dict(prompt_embeds=_embeds(10), negative_prompt_embeds=_embeds(11), height=64, width=64, num_frames=9,
            num_inference_steps=STEPS, guidance_scale=4.0, output_type="latent")


@pytest.fixture(scope="module")
def pipe():
    return wan_pipeline(build_tiny("wan", seed=0), build_tiny("wan", seed=1), boundary_ratio=BOUNDARY)


def generate(pipe) -> torch.Tensor:
    with torch.no_grad():
        return pipe(generator=torch.Generator().manual_seed(1), **CALL).frames


def config(gamma: float, **kwargs) -> DFSConfig:
    schedule = DFSSchedule(num_steps=STEPS, skip_steps=1, interval=3, gamma0=gamma, decrement=0.0, dense_layers=(),
                           calls_per_step=2)
    return DFSConfig(block=16, tile=4, schedule=schedule, **kwargs)


def processors(pipe) -> dict:
    return {(t, n): m.processor for t in ("transformer", "transformer_2")
            for n, m in getattr(pipe, t).named_modules() if hasattr(m, "processor")}


def expert_of_step(pipe) -> list[int]:
    """Which transformer diffusers' WanPipeline runs at each step: 0 at t >= boundary, else 1."""
    pipe.scheduler.set_timesteps(STEPS)
    boundary = pipe.config.boundary_ratio * pipe.scheduler.config.num_train_timesteps
    return [0 if t >= boundary else 1 for t in pipe.scheduler.timesteps.tolist()]


@pytest.mark.parametrize("once", [False, True], ids=["per_call", "permute_once"])
def test_both_transformers_at_full_budget_equal_dense_and_remove_restores_both(pipe, once):
    before = processors(pipe)
    dense = generate(pipe)
    with apply_dfsattn(pipe, config(1.0, permute_once=once)) as handle:
        assert handle.transformer is pipe.transformer and handle.transformer_2.transformer is pipe.transformer_2
        assert handle.transformer_2.state is handle.state
        for t in (pipe.transformer, pipe.transformer_2):
            assert all(type(b.attn1.processor).__name__ == "WanDFSProcessor" for b in t.blocks)
        sparse = generate(pipe)
    records = handle.state.records
    assert {(r["step"], r["transformer"]) for r in records} == {(s, e) for s, e in enumerate(expert_of_step(pipe))
                                                                if s >= 1}
    assert all(r["density"] == 1.0 for r in records)
    torch.testing.assert_close(sparse, dense, atol=2e-5, rtol=0)
    assert processors(pipe) == before and all(processors(pipe)[k] is before[k] for k in before)
    assert torch.equal(generate(pipe), dense)


def test_steps_and_mask_cache_across_the_switch(pipe):
    """Refreshes at steps 1 and 4 (interval 3); the switch to transformer_2 comes at step 2, whose
    first call scores transformer_2's own masks (transformer's do not serve other weights)."""
    experts = expert_of_step(pipe)
    assert experts == [0, 0, 1, 1, 1, 1]  # the boundary falls between steps 1 and 2
    dense = generate(pipe)
    with apply_dfsattn(pipe, config(0.5)) as handle:
        sparse = generate(pipe)
        assert handle.state.calls == 2 * STEPS  # cond and uncond of every step, across both transformers
    rows = sorted({(r["step"], r["branch"], r["transformer"], r["refresh"]) for r in handle.state.records})
    assert rows == [(1, 0, 0, True), (1, 1, 0, False), (2, 0, 1, True), (2, 1, 1, False), (3, 0, 1, False),
                    (3, 1, 1, False), (4, 0, 1, True), (4, 1, 1, False), (5, 0, 1, False), (5, 1, 1, False)]
    assert handle.state.scorer_calls == 3 * 2  # three scorings of each of the 2 layers
    assert not torch.allclose(sparse, dense, atol=1e-4)  # a real budget


def test_a_pipeline_past_the_counted_schedule_is_stopped(pipe):
    """Counted calls: two videos in a row run, each from the wrap; a call past the schedule's steps
    (or a CFG pipeline counted as one call per step) is refused at the first such call."""
    with apply_dfsattn(pipe, config(0.5)) as handle:
        generate(pipe)
        generate(pipe)
        assert handle.state.calls == 4 * STEPS and handle.state.scorer_calls == 2 * 3 * 2
        with pytest.raises(ValueError, match=rf"schedule counts for one video \(num_steps {STEPS} x calls_per_step "
                                             rf"2\): call {6 * STEPS} continues the video's timesteps"):
            with torch.no_grad():
                pipe(generator=torch.Generator().manual_seed(1), **{**CALL, "num_inference_steps": STEPS + 1})
    schedule = DFSSchedule(num_steps=STEPS, skip_steps=1, interval=3, gamma0=0.5, decrement=0.0, dense_layers=())
    with apply_dfsattn(pipe, DFSConfig(block=16, tile=4, schedule=schedule)):  # calls_per_step 1: CFG's 2 calls
        with pytest.raises(ValueError, match=rf"\(num_steps {STEPS} x calls_per_step 1\): call {STEPS} continues"):
            generate(pipe)


def test_a_video_after_a_shorter_one_counts_from_step_0(pipe, caplog):
    """Counted calls: a pipeline that ran fewer steps than the schedule leaves the counter mid-video;
    the next video's first call starts the timesteps over, so it counts from step 0 with the cache
    dropped, and runs exactly as under a fresh handle."""
    with apply_dfsattn(pipe, config(0.5)):
        fresh = generate(pipe)
    with apply_dfsattn(pipe, config(0.5)) as handle:
        with torch.no_grad():
            pipe(generator=torch.Generator().manual_seed(1), **{**CALL, "num_inference_steps": STEPS - 2})
        with caplog.at_level(logging.WARNING, logger="dfsviz.accel.state"):
            again = generate(pipe)
    calls = 2 * (STEPS - 2)
    assert f"transformer call {calls} starts the timesteps over" in caplog.text
    assert f"after {calls} of the {2 * STEPS} calls the schedule counts for one video" in caplog.text
    assert torch.equal(again, fresh)


def test_a_pipeline_of_two_families_is_refused():
    pipe = SimpleNamespace(transformer=build_tiny("wan"), transformer_2=build_tiny("cogvideox"))
    with pytest.raises(ValueError, match=r"SimpleNamespace.transformer_2 is a CogVideoXTransformer3DModel "
                                         r"\(CogVideoX 1.0 / 1.5\); a Wan 2.1 / 2.2, SkyReels-V2, ChronoEdit pipeline "
                                         r"holds its transformers in \['transformer', 'transformer_2'\]"):
        apply_dfsattn(pipe, config(1.0))
    with pytest.raises(TypeError, match=r"`pipe_or_transformer` must be a diffusers video transformer or a pipeline "
                                        r"with a `.transformer` or `.transformer_2` \(got SimpleNamespace\)"):
        apply_dfsattn(SimpleNamespace(transformer=None), config(1.0))


def test_a_refused_transformer_2_leaves_both_untouched(pipe):
    before = processors(pipe)
    # as diffusers' enable_parallelism records it
    pipe.transformer_2._parallel_config = diffusers.ParallelConfig(
        context_parallel_config=diffusers.ContextParallelConfig(ring_degree=2))
    try:
        with pytest.raises(ValueError, match=r"DFSAttn under ring attention \(WanTransformer3DModel, ring_degree=2\)"):
            apply_dfsattn(pipe, config(1.0))
    finally:
        del pipe.transformer_2._parallel_config
    assert all(processors(pipe)[k] is before[k] for k in before)

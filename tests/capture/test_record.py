"""dfsviz.record around real diffusers pipelines built from tiny random-weight components (a tiny
VAE, a tiny transformer, the scheduler; prompt embeddings passed in place of a text encoder):
the recorded file validates and equals a `dfsviz capture` of the same run map for map, the
pipeline's output is bit-identical with and without recording, the decoded clip is stored, an
interrupted recording keeps its completed steps and resumes, and bad input stops with one line
before anything is written."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch

import dfsviz
from dfsviz.capture import CaptureConfig, Conditioning, ModelSource, get_adapter, run_capture
from dfsviz.capture.file_safety import CaptureLock
from stored_curves import assert_stored_curves_match_the_maps
from tiny_models import build_tiny
from wan_loop import dfsattn_config, wan_loop

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers", reason="the pipelines need the `pipelines` extra (transformers)")

STEPS = 3
SETTINGS = dict(block=16, footprints=2, seed=1)


def _embeds(seed, text_len=6, dim=16):
    return torch.randn(1, text_len, dim, generator=torch.Generator().manual_seed(seed))


def wan_pipeline(transformer=None, in_channels=4):
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                     temperal_downsample=[False, True, True], latents_mean=[0.0] * 4,
                                     latents_std=[1.0] * 4).eval()
    transformer = transformer or build_tiny("wan", in_channels=in_channels)
    return diffusers.WanPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                                 scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0))


# 9 frames of 64 x 64 pixels: latent 3 x 8 x 8, token grid 3 x 4 x 4 (48 tokens, 3 blocks of 16)
WAN_CALL = dict(prompt_embeds=_embeds(10), negative_prompt_embeds=_embeds(11), height=64, width=64, num_frames=9,
                num_inference_steps=STEPS, guidance_scale=4.0, output_type="np")


def _maps(path):
    """Every dataset of every completed step, and the clip, as numpy arrays."""
    out = {}
    with h5py.File(path, "r") as f:
        for step, group in f["steps"].items():
            for name, dset in group.items():
                out[f"{step}/{name}"] = dset[...]
    return out


def _assert_same_maps(recorded, captured, exact=True):
    a, b = _maps(recorded), _maps(captured)
    assert sorted(a) == sorted(b)
    for key in a:
        if exact or a[key].dtype.kind not in "f":
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        else:
            np.testing.assert_allclose(a[key], b[key], rtol=1e-3, atol=1e-4, err_msg=key)


def test_recorded_wan_call_equals_a_capture_of_the_same_run(tmp_path):
    pipe = wan_pipeline()
    plain = pipe(generator=torch.Generator().manual_seed(1), **WAN_CALL).frames
    out = tmp_path / "recorded.h5"
    with dfsviz.record(pipe, out, capture_steps=(0, 1, 2), branches="both", **SETTINGS) as rec:
        recorded = pipe(generator=torch.Generator().manual_seed(1), **WAN_CALL).frames
    np.testing.assert_array_equal(recorded, plain)  # the output is untouched, bit for bit
    assert type(pipe) is diffusers.WanPipeline and "step" not in vars(pipe.scheduler)  # restored
    assert rec.result.steps == [0, 1, 2] and rec.result.complete

    # the same run through dfsviz's own loop: the same transformer, scheduler, embeddings and seed; every
    # step equal, so the loop denoises as the pipeline does (its schedule, CFG and latents)
    source = ModelSource(pipe.transformer, get_adapter("wan"), diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
                         "tiny-wan", cond=Conditioning(WAN_CALL["prompt_embeds"]),
                         uncond=Conditioning(WAN_CALL["negative_prompt_embeds"]))
    captured = tmp_path / "captured.h5"
    run_capture(CaptureConfig(out=str(captured), latent="3x8x8", num_steps=STEPS, capture_steps=(0, 1, 2),
                              guidance_scale=4.0, branches="both", device="cpu", **SETTINGS), progress=False, source=source)
    _assert_same_maps(out, captured)
    with dfsviz.open(out) as run, dfsviz.open(captured) as cap:  # the same schedule, run by the same transformer
        for step in (0, 1, 2):
            assert run.step_attrs(step)["timestep"] == cap.step_attrs(step)["timestep"]
            assert run.step_attrs(step)["sigma"] == cap.step_attrs(step)["sigma"]
            assert run.step_attrs(step)["transformer"] == cap.step_attrs(step)["transformer"] == "transformer"

    with dfsviz.open(out) as run:
        assert run.validate() == [] and run.complete and run.branches == ["cond", "uncond"]
        assert_stored_curves_match_the_maps(run)  # both branches; the capture's are equal (_assert_same_maps)
        assert run.grid.name == "f3h4w4"
        attrs = run.attrs
        assert attrs["pipeline_class"] == "WanPipeline" and int(attrs["num_steps"]) == STEPS
        assert float(attrs["guidance_scale"]) == 4.0 and attrs["latent"] == "3x8x8" and attrs["conditioning"] == "text"
        assert attrs["scheduler"] == "FlowMatchEulerDiscreteScheduler"
        call = run.attrs["pipeline_call"]
        assert '"num_frames": 9' in call and '"height": 64' in call
        video = run.video()
    # the decoded clip, as the pipeline returned it ([0, 1] floats) in uint8
    np.testing.assert_allclose(video.frames.astype(float), plain[0] * 255, atol=1.0)
    np.testing.assert_array_equal(video.latent_frame, [0, 1, 1, 1, 1, 2, 2, 2, 2])  # causal VAE, temporal factor 4
    assert video.fps == 16.0


def wan22_pipeline(transformer_2, **call_config):
    """Wan 2.2 A14B's layout: `transformer` denoises the high-noise steps (t >= boundary_ratio x 1000),
    `transformer_2` the others; A14B's configs keep expand_timesteps False (TI2V-5B sets it)."""
    pipe = wan_pipeline()
    return diffusers.WanPipeline(tokenizer=None, text_encoder=None, vae=pipe.vae, transformer=pipe.transformer,
                                 transformer_2=transformer_2, scheduler=pipe.scheduler, boundary_ratio=0.875,
                                 expand_timesteps=False)


def test_wan22_records_both_transformers_and_labels_each_step(tmp_path):
    import copy

    steps = (0, 1, 2)
    # 3 steps of FlowMatchEuler(shift 3): t = 1000, 750, 3; the boundary 0.875 x 1000 splits them 1 | 2
    pipe = wan22_pipeline(build_tiny("wan", seed=7))
    plain = pipe(generator=torch.Generator().manual_seed(1), **WAN_CALL).frames
    out = tmp_path / "a14b.h5"
    with dfsviz.record(pipe, out, capture_steps=steps, branches="both", **SETTINGS) as rec:
        recorded = pipe(generator=torch.Generator().manual_seed(1), **WAN_CALL).frames
    np.testing.assert_array_equal(recorded, plain)  # the output is untouched, bit for bit
    assert rec.result.steps == list(steps) and rec.result.complete
    boundary = 0.875 * pipe.scheduler.config.num_train_timesteps
    with dfsviz.open(out) as run:
        assert run.validate() == [] and run.complete and run.layers == [0, 1]
        ran = {s: run.step_attrs(s)["transformer"] for s in run.steps}
        assert ran == {0: "transformer", 1: "transformer_2", 2: "transformer_2"}
        for s in run.steps:  # each step is labelled with the side of the boundary its timestep lies on
            assert (run.step_attrs(s)["timestep"] >= boundary) == (ran[s] == "transformer")
        assert list(run.attrs["transformers"]) == ["transformer", "transformer_2"]
        assert float(run.attrs["boundary_ratio"]) == 0.875

    # transformer_2 = a copy of transformer: the run and its maps are those of one transformer (layer i
    # of transformer_2 stored as layer i), only the labels differ
    single = wan_pipeline()
    twin = wan22_pipeline(copy.deepcopy(single.transformer))
    twin_out, single_out = tmp_path / "twin.h5", tmp_path / "single.h5"
    for p, path in ((twin, twin_out), (single, single_out)):
        with dfsviz.record(p, path, capture_steps=steps, branches="both", **SETTINGS):
            p(generator=torch.Generator().manual_seed(1), **WAN_CALL)
    _assert_same_maps(twin_out, single_out)
    with dfsviz.open(single_out) as run:
        assert [run.step_attrs(s)["transformer"] for s in run.steps] == ["transformer"] * 3
        assert list(run.attrs["transformers"]) == ["transformer"] and "boundary_ratio" not in run.attrs
    # step 1 enters both A14B runs with the same latents (step 0 ran the same `transformer`): its maps
    # differ only because transformer_2's weights made them
    a14b, twin_maps = _maps(out), _maps(twin_out)
    np.testing.assert_array_equal(a14b["step_0000/m"], twin_maps["step_0000/m"])
    assert not np.array_equal(a14b["step_0001/m"], twin_maps["step_0001/m"])


def test_wan22_transformers_of_other_shapes_are_refused(tmp_path):
    pipe = wan22_pipeline(build_tiny("wan", seed=7, num_layers=3))
    with pytest.raises(ValueError, match=r"`pipe`'s transformer and transformer_2 differ \(2 and 3 self-attention layers, "
                                         r"2 and 2 heads of width 32 and 32\); dfsviz.record stores both"):
        dfsviz.record(pipe, tmp_path / "x.h5")
    assert not (tmp_path / "x.h5").exists()


def test_interrupted_recording_keeps_its_steps_and_resumes(tmp_path):
    pipe = wan_pipeline()
    full = tmp_path / "full.h5"
    with dfsviz.record(pipe, full, capture_steps=(0, 1, 2), **SETTINGS):
        pipe(generator=torch.Generator().manual_seed(1), **WAN_CALL)

    def stop_after_step_1(pipe, i, t, kwargs):
        if i == 1:
            raise KeyboardInterrupt
        return kwargs

    out = tmp_path / "cut.h5"
    with pytest.raises(KeyboardInterrupt):
        with dfsviz.record(pipe, out, capture_steps=(0, 1, 2), **SETTINGS):
            pipe(generator=torch.Generator().manual_seed(1), callback_on_step_end=stop_after_step_1, **WAN_CALL)
    assert type(pipe) is diffusers.WanPipeline  # restored
    with dfsviz.open(out) as run:
        assert run.steps == [0, 1] and not run.complete and run.video() is None and run.validate() == []

    with dfsviz.record(pipe, out, capture_steps=(0, 1, 2), resume=True, **SETTINGS) as rec:
        pipe(generator=torch.Generator().manual_seed(1), **WAN_CALL)
    assert rec.result.steps == [2] and rec.result.skipped == [0, 1] and rec.result.complete
    _assert_same_maps(out, full)  # the recall curves of the resumed step included
    with dfsviz.open(out) as run:
        assert_stored_curves_match_the_maps(run)

    # in the words of dfsviz.record's arguments, not dfsviz capture's flags
    with pytest.raises(ValueError, match=r"^resume=True: .* was captured with other settings \(differs in .*\); "
                                         r"resume with the same options or pass overwrite=True$"):
        with dfsviz.record(pipe, out, capture_steps=(0, 1, 2), resume=True, **SETTINGS):
            pipe(generator=torch.Generator().manual_seed(1), **{**WAN_CALL, "guidance_scale": 2.0})
    # embeddings of the same shape but other values, and another seed, are other runs too
    for changed, seed in (({"prompt_embeds": _embeds(12)}, 1), ({}, 2)):
        with pytest.raises(ValueError, match=r"resume=True: .* was captured with other settings .*pipeline_call"):
            with dfsviz.record(pipe, out, capture_steps=(0, 1, 2), resume=True, **SETTINGS):
                pipe(generator=torch.Generator().manual_seed(seed), **{**WAN_CALL, **changed})
    with dfsviz.open(out) as run:
        call = run.attrs["pipeline_call"]
        call = json.loads(call) if isinstance(call, str) else call
        assert call["generator"] == "Generator seed 1" and call["prompt_embeds"].startswith("tensor [1, 6, 16] float32 "
                                                                                            "sha256:")


def cogvideox_pipeline():
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKLCogVideoX(block_out_channels=(8, 8, 8, 8), latent_channels=4, layers_per_block=1,
                                           norm_num_groups=2, temporal_compression_ratio=4).eval()
    scheduler = diffusers.CogVideoXDDIMScheduler(timestep_spacing="trailing", prediction_type="v_prediction",
                                                 rescale_betas_zero_snr=True)
    return diffusers.CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=build_tiny("cogvideox"),
                                       scheduler=scheduler)


def test_cogvideox_batch_of_two_picks_the_conditional_half(tmp_path):
    """CogVideoX runs CFG as one batch [uncond, cond]: each half goes to its branch."""
    pipe = cogvideox_pipeline()
    transformer = pipe.transformer
    # 9 frames of 128 x 128 pixels: latent 3 x 16 x 16, token grid 3 x 8 x 8 after 8 text tokens
    call = dict(prompt_embeds=_embeds(20, 8), negative_prompt_embeds=_embeds(21, 8), height=128, width=128,
                num_frames=9, num_inference_steps=2, guidance_scale=5.0, output_type="np")
    plain = pipe(generator=torch.Generator().manual_seed(1), **call).frames
    out = tmp_path / "cog.h5"
    with dfsviz.record(pipe, out, capture_steps=(0, 1), branches="both", layers=(1,), **SETTINGS):
        recorded = pipe(generator=torch.Generator().manual_seed(1), **call).frames
    np.testing.assert_array_equal(recorded, plain)

    source = ModelSource(transformer, get_adapter("cogvideox"), diffusers.CogVideoXDDIMScheduler(**pipe.scheduler.config),
                         "tiny-cog", cond=Conditioning(call["prompt_embeds"]), uncond=Conditioning(call["negative_prompt_embeds"]))
    captured = tmp_path / "captured.h5"
    run_capture(CaptureConfig(out=str(captured), latent="3x16x16", num_steps=2, capture_steps=(0, 1), guidance_scale=5.0,
                              branches="both", layers=(1,), device="cpu", **SETTINGS), progress=False, source=source)
    # every step: the pipeline runs both branches in one batch, the capture one at a time: equal up to rounding
    _assert_same_maps(out, captured, exact=False)
    with dfsviz.open(out) as run:
        assert run.validate() == [] and run.grid.name == "f3h8w8T8"
        # the halves differ: the conditional one is not the unconditional one stored twice
        assert not torch.equal(run.block_mass(1, 1, "raster", branch="cond"), run.block_mass(1, 1, "raster", branch="uncond"))
        assert run.video().frames.shape == (9, 128, 128, 3)


def hunyuan_pipeline():
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKLHunyuanVideo(latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
                                              norm_num_groups=2, mid_block_add_attention=False).eval()
    return diffusers.HunyuanVideoPipeline(text_encoder=None, tokenizer=None, transformer=build_tiny("hunyuanvideo"),
                                          vae=vae, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=7.0),
                                          text_encoder_2=None, tokenizer_2=None)


def _hunyuan_text(seed, real=5):
    """Padded text as HunyuanVideo's encoders give it: 8 tokens, the first `real` of them real."""
    return Conditioning(_embeds(seed, 8), torch.tensor([[1] * real + [0] * (8 - real)]),
                        torch.randn(1, 8, generator=torch.Generator().manual_seed(seed + 1)))


def test_hunyuanvideo_capture_follows_the_pipeline_at_every_step(tmp_path):
    """HunyuanVideoPipeline hands the scheduler its own linear sigmas and sends guidance_scale x 1000
    as embedded guidance, with no unconditional pass: dfsviz capture's loop does the same, so every
    captured step equals the pipeline's."""
    pipe = hunyuan_pipeline()
    cond, negative = _hunyuan_text(30), _hunyuan_text(40, real=3)
    call = dict(prompt_embeds=cond.embeds, prompt_attention_mask=cond.mask, pooled_prompt_embeds=cond.pooled, height=64,
                width=64, num_frames=9, num_inference_steps=3, guidance_scale=6.0, output_type="np")
    plain = pipe(generator=torch.Generator().manual_seed(1), **call).frames
    out = tmp_path / "hunyuan.h5"
    with dfsviz.record(pipe, out, capture_steps=(0, 1, 2), **SETTINGS):
        recorded = pipe(generator=torch.Generator().manual_seed(1), **call).frames
    np.testing.assert_array_equal(recorded, plain)
    # the negative text is there, as in an embeddings file: the loop must not run it as CFG
    source = ModelSource(pipe.transformer, get_adapter("hunyuanvideo"), diffusers.FlowMatchEulerDiscreteScheduler(shift=7.0),
                         "tiny-hunyuan", cond=cond, uncond=negative)
    captured = tmp_path / "captured.h5"
    run_capture(CaptureConfig(out=str(captured), latent="3x8x8", num_steps=3, capture_steps=(0, 1, 2), guidance_scale=6.0,
                              device="cpu", **SETTINGS), progress=False, source=source)
    _assert_same_maps(out, captured)
    with dfsviz.open(out) as run, dfsviz.open(captured) as cap:
        assert run.validate() == [] and run.grid.name == "f3h4w4t5"  # 48 video tokens, then the 5 real text tokens
        # the pipeline's sigmas: linspace(1, 0, 4)[:-1] shifted by 7 (s' = 7s / (1 + 6s))
        linear = np.array([1.0, 2 / 3, 1 / 3])
        np.testing.assert_allclose([run.step_attrs(s)["sigma"] for s in (0, 1, 2)], 7 * linear / (1 + 6 * linear), rtol=1e-6)
        for s in (0, 1, 2):
            assert run.step_attrs(s)["sigma"] == cap.step_attrs(s)["sigma"]
            assert run.step_attrs(s)["timestep"] == cap.step_attrs(s)["timestep"]

    with pytest.raises(ValueError, match=r"`branches`='both' needs an unconditional pass; HunyuanVideoPipeline sends "
                                         r"guidance_scale as embedded guidance and runs none"):
        run_capture(CaptureConfig(out=str(tmp_path / "both.h5"), latent="3x8x8", num_steps=3, guidance_scale=6.0,
                                  branches="both", device="cpu", **SETTINGS), progress=False, source=source)
    assert not (tmp_path / "both.h5").exists()


def test_hunyuanvideo_true_cfg_is_recorded_as_two_branches(tmp_path):
    """HunyuanVideoPipeline runs an unconditional pass only for true_cfg_scale > 1 with a negative
    prompt (its guidance_scale is embedded): record takes the branches from that."""
    pipe = hunyuan_pipeline()
    cond, negative = _hunyuan_text(30), _hunyuan_text(40)  # equal real lengths: branches="both" needs them
    call = dict(prompt_embeds=cond.embeds, prompt_attention_mask=cond.mask, pooled_prompt_embeds=cond.pooled, height=64,
                width=64, num_frames=9, num_inference_steps=2, guidance_scale=1.0, output_type="np",
                negative_prompt_embeds=negative.embeds, negative_prompt_attention_mask=negative.mask,
                negative_pooled_prompt_embeds=negative.pooled)
    plain = pipe(generator=torch.Generator().manual_seed(1), true_cfg_scale=4.0, **call).frames
    out = tmp_path / "true_cfg.h5"
    with dfsviz.record(pipe, out, capture_steps=(0, 1), branches="both", **SETTINGS):
        recorded = pipe(generator=torch.Generator().manual_seed(1), true_cfg_scale=4.0, **call).frames
    np.testing.assert_array_equal(recorded, plain)
    with dfsviz.open(out) as run:
        assert run.validate() == [] and run.complete and run.branches == ["cond", "uncond"]
        assert_stored_curves_match_the_maps(run)  # true CFG: the curves of both branches
        assert not torch.equal(run.block_mass(1, 0, "raster", branch="cond"), run.block_mass(1, 0, "raster", branch="uncond"))
    # guidance_scale alone (embedded) runs no unconditional pass: one line, nothing written
    with pytest.raises(ValueError, match=r"`branches`='both' needs an unconditional pass: call HunyuanVideoPipeline with "
                                         r"true_cfg_scale > 1 and a negative prompt"):
        with dfsviz.record(pipe, tmp_path / "embedded.h5", branches="both", **SETTINGS):
            pipe(generator=torch.Generator().manual_seed(1), **{**call, "guidance_scale": 6.0})
    assert not (tmp_path / "embedded.h5").exists()


def test_lora_and_image_to_video_pipelines(tmp_path):
    from peft import LoraConfig

    # Wan image-to-video without an image encoder (as Wan 2.2's): the image latents enter as channels
    torch.manual_seed(0)
    pipe = wan_pipeline(in_channels=12)
    i2v = diffusers.WanImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=pipe.vae, transformer=pipe.transformer,
                                            scheduler=pipe.scheduler, image_processor=None, image_encoder=None)
    i2v.transformer.add_adapter(LoraConfig(r=2, target_modules=["to_q", "to_k"], init_lora_weights=False), "style")
    from PIL import Image

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    call = {**WAN_CALL, "image": image}
    plain = i2v(generator=torch.Generator().manual_seed(1), **call).frames
    out = tmp_path / "i2v.h5"
    with dfsviz.record(i2v, out, capture_steps=(0,), **SETTINGS):
        recorded = i2v(generator=torch.Generator().manual_seed(1), **call).frames
    np.testing.assert_array_equal(recorded, plain)
    with dfsviz.open(out) as run:
        assert run.validate() == [] and run.grid.name == "f3h4w4"
        assert run.attrs["conditioning"] == "image+text" and list(run.attrs["lora_adapters"]) == ["style"]
        assert run.attrs["pipeline_class"] == "WanImageToVideoPipeline"
    # the LoRA is part of the recorded attention: without it the maps differ
    i2v.transformer.disable_adapters()
    bare = tmp_path / "bare.h5"
    with dfsviz.record(i2v, bare, capture_steps=(0,), **SETTINGS):
        i2v(generator=torch.Generator().manual_seed(1), **call)
    assert not np.array_equal(_maps(out)["step_0000/m"], _maps(bare)["step_0000/m"])


def test_bad_input_stops_before_anything_is_written(tmp_path):
    pipe = wan_pipeline()
    out = tmp_path / "run.h5"
    with pytest.raises(TypeError, match=r"`pipe` must be a diffusers video pipeline .*or a diffusers transformer with "
                                        r"scheduler=... \(got str\)"):
        dfsviz.record("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", out)
    with pytest.raises(TypeError, match=r"recording a transformer in your own loop needs the scheduler the loop steps "
                                        r"\(got scheduler=NoneType\): dfsviz.record\(transformer, out, scheduler=scheduler\)"):
        dfsviz.record(pipe.transformer, out)
    with pytest.raises(ValueError, match=r"unsupported architecture Linear"):
        dfsviz.record(torch.nn.Linear(2, 2), out, scheduler=pipe.scheduler)
    with pytest.raises(TypeError, match=r"`scheduler` is for a transformer in your own loop; a pipeline is recorded with its own"):
        dfsviz.record(pipe, out, scheduler=pipe.scheduler)

    class OtherPipeline:
        transformer = torch.nn.Linear(2, 2)
        scheduler = None

    with pytest.raises(ValueError, match=r"`pipe` OtherPipeline: unsupported architecture Linear; supported: .*Wan"):
        dfsviz.record(OtherPipeline(), out)
    with pytest.raises(TypeError, match=r"record\(\) got settings it does not take: \['num_steps'\]"):
        dfsviz.record(pipe, out, num_steps=3)
    with pytest.raises(ValueError, match=r"`fps` must be a finite number > 0 \(got 0\)"):
        dfsviz.record(pipe, out, fps=0)
    with pytest.raises(ValueError, match=r"`layers` 7 do not exist; this model has layers 0..1"):
        dfsviz.record(pipe, out, layers=(7,))
    # steps outside the call's schedule: one line, no file
    with pytest.raises(ValueError, match=r"`capture_steps` must lie in \[0, 2\] for the 3 steps of this pipeline call \(got \[0, 5\]\)"):
        with dfsviz.record(pipe, out, capture_steps=(0, 5), **SETTINGS):
            pipe(generator=torch.Generator().manual_seed(1), **WAN_CALL)
    assert not out.exists() and type(pipe) is diffusers.WanPipeline
    with pytest.raises(ValueError, match=r"the call makes 2 videos; dfsviz.record captures one video per call"):
        with dfsviz.record(pipe, out, **SETTINGS):
            pipe(generator=torch.Generator().manual_seed(1), num_videos_per_prompt=2, **WAN_CALL)
    assert not out.exists()
    with pytest.raises(ValueError, match=r"nothing called the transformer inside the `with dfsviz.record\(...\)` block"):
        with dfsviz.record(pipe, out, **SETTINGS):
            pass

    # a file being written by another capture: refused at once, the file untouched
    out.write_bytes(b"being written")
    with CaptureLock(out):
        with pytest.raises(ValueError, match=r"is being written by another dfsviz capture \(pid \d+\)"):
            with dfsviz.record(pipe, out, overwrite=True, **SETTINGS):
                pipe(**WAN_CALL)
    assert out.read_bytes() == b"being written"
    with pytest.raises(ValueError, match=r"output .* exists; pass overwrite=True to replace it or resume=True"):
        dfsviz.record(pipe, out, **SETTINGS).__enter__()
    # a folder: named as one, with or without overwrite, and kept
    folder = tmp_path / "runs"
    folder.mkdir()
    for overwrite in (False, True):
        with pytest.raises(ValueError, match=r"`out` '.*runs' is a folder; a recording is one file: name a file in it"):
            dfsviz.record(pipe, folder, overwrite=overwrite, **SETTINGS).__enter__()
    assert folder.is_dir() and list(folder.iterdir()) == []


def test_one_call_per_block(tmp_path):
    pipe = wan_pipeline()
    with pytest.raises(ValueError, match=r"records one pipeline call per `with` block \(this is the second\)"):
        with dfsviz.record(pipe, tmp_path / "two.h5", capture_steps=(0,), **SETTINGS):
            pipe(generator=torch.Generator().manual_seed(1), **WAN_CALL)
            pipe(generator=torch.Generator().manual_seed(1), **WAN_CALL)
    with dfsviz.open(tmp_path / "two.h5") as run:  # the first call's steps are kept, and it ran whole
        assert run.steps == [0] and run.complete


def test_a_transformer_in_your_own_loop_records_as_its_pipeline_does(tmp_path):
    """The Wan pipeline's denoising loop written out by hand (its noise, schedule, two CFG calls
    per step): the recording around the transformer equals the recording of the pipeline call."""
    pipe = wan_pipeline()
    via_pipeline = tmp_path / "pipeline.h5"
    with dfsviz.record(pipe, via_pipeline, capture_steps=(0, 2), branches="both", **SETTINGS):
        pipe(generator=torch.Generator().manual_seed(1), **WAN_CALL)

    transformer, scheduler = pipe.transformer, diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    loop = tmp_path / "loop.h5"
    with dfsviz.record(transformer, loop, scheduler=scheduler, capture_steps=(0, 2), branches="both", **SETTINGS) as rec:
        wan_loop(transformer, scheduler, STEPS, WAN_CALL["prompt_embeds"], WAN_CALL["negative_prompt_embeds"],
                 WAN_CALL["guidance_scale"])
    assert rec.result.steps == [0, 2] and rec.result.complete and "step" not in vars(scheduler)
    _assert_same_maps(loop, via_pipeline)
    with dfsviz.open(loop) as run:
        assert run.validate() == [] and run.video() is None
        assert run.attrs["embeddings"] == "loop" and np.isnan(float(run.attrs["guidance_scale"]))
        assert "pipeline_class" not in run.attrs
        assert run.step_attrs(2)["timestep"] == float(scheduler.timesteps[2])


def _joint_text_call(family):
    """A 2-step call of the tiny HunyuanVideo (padded text after the video, no CFG) or CogVideoX
    (text before the video, CFG as one batch [uncond, cond]) pipeline."""
    if family == "hunyuanvideo":
        cond = _hunyuan_text(30)
        return hunyuan_pipeline(), dict(prompt_embeds=cond.embeds, prompt_attention_mask=cond.mask,
                                        pooled_prompt_embeds=cond.pooled, height=64, width=64, num_frames=9,
                                        num_inference_steps=2, guidance_scale=6.0, output_type="np"), ("cond",)
    return cogvideox_pipeline(), dict(prompt_embeds=_embeds(20, 8), negative_prompt_embeds=_embeds(21, 8), height=128,
                                      width=128, num_frames=9, num_inference_steps=2, guidance_scale=5.0,
                                      output_type="np"), ("cond", "uncond")


@pytest.mark.parametrize("family", ["hunyuanvideo", "cogvideox"])
def test_recording_with_dfsattn_on_joint_text_attention(tmp_path, family):
    """Text in the sequence (HunyuanVideo's padded text after the video, CogVideoX's before it):
    the masks DFSAttn attended over the real tokens lie on the capture's blocks."""
    from dfsviz.sparse.schedule import DFSSchedule

    pipe, call, branches = _joint_text_call(family)
    schedule = DFSSchedule(num_steps=2, skip_steps=1, interval=1, gamma0=0.5, decrement=0.0, dense_layers=())
    with dfsviz.apply_dfsattn(pipe, dfsviz.DFSConfig(block=16, tile=4, schedule=schedule)) as handle:
        plain = pipe(generator=torch.Generator().manual_seed(1), **call).frames
        out = tmp_path / f"{family}.h5"
        with dfsviz.record(pipe, out, capture_steps=(0, 1), branches="both" if len(branches) == 2 else "cond",
                           **SETTINGS):
            recorded = pipe(generator=torch.Generator().manual_seed(1), **call).frames
        logged = [r for r in handle.state.records if r["step"] == 1]
    np.testing.assert_array_equal(recorded, plain)
    with dfsviz.open(out) as run:
        assert run.validate() == [] and run.branches == list(branches)
        assert [run.step_attrs(s)["dfsattn_plan"] for s in (0, 1)] == ["dense", "refresh"]
        for layer in run.layers:
            density = next(r["density"] for r in logged if r["layer"] == layer)
            for branch in branches:  # cfg="share": both halves attend the conditional half's mask
                assert bool(run.dfsattn_kept(0, layer, branch=branch).all())
                kept = run.dfsattn_mask(1, layer, branch=branch)
                assert kept.density().mean().item() == pytest.approx(density)
                assert kept.density().mean().item() < 1


def test_recording_with_dfsattn_refuses_blocks_or_orders_that_leave_its_masks_out(tmp_path):
    pipe = wan_pipeline()
    handle = dfsviz.apply_dfsattn(pipe, dfsattn_config(STEPS))
    try:
        with pytest.raises(ValueError, match=r"`block`=32, but apply_dfsattn attends blocks of 16; record with block=16"):
            dfsviz.record(pipe, tmp_path / "x.h5", block=32)
        with pytest.raises(ValueError, match=r"`orders`=\['raster'\] leaves out 'hilbert3d', the order apply_dfsattn runs"):
            dfsviz.record(pipe, tmp_path / "x.h5", block=16, orders=("raster",))
    finally:
        handle.remove()
    assert not (tmp_path / "x.h5").exists()


def test_damaged_dfsattn_masks_are_named(tmp_path):
    import shutil

    pipe = wan_pipeline()
    with dfsviz.apply_dfsattn(pipe, dfsattn_config(STEPS)):
        with dfsviz.record(pipe, tmp_path / "good.h5", capture_steps=(1,), **SETTINGS):
            pipe(generator=torch.Generator().manual_seed(1), **WAN_CALL)
    for name, edit, match in [
        ("two.h5", lambda d: d.__setitem__((1, 0, 1, 0, 0), 2), r"dfsattn_mask\[layer 1, branch cond, head 1\]: values other than 0 and 1"),
        ("row.h5", lambda d: d.__setitem__((1, 0, 0, 2), 0), r"dfsattn_mask\[layer 1, branch cond, head 0\]: query block 2 attends no key block"),
    ]:
        path = tmp_path / name
        shutil.copy(tmp_path / "good.h5", path)
        with h5py.File(path, "r+") as f:
            dset = f["steps/step_0001/dfsattn_mask"]
            data = dset[...]
            edit(data)
            dset[...] = data
        with dfsviz.open(path) as run:
            problems = run.validate()
        assert any(__import__("re").search(match, p) for p in problems), problems
    path = tmp_path / "order.h5"
    shutil.copy(tmp_path / "good.h5", path)
    with h5py.File(path, "r+") as f:
        f.attrs["dfsattn_order"] = "morton3d"
    with pytest.raises(ValueError, match=r"`dfsattn_order` 'morton3d' is not a captured order \['raster', 'hilbert3d'\]"):
        dfsviz.open(path)


def test_a_capture_without_dfsattn_says_so(tmp_path):
    pipe = wan_pipeline()
    out = tmp_path / "dense.h5"
    with dfsviz.record(pipe, out, capture_steps=(0,), **SETTINGS):
        pipe(generator=torch.Generator().manual_seed(1), **WAN_CALL)
    with dfsviz.open(out) as run:
        assert run.dfsattn_order is None and "dfsattn_plan" not in run.step_attrs(0)
        with pytest.raises(ValueError, match=r"holds no DFSAttn masks: record a pipeline with apply_dfsattn active"):
            run.dfsattn_kept(0, 0)


def test_record_is_a_public_name():
    from dfsviz.capture.record import record

    assert dfsviz.record is record and "record" in dfsviz.__all__


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    """A whole tiny WanPipeline saved with save_pretrained: a random UMT5 text encoder and a
    word-level tokenizer built here (no download), the tiny VAE and transformer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    words = ["<pad>", "</s>", "<unk>", "a", "cat", "playing", "piano", "blurry"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(0)
    encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(words), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                          relative_attention_num_buckets=8)).eval()
    pipe = wan_pipeline()
    pipe.register_modules(tokenizer=tokenizer, text_encoder=encoder)
    folder = tmp_path_factory.mktemp("pipeline") / "tiny-wan-pipeline"
    pipe.save_pretrained(folder)
    return folder


def test_cli_prompt_on_a_pipeline_equals_the_capture_of_its_embeddings(tmp_path, pipeline_dir):
    from click.testing import CliRunner
    from safetensors.torch import save_file

    from dfsviz.cli import main

    # docs/capture.md's five lines, on the local pipeline
    pipe = diffusers.WanPipeline.from_pretrained(pipeline_dir, transformer=None, vae=None)
    with torch.no_grad():  # as the pipeline's call encodes (autograd changes the last bits)
        cond, uncond = pipe.encode_prompt("a cat playing piano", negative_prompt="blurry", max_sequence_length=512,
                                          device="cpu")
    save_file({"prompt_embeds": cond.contiguous(), "negative_prompt_embeds": uncond.contiguous()}, tmp_path / "p.safetensors")

    common = ["--model", str(pipeline_dir), "--num-steps", "2", "--capture-steps", "0,1", "--height", "64", "--width", "64",
              "--frames", "9", "--guidance-scale", "3", "--block", "16", "--seed", "4", "--device", "cpu", "--quiet"]
    result = CliRunner().invoke(main, ["capture", *common, "--prompt", "a cat playing piano", "--negative-prompt", "blurry",
                                       "--out", str(tmp_path / "prompt.h5")])
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and "(complete)" in result.output
    result = CliRunner().invoke(main, ["capture", *common, "--embeddings", str(tmp_path / "p.safetensors"),
                                       "--out", str(tmp_path / "embeddings.h5")])
    assert result.exit_code == 0, result.output
    _assert_same_maps(tmp_path / "prompt.h5", tmp_path / "embeddings.h5")
    with dfsviz.open(tmp_path / "prompt.h5") as run:
        assert run.validate() == [] and run.attrs["prompt"] == "a cat playing piano"
        assert run.attrs["pipeline_class"] == "WanPipeline" and run.video().frames.shape == (9, 64, 64, 3)


def test_cli_pipeline_without_the_extra_says_which_to_install(tmp_path, pipeline_dir, monkeypatch):
    from click.testing import CliRunner

    from dfsviz.cli import main

    monkeypatch.setitem(__import__("sys").modules, "transformers", None)  # as if not installed
    result = CliRunner().invoke(main, ["capture", "--model", str(pipeline_dir), "--prompt", "a cat", "--device", "cpu",
                                       "--out", str(tmp_path / "x.h5")])
    assert result.exit_code == 2
    assert 'its text encoders need the `pipelines` extra: pip install "dfsviz[pipelines]"' in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "x.h5").exists()


def test_settings_of_dfsviz_own_loop_are_refused_for_a_pipeline(tmp_path, pipeline_dir):
    base = dict(model=str(pipeline_dir), device="cpu")
    with pytest.raises(ValueError, match=r"--latent and --grid size dfsviz's own loop; a pipeline call takes --height"):
        run_capture(CaptureConfig(out=str(tmp_path / "a.h5"), prompt="a cat", latent="3x8x8", **base), progress=False)
    with pytest.raises(ValueError, match=r"is a whole pipeline: pass --prompt"):
        run_capture(CaptureConfig(out=str(tmp_path / "b.h5"), **base), progress=False)
    assert not list(tmp_path.glob("*.h5"))

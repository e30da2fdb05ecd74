"""The decoded clip in a capture (root group ``video``): written by the writer, downscaled by the
format's rule, checked at open and by ``validate``, kept by a repair; files without one still
open; ``dfsviz capture`` on the embedded model stores its clip."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

import dfsviz
import dfsviz.cli.inspect  # noqa: F401  (registers the command on the group)
from dfsviz.capture.reader import CaptureReader
from dfsviz.capture.schema import StoreLayout
from dfsviz.capture.writer import CaptureWriter
from dfsviz.cli import main
from dfsviz.sparse.grid import LatentGrid
from dfsviz.sparse.orders import make_order

OLD = Path(__file__).resolve().parents[1] / "data" / "format_v1.h5"
GRID = LatentGrid(3, 4, 4)  # F = 3 latent frames


def _layout(steps=(0, 1)):
    return StoreLayout(grid=GRID, block=16, orders=("raster",), methods=(), layers=(0,), layer_names=("blocks.0.attn1",),
                       heads=(0,), branches=("cond",), steps=steps, footprints=0, head_dim=8)


def _create(path, layout=None):
    layout = layout or _layout()
    perms = {o: make_order(o, layout.grid).perm for o in layout.orders}
    return CaptureWriter.create(path, layout, {"capture_config": {"seed": 0}}, perms, workers=1)


def _write_step(writer, step):
    mb = writer.layout.num_blocks
    writer.begin_step(step)
    m = torch.full((1, mb, mb), 1.0 / mb)
    writer.write_maps(0, "cond", "raster", {"m": m, "L": m, "r": m, "J": m}, {}, torch.zeros(1, dtype=torch.float64),
                      torch.zeros(1, dtype=torch.float64))
    writer.end_step()


def _clip(t=5, h=12, w=20):
    """A clip whose frame i is the constant colour (i, 2i, 3i) mod 256."""
    base = np.arange(t, dtype=np.int64)[:, None, None, None] * np.array([1, 2, 3])
    return np.broadcast_to(base % 256, (t, h, w, 3)).astype(np.uint8)


LATENT = np.array([0, 1, 1, 2, 2])


def _written(tmp_path, frames=None, latent_frame=LATENT, fps=16.0, name="v.h5"):
    path = tmp_path / name
    with _create(path) as writer:
        _write_step(writer, 0)
        writer.write_video(_clip() if frames is None else frames, latent_frame, fps)
        _write_step(writer, 1)
        writer.finish()
    return path


def test_video_round_trip(tmp_path):
    path = _written(tmp_path)
    with dfsviz.open(path) as run:
        video = run.video()
        assert video.frames.dtype == np.uint8 and video.frames.shape == (5, 12, 20, 3)
        np.testing.assert_array_equal(video.frames, _clip())
        assert video.latent_frame.dtype == np.int64
        np.testing.assert_array_equal(video.latent_frame, LATENT)
        assert video.fps == 16.0
        assert run.validate() == []


def test_large_clips_are_downscaled_to_the_format_rule(tmp_path):
    # 300 frames of 40 x 600: every 3rd frame (ceil(300 / 128)) at 17 x 256 (longest side 256)
    frames = _clip(300, 40, 600)
    latent = np.minimum(np.arange(300) // 100, 2)
    path = _written(tmp_path, frames, latent, fps=24.0)
    with dfsviz.open(path) as run:
        video = run.video()
    assert video.frames.shape == (100, 17, 256, 3)
    np.testing.assert_array_equal(video.frames, _clip(300, 17, 256)[::3])  # constant frames stay exact
    np.testing.assert_array_equal(video.latent_frame, latent[::3])
    assert video.fps == 8.0


def test_spatial_downscale_averages_pixels(tmp_path):
    # a 2 x 512 frame of alternating 0 / 200 columns becomes 1 x 256 of their mean
    frames = np.zeros((1, 2, 512, 3), dtype=np.uint8)
    frames[:, :, 1::2] = 200
    path = _written(tmp_path, frames, np.array([0]), fps=1.0)
    with dfsviz.open(path) as run:
        video = run.video()
    assert video.frames.shape == (1, 1, 256, 3)
    assert (video.frames == 100).all()


def test_files_without_a_clip_open(tmp_path):
    with dfsviz.open(OLD) as run:
        assert run.video() is None
        assert run.validate() == []
    path = tmp_path / "none.h5"
    with _create(path) as writer:
        _write_step(writer, 0)
    with dfsviz.open(path) as run:
        assert run.video() is None


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(frames=np.zeros((5, 4, 4, 3))), TypeError, r"`frames` must be uint8 \[T, H, W, 3\].*got float64"),
    (dict(frames=np.zeros((5, 4, 4), np.uint8)), ValueError, r"`frames` must be uint8 \[T, H, W, 3\].*got \[5, 4, 4\]"),
    (dict(frames=np.zeros((0, 4, 4, 3), np.uint8), latent_frame=np.zeros(0, int)), ValueError, r"`frames` must hold at least one frame"),
    (dict(latent_frame=LATENT[:4]), ValueError, r"`latent_frame` must hold one integer per frame \(5\).*got \[4\]"),
    (dict(latent_frame=LATENT.astype(float)), TypeError, r"`latent_frame` must hold integers.*got float64"),
    (dict(latent_frame=np.array([0, 1, 3, 3, 3])), ValueError, r"`latent_frame` must be non-decreasing latent frame indices in \[0, 2\].*\[0, 1, 3, 3, 3\]"),
    (dict(latent_frame=np.array([0, 2, 1, 2, 2])), ValueError, r"`latent_frame` must be non-decreasing"),
    (dict(fps=0.0), ValueError, r"`fps` must be a finite number > 0 \(got 0.0\)"),
    (dict(fps=float("nan")), ValueError, r"`fps` must be a finite number > 0 \(got nan\)"),
    (dict(fps="16"), TypeError, r"`fps` must be a finite number > 0 \(got '16'\)"),
])
def test_write_video_refuses_bad_input(tmp_path, kwargs, error, match):
    args = {"frames": _clip(), "latent_frame": LATENT, "fps": 16.0, **kwargs}
    path = tmp_path / "bad.h5"
    with _create(path) as writer:
        _write_step(writer, 0)
        with pytest.raises(error, match=match):
            writer.write_video(**args)
    with dfsviz.open(path) as run:  # nothing lost: the step stays, no clip
        assert run.steps == [0] and run.video() is None


def test_write_video_only_between_steps(tmp_path):
    with _create(tmp_path / "open.h5") as writer:
        writer.begin_step(0)
        with pytest.raises(RuntimeError, match="between steps"):
            writer.write_video(_clip(), LATENT, 16.0)


def test_a_second_clip_replaces_the_first(tmp_path):
    path = tmp_path / "twice.h5"
    with _create(path) as writer:
        writer.write_video(_clip(), LATENT, 16.0)
        writer.write_video(_clip(2, 3, 3), np.array([0, 2]), 4.0)
    with dfsviz.open(path) as run:
        assert run.video().frames.shape == (2, 3, 3, 3) and run.video().fps == 4.0


def _edit(path, change):
    with h5py.File(path, "r+") as f:
        change(f)


def _replace(name, **kwargs):
    """An edit putting another ``/video/<name>`` in place, with the dims a writer gives it."""
    dims = {"frames": ["video_frame", "row", "column", "channel"], "latent_frame": ["video_frame"]}[name]

    def change(f):
        del f["video"][name]
        f["video"].create_dataset(name, **kwargs).attrs["dims"] = dims

    return change


@pytest.mark.parametrize("change, match", [
    (_replace("frames", data=np.zeros((5, 12, 20, 3), np.float32)), r"'/video/frames' has dtype float32, expected uint8"),
    (_replace("frames", data=np.zeros((5, 12, 20), np.uint8)), r"'/video/frames' must be \[T, H, W, 3\]"),
    (_replace("frames", shape=(5, 12, 300, 3), dtype=np.uint8), r"'/video/frames'.*at most 128 frames of at most 256 x 256"),
    (_replace("frames", shape=(129, 12, 20, 3), dtype=np.uint8), r"'/video/frames'.*at most 128 frames"),
    (lambda f: f["video"]["frames"].attrs.__setitem__("dims", ["t", "h", "w", "c"]), r"'/video/frames' has dims"),
    (lambda f: f["video"].__delitem__("latent_frame"), r"'/video/latent_frame' is missing"),
    (_replace("latent_frame", data=np.zeros(4, np.int64)), r"'/video/latent_frame' has shape \(4,\), expected \(5,\)"),
    (_replace("latent_frame", data=np.zeros(5, np.int32)), r"'/video/latent_frame' has dtype int32, expected int64"),
    (lambda f: f["video"].attrs.__setitem__("fps", "fast"), r"'/video' attribute 'fps' must be a finite number > 0"),
    (lambda f: f["video"].attrs.__delitem__("fps"), r"'/video' attribute 'fps' is missing"),
    (lambda f: (f.__delitem__("video"), f.create_dataset("video", data=1)), r"'/video' must be a group"),
])
def test_crafted_clips_are_refused_at_open(tmp_path, change, match):
    path = _written(tmp_path)
    _edit(path, change)
    with pytest.raises(ValueError, match=match):
        CaptureReader(path)


def test_clip_values_are_checked(tmp_path):
    path = _written(tmp_path)
    _edit(path, lambda f: f["video/latent_frame"].__setitem__(slice(None), np.array([0, 1, 7, 2, 2])))
    with dfsviz.open(path) as run:
        assert any("video/latent_frame" in p and "non-decreasing" in p for p in run.validate())
        with pytest.raises(ValueError, match=r"'/video/latent_frame' must be non-decreasing .*\[0, 2\]"):
            run.video()


def test_a_clip_cut_short_is_ignored(tmp_path):
    path = _written(tmp_path)
    _edit(path, lambda f: f["video"].attrs.__setitem__("complete", False))
    with dfsviz.open(path) as run:
        assert run.video() is None and run.validate() == []


def test_repair_keeps_the_clip(tmp_path):
    layout = _layout(steps=(0, 1))
    path = tmp_path / "r.h5"
    with _create(path, layout) as writer:
        _write_step(writer, 0)
        writer.write_video(_clip(), LATENT, 16.0)
    _edit(path, lambda f: f["steps"].create_group("step_0001").attrs.__setitem__("complete", False))  # a crash's half step
    with CaptureWriter.resume(path, layout, {"seed": 0}) as writer:
        assert writer.completed == {0}
    with dfsviz.open(path) as run:
        np.testing.assert_array_equal(run.video().frames, _clip())
        assert "step_0001" not in run._f["steps"]


def _pixel_source():
    """A tiny Wan that denoises pixels (VAE factors 1, as the embedded model), 3 steps."""
    import diffusers

    from dfsviz.capture import Conditioning, ModelSource, get_adapter
    from tiny_models import build_tiny

    model = build_tiny("wan", in_channels=3, out_channels=3)
    cond = Conditioning(torch.randn(1, 4, 16, generator=torch.Generator().manual_seed(1)))
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    return ModelSource(model, get_adapter("wan"), scheduler, "tiny-pixels", vae_spatial=1, vae_temporal=1,
                       default_size=(3, 16, 16), cond=cond, num_steps=3, guidance_scale=1.0)


def test_capture_of_a_pixel_model_stores_its_clip(tmp_path):
    """A model that denoises pixels (VAE factors 1, as the embedded model) stores the clip it made,
    running its schedule to the end though only step 0 is captured."""
    import diffusers

    from dfsviz.capture import CaptureConfig, run_capture

    source = _pixel_source()
    model, cond = source.transformer, source.cond
    out = tmp_path / "pixels.h5"
    run_capture(CaptureConfig(out=str(out), capture_steps=(0,), footprints=0, seed=5, device="cpu"), progress=False,
                source=source)

    # the same denoising written out here: Euler flow matching from the seed's noise
    reference = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    reference.set_timesteps(3)
    x = torch.randn((1, 3, 3, 16, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        for t in reference.timesteps:
            v = model(hidden_states=x, timestep=t.expand(1), encoder_hidden_states=cond.embeds, return_dict=False)[0]
            x = reference.step(v.float(), t, x, return_dict=False)[0]
    want = ((x[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()
    with dfsviz.open(out) as run:
        video = run.video()
        assert run.complete and run.steps == [0] and run.validate() == []
    np.testing.assert_array_equal(video.frames, want)
    np.testing.assert_array_equal(video.latent_frame, [0, 1, 2])  # patch depth 1: frame f is grid frame f
    assert video.fps == 8.0


def test_resume_writes_the_clip_of_a_run_stopped_after_its_last_captured_step(tmp_path):
    """The clip is made after the schedule's last step: a run stopped before it holds every
    captured step but no clip, incomplete; --resume runs the schedule again for the clip alone."""
    from dfsviz.capture import CaptureConfig, run_capture

    whole, cut = tmp_path / "whole.h5", tmp_path / "cut.h5"
    settings = dict(capture_steps=(0,), footprints=0, seed=5, device="cpu")
    run_capture(CaptureConfig(out=str(whole), **settings), progress=False, source=_pixel_source())

    def stop(step):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_capture(CaptureConfig(out=str(cut), **settings), progress=False, source=_pixel_source(), on_step=stop)
    with dfsviz.open(cut) as run:
        assert run.steps == [0] and not run.complete and run.video() is None
    shown = CliRunner().invoke(main, ["inspect", str(cut)])
    assert "incomplete: every planned step is stored, but the run stopped before it ended" in shown.output
    result = run_capture(CaptureConfig(out=str(cut), resume=True, **settings), progress=False, source=_pixel_source())
    assert result.complete and result.steps == [] and result.skipped == [0]
    with dfsviz.open(cut) as run, dfsviz.open(whole) as reference:
        assert run.complete and run.validate() == []
        np.testing.assert_array_equal(run.video().frames, reference.video().frames)


def test_a_clip_that_diverged_is_not_stored(tmp_path):
    """NaN text reaches the video through cross-attention, after the captured self-attention of
    layer 0 at step 0: the steps are kept, the clip is refused, the file stays incomplete."""
    import dataclasses

    from dfsviz.capture import CaptureConfig, Conditioning, run_capture

    source = _pixel_source()
    source = dataclasses.replace(source, cond=Conditioning(torch.full_like(source.cond.embeds, float("nan"))))
    out = tmp_path / "diverged.h5"
    with pytest.raises(ValueError, match=r"the denoised clip holds NaN or infinite values"):
        run_capture(CaptureConfig(out=str(out), capture_steps=(0,), layers=(0,), footprints=0, device="cpu"),
                    progress=False, source=source)
    with dfsviz.open(out) as run:
        assert run.steps == [0] and not run.complete and run.video() is None


def test_models_with_a_vae_store_no_clip_from_the_capture_loop(tmp_path, model_dirs):
    from dfsviz.capture import CaptureConfig, run_capture

    out = tmp_path / "latent.h5"
    run_capture(CaptureConfig(model=str(model_dirs["wan"]), out=str(out), latent="3x16x16", embeddings="random",
                              num_steps=3, capture_steps=(0,), footprints=0, guidance_scale=1.0, device="cpu"),
                progress=False)
    with dfsviz.open(out) as run:
        assert run.complete and run.video() is None


def test_the_sample_capture_holds_its_clip():
    with dfsviz.open(dfsviz.sample_capture()) as run:
        video = run.video()
    assert video.frames.shape == (9, 36, 64, 3)  # the embedded model's 9 frames of 36 x 64 pixels, not downscaled
    np.testing.assert_array_equal(video.latent_frame, np.arange(9))
    assert video.frames.std() > 10  # a picture, not a blank

"""Run a capture: load a model, denoise with a real diffusers scheduler, record and store.

``run_capture(CaptureConfig(...))`` is what ``dfsviz capture`` calls. For every captured
(step, layer) the SDPA inputs of the conditional pass (and of the unconditional one with
``branches="both"``) are reduced on the spot, for every token order, to:

* block statistics m, L, r, J ([H, Mq, Mk], one streaming pass, never N x N),
* block scores of every scoring method,
* variance ratios W_q, W_k,
* footprints: the exact attention of K sampled query blocks per head over all N keys,
  mean over the block's queries, in original token order,
* optionally Q/K/V of chosen layers,

and queued to the HDF5 writer, which compresses on worker threads. Statistics use the
Triton kernels of ``dfsviz.kernels`` (on CUDA) and their PyTorch references otherwise.

A model that denoises pixels (VAE factors 1: the embedded model) runs its schedule to the
end and stores the clip it made (``video`` in the file), so the dashboard shows the video
the attention belongs to; other models stop after the last captured step, since the loop
loads no VAE to decode their latents.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from dfsviz.capture.adapters import input_dtype
from dfsviz.capture.config import CaptureConfig
from dfsviz.capture.file_safety import CaptureLock, require_output_folder
from dfsviz.capture.hooks import AttentionCapture
from dfsviz.capture.ranks import RankWriter, UlyssesRanks, enable_ulysses, join_world
from dfsviz.capture.reader import CaptureReader
from dfsviz.capture.reduce import AttentionReducer
from dfsviz.capture.resolve import pipeline_rules, resolve_capture, run_identity, weights_fingerprint
from dfsviz.capture.sources import ModelSource
from dfsviz.capture.writer import CLI_OPTIONS, CaptureWriter, output_exists_error, resume_missing_error
from dfsviz.models.sampler import embedded_model_name

__all__ = ["CaptureResult", "run_capture"]

logger = logging.getLogger(__name__)

# The embedded model's procedural clips have no native frame rate: 8 fps shows its 9 frames
# in about a second, slow enough to follow an object from frame to frame.
PIXEL_MODEL_FPS = 8.0


@dataclass
class CaptureResult:
    """What a capture run did.

    Fields:
        path: the HDF5 file.
        steps: steps written by this run; skipped: steps already complete (resume).
        complete: True when every planned step is in the file.
        seconds: wall time of the run; step_seconds: wall time of each captured step
            (all its transformer passes, reduction and writing).
        file_bytes: file size at the end.
        wrote: False on the ranks of a Ulysses capture other than rank 0, which wrote the file
            (their ``file_bytes`` is 0).
    """

    path: str
    steps: list[int]
    skipped: list[int]
    complete: bool
    seconds: float
    step_seconds: dict[int, float]
    file_bytes: int
    wrote: bool = True


def _check_folder(config: CaptureConfig, out: Path) -> None:
    """ValueError for an ``out`` that is a folder, or lies in a missing or unwritable one."""
    if out.is_dir():
        raise ValueError(f"`out` {config.out!r} is a folder, but one clip's capture is one file: name a file in it "
                         f"({str(out / 'capture.h5')!r}), or capture several clips (--prompts/--seeds) into the folder "
                         "as a run set")
    require_output_folder(out)


def check_capture_output(config: CaptureConfig) -> None:
    """ValueError for an ``out`` this capture cannot write: a folder, one in a missing or
    unwritable folder, an existing file without overwrite/resume, a missing one with resume
    (``--dry-run`` checks it too)."""
    out = Path(config.out)
    _check_folder(config, out)
    if out.exists() and not (config.overwrite or config.resume):
        raise output_exists_error(config.out, CLI_OPTIONS)
    if config.resume and not out.exists():
        raise resume_missing_error(config.out, CLI_OPTIONS)


def _lock(config: CaptureConfig, out: Path) -> CaptureLock:
    """The lock of ``out`` (a second writer of ``out`` stops here, told who holds it), refused
    as :func:`check_capture_output` refuses ``out`` once it is held."""
    _check_folder(config, out)  # the lock file goes next to ``out``
    lock = CaptureLock(out)
    try:
        check_capture_output(config)
    except ValueError:
        lock.release()
        raise
    return lock


def _open(config: CaptureConfig, out: Path, source: ModelSource | None):
    """One process: (resolved capture, writer of a new or resumed ``out``)."""
    lock = _lock(config, out)  # before anything loads or is created: a second writer of `out` stops here
    try:
        rc = resolve_capture(config, source=source)
        return rc, _writer(config, out, rc, _identity(rc), lock)
    except BaseException:
        lock.release()
        raise


def _identity(rc, ranks: UlyssesRanks | None = None) -> dict:
    identity = run_identity(rc, rc.source.weights_sha256 or weights_fingerprint(rc.source.transformer))
    if ranks is not None:  # a step's rounding may depend on how the sequence was split: one world size per file
        identity["ulysses_degree"] = ranks.degree
    return identity


def _writer(config: CaptureConfig, out: Path, rc, identity: dict, lock: CaptureLock) -> CaptureWriter:
    if config.resume:
        return CaptureWriter.resume(out, rc.layout, identity, lock=lock)
    from dfsviz.sparse.orders import make_order

    perms = {name: make_order(name, rc.grid).perm for name in rc.layout.orders}
    attrs = {**rc.attrs, "run_identity": identity}
    return CaptureWriter.create(out, rc.layout, attrs, perms, overwrite=config.overwrite, lock=lock)


def _open_ranks(config: CaptureConfig, out: Path, source: ModelSource | None):
    """Each rank of a Ulysses capture under torchrun: (resolved capture, its :class:`RankWriter`,
    its :class:`UlyssesRanks`). Every rank loads the model and enables Ulysses attention; rank 0
    alone opens ``out``. Any rank's refusal stops every rank with the same line."""
    join_world(config.torch_device)
    rc = resolve_capture(config, source=source)
    ranks = enable_ulysses(rc.source.transformer)
    identity = _identity(rc, ranks)
    writer = RankWriter.open(ranks, identity, rc.layout.heads,
                             lambda: _writer(config, out, rc, identity, _lock(config, out)))
    return rc, writer, ranks


def _scheduler_step(scheduler, pred, t, latents, state: dict):
    import diffusers

    if isinstance(scheduler, getattr(diffusers, "CogVideoXDPMScheduler", ())):
        # the DPM variant needs the previous x0 estimate and timestep (as its pipeline passes them)
        out, state["x0"] = scheduler.step(
            pred, state.get("x0"), t, state.get("t_prev"), latents, return_dict=False
        )
        state["t_prev"] = t
        return out
    return scheduler.step(pred, t, latents, return_dict=False)[0]


def _write_pixel_clip(writer: CaptureWriter, latents: torch.Tensor, adapter, model_config, grid) -> None:
    """Store the denoised pixels of a pixel model (latents [1, 3, F, H, W] in [-1, 1]): one video
    frame per latent frame, frame f in grid frame f // pt."""
    import numpy as np

    from dfsviz.models.sampler import video_to_uint8

    if not bool(torch.isfinite(latents).all()):
        raise ValueError("the denoised clip holds NaN or infinite values (the model diverged after the captured "
                         "steps): it is not stored, and the file stays incomplete")
    frames = video_to_uint8(latents[0])
    pt = adapter.patch(model_config)[0]
    latent_frame = np.minimum(np.arange(frames.shape[0]) // pt, grid.frames - 1)
    writer.write_video(frames, latent_frame, PIXEL_MODEL_FPS)


def run_capture(
    config: CaptureConfig,
    progress: bool = True,
    *,
    source: ModelSource | None = None,
    on_step: Callable[[int], None] | None = None,
) -> CaptureResult:
    """Run one capture and write ``config.out``.

    Args:
        config: the settings.
        progress: show a tqdm bar over the steps run, in (layer, branch) records: a captured
            step advances record by record, one that is only denoised when it ends.
        source: a model already in memory (skips loading ``config.model``).
        on_step: called with the step index after each captured step is flushed.

    Returns:
        A :class:`CaptureResult`.

    A whole diffusers pipeline (``model_index.json``) without ``embeddings`` is built with its
    text encoders and captured through :func:`dfsviz.record` instead
    (:func:`~dfsviz.capture.record.capture_pipeline`); ``on_step`` is then not called.

    Raises:
        ValueError: bad settings, unknown model, unsupported architecture, grid mismatch,
            existing output without ``overwrite``, out of GPU memory. An interrupted run
            leaves its file marked incomplete; ``resume=True`` continues it.
    """
    if source is None and embedded_model_name(config.model) is None and config.embeddings is None:
        from dfsviz.capture.record import capture_pipeline, is_pipeline

        if is_pipeline(config.model):  # prompts through the pipeline's own text encoders
            return capture_pipeline(config, progress)
    start = time.perf_counter()
    out = Path(config.out)
    if config.context_parallel is not None:
        rc, writer, ranks = _open_ranks(config, out, source)
    else:
        ranks = None
        rc, writer = _open(config, out, source)
    device = config.torch_device
    model = rc.source.transformer
    adapter = rc.source.adapter
    skipped = sorted(writer.completed)
    todo = [s for s in rc.capture_steps if s not in writer.completed]
    per_step = len(rc.layer_map) * len(rc.layout.branches)  # records of a captured step
    bar = None
    reducer = AttentionReducer(rc, writer, None, ranks)
    capture = AttentionCapture(model, rc.layer_map, reducer, force_native=True)
    step_seconds: dict[int, float] = {}
    written: list[int] = []
    try:
        scheduler = rc.source.scheduler
        pipeline_rules(adapter).set_timesteps(scheduler, rc.num_steps, device)
        timesteps = scheduler.timesteps
        # a pixel model's clip needs the whole schedule (again, on resume, where the run stopped before writing
        # it); anything else stops at the last captured step
        pixels = rc.source.vae_spatial == 1 and rc.source.vae_temporal == 1 and (bool(todo) or not writer.has_video())
        last = len(timesteps) - 1 if pixels else max(todo) if todo else -1
        if progress and (ranks is None or ranks.writes):  # one bar, rank 0's
            from tqdm.auto import tqdm

            # every step run counts: a captured one record by record, any other when it ends
            bar = reducer.progress = tqdm(total=(last + 1) * per_step, unit="layer", desc="capture")
        dtype = input_dtype(model)
        cond = rc.cond.to(device, dtype)
        uncond = rc.uncond.to(device, dtype) if rc.uncond is not None and rc.cfg else None
        gen = torch.Generator().manual_seed(config.seed)
        latents = adapter.make_latents(rc.latent, model.config, gen, device, dtype) * float(
            getattr(scheduler, "init_noise_sigma", 1.0)
        )
        sched_state: dict = {}
        sigmas = getattr(scheduler, "sigmas", None)
        with torch.no_grad(), capture:
            capture.enabled = False
            for i, t in enumerate(timesteps):
                if i > last:
                    break
                t0 = time.perf_counter()
                captured = i in todo
                if captured:
                    step_attrs = {"timestep": float(t), "transformer": "transformer"}
                    if sigmas is not None and i < len(sigmas):
                        step_attrs["sigma"] = float(sigmas[i])
                    writer.begin_step(i, step_attrs)
                if bar is not None:
                    bar.set_description(f"{'capture' if captured else 'denoise'} step {i}")
                x_in = scheduler.scale_model_input(latents, t) if hasattr(scheduler, "scale_model_input") else latents
                reducer.targets = [(0, "cond")]
                capture.enabled = captured
                pred = adapter.forward(model, x_in, t, cond, guidance=rc.guidance_scale, grid=rc.grid).float()
                if uncond is not None:
                    reducer.targets = [(0, "uncond")]
                    capture.enabled = captured and "uncond" in rc.layout.branches
                    pred_u = adapter.forward(model, x_in, t, uncond, guidance=rc.guidance_scale, grid=rc.grid).float()
                    pred = pred_u + rc.guidance_scale * (pred - pred_u)
                capture.enabled = False
                latents = _scheduler_step(scheduler, pred, t, latents, sched_state).float()
                if bar is not None and not captured:
                    bar.update(per_step)
                if captured:
                    missing = {(l, b) for l in rc.layer_map.values() for b in rc.layout.branches} - reducer.seen
                    if missing:
                        raise ValueError(
                            f"step {i}: no self-attention call reached SDPA for (layer, branch) {sorted(missing)[:4]}; "
                            "the model's attention bypasses torch SDPA (unsupported backend)"
                        )
                    reducer.seen.clear()
                    writer.end_step()
                    if reducer.scale is not None and not writer.has_attr("softmax_scale"):
                        writer.set_attr("softmax_scale", reducer.scale)
                    step_seconds[i] = time.perf_counter() - t0
                    written.append(i)
                    logger.info("captured step %d in %.2f s", i, step_seconds[i])
                    if on_step is not None:
                        on_step(i)
        if pixels:
            _write_pixel_clip(writer, latents, adapter, model.config, rc.grid)
        complete = set(rc.capture_steps) <= writer.completed
        if complete:
            writer.finish()
    except torch.cuda.OutOfMemoryError:
        raise ValueError(
            "out of GPU memory; capture fewer --layers/--heads/--footprints or a smaller --height/--width/--frames "
            f"(the file {config.out!r} keeps the completed steps; --resume continues it)"
        ) from None
    finally:
        if bar is not None:
            bar.close()
        writer.close()
    if ranks is not None and not ranks.writes:
        return CaptureResult(path=str(out), steps=written, skipped=skipped, complete=complete,
                             seconds=time.perf_counter() - start, step_seconds=step_seconds, file_bytes=0, wrote=False)
    with CaptureReader(out) as reader:  # success only for a file that opens and holds what was written
        missing = sorted(set(written) - set(reader.steps))
        if missing or reader.complete != complete:
            raise ValueError(f"{config.out!r} does not hold the steps {missing} this run wrote; capture it again")
    return CaptureResult(
        path=str(out),
        steps=written,
        skipped=skipped,
        complete=complete,
        seconds=time.perf_counter() - start,
        step_seconds=step_seconds,
        file_bytes=out.stat().st_size,
    )

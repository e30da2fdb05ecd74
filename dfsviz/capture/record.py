"""Record the user's own pipeline call: ``with dfsviz.record(pipe, "run.h5") as rec: pipe(...)``.

The statistics, file format, crash safety and reader are those of ``dfsviz capture``
(:mod:`dfsviz.capture.runner`); only the denoising loop is the pipeline's own. While the
``with`` block is open:

* the pipeline's class is swapped for a subclass whose ``__call__`` reads the call's
  arguments (prompt, size, frames, steps, guidance ...) and then runs the original call;
* ``scheduler.step`` is wrapped: the n-th call ends denoising step n, so steps are counted
  by the pipeline itself, whatever its scheduler;
* a forward pre-hook on the transformer reads each call's input: the first call gives the
  token grid (the latent's shape, the adapter's patch sizes and the real text tokens of
  ``encoder_hidden_states`` and its mask), which sizes the file; each call says which branch
  it carries (a CFG batch of 2: the family's ``cond_index`` half is the conditional one; two
  calls per step: the first is the conditional one);
* a pipeline with two transformers (Wan 2.2 A14B: ``transformer`` for the high-noise steps,
  ``transformer_2`` after ``boundary_ratio``) has both hooked; each step records which one ran
  it (the step attribute ``transformer``), and layer i is the i-th self-attention layer of that
  transformer (both must have the same layer count, heads and head width);
* :class:`~dfsviz.capture.hooks.AttentionCapture` hands the self-attention SDPA inputs of the
  captured steps to the same :class:`~dfsviz.capture.reduce.AttentionReducer` as a capture;
* ``vae.decode`` is wrapped: its output, the decoded clip, is stored (``video``);
* with ``apply_dfsattn`` active (applied before ``record``), the attention DFSAttn computes
  instead of SDPA reaches the same reducer through the DFSAttn state's observers, with the
  mask it attended: every step stores ``dfsattn_mask`` (the key blocks DFSAttn kept, all of
  them where it ran dense) and its step attributes say what the schedule did
  (``dfsattn_plan``, ``dfsattn_gamma``). The capture then uses DFSAttn's block and includes
  its order, so the masks lie on the maps' blocks.

Everything is restored on exit; the pipeline's output is bit-identical with and without the
recording (the wrappers pass their arguments and results through unchanged). The attention
hooks force diffusers' ``native`` backend (torch SDPA) while recording: on a GPU a pipeline
set to another backend (flash, sage ...) then runs on SDPA's own kernels, whose rounding differs.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import logging
import time
import types
from pathlib import Path

import numpy as np
import torch

from dfsviz.architectures import pipeline_transformers
from dfsviz.capture.adapters import Conditioning, adapter_for
from dfsviz.capture.config import CaptureConfig
from dfsviz.capture.file_safety import CaptureLock, require_output_folder
from dfsviz.capture.hooks import AttentionCapture, hand_over_sparse_call
from dfsviz.capture.ranks import RankWriter, UlyssesRanks, enable_ulysses, join_world
from dfsviz.capture.reader import CaptureReader
from dfsviz.capture.reduce import AttentionReducer
from dfsviz.capture.resolve import (
    ResolvedCapture,
    check_capture_steps,
    pipeline_rules,
    resolve_layout,
    run_attrs,
    run_identity,
    weights_fingerprint,
)
from dfsviz.capture.runner import CaptureResult
from dfsviz.capture.sources import ModelSource
from dfsviz.capture.writer import PYTHON_OPTIONS, CaptureWriter, output_exists_error
from dfsviz.sparse.grid import LatentGrid

__all__ = ["Recording", "capture_pipeline", "is_pipeline", "record"]

logger = logging.getLogger(__name__)

# CaptureConfig fields a recording takes from the caller; the others (model, prompt, steps,
# size, guidance, device, dtype, embeddings) are decided by the pipeline call
SETTINGS = ("capture_steps", "layers", "heads", "orders", "methods", "block", "tile", "stride", "footprints",
            "branches", "save_qkv", "qkv_steps", "qkv_dtype", "map_dtype", "step_budget", "kernel_backend", "seed",
            "overwrite", "resume")
# pipeline call arguments that change how the call reports, not what it denoises: a resume may differ in them
_CALL_REPORTING = ("callback_on_step_end", "callback_on_step_end_tensor_inputs", "output_type", "return_dict")
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def record(pipe, out: str | Path, *, scheduler=None, fps: float = 16.0, progress: bool = False,
           **settings) -> "Recording":
    """Record the attention statistics of the pipeline call (or your own denoising loop) made
    inside a ``with`` block.

    Example::

        with dfsviz.record(pipe, "run.h5", capture_steps=[0, 10, 25, 49]) as rec:
            video = pipe(prompt="a cat playing piano", num_frames=81).frames
        rec.result.steps   # [0, 10, 25, 49]

        # a transformer in your own loop: the scheduler it steps counts the steps
        scheduler.set_timesteps(50)
        with dfsviz.record(transformer, "loop.h5", scheduler=scheduler):
            for t in scheduler.timesteps:
                noise = transformer(hidden_states=latents, timestep=t.expand(1), encoder_hidden_states=embeds)[0]
                latents = scheduler.step(noise, t, latents).prev_sample

    Args:
        pipe: a diffusers video pipeline whose ``transformer`` is a supported architecture
            (``dfsviz.capture.supported_architectures()``), with ``scheduler`` and usually
            ``vae``; LoRA-loaded and image-to-video pipelines alike, and Wan 2.2 A14B's two
            transformers (``transformer_2``: each step records which one ran it). With
            ``apply_dfsattn`` active on it, the masks DFSAttn attended are stored as well
            (``dfsattn_mask``; apply it before ``record``). One pipeline call per block.
            Or a supported diffusers transformer that your own loop calls, with
            ``scheduler``: each ``scheduler.step`` ends a step; a second transformer call in a
            step (or a batch of 2) is taken as the unconditional pass; no clip is stored and
            ``guidance_scale`` is recorded as NaN (your loop applies it).
            Under diffusers' Ulysses attention (``enable_parallelism(config=ContextParallelConfig(
            ulysses_degree=P))`` called on every rank before ``record``), call ``record`` on every
            rank with the same ``out``: each rank reduces its heads and rank 0 writes the file
            (``rec.result.wrote`` is False on the others).
        out: the capture file to write (its directory must exist).
        scheduler: with a transformer, the scheduler your loop steps (``set_timesteps`` called
            before the first transformer call); None with a pipeline.
        fps: frame rate stored with the decoded clip (> 0; the pipelines' own examples export
            Wan at 16, HunyuanVideo at 15, CogVideoX at 8 frames per second).
        progress: show a tqdm bar over the captured steps.
        **settings: what to capture, as :class:`~dfsviz.capture.CaptureConfig` names it:
            ``capture_steps`` (None = 5 spread over the call's steps), ``layers``, ``heads``,
            ``orders``, ``methods``, ``block``, ``tile``, ``stride``, ``footprints``,
            ``branches`` ("cond" or "both"), ``save_qkv``, ``qkv_steps``, ``qkv_dtype``,
            ``map_dtype`` ("auto", the default: the widest of "float32", "float16" and "uint8" whose
            largest step fits ``step_budget``, 8 GB unless given, e.g. "20GB"), ``kernel_backend``,
            ``seed`` (of the footprint sampling), ``overwrite``, ``resume``
            (continue an interrupted recording of the same call: the call runs whole again,
            only the missing steps are reduced).

    Returns:
        A :class:`Recording` (a context manager); after the block, ``rec.result`` is the
        :class:`~dfsviz.capture.CaptureResult`.

    Raises:
        TypeError or ValueError, before anything is written: not a pipeline of a supported
        transformer, two transformers of different layer counts or heads, an unknown setting,
        a ``block`` or ``orders`` that leave out the active ``apply_dfsattn``'s, ``out``
        existing without ``overwrite``/``resume`` or written by another process. Inside the call: steps
        outside the call's schedule, a batch of several videos, a grid that does not fit.
    """
    return Recording(pipe, out, fps=fps, progress=progress, scheduler=scheduler, settings=settings)


def is_pipeline(model: str) -> bool:
    """True when ``model`` (a local directory or a hub id) is a whole diffusers pipeline
    (``model_index.json``), not a transformer folder."""
    path = Path(model).expanduser()
    if path.is_dir():
        return (path / "model_index.json").is_file()
    import diffusers

    try:
        return "_class_name" in diffusers.DiffusionPipeline.load_config(model)
    except Exception:  # noqa: BLE001 - offline, no such repo, a transformer repo: the loop's loader says why
        return False


def capture_pipeline(config: CaptureConfig, progress: bool = True) -> CaptureResult:
    """``dfsviz capture --model <pipeline> --prompt ...``: build the whole pipeline (text encoders,
    transformer, VAE) and capture one call of it through :func:`record`.

    The call gets ``config.prompt``, ``negative_prompt``, ``num_steps``, ``guidance_scale``,
    ``height``, ``width`` and ``frames`` where set (the pipeline's defaults otherwise) and a CPU
    generator seeded with ``config.seed``. Raises ValueError when the ``pipelines`` extra is
    missing or a setting of dfsviz's own loop (``latent``, ``grid``) is given.
    """
    try:
        import transformers  # noqa: F401 - the text encoders of every video pipeline
    except ImportError:
        raise ValueError(
            f"{config.model!r} is a whole pipeline: its text encoders need the `pipelines` extra: "
            'pip install "dfsviz[pipelines]" (or pass --embeddings FILE.safetensors)'
        ) from None
    if config.latent is not None or config.grid is not None:
        raise ValueError(
            "--latent and --grid size dfsviz's own loop; a pipeline call takes --height, --width and --frames "
            "(or pass --embeddings to run the transformer in dfsviz's loop)"
        )
    if not config.prompt:
        raise ValueError(f"{config.model!r} is a whole pipeline: pass --prompt \"...\" (or --embeddings FILE.safetensors)")
    import diffusers

    if config.context_parallel is not None:
        join_world(config.torch_device)  # before the pipeline moves: each rank's GPU is its LOCAL_RANK's
    pipe = diffusers.DiffusionPipeline.from_pretrained(config.model, torch_dtype=config.torch_dtype)
    pipe = pipe.to(config.torch_device)
    if config.context_parallel is not None:
        for transformer in pipeline_transformers(pipe).values():
            enable_ulysses(transformer)
    pipe.set_progress_bar_config(disable=not progress)
    call = {"prompt": config.prompt, "negative_prompt": config.negative_prompt or None,
            "generator": torch.Generator().manual_seed(config.seed), "output_type": "np"}
    for option, argument in (("num_steps", "num_inference_steps"), ("guidance_scale", "guidance_scale"),
                             ("height", "height"), ("width", "width"), ("frames", "num_frames")):
        if getattr(config, option) is not None:
            call[argument] = getattr(config, option)
    settings = {name: getattr(config, name) for name in SETTINGS}
    with record(pipe, config.out, **settings) as rec:
        pipe(**call)
    return rec.result


class Recording:
    """The context manager of :func:`record`; ``result`` holds the outcome after the block."""

    def __init__(self, pipe, out, *, fps: float, progress: bool, scheduler, settings: dict) -> None:
        # a transformer in the caller's own loop: its scheduler counts the steps, as a pipeline's does
        self.own_loop = isinstance(pipe, torch.nn.Module)
        if self.own_loop:
            if scheduler is None or not callable(getattr(scheduler, "step", None)):
                raise TypeError(
                    f"recording a transformer in your own loop needs the scheduler the loop steps (got scheduler="
                    f"{type(scheduler).__name__}): dfsviz.record(transformer, out, scheduler=scheduler)"
                )
            transformers = {"transformer": pipe}
            pipe = types.SimpleNamespace(transformer=pipe, scheduler=scheduler)
        else:
            if scheduler is not None:
                raise TypeError("`scheduler` is for a transformer in your own loop; a pipeline is recorded with its own")
            not_a_pipeline = TypeError(
                f"`pipe` must be a diffusers video pipeline with a `transformer` and a `scheduler`, or a diffusers "
                f"transformer with scheduler=... (got {type(pipe).__name__})"
            )
            if not hasattr(pipe, "scheduler"):
                raise not_a_pipeline
            try:
                transformers = pipeline_transformers(pipe)  # `transformer`, and Wan 2.2 A14B's `transformer_2`
            except TypeError:
                raise not_a_pipeline from None
            except ValueError as exc:
                raise ValueError(f"`pipe` {type(pipe).__name__}: {exc}") from None
        transformer = next(iter(transformers.values()))
        self.adapter = adapter_for(transformer)
        _check_same_layout(transformers, self.adapter)
        unknown = sorted(set(settings) - set(SETTINGS))
        if unknown:
            raise TypeError(
                f"record() got settings it does not take: {unknown}; it takes {list(SETTINGS)} (the size, frames, "
                "steps, guidance and prompt come from the pipeline call)"
            )
        if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not np.isfinite(fps) or fps <= 0:
            raise ValueError(f"`fps` must be a finite number > 0 (got {fps!r})")
        self.ranks = UlyssesRanks.of(transformer)  # Ulysses attention the caller enabled: rank 0 writes
        self.dfsattn = _dfsattn_of(transformers)
        if self.dfsattn is not None:
            settings = _with_dfsattn_blocks(settings, self.dfsattn[1])
        param = next((p for p in transformer.parameters() if p.is_floating_point()), None)
        device = "cpu" if param is None or param.device.type == "cpu" else str(param.device)
        self.config = CaptureConfig(out=str(out), device=device, dtype=_DTYPE_NAMES.get(getattr(param, "dtype", None), "auto"),
                                    **settings)
        self.pipe, self.transformer, self.fps, self.progress = pipe, transformer, float(fps), progress
        self.transformers = transformers
        self.pipe_class = type(transformer) if self.own_loop else type(pipe)
        # resolved before the call, so a bad layer or head is refused before any compute
        self.layer_map, *_ = resolve_layout(self.config, self.adapter, transformer, _ANY_GRID, (0,))
        self.result: CaptureResult | None = None
        self._lock: CaptureLock | None = None
        self._restore: list = []

    # -- the block -----------------------------------------------------------------------------
    def __enter__(self) -> "Recording":
        out = Path(self.config.out)
        if self.ranks is None or self.ranks.writes:
            if out.is_dir():
                raise ValueError(f"`out` {str(out)!r} is a folder; a recording is one file: name a file in it "
                                 f"({str(out / 'recording.h5')!r})")
            require_output_folder(out)
            lock = CaptureLock(out)  # a second writer of `out` stops here, before the pipeline runs
            if out.exists() and not (self.config.overwrite or self.config.resume):
                lock.release()
                raise output_exists_error(out, PYTHON_OPTIONS)
            self._lock = lock
        self._start = time.perf_counter()
        self._calls = 0  # pipeline calls
        self._call_done = False  # the recorded pipeline call returned
        self._call: dict = {}
        self.rc: ResolvedCapture | None = None
        self.writer: CaptureWriter | None = None
        self._step = 0  # scheduler.step calls so far in this pipeline call: the running step
        self._step_calls = (-1, 0)  # (step, transformer calls in it)
        self._todo: set[int] = set()
        self._written: list[int] = []
        self._step_seconds: dict[int, float] = {}
        self._step_start = 0.0
        self._bar = None
        self._captures: dict[str, AttentionCapture] = {}
        try:
            if self.dfsattn is not None:  # the attention DFSAttn computes reaches the captures too
                observers = self.dfsattn[0].observers
                observers.append(hand_over_sparse_call)
                self._restore.append(functools.partial(observers.remove, hand_over_sparse_call))
            for name, model in self.transformers.items():
                capture = AttentionCapture(model, self.layer_map, self._on_record, force_native=True)
                capture.__enter__()
                self._restore.append(capture.__exit__)
                capture.enabled = False
                self._captures[name] = capture
                pre = model.register_forward_pre_hook(functools.partial(self._before_transformer, name),
                                                      with_kwargs=True)
                post = model.register_forward_hook(self._after_transformer, always_call=True)
                self._restore += [pre.remove, post.remove]
            if not self.own_loop:
                self._wrap_call()
            self._wrap_method(self.pipe.scheduler, "step", self._after_scheduler_step)
            vae = getattr(self.pipe, "vae", None)
            if vae is not None and hasattr(vae, "decode"):
                self._wrap_method(vae, "decode", self._after_decode)
        except BaseException:
            self._undo()
            self._release()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self._undo()
        finally:
            if self._bar is not None:
                self._bar.close()
            writer, self.writer = self.writer, None
            if writer is None:
                self._release()
                if exc_type is None:
                    raise ValueError("nothing called the transformer inside the `with dfsviz.record(...)` block: nothing "
                                     "was recorded")
                return
            complete = False
            try:
                if exc_type is None and writer.open_step is not None:
                    self._end_step(writer)  # a transformer-only loop: the last step ends with the block
                # an error after the recorded call returned (a second call, refused) leaves that call whole
                whole = exc_type is None or self._call_done
                complete = whole and set(self.rc.capture_steps) <= writer.completed
                if complete:
                    writer.finish()
            finally:
                writer.close()  # an open step is deleted: the file keeps exactly its completed steps
        if exc_type is not None:
            return
        out = Path(self.config.out)
        if self.ranks is not None and not self.ranks.writes:
            self.result = CaptureResult(
                path=str(out), steps=list(self._written), skipped=sorted(set(self.rc.capture_steps) - set(self._todo)),
                complete=complete, seconds=time.perf_counter() - self._start, step_seconds=dict(self._step_seconds),
                file_bytes=0, wrote=False,
            )
            return
        with CaptureReader(out) as reader:  # success only for a file that opens and holds what was written
            missing = sorted(set(self._written) - set(reader.steps))
            if missing or reader.complete != complete:
                raise ValueError(f"{str(out)!r} does not hold the steps {missing} this recording wrote; record it again")
        if not complete:
            logger.warning("%s: steps %s were not reached by the pipeline call", out,
                           sorted(set(self.rc.capture_steps) - set(reader.steps)))
        self.result = CaptureResult(
            path=str(out), steps=list(self._written), skipped=sorted(set(self.rc.capture_steps) - set(self._todo)),
            complete=complete, seconds=time.perf_counter() - self._start, step_seconds=dict(self._step_seconds),
            file_bytes=out.stat().st_size,
        )

    def _undo(self) -> None:
        while self._restore:
            undo = self._restore.pop()
            try:
                undo()
            except Exception:  # noqa: BLE001 - restore the rest; the first failure is logged
                logger.exception("restoring the pipeline after recording failed")

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    # -- wrappers ------------------------------------------------------------------------------
    def _wrap_call(self) -> None:
        """Swap the pipeline's class for a subclass whose ``__call__`` reads the arguments first."""
        pipe, original = self.pipe, self.pipe_class
        recording = self

        def __call__(self, *args, **kwargs):
            recording._before_call(original, self, args, kwargs)
            result = original.__call__(self, *args, **kwargs)
            recording._call_done = True
            return result

        recorded = type(original.__name__, (original,), {"__call__": __call__, "__module__": original.__module__})
        pipe.__class__ = recorded

        def restore() -> None:
            pipe.__class__ = original

        self._restore.append(restore)

    def _wrap_method(self, owner, name: str, after) -> None:
        """``owner.name`` calls the original, then ``after(result)``, and returns the result unchanged."""
        original = getattr(owner, name)
        had_own = name in vars(owner)

        def wrapper(*args, **kwargs):
            result = original(*args, **kwargs)
            after(result)
            return result

        setattr(owner, name, wrapper)

        def restore() -> None:
            if had_own:
                setattr(owner, name, original)
            else:
                delattr(owner, name)

        self._restore.append(restore)

    # -- the pipeline call ---------------------------------------------------------------------
    def _before_call(self, cls, pipe, args, kwargs) -> None:
        self._calls += 1
        if self._calls > 1:
            raise ValueError(
                "dfsviz.record records one pipeline call per `with` block (this is the second); open a new block, "
                "with another `out`, for each call"
            )
        bound = inspect.signature(cls.__call__).bind(pipe, *args, **kwargs)
        bound.apply_defaults()
        self._call = {k: v for k, v in bound.arguments.items() if k != "self"}

    def _before_transformer(self, name: str, module, args, kwargs) -> None:
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        if self.rc is None:
            self._begin(module, hidden, kwargs)
        step = self._step
        calls = self._step_calls[1] + 1 if self._step_calls[0] == step else 0
        self._step_calls = (step, calls)
        captured = step in self._todo
        if captured and self.writer.open_step is None:
            self._step_start = time.perf_counter()
            self.writer.begin_step(step, {**self._step_attrs(step, kwargs), **self._dfsattn_step_attrs(),
                                          "transformer": name})
        targets = self._targets(hidden.shape[0], calls, kwargs) if captured else []
        self._reducer.targets = targets
        self._captures[name].enabled = bool(targets)

    def _step_attrs(self, step: int, kwargs) -> dict:
        """The scheduler's timestep (and sigma) of ``step``; the transformer's own ``timestep``
        input where the scheduler lists none (it is per token with ``expand_timesteps``)."""
        scheduler, attrs = self.pipe.scheduler, {}
        timesteps = getattr(scheduler, "timesteps", None)
        timestep = timesteps[step] if isinstance(timesteps, torch.Tensor) and step < len(timesteps) else kwargs.get("timestep")
        if isinstance(timestep, torch.Tensor):
            attrs["timestep"] = float(timestep.flatten()[0])
        sigmas = getattr(scheduler, "sigmas", None)
        if isinstance(sigmas, torch.Tensor) and step < len(sigmas):
            attrs["sigma"] = float(sigmas[step])
        return attrs

    def _dfsattn_step_attrs(self) -> dict:
        """What DFSAttn's schedule did at the step now starting: ``dfsattn_plan`` "dense"
        (warm-up), "refresh" (masks scored) or "cached", and its budget ``dfsattn_gamma``."""
        ctx = None if self.dfsattn is None else self.dfsattn[0].current
        if ctx is None:
            return {}
        plan = ctx.plan
        attrs = {"dfsattn_plan": "dense" if plan.dense else "refresh" if plan.refresh else "cached"}
        if plan.gamma is not None:
            attrs["dfsattn_gamma"] = float(plan.gamma)
        return attrs

    def _after_transformer(self, module, args, kwargs_or_output, *rest) -> None:
        for capture in self._captures.values():
            capture.enabled = False

    def _after_scheduler_step(self, result) -> None:
        writer = self.writer
        if writer is not None and writer.open_step == self._step:
            self._end_step(writer)
        self._step += 1

    def _after_decode(self, result) -> None:
        if self.writer is None:
            return
        decoded = result[0] if isinstance(result, tuple) else getattr(result, "sample", result)
        if not isinstance(decoded, torch.Tensor) or decoded.dim() != 5 or decoded.shape[1] != 3:
            logger.warning("vae.decode returned %s, not RGB video [B, 3, T, H, W]: no clip stored",
                           getattr(decoded, "shape", type(decoded).__name__))
            return
        from dfsviz.models.sampler import video_to_uint8

        frames = video_to_uint8(decoded[0])  # [T, H, W, 3]; the pipeline keeps its own tensor
        self.writer.write_video(frames, self._latent_frames(frames.shape[0]), self.fps)

    # -- first transformer call: grid, layout, file ----------------------------------------------
    def _begin(self, model: torch.nn.Module, hidden, kwargs) -> None:
        cfg, pipe, adapter = self.config, self.pipe, self.adapter
        if not isinstance(hidden, torch.Tensor):
            raise ValueError(f"the transformer was called without `hidden_states` (got {type(hidden).__name__})")
        latent = tuple(int(v) for v in adapter.arch.latent_of_call(hidden, kwargs))
        timesteps = getattr(pipe.scheduler, "timesteps", None)
        if timesteps is None:
            raise ValueError(
                f"{type(pipe.scheduler).__name__} has no timesteps: call scheduler.set_timesteps(...) before the loop"
            )
        num_steps = len(timesteps)
        steps = cfg.capture_steps or _default_steps(num_steps)
        check_capture_steps(steps, num_steps, " of this loop" if self.own_loop else " of this pipeline call")
        videos = _videos_of_call(self._call)
        if videos != 1:
            raise ValueError(
                f"the call makes {videos} videos; dfsviz.record captures one video per call (one prompt, "
                "num_videos_per_prompt=1)"
            )
        rules = pipeline_rules(adapter)
        if self.own_loop:  # the loop's guidance is the caller's; a second call at a step is its unconditional pass
            guidance, self._cfg = float("nan"), True
        else:
            guidance = float(self._call.get("guidance_scale") or 1.0)
            self._cfg = rules.call_runs_cfg(pipe, self._call)
        if cfg.branches == "both" and not self._cfg:
            raise ValueError(f"`branches`='both' needs an unconditional pass: {rules.no_uncond_hint()}")
        cond = self._conditioning(kwargs, self._cond_sample(hidden.shape[0]))
        grid = adapter.token_grid(model.config, latent, adapter.text_len(cond))
        layer_map, heads, layout, map_dtype_choice = resolve_layout(
            cfg, adapter, model, grid, tuple(steps), None if self.dfsattn is None else self.dfsattn[1].order)
        source = ModelSource(
            transformer=model, adapter=adapter, scheduler=pipe.scheduler, model_id=_model_id(pipe, model, self.pipe_class),
            vae_spatial=int(getattr(pipe, "vae_scale_factor_spatial", adapter.vae_spatial)),
            vae_temporal=int(getattr(pipe, "vae_scale_factor_temporal", adapter.vae_temporal)),
            num_steps=num_steps, guidance_scale=guidance,
        )
        attrs = {**self._attrs(source, latent, num_steps, guidance), "map_dtype_choice": map_dtype_choice}
        self.rc = ResolvedCapture(cfg, source, grid, latent, num_steps, guidance, tuple(steps), layer_map, heads,
                                  layout, cond, None, attrs)
        call = {k: v for k, v in attrs["pipeline_call"].items() if k not in _CALL_REPORTING}
        models = self.transformers
        weights = weights_fingerprint(model if len(models) == 1 else torch.nn.ModuleDict(models))
        identity = {**run_identity(self.rc, weights), "pipeline_call": call,
                    "dfsattn": None if self.dfsattn is None else self.dfsattn[1].name}
        if self.ranks is not None:  # as dfsviz capture's: one world size per file
            identity["ulysses_degree"] = self.ranks.degree

        def open_writer() -> CaptureWriter:
            out = Path(cfg.out)
            if cfg.resume:
                return CaptureWriter.resume(out, layout, identity, lock=self._lock, options=PYTHON_OPTIONS)
            from dfsviz.sparse.orders import make_order

            perms = {name: make_order(name, grid).perm for name in layout.orders}
            return CaptureWriter.create(out, layout, {**attrs, "run_identity": identity}, perms,
                                        overwrite=cfg.overwrite, lock=self._lock, options=PYTHON_OPTIONS)

        if self.ranks is None:
            self.writer = open_writer()
        else:
            self.writer = RankWriter.open(self.ranks, identity, layout.heads, open_writer)
        self._lock = None  # the writer holds it now
        self._todo = set(steps) - self.writer.completed
        self._reducer = AttentionReducer(self.rc, self.writer, None, self.ranks)
        if self.progress and (self.ranks is None or self.ranks.writes):
            from tqdm.auto import tqdm

            self._bar = tqdm(total=len(self._todo), unit="step", desc="record")

    def _attrs(self, source: ModelSource, latent, num_steps: int, guidance: float) -> dict:
        call, pipe = self._call, self.pipe
        prompt, negative = call.get("prompt"), call.get("negative_prompt")
        image = any(call.get(k) is not None for k in ("image", "image_embeds", "last_image"))
        lora = []
        if hasattr(pipe, "get_active_adapters"):
            try:
                lora = list(pipe.get_active_adapters())
            except (ValueError, ImportError):  # no PEFT adapter loaded / PEFT not installed
                lora = []
        attrs = run_attrs(self.config, source, latent, num_steps, guidance, prompt if isinstance(prompt, str) else "",
                          negative if isinstance(negative, str) else "")
        boundary = getattr(getattr(pipe, "config", None), "boundary_ratio", None)
        return {
            **attrs,
            "transformers": list(self.transformers),
            **({"boundary_ratio": float(boundary)} if boundary is not None and len(self.transformers) > 1 else {}),
            **({} if self.own_loop else {"pipeline_class": self.pipe_class.__name__}),
            "pipeline_call": {k: _describe(v) for k, v in call.items()},
            "conditioning": "image+text" if image else "text",
            "lora_adapters": lora,
            "vae_scale_factors": [source.vae_temporal, source.vae_spatial],
            "embeddings": "loop" if self.own_loop else "pipeline",
            **({} if self.dfsattn is None else {"dfsattn": self.dfsattn[1].name}),
        }

    # -- branches ------------------------------------------------------------------------------
    def _cond_sample(self, batch: int) -> int:
        """The batch element of the conditional branch in a call of ``batch`` samples."""
        if batch == 1:
            return 0
        if batch == 2 and self._cfg:
            return int(self.adapter.arch.cond_index)
        raise ValueError(
            f"the transformer got a batch of {batch} videos; dfsviz.record captures one video per call (one prompt, "
            "num_videos_per_prompt=1)"
        )

    def _targets(self, batch: int, calls: int, kwargs) -> list[tuple[int, str]]:
        """(batch element, branch) pairs this transformer call carries that the file keeps."""
        wanted = self.rc.layout.branches
        if batch == 2:
            ci = self._cond_sample(batch)
            pairs = [(ci, "cond"), (1 - ci, "uncond")]
        elif calls == 0:
            pairs = [(0, "cond")]
        elif calls == 1 and self._cfg:
            pairs = [(0, "uncond")]
            if "uncond" in wanted:
                text = self.adapter.text_len(self._conditioning(kwargs, 0))
                if text != self.rc.grid.text_len:
                    raise ValueError(
                        f"conditional and unconditional prompts have {self.rc.grid.text_len} and {text} real text "
                        "tokens; branches='both' needs equal sequence lengths (record with branches='cond')"
                    )
        else:
            raise ValueError(
                f"the transformer ran {calls + 1} times in step {self._step}; dfsviz.record knows one call per branch"
            )
        return [(s, b) for s, b in pairs if b in wanted]

    @staticmethod
    def _conditioning(kwargs, sample: int) -> Conditioning:
        embeds = kwargs.get("encoder_hidden_states")
        if not isinstance(embeds, torch.Tensor) or embeds.dim() != 3:
            raise ValueError("the transformer was called without `encoder_hidden_states` [B, T, C]: its text length is unknown")
        mask = kwargs.get("encoder_attention_mask")
        mask = mask[sample : sample + 1] if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        return Conditioning(embeds[sample : sample + 1], mask)

    # -- steps -----------------------------------------------------------------------------------
    def _on_record(self, rec) -> None:
        self._reducer(rec)

    def _end_step(self, writer: CaptureWriter) -> None:
        step, rc = writer.open_step, self.rc
        missing = {(l, b) for l in rc.layer_map.values() for b in rc.layout.branches} - self._reducer.seen
        if missing:
            raise ValueError(
                f"step {step}: no self-attention call reached SDPA for (layer, branch) {sorted(missing)[:4]}; the "
                "pipeline ran no such pass (branches='both' without guidance?) or its attention bypasses torch SDPA"
            )
        self._reducer.seen.clear()
        writer.end_step()
        if self._reducer.scale is not None and not writer.has_attr("softmax_scale"):
            writer.set_attr("softmax_scale", self._reducer.scale)
        self._step_seconds[step] = time.perf_counter() - self._step_start
        self._written.append(step)
        logger.info("recorded step %d in %.2f s", step, self._step_seconds[step])
        if self._bar is not None:
            self._bar.update(1)

    def _latent_frames(self, frames: int) -> np.ndarray:
        """The grid frame of each of ``frames`` decoded frames: a causal VAE of temporal factor k
        decodes latent frame 0 to frame 0 and latent frame f to frames k(f-1)+1 .. kf."""
        latent_frames = self.rc.latent[0]
        t = np.arange(frames)
        if latent_frames > 1 and (frames - 1) % (latent_frames - 1) == 0:
            latent = -(-t // ((frames - 1) // (latent_frames - 1)))
        else:
            latent = t * latent_frames // frames
        pt = self.adapter.patch(self.transformer.config)[0]
        return np.minimum(latent // pt, self.rc.grid.frames - 1)


# a grid for resolving layers and heads before the call (only the footprint count depends on it)
_ANY_GRID = LatentGrid(1, 1, 1)


def _default_steps(num_steps: int) -> tuple[int, ...]:
    from dfsviz.capture.config import default_capture_steps

    return default_capture_steps(num_steps)


def _videos_of_call(call: dict) -> int:
    """Videos a pipeline call makes: prompts (a list, or the batch of ``prompt_embeds``) times
    ``num_videos_per_prompt``."""
    prompt, embeds = call.get("prompt"), call.get("prompt_embeds")
    prompts = len(prompt) if isinstance(prompt, (list, tuple)) else embeds.shape[0] if isinstance(embeds, torch.Tensor) else 1
    return prompts * int(call.get("num_videos_per_prompt") or 1)


def _model_id(pipe, model, pipe_class: type) -> str:
    for owner in (pipe, model):
        name = getattr(getattr(owner, "config", None), "_name_or_path", None) or getattr(owner, "name_or_path", None)
        if name:
            return str(name)
    return pipe_class.__name__


def _describe(value):
    """A pipeline call argument as an attribute value: plain values as they are, tensors by
    shape, dtype and a digest of their values, a generator by its seed, other objects (images)
    by their type. Resume compares these: other embeddings or another seed are another run."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, torch.Tensor):
        data = value.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        digest = hashlib.sha256(data.tobytes()).hexdigest()[:16]
        return f"tensor {list(value.shape)} {str(value.dtype).replace('torch.', '')} sha256:{digest}"
    if isinstance(value, torch.Generator):
        return f"Generator seed {value.initial_seed()}"
    if isinstance(value, (list, tuple)) and all(isinstance(v, (str, int, float, bool)) for v in value):
        return list(value)
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, torch.Generator) for v in value):
        return [_describe(v) for v in value]
    return type(value).__name__


def _check_same_layout(transformers: dict, adapter) -> None:
    """ValueError unless the pipeline's transformers (Wan 2.2 A14B: two, of one family) have the
    same self-attention layer count, heads and head width: their steps share one file, by layer."""
    if len(transformers) < 2:
        return
    shapes = {name: (len(adapter.select_layers(model)), int(model.config.num_attention_heads),
                     int(model.config.attention_head_dim)) for name, model in transformers.items()}
    if len(set(shapes.values())) > 1:
        (a, (la, ha, da)), (b, (lb, hb, db)) = shapes.items()
        raise ValueError(
            f"`pipe`'s {a} and {b} differ ({la} and {lb} self-attention layers, {ha} and {hb} heads of width {da} and "
            f"{db}); dfsviz.record stores both in one file, layer by layer, so they need the same layer count, heads "
            "and head width (Wan 2.2 A14B's do)"
        )


def _dfsattn_of(transformers: dict):
    """(DFSState, DFSConfig) of the ``apply_dfsattn`` active on the pipeline's transformers, or None."""
    from dfsviz.accel import DFSState

    by_state = {id(p.state): p for model in transformers.values() for m in model.modules()
                if isinstance(getattr(p := getattr(m, "processor", None), "state", None), DFSState)}
    if not by_state:
        return None
    if len(by_state) > 1:
        raise ValueError("the pipeline's transformers run two separate apply_dfsattn handles; apply it once to the pipeline")
    processor = next(iter(by_state.values()))
    return processor.state, processor.config


def _with_dfsattn_blocks(settings: dict, config) -> dict:
    """``settings`` with the block and an order of the DFSAttn ``config``, so its masks fit the
    capture's maps; ValueError where the caller chose others."""
    block = settings.get("block", config.block)
    if block != config.block:
        raise ValueError(
            f"`block`={block!r}, but apply_dfsattn attends blocks of {config.block}; record with block={config.block} "
            "(or leave it out) to store the masks DFSAttn used"
        )
    orders = settings.get("orders")
    if orders is None:
        default = CaptureConfig.__dataclass_fields__["orders"].default
        orders = default if config.order in default else (*default, config.order)
    elif config.order not in orders:
        raise ValueError(
            f"`orders`={list(orders)!r} leaves out {config.order!r}, the order apply_dfsattn runs; add it (or leave "
            "`orders` out) to store the masks DFSAttn used"
        )
    return {**settings, "block": block, "orders": orders}

"""Capture attention statistics from diffusers video DiTs into the HDF5 store.

* :class:`AttentionCapture` (hooks): record post-RoPE Q/K/V of self-attention at SDPA.
* adapters: Wan, HunyuanVideo, CogVideoX, generic (grid, layers, forward, padding).
* :class:`CaptureConfig` (config), :func:`load_model_source` (sources), :func:`resolve_capture`
  (resolve), the per-call reduction (reduce) and :func:`run_capture` (runner, the denoising
  loop): the ``dfsviz capture`` engine.
* :func:`record` / :class:`Recording` (record): capture the user's own pipeline call
  (``with dfsviz.record(pipe, "run.h5"): pipe(...)``).
* :func:`capture_run_set` / :class:`RunSetConfig` / :func:`open_run_set` (runset): several
  clips (prompts x seeds) in one command, one capture file each, in a run-set directory.
* :class:`CaptureWriter` (writer) / :class:`CaptureReader`, :func:`open_capture` (reader): the
  file format, version :data:`FORMAT_VERSION` (schema, ``docs/format.md``).
"""

from dfsviz.capture.adapters import (
    ADAPTERS,
    CogVideoXAdapter,
    Conditioning,
    GenericAdapter,
    HunyuanVideoAdapter,
    ModelAdapter,
    WanAdapter,
    adapter_for,
    adapter_names,
    get_adapter,
    supported_architectures,
)
from dfsviz.capture.hooks import AttentionCapture, AttentionRecord
from dfsviz.capture.record import Recording, record
from dfsviz.capture.config import CaptureConfig, default_capture_steps
from dfsviz.capture.resolve import ResolvedCapture, resolve_capture
from dfsviz.capture.runner import CaptureResult, run_capture
from dfsviz.capture.sources import ModelSource, load_model_source
from dfsviz.capture.runset import (
    RunSet,
    RunSetClip,
    RunSetConfig,
    RunSetResult,
    capture_run_set,
    describe_run_set,
    open_run_set,
    read_prompts,
)
from dfsviz.capture.reader import CaptureReader, StoredStats, open_capture
from dfsviz.capture.schema import FORMAT_VERSION, StoreLayout
from dfsviz.capture.writer import CaptureWriter

__all__ = [
    "ADAPTERS",
    "AttentionCapture",
    "AttentionRecord",
    "CaptureConfig",
    "CaptureReader",
    "CaptureResult",
    "CaptureWriter",
    "CogVideoXAdapter",
    "Conditioning",
    "FORMAT_VERSION",
    "GenericAdapter",
    "HunyuanVideoAdapter",
    "ModelAdapter",
    "ModelSource",
    "Recording",
    "ResolvedCapture",
    "RunSet",
    "RunSetClip",
    "RunSetConfig",
    "RunSetResult",
    "StoreLayout",
    "StoredStats",
    "WanAdapter",
    "adapter_for",
    "adapter_names",
    "capture_run_set",
    "default_capture_steps",
    "describe_run_set",
    "get_adapter",
    "load_model_source",
    "open_capture",
    "open_run_set",
    "read_prompts",
    "record",
    "resolve_capture",
    "run_capture",
    "supported_architectures",
]

"""dfsviz: see, measure and speed up sparse attention in video diffusion transformers."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from dfsviz._version import __version__

if TYPE_CHECKING:
    from dfsviz._package_data import sample_capture  # noqa: F401
    from dfsviz.accel import DFSConfig, apply_dfsattn, remove_dfsattn  # noqa: F401
    from dfsviz.capture.record import record  # noqa: F401
    from dfsviz.capture.runset import open_run_set  # noqa: F401
    from dfsviz.analysis.measured_capture import MeasuredCapture

__all__ = ["DFSConfig", "__version__", "apply_dfsattn", "open", "open_run_set", "record", "remove_dfsattn",
           "sample_capture"]

# Names served from subpackages on first use, so `import dfsviz` (and `dfsviz.sparse`)
# never pulls in Triton, diffusers or h5py.
_LAZY = {"apply_dfsattn": "dfsviz.accel", "remove_dfsattn": "dfsviz.accel", "DFSConfig": "dfsviz.accel",
         "sample_capture": "dfsviz._package_data", "open_run_set": "dfsviz.capture.runset",
         "record": "dfsviz.capture.record"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dfsviz' has no attribute {name!r}")


def open(path: str | os.PathLike) -> "MeasuredCapture":  # noqa: A001 - `dfsviz.open(path)` is the documented entry point
    """Open a capture file read-only: ``dfsviz.open("run.h5")`` -> MeasuredCapture.

    It gives block statistics, scores, footprints and Q/K/V by (step, layer, order, head)
    (the capture's reader), and masks, recall and density at any budget; see docs/format.md.
    Imported lazily so ``import dfsviz`` stays light.
    """
    from dfsviz.analysis.measured_capture import MeasuredCapture

    return MeasuredCapture(path)

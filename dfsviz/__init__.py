"""dfsviz: see, measure and speed up sparse attention in video diffusion transformers."""

from __future__ import annotations

import os
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

try:
    __version__ = version("dfsviz")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

if TYPE_CHECKING:
    from dfsviz.capture.store import CaptureReader

__all__ = ["__version__", "open"]


def open(path: str | os.PathLike) -> "CaptureReader":  # noqa: A001 - `dfsviz.open(path)` is the documented entry point
    """Open a capture file read-only: ``dfsviz.open("run.h5")`` -> CaptureReader.

    The reader gives block statistics, scores, footprints and Q/K/V by (step, layer,
    order, head), and masks, recall and density at any budget; see docs/format.md.
    Imported lazily so ``import dfsviz`` stays light.
    """
    from dfsviz.capture.store import open_capture

    return open_capture(path)

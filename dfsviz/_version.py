"""The installed dfsviz version, in a module that imports nothing of dfsviz, so that any
layer (the store's file attributes, a calibrated plan, a run set's manifest) can read it
without importing the package face."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

__all__ = ["__version__"]

try:
    __version__ = version("dfsviz")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

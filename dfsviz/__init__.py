"""dfsviz: see, measure and speed up sparse attention in video diffusion transformers."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("dfsviz")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]

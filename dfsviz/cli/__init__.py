"""The ``dfsviz`` command line: a thin click layer over the library.

Each subcommand lives in its own module of this package; it parses options into
a config, calls one library function and prints the result. Library errors
(``ValueError``/``TypeError``) become one red line and exit code 2.
"""

from __future__ import annotations

import functools
import os
import sys

import click

from dfsviz._version import __version__

__all__ = ["main", "fail_cleanly"]


def parse_names(spec: str, option: str, allowed) -> tuple[str, ...]:
    """"raster,hilbert3d" -> ("raster", "hilbert3d"): a comma-separated list of distinct names
    from ``allowed`` (a registry's names), in the order given; "all" -> every name of ``allowed``
    in registry order. ValueError naming the option and the choices otherwise."""
    allowed = list(allowed)
    if spec.strip() == "all":
        return tuple(allowed)
    names = tuple(name.strip() for name in spec.split(",") if name.strip())
    if not names or len(set(names)) != len(names) or any(name not in allowed for name in names):
        raise ValueError(
            f"`{option}` must be a comma-separated list of distinct names from {','.join(allowed)}, or all "
            f"(got {spec!r})"
        )
    return names


def fail_cleanly(func):
    """Turn a library ValueError/TypeError into one red line and exit code 2, never a traceback."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        abandoned = len(_abandoned_captures())
        try:
            return func(*args, **kwargs)
        except (ValueError, TypeError) as exc:
            click.secho(f"Error: {exc}", fg="red", err=True)
            if len(_abandoned_captures()) > abandoned:
                # a capture write failed: HDF5 cannot close that file, and Python's exit would
                # make it try (and may crash). The disk holds every completed step: end here.
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(2)
            raise SystemExit(2) from None

    return wrapper


def _abandoned_captures() -> list[str]:
    writer = sys.modules.get("dfsviz.capture.writer")  # never imported just to ask
    return writer.abandoned_files() if writer is not None else []


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="dfsviz")
def main() -> None:
    """See, measure and speed up sparse attention in video diffusion transformers.

    \b
    Example:
      dfsviz orders --grid 21x45x80 --block 128
    """


# Subcommand modules register themselves on `main` when imported.
_COMMAND_MODULES = ("orders", "recall", "capture", "inspect", "report", "calibrate", "app")


def _register() -> None:
    import importlib

    for name in _COMMAND_MODULES:
        importlib.import_module(f"dfsviz.cli.{name}")


_register()

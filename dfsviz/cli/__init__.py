"""The ``dfsviz`` command line: a thin click layer over the library.

Each subcommand lives in its own module of this package; it parses options into
a config, calls one library function and prints the result. Library errors
(``ValueError``/``TypeError``) become one red line and exit code 2.
"""

from __future__ import annotations

import functools

import click

from dfsviz import __version__

__all__ = ["main", "fail_cleanly"]


def fail_cleanly(func):
    """Turn a library ValueError/TypeError into one red line and exit code 2, never a traceback."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except (ValueError, TypeError) as exc:
            click.secho(f"Error: {exc}", fg="red", err=True)
            raise SystemExit(2) from None

    return wrapper


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

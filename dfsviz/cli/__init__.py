"""The ``dfsviz`` command line: a thin click layer over the library.

Each subcommand lives in its own module of this package; it parses options into
a config, calls one library function and prints the result. Library errors
(``ValueError``/``TypeError``) and file-system errors (``OSError``) become one red line
and exit code 2; outputs are checked before the work starts (``check_output``).
"""

from __future__ import annotations

import errno
import functools
import os
import sys
import tempfile
from pathlib import Path

import click

from dfsviz._version import __version__
from dfsviz.capture.file_safety import missing_folder

__all__ = ["check_output", "fail_cleanly", "main"]


def parse_names(spec: str, option: str, allowed) -> tuple[str, ...]:
    """"raster,hilbert3d" -> ("raster", "hilbert3d"): a comma-separated list of distinct names
    from ``allowed`` (a registry's names), in the order given; "all" -> every name of ``allowed``
    in registry order. ValueError naming the option and the choices otherwise."""
    allowed = list(allowed)
    if spec.strip() == "all":
        return tuple(allowed)
    names = tuple(name.strip() for name in spec.split(","))
    if len(set(names)) != len(names) or any(name not in allowed for name in names):
        raise ValueError(
            f"`{option}` must be a comma-separated list of distinct names from {','.join(allowed)}, or all "
            f"(got {spec!r})"
        )
    return names


def check_output(path: str, option: str, *, folder: bool = False) -> None:
    """Refuse an output that cannot be written before any work is done, so a typo costs nothing
    (click's Path type has already refused a folder for a file and the reverse): a file's folder
    must exist; a folder (``folder``: created with its parents when written) must not lie under a
    file; the nearest existing folder must take a new file (tried: a temporary file is created and
    removed, since permission bits say nothing for root or for /proc). ValueError naming ``option``."""
    out = Path(path)
    if folder:
        existing = next(p for p in (out, *out.parents) if p.exists())
        if not existing.is_dir():
            raise ValueError(f"`{option}` {path!r} cannot be created: {str(existing)!r} is a file")
    else:
        existing = out.parent
        state = missing_folder(existing)
        if state is not None:
            raise ValueError(f"`{option}` {path!r}: its folder {str(existing)!r} {state}")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".dfsviz-probe-")
    except OSError as exc:
        reason = "no permission to write in" if exc.errno in (errno.EACCES, errno.EPERM) else "cannot write in"
        raise ValueError(f"`{option}` {path!r}: {reason} {str(existing)!r}"
                         + ("" if reason.startswith("no") else f" ({exc.strerror})")) from None
    os.close(fd)
    os.unlink(probe)


def fail_cleanly(func):
    """Turn a library ValueError/TypeError, or an OSError (a missing file, a full disk), into one
    red line and exit code 2, never a traceback. The command's parameters, which the library
    names as Python does (`target_recall`), are shown as its options (`--target-recall`)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        abandoned = len(_abandoned_captures())
        try:
            return func(*args, **kwargs)
        except (ValueError, TypeError, OSError) as exc:
            message = f"{type(exc).__name__}: {exc}" if isinstance(exc, OSError) else str(exc)
            click.secho(f"Error: {_as_options(message)}", fg="red", err=True)
            if len(_abandoned_captures()) > abandoned:
                # a capture write failed: HDF5 cannot close that file, and Python's exit would
                # make it try (and may crash). The disk holds every completed step: end here.
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(2)
            raise SystemExit(2) from None

    return wrapper


def _as_options(message: str) -> str:
    """``message`` with the running command's parameter names in backticks as its options."""
    ctx = click.get_current_context(silent=True)
    for param in ctx.command.params if ctx is not None else ():
        if isinstance(param, click.Option) and param.name:
            option = max(param.opts, key=len)
            # an option parsed by the command (`seeds_spec`) reaches the library as its value (`seeds`)
            for name in {param.name, param.name.removesuffix("_spec")}:
                message = message.replace(f"`{name}`", f"`{option}`")
    return message


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

"""``dfsviz inspect``: settings, completeness, sizes and validity of a capture file."""

from __future__ import annotations

import json

import click

from dfsviz.cli import fail_cleanly, main


def _plain(value):
    """JSON-ready scalars (h5py hands back numpy types)."""
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


@main.command("inspect", epilog="\b\nExample:\n  dfsviz inspect capture.h5\n  dfsviz inspect capture.h5 --json")
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@fail_cleanly
def inspect_command(path: str, as_json: bool) -> None:
    """Print a capture's settings, completeness and sizes, and validate every stored map.

    Exit code 2 when the file cannot be read (unknown format version, not a capture, a
    damaged or crafted structure) or a value fails validation (block-mass rows that do not
    sum to 1, non-finite statistics, ...); each problem is one line.
    """
    from dfsviz.capture.reader import CaptureReader

    with CaptureReader(path) as reader:
        info = {k: _plain(v) for k, v in reader.summary().items()}
        problems = reader.validate()
    info["problems"] = problems
    if as_json:
        click.echo(json.dumps(info, indent=1))
    else:
        width = max(len(k) for k in info)
        for key, value in info.items():
            if key != "problems":
                click.echo(f"{key.ljust(width)}  {value}")
        if not info["complete"]:
            click.secho(
                f"incomplete: {len(info['completed_steps'])} of {len(info['planned_steps'])} steps; "
                "continue with `dfsviz capture ... --resume`",
                fg="yellow",
            )
    if problems:
        for problem in problems:
            click.secho(f"invalid: {problem}", fg="red", err=True)
        raise SystemExit(2)

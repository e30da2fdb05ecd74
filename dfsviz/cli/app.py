"""``dfsviz app``: serve the dashboard over the capture files under one or more roots."""

from __future__ import annotations

from pathlib import Path

import click

from dfsviz._package_data import DATA_DIR
from dfsviz.cli import fail_cleanly, main

_LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def default_roots() -> list[Path]:
    """The package's shipped captures (``dfsviz/data/captures``) and ``runs/`` in the working
    directory, those that exist."""
    candidates = [DATA_DIR / "captures", Path.cwd() / "runs"]
    return [p for p in candidates if p.is_dir()]


@main.command(
    "app",
    epilog="\b\nExamples:\n  dfsviz app                       # shipped sample + ./runs/, http://127.0.0.1:8050\n"
    "  dfsviz app --root runs/ --port 8060\n  dfsviz app --root /data/captures --host 0.0.0.0   # reachable by others: warns",
)
@click.option("--root", "roots", multiple=True, type=click.Path(file_okay=False),
              help="Folder of capture files (repeatable). Default: the shipped sample captures and ./runs/.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface to bind. Anything but localhost exposes the captures to the network.")
@click.option("--port", default=8050, show_default=True, type=click.IntRange(1, 65535), help="TCP port.")
@click.option("--dry-run", is_flag=True, help="List the roots and their captures, then exit without serving.")
@fail_cleanly
def app_command(roots: tuple[str, ...], host: str, port: int, dry_run: bool) -> None:
    """Serve the dashboard: raster vs Hilbert masks, recall, theory, drift and live runs.

    Only files under the roots are served (symlinks are resolved first); every view's
    selection is in the URL, so a link reproduces it.
    """
    from dfsviz.app.data import CaptureCatalog

    paths = [Path(r) for r in roots] or default_roots()
    if not paths:
        raise ValueError("no capture root: pass --root DIR (neither the shipped sample captures nor ./runs/ exist here)")
    catalog = CaptureCatalog(paths)
    entries = catalog.entries()
    click.echo("roots: " + ", ".join(f"{label}={path}" for label, path in catalog.roots.items()))
    click.echo(f"captures: {len(entries)}")
    for e in entries:
        click.echo(f"  {e.id}  [{e.status}]" + (f"  {e.message}" if e.message and e.status != "ok" else ""))
    if host not in _LOCAL_HOSTS:
        click.secho(f"warning: binding {host} makes the dashboard and these captures reachable from other machines",
                    fg="yellow", err=True)
    if dry_run:
        click.echo(f"would serve http://{host}:{port}/")
        return
    import torch

    from dfsviz.app import create_app

    # Requests touch maps of at most a few MB, where intra-op threads cost more than they
    # give (10-50x slower on a busy machine); parallelism comes from the threaded server.
    torch.set_num_threads(1)
    click.echo(f"serving http://{host}:{port}/  (Ctrl+C stops)")
    create_app(paths).run(host=host, port=port, debug=False)

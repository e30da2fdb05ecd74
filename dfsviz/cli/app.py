"""``dfsviz app``: serve the dashboard over the capture files under one or more roots."""

from __future__ import annotations

import errno
import re
import socket
from pathlib import Path

import click

from dfsviz._package_data import DATA_DIR
from dfsviz.app import LOOPBACK_NAMES
from dfsviz.cli import fail_cleanly, main

# the loopback names as interfaces to bind ("::1" where a Host header gives "[::1]")
_LOCAL_HOSTS = tuple(name.strip("[]") for name in LOOPBACK_NAMES)


def default_roots() -> list[Path]:
    """The package's shipped captures (``dfsviz/data/captures``) and ``runs/`` in the working
    directory, those that exist."""
    candidates = [DATA_DIR / "captures", Path.cwd() / "runs"]
    return [p for p in candidates if p.is_dir()]


def ensure_port_free(host: str, port: int) -> None:
    """Raise ValueError unless a server can listen on ``host``:``port`` now.

    Probes the way the dashboard's server binds (werkzeug: IPv6 when the host has a colon,
    SO_REUSEADDR), so a port left in TIME_WAIT counts as free and a listening one does not.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                other = port + 1 if port < 65535 else port - 1
                raise ValueError(f"port {port} on {host} is in use; pass --port N (e.g. --port {other})") from None
            reason = exc.strerror or str(exc)
            raise ValueError(f"cannot listen on {host} port {port} ({reason}); pass --host with an address of "
                             "this machine (127.0.0.1 by default) or another --port") from None


@main.command(
    "app",
    epilog="\b\nExamples:\n  dfsviz app                       # shipped sample + ./runs/, http://127.0.0.1:8050\n"
    "  dfsviz app --root runs/ --port 8060\n  dfsviz app --root /data/captures --host 0.0.0.0   # reachable by others: warns",
)
@click.option("--root", "roots", multiple=True, type=click.Path(file_okay=False),
              help="Folder of capture files (repeatable). Default: the shipped sample captures and ./runs/.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface to bind. Anything but localhost exposes the captures to the network, without a login.")
@click.option("--port", default=8050, show_default=True, type=click.IntRange(1, 65535), help="TCP port.")
@click.option("--trusted-host", "trusted_hosts", multiple=True,
              help="Another name requests may give in their Host header while bound to 127.0.0.1 or ::1 "
                   "(repeatable), e.g. the domain of a reverse proxy that forwards its own; others are answered 400.")
@click.option("--dry-run", is_flag=True, help="List the roots and their captures, then exit without serving.")
@fail_cleanly
def app_command(roots: tuple[str, ...], host: str, port: int, trusted_hosts: tuple[str, ...], dry_run: bool) -> None:
    """Serve the dashboard: raster vs Hilbert masks, recall, theory, drift and live runs.

    Only files under the roots are served (symlinks are resolved first); every view's
    selection is in the URL, so a link reproduces it.
    """
    from dfsviz.app.data import CaptureCatalog

    if not host.strip():  # werkzeug would fall back to $HOST, which may be every interface
        raise ValueError("`--host` must name an interface (127.0.0.1 by default)")
    if trusted_hosts and host not in _LOCAL_HOSTS:
        raise ValueError("`--trusted-host` applies to a dashboard bound to 127.0.0.1, localhost or ::1; bound "
                         f"to {host}, it answers any Host")
    bad = [name for name in trusted_hosts if not re.fullmatch(r"\.?[A-Za-z0-9.-]+", name)]
    if bad:
        raise ValueError(f"`--trusted-host` takes host names without a port or scheme (got {bad[0]!r}), e.g. "
                         "dfsviz.lab.example")
    if not dry_run:  # a taken port or a foreign address: one line at once, before the roots are read
        ensure_port_free(host, port)
    paths = [Path(r) for r in roots] or default_roots()
    if not paths:
        raise ValueError("no capture root: pass --root DIR (neither the shipped sample captures nor ./runs/ "
                         "exist here)")
    with CaptureCatalog(paths) as catalog:  # closed: its background checks would run beside the app's
        entries = catalog.entries()
    click.echo("roots: " + ", ".join(f"{label}={path}" for label, path in catalog.roots.items()))
    click.echo(f"captures: {len(entries)}")
    for e in entries:
        click.echo(f"  {e.id}  [{e.status}]" + (f"  {e.message}" if e.message and e.status != "ok" else ""))
    if host not in _LOCAL_HOSTS:
        click.secho(f"warning: binding {host} makes the dashboard and these captures reachable from other machines; "
                    "it has no login: anyone who can reach the port can read the captures and run Live jobs",
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
    # bound to a loopback address, only requests naming this machine by its loopback names are
    # answered (DNS rebinding)
    trusted = (*LOOPBACK_NAMES, *trusted_hosts) if host in _LOCAL_HOSTS else None
    create_app(paths, trusted_hosts=trusted).run(host=host, port=port, debug=False)

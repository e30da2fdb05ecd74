"""The dfsviz dashboard (Dash Pages): raster vs Hilbert masks, recall, theory, drift, calibration, live runs.

``PAGES`` names the page modules in navigation order (``dfsviz.app.pages.PAGE_MODULES``).

Four layers, one way: this shell (:func:`create_app`), the pages (``dfsviz.app.pages``,
one ``dash.register_page`` each, every selection in the URL query string), the data
module :mod:`dfsviz.app.data` (the only one that opens HDF5: read-only, cached, confined
to the capture roots) and the pure figure builders of :mod:`dfsviz.figures`.

    from dfsviz.app import create_app
    create_app("runs/").run(host="127.0.0.1", port=8050)
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence

__all__ = ["create_app", "host_is_trusted", "LOOPBACK_NAMES", "MAX_REQUEST_BYTES", "PAGES"]

logger = logging.getLogger(__name__)

#: The Host names of a dashboard bound to a loopback address, 127.0.0.1 or ::1 (create_app's
#: ``trusted_hosts``).
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")

#: The largest request body answered (larger ones get 413). The biggest requests carry a figure
#: back for its CSV download: 64 MB is about seven times a block map of HunyuanVideo 720p (931 x
#: 931 blocks at 8 bytes a value, in base64: 9.2 MB), and bounds what one request may make the
#: server decode and write out.
MAX_REQUEST_BYTES = 64 << 20

# A Host header: a name or an IPv4 address, or an IPv6 address in brackets; then perhaps a port.
_HOST_HEADER = re.compile(r"(\[[0-9a-f:.]+\]|[a-z0-9.-]+)(?::[0-9]{1,5})?", re.IGNORECASE)


def host_is_trusted(header: str | None, trusted_hosts: Sequence[str]) -> bool:
    """Whether a request's Host header names one of ``trusted_hosts`` (its port aside; a
    name starting with a dot admits that domain's subdomains, as Flask's TRUSTED_HOSTS, whose
    matching cannot take an IPv6 address)."""
    match = _HOST_HEADER.fullmatch(header or "")
    if match is None:
        return False
    name = match.group(1).lower()
    for ref in (ref.lower() for ref in trusted_hosts):
        if name == ref.removeprefix(".") or (ref.startswith(".") and name.endswith(ref)):
            return True
    return False


def __getattr__(name: str):
    # PAGES follows the page registry (dfsviz.app.pages.PAGE_MODULES), read when asked so
    # that importing dfsviz.app does not import dash
    if name == "PAGES":
        from dfsviz.app import pages

        return tuple(module.__name__.rpartition(".")[2] for module in pages.PAGE_MODULES)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def create_app(
    root: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    max_open: int = 8,
    cache_bytes: int = 1 << 30,
    title: str = "dfsviz",
    trusted_hosts: Sequence[str] | None = LOOPBACK_NAMES,
):
    """Build the dashboard over the capture files under ``root``.

    Args:
        root: one folder or several; every ``*.h5``/``*.hdf5`` below them is served and
            nothing outside them is read (symlinks are resolved before the check).
        max_open: capture files kept open (LRU).
        cache_bytes: memory for memoised maps (LRU), bytes.
        title: browser tab title.
        trusted_hosts: the names a request's Host header may give (its port aside; IPv6 addresses
            in brackets, "[::1]"); any other is answered 400. The default, the loopback names, is for
            a server bound to 127.0.0.1 or ::1: a web page the user visits cannot then reach it under
            a domain of its own that resolves to the loopback address (DNS rebinding). None accepts
            any Host (a server bound to another interface).

    The page style is ``dfsviz/app/assets/dfsviz.css`` (Dash serves the package's ``assets/``).

    Returns:
        a ``dash.Dash`` app (``app.server`` is the Flask server); ``app.run(host=..., port=...)``
        serves it. Raises ValueError when a root is not a folder.
    """
    import dash
    import flask
    from dash import dcc, html

    from dfsviz.app import data
    from dfsviz.app.pages import PAGE_MODULES, common

    roots = [root] if isinstance(root, (str, os.PathLike)) else list(root)
    catalog = data.CaptureCatalog(roots, max_open=max_open, cache_bytes=cache_bytes)
    app = dash.Dash(
        __name__,
        use_pages=True,
        pages_folder="",
        title=title,
        suppress_callback_exceptions=True,
        update_title=None,
    )
    app.server.config[data.CONFIG_KEY] = catalog
    app.server.config["MAX_CONTENT_LENGTH"] = MAX_REQUEST_BYTES
    if trusted_hosts is not None:
        trusted = tuple(trusted_hosts)

        @app.server.before_request
        def _refuse_foreign_host():
            if not host_is_trusted(flask.request.headers.get("Host"), trusted):
                flask.abort(400)

    # the background check of large files waits while a request is served (CaptureCatalog.serving)
    @app.server.before_request
    def _pause_check():
        flask.g.dfsviz_serving = catalog.serving()
        flask.g.dfsviz_serving.__enter__()

    @app.server.teardown_request
    def _resume_check(_exc):
        serving = flask.g.pop("dfsviz_serving", None)
        if serving is not None:
            serving.__exit__(None, None, None)

    # the registry of Dash Pages is process-global: rebuild it for this app
    dash.page_registry.clear()
    for module in PAGE_MODULES:
        module.register(app)
    nav = [html.Span("dfsviz", className="dfs-brand")] + [
        dcc.Link(module.NAME, href=module.PATH, id=f"nav-{module.PREFIX}") for module in PAGE_MODULES
    ]
    app.layout = html.Div([html.Nav(nav, className="dfs-nav"), html.Div(dash.page_container, className="dfs-page")])
    common.register_shell_callbacks(app, PAGE_MODULES)
    logger.info("dashboard over %s", ", ".join(str(p) for p in catalog.roots.values()))
    return app

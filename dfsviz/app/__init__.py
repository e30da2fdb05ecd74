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
from collections.abc import Sequence

__all__ = ["create_app", "PAGES"]

logger = logging.getLogger(__name__)


def __getattr__(name: str):
    # PAGES follows the page registry (dfsviz.app.pages.PAGE_MODULES), read when asked so
    # that importing dfsviz.app does not import dash
    if name == "PAGES":
        from dfsviz.app import pages

        return tuple(module.__name__.rpartition(".")[2] for module in pages.PAGE_MODULES)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_CSS = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 0; color: #222; }
.dfs-nav { display: flex; gap: 18px; align-items: center; padding: 10px 18px; background: #1f2937; }
.dfs-nav a { color: #e5e7eb; text-decoration: none; font-weight: 500; }
.dfs-nav a:hover { color: #fff; text-decoration: underline; }
.dfs-brand { color: #fff; font-weight: 700; margin-right: 12px; }
.dfs-page { padding: 12px 18px; }
.dfs-controls { display: flex; flex-wrap: wrap; gap: 12px; align-items: flex-end; margin: 8px 0 12px; }
.dfs-control { min-width: 130px; }
.dfs-control label { display: block; font-size: 12px; color: #555; margin-bottom: 2px; }
.dfs-file { min-width: 320px; }
.dfs-banner { padding: 8px 12px; border-radius: 6px; margin: 6px 0; font-size: 14px; }
.dfs-banner-error { background: #fee2e2; border: 1px solid #f87171; }
.dfs-banner-warning { background: #fef3c7; border: 1px solid #f59e0b; }
.dfs-banner-info { background: #e0f2fe; border: 1px solid #38bdf8; }
.dfs-row { display: flex; flex-wrap: wrap; gap: 12px; }
.dfs-card { flex: 1 1 480px; min-width: 420px; border: 1px solid #e5e7eb; border-radius: 6px; padding: 6px; }
.dfs-card-bar { display: flex; justify-content: flex-end; }
.dfs-card-bar button, .dfs-button { font-size: 12px; padding: 3px 10px; cursor: pointer; }
.dfs-table { border-collapse: collapse; font-size: 13px; margin: 6px 0; }
.dfs-table td, .dfs-table th { border: 1px solid #e5e7eb; padding: 3px 8px; text-align: left; }
.dfs-note { font-size: 13px; color: #555; }
.dfs-help { font-size: 11px; color: #666; max-width: 230px; margin-top: 2px; line-height: 1.25; }
.dfs-controls-help { align-items: flex-start; }
.dfs-command { font-family: ui-monospace, monospace; font-size: 12px; background: #f3f4f6; padding: 4px 8px; border-radius: 4px; }
"""


def _index_string() -> str:
    return (
        "<!DOCTYPE html><html><head>{%metas%}<title>{%title%}</title>{%favicon%}{%css%}"
        f"<style>{_CSS}</style></head><body>{{%app_entry%}}<footer>{{%config%}}{{%scripts%}}{{%renderer%}}</footer>"
        "</body></html>"
    )


def create_app(
    root: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    max_open: int = 8,
    cache_bytes: int = 1 << 30,
    title: str = "dfsviz",
):
    """Build the dashboard over the capture files under ``root``.

    Args:
        root: one folder or several; every ``*.h5``/``*.hdf5`` below them is served and
            nothing outside them is read (symlinks are resolved before the check).
        max_open: capture files kept open (LRU).
        cache_bytes: memory for memoised maps (LRU), bytes.
        title: browser tab title.

    Returns:
        a ``dash.Dash`` app (``app.server`` is the Flask server); ``app.run(host=..., port=...)``
        serves it. Raises ValueError when a root is not a folder.
    """
    import dash
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
    app.index_string = _index_string()
    app.server.config[data.CONFIG_KEY] = catalog
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

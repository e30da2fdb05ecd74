"""The dashboard shell: the page list follows the page registry (no second hand-written list)."""

from __future__ import annotations

import types

import dfsviz.app
from dfsviz.app import pages


def test_pages_follow_the_page_modules(monkeypatch):
    extra = types.ModuleType("dfsviz.app.pages.extra")
    monkeypatch.setattr(pages, "PAGE_MODULES", (*pages.PAGE_MODULES, extra))
    names = dfsviz.app.PAGES
    assert len(names) == len(pages.PAGE_MODULES) and names[0] == "overview" and names[-1] == "extra"
    assert {"masks", "recall", "theory", "drift", "calibrate", "live"} <= set(names)


def test_the_style_sheet_is_served_from_the_app_assets(tmp_path):
    """The page's CSS lives in dfsviz/app/assets/ (Dash serves it and links it from every page)."""
    from dfsviz.app import create_app

    app = create_app(tmp_path)
    client = app.server.test_client()
    index = client.get("/").get_data(as_text=True)
    assert "/assets/dfsviz.css" in index and ".dfs-card {" not in index
    css = client.get("/assets/dfsviz.css")
    assert css.status_code == 200 and ".dfs-card" in css.get_data(as_text=True) and ".dfs-info" in css.get_data(as_text=True)
    app.server.config["DFSVIZ_CATALOG"].close()

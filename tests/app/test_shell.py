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

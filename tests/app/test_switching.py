"""Switching the capture from the picker, on every page that shows one, in a real browser.

The served root holds two usable captures (``runs/good.h5`` and the interrupted
``runs/partial.h5``). On each page the picker switches to the other capture and back: the
page shows the chosen file (picker, banner, address bar) and stays there; it never snaps
back to the file of the address it was opened with. Every wait is on the condition checked.
"""

from __future__ import annotations

import re

import pytest

pytest.importorskip("playwright")
from playwright.sync_api import expect  # noqa: E402
from test_browser import choose, wait_drawn  # noqa: E402

# page -> (path with the query the page needs on the tiny model, prefix, a figure it draws).
# A switch opens the other capture with that file's defaults; on the tiny random-weight model
# the Calibrate page's default target recall 0.9 is out of reach, so it answers with a refusal
# banner (or a plan): either shows the page calculated for the chosen file.
PAGES = {
    "overview": ("/", "ov", "ov-recall"),
    "masks": ("/masks", "mk", "mk-left"),
    "recall": ("/recall", "rc", "rc-curves"),
    "theory": ("/theory", "th", "th-bound2"),
    "drift": ("/drift", "dr", "dr-recall"),
    "calibrate": ("/calibrate?target_recall=0.7", "cb", None),
}
SLOW = 120_000  # a calibration of the other capture runs in the callback


def shows(page, prefix: str, figure: str, cid: str, label: str) -> None:
    """The page shows capture ``cid``: picker, address bar, and its figure drawn for it."""
    expect(page.locator(f"#{prefix}-file")).to_have_text(label, timeout=SLOW)
    expect(page).to_have_url(re.compile(rf"[?&]file={re.escape(cid)}(&|$)"), timeout=SLOW)
    if figure is None:
        expect(page.locator(f"#{prefix}-summary-table, #{prefix}-banner .dfs-banner").first).to_be_visible(timeout=SLOW)
    else:
        wait_drawn(page, figure, timeout=SLOW)


@pytest.mark.parametrize("name", list(PAGES))
def test_the_picker_switches_captures_and_the_page_stays_there(page, app_url, console, name):
    path, prefix, figure = PAGES[name]
    sep = "&" if "?" in path else "?"
    page.goto(f"{app_url}{path}{sep}file=runs/good.h5")
    shows(page, prefix, figure, "runs/good.h5", "runs/good.h5")
    expect(page.locator(f"#{prefix}-link-banner")).not_to_contain_text("incomplete")
    # the page rewrites the address with every control: the switch must win over that address
    expect(page).to_have_url(re.compile(r"file=runs/good\.h5&"))
    choose(page, f"{prefix}-file", "runs/partial.h5 (incomplete)")
    expect(page.locator(f"#{prefix}-link-banner")).to_contain_text("runs/partial.h5: incomplete capture",
                                                                  timeout=SLOW)
    shows(page, prefix, figure, "runs/partial.h5", "runs/partial.h5 (incomplete)")
    # and back again
    choose(page, f"{prefix}-file", "runs/good.h5")
    expect(page.locator(f"#{prefix}-link-banner")).not_to_contain_text("incomplete", timeout=SLOW)
    shows(page, prefix, figure, "runs/good.h5", "runs/good.h5")
    # the browser's history holds each capture: Back returns to the incomplete one
    page.go_back()
    expect(page.locator(f"#{prefix}-link-banner")).to_contain_text("runs/partial.h5: incomplete capture",
                                                                  timeout=SLOW)
    shows(page, prefix, figure, "runs/partial.h5", "runs/partial.h5 (incomplete)")
    if figure is not None:
        expect(page.locator(".dfs-banner-error")).to_have_count(0)
    assert console == []

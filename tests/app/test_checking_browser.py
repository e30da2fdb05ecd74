"""A file being checked in the background, in a real browser: listed "(checking)", drawn, and a
damaged map gives the red banner naming it. The dashboard's catalog treats the test capture as
large (``full_check_bytes=0``) and its background check is held after its first read
(``test_background_check.Gate``), so the file stays "checking" for as long as the test looks."""

from __future__ import annotations

import functools
import re
import shutil

import pytest
from test_background_check import Gate
from test_data import scaled_copy

from dfsviz.app import data

pytest.importorskip("playwright")
from playwright.sync_api import expect  # noqa: E402
from test_browser import wait_drawn  # noqa: E402


def test_a_file_being_checked_is_drawn_and_its_damaged_map_gives_the_banner(page, serve, capture_root, tmp_path,
                                                                            monkeypatch, console):
    root = tmp_path / "runs"
    root.mkdir()
    scaled_copy(capture_root / "good.h5", root / "first.h5", 2, "first")  # step 2, layer 0, raster, head 0
    shutil.copy(capture_root / "good.h5", root / "sound.h5")
    monkeypatch.setattr(data, "CaptureCatalog", functools.partial(data.CaptureCatalog, full_check_bytes=0))
    with serve([root]) as url, Gate(monkeypatch):
        # the Overview of the sound file, which reads every map of it while both are being checked
        page.goto(f"{url}/?file=runs/sound.h5")
        wait_drawn(page, "ov-recall")
        files = page.locator("#ov-files")
        expect(files).to_contain_text(re.compile(r"runs/first\.h5\s*checking"))
        expect(files).to_contain_text(re.compile(r"runs/sound\.h5\s*checking"))
        expect(page.locator("#ov-file")).to_contain_text("runs/sound.h5 (checking)")
        expect(page.locator("#ov-validation")).to_have_text("validation: running")
        page.goto(f"{url}/masks?file=runs/first.h5&step=3&layer=1&head=0")
        wait_drawn(page, "mk-left")
        wait_drawn(page, "mk-right")
        expect(page.locator("#mk-file")).to_contain_text("runs/first.h5 (checking)")
        expect(page.locator(".dfs-banner-error")).to_have_count(0)
        page.goto(f"{url}/masks?file=runs/first.h5&step=2&layer=0&head=0")
        expect(page.locator("#mk-banner")).to_contain_text(
            "runs/first.h5: invalid capture, not drawn: step_0002/m[layer 0, branch cond, order raster, head 0]: "
            "rows do not sum to 1")
        # from then on the file is refused, as a file found invalid before its first view
        page.goto(f"{url}/masks?file=runs/first.h5&step=3&layer=1&head=0")
        banner = page.locator("#mk-file-banner")
        expect(banner).to_contain_text("runs/first.h5: invalid capture, not drawn: step_0002/m")
        expect(banner).to_contain_text("showing runs/sound.h5 instead")
    assert console == []

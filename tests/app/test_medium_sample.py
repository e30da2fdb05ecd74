"""The medium model's shipped sample (256 x 256 block maps, float16, one layer, no Q/K) on every
page that reads maps, in a real browser: every visible figure draws, no error banner, no
traceback, no console error. Waits are on the checked condition."""

from __future__ import annotations

import pytest

import dfsviz

pytest.importorskip("playwright")
from playwright.sync_api import expect  # noqa: E402
from test_browser import no_traceback, wait_drawn  # noqa: E402

MEDIUM = "captures/" + dfsviz.sample_capture("medium").name


@pytest.fixture(scope="module")
def url(serve):
    with serve([dfsviz.sample_capture("medium").parent]) as address:
        yield address


@pytest.mark.parametrize("path", ["/", "/masks", "/recall", "/theory", "/drift"])
def test_every_map_page_draws_the_medium_sample(page, url, console, path):
    page.goto(f"{url}{path}?file={MEDIUM}")
    cards = page.locator(".dfs-card:visible")
    expect(cards.first).to_be_visible(timeout=30000)
    for i in range(cards.count()):
        wait_drawn(page, cards.nth(i).get_attribute("id").removesuffix("-card"), timeout=60000)
    expect(page.locator(".dfs-banner-error")).to_have_count(0)
    no_traceback(page)
    assert console == []

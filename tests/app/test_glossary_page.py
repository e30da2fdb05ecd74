"""The Glossary page in a real headless browser (Playwright on Debian's /usr/bin/chromium):
every term of the glossary is listed with its definition and formula, ``/glossary#<term>``
opens on that entry and marks it, and the filter narrows the list.

The page needs no capture: it is served over an empty root. Every wait is on the condition
the test then checks (``expect``), never a sleep.
"""

from __future__ import annotations

import re

import pytest

from dfsviz.app.glossary import TERMS
from dfsviz.app.pages.glossary import term_href

pytest.importorskip("playwright")
from playwright.sync_api import expect  # noqa: E402


@pytest.fixture(scope="module")
def url(tmp_path_factory, serve):
    with serve(tmp_path_factory.mktemp("empty-root")) as address:
        yield address


def test_every_term_is_listed_with_its_definition_and_formula(page, url, console, artifacts):
    page.goto(url + "/glossary")
    entries = page.locator(".dfs-term")
    expect(entries).to_have_count(len(TERMS))
    for key in ("recall", "bound2", "hilbert3d", "jaccard", "reuse_factor"):
        entry = page.locator(f"[id='{key}']")
        expect(entry).to_contain_text(TERMS[key].name)
        expect(entry).to_contain_text(TERMS[key].short)
        if TERMS[key].formula:
            expect(entry.locator("code")).to_have_text(TERMS[key].formula)
        else:  # a name, not a number: no formula shown
            expect(entry.locator("code")).to_have_count(0)
    # the index links to every entry
    expect(page.locator(f"#gl-index a[href='#{'effective_gap'}']")).to_have_text(TERMS["effective_gap"].name)
    page.screenshot(path=str(artifacts / "glossary.png"))
    assert console == []


def test_a_link_to_a_term_opens_the_page_on_it(page, url, console):
    assert term_href("J") == "/glossary#J"
    page.goto(url + term_href("J"))
    entry = page.locator("[id='J']")
    expect(entry).to_have_css("background-color", "rgb(254, 243, 199)")
    expect(entry).to_be_in_viewport()
    # the other entries are not marked, and the first ones are scrolled out of view
    expect(page.locator("[id='recall']")).not_to_have_css("background-color", "rgb(254, 243, 199)")
    expect(page.locator("[id='step']")).not_to_be_in_viewport()
    assert console == []


def test_the_filter_narrows_the_list(page, url, console):
    page.goto(url + "/glossary")
    expect(page.locator(".dfs-term")).to_have_count(len(TERMS))
    page.locator("#gl-filter").fill("jaccard")
    expect(page.locator("#gl-shown")).to_have_text(re.compile(r"^\d+ of %d terms hold “jaccard”\.$" % len(TERMS)))
    expect(page.locator("[id='jaccard']")).to_be_visible()
    expect(page.locator("[id='density']")).to_have_count(0)
    shown = page.locator(".dfs-term")
    count = int(page.locator("#gl-shown").inner_text().split()[0])
    expect(shown).to_have_count(count)
    for i in range(count):
        expect(shown.nth(i)).to_contain_text(re.compile("jaccard", re.IGNORECASE))
    page.locator("#gl-filter").fill("")
    expect(page.locator(".dfs-term")).to_have_count(len(TERMS))
    assert console == []


def test_term_href_refuses_unknown_terms():
    with pytest.raises(KeyError, match=r"`term` 'recal' is not in the dashboard glossary; did you mean 'recall'"):
        term_href("recal")

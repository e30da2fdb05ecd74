"""Every control and figure of the pages D1 owns carries the glossary's definition (an info icon
whose hover text is dfsviz.app.glossary.help_text), rendered from each page's layout."""

from __future__ import annotations

import pytest

import dfsviz
from dfsviz.app import create_app
from dfsviz.app.glossary import TERMS, help_text
from dfsviz.app.pages import calibrate, drift, live, masks, overview, recall, theory, video

# controls that choose how to draw, not a quantity of the glossary
PLAIN = {"colour range", "distribution plot", "goal"}


def walk(component):
    yield component
    children = getattr(component, "children", None)
    for child in children if isinstance(children, (list, tuple)) else [children]:
        if child is not None and not isinstance(child, (str, int, float)):
            yield from walk(child)


@pytest.fixture(scope="module")
def app():
    app = create_app(dfsviz.sample_capture().parent)
    yield app
    app.server.config["DFSVIZ_CATALOG"].close()


@pytest.mark.parametrize("module", [overview, masks, recall, theory, drift, calibrate, live, video], ids=lambda m: m.NAME)
def test_every_control_and_figure_has_its_definition(app, module):
    helps = {help_text(t) for t in TERMS}
    with app.server.test_request_context("/"):
        tree = module.layout(file="captures/" + dfsviz.sample_capture().name,
                             **({"target_recall": "0.7"} if module is calibrate else {}))
    nodes = list(walk(tree))
    controls = [n for n in nodes if "dfs-control" in (getattr(n, "className", None) or "").split()]
    cards = [n for n in nodes if getattr(n, "className", None) == "dfs-card"]
    assert controls and cards
    for node in controls + cards:
        icons = [n for n in walk(node) if getattr(n, "className", None) == "dfs-info"]
        label = next((n.children for n in walk(node) if type(n).__name__ == "Label"), getattr(node, "id", None))
        name = label[0] if isinstance(label, list) else label
        if name in PLAIN:
            continue
        assert len(icons) == 1, f"{module.NAME}: {name!r} has no info icon"
        shown = icons[0].title.split("\n\n")
        assert shown and all(text in helps for text in shown), shown
        assert icons[0].href.startswith("/glossary#")

"""notebooks/analysis.ipynb runs headless (nbclient) on the shipped sample capture, its default,
shows what it claims, and sends its reader only to files the repository has."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "analysis.ipynb"
PLOTLY = "application/vnd.plotly.v1+json"


def _text(cell) -> str:
    parts = []
    for out in cell.get("outputs", []):
        if out.get("output_type") == "stream":
            parts.append(out.get("text", ""))
        elif "data" in out and "text/plain" in out["data"]:
            parts.append(out["data"]["text/plain"])
    return "".join(parts)


def test_notebook_executes_on_the_shipped_sample(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit the notebook without outputs"
    # run from an empty folder: the default capture must not depend on the working directory
    nbclient.NotebookClient(nb, timeout=180, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    code = [c for c in nb.cells if c.cell_type == "code"]
    errors = [o for c in code for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, errors
    figures = [o for c in code for o in c.get("outputs", []) if PLOTLY in o.get("data", {})]
    # One mask heatmap per order (2), recall curves, bound scatter, recall vs gap, W_k violins, two drift maps.
    assert len(figures) == 8
    titles = [json.dumps(f["data"][PLOTLY]["layout"].get("title", {})) for f in figures]
    assert any("raster: step" in t for t in titles) and any("hilbert3d: step" in t for t in titles)
    text = "\n".join(_text(c) for c in code)
    assert "tiny-wan-sample.h5" in _text(code[0])
    assert "'bound2': 0" in text and "'bound3': 0" in text
    assert "bound violations: 0" in text
    assert "dfs_tile · hilbert3d" in text
    # The embedded model attends to a moving object: the notebook shows Hilbert blocks are more compact.
    raster, hilbert = (float(x) for x in re.search(r"W_k: raster ([0-9.]+) -> hilbert3d ([0-9.]+)", text).groups())
    assert hilbert < 0.9 * raster


def test_notebook_links_stay_inside_the_repository():
    """Relative links of the Markdown cells name files of the repository; the definitions are
    referred to as docs/theory.md."""
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    text = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    links = re.findall(r"\]\(([^)#\s]+)", text)
    assert "../docs/theory.md" in links
    assert [t for t in links if "://" not in t and not (NOTEBOOK.parent / t).exists()] == []
    assert not re.search(r"(?<!docs/)theory\.md|paper\.md|STYLE\.md", text)

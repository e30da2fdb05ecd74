"""Storage does not select: no module of dfsviz.capture imports mask selection, the recall
measures or the analysis layer (masks, recall and density of a capture live in
dfsviz.analysis.measured_capture). The recall curves a capture stores per step come from
dfsviz.sparse._topk, the core the writer shares with dfsviz.analysis.recall_curve."""

from __future__ import annotations

import ast
from pathlib import Path

CAPTURE = Path(__file__).resolve().parents[2] / "dfsviz" / "capture"

#: module -> the names no capture module may import from it (None: nothing at all)
FORBIDDEN = {
    "dfsviz.sparse.select": None,
    "dfsviz.analysis": None,
    "dfsviz.sparse.stats": {"block_recall", "block_recall_per_query", "oracle_recall"},
}


def forbidden_imports(source: str) -> list[str]:
    """``module.name`` of every import in ``source`` (anywhere in it) that FORBIDDEN names."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            pairs = [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            pairs = [(node.module, alias.name) for alias in node.names]
        else:
            continue
        for module, name in pairs:
            for banned, names in FORBIDDEN.items():
                if module != banned and not module.startswith(banned + "."):
                    continue
                if names is None or name in names:
                    found.append(f"{module}.{name}" if name else module)
    return found


def test_the_checker_finds_imports_in_functions_and_lets_statistics_through():
    source = (
        "from dfsviz.sparse.stats import BlockStats, variance_ratio\n"
        "def f():\n    from dfsviz.sparse.select import select_topk\n"
        "    from dfsviz.sparse.stats import block_recall\n"
        "import dfsviz.analysis.measures\n"
    )
    assert sorted(forbidden_imports(source)) == [
        "dfsviz.analysis.measures", "dfsviz.sparse.select.select_topk", "dfsviz.sparse.stats.block_recall",
    ]


def test_capture_imports_no_selection_and_no_recall():
    found = {path.name: hits for path in sorted(CAPTURE.glob("*.py")) if (hits := forbidden_imports(path.read_text()))}
    assert not found, f"dfsviz.capture must store, not select or measure: {found}"

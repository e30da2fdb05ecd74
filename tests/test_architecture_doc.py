"""docs/architecture.md stays the map of the package as it is.

Every module, package, registry and test file the page names exists; every module and
subpackage of dfsviz is named on the page; and every import inside dfsviz (at the top of a
module, in a function or under TYPE_CHECKING) goes to the importer's own layer or a lower one
of the page's layer table.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "dfsviz"
PAGE = ROOT / "docs" / "architecture.md"

_CODE = re.compile(r"`([^`]+)`")
_PATH = re.compile(r"^(dfsviz|tests|benchmarks)/[\w/.-]*$")
_DOTTED = re.compile(r"^dfsviz(\.\w+)*$")
# A layer row: "| 3 | `dfsviz.capture`, `dfsviz.accel` | ... |".
_LAYER_ROW = re.compile(r"^\|\s*(\d+)\s*\|([^|]*)\|")

# Imports that run against the layers today, each waiting on its owner: the test fails when
# one is gone (strike it here) as when a new one appears.
KNOWN_UPWARD: dict[tuple[str, str], str] = {}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_path(name: str) -> Path | None:
    """The file of module ``name`` (package or plain module), None when there is none."""
    base = ROOT.joinpath(*name.split("."))
    for candidate in (base / "__init__.py", base.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
SUBPACKAGES = sorted(name for name, p in MODULES.items() if p.name == "__init__.py" and name != "dfsviz")


def page_names() -> list[str]:
    return [name for name in _CODE.findall(PAGE.read_text()) if "<" not in name]


def defined_names(path: Path) -> set[str]:
    """Top-level names a module defines (functions, classes, assignments, imports) or hands on
    in ``__all__`` (the package face serves some of its names on first use)."""
    names: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            names.update(ast.literal_eval(node.value))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


def missing(name: str) -> str | None:
    """Why ``name`` (a path, or a dotted module with at most one attribute) names nothing, or None."""
    if _PATH.match(name):
        return None if (ROOT / name).exists() else "no such file or folder"
    if module_path(name):
        return None
    module, _, attribute = name.rpartition(".")
    path = module_path(module)
    if path is None:
        return "no such module"
    return None if attribute in defined_names(path) else f"{module} defines no {attribute}"


def layers() -> dict[str, int]:
    """Package or module -> layer number, from the page's layer table."""
    table: dict[str, int] = {}
    for line in PAGE.read_text().splitlines():
        row = _LAYER_ROW.match(line)
        if row:
            for name in _CODE.findall(row.group(2)):
                table[name] = int(row.group(1))
    return table


def layer_of(module: str, table: dict[str, int]) -> int | None:
    """The layer of the longest table entry that is ``module`` or a package holding it; the root
    entry ``dfsviz`` stands for dfsviz/__init__.py alone."""
    for name in sorted(table, key=len, reverse=True):
        if module == name or (name != "dfsviz" and module.startswith(name + ".")):
            return table[name]
    return None


def imports_in(source: str, name: str, is_package: bool = False) -> set[str]:
    """The dfsviz modules that the source of module ``name`` imports, anywhere in it.
    ``from dfsviz import figures`` imports the module dfsviz.figures; ``from dfsviz import
    __version__`` imports the root."""
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if module_path(sub) else base)
    return {m for m in found if m == "dfsviz" or m.startswith("dfsviz.")}


def upward_imports() -> dict[tuple[str, str], str]:
    table = layers()
    found = {}
    for name, path in MODULES.items():
        own = layer_of(name, table)
        for target in imports_in(path.read_text(), name, path.name == "__init__.py"):
            if module_path(target) is None:
                continue  # an import of something that is no module of this tree fails on its own
            theirs = layer_of(target, table)
            if own is not None and theirs is not None and theirs > own:
                found[(name, target)] = f"layer {own} imports layer {theirs}"
    return found


# ----------------------------------------------------------------------------- the checkers themselves
def test_the_checkers_see_what_is_there_and_what_is_not():
    assert missing("dfsviz/sparse/orders.py") is None
    assert missing("dfsviz.sparse.orders.ORDERS") is None
    assert missing("dfsviz.sparse") is None
    assert missing("dfsviz/sparse/nothing.py") == "no such file or folder"
    assert missing("dfsviz.sparse.nothing.ORDERS") == "no such module"
    assert missing("dfsviz.sparse.orders.NOTHING") == "dfsviz.sparse.orders defines no NOTHING"
    table = {"dfsviz": 5, "dfsviz.sparse": 1, "dfsviz.kernels": 2, "dfsviz.kernels._jit": 3}
    assert layer_of("dfsviz.kernels._jit.attention", table) == 3
    assert layer_of("dfsviz.kernels.fp8", table) == 2
    assert layer_of("dfsviz", table) == 5
    assert layer_of("dfsviz.capture.reader", table) is None


def test_imports_in_reads_every_kind_of_import():
    source = (
        "import torch\n"
        "from dfsviz import figures\n"
        "from dfsviz import __version__\n"
        "def f():\n    import dfsviz.kernels._dispatch\n"
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from dfsviz.capture.reader import CaptureReader\n"
        "from .orders import ORDERS\n"
        "from . import grid\n"
    )
    assert imports_in(source, "dfsviz.sparse.masks") == {
        "dfsviz.figures", "dfsviz", "dfsviz.kernels._dispatch", "dfsviz.capture.reader",
        "dfsviz.sparse.orders", "dfsviz.sparse.grid",
    }
    assert imports_in("from .scoring import SCORERS\n", "dfsviz.sparse", is_package=True) == {"dfsviz.sparse.scoring"}


# ----------------------------------------------------------------------------- the page against the code
def test_every_name_on_the_page_exists():
    names = [n for n in page_names() if _PATH.match(n) or _DOTTED.match(n)]
    assert len(names) > 50, "the page names its modules, registries and tests in backticks"
    gone = {n: why for n in names if (why := missing(n))}
    assert not gone, f"docs/architecture.md names what is not there: {gone}"


def test_every_module_and_subpackage_is_on_the_page():
    named = set(page_names())
    modules = [p.relative_to(ROOT).as_posix() for p in MODULES.values() if p.name != "__init__.py"]
    assert not [m for m in modules if m not in named], "docs/architecture.md: add a line for each module"
    assert not [p for p in SUBPACKAGES if p not in named], "docs/architecture.md: name each subpackage"


def test_every_module_has_a_layer():
    table = layers()
    assert not [name for name in MODULES if layer_of(name, table) is None]


def test_imports_go_down_the_layers():
    found = upward_imports()
    new = {pair: why for pair, why in found.items() if pair not in KNOWN_UPWARD}
    assert not new, f"imports against docs/architecture.md's layers: {new}"
    mended = sorted(set(KNOWN_UPWARD) - set(found))
    assert not mended, f"mended: strike {mended} from KNOWN_UPWARD"


"""What users read sends them only to files the repository has.

Every user-facing text (README.md, docs/*.md, the notebooks, the ``--help`` of every ``dfsviz``
command and every docstring of the package) is searched for references to files that only the
developers have (``../shared``, ``reference/*.md``, ``paper.md``, ``STYLE.md``, ``DESIGN.md``) and
for a bare ``theory.md`` that does not say where it lives (``docs/theory.md``; inside docs/*.md a
relative link ``(theory.md)`` is fine). Every relative Markdown link of README.md and docs/*.md
must name a file of the repository, and its anchor, if any, a heading of that file when it is
Markdown (as GitHub names headings; ``(#anchor)`` alone names one of the same file).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from urllib.parse import unquote

import click
import pytest
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "dfsviz"
DOCS = sorted((ROOT / "docs").glob("*.md"))
MARKDOWN = [ROOT / "README.md", *DOCS]
NOTEBOOKS = sorted(p for p in (ROOT / "notebooks").rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)
MODULES = sorted(PACKAGE.rglob("*.py"))

# Files only the developers have: the shared folder, its reference digests and house rules.
DEVELOPER_FILES = ("../shared", "paper.md", "STYLE.md", "DESIGN.md")
_REFERENCE_DIGEST = re.compile(r"reference/[\w.-]+\.md")
_THEORY = re.compile(r"theory\.md")
# A Markdown link target or reference definition right before the match: `](theory.md`, `]: ./theory.md`.
_LINK_TARGET_BEFORE = re.compile(r"(\]\(|\]:\s*)(\./)?$")


def forbidden_mentions(text: str, *, relative_theory_link_ok: bool = False) -> list[str]:
    """Lines of ``text`` that name a developer-only file or a bare ``theory.md``, as 'line N: ...'."""
    found = []
    for number, line in enumerate(text.splitlines(), start=1):
        bad = [name for name in DEVELOPER_FILES if name in line] + _REFERENCE_DIGEST.findall(line)
        for match in _THEORY.finditer(line):
            before = line[: match.start()]
            if before.endswith("docs/"):
                continue
            if relative_theory_link_ok and _LINK_TARGET_BEFORE.search(before):
                continue
            bad.append("bare theory.md")
        if bad:
            found.append(f"line {number} ({', '.join(bad)}): {line.strip()}")
    return found


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


# ----------------------------------------------------------------------------- the checker itself
@pytest.mark.parametrize(
    ("text", "docs_file", "expected"),
    [
        ("see docs/theory.md", False, 0),
        ("see theory.md", False, 1),
        ("see `theory.md`", True, 1),
        ("see [theory](theory.md#bound-2)", True, 0),
        ("see [theory](./theory.md)", True, 0),
        ("see [theory](theory.md)", False, 1),
        ("see [theory](docs/theory.md)", False, 0),
        ("as reference/paper.md section 3 says", False, 1),
        ("follow STYLE.md", False, 1),
        ("see DESIGN.md", False, 1),
        ("layouts of reference/environment.md section 3", False, 1),
        ("the PyTorch reference/kernel pair", False, 0),
        ("read ../shared/DESIGN.md", False, 1),
        ("dfsviz/app/pages/theory.py and the paper", False, 0),
    ],
)
def test_forbidden_mentions_finds_exactly_the_bad_references(text, docs_file, expected):
    assert len(forbidden_mentions(text, relative_theory_link_ok=docs_file)) == expected


# ----------------------------------------------------------------------------- Markdown and notebooks
@pytest.mark.parametrize("path", MARKDOWN, ids=_rel)
def test_markdown_names_no_developer_file(path):
    is_docs = path.parent == ROOT / "docs"
    found = forbidden_mentions(path.read_text(encoding="utf-8"), relative_theory_link_ok=is_docs)
    assert not found, f"{_rel(path)} sends users to files they do not have:\n" + "\n".join(found)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_rel)
def test_notebook_names_no_developer_file(path):
    found = forbidden_mentions(path.read_text(encoding="utf-8"))
    assert not found, f"{_rel(path)} sends users to files they do not have:\n" + "\n".join(found)


def test_there_is_something_to_check():
    assert ROOT / "docs" / "theory.md" in DOCS
    assert NOTEBOOKS and len(MODULES) > 10


# ----------------------------------------------------------------------------- --help of every command
def _command_paths(command: click.Command, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = [path]
    if isinstance(command, click.Group):
        for name, sub in sorted(command.commands.items()):
            paths.extend(_command_paths(sub, (*path, name)))
    return paths


def _cli_paths() -> list[tuple[str, ...]]:
    from dfsviz.cli import main

    return _command_paths(main)


@pytest.mark.parametrize("path", _cli_paths(), ids=lambda p: " ".join(("dfsviz", *p)))
def test_cli_help_names_no_developer_file(path):
    from dfsviz.cli import main

    result = CliRunner().invoke(main, [*path, "--help"], terminal_width=100)
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output
    found = forbidden_mentions(result.output)
    assert not found, f"`dfsviz {' '.join(path)} --help` sends users to files they do not have:\n" + "\n".join(found)


def test_the_cli_walk_reaches_the_subcommands():
    assert {("capture",), ("app",), ("report",), ("orders",)} <= set(_cli_paths())


# ----------------------------------------------------------------------------- docstrings
def _docstrings(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc is not None:
                out.append((node.body[0].lineno, doc))
    return out


@pytest.mark.parametrize("path", MODULES, ids=_rel)
def test_docstrings_name_no_developer_file(path):
    found = [
        f"docstring at line {start}, {line}"
        for start, doc in _docstrings(path)
        for line in forbidden_mentions(doc)
    ]
    assert not found, f"{_rel(path)} sends users to files they do not have:\n" + "\n".join(found)


def test_docstrings_are_found_in_modules_classes_and_functions(tmp_path):
    source = tmp_path / "m.py"
    source.write_text('"""mod"""\nclass C:\n    """cls"""\n    def f(self):\n        """fn"""\n', encoding="utf-8")
    assert sorted(doc for _, doc in _docstrings(source)) == ["cls", "fn", "mod"]


# ----------------------------------------------------------------------------- relative links
_FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
_CODE_SPAN = re.compile(r"`[^`\n]*`")
_INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*(?:<([^>\n]+)>|([^)\s]+))(?:\s+\"[^\"]*\")?\s*\)")
_REFERENCE_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$", re.MULTILINE)
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def relative_link_targets(text: str) -> list[str]:
    """Targets of the Markdown links and images of ``text`` that point into the repository."""
    prose = _CODE_SPAN.sub("", _FENCE.sub("", text))
    targets = [bracketed or bare for bracketed, bare in _INLINE_LINK.findall(prose)] + _REFERENCE_DEF.findall(prose)
    return [t for t in targets if not _SCHEME.match(t) and not t.startswith("//")]


def test_relative_link_targets_skips_urls_and_code():
    text = (
        "[a](theory.md#bound-2) ![b](img/x.png) [c](https://example.org/y.md) [d](#local)\n"
        "`[e](in-code.md)` [f](<with space.md> \"title\")\n```\n[g](fenced.md)\n```\n[h]: ../README.md\n"
    )
    assert relative_link_targets(text) == ["theory.md#bound-2", "img/x.png", "#local", "with space.md",
                                           "../README.md"]


_HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t]*$", re.MULTILINE)


def heading_anchors(text: str) -> set[str]:
    """The anchors GitHub gives the headings of the Markdown ``text``: lower case, characters other
    than letters, digits, ``_``, ``-`` and spaces dropped, spaces to ``-``; a repeat gets -1, -2, ..."""
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    for title in _HEADING.findall(_FENCE.sub("", text)):
        slug = re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")
        anchors.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
        seen[slug] = seen.get(slug, 0) + 1
    return anchors


def test_heading_anchors_are_github_s():
    text = ("# Kernels (`dfsviz.kernels`)\n## FP8 (`precision=\"fp8\"`)\n### Speed\n### Speed\n"
            "```\n# not a heading\n```\n#### HunyuanVideo 720p x 129, at full depth\n")
    assert heading_anchors(text) == {"kernels-dfsvizkernels", "fp8-precisionfp8", "speed", "speed-1",
                                     "hunyuanvideo-720p-x-129-at-full-depth"}


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    """Relative link targets of the Markdown file ``path`` that name no file under ``root``, or an
    anchor that no heading of the Markdown file they name has."""
    broken = []
    for target in relative_link_targets(path.read_text(encoding="utf-8")):
        file_part, _, anchor = target.split("?", 1)[0].partition("#")
        resolved = (path.parent / unquote(file_part)).resolve() if file_part else path.resolve()
        if not resolved.is_relative_to(root.resolve()) or not resolved.is_file():
            broken.append(target)
        elif anchor and resolved.suffix == ".md" and unquote(anchor) not in heading_anchors(
                resolved.read_text(encoding="utf-8")):
            broken.append(target)
    return broken


def test_broken_links_names_missing_files_anchors_and_links_out_of_the_repository(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "theory.md").write_text("# Theory\n## Bound 2\n", encoding="utf-8")
    (tmp_path / "outside.md").write_text("", encoding="utf-8")
    page = tmp_path / "docs" / "page.md"
    page.write_text(
        "# Page\n[ok](theory.md#bound-2) [missing](paper.md) [dir](../docs) [out](../outside.md)\n"
        "[no heading](theory.md#bound-3) [here](#page) [not here](#bound-2)\n", encoding="utf-8"
    )
    assert broken_links(page, root=tmp_path / "docs") == ["paper.md", "../docs", "../outside.md",
                                                          "theory.md#bound-3", "#bound-2"]


@pytest.mark.parametrize("path", MARKDOWN, ids=_rel)
def test_relative_links_resolve_to_repository_files(path):
    broken = broken_links(path)
    assert not broken, f"{_rel(path)} links to files or headings the repository does not have: {broken}"

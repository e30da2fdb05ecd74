"""A module of dfsviz as it was at a commit, loaded from the git history: the reference that a
refactor or an extension must reproduce. Skips the test when the history is not at hand."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]


def module_at_commit(path: str, commit: str, name: str, rewrite: Callable[[str], str] = lambda s: s) -> ModuleType:
    """Execute ``path`` (relative to the repository) as committed at ``commit`` under the module
    name ``name``; ``rewrite`` edits its source first (e.g. an import path moved since)."""
    shown = subprocess.run(["git", "show", f"{commit}:{path}"], cwd=ROOT, capture_output=True, text=True)
    if shown.returncode:
        pytest.skip(f"the reference module {path} needs the git history of the repository: {shown.stderr.strip()}")
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(name, loader=None))
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    try:
        exec(compile(rewrite(shown.stdout), f"{commit[:7]}:{path}", "exec"), module.__dict__)
    finally:
        del sys.modules[name]
    return module

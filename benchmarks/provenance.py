"""The commit a benchmark measured, which its results file names beside the card and versions."""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def source_commit(repo: Path = REPO) -> str | None:
    """HEAD of the checkout at ``repo``, ending in ``+dirty`` when a tracked file outside
    ``benchmarks/results`` differs from it (the results a run rewrites do not count); None without
    git or outside a repository (a copy of the tree without ``.git``)."""

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=60,
                              check=True).stdout.strip()

    try:
        head = git("rev-parse", "--verify", "HEAD")
        changed = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)benchmarks/results")
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if changed else "")

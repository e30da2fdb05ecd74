"""benchmarks/provenance.py: a results file names the commit that measured it, marked dirty when
tracked code differs from that commit, and nothing outside a repository; every file starts with
the same header (card, machine, versions, commit, start time)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from benchmark_scripts import load_script


@pytest.fixture(scope="module")
def provenance():
    return load_script("provenance")


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                          capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture
def repo(tmp_path):
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "benchmarks" / "results" / "run.json").write_text("{}\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-q", "-m", "first")
    return tmp_path


def test_a_clean_checkout_gives_its_head(provenance, repo):
    assert provenance.source_commit(repo) == _git(repo, "rev-parse", "HEAD")


def test_rewritten_results_and_new_files_leave_it_clean(provenance, repo):
    (repo / "benchmarks" / "results" / "run.json").write_text('{"ms": 1.0}\n')
    (repo / "scratch.py").write_text("y = 2\n")
    assert provenance.source_commit(repo) == _git(repo, "rev-parse", "HEAD")


def test_changed_tracked_code_is_marked_dirty(provenance, repo):
    (repo / "code.py").write_text("x = 2\n")
    assert provenance.source_commit(repo) == _git(repo, "rev-parse", "HEAD") + "+dirty"


def test_outside_a_repository_it_is_none(provenance, tmp_path):
    assert provenance.source_commit(tmp_path) is None


def test_the_header_names_the_card_machine_versions_and_commit(provenance):
    header = provenance.run_header(torch.device("cpu"))
    assert set(header) == {"card", "machine", "versions", "commit", "started"}
    host = header["machine"]
    assert header["card"] == host["cpu"] and host["gpu"] is None  # a CPU run names the processor
    assert host["usable_cpus"] <= host["logical_cpus"] and len(host["load_start"]) == 3
    assert header["versions"]["torch"] == torch.__version__
    assert {"python", "dfsviz", "h5py", "diffusers"} <= set(header["versions"])  # what this venv installs
    assert header["commit"] == provenance.source_commit()

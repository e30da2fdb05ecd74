"""The Makefile's `browser` and `run` targets, run by make itself.

`browser` is run with a PATH holding only stubs, so the test controls which of chromium,
chromedriver and apt-get exist and what `id -u` answers, and never installs anything.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MAKE = shutil.which("make")
pytestmark = pytest.mark.skipif(MAKE is None, reason="needs GNU make, which runs the README's commands")


def _stub(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text(f"#!/bin/bash\n{body}\n")
    path.chmod(0o755)


def _make_browser(tmp_path: Path, *, uid: int, tools: tuple[str, ...]) -> subprocess.CompletedProcess:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stub(bin_dir, "id", f'[ "$1" = "-u" ] && echo {uid}')
    _stub(bin_dir, "apt-get", f'echo "apt-get $*" >> {tmp_path / "apt.log"}')
    for tool in tools:
        _stub(bin_dir, tool, "exit 0")
    env = {**os.environ, "PATH": str(bin_dir)}
    return subprocess.run([MAKE, "-s", "-C", REPO, "browser"], env=env, capture_output=True, text=True)


def test_browser_does_nothing_when_chromium_and_chromedriver_are_present(tmp_path):
    out = _make_browser(tmp_path, uid=1000, tools=("chromium", "chromedriver"))
    assert out.returncode == 0, out.stderr
    assert out.stdout == "" and out.stderr == ""
    assert not (tmp_path / "apt.log").exists()


def test_browser_without_root_names_the_packages_and_the_command(tmp_path):
    out = _make_browser(tmp_path, uid=1000, tools=("chromium",))
    assert out.returncode != 0
    assert out.stderr.strip().splitlines()[0] == (
        "the browser tests need Debian's chromium and chromium-driver; "
        "install them with: sudo apt-get install -y chromium chromium-driver")
    assert not (tmp_path / "apt.log").exists()


def test_browser_as_root_installs_both_packages(tmp_path):
    out = _make_browser(tmp_path, uid=0, tools=())
    assert out.returncode == 0, out.stderr
    calls = (tmp_path / "apt.log").read_text().splitlines()
    assert calls[0].startswith("apt-get update")
    assert calls[1].startswith("apt-get install") and calls[1].split()[-2:] == ["chromium", "chromium-driver"]


def test_run_passes_port_and_host_to_the_dashboard():
    out = subprocess.run([MAKE, "-n", "-C", REPO, "run", "PORT=8060", "HOST=0.0.0.0"],
                         capture_output=True, text=True, check=True)
    assert ".venv/bin/dfsviz app --host 0.0.0.0 --port 8060" in out.stdout
    # HOST and PORT from the environment (zsh's HOST is the machine's name) are not taken.
    default = subprocess.run([MAKE, "-n", "-C", REPO, "run"], env={**os.environ, "HOST": "elsewhere", "PORT": "1"},
                             capture_output=True, text=True, check=True)
    assert ".venv/bin/dfsviz app --host 127.0.0.1 --port 8050" in default.stdout

"""A plain (not editable) install works without the checkout.

The sdist is built from the source tree, the wheel from the sdist (what `pip install dfsviz`
does with a source release), and the wheel goes into a fresh venv with the CI constraints. From
a folder outside the checkout, the installed `dfsviz` captures the embedded model it carries,
inspects the file and opens the shipped sample capture.

About 1.5 minutes on 2 CPU cores once pip's cache holds the dependencies (the first run
downloads and unpacks torch).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "dfsviz" / "data"


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    out = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True)
    assert out.returncode == 0, f"{cmd} exited {out.returncode}\nstdout:\n{out.stdout}\nstderr:\n{out.stderr}"
    return out


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> dict[str, Path]:
    """The sdist, the wheel built from it, a fresh venv holding the wheel, and an empty folder
    outside the checkout to run it from."""
    base = tmp_path_factory.mktemp("release")
    assert not base.resolve().is_relative_to(REPO)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    src = base / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "dfsviz", src / "dfsviz", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    dist = base / "dist"
    _run([sys.executable, "-c", f"from setuptools import build_meta; build_meta.build_sdist({str(dist)!r})"], src, env)
    (sdist,) = dist.glob("dfsviz-*.tar.gz")
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", dist, sdist], base, env)
    (wheel,) = dist.glob("dfsviz-*.whl")
    venv = base / "venv"
    _run([sys.executable, "-m", "venv", venv], base, env)
    _run([venv / "bin" / "pip", "install", "-q", "--no-compile", "-c", REPO / "ci-constraints.txt", wheel], base, env)
    work = base / "work"
    work.mkdir()
    return {"sdist": sdist, "wheel": wheel, "bin": venv / "bin", "work": work, "env": env}


def _shipped_files() -> set[str]:
    return {p.relative_to(REPO).as_posix() for p in DATA.rglob("*") if p.is_file()}


def test_sdist_and_wheel_carry_the_embedded_model_and_the_sample(release):
    shipped = _shipped_files()
    assert "dfsviz/data/models/tiny-wan/diffusion_pytorch_model.safetensors" in shipped
    assert "dfsviz/data/captures/tiny-wan-sample.h5" in shipped
    with tarfile.open(release["sdist"]) as tar:
        # members are named "dfsviz-<version>/<path>"
        in_sdist = {name.partition("/")[2] for name in tar.getnames()}
    with zipfile.ZipFile(release["wheel"]) as whl:
        in_wheel = set(whl.namelist())
    assert shipped <= in_sdist, sorted(shipped - in_sdist)
    assert shipped <= in_wheel, sorted(shipped - in_wheel)
    # the dashboard's stylesheet: without it an installed dashboard is served unstyled
    assert "dfsviz/app/assets/dfsviz.css" in in_wheel


def test_installed_package_runs_outside_the_checkout(release):
    bin_, work, env = release["bin"], release["work"], release["env"]
    where = _run([bin_ / "python", "-c", "import dfsviz; print(dfsviz.__file__)"], work, env).stdout.strip()
    assert Path(where).is_relative_to(bin_.parent), where

    _run([bin_ / "dfsviz", "capture", "--out", "x.h5", "--capture-steps", "0", "--num-steps", "2", "--layers", "0"],
         work, env)
    info = json.loads(_run([bin_ / "dfsviz", "inspect", "x.h5", "--json"], work, env).stdout)
    assert info["model_id"] == "dfsviz-embedded:tiny-wan" and info["grid"] == "f9h18w32"
    assert info["complete"] is True and info["completed_steps"] == [0] and info["layers"] == 1
    assert info["problems"] == []

    code = ("import json, dfsviz; path = dfsviz.sample_capture(); run = dfsviz.open(path); "
            "print(json.dumps([str(path), run.complete, run.steps]))")
    path, complete, steps = json.loads(_run([bin_ / "python", "-c", code], work, env).stdout)
    assert Path(path).is_relative_to(bin_.parent) and complete is True and steps == [0, 6, 13, 19]

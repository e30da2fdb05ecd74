"""What every benchmark's results file says about its run, under the same keys in every file:
``run_header(device)`` gives the card, the machine (with its load average at the start), the
versions, the commit measured and the start time; a script adds its own fields beside them."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

import dfsviz

REPO = Path(__file__).resolve().parents[1]
#: The packages whose versions a results file names, those installed (torch, python and dfsviz always).
PACKAGES = ("triton", "diffusers", "accelerate", "h5py", "numpy", "dash", "plotly", "playwright")


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


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def load() -> list[float]:
    """1, 5 and 15 minute load averages (runnable processes; the machine has ``logical_cpus``)."""
    return [round(x, 2) for x in os.getloadavg()]


def cpu_model() -> str:
    """The processor's name from /proc/cpuinfo, else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: torch.device) -> dict:
    """The host a run measured on, and its GPU when ``device`` is one (gpu None otherwise)."""
    cuda = device.type == "cuda"
    return {"cpu": cpu_model(), "logical_cpus": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)),
            "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(device) if cuda else None,
            "capability": list(torch.cuda.get_device_capability(device)) if cuda else None,
            "platform": platform.platform(), "load_start": load()}


def versions() -> dict:
    """Python's, torch's (with CUDA, cuDNN and NCCL where there is a GPU), dfsviz's and those of
    ``PACKAGES`` that are installed."""
    out = {"python": platform.python_version(), "torch": torch.__version__, "dfsviz": dfsviz.__version__}
    if torch.cuda.is_available():
        out.update(cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                   nccl=".".join(map(str, torch.cuda.nccl.version())))
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def run_header(device: torch.device) -> dict:
    """The fields every results file starts with: card (the GPU's name, else the CPU's), machine,
    versions, commit and started (UTC)."""
    host = machine(device)
    return {"card": host["gpu"] or host["cpu"], "machine": host, "versions": versions(), "commit": source_commit(),
            "started": utc_now()}

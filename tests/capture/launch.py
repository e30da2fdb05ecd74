"""Commands that start a test's processes under torchrun (gloo on the CPU, a free port each time)."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

RANKS = 2


def torchrun(*args: str) -> list[str]:
    """``torchrun --nproc-per-node 2 ARGS`` (a script and its arguments)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(RANKS), "--master-port", str(port),
            *map(str, args)]


def torchrun_cli(*args: str) -> list[str]:
    """``dfsviz ARGS`` on every rank (the console script beside this Python)."""
    return torchrun("--no-python", str(Path(sys.executable).parent / "dfsviz"), *args)


def say(text: str) -> None:
    """``text`` and a newline on stdout in one write(2): the ranks share torchrun's stdout pipe, and a
    pipe write of at most PIPE_BUF bytes is atomic, so two ranks' lines never interleave (``print``
    writes the text and the newline separately)."""
    os.write(sys.stdout.fileno(), f"{text}\n".encode())

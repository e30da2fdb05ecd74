"""Fixtures of the dashboard tests: a small real capture (tiny random-weight Wan model run
through ``dfsviz.capture.run_capture``), damaged copies of it, and the app served
over a capture root holding them."""

from __future__ import annotations

import contextlib

import os
import shutil
import socket
from pathlib import Path

import pytest
from app_captures import make_capture, save_tiny_wan

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "app"

# Browser assertions wait for their condition; on a loaded 2-core machine a page whose callbacks
# compute (Calibrate, Recall with every layer) can take longer than Playwright's 5 s default to
# show it, so every `expect` waits up to 60 s (it returns as soon as the condition holds).
with contextlib.suppress(ImportError):
    from playwright.sync_api import expect

    expect.set_options(timeout=60_000)


@pytest.fixture(scope="session")
def capture_root(tmp_path_factory) -> Path:
    """A root folder with: good.h5 (complete), partial.h5 (interrupted after 2 of 3 steps),
    damaged.h5 (step 2's block mass overwritten with NaN), broken.h5 (not HDF5), and
    escape.h5, a symlink to a capture outside the root."""
    import h5py

    base = tmp_path_factory.mktemp("app")
    model = save_tiny_wan(base / "model")
    root = base / "runs"
    root.mkdir()
    good = make_capture(root / "good.h5", model)
    partial = root / "partial.h5"
    shutil.copy(good, partial)
    # what a run killed during step 3 leaves: the step's group without its completion marker
    with h5py.File(partial, "r+") as f:
        f.attrs["complete"] = False
        f["steps"]["step_0003"].attrs["complete"] = False
    damaged = root / "damaged.h5"
    shutil.copy(good, damaged)
    with h5py.File(damaged, "r+") as f:
        f["steps"]["step_0002"]["m"][...] = float("nan")
    (root / "broken.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + os.urandom(4096))
    outside = base / "secret"
    outside.mkdir()
    shutil.copy(good, outside / "secret.h5")
    (root / "escape.h5").symlink_to(outside / "secret.h5")
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


@contextlib.contextmanager
def served(roots):
    """The dashboard over ``roots``, served by a threaded werkzeug server on a free port: its URL."""
    import threading

    from werkzeug.serving import make_server

    from dfsviz.app import create_app

    app = create_app(roots)
    server = make_server("127.0.0.1", free_port(), app.server, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(timeout=10)
        app.server.config["DFSVIZ_CATALOG"].close()


@pytest.fixture(scope="session")
def serve():
    """``served``, for test modules that serve their own roots."""
    return served


@pytest.fixture(scope="session")
def app_url(capture_root):
    """The dashboard over ``capture_root``."""
    with served(capture_root) as url:
        yield url


@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args):
    """pytest-playwright: Debian's Chromium (never a downloaded browser), no network chatter."""
    return {**browser_type_launch_args, "executable_path": "/usr/bin/chromium",
            "args": ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync"]}


@pytest.fixture(scope="session")
def browser_context_args(browser_context_args):
    return {**browser_context_args, "viewport": {"width": 1400, "height": 1000}, "accept_downloads": True}


@pytest.fixture
def console(page):
    """Browser console errors and uncaught page errors seen during the test."""
    errors: list[str] = []
    page.on("console", lambda m: errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
    return errors

"""A dashboard reachable by others (``dfsviz app --host``): Live runs are bounded per client and
on the server, job ids cannot be guessed, messages never show a path of the server, and the
CLI warns that there is no login."""

from __future__ import annotations

import threading

import pytest
from click.testing import CliRunner

from dfsviz.app.pages import common, live
from dfsviz.cli import main


@pytest.fixture
def blocked(monkeypatch):
    """Live runs that wait until the test releases them (the queue fills without any work)."""
    release = threading.Event()
    monkeypatch.setattr(live, "run_live", lambda *args: release.wait(30))
    yield release
    release.set()


def test_live_runs_are_bounded_per_client_and_in_all(blocked, monkeypatch):
    first = [live._submit(None, "10.0.0.1", i) for i in range(live.MAX_PENDING_PER_CLIENT)]
    with pytest.raises(ValueError, match=rf"{live.MAX_PENDING_PER_CLIENT} runs of yours are waiting or running "
                                         rf"\(at most {live.MAX_PENDING_PER_CLIENT}\); wait for one to finish"):
        live._submit(None, "10.0.0.1", 99)
    # another client still gets its runs, up to the server's bound
    monkeypatch.setattr(live, "MAX_PENDING", live.MAX_PENDING_PER_CLIENT + 1)
    other = live._submit(None, "10.0.0.2", 0)
    with pytest.raises(ValueError, match=r"the server has 3 runs waiting or running \(at most 3\)"):
        live._submit(None, "10.0.0.3", 0)
    blocked.set()
    for job in [*first, other]:
        assert live._JOBS[job][2].result(timeout=30) is True
    # finished runs no longer count
    live._submit(None, "10.0.0.1", 100)


def test_job_ids_are_random_and_long(blocked):
    blocked.set()
    ids = {live._submit(None, f"10.0.1.{i}", i) for i in range(live.MAX_PENDING_PER_CLIENT * 3)}
    assert len(ids) == live.MAX_PENDING_PER_CLIENT * 3
    # secrets.token_urlsafe(16): 128 random bits, 22 URL-safe characters
    assert all(len(job) >= 22 and not job.isdigit() for job in ids)


@pytest.mark.parametrize("text", [
    "cannot read /srv/captures/run.h5 (OSError: truncated)",
    "weights at /home/alice/.cache/models/tiny-wan are missing",
])
def test_error_messages_show_no_server_path(text):
    shown = common.error_text(ValueError(text))
    assert "/srv" not in shown and "/home" not in shown and "<server path>" in shown
    # capture ids are relative and stay
    assert common.error_text(ValueError("runs/good.h5: incomplete")) == "runs/good.h5: incomplete"


def test_binding_another_interface_warns_that_there_is_no_login(capture_root):
    result = CliRunner().invoke(main, ["app", "--root", str(capture_root), "--host", "0.0.0.0", "--dry-run"])
    assert result.exit_code == 0
    assert "no login" in result.output and "anyone who can reach" in result.output

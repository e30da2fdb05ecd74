"""A dashboard reachable by others (``dfsviz app --host``): Live runs are bounded per client and
on the server, job ids cannot be guessed, messages never show a path of the server, and the
CLI warns that there is no login. One bound to 127.0.0.1 answers only its loopback names (no DNS
rebinding)."""

from __future__ import annotations

import http.client
import socket
import subprocess
import sys
import threading
import time

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


def _status(port: int, host: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("GET", "/_dash-layout", headers={"Host": host})
        return conn.getresponse().status
    finally:
        conn.close()


def test_a_loopback_dashboard_answers_only_its_loopback_names(capture_root):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "dfsviz", "app", "--root", str(capture_root), "--port", str(port),
                               "--trusted-host", "dfsviz.lab.example"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while True:  # until the server listens (it imports dash and torch first)
            assert server.poll() is None, server.stderr.read()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=5).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the dashboard did not start listening"
                time.sleep(0.2)
        assert _status(port, f"127.0.0.1:{port}") == 200
        assert _status(port, f"localhost:{port}") == 200
        # a page on another site whose domain the attacker points at 127.0.0.1
        assert _status(port, f"rebind.attacker.example:{port}") == 400
        assert _status(port, f"dfsviz.lab.example:{port}") == 200  # a reverse proxy's name, given
    finally:
        server.kill()
        server.wait(timeout=60)


def test_create_app_without_trusted_hosts_answers_any_host(capture_root):
    from dfsviz.app import create_app

    client = create_app(capture_root, trusted_hosts=None).server.test_client()
    assert client.get("/_dash-layout", headers={"Host": "dfsviz.lab.example"}).status_code == 200
    client = create_app(capture_root).server.test_client()
    assert client.get("/_dash-layout", headers={"Host": "dfsviz.lab.example"}).status_code == 400


@pytest.mark.parametrize(("header", "trusted"), [
    ("127.0.0.1:8050", True), ("localhost", True), ("LOCALHOST:8050", True),
    ("[::1]:8050", True), ("[::1]", True),  # the IPv6 loopback, which Flask's TRUSTED_HOSTS cannot match
    ("[::2]:8050", False), ("::1", False), ("rebind.attacker.example:8050", False), ("127.0.0.1.nip.io", False),
    ("dfsviz.lab.example", True), ("a.proxy.example:443", True), ("proxy.example", True),  # named, and a domain
    ("evilproxy.example", False), ("", False), (None, False), ("localhost:8050/x", False), ("local host", False),
])
def test_host_headers_are_matched_against_the_trusted_names(header, trusted):
    from dfsviz.app import LOOPBACK_NAMES, host_is_trusted

    assert host_is_trusted(header, (*LOOPBACK_NAMES, "dfsviz.lab.example", ".proxy.example")) is trusted


def test_a_dashboard_bound_to_the_ipv6_loopback_answers_its_names(capture_root):
    from dfsviz.app import create_app

    client = create_app(capture_root).server.test_client()
    assert client.get("/_dash-layout", headers={"Host": "[::1]:8050"}).status_code == 200
    assert client.get("/_dash-layout", headers={"Host": "[::2]:8050"}).status_code == 400
    # the CLI gives the loopback names and --trusted-host to a dashboard bound to ::1 too
    result = CliRunner().invoke(main, ["app", "--root", str(capture_root), "--host", "::1", "--trusted-host",
                                       "a.example", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "no login" not in result.output


def test_request_bodies_are_bounded(capture_root):
    from dfsviz.app import MAX_REQUEST_BYTES, create_app

    client = create_app(capture_root).server.test_client()
    headers = {"Host": "127.0.0.1:8050", "Content-Type": "application/json"}
    too_big = client.post("/_dash-update-component", data=b" " * (MAX_REQUEST_BYTES + 1), headers=headers)
    assert too_big.status_code == 413
    # a body within the bound reaches Dash (which answers this empty callback request itself)
    assert client.post("/_dash-update-component", data=b"{}", headers=headers).status_code != 413


@pytest.mark.parametrize(("args", "message"), [
    (["--host", " "], "`--host` must name an interface"),
    (["--host", "0.0.0.0", "--trusted-host", "a.example"], "`--trusted-host` applies to a dashboard bound to 127.0.0.1"),
    (["--trusted-host", "https://a.example:8050"], "`--trusted-host` takes host names without a port or scheme"),
])
def test_bad_host_options_are_refused(args, message):
    result = CliRunner().invoke(main, ["app", *args, "--dry-run"])
    assert result.exit_code == 2 and message in result.output

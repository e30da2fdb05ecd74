"""``dfsviz app`` through click's CliRunner (--dry-run or a refused port: no server is started)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from click.testing import CliRunner

from dfsviz.cli import main
from dfsviz.cli.app import default_roots, ensure_port_free


def test_dry_run_lists_captures_and_statuses(capture_root):
    result = CliRunner().invoke(main, ["app", "--root", str(capture_root), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "captures: 4" in result.output
    assert "runs/good.h5  [ok]" in result.output and "runs/partial.h5  [incomplete]" in result.output
    assert "runs/broken.h5  [error]" in result.output and "escape.h5" not in result.output
    assert "would serve http://127.0.0.1:8050/" in result.output
    assert "warning" not in result.output


def test_binding_another_interface_warns(capture_root):
    result = CliRunner().invoke(main, ["app", "--root", str(capture_root), "--host", "0.0.0.0", "--port", "9000",
                                       "--dry-run"])
    assert result.exit_code == 0
    assert "warning: binding 0.0.0.0 makes the dashboard and these captures reachable" in result.output
    assert "would serve http://0.0.0.0:9000/" in result.output


def test_bad_root_is_one_red_line(tmp_path):
    result = CliRunner().invoke(main, ["app", "--root", str(tmp_path / "missing"), "--dry-run"])
    assert result.exit_code == 2
    assert "Error: capture root" in result.output and "is not a folder" in result.output
    assert "Traceback" not in result.output


def test_help_shows_an_example():
    result = CliRunner().invoke(main, ["app", "--help"])
    assert result.exit_code == 0 and "dfsviz app --root runs/ --port 8060" in result.output


def test_default_roots_are_the_shipped_captures_and_runs_that_exist(tmp_path, monkeypatch):
    import dfsviz

    shipped = Path(dfsviz.__file__).resolve().parent / "data" / "captures"
    monkeypatch.chdir(tmp_path)
    assert default_roots() == [shipped]
    (tmp_path / "runs").mkdir()
    assert default_roots() == [shipped, tmp_path / "runs"]


def test_dry_run_without_roots_lists_the_shipped_sample(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["app", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "captures/tiny-wan-sample.h5  [ok]" in result.output


def test_no_default_root_is_one_red_line(tmp_path, monkeypatch):
    monkeypatch.setattr("dfsviz.cli.app.DATA_DIR", tmp_path / "not-installed")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["app", "--dry-run"])
    assert result.exit_code == 2
    assert "Error: no capture root: pass --root DIR" in result.output and "Traceback" not in result.output


def test_a_taken_port_is_one_red_line_before_serving(capture_root):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = CliRunner().invoke(main, ["app", "--root", str(capture_root), "--port", str(port)])
    assert result.exit_code == 2, result.output
    # one line, before the roots are listed
    assert result.output == f"Error: port {port} on 127.0.0.1 is in use; pass --port N (e.g. --port {port + 1})\n"


def test_port_check_passes_a_free_port_and_names_other_bind_errors():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    ensure_port_free("127.0.0.1", free)
    # 203.0.113.0/24 is reserved for documentation: no interface of this machine has it.
    with pytest.raises(ValueError, match=r"cannot listen on 203\.0\.113\.7 port 8050 \(.+\); pass --host"):
        ensure_port_free("203.0.113.7", 8050)

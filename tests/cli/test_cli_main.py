"""The `dfsviz` group: version, help with an example, every registered command listed."""

from click.testing import CliRunner

import dfsviz
from dfsviz.cli import main

COMMANDS = ("orders", "recall", "capture", "inspect", "report", "app", "calibrate")


def test_version_is_the_package_version():
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"dfsviz, version {dfsviz.__version__}"


def test_help_lists_every_command_and_shows_an_example():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    listed = {line.split()[0] for line in result.output.split("Commands:")[1].splitlines() if line.strip()}
    assert listed == set(COMMANDS)
    assert "Example" in result.output


def test_every_command_help_shows_an_example():
    for name in COMMANDS:
        result = CliRunner().invoke(main, [name, "--help"])
        assert result.exit_code == 0, name
        assert "Example" in result.output, name


def test_unknown_command_is_exit_code_2():
    assert CliRunner().invoke(main, ["nope"]).exit_code == 2


def test_python_dash_m_runs_the_command():
    """`python -m dfsviz` (and so `torchrun -m dfsviz capture ...`) is the same command."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-m", "dfsviz", "--version"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == f"dfsviz, version {dfsviz.__version__}"

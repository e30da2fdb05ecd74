"""``dfsviz recall``: table and JSON output on a small grid, and clean errors."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

import dfsviz.cli.recall  # noqa: F401  (registers the command on `main`)
from dfsviz.cli import main

SMALL = ["recall", "--grid", "3x8x16", "--block", "32", "--heads", "2", "--head-dim", "32"]


@pytest.fixture(scope="module")
def report() -> dict:
    result = CliRunner().invoke(main, [*SMALL, "--gammas", "0.25,0.5", "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_json_report_is_consistent(report):
    assert report["grid"] == "f3h8w16" and report["tokens"] == 384 and report["blocks"] == 12
    assert report["gammas"] == [0.25, 0.5]
    assert set(report["orders"]) == {"raster", "hilbert3d"}
    for entry in report["orders"].values():
        rows = entry["rows"]
        assert list(rows) == ["meanpool", "dfs_tile_b16", "oracle"]
        assert 0 <= entry["W_k"] <= 1 and 0 <= entry["W_q"] <= 1
        for label, row in rows.items():
            for i in range(2):
                assert 0 <= row["bound3"][i] <= row["bound2"][i] + 1e-6 <= row["recall"][i] + 2e-6 <= 1 + 2e-6
                # the oracle is the best top-k recall at the same budget
                assert row["recall"][i] <= rows["oracle"]["recall"][i] + 1e-6, label
                # top-k keeps k = int(gamma * 12) of 12 blocks; the short last block makes density differ slightly
                assert abs(row["density"][i] - int(report["gammas"][i] * 12) / 12) < 0.05
            assert row["recall"][0] <= row["recall"][1] + 1e-6  # a larger budget keeps more


def test_table_output():
    result = CliRunner().invoke(main, [*SMALL, "--orders", "hilbert3d", "--methods", "dfs_tile", "--gammas", "0.3"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("token model tokenmodel_f3h8w16_h2d32_r4")
    assert any(line.startswith("hilbert3d  dfs_tile_b16") for line in lines)
    assert any(line.startswith("hilbert3d  oracle") for line in lines)  # always shown
    assert "g=0.30" in result.output and "W_k" in result.output


def test_help_shows_an_example():
    result = CliRunner().invoke(main, ["recall", "--help"])
    assert result.exit_code == 0
    assert "Example:" in result.output and "dfsviz recall --grid 13x24x40" in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--orders", "raster,zigzag"], "`--orders` must be a comma-separated list of distinct names"),
        (["--orders", "raster,raster"], "`--orders` must be a comma-separated list of distinct names"),
        (["--methods", "best"], "`--methods` must be a comma-separated list of distinct names"),
        (["--gammas", "0.1,abc"], "`--gammas` must be comma-separated fractions in (0, 1]"),
        (["--gammas", ","], "`--gammas` must list at least one fraction"),
        (["--gammas", "1.5"], "`--gammas` must be a fraction in (0, 1]"),
        (["--block", "100"], "`--block` must be a power of two in [16, 256] (got 100)"),
        (["--grid", "3x8"], "`--grid` must look like FRAMESxHEIGHTxWIDTH"),
        (["--delta", "-1"], "`--delta` must be a finite number >= 0.0"),
        (["--tile", "3"], "`--tile` (tile of dfs_tile) must be a power of two"),
    ],
)
def test_errors_are_one_red_line(args, message):
    result = CliRunner().invoke(main, [*SMALL, *args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output

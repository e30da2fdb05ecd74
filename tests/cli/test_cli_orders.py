"""`dfsviz orders`: the table, JSON output, help example and clean failures."""

import json

import pytest
from click.testing import CliRunner

from dfsviz.cli import main
from dfsviz.sparse.grid import LatentGrid
from dfsviz.sparse.orders import locality_report, make_order, order_names


def _run(*args):
    return CliRunner().invoke(main, ["orders", *args])


def test_table_lists_every_registered_order():
    result = _run("--grid", "7x9x12", "--block", "16")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "grid f7h9w12 (756 video + 0 text tokens), block 16"
    assert lines[1].split() == [
        "order", "blocks", "bbox_volume", "sq_spread", "frames/block", "raster_runs", "max_jump", "build_ms"
    ]
    rows = {line.split()[0]: line.split() for line in lines[2:]}
    assert list(rows) == order_names()
    report = locality_report(make_order("hilbert3d", LatentGrid(7, 9, 12)), block=16)
    assert rows["hilbert3d"][1:7] == [
        str(report["blocks"]),
        f"{report['bbox_volume']:.1f}",
        f"{report['sq_spread']:.2f}",
        f"{report['frames_per_block']:.2f}",
        f"{report['raster_runs']:.1f}",
        str(report["max_jump"]),
    ]
    assert float(rows["raster"][7]) >= 0.0


def test_json_output_parses_and_honours_text_and_order_subset():
    result = _run(
        "--grid", "4x4x8", "--block", "32", "--text-len", "5", "--text-first", "--orders", "tiled,raster", "--json"
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["grid"] == "f4h4w8T5" and data["block"] == 32
    assert [row["order"] for row in data["orders"]] == ["tiled", "raster"]
    raster = data["orders"][1]
    # raster blocks of 32 tokens are whole 4 x 8 frames: spread = var(x) + var(y)
    assert raster["blocks"] == 4
    assert raster["sq_spread"] == pytest.approx((8**2 - 1) / 12 + (4**2 - 1) / 12)
    assert raster["frames_per_block"] == 1.0
    assert raster["bbox_volume"] == 32.0 and raster["max_jump"] == 1 + 3 + 7
    assert raster["raster_runs"] == 1.0
    assert set(raster) == {
        "order", "blocks", "bbox_volume", "sq_spread", "frames_per_block", "raster_runs", "max_jump", "build_ms"
    }


def test_help_shows_an_example_and_the_registered_orders():
    result = _run("--help")
    assert result.exit_code == 0
    assert "dfsviz orders --grid 21x45x80 --block 128" in result.output
    assert ",".join(order_names()) in result.output.replace("\n", "").replace(" ", "")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--grid", "21x45"], "Error: `--grid` must look like FRAMESxHEIGHTxWIDTH, e.g. 21x45x80 (got '21x45')"),
        (["--grid", "0x45x80"], "Error: `frames` must be a positive integer (got 0)"),
        (["--grid", "2x4x4", "--block", "96"], "Error: `--block` must be a power of two in [16, 256] (got 96); DFSAttn uses 128"),
        (["--grid", "2x4x4", "--text-len", "-1"], "Error: `--text-len` must be an integer >= 0 (got -1)"),
        (["--grid", "2x4x4", "--orders", "raster,zorder"], "Error: `--orders` must be a comma-separated list of distinct names from"),
        (["--grid", "2x4x4", "--orders", ","], "Error: `--orders` must be a comma-separated list of distinct names from"),
    ],
)
def test_bad_input_is_one_red_line_and_exit_code_2(args, message):
    result = CliRunner().invoke(main, ["orders", *args], color=True)
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("\x1b[31m")  # red
    assert message in lines[0]

"""parse_names: comma-separated registry names, and "all" for every registered name."""

import json

import pytest
from click.testing import CliRunner

from dfsviz.cli import main, parse_names
from dfsviz.sparse.orders import order_names
from dfsviz.sparse.scoring import scorer_names


def test_names_in_the_order_given():
    assert parse_names(" tiled, raster ", "--orders", order_names()) == ("tiled", "raster")


@pytest.mark.parametrize("names", [order_names(), scorer_names()])
def test_all_is_every_registered_name_in_registry_order(names):
    assert parse_names("all", "--x", names) == tuple(names)
    assert parse_names(" all ", "--x", names) == tuple(names)


@pytest.mark.parametrize("spec", ["", "raster,raster", "nope", "all,raster", "raster,all", "ALL", "raster,,tiled",
                                  "raster,"])
def test_bad_lists_name_the_option_the_choices_and_all(spec):
    with pytest.raises(ValueError, match=r"`--orders` must be a comma-separated list of distinct names "
                                         r"from raster,hilbert3d,.*tiled, or all \(got"):
        parse_names(spec, "--orders", order_names())


def test_a_library_error_names_the_option_the_command_parsed():
    result = CliRunner().invoke(main, ["capture", "--seeds", "0,3,0", "--dry-run", "--out", "set"])
    assert result.exit_code == 2 and "Error: `--seeds` lists seed 0 twice" in result.output, result.output


def test_capture_takes_all_orders():
    """`dfsviz capture --orders all` resolves to every registered order (the dry run prints the config)."""
    result = CliRunner().invoke(main, ["capture", "--orders", "all", "--methods", "all", "--dry-run", "--out", "x.h5"])
    assert result.exit_code == 0, result.output
    resolved = json.loads(result.output[result.output.index("{"):result.output.rindex("}") + 1])
    assert resolved["orders"] == order_names() and resolved["methods"] == scorer_names()


def test_orders_command_takes_all():
    result = CliRunner().invoke(main, ["orders", "--grid", "4x8x8", "--block", "32", "--orders", "all", "--json"])
    assert result.exit_code == 0, result.output
    assert [row["order"] for row in json.loads(result.output)["orders"]] == order_names()

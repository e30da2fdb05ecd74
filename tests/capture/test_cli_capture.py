"""`dfsviz capture` and `dfsviz inspect` through click's CliRunner."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import pytest
import torch
from click.testing import CliRunner
from stored_curves import UINT8_CURVE_BOUND, assert_stored_curves_match_the_maps

import dfsviz.cli.capture  # noqa: F401  (registers the command on the group)
import dfsviz.cli.inspect  # noqa: F401
from dfsviz.cli import main
from dfsviz.cli.capture import parse_int_list

FIXTURE = Path(__file__).resolve().parents[1] / "data" / "format_v1.h5"
TINY = ["--embeddings", "random", "--latent", "3x16x16", "--block", "16", "--tile", "4", "--stride", "4", "--device", "cpu"]


def _invoke(*args):
    return CliRunner().invoke(main, list(args))


def test_dry_run_prints_resolved_config_and_size(tmp_path, model_dirs):
    out = tmp_path / "x.h5"
    result = _invoke("capture", "--model", str(model_dirs["wan"]), "--out", str(out), "--dry-run", "--num-steps", "10",
                     *TINY)
    assert result.exit_code == 0, result.output
    text, size_line = result.output.rsplit("}", 1)
    info = json.loads(text + "}")
    assert info["grid"] == "f3h8w8" and info["tokens"] == 192 and info["blocks"] == 12
    assert info["capture_steps"] == [0, 2, 4, 7, 9] and info["layers"] == [0, 1] and info["heads"] == [0, 1]
    # per step: 2 layers x 1 branch x 2 orders x 2 heads = 8 maps of 12 x 12
    # (of the 3 default methods, meanpool's score is L: 2 are stored), and 8 x 4 recall and 8 x 4 density curves of 12 points (the 3 methods and the oracle)
    maps = 8 * 144
    assert info["map_dtype"] == "float32" and info["map_dtype_choice"].startswith("auto: float32")
    expected = 4 * maps * 4 + 2 * maps * 4 + 2 * 8 * 8 + 8 * 2 * 4 + 8 * 2 * 192 * 2 + 2 * 8 * 4 * 12 * 4  # 2 footprints
    assert info["estimated_file_bytes_uncompressed"] == 5 * expected
    assert "estimated size:" in size_line and "for 5 steps" in size_line
    assert not out.exists()


def test_existing_output_without_overwrite_is_one_line_exit_2(tmp_path, model_dirs):
    out = tmp_path / "x.h5"
    out.write_bytes(b"keep me")
    result = _invoke("capture", "--model", str(model_dirs["wan"]), "--out", str(out), "--quiet", *TINY)
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [f"Error: output {str(out)!r} exists; pass --overwrite to replace it "
                                                  "or --resume to continue it"]
    assert out.read_bytes() == b"keep me"


@pytest.mark.parametrize("folder, state", [("missing", "does not exist; create it first"), ("a_file", "is a file")])
def test_an_output_folder_that_is_not_one_is_one_line_exit_2(tmp_path, model_dirs, folder, state):
    (tmp_path / "a_file").write_bytes(b"keep me")
    result = _invoke("capture", "--model", str(model_dirs["wan"]), "--out", str(tmp_path / folder / "x.h5"), "--quiet",
                     *TINY)
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [f"Error: output directory {str(tmp_path / folder)!r} {state}"]
    assert (tmp_path / "a_file").read_bytes() == b"keep me"


def test_unknown_model_and_unsupported_architecture_exit_2(tmp_path):
    result = _invoke("capture", "--model", "not-a-model", "--out", str(tmp_path / "a.h5"), *TINY)
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert "unknown model 'not-a-model'" in result.output and "WanTransformer3DModel" in result.output
    flux = tmp_path / "flux"
    flux.mkdir()
    (flux / "config.json").write_text(json.dumps({"_class_name": "FluxTransformer2DModel"}))
    result = _invoke("capture", "--model", str(flux), "--out", str(tmp_path / "b.h5"), *TINY)
    assert result.exit_code == 2
    assert "unsupported architecture FluxTransformer2DModel; supported: WanTransformer3DModel" in result.output
    assert "HunyuanVideoTransformer3DModel" in result.output and "CogVideoXTransformer3DModel" in result.output


def test_bad_option_values_exit_2(tmp_path, model_dirs):
    result = _invoke("capture", "--model", str(model_dirs["wan"]), "--out", str(tmp_path / "a.h5"), "--layers", "3-1",
                     *TINY)
    assert result.exit_code == 2 and "runs backwards" in result.output
    result = _invoke("capture", "--model", str(model_dirs["wan"]), "--out", str(tmp_path / "a.h5"), "--orders",
                     "raster,spiral", *TINY)
    assert result.exit_code == 2 and "`--orders` must be a comma-separated list of distinct names" in result.output
    result = _invoke("capture", "--model", str(model_dirs["wan"]), "--out", str(tmp_path / "a.h5"), "--layers", "0,5",
                     "--dry-run", *TINY)
    assert result.exit_code == 2 and "`--layers` 5 do not exist; this model has layers 0..1" in result.output


def test_parse_int_list():
    assert parse_int_list("0,3,5-7", "--layers") == (0, 3, 5, 6, 7)
    assert parse_int_list("all", "--layers") is None and parse_int_list(None, "--layers") is None
    with pytest.raises(ValueError, match="`--heads` must be 'all' or integers and ranges"):
        parse_int_list("1,x", "--heads")


def test_help_shows_examples():
    assert "dfsviz capture --out tiny.h5" in _invoke("capture", "--help").output
    assert "dfsviz inspect capture.h5" in _invoke("inspect", "--help").output


def test_inspect_fixture(tmp_path):
    result = _invoke("inspect", str(FIXTURE), "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["complete"] is True and info["format_version"] == 1 and info["problems"] == []
    assert info["completed_steps"] == [1] and info["grid"] == "f3h8w8" and info["model_class"] == "WanTransformer3DModel"
    assert info["stored_recall"] is False  # written before captures stored recall curves
    result = _invoke("inspect", str(FIXTURE))
    assert result.exit_code == 0 and "completed_steps" in result.output


def test_inspect_unknown_version_and_invalid_file(tmp_path):
    newer = tmp_path / "newer.h5"
    shutil.copy(FIXTURE, newer)
    with h5py.File(newer, "r+") as f:
        f.attrs["format_version"] = 2
        f.attrs["dfsviz_version"] = "0.9.0"
    result = _invoke("inspect", str(newer))
    assert result.exit_code == 2 and "format version 2, written by dfsviz 0.9.0" in result.output
    broken = tmp_path / "broken.h5"
    shutil.copy(FIXTURE, broken)
    with h5py.File(broken, "r+") as f:
        f["orders/hilbert3d"][0] = f["orders/hilbert3d"][1]  # no longer a permutation
    result = _invoke("inspect", str(broken))
    assert result.exit_code == 2 and "order 'hilbert3d': stored permutation is not a bijection" in result.output


def test_dry_run_defaults_to_the_embedded_model(tmp_path):
    from dfsviz.models import embedded_model_dir

    if not (embedded_model_dir() / "config.json").is_file():
        pytest.skip("the embedded model's weights are not in data/models yet")
    result = _invoke("capture", "--out", str(tmp_path / "e.h5"), "--dry-run", "--device", "cpu")
    assert result.exit_code == 0, result.output
    info = json.loads(result.output.rsplit("}", 1)[0] + "}")
    assert info["model"].startswith("dfsviz-embedded:") and info["architecture"] == "WanTransformer3DModel"
    f, h, w = json.loads((embedded_model_dir() / "dfsviz_model.json").read_text())["token_grid"]
    assert info["grid"] == f"f{f}h{h}w{w}" and info["tokens"] == f * h * w and info["blocks"] == -(-f * h * w // 128)


def test_every_capture_setting_has_an_option_with_its_default():
    """The options of `dfsviz capture` are checked against CaptureConfig's fields: a setting added
    to the config without an option (or with another default) fails here."""
    import dataclasses

    from dfsviz.capture.config import CaptureConfig

    import click

    command = main.commands["capture"]
    context = click.Context(command)
    params = {p.name: p for p in command.params}
    # the options that parse a spec into the field's value ("0,3,5-7", "raster,hilbert3d")
    spec_of = {"orders": "orders_spec", "methods": "methods_spec"}
    for field in dataclasses.fields(CaptureConfig):
        param = params.get(spec_of.get(field.name, field.name))
        assert param is not None, f"CaptureConfig.{field.name} has no `dfsviz capture` option"
        default = param.get_default(context)
        if field.name in spec_of:
            default = tuple(default.split(","))
        elif field.name in ("capture_steps", "layers", "heads", "qkv_steps"):
            default = parse_int_list(default, field.name)
        elif field.name == "save_qkv":
            default = parse_int_list(default, field.name) or ()
        elif field.name == "step_budget":
            default = CaptureConfig(out="x.h5", step_budget=default).step_budget  # "8GB" -> bytes
        if field.default is dataclasses.MISSING or field.name in ("prompt", "seed", "text_first"):
            continue  # required (--out), or None on the command line for "not given"
        assert default == field.default, (field.name, default, field.default)


def test_help_lists_map_dtype_and_step_budget():
    output = " ".join(_invoke("capture", "--help").output.split())
    assert "--map-dtype [auto|float32|float16|uint8]" in output and "--step-budget" in output
    assert "auto: the widest dtype whose largest step fits --step-budget" in output


def test_auto_stores_uint8_maps_when_the_step_budget_asks_for_it(tmp_path, model_dirs):
    """The tiny Wan under the default fits float32; a step budget below its float16 step makes
    auto store uint8 maps, which read back as float32 close to the float32 capture's, and the file
    says why."""
    from dfsviz.capture.reader import CaptureReader

    paths = {"default": tmp_path / "default.h5", "small": tmp_path / "small.h5"}
    for name, budget in (("default", ()), ("small", ("--step-budget", "20kB"))):
        result = _invoke("capture", "--model", str(model_dirs["wan"]), "--out", str(paths[name]), "--num-steps", "2",
                         "--quiet", *budget, *TINY)
        assert result.exit_code == 0, result.output
    with CaptureReader(paths["default"]) as full, CaptureReader(paths["small"]) as small:
        assert full.layout.map_dtype == "float32" and full.attrs["map_dtype_choice"].startswith("auto: float32")
        assert small.layout.map_dtype == "uint8" and small.validate() == []
        assert small.attrs["map_dtype_choice"].startswith("auto: uint8") and "20.00 kB" in small.attrs["map_dtype_choice"]
        assert small.summary()["map_dtype"] == "uint8"  # dfsviz inspect
        assert json.loads(small.attrs["capture_config"])["step_budget"] == 20_000
        for step in small.steps:
            for layer in small.layers:
                for order in small.orders:
                    want, got = full.block_stats(step, layer, order), small.block_stats(step, layer, order)
                    assert (got.m - want.m).abs().max() < 1 / 254 and (got.m.sum(-1) - 1).abs().max() < 1e-5
                    assert bool((got.r >= want.r).all()) and bool((got.J >= want.J).all())
                    for method in small.methods:  # the curves of the maps as computed, before their 8-bit coding
                        assert torch.equal(small.recall_curve(step, layer, order, method),
                                           full.recall_curve(step, layer, order, method))
        # against the curves of the 8-bit maps the file stores: within the error docs/format.md states
        worst = assert_stored_curves_match_the_maps(small, atol=UINT8_CURVE_BOUND)
        assert worst > 1e-6  # the 8-bit maps' own curves differ: the stored ones are not recomputed from them
    result = _invoke("inspect", str(paths["small"]), "--json")
    assert result.exit_code == 0 and json.loads(result.output)["stored_recall"] is True


def test_step_budget_and_map_dtype_refusals_are_one_line():
    result = _invoke("capture", "--out", "x.h5", "--step-budget", "lots", *TINY)
    assert result.exit_code == 2 and result.output.strip().splitlines() == [
        "Error: `--step-budget` must be a size in bytes > 0, a whole number or a number with a unit (B, kB, MB, GB, TB, "
        "KiB, MiB, GiB, TiB), e.g. 8GB (got 'lots')"]
    result = _invoke("capture", "--out", "x.h5", "--map-dtype", "int4", *TINY)
    assert result.exit_code == 2 and "Invalid value for '--map-dtype': 'int4' is not one of 'auto', 'float32', " \
        "'float16', 'uint8'" in result.output


def test_float16_capture_holds_the_float32_capture_rounded(tmp_path, model_dirs):
    """The tiny Wan captured with --map-dtype float32 and float16: the float16 file's maps are
    the float32 file's rounded to float16, and it validates."""
    from dfsviz.capture.reader import CaptureReader

    paths = {}
    for dtype in ("float32", "float16"):
        paths[dtype] = tmp_path / f"{dtype}.h5"
        result = _invoke("capture", "--model", str(model_dirs["wan"]), "--out", str(paths[dtype]), "--num-steps", "2",
                         "--map-dtype", dtype, "--quiet", *TINY)
        assert result.exit_code == 0, result.output
    with CaptureReader(paths["float32"]) as full, CaptureReader(paths["float16"]) as half:
        assert half.validate() == [] and half.layout.map_dtype == "float16"
        assert half.summary()["map_dtype"] == "float16" and full.summary()["map_dtype"] == "float32"  # dfsviz inspect
        assert json.loads(half.attrs["capture_config"])["map_dtype"] == "float16"
        assert half.steps == full.steps == [0, 1]
        for step in half.steps:
            for layer in half.layers:
                for order in half.orders:
                    want, got = full.block_stats(step, layer, order), half.block_stats(step, layer, order)
                    for name in ("m", "L", "r", "J"):
                        assert torch.equal(getattr(got, name), getattr(want, name).half().float()), (step, layer, order, name)
                    for method in half.methods:
                        assert torch.equal(half.scores(step, layer, order, method),
                                           full.scores(step, layer, order, method).half().float())

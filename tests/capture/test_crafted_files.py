"""Crafted and damaged capture files: refused with one line naming what is wrong, never a
traceback, never a byte read from outside the capture's own directory."""

from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

import dfsviz.cli.inspect  # noqa: F401  (registers the command)
from dfsviz.capture import CaptureConfig, run_capture
from dfsviz.capture.reader import CaptureReader
from dfsviz.cli import main

SETTINGS = dict(embeddings="random", num_steps=3, capture_steps=(0, 2), latent="3x16x16", block=16, tile=4, stride=4,
                footprints=1, device="cpu", save_qkv=(1,), qkv_steps=(2,))


@pytest.fixture(scope="module")
def capture(tmp_path_factory, model_dirs):
    out = tmp_path_factory.mktemp("crafted") / "good.h5"
    run_capture(CaptureConfig(out=str(out), model=str(model_dirs["wan"]), **SETTINGS), progress=False)
    return out


@pytest.fixture
def copy(tmp_path, capture):
    def make(name="c.h5"):
        path = tmp_path / name
        shutil.copy(capture, path)
        return path

    return make


def _one_line_exit_2(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit)
    return result.output


# ----------------------------------------------------------------------------------------
# links and storage outside the file
# ----------------------------------------------------------------------------------------
def test_external_link_is_refused(copy, tmp_path):
    secret = tmp_path / "secret.h5"
    with h5py.File(secret, "w") as f:
        f["perm"] = np.arange(192, dtype=np.int64)[::-1].copy()
    path = copy()
    with h5py.File(path, "r+") as f:
        del f["orders/raster"]
        f["orders/raster"] = h5py.ExternalLink(str(secret), "/perm")
    with pytest.raises(ValueError, match=r"'/orders/raster' is an external link .*refused"):
        CaptureReader(path)
    assert "external link" in _one_line_exit_2("inspect", path)


def test_soft_link_is_refused(copy):
    path = copy()
    with h5py.File(path, "r+") as f:
        del f["orders/raster"]
        f["orders/raster"] = h5py.SoftLink("/orders/hilbert3d")
    with pytest.raises(ValueError, match=r"'/orders/raster' is a soft link"):
        CaptureReader(path)


def test_external_raw_storage_is_refused(copy, tmp_path):
    outside = tmp_path / "hostname"
    outside.write_bytes(np.arange(192, dtype=np.int64).tobytes())
    path = copy()
    with h5py.File(path, "r+") as f:
        del f["orders/raster"]
        f.create_dataset("orders/raster", shape=(192,), dtype=np.int64, external=[(str(outside), 0, 192 * 8)])
    with pytest.raises(ValueError, match=r"'/orders/raster' stores its data in an external file .*refused"):
        CaptureReader(path)


def _virtual(path, source, name="orders/raster"):
    layout = h5py.VirtualLayout(shape=(192,), dtype=np.int64)
    layout[:] = h5py.VirtualSource(str(source), "perm", shape=(192,))
    with h5py.File(path, "r+") as f:
        del f[name]
        f.create_virtual_dataset(name, layout)


def test_virtual_datasets_are_refused_wherever_their_source_lies(copy, tmp_path_factory, tmp_path):
    """dfsviz never writes them; a source beside the file could be swapped for a link out of the
    data root after the file was checked, so none is followed."""
    elsewhere = tmp_path_factory.mktemp("elsewhere") / "src.h5"
    with h5py.File(elsewhere, "w") as f:
        f["perm"] = np.arange(192, dtype=np.int64)
    path = copy()
    _virtual(path, elsewhere)
    with pytest.raises(ValueError, match=r"'/orders/raster' is a virtual dataset reading other files: dfsviz captures "
                                         r"keep their data inside the file \(refused\)"):
        CaptureReader(path)
    relative = copy("rel.h5")
    _virtual(relative, "../" + elsewhere.parent.name + "/src.h5")
    with pytest.raises(ValueError, match="is a virtual dataset reading other files"):
        CaptureReader(relative)
    beside = copy("beside.h5")
    with h5py.File(beside, "r") as f:
        perm = f["orders/raster"][...]
    with h5py.File(tmp_path / "rank0.h5", "w") as f:
        f["perm"] = perm
    _virtual(beside, "rank0.h5")
    with pytest.raises(ValueError, match="is a virtual dataset reading other files"):
        CaptureReader(beside)


# ----------------------------------------------------------------------------------------
# missing or mistyped metadata
# ----------------------------------------------------------------------------------------
ROOT_ATTRS = ["grid_frames", "grid_height", "grid_width", "text_len", "text_first", "block", "orders", "methods",
              "layers", "layer_names", "heads", "branches", "steps", "footprints", "qkv_layers", "head_dim",
              "qkv_dtype", "complete", "capture_config"]


@pytest.mark.parametrize("name", ROOT_ATTRS)
def test_missing_root_attribute(copy, name):
    path = copy()
    with h5py.File(path, "r+") as f:
        del f.attrs[name]
    with pytest.raises(ValueError, match=rf"root attribute '{name}' is missing"):
        CaptureReader(path)
    output = _one_line_exit_2("inspect", path)
    assert output.count("\n") == 1 and f"'{name}'" in output


@pytest.mark.parametrize(
    ("name", "value", "match"),
    [
        ("block", "abc", r"root attribute 'block' must be an integer"),
        ("block", 96, r"root attribute 'block' must be a power of two in \[16, 256\] \(got 96\)"),
        ("grid_frames", -1, r"root attribute 'grid_frames' must be an integer >= 1 \(got -1\)"),
        ("layers", np.zeros((2, 2), dtype=np.int64), r"root attribute 'layers' must be a list \(got an array of shape \(2, 2\)\)"),
        ("layer_names", np.array(["a"], dtype=h5py.string_dtype()), r"`layer_names` must name every captured layer"),
        ("heads", np.array([0, 0, 1]), r"root attribute 'heads' lists a value twice"),
        ("orders", np.array(["raster", "zigzag"], dtype=h5py.string_dtype()), r"root attribute 'orders' has unknown order 'zigzag'"),
        ("steps", np.array([2, 0]), r"root attribute 'steps' must be ascending"),
        ("capture_config", "{not json", r"root attribute 'capture_config' is not a JSON object"),
        ("qkv_dtype", "int8", r"root attribute 'qkv_dtype' must be one of"),
        ("map_dtype", "bfloat16", r"root attribute 'map_dtype' must be one of \['float32', 'float16', 'uint8'\] \(got 'bfloat16'\)"),
        ("text_first", "yes", r"root attribute 'text_first' must be a bool"),
        ("stored_recall", "yes", r"root attribute 'stored_recall' must be a bool"),
    ],
)
def test_mistyped_root_attribute(copy, name, value, match):
    path = copy()
    with h5py.File(path, "r+") as f:
        f.attrs[name] = value
    with pytest.raises(ValueError, match=match):
        CaptureReader(path)
    _one_line_exit_2("inspect", path)


@pytest.mark.parametrize("name", ["coords", "orders/raster", "orders", "steps", "steps/step_0002/m",
                                  "steps/step_0002/scores", "steps/step_0002/q", "steps/step_0002/layer",
                                  "steps/step_0002/recall", "steps/step_0000/kept_blocks", "steps/step_0000/recall_method"])
def test_missing_dataset_or_group(copy, name):
    path = copy()
    with h5py.File(path, "r+") as f:
        del f[name]
    with pytest.raises(ValueError, match=rf"'/{name}' is missing"):
        CaptureReader(path)
    _one_line_exit_2("inspect", path)


@pytest.mark.parametrize(
    ("name", "make", "match"),
    [
        ("steps/step_0002/m", lambda ds: np.zeros(ds.shape[:-1] + (ds.shape[-1] + 1,), np.float32), r"has shape .* expected"),
        ("steps/step_0002/m", lambda ds: np.zeros(ds.shape, np.int32), r"has dtype int32, expected float32"),
        ("steps/step_0002/footprint_block", lambda ds: np.zeros(ds.shape, np.float64), r"has dtype float64, expected int32"),
        ("coords", lambda ds: np.zeros((5, 3), np.int32), r"'/coords' has shape \(5, 3\), expected \(192, 3\)"),
        ("orders/hilbert3d", lambda ds: np.zeros(ds.shape, np.float32), r"has dtype float32, expected int64"),
        ("steps/step_0000/W_q", lambda ds: np.zeros(ds.shape, np.float32), r"has dtype float32, expected float64"),
        ("steps/step_0000/recall", lambda ds: np.zeros(ds.shape, np.float64), r"'/steps/step_0000/recall' has dtype float64, expected float32"),
        ("steps/step_0000/recall", lambda ds: np.zeros(ds.shape[:-1] + (3,), np.float32), r"'/steps/step_0000/recall' has shape .*, expected \(2, 1, 2, 4, 2, 12\)"),
    ],
)
def test_wrong_shape_or_dtype(copy, name, make, match):
    path = copy()
    with h5py.File(path, "r+") as f:
        data = make(f[name])
        del f[name]
        f[name] = data
    with pytest.raises(ValueError, match=match):
        CaptureReader(path)
    _one_line_exit_2("inspect", path)


def test_step_group_attributes(copy):
    path = copy()
    with h5py.File(path, "r+") as f:
        f["steps/step_0002"].attrs["step"] = 7
    with pytest.raises(ValueError, match=r"'/steps/step_0002' has attribute step = 7"):
        CaptureReader(path)
    path = copy("extra.h5")
    with h5py.File(path, "r+") as f:
        f["steps"].create_group("evil")
    with pytest.raises(ValueError, match=r"'/steps/evil' is not a step group"):
        CaptureReader(path)


def test_unwritten_map_of_a_complete_step(copy):
    path = copy()
    with h5py.File(path, "r+") as f:
        m = f["steps/step_0002/m"]
        data, shape, chunks = m[...], m.shape, m.chunks
        del f["steps/step_0002/m"]
        new = f.create_dataset("steps/step_0002/m", shape=shape, dtype=np.float32, chunks=chunks, compression="gzip",
                               shuffle=True, fillvalue=np.nan)
        new[:-1] = data[:-1]  # the last layer's maps never written
        new.attrs["dims"] = np.array(["layer", "branch", "order", "head", "q_block", "k_block"], dtype=h5py.string_dtype())
    with pytest.raises(ValueError, match=r"'/steps/step_0002/m' has 4 of its 8 maps written, yet the step is marked complete"):
        CaptureReader(path)


def test_unknown_compression_filter_is_refused(copy):
    path = copy()
    with h5py.File(path, "r+") as f:
        data = f["steps/step_0000/L"][...]
        del f["steps/step_0000/L"]
        f.create_dataset("steps/step_0000/L", data=data, chunks=(1, 1, 1, 1) + data.shape[-2:], compression="lzf")
    with pytest.raises(ValueError, match=r"'/steps/step_0000/L' uses HDF5 filter .*lzf.* dfsviz writes only shuffle and gzip"):
        CaptureReader(path)


# ----------------------------------------------------------------------------------------
# content: every map, cheaply
# ----------------------------------------------------------------------------------------
def _edit(path, name, index, fn):
    with h5py.File(path, "r+") as f:
        ds = f[name]
        ds[index] = fn(ds[index])


@pytest.mark.parametrize(
    ("name", "index", "fn", "match"),
    [
        # the last map of the last step, not the first one
        ("steps/step_0002/m", (-1, 0, -1, -1), lambda a: a * 1.25, r"step_0002/m\[layer 1, branch cond, order hilbert3d, head 1\]: rows do not sum to 1"),
        ("steps/step_0002/m", (-1, 0, -1, -1), lambda a: -a, r"m\[layer 1, .*\]: negative"),
        ("steps/step_0002/L", (1, 0, 0, 0), lambda a: a * np.nan, r"step_0002/L\[layer 1, branch cond, order raster, head 0\]: 144 non-finite values"),
        ("steps/step_0000/r", (0, 0, 1, 1), lambda a: a - 10, r"step_0000/r\[.*\]: negative"),
        ("steps/step_0002/scores", (1, 0, 1, 1, 1), lambda a: a * np.inf, r"scores\[layer 1, branch cond, order hilbert3d, method antidiagonal, head 1\]: .*non-finite"),
        ("steps/step_0002/footprint_block", (1, 0, 1, 1), lambda a: a + 100, r"footprint_block\[.*\]: query block 1\d\d outside \[0, 12\)"),
        ("steps/step_0002/footprint", (1, 0, 1, 1), lambda a: a * np.nan, r"footprint\[.*\]: .*NaN"),
        ("steps/step_0002/v", (0, 0, 1), lambda a: a * np.inf, r"v\[qkv_layer 1, branch cond, head 1\]: .*non-finite"),
        ("steps/step_0002/W_k", (1, 0, 1), lambda a: a + 3, r"W_k\[.*\]: outside \[0, 1\]"),
        # recall [layer, branch, order, recall_method, head, k]: the curves of every head of one method
        ("steps/step_0002/recall", (1, 0, 1, 2), lambda a: a * 1.25,
         r"step_0002/recall\[layer 1, branch cond, order hilbert3d, recall_method antidiagonal, head 0\]: outside \[0, 1\]"),
        ("steps/step_0002/recall", (0, 0, 0, 0, 1), lambda a: a[::-1].copy(),
         r"step_0002/recall\[layer 0, branch cond, order raster, recall_method meanpool, head 1\]: decreases with k"),
        ("steps/step_0000/recall", (1, 0, 0, 1), lambda a: a * 0.5, r"step_0000/recall\[.*recall_method dfs_tile, head 0\]: not 1 with every block kept \(0\.5 at k = Mk = 12\)"),
        ("steps/step_0000/recall", (1, 0, 0, 1, 1, 4), lambda a: a * np.nan, r"step_0000/recall\[.*, head 1\]: 1 non-finite value"),
        ("steps/step_0002/density", (0, 0, 1, 1), lambda a: a[..., ::-1].copy(),
         r"step_0002/density\[layer 0, branch cond, order hilbert3d, recall_method dfs_tile, head 0\]: decreases with k"),
        ("steps/step_0000/kept_blocks", (0,), lambda a: a - 1, r"step_0000/kept_blocks: coordinate values \[0, 2, 3, .* expected \[1, 2, 3,"),
        ("orders/hilbert3d", (slice(0, 2),), lambda a: a[::-1] * 0, r"order 'hilbert3d': stored permutation is not a bijection"),
        ("coords", (0,), lambda a: a + 1, r"coords do not match the grid"),
        ("steps/step_0002/layer", (0,), lambda a: a + 5, r"step_0002/layer: coordinate values .* expected \[0, 1\]"),
    ],
)
def test_validate_checks_every_map(copy, name, index, fn, match):
    path = copy()
    _edit(path, name, index, fn)
    with CaptureReader(path) as reader:
        problems = reader.validate()
    assert any(__import__("re").search(match, p) for p in problems), problems
    output = _one_line_exit_2("inspect", path)
    assert "invalid:" in output


def test_dims_label_attribute_must_match(copy):
    path = copy()
    with h5py.File(path, "r+") as f:
        f["steps/step_0002/m"].attrs["dims"] = np.array(["layer", "branch", "order", "head", "k_block", "q_block"],
                                                        dtype=h5py.string_dtype())
    with pytest.raises(ValueError, match=r"'/steps/step_0002/m' has dims .*expected \['layer', 'branch', 'order', 'head', 'q_block', 'k_block'\]"):
        CaptureReader(path)


def test_a_sound_capture_validates(capture):
    with CaptureReader(capture) as reader:
        assert reader.validate() == [] and reader.stored_recall

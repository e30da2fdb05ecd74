"""``dfsviz calibrate``: the config file and summary on the shipped sample, --help, and one red line
with exit code 2 for each error."""

from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner

import dfsviz
from dfsviz.accel.plan import CalibratedPlan
from dfsviz.analysis.sweeps import write_token_model_capture
from dfsviz.cli import main
from dfsviz.sparse.grid import LatentGrid
from dfsviz.sparse.tokenmodel import TokenModelConfig


def _token(path, steps=(0, 3, 6, 9), grid=LatentGrid(2, 8, 16)):
    return write_token_model_capture(path, TokenModelConfig(grid, heads=2, head_dim=16), num_steps=10, steps=steps,
                                     layers=2, orders=("hilbert3d",), methods=("dfs_tile",), block=32, footprints=0)


def test_calibrates_the_sample(tmp_path):
    out = tmp_path / "dfsattn.json"
    result = CliRunner().invoke(main, ["calibrate", str(dfsviz.sample_capture()), "--target-recall", "0.9",
                                       "--method", "dfs_tile", "--out", str(out)])
    assert result.exit_code == 0, result.output
    plan = CalibratedPlan.load(out)
    assert plan.method == "dfs_tile" and plan.order == "hilbert3d" and plan.model.id == "dfsviz-embedded:tiny-wan"
    lines = result.stdout.splitlines()  # the progress bar goes to stderr
    assert lines[0].startswith(f"wrote {out}: dfsviz-embedded:tiny-wan (WanTransformer3DModel), grid f9h18w32")
    assert lines[1] == "goal: every head's recall >= 0.9; order hilbert3d, method dfs_tile (tile 16)"
    assert lines[2].startswith(f"schedule: {plan.warmup_steps} dense warm-up step(s) of 20, refresh every "
                               f"{plan.interval} step(s)")
    table = lines.index("layer  mean gamma  recall  density  dense heads  recall range across captures")
    rows = lines[table + 1: table + 9]
    for lb, row in zip(plan.layers, rows):
        cells = row.split()
        assert int(cells[0]) == lb.layer
        assert float(cells[2]) == pytest.approx(sum(lb.predicted_recall) / len(lb.gamma), abs=6e-4)
        assert cells[4] == f"{sum(g is None for g in lb.gamma)}/3"
        assert "n/a (1 capture)" in row
    assert lines[-1].startswith("method dfs_tile (chosen): warm-up")


def test_pooled_captures_show_their_range(tmp_path):
    a, b = _token(tmp_path / "a.h5"), _token(tmp_path / "b.h5")
    out = tmp_path / "p.json"
    result = CliRunner().invoke(main, ["calibrate", a, b, "--max-density", "0.6", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "goal: attention work <= 0.6 of dense" in result.output
    lines = result.stdout.splitlines()
    table = lines.index("layer  mean gamma  recall  density  dense heads  recall range across captures")
    assert [row.split()[-1] for row in lines[table + 1: table + 3]] == ["0.000", "0.000"]  # identical clips
    data = json.loads(out.read_text())
    assert data["provenance"]["max_density"] == 0.6 and len(data["provenance"]["captures"]) == 2
    assert data["predicted"]["attention_work"] <= 0.6 + 1e-9


def test_help_shows_an_example():
    result = CliRunner().invoke(main, ["calibrate", "--help"])
    assert result.exit_code == 0
    assert "Example" in result.output and "dfsviz calibrate run.h5 --target-recall 0.9 --out dfsattn.json" in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["{a}", "--out", "{o}"], "pass exactly one of `--target-recall` (recall every head keeps) or "
                                  "`--max-density` (attention work of the run); got neither"),
        (["{a}", "--target-recall", "0.9", "--max-density", "0.3", "--out", "{o}"], "; got both"),
        (["{one}", "--target-recall", "0.9", "--out", "{o}"],
         "calibration needs at least two captured steps for drift"),
        (["{a}", "{other}", "--target-recall", "0.9", "--out", "{o}"], "captures of different models cannot be pooled"),
        (["{a}", "--target-recall", "1.0", "--out", "{o}"], "target recall 1 cannot be met by any sparse budget"),
        (["{a}", "--max-density", "0.01", "--out", "{o}"], "max density 0.01 cannot be met"),
        (["{d}/missing.h5", "--target-recall", "0.9", "--out", "{o}"], "does not exist"),
        (["{a}", "--target-recall", "2", "--out", "{o}"], "`--target-recall` must be a fraction in (0, 1] (got 2.0)"),
        (["{a}", "--target-recall", "0.9", "--warmup", "-1", "--out", "{o}"],
         "`--warmup` must be an integer >= 0 (got -1); leave it out to have it chosen"),
        # the output is checked before the captures are read
        (["{a}", "--target-recall", "0.9", "--out", "{d}/missing/x.json"],
         "`--out` '{d}/missing/x.json': its folder '{d}/missing' does not exist; create it first"),
        (["{a}", "--target-recall", "0.9", "--out", "{a}/x.json"], "`--out` '{a}/x.json': its folder '{a}' is a file"),
    ],
)
def test_errors_are_one_red_line(tmp_path, args, message):
    paths = {"a": _token(tmp_path / "a.h5"), "one": _token(tmp_path / "one.h5", steps=(4,)),
             "other": _token(tmp_path / "other.h5", grid=LatentGrid(2, 8, 8)), "o": str(tmp_path / "x.json"),
             "d": str(tmp_path)}
    result = CliRunner().invoke(main, ["calibrate", *(a.format(**paths) for a in args)])
    assert result.exit_code == 2, result.output
    assert message.format(**paths) in result.output and "Traceback" not in result.output
    assert len([line for line in result.output.splitlines() if line.startswith("Error:")]) == 1
    assert not (tmp_path / "x.json").exists()


def test_an_unwritable_output_folder_is_refused_before_the_work(tmp_path, monkeypatch):
    """Without permission to write in --out's folder (the probe file refused as it is for a user
    without it: this suite may run as root, whom permission bits never refuse), nothing is read."""
    import tempfile

    capture = _token(tmp_path / "a.h5")

    def refused(**kwargs):
        raise PermissionError(13, "Permission denied", kwargs["dir"])

    monkeypatch.setattr(tempfile, "mkstemp", refused)
    result = CliRunner().invoke(main, ["calibrate", capture, "--target-recall", "0.9", "--out", str(tmp_path / "x.json")])
    assert result.exit_code == 2
    assert result.output == f"Error: `--out` '{tmp_path / 'x.json'}': no permission to write in '{tmp_path}'\n"


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_a_folder_that_takes_no_file_is_refused_before_the_work(tmp_path):
    """/proc takes no new file even for root, whose permission bits pass."""
    capture = _token(tmp_path / "a.h5")
    result = CliRunner().invoke(main, ["calibrate", capture, "--target-recall", "0.9", "--out", "/proc/x.json"])
    assert result.exit_code == 2
    assert result.output.startswith("Error: `--out` '/proc/x.json': ") and "'/proc'" in result.output
    assert "Traceback" not in result.output


def test_an_existing_output_is_kept_unless_it_is_a_config_and_overwrite_is_given(tmp_path):
    capture = _token(tmp_path / "a.h5")
    before = open(capture, "rb").read()
    args = ["calibrate", str(capture), "--target-recall", "0.9"]
    result = CliRunner().invoke(main, [*args, "--out", str(capture)])
    assert result.exit_code == 2
    assert f"Error: `--out` '{capture}' exists; pass --overwrite to replace it" in result.output
    # even with --overwrite, the input capture itself (any file that is not a config) is kept
    result = CliRunner().invoke(main, [*args, "--out", str(capture), "--overwrite"])
    assert result.exit_code == 2 and "is not a DFSAttn config" in result.output
    assert open(capture, "rb").read() == before
    out = tmp_path / "dfsattn.json"
    assert CliRunner().invoke(main, [*args, "--out", str(out)]).exit_code == 0
    assert CliRunner().invoke(main, [*args, "--out", str(out)]).exit_code == 2
    result = CliRunner().invoke(main, ["calibrate", str(capture), "--max-density", "0.6", "--out", str(out),
                                       "--overwrite"])
    assert result.exit_code == 0, result.output
    assert CalibratedPlan.load(out).provenance["max_density"] == 0.6


def test_the_oracle_is_never_a_calibrated_method(tmp_path):
    """Its scores are a dense attention pass at every refresh: the plan's "work" would be false."""
    from dfsviz.analysis.calibrate import CalibrationConfig, calibrate

    both = write_token_model_capture(tmp_path / "b.h5", TokenModelConfig(LatentGrid(2, 8, 16), heads=2, head_dim=16),
                                     num_steps=10, steps=(0, 3, 6, 9), layers=2, orders=("hilbert3d",),
                                     methods=("oracle", "dfs_tile"), block=32, footprints=0)
    result = calibrate([both], CalibrationConfig(max_density=0.6))
    assert result.plan.method == "dfs_tile" and set(result.plan.predicted["methods"]) == {"dfs_tile"}
    with pytest.raises(ValueError, match=r"`method` 'oracle' scores blocks by a dense attention pass at every refresh: "
                                         r"it is the reference, not a method to calibrate; pick one of \['dfs_tile'\]"):
        calibrate([both], CalibrationConfig(max_density=0.6, method="oracle"))
    only = write_token_model_capture(tmp_path / "o.h5", TokenModelConfig(LatentGrid(2, 8, 16), heads=2, head_dim=16),
                                     num_steps=10, steps=(0, 3, 6, 9), layers=2, orders=("hilbert3d",),
                                     methods=("oracle",), block=32, footprints=0)
    with pytest.raises(ValueError, match=r"share no scoring method other than the oracle"):
        calibrate([only], CalibrationConfig(max_density=0.6))


def test_a_damaged_capture_is_named_as_inspect_names_it(tmp_path):
    import h5py

    capture = _token(tmp_path / "a.h5")
    with h5py.File(capture, "r+") as f:
        m = f["steps"]["step_0003"]["m"]
        m[0, 0, 0, 0] = 2 * m[0, 0, 0, 0]  # its rows sum to 2
    result = CliRunner().invoke(main, ["calibrate", str(capture), "--target-recall", "0.9", "--out",
                                       str(tmp_path / "x.json")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"Error: capture '{capture}' fails validation: step_0003/m" in result.output
    assert f"no calibration is built from it. `dfsviz inspect {capture}` lists every problem" in result.output
    assert not (tmp_path / "x.json").exists()


def test_layers_left_out_of_the_captures_count_as_dense_in_a_note(tmp_path):
    """A capture of 2 of the embedded model's 8 layers: the plan covers those 2, the other 6 run dense."""
    from dfsviz.analysis.calibrate import CalibrationConfig, calibrate
    from dfsviz.capture import CaptureConfig, run_capture

    out = tmp_path / "two.h5"
    run_capture(CaptureConfig(out=str(out), num_steps=4, capture_steps=(0, 1, 2, 3), layers=(0, 1), footprints=0,
                              device="cpu"), progress=False)
    with dfsviz.open(out) as run:
        assert int(run.attrs["model_layers"]) == 8 and run.layers == [0, 1]
    result = calibrate([out], CalibrationConfig(max_density=0.6))
    work = result.plan.predicted["attention_work"]
    note = next(n for n in result.notes if n.startswith("the captures hold 2 of the model's 8 self-attention layers"))
    assert f"about {(2 * work + 6) / 8:.3f} of dense (layers of equal cost), not {work:.3f}" in note


def test_the_library_save_keeps_a_file_that_is_not_a_config(tmp_path):
    from dfsviz.analysis.calibrate import CalibrationConfig, calibrate

    capture = _token(tmp_path / "a.h5")
    result = calibrate([capture], CalibrationConfig(target_recall=0.9))
    before = open(capture, "rb").read()
    with pytest.raises(ValueError, match=r"exists and is not a DFSAttn config .*: it is kept; name another file"):
        result.save(capture)
    assert open(capture, "rb").read() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.h5"]  # no temporary file left


def test_a_failed_write_is_one_red_line(tmp_path, monkeypatch):
    """An OSError at the end (a full disk, a folder removed meanwhile) is one line too, not a traceback."""
    def full_disk(self, path):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(CalibratedPlan, "save", full_disk)
    out = tmp_path / "x.json"
    result = CliRunner().invoke(main, ["calibrate", _token(tmp_path / "a.h5"), "--target-recall", "0.9", "--out",
                                       str(out)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.splitlines()[-1] == f"Error: OSError: [Errno 28] No space left on device: '{out}'"


# ------------------------------------------------------------------------ run sets
RUN_SET_ARGS = ["--max-density", "0.7"]


@pytest.fixture(scope="module")
def run_set(tmp_path_factory):
    """A run set of three seeds of a tiny random-weight Wan, three captured steps each."""
    from tiny_models import build_tiny

    from dfsviz.capture import CaptureConfig, RunSetConfig, capture_run_set

    root = tmp_path_factory.mktemp("cal_run_set")
    build_tiny("wan").save_pretrained(root / "wan")
    capture = CaptureConfig(out=str(root / "set"), model=str(root / "wan"), embeddings="random", num_steps=3,
                            capture_steps=(0, 1, 2), latent="3x16x16", block=16, tile=4, orders=("hilbert3d",),
                            methods=("dfs_tile",), footprints=0, device="cpu")
    capture_run_set(RunSetConfig(capture, seeds=(0, 1, 2)), progress=False)
    return root / "set"


def _plan(path) -> dict:
    """A written config without what differs between two runs of one calibration (time, date)."""
    data = json.loads(path.read_text())
    data.pop("created_utc")
    data["provenance"].pop("seconds")
    return data


def test_a_run_set_directory_calibrates_as_the_list_of_its_clips(tmp_path, run_set):
    files = sorted(str(p) for p in run_set.glob("*.h5"))
    assert len(files) == 3
    by_dir = CliRunner().invoke(main, ["calibrate", str(run_set), *RUN_SET_ARGS, "--out", str(tmp_path / "d.json")])
    assert by_dir.exit_code == 0, by_dir.output
    assert "3 capture(s)" in by_dir.stdout.splitlines()[0]
    by_files = CliRunner().invoke(main, ["calibrate", *files, *RUN_SET_ARGS, "--out", str(tmp_path / "f.json")])
    assert by_files.exit_code == 0, by_files.output
    plan = _plan(tmp_path / "d.json")
    assert plan == _plan(tmp_path / "f.json")
    assert [c["path"] for c in plan["provenance"]["captures"]] == files


def test_an_incomplete_run_set_needs_allow_incomplete(tmp_path, run_set):
    import shutil

    # what a run set killed between its second and third clip leaves: the third clip not marked, its file absent
    cut = tmp_path / "cut"
    shutil.copytree(run_set, cut)
    manifest = json.loads((cut / "runset.json").read_text())
    manifest["clips"][2]["complete"] = manifest["complete"] = False
    (cut / "runset.json").write_text(json.dumps(manifest))
    (cut / manifest["clips"][2]["file"]).unlink()
    out = tmp_path / "c.json"
    refused = CliRunner().invoke(main, ["calibrate", str(cut), *RUN_SET_ARGS, "--out", str(out)])
    assert refused.exit_code == 2 and len(refused.output.strip().splitlines()) == 1
    assert (f"run set {str(cut)!r} has 2 of 3 clips complete (missing: clip 2); finish it by running its "
            "`dfsviz capture` command again with --resume or pass --allow-incomplete to use the complete clips") in refused.output
    assert not out.exists()
    allowed = CliRunner().invoke(main, ["calibrate", str(cut), *RUN_SET_ARGS, "--allow-incomplete", "--out", str(out)])
    assert allowed.exit_code == 0, allowed.output
    pair = [str(cut / c["file"]) for c in manifest["clips"][:2]]
    assert CliRunner().invoke(main, ["calibrate", *pair, *RUN_SET_ARGS, "--out", str(tmp_path / "p.json")]).exit_code == 0
    assert _plan(out) == _plan(tmp_path / "p.json")


def test_a_folder_that_is_not_a_run_set_is_one_red_line(tmp_path):
    _token(tmp_path / "a.h5")
    result = CliRunner().invoke(main, ["calibrate", str(tmp_path), "--target-recall", "0.9", "--out",
                                       str(tmp_path / "x.json")])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert f"{str(tmp_path)!r} is not a run set: it holds no runset.json" in result.output

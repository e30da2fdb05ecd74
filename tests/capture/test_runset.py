"""Run sets: several clips (prompts x seeds) in one `dfsviz capture`, one capture file per clip.

Real captures of the tiny random-weight Wan (seeded random embeddings: each seed its own clip)
and, for per-prompt conditioning, of the embedded model at a small latent size; a subprocess
killed with SIGKILL stands in for a dying run, a lock held by the test for a second writer.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

import dfsviz.cli.capture  # noqa: F401  (registers the command on the group)
from dfsviz.capture import runset as runset_module
from dfsviz.capture.file_safety import CaptureLock
from dfsviz.capture import CaptureConfig, run_capture
from dfsviz.capture.runset import (
    MAX_CLIPS,
    RunSetConfig,
    capture_run_set,
    open_run_set,
    read_prompts,
)
from dfsviz.capture.reader import CaptureReader
from dfsviz.cli import main

STEPS = 3
SETTINGS = dict(embeddings="random", num_steps=STEPS, capture_steps=(0, 2), latent="3x16x16", block=16, tile=4,
                stride=4, footprints=1, device="cpu")
CLI_ARGS = ["--embeddings", "random", "--num-steps", str(STEPS), "--capture-steps", "0,2", "--latent", "3x16x16",
            "--block", "16", "--tile", "4", "--stride", "4", "--footprints", "1", "--device", "cpu"]
# the embedded model at the smallest useful size: 3 frames of 16 x 16 pixels (192 tokens), one layer
EMBEDDED_ARGS = ["--num-steps", "2", "--capture-steps", "0,1", "--layers", "0", "--heads", "0,1", "--footprints", "0",
                 "--orders", "hilbert3d", "--methods", "dfs_tile", "--latent", "3x16x16", "--block", "16", "--tile",
                 "4", "--device", "cpu"]


def _invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _capture(model_dir, out, **kw) -> CaptureConfig:
    return CaptureConfig(out=str(out), model=str(model_dir), **{**SETTINGS, **kw})


def _maps(path) -> dict:
    """Every dataset of every completed step group: (step group, dataset) -> array."""
    out = {}
    with h5py.File(path, "r") as f:
        for name, group in f["steps"].items():
            if group.attrs["complete"]:
                for key, ds in group.items():
                    out[name, key] = ds[...]
    return out


def _assert_same_maps(a, b) -> None:
    ma, mb = _maps(a), _maps(b)
    assert sorted(ma) == sorted(mb) and ma
    for key in ma:
        np.testing.assert_array_equal(ma[key], mb[key], err_msg=f"{a} vs {b}: {key}")


def _sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _manifest(folder) -> dict:
    return json.loads((Path(folder) / "runset.json").read_text())


# ----------------------------------------------------------------------------- the clip plan
def test_clips_are_prompts_times_seeds_named_by_index_slug_and_seed(tmp_path):
    cfg = RunSetConfig(CaptureConfig(out=str(tmp_path / "set")), prompts=("A red disc, moving!", "Grün Ödland"),
                       seeds=(0, 12))
    assert [(c.index, c.prompt, c.seed, c.file) for c in cfg.clips] == [
        (0, "A red disc, moving!", 0, "000_a-red-disc-moving_s0.h5"),
        (1, "A red disc, moving!", 12, "001_a-red-disc-moving_s12.h5"),
        (2, "Grün Ödland", 0, "002_grun-odland_s0.h5"),
        (3, "Grün Ödland", 12, "003_grun-odland_s12.h5"),
    ]
    clip = cfg.clip_config(cfg.clips[3])
    assert clip.out == str(tmp_path / "set" / "003_grun-odland_s12.h5")
    assert (clip.prompt, clip.seed) == ("Grün Ödland", 12)
    # no prompt list: the capture's own prompt; a prompt without letters or digits leaves only the seed
    assert [c.file for c in RunSetConfig(CaptureConfig(out="s", prompt="?!"), seeds=(3, 4)).clips] == [
        "000_s3.h5", "001_s4.h5"]
    # long prompts are cut; indices widen past 1000 clips
    long = RunSetConfig(CaptureConfig(out="s"), prompts=("x" * 100,), seeds=tuple(range(1001)))
    assert long.clips[0].file == "0000_" + "x" * 40 + "_s0.h5" and long.clips[-1].file.startswith("1000_")


def test_prompts_all_is_every_class_of_the_embedded_model():
    from dfsviz.models import class_names

    cfg = RunSetConfig(CaptureConfig(out="set"), prompts="all", seeds=(0, 1))
    assert [c.prompt for c in cfg.clips] == [name for name in class_names() for _ in (0, 1)]
    assert cfg.clips[3].file == f"003_{class_names()[1].replace('_', '-')}_s1.h5"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(seeds=(-1,)), r"`seeds` must be integers in \[0, 9223372036854775807\] \(got -1\)"),
        (dict(seeds=(2**63,)), r"`seeds` must be integers in \[0, 9223372036854775807\] \(got 9223372036854775808\)"),
        (dict(seeds=(True,)), r"`seeds` must be integers"),
        (dict(seeds=()), r"`seeds` must list at least one seed"),
        (dict(seeds=(1, 2, 1)), r"`seeds` lists seed 1 twice"),
        (dict(prompts=()), r"`prompts` must list at least one prompt"),
        (dict(prompts="red"), r"`prompts` must be a list of prompts, 'all' or None \(got 'red'\)"),
        (dict(prompts=("a", 3)), r"`prompts` must be strings or 'all' \(got 3\)"),
        (dict(prompts=("a", "b", "a")), r"`prompts` lists 'a' twice"),
        (dict(prompts=("two\nlines",)), r"`prompts` must be one line each"),
        (dict(prompts=tuple(f"p{i}" for i in range(101)), seeds=tuple(range(100))),
         r"a run set has at most 10000 clips \(got 101 prompts x 100 seeds = 10100\)"),
    ],
)
def test_bad_run_sets_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RunSetConfig(CaptureConfig(out="set"), **kwargs)


def test_prompts_all_needs_the_embedded_model_and_a_file_output_needs_one_clip():
    with pytest.raises(ValueError, match=r"`prompts`='all' lists the embedded model's classes; with `model` 'org/x' "
                                         "list the prompts"):
        RunSetConfig(CaptureConfig(out="set", model="org/x"), prompts="all")
    with pytest.raises(ValueError, match=r"`out` 'set.h5' names a file, but the run set has 2 clips: name a "
                                         r"directory, e.g. 'set'"):
        RunSetConfig(CaptureConfig(out="set.h5"), seeds=(0, 1))
    with pytest.raises(ValueError, match=r"several prompts need conditioning per prompt, but `embeddings`='random' "
                                         "ignores the prompt"):
        RunSetConfig(CaptureConfig(out="set", embeddings="random"), prompts=("a", "b"))
    assert len(RunSetConfig(CaptureConfig(out="one.h5")).clips) == 1
    assert MAX_CLIPS == 10_000
    with pytest.raises(TypeError, match=r"`capture` must be a CaptureConfig \(got str\)"):
        RunSetConfig("set")
    with pytest.raises(TypeError, match=r"`config` must be a RunSetConfig \(got CaptureConfig\)"):
        capture_run_set(CaptureConfig(out="set"))


def test_several_prompts_need_a_model_that_encodes_them(tmp_path, model_dirs):
    cfg = RunSetConfig(CaptureConfig(out=str(tmp_path / "set"), model=str(model_dirs["wan"]), device="cpu"),
                       prompts=("a", "b"))
    with pytest.raises(ValueError, match=r"several prompts need conditioning per prompt, but '.*wan' takes its "
                                         "conditioning from --embeddings"):
        capture_run_set(cfg, progress=False)
    assert not (tmp_path / "set").exists()


def test_read_prompts(tmp_path):
    good = tmp_path / "prompts.txt"
    good.write_text("# classes to capture\n\n  red_disc_translate  \n\t\n# green_square_orbit\nyellow ring\n",
                    encoding="utf-8")
    assert read_prompts(good) == ("red_disc_translate", "yellow ring")
    with pytest.raises(ValueError, match=r"`prompts` file '.*missing.txt' does not exist; pass a text file with one "
                                         "prompt per line"):
        read_prompts(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match=r"`prompts` file '.*' is not a file"):
        read_prompts(tmp_path)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("Grün\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"`prompts` file '.*latin.txt' is not UTF-8 text \(line 1\); save it as "
                                         "UTF-8"):
        read_prompts(latin)
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    with pytest.raises(ValueError, match=r"`prompts` file '.*empty.txt' holds no prompt \(only blank lines and # "
                                         r"comments\)"):
        read_prompts(empty)
    binary = tmp_path / "nul.txt"
    binary.write_bytes(b"a\x00b\n")
    with pytest.raises(ValueError, match=r"`prompts` file '.*nul.txt' is not text: line 1 holds a NUL byte"):
        read_prompts(binary)
    many = tmp_path / "many.txt"
    many.write_text("".join(f"p{i}\n" for i in range(MAX_CLIPS + 1)))
    with pytest.raises(ValueError, match=r"`prompts` file '.*many.txt' holds more than 10000 prompts"):
        read_prompts(many)


# ----------------------------------------------------------------------------- capture
def test_run_set_writes_one_capture_per_clip_and_a_manifest(tmp_path, model_dirs, monkeypatch):
    loads = []
    real_load = runset_module.load_model_source

    def counting_load(*args, **kwargs):
        loads.append(args)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(runset_module, "load_model_source", counting_load)
    folder = tmp_path / "set"
    steps_seen = []
    result = capture_run_set(RunSetConfig(_capture(model_dirs["wan"], folder), seeds=(0, 1, 7)), progress=False,
                             on_step=lambda clip, step: steps_seen.append((clip, step)))
    assert len(loads) == 1  # the model is loaded once for all clips
    assert steps_seen == [(0, 0), (0, 2), (1, 0), (1, 2), (2, 0), (2, 2)]
    assert result.complete and result.captured == [0, 1, 2] and result.skipped == []
    assert sorted(p.name for p in folder.iterdir()) == ["000_s0.h5", "001_s1.h5", "002_s7.h5", "runset.json"]
    manifest = _manifest(folder)
    assert manifest["format"] == "dfsviz-runset" and manifest["format_version"] == 1 and manifest["complete"] is True
    assert manifest["clips"] == [
        {"index": 0, "prompt": "", "seed": 0, "file": "000_s0.h5", "complete": True},
        {"index": 1, "prompt": "", "seed": 1, "file": "001_s1.h5", "complete": True},
        {"index": 2, "prompt": "", "seed": 7, "file": "002_s7.h5", "complete": True},
    ]
    for clip in manifest["clips"]:
        with CaptureReader(folder / clip["file"]) as reader:
            assert reader.complete and reader.steps == [0, 2] and reader.validate() == []
            identity = json.loads(reader.attrs["run_identity"])
        assert identity["seed"] == clip["seed"]
        # the shared settings are each clip's run identity less what varies per clip
        assert manifest["settings"] == {k: v for k, v in identity.items() if k not in ("prompt", "seed")}
    # each clip is the capture a single run of its seed writes
    single = run_capture(_capture(model_dirs["wan"], tmp_path / "seed7.h5", seed=7), progress=False)
    _assert_same_maps(folder / "002_s7.h5", single.path)
    with pytest.raises(AssertionError):  # and seeds make different clips
        _assert_same_maps(folder / "000_s0.h5", folder / "001_s1.h5")

    reader = open_run_set(folder)
    assert reader.complete and [c.file for c in reader.clips] == ["000_s0.h5", "001_s1.h5", "002_s7.h5"]
    assert reader.capture_files() == [folder / "000_s0.h5", folder / "001_s1.h5", folder / "002_s7.h5"]


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX SIGKILL")
def test_sigkill_during_clip_2_then_resume_equals_an_uninterrupted_run_set(tmp_path, model_dirs):
    folder = tmp_path / "killed"
    settings = {**SETTINGS, "capture_steps": (0, 1, 2)}
    script = textwrap.dedent(
        f"""
        from dfsviz.capture import CaptureConfig
        from dfsviz.capture.runset import RunSetConfig, capture_run_set
        cfg = RunSetConfig(CaptureConfig(out={str(folder)!r}, model={str(model_dirs['wan'])!r}, **{settings!r}),
                           seeds=(0, 1, 2))
        capture_run_set(cfg, progress=False, on_step=lambda clip, step: print(f"CLIP {{clip}} STEP {{step}}", flush=True))
        print("DONE", flush=True)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        for line in proc.stdout:  # blocks until each step is flushed
            if line.strip() == "CLIP 1 STEP 0":
                os.kill(proc.pid, signal.SIGKILL)  # now inside step 1 of clip 1, the second clip
                break
    finally:
        proc.wait(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    manifest = _manifest(folder)
    assert [c["complete"] for c in manifest["clips"]] == [True, False, False] and not manifest["complete"]
    assert not (folder / "002_s2.h5").exists()
    with CaptureReader(folder / "001_s1.h5") as reader:
        assert not reader.complete and reader.steps[:1] == [0]
    first = _sha(folder / "000_s0.h5")
    with pytest.raises(ValueError, match=r"run set '.*killed' has 1 of 3 clips complete"):
        open_run_set(folder).capture_files()
    assert open_run_set(folder).capture_files(allow_incomplete=True) == [folder / "000_s0.h5"]

    result = _invoke("capture", "--model", model_dirs["wan"], "--out", folder, "--seeds", "0-2", "--resume", "--quiet",
                     *CLI_ARGS[:4], "--capture-steps", "0-2", *CLI_ARGS[6:])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"wrote run set {folder} (complete): 3 clips, 2 captured, 1 already there")
    assert _sha(folder / "000_s0.h5") == first  # a completed clip is never rewritten

    reference = tmp_path / "reference"
    capture_run_set(RunSetConfig(_capture(model_dirs["wan"], reference, capture_steps=(0, 1, 2)), seeds=(0, 1, 2)),
                    progress=False)
    resumed, uninterrupted = _manifest(folder), _manifest(reference)
    assert resumed["complete"] and resumed["clips"] == uninterrupted["clips"]
    assert resumed["settings"] == uninterrupted["settings"]
    for clip in resumed["clips"]:
        _assert_same_maps(folder / clip["file"], reference / clip["file"])


def test_resume_of_another_run_set_and_existing_outputs_are_refused(tmp_path, model_dirs):
    folder = tmp_path / "set"
    wan = model_dirs["wan"]
    assert _invoke("capture", "--model", wan, "--out", folder, "--seeds", "0,1", "--quiet", *CLI_ARGS).exit_code == 0
    before = {p.name: _sha(p) for p in folder.iterdir()}

    def one_line(result, text):
        assert result.exit_code == 2, result.output
        assert result.output.strip().splitlines() == [f"Error: {text}"]

    one_line(_invoke("capture", "--model", wan, "--out", folder, "--seeds", "0,1", "--quiet", *CLI_ARGS),
             f"run set {str(folder)!r} exists; pass --overwrite to replace it or --resume to continue it")
    one_line(_invoke("capture", "--model", wan, "--out", folder, "--seeds", "0,2", "--resume", "--quiet", *CLI_ARGS),
             f"--resume: {str(folder)!r} holds another run set: clip 1 is (prompt '', seed 1) there and (prompt '', "
             "seed 2) now; resume with the same --prompts and --seeds or pass --overwrite")
    one_line(_invoke("capture", "--model", wan, "--out", folder, "--seeds", "0,1,2", "--resume", "--quiet", *CLI_ARGS),
             f"--resume: {str(folder)!r} holds another run set: 2 clips there, 3 now; resume with the same --prompts "
             "and --seeds or pass --overwrite")
    one_line(_invoke("capture", "--model", wan, "--out", folder, "--seeds", "0,1", "--resume", "--quiet", *CLI_ARGS,
                     "--block", "32", "--tile", "8"),
             f"--resume: run set {str(folder)!r} was captured with other settings (differs in ['block', 'tile']); "
             "resume with the same options or pass --overwrite")
    assert {p.name: _sha(p) for p in folder.iterdir()} == before  # nothing changed

    # a complete run set resumes to itself: its clips are not touched, its manifest only dated
    manifest = _manifest(folder)
    result = _invoke("capture", "--model", wan, "--out", folder, "--seeds", "0,1", "--resume", "--quiet", *CLI_ARGS)
    assert result.exit_code == 0 and "0 captured, 2 already there" in result.output
    assert {p.name: _sha(p) for p in folder.glob("*.h5")} == {k: v for k, v in before.items() if k.endswith(".h5")}
    assert {**_manifest(folder), "updated_utc": None} == {**manifest, "updated_utc": None}

    # --overwrite replaces the run set: its old clips go, the new ones come
    result = _invoke("capture", "--model", wan, "--out", folder, "--seeds", "5-7", "--overwrite", "--quiet", *CLI_ARGS)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in folder.iterdir()) == ["000_s5.h5", "001_s6.h5", "002_s7.h5", "runset.json"]

    # a folder of other files is not a run set, whatever the flags; a missing parent, a file
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    for flag in ("--overwrite", "--resume"):
        result = _invoke("capture", "--model", wan, "--out", other, "--seeds", "0,1", flag, "--quiet", *CLI_ARGS)
        assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
        assert f"{str(other)!r} holds other files and no run set (runset.json)" in result.output
    assert [p.name for p in other.iterdir()] == ["notes.txt"]
    one_line(_invoke("capture", "--model", wan, "--out", tmp_path / "no" / "set", "--seeds", "0,1", "--quiet",
                     *CLI_ARGS),
             f"the parent of the run-set directory {str(tmp_path / 'no' / 'set')!r} does not exist; create it first")
    one_line(_invoke("capture", "--model", wan, "--out", other / "notes.txt" / "set", "--seeds", "0,1", "--quiet",
                     *CLI_ARGS),
             f"the parent of the run-set directory {str(other / 'notes.txt' / 'set')!r} is a file")
    one_line(_invoke("capture", "--model", wan, "--out", other / "notes.txt", "--seeds", "0,1", "--quiet", *CLI_ARGS),
             f"run set output {str(other / 'notes.txt')!r} is a file; a run set of 2 clips needs a directory")
    one_line(_invoke("capture", "--model", wan, "--out", tmp_path / "new", "--seeds", "0,1", "--resume", "--quiet",
                     *CLI_ARGS),
             f"--resume: run set {str(tmp_path / 'new')!r} does not exist; drop --resume to start it")
    assert not (tmp_path / "new").exists()


def test_a_failing_clip_stops_the_run_set_naming_it_and_keeps_the_completed_clips(tmp_path, model_dirs):
    folder = tmp_path / "set"
    folder.mkdir()
    cfg = RunSetConfig(_capture(model_dirs["wan"], folder), seeds=(0, 1, 2))
    with CaptureLock(folder / cfg.clips[1].file):  # another writer holds the second clip
        with pytest.raises(ValueError, match=r"^clip 1 \(001_s1.h5: seed 1\) failed: '.*001_s1.h5' is being written "
                                             r"by another dfsviz capture \(pid \d+\).*; the completed clips \[0\] are "
                                             "kept: --resume continues the run set$"):
            capture_run_set(cfg, progress=False)
    manifest = _manifest(folder)
    assert [c["complete"] for c in manifest["clips"]] == [True, False, False]
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == ["000_s0.h5", "runset.json"]
    result = capture_run_set(RunSetConfig(_capture(model_dirs["wan"], folder, resume=True), seeds=(0, 1, 2)),
                             progress=False)
    assert result.complete and result.skipped == [0] and result.captured == [1, 2]


def test_a_second_run_set_writer_is_refused(tmp_path, model_dirs):
    folder = tmp_path / "set"
    with CaptureLock(folder):
        with pytest.raises(ValueError, match=r"'.*set' is being written by another dfsviz capture"):
            capture_run_set(RunSetConfig(_capture(model_dirs["wan"], folder), seeds=(0, 1)), progress=False)
    assert not folder.exists()


# ----------------------------------------------------------------------------- the CLI
def test_cli_run_set_and_single_clip(tmp_path, model_dirs):
    wan = model_dirs["wan"]
    result = _invoke("capture", "--model", wan, "--out", tmp_path / "set", "--seeds", "3,4", *CLI_ARGS)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"wrote run set {tmp_path / 'set'} (complete): 2 clips, 2 captured")
    assert result.stderr.count("clip 2/2") >= 1  # one bar over clips x steps
    # one clip keeps the single-file behaviour: --out is the capture file
    prompts = tmp_path / "one.txt"
    prompts.write_text("# one prompt\nhello\n")
    result = _invoke("capture", "--model", wan, "--out", tmp_path / "one.h5", "--prompts", prompts, "--seeds", "9",
                     "--quiet", *CLI_ARGS)
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"wrote {tmp_path / 'one.h5'} (complete)")
    with CaptureReader(tmp_path / "one.h5") as reader:
        assert reader.attrs["prompt"] == "hello" and int(reader.attrs["seed"]) == 9


def test_cli_dry_run_lists_the_clips_and_the_total_size(tmp_path, model_dirs):
    out = tmp_path / "set"
    result = _invoke("capture", "--model", model_dirs["wan"], "--out", out, "--seeds", "0-2", "--dry-run", *CLI_ARGS)
    assert result.exit_code == 0, result.output
    text, size_line = result.output.rsplit("}", 1)
    info = json.loads(text + "}")
    assert [c["file"] for c in info["clips"]] == ["000_s0.h5", "001_s1.h5", "002_s2.h5"]
    assert [c["seed"] for c in info["clips"]] == [0, 1, 2]
    one = _invoke("capture", "--model", model_dirs["wan"], "--out", tmp_path / "x.h5", "--dry-run", *CLI_ARGS)
    single = json.loads(one.output.rsplit("}", 1)[0] + "}")["estimated_file_bytes_uncompressed"]
    assert info["estimated_total_bytes_uncompressed"] == 3 * single
    assert all(c["estimated_file_bytes_uncompressed"] == single for c in info["clips"])
    assert "estimated size:" in size_line and "for 3 clips of 2 steps" in size_line
    assert not out.exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--seeds", "0-2", "--seed", "4"], "pass --seed or --seeds, not both"),
        (["--prompts", "{p}", "--prompt", "a"], "pass --prompt or --prompts, not both"),
        (["--seeds", "all"], "`--seeds` must be integers and ranges like 0-3 or 0,5 (got 'all')"),
        (["--seeds", "-1"], "`--seeds` must be integers and ranges like 0-3 or 0,5 (got '-1')"),
        (["--seeds", "0-9223372036854775808"], "`--seeds` values must lie in [0, 9223372036854775807]"),
        (["--seeds", "0-99999999999"], "`--seeds` lists 100000000000 seeds; a run set has at most 10000 clips"),
        (["--prompts", "{d}/missing.txt", "--seeds", "0,1"], "missing.txt' does not exist"),
        (["--prompts", "all", "--seeds", "0,1"], "`--prompts`='all' lists the embedded model's classes"),
        (["--prompts", "{p}", "--seeds", "0,1"], "several prompts need conditioning per prompt"),
    ],
)
def test_cli_bad_run_set_options_are_one_red_line(tmp_path, model_dirs, args, message):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a\nb\n")
    result = _invoke("capture", "--model", model_dirs["wan"], "--out", tmp_path / "set",
                     *(a.format(p=prompts, d=tmp_path) for a in args), *CLI_ARGS)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "set").exists()


# ----------------------------------------------------------------------------- the embedded model
@pytest.fixture(scope="module")
def embedded_set(tmp_path_factory):
    """A run set of the embedded model: two classes x two seeds, at 192 tokens."""
    from dfsviz.models import embedded_model_dir

    if not (embedded_model_dir() / "config.json").is_file():
        pytest.skip("the embedded model's weights are not in dfsviz/data/models")
    root = tmp_path_factory.mktemp("embedded_set")
    prompts = root / "prompts.txt"
    prompts.write_text("green_square_orbit\n# a comment\nred_disc_translate\n")
    result = _invoke("capture", "--prompts", prompts, "--seeds", "0-1", "--out", root / "set", "--quiet",
                     *EMBEDDED_ARGS)
    assert result.exit_code == 0, result.output
    return root


def test_embedded_run_set_conditions_each_clip_on_its_prompt(embedded_set):
    folder = embedded_set / "set"
    files = [c.file for c in open_run_set(folder).clips]
    assert files == ["000_green-square-orbit_s0.h5", "001_green-square-orbit_s1.h5", "002_red-disc-translate_s0.h5",
                     "003_red-disc-translate_s1.h5"]
    with CaptureReader(folder / files[2]) as reader:
        assert reader.attrs["prompt"] == "red_disc_translate" and reader.attrs["embeddings"] == "model"
    single = embedded_set / "red1.h5"
    result = _invoke("capture", "--prompt", "red_disc_translate", "--seed", "1", "--out", single, "--quiet",
                     *EMBEDDED_ARGS)
    assert result.exit_code == 0, result.output
    _assert_same_maps(folder / files[3], single)
    with pytest.raises(AssertionError):  # another class, same seed: another clip
        _assert_same_maps(folder / files[1], single)


def test_embedded_prompts_all_dry_run_and_a_bad_class(tmp_path):
    from dfsviz.models import class_names, embedded_model_dir

    if not (embedded_model_dir() / "config.json").is_file():
        pytest.skip("the embedded model's weights are not in dfsviz/data/models")
    result = _invoke("capture", "--prompts", "all", "--seeds", "0-1", "--out", tmp_path / "all", "--dry-run",
                     *EMBEDDED_ARGS)
    assert result.exit_code == 0, result.output
    info = json.loads(result.output.rsplit("}", 1)[0] + "}")
    assert [c["prompt"] for c in info["clips"]] == [n for n in class_names() for _ in (0, 1)]
    assert len(info["clips"]) == 2 * len(class_names())
    prompts = tmp_path / "bad.txt"
    prompts.write_text("red_disc_translate\npurple_cube\n")
    result = _invoke("capture", "--prompts", prompts, "--seeds", "0-1", "--out", tmp_path / "bad", "--quiet",
                     *EMBEDDED_ARGS)
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert "clip 2 (002_purple-cube_s0.h5: prompt 'purple_cube', seed 0): unknown class name 'purple_cube'" in result.output
    assert not (tmp_path / "bad").exists()  # checked before the first clip


def test_the_dashboard_catalog_lists_the_clips_of_a_run_set(embedded_set):
    from dfsviz.app.data import CaptureCatalog

    catalog = CaptureCatalog([embedded_set])
    ids = [e.id for e in catalog.entries() if e.id.startswith(f"{embedded_set.name}/set/")]
    assert ids == [f"{embedded_set.name}/set/{c.file}" for c in open_run_set(embedded_set / "set").clips]
    assert all(catalog.entry(i).status == "ok" for i in ids)


def test_inspect_lists_a_run_set_s_clips_and_validates_each_file(tmp_path, embedded_set):
    folder = embedded_set / "set"
    clips = open_run_set(folder).clips
    result = _invoke("inspect", folder)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[:2] == [f"run set         {folder}", "clips           4 (4 complete)"]
    table = lines.index(next(line for line in lines if line.startswith("clip  prompt")))
    for clip, line in zip(clips, lines[table + 1:]):
        assert line.split() == [str(clip.index), clip.prompt, str(clip.seed), "2/2", "complete", clip.file]
    assert len(lines) == table + 1 + len(clips)  # no "incomplete" line

    # one clip file gone, one not HDF5: each named, the others still validated; exit 2
    damaged = tmp_path / "damaged"
    shutil.copytree(folder, damaged)
    (damaged / clips[1].file).unlink()
    (damaged / clips[2].file).write_bytes(b"not a capture")
    result = _invoke("inspect", damaged, "--json")
    assert result.exit_code == 2
    info = json.loads(result.stdout)
    assert [c["state"] for c in info["clips"]] == ["complete", "missing", "unreadable", "complete"]
    assert info["clips"][3]["completed_steps"] == [0, 1] and info["clips"][3]["file_bytes"] > 0
    assert info["complete"] is False and len(info["problems"]) == 1
    assert info["problems"][0].startswith(f"clip 2 ({clips[2].file}): '{damaged / clips[2].file}' is not a readable "
                                          "HDF5 file")
    result = _invoke("inspect", damaged)
    assert result.exit_code == 2
    assert f"incomplete: 2 of 4 clips complete; continue with the command that captured it and --resume " \
           f"(`dfsviz capture ... --out {damaged} --resume`)" in result.output
    assert f"invalid: clip 2 ({clips[2].file}): " in result.stderr
    # a clip file that holds another clip's capture (copied over it) is named, with what each says
    swapped = tmp_path / "swapped"
    shutil.copytree(folder, swapped)
    shutil.copyfile(swapped / clips[0].file, swapped / clips[3].file)
    result = _invoke("inspect", swapped, "--json")
    assert result.exit_code == 2
    info = json.loads(result.stdout)
    assert [c["state"] for c in info["clips"]] == ["complete", "complete", "complete", "invalid"]
    assert info["problems"] == [f"clip 3 ({clips[3].file}): holds the capture of prompt {clips[0].prompt!r}, seed "
                                f"{clips[0].seed}, where the manifest lists prompt {clips[3].prompt!r}, seed "
                                f"{clips[3].seed}"]
    # a clip that a running capture holds open for writing is "capturing", not a problem
    busy = tmp_path / "busy"
    shutil.copytree(folder, busy)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, h5py; f = h5py.File(sys.argv[1], 'a'); print('open', flush=True); "
         "sys.stdin.read()", str(busy / clips[0].file)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        if os.environ.get("HDF5_USE_FILE_LOCKING", "").upper() not in ("FALSE", "0"):
            result = _invoke("inspect", busy, "--json")
            assert result.exit_code == 0, result.output
            info = json.loads(result.stdout)
            assert [c["state"] for c in info["clips"]] == ["capturing", "complete", "complete", "complete"]
            assert info["problems"] == []
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    # a folder that is not a run set is one red line
    result = _invoke("inspect", tmp_path / "damaged" / "..")
    assert result.exit_code == 2 and result.output.strip().endswith("holds no runset.json")


# ----------------------------------------------------------------------------- reading
def test_open_run_set_refuses_what_is_not_a_sound_run_set(tmp_path, embedded_set):
    folder = embedded_set / "set"
    with pytest.raises(ValueError, match=r"'.*nowhere' is not a run set: no such directory"):
        open_run_set(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"'.*' is not a run set: it holds no runset.json"):
        open_run_set(tmp_path)

    def broken(edit) -> Path:
        copy = tmp_path / f"copy{len(list(tmp_path.iterdir()))}"
        copy.mkdir()
        manifest = _manifest(folder)
        edit(manifest)
        (copy / "runset.json").write_text(json.dumps(manifest))
        return copy

    newer = broken(lambda m: m.update(format_version=2, dfsviz_version="9.0"))
    with pytest.raises(ValueError, match=r"run set '.*' has format version 2, written by dfsviz 9.0; this dfsviz .* "
                                         "reads version 1"):
        open_run_set(newer)
    with pytest.raises(ValueError, match=r"is not a run set: runset.json has format 'x'"):
        open_run_set(broken(lambda m: m.update(format="x")))
    escape = broken(lambda m: m["clips"][0].update(file="../../etc/passwd.h5"))
    with pytest.raises(ValueError, match=r"clip 0 names the file '../../etc/passwd.h5'; clip files are plain names "
                                         "inside the run-set directory"):
        open_run_set(escape)
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "runset.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"runset.json is not valid JSON"):
        open_run_set(tmp_path / "garbage")
    with pytest.raises(ValueError, match=r"'.*runset.json' is not a run set: not a directory"):
        open_run_set(folder / "runset.json")
    for edit, problem in [
        (lambda m: m.pop("settings"), "no settings object"),
        (lambda m: m.update(clips=[]), "`clips` must be a list of 1 to 10000 clips"),
        (lambda m: m["clips"][1].update(index=5), "clip 1 must hold index 1, a prompt, a seed and complete"),
        (lambda m: m["clips"][1].update(seed="1"), "clip 1 must hold index 1"),
        (lambda m: m["clips"][1].update(file=m["clips"][0]["file"]), "clip 1 repeats the file '000_"),
    ]:
        with pytest.raises(ValueError, match=rf"runset.json is malformed \({re.escape(problem)}"):
            open_run_set(broken(edit))
    # a run set none of whose clips is complete has nothing to offer, even to allow_incomplete
    pending = broken(lambda m: [c.update(complete=False) for c in m["clips"]])
    with pytest.raises(ValueError, match=r"has 0 of 4 clips complete \(missing: clips 0, 1, 2, 3\); finish it by running "
                                         r"its `dfsviz capture` command again with --resume$"):
        open_run_set(pending).capture_files(allow_incomplete=True)


def test_resume_with_other_weights_is_refused(tmp_path):
    from tiny_models import build_tiny

    model = tmp_path / "wan"
    build_tiny("wan", seed=0).save_pretrained(model)
    folder = tmp_path / "set"
    capture_run_set(RunSetConfig(_capture(model, folder), seeds=(0, 1)), progress=False)
    build_tiny("wan", seed=1).save_pretrained(model)  # the same architecture, other weights
    with pytest.raises(ValueError, match=r"--resume: the model weights differ from those of the run set '.*set'; "
                                         "resume with the same weights or pass --overwrite"):
        capture_run_set(RunSetConfig(_capture(model, folder, resume=True), seeds=(0, 1)), progress=False)

"""A run set's clips spread over the ranks of torchrun (two gloo ranks on the CPU, the tiny Wan).

Under torchrun without ``--context-parallel`` each rank captures whole clips (the r-th, (r+P)-th, ...
of those still to capture) and marks them in the one manifest: the run set must equal the one
captured in one process file for file and map for map; a rank killed with SIGKILL loses no
completed clip or step and ``--resume`` under torchrun completes the set; every refusal is one line.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner

import dfsviz.cli.capture  # noqa: F401  (registers the command on the group)
import runset_worker as worker
from dfsviz.capture import CaptureConfig
from dfsviz.capture.file_safety import CaptureLock
from dfsviz.capture.reader import CaptureReader
from dfsviz.capture.ranks import ClipRanks, check_rank_device
from dfsviz.capture.runset import RunSetConfig, capture_run_set
from dfsviz.cli import main
from launch import torchrun, torchrun_cli
from test_runset import _assert_same_maps, _manifest, _sha


@pytest.fixture(scope="module")
def single_set(model_dirs, tmp_path_factory) -> Path:
    """The run set captured in one process."""
    folder = tmp_path_factory.mktemp("single") / "set"
    config = CaptureConfig(out=str(folder), model=str(model_dirs["wan"]), **worker.SETTINGS)
    assert capture_run_set(RunSetConfig(config, seeds=worker.SEEDS), progress=False).complete
    return folder


def _assert_same_set(got: Path, want: Path) -> None:
    """The same clip files, the same manifest (but its dates), every clip's maps equal."""
    assert sorted(p.name for p in got.iterdir()) == sorted(p.name for p in want.iterdir())
    undated = ("created_utc", "updated_utc")
    manifest = {k: v for k, v in _manifest(got).items() if k not in undated}
    assert manifest == {k: v for k, v in _manifest(want).items() if k not in undated}
    assert manifest["complete"]
    for clip in manifest["clips"]:
        _assert_same_maps(got / clip["file"], want / clip["file"])


def _run(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def _one_line(result, text: str) -> None:
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == [f"Error: {text}"]


def test_two_ranks_capture_the_run_set_one_process_captures(model_dirs, single_set, tmp_path):
    folder = tmp_path / "set"
    done = _run(torchrun_cli("capture", "--model", model_dirs["wan"], "--out", folder, "--quiet", *worker.CLI_ARGS))
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.splitlines()[0].startswith(f"wrote run set {folder} (complete): 4 clips, 4 captured, 0 already "
                                                  "there")
    assert done.stdout.count("wrote") == 1  # rank 0 reports the whole set
    _assert_same_set(folder, single_set)

    # a clip file gone: --resume captures that clip alone, so one rank has none, and says so
    kept = {p.name: _sha(p) for p in folder.glob("*.h5") if p.name != "001_s1.h5"}
    (folder / "001_s1.h5").unlink()
    done = _run(torchrun_cli("capture", "--model", model_dirs["wan"], "--out", folder, "--resume", "--quiet",
                             *worker.CLI_ARGS))
    assert done.returncode == 0, done.stderr[-4000:]
    assert "1 captured, 3 already there" in done.stdout
    assert f"run set {folder}: 1 clip to capture over 2 ranks; rank 1 has none" in done.stderr
    assert {name: _sha(folder / name) for name in kept} == kept  # complete clips are not touched
    _assert_same_set(folder, single_set)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX SIGKILL")
def test_a_rank_killed_mid_run_loses_nothing_complete_and_resume_completes(model_dirs, single_set, tmp_path):
    folder = tmp_path / "killed"
    proc = subprocess.Popen(torchrun(worker.__file__, model_dirs["wan"], folder, "steps"), stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    pids, reported, killed = {}, [], False
    try:
        for line in proc.stdout:  # every rank's lines: their pids, then each step they completed, to the end
            words = line.split()
            if words[:1] == ["PID"]:
                pids[int(words[1])] = int(words[2])
            elif words[:1] == ["RANK"]:
                reported.append((int(words[1]), int(words[3]), int(words[5])))
                if words == ["RANK", "1", "CLIP", "3", "STEP", "0"]:
                    os.kill(pids[1], signal.SIGKILL)  # rank 1 dies in its second clip; torchrun stops rank 0
                    killed = True
    finally:
        proc.stdout.close()
        proc.wait(timeout=120)
    assert killed and proc.returncode != 0
    # the clips were dealt in turn: rank 0 clips 0 and 2, rank 1 clips 1 and 3
    assert {clip for rank, clip, _ in reported if rank == 1} == {1, 3}
    assert {clip for rank, clip, _ in reported if rank == 0} <= {0, 2}

    manifest = _manifest(folder)
    complete = {c["index"] for c in manifest["clips"] if c["complete"]}
    assert 1 in complete and 3 not in complete and not manifest["complete"]
    for clip, step in {(clip, step) for _, clip, step in reported}:  # every step a rank reported is in its file
        with CaptureReader(folder / manifest["clips"][clip]["file"]) as reader:
            assert step in reader.steps and reader.validate() == []
    for clip in complete:
        with CaptureReader(folder / manifest["clips"][clip]["file"]) as reader:
            assert reader.complete
        _assert_same_maps(folder / manifest["clips"][clip]["file"], single_set / manifest["clips"][clip]["file"])
    before = {manifest["clips"][clip]["file"]: _sha(folder / manifest["clips"][clip]["file"]) for clip in complete}

    done = _run(torchrun_cli("capture", "--model", model_dirs["wan"], "--out", folder, "--resume", "--quiet",
                             *worker.CLI_ARGS))
    assert done.returncode == 0, done.stderr[-4000:]
    assert f"4 clips, {4 - len(complete)} captured, {len(complete)} already there" in done.stdout
    assert {name: _sha(folder / name) for name in before} == before  # a completed clip is never rewritten
    _assert_same_set(folder, single_set)


def test_ranks_capturing_another_run_set_are_refused_on_every_rank(model_dirs, tmp_path):
    folder = tmp_path / "mixed"
    done = _run(torchrun(worker.__file__, model_dirs["wan"], folder, "block_by_rank"))
    assert done.returncode != 0
    assert done.stderr.count("ValueError: rank 1 captures another run set than rank 0 (differs in ['block']); every "
                             "rank must load the same model and options") == 2
    assert not folder.exists()


def test_resume_of_a_run_set_another_dfsviz_wrote_is_refused(model_dirs, single_set, tmp_path):
    folder = tmp_path / "older"
    folder.mkdir()
    for clip in _manifest(single_set)["clips"]:
        (folder / clip["file"]).write_bytes((single_set / clip["file"]).read_bytes())
    manifest = {**_manifest(single_set), "dfsviz_version": "0.0.1"}
    (folder / "runset.json").write_text(json.dumps(manifest))
    before = {p.name: _sha(p) for p in folder.iterdir()}
    from dfsviz._version import __version__

    result = CliRunner().invoke(main, ["capture", "--model", str(model_dirs["wan"]), "--out", str(folder), "--resume",
                                       "--quiet", *worker.CLI_ARGS])
    _one_line(result, f"--resume: run set {str(folder)!r} was written by dfsviz 0.0.1, this is dfsviz {__version__}; "
                      "a run set holds the clips of one dfsviz: resume with dfsviz 0.0.1 or pass --overwrite")
    assert {p.name: _sha(p) for p in folder.iterdir()} == before


def test_a_run_set_with_context_parallel_is_refused(model_dirs, tmp_path):
    message = ("`context_parallel`='ulysses' spreads one clip over the ranks, but the run set has 4 clips: drop "
               "--context-parallel to spread the clips over the ranks (each clip whole on one rank), or capture each "
               "clip with --context-parallel in its own command")
    with pytest.raises(ValueError, match=f"^{message.replace('(', '[(]').replace(')', '[)]')}$"):
        RunSetConfig(CaptureConfig(out="set", context_parallel="ulysses"), seeds=worker.SEEDS)
    RunSetConfig(CaptureConfig(out="one.h5", context_parallel="ulysses"), seeds=(5,))  # one clip: one capture
    result = CliRunner().invoke(main, ["capture", "--model", str(model_dirs["wan"]), "--out", str(tmp_path / "set"),
                                       "--context-parallel", "ulysses", *worker.CLI_ARGS])
    _one_line(result, message.replace("`context_parallel`", "`--context-parallel`"))  # the CLI names its option
    assert not (tmp_path / "set").exists()


def test_one_clip_under_torchrun_without_context_parallel_is_refused(model_dirs, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets on every rank
    for clips in ([], ["--seeds", "5"]):
        result = CliRunner().invoke(main, ["capture", "--model", str(model_dirs["wan"]), "--out",
                                           str(tmp_path / "one.h5"), *clips, *worker.CLI_ARGS[2:]])
        _one_line(result, "torchrun started 2 ranks, but one clip is captured in one process: pass --context-parallel "
                          "ulysses to spread it over the ranks, or --prompts/--seeds to capture several clips (each rank "
                          "captures whole clips); or run it without torchrun")
    assert not (tmp_path / "one.h5").exists()


def test_clips_are_dealt_in_turn_and_a_rank_names_no_gpu():
    assert [ClipRanks(r, 2, None).deal([0, 1, 2, 3, 4]) for r in (0, 1)] == [[0, 2, 4], [1, 3]]
    assert [ClipRanks(r, 3, None).deal([5, 7]) for r in (0, 1, 2)] == [[5], [7], []]
    with pytest.raises(ValueError, match=r"^`device` 'cuda:1' names one GPU; under torchrun each rank takes its "
                                         r"LOCAL_RANK's GPU: pass --device cuda$"):
        check_rank_device("cuda:1", "under torchrun")
    for device in ("auto", "cpu", "cuda"):
        check_rank_device(device, "under torchrun")


@pytest.mark.skipif(not Path("/proc/locks").is_file(), reason="reads the kernel's lock table, /proc/locks")
def test_the_manifest_lock_waits_for_its_holder(tmp_path):
    """Ranks take turns at the manifest: CaptureLock(wait=True) blocks until the holder lets go."""
    manifest = tmp_path / "runset.json"
    holder = CaptureLock(manifest)
    with pytest.raises(ValueError, match=r"runset.json' is being written by another dfsviz capture"):
        CaptureLock(manifest)
    inode = os.stat(tmp_path / ".runset.json.lock").st_ino
    taken = []
    waiter = threading.Thread(target=lambda: taken.append(CaptureLock(manifest, wait=True)), daemon=True)
    waiter.start()

    def blocked() -> bool:  # the kernel lists a request blocked on the lock file as "N: -> FLOCK ..."
        lines = Path("/proc/locks").read_text().splitlines()
        return any(" -> FLOCK " in line and line.split()[6].endswith(f":{inode}") for line in lines)

    while not blocked():
        assert waiter.is_alive(), "CaptureLock(wait=True) returned or raised while the lock was held"
    assert not taken
    holder.release()
    waiter.join()
    assert len(taken) == 1 and taken[0].held
    taken[0].release()

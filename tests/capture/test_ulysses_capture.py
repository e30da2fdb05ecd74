"""Capture under diffusers' Ulysses attention, launched by torchrun (two gloo ranks on the CPU).

Each rank reduces the heads it holds between diffusers' all-to-alls and rank 0 writes the one file
(``docs/format.md``, "Several GPUs"): the file must equal the single-process capture of the same
run map for map; a rank killed with SIGKILL after step 1 loses no completed step and ``--resume``
under torchrun completes the run as an uninterrupted one; every refusal is one line.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

import dfsviz
import dfsviz.cli.capture  # noqa: F401  (registers the command on the group)
import ulysses_worker as worker
from dfsviz.capture import CaptureConfig, run_capture
from dfsviz.capture.file_safety import open_for_reading
from dfsviz.capture.ranks import check_degree
from dfsviz.cli import main
from launch import torchrun, torchrun_cli
from tiny_models import build_class

HEADS = 4


@pytest.fixture(scope="module")
def wan4(tmp_path_factory) -> Path:
    """A saved tiny Wan with 4 heads (2 per rank)."""
    folder = tmp_path_factory.mktemp("wan4") / "wan4"
    build_class("WanTransformer3DModel", seed=3, num_attention_heads=HEADS).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def single(wan4, tmp_path_factory) -> Path:
    """The run captured in one process."""
    out = tmp_path_factory.mktemp("single") / "single.h5"
    run_capture(CaptureConfig(out=str(out), model=str(wan4), **worker.SETTINGS), progress=False)
    return out


def _assert_same_maps(got: Path, want: Path, steps, rtol: float = 0.0) -> None:
    """Every dataset of ``steps`` equal (floats within ``rtol``: the reference ran in another process,
    whose thread count may round the projections differently; float16 footprints within 1 ulp).
    ``got`` may be a file a killed run cut off mid-write: it is read as dfsviz.open reads it."""
    a, padded = open_for_reading(got)
    try:
        with a, h5py.File(want, "r") as b:
            for step in steps:
                key = f"steps/step_{step:04d}"
                assert sorted(a[key]) == sorted(b[key])
                for name in b[key]:
                    x, y = a[key][name][...], b[key][name][...]
                    assert x.dtype == y.dtype, f"{key}/{name} dtype"
                    if x.dtype.kind == "f" and rtol:
                        tol = max(rtol, float(np.finfo(x.dtype).eps))
                        np.testing.assert_allclose(x, y, rtol=tol, atol=tol, err_msg=f"{key}/{name}")
                    else:
                        assert np.array_equal(x, y, equal_nan=x.dtype.kind == "f"), f"{key}/{name} differs"
    finally:
        if padded is not None:
            padded.close()


def test_two_rank_capture_equals_the_single_process_capture(wan4, single, tmp_path):
    out = tmp_path / "ulysses.h5"
    done = subprocess.run(torchrun_cli("capture", "--model", str(wan4), "--out", str(out), "--context-parallel",
                                       "ulysses", "--quiet", *worker.CLI_ARGS), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.count("wrote ") == 1  # rank 0 reports
    with dfsviz.open(out) as run:
        assert run.complete and run.steps == list(range(worker.STEPS)) and run.validate() == []
        assert run.layout.heads == tuple(range(HEADS))
        with dfsviz.open(single) as ref:
            for order in ("raster", "hilbert3d"):
                assert torch.equal(run.block_stats(2, 1, order).m, ref.block_stats(2, 1, order).m)
    _assert_same_maps(out, single, range(worker.STEPS))

    # the file remembers its world size: another one cannot continue it
    result = CliRunner().invoke(main, ["capture", "--model", str(wan4), "--out", str(out), "--resume", "--quiet",
                                       *worker.CLI_ARGS])
    assert result.exit_code == 2
    assert "was captured on 2 ranks (torchrun --nproc-per-node 2 ... --context-parallel ulysses), this run is in " \
           "one process" in result.output


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX SIGKILL")
def test_a_rank_killed_after_step_1_then_resume_under_torchrun_completes(wan4, single, tmp_path):
    out = tmp_path / "killed.h5"
    proc = subprocess.Popen(torchrun(worker.__file__, str(wan4), str(out), "steps"), stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    pids = {}
    try:
        for line in proc.stdout:  # waits for the ranks' lines: their pids, then rank 0's completed steps
            words = line.split()
            if words[:1] == ["PID"]:
                pids[int(words[1])] = int(words[2])
            if words == ["STEP", "1"]:
                os.kill(pids[1], signal.SIGKILL)  # rank 1 dies in step 2; torchrun stops rank 0
                break
        else:
            pytest.fail("the ranks did not report step 1")
    finally:
        proc.stdout.close()
        proc.wait(timeout=120)
    assert proc.returncode != 0

    with dfsviz.open(out) as run:
        assert not run.complete and run.validate() == []
        kept = run.steps
        assert kept[:2] == [0, 1] and len(kept) < worker.STEPS
    _assert_same_maps(out, single, kept)

    done = subprocess.run(torchrun_cli("capture", "--model", str(wan4), "--out", str(out), "--context-parallel",
                                       "ulysses", "--resume", "--quiet", *worker.CLI_ARGS), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert f"{len(kept)} already there" in done.stdout
    with dfsviz.open(out) as run:
        assert run.complete and run.steps == list(range(worker.STEPS)) and run.validate() == []
    _assert_same_maps(out, single, range(worker.STEPS))


def test_recording_under_ulysses_with_dfsattn_equals_the_single_process_recording(wan4, tmp_path):
    out, ref = tmp_path / "recorded.h5", tmp_path / "single.h5"
    done = subprocess.run(torchrun(worker.__file__, str(wan4), str(out), "record"), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    worker.record_loop(str(wan4), str(ref), parallel=False)
    with dfsviz.open(out) as run:
        assert run.complete and run.validate() == [] and run.layout.dfsattn_order is not None
        assert run.layout.branches == ("cond", "uncond") and run.steps == [0, 1, 2]
    _assert_same_maps(out, ref, [0, 1, 2], rtol=1e-5)


def test_ranks_running_another_run_are_refused_on_every_rank(wan4, tmp_path):
    out = tmp_path / "mixed.h5"
    done = subprocess.run(torchrun(worker.__file__, str(wan4), str(out), "seed_by_rank"), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode != 0
    assert done.stderr.count("ValueError: rank 1 captures another run than rank 0 (differs in ['seed'])") == 2
    assert not out.exists()


def test_context_parallel_outside_torchrun_is_one_line(wan4, tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    result = CliRunner().invoke(main, ["capture", "--model", str(wan4), "--out", str(tmp_path / "x.h5"),
                                       "--context-parallel", "ulysses", *worker.CLI_ARGS])
    assert result.exit_code == 2
    assert "--context-parallel ulysses runs under torchrun" in result.output
    assert result.output.count("\n") == 1


def test_refusals():
    with pytest.raises(ValueError, match=r"3 ranks do not divide the 4 heads of X; use torchrun --nproc-per-node in "
                                         r"\[1, 2, 4\]"):
        check_degree(3, 4, "X")
    with pytest.raises(ValueError, match=r"`context_parallel` must be None or 'ulysses' \(got 'ring'\)"):
        CaptureConfig(out="x.h5", context_parallel="ring")
    with pytest.raises(ValueError, match=r"`device` 'cuda:1' names one GPU; under --context-parallel"):
        CaptureConfig(out="x.h5", context_parallel="ulysses", device="cuda:1")


def test_a_refused_resume_names_the_ranks_as_its_entry_point_spells_them(single):
    """``dfsviz capture``'s refusal names torchrun's flags (above); ``dfsviz.record``'s names
    diffusers' ContextParallelConfig, which is how its callers ask for ranks."""
    from dfsviz.capture.schema import read_json_attr
    from dfsviz.capture.writer import CLI_OPTIONS, PYTHON_OPTIONS, CaptureWriter

    with dfsviz.open(single) as reader:
        run = {**read_json_attr(reader._f.attrs, "run_identity"), "ulysses_degree": 2}
        messages = {}
        for options in (CLI_OPTIONS, PYTHON_OPTIONS):
            with pytest.raises(ValueError) as refused:
                CaptureWriter._check_same_run(single, reader, reader.layout, run, options)
            messages[options.resume] = str(refused.value)
    assert "was captured in one process (no --context-parallel), this run is on 2 ranks (torchrun " \
           "--nproc-per-node 2 ... --context-parallel ulysses)" in messages["--resume"]
    assert messages["resume=True"].startswith("resume=True: ")
    assert "was captured in one process (no context parallelism), this run is on 2 ranks " \
           "(ContextParallelConfig(ulysses_degree=2) under torchrun); resume it as it was captured, or pass " \
           "overwrite=True" in messages["resume=True"]

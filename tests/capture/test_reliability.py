"""Nothing lost: concurrent writers, a full disk, changed weights, equivalent options, bad seeds.

Each test drives a real capture of a tiny random-weight Wan (saved with save_pretrained and
loaded back through from_pretrained) into real HDF5 files; subprocesses stand in for a
second user or a dying process. The only stand-ins are a patched free-space reading (the
check before a step) and RLIMIT_FSIZE, which makes the kernel fail writes past a size exactly
as a full disk fails them (EFBIG instead of ENOSPC).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import pytest
import torch
from click.testing import CliRunner

import dfsviz.cli.capture  # noqa: F401  (registers the commands on the group)
import dfsviz.cli.inspect  # noqa: F401
from dfsviz.capture import CaptureConfig, run_capture
from dfsviz.capture.reader import CaptureReader
from dfsviz.cli import main

STEPS = 4
SETTINGS = dict(embeddings="random", num_steps=STEPS, capture_steps=tuple(range(STEPS)), latent="3x16x16", block=16,
                tile=4, stride=4, footprints=1, device="cpu")
CLI_ARGS = ["--embeddings", "random", "--num-steps", str(STEPS), "--capture-steps", f"0-{STEPS - 1}", "--latent",
            "3x16x16", "--block", "16", "--tile", "4", "--stride", "4", "--footprints", "1", "--device", "cpu"]


def _invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _config(model_dir, out, **kw):
    return CaptureConfig(out=str(out), model=str(model_dir), **{**SETTINGS, **kw})


def _stop_after(step):
    """An on_step callback that interrupts the run after ``step`` (as Ctrl+C would)."""

    def on_step(s):
        if s == step:
            raise KeyboardInterrupt

    return on_step


def _held_capture(model_dir, out, *, overwrite=False):
    """A capture subprocess that writes step 0, reports it and waits for a line on stdin."""
    script = textwrap.dedent(
        f"""
        import sys
        from dfsviz.capture import CaptureConfig, run_capture
        cfg = CaptureConfig(out={str(out)!r}, model={str(model_dir)!r}, overwrite={overwrite!r}, **{SETTINGS!r})
        def on_step(s):
            print(f"STEP {{s}}", flush=True)
            if s == 0:
                sys.stdin.readline()
        result = run_capture(cfg, progress=False, on_step=on_step)
        print("DONE", result.complete, flush=True)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.strip() == "STEP 0", f"the holding capture did not reach step 0: {line!r} {proc.stderr.read()}"
    return proc


def _release(proc):
    out, err = proc.communicate("go\n", timeout=120)
    assert proc.returncode == 0, err
    return out


def _all_maps(path):
    with CaptureReader(path) as r:
        return {(s, layer, o): r.block_stats(s, layer, o).m.clone() for s in r.steps for layer in r.layers for o in r.orders}


# ----------------------------------------------------------------------------------------
# concurrent writers
# ----------------------------------------------------------------------------------------
def test_overwrite_of_a_file_being_written_is_refused_and_destroys_nothing(tmp_path, model_dirs):
    out = tmp_path / "run.h5"
    holder = _held_capture(model_dirs["wan"], out)
    try:
        size = out.stat().st_size
        for extra in (["--overwrite"], [], ["--resume"]):
            result = _invoke("capture", "--model", model_dirs["wan"], "--out", out, "--quiet", *CLI_ARGS, *extra)
            assert result.exit_code == 2, result.output
            assert "is being written by another dfsviz capture (pid" in result.output, result.output
            assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
            assert out.stat().st_size >= size  # not truncated
    finally:
        done = _release(holder)
    assert "DONE True" in done
    with CaptureReader(out) as reader:
        assert reader.complete and reader.steps == list(range(STEPS)) and reader.validate() == []


def test_two_captures_started_at_once_on_a_new_path(tmp_path, model_dirs):
    out = tmp_path / "new.h5"
    holder = _held_capture(model_dirs["wan"], out)
    try:
        # the second one may see the lock or the file the first one renamed into place: either
        # way it is refused and the first run's file stays intact
        result = _invoke("capture", "--model", model_dirs["wan"], "--out", out, "--quiet", *CLI_ARGS)
        assert result.exit_code == 2 and "is being written by another dfsviz capture" in result.output, result.output
    finally:
        _release(holder)
    with CaptureReader(out) as reader:
        assert reader.complete and reader.validate() == []


def test_lock_is_taken_before_the_file_exists(tmp_path, model_dirs):
    from dfsviz.capture.file_safety import CaptureLock

    out = tmp_path / "locked.h5"
    with CaptureLock(out):
        with pytest.raises(ValueError, match=r"is being written by another dfsviz capture \(pid \d+\)"):
            # another process: flock is per open file description, so a second open in this process
            # conflicts as a second process would
            run_capture(_config(model_dirs["wan"], out), progress=False)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no temporary file, no lock file left


@pytest.mark.parametrize("code", [errno.EACCES, errno.EROFS], ids=["no-permission", "read-only"])
def test_a_folder_that_takes_no_file_is_named_not_the_lock(tmp_path, monkeypatch, code):
    """The lock file is the first thing a capture creates: a folder that refuses it (as /sys does,
    even to root) is reported as the output's folder, one line, before any model is loaded."""
    from dfsviz.capture import file_safety

    out = tmp_path / "x.h5"
    real_open = os.open

    def refusing(path, *args, **kwargs):  # isolates the failure: the folder refuses new files
        if str(path).endswith(".x.h5.lock"):
            raise OSError(code, os.strerror(code), str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(file_safety.os, "open", refusing)
    result = _invoke("capture", "--out", out, "--quiet")
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == [
        f"Error: cannot write in the folder of {str(out)!r}: {os.strerror(code)}"]


def test_a_failed_creation_leaves_no_file_and_keeps_the_old_one(tmp_path, model_dirs):
    out = tmp_path / "keep.h5"
    run_capture(_config(model_dirs["wan"], out, capture_steps=(0,)), progress=False)
    before = out.read_bytes()
    # a disk that fills while the new file's header is written: writes past 2 KiB fail (EFBIG)
    script = textwrap.dedent(
        f"""
        import resource, signal, sys
        from dfsviz.capture import CaptureConfig, run_capture
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        cfg = CaptureConfig(out={str(out)!r}, model={str(model_dirs["wan"])!r}, overwrite=True, **{SETTINGS!r})
        resource.setrlimit(resource.RLIMIT_FSIZE, (2048, resource.RLIM_INFINITY))
        try:
            run_capture(cfg, progress=False)
        except ValueError as exc:
            print("ERROR", exc)
            sys.exit(2)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stdout.startswith("ERROR could not create"), (proc.stdout, proc.stderr)
    assert "nothing was written" in proc.stdout
    assert out.read_bytes() == before  # --overwrite replaces the old file only once the new one exists
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.h5"]


# ----------------------------------------------------------------------------------------
# a full disk
# ----------------------------------------------------------------------------------------
def test_free_space_is_checked_before_each_step(tmp_path, model_dirs, monkeypatch):
    import shutil

    import dfsviz.capture.file_safety as file_safety

    out = tmp_path / "full.h5"
    real = shutil.disk_usage
    state = {"steps": 0}

    def fake_usage(path):
        usage = real(path)
        free = usage.free if state["steps"] < 2 else 1000  # the disk fills up after two steps
        return usage._replace(free=free)

    monkeypatch.setattr(file_safety.shutil, "disk_usage", fake_usage)
    with pytest.raises(ValueError) as info:
        run_capture(_config(model_dirs["wan"], out), progress=False,
                    on_step=lambda s: state.__setitem__("steps", state["steps"] + 1))
    message = str(info.value)
    assert "not enough free space for step 2" in message and "1000 B free" in message
    assert "needs up to" in message and "--resume" in message and "\n" not in message
    with CaptureReader(out) as reader:
        assert reader.steps == [0, 1] and not reader.complete and reader.validate() == []
    monkeypatch.undo()
    run_capture(_config(model_dirs["wan"], out, resume=True), progress=False)
    with CaptureReader(out) as reader:
        assert reader.complete and reader.validate() == []


# `dfsviz capture` in a subprocess whose file may grow by only `room` bytes once step 1 is
# complete: RLIMIT_FSIZE makes the kernel fail HDF5's writes as a full disk fails them (EFBIG
# instead of ENOSPC), in the middle of step 2, after its space was checked and reserved
_FILLING_SCRIPT = """
import os, resource, signal, sys
from dfsviz.capture.writer import CaptureWriter
from dfsviz.cli import main
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
end_step = CaptureWriter.end_step
def end_step_then_fill(self):
    end_step(self)
    if self.completed == {{0, 1}}:
        resource.setrlimit(resource.RLIMIT_FSIZE, (os.path.getsize(self.path) + {room}, resource.RLIM_INFINITY))
CaptureWriter.end_step = end_step_then_fill
main({args!r})
"""


@pytest.mark.parametrize("room", [0, 700, 20_000])
def test_disk_full_in_the_middle_of_a_step_keeps_the_finished_ones_and_resume_repairs(tmp_path, model_dirs, room):
    out = tmp_path / "full.h5"
    args = ["capture", "--model", str(model_dirs["wan"]), "--out", str(out), "--quiet", *CLI_ARGS]
    proc = subprocess.run([sys.executable, "-c", _FILLING_SCRIPT.format(room=room, args=args)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "could not write step 2" in errors[0] and "--resume" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr
    size = out.stat().st_size
    with CaptureReader(out) as reader:  # readable before any repair, and left as it is
        assert reader.steps == [0, 1] and not reader.complete and reader.validate() == []
    assert out.stat().st_size == size

    result = _invoke("capture", "--model", model_dirs["wan"], "--out", out, "--resume", "--quiet", *CLI_ARGS)
    assert result.exit_code == 0, result.output
    assert "2 already there" in result.output
    reference = tmp_path / "ref.h5"
    run_capture(_config(model_dirs["wan"], reference), progress=False)
    got, want = _all_maps(out), _all_maps(reference)
    assert got.keys() == want.keys()
    for key in want:  # bit-identical to an uninterrupted run
        assert torch.equal(got[key], want[key]), key
    with CaptureReader(out) as reader:
        assert reader.complete and reader.validate() == []


def test_a_file_cut_off_mid_write_is_read_as_it_is_and_resume_repairs_it(tmp_path, model_dirs):
    """A run killed (or stopped by a full disk) while a step's data went out leaves the file
    shorter than the end HDF5 recorded for it: the reader lists the completed steps without
    changing the file, and resume repairs and completes it."""
    out = tmp_path / "cut.h5"
    with pytest.raises(KeyboardInterrupt):
        run_capture(_config(model_dirs["wan"], out), progress=False, on_step=_stop_after(1))
    size = 1 << 20
    with h5py.File(out, "r+") as f:  # step 2's data, its space allocated before it is written
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
        data = h5py.h5d.create(f["steps"].create_group("step_0002").id, b"map", h5py.h5t.STD_U8LE,
                               h5py.h5s.create_simple((size,)), dcpl=dcpl)
        offset = data.get_offset()
        f["steps/step_0002/map"][...] = 7
    assert out.stat().st_size == offset + size  # the step's data is the file's tail
    os.truncate(out, offset + 4096)  # the kill: the superblock records the end, the data never got there
    with pytest.raises(OSError, match="truncated file"):
        h5py.File(out, "r")
    cut = out.read_bytes()
    with CaptureReader(out) as reader:
        assert reader.steps == [0, 1] and not reader.complete and reader.validate() == []
    assert out.read_bytes() == cut  # read as it is

    result = run_capture(_config(model_dirs["wan"], out, resume=True), progress=False)
    assert result.complete and result.skipped == [0, 1]
    with CaptureReader(out) as reader:
        assert reader.complete and reader.steps == list(range(STEPS)) and reader.validate() == []



@pytest.mark.parametrize("keep, message", [
    # HDF5 loops for ever on the zeros where the cut took the root group's structure: the walk in
    # a child process is stopped, and every command says so in one line
    (4096, r"is not a readable HDF5 file \(cut off at byte 4096 of the \d+ it records, inside the structure "
           r"that every read needs \(HDF5 loops on it for over 5 s\): nothing in it can be read or resumed\)"),
    # here h5py raises KeyError, which once left the reader as a traceback
    (512, r"is damaged: HDF5 cannot read its header \(.*unable to determine object type.*\)"),
])
def test_a_file_cut_inside_its_structure_is_refused_in_one_line(tmp_path, monkeypatch, keep, message):
    from dfsviz._package_data import sample_capture
    from dfsviz.capture import file_safety

    monkeypatch.setattr(file_safety, "WALK_SECONDS", 5)
    cut = tmp_path / "cut.h5"
    cut.write_bytes(sample_capture().read_bytes()[:keep])  # a copy that stopped early
    with pytest.raises(ValueError, match=r"'.*cut\.h5' " + message):
        CaptureReader(cut)
    result = CliRunner().invoke(main, ["capture", "--out", str(cut), "--resume"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert cut.stat().st_size == keep  # nothing written


# ----------------------------------------------------------------------------------------
# resume: the same run, and only the same run
# ----------------------------------------------------------------------------------------
def test_resume_refuses_changed_weights(tmp_path, model_dirs):
    import shutil

    from safetensors.torch import load_file, save_file

    model = tmp_path / "model"
    shutil.copytree(model_dirs["wan"], model)
    out = tmp_path / "w.h5"
    with pytest.raises(KeyboardInterrupt):
        run_capture(_config(model, out), progress=False, on_step=_stop_after(0))
    weights = model / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    name = sorted(tensors)[3]
    tensors[name] = tensors[name] + 1e-3  # same names, shapes and file size: only values change
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="the model weights differ from those of the interrupted run"):
        run_capture(_config(model, out, resume=True), progress=False)
    with CaptureReader(out) as reader:
        assert reader.steps == [0]


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (dict(device="cpu"), dict(device="auto")),
        (dict(dtype="float32"), dict(dtype="auto")),
        (dict(kernel_backend="ref"), dict(kernel_backend=None)),
        (dict(device="auto", dtype="auto", kernel_backend=None), dict(device="cpu", dtype="float32", kernel_backend="ref")),
    ],
)
def test_resume_accepts_options_that_resolve_to_the_same_run(tmp_path, model_dirs, first, second):
    out = tmp_path / "same.h5"
    with pytest.raises(KeyboardInterrupt):
        run_capture(_config(model_dirs["wan"], out, **first), progress=False, on_step=_stop_after(0))
    result = run_capture(_config(model_dirs["wan"], out, resume=True, **second), progress=False)
    assert result.complete and result.skipped == [0]


def test_resume_still_refuses_a_different_run(tmp_path, model_dirs):
    out = tmp_path / "diff.h5"
    with pytest.raises(KeyboardInterrupt):
        run_capture(_config(model_dirs["wan"], out), progress=False, on_step=_stop_after(0))
    for change, name in ((dict(seed=3), "seed"), (dict(dtype="float16"), "dtype"), (dict(footprints=0), "footprints")):
        with pytest.raises(ValueError, match=rf"captured with other settings \(differs in \[.*'{name}'.*\]\)"):
            run_capture(_config(model_dirs["wan"], out, resume=True, **change), progress=False)


def test_clean_interruption_leaves_no_partial_step(tmp_path, model_dirs):
    out = tmp_path / "ctrl_c.h5"
    with pytest.raises(KeyboardInterrupt):
        run_capture(_config(model_dirs["wan"], out), progress=False, on_step=_stop_after(1))
    with h5py.File(out, "r") as f:
        assert sorted(f["steps"]) == ["step_0000", "step_0001"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ctrl_c.h5"]


@pytest.mark.parametrize("flag", [[], ["--overwrite"], ["--resume"]], ids=["plain", "overwrite", "resume"])
def test_a_folder_as_the_output_of_one_clip_is_refused_and_kept(tmp_path, model_dirs, flag):
    folder = tmp_path / "runs"
    folder.mkdir()
    (folder / "other.h5").write_bytes(b"kept")
    result = _invoke("capture", "--model", model_dirs["wan"], "--out", folder, "--quiet", *flag, *CLI_ARGS)
    assert result.exit_code == 2, result.output
    assert f"`--out` {str(folder)!r} is a folder, but one clip's capture is one file" in result.output
    assert [p.name for p in folder.iterdir()] == ["other.h5"] and (folder / "other.h5").read_bytes() == b"kept"


def test_ctrl_c_on_the_command_line_says_what_the_file_holds(tmp_path, model_dirs):
    out = tmp_path / "sigint.h5"
    cmd = [sys.executable, "-m", "dfsviz", "capture", "--model", str(model_dirs["wan"]), "--out", str(out), *CLI_ARGS]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen = b""
    while b"capture step 1" not in seen:  # the bar names step 1 once step 0 is on disk
        chunk = os.read(proc.stderr.fileno(), 4096)
        assert chunk, f"the capture ended before step 1: {seen.decode(errors='replace')}"
        seen += chunk
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    err = err.decode()
    assert proc.returncode == 130, err
    assert f"Interrupted: {out} holds steps [0" in err and "marked incomplete; the same command with --resume" in err
    assert "Traceback" not in err and "Aborted" not in err
    result = _invoke("capture", "--model", model_dirs["wan"], "--out", out, "--quiet", "--resume", *CLI_ARGS)
    assert result.exit_code == 0, result.output
    with CaptureReader(out) as reader:
        assert reader.complete and reader.steps == list(range(STEPS))


# ----------------------------------------------------------------------------------------
# validated before anything is created
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--seed", str(2**64)], r"`--seed` must be an integer in \[0, 9223372036854775807\]"),
        (["--seed", str(2**63)], r"`--seed` must be an integer in \[0, 9223372036854775807\]"),
        (["--num-steps", str(2**64)], r"`--num-steps` must be an integer in \[1, 100000\]"),
        (["--capture-steps", str(2**64)], r"`--capture-steps` values must lie in \[0, 100000\]"),
        (["--layers", "0-" + str(2**64)], r"`--layers` values must lie in \[0, 100000\]"),
    ],
)
def test_huge_integers_are_refused_before_any_file_exists(tmp_path, model_dirs, args, match):
    out = tmp_path / "huge.h5"
    base = [a for a in CLI_ARGS]
    result = _invoke("capture", "--model", model_dirs["wan"], "--out", out, "--quiet", *base, *args)
    assert result.exit_code == 2, result.output
    import re

    assert re.search(match, result.output), result.output
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("tensors", "match"),
    [
        (None, r"emb.safetensors' is not a readable \.safetensors file"),
        ({"prompt_embeds": (1, 7, 3)},
         r"'prompt_embeds' has shape \[1, 7, 3\]; this model takes 2-D or 3-D of width W"),
        ({"prompt_embeds": (7, "W"), "prompt_attention_mask": (5,)},
         r"'prompt_attention_mask' has shape \[5\]; this model takes 1-D or 2-D of length 7"),
        ({"prompt_embeds": (1, 7, "W"), "negative_prompt_embeds": (1, 2, 7, "W")},
         r"'negative_prompt_embeds' has shape \[1, 2, 7, W\]"),
        ("nan", r"'prompt_embeds' holds NaN or infinite values"),
    ],
    ids=["not-safetensors", "wrong-width", "wrong-mask", "batched-negative", "nan"],
)
def test_bad_embeddings_are_refused_before_any_file_exists(tmp_path, model_dirs, tensors, match):
    import re

    from safetensors.torch import save_file

    width = json.loads((Path(model_dirs["wan"]) / "config.json").read_text())["text_dim"]
    emb = tmp_path / "emb.safetensors"
    if tensors is None:
        emb.write_text("not a safetensors file")
    elif tensors == "nan":
        save_file({"prompt_embeds": torch.full((1, 7, width), float("nan"))}, emb)
    else:
        save_file({k: torch.randn(*[width if d == "W" else d for d in shape]) for k, shape in tensors.items()}, emb)
    out = tmp_path / "out.h5"
    args = [a for a in CLI_ARGS if a != "random"]
    args[args.index("--embeddings") + 1:args.index("--embeddings") + 1] = [emb]
    result = _invoke("capture", "--model", model_dirs["wan"], "--out", out, "--quiet", *args)
    assert result.exit_code == 2, result.output
    assert re.search(match.replace("W", str(width)), result.output), result.output
    assert "Traceback" not in result.output and not out.exists()


def test_largest_seed_captures(tmp_path, model_dirs):
    out = tmp_path / "big_seed.h5"
    result = run_capture(_config(model_dirs["wan"], out, seed=2**63 - 1, capture_steps=(0,)), progress=False)
    assert result.complete
    with CaptureReader(out) as reader:
        assert int(reader.attrs["seed"]) == 2**63 - 1 and reader.validate() == []


def test_non_finite_attention_inputs_stop_the_capture_with_one_line(tmp_path, model_dirs):
    from dfsviz.capture import load_model_source

    cfg = _config(model_dirs["wan"], tmp_path / "nan.h5", capture_steps=(0, 1))
    source = load_model_source(cfg)
    layer = source.transformer.blocks[1].attn1.to_k
    with torch.no_grad():
        layer.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"step 0, layer 1 .*non-finite"):
        run_capture(cfg, progress=False, source=source)
    with CaptureReader(cfg.out) as reader:
        assert reader.steps == [] and reader.validate() == []


def test_success_is_reported_only_for_a_file_that_validates(tmp_path, model_dirs):
    out = tmp_path / "ok.h5"
    result = _invoke("capture", "--model", model_dirs["wan"], "--out", out, "--quiet", *CLI_ARGS)
    assert result.exit_code == 0 and "(complete)" in result.output
    with CaptureReader(out) as reader:
        assert reader.validate() == []
    info = json.loads(_invoke("inspect", out, "--json").output)
    assert info["problems"] == [] and info["complete"]


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX SIGKILL")
def test_killed_during_creation_leaves_no_half_file(tmp_path, model_dirs):
    # a stale temporary file of a killed creation is removed by the next run on that path
    out = tmp_path / "stale.h5"
    stale = tmp_path / ".stale.h5.12345.tmp"
    stale.write_bytes(b"half")
    run_capture(_config(model_dirs["wan"], out, capture_steps=(0,)), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stale.h5"]
    assert Path(out).stat().st_size > 0
    assert os.path.exists(out)

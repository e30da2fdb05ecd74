"""A capture killed with SIGKILL leaves a readable file; --resume completes it identically."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from click.testing import CliRunner

import dfsviz.cli.capture  # noqa: F401  (registers the command on the group)
from dfsviz.capture import CaptureConfig, run_capture
from dfsviz.capture.reader import CaptureReader
from dfsviz.cli import main

STEPS = 4
# the same settings as the CLI options below (resume compares the stored configuration)
SETTINGS = dict(embeddings="random", num_steps=STEPS, capture_steps=tuple(range(STEPS)), latent="3x16x16", block=16,
                tile=4, stride=4, footprints=1, device="cpu")
CLI_ARGS = ["--embeddings", "random", "--num-steps", str(STEPS), "--capture-steps", f"0-{STEPS - 1}", "--latent",
            "3x16x16", "--block", "16", "--tile", "4", "--stride", "4", "--footprints", "1", "--device", "cpu"]


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX SIGKILL")
def test_sigkill_then_resume(tmp_path, model_dirs):
    out = tmp_path / "killed.h5"
    script = textwrap.dedent(
        f"""
        import sys
        from dfsviz.capture import CaptureConfig, run_capture
        cfg = CaptureConfig(out={str(out)!r}, model={str(model_dirs['wan'])!r}, **{SETTINGS!r})
        run_capture(cfg, progress=False, on_step=lambda s: print(f"STEP {{s}}", flush=True))
        print("DONE", flush=True)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        line = proc.stdout.readline()  # blocks until step 0 is flushed
        assert line.strip() == "STEP 0", f"capture subprocess did not report a step (got {line!r})"
        os.kill(proc.pid, signal.SIGKILL)  # now inside step 1
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL

    with CaptureReader(out) as reader:
        assert not reader.complete
        done = reader.steps
        assert done and done == list(range(len(done))) and len(done) < STEPS
        assert reader.validate() == []
        m0 = reader.block_stats(0, 1, "hilbert3d").m.clone()
        torch.testing.assert_close(m0.sum(-1), torch.ones_like(m0[..., 0]))

    result = CliRunner().invoke(main, ["capture", "--model", str(model_dirs["wan"]), "--out", str(out), "--resume",
                                       "--quiet", *CLI_ARGS])
    assert result.exit_code == 0, result.output
    assert f"{len(done)} already there" in result.output

    # an uninterrupted run capturing only the last step: same trajectory, less work
    reference = CaptureConfig(out=str(tmp_path / "ref.h5"), model=str(model_dirs["wan"]),
                              **{**SETTINGS, "capture_steps": (STEPS - 1,)})
    run_capture(reference, progress=False)
    with CaptureReader(out) as resumed, CaptureReader(reference.out) as ref:
        assert resumed.complete and resumed.steps == list(range(STEPS)) and resumed.validate() == []
        assert torch.equal(resumed.block_stats(0, 1, "hilbert3d").m, m0)  # completed steps untouched
        last = STEPS - 1  # the resumed run replays the same denoising trajectory
        for order in ("raster", "hilbert3d"):
            assert torch.equal(resumed.block_stats(last, 1, order).m, ref.block_stats(last, 1, order).m)
            assert torch.equal(resumed.footprints(last, 0, order, 1)[1], ref.footprints(last, 0, order, 1)[1])

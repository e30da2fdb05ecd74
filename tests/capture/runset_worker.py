"""One rank of the data-parallel run-set tests (``test_runset_ranks.py``), under torchrun on gloo::

    python -m torch.distributed.run --nproc-per-node 2 tests/capture/runset_worker.py MODEL OUT MODE

runs :func:`dfsviz.capture.capture_run_set` over the seeds ``SEEDS`` with the test's settings
(``SETTINGS``, the same as ``CLI_ARGS``). MODE ``steps`` prints ``PID <rank> <pid>`` first and
``RANK <rank> CLIP <clip> STEP <step>`` after each step a rank completes (the kill test waits on
them); ``block_by_rank`` gives each rank its own block size (another run set on each rank).
"""

from __future__ import annotations

import os
import sys

from dfsviz.capture import CaptureConfig
from dfsviz.capture.runset import RunSetConfig, capture_run_set
from launch import say

STEPS = 3
SEEDS = (0, 1, 2, 3)
#: the same settings as CLI_ARGS (resume compares the stored configuration)
SETTINGS = dict(embeddings="random", num_steps=STEPS, capture_steps=tuple(range(STEPS)), latent="3x16x16", block=16,
                tile=4, stride=4, footprints=1, device="cpu")
CLI_ARGS = ["--seeds", "0-3", "--embeddings", "random", "--num-steps", str(STEPS), "--capture-steps", f"0-{STEPS - 1}",
            "--latent", "3x16x16", "--block", "16", "--tile", "4", "--stride", "4", "--footprints", "1", "--device",
            "cpu"]


def main(model: str, out: str, mode: str) -> None:
    rank = int(os.environ["RANK"])
    block = 16 * (rank + 1) if mode == "block_by_rank" else SETTINGS["block"]
    say(f"PID {rank} {os.getpid()}")
    config = RunSetConfig(CaptureConfig(out=out, model=model, **{**SETTINGS, "block": block}), seeds=SEEDS)
    capture_run_set(config, progress=False,
                    on_step=lambda clip, step: say(f"RANK {rank} CLIP {clip} STEP {step}"))


if __name__ == "__main__":
    main(*sys.argv[1:4])

"""One rank of the Ulysses capture tests (``test_ulysses_capture.py``), under torchrun on gloo::

    python -m torch.distributed.run --nproc-per-node 2 tests/capture/ulysses_worker.py MODEL OUT MODE

runs :func:`dfsviz.capture.run_capture` with ``context_parallel="ulysses"`` and the test's settings
(``SETTINGS``). MODE ``steps`` prints ``PID <rank> <pid>`` first and ``STEP <s>`` on rank 0 after
each completed step (the kill test waits on them); ``seed_by_rank`` gives each rank its own seed
(another run on each rank). MODE ``record`` enables diffusers' Ulysses attention itself, applies
DFSAttn and records the hand-written Wan loop with :func:`dfsviz.record` (:func:`record_loop`, which
the test runs in one process too).
"""

from __future__ import annotations

import os
import sys

from dfsviz.capture import CaptureConfig, run_capture
from launch import say

STEPS = 4
#: the same settings as CLI_ARGS (resume compares the stored configuration)
SETTINGS = dict(embeddings="random", num_steps=STEPS, capture_steps=tuple(range(STEPS)), latent="3x16x16", block=16,
                tile=4, stride=4, footprints=1, device="cpu")
CLI_ARGS = ["--embeddings", "random", "--num-steps", str(STEPS), "--capture-steps", f"0-{STEPS - 1}", "--latent",
            "3x16x16", "--block", "16", "--tile", "4", "--stride", "4", "--footprints", "1", "--device", "cpu"]


def record_loop(model: str, out: str, parallel: bool) -> None:
    """Record three steps of the Wan loop (CFG, both branches) with DFSAttn active; with ``parallel``
    under Ulysses attention over the torchrun world, as a user sets it up."""
    import diffusers
    import torch

    import dfsviz
    from wan_loop import dfsattn_config, embeds, wan_loop

    transformer = diffusers.WanTransformer3DModel.from_pretrained(model).eval()
    if parallel:
        import torch.distributed as dist

        dist.init_process_group("gloo")
        # diffusers 0.42.1 divides by torch.accelerator.device_count() in enable_parallelism (docs/accel.md)
        torch.accelerator.device_count = lambda: 1
        transformer.enable_parallelism(config=diffusers.ContextParallelConfig(ulysses_degree=dist.get_world_size()))
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    with dfsviz.apply_dfsattn(transformer, dfsattn_config(3)), torch.no_grad():
        with dfsviz.record(transformer, out, scheduler=scheduler, branches="both", block=16, tile=4, stride=4,
                           footprints=1) as rec:
            wan_loop(transformer, scheduler, 3, embeds(10), embeds(11), 5.0)
    assert rec.result.wrote == (not parallel or dist.get_rank() == 0)
    if parallel:
        from dfsviz.capture.ranks import leave_world

        del transformer, rec  # they hold diffusers' device mesh, and so the Ulysses groups
        leave_world()  # before interpreter teardown, where gloo's threads can abort


def main(model: str, out: str, mode: str) -> None:
    if mode == "record":
        record_loop(model, out, parallel=True)
        return
    rank = int(os.environ["RANK"])
    seed = rank if mode == "seed_by_rank" else 0
    say(f"PID {rank} {os.getpid()}")
    config = CaptureConfig(out=out, model=model, seed=seed, context_parallel="ulysses", **SETTINGS)
    run_capture(config, progress=False, on_step=lambda s: rank == 0 and say(f"STEP {s}"))


if __name__ == "__main__":
    main(*sys.argv[1:4])

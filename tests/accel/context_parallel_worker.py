"""One rank of the context-parallel DFSAttn tests (``test_context_parallel.py``), and the cases they share.

``torchrun --nproc-per-node P`` (gloo on CPU, NCCL on GPUs) runs this file: every rank builds each
case's tiny random-weight transformer (real diffusers class, 4 heads, 192 video tokens), enables
diffusers' Ulysses attention over the P ranks, applies DFSAttn and runs two calls (a dense warm-up
step, then a sparse step); it saves the outputs, the masks DFSAttn attended (``state.observers``)
and the records to ``OUT/rank<r>.pt``. The test runs :func:`run` in one process on the same model
and compares::

    python -m torch.distributed.run --nproc-per-node 2 --master-port PORT tests/accel/context_parallel_worker.py OUT
"""

from __future__ import annotations

import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # accel_models, tiny_models: as pytest's rootdir import finds them

import torch  # noqa: E402

from accel_models import make_plan  # noqa: E402
from dfsviz.accel import DFSConfig, apply_dfsattn  # noqa: E402
from dfsviz.capture.ranks import leave_world  # noqa: E402
from dfsviz.sparse.schedule import DFSSchedule  # noqa: E402
from tiny_models import build_class  # noqa: E402

HEADS = 4
#: case -> diffusers class; "wan_calibrated" gives every head its own budget (None: a dense head)
CASES = {"wan": "WanTransformer3DModel", "wan_calibrated": "WanTransformer3DModel",
         "ltx": "LTXVideoTransformer3DModel"}
BUDGETS = {0: (0.25, 0.5, None, 0.75), 1: (0.5, None, None, 0.25)}


def build(case: str) -> torch.nn.Module:
    """The case's tiny transformer with 4 heads of 32 (LTX-Video: its cross-attention as wide)."""
    cls = CASES[case]
    extra = {"cross_attention_dim": HEADS * 32} if cls == "LTXVideoTransformer3DModel" else {}
    return build_class(cls, num_attention_heads=HEADS, **extra)


def config(case: str, model: torch.nn.Module) -> DFSConfig:
    """Two steps, blocks of 16: step 0 dense, step 1 sparse in every layer (gamma 0.3, or the calibrated
    per-head budgets)."""
    if case == "wan_calibrated":
        plan = make_plan(model, BUDGETS, num_steps=2, warmup=1)
        return DFSConfig(order=plan.order, block=plan.block, tile=plan.tile, score_method=plan.method,
                         schedule=plan.schedule(), calibration=plan)
    return DFSConfig(block=16, tile=4, schedule=DFSSchedule(num_steps=2, skip_steps=1, gamma0=0.3, decrement=0.0, dense_layers=()))


def inputs(case: str) -> dict:
    """One call's keyword inputs: 192 video tokens, 8 text tokens (LTX-Video without a text mask:
    under Ulysses attention diffusers 0.42.1 breaks its cross-attention mask, see docs/accel.md)."""
    g = torch.Generator().manual_seed(1)
    text, t = torch.randn(1, 8, 16, generator=g), torch.tensor([500])
    if CASES[case] == "LTXVideoTransformer3DModel":
        return dict(hidden_states=torch.randn(1, 192, 8, generator=g), encoder_hidden_states=text, timestep=t,
                    encoder_attention_mask=None, num_frames=3, height=8, width=8, return_dict=False)
    return dict(hidden_states=torch.randn(1, 4, 3, 16, 16, generator=g), encoder_hidden_states=text, timestep=t,
                return_dict=False)


def run(case: str, model: torch.nn.Module) -> dict:
    """DFSAttn's two calls on ``model``: outputs, (layer, first head, dense bool mask [B, H, Mq, Mk])
    of every sparse call, (layer, gamma) of every record, and the handle's Ulysses (rank, degree)."""
    masks = []
    with apply_dfsattn(model, config(case, model)) as handle, torch.no_grad():
        handle.state.observers.append(lambda call: masks.append((call.layer, call.first_head, call.mask.to_dense())))
        outputs = [_waited(model(**inputs(case))[0]) for _ in range(2)]
    records = [(r["layer"], r["gamma"]) for r in handle.state.records]
    return {"outputs": outputs, "masks": masks, "records": records, "ulysses": handle.ulysses}


def _waited(x: torch.Tensor) -> torch.Tensor:
    """``x`` once its collective has landed: under Ulysses attention the transformer's output is
    diffusers' all-gather, an AsyncCollectiveTensor; torch ops wait for it, but torch.save reads its
    storage directly and could save a buffer the gather is still filling."""
    from torch.distributed._functional_collectives import AsyncCollectiveTensor

    return x.wait() if isinstance(x, AsyncCollectiveTensor) else x


def main(out: pathlib.Path) -> None:
    import diffusers
    import torch.distributed as dist

    dist.init_process_group("gloo")
    if not torch.accelerator.is_available():
        # diffusers 0.42.1's enable_parallelism places rank r on device r % torch.accelerator.device_count(),
        # a division by zero on a host without an accelerator: the CPU counts as one device.
        torch.accelerator.device_count = lambda: 1
    results = {}
    for case in CASES:
        model = build(case)
        model.enable_parallelism(config=diffusers.ContextParallelConfig(ulysses_degree=dist.get_world_size()))
        results[case] = run(case, model)
    torch.save(results, out / f"rank{dist.get_rank()}.pt")
    del model  # its hooks hold diffusers' device mesh, and so the Ulysses groups, until leave_world collects them
    leave_world()


if __name__ == "__main__":
    main(pathlib.Path(sys.argv[1]))

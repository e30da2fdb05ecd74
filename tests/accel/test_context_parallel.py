"""DFSAttn under diffusers' context parallelism (Ulysses attention), launched by torchrun.

Two gloo ranks on the CPU (``context_parallel_worker.py``) run tiny random-weight Wan and LTX-Video
transformers under ``enable_parallelism(ContextParallelConfig(ulysses_degree=2))`` with DFSAttn; each
rank's output must equal the single-process DFSAttn output of the same model, and the masks it
attended must be the single-process masks of its own heads (a calibrated plan's per-head budgets
sliced to them). Every refusal (ring, ulysses_anything, tensor parallelism, a class without
diffusers' plan, a degree that does not divide the heads, permute-once, a non-native backend,
parallelism enabled after apply_dfsattn) is one line, tested in one process on the config diffusers
records on the model.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys

import pytest
import torch

import context_parallel_worker as worker
from dfsviz.accel import apply_dfsattn
from dfsviz.architectures import PARALLEL_REFUSALS
from tiny_models import build_class

RANKS = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """What each of the two torchrun ranks saved: case -> outputs, masks, records, (rank, degree)."""
    out = tmp_path_factory.mktemp("context_parallel")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(RANKS), "--master-port",
           str(_free_port()), worker.__file__, str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(RANKS)]


@pytest.fixture(scope="module")
def single() -> dict:
    """The same cases in this one process, without parallelism."""
    return {case: worker.run(case, worker.build(case)) for case in worker.CASES}


@pytest.mark.parametrize("case", list(worker.CASES))
def test_each_rank_outputs_the_single_process_output(ranks, single, case):
    for rank, saved in enumerate(ranks):
        assert saved[case]["ulysses"] == (rank, RANKS)
        for got, want in zip(saved[case]["outputs"], single[case]["outputs"], strict=True):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", list(worker.CASES))
def test_each_rank_attends_the_single_process_masks_of_its_heads(ranks, single, case):
    per_rank = worker.HEADS // RANKS
    want = single[case]["masks"]
    assert len(want) == 2  # the sparse step's two layers
    for rank, saved in enumerate(ranks):
        got = saved[case]["masks"]
        assert [(layer, first) for layer, first, _ in got] == [(layer, rank * per_rank) for layer, _, _ in want]
        for (_, first, mask), (_, _, full) in zip(got, want):
            assert mask.shape[1] == per_rank
            assert torch.equal(mask, full[:, first:first + per_rank])


def test_calibrated_budgets_are_sliced_to_the_rank_heads(ranks):
    for rank, saved in enumerate(ranks):
        heads = slice(rank * worker.HEADS // RANKS, (rank + 1) * worker.HEADS // RANKS)
        assert saved["wan_calibrated"]["records"] == [(layer, worker.BUDGETS[layer][heads]) for layer in (0, 1)]


# ------------------------------------------------------------------------ refusals


@pytest.fixture
def wan():
    return worker.build("wan")


def _parallel(model, **context):
    """Record a parallel config on ``model`` as diffusers' enable_parallelism does (its mesh is not
    needed before the refusals)."""
    import diffusers

    model._parallel_config = diffusers.ParallelConfig(
        context_parallel_config=diffusers.ContextParallelConfig(**context))
    return model


def _stock(model) -> list[str]:
    return [type(m.processor).__name__ for n, m in model.named_modules() if hasattr(m, "processor")]


@pytest.mark.parametrize("context, message", [
    (dict(ring_degree=2), re.escape(f"DFSAttn under ring attention (WanTransformer3DModel, ring_degree=2): "
                                    f"{PARALLEL_REFUSALS['ring']}; use ContextParallelConfig(ulysses_degree=P)")),
    (dict(ulysses_degree=2, ring_degree=2), r"DFSAttn under ring attention \(WanTransformer3DModel, ring_degree=2\)"),
    (dict(ring_degree=2, ring_anything=True), r"DFSAttn under ring attention"),
    (dict(ulysses_degree=2, ulysses_anything=True),
     re.escape(f"DFSAttn under Ulysses attention (WanTransformer3DModel): {PARALLEL_REFUSALS['ulysses_anything']}")),
])
def test_other_kinds_of_context_parallelism_are_refused(wan, context, message):
    before = _stock(wan)
    with pytest.raises(ValueError, match=message):
        apply_dfsattn(_parallel(wan, **context), worker.config("wan", wan))
    assert _stock(wan) == before


def test_tensor_parallelism_is_refused(wan):
    import diffusers

    wan._parallel_config = diffusers.ParallelConfig(tensor_parallel_config=diffusers.TensorParallelConfig(tp_degree=2))
    with pytest.raises(ValueError, match=re.escape(f"DFSAttn under tensor parallelism (WanTransformer3DModel): "
                                                   f"{PARALLEL_REFUSALS['tensor']}")):
        apply_dfsattn(wan, worker.config("wan", wan))


def test_a_class_without_diffusers_plan_is_refused():
    model = _parallel(build_class("HunyuanVideoTransformer3DModel"), ulysses_degree=2)
    with pytest.raises(ValueError, match=re.escape(f"DFSAttn under context parallelism (HunyuanVideoTransformer3DModel): "
                                                   f"{PARALLEL_REFUSALS['no_plan']}")):
        apply_dfsattn(model, worker.config("wan", model))


def test_a_degree_that_does_not_divide_the_heads_is_refused():
    model = _parallel(build_class("WanTransformer3DModel", num_attention_heads=3), ulysses_degree=2)
    with pytest.raises(ValueError, match=re.escape(
            "DFSAttn under Ulysses attention: ulysses_degree=2 does not divide the 3 heads of WanTransformer3DModel "
            "(blocks.0.attn1); use a degree in [1, 3] (torchrun --nproc-per-node)")):
        apply_dfsattn(model, worker.config("wan", model))


def test_permute_once_is_refused(wan):
    cfg = worker.config("wan", wan)
    with pytest.raises(ValueError, match=r"permute_once under context parallelism \(WanTransformer3DModel\): diffusers "
                                         r"splits the hidden states and the RoPE tables .* use permute_once=False"):
        apply_dfsattn(_parallel(wan, ulysses_degree=2), type(cfg)(**{**cfg.__dict__, "permute_once": True}))


def test_a_backend_other_than_native_is_refused_for_wan_too(wan):
    wan.blocks[0].attn1.processor._attention_backend = "flash"
    with pytest.raises(ValueError, match=r"layer blocks.0.attn1 runs the 'flash' attention backend, which bypasses "
                                         r"torch SDPA where DFSAttn replaces the attention; call "
                                         r"set_attention_backend\('native'\) first"):
        apply_dfsattn(_parallel(wan, ulysses_degree=2), worker.config("wan", wan))


def test_parallelism_enabled_after_apply_dfsattn_stops_the_call(wan):
    with apply_dfsattn(wan, worker.config("wan", wan)):
        _parallel(wan, ulysses_degree=2)
        with pytest.raises(RuntimeError, match=r"diffusers' parallelism of WanTransformer3DModel changed after "
                                               r"apply_dfsattn .* call remove\(\) on the DFSAttn handle, then "
                                               r"enable_parallelism, then apply_dfsattn"), torch.no_grad():
            wan(**worker.inputs("wan"))


"""dfsviz.record around a transformer in one's own loop with DFSAttn active (no pipeline, so no
text encoder stack is needed; on the GPU too): the stored masks are the ones DFSAttn attended,
recomputed here from the stored Q/K, and the loop's output is DFSAttn's, untouched."""

from __future__ import annotations

import pytest
import torch

import dfsviz
from tiny_models import build_tiny
from wan_loop import dfsattn_config, embeds, wan_loop

diffusers = pytest.importorskip("diffusers")

STEPS = 3
SETTINGS = dict(block=16, footprints=2, seed=1)


def _run(transformer, guidance=4.0):
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    return scheduler, lambda: wan_loop(transformer, scheduler, STEPS, embeds(10), embeds(11), guidance)


@pytest.mark.parametrize(("options", "device"), [
    (dict(cfg="share"), "cpu"),
    (dict(cfg="separate", permute_once=True), "cpu"),
    # the Triton kernels (head dim 64, bfloat16), masks made on the GPU
    pytest.param(dict(cfg="share"), "cuda", marks=pytest.mark.cuda),
], ids=["share", "separate-once", "share-cuda"])
def test_recording_with_dfsattn_stores_the_masks_it_used(tmp_path, options, device):
    from dfsviz.sparse.orders import make_order
    from dfsviz.sparse.select import select_topk

    cuda = device == "cuda"
    transformer = build_tiny("wan", in_channels=4, **({"attention_head_dim": 64} if cuda else {}))
    transformer = transformer.to(device, torch.bfloat16 if cuda else torch.float32)
    config = dfsattn_config(STEPS, **options)
    scheduler, run_loop = _run(transformer)
    handle = dfsviz.apply_dfsattn(transformer, config)
    try:
        plain = run_loop()
        out = tmp_path / "dfsattn.h5"
        with dfsviz.record(transformer, out, scheduler=scheduler, capture_steps=(0, 1, 2), branches="both",
                           save_qkv=(0, 1), **SETTINGS) as rec:
            recorded = run_loop()
        records = list(handle.state.records)
    finally:
        handle.remove()
    torch.testing.assert_close(recorded, plain, rtol=0, atol=0)  # DFSAttn's output, untouched by the recording
    assert handle.state.observers == [] and rec.result.complete
    sparse = [r for r in records if r["step"] > 0]
    assert {r["layer"] for r in sparse} == {1}  # the tiny Wan's two layers; layer 0 is dense

    with dfsviz.open(out) as run:
        assert run.validate() == []
        assert run.dfsattn_order == "hilbert3d" and run.orders == ["raster", "hilbert3d"]
        assert run.attrs["dfsattn"] == config.name and run.summary()["dfsattn"] == config.name
        assert [run.step_attrs(s)["dfsattn_plan"] for s in (0, 1, 2)] == ["dense", "refresh", "refresh"]
        assert run.step_attrs(1)["dfsattn_gamma"] == 0.5 and "dfsattn_gamma" not in run.step_attrs(0)
        order = make_order("hilbert3d", run.grid)
        for step in (0, 1, 2):
            for branch in ("cond", "uncond"):
                assert bool(run.dfsattn_kept(step, 0, branch=branch).all())  # a dense layer attends every block
                kept = run.dfsattn_kept(step, 1, branch=branch)
                if step == 0:
                    assert bool(kept.all())  # the warm-up step ran dense
                    continue
                # the mask from the stored Q/K of the branch that scored it (cond, unless separate)
                scorer = branch if config.cfg == "separate" else "cond"
                # (stored in float32, exact for bfloat16: on the GPU, the very inputs of DFSAttn's scorer)
                q, k = (x.to(device, transformer.dtype) for x in run.qkv(step, 1, branch=scorer)[:2])
                scores = dfsviz.kernels.block_scores(order.apply(q), order.apply(k), method="dfs_tile", tile=4, block=16)
                want = select_topk(scores, 0.5, seq_len=run.grid.num_tokens, block=16).to_dense().cpu()
                torch.testing.assert_close(kept, want, msg=f"step {step} {branch}")
                assert 0 < kept.float().mean() < 1
        # the recall of the mask DFSAttn used, from the stored m of its order
        m = run.block_mass(1, 1, "hilbert3d")
        torch.testing.assert_close(run.dfsattn_recall(1, 1), (m * run.dfsattn_kept(1, 1)).sum(-1).mean(-1).double())
        # the densities DFSAttn logged for the steps it scored equal the stored masks'
        for r in sparse:
            branch = "cond" if r["branch"] == 0 else "uncond"
            assert run.dfsattn_mask(r["step"], 1, branch=branch).density().mean().item() == pytest.approx(r["density"])


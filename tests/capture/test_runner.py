"""Full capture runs through real diffusers schedulers, checked against brute force."""

from __future__ import annotations

import pytest
import torch
from brute import dense_block_stats, dense_footprint, dense_variance_ratio
from stored_curves import assert_stored_curves_match_the_maps

from dfsviz.analysis.measured_capture import MeasuredCapture
from dfsviz.capture.adapters import WanAdapter
from dfsviz.capture import CaptureConfig, default_capture_steps, load_model_source, run_capture
from dfsviz.capture.reader import CaptureReader
from dfsviz.sparse.grid import LatentGrid
from dfsviz.sparse.scoring import block_scores_ref

BLOCK = 16


def _config(tmp_path, model_dir, name="cap.h5", **kw):
    base = dict(
        out=str(tmp_path / name), model=str(model_dir), embeddings="random", num_steps=3, capture_steps=(0, 2),
        latent="3x16x16", block=BLOCK, tile=4, stride=4, footprints=2, device="cpu",
    )
    base.update(kw)
    return CaptureConfig(**base)


def _check_against_brute_force(reader: CaptureReader, steps, layers, branches):
    scale = float(reader.attrs["softmax_scale"])
    assert scale == pytest.approx(32**-0.5)
    for step in steps:
        for layer in layers:
            for branch in branches:
                q, k, _ = reader.qkv(step, layer, branch=branch)
                q, k = q[0], k[0]
                for order in reader.orders:
                    perm = reader.perm(order)
                    qo, ko = q[:, perm], k[:, perm]
                    want = dense_block_stats(qo, ko, BLOCK, scale)
                    got = reader.block_stats(step, layer, order, branch=branch)
                    for name, atol in (("m", 2e-6), ("L", 2e-5), ("r", 2e-5), ("J", 2e-5)):
                        torch.testing.assert_close(getattr(got, name)[0].double(), want[name], atol=atol, rtol=1e-4,
                                                   msg=f"{name} step {step} layer {layer} {branch} {order}")
                    # meanpool scores the pooled logit L; dfs_tile must be the scorer's output on these q/k
                    torch.testing.assert_close(reader.scores(step, layer, order, "meanpool", branch=branch)[0].double(),
                                               want["L"], atol=2e-5, rtol=1e-4)
                    torch.testing.assert_close(reader.scores(step, layer, order, "dfs_tile", branch=branch),
                                               block_scores_ref(qo[None], ko[None], "dfs_tile", 4, BLOCK, scale))
                    wq, wk = reader.variance_ratios(step, layer, order, branch=branch)
                    torch.testing.assert_close(wq[0], dense_variance_ratio(qo, BLOCK))
                    torch.testing.assert_close(wk[0], dense_variance_ratio(ko, BLOCK))
                    for head in reader.heads:
                        blocks, att = reader.footprints(step, layer, order, head, branch=branch)
                        hi = reader.heads.index(head)
                        for s, u in enumerate(blocks.tolist()):
                            tokens = perm[u * BLOCK : (u + 1) * BLOCK]
                            want_fp = dense_footprint(q[hi : hi + 1], k[hi : hi + 1], tokens, scale)[0]
                            torch.testing.assert_close(att[s].double(), want_fp, atol=2e-6, rtol=2e-3)


def test_wan_capture_matches_brute_force_and_true_attention_inputs(tmp_path, model_dirs):
    cfg = _config(tmp_path, model_dirs["wan"], guidance_scale=3.0, branches="both", save_qkv=(0, 1),
                  methods=("meanpool", "dfs_tile", "antidiagonal", "oracle"))
    source = load_model_source(cfg)
    module = dict(source.transformer.named_modules())["blocks.0.attn1"]
    outputs = []
    handle = module.register_forward_hook(lambda mod, args, out: outputs.append(out.detach().clone()))
    try:
        result = run_capture(cfg, progress=False, source=source)
    finally:
        handle.remove()
    assert result.complete and result.steps == [0, 2]
    with MeasuredCapture(result.path) as reader:
        assert reader.steps == [0, 2] and reader.complete and reader.validate() == []
        assert reader.attrs["scheduler"] == "FlowMatchEulerDiscreteScheduler"
        assert reader.grid.name == "f3h8w8" and reader.branches == ["cond", "uncond"]
        _check_against_brute_force(reader, [0, 2], [0, 1], ["cond", "uncond"])
        # the recall curves of every method (meanpool's and the oracle's too) and branch: those of the stored maps
        assert_stored_curves_match_the_maps(reader)
        # stored q/k/v are what the layer attended with: rebuild its output (calls: step0 cond, step0 uncond, ...)
        for call, branch in ((0, "cond"), (1, "uncond"), (4, "cond")):
            step = 0 if call < 2 else 2
            q, k, v = (x.double() for x in reader.qkv(step, 0, branch=branch))
            att = torch.softmax(q @ k.transpose(-1, -2) * 32**-0.5, dim=-1) @ v
            rebuilt = module.to_out[0](att.transpose(1, 2).flatten(2).float())
            torch.testing.assert_close(rebuilt, outputs[call], atol=2e-5, rtol=1e-4)
        # the measures dfsviz.open adds: full budget keeps everything, recall 1 and density 1
        torch.testing.assert_close(reader.recall(2, 1, "raster", "dfs_tile", gamma=1.0), torch.ones(1, 2, dtype=torch.float64))
        torch.testing.assert_close(reader.density(2, 1, "hilbert3d", "meanpool", gamma=1.0), torch.ones(1, 2, dtype=torch.float64))
        low = reader.recall(2, 1, "hilbert3d", "meanpool", gamma=0.25)
        assert bool((low < 1).all()) and bool((low <= reader.oracle_recall(2, 1, "hilbert3d", 0.25) + 1e-12).all())
        # dfsviz.open serves the stored curves too: at k = 0.25 x 12 = 3 blocks, the recall of that top-k mask
        curve = reader.recall_curve(2, 1, "hilbert3d", "meanpool")
        torch.testing.assert_close(curve[..., 2].double(), low, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["cogvideox", "hunyuanvideo"])
def test_text_models_capture_with_their_layout(tmp_path, model_dirs, name):
    cfg = _config(tmp_path, model_dirs[name], num_steps=2, capture_steps=(1,), layers=(1,), save_qkv=(1,),
                  guidance_scale=2.0, footprints=1)
    result = run_capture(cfg, progress=False)
    with CaptureReader(result.path) as reader:
        grid = reader.grid
        if name == "cogvideox":
            assert reader.attrs["scheduler"] == "CogVideoXDDIMScheduler"
            assert grid.text_first and grid.text_len == 8 and grid.num_tokens == 200
        else:
            # random conditioning pads 16 text tokens, 12 real: padding dropped, so N = 192 + 12
            assert not grid.text_first and grid.text_len == 12 and grid.num_tokens == 204
        # text keeps its place in every order
        assert torch.equal(reader.perm("hilbert3d")[grid.text_slice], torch.arange(grid.num_tokens)[grid.text_slice])
        _check_against_brute_force(reader, [1], [1], ["cond"])


def test_default_capture_steps():
    assert default_capture_steps(50) == (0, 12, 24, 37, 49)
    assert default_capture_steps(3) == (0, 1, 2)


def test_existing_output_and_bad_model(tmp_path, model_dirs):
    out = tmp_path / "x.h5"
    out.write_bytes(b"")
    with pytest.raises(ValueError, match="exists; pass --overwrite"):
        run_capture(_config(tmp_path, model_dirs["wan"], name="x.h5"), progress=False)
    with pytest.raises(ValueError, match="unknown model 'nope': not a local diffusers directory.*WanTransformer3DModel"):
        run_capture(_config(tmp_path, "nope", name="y.h5"), progress=False)
    with pytest.raises(ValueError, match="needs text embeddings"):
        run_capture(_config(tmp_path, model_dirs["wan"], name="z.h5", embeddings=None), progress=False)
    with pytest.raises(ValueError, match="latent width = 15 must be a multiple of the patch size 2 of this wan model"):
        run_capture(_config(tmp_path, model_dirs["wan"], name="w.h5", latent="3x16x15"), progress=False)


def test_grid_mismatch_is_caught_at_the_first_layer(tmp_path, model_dirs):
    class OffByOneFrame(WanAdapter):
        def token_grid(self, config, latent, text_len=0):
            grid = super().token_grid(config, latent, text_len)
            return LatentGrid(grid.frames + 1, grid.height, grid.width)

    cfg = _config(tmp_path, model_dirs["wan"])
    source = load_model_source(cfg)
    source.adapter = OffByOneFrame()
    with pytest.raises(ValueError, match="blocks.0.attn1 attends over 192 tokens but the grid f4h8w8 has 256"):
        run_capture(cfg, progress=False, source=source)
    with CaptureReader(cfg.out) as reader:  # the failed run leaves a valid file, marked incomplete
        assert not reader.complete and reader.steps == []


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(block=96), r"`block` must be a power of two in \[16, 256\] \(got 96\)"),
        (dict(orders=("raster", "zigzag")), r"`orders` has unknown entries \['zigzag'\]"),
        (dict(methods=()), "`methods` must be a non-empty list"),
        (dict(num_steps=3, capture_steps=(0, 3)), r"`capture_steps` must lie in \[0, num_steps - 1\]"),
        (dict(branches="all"), "`branches` must be one of"),
        (dict(guidance_scale=0.5), "`guidance_scale` must be a number >= 1"),
        (dict(branches="both", guidance_scale=1.0), "needs an unconditional pass"),
        (dict(layers=(0,), save_qkv=(1,)), r"`save_qkv` layers \[1\] are not captured"),
        (dict(device="tpu"), "`device` must be 'auto', 'cpu', 'cuda' or 'cuda:N'"),
        (dict(dtype="int8"), "`dtype` must be 'auto' or one of"),
        (dict(overwrite=True, resume=True), "exclude each other"),
        (dict(footprints=-1), "`footprints` must be an integer >= 0"),
        (dict(latent="3x16"), "`latent` must look like FRAMESxHEIGHTxWIDTH in latent cells"),
        (dict(embeddings="missing.safetensors"), "`embeddings` must be a .safetensors file, 'random' or None"),
        (dict(layers=(1, 1)), "`layers` lists a value twice"),
        (dict(tile=3), r"`tile` must be a power of two in \[4, 128\]"),
        (dict(qkv_steps=(0,)), "`qkv_steps` needs `save_qkv`"),
        (dict(save_qkv=(0,), capture_steps=(0, 4), qkv_steps=(2,)), r"`qkv_steps` \[2\] are not captured steps"),
        (dict(qkv_dtype="bfloat16"), r"`qkv_dtype` must be one of \['auto', 'float16', 'float32'\]"),
    ],
)
def test_config_validation(kwargs, match):
    base = dict(out="x.h5", model="m")
    with pytest.raises((ValueError, TypeError), match=match):
        CaptureConfig(**{**base, **kwargs})


@pytest.mark.parametrize(
    ("qkv_dtype", "dtype", "stored"),
    [("auto", "float32", "float32"), ("auto", "float16", "float16"), ("float16", "float32", "float16"), ("float32", "bfloat16", "float32")],
)
def test_stored_qkv_dtype(qkv_dtype, dtype, stored):
    assert CaptureConfig(out="x.h5", model="m", qkv_dtype=qkv_dtype, dtype=dtype).stored_qkv_dtype == stored

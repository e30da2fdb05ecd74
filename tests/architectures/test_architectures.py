"""Every video transformer class of the installed diffusers, through the architecture registry:
capture leaves outputs bit-identical, `dfsviz capture` writes a valid file, DFSAttn at gamma 1
equals dense attention, permute-once equals per-call ordering at a real budget (or refuses
naming why), context parallelism and refused classes are one clear line. Tiny random-weight
models of the real diffusers classes (tests/tiny_models.py), on the CPU."""

from __future__ import annotations

import re
from pathlib import Path

import diffusers
import pytest
import torch
from click.testing import CliRunner

import dfsviz.cli.capture  # noqa: F401  (registers the command on the group)
from dfsviz.accel import DFSConfig, apply_dfsattn
from dfsviz.architectures import (
    ARCHITECTURES,
    PARALLEL_REFUSALS,
    UNSUPPORTED,
    architecture_for,
    models_markdown,
    support_rows,
    supported_classes,
)
from dfsviz.analysis.measured_capture import MeasuredCapture
from dfsviz.capture import CaptureReader
from dfsviz.capture.adapters import adapter_for
from dfsviz.capture.hooks import AttentionCapture
from dfsviz.cli import main
from dfsviz.sparse.schedule import DFSSchedule
from tiny_models import MODELS, WAN, build_class, latent_of

CLASSES = list(MODELS)
MODELS_DOC = Path(__file__).resolve().parents[2] / "docs" / "models.md"


def _video_transformer_classes() -> set[str]:
    """The video transformers of the installed diffusers: every exported 3D transformer model
    class, plus Cosmos 3 Omni (named without the suffix), minus the UNet's temporal layers."""
    import diffusers

    names = {n for n in dir(diffusers) if n.endswith("Transformer3DModel")}
    return names | {"Cosmos3OmniTransformer"}


@pytest.fixture(scope="module")
def tiny():
    """class name -> tiny model (seeded random weights, float32, eval)."""
    return {name: build_class(name) for name in CLASSES}


def _call(model, seed: int = 1):
    """Inputs of one transformer call through the registry: (adapter, run, grid), ``run()`` -> output."""
    adapter = adapter_for(model)
    gen = torch.Generator().manual_seed(seed)
    cond = adapter.random_conditioning(model.config, gen, 16)
    latent = latent_of(type(model).__name__)
    grid = adapter.token_grid(model.config, latent, adapter.text_len(cond))
    latents = adapter.make_latents(latent, model.config, gen, "cpu", torch.float32)
    t = torch.tensor([500.0])

    def run():
        with torch.no_grad():
            return adapter.forward(model, latents, t, cond, guidance=5.0, grid=grid)

    return adapter, run, grid


def _config(**schedule) -> DFSConfig:
    base = dict(num_steps=4, skip_steps=1, interval=1, gamma0=1.0, decrement=0.0, dense_layers=())
    return DFSConfig(block=16, tile=4, schedule=DFSSchedule(**{**base, **schedule}))


def test_every_video_transformer_class_has_an_entry_or_a_reason():
    described = set(supported_classes()) | {u.cls for u in UNSUPPORTED}
    assert _video_transformer_classes() - described == set()
    assert set(CLASSES) == set(supported_classes())  # a tiny model (and these tests) for every supported class


@pytest.mark.parametrize("name", CLASSES)
def test_capture_is_output_neutral_and_sees_every_self_attention(tiny, name):
    model = tiny[name]
    adapter, run, grid = _call(model)
    layers = adapter.select_layers(model)
    before = run()
    records = []
    with AttentionCapture(model, layers, records.append):
        during = run()
    assert torch.equal(before, during) and torch.equal(before, run())
    assert sorted({r.layer for r in records}) == list(range(len(layers)))
    for r in records:  # the real tokens of every captured self-attention are the grid's
        valid = adapter.valid_tokens(r.attn_mask, r.q.shape[2], 0)
        assert r.is_self_attention and (r.q.shape[2] if valid is None else len(valid)) == grid.num_tokens


@pytest.mark.parametrize("name", CLASSES)
def test_cli_capture_writes_a_valid_file(tmp_path, name):
    model = build_class(name, seed=3)
    model.save_pretrained(tmp_path / "model")
    out = tmp_path / "run.h5"
    latent = "x".join(map(str, latent_of(name)))
    result = CliRunner().invoke(main, [
        "capture", "--model", str(tmp_path / "model"), "--out", str(out), "--embeddings", "random", "--latent", latent,
        "--num-steps", "2", "--capture-steps", "1", "--guidance-scale", "1", "--orders", "raster,hilbert3d",
        "--methods", "dfs_tile", "--block", "16", "--tile", "4", "--footprints", "1", "--device", "cpu", "--quiet"])
    assert result.exit_code == 0, result.output
    with MeasuredCapture(out) as reader:
        assert reader.complete and reader.steps == [1]
        arch = architecture_for(name)
        assert reader.attrs["adapter"] == arch.name and reader.grid.num_video == 192
        assert reader.grid.text_first == (arch.text == "before" and reader.grid.text_len > 0)
        assert (reader.grid.text_len > 0) == (arch.text != "none")
        recall = reader.recall(1, 0, "hilbert3d", "dfs_tile", gamma=1.0)
        torch.testing.assert_close(recall, torch.ones_like(recall))


@pytest.mark.parametrize("name", CLASSES)
def test_dfsattn_at_full_budget_equals_dense(tiny, name):
    model = tiny[name]
    _, run, _ = _call(model)
    dense = run()
    with apply_dfsattn(model, _config()) as handle:
        warm = run()  # step 0: dense warm-up
        sparse = run()  # step 1: every block kept
    assert {r["step"] for r in handle.state.records} == {1} and {r["layer"] for r in handle.state.records} == set(
        handle.layers.values())
    assert all(r["density"] == 1.0 for r in handle.state.records)
    torch.testing.assert_close(warm, dense, atol=2e-5, rtol=0)
    torch.testing.assert_close(sparse, dense, atol=2e-5, rtol=0)
    assert torch.equal(run(), dense)  # removed: the stock model again


@pytest.mark.parametrize("name", CLASSES)
def test_fp8_dense_runs_every_call_in_fp8(tiny, name):
    """precision="fp8_dense" reaches every processor: the warm-up and the full-budget call move
    off dense attention, within FP8's documented error (docs/kernels.md: 0.048 max)."""
    model = tiny[name]
    _, run, _ = _call(model)
    dense = run()
    with apply_dfsattn(model, DFSConfig(**{**_config().__dict__, "precision": "fp8_dense", "backend": "ref"})):
        warm, sparse = run(), run()
    for out in (warm, sparse):
        assert 0 < (out - dense).abs().max().item() < 0.048


@pytest.mark.parametrize("name", CLASSES)
def test_permute_once_equals_per_call_at_a_real_budget_or_refuses(tiny, name):
    model = tiny[name]
    _, run, _ = _call(model)
    arch = architecture_for(name)
    config = _config(skip_steps=0, gamma0=0.3)
    if arch.permute_once is not None:
        with pytest.raises(ValueError, match=re.escape(f"permute_once for {name}: {arch.permute_once}")):
            apply_dfsattn(model, DFSConfig(**{**config.__dict__, "permute_once": True}))
        return
    outs, masks = [], []
    for once in (False, True):
        with apply_dfsattn(model, DFSConfig(**{**config.__dict__, "permute_once": once})) as handle:
            outs.append(run())
            masks.append({k: e.mask.to_dense() for k, e in handle.state.masks.items()})
    assert not torch.allclose(outs[0], run(), atol=1e-4)  # a real budget changes the output
    torch.testing.assert_close(outs[1], outs[0], atol=2e-5, rtol=0)
    assert masks[0].keys() == masks[1].keys() and all(torch.equal(masks[0][k], masks[1][k]) for k in masks[0])


def _per_token_timestep_inputs(name: str) -> dict:
    """A call whose timestep differs across tokens: LTX-Video's conditioned frames (a timestep per
    token, temb [B, N, 6C]) and Cosmos Video2World (a timestep per frame, expanded to [B, N, C])."""
    gen = torch.Generator().manual_seed(2)
    text = torch.randn(1, 8, 16, generator=gen)
    if name == "LTXVideoTransformer3DModel":
        return dict(hidden_states=torch.randn(1, 192, 8, generator=gen), encoder_hidden_states=text,
                    timestep=torch.rand(1, 192, generator=gen) * 1000, encoder_attention_mask=torch.ones(1, 8),
                    num_frames=3, height=8, width=8, return_dict=False)
    return dict(hidden_states=torch.randn(1, 4, 3, 16, 16, generator=gen), encoder_hidden_states=text,
                timestep=torch.rand(1, 1, 3, 1, 1, generator=gen) * 1000, return_dict=False)


@pytest.mark.parametrize("name", ["LTXVideoTransformer3DModel", "CosmosTransformer3DModel"])
def test_permute_once_reorders_per_token_timesteps(tiny, name):
    model, inputs = tiny[name], _per_token_timestep_inputs(name)
    outs = []
    for once in (False, True):
        with apply_dfsattn(model, DFSConfig(**{**_config(skip_steps=0, gamma0=0.3).__dict__, "permute_once": once})):
            with torch.no_grad():
                outs.append(model(**inputs)[0])
    torch.testing.assert_close(outs[1], outs[0], atol=2e-5, rtol=0)


@pytest.mark.parametrize("name", CLASSES)
def test_context_parallelism_runs_where_diffusers_has_a_plan_and_is_refused_elsewhere(tiny, name):
    """Ulysses attention in the docs' column exactly for the classes diffusers ships a `_cp_plan` for
    (the equivalence runs under torchrun in tests/accel/test_context_parallel.py); the others are refused."""
    import diffusers

    model = tiny[name]
    row = next(r for r in support_rows() if r["class"] == name)
    if type(model)._cp_plan is not None:
        assert row["context_parallel"] == "Ulysses"
        return
    assert row["context_parallel"] == PARALLEL_REFUSALS["no_plan"]
    # as enable_parallelism records it (a class without a plan gets one only from the caller)
    model._parallel_config = diffusers.ParallelConfig(
        context_parallel_config=diffusers.ContextParallelConfig(ulysses_degree=2))
    stock = [type(m.processor).__name__ for m in model.modules() if hasattr(m, "processor")]
    try:
        with pytest.raises(ValueError, match=re.escape(f"DFSAttn under context parallelism ({name}): "
                                                       f"{PARALLEL_REFUSALS['no_plan']}")):
            apply_dfsattn(model, _config())
    finally:
        del model._parallel_config
    assert [type(m.processor).__name__ for m in model.modules() if hasattr(m, "processor")] == stock


def test_a_flash_backend_is_refused_before_anything_is_installed(tiny):
    model = tiny["LTXVideoTransformer3DModel"]
    stock = {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")}
    model.transformer_blocks[0].attn1.processor._attention_backend = "flash"
    try:
        with pytest.raises(ValueError, match=r"layer transformer_blocks.0.attn1 runs the 'flash' attention backend, "
                                             r"which bypasses torch SDPA"):
            apply_dfsattn(model, _config())
    finally:
        model.transformer_blocks[0].attn1.processor._attention_backend = None
    assert all(m.processor is stock[n] for n, m in model.named_modules() if hasattr(m, "processor"))


def _helios(tmp_path) -> Path:
    """A saved tiny HeliosTransformer3DModel: a class the registry refuses, whose forward is the
    common diffusers call (so the generic entry can drive it)."""
    import diffusers

    torch.manual_seed(0)
    model = diffusers.HeliosTransformer3DModel(**{k: v for k, v in WAN.items() if k != "rope_max_seq_len"},
                                               rope_dim=(8, 12, 12))
    model.save_pretrained(tmp_path / "helios")
    return tmp_path / "helios"


_GENERIC = ["--embeddings", "random", "--num-steps", "1", "--guidance-scale", "1", "--orders", "raster",
            "--methods", "meanpool", "--block", "16", "--footprints", "0", "--layers", "0", "--device", "cpu", "--quiet"]


def test_generic_entry_captures_a_class_the_registry_refuses(tmp_path):
    helios = _helios(tmp_path)
    out = tmp_path / "g.h5"
    result = CliRunner().invoke(main, ["capture", "--model", str(helios), "--out", str(out), "--grid", "3x8x8",
                                       *_GENERIC])
    assert result.exit_code == 0, result.output
    with CaptureReader(out) as reader:
        assert reader.complete and reader.attrs["adapter"] == "generic" and reader.grid.name == "f3h8w8"
        assert reader.attrs["model_class"] == "HeliosTransformer3DModel"


@pytest.mark.parametrize(("args", "message"), [
    ((), "Error: unsupported architecture HeliosTransformer3DModel: denoises chunk by chunk with history latents "
         r"\(indices_\*, latents_history_\*\): no single latent grid; or pass --grid FxHxW"),
    (("--grid", "3x8x8", "--text-len", "4"), r"blocks.0.attn1 attends over 192 tokens but the grid f3h8w8t4 has 196"),
    (("--grid", "3x8x8", "--text-first"), r"`--text-first` needs text: pass --text-len N \(> 0\) with --text-first"),
    (("--grid", "3x8x8", "--latent", "3x16x16"), "`--grid` gives the token grid itself: drop --latent"),
    (("--text-len", "4"), r"`--text-len` and `--text-first` describe a `--grid`: pass --grid FxHxW with them"),
])
def test_generic_entry_bad_input_is_one_line_exit_2(tmp_path, args, message):
    helios = _helios(tmp_path)
    result = CliRunner().invoke(main, ["capture", "--model", str(helios), "--out", str(tmp_path / "x.h5"),
                                       *args, *_GENERIC])
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1 and re.search(message, result.output), result.output


def test_grid_of_a_registered_class_is_refused(tmp_path):
    build_class("AllegroTransformer3DModel").save_pretrained(tmp_path / "allegro")
    result = CliRunner().invoke(main, ["capture", "--model", str(tmp_path / "allegro"), "--out", str(tmp_path / "a.h5"),
                                       "--grid", "3x8x8", *_GENERIC])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert "`--grid` is for classes the registry does not describe; the grid of AllegroTransformer3DModel (Allegro) " \
           "follows from --frames/--height/--width or --latent: drop --grid" in result.output


@pytest.mark.parametrize("dry_run", [[], ["--dry-run"]], ids=["run", "dry-run"])
def test_grid_of_the_embedded_model_is_refused(tmp_path, dry_run):
    result = CliRunner().invoke(main, ["capture", "--out", str(tmp_path / "e.h5"), "--grid", "3x8x8", "--num-steps",
                                       "2", "--quiet", *dry_run])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert "`--grid` is for classes the registry does not describe; the grid of the embedded model" in result.output
    assert list(tmp_path.iterdir()) == []


def test_generic_without_grid_refuses_in_one_line_instead_of_an_empty_error(tmp_path):
    from dfsviz.capture import CaptureConfig, run_capture
    from dfsviz.capture.adapters import GenericAdapter
    from dfsviz.capture.sources import ModelSource

    import diffusers

    source = ModelSource(build_class("WanTransformer3DModel"), GenericAdapter(),
                         diffusers.FlowMatchEulerDiscreteScheduler(), "tiny")
    with pytest.raises(ValueError, match=r"the generic entry needs the token grid of this model: pass --grid FxHxW"):
        run_capture(CaptureConfig(out=str(tmp_path / "x.h5"), model="tiny", embeddings="random", device="cpu"),
                    progress=False, source=source)


def test_docs_models_table_is_the_registry():
    text = MODELS_DOC.read_text()
    start, end = "<!-- registry table: start -->", "<!-- registry table: end -->"
    assert text[text.index(start) + len(start):text.index(end)].strip() == models_markdown().strip(), (
        "docs/models.md is out of date: regenerate its table with dfsviz.architectures.models_markdown()")
    for arch in ARCHITECTURES:
        assert all(f"`{cls}`" in text for cls in arch.classes)


def test_registry_lookups_and_refusals_name_the_reason():
    assert architecture_for("SkyReelsV2Transformer3DModel").name == "wan"
    with pytest.raises(ValueError, match=r"unsupported architecture SanaVideoTransformer3DModel: its self-attention "
                                         r"is linear attention"):
        architecture_for("SanaVideoTransformer3DModel")
    with pytest.raises(ValueError, match=r"unsupported architecture Linear; supported: WanTransformer3DModel, "):
        architecture_for(torch.nn.Linear(2, 2))
    # a class looks up as its instances do
    assert architecture_for(diffusers.WanTransformer3DModel) is architecture_for("WanTransformer3DModel")
    with pytest.raises(ValueError, match=r"unsupported architecture LatteTransformer3DModel: factorised attention"):
        architecture_for(diffusers.LatteTransformer3DModel)
    rows = {r["class"]: r for r in support_rows()}
    assert rows["LatteTransformer3DModel"]["capture"].startswith("factorised attention")
    assert rows["MochiTransformer3DModel"]["dfsattn"] == "yes"

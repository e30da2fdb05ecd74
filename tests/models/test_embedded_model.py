"""The embedded model: config validation, the shipped weights, sampling, capture, training smoke run."""

import json
import math

import pytest
import torch

from dfsviz.models.config import PRESETS, EmbeddedModelConfig, get_preset
from dfsviz.models.sampler import (
    CLASS_EMBEDDINGS_FILE,
    MODEL_CARD_FILE,
    embedded_model_dir,
    encode_labels,
    frame_strip,
    load_embedded_model,
    sample_videos,
    save_embedded_model,
    video_to_uint8,
)
from dfsviz.models.train import (
    TrainConfig,
    attention_recall,
    build_transformer,
    capture_self_attention,
    train,
)
from dfsviz.models.videos import class_names

pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def shipped():
    return load_embedded_model()


# --- the shipped model -------------------------------------------------------------------------

def test_shipped_weights_load_through_from_pretrained(shipped):
    folder = embedded_model_dir()
    weights = folder / "diffusion_pytorch_model.safetensors"
    assert weights.stat().st_size <= 12 * 2**20
    assert (folder / CLASS_EMBEDDINGS_FILE).is_file()
    assert shipped.config == PRESETS["tiny-wan"]
    assert list(shipped.classes) == class_names()
    assert type(shipped.transformer).__name__ == "WanTransformer3DModel"
    assert all(p.dtype == torch.float32 for p in shipped.transformer.parameters())
    assert shipped.class_embeddings.shape == (len(class_names()) + 1, shipped.config.text_len,
                                              shipped.config.text_dim)
    f, h, w = shipped.config.token_grid
    # Non-trivial for 128-token blocks: N >= 4096 and at least 32 key blocks.
    assert f * h * w >= 4096 and math.ceil(f * h * w / 128) >= 32
    card = json.loads((folder / MODEL_CARD_FILE).read_text())
    assert card["token_grid"] == [f, h, w]


def test_shipped_model_card_records_learning():
    card = json.loads((embedded_model_dir() / MODEL_CARD_FILE).read_text())
    training = card["training"]
    assert training["steps"] > 0
    assert training["heldout_loss_trained"] <= 0.5 * training["heldout_loss_untrained"]


def test_one_sampling_step_is_finite_and_deterministic(shipped):
    seen = []
    a = sample_videos(shipped, [0], num_steps=1, seed=3, callback_on_step_begin=seen.append,
                      callback_on_step_end=seen.append)
    b = sample_videos(shipped, ["red_disc_translate"], num_steps=1, seed=3)
    assert a.shape == (1, *shipped.config.video_shape)
    assert torch.isfinite(a).all()
    assert torch.equal(a, b)
    begin, end = seen
    assert (begin.index, begin.num_steps, begin.sigma, begin.sigma_next) == (0, 1, 1.0, 0.0)
    assert begin.velocity is None and begin.next_latents is None
    assert end.velocity.shape == a.shape
    # One Euler step from sigma 1 to 0: x0 = x1 + (0 - 1) * v.
    torch.testing.assert_close(end.next_latents, end.latents - end.velocity)
    torch.testing.assert_close(a, end.next_latents.clamp(-1, 1))


# --- config ------------------------------------------------------------------------------------

def test_config_derived_shapes():
    cfg = EmbeddedModelConfig(frames=5, height=20, width=36)
    assert cfg.token_grid == (5, 10, 18)
    assert cfg.num_tokens == 900
    assert cfg.latent_grid().name == "f5h10w18"
    assert EmbeddedModelConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(name="a b"), r"`name` must be non-empty letters"),
        (dict(frames=0), r"`frames` must be a positive integer"),
        (dict(height=35), r"`height` must be an even number of pixels >= 8"),
        (dict(width=6), r"`width` must be an even number of pixels >= 8"),
        (dict(head_dim=5), r"`head_dim` must be even and >= 6"),
        (dict(freq_dim=33), r"`freq_dim` must be even"),
        (dict(rope_max_seq_len=16), r"`rope_max_seq_len` must be >= the longest token axis 32"),
        (dict(max_objects=9), r"`max_objects` must lie in \[min_objects=2, 8\]"),
        (dict(min_objects=0), r"`min_objects` must be a positive integer"),
        (dict(shift=0.0), r"`shift` must be a number > 0"),
        (dict(num_layers=True), r"`num_layers` must be a positive integer"),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EmbeddedModelConfig(**kwargs)


def test_config_lookup_errors():
    with pytest.raises(ValueError, match=r"unknown embedded-model preset 'big'"):
        get_preset("big")
    with pytest.raises(ValueError, match=r"unknown embedded-model config keys \['colour'\]"):
        EmbeddedModelConfig.from_dict({"colour": 1})
    with pytest.raises(TypeError, match=r"`data` must be a dict"):
        EmbeddedModelConfig.from_dict([1])


# --- save / load / sampling arguments on the smoke size -------------------------------------------

@pytest.fixture(scope="module")
def smoke_model(tmp_path_factory):
    cfg = get_preset("smoke")
    folder = tmp_path_factory.mktemp("smoke")
    emb = torch.randn(cfg.num_classes + 1, cfg.text_len, cfg.text_dim)
    save_embedded_model(build_transformer(cfg, 0), emb, cfg, folder, training={"steps": 0})
    return load_embedded_model(folder)


def test_build_transformer_is_seeded():
    cfg = get_preset("smoke")
    a, b, c = build_transformer(cfg, 1), build_transformer(cfg, 1), build_transformer(cfg, 2)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_save_load_round_trip(smoke_model, tmp_path):
    cfg = smoke_model.config
    assert cfg == get_preset("smoke")
    assert smoke_model.card["training"] == {"steps": 0}
    # float16 storage: the reloaded weights are the float16 rounding of the originals.
    fresh = build_transformer(cfg, 0).state_dict()
    for name, value in smoke_model.transformer.state_dict().items():
        torch.testing.assert_close(value, fresh[name].half().float(), rtol=0, atol=0)
    cond = encode_labels(smoke_model, [1, "green_square_orbit", cfg.num_classes])
    assert cond.shape == (3, cfg.text_len, cfg.text_dim)
    torch.testing.assert_close(cond[0], cond[1])


def test_sampling_depends_on_seed_and_class(smoke_model):
    a = sample_videos(smoke_model, [0], num_steps=2, seed=0)
    assert not torch.equal(a, sample_videos(smoke_model, [0], num_steps=2, seed=1))
    assert not torch.equal(a, sample_videos(smoke_model, [5], num_steps=2, seed=0))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model_samples_the_float32_clip_within_its_rounding(smoke_model, tmp_path, dtype):
    folder = tmp_path / "m"
    save_embedded_model(smoke_model.transformer, smoke_model.class_embeddings, smoke_model.config, folder,
                        training={"steps": 0})
    half = load_embedded_model(folder, dtype=dtype)
    assert half.dtype == dtype and half.class_embeddings.dtype == torch.float32
    a = sample_videos(smoke_model, [0, 1], num_steps=3, seed=0, guidance_scale=2.0)
    b = sample_videos(half, [0, 1], num_steps=3, seed=0, guidance_scale=2.0)
    assert b.dtype == torch.float32 and not torch.equal(a, b)
    torch.testing.assert_close(b, a, rtol=0, atol=0.1)


def test_load_rejects_other_dtypes(smoke_model):
    with pytest.raises(ValueError, match=r"`dtype` must be one of .*float32.*got torch.float64"):
        load_embedded_model(dtype=torch.float64)


def test_guided_sampling_runs_the_null_class(smoke_model):
    calls = []
    handle = smoke_model.transformer.register_forward_pre_hook(lambda mod, args: calls.append(args[0].shape[0]))
    try:
        out = sample_videos(smoke_model, [0, 1], num_steps=3, seed=0, guidance_scale=2.5)
    finally:
        handle.remove()
    assert calls == [4, 4, 4]
    assert out.shape == (2, *smoke_model.config.video_shape) and torch.isfinite(out).all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_steps=0), r"`num_steps` must be an integer >= 1"),
        (dict(seed=-1), r"`seed` must be an integer >= 0"),
        (dict(guidance_scale=0.5), r"`guidance_scale` must be a number >= 1"),
        (dict(shift=-1.0), r"`shift` must be a number > 0 or None"),
        (dict(labels=["purple_blob"]), r"unknown class name 'purple_blob'"),
        (dict(labels=[99]), r"class labels must be integers in \[0, 8\]"),
        (dict(labels=[]), r"`labels` must hold at least one class label"),
    ],
)
def test_sample_videos_rejects_bad_input(smoke_model, kwargs, match):
    args = dict(labels=[0])
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        sample_videos(smoke_model, **args)


def test_sample_videos_rejects_a_bare_label(smoke_model):
    with pytest.raises(TypeError, match=r"`labels` must be a sequence"):
        sample_videos(smoke_model, 0)


def test_load_rejects_other_folders(tmp_path, smoke_model):
    with pytest.raises(ValueError, match=r"must be an embedded-model folder holding dfsviz_model.json"):
        load_embedded_model(tmp_path)
    card = dict(smoke_model.card, format_version=99)
    (tmp_path / MODEL_CARD_FILE).write_text(json.dumps(card))
    with pytest.raises(ValueError, match=r"this dfsviz reads 'dfsviz-embedded-model' version 1"):
        load_embedded_model(tmp_path)


def test_save_rejects_wrong_embeddings(tmp_path):
    cfg = get_preset("smoke")
    with pytest.raises(ValueError, match=r"`class_embeddings` must have shape \(9, 2, 16\)"):
        save_embedded_model(build_transformer(cfg, 0), torch.zeros(8, 2, 16), cfg, tmp_path)


def test_frame_strip_layout():
    video = torch.linspace(-1, 1, 2 * 3 * 4 * 5 * 6).view(2, 3, 4, 5, 6)
    strip = frame_strip(video, gap=1, scale=2)
    assert strip.shape == (2 * (2 * 5 + 1), 2 * (4 * 6 + 3), 3) and strip.dtype == torch.uint8
    frames = video_to_uint8(video)                                                 # [2, 4, 5, 6, 3]
    assert torch.equal(strip[0:10:2, 0:12:2], frames[0, 0])
    assert torch.equal(strip[12:22:2, 3 * 14:3 * 14 + 12:2], frames[1, 3])
    assert (strip[10:12] == 255).all()
    with pytest.raises(ValueError, match=r"`scale` must be an integer >= 1"):
        frame_strip(video, scale=0)
    with pytest.raises(ValueError, match=r"`videos` must be \[R, 3, F, H, W\]"):
        frame_strip(video[0])


# --- attention capture ---------------------------------------------------------

def test_capture_records_self_attention_and_restores(smoke_model):
    cfg = smoke_model.config
    model = smoke_model.transformer
    x = torch.randn(2, *cfg.video_shape)
    ts = torch.tensor([300.0, 700.0])
    cond = encode_labels(smoke_model, [0, 1])
    original = torch.nn.functional.scaled_dot_product_attention
    with torch.no_grad():
        plain = model(x, ts, cond, return_dict=False)[0]
        with capture_self_attention(model) as records:
            captured = model(x, ts, cond, return_dict=False)[0]
    assert torch.nn.functional.scaled_dot_product_attention is original
    assert torch.equal(plain, captured)
    assert sorted(records) == list(range(cfg.num_layers))
    q, k, _ = records[0][0]
    assert q.shape == k.shape == (2, cfg.num_heads, cfg.num_tokens, cfg.head_dim)


# --- training smoke run ------------------------------------------------------------------------

def test_train_smoke_run_writes_a_loadable_model(tmp_path):
    tcfg = TrainConfig(preset="smoke", minutes=1.0, max_steps=3, batch_size=2, eval_clips=2, recall_clips=1,
                       recall_sigmas=(0.5,), log_every=1)
    results = train(tcfg, tmp_path / "m", device="cpu", results_path=tmp_path / "r.json")
    assert results["train"]["steps"] == 3
    assert [e["step"] for e in results["loss_curve"]] == [1, 2, 3]
    assert all(math.isfinite(e["loss"]) for e in results["loss_curve"])
    assert json.loads((tmp_path / "r.json").read_text())["model"] == "smoke"
    # The saved (float16) model reproduces the evaluated EMA loss closely.
    trained = results["trained"]
    assert abs(trained["heldout_loss_reloaded"] - trained["heldout_loss"]) < 1e-2 * trained["heldout_loss"]
    assert 0 < results["untrained"]["recall"]["gamma_0.1"]["mean"] <= 1
    model = load_embedded_model(tmp_path / "m")
    assert model.card["training"]["steps"] == 3


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(preset="huge"), r"unknown embedded-model preset"),
        (dict(minutes=0), r"`minutes` must be a number > 0"),
        (dict(max_steps=0), r"`max_steps` must be an integer >= 1 or None"),
        (dict(batch_size=0), r"`batch_size` must be an integer >= 1"),
        (dict(ema_decay=1.0), r"`ema_decay` must lie in \[0, 1\)"),
        (dict(seed=2**31), r"`seed` must be an integer in \[0, 2\*\*31\)"),
        (dict(recall_clips=100), r"`recall_clips` must be <= eval_clips=64"),
        (dict(recall_sigmas=(1.0,)), r"`recall_sigmas` must be a non-empty tuple"),
        (dict(gammas=()), r"`gammas` must be a non-empty tuple"),
        (dict(block=100), r"`block` must be a power of two in \[16, 256\] \(got 100\); DFSAttn uses 128"),
    ],
)
def test_train_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


def test_attention_recall_refuses_a_block_size_before_running_the_model():
    with pytest.raises(ValueError, match=r"`block` must be a power of two in \[16, 256\] \(got 100\); DFSAttn uses 128"):
        attention_recall(torch.nn.Identity(), torch.zeros(1), {}, clips=1, sigmas=(0.5,), gammas=(0.1,), block=100)


def test_strip_cli_writes_one_png_per_class(smoke_model, tmp_path, capsys):
    from PIL import Image

    from dfsviz.models import sampler

    folder = tmp_path / "model"
    save_embedded_model(smoke_model.transformer, smoke_model.class_embeddings, smoke_model.config, folder)
    sampler.main(["--model", str(folder), "--out-dir", str(tmp_path / "img"), "--steps", "1", "--seeds", "0",
                  "--device", "cpu"])
    written = sorted((tmp_path / "img").glob("embedded_*.png"))
    assert [p.name for p in written] == sorted(f"embedded_{smoke_model.config.name}_{n}.png" for n in class_names())
    cfg = smoke_model.config
    with Image.open(written[0]) as image:
        # Two rows (a training clip, one sample), gap 2, scale 2.
        assert image.size == (2 * (cfg.frames * (cfg.width + 2) - 2), 2 * (2 * (cfg.height + 2) - 2))
    assert str(written[0]) in capsys.readouterr().out


def test_train_cli_smoke(tmp_path, capsys):
    from dfsviz.models import train as train_module

    train_module.main(["--out", str(tmp_path / "m"), "--preset", "smoke", "--steps", "1", "--batch-size", "1",
                       "--eval-clips", "1", "--recall-clips", "1", "--device", "cpu"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["model"] == "smoke" and printed["weights_bytes"] > 0
    assert (tmp_path / "m" / "training_log.json").is_file()

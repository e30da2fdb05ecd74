"""The medium-wan recipe: its grid and size, richer clips (camera pan) that leave the tiny model's
clips as they were, per-preset training settings, mixed precision (bfloat16 autocast, flash
attention) exercised on the CPU; the shipped medium model and how captures name it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dfsviz.models.config import EmbeddedModelConfig, get_preset
from dfsviz.models.sampler import MODEL_CARD_FILE, embedded_model_dir, embedded_model_name, load_embedded_model
from dfsviz.models.train import TrainConfig, build_transformer, flow_matching_loss, train
from dfsviz.models.videos import make_videos
from git_reference import module_at_commit  # tests/ is on sys.path

pytest.importorskip("diffusers")

# videos.py before the camera pan (issue 20): the shipped tiny model was trained on its clips.
_TINY_CLIPS_COMMIT = "c20c45f"


def test_medium_preset_grid_and_weights():
    cfg = get_preset("medium-wan")
    assert cfg.token_grid == (21, 30, 52)                       # Wan2.1 480p: 81 frames, 480 x 832 pixels
    assert cfg.video_shape == (3, 21, 60, 104)
    assert -(-cfg.num_tokens // 128) == 256 >= 200
    params = sum(p.numel() for p in build_transformer(cfg, 0).parameters())
    assert 2 * params <= 60e6, params                           # float16 weights within 60 MB
    assert cfg.head_dim in (64, 128)                            # what the Triton kernels take
    assert cfg.min_objects >= 3 and cfg.camera_pan > 0


@pytest.fixture(scope="module")
def videos_before_the_pan():
    return module_at_commit("dfsviz/models/videos.py", _TINY_CLIPS_COMMIT, "dfsviz_videos_reference")


@pytest.mark.parametrize("seed", [0, 7, 2**40 + 3])
def test_tiny_clips_are_unchanged(videos_before_the_pan, seed):
    """The tiny preset's clips (training and held-out seeds) are bit for bit those it was trained on."""
    cfg = get_preset("tiny-wan")
    assert cfg.camera_pan == 0
    labels = list(range(8))
    old = videos_before_the_pan.make_videos(labels, frames=cfg.frames, height=cfg.height, width=cfg.width, seed=seed,
                                            min_objects=cfg.min_objects, max_objects=cfg.max_objects)
    assert torch.equal(make_videos(labels, seed=seed, **cfg.clip_kwargs()), old)


def test_tiny_preset_config_is_the_shipped_one():
    card = json.loads((Path(__file__).resolve().parents[2] / "dfsviz/data/models/tiny-wan/dfsviz_model.json").read_text())
    assert EmbeddedModelConfig.from_dict(card["config"]) == get_preset("tiny-wan")


def test_camera_pan_moves_the_whole_scene():
    """The pan is drawn after everything else: the middle frame (zero camera offset) is the still
    camera's, the others are not; a panned clip is still deterministic."""
    size = dict(frames=5, height=24, width=40, seed=3, min_objects=3, max_objects=3)
    still = make_videos([0, 5], **size)
    panned = make_videos([0, 5], camera_pan=0.08, **size)
    assert torch.equal(panned[:, :, 2], still[:, :, 2])
    for t in (0, 1, 3, 4):
        assert (panned[:, :, t] - still[:, :, t]).abs().amax() > 0.3
    assert torch.equal(panned, make_videos([0, 5], camera_pan=0.08, **size))
    # the background moves too: with no object drawn, frame 0 still differs
    empty = dict(size, min_objects=1, max_objects=1)
    assert (make_videos([3], camera_pan=0.08, **empty)[:, :, 0] - make_videos([3], **empty)[:, :, 0]).abs().amax() > 0.1


@pytest.mark.parametrize("pan", [-0.01, 0.2, True, "0.02"])
def test_camera_pan_is_validated(pan):
    with pytest.raises(ValueError, match=r"`camera_pan` must be a speed in \[0, 0.1\] frame heights per frame"):
        make_videos([0], frames=2, height=8, width=8, seed=0, camera_pan=pan)
    with pytest.raises(ValueError, match=r"`camera_pan` must be a speed in \[0, 0.1\]"):
        EmbeddedModelConfig(camera_pan=pan)


def test_training_settings_per_preset():
    medium = TrainConfig.for_preset("medium-wan")
    assert (medium.batch_size, medium.eval_clips, medium.recall_clips) == (8, 16, 2)
    assert TrainConfig.for_preset("medium-wan", batch_size=4).batch_size == 4
    assert TrainConfig.for_preset("tiny-wan") == TrainConfig()       # the shipped model's recipe is unchanged
    with pytest.raises(TypeError, match=r"`mixed_precision` must be True, False or None \(got str\)"):
        TrainConfig(mixed_precision="yes")


def test_mixed_precision_attention_is_bfloat16_and_flash_ready(monkeypatch):
    """Under the training step's autocast every self-attention call gets bfloat16 Q/K/V and no mask
    (what flash attention takes), and forward and backward run with the math kernel excluded."""
    from dfsviz.models import train as train_module

    cfg = get_preset("smoke")
    model = build_transformer(cfg, 0)
    calls = []
    original = torch.nn.functional.scaled_dot_product_attention

    def spy(query, key, value, attn_mask=None, *args, **kwargs):
        calls.append((query.dtype, key.dtype, value.dtype, attn_mask))
        return original(query, key, value, attn_mask, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    x0 = make_videos([0, 1], seed=0, **cfg.clip_kwargs())
    cond = torch.randn(2, cfg.text_len, cfg.text_dim)
    with torch.autocast("cpu", dtype=torch.bfloat16), train_module._attention_kernels(True):
        loss = flow_matching_loss(model, cond, x0, torch.randn_like(x0), torch.tensor([0.3, 0.8]))
    loss.backward()
    self_attention = calls[::2]                                        # attn1, attn2 alternate per block
    assert len(calls) == 2 * cfg.num_layers
    assert all(c[:3] == (torch.bfloat16,) * 3 and c[3] is None for c in self_attention)
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_mixed_precision_smoke_run_on_cpu(tmp_path):
    """The medium recipe's training path (bfloat16 autocast, restricted attention kernels) end to end
    on the smoke preset: a few steps, a loadable model."""
    tcfg = TrainConfig.for_preset("smoke", minutes=1.0, max_steps=2, batch_size=2, eval_clips=2, recall_clips=1,
                                  recall_sigmas=(0.5,), log_every=1, mixed_precision=True)
    results = train(tcfg, tmp_path / "m", device="cpu")
    assert results["train"]["steps"] == 2 and results["train"]["train_config"]["mixed_precision"] is True
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in results["loss_curve"])


# --- the shipped medium model -------------------------------------------------------------------

def test_the_shipped_medium_model_loads_and_learned():
    folder = embedded_model_dir("medium")
    assert folder == embedded_model_dir("medium-wan") and folder.name == "medium-wan"
    model = load_embedded_model(folder)
    assert model.config == get_preset("medium-wan")
    assert (folder / "diffusion_pytorch_model.safetensors").stat().st_size <= 60e6
    card = json.loads((folder / MODEL_CARD_FILE).read_text())
    assert card["token_grid"] == [21, 30, 52]
    training = card["training"]
    assert training["heldout_loss_trained"] <= 0.2 * training["heldout_loss_untrained"]
    log = json.loads((folder / "training_log.json").read_text())
    recall = log["trained"]["recall"]["gamma_0.1"]["mean"], log["untrained"]["recall"]["gamma_0.1"]["mean"]
    assert recall[0] >= 2 * recall[1], recall


@pytest.mark.parametrize("model, name", [(None, "tiny"), ("dfsviz-embedded:medium", "medium"),
                                         ("dfsviz-embedded:medium-wan", "medium-wan"), ("Wan-AI/x", None),
                                         ("/models/wan", None)])
def test_embedded_model_ids(model, name):
    assert embedded_model_name(model) == name


def test_an_unknown_embedded_model_is_refused():
    with pytest.raises(ValueError, match=r"unknown embedded model 'huge'; choose one of \['medium', 'tiny'\] "
                                         r"\(e\.g\. --model dfsviz-embedded:medium\)"):
        embedded_model_dir("huge")


def test_capture_resolves_the_medium_model():
    from dfsviz.capture.config import CaptureConfig
    from dfsviz.capture.sources import load_model_source

    source = load_model_source(CaptureConfig(model="dfsviz-embedded:medium", out="unused.h5"))
    assert source.model_id == "dfsviz-embedded:medium-wan"
    assert source.default_size == (21, 60, 104)
    assert sum(p.numel() for p in source.transformer.parameters()) == 5_095_884

"""The dashboard tests' captures, importable by test modules (pytest's conftest is not: with
tests/app and tests/capture in one pytest call, ``import conftest`` finds whichever folder's
conftest was loaded last): the tiny Wan model saved to disk, a real capture of it, and a
recorded pipeline call with DFSAttn active."""

from __future__ import annotations

from pathlib import Path

import torch
from tiny_models import WAN

# Tiny Wan transformer (tiny_models.WAN, random weights): latent 4x32x32 with 1x2x2 patches
# gives a 4x16x16 token grid (N = 1024), 16 blocks of 64 tokens.
CAPTURE = dict(embeddings="random", num_steps=4, capture_steps=(0, 2, 3), latent="4x32x32", block=64, tile=16,
               stride=8, footprints=3, save_qkv=(1,), device="cpu", methods=("meanpool", "dfs_tile", "antidiagonal"))


def make_capture(out: Path, model_dir: Path, **overrides) -> Path:
    """Run a real capture of the tiny model into ``out`` and return the path."""
    from dfsviz.capture import CaptureConfig, run_capture

    cfg = CaptureConfig(out=str(out), model=str(model_dir), **{**CAPTURE, **overrides})
    run_capture(cfg, progress=False)
    return out


def record_dfsattn(out: Path, *, steps: int = 4, skip: int = 1, interval: int = 2, gamma0: float = 0.4,
                   seed: int = 1) -> Path:
    """Record a tiny Wan pipeline call (tiny_models.wan_pipeline: 9 frames of 128 x 128 pixels,
    token grid 3 x 8 x 8, 12 blocks of 16 tokens) with DFSAttn active into ``out``: every step
    captured, DFSAttn's masks stored (dense warm-up of ``skip`` steps, a refresh every
    ``interval`` steps, the cached mask in between; layer 0 dense)."""
    import dfsviz
    from dfsviz.sparse.schedule import DFSSchedule
    from tiny_models import build_tiny, wan_pipeline

    pipe = wan_pipeline(build_tiny("wan", seed=seed))
    pipe.set_progress_bar_config(disable=True)
    schedule = DFSSchedule(num_steps=steps, skip_steps=skip, interval=interval, gamma0=gamma0, decrement=0.1,
                           dense_layers=(0,), calls_per_step=2)

    def embeds(s):
        return torch.randn(1, 6, 16, generator=torch.Generator().manual_seed(s))

    with dfsviz.apply_dfsattn(pipe, dfsviz.DFSConfig(block=16, tile=4, schedule=schedule)):
        with dfsviz.record(pipe, out, block=16, footprints=2, seed=seed, methods=("meanpool", "dfs_tile")):
            pipe(prompt_embeds=embeds(10), negative_prompt_embeds=embeds(11), height=128, width=128, num_frames=9,
                 num_inference_steps=steps, guidance_scale=4.0, output_type="np",
                 generator=torch.Generator().manual_seed(seed))
    return out


def save_tiny_wan(folder: Path) -> Path:
    import diffusers

    torch.manual_seed(7)
    diffusers.WanTransformer3DModel(**WAN).eval().save_pretrained(folder)
    return folder

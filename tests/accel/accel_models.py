"""Tiny random-weight Wan, HunyuanVideo and CogVideoX transformers (real diffusers classes) and
one input per architecture. Blocks of 16 tokens so that 200-token sequences have 12-13 blocks."""

from __future__ import annotations

import torch

from dfsviz.accel.plan import CalibratedPlan, LayerBudget, ModelIdentity, public_config
from dfsviz.sparse.grid import LatentGrid
from dfsviz.sparse.select import topk_count
from tiny_models import CONFIGS

ARCHS = list(CONFIGS)
GRID = LatentGrid(3, 8, 8)  # the tiny models' latent (Wan 3 x 16 x 16 with patch (1, 2, 2)): 192 tokens


def make_inputs(arch: str, batch: int = 1, seed: int = 1, valid_text: int = 6) -> dict:
    """Keyword inputs of one transformer call: latent 3 x 16 x 16 (192 video tokens), 8 text tokens.

    HunyuanVideo: the last 8 - valid_text text tokens are padding (masked)."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(batch, 8, 16, generator=g)
    t = torch.full((batch,), 500)
    if arch == "wan":
        return dict(hidden_states=torch.randn(batch, 4, 3, 16, 16, generator=g), timestep=t,
                    encoder_hidden_states=text, return_dict=False)
    if arch == "hunyuanvideo":
        mask = torch.zeros(batch, 8, dtype=torch.int64)
        mask[:, :valid_text] = 1
        return dict(hidden_states=torch.randn(batch, 4, 3, 16, 16, generator=g), timestep=t,
                    encoder_hidden_states=text, encoder_attention_mask=mask,
                    pooled_projections=torch.randn(batch, 8, generator=g),
                    guidance=torch.full((batch,), 6000.0), return_dict=False)
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    rot = get_3d_rotary_pos_embed(embed_dim=32, crops_coords=((0, 0), (8, 8)), grid_size=(8, 8), temporal_size=3)
    return dict(hidden_states=torch.randn(batch, 3, 4, 16, 16, generator=g), encoder_hidden_states=text,
                timestep=t, image_rotary_emb=rot, return_dict=False)


def make_plan(model, gammas: dict, *, grid=GRID, num_steps=4, warmup=1, interval=1, cls=None,
              config=None) -> CalibratedPlan:
    """A calibrated plan for ``model`` with blocks of 16: layer -> per-head budgets (None: dense head)."""
    layers = []
    num_blocks = -(-grid.num_tokens // 16)
    for layer, gs in gammas.items():
        kept = tuple(num_blocks if g is None else topk_count(g, num_blocks) for g in gs)
        layers.append(LayerBudget(layer, f"blocks.{layer}.attn1", tuple(gs), kept, (0.9,) * len(gs), (0.5,) * len(gs)))
    identity = ModelIdentity("tiny-wan", cls or type(model).__name__, "wan",
                             public_config(model.config) if config is None else config)
    return CalibratedPlan(identity, grid, 16, "hilbert3d", "dfs_tile", 4, num_steps, warmup, interval, tuple(layers))

"""The tiny Wan pipeline's denoising loop written out by hand, for recording a transformer in
one's own loop (``dfsviz.record(transformer, out, scheduler=...)``) without a pipeline: its noise,
schedule and CFG as two transformer calls per step, as ``WanPipeline`` runs them."""

from __future__ import annotations

import torch

#: latent [C, F, H, W] of 9 frames of 64 x 64 pixels: token grid 3 x 4 x 4 (48 tokens)
LATENT = (4, 3, 8, 8)


def embeds(seed: int, text_len: int = 6, dim: int = 16) -> torch.Tensor:
    return torch.randn(1, text_len, dim, generator=torch.Generator().manual_seed(seed))


def wan_loop(transformer, scheduler, steps: int, cond: torch.Tensor, uncond: torch.Tensor, guidance: float,
             seed: int = 1) -> torch.Tensor:
    """Denoise ``steps`` steps from the seeded noise; the final latents."""
    device = next(transformer.parameters()).device
    scheduler.set_timesteps(steps, device=device)
    latents = torch.randn(1, *LATENT, generator=torch.Generator().manual_seed(seed)).to(device)
    dtype = next(transformer.parameters()).dtype
    cond, uncond = cond.to(device, dtype), uncond.to(device, dtype)
    for t in scheduler.timesteps:
        x, timestep = latents.to(dtype), t.expand(1)
        noise_cond = transformer(hidden_states=x, timestep=timestep, encoder_hidden_states=cond, return_dict=False)[0]
        noise_uncond = transformer(hidden_states=x, timestep=timestep, encoder_hidden_states=uncond, return_dict=False)[0]
        noise = noise_uncond + guidance * (noise_cond - noise_uncond)
        latents = scheduler.step(noise, t, latents, return_dict=False)[0]
    return latents


def dfsattn_config(steps: int, **options):
    """DFSAttn for the tiny Wan's loop: step 0 dense, the later steps refresh at gamma 0.5 (2 of
    its 3 key blocks of 16 tokens); layer 0 stays dense; two transformer calls per step (CFG)."""
    import dfsviz
    from dfsviz.sparse.schedule import DFSSchedule

    schedule = DFSSchedule(num_steps=steps, skip_steps=1, interval=1, gamma0=0.5, decrement=0.0, dense_layers=(0,),
                           calls_per_step=2)
    return dfsviz.DFSConfig(block=16, tile=4, schedule=schedule, **options)

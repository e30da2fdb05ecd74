"""Brute-force float64 recomputation of what a capture stores, straight from theory.md
(dense N x N softmax; only for the small N of tests)."""

from __future__ import annotations

import math

import torch


def dense_block_stats(q: torch.Tensor, k: torch.Tensor, block: int, scale: float) -> dict[str, torch.Tensor]:
    """m, L, r, J float64 [H, M, M] of ordered q, k [H, N, D] by the definitions of theory.md."""
    q, k = q.double(), k.double()
    h, n, _ = q.shape
    logits = q @ k.transpose(-1, -2) * scale
    att = torch.softmax(logits, dim=-1)
    nb = math.ceil(n / block)
    out = {name: torch.zeros(h, nb, nb, dtype=torch.float64) for name in ("m", "L", "r", "J")}
    for u in range(nb):
        rows = slice(u * block, min(n, (u + 1) * block))
        for v in range(nb):
            cols = slice(v * block, min(n, (v + 1) * block))
            lg = logits[:, rows, cols]  # [H, |U|, |V|]
            out["m"][:, u, v] = att[:, rows, cols].sum(dim=(1, 2)) / lg.shape[1]
            pooled = lg.mean(dim=(1, 2))
            row_mean = lg.mean(dim=2)  # Lbar_iv
            out["L"][:, u, v] = pooled
            out["r"][:, u, v] = (row_mean - pooled[:, None]).abs().amax(dim=1)
            jensen = torch.log(torch.exp(lg - row_mean[..., None]).mean(dim=2))
            out["J"][:, u, v] = jensen.amax(dim=1)
    return out


def dense_variance_ratio(x: torch.Tensor, block: int) -> torch.Tensor:
    """W of ordered x [H, N, D], float64 [H]."""
    x = x.double()
    n = x.shape[1]
    within = sum(
        ((x[:, s : s + block] - x[:, s : s + block].mean(dim=1, keepdim=True)) ** 2).sum(dim=(1, 2))
        for s in range(0, n, block)
    )
    total = ((x - x.mean(dim=1, keepdim=True)) ** 2).sum(dim=(1, 2))
    return within / total


def dense_footprint(q: torch.Tensor, k: torch.Tensor, tokens: torch.Tensor, scale: float) -> torch.Tensor:
    """Mean attention of query tokens ``tokens`` (original positions) over all keys: float64 [N] per head [H, N]."""
    att = torch.softmax(q.double()[:, tokens] @ k.double().transpose(-1, -2) * scale, dim=-1)
    return att.mean(dim=1)

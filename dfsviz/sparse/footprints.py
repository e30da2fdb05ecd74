"""Token-level footprints: the exact attention of sampled query blocks over all keys.

The capture stores them for every (step, layer, order); the dashboard recomputes one from
stored Q/K with the same function, so what it draws is what the capture stored.
"""

from __future__ import annotations

import torch

__all__ = ["block_footprints", "sample_query_blocks"]


def sample_query_blocks(num_blocks: int, count: int, heads: int, seed: int) -> torch.Tensor:
    """``count`` distinct query blocks per head, ascending: int64 [heads, count] (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(num_blocks, generator=gen)[:count].sort().values for _ in range(heads)])


# float32 logits per group of heads in block_footprints (2^25: 128 MiB, as much again for
# their softmax): 4 heads of a Wan 480p sequence, few enough launches to keep the host ahead
_FOOTPRINT_CHUNK = 1 << 25


def block_footprints(
    q: torch.Tensor, k: torch.Tensor, perm: torch.Tensor, blocks: torch.Tensor, block: int, scale: float
) -> torch.Tensor:
    """Mean exact attention of sampled query blocks over all keys.

    Args:
        q, k: [1, H, N, D] in original token order.
        perm: int64 [N] the order's permutation (ordered[p] = original[perm[p]]); pass it on
            q's device to spare an upload per call.
        blocks: int64 [H, K] query block indices of the ordered sequence, per head.
        block: tokens per block (the last block may be short).
        scale: softmax scale.

    Returns:
        float32 [H, K, N]: row s of head h is (1/|U_u|) sum_{i in U_u} softmax(q_i . k * scale)
        for u = blocks[h, s], over keys in original order (each row sums to 1).

    Logits are float32 (q and k upcast), computed for the K * block sampled query rows
    only, a group of heads at a time (float32 logits of at most ``_FOOTPRINT_CHUNK``
    elements), so no float32 copy of all of k is made. The host tensors go to the device
    with non-blocking copies: nothing here waits for the GPU.
    """
    _, h, n, d = q.shape
    device = q.device
    count = blocks.shape[1]
    perm = perm.to(device, non_blocking=True)
    pos = blocks.to(device, non_blocking=True)[..., None] * block + torch.arange(block, device=device)
    valid = pos < n  # [H, K, block]: ordered positions inside the sequence
    weight = valid.float() / valid.sum(dim=-1, keepdim=True)  # mean over the block's tokens
    rows = perm[pos.clamp(max=n - 1)].reshape(h, count * block, 1)  # original token positions
    out = torch.empty(h, count, n, device=device, dtype=torch.float32)
    group = max(1, _FOOTPRINT_CHUNK // (count * block * n))
    for h0 in range(0, h, group):
        heads = slice(h0, h0 + group)
        qr = torch.gather(q[0, heads], 1, rows[heads].expand(-1, -1, d)).float()  # [G, K * block, D]
        logits = torch.matmul(qr, k[0, heads].float().transpose(1, 2)).mul_(scale)  # [G, K * block, N]
        att = torch.softmax(logits, dim=-1).view(-1, count, block, n)
        out[heads] = torch.einsum("gsb,gsbn->gsn", weight[heads], att)
    return out

"""The top-k masks of every budget at once, and their recall and density: the core of
:func:`dfsviz.analysis.recall_curve`, shared with the capture writer, which stores every
step's curves (``docs/format.md``).

Sorting each row of block scores once gives the top-k mask of every k = 1..Mk (the first k
blocks of the row's order), and a cumulative sum of the block mass m in that order gives
their recall. Inputs are not checked here, and nothing waits for the device: the public
function checks them, and the writer's maps are the kernels' (it checks them on the host).
"""

from __future__ import annotations

import torch

from dfsviz.sparse._validate import block_sizes

__all__ = ["topk_density", "topk_order", "topk_recall"]


def topk_order(scores: torch.Tensor, forced: torch.Tensor | None = None) -> torch.Tensor:
    """int64 [..., Mq, Mk]: each row's key blocks, highest score first; keeping the first k of a
    row is its top-k mask. Equal scores keep their block order (a stable sort, in float64).
    ``forced`` (bool [Mk]): blocks moved to the front of every row, each group in score order."""
    order = torch.argsort(scores.to(torch.float64), dim=-1, descending=True, stable=True)
    if forced is not None:
        order = torch.gather(order, -1, torch.argsort((~forced[order]).to(torch.int8), dim=-1, stable=True))
    return order


def topk_recall(m: torch.Tensor, order: torch.Tensor, seq_len: int, block: int,
                dense_rows: torch.Tensor | None = None) -> torch.Tensor:
    """float64 [..., Mk]: entry k - 1 is the recall R(S) of keeping the first k blocks of every row
    of ``order`` (:func:`topk_order`), R(S) = sum_u (|U_u| / N) sum_{v in S_u} m_uv, on m's device.

    ``m``: float [..., Mq, Mk] block mass. ``dense_rows`` (bool [Mq]): rows that keep every block
    at every k."""
    mass = torch.cumsum(torch.gather(m.to(torch.float64), -1, order), dim=-1)  # [..., Mq, Mk]
    if dense_rows is not None:
        mass[..., dense_rows, :] = m[..., dense_rows, :].to(torch.float64).sum(dim=-1, keepdim=True)
    weights = block_sizes(seq_len, block, device=m.device).to(torch.float64) / seq_len  # |U_u| / N
    return torch.einsum("...uk,u->...k", mass, weights)


def topk_density(order: torch.Tensor, seq_len: int, block: int, dense_rows: torch.Tensor | None = None) -> torch.Tensor:
    """float64 [..., Mk]: entry k - 1 is the density rho(S) of keeping the first k blocks of every
    row of ``order`` (:func:`topk_order`), rho(S) = sum_u sum_{v in S_u} |U_u| n_v / N^2: k / Mk
    but for a short last block, whose n_v counts only where a row keeps it. ``dense_rows`` as in
    :func:`topk_recall`."""
    sizes = block_sizes(seq_len, block, device=order.device).to(torch.float64)  # n_v = |U_v|
    tokens = torch.cumsum(sizes[order], dim=-1)  # [..., Mq, Mk]: sum of kept n_v
    if dense_rows is not None:
        tokens[..., dense_rows, :] = float(seq_len)
    return torch.einsum("...uk,u->...k", tokens, sizes) / float(seq_len) ** 2

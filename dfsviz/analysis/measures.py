"""The recall pipeline: block statistics and scores -> top-k mask -> what the mask keeps.

Every recall the package reports goes through :func:`measure_topk`: the top-k mask of a
scoring method's block scores at budget gamma (:func:`dfsviz.sparse.select.select_topk`) and,
computed on first use, its recall R(S) and per-query-block recall from the block mass m, its
density rho(S), the oracle recall R*(k) of the same k, and the factors and bounds of
:func:`dfsviz.sparse.theory.factor_summary`. :func:`measure_orders` runs the whole pipeline
from Q/K: every token order cuts the same tokens into blocks (order -> block statistics ->
scores), and every method is measured at every budget. The ``dfsviz recall`` command, the
token-model sweeps, the claims report and the dashboard call these and only format the result.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property

import torch

from dfsviz.analysis.factors import FactorTable, _summary_rows
from dfsviz.sparse.grid import LatentGrid
from dfsviz.sparse.masks import BlockMask
from dfsviz.sparse.orders import make_order
from dfsviz.sparse.scoring import block_scores_ref
from dfsviz.sparse.select import select_topk, topk_count
from dfsviz.sparse.stats import BlockStats, block_recall, block_recall_per_query, block_stats_ref, oracle_recall, variance_ratio
from dfsviz.sparse.theory import factor_summary

__all__ = ["ORACLE", "OrderMeasures", "TopkMeasure", "measure_orders", "measure_topk"]

#: The method whose scores are the block mass m itself (the oracle scorer): in
#: :func:`measure_orders` its scores come from the statistics pass, not a second dense pass.
ORACLE = "oracle"


@dataclass(frozen=True, eq=False)
class TopkMeasure:
    """A top-k mask and what it keeps of the attention (from :func:`measure_topk`).

    Fields:
        mask: BlockMask [B, H, Mq, Mk], the k = max(1, int(gamma * Mk)) best-scoring key
            blocks of every query block.
        m: float [B, H, Mq, Mk], the block mass the mask is measured on.
        gamma: the budget, kept fraction of key blocks in (0, 1].
        stats: the block statistics of m when given (needed by :attr:`factors`), else None.

    The measures are computed on first use and kept.
    """

    mask: BlockMask
    m: torch.Tensor
    gamma: float
    stats: BlockStats | None = None

    @property
    def k(self) -> int:
        """Key blocks kept per query block, max(1, int(gamma * Mk))."""
        return topk_count(self.gamma, self.mask.num_kv_blocks)

    @cached_property
    def recall(self) -> torch.Tensor:
        """float64 [B, H]: R(S), the share of the attention the mask keeps."""
        return block_recall(self.m, self.mask)

    @cached_property
    def recall_per_query(self) -> torch.Tensor:
        """float64 [B, H, Mq]: R_u(S) of every query block."""
        return block_recall_per_query(self.m, self.mask)

    @cached_property
    def density(self) -> torch.Tensor:
        """float64 [B, H]: rho(S), the share of token pairs the mask keeps."""
        return self.mask.density()

    @cached_property
    def oracle_recall(self) -> torch.Tensor:
        """float64 [B, H]: R*(k), the best recall any mask keeping k blocks per query block reaches."""
        return oracle_recall(self.m, self.k, seq_len=self.mask.seq_len, block=self.mask.block)

    @cached_property
    def factors(self) -> dict[str, torch.Tensor]:
        """The factors, Bounds 2 and 3 and the recall of every query block (float64 [B, H, Mq]
        each, :func:`dfsviz.sparse.theory.factor_summary`); needs ``stats``."""
        if self.stats is None:
            raise ValueError(
                "the factors of a mask need the block statistics (L, r, J), not only the block mass m; "
                "pass a BlockStats to measure_topk"
            )
        return factor_summary(self.stats, self.mask)

    def rows(self, **keys: object) -> FactorTable:
        """:attr:`factors` as a table, one row per (batch, head, query block); ``keys`` as in
        :func:`dfsviz.analysis.factors.factor_rows`."""
        return _summary_rows(self.factors, keys)


def measure_topk(
    stats: BlockStats | torch.Tensor,
    scores: torch.Tensor,
    gamma: float,
    *,
    seq_len: int | None = None,
    block: int | None = None,
) -> TopkMeasure:
    """The top-k mask of ``scores`` at budget ``gamma``, measured on the block mass.

    Args:
        stats: a BlockStats (``block_stats_ref``, or a capture's ``StoredStats.to_block_stats()``),
            or a float [B, H, Mq, Mk] block mass m with ``seq_len`` and ``block``.
        scores: float [B, H, Mq, Mk], any scorer's output (higher = keep first).
        gamma: kept fraction of key blocks in (0, 1].
        seq_len, block: N and the block size, only when ``stats`` is a tensor.

    Returns:
        TopkMeasure (mask, recall, per-query recall, density, oracle recall, factors).
    """
    if isinstance(stats, BlockStats):
        if seq_len is not None or block is not None:
            raise ValueError("`seq_len` and `block` must be None when `stats` is a BlockStats (it carries both)")
        m, seq_len, block, full = stats.m, stats.seq_len, stats.block, stats
    elif isinstance(stats, torch.Tensor):
        if seq_len is None or block is None:
            raise ValueError(
                f"`seq_len` and `block` are required when `stats` is a block mass tensor (got seq_len={seq_len!r}, "
                f"block={block!r}); pass them or pass the BlockStats itself"
            )
        m, full = stats, None
    else:
        raise TypeError(f"`stats` must be a BlockStats or a block mass tensor [B, H, Mq, Mk] (got {type(stats).__name__})")
    mask = select_topk(scores, gamma, seq_len=seq_len, block=block)
    if tuple(m.shape) != mask.shape:
        raise ValueError(
            f"`stats` and `scores` must have one shape [B, H, Mq, Mk] (got {tuple(m.shape)} and {mask.shape}); "
            "compute both for the same call, order and block size"
        )
    return TopkMeasure(mask, m, float(gamma), full)


@dataclass(frozen=True, eq=False)
class OrderMeasures:
    """One token order of :func:`measure_orders`.

    Fields:
        order: the order's name.
        stats: BlockStats of the reordered Q/K.
        W_q, W_k: float64 [B, H], intra-block variance ratios of the reordered queries and keys.
        topk: method -> one TopkMeasure per budget, in the order of the budgets.
    """

    order: str
    stats: BlockStats
    W_q: torch.Tensor
    W_k: torch.Tensor
    topk: dict[str, list[TopkMeasure]]


def measure_orders(
    q: torch.Tensor,
    k: torch.Tensor,
    grid: LatentGrid,
    orders: Sequence[str],
    methods: Sequence[str],
    gammas: Sequence[float],
    *,
    block: int,
    tile: int | None = None,
) -> Iterator[OrderMeasures]:
    """The recall pipeline from Q/K, one token order at a time (PyTorch references, any device).

    Args:
        q, k: [B, H, N, D] in the grid's raster order; every order permutes these same tokens,
            so orders differ only in how blocks are cut.
        grid: the latent grid of the N tokens.
        orders: token order names (``dfsviz.sparse.orders.ORDERS``).
        methods: scoring methods (``scorer_names()``); ``"oracle"`` ranks by the block mass of
            the statistics pass.
        gammas: budgets, kept fractions of key blocks in (0, 1].
        block: tokens per block; tile: dfs_tile tile / antidiagonal stride (None = the method's own).

    Yields:
        OrderMeasures per order, in the order of ``orders``.
    """
    for name in orders:
        order = make_order(name, grid)
        qo, ko = order.apply(q), order.apply(k)
        stats = block_stats_ref(qo, ko, block=block)
        topk = {}
        for method in methods:
            scores = stats.m if method == ORACLE else block_scores_ref(qo, ko, method, tile=tile, block=block)
            topk[method] = [measure_topk(stats, scores, gamma) for gamma in gammas]
        yield OrderMeasures(name, stats, variance_ratio(qo, block), variance_ratio(ko, block), topk)

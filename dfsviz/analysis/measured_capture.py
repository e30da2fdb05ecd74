"""A capture file with its masks measured: what ``dfsviz.open(path)`` returns.

:class:`MeasuredCapture` is the storage reader :class:`dfsviz.capture.reader.CaptureReader`
plus masks, recall and density at any budget. Top-k masks go through the one recall pipeline,
:func:`dfsviz.analysis.measures.measure_topk`, on the stored block mass m and scores; a
cumulative mass ``tau`` selects with :func:`dfsviz.sparse.select.select_cumulative`. Storage
itself selects nothing.
"""

from __future__ import annotations

import torch

from dfsviz.analysis.measures import TopkMeasure, measure_topk
from dfsviz.capture.reader import CaptureReader
from dfsviz.sparse.masks import BlockMask
from dfsviz.sparse.scoring import SCORERS
from dfsviz.sparse.select import select_cumulative
from dfsviz.sparse.stats import block_recall

__all__ = ["MeasuredCapture"]


def _check_one_budget(gamma: float | None, tau: float | None) -> None:
    if (gamma is None) == (tau is None):
        raise ValueError(
            f"pass exactly one of `gamma` (top-k budget) or `tau` (cumulative mass) (got gamma={gamma!r}, tau={tau!r})"
        )


class MeasuredCapture(CaptureReader):
    """A capture file opened read-only, with the masks of its scores measured (``dfsviz.open``).

    Every accessor of :class:`~dfsviz.capture.reader.CaptureReader`, plus :meth:`mask`,
    :meth:`recall`, :meth:`density` and :meth:`oracle_recall` of one (step, layer, order), and
    :meth:`dfsattn_mask` and :meth:`dfsattn_recall` of the masks DFSAttn used (a recording with
    ``apply_dfsattn`` active);
    ``head=None`` means every captured head, ``branch`` is ``"cond"`` or ``"uncond"``.
    """

    def _topk(self, step: int, layer: int, order: str, method: str, gamma: float, head, branch: str) -> TopkMeasure:
        scores = self.scores(step, layer, order, method, head, branch)
        m = self.block_mass(step, layer, order, head, branch)
        return measure_topk(m, scores, gamma, seq_len=self.grid.num_tokens, block=self.block)

    def mask(self, step: int, layer: int, order: str, method: str, *, gamma: float | None = None,
             tau: float | None = None, head=None, branch: str = "cond") -> BlockMask:
        """BlockMask [1, Hs, Mq, Mk] chosen from ``method``'s scores: top-k at budget ``gamma``
        (kept fraction of key blocks) or smallest set of normalised score mass ``tau``."""
        _check_one_budget(gamma, tau)
        if gamma is not None:
            return self._topk(step, layer, order, method, gamma, head, branch).mask
        scores = self.scores(step, layer, order, method, head, branch)
        return select_cumulative(scores, tau, seq_len=self.grid.num_tokens, block=self.block,
                                 scores_are_logits=SCORERS[method].is_logit)

    def recall(self, step: int, layer: int, order: str, method: str, *, gamma: float | None = None,
               tau: float | None = None, head=None, branch: str = "cond") -> torch.Tensor:
        """Recall R(S) of the mask of :meth:`mask`, float64 [1, Hs] (from the stored m)."""
        _check_one_budget(gamma, tau)
        if gamma is not None:
            return self._topk(step, layer, order, method, gamma, head, branch).recall
        mask = self.mask(step, layer, order, method, tau=tau, head=head, branch=branch)
        return block_recall(self.block_mass(step, layer, order, head, branch), mask)

    def density(self, step: int, layer: int, order: str, method: str, *, gamma: float | None = None,
                tau: float | None = None, head=None, branch: str = "cond") -> torch.Tensor:
        """Density rho(S) of the mask of :meth:`mask`, float64 [1, Hs]."""
        return self.mask(step, layer, order, method, gamma=gamma, tau=tau, head=head, branch=branch).density()

    def dfsattn_mask(self, step: int, layer: int, head=None, branch: str = "cond") -> BlockMask:
        """The mask DFSAttn attended at (step, layer) of a recording with ``apply_dfsattn``
        active, BlockMask [1, Hs, Mq, Mk] over the blocks of :attr:`dfsattn_order`."""
        kept = self.dfsattn_kept(step, layer, head, branch)
        return BlockMask.from_dense(kept, self.grid.num_tokens, self.block)

    def dfsattn_recall(self, step: int, layer: int, head=None, branch: str = "cond") -> torch.Tensor:
        """Recall R(S) of the mask DFSAttn attended, float64 [1, Hs] (from the stored m of its order)."""
        mask = self.dfsattn_mask(step, layer, head, branch)
        return block_recall(self.block_mass(step, layer, self.dfsattn_order, head, branch), mask)

    def oracle_recall(self, step: int, layer: int, order: str, gamma: float, head=None, branch: str = "cond") -> torch.Tensor:
        """Best recall any mask of budget gamma reaches, float64 [1, Hs]: R*(k), k = max(1, int(gamma * Mk))."""
        m = self.block_mass(step, layer, order, head, branch)
        return measure_topk(m, m, gamma, seq_len=self.grid.num_tokens, block=self.block).oracle_recall

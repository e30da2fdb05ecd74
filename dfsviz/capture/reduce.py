"""Per-call reduction: each captured SDPA call becomes block statistics, block scores,
variance ratios, footprints and (optionally) Q/K/V, queued to the HDF5 writer.

Statistics use the Triton kernels of ``dfsviz.kernels`` (on CUDA) and their PyTorch
references otherwise. Under Ulysses attention (:mod:`dfsviz.capture.ranks`) each rank's SDPA
calls carry the whole sequence of its H/P heads: the reducer reduces the captured heads among
them, and the rank's :class:`~dfsviz.capture.ranks.RankWriter` gathers them onto rank 0.
"""

from __future__ import annotations

import torch

from dfsviz.capture.hooks import AttentionRecord
from dfsviz.capture.ranks import UlyssesRanks
from dfsviz.capture.resolve import ResolvedCapture
from dfsviz.capture.writer import CaptureWriter
from dfsviz.kernels.block_scores import block_scores
from dfsviz.kernels.block_stats import block_stats
from dfsviz.sparse.footprints import block_footprints, sample_query_blocks

__all__ = ["AttentionReducer"]


class AttentionReducer:
    """Turns each captured SDPA call into statistics and queues them to the writer.

    With ``ranks`` (Ulysses attention) the calls carry the rank's H/P heads and ``writer`` is its
    :class:`~dfsviz.capture.ranks.RankWriter`."""

    def __init__(self, rc: ResolvedCapture, writer: CaptureWriter, progress, ranks: UlyssesRanks | None = None) -> None:
        from dfsviz.sparse.orders import make_order

        self.rc = rc
        self.writer = writer
        self.progress = progress
        # (batch element, branch) of each sample the next SDPA calls carry: one per call when
        # the branches run as separate calls, both halves of a CFG batch of 2 otherwise
        self.targets: list[tuple[int, str]] = [(0, "cond")]
        self.orders = [make_order(name, rc.grid) for name in rc.layout.orders]
        # the captured heads as indices into the calls' head dimension, and their rows among rc.heads
        held = rc.heads if ranks is None else ranks.held(rc.heads)
        self.heads = torch.tensor(rc.heads if ranks is None else ranks.local(rc.heads), dtype=torch.int64)
        self._rows = [rc.heads.index(h) for h in held]
        self.scale: float | None = None
        self.seen: set[tuple[int, str]] = set()

    def __call__(self, rec: AttentionRecord) -> None:
        if not rec.is_self_attention:
            return
        try:
            self._reduce(rec)
        except ValueError as exc:
            raise ValueError(f"step {self.writer.open_step}, layer {rec.layer} ({rec.name}): {exc}") from None

    def _reduce(self, rec: AttentionRecord) -> None:
        if rec.call > 0:
            raise ValueError(
                f"layer {rec.name} called SDPA {rec.call + 1} times in one forward (per-sample loops are not supported)"
            )
        for sample, branch in self.targets:
            self._reduce_sample(rec, sample, branch)

    def _reduce_sample(self, rec: AttentionRecord, sample: int, branch: str) -> None:
        from dfsviz.sparse.stats import variance_ratio

        cfg, lay, grid = self.rc.config, self.rc.layout, self.rc.grid
        q, k, v = (x[sample : sample + 1] for x in (rec.q, rec.k, rec.v))
        valid = self.rc.source.adapter.valid_tokens(rec.attn_mask, q.shape[2], sample)
        if valid is not None:
            q, k, v = (x.index_select(2, valid) for x in (q, k, v))
        if q.shape[2] != grid.num_tokens:
            raise ValueError(
                f"layer {rec.name} attends over {q.shape[2]} tokens but the grid {grid.name} has {grid.num_tokens}; "
                "check --height/--width/--frames/--latent against the model's patching"
            )
        if self.heads.device != q.device:  # uploaded once: a blocking upload per call would stall the GPU
            self.heads = self.heads.to(q.device)
        q, k, v = (x.index_select(1, self.heads) for x in (q, k, v))
        scale = rec.softmax_scale
        self.scale = scale
        for oi, order in enumerate(self.orders):
            qo, ko = order.apply(q), order.apply(k)
            st = block_stats(qo, ko, block=lay.block, scale=scale, backend=cfg.kernel_backend)
            # meanpool's and the oracle's scores are L and m, stored once (lay.score_methods holds the rest)
            scores = {method: block_scores(qo, ko, method=method, tile=cfg.tile_for(method), block=lay.block, scale=scale,
                                           backend=cfg.kernel_backend)[0] for method in lay.score_methods}
            # the writer checks every W (and every map) it writes: no value check here, which
            # would wait for the GPU twice per order and layer
            wq = variance_ratio(qo, lay.block, check_values=False)[0]
            wk = variance_ratio(ko, lay.block, check_values=False)[0]
            self.writer.write_maps(
                rec.layer, branch, order.name, {"m": st.m[0], "L": st.L[0], "r": st.r[0], "J": st.J[0]}, scores, wq, wk
            )
            del qo, ko, st, scores
            if lay.footprints:
                # the same blocks at every step and branch, so footprints compare across steps
                seed = (cfg.seed * 7919 + rec.layer * 31 + oi) % (1 << 63)  # within torch's seed range for any seed
                blocks = sample_query_blocks(lay.num_blocks, lay.footprints, len(self.rc.heads), seed)[self._rows]
                att = block_footprints(q, k, order.perm_on(q.device), blocks, lay.block, scale)
                self.writer.write_footprints(rec.layer, branch, order.name, blocks, att)
        if lay.dfsattn_order is not None:
            self.writer.write_dfsattn_mask(rec.layer, branch, self._kept(rec, sample, q.device))
        if rec.layer in lay.qkv_layers and lay.has_qkv(self.writer.open_step):
            self.writer.write_qkv(rec.layer, branch, q[0], k[0], v[0])
        self.seen.add((rec.layer, branch))
        if self.progress is not None:
            self.progress.update(1)

    def _kept(self, rec: AttentionRecord, sample: int, device) -> torch.Tensor:
        """The key blocks the call attended, bool [Hs, M, M] of the captured heads: its DFSAttn
        mask, or every block for an SDPA call (DFSAttn ran the layer dense)."""
        m = self.rc.layout.num_blocks
        if rec.dfsattn_mask is None:
            return torch.ones(len(self._rows), m, m, dtype=torch.bool, device=device)
        mask = rec.dfsattn_mask
        if mask.block != self.rc.layout.block or mask.seq_len != self.rc.grid.num_tokens:
            raise ValueError(
                f"DFSAttn attended blocks of {mask.block} over {mask.seq_len} tokens, the capture's are {self.rc.layout.block} "
                f"over {self.rc.grid.num_tokens}"
            )
        return mask.to_dense()[sample].index_select(0, self.heads.to(mask.kv_indices.device))

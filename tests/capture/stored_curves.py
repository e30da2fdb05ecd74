"""The recall curves a capture stores (``recall``, computed by the writer from the maps as the model
produced them) against the curves ``dfsviz.analysis.recall_curve`` recomputes from the maps the
file stores: equal for float32 maps, within the storage's error for float16 and uint8 maps."""

from __future__ import annotations

import torch

from dfsviz.analysis.curves import recall_curve

#: how far a stored curve may lie from the one recomputed from 8-bit maps: the largest difference
#: docs/format.md states (0.0053, the embedded model's uint8 capture), rounded up
UINT8_CURVE_BOUND = 0.006


def recomputed_curve(reader, step: int, layer: int, order: str, method: str, branch: str = "cond") -> torch.Tensor:
    """float64 [Hs, Mk]: recall of the top-k mask of ``method`` at every k, from the stored m and scores."""
    m = reader.block_mass(step, layer, order, branch=branch)
    scores = reader.scores(step, layer, order, method, branch=branch)
    return recall_curve(m, scores, seq_len=reader.grid.num_tokens, block=reader.block).recall[0]


def curve_pairs(reader):
    """(where, stored float64 [Hs, Mk], recomputed float64 [Hs, Mk]) of every curve of every completed step."""
    for step in reader.steps:
        for layer in reader.layers:
            for branch in reader.branches:
                for order in reader.orders:
                    for method in reader.methods:
                        stored = reader.recall_curve(step, layer, order, method, branch=branch)
                        assert stored.dtype == torch.float32 and stored.shape == (1, len(reader.heads), reader.layout.num_blocks)
                        where = f"step {step}, layer {layer}, {branch}, {order}, {method}"
                        yield where, stored[0].double(), recomputed_curve(reader, step, layer, order, method, branch)


def assert_stored_curves_match_the_maps(reader, atol: float = 1e-6) -> float:
    """Every stored curve within ``atol`` of the one recomputed from the stored maps (float32 rounding
    of the stored value: 6e-8); returns the largest difference."""
    assert reader.stored_recall
    worst = 0.0
    for where, stored, recomputed in curve_pairs(reader):
        torch.testing.assert_close(stored, recomputed, rtol=0, atol=atol, msg=where)
        worst = max(worst, float((stored - recomputed).abs().max()))
    return worst

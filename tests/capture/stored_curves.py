"""The recall and density curves a capture stores (``recall``, ``density``, computed by the writer
from the maps as the model produced them) against the curves ``dfsviz.analysis.recall_curve`` recomputes from the maps the
file stores: equal for float32 maps, within the storage's error for float16 and uint8 maps."""

from __future__ import annotations

import torch

from dfsviz.analysis.curves import recall_curve

#: how far a stored curve may lie from the one recomputed from 8-bit maps: the largest difference
#: docs/format.md states (0.0053, the embedded model's uint8 capture), rounded up
UINT8_CURVE_BOUND = 0.006


def _recomputed(reader, step: int, layer: int, order: str, method: str, branch: str):
    m = reader.block_mass(step, layer, order, branch=branch)
    # the oracle ranks blocks by m: its curve is stored whether or not it is one of the file's methods
    scores = m if method == "oracle" else reader.scores(step, layer, order, method, branch=branch)
    return recall_curve(m, scores, seq_len=reader.grid.num_tokens, block=reader.block)


def curve_pairs(reader, curve: str = "recall"):
    """(where, stored float64 [Hs, Mk], recomputed float64 [Hs, Mk]) of every ``curve`` ("recall" or
    "density") of every completed step."""
    read = reader.recall_curve if curve == "recall" else reader.density_curve
    for step in reader.steps:
        for layer in reader.layers:
            for branch in reader.branches:
                for order in reader.orders:
                    for method in reader.layout.curve_methods:
                        stored = read(step, layer, order, method, branch=branch)
                        assert stored.dtype == torch.float32 and stored.shape == (1, len(reader.heads), reader.layout.num_blocks)
                        where = f"{curve}, step {step}, layer {layer}, {branch}, {order}, {method}"
                        recomputed = getattr(_recomputed(reader, step, layer, order, method, branch), curve)[0]
                        yield where, stored[0].double(), recomputed


def assert_stored_curves_match_the_maps(reader, atol: float = 1e-6) -> float:
    """Every stored curve within ``atol`` of the one recomputed from the stored maps (float32 rounding
    of the stored value: 6e-8); returns the largest difference."""
    assert reader.stored_recall
    worst = 0.0
    for where, stored, recomputed in curve_pairs(reader):
        torch.testing.assert_close(stored, recomputed, rtol=0, atol=atol, msg=where)
        worst = max(worst, float((stored - recomputed).abs().max()))
    # densities depend on which blocks the scores rank first, not on m's values: on float32 maps equal
    # up to float32 rounding (and ties); on coarser maps a reordered short last block moves them
    if reader.layout.map_dtype == "float32":
        for where, stored, recomputed in curve_pairs(reader, "density"):
            torch.testing.assert_close(stored, recomputed, rtol=0, atol=1e-6, msg=where)
    return worst

"""dfsviz.open's masks, recall, density and oracle recall of a capture, against brute force from
the capture's own stored Q/K (the sample capture saved them at step 13, layer 1)."""

from __future__ import annotations

import pytest
import torch

import dfsviz
from dfsviz.analysis.measured_capture import MeasuredCapture
from dfsviz.capture.reader import CaptureReader

STEP, LAYER = 13, 1


@pytest.fixture(scope="module")
def run():
    with dfsviz.open(dfsviz.sample_capture()) as opened:
        yield opened


def _brute_recall(run, order: str, keep: torch.Tensor) -> torch.Tensor:
    """(1/N) sum_i sum_{j kept} P_ij from dense float64 attention, float64 [H]; ``keep`` bool [H, Mq, Mk]."""
    q, k, _ = run.qkv(STEP, LAYER)
    perm = run.perm(order)
    q, k = q[0, :, perm].double(), k[0, :, perm].double()
    n, b, scale = q.shape[1], run.block, float(run.attrs["softmax_scale"])
    total = torch.zeros(q.shape[0], dtype=torch.float64)
    for u in range(keep.shape[1]):
        att = torch.softmax(q[:, u * b : (u + 1) * b] @ k.transpose(-1, -2) * scale, dim=-1)  # [H, rows, N]
        cols = keep[:, u].repeat_interleave(b, dim=-1)[:, :n]
        total += (att * cols[:, None]).sum(dim=(1, 2))
    return total / n


def _brute_topk(scores: torch.Tensor, gamma: float) -> torch.Tensor:
    """bool [H, Mq, Mk]: the k = max(1, int(gamma * Mk)) highest scores of every row."""
    mk = scores.shape[-1]
    keep = torch.zeros(scores.shape, dtype=torch.bool)
    return keep.scatter(-1, scores.topk(max(1, int(gamma * mk)), dim=-1).indices, True)


def _brute_density(run, keep: torch.Tensor) -> torch.Tensor:
    """Kept token pairs / N^2, float64 [H]."""
    n, b = run.grid.num_tokens, run.block
    sizes = torch.tensor([min(b, n - s) for s in range(0, n, b)], dtype=torch.float64)
    return (keep.double() * sizes[:, None] * sizes[None, :]).sum(dim=(1, 2)) / n**2


def test_open_gives_a_reader_with_the_measures(run):
    assert isinstance(run, MeasuredCapture) and isinstance(run, CaptureReader)
    assert not hasattr(CaptureReader, "recall"), "the storage reader selects nothing"


@pytest.mark.parametrize("order", ["raster", "hilbert3d"])
@pytest.mark.parametrize("method", ["meanpool", "dfs_tile"])
def test_topk_mask_recall_and_density_match_brute_force(run, order, method):
    gamma = 0.2
    keep = _brute_topk(run.scores(STEP, LAYER, order, method)[0], gamma)
    mask = run.mask(STEP, LAYER, order, method, gamma=gamma)
    assert torch.equal(mask.to_dense()[0], keep)
    # the block statistics came from float32 Q/K, the stored Q/K are float16
    torch.testing.assert_close(run.recall(STEP, LAYER, order, method, gamma=gamma)[0],
                               _brute_recall(run, order, keep), atol=3e-3, rtol=0)
    torch.testing.assert_close(run.density(STEP, LAYER, order, method, gamma=gamma)[0], _brute_density(run, keep),
                               atol=1e-12, rtol=0)
    head = run.recall(STEP, LAYER, order, method, gamma=gamma, head=2)
    assert head.shape == (1, 1) and float(head) == float(run.recall(STEP, LAYER, order, method, gamma=gamma)[0, 2])


def test_oracle_recall_is_the_recall_of_the_top_block_mass(run):
    gamma = 0.1
    keep = _brute_topk(run.block_mass(STEP, LAYER, "hilbert3d")[0], gamma)
    oracle = run.oracle_recall(STEP, LAYER, "hilbert3d", gamma)[0]
    torch.testing.assert_close(oracle, _brute_recall(run, "hilbert3d", keep), atol=3e-3, rtol=0)
    assert bool((run.recall(STEP, LAYER, "hilbert3d", "dfs_tile", gamma=gamma)[0] <= oracle + 1e-12).all())


@pytest.mark.parametrize("method", ["meanpool", "dfs_tile"])
def test_cumulative_mask_keeps_the_smallest_set_reaching_tau(run, method):
    tau = 0.6
    scores = run.scores(STEP, LAYER, "raster", method)[0].double()
    share = torch.softmax(scores, dim=-1) if method == "meanpool" else scores / scores.sum(dim=-1, keepdim=True)
    ranked, index = share.sort(dim=-1, descending=True)
    count = (ranked.cumsum(dim=-1) < tau).sum(dim=-1, keepdim=True) + 1  # blocks before the mass reaches tau, + 1
    keep = torch.zeros(share.shape, dtype=torch.bool).scatter(-1, index, torch.arange(share.shape[-1]) < count)
    mask = run.mask(STEP, LAYER, "raster", method, tau=tau).to_dense()[0]
    # equal shares may be ranked either way: the same number of blocks per row, the same share kept
    assert torch.equal(mask.sum(dim=-1), keep.sum(dim=-1))
    torch.testing.assert_close((share * mask).sum(dim=-1), (share * keep).sum(dim=-1), atol=1e-12, rtol=0)
    torch.testing.assert_close(run.recall(STEP, LAYER, "raster", method, tau=tau)[0],
                               _brute_recall(run, "raster", keep), atol=3e-3, rtol=0)
    torch.testing.assert_close(run.density(STEP, LAYER, "raster", method, tau=tau)[0], _brute_density(run, keep),
                               atol=1e-12, rtol=0)


@pytest.mark.parametrize("measure", ["mask", "recall", "density"])
@pytest.mark.parametrize("budget", [{}, {"gamma": 0.2, "tau": 0.9}])
def test_exactly_one_budget(run, measure, budget):
    with pytest.raises(ValueError, match=r"pass exactly one of `gamma` \(top-k budget\) or `tau` \(cumulative mass\) "
                                         r"\(got gamma=.*, tau=.*\)"):
        getattr(run, measure)(STEP, LAYER, "raster", "meanpool", **budget)

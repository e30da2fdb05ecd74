"""Shared fixtures of the analysis tests: token-model Q/K, block statistics and scores.

Grids are small and N is ragged (not a multiple of the block) so every test also covers
the short last block. Everything is float64 so expected values need no tolerance beyond
rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from tiny_models import WAN

from dfsviz.sparse.grid import LatentGrid
from dfsviz.sparse.orders import make_order
from dfsviz.sparse.scoring import block_scores_ref
from dfsviz.sparse.stats import BlockStats, block_stats_ref
from dfsviz.sparse.tokenmodel import TokenModelConfig, sample_qk

#: 3 x 10 x 11 = 330 tokens: blocks of 32 leave a short last block of 10 tokens.
SMALL_GRID = LatentGrid(3, 10, 11)
BLOCK = 32
METHODS = ("meanpool", "dfs_tile", "antidiagonal")


@dataclass
class Case:
    """One attention call of the token model, in one order."""

    q: torch.Tensor
    k: torch.Tensor
    stats: BlockStats
    scores: dict[str, torch.Tensor]
    grid: LatentGrid
    order: str

    @property
    def seq_len(self) -> int:
        return self.stats.seq_len

    @property
    def block(self) -> int:
        return self.stats.block


def make_case(
    grid: LatentGrid = SMALL_GRID,
    order: str = "raster",
    *,
    seed: int = 0,
    delta: float = 0.5,
    heads: int = 2,
    block: int = BLOCK,
    methods: tuple[str, ...] = METHODS,
    **model: object,
) -> Case:
    """Token-model Q/K (float64) permuted by ``order``, with block stats and every method's scores."""
    cfg = TokenModelConfig(grid, heads=heads, head_dim=16, delta=delta, seed=seed, dtype=torch.float64, **model)
    q, k = sample_qk(cfg)
    tok = make_order(order, grid)
    q, k = tok.apply(q), tok.apply(k)
    stats = block_stats_ref(q, k, block=block)
    tile = 8 if block >= 8 else block
    scores = {m: block_scores_ref(q, k, method=m, tile=tile, block=block) for m in methods}
    return Case(q, k, stats, scores, grid, order)


@pytest.fixture(scope="session")
def case() -> Case:
    return make_case()


@pytest.fixture(scope="session")
def steps_cases() -> list[Case]:
    """Five "denoising steps" of one layer: the same layout, noise shrinking step by step."""
    return [make_case(seed=3, delta=d, methods=("dfs_tile",)) for d in (1.2, 0.9, 0.6, 0.4, 0.2)]


@pytest.fixture(scope="session")
def build_case():
    """The :func:`make_case` factory, for tests that need their own token-model draw."""
    return make_case


@pytest.fixture(scope="session")
def methods() -> tuple[str, ...]:
    return METHODS


#: Steps captured of a 10-step run (token-model capture): with the scaled DFSAttn schedule
#: (warm-up 2, refresh every 2) step 0 is dense, 2 and 6 refresh, 3 reuses 2, 9 reuses 6, and 5
#: reuses the uncaptured 4.
TINY_STEPS = (0, 2, 3, 5, 6, 9)


@pytest.fixture(scope="session")
def tiny_capture(tmp_path_factory) -> str:
    """Path of a small real capture: the capture runner on a saved tiny random-weight Wan model
    (3x8x16 tokens, steps 0 and 3 of 4, Q/K/V of layer 1 stored)."""
    import diffusers

    from dfsviz.capture import CaptureConfig, run_capture

    root = tmp_path_factory.mktemp("analysis_capture")
    torch.manual_seed(0)
    diffusers.WanTransformer3DModel(**WAN).eval().save_pretrained(root / "tinywan")
    out = root / "tiny.h5"
    run_capture(
        CaptureConfig(out=str(out), model=str(root / "tinywan"), embeddings="random", num_steps=4,
                      capture_steps=(0, 3), latent="3x16x32", block=16, tile=4, footprints=1, save_qkv=(1,),
                      device="cpu", orders=("raster", "hilbert3d"), methods=("meanpool", "dfs_tile")),
        progress=False,
    )
    return str(out)


@pytest.fixture(scope="session")
def token_capture(tmp_path_factory) -> str:
    """A capture written from the token model (structured attention; noise shrinking over steps;
    three methods; Q/K/V of layer 1 stored): the main fixture of the report and notebook tests."""
    from dfsviz.analysis.sweeps import write_token_model_capture

    path = tmp_path_factory.mktemp("token_capture") / "token.h5"
    return write_token_model_capture(path, TokenModelConfig(LatentGrid(4, 12, 16), heads=2, head_dim=32), block=32,
                                     steps=TINY_STEPS, num_steps=10, footprints=2, qkv_layers=(1,),
                                     methods=("meanpool", "dfs_tile", "antidiagonal"))

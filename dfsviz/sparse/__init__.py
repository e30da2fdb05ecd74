"""Pure-PyTorch sparse-attention core: grids, token orders, block masks, scoring,
selection, the DFSAttn schedule, block statistics, the recall bounds of docs/theory.md,
the token model, token-level footprints, and the block-sparse attention reference.

Imports without dash, diffusers or triton (a test proves it).
"""

from dfsviz.sparse.attention import block_sparse_attention_ref
from dfsviz.sparse.footprints import block_footprints, sample_query_blocks
from dfsviz.sparse.grid import LatentGrid
from dfsviz.sparse.masks import BlockMask, check_mask_for
from dfsviz.sparse.orders import (
    ORDERS,
    TokenOrder,
    gilbert_curve,
    hilbert2d,
    hilbert3d,
    locality_report,
    make_order,
    morton3d,
    order_names,
)
from dfsviz.sparse.schedule import DFSSchedule, StepPlan
from dfsviz.sparse.scoring import SCORERS, ScorerSpec, block_scores_ref, scorer_key, scorer_names
from dfsviz.sparse.select import (
    SELECTORS,
    SelectorSpec,
    select_cumulative,
    select_topk,
    selector_key,
    selector_names,
    topk_count,
)
from dfsviz.sparse.stats import (
    BlockStats,
    block_recall,
    block_recall_per_query,
    block_stats_ref,
    mask_density,
    oracle_recall,
    row_attention_ref,
    row_recall_ref,
    variance_ratio,
)
from dfsviz.sparse.theory import (
    bound3,
    closed_form_bound,
    effective_gap,
    factor_summary,
    recall_bound,
    row_bound,
    similarity_gap,
)
from dfsviz.sparse.tokenmodel import TokenModelConfig, sample_qk, token_classes

__all__ = [
    "BlockMask",
    "BlockStats",
    "DFSSchedule",
    "LatentGrid",
    "ORDERS",
    "SCORERS",
    "SELECTORS",
    "ScorerSpec",
    "SelectorSpec",
    "StepPlan",
    "TokenModelConfig",
    "TokenOrder",
    "block_footprints",
    "block_recall",
    "block_recall_per_query",
    "block_scores_ref",
    "block_sparse_attention_ref",
    "block_stats_ref",
    "bound3",
    "check_mask_for",
    "closed_form_bound",
    "effective_gap",
    "factor_summary",
    "gilbert_curve",
    "hilbert2d",
    "hilbert3d",
    "locality_report",
    "make_order",
    "mask_density",
    "morton3d",
    "oracle_recall",
    "order_names",
    "recall_bound",
    "row_attention_ref",
    "row_bound",
    "row_recall_ref",
    "sample_query_blocks",
    "sample_qk",
    "scorer_key",
    "scorer_names",
    "select_cumulative",
    "select_topk",
    "selector_key",
    "selector_names",
    "similarity_gap",
    "token_classes",
    "topk_count",
    "variance_ratio",
]

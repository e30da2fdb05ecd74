"""Analysis of block-sparse attention: recall against budget, mask drift and the DFSAttn
schedule, factor summaries and the recall bounds, token-model sweeps, and the claims report;
:func:`measure_topk` is the one recall pipeline they all use.

Everything here works on tensors (block statistics, scores, masks) or on a capture opened
with ``dfsviz.open`` (a :class:`MeasuredCapture`: the capture's reader plus masks, recall and
density); figures come from :mod:`dfsviz.figures`.
"""

from dfsviz.analysis.curves import DEFAULT_BUDGETS, DEFAULT_TARGETS, RecallCurve, oracle_curve, recall_curve, stack_curves
from dfsviz.analysis.drift import (
    DriftMatrix,
    ReplayStep,
    ScheduleReplay,
    mask_drift,
    mask_jaccard,
    mask_source_step,
    replay_plan,
    replay_schedule,
)
from dfsviz.analysis.factors import (
    BLOCK_FACTORS,
    DEFAULT_ATOL,
    HEAD_FACTORS,
    FactorTable,
    factor_rows,
    order_change,
    variance_rows,
)
from dfsviz.analysis.measured_capture import MeasuredCapture
from dfsviz.analysis.measures import ORACLE, OrderMeasures, TopkMeasure, measure_orders, measure_topk
from dfsviz.analysis.report import ClaimsReport, ReportConfig, build_report, default_schedule
from dfsviz.analysis.sweeps import (
    SWEEP_PARAMETERS,
    SWEEP_QUANTITIES,
    SweepConfig,
    SweepResult,
    sweep_token_model,
    write_token_model_capture,
)

__all__ = [
    "BLOCK_FACTORS",
    "ClaimsReport",
    "ReportConfig",
    "build_report",
    "default_schedule",
    "DEFAULT_ATOL",
    "DEFAULT_BUDGETS",
    "DEFAULT_TARGETS",
    "HEAD_FACTORS",
    "MeasuredCapture",
    "ORACLE",
    "OrderMeasures",
    "SWEEP_PARAMETERS",
    "SWEEP_QUANTITIES",
    "DriftMatrix",
    "FactorTable",
    "RecallCurve",
    "ReplayStep",
    "ScheduleReplay",
    "SweepConfig",
    "SweepResult",
    "TopkMeasure",
    "factor_rows",
    "mask_drift",
    "mask_jaccard",
    "mask_source_step",
    "measure_orders",
    "measure_topk",
    "oracle_curve",
    "order_change",
    "recall_curve",
    "replay_plan",
    "replay_schedule",
    "stack_curves",
    "sweep_token_model",
    "variance_rows",
    "write_token_model_capture",
]

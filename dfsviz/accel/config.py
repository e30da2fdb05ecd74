"""Configuration of DFSAttn inside a diffusers video transformer (``apply_dfsattn``)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from dfsviz.accel.plan import CalibratedPlan
from dfsviz.kernels._dispatch import BACKENDS
from dfsviz.sparse._validate import check_block, check_power_of_two
from dfsviz.sparse.orders import order_names
from dfsviz.sparse.schedule import DFSSchedule
from dfsviz.sparse.scoring import scorer_names

__all__ = ["CFG_MODES", "DFSConfig", "LINEAR_PRECISIONS", "PRECISION_MODES"]

#: How the branches of classifier-free guidance get their masks.
CFG_MODES = {
    "share": "the conditional branch scores and selects; the unconditional branch reuses its mask "
    "(the reference code: its cache is keyed by layer only)",
    "separate": "each branch scores and caches its own mask",
}


#: The arithmetic of DFSAttn's attention calls (``dfsviz.kernels.block_sparse_attention(precision=...)``),
#: and with "_dense" whether DFSAttn's kernel also serves the dense warm-up calls (every block kept).
PRECISION_MODES = {
    "native": "every attention call in the model's dtype; dense warm-up calls stock",
    "native_dense": "every attention call in the model's dtype, DFSAttn's dense warm-up calls as dfsviz's kernel "
    "with every block kept (for models whose stock dense call hands SDPA a mask, e.g. HunyuanVideo's padded text)",
    "fp8": "the sparse calls with FP8 Q and K (precision='fp8'; GPUs of compute capability >= 8.9); "
    "dense warm-up calls stock",
    "fp8_dense": "the sparse calls and DFSAttn's dense warm-up calls (the FP8 kernel with every block "
    "kept) with FP8 Q and K",
    "fp8_pv": "the sparse calls with FP8 Q and K and FP8 P . V (precision='fp8_pv'); dense warm-up calls stock",
    "fp8_pv_dense": "the sparse calls and DFSAttn's dense warm-up calls with FP8 Q and K and FP8 P . V",
}

#: The arithmetic of the linear layers (projections, FFN) inside the transformer blocks, in every call.
LINEAR_PRECISIONS = {
    "native": "the model's own nn.Linear calls",
    "fp8": "every nn.Linear of the blocks but the first and the last block whose K and N are multiples of 16, on "
    "calls of >= 128 token rows, as an FP8 matrix product (x per token, W per output channel in float8 e4m3; "
    "dfsviz.kernels.fp8_linear; bfloat16 models on GPUs of compute capability >= 8.9, the CPU through its "
    "PyTorch simulation)",
    "fp8_all": "as 'fp8', in the first and the last block too",
}


def _check_bool(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be a bool (got {type(value).__name__} {value!r})")
    return value


@dataclass(frozen=True)
class DFSConfig:
    """DFSAttn settings (defaults: the paper's Wan2.1 setup; see "The DFSAttn method" in docs/theory.md).

    Fields:
        order: token order of the video tokens, a name of ``dfsviz.sparse.orders.ORDERS``
            ("hilbert3d"); text tokens keep their place.
        block: tokens per query/key block, a power of two in [16, 256] (128, what the
            reference kernel hard-codes).
        tile: tokens per scoring tile, a power of two in [1, block] (16, the paper's B_s).
        score_method: block scorer, a name of ``dfsviz.sparse.scoring.SCORERS`` ("dfs_tile").
        schedule: :class:`~dfsviz.sparse.schedule.DFSSchedule`: dense warm-up steps, refresh
            interval, gamma0, decrement, dense layers, transformer calls per step.
        cfg: "share" (the unconditional branch of a CFG pair reuses the conditional branch's
            mask, as the reference) or "separate" (each branch its own mask).
        cond_index: in a CFG batch (even B), which half holds the conditional branch: 0 (first
            half) or 1; None takes the architecture's pipeline convention (Wan, HunyuanVideo: 0;
            CogVideoX pipelines concatenate [uncond, cond]: 1). With separate calls per branch
            the first call of a step is the conditional one.
        permute_once: permute hidden states and rotary tables once before the first block and
            restore the order before the output head, instead of in every attention call.
        fused_ops: Wan only: in every call (dense warm-up steps too) run the QK-RMSNorm + RoPE
            of each DFSAttn self-attention layer (not of ``schedule.dense_layers``, which keep
            the stock processor) as one ``dfsviz.kernels.qk_norm_rope`` pass per q and k, and each
            block's AdaLN norms and gated residuals as ``dfsviz.kernels.adaln`` passes: the same
            arithmetic to one rounding step (the PyTorch references, which CPU runs use, are the
            stock expressions), several float32 passes over [B, N, C] fewer. The reference code
            recommends fused QK-norm/RoPE kernels for its end-to-end speedups. False keeps the
            stock code outside the sparse attention itself.
        backend: kernel backend, None (Triton on CUDA, else the PyTorch reference), "triton"
            or "ref" (``dfsviz.kernels.BACKENDS``).
        precision: "native", "fp8" or "fp8_pv", each alone or with "_dense"
            (:data:`PRECISION_MODES`): "fp8" runs the sparse attention with Q and K in float8
            e4m3 (per-block scales, K smoothed by its token mean; docs/kernels.md "FP8"),
            "fp8_pv" P . V in e4m3 too (per-channel V scales); "_dense" runs DFSAttn's dense
            warm-up calls through the same kernel with every block kept instead of the stock
            attention.
        linear_precision: "native", "fp8" or "fp8_all" (:data:`LINEAR_PRECISIONS`): "fp8" runs
            the projections and FFN layers of every block but the first and the last (which cost
            the most quality, docs/accel.md), in every call (warm-up steps too), as FP8 matrix
            products with per-token and per-output-channel power-of-two scales
            (``dfsviz.kernels.fp8_linear``; docs/kernels.md "FP8 linear layers"); "fp8_all" those
            two blocks too. The weights are quantized when DFSAttn is applied (an e4m3 copy beside
            the model's own: half the blocks' bf16 bytes more memory); apply again after changing them.
        measure_recall: also compute the exact block mass of every sparse call and record the
            recall of its mask (costs a dense attention pass; for quality studies only).
        calibration: a :class:`~dfsviz.accel.plan.CalibratedPlan` (``dfsviz calibrate``), or None.
            It gives each (layer, head) its own kept fraction (layers it leaves dense, or lacks,
            keep the stock processor) and fixes order, block, tile, score_method and the schedule
            (only ``calls_per_step`` may differ); build such configs with :meth:`load`.
    """

    order: str = "hilbert3d"
    block: int = 128
    tile: int = 16
    score_method: str = "dfs_tile"
    schedule: DFSSchedule = field(default_factory=DFSSchedule)
    cfg: str = "share"
    cond_index: int | None = None
    permute_once: bool = False
    fused_ops: bool = True
    backend: str | None = None
    precision: str = "native"
    linear_precision: str = "native"
    measure_recall: bool = False
    calibration: CalibratedPlan | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.order, str) or self.order not in order_names():
            raise ValueError(f"`order` must be one of {order_names()} (got {self.order!r}); DFSAttn uses 'hilbert3d'")
        check_block(self.block)
        check_power_of_two(self.tile, "tile", 1, 256)
        if self.tile > self.block:
            raise ValueError(
                f"`tile` must not exceed `block` = {self.block} (got {self.tile}); DFSAttn uses tile 16 in block 128"
            )
        if not isinstance(self.score_method, str) or self.score_method not in scorer_names():
            raise ValueError(
                f"`score_method` must be one of {scorer_names()} (got {self.score_method!r}); DFSAttn uses 'dfs_tile'"
            )
        if not isinstance(self.schedule, DFSSchedule):
            raise TypeError(
                f"`schedule` must be a dfsviz.sparse.schedule.DFSSchedule (got {type(self.schedule).__name__}); "
                "e.g. DFSSchedule(num_steps=50, skip_steps=12)"
            )
        if self.cfg not in CFG_MODES:
            raise ValueError(f"`cfg` must be one of {sorted(CFG_MODES)} (got {self.cfg!r}); the reference is 'share'")
        if self.cond_index is not None and (isinstance(self.cond_index, bool) or self.cond_index not in (0, 1)):
            raise ValueError(
                f"`cond_index` must be 0, 1 or None for the architecture's convention (got {self.cond_index!r})"
            )
        _check_bool(self.permute_once, "permute_once")
        _check_bool(self.fused_ops, "fused_ops")
        _check_bool(self.measure_recall, "measure_recall")
        if self.backend is not None and self.backend not in BACKENDS:
            raise ValueError(
                f"`backend` must be one of {sorted(BACKENDS)} or None for automatic (got {self.backend!r})"
            )
        if not isinstance(self.precision, str) or self.precision not in PRECISION_MODES:
            raise ValueError(
                f"`precision` must be one of {sorted(PRECISION_MODES)} (got {self.precision!r}); 'fp8' runs the "
                "sparse attention with FP8 Q and K, 'fp8_pv' P . V in FP8 too, '..._dense' the dense warm-up "
                "calls through the same kernel"
            )
        if not isinstance(self.linear_precision, str) or self.linear_precision not in LINEAR_PRECISIONS:
            raise ValueError(
                f"`linear_precision` must be one of {sorted(LINEAR_PRECISIONS)} (got {self.linear_precision!r}); "
                "'fp8' runs the linear layers of every block but the first and the last as FP8 matrix products, "
                "'fp8_all' of every block"
            )
        if self.calibration is not None:
            self._check_calibration(self.calibration)

    def _check_calibration(self, plan: object) -> None:
        if not isinstance(plan, CalibratedPlan):
            raise TypeError(
                f"`calibration` must be a dfsviz.accel.plan.CalibratedPlan or None (got {type(plan).__name__}); "
                "read a calibrated config with DFSConfig.load(path)"
            )
        fixed = {"order": plan.order, "block": plan.block, "score_method": plan.method}
        if plan.tile is not None:
            fixed["tile"] = plan.tile
        for name, value in fixed.items():
            if getattr(self, name) != value:
                raise ValueError(
                    f"`{name}` must be {value!r}, the value `calibration` was calibrated with (got "
                    f"{getattr(self, name)!r}); calibrate again to change it"
                )
        want = plan.schedule(self.schedule.calls_per_step)
        if self.schedule != want:
            raise ValueError(
                f"`schedule` must be the calibrated schedule {want.name} (got {self.schedule.name}); only "
                "calls_per_step may differ: calibrate again to change warm-up, interval or dense layers"
            )

    @classmethod
    def load(cls, path: str | os.PathLike, *, calls_per_step: int = 1, **options) -> "DFSConfig":
        """The DFSConfig of a calibrated config file (``dfsviz calibrate --out dfsattn.json``).

        Args:
            path: the JSON file (docs/calibration.md).
            calls_per_step: transformer calls per diffusion step when steps are counted (2 for
                diffusers' WanPipeline with CFG), as ``DFSSchedule.calls_per_step``.
            options: other DFSConfig fields (cfg, cond_index, permute_once, fused_ops, backend,
                precision, linear_precision, measure_recall); the file fixes order, block, tile,
                score_method and schedule.
        """
        fixed = sorted(set(options) & {"order", "block", "tile", "score_method", "schedule", "calibration"})
        if fixed:
            raise ValueError(
                f"{fixed} come from the calibrated config {str(path)!r} and cannot be overridden; calibrate again "
                "to change them"
            )
        plan = CalibratedPlan.load(path)
        tile = cls.tile if plan.tile is None else plan.tile
        return cls(order=plan.order, block=plan.block, tile=tile, score_method=plan.method,
                   schedule=plan.schedule(calls_per_step), calibration=plan, **options)

    @property
    def kernel_precision(self) -> str:
        """The arithmetic of DFSAttn's attention calls: ``precision`` without "_dense", which says
        which calls run the kernel, not how it multiplies ("fp8_pv_dense" -> "fp8_pv")."""
        return self.precision.removesuffix("_dense")

    @property
    def dense_calls_through_kernel(self) -> bool:
        """Whether DFSAttn's dense warm-up calls run dfsviz's kernel with every block kept instead
        of the stock attention (a ``precision`` ending in "_dense")."""
        return self.precision.endswith("_dense")

    @property
    def name(self) -> str:
        """Self-describing key, e.g. "dfsattn_hilbert3d_dfs_tile_b128_t16_share_dfs_n50_s12_...". """
        once = "_once" if self.permute_once else ""
        unfused = "" if self.fused_ops else "_unfused"
        calibrated = "" if self.calibration is None else "_calibrated"
        precision = "" if self.precision == "native" else f"_{self.precision}"
        linear = "" if self.linear_precision == "native" else f"_linear_{self.linear_precision}"
        return (
            f"dfsattn_{self.order}_{self.score_method}_b{self.block}_t{self.tile}_{self.cfg}{once}{unfused}"
            f"{precision}{linear}_{self.schedule.name}{calibrated}"
        )

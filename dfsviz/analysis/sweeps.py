"""Token-model sweeps: set the factors, measure recall, for every token order.

The token model of docs/theory.md (:mod:`dfsviz.sparse.tokenmodel`) draws Q/K whose noise
``delta`` sets the diversities r and J and whose ``centre_spread`` sets the gap. A sweep
varies one of them over a list of values (and seeds), and for every token order and
scoring method measures, per head: the intra-block variance ratios W_q, W_k, the mean
per-query-block factors (Delta, r, J, the effective gap), the mean Bounds 2 and 3, the
recall R(S) of the top-k mask at budget gamma, the oracle recall R*(k), and the number of
query blocks where a bound exceeds the recall (must be 0). The result is a
:class:`~dfsviz.analysis.factors.FactorTable`, so any quantity can be plotted against the
swept value per order (:meth:`SweepResult.series`, :func:`dfsviz.figures.sweep_lines`).

:func:`write_token_model_capture` writes a capture file (the format of ``dfsviz.capture``)
from token-model draws instead of a model: each layer is its own draw, and its noise shrinks
over the steps, so attention concentrates as denoising proceeds. The report, the notebook and
the dashboard can be tried on it without a GPU or a checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass

import numpy as np
import torch

from dfsviz.analysis.factors import DEFAULT_ATOL, FactorTable
from dfsviz.analysis.measures import measure_orders
from dfsviz.sparse._validate import check_block, check_fraction, check_power_of_two
from dfsviz.sparse.orders import make_order, order_names
from dfsviz.sparse.scoring import block_scores_ref, scorer_names
from dfsviz.sparse.stats import block_stats_ref, variance_ratio
from dfsviz.sparse.tokenmodel import TokenModelConfig, sample_qk

__all__ = [
    "SWEEP_PARAMETERS",
    "SWEEP_QUANTITIES",
    "SweepConfig",
    "SweepResult",
    "sweep_token_model",
    "write_token_model_capture",
]

log = logging.getLogger(__name__)

#: Token-model fields a sweep can vary.
SWEEP_PARAMETERS: tuple[str, ...] = ("delta", "centre_spread")
#: Per-head quantities of a sweep table.
SWEEP_QUANTITIES: tuple[str, ...] = (
    "W_q", "W_k", "gap", "r_u", "J_u", "effective_gap", "bound2", "bound3", "recall", "oracle", "violations",
)


def _check_names(values: object, name: str, allowed: list[str]) -> tuple[str, ...]:
    if isinstance(values, str) or not isinstance(values, (tuple, list)) or not values:
        raise ValueError(f"`{name}` must be a non-empty tuple of names from {allowed} (got {values!r})")
    bad = [v for v in values if v not in allowed]
    if bad:
        raise ValueError(f"`{name}` must hold names from {allowed} (got unknown {bad})")
    return tuple(values)


@dataclass(frozen=True)
class SweepConfig:
    """A token-model sweep.

    Fields:
        base: the token model; every run replaces one field and the seed.
        parameter: the swept field, one of ``SWEEP_PARAMETERS``.
        values: the swept values (each must be valid for that field, e.g. delta >= 0).
        orders: token orders to compare (names of ``dfsviz.sparse.orders.ORDERS``); None = all.
        methods: scoring methods whose top-k masks are measured (``scorer_names()``).
        gamma: budget (kept fraction of key blocks) in (0, 1].
        block: tokens per block, a power of two in [16, 256].
        tile: tile size (dfs_tile) / stride (antidiagonal), a power of two in [1, block].
        seeds: token-model seeds; each value is drawn once per seed.
    """

    base: TokenModelConfig
    parameter: str = "delta"
    values: tuple[float, ...] = (0.1, 0.25, 0.5, 1.0)
    orders: tuple[str, ...] | None = None
    methods: tuple[str, ...] = ("meanpool", "dfs_tile")
    gamma: float = 0.2
    block: int = 64
    tile: int = 16
    seeds: tuple[int, ...] = (0,)

    def __post_init__(self) -> None:
        if not isinstance(self.base, TokenModelConfig):
            raise TypeError(f"`base` must be a TokenModelConfig (got {type(self.base).__name__})")
        if self.parameter not in SWEEP_PARAMETERS:
            raise ValueError(f"`parameter` must be one of {', '.join(SWEEP_PARAMETERS)} (got {self.parameter!r})")
        if isinstance(self.values, str) or not isinstance(self.values, (tuple, list)) or not self.values:
            raise ValueError(f"`values` must be a non-empty tuple of numbers (got {self.values!r})")
        for v in self.values:
            # The token model validates each value with its own message (e.g. delta >= 0).
            dataclasses.replace(self.base, **{self.parameter: v})
        object.__setattr__(self, "values", tuple(float(v) for v in self.values))
        orders = tuple(order_names()) if self.orders is None else self.orders
        object.__setattr__(self, "orders", _check_names(orders, "orders", order_names()))
        object.__setattr__(self, "methods", _check_names(self.methods, "methods", scorer_names()))
        check_fraction(self.gamma, "gamma")
        check_block(self.block)
        check_power_of_two(self.tile, "tile", 1, self.block)
        if isinstance(self.seeds, (str, int)) or not isinstance(self.seeds, (tuple, list)) or not self.seeds:
            raise ValueError(f"`seeds` must be a non-empty tuple of integers >= 0 (got {self.seeds!r})")
        if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in self.seeds):
            raise ValueError(f"`seeds` must hold integers >= 0 (got {self.seeds!r})")
        object.__setattr__(self, "seeds", tuple(self.seeds))

    @property
    def runs(self) -> int:
        """Token-model draws: len(values) * len(seeds)."""
        return len(self.values) * len(self.seeds)


@dataclass(frozen=True, eq=False)
class SweepResult:
    """The outcome of :func:`sweep_token_model`.

    Fields:
        config: the sweep.
        table: one row per (value, seed, order, method, head); columns ``value`` (float64,
            the swept parameter), ``seed``, ``order``, ``method``, ``head`` and
            ``SWEEP_QUANTITIES`` (float64; ``violations`` counts query blocks).
    """

    config: SweepConfig
    table: FactorTable

    def series(
        self, quantity: str, method: str | None = None
    ) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, tuple[np.ndarray, np.ndarray]]]:
        """``quantity`` against the swept value, per order: mean and (min, max) over seeds and heads.

        ``method`` picks the scoring method (default: the first of the sweep; W_q and W_k do
        not depend on it). Returns (values float64 [V], {order: mean [V]}, {order: (min [V], max [V])}).
        """
        if quantity not in SWEEP_QUANTITIES:
            raise ValueError(f"`quantity` must be one of {', '.join(SWEEP_QUANTITIES)} (got {quantity!r})")
        method = self.config.methods[0] if method is None else method
        if method not in self.config.methods:
            raise ValueError(f"`method` must be one of the sweep's methods {list(self.config.methods)} (got {method!r})")
        sub = self.table.select(method=method)
        xs = np.asarray(sorted(set(self.config.values)), dtype=np.float64)
        means: dict[str, np.ndarray] = {}
        bands: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for order in self.config.orders:
            rows = sub.select(order=order)
            vals = rows.column(quantity)
            xcol = rows.column("value")
            mean, lo, hi = (np.empty(xs.size) for _ in range(3))
            for i, x in enumerate(xs):
                y = vals[xcol == x]
                y = y[np.isfinite(y)]
                mean[i], lo[i], hi[i] = (y.mean(), y.min(), y.max()) if y.size else (np.nan,) * 3
            means[order], bands[order] = mean, (lo, hi)
        return xs, means, bands


def _finite_mean(x: torch.Tensor) -> torch.Tensor:
    """float64 [B, H]: mean over query blocks of the finite entries of x [B, H, Mq] (NaN if none)."""
    fin = torch.isfinite(x)
    total = torch.where(fin, x, torch.zeros_like(x)).sum(dim=-1)
    count = fin.sum(dim=-1)
    return torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, float("nan")))


def sweep_token_model(config: SweepConfig, *, atol: float = DEFAULT_ATOL) -> SweepResult:
    """Run a token-model sweep (see :class:`SweepConfig`) on the CPU reference implementations.

    For every value and seed, Q/K are drawn once (float64 when the base config asks for
    it; its dtype otherwise) and every order permutes the same tokens, so orders differ
    only in how blocks are cut. ``atol`` is the tolerance of the violation count.

    Returns:
        SweepResult with ``len(values) * len(seeds) * len(orders) * len(methods) * H`` rows.
    """
    if not isinstance(config, SweepConfig):
        raise TypeError(f"`config` must be a SweepConfig (got {type(config).__name__})")
    grid = config.base.grid
    cols: dict[str, list] = {name: [] for name in ("value", "seed", "order", "method", "head", *SWEEP_QUANTITIES)}
    for value in config.values:
        for seed in config.seeds:
            model = dataclasses.replace(config.base, **{config.parameter: value, "seed": seed})
            q, k = sample_qk(model)
            for measured in measure_orders(q, k, grid, config.orders, config.methods, (config.gamma,),
                                           block=config.block, tile=config.tile):
                for method, (topk,) in measured.topk.items():
                    fs = topk.factors
                    bad = ((fs["bound2"] > fs["recall"] + atol) | (fs["bound3"] > fs["recall"] + atol)).sum(dim=-1)[0]
                    per_head = {
                        "W_q": measured.W_q[0], "W_k": measured.W_k[0],
                        **{name: _finite_mean(fs[name])[0] for name in ("gap", "r_u", "J_u", "effective_gap", "bound2", "bound3")},
                        "recall": topk.recall[0], "oracle": topk.oracle_recall[0], "violations": bad.to(torch.float64),
                    }
                    for h in range(model.heads):
                        cols["value"].append(value)
                        cols["seed"].append(seed)
                        cols["order"].append(measured.order)
                        cols["method"].append(method)
                        cols["head"].append(h)
                        for name in SWEEP_QUANTITIES:
                            cols[name].append(float(per_head[name][h]))
            log.info("sweep %s=%g seed %d done", config.parameter, value, seed)
    table = FactorTable({
        "value": np.asarray(cols["value"], dtype=np.float64),
        "seed": np.asarray(cols["seed"], dtype=np.int64),
        "order": np.asarray(cols["order"], dtype=object),
        "method": np.asarray(cols["method"], dtype=object),
        "head": np.asarray(cols["head"], dtype=np.int64),
        **{name: np.asarray(cols[name], dtype=np.float64) for name in SWEEP_QUANTITIES},
    })
    return SweepResult(config, table)


def write_token_model_capture(
    path: str | os.PathLike,
    base: TokenModelConfig,
    *,
    num_steps: int = 10,
    steps: tuple[int, ...] = (0, 2, 3, 5, 6, 9),
    layers: int = 2,
    delta: tuple[float, float] = (1.0, 0.25),
    orders: tuple[str, ...] = ("raster", "hilbert3d"),
    methods: tuple[str, ...] = ("meanpool", "dfs_tile"),
    block: int = 64,
    tile: int = 16,
    stride: int = 8,
    footprints: int = 1,
    qkv_layers: tuple[int, ...] = (),
    overwrite: bool = False,
) -> str:
    """Write a capture file whose attention comes from the token model (no model, CPU only).

    Layer l draws Q/K with seed ``base.seed + 1000 * l``; at step t its noise is
    delta[0] + (delta[1] - delta[0]) * t / (num_steps - 1), so the block masses sharpen over
    the steps while the layout and the class centres stay fixed (masks drift smoothly).
    Statistics, scores, variance ratios and footprints are computed with the PyTorch
    references and written with :class:`dfsviz.capture.writer.CaptureWriter`.

    Args:
        path: output .h5 file.
        base: token model (grid, heads, head_dim, regions, ...); its ``delta`` is replaced.
        num_steps: steps of the simulated schedule (>= 1); steps: captured steps in [0, num_steps).
        layers: simulated layers (>= 1).
        delta: noise at the first and the last step (each >= 0).
        orders, methods, block, tile, stride, footprints: as in ``dfsviz capture``.
        qkv_layers: layers whose Q/K/V are stored (``--save-qkv``), float32. The token model
            defines Q and K only; V is drawn standard Gaussian from the layer's seed.
        overwrite: replace an existing file.

    Returns:
        ``path`` as a str; open it with ``dfsviz.open``.
    """
    from dfsviz.sparse.footprints import block_footprints, sample_query_blocks
    from dfsviz.capture.schema import StoreLayout
    from dfsviz.capture.writer import CaptureWriter

    if not isinstance(base, TokenModelConfig):
        raise TypeError(f"`base` must be a TokenModelConfig (got {type(base).__name__})")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"`num_steps` must be a positive integer (got {num_steps!r})")
    if isinstance(steps, (str, bytes)) or not isinstance(steps, (tuple, list)) or not steps or any(
        isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < num_steps for t in steps
    ) or list(steps) != sorted(set(steps)):
        raise ValueError(f"`steps` must be ascending distinct integers in [0, {num_steps}) (got {steps!r})")
    if isinstance(layers, bool) or not isinstance(layers, int) or layers < 1:
        raise ValueError(f"`layers` must be a positive integer (got {layers!r})")
    if not isinstance(delta, (tuple, list)) or len(delta) != 2:
        raise ValueError(f"`delta` must be a pair (first step, last step) of noise levels >= 0 (got {delta!r})")
    for d in delta:
        dataclasses.replace(base, delta=d)  # the token model validates each noise level
    _check_names(tuple(orders), "orders", order_names())
    _check_names(tuple(methods), "methods", scorer_names())
    check_block(block)
    if isinstance(qkv_layers, (str, bytes)) or not isinstance(qkv_layers, (tuple, list)) or any(
        isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < layers for i in qkv_layers
    ):
        raise ValueError(f"`qkv_layers` must hold layer indices in [0, {layers}) (got {qkv_layers!r})")
    grid = base.grid
    layout = StoreLayout(
        grid=grid, block=block, orders=tuple(orders), methods=tuple(methods), layers=tuple(range(layers)),
        layer_names=tuple(f"tokenmodel.layer{i}" for i in range(layers)), heads=tuple(range(base.heads)),
        branches=("cond",), steps=tuple(steps), footprints=footprints, head_dim=base.head_dim,
        qkv_layers=tuple(sorted(set(qkv_layers))), qkv_dtype="float32",
    )
    tiles = {"dfs_tile": tile, "antidiagonal": stride}
    config = {"token_model": repr(base), "num_steps": num_steps, "steps": list(steps), "layers": layers,
              "delta": list(delta), "block": block, "tile": tile, "stride": stride, "footprints": footprints}
    attrs = {"model_id": f"token model, grid {grid.name}, {base.num_regions} regions, noise {delta[0]:g} -> {delta[1]:g}",
             "model_class": "TokenModel", "adapter": "tokenmodel",
             "prompt": "", "seed": base.seed, "scheduler": "linear noise decay", "dtype": str(base.dtype).replace("torch.", ""),
             "device": "cpu", "num_steps": num_steps, "capture_config": json.dumps(config)}
    perms = {name: make_order(name, grid).perm for name in orders}
    scale = base.head_dim ** -0.5
    writer = CaptureWriter.create(path, layout, attrs, perms, overwrite=overwrite)
    try:
        for t in steps:
            noise = delta[0] + (delta[1] - delta[0]) * t / max(1, num_steps - 1)
            writer.begin_step(t, {"delta": noise})
            for layer in range(layers):
                model = dataclasses.replace(base, delta=noise, seed=base.seed + 1000 * layer)
                q, k = sample_qk(model)
                if layer in layout.qkv_layers:
                    gen = torch.Generator().manual_seed(model.seed + 7)
                    v = torch.randn(q.shape[1:], generator=gen, dtype=torch.float64).to(q.dtype)
                    writer.write_qkv(layer, "cond", q[0], k[0], v)
                for name in orders:
                    order = make_order(name, grid)
                    qo, ko = order.apply(q), order.apply(k)
                    stats = block_stats_ref(qo, ko, block=block)
                    scores = {m: block_scores_ref(qo, ko, method=m, tile=tiles.get(m, tile), block=block)[0] for m in methods}
                    writer.write_maps(layer, "cond", name, {n: getattr(stats, n)[0] for n in ("m", "L", "r", "J")},
                                      scores, variance_ratio(qo, block)[0], variance_ratio(ko, block)[0])
                    if footprints:
                        blocks = sample_query_blocks(stats.num_blocks, footprints, base.heads, base.seed + t + 1000 * layer)
                        writer.write_footprints(layer, "cond", name, blocks,
                                                block_footprints(q, k, order.perm, blocks, block, scale))
            writer.end_step()
        writer.finish()
    finally:
        writer.close()
    return str(path)

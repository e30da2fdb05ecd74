"""Factor summaries: the three factors of docs/theory.md and the recall bounds, as long-form tables.

:func:`factor_rows` turns one (block statistics, mask) pair into one table row per
(batch, head, query block) with the per-query-block quantities of
:func:`dfsviz.sparse.theory.factor_summary` (gamma, Delta, r, J, the effective gap,
Bound 2, Bound 3, the measured recall) plus key columns naming where the row came from
(order, method, selector, step, layer). :func:`variance_rows` does the same per head for
the intra-block variance ratios W_q and W_k. Tables concatenate, filter, group and
summarise, so distributions per order, method, step, layer or head are one call away,
and :meth:`FactorTable.violations` counts the rows where a bound exceeds the measured
recall (docs/theory.md: a violation is a bug).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from dfsviz.sparse.masks import BlockMask
from dfsviz.sparse.stats import BlockStats, variance_ratio
from dfsviz.sparse.theory import factor_summary

__all__ = [
    "BLOCK_FACTORS",
    "HEAD_FACTORS",
    "KEY_COLUMNS",
    "DEFAULT_ATOL",
    "FactorTable",
    "factor_rows",
    "variance_rows",
    "order_change",
]

#: Per-query-block quantities (float64), named as in ``theory.factor_summary``.
BLOCK_FACTORS: tuple[str, ...] = ("gamma", "gap", "r_u", "J_u", "effective_gap", "bound2", "bound3", "recall")
#: Per-head quantities (float64).
HEAD_FACTORS: tuple[str, ...] = ("W_q", "W_k")
#: Columns that say where a row comes from; absent keys are stored as "" (str) or -1 (int).
KEY_COLUMNS: tuple[str, ...] = ("order", "method", "selector", "step", "layer", "batch", "head", "u")
_STR_KEYS = ("order", "method", "selector")
_INT_KEYS = ("step", "layer", "batch", "head", "u")

#: Default tolerance of :meth:`FactorTable.violations`: statistics stored in float32 round
#: the measured recall and the bounds at about 1e-7 relative; 1e-5 leaves room for sums
#: over hundreds of blocks while any real violation (a wrong bound) is far larger.
DEFAULT_ATOL = 1e-5


def _key_values(keys: Mapping[str, object]) -> dict[str, object]:
    unknown = sorted(set(keys) - set(_STR_KEYS) - {"step", "layer"})
    if unknown:
        raise ValueError(
            f"unknown key column(s) {unknown}; allowed: order, method, selector, step, layer "
            "(batch, head and u are filled in from the tensors)"
        )
    out: dict[str, object] = {}
    for name in _STR_KEYS:
        value = keys.get(name, "")
        if not isinstance(value, str):
            raise TypeError(f"`{name}` must be a str (got {type(value).__name__})")
        out[name] = value
    for name in ("step", "layer"):
        value = keys.get(name, -1)
        if isinstance(value, bool) or not isinstance(value, int) or value < -1:
            raise ValueError(f"`{name}` must be an integer >= 0 (got {value!r}); omit it when unknown")
        out[name] = value
    return out


@dataclass(frozen=True, eq=False)
class FactorTable:
    """A long-form table: equal-length NumPy columns keyed by name.

    Key columns (``KEY_COLUMNS``): order, method, selector (str, "" when not applicable),
    step, layer, batch, head, u (int64, -1 when not applicable). Value columns: float64
    (``BLOCK_FACTORS`` for block tables from :func:`factor_rows`, ``HEAD_FACTORS`` for
    head tables from :func:`variance_rows`).
    """

    columns: dict[str, np.ndarray]

    def __post_init__(self) -> None:
        if not isinstance(self.columns, dict) or not self.columns:
            raise ValueError("`columns` must be a non-empty dict name -> 1-D array")
        lengths = {name: np.asarray(col).shape for name, col in self.columns.items()}
        if any(len(s) != 1 for s in lengths.values()) or len({s[0] for s in lengths.values()}) != 1:
            raise ValueError(f"`columns` must all be 1-D arrays of one length (got shapes {lengths})")

    def __len__(self) -> int:
        return next(iter(self.columns.values())).shape[0]

    @property
    def names(self) -> list[str]:
        """Column names."""
        return list(self.columns)

    def column(self, name: str) -> np.ndarray:
        """One column (no copy)."""
        if name not in self.columns:
            raise ValueError(f"`name` must be a column of this table: {', '.join(self.columns)} (got {name!r})")
        return self.columns[name]

    @classmethod
    def concat(cls, tables: Iterable["FactorTable"]) -> "FactorTable":
        """Rows of several tables with the same columns, in order."""
        tables = list(tables)
        if not tables or not all(isinstance(t, FactorTable) for t in tables):
            raise ValueError("`tables` must be a non-empty sequence of FactorTable")
        names = tables[0].names
        for t in tables[1:]:
            if t.names != names:
                raise ValueError(f"tables must share their columns to be concatenated (got {names} and {t.names})")
        return cls({n: np.concatenate([t.columns[n] for t in tables]) for n in names})

    def where(self, keep: np.ndarray) -> "FactorTable":
        """Rows where the bool array ``keep`` is True."""
        keep = np.asarray(keep)
        if keep.dtype != bool or keep.shape != (len(self),):
            raise ValueError(f"`keep` must be a bool array of one flag per row ({len(self)}) (got {keep.dtype}, {keep.shape})")
        return FactorTable({n: c[keep] for n, c in self.columns.items()})

    def select(self, **equal: object) -> "FactorTable":
        """Rows whose columns equal the given values, e.g. ``table.select(order="hilbert3d", step=12)``."""
        keep = np.ones(len(self), dtype=bool)
        for name, value in equal.items():
            keep &= self.column(name) == value
        return self.where(keep)

    def groups(self, by: str | Sequence[str]) -> dict[tuple, "FactorTable"]:
        """Sub-tables per distinct value of the ``by`` column(s), in order of first appearance.

        Keys are tuples of the group's values (one entry per ``by`` column).
        """
        cols = [by] if isinstance(by, str) else list(by)
        if not cols:
            raise ValueError("`by` must name at least one column, e.g. 'order'")
        keys = list(zip(*(self.column(c).tolist() for c in cols)))
        out: dict[tuple, list[int]] = {}
        for i, key in enumerate(keys):
            out.setdefault(key, []).append(i)
        return {k: FactorTable({n: c[np.asarray(v)] for n, c in self.columns.items()}) for k, v in out.items()}

    def summary(self, by: str | Sequence[str], factors: Sequence[str]) -> list[dict[str, object]]:
        """Per group of ``by``: count and mean / median / 5% / 95% quantiles of each factor.

        Non-finite values (Delta = +inf when a row keeps every block) are left out of the
        statistics of that factor and counted under ``"<factor>_nonfinite"``.
        """
        cols = [by] if isinstance(by, str) else list(by)
        rows = []
        for key, sub in self.groups(cols).items():
            row: dict[str, object] = dict(zip(cols, key))
            row["count"] = len(sub)
            for f in factors:
                x = sub.column(f).astype(np.float64)
                fin = x[np.isfinite(x)]
                row[f"{f}_nonfinite"] = int(x.size - fin.size)
                if fin.size:
                    row[f"{f}_mean"] = float(fin.mean())
                    row[f"{f}_median"] = float(np.median(fin))
                    row[f"{f}_q05"] = float(np.quantile(fin, 0.05))
                    row[f"{f}_q95"] = float(np.quantile(fin, 0.95))
                else:
                    row[f"{f}_mean"] = row[f"{f}_median"] = row[f"{f}_q05"] = row[f"{f}_q95"] = None
            rows.append(row)
        return rows

    def violations(self, atol: float = DEFAULT_ATOL) -> dict[str, object]:
        """Rows where a bound exceeds the measured recall by more than ``atol``.

        Needs the ``bound2``, ``bound3`` and ``recall`` columns (a table from :func:`factor_rows`).
        Returns ``{"rows": checked rows, "atol": atol, "bound2": count, "bound3": count,
        "bound3_over_bound2": count, "max_excess": largest bound - recall (may be < 0),
        "worst": key columns of the worst row or None}``.
        """
        if isinstance(atol, bool) or not isinstance(atol, (int, float)) or not 0.0 <= float(atol) < 1.0:
            raise ValueError(f"`atol` must be a tolerance in [0, 1) (got {atol!r}); 1e-5 suits float32 statistics")
        for name in ("bound2", "bound3", "recall"):
            self.column(name)
        b2, b3, rec = self.columns["bound2"], self.columns["bound3"], self.columns["recall"]
        excess = np.maximum(b2 - rec, b3 - rec)
        worst = None
        if len(self):
            i = int(np.argmax(excess))
            worst = {k: _scalar(self.columns[k][i]) for k in KEY_COLUMNS if k in self.columns}
        return {
            "rows": len(self),
            "atol": float(atol),
            "bound2": int((b2 > rec + atol).sum()),
            "bound3": int((b3 > rec + atol).sum()),
            "bound3_over_bound2": int((b3 > b2 + atol).sum()),
            "max_excess": float(excess.max()) if len(self) else None,
            "worst": worst,
        }

    def subsample(self, max_rows: int, seed: int = 0) -> "FactorTable":
        """At most ``max_rows`` rows drawn without replacement (fixed ``seed``), kept in table order."""
        if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1:
            raise ValueError(f"`max_rows` must be a positive integer (got {max_rows!r})")
        if len(self) <= max_rows:
            return self
        idx = np.sort(np.random.default_rng(seed).choice(len(self), size=max_rows, replace=False))
        return FactorTable({n: c[idx] for n, c in self.columns.items()})

    def to_records(self) -> list[dict[str, object]]:
        """Rows as dicts of Python scalars (for JSON)."""
        cols = {n: c.tolist() for n, c in self.columns.items()}
        return [dict(zip(cols, vals)) for vals in zip(*cols.values())]


def _scalar(x: object) -> object:
    """A NumPy scalar as the Python scalar (str and int stay as they are)."""
    return x.item() if hasattr(x, "item") else x


def _key_columns(keys: dict[str, object], b: int, h: int, mq: int | None) -> dict[str, np.ndarray]:
    """Key columns for rows laid out as [B, H] or [B, H, Mq] flattened in C order."""
    n = b * h * (mq if mq is not None else 1)
    bb, hh = np.meshgrid(np.arange(b), np.arange(h), indexing="ij")
    reps = mq if mq is not None else 1
    cols: dict[str, np.ndarray] = {}
    for name in _STR_KEYS:
        cols[name] = np.full(n, keys[name], dtype=object)
    for name in ("step", "layer"):
        cols[name] = np.full(n, keys[name], dtype=np.int64)
    cols["batch"] = np.repeat(bb.ravel(), reps).astype(np.int64)
    cols["head"] = np.repeat(hh.ravel(), reps).astype(np.int64)
    cols["u"] = np.tile(np.arange(mq), b * h).astype(np.int64) if mq is not None else np.full(n, -1, dtype=np.int64)
    return cols


def factor_rows(stats: BlockStats, mask: BlockMask, **keys: object) -> FactorTable:
    """One row per (batch, head, query block): the three factors, Bounds 2 and 3 and the recall.

    Args:
        stats: BlockStats of one attention call (one order's blocks), or the stored
            statistics of a capture (``CaptureReader.block_stats``, converted by
            ``StoredStats.to_block_stats``).
        mask: BlockMask chosen for it (any method, any selector).
        **keys: where the rows come from: ``order``, ``method``, ``selector`` (str) and
            ``step``, ``layer`` (int >= 0).

    Returns:
        FactorTable with ``KEY_COLUMNS`` and ``BLOCK_FACTORS`` columns, B * H * Mq rows.
    """
    from dfsviz.capture.reader import StoredStats

    if isinstance(stats, StoredStats):
        stats = stats.to_block_stats()
    elif not isinstance(stats, BlockStats):
        raise TypeError(
            f"`stats` must be a BlockStats or stored block statistics (StoredStats) "
            f"(got {type(stats).__name__}); use block_stats_ref or CaptureReader.block_stats"
        )
    return _summary_rows(factor_summary(stats, mask), keys)


def _summary_rows(summary: Mapping[str, torch.Tensor], keys: Mapping[str, object]) -> FactorTable:
    """The table of :func:`factor_rows` from a ``factor_summary`` dict and the key columns' values."""
    key_values = _key_values(keys)
    b, h, mq = summary["recall"].shape
    cols = _key_columns(key_values, b, h, mq)
    for name in BLOCK_FACTORS:
        cols[name] = summary[name].detach().cpu().numpy().astype(np.float64).ravel()
    return FactorTable(cols)


def variance_rows(
    q: torch.Tensor | None = None,
    k: torch.Tensor | None = None,
    *,
    block: int = 128,
    W_q: torch.Tensor | None = None,
    W_k: torch.Tensor | None = None,
    **keys: object,
) -> FactorTable:
    """One row per (batch, head) with the intra-block variance ratios W_q and W_k.

    Pass either Q/K in the studied order (``q``, ``k`` [B, H, N, D]; the ratios are
    computed with :func:`dfsviz.sparse.stats.variance_ratio` at ``block``), or the ratios
    already computed (``W_q``, ``W_k`` float [B, H], e.g. read from a capture).

    Returns:
        FactorTable with ``KEY_COLUMNS`` (u = -1) and ``HEAD_FACTORS`` columns, B * H rows.
    """
    key_values = _key_values(keys)
    given_qk = q is not None or k is not None
    given_w = W_q is not None or W_k is not None
    if given_qk == given_w:
        raise ValueError("pass either `q` and `k` (tokens) or `W_q` and `W_k` (ratios), not both and not neither")
    if given_qk:
        if q is None or k is None:
            raise ValueError("`q` and `k` must be given together")
        wq, wk = variance_ratio(q, block), variance_ratio(k, block)
    else:
        if W_q is None or W_k is None:
            raise ValueError("`W_q` and `W_k` must be given together")
        for name, w in (("W_q", W_q), ("W_k", W_k)):
            if not isinstance(w, torch.Tensor) or w.dim() != 2 or not w.is_floating_point():
                raise ValueError(f"`{name}` must be a float tensor [B, H] (got {getattr(w, 'shape', type(w).__name__)})")
        if W_q.shape != W_k.shape:
            raise ValueError(f"`W_q` and `W_k` must have one shape [B, H] (got {tuple(W_q.shape)} and {tuple(W_k.shape)})")
        wq, wk = W_q, W_k
    b, h = wq.shape
    cols = _key_columns(key_values, b, h, None)
    cols["W_q"] = wq.detach().cpu().numpy().astype(np.float64).ravel()
    cols["W_k"] = wk.detach().cpu().numpy().astype(np.float64).ravel()
    return FactorTable(cols)


def order_change(
    table: FactorTable,
    factor: str,
    *,
    base: str = "raster",
    other: str = "hilbert3d",
    match: Sequence[str] = ("method", "selector", "step", "layer", "batch", "head", "u"),
) -> dict[str, object]:
    """Paired change of a factor from order ``base`` to order ``other``.

    Rows of the two orders are paired on the ``match`` columns (same step, layer, head,
    ...; for head tables u = -1 matches). Non-finite values are dropped pairwise.

    Returns ``{"factor", "base", "other", "pairs", "base_mean", "other_mean", "difference":
    other_mean - base_mean, "relative_change": difference / |base_mean| (None when base_mean is 0),
    "other_lower": pairs where other < base, "other_lower_share": that count / pairs}``.
    Raises ValueError when no pair matches.
    """
    col = table.column(factor)
    orders = table.column("order")
    keys = [tuple(x) for x in zip(*(table.column(c).tolist() for c in match))]
    base_idx = {key: i for i, (key, o) in enumerate(zip(keys, orders)) if o == base}
    pairs = [(base_idx[key], i) for i, (key, o) in enumerate(zip(keys, orders)) if o == other and key in base_idx]
    if not pairs:
        present = sorted(set(orders.tolist()))
        raise ValueError(
            f"no rows of order {other!r} pair with order {base!r} on {list(match)} (orders present: {present}); "
            "capture both orders for the same steps, layers and heads"
        )
    bi = np.asarray([p[0] for p in pairs])
    oi = np.asarray([p[1] for p in pairs])
    x, y = col[bi].astype(np.float64), col[oi].astype(np.float64)
    fin = np.isfinite(x) & np.isfinite(y)
    x, y = x[fin], y[fin]
    if not x.size:
        raise ValueError(f"every paired value of {factor!r} is infinite; pick a budget that drops some blocks")
    base_mean, other_mean = float(x.mean()), float(y.mean())
    return {
        "factor": factor,
        "base": base,
        "other": other,
        "pairs": int(x.size),
        "base_mean": base_mean,
        "other_mean": other_mean,
        "difference": other_mean - base_mean,
        "relative_change": (other_mean - base_mean) / abs(base_mean) if base_mean != 0 else None,
        "other_lower": int((y < x).sum()),
        "other_lower_share": float((y < x).mean()),
    }

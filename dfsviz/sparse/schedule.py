"""DFSAttn's sparse-mask caching schedule with an adaptive budget.

Reproduces ``_compute_cache_schedule`` of the DFSAttn reference code. For a
transformer call index c, warm-up S0 and interval I (both in calls):

- c < S0: dense attention.
- r = floor((c - S0) / I); r_max = max(0, ceil(gamma0 / decrement) - 1) if decrement > 0
  else r; gamma = clip(gamma0 - min(r, r_max) * decrement, 0, 1), the KEPT fraction of key
  blocks; the mask is recomputed (refresh) when r <= r_max and (c - S0) % I == 0, and the
  layer's cached mask is reused otherwise.

All arithmetic is Python float arithmetic as in the reference: ceil(0.3 / 0.1) is 3, and
the budgets are 0.3, 0.19999999999999998 and 0.09999999999999998. Wan runs CFG as two
transformer calls per step (cond, then uncond) and the reference counts calls, so with
``calls_per_step=2`` S0 and I are doubled; the refresh fires on the cond call and the
uncond call reuses that mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dfsviz.sparse._validate import check_int
from dfsviz.sparse.select import topk_count

__all__ = ["DFSSchedule", "StepPlan"]


@dataclass(frozen=True)
class StepPlan:
    """What the schedule does at one transformer call.

    Fields:
        step: diffusion step index in [0, num_steps).
        call: transformer call index c = step * calls_per_step + j (j = 0 is the cond call).
        dense: True during warm-up (c < S0): dense attention, no mask.
        refresh: True when this call recomputes the mask; False reuses the cached one.
        gamma: kept fraction of key blocks in [0, 1] (None when dense), as a float exactly as
            the reference computes it.
        interval: r = floor((c - S0) / I), the budget interval index (None when dense).
    """

    step: int
    call: int
    dense: bool
    refresh: bool
    gamma: float | None
    interval: int | None

    def k_for(self, num_kv_blocks: int) -> int:
        """Kept key blocks per query block: Mk when dense, else max(1, int(gamma * Mk))."""
        if self.dense:
            if isinstance(num_kv_blocks, bool) or not isinstance(num_kv_blocks, int) or num_kv_blocks < 1:
                raise ValueError(f"`num_kv_blocks` must be a positive integer Mk (got {num_kv_blocks!r})")
            return num_kv_blocks
        return topk_count(self.gamma, num_kv_blocks)


@dataclass(frozen=True)
class DFSSchedule:
    """DFSAttn mask-caching schedule (defaults: the paper's Wan/HunyuanVideo settings).

    Fields:
        num_steps: diffusion steps per video, >= 1 (50).
        skip_steps: dense warm-up steps, in [0, num_steps] (12; the paper's "25%" is 12/50).
        interval: steps between mask refreshes and budget decrements, >= 1 (12).
        gamma0: kept fraction of key blocks in the first sparse interval, in (0, 1] (0.3).
        decrement: budget decrease per interval, in [0, 1] (0.1); 0 keeps gamma0 and
            refreshes every interval forever.
        dense_layers: self-attention layer indices that stay dense, each >= 0 (Wan (0,);
            HunyuanVideo ()). Stored sorted and without repeats.
        calls_per_step: transformer calls per step, >= 1: 1 for HunyuanVideo (embedded
            guidance), 2 for Wan (CFG cond + uncond), which doubles S0 and the interval in
            calls exactly as the reference does.
    """

    num_steps: int = 50
    skip_steps: int = 12
    interval: int = 12
    gamma0: float = 0.3
    decrement: float = 0.1
    dense_layers: tuple[int, ...] = (0,)
    calls_per_step: int = 1

    def __post_init__(self) -> None:
        check_int(self.num_steps, "num_steps", 1, "the sampler's number of inference steps, e.g. 50")
        check_int(self.skip_steps, "skip_steps", 0, "dense warm-up steps, e.g. 12")
        if self.skip_steps > self.num_steps:
            raise ValueError(
                f"`skip_steps` must be in [0, num_steps={self.num_steps}] (got {self.skip_steps}); "
                "use skip_steps = num_steps for an all-dense run"
            )
        check_int(self.interval, "interval", 1, "steps between mask refreshes, e.g. 12")
        check_int(self.calls_per_step, "calls_per_step", 1, "1 without CFG batching, 2 for Wan's CFG")
        g = self.gamma0
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not 0.0 < g <= 1.0:
            raise ValueError(f"`gamma0` must be a kept fraction in (0, 1] (got {g!r}); DFSAttn uses 0.3")
        d = self.decrement
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 <= d <= 1.0:
            raise ValueError(f"`decrement` must be in [0, 1] (got {d!r}); DFSAttn uses 0.1, 0 keeps gamma0")
        layers = self.dense_layers
        if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
            raise TypeError(f"`dense_layers` must be a tuple of layer indices (got {type(layers).__name__})")
        layers = tuple(layers)
        if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in layers):
            raise ValueError(f"`dense_layers` must hold integers >= 0 (got {layers!r}); Wan uses (0,)")
        object.__setattr__(self, "dense_layers", tuple(sorted(set(layers))))
        object.__setattr__(self, "gamma0", float(g))
        object.__setattr__(self, "decrement", float(d))

    # ------------------------------------------------------------------ derived
    @property
    def warmup_calls(self) -> int:
        """S0 in transformer calls (skip_steps * calls_per_step)."""
        return self.skip_steps * self.calls_per_step

    @property
    def interval_calls(self) -> int:
        """Refresh interval I in transformer calls (interval * calls_per_step)."""
        return self.interval * self.calls_per_step

    @property
    def max_interval(self) -> int | None:
        """r_max = max(0, ceil(gamma0 / decrement) - 1), or None (unbounded) when decrement = 0."""
        if self.decrement > 0:
            return max(0, math.ceil(self.gamma0 / self.decrement) - 1)
        return None

    @property
    def name(self) -> str:
        """Self-describing key, e.g. "dfs_n50_s12_i12_g0.30_d0.10_c1_L0"."""
        layers = "-".join(str(i) for i in self.dense_layers) or "none"
        return (
            f"dfs_n{self.num_steps}_s{self.skip_steps}_i{self.interval}_g{self.gamma0:.2f}_"
            f"d{self.decrement:.2f}_c{self.calls_per_step}_L{layers}"
        )

    # ------------------------------------------------------------------ queries
    def at_call(self, call: int) -> StepPlan:
        """Plan of transformer call ``call`` in [0, num_steps * calls_per_step)."""
        total = self.num_steps * self.calls_per_step
        if isinstance(call, bool) or not isinstance(call, int) or not 0 <= call < total:
            raise ValueError(
                f"`call` must be an integer in [0, num_steps * calls_per_step = {total}) (got {call!r})"
            )
        step = call // self.calls_per_step
        s0, every = self.warmup_calls, self.interval_calls
        if call < s0:
            return StepPlan(step, call, True, False, None, None)
        r = (call - s0) // every
        r_max = self.max_interval if self.decrement > 0 else r
        gamma = min(max(self.gamma0 - min(r, r_max) * self.decrement, 0.0), 1.0)
        refresh = r <= r_max and (call - s0) % every == 0
        return StepPlan(step, call, False, refresh, gamma, r)

    def at_step(self, step: int) -> StepPlan:
        """Plan of the first (cond) call of diffusion step ``step`` in [0, num_steps)."""
        if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < self.num_steps:
            raise ValueError(f"`step` must be an integer in [0, num_steps = {self.num_steps}) (got {step!r})")
        return self.at_call(step * self.calls_per_step)

    def plan(self) -> list[StepPlan]:
        """One :class:`StepPlan` per transformer call, in call order (num_steps * calls_per_step)."""
        return [self.at_call(c) for c in range(self.num_steps * self.calls_per_step)]

    def layer_is_dense(self, layer: int) -> bool:
        """True when self-attention layer ``layer`` (>= 0) always runs dense."""
        check_int(layer, "layer", 0, "transformer block index")
        return layer in self.dense_layers

    def topk_for(self, gamma: float, num_kv_blocks: int) -> int:
        """k = max(1, int(gamma * Mk)), the reference's per-row key-block budget."""
        return topk_count(gamma, num_kv_blocks)

    def table(self, num_kv_blocks: int | None = None) -> str:
        """Readable per-step table: step, calls, attention, gamma, refresh, and top-k if Mk given."""
        head = ["step", "calls", "attention", "gamma", "refresh"]
        if num_kv_blocks is not None:
            head.append(f"top-k/{num_kv_blocks}")
        rows = [head]
        for step in range(self.num_steps):
            plans = [self.at_call(step * self.calls_per_step + j) for j in range(self.calls_per_step)]
            first = plans[0]
            calls = ",".join(str(p.call) for p in plans)
            refreshed = [str(p.call) for p in plans if p.refresh]
            row = [
                str(step),
                calls,
                "dense" if first.dense else "sparse",
                "-" if first.dense else repr(first.gamma),
                "call " + ",".join(refreshed) if refreshed else ("-" if first.dense else "reuse"),
            ]
            if num_kv_blocks is not None:
                row.append(str(first.k_for(num_kv_blocks)))
            rows.append(row)
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
        dense = ", ".join(str(i) for i in self.dense_layers) or "none"
        lines.append(f"dense layers: {dense}; calls per step: {self.calls_per_step}")
        return "\n".join(lines)

"""Schedule position, mask cache and per-call records of one :func:`~dfsviz.accel.apply_dfsattn`.

Masks are cached per (layer, branch, sequence length) together with the refresh step they
belong to: a mask is reused until the schedule's next refresh step. CFG: a batch with an
even number of elements is [cond, uncond] halves (``DFSConfig.cond_index`` says which is
cond); with ``cfg="share"`` only the cond half is scored and both halves use its mask;
branches run as separate transformer calls are the calls of one step in order (cond
first), and the later calls reuse the first call's mask under "share". A pipeline with two
transformers (Wan 2.2 A14B) shares one state: steps count the calls of both, and a switch to
the other transformer drops the cache (its masks do not serve the other weights), so its
first sparse call scores its own.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from dfsviz.sparse.grid import LatentGrid
from dfsviz.sparse.masks import BlockMask
from dfsviz.sparse.orders import TokenOrder
from dfsviz.sparse.schedule import DFSSchedule, StepPlan

__all__ = ["DFSState", "SparseCall"]

logger = logging.getLogger(__name__)


@dataclass
class _CacheEntry:
    epoch: int  # the refresh step this mask belongs to
    mask: BlockMask  # as scored (batch of the scored elements)
    density: float  # mean rho(S) over batch and heads
    expanded: dict = field(default_factory=dict)  # call batch size -> BlockMask for that batch


@dataclass(frozen=True)
class SparseCall:
    """One attention call DFSAttn computed, as :attr:`DFSState.observers` see it.

    Fields:
        layer: the DFSAttn layer index.
        q, k, v: [B, H, N, D] in the call's own token order (raster video, text where the
            model puts it; permute-once's order undone), the real (unpadded) tokens only.
        scale: the softmax scale, or None for D**-0.5.
        mask: the blocks attended: a :class:`~dfsviz.sparse.masks.BlockMask` [B, H, Mq, Mk]
            over the tokens in ``order``; every block on the dense steps of a ``precision`` ending in ``"_dense"``.
        order: the token order name the mask's blocks are made of.
        refresh: this call scored its mask (False: a cached mask served it).
        first_head: the model's head that q, k, v, mask's head 0 is: the rank's first head under
            diffusers' Ulysses context parallelism (H is then the rank's heads), else 0.
    """

    layer: int
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    scale: float | None
    mask: BlockMask
    order: str
    refresh: bool
    first_head: int


@dataclass
class _CallContext:
    call: int  # transformer calls before this one (since the state was created or reset)
    step: int
    branch: int  # index of this call within its step (0 = cond)
    plan: StepPlan
    grid: LatentGrid
    transformer: int = 0  # which of the pipeline's transformers (0: `transformer`, 1: `transformer_2`)
    ordered: bool = False  # permute-once: tokens are in the DFS order right now
    order: TokenOrder | None = None
    permuted: dict = field(default_factory=dict)  # permute-once: id(original table) -> permuted table
    key_masks: dict = field(default_factory=dict)  # id(key mask) -> (mask, real length), checked once per call


class DFSState:
    """Schedule position, mask cache and per-call records of one :func:`apply_dfsattn`.

    The schedule position comes from either

    * counting transformer calls (default): call c of a video is step
      ``c // schedule.calls_per_step``, branch ``c % calls_per_step``; the counter wraps
      after ``num_steps * calls_per_step`` calls (a new video) and then drops the cache. A call
      at the wrap whose timestep moves on the way the video's timesteps moved is refused
      (ValueError): the pipeline runs more calls than the schedule counts for one video; a call
      whose timestep starts over before the wrap starts a new video (logged: the last one made
      fewer calls than that), counted from step 0 with the cache dropped; or
    * an explicit step: ``state.set_step(i)`` before the transformer calls of step i (e.g.
      from a pipeline's ``callback_on_step_end``); the calls after it are branches 0, 1, ...

    Attributes:
        calls: transformer calls seen.
        step: the explicit step, or None when calls are counted.
        scorer_calls: masks computed (one per refreshed layer and branch).
        records: one dict per sparse attention call: call, step, branch, transformer (0, or 1
            for a pipeline's ``transformer_2``), layer, gamma (the
            schedule's, or the tuple of per-head budgets of a calibrated plan, None = dense head),
            refresh (this call computed the mask), density (mean rho of the mask), and
            recall and oracle_recall (float64 [B, H] on the CPU: the mask's recall, and the best
            recall of any mask with the same kept count per query block) when
            ``DFSConfig.measure_recall``.
        observers: callables handed a :class:`SparseCall` for every attention call DFSAttn
            computes (not the stock dense ones), inside the forward; ``dfsviz.record`` adds one
            to store the masks DFSAttn used. Empty by default: nothing is copied for them.
    """

    def __init__(self, schedule: DFSSchedule) -> None:
        if not isinstance(schedule, DFSSchedule):
            raise TypeError(f"`schedule` must be a DFSSchedule (got {type(schedule).__name__})")
        self.schedule = schedule
        self.observers: list = []
        self.reset()

    def reset(self) -> None:
        """Forget the position, the cached masks and the records (start of a new video)."""
        self.calls = 0
        self.step: int | None = None
        self._step_calls = 0
        self.scorer_calls = 0
        self.records: list[dict] = []
        self.masks: dict[tuple[int, int, int], _CacheEntry] = {}
        self.current: _CallContext | None = None
        self._transformer: int | None = None  # the transformer whose masks are cached
        self._video_start = 0  # counted calls: the call that started the current video
        self._forget_timesteps()

    def set_step(self, step: int) -> None:
        """Run the next transformer calls as diffusion step ``step`` in [0, num_steps)."""
        n = self.schedule.num_steps
        if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < n:
            raise ValueError(f"`step` must be an integer in [0, num_steps = {n}) (got {step!r})")
        self.step = step
        self._step_calls = 0

    def use_call_count(self) -> None:
        """Go back to counting transformer calls (drops the explicit step)."""
        self.step = None
        self._forget_timesteps()

    def _begin(self, grid: LatentGrid, transformer: int = 0, timestep: float | None = None) -> _CallContext:
        """Start a transformer call: its step, branch and plan. ``timestep``: the call's timestep as
        one number (None: unknown), which lets counted calls tell a new video from extra steps."""
        sched = self.schedule
        if self.step is None:
            total = sched.num_steps * sched.calls_per_step
            c = (self.calls - self._video_start) % total
            move = self._timestep_move(timestep)
            if c and move < 0:  # the timesteps start over: a new video before the schedule's end
                logger.warning("DFSAttn: transformer call %d starts the timesteps over (%g after %g) after %d of the "
                               "%d calls the schedule counts for one video (num_steps %d x calls_per_step %d): the "
                               "last video ran fewer steps than num_steps, or fewer transformer calls a step than "
                               "calls_per_step; this one counts from step 0", self.calls,
                               timestep, self._last_timestep, c, total, sched.num_steps, sched.calls_per_step)
                self._video_start, c = self.calls, 0
            if c == 0 and self.calls > 0:
                if move > 0:
                    raise self._past_schedule_error(timestep)
                self.masks.clear()  # a new video: masks of the last one are stale
                self._forget_timesteps()
            step, branch = c // sched.calls_per_step, c % sched.calls_per_step
            self._follow_timestep(timestep)
        else:
            step, branch = self.step, self._step_calls
            self._step_calls += 1
        if transformer != self._transformer:
            if self.masks:
                logger.info("DFSAttn: step %d runs transformer %d; the masks of transformer %s are dropped",
                            step, transformer, self._transformer)
            self.masks.clear()
            self._transformer = transformer
        ctx = _CallContext(self.calls, step, branch, sched.at_step(step), grid, transformer)
        self.calls += 1
        self.current = ctx
        return ctx

    def _forget_timesteps(self) -> None:
        # counted calls: the last timestep of this video and the way its timesteps moved (+1 / -1, 0: not yet)
        self._last_timestep: float | None = None
        self._timestep_direction = 0

    def _follow_timestep(self, timestep: float | None) -> None:
        if timestep is None:
            return
        if self._last_timestep is not None and timestep != self._last_timestep:
            self._timestep_direction = 1 if timestep > self._last_timestep else -1
        self._last_timestep = timestep

    def _timestep_move(self, timestep: float | None) -> int:
        """1 when the call moves the timesteps on the way this video's moved, -1 when against it (they
        start over: a new video), 0 when it cannot tell (no timestep or way yet, the same timestep)."""
        if timestep is None or self._last_timestep is None:
            return 0
        moved = (timestep - self._last_timestep) * self._timestep_direction
        return (moved > 0) - (moved < 0)

    def _past_schedule_error(self, timestep: float) -> ValueError:
        """The call that wraps the counter continues the last video's timesteps."""
        sched = self.schedule
        return ValueError(
            f"the pipeline runs more transformer calls than the DFSAttn schedule counts for one video (num_steps "
            f"{sched.num_steps} x calls_per_step {sched.calls_per_step}): call {self.calls} continues the video's "
            f"timesteps ({timestep:g} after {self._last_timestep:g}) where a new video would start over; pass "
            f"num_inference_steps={sched.num_steps}, set calls_per_step to the transformer calls of one step (2 for "
            "CFG run as two calls), or drive the steps with handle.step_callback"
        )

    def epoch(self, step: int) -> int:
        """The refresh step whose mask serves ``step``: the latest s <= step with a refresh."""
        for s in range(step, -1, -1):
            if self.schedule.at_step(s).refresh:
                return s
        raise ValueError(f"step {step} is dense under {self.schedule.name}; no mask serves it")

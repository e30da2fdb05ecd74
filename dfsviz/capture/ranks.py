"""Capture on several ranks under ``torchrun``: diffusers' Ulysses context parallelism (each rank
reduces its own heads, rank 0 writes the one file), or a run set's clips spread over the ranks.

Under ``ContextParallelConfig(ulysses_degree=P)`` diffusers splits the sequence over the P ranks
and, around every attention call, all-to-alls Q, K and V so that rank r holds the whole sequence
of heads [r H/P, (r+1) H/P); the SDPA call between the two all-to-alls (the native backend's)
is the one the capture's SDPA wrapper sees, [B, H/P, N, D]. So every rank reduces the captured
heads it holds to maps, exactly as one process reduces all of them, and :class:`RankWriter`
gathers each (layer, branch, order)'s maps of all heads onto rank 0, whose
:class:`~dfsviz.capture.writer.CaptureWriter` writes the usual single file. One (layer, branch,
order) of maps is in flight at a time, as in one process; a step is marked complete only after
rank 0 holds every rank's maps of it, and every rank learns whether it was.

:func:`join_world` starts the process group ``torchrun`` describes and :func:`enable_ulysses`
enables diffusers' Ulysses attention on a transformer (``dfsviz capture --context-parallel ulysses``);
:func:`UlyssesRanks.of` reads it from a transformer the caller set up (``dfsviz.record``).

:class:`ClipRanks` is the data-parallel kind (``dfsviz capture --prompts/--seeds`` under torchrun
without ``--context-parallel``): each rank captures whole clips of a run set on its own device, and
the ranks meet only to start the run set together and to end it
(:func:`~dfsviz.capture.runset.capture_run_set`).
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import json
import os
import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, TypeVar

import torch

__all__ = [
    "ClipRanks",
    "RankWriter",
    "UlyssesRanks",
    "agree",
    "check_degree",
    "check_rank_device",
    "check_same_run",
    "enable_ulysses",
    "join_world",
    "leave_world",
    "on_rank_0",
    "together",
    "world_size",
]

T = TypeVar("T")

# How long a rank that has captured its share of a run set waits at the end for the slowest
# rank (about one clip's capture: hours for a large model). A rank that dies is seen by torchrun,
# which stops the others, so the bound only ends a rank hung without dying.
_CLIP_WAIT = timedelta(days=7)

#: what a capture cannot take among diffusers' kinds of parallelism, and why
_REFUSED = {
    "ring": "ring attention splits the keys of every head over the ranks, so no rank sees a head's whole "
            "attention; use ContextParallelConfig(ulysses_degree=P)",
    "ulysses_anything": "ulysses_anything pads the heads and splits the sequence unevenly; use ulysses_anything=False",
    "tensor": "tensor parallelism shards the projection weights, not the attention; use "
              "ContextParallelConfig(ulysses_degree=P)",
}


def _heads_of(model: torch.nn.Module) -> int:
    return int(model.config.num_attention_heads)


class _Ranks:
    """What every kind of ranks offers: ``rank`` (this process's) and ``group`` (the process group
    of its collectives) are the subclass's fields."""

    @property
    def writes(self) -> bool:
        """True on rank 0, which writes (a Ulysses capture's file; a run set's first manifest)."""
        return self.rank == 0

    def share(self, value):
        """Rank 0's ``value`` on every rank (any picklable object). Collective."""
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, group=self.group, group_src=0)
        return box[0]

    def gather(self, value) -> list:
        """Every rank's ``value`` (any picklable object), in rank order, on every rank. Collective."""
        import torch.distributed as dist

        values = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(values, value, group=self.group)
        return values


@dataclass(frozen=True)
class UlyssesRanks(_Ranks):
    """This process's place in diffusers' Ulysses group.

    Fields:
        rank: the rank in the Ulysses group (it holds heads [rank H/P, (rank+1) H/P)).
        degree: P, the ranks of the group.
        num_heads: H, the model's attention heads.
        group: the ``torch.distributed`` process group of the Ulysses mesh.
    """

    rank: int
    degree: int
    num_heads: int
    group: object

    @classmethod
    def of(cls, model: torch.nn.Module) -> "UlyssesRanks | None":
        """The Ulysses group ``model`` runs in, or None without diffusers' parallelism.

        Raises ValueError for ring attention, ``ulysses_anything``, tensor parallelism and a degree
        that does not divide the heads (one line each).
        """
        parallel = getattr(model, "_parallel_config", None)
        if parallel is None:
            return None
        name = type(model).__name__
        cp = getattr(parallel, "context_parallel_config", None)
        if cp is None:
            raise ValueError(f"capture under tensor parallelism ({name}): {_REFUSED['tensor']}")
        if cp.ring_degree > 1:
            raise ValueError(f"capture under ring attention ({name}, ring_degree={cp.ring_degree}): {_REFUSED['ring']}")
        if cp.ulysses_anything:
            raise ValueError(f"capture under Ulysses attention ({name}): {_REFUSED['ulysses_anything']}")
        heads = _heads_of(model)
        check_degree(cp.ulysses_degree, heads, name)
        return cls(int(cp._ulysses_local_rank), int(cp.ulysses_degree), heads, cp._ulysses_mesh.get_group())

    def held(self, heads: tuple[int, ...]) -> tuple[int, ...]:
        """The heads of ``heads`` (model indices, ascending) this rank holds."""
        per_rank = self.num_heads // self.degree
        return tuple(h for h in heads if self.rank * per_rank <= h < (self.rank + 1) * per_rank)

    def local(self, heads: tuple[int, ...]) -> tuple[int, ...]:
        """The rank's own heads of ``heads`` as indices into its [B, H/P, N, D] attention inputs."""
        first = self.rank * (self.num_heads // self.degree)
        return tuple(h - first for h in self.held(heads))

    def gather_heads(self, x: torch.Tensor, heads: tuple[int, ...]) -> torch.Tensor | None:
        """Every rank's ``x`` (its held heads of ``heads`` along dim 0) joined on rank 0, heads in
        model order; None on the other ranks. Collective: every rank calls it with its own ``x``."""
        import torch.distributed as dist

        counts = [len(UlyssesRanks(r, self.degree, self.num_heads, None).held(heads)) for r in range(self.degree)]
        width = max(counts)
        dtype = x.dtype
        x = x.to(torch.uint8) if dtype == torch.bool else x  # NCCL moves no bool
        padded = x.new_zeros((width, *x.shape[1:]))
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in counts] if self.writes else None
        dist.gather(padded.contiguous(), parts, group=self.group, group_dst=0)
        if not self.writes:
            return None
        return torch.cat([part[:count] for part, count in zip(parts, counts)]).to(dtype)


@dataclass(frozen=True)
class ClipRanks(_Ranks):
    """This process's place among the ranks of a data-parallel run set: each rank captures whole
    clips on its own device.

    Fields:
        rank: this process's rank in the torchrun world.
        size: P, the ranks.
        group: a gloo process group over every rank for the run set's collectives: small objects,
            on the CPU whatever the device, and the last one waits for the slowest rank's clips.
    """

    rank: int
    size: int
    group: object

    @classmethod
    def join(cls, device: torch.device) -> "ClipRanks":
        """Join the world ``torchrun`` describes (:func:`join_world`: on CUDA each rank takes its
        ``LOCAL_RANK``'s GPU). Collective."""
        import torch.distributed as dist

        rank = join_world(device)
        return cls(rank, dist.get_world_size(), dist.new_group(backend="gloo", timeout=_CLIP_WAIT))

    def deal(self, indices: list[int]) -> list[int]:
        """This rank's share of ``indices`` (the clips still to capture, in order): the r-th,
        (r+P)-th, (r+2P)-th, ... of them. The clips of a run set cost alike (one model, one size,
        the same steps), so the shares differ by one clip at most; a rank past the last clip has
        none."""
        return list(indices[self.rank::self.size])


def world_size() -> int:
    """The ranks of this process's world: the process group's once joined, else what torchrun
    set in ``WORLD_SIZE`` (1 outside torchrun)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_rank_device(device: str, under: str) -> None:
    """Each rank takes its ``LOCAL_RANK``'s GPU: a ``device`` naming one GPU is refused, ``under``
    saying when ("under torchrun")."""
    if re.fullmatch(r"cuda:\d+", device):
        raise ValueError(f"`device` {device!r} names one GPU; {under} each rank takes its LOCAL_RANK's GPU: "
                         "pass --device cuda")


def check_degree(degree: int, heads: int, name: str) -> None:
    """A Ulysses degree must divide the heads: one line naming the degrees that do."""
    if heads % degree:
        raise ValueError(
            f"capture under Ulysses attention: {degree} ranks do not divide the {heads} heads of {name}; use "
            f"torchrun --nproc-per-node in {[d for d in range(1, heads + 1) if heads % d == 0]}"
        )


@contextlib.contextmanager
def _cpu_counts_as_one_device():
    """diffusers 0.42's ``enable_parallelism`` places rank r on device r % the accelerator count,
    a division by zero on a host without one (docs/accel.md): while it runs, the CPU counts as one
    device; restored after."""
    if torch.accelerator.is_available():
        yield
        return
    original = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: 1
    try:
        yield
    finally:
        torch.accelerator.device_count = original


def join_world(device: torch.device) -> int:
    """Join the process group ``torchrun`` describes (NCCL on CUDA, gloo on the CPU; kept when
    one is initialised already) and return this process's rank. On CUDA each rank takes the
    GPU of its ``LOCAL_RANK``.

    Raises ValueError outside ``torchrun``.
    """
    import torch.distributed as dist

    if not dist.is_initialized():
        if "WORLD_SIZE" not in os.environ:
            raise ValueError(
                "--context-parallel ulysses runs under torchrun: torchrun --nproc-per-node P -m dfsviz capture ... "
                "(no torch.distributed world is set up in this process)"
            )
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        # left to interpreter teardown, gloo's worker threads can abort the process (SIGABRT,
        # "terminate called without an active exception") after the run has ended well
        atexit.register(leave_world)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return dist.get_rank()


def leave_world() -> None:
    """Destroy the process groups of this process's world, if it still has one, and free them now
    (:func:`join_world` registers this at exit; a script that started the world itself calls it
    after its last collective, once it no longer holds the models it parallelised).

    ``destroy_process_group`` only drops torch's own references: diffusers' device mesh keeps its
    groups in ``DeviceMesh._pg_registry``, which the model's parallelism hooks hold in reference
    cycles. Those are freed only by the garbage collector, and without this collection that is
    Python's last one, run after the interpreter is marked finalizing: gloo's threads are then
    torn down in the window where a thread that takes the GIL is ended by ``pthread_exit``, whose
    unwinding through C++ ends in ``std::terminate`` ("terminate called without an active
    exception", SIGABRT) on a loaded machine. Collected here, at exit's atexit at the latest, the
    groups are destroyed and their threads joined while the interpreter is still whole."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
        gc.collect()


def enable_ulysses(model: torch.nn.Module) -> UlyssesRanks:
    """Enable diffusers' Ulysses attention over the whole world (:func:`join_world`) on ``model``.

    Raises ValueError for a class without diffusers' context-parallel plan and for a world size
    that does not divide the heads.
    """
    import diffusers
    import torch.distributed as dist

    name = type(model).__name__
    if getattr(type(model), "_cp_plan", None) is None:
        raise ValueError(
            f"capture under Ulysses attention: diffusers has no context-parallel plan (`_cp_plan`) for {name}; "
            "capture it in one process"
        )
    check_degree(dist.get_world_size(), _heads_of(model), name)
    with _cpu_counts_as_one_device():
        model.enable_parallelism(config=diffusers.ContextParallelConfig(ulysses_degree=dist.get_world_size()))
    return UlyssesRanks.of(model)


def agree(ranks: _Ranks, problem: str | None) -> None:
    """Every rank raises the lowest rank's ``problem`` (a one-line message, None = none), so that
    no rank goes on to wait for the others alone. Collective."""
    first = next((p for p in ranks.gather(problem) if p is not None), None)
    if first is not None:
        raise ValueError(first)


@contextlib.contextmanager
def together(ranks: _Ranks | None):
    """A ValueError raised inside the block on any rank is raised on every rank after it (the
    lowest rank's), so that no rank goes on to a collective a failed one never reaches. Nothing
    changes in one process (``ranks`` None). Collective."""
    if ranks is None:
        yield
        return
    problem = None
    try:
        yield
    except ValueError as exc:
        problem = str(exc)
    agree(ranks, problem)


def on_rank_0(ranks: _Ranks | None, action: Callable[[], T]) -> T:
    """``action()`` run on rank 0 alone (in the one process when ``ranks`` is None), its result
    shared with every rank; its ValueError is raised on every rank. Collective."""
    if ranks is None:
        return action()
    result = None
    with together(ranks):
        if ranks.writes:
            result = action()
    return ranks.share(result)


def check_same_run(ranks: _Ranks, identity: dict, what: str) -> None:
    """Every rank must run rank 0's ``identity`` (as ``--resume`` compares it): any other raises
    one line on every rank, naming the keys that differ. Collective."""
    stored = ranks.share(identity)
    # compared as JSON text: a recorded loop's guidance_scale is NaN, which equals nothing
    keys = sorted(k for k in set(stored) | set(identity)
                  if json.dumps(stored.get(k), default=str) != json.dumps(identity.get(k), default=str))
    agree(ranks, None if not keys else (
        f"rank {ranks.rank} captures another {what} than rank 0 (differs in {keys}); every rank must load the same "
        "model and options"))


class RankWriter:
    """What the reducer and the loops call on a :class:`~dfsviz.capture.writer.CaptureWriter`,
    on every rank of a Ulysses group: maps of the rank's heads are gathered onto rank 0, whose
    writer writes them; the other ranks hold no file.

    ``writer`` is rank 0's writer (None elsewhere); ``completed`` the steps already in the file
    and ``video`` whether it holds its decoded clip (shared from rank 0).
    """

    @classmethod
    def open(cls, ranks: UlyssesRanks, identity: dict, heads: tuple[int, ...], open_writer) -> "RankWriter":
        """Every rank's writer of one run: the ranks must run the same run (``identity``, as
        ``--resume`` compares it), then rank 0 calls ``open_writer()`` (a new or resumed
        :class:`~dfsviz.capture.writer.CaptureWriter`). A refusal on any rank is raised on every
        rank. Collective."""
        check_same_run(ranks, identity, "run")
        writer = None
        with together(ranks):
            if ranks.writes:
                writer = open_writer()
        completed, video = ranks.share(None if writer is None else (writer.completed, writer.has_video()))
        return cls(writer, ranks, heads, completed, video)

    def __init__(self, writer, ranks: UlyssesRanks, heads: tuple[int, ...], completed: set[int],
                 video: bool) -> None:
        self.writer = writer
        self.ranks = ranks
        self.heads = heads
        self.layout = None if writer is None else writer.layout
        self.completed = set(completed)
        self._video = video
        self._step: int | None = None

    @property
    def open_step(self) -> int | None:
        return self._step

    def _gather(self, x: torch.Tensor) -> torch.Tensor | None:
        return self.ranks.gather_heads(x, self.heads)

    def begin_step(self, step: int, attrs: dict | None = None) -> None:
        if self.writer is not None:
            self.writer.begin_step(step, attrs)
        self._step = step

    def write_maps(self, layer, branch, order, stats: dict, scores: dict, w_q, w_k) -> None:
        names, methods = list(stats), list(scores)
        maps = self._gather(torch.stack([*stats.values(), *scores.values()], dim=1).float())
        w = self._gather(torch.stack([w_q, w_k], dim=1).double())
        if self.writer is not None:
            self.writer.write_maps(layer, branch, order, {n: maps[:, i] for i, n in enumerate(names)},
                                   {m: maps[:, len(names) + i] for i, m in enumerate(methods)}, w[:, 0], w[:, 1])

    def write_footprints(self, layer, branch, order, blocks: torch.Tensor, attention: torch.Tensor) -> None:
        blocks, attention = self._gather(blocks.long()), self._gather(attention.float())
        if self.writer is not None:
            self.writer.write_footprints(layer, branch, order, blocks, attention)

    def write_qkv(self, layer, branch, q, k, v) -> None:
        q, k, v = (self._gather(x) for x in (q, k, v))
        if self.writer is not None:
            self.writer.write_qkv(layer, branch, q, k, v)

    def write_dfsattn_mask(self, layer, branch, kept: torch.Tensor) -> None:
        kept = self._gather(kept)
        if self.writer is not None:
            self.writer.write_dfsattn_mask(layer, branch, kept)

    def end_step(self) -> None:
        """Rank 0 ends the step (every rank's maps are in: each was gathered); every rank raises
        rank 0's error if it could not. Collective."""
        error = None
        if self.writer is not None:
            try:
                self.writer.end_step()
            except ValueError as exc:
                error = str(exc)
        agree(self.ranks, error)
        self.completed.add(self._step)
        self._step = None

    def has_attr(self, key: str) -> bool:
        return True if self.writer is None else self.writer.has_attr(key)

    def set_attr(self, key: str, value) -> None:
        if self.writer is not None:
            self.writer.set_attr(key, value)

    def has_video(self) -> bool:
        return self._video

    def write_video(self, frames, latent_frame, fps: float) -> None:
        if self.writer is not None:
            self.writer.write_video(frames, latent_frame, fps)

    def finish(self) -> None:
        if self.writer is not None:
            self.writer.finish()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

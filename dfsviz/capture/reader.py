"""The capture HDF5 reader (format version 1): :class:`CaptureReader` and :func:`open_capture`.

The layout is written down in :mod:`dfsviz.capture.schema` (``docs/format.md`` for people) and
written by :class:`dfsviz.capture.writer.CaptureWriter`. The reader lists only completed steps,
checks a file's structure against the schema when it opens it and its values on
:meth:`CaptureReader.validate` (:mod:`dfsviz.capture.validation`). It reads what is stored and
selects nothing: masks, recall and density of a capture come from
:class:`dfsviz.analysis.measured_capture.MeasuredCapture` (what ``dfsviz.open`` returns).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dfsviz.capture.file_safety import held_by_another_process, open_for_reading
from dfsviz.capture.codes import decode
from dfsviz.capture.schema import (
    AFFINE_SUFFIX,
    CURVE_NAMES,
    DIMS,
    FORMAT_NAME,
    FORMAT_VERSION,
    MAP_NAMES,
    STAT_NAMES,
    STEP_GROUP,
    VIDEO_GROUP,
    SCORE_STATS,
    RootAttrs,
    StoreLayout,
    method_names,
    read_json_attr,
    step_key,
)
from dfsviz.capture.validation import (
    check_structure,
    completed_step_groups,
    completed_video,
    header_problems,
    iter_map_problems,
    video_problem,
)
from dfsviz.sparse.grid import LatentGrid

__all__ = ["CaptureBusy", "CaptureReader", "CaptureVideo", "StoredStats", "open_capture"]


class CaptureBusy(ValueError):
    """The capture file is open for writing by a running capture (HDF5's file lock): readable
    once that capture is done."""


def _open_error_message(path: Path, exc: OSError) -> str:
    """The ValueError message for an OSError of ``h5py.File(path, "r")``: a running capture
    holds the file (:func:`held_by_another_process`), this user may not read it, or it is not
    readable HDF5."""
    if held_by_another_process(exc):
        return f"{str(path)!r} is open for writing by a running capture; wait for it or copy the file"
    if isinstance(exc, PermissionError):
        return f"{str(path)!r} cannot be read: permission denied (check the file's owner and mode)"
    return f"{str(path)!r} is not a readable HDF5 file ({exc})"


@dataclass(frozen=True, eq=False)
class StoredStats:
    """Block statistics read back from a capture (:meth:`CaptureReader.block_stats`).

    Fields:
        m, L, r, J: float32 [B, Hs, Mq, Mk] (B = 1 from a capture), as in
            :class:`dfsviz.sparse.stats.BlockStats`.
        block: tokens per block.
        seq_len: N.
        heads: the model's head index of each of the Hs rows.

    A capture keeps no per-row log-partition ``lse``; see :meth:`to_block_stats`.
    """

    m: torch.Tensor
    L: torch.Tensor
    r: torch.Tensor
    J: torch.Tensor
    block: int
    seq_len: int
    heads: tuple[int, ...] = field(default=())

    def __post_init__(self) -> None:
        m = self.m
        if not isinstance(m, torch.Tensor) or m.dim() != 4:
            raise ValueError(f"`m` must be a tensor [B, H, Mq, Mk] (got {getattr(m, 'shape', type(m).__name__)})")
        for name in ("L", "r", "J"):
            value = getattr(self, name)
            if not isinstance(value, torch.Tensor) or value.shape != m.shape:
                raise ValueError(f"`{name}` must be a tensor of the shape of `m` {list(m.shape)} "
                                 f"(got {getattr(value, 'shape', type(value).__name__)})")

    def to_block_stats(self):
        """These statistics as a :class:`dfsviz.sparse.stats.BlockStats` (for the bounds and factors).

        The capture does not store the per-row log-partition, so ``lse`` (float [B, Hs, N],
        dtype and device of ``m``) is NaN: no bound or factor of :mod:`dfsviz.sparse.theory`
        reads it, and NaN makes any other use visible instead of silently wrong. m, L, r, J
        are shared, not copied.
        """
        from dfsviz.sparse.stats import BlockStats

        b, h = self.m.shape[:2]
        lse = torch.full((b, h, self.seq_len), float("nan"), dtype=self.m.dtype, device=self.m.device)
        return BlockStats(m=self.m, L=self.L, r=self.r, J=self.J, lse=lse, block=self.block, seq_len=self.seq_len)


@dataclass(frozen=True, eq=False)
class CaptureVideo:
    """The decoded clip of a capture (:meth:`CaptureReader.video`).

    Fields:
        frames: uint8 [T, H, W, 3] RGB, downscaled as ``docs/format.md`` says.
        latent_frame: int64 [T], the latent grid frame in [0, F - 1] each video frame belongs to.
        fps: frames per second of ``frames``.
    """

    frames: np.ndarray
    latent_frame: np.ndarray
    fps: float


class CaptureReader:
    """Read-only access to a capture file: what it stores, as stored.

    ``dfsviz.open`` returns the subclass :class:`dfsviz.analysis.measured_capture.MeasuredCapture`,
    which adds masks, recall and density. Accessors take the model's step, layer and head indices and an order/method name;
    ``head=None`` means every captured head. Tensors come back on the CPU in the sparse
    core's layout [B=1, H, ...] so they plug into ``dfsviz.sparse`` functions directly.

    Raises ValueError for a file that is not a dfsviz capture, a format version this
    dfsviz cannot read (naming the dfsviz version that wrote it), or a locked file.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        from dfsviz._version import __version__

        self.path = Path(path)
        if not self.path.exists():
            raise ValueError(f"capture file {str(self.path)!r} does not exist")
        if self.path.is_dir():
            raise ValueError(f"{str(self.path)!r} is a folder, not a capture file; a run set's folder opens with "
                             "dfsviz.open_run_set")
        try:
            # _padded: the zero-padded view of a file a cut-off write left short, or None
            self._f, self._padded = open_for_reading(self.path)
        except OSError as exc:
            error = CaptureBusy if held_by_another_process(exc) else ValueError
            raise error(_open_error_message(self.path, exc)) from None
        try:
            attrs = self._f.attrs
            if attrs.get("format") != FORMAT_NAME:
                raise ValueError(f"{str(self.path)!r} is not a dfsviz capture (no format={FORMAT_NAME!r} attribute)")
            version = attrs.get("format_version", -1)
            if version != FORMAT_VERSION:
                writer = attrs.get("dfsviz_version", "unknown")
                raise ValueError(
                    f"{str(self.path)!r} has capture format version {version}, written by dfsviz {writer}; this dfsviz "
                    f"{__version__} reads format version {FORMAT_VERSION}: open it with dfsviz {writer}"
                )
            self.layout = StoreLayout.from_attrs(attrs)
            # a file cut off where HDF5 had moved the attribute (it is set last) did not end whole
            self._complete = RootAttrs(attrs).bool("complete") if self._padded is None or "complete" in attrs else False
            self._config = read_json_attr(attrs, "capture_config")
            check_structure(self._f, self.layout)
            self._steps = sorted(completed_step_groups(self._f))
        except ValueError as exc:
            self.close()
            text = str(exc)
            raise ValueError(text if text.startswith(repr(str(self.path))) else f"{str(self.path)!r}: {text}") from None
        except (KeyError, OSError, RuntimeError) as exc:  # what h5py raises on a damaged file
            self.close()
            raise ValueError(f"{str(self.path)!r} is damaged: HDF5 cannot read its header ({exc})") from None
        self.attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in attrs.items()}

    # -- listing ---------------------------------------------------------------------------
    @property
    def complete(self) -> bool:
        """True when the capture ran to its end."""
        return self._complete

    @property
    def steps(self) -> list[int]:
        """Completed steps, ascending (an interrupted run lists the steps it finished)."""
        return list(self._steps)

    @property
    def planned_steps(self) -> list[int]:
        return list(self.layout.steps)

    @property
    def layers(self) -> list[int]:
        return list(self.layout.layers)

    @property
    def layer_names(self) -> dict[int, str]:
        return dict(zip(self.layout.layers, self.layout.layer_names))

    @property
    def heads(self) -> list[int]:
        return list(self.layout.heads)

    @property
    def orders(self) -> list[str]:
        return list(self.layout.orders)

    @property
    def methods(self) -> list[str]:
        return list(self.layout.methods)

    @property
    def branches(self) -> list[str]:
        return list(self.layout.branches)

    @property
    def grid(self) -> LatentGrid:
        return self.layout.grid

    @property
    def block(self) -> int:
        return self.layout.block

    @property
    def config(self) -> dict:
        """The capture configuration the run used."""
        return dict(self._config)

    # -- index helpers ---------------------------------------------------------------------
    def step_attrs(self, step: int) -> dict:
        """The attributes of a completed step: ``timestep``, ``sigma`` (flow-matching schedulers),
        ``transformer`` (the pipeline component that ran the step: ``transformer``, or
        ``transformer_2`` after Wan 2.2 A14B's boundary), ``started_utc``, ``finished_utc``;
        files of older dfsviz lack ``transformer``."""
        group = self._step_group(step)
        return {k: (v.decode() if isinstance(v, bytes) else v.item() if isinstance(v, np.generic) else v)
                for k, v in group.attrs.items() if k not in ("step", "complete")}

    def _step_group(self, step: int):
        if step not in self.steps:
            raise ValueError(
                f"`step` {step!r} is not a completed step of this capture; completed steps: {self.steps}"
                + ("" if self.complete else " (the run was interrupted: resume it with --resume)")
            )
        return self._f[STEP_GROUP][step_key(step)]

    @staticmethod
    def _pos(value, allowed: list, name: str) -> int:
        if value not in allowed:
            raise ValueError(f"`{name}` must be one of {allowed} (got {value!r})")
        return allowed.index(value)

    def _heads(self, head) -> tuple[list[int] | slice, tuple[int, ...]]:
        if head is None:
            return slice(None), tuple(self.layout.heads)
        heads = [head] if isinstance(head, int) else list(head)
        pos = [self._pos(h, self.heads, "head") for h in heads]
        return pos, tuple(heads)

    def _maps(self, name: str, step: int, layer: int, order: str, head, branch: str, method: str | None = None):
        g = self._step_group(step)
        li = self._pos(layer, self.layers, "layer")
        oi = self._pos(order, self.orders, "order")
        bi = self._pos(branch, self.branches, "branch")
        hsel, _ = self._heads(head)
        if method is None:
            lead = (li, bi, oi)
        else:  # `scores` and `recall` are [layer, branch, order, <their method dim>, head, ...]
            lead = (li, bi, oi, method_names(self.layout)[DIMS[name][3]].index(method))
        stored = _read_heads(g[name], lead, hsel)
        if self.layout.map_dtype == "uint8" and name in MAP_NAMES:
            stored = decode(stored, _read_heads(g[f"{name}{AFFINE_SUFFIX}"], lead, hsel))
        return torch.from_numpy(np.asarray(stored, dtype=np.float32))  # float16 and uint8 maps as float32

    # -- typed accessors ---------------------------------------------------------------------
    def block_stats(self, step: int, layer: int, order: str, head=None, branch: str = "cond") -> StoredStats:
        """m, L, r, J of one (step, layer, order): float32 [1, Hs, Mq, Mk]."""
        values = {n: self._maps(n, step, layer, order, head, branch)[None] for n in STAT_NAMES}
        return StoredStats(**values, block=self.block, seq_len=self.grid.num_tokens, heads=self._heads(head)[1])

    def block_mass(self, step: int, layer: int, order: str, head=None, branch: str = "cond") -> torch.Tensor:
        """Block mass m of one (step, layer, order): float32 [1, Hs, Mq, Mk] (rows sum to 1).

        Reads the m dataset alone: :meth:`block_stats` also inflates L, r and J, 4x the work.
        """
        return self._maps("m", step, layer, order, head, branch)[None]

    def scores(self, step: int, layer: int, order: str, method: str, head=None, branch: str = "cond") -> torch.Tensor:
        """Block scores of ``method``: float32 [1, Hs, Mq, Mk].

        meanpool's score is the pooled logit L and the oracle's the block mass m: files that do
        not store them in ``scores`` (``layout.score_methods``) serve those maps."""
        self._pos(method, self.methods, "method")
        if method not in self.layout.score_methods:
            return self._maps(SCORE_STATS[method], step, layer, order, head, branch)[None]
        return self._maps("scores", step, layer, order, head, branch, method)[None]

    @property
    def stored_recall(self) -> bool:
        """True when every step stores recall curves (:meth:`recall_curve`); files written
        before captures stored them hold none."""
        return self.layout.stored_recall

    def recall_curve(self, step: int, layer: int, order: str, method: str, head=None, branch: str = "cond") -> torch.Tensor:
        """Recall of ``method``'s top-k mask at every budget k = 1..Mk: float32 [1, Hs, Mk] (``method``:
        one of the file's methods, or "oracle", whose curve R*(k) every file with curves holds), entry
        [0, h, k - 1] = R(S) of the mask keeping the k best-scoring key blocks of every query block.

        Stored by the writer from the maps as the model produced them, before their float16 or
        uint8 rounding: ``dfsviz.analysis.recall_curve`` of the stored m and scores gives the same
        curves on float32 maps and differs by the storage error on narrower ones (docs/format.md).
        Reads Hs x Mk floats, where recomputing reads every map of the (step, layer, order).
        Raises ValueError for a file without curves (:attr:`stored_recall`)."""
        return self._curve("recall", step, layer, order, method, head, branch)

    def density_curve(self, step: int, layer: int, order: str, method: str, head=None, branch: str = "cond") -> torch.Tensor:
        """Density of the same masks as :meth:`recall_curve`: float32 [1, Hs, Mk], entry [0, h, k - 1] =
        rho(S) of the mask keeping the k best-scoring key blocks of every query block (k / Mk, but
        for a short last key block, which counts only its tokens where a row keeps it). Stored
        beside the recall curves; ValueError for a file without curves."""
        return self._curve("density", step, layer, order, method, head, branch)

    def step_curves(self, step: int, order: str, branch: str = "cond", name: str = "recall") -> torch.Tensor:
        """The ``name`` ("recall" or "density") curves of every layer, method and head of one step and
        order, in one read: float32 [layers, methods, heads, Mk] (methods: ``layout.curve_methods``;
        entry [i, j, h, k - 1] is what :meth:`recall_curve` gives at that layer, method and head).
        ValueError for a file without curves."""
        if name not in CURVE_NAMES:
            raise ValueError(f"`name` must be one of {list(CURVE_NAMES)} (got {name!r})")
        self._refuse_without_curves()
        oi = self._pos(order, self.orders, "order")
        bi = self._pos(branch, self.branches, "branch")
        return torch.from_numpy(np.asarray(self._step_group(step)[name][:, bi, oi, :], dtype=np.float32))

    def _refuse_without_curves(self) -> None:
        if not self.stored_recall:
            raise ValueError(
                f"{str(self.path)!r} stores no recall curves (no `stored_recall`: written before captures stored "
                "them): recompute them from the maps with dfsviz.analysis.recall_curve(run.block_mass"
                "(step, layer, order), run.scores(step, layer, order, method), seq_len=run.grid.num_tokens, block=run.block), "
                "or capture the run again with this dfsviz"
            )

    def _curve(self, name: str, step: int, layer: int, order: str, method: str, head, branch: str) -> torch.Tensor:
        self._pos(method, list(self.layout.curve_methods), "method")
        self._refuse_without_curves()
        return self._maps(name, step, layer, order, head, branch, method)[None]

    def variance_ratios(self, step: int, layer: int, order: str, branch: str = "cond") -> tuple[torch.Tensor, torch.Tensor]:
        """(W_q, W_k), float64 [1, H] over the captured heads."""
        g = self._step_group(step)
        li = self._pos(layer, self.layers, "layer")
        oi = self._pos(order, self.orders, "order")
        bi = self._pos(branch, self.branches, "branch")
        return (torch.from_numpy(g["W_q"][li, bi, oi])[None], torch.from_numpy(g["W_k"][li, bi, oi])[None])

    def footprints(self, step: int, layer: int, order: str, head: int, branch: str = "cond") -> tuple[torch.Tensor, torch.Tensor]:
        """Sampled query blocks and their attention.

        Returns:
            blocks: int64 [K] query block indices in the order's block sequence (block u holds
                the original tokens ``perm(order)[u*block:(u+1)*block]``).
            attention: float32 [K, N], the block's mean attention probability over all N keys,
                in original token order (rows sum to 1 up to float16 rounding).
        """
        if not self.layout.footprints:
            raise ValueError("this capture has no footprints (captured with --footprints 0)")
        if not isinstance(head, int):
            raise TypeError(f"`head` must be one int for footprints (got {head!r})")
        g = self._step_group(step)
        li = self._pos(layer, self.layers, "layer")
        oi = self._pos(order, self.orders, "order")
        bi = self._pos(branch, self.branches, "branch")
        hi = self._pos(head, self.heads, "head")
        blocks = torch.from_numpy(g["footprint_block"][li, bi, oi, hi].astype(np.int64))
        att = torch.from_numpy(g["footprint"][li, bi, oi, hi].astype(np.float32)) / self.grid.num_tokens
        return blocks, att

    def qkv(self, step: int, layer: int, head=None, branch: str = "cond") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Stored Q, K, V of a ``--save-qkv`` layer: each [1, Hs, N, D] in original token order."""
        if layer not in self.layout.qkv_layers:
            raise ValueError(
                f"Q/K/V of layer {layer!r} were not saved; saved layers: {list(self.layout.qkv_layers)} (--save-qkv)"
            )
        if step not in self.layout.qkv_steps:
            raise ValueError(
                f"Q/K/V were not saved at step {step!r}; saved steps: {list(self.layout.qkv_steps)} (--qkv-steps)"
            )
        g = self._step_group(step)
        li = self.layout.qkv_layers.index(layer)
        bi = self._pos(branch, self.branches, "branch")
        hsel, _ = self._heads(head)
        return tuple(torch.from_numpy(np.asarray(_read_heads(g[n], (li, bi), hsel)))[None] for n in ("q", "k", "v"))

    @property
    def dfsattn_order(self) -> str | None:
        """The order of the stored DFSAttn masks (a recording with ``apply_dfsattn`` active), or None."""
        return self.layout.dfsattn_order

    def dfsattn_kept(self, step: int, layer: int, head=None, branch: str = "cond") -> torch.Tensor:
        """The key blocks DFSAttn attended at (step, layer): bool [1, Hs, Mq, Mk] in the blocks of
        :attr:`dfsattn_order` (every block where it ran dense)."""
        if self.layout.dfsattn_order is None:
            raise ValueError(
                f"{str(self.path)!r} holds no DFSAttn masks: record a pipeline with apply_dfsattn active "
                "(dfsviz.record) to store the masks DFSAttn used"
            )
        g = self._step_group(step)
        li = self._pos(layer, self.layers, "layer")
        bi = self._pos(branch, self.branches, "branch")
        hsel, _ = self._heads(head)
        return torch.from_numpy(np.asarray(_read_heads(g["dfsattn_mask"], (li, bi), hsel)).astype(bool))[None]

    def video(self) -> CaptureVideo | None:
        """The run's decoded clip, or None for a capture without one (older files, a run
        interrupted before its end, a model whose output dfsviz did not decode).

        Raises ValueError when the stored latent frames do not fit the grid.
        """
        group = completed_video(self._f)
        if group is None:
            return None
        latent_frame = group["latent_frame"][...]
        problem = video_problem(latent_frame, self.grid.frames)
        if problem is not None:
            raise ValueError(f"{str(self.path)!r}: '/{VIDEO_GROUP}/latent_frame' {problem}")
        return CaptureVideo(group["frames"][...], latent_frame, float(group.attrs["fps"]))

    def perm(self, order: str) -> torch.Tensor:
        """int64 [N] permutation of ``order`` (ordered[p] = original[perm[p]])."""
        self._pos(order, self.orders, "order")
        return torch.from_numpy(self._f["orders"][order][...])

    def token_order(self, order: str):
        """The order as a :class:`dfsviz.sparse.orders.TokenOrder` built from the stored permutation."""
        from dfsviz.sparse.orders import TokenOrder

        perm = self.perm(order)
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(perm.numel())
        return TokenOrder(order, self.grid, perm, inv)

    def coords(self) -> torch.Tensor:
        """int64 [Nv, 3] (frame, row, column) of the video tokens in raster order."""
        return torch.from_numpy(self._f["coords"][...].astype(np.int64))

    # -- inspection ------------------------------------------------------------------------
    def summary(self) -> dict:
        """Settings, completeness and sizes (what ``dfsviz inspect`` prints)."""
        keys = ("model_id", "model_class", "adapter", "prompt", "seed", "scheduler", "dtype", "device", "dfsviz_version", "created_utc")
        info = {k: self.attrs.get(k) for k in keys}
        lay = self.layout
        info.update(
            format_version=FORMAT_VERSION,
            complete=self.complete,
            grid=lay.grid.name,
            num_tokens=lay.num_tokens,
            block=lay.block,
            num_blocks=lay.num_blocks,
            orders=list(lay.orders),
            methods=list(lay.methods),
            layers=len(lay.layers),
            heads=len(lay.heads),
            branches=list(lay.branches),
            planned_steps=list(lay.steps),
            completed_steps=self.steps,
            footprints=lay.footprints,
            qkv_layers=list(lay.qkv_layers),
            qkv_steps=list(lay.qkv_steps) if lay.qkv_layers else [],
            map_dtype=lay.map_dtype,
            map_dtype_choice=self.attrs.get("map_dtype_choice"),
            score_methods=list(lay.score_methods),
            stored_recall=lay.stored_recall,
            dfsattn=self.attrs.get("dfsattn") if lay.dfsattn_order else None,
            file_bytes=self.path.stat().st_size,
            planned_bytes_uncompressed=lay.total_bytes(),
        )
        return info

    def validate(self) -> list[str]:
        """Check every stored value; returns a list of problems (empty when the file is sound).

        The structure (datasets, shapes, dtypes, links) was checked when the file was opened;
        this reads every map of every completed step once (rows of m sum to 1, finite values,
        non-negative diversities, footprints in range ...), the permutations, the coordinates
        and the dimension scales. Cost: one pass over the file's data. The same checks in two
        parts: :meth:`header_problems` and :meth:`iter_map_problems`.
        """
        return self.header_problems() + [problem for problem in self.iter_map_problems() if problem is not None]

    def require_valid(self, product: str) -> None:
        """ValueError naming the first problems :meth:`validate` finds, saying that no ``product``
        ("report", "calibration") is built from the file; nothing when the file is sound."""
        problems = self.validate()
        if problems:
            shown = 3  # `dfsviz inspect` lists them all
            more = f" (and {len(problems) - shown} more)" if len(problems) > shown else ""
            raise ValueError(
                f"capture {str(self.path)!r} fails validation: {'; '.join(problems[:shown])}{more}; no {product} is "
                f"built from it. `dfsviz inspect {self.path}` lists every problem; capture the run again"
            )

    def header_problems(self) -> list[str]:
        """The problems :meth:`validate` finds outside the maps: the permutations, coordinates,
        dimension scales and clip, and a file marked complete that lacks planned steps. Reads no
        map: cheap whatever the file's size."""
        problems = header_problems(self._f, self.layout, self.steps)
        if self.complete and self.steps != list(self.layout.steps):
            problems.append(f"marked complete but steps {sorted(set(self.layout.steps) - set(self.steps))} are missing")
        return problems

    def iter_map_problems(self) -> Iterator[str | None]:
        """The maps' part of :meth:`validate`, one read at a time (one step, dataset, layer,
        branch, order and method, every head): yields after each read its first problem, or
        None, so that a caller may stop between reads."""
        return iter_map_problems(self._f, self.layout, self.steps)

    def close(self) -> None:
        if self._f.id.valid:
            self._f.close()
        if self._padded is not None:
            self._padded.close()

    def __enter__(self) -> "CaptureReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "complete" if self.complete else f"incomplete ({len(self.steps)}/{len(self.layout.steps)} steps)"
        return f"{type(self).__name__}({str(self.path)!r}, {self.grid.name}, {state})"


def _read_heads(dset, lead: tuple[int, ...], heads: list[int] | slice) -> np.ndarray:
    """``dset[lead][heads]``, reading only the chunks (one map each) of the heads asked for:
    h5py takes a list of increasing, distinct indices; any other list is read so and reordered."""
    if isinstance(heads, slice):
        return dset[(*lead, heads)]
    wanted = sorted(set(heads))
    data = dset[(*lead, wanted)]
    return data if wanted == heads else data[[wanted.index(h) for h in heads]]


def open_capture(path: str | os.PathLike) -> CaptureReader:
    """Open a capture file read-only. See :class:`CaptureReader`; ``dfsviz.open`` adds the measures."""
    return CaptureReader(path)

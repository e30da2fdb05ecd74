"""The capture HDF5 writer (format version 1); :mod:`dfsviz.capture.reader` reads the files.

The layout is written down once, in :mod:`dfsviz.capture.schema` (``docs/format.md`` for
people); :mod:`dfsviz.capture.validation` checks files against it and
:mod:`dfsviz.capture.file_safety` keeps them whole. Layout (dims in brackets, "map" = one
chunk):

    /                         root attributes: format, format_version, dfsviz_version,
                              complete, model, grid, blocks, orders, methods, steps,
                              layers, heads, prompt, seed, scheduler, capture_config ...
    /coords                   int32 [video_token, axis]: (frame, row, column) of each video
                              token in raster order
    /orders/<name>            int64 [token]: the order's permutation of the whole sequence
                              (ordered[p] = original[perm[p]])
    /steps/step_0007/         one group per captured denoising step; attribute
                              ``complete`` is written last, after every map of the step
        layer, branch, order, method, recall_method, head, q_block, k_block, kept_blocks,
        sample, token, qkv_layer, dim
                              dimension scales (coordinates) of the datasets below
        m, L, r, J            float32 [layer, branch, order, head, q_block, k_block]
                              (float16 or uint8 codes as the root attribute map_dtype says)
        scores                float32 [layer, branch, order, method, head, q_block, k_block]
                              (as m) of the methods in score_methods (meanpool's is L, the
                              oracle's m)
        m_affine, ..., scores_affine
                              float32 [..., q_block, affine]: with uint8 maps, each row's
                              (offset, scale) (dfsviz.capture.codes)
        W_q, W_k              float64 [layer, branch, order, head]
        recall, density       float32 [layer, branch, order, recall_method, head, kept_blocks]:
                              recall and density of each method's top-k mask at k = 1..Mk
                              (every method of methods, and the oracle), from the maps
                              before their storage rounding
        footprint_block       int32 [layer, branch, order, head, sample]
        footprint             float16 [layer, branch, order, head, sample, token]
                              (N x attention probability, original token order)
        q, k, v               [qkv_layer, branch, head, token, dim] (original token order)
        dfsattn_mask          uint8 [layer, branch, head, q_block, k_block]: the key blocks
                              DFSAttn attended (a recording with apply_dfsattn active)
    /video/                   optional: the decoded clip (attributes fps, complete)
        frames                uint8 [video_frame, row, column, channel] RGB, downscaled
        latent_frame          int64 [video_frame]: the latent grid frame of each video frame

Nothing lost:

* One writer per path: the writer holds a :class:`~dfsviz.capture.file_safety.CaptureLock`
  from before anything is created until it closes. A new file is built under a temporary
  name and renamed into place once its header is written, so ``overwrite`` replaces an old
  file only with a readable new one.
* A step's group and all its datasets are created and flushed before any map is written,
  and ``complete`` is set (and flushed) only after the step's last map; the reader lists
  only complete groups. An interruption the process survives (an exception, Ctrl+C) deletes
  the open step's group before closing; a process killed at any moment (SIGKILL included)
  leaves the earlier steps readable.
* Each step starts only when the disk has room for it; a write that fails anyway (the disk
  filled up) ends the run with one line, and :meth:`CaptureWriter.resume` repairs the file by
  copying its completed steps into a fresh one (a crash mid-write can leave HDF5's own
  bookkeeping half-updated, which deleting the broken group in place cannot mend).
* Every map is checked before it is written (:func:`~dfsviz.capture.validation.map_problem`):
  a model that produces NaN stops the run instead of filling the file with it.

Maps are compressed (byte shuffle + Huffman-only deflate, read by the standard HDF5 shuffle
and gzip filters) by a thread pool and written with ``write_direct_chunk``, so compression
runs in parallel with the GPU. Maps on a CUDA device reach the pool through one non-blocking
copy per (layer, branch, order) into pinned host memory, and the small datasets (W_q, W_k,
footprint_block) are copied at ``end_step``: queueing a map never waits for the GPU.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import sys
import threading
import traceback
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from dfsviz.capture.file_safety import (
    SPACE_MARGIN,
    CaptureLock,
    SpaceReservation,
    held_by_another_process,
    require_free_space,
    require_output_folder,
    run_difference,
    temporary_path,
    write_failure_reason,
)
from dfsviz.capture.codes import encode_maps
from dfsviz.capture.reader import CaptureReader
from dfsviz.capture.schema import (
    AFFINE_SUFFIX,
    CURVE_NAMES,
    DIMS,
    FORMAT_NAME,
    FORMAT_VERSION,
    GZIP_LEVEL,
    MAP_NAMES,
    SCORE_STATS,
    STAT_NAMES,
    STEP_GROUP,
    UNITS,
    VIDEO_DIMS,
    VIDEO_GROUP,
    VIDEO_MAX_FRAMES,
    VIDEO_MAX_SIDE,
    StoreLayout,
    dataset_dtype,
    dimension_values,
    method_names,
    read_json_attr,
    step_key,
)
from dfsviz.capture.validation import completed_step_groups, completed_video, map_problem, video_problem
from dfsviz.sparse._topk import topk_density, topk_order, topk_recall

__all__ = ["CLI_OPTIONS", "PYTHON_OPTIONS", "CaptureWriter", "OptionNames", "abandoned_files", "output_exists_error",
           "resume_missing_error"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class OptionNames:
    """How the caller's users spell the resume and overwrite options and a run's ranks, for the
    writer's messages: ``dfsviz capture``'s flags (CLI_OPTIONS) or ``dfsviz.record``'s arguments
    (PYTHON_OPTIONS). ``ranks`` takes the Ulysses degree; ``one_process`` is a run without one."""

    resume: str
    overwrite: str
    no_resume: str
    ranks: str
    one_process: str


CLI_OPTIONS = OptionNames("--resume", "--overwrite", "drop --resume",
                          "on {degree} ranks (torchrun --nproc-per-node {degree} ... --context-parallel ulysses)",
                          "in one process (no --context-parallel)")
PYTHON_OPTIONS = OptionNames("resume=True", "overwrite=True", "pass resume=False",
                             "on {degree} ranks (ContextParallelConfig(ulysses_degree={degree}) under torchrun)",
                             "in one process (no context parallelism)")


def output_exists_error(path: str | os.PathLike, options: OptionNames) -> ValueError:
    """The refusal of an existing output without overwrite or resume, in the caller's words."""
    return ValueError(f"output {str(path)!r} exists; pass {options.overwrite} to replace it or {options.resume} to "
                      "continue it")


def resume_missing_error(path: str | os.PathLike, options: OptionNames) -> ValueError:
    """The refusal to resume an output that does not exist, in the caller's words."""
    return ValueError(f"{options.resume}: {str(path)!r} does not exist; {options.no_resume} to start a new capture")

# root attributes that say how a run was started, not what it is: a resume may differ in them
_RUN_OPTIONS = {"resume", "overwrite", "out"}


def _h5py():
    import h5py

    return h5py


def _attr_value(value):
    """h5py-storable attribute: strings and str lists as UTF-8, dicts as JSON."""
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True, default=str)
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return np.array(value, dtype=_h5py().string_dtype())
    if isinstance(value, (list, tuple)) and not value:
        return np.zeros(0, dtype=np.int64)
    if value is None:
        return ""
    return value


def _to_host(tensors: list[torch.Tensor], dtype: torch.dtype) -> tuple[list[np.ndarray], torch.cuda.Event | None]:
    """``tensors`` (one shape) as host arrays of ``dtype``, and the event after which they hold data.

    CPU tensors convert synchronously (event None). CUDA tensors are stacked and converted on
    the GPU, then copied with one non-blocking copy into pinned memory (PyTorch's caching host
    allocator) and an event is recorded after the copy, so the caller does not wait for the
    GPU: read the arrays only after ``event.synchronize()``. The arrays keep the pinned buffer
    alive (numpy views of the tensor).
    """
    if tensors[0].device.type != "cuda":
        return [t.detach().to(dtype).numpy() for t in tensors], None
    stacked = torch.stack([t.detach().to(dtype) for t in tensors])
    host = torch.empty(stacked.shape, dtype=dtype, pin_memory=True)
    host.copy_(stacked, non_blocking=True)
    # blocking: a worker waiting for the copy sleeps instead of spinning on a core the others compress on
    ready = torch.cuda.Event(blocking=True)
    ready.record(torch.cuda.current_stream(stacked.device))
    return list(host.numpy()), ready


class _WriteFailed(Exception):
    """An HDF5 write failed (a full disk, a quota, an I/O error); ``__cause__`` says why."""


class _ChunkPool:
    """Check maps, compress them on worker threads (zlib releases the GIL), write them as raw chunks."""

    def __init__(self, workers: int, num_blocks: int, map_dtype: str, describe, max_pending: int = 256) -> None:
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dfsviz-h5")
        self._slots = threading.BoundedSemaphore(max_pending)
        self._lock = threading.Lock()
        self._futures: list[Future] = []
        self._num_blocks = num_blocks
        self._map_dtype = np.dtype(map_dtype)  # m, L, r, J and scores arrive float32 and are stored as this
        self._describe = describe  # (dataset name, chunk offset) -> "step 3, layer 1, ..." for errors

    @staticmethod
    def encode(array: np.ndarray) -> bytes:
        """HDF5 shuffle filter, then deflate: the byte planes of the elements, zlib-compressed
        Huffman-only (see GZIP_LEVEL)."""
        flat = np.ascontiguousarray(array).reshape(-1)
        planes = np.ascontiguousarray(flat.view(np.uint8).reshape(flat.size, flat.itemsize).T)
        deflate = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 15, 9, zlib.Z_HUFFMAN_ONLY)
        return deflate.compress(planes) + deflate.flush()

    def _check(self, name: str, offset: tuple[int, ...], array: np.ndarray) -> None:
        # a chunk of curves holds every head's: each is checked, and named, as its own map
        maps = [((*offset[:-2], h, 0), curve) for h, curve in enumerate(array)] if name in CURVE_NAMES else [(offset, array)]
        for where, values in maps:
            problem = map_problem(name, values, self._num_blocks)
            if problem is not None:
                raise ValueError(
                    f"{self._describe(name, where)}: {name} has {problem}; nothing of this step was kept. The model "
                    "produced it: non-finite Q/K usually mean a float16 overflow (try --dtype bfloat16 or float32)"
                )

    def _write(self, dset, offset: tuple[int, ...], array: np.ndarray) -> None:
        data = self.encode(array)
        with self._lock:
            try:
                dset.id.write_direct_chunk(offset, data)
            except (OSError, RuntimeError) as exc:
                raise _WriteFailed() from exc

    def _job(self, dset, name, offset, array, ready):
        try:
            if ready is not None:
                ready.synchronize()  # the GPU -> host copy behind `array` has landed
            if name in MAP_NAMES and array.dtype != self._map_dtype:
                array = self._narrow(name, offset, array)
            self._check(name, offset, array)
            self._write(dset, offset, array)
        finally:
            self._slots.release()

    def _coded_job(self, group, items, ready):
        try:
            if ready is not None:
                ready.synchronize()
            for name, offset, array in items:  # checked as computed, before rounding
                self._check(name, offset, array)
            coded = encode_maps([(name, array) for name, _, array in items])
            for (name, offset, _), (codes, affine) in zip(items, coded):
                self._write(group[name], offset, codes)
                self._write(group[f"{name}{AFFINE_SUFFIX}"], offset, affine)
        finally:
            self._slots.release()

    def submit_coded(self, group, items: list[tuple[str, tuple[int, ...], np.ndarray]],
                     ready: torch.cuda.Event | None = None) -> None:
        """Queue the maps of one (layer, branch, order, head) as uint8 codes: ``items`` are
        (dataset name, chunk offset, float32 map); they are coded together (r takes L's rounding)."""
        self._slots.acquire()
        self._futures.append(self._pool.submit(self._coded_job, group, items, ready))

    def _narrow(self, name: str, offset: tuple[int, ...], array: np.ndarray) -> np.ndarray:
        """``array`` rounded to the map dtype; refused when it holds values beyond that dtype's range."""
        largest = float(np.finfo(self._map_dtype).max)
        peak = float(np.abs(array).max(initial=0.0))  # NaN propagates: map_problem names it below
        if peak > largest and np.isfinite(peak):
            raise ValueError(
                f"{self._describe(name, offset)}: {name} has values beyond the {self._map_dtype} range (max |x| = "
                f"{peak:.4g} > {largest:.0f}); nothing of this step was kept. Capture again with --map-dtype float32"
            )
        return array.astype(self._map_dtype)

    def submit(
        self, dset, name: str, offset: tuple[int, ...], array: np.ndarray, ready: torch.cuda.Event | None = None
    ) -> None:
        """Queue ``array`` as the chunk at ``offset`` of dataset ``name``; with ``ready``, read it
        only after that event."""
        self._slots.acquire()
        self._futures.append(self._pool.submit(self._job, dset, name, offset, array, ready))

    def drain(self) -> None:
        """Wait for every pending chunk; re-raise the first worker error."""
        futures, self._futures = self._futures, []
        errors = [fut.exception() for fut in futures]
        first = next((e for e in errors if e is not None), None)
        if first is not None:
            raise first

    def close(self) -> None:
        try:
            self.drain()
        finally:
            self._pool.shutdown(wait=True)


class CaptureWriter:
    """Write one capture file step by step (see the module docstring for the layout).

    Use :meth:`create` for a new file or :meth:`resume` to continue an interrupted one.
    Per step: :meth:`begin_step`, then ``write_*`` for every (layer, branch, order), then
    :meth:`end_step`; :meth:`finish` marks the file complete. ``close`` without ``finish``
    leaves a valid file marked incomplete, without the step that was open.

    A failed write (full disk) raises ValueError with one line and leaves the file's
    completed steps for :meth:`resume`. The writer holds the path's
    :class:`~dfsviz.capture.file_safety.CaptureLock` until it closes.
    """

    def __init__(self, f, path: Path, layout: StoreLayout, workers: int | None, lock: CaptureLock,
                 options: OptionNames = CLI_OPTIONS) -> None:
        self._f = f
        self.path = path
        self.layout = layout
        self._lock = lock
        self.options = options
        self._pool = _ChunkPool(workers or min(16, os.cpu_count() or 1), layout.num_blocks, layout.map_dtype,
                                self._describe)
        self._group = None
        self._step: int | None = None
        self._small: dict[str, np.ndarray] = {}
        # CUDA values of the small datasets: copied to `_small` at end_step, not per call
        self._deferred: dict[str, list[tuple[tuple[int, int, int], torch.Tensor]]] = {}
        self.completed: set[int] = set(completed_step_groups(f))
        # compressed bytes on disk per uncompressed byte, from the steps this writer wrote: sizes
        # the free-space check of the next step (1 until a step has been measured)
        self._ratio = 1.0
        self._size_before = 0
        self._space = SpaceReservation(f.id.get_vfd_handle(), path)
        _log_hdf5_release_failures()

    # -- open ------------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        layout: StoreLayout,
        attrs: dict,
        orders: dict[str, torch.Tensor],
        *,
        overwrite: bool = False,
        workers: int | None = None,
        lock: CaptureLock | None = None,
        options: OptionNames = CLI_OPTIONS,
    ) -> "CaptureWriter":
        """Create ``path`` with the root attributes, coordinates and order permutations.

        The file is built under a temporary name beside ``path`` and renamed into place once
        its header is on disk, so ``overwrite`` never leaves ``path`` without a readable file.

        Args:
            layout: the file's shapes.
            attrs: descriptive root attributes (model, prompt, seed, scheduler, capture_config ...).
            orders: order name -> int64 [N] permutation of the whole sequence.
            overwrite: replace an existing file; otherwise an existing ``path`` raises ValueError.
            lock: the path's lock when the caller took it already (it then passes to the writer).
            options: how messages name the resume and overwrite options.
        """
        from dfsviz._version import __version__

        path = Path(path)
        require_output_folder(path)
        lock = lock or CaptureLock(path)
        tmp = temporary_path(path)
        f = None
        try:
            if path.exists() and not overwrite:
                raise output_exists_error(path, options)
            require_free_space(path, SPACE_MARGIN + layout.bytes_per_step(layout.steps[0]), "a new capture",
                               "free space or capture fewer layers/heads/steps")
            h5py = _h5py()
            # the header is built in memory and written with plain file I/O: a full disk then
            # fails one write() cleanly instead of HDF5 halfway through its metadata
            with h5py.File(f"{tmp}.in-memory", "w", driver="core", backing_store=False) as mem:
                cls._write_header(mem, layout, {**attrs, "dfsviz_version": __version__}, orders)
                mem.flush()
                image = mem.id.get_file_image()
            try:
                with open(tmp, "wb") as fh:
                    fh.write(image)
                    fh.flush()
                    os.fsync(fh.fileno())
            except OSError as exc:
                raise ValueError(f"could not create {str(path)!r} ({write_failure_reason(exc)}); nothing was written") from None
            f = h5py.File(tmp, "r+")  # opened before the rename: no reader can come between
            os.replace(tmp, path)
            logger.info("%s: maps stored as %s (%s)", path, layout.map_dtype, attrs.get("map_dtype_choice", "as given"))
        except BaseException:
            if f is not None:
                f.close()
            tmp.unlink(missing_ok=True)
            lock.release()
            raise
        return cls(f, path, layout, workers, lock)

    @staticmethod
    def _write_header(f, layout: StoreLayout, attrs: dict, orders: dict[str, torch.Tensor]) -> None:
        h5py = _h5py()
        root = f.attrs
        root["format"] = FORMAT_NAME
        root["format_version"] = FORMAT_VERSION
        root["created_utc"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        root["complete"] = False
        for key, value in {**attrs, **layout.to_attrs()}.items():
            root[key] = _attr_value(value)
        coords = f.create_dataset("coords", data=layout.grid.video_coords().numpy().astype(np.int32))
        coords.attrs["dims"] = np.array(["video_token", "axis"], dtype=h5py.string_dtype())
        coords.attrs["axis"] = np.array(["frame", "row", "column"], dtype=h5py.string_dtype())
        og = f.create_group("orders")
        for name in layout.orders:
            perm = orders[name].cpu().numpy().astype(np.int64)
            if perm.shape != (layout.num_tokens,):
                raise ValueError(f"order {name!r} permutation has shape {perm.shape}, expected ({layout.num_tokens},)")
            ds = og.create_dataset(name, data=perm)
            ds.attrs["dims"] = np.array(["token"], dtype=h5py.string_dtype())
            ds.attrs["key"] = f"{name}_{layout.grid.name}"
        f.create_group(STEP_GROUP)

    @classmethod
    def resume(
        cls,
        path: str | os.PathLike,
        layout: StoreLayout,
        run: dict,
        *,
        workers: int | None = None,
        lock: CaptureLock | None = None,
        options: OptionNames = CLI_OPTIONS,
    ) -> "CaptureWriter":
        """Reopen an interrupted capture of the same run; its completed steps are kept.

        ``run`` describes the run: the file's ``run_identity`` attribute (what
        :func:`dfsviz.capture.runner.run_capture` stores: resolved settings and a fingerprint of
        the model weights) must equal it, except for the options in ``_RUN_OPTIONS``. Files
        without one are compared on their ``capture_config``.

        A file a crash left with a half-written step (SIGKILL, a full disk) is repaired first:
        its completed steps are copied into a fresh file that replaces it (this needs as
        much free space as the file). A clean interruption left no half-written step, and the
        file is reopened as it is.

        Raises ValueError when the file is not a capture of this format version, was made by
        another run, or is open in another program.
        """
        path = Path(path)
        if not path.exists():
            raise resume_missing_error(path, options)
        lock = lock or CaptureLock(path)
        try:
            reader = CaptureReader(path)
            try:
                if not reader.layout.stored_recall:  # an older dfsviz started it: its steps go on without curves
                    layout = dataclasses.replace(layout, stored_recall=False)
                cls._check_same_run(path, reader, layout, run, options)
                done = {step_key(s) for s in reader.steps}
                # cut off mid-write (read through its zero-padded view), or a half-written step
                broken = reader._padded is not None or any(name not in done for name in reader._f[STEP_GROUP])
                if broken:
                    require_free_space(path, path.stat().st_size + SPACE_MARGIN, "the repair of the interrupted capture",
                                       "it copies the completed steps into a fresh file: free space, then resume again")
                    cls._repair(reader, path, layout, workers, lock, options)
            finally:
                reader.close()
            try:
                f = _h5py().File(path, "r+")
            except OSError as exc:
                if held_by_another_process(exc):
                    raise ValueError(
                        f"{options.resume}: {str(path)!r} is open in another program (a dashboard or notebook?); "
                        "close it, then resume"
                    ) from None
                raise
            f.attrs["complete"] = False
            f.flush()
        except BaseException:
            lock.release()
            raise
        return cls(f, path, layout, workers, lock, options)

    @staticmethod
    def _check_same_run(path: Path, reader: "CaptureReader", layout: StoreLayout, run: dict,
                        options: OptionNames) -> None:
        attrs = reader._f.attrs
        stored = read_json_attr(attrs, "run_identity" if "run_identity" in attrs else "capture_config")
        kind, keys = run_difference(stored, run, _RUN_OPTIONS) or (None, [])
        if kind == "weights":
            raise ValueError(
                f"{options.resume}: the model weights differ from those of the interrupted run in {str(path)!r} "
                f"(sha256 {str(stored.get('weights_sha256'))[:12]}... in the file, "
                f"{str(run.get('weights_sha256'))[:12]}... now); "
                f"resume with the same weights or pass {options.overwrite}"
            )
        if "ulysses_degree" in keys:
            def ranks(identity):
                degree = identity.get("ulysses_degree")
                return options.ranks.format(degree=degree) if degree else options.one_process
            raise ValueError(
                f"{options.resume}: {str(path)!r} was captured {ranks(stored)}, this run is {ranks(run)}; resume it "
                f"as it was captured, or pass {options.overwrite}"
            )
        if not keys and reader.layout == dataclasses.replace(layout, stored_scores=reader.layout.stored_scores) != layout:
            raise ValueError(
                f"{options.resume}: {str(path)!r} stores the scores of {list(reader.layout.score_methods)}, as the "
                f"dfsviz {reader.attrs.get('dfsviz_version', 'unknown')} that started it did; this dfsviz serves "
                f"meanpool's and the oracle's from L and m: finish it with that dfsviz, or pass {options.overwrite}"
            )
        if keys or reader.layout != layout:
            raise ValueError(
                f"{options.resume}: {str(path)!r} was captured with other settings (differs in {keys or ['layout']}); "
                f"resume with the same options or pass {options.overwrite}"
            )

    @classmethod
    def _repair(cls, reader: "CaptureReader", path: Path, layout: StoreLayout, workers: int | None, lock: CaptureLock,
                options: OptionNames) -> None:
        """Replace ``path`` by a fresh file holding the header and the completed steps of ``reader``."""
        h5py = _h5py()
        src = reader._f
        logger.warning("repairing %s: copying its completed steps %s into a fresh file", path, reader.steps)
        tmp = temporary_path(path)
        f = h5py.File(tmp, "w")
        try:
            for key, value in src.attrs.items():
                f.attrs[key] = value
            for name in ("coords", "orders"):
                src.copy(src[name], f, name=name)
            if completed_video(src) is not None:
                src.copy(src[VIDEO_GROUP], f, name=VIDEO_GROUP)
            f.create_group(STEP_GROUP)
            writer = cls(f, tmp, layout, workers, lock, options)
            for step in reader.steps:
                group = src[STEP_GROUP][step_key(step)]
                writer.begin_step(step)
                for name in layout.datasets(step):
                    source, target = group[name], writer._group[name]
                    if source.chunks is None or name in writer._small:
                        target[...] = source[...]
                        writer._small.pop(name, None)  # copied whole: end_step must not write its NaN fill
                        continue
                    for i in range(source.id.get_num_chunks()):
                        offset = source.id.get_chunk_info(i).chunk_offset
                        mask, data = source.id.read_direct_chunk(offset)
                        target.id.write_direct_chunk(offset, data, mask)
                writer.end_step()
                for key, value in group.attrs.items():  # the original timestamps and step attributes
                    f[STEP_GROUP][step_key(step)].attrs[key] = value
            writer._pool.close()
            f.flush()
        except (OSError, RuntimeError) as exc:
            reason = write_failure_reason(exc)
        else:
            reason = None
            f.close()
            os.replace(tmp, path)
        if reason is not None:  # as in _abandon: a file whose writes fail is left open, not closed
            _abandon_file(f)
            tmp.unlink(missing_ok=True)
            raise ValueError(f"could not repair {str(path)!r} ({reason}); the file is unchanged: free space, then resume again")

    # -- steps -----------------------------------------------------------------------------
    @property
    def open_step(self) -> int | None:
        """The step between :meth:`begin_step` and :meth:`end_step`, else None."""
        return self._step

    def _describe(self, name: str, offset: tuple[int, ...]) -> str:
        lay = self.layout
        parts = [f"step {self._step}"]
        values = {"layer": lay.layers, "branch": lay.branches, "order": lay.orders, **method_names(lay),
                  "head": lay.heads, "qkv_layer": lay.qkv_layers}
        for dim, i in zip(DIMS[name], offset):
            if dim in values:
                parts.append(f"{dim} {values[dim][i]}")
        return ", ".join(parts)

    def _failed(self, reason: str) -> ValueError:
        """Abandon the file after a failed write; the ValueError to raise.

        Call it outside the ``except`` block that caught the failure: the traceback of the
        failed write holds HDF5 objects, which must be freed before the file is closed.
        """
        step = self._step
        self._abandon()
        done = sorted(self.completed)
        return ValueError(
            f"could not write step {step} of {str(self.path)!r} ({reason}): the completed steps "
            f"{done} are kept; free space, then rerun with {self.options.resume} (it repairs the file)"
        )

    def _abandon(self) -> None:
        """Stop using the file after a failed write, without closing it.

        HDF5 cannot close a file whose writes fail (its close flushes again, and the library
        may crash at exit over the half-closed file), so the file is left open and parked in
        :data:`_ABANDONED`; the disk already holds every completed step. The CLI ends the
        process at once after such an error (:func:`abandoned_files`); a Python session
        should be restarted before it resumes the capture.
        """
        self._group, self._step, self._small, self._deferred = None, None, {}, {}
        try:
            self._pool.close()
        except BaseException:  # noqa: BLE001 - the write already failed; nothing more to report
            pass
        if self._f is not None:
            _abandon_file(self._f)
            self._f = None
        self._lock.release()

    def begin_step(self, step: int, attrs: dict | None = None) -> None:
        """Create the step's group with every dataset (unwritten maps read as NaN) and flush.

        Raises ValueError first when the disk holding the file lacks room for the step.
        """
        if self._step is not None:
            raise RuntimeError(f"step {self._step} is still open; call end_step first")
        if step not in self.layout.steps:
            raise ValueError(f"`step` {step} is not a captured step {list(self.layout.steps)}")
        if step in self.completed:
            raise ValueError(f"step {step} is already complete in this file")
        lay = self.layout
        estimate = lay.bytes_per_step(step)
        self._space.reserve(
            SPACE_MARGIN + int(estimate * min(1.0, 1.25 * self._ratio)), f"step {step}",
            f"the completed steps {sorted(self.completed)} are kept in {str(self.path)!r}; free space, then rerun "
            f"with {self.options.resume}",
        )
        self._size_before = self.path.stat().st_size
        reason = None
        try:
            self._group = self._create_step_group(step, attrs or {})
            self._f.flush()
        except (OSError, RuntimeError) as exc:
            reason = write_failure_reason(exc)
        if reason is not None:
            self._step = step
            raise self._failed(reason)
        self._small = {
            "W_q": np.full(lay.shape("W_q"), np.nan),
            "W_k": np.full(lay.shape("W_k"), np.nan),
        }
        if lay.footprints:
            self._small["footprint_block"] = np.full(lay.shape("footprint_block"), -1, dtype=np.int32)
        self._deferred = {}
        self._step = step

    def _create_step_group(self, step: int, attrs: dict):
        h5py = _h5py()
        lay = self.layout
        group = self._f[STEP_GROUP].create_group(step_key(step))
        group.attrs["step"] = step
        group.attrs["complete"] = False
        group.attrs["started_utc"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        for key, value in attrs.items():
            group.attrs[key] = _attr_value(value)
        strs = h5py.string_dtype()
        used = {d for name in lay.datasets(step) for d in DIMS[name]}
        scales = {}
        for dim in sorted(used):
            ds = group.create_dataset(dim, data=dimension_values(lay, dim))
            ds.make_scale(dim)
            scales[dim] = ds
        for name in lay.datasets(step):
            shape = lay.shape(name)
            dtype, fill = dataset_dtype(name, lay)
            if name in ("W_q", "W_k", "footprint_block"):
                ds = group.create_dataset(name, shape=shape, dtype=dtype, fillvalue=fill)
            else:
                chunk = (1,) * (len(shape) - 2) + shape[-2:]
                ds = group.create_dataset(
                    name, shape=shape, dtype=dtype, chunks=chunk, compression="gzip",
                    compression_opts=GZIP_LEVEL, shuffle=True, fillvalue=fill,
                )
            ds.attrs["dims"] = np.array(DIMS[name], dtype=strs)
            ds.attrs["units"] = UNITS[name]
            for i, dim in enumerate(DIMS[name]):
                ds.dims[i].label = dim
                ds.dims[i].attach_scale(scales[dim])
        return group

    def _index(self, layer: int, branch: str, order: str) -> tuple[int, int, int]:
        lay = self.layout
        return lay.layers.index(layer), lay.branches.index(branch), lay.orders.index(order)

    def _set_small(self, name: str, index: tuple[int, int, int], value: torch.Tensor, dtype: torch.dtype) -> None:
        """Set ``name[index]`` of the step's small datasets; a CUDA value waits for :meth:`end_step`."""
        value = value.detach().to(dtype)
        if value.device.type == "cuda":
            self._deferred.setdefault(name, []).append((index, value))
        else:
            self._small[name][index] = value.numpy()

    def write_maps(
        self,
        layer: int,
        branch: str,
        order: str,
        stats: dict[str, torch.Tensor],
        scores: dict[str, torch.Tensor],
        w_q: torch.Tensor,
        w_k: torch.Tensor,
    ) -> None:
        """Queue one (layer, branch, order): ``stats`` m/L/r/J and ``scores`` per method of
        ``layout.score_methods`` (others are ignored), each float [Hs, Mq, Mk]; ``w_q``, ``w_k``
        float64 [Hs]. With ``layout.stored_recall`` the recall and density curves of the top-k
        masks of every method and the oracle are computed from them, on their device. Tensors may live on the GPU (one device);
        the call then returns without waiting for it."""
        li, bi, oi = self._index(layer, branch, order)
        g = self._group
        stored = self.layout.score_methods  # meanpool's and the oracle's scores are L and m
        targets = [(name, (li, bi, oi)) for name in STAT_NAMES]
        targets += [("scores", (li, bi, oi, mi)) for mi in range(len(stored))]
        maps, ready = _to_host([stats[n] for n in STAT_NAMES] + [scores[m] for m in stored], torch.float32)
        if self.layout.map_dtype == "uint8":
            for h in range(maps[0].shape[0]):
                self._pool.submit_coded(g, [(name, (*lead, h, 0, 0), array[h]) for (name, lead), array in zip(targets, maps)],
                                        ready)
        else:
            for (name, lead), array in zip(targets, maps):
                for h in range(array.shape[0]):
                    self._pool.submit(g[name], name, (*lead, h, 0, 0), array[h], ready)
        if "recall" in g:
            self._write_recall((li, bi, oi), stats, scores)
        self._set_small("W_q", (li, bi, oi), w_q, torch.float64)
        self._set_small("W_k", (li, bi, oi), w_k, torch.float64)

    def _write_recall(self, lead: tuple[int, int, int], stats: dict[str, torch.Tensor], scores: dict[str, torch.Tensor]) -> None:
        """Queue the curves of one (layer, branch, order): for every method of the layout and the
        oracle (``curve_methods``), the recall and the density of its top-k mask at k = 1..Mk, float32 [Hs, Mk] per method, computed
        on the maps' device from the maps as given (before any storage rounding), with the core of
        ``dfsviz.analysis.recall_curve``."""
        lay = self.layout
        recall, density = [], []
        for method in lay.curve_methods:  # one method at a time: a sort's buffers stay one method's size
            score = scores[method] if method in lay.score_methods else stats[SCORE_STATS[method]]
            order = topk_order(score)
            recall.append(topk_recall(stats["m"], order, lay.num_tokens, lay.block))
            density.append(topk_density(order, lay.num_tokens, lay.block))
        hosts, ready = _to_host([torch.stack(recall), torch.stack(density)], torch.float32)
        for name, host in zip(CURVE_NAMES, hosts):
            for mi in range(host.shape[0]):
                self._pool.submit(self._group[name], name, (*lead, mi, 0, 0), host[mi], ready)

    def write_footprints(self, layer: int, branch: str, order: str, blocks: torch.Tensor, attention: torch.Tensor) -> None:
        """Queue footprints: ``blocks`` int [Hs, K] query block indices, ``attention`` float
        [Hs, K, N] mean attention of each block's queries over all N keys (original order)."""
        li, bi, oi = self._index(layer, branch, order)
        self._set_small("footprint_block", (li, bi, oi), blocks, torch.int32)
        # stored as N x probability in float16: uniform attention is 1, so the float16
        # range and precision sit where the values are (rounded to nearest on the tensor's
        # device; above 65504 saturates to inf, as numpy's float16 cast does)
        scaled = (attention.detach().float() * self.layout.num_tokens).half()
        (maps,), ready = _to_host([scaled], torch.float16)
        for h in range(maps.shape[0]):
            self._pool.submit(self._group["footprint"], "footprint", (li, bi, oi, h, 0, 0), maps[h], ready)

    def write_qkv(self, layer: int, branch: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Queue Q/K/V of a ``qkv_layers`` layer at a ``qkv_steps`` step: each [Hs, N, D], original token order."""
        if not self.layout.has_qkv(self._step):
            raise ValueError(
                f"Q/K/V are not stored at step {self._step}; `qkv_steps` = {list(self.layout.qkv_steps)}"
            )
        li, bi = self.layout.qkv_layers.index(layer), self.layout.branches.index(branch)
        dtype = np.dtype(self.layout.qkv_dtype)
        for name, x in (("q", q), ("k", k), ("v", v)):
            arr = x.detach().to("cpu", torch.float32).numpy()
            if dtype == np.float16 and np.abs(arr).max(initial=0.0) > np.finfo(np.float16).max:
                raise ValueError(
                    f"{name} of layer {layer} exceeds the float16 range (max |x| = {np.abs(arr).max():.4g}); "
                    "capture again with --qkv-dtype float32"
                )
            arr = arr.astype(dtype)
            for h in range(arr.shape[0]):
                self._pool.submit(self._group[name], name, (li, bi, h, 0, 0), arr[h])

    def write_dfsattn_mask(self, layer: int, branch: str, kept: torch.Tensor) -> None:
        """Queue the blocks DFSAttn attended in one (layer, branch): ``kept`` bool [Hs, Mq, Mk]
        in the blocks of ``layout.dfsattn_order`` (every block True where it ran dense)."""
        order = self.layout.dfsattn_order
        if order is None:
            raise ValueError("this capture holds no DFSAttn masks (its layout has no `dfsattn_order`)")
        li, bi = self.layout.layers.index(layer), self.layout.branches.index(branch)
        (maps,), ready = _to_host([kept], torch.uint8)
        for h in range(maps.shape[0]):
            self._pool.submit(self._group["dfsattn_mask"], "dfsattn_mask", (li, bi, h, 0, 0), maps[h], ready)

    def _drain(self) -> None:
        reason = None
        try:
            self._pool.drain()
        except _WriteFailed as exc:
            reason = write_failure_reason(exc.__cause__)
        if reason is not None:
            raise self._failed(reason)

    def end_step(self) -> None:
        """Wait for the step's maps, write the small datasets, mark the step complete, flush."""
        if self._step is None:
            raise RuntimeError("no step is open")
        for name, entries in self._deferred.items():
            values = torch.stack([v for _, v in entries]).cpu().numpy()  # one GPU -> host copy per dataset
            for (index, _), value in zip(entries, values):
                self._small[name][index] = value
        self._deferred = {}
        for name, value in self._small.items():
            for index in np.ndindex(*value.shape[:3]):  # the small datasets are checked like the maps
                problem = map_problem(name, value[index], self.layout.num_blocks)
                if problem is not None:
                    raise ValueError(f"{self._describe(name, index)}: {name} has {problem}; nothing of this step was kept")
        self._drain()
        reason = None
        try:
            for name, value in self._small.items():
                self._group[name][...] = value
            self._f.flush()  # every map on disk before the marker
            self._group.attrs["finished_utc"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
            self._group.attrs["complete"] = True
            self._f.flush()
        except (OSError, RuntimeError) as exc:
            reason = write_failure_reason(exc)
        if reason is not None:
            raise self._failed(reason)
        self._space.release()
        grown = self.path.stat().st_size - self._size_before
        self._ratio = max(grown / max(1, self.layout.bytes_per_step(self._step)), 0.01)
        self.completed.add(self._step)
        self._step, self._group = None, None

    def write_video(self, frames, latent_frame, fps: float) -> None:
        """Store the run's decoded clip (root group ``video``), replacing any earlier one.

        Args:
            frames: uint8 [T, H, W, 3] RGB frames (numpy or a tensor on any device).
            latent_frame: int [T], the latent grid frame in [0, F - 1] each video frame belongs
                to, non-decreasing.
            fps: frames per second of ``frames`` (finite, > 0).

        The clip is stored small (``docs/format.md``): the longest side scaled down to
        ``VIDEO_MAX_SIDE`` pixels by area averaging, and of a clip longer than
        ``VIDEO_MAX_FRAMES`` every k-th frame, k = ceil(T / VIDEO_MAX_FRAMES), at fps / k. Only
        between steps; ``complete`` is set last, so a crash leaves no clip rather than half of one.
        """
        if self._step is not None:
            raise RuntimeError("the clip is written only between steps (call end_step first)")
        frames, latent_frame, fps = _checked_video(frames, latent_frame, fps, self.layout.grid.frames)
        stride = -(-frames.shape[0] // VIDEO_MAX_FRAMES)
        small = _downscale(frames[::stride])
        h5py = _h5py()
        strs = h5py.string_dtype()
        reason = None
        try:
            if VIDEO_GROUP in self._f:
                del self._f[VIDEO_GROUP]
            group = self._f.create_group(VIDEO_GROUP)
            group.attrs["complete"] = False
            for name, data in (("frames", small), ("latent_frame", latent_frame[::stride])):
                chunks = (1, *data.shape[1:]) if name == "frames" else None
                ds = group.create_dataset(name, data=data, chunks=chunks, compression="gzip" if chunks else None)
                ds.attrs["dims"] = np.array(VIDEO_DIMS[name], dtype=strs)
            group.attrs["fps"] = fps / stride
            group.attrs["frame_stride"] = stride
            group.attrs["source_shape"] = np.asarray(frames.shape[:3], dtype=np.int64)
            self._f.flush()  # the frames on disk before the marker
            group.attrs["complete"] = True
            self._f.flush()
        except (OSError, RuntimeError) as exc:
            reason = write_failure_reason(exc)
        if reason is not None:
            raise self._failed(reason)

    def finish(self) -> None:
        """Mark the whole run complete (every step of the layout written)."""
        missing = sorted(set(self.layout.steps) - self.completed)
        if missing:
            raise RuntimeError(f"cannot finish: steps {missing} were not written")
        self.set_attr("complete", True)

    def has_attr(self, key: str) -> bool:
        """True when the file has root attribute ``key``."""
        return key in self._f.attrs

    def has_video(self) -> bool:
        """True when the file holds a whole decoded clip (:meth:`write_video`)."""
        return completed_video(self._f) is not None

    def set_attr(self, key: str, value) -> None:
        """Set a root attribute (only between steps, so a crash cannot tear it)."""
        if self._step is not None:
            raise RuntimeError("root attributes change only between steps")
        reason = None
        try:
            self._f.attrs[key] = _attr_value(value)
            self._f.flush()
        except (OSError, RuntimeError) as exc:
            reason = write_failure_reason(exc)
        if reason is not None:
            raise self._failed(reason)

    @property
    def closed(self) -> bool:
        return self._f is None

    def close(self) -> None:
        """Finish pending writes and close. A step still open is deleted first (the run was
        interrupted while the process lived on: the file keeps exactly its completed steps)."""
        if self._f is None:
            return
        reason = None
        try:
            self._pool.close()
        except _WriteFailed as exc:
            reason = write_failure_reason(exc.__cause__)
        except ValueError:
            pass  # a refused map: its step is dropped below, the error was raised where it was found
        if reason is not None:
            self._failed(reason)  # closes the file; the run is already ending with an error
            return
        reason = None
        try:
            if self._step is not None:
                del self._f[STEP_GROUP][step_key(self._step)]
                self._step, self._group = None, None
            self._space.release()
            self._f.close()
        except (OSError, RuntimeError, KeyError) as exc:
            reason = write_failure_reason(exc)
        if reason is not None:
            logger.warning("closing %s failed (%s); %s repairs it", self.path, reason, self.options.resume)
            self._abandon()
            return
        self._f = None
        self._lock.release()

    def __enter__(self) -> "CaptureWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _checked_video(frames, latent_frame, fps, grid_frames: int) -> tuple[np.ndarray, np.ndarray, float]:
    """The arguments of :meth:`CaptureWriter.write_video` as (uint8 [T, H, W, 3], int64 [T],
    float), or TypeError/ValueError naming the argument."""
    frames = frames.detach().cpu().numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
    if frames.dtype != np.uint8:
        raise TypeError(f"`frames` must be uint8 [T, H, W, 3] RGB (got {frames.dtype}); convert floats in [-1, 1] with "
                        "dfsviz.models.sampler.video_to_uint8")
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"`frames` must be uint8 [T, H, W, 3] RGB (got {list(frames.shape)})")
    if 0 in frames.shape:
        raise ValueError(f"`frames` must hold at least one frame of at least 1 x 1 pixels (got {list(frames.shape)})")
    lf = latent_frame.detach().cpu().numpy() if isinstance(latent_frame, torch.Tensor) else np.asarray(latent_frame)
    if not np.issubdtype(lf.dtype, np.integer):
        raise TypeError(f"`latent_frame` must hold integers (got {lf.dtype})")
    if lf.shape != frames.shape[:1]:
        raise ValueError(f"`latent_frame` must hold one integer per frame ({frames.shape[0]}) (got {list(lf.shape)})")
    problem = video_problem(lf, grid_frames)
    if problem is not None:
        raise ValueError(f"`latent_frame` {problem}")
    if isinstance(fps, (bool, np.bool_)) or not isinstance(fps, (int, float, np.integer, np.floating)):
        raise TypeError(f"`fps` must be a finite number > 0 (got {fps!r})")
    if not (np.isfinite(fps) and fps > 0):
        raise ValueError(f"`fps` must be a finite number > 0 (got {float(fps)!r})")
    return np.ascontiguousarray(frames), lf.astype(np.int64), float(fps)


def _downscale(frames: np.ndarray) -> np.ndarray:
    """uint8 [T, H, W, 3] with the longest side scaled to at most VIDEO_MAX_SIDE (area average, rounded)."""
    t, h, w, _ = frames.shape
    scale = VIDEO_MAX_SIDE / max(h, w)
    if scale >= 1:
        return frames
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    x = torch.nn.functional.interpolate(x, size=size, mode="area")
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


#: HDF5 files whose writes failed, kept open for the life of the process (see ``_abandon``)
_ABANDONED: list = []


def _abandon_file(f) -> None:
    """Park ``f`` for the life of the process (see ``CaptureWriter._abandon``)."""
    _ABANDONED.append(f)


@functools.cache
def _log_hdf5_release_failures() -> None:
    """Log, rather than print, h5py's failures to release objects of a file whose writes fail.

    When a write fails (a full disk), each HDF5 object Python frees afterwards tries to
    flush its metadata, fails again, and h5py's ``__dealloc__`` prints the error twice
    (through ``sys.excepthook`` and ``sys.unraisablehook``), where no code can catch it; the
    failure itself is reported once, by the writer. Installed with the first writer; any
    other error reaches the previous hooks unchanged.
    """

    def release_failure(value, tb) -> bool:
        frames = traceback.extract_tb(tb) if tb is not None else []
        if frames and all("h5py" in frame.filename for frame in frames) and "write failed" in str(value):
            logger.debug("HDF5 could not release an object after a failed write: %s", str(value).splitlines()[0])
            return True
        return False

    previous_unraisable, previous_except = sys.unraisablehook, sys.excepthook

    def unraisable_hook(unraisable) -> None:
        if not release_failure(unraisable.exc_value, unraisable.exc_traceback):
            previous_unraisable(unraisable)

    def except_hook(kind, value, tb) -> None:
        if not release_failure(value, tb):
            previous_except(kind, value, tb)

    sys.unraisablehook, sys.excepthook = unraisable_hook, except_hook


def abandoned_files() -> list[str]:
    """Paths of capture files this process stopped writing after a failed write."""
    return [f.filename for f in _ABANDONED]

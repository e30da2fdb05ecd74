"""The capture HDF5 store: writer and reader (format version 1).

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
        layer, branch, order, method, head, q_block, k_block, sample, token, qkv_layer, dim
                              dimension scales (coordinates) of the datasets below
        m, L, r, J            float32 [layer, branch, order, head, q_block, k_block]
        scores                float32 [layer, branch, order, method, head, q_block, k_block]
        W_q, W_k              float64 [layer, branch, order, head]
        footprint_block       int32 [layer, branch, order, head, sample]
        footprint             float16 [layer, branch, order, head, sample, token]
                              (N x attention probability, original token order)
        q, k, v               [qkv_layer, branch, head, token, dim] (original token order)
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

import errno
import functools
import json
import logging
import os
import sys
import threading
import traceback
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from dfsviz.capture.file_safety import (
    SPACE_MARGIN,
    CaptureLock,
    SpaceReservation,
    pad_truncated,
    require_free_space,
    run_difference,
    temporary_path,
    write_failure_reason,
)
from dfsviz.capture.schema import (
    DIMS,
    FORMAT_NAME,
    FORMAT_VERSION,
    GZIP_LEVEL,
    STAT_NAMES,
    STEP_GROUP,
    UNITS,
    VIDEO_DIMS,
    VIDEO_GROUP,
    VIDEO_MAX_FRAMES,
    VIDEO_MAX_SIDE,
    RootAttrs,
    StoreLayout,
    dataset_dtype,
    dimension_values,
    read_json_attr,
    step_key,
)
from dfsviz.capture.validation import (
    check_structure,
    completed_step_groups,
    completed_video,
    content_problems,
    map_problem,
    video_problem,
)
from dfsviz.sparse.grid import LatentGrid

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "STEP_GROUP",
    "StoreLayout",
    "CaptureWriter",
    "CaptureReader",
    "CaptureVideo",
    "StoredStats",
    "abandoned_files",
    "open_capture",
    "step_key",
]

logger = logging.getLogger(__name__)

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


# ----------------------------------------------------------------------------------------
# writer
# ----------------------------------------------------------------------------------------
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

    def __init__(self, workers: int, num_blocks: int, describe, max_pending: int = 256) -> None:
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dfsviz-h5")
        self._slots = threading.BoundedSemaphore(max_pending)
        self._lock = threading.Lock()
        self._futures: list[Future] = []
        self._num_blocks = num_blocks
        self._describe = describe  # (dataset name, chunk offset) -> "step 3, layer 1, ..." for errors

    @staticmethod
    def encode(array: np.ndarray) -> bytes:
        """HDF5 shuffle filter, then deflate: the byte planes of the elements, zlib-compressed
        Huffman-only (see GZIP_LEVEL)."""
        flat = np.ascontiguousarray(array).reshape(-1)
        planes = np.ascontiguousarray(flat.view(np.uint8).reshape(flat.size, flat.itemsize).T)
        deflate = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 15, 9, zlib.Z_HUFFMAN_ONLY)
        return deflate.compress(planes) + deflate.flush()

    def _job(self, dset, name, offset, array, ready):
        try:
            if ready is not None:
                ready.synchronize()  # the GPU -> host copy behind `array` has landed
            problem = map_problem(name, array, self._num_blocks)
            if problem is not None:
                raise ValueError(
                    f"{self._describe(name, offset)}: {name} has {problem}; nothing of this step was kept. The model "
                    "produced it: non-finite Q/K usually mean a float16 overflow (try --dtype bfloat16 or float32)"
                )
            data = self.encode(array)
            with self._lock:
                try:
                    dset.id.write_direct_chunk(offset, data)
                except (OSError, RuntimeError) as exc:
                    raise _WriteFailed() from exc
        finally:
            self._slots.release()

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

    def __init__(self, f, path: Path, layout: StoreLayout, workers: int | None, lock: CaptureLock) -> None:
        self._f = f
        self.path = path
        self.layout = layout
        self._lock = lock
        self._pool = _ChunkPool(workers or min(16, os.cpu_count() or 1), layout.num_blocks, self._describe)
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
        """
        from dfsviz._version import __version__

        path = Path(path)
        if not path.parent.is_dir():
            raise ValueError(f"output directory {str(path.parent)!r} does not exist; create it first")
        lock = lock or CaptureLock(path)
        tmp = temporary_path(path)
        f = None
        try:
            if path.exists() and not overwrite:
                raise ValueError(f"output {str(path)!r} exists; pass --overwrite to replace it or --resume to continue it")
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
            raise ValueError(f"--resume: {str(path)!r} does not exist; drop --resume to start a new capture")
        lock = lock or CaptureLock(path)
        try:
            padded = False
            try:
                reader = CaptureReader(path)
            except ValueError as exc:
                padded = pad_truncated(path, str(exc))
                if not padded:
                    raise
                reader = CaptureReader(path)
            try:
                cls._check_same_run(path, reader, layout, run)
                done = {step_key(s) for s in reader.steps}
                broken = padded or any(name not in done for name in reader._f[STEP_GROUP])  # a half-written step
                if broken:
                    require_free_space(path, path.stat().st_size + SPACE_MARGIN, "the repair of the interrupted capture",
                                       "it copies the completed steps into a fresh file: free space, then resume again")
                    cls._repair(reader, path, layout, workers, lock)
            finally:
                reader.close()
            try:
                f = _h5py().File(path, "r+")
            except OSError as exc:
                if "unable to lock file" in str(exc).lower() or exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                    raise ValueError(
                        f"--resume: {str(path)!r} is open in another program (a dashboard or notebook?); close it, then resume"
                    ) from None
                raise
            f.attrs["complete"] = False
            f.flush()
        except BaseException:
            lock.release()
            raise
        return cls(f, path, layout, workers, lock)

    @staticmethod
    def _check_same_run(path: Path, reader: "CaptureReader", layout: StoreLayout, run: dict) -> None:
        attrs = reader._f.attrs
        stored = read_json_attr(attrs, "run_identity" if "run_identity" in attrs else "capture_config")
        kind, keys = run_difference(stored, run, _RUN_OPTIONS) or (None, [])
        if kind == "weights":
            raise ValueError(
                f"--resume: the model weights differ from those of the interrupted run in {str(path)!r} (sha256 "
                f"{str(stored.get('weights_sha256'))[:12]}... in the file, {str(run.get('weights_sha256'))[:12]}... now); "
                "resume with the same weights or pass --overwrite"
            )
        if keys or reader.layout != layout:
            raise ValueError(
                f"--resume: {str(path)!r} was captured with other settings (differs in {keys or ['layout']}); "
                "resume with the same options or pass --overwrite"
            )

    @classmethod
    def _repair(cls, reader: "CaptureReader", path: Path, layout: StoreLayout, workers: int | None, lock: CaptureLock) -> None:
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
            writer = cls(f, tmp, layout, workers, lock)
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
        values = {"layer": lay.layers, "branch": lay.branches, "order": lay.orders, "method": lay.methods,
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
            f"{done} are kept; free space, then rerun with --resume (it repairs the file)"
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
            "with --resume",
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
            dtype, fill = dataset_dtype(name, lay.qkv_dtype)
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
        """Queue one (layer, branch, order): ``stats`` m/L/r/J and ``scores`` per method, each
        float [Hs, Mq, Mk]; ``w_q``, ``w_k`` float64 [Hs]. Tensors may live on the GPU (one
        device); the call then returns without waiting for it."""
        li, bi, oi = self._index(layer, branch, order)
        g = self._group
        targets = [(name, (li, bi, oi)) for name in STAT_NAMES]
        targets += [("scores", (li, bi, oi, mi)) for mi in range(len(self.layout.methods))]
        maps, ready = _to_host([stats[n] for n in STAT_NAMES] + [scores[m] for m in self.layout.methods], torch.float32)
        for (name, lead), array in zip(targets, maps):
            for h in range(array.shape[0]):
                self._pool.submit(g[name], name, (*lead, h, 0, 0), array[h], ready)
        self._set_small("W_q", (li, bi, oi), w_q, torch.float64)
        self._set_small("W_k", (li, bi, oi), w_k, torch.float64)

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
            logger.warning("closing %s failed (%s); --resume repairs it", self.path, reason)
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


def _open_error_message(path: Path, exc: OSError) -> str:
    """The ValueError message for an OSError of ``h5py.File(path, "r")``.

    HDF5 refuses to open a file another process holds open for writing with "unable to lock
    file, errno = 11" (a BlockingIOError, EAGAIN). Only that text or errno means a running
    capture: other HDF5 errors, such as "bad superblock version number" (which contains
    "lock"), mean the file is not readable HDF5.
    """
    if "unable to lock file" in str(exc).lower() or exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
        return f"{str(path)!r} is open for writing by a running capture; wait for it or copy the file"
    return f"{str(path)!r} is not a readable HDF5 file ({exc})"


# ----------------------------------------------------------------------------------------
# reader
# ----------------------------------------------------------------------------------------
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
    """Read-only access to a capture file (``dfsviz.open``).

    Accessors take the model's step, layer and head indices and an order/method name;
    ``head=None`` means every captured head. Tensors come back on the CPU in the sparse
    core's layout [B=1, H, ...] so they plug into ``dfsviz.sparse`` functions directly.

    Raises ValueError for a file that is not a dfsviz capture, a format version this
    dfsviz cannot read (naming the dfsviz version that wrote it), or a locked file.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        from dfsviz._version import __version__

        h5py = _h5py()
        self.path = Path(path)
        if not self.path.exists():
            raise ValueError(f"capture file {str(self.path)!r} does not exist")
        try:
            self._f = h5py.File(self.path, "r")
        except OSError as exc:
            raise ValueError(_open_error_message(self.path, exc)) from None
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
            self._complete = RootAttrs(attrs).bool("complete")
            self._config = read_json_attr(attrs, "capture_config")
            check_structure(self._f, self.path, self.layout)
            self._steps = sorted(completed_step_groups(self._f))
        except ValueError as exc:
            self._f.close()
            text = str(exc)
            raise ValueError(text if text.startswith(repr(str(self.path))) else f"{str(self.path)!r}: {text}") from None
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
            data = g[name][li, bi, oi][hsel]
        else:
            mi = self._pos(method, self.methods, "method")
            data = g[name][li, bi, oi, mi][hsel]
        return torch.from_numpy(np.asarray(data))

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
        """Block scores of ``method``: float32 [1, Hs, Mq, Mk]."""
        return self._maps("scores", step, layer, order, head, branch, method)[None]

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
        return tuple(torch.from_numpy(np.asarray(g[n][li, bi][hsel]))[None] for n in ("q", "k", "v"))

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

    # -- analysis helpers (dfsviz.sparse) ---------------------------------------------------------
    def mask(self, step: int, layer: int, order: str, method: str, *, gamma: float | None = None,
             tau: float | None = None, head=None, branch: str = "cond"):
        """BlockMask [1, Hs, Mq, Mk] chosen from ``method``'s scores: top-k at budget ``gamma``
        (kept fraction of key blocks) or smallest set of normalised score mass ``tau``."""
        from dfsviz.sparse.scoring import SCORERS
        from dfsviz.sparse.select import select_cumulative, select_topk

        if (gamma is None) == (tau is None):
            raise ValueError(f"pass exactly one of `gamma` (top-k budget) or `tau` (cumulative mass) (got gamma={gamma!r}, tau={tau!r})")
        scores = self.scores(step, layer, order, method, head, branch)
        n, block = self.grid.num_tokens, self.block
        if gamma is not None:
            return select_topk(scores, gamma, seq_len=n, block=block)
        return select_cumulative(scores, tau, seq_len=n, block=block, scores_are_logits=SCORERS[method].is_logit)

    def recall(self, step: int, layer: int, order: str, method: str, *, gamma: float | None = None,
               tau: float | None = None, head=None, branch: str = "cond") -> torch.Tensor:
        """Recall R(S) of the mask of :meth:`mask`, float64 [1, Hs] (from the stored m)."""
        from dfsviz.sparse.stats import block_recall

        mask = self.mask(step, layer, order, method, gamma=gamma, tau=tau, head=head, branch=branch)
        return block_recall(self.block_stats(step, layer, order, head, branch).m, mask)

    def density(self, step: int, layer: int, order: str, method: str, *, gamma: float | None = None,
                tau: float | None = None, head=None, branch: str = "cond") -> torch.Tensor:
        """Density rho(S) of the mask of :meth:`mask`, float64 [1, Hs]."""
        return self.mask(step, layer, order, method, gamma=gamma, tau=tau, head=head, branch=branch).density()

    def oracle_recall(self, step: int, layer: int, order: str, gamma: float, head=None, branch: str = "cond") -> torch.Tensor:
        """Best recall any mask of budget gamma reaches, float64 [1, Hs]."""
        from dfsviz.sparse.select import topk_count
        from dfsviz.sparse.stats import oracle_recall

        m = self.block_stats(step, layer, order, head, branch).m
        return oracle_recall(m, topk_count(gamma, m.shape[-1]), seq_len=self.grid.num_tokens, block=self.block)

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
            file_bytes=self.path.stat().st_size,
            planned_bytes_uncompressed=lay.total_bytes(),
        )
        return info

    def validate(self) -> list[str]:
        """Check every stored value; returns a list of problems (empty when the file is sound).

        The structure (datasets, shapes, dtypes, links) was checked when the file was opened;
        this reads every map of every completed step once (rows of m sum to 1, finite values,
        non-negative diversities, footprints in range ...), the permutations, the coordinates
        and the dimension scales. Cost: one pass over the file's data.
        """
        problems = content_problems(self._f, self.layout, self.steps)
        if self.complete and self.steps != list(self.layout.steps):
            problems.append(f"marked complete but steps {sorted(set(self.layout.steps) - set(self.steps))} are missing")
        return problems

    def close(self) -> None:
        if self._f.id.valid:
            self._f.close()

    def __enter__(self) -> "CaptureReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "complete" if self.complete else f"incomplete ({len(self.steps)}/{len(self.layout.steps)} steps)"
        return f"CaptureReader({str(self.path)!r}, {self.grid.name}, {state})"


def open_capture(path: str | os.PathLike) -> CaptureReader:
    """Open a capture file read-only (``dfsviz.open``). See :class:`CaptureReader`."""
    return CaptureReader(path)

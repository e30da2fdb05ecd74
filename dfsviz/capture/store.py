"""The capture HDF5 store: schema (format version 1), writer and reader.

This module is the only place that knows the on-disk layout; ``docs/format.md``
documents it for people. Layout (dims in brackets, "map" = one chunk):

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

Crash safety: a step's group and all its datasets are created and flushed before any
map is written, and ``complete`` is set (and flushed) only after the step's last map.
Between those two flushes the writer only adds chunks to datasets of the new group, so
a process killed at any moment (SIGKILL included) leaves the earlier steps untouched;
the reader lists only groups whose ``complete`` attribute is true. Maps are compressed
(byte shuffle + Huffman-only deflate, read by the standard HDF5 shuffle and gzip filters)
by a thread pool and written with ``write_direct_chunk``, so compression runs in parallel
with the GPU. Maps on a CUDA device reach the pool through one non-blocking copy per
(layer, branch, order) into pinned host memory, and the small datasets (W_q, W_k,
footprint_block) are copied at ``end_step``: queueing a map never waits for the GPU.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import threading
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from dfsviz.sparse.grid import LatentGrid

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "STEP_GROUP",
    "StoreLayout",
    "CaptureWriter",
    "CaptureReader",
    "StoredStats",
    "open_capture",
    "step_key",
]

logger = logging.getLogger(__name__)

FORMAT_NAME = "dfsviz-capture"
FORMAT_VERSION = 1
STEP_GROUP = "steps"
# Maps are deflated Huffman-only (Z_HUFFMAN_ONLY: no LZ77 match search): on shuffled float
# maps, whose mantissa bytes match search cannot shorten, it costs a fraction of level 1's
# CPU for files a few percent larger. The stream is standard zlib, so HDF5's gzip filter decodes
# it; GZIP_LEVEL is only the level the filter declares (the chunks are written
# precompressed, the filter never compresses).
GZIP_LEVEL = 1
STAT_NAMES = ("m", "L", "r", "J")

# dims of every per-step dataset (the schema); docs/format.md mirrors this table
DIMS: dict[str, tuple[str, ...]] = {
    "m": ("layer", "branch", "order", "head", "q_block", "k_block"),
    "L": ("layer", "branch", "order", "head", "q_block", "k_block"),
    "r": ("layer", "branch", "order", "head", "q_block", "k_block"),
    "J": ("layer", "branch", "order", "head", "q_block", "k_block"),
    "scores": ("layer", "branch", "order", "method", "head", "q_block", "k_block"),
    "W_q": ("layer", "branch", "order", "head"),
    "W_k": ("layer", "branch", "order", "head"),
    "footprint_block": ("layer", "branch", "order", "head", "sample"),
    "footprint": ("layer", "branch", "order", "head", "sample", "token"),
    "q": ("qkv_layer", "branch", "head", "token", "dim"),
    "k": ("qkv_layer", "branch", "head", "token", "dim"),
    "v": ("qkv_layer", "branch", "head", "token", "dim"),
}
UNITS = {
    "m": "fraction of the query block's attention (rows sum to 1 over k_block)",
    "L": "logit (q . k * scale)",
    "r": "logit",
    "J": "logit (nats)",
    "scores": "method-specific (meanpool: logit; dfs_tile/antidiagonal/oracle: mass)",
    "W_q": "fraction of variance (0..1)",
    "W_k": "fraction of variance (0..1)",
    "footprint_block": "query block index in the order's block sequence",
    "footprint": "N x attention probability (1 = uniform over the N keys)",
    "q": "model units, post-norm post-RoPE",
    "k": "model units, post-norm post-RoPE",
    "v": "model units",
}


def step_key(step: int) -> str:
    """Group name of a captured step, e.g. ``step_0007``."""
    return f"step_{step:04d}"


def _h5py():
    import h5py

    return h5py


@dataclass(frozen=True)
class StoreLayout:
    """Everything that fixes the shapes of a capture file.

    Fields:
        grid: token grid of the self-attention sequence (N = grid.num_tokens, padding dropped).
        block: tokens per block (Mq = Mk = ceil(N / block)).
        orders: token order names, e.g. ("raster", "hilbert3d").
        methods: scoring method names.
        layers: captured layer indices (the adapter's integer numbering).
        layer_names: qualified module names, same length as ``layers``.
        heads: captured head indices of the model.
        branches: ("cond",) or ("cond", "uncond").
        steps: captured denoising step indices (0-based).
        footprints: sampled query blocks per head (0 = none).
        qkv_layers: layers whose Q/K/V are stored (subset of ``layers``).
        head_dim: D.
        qkv_dtype: numpy dtype name of stored Q/K/V ("float16" or "float32").
        qkv_steps: steps at which Q/K/V are stored (subset of ``steps``); None = every step.
    """

    grid: LatentGrid
    block: int
    orders: tuple[str, ...]
    methods: tuple[str, ...]
    layers: tuple[int, ...]
    layer_names: tuple[str, ...]
    heads: tuple[int, ...]
    branches: tuple[str, ...]
    steps: tuple[int, ...]
    footprints: int
    qkv_layers: tuple[int, ...] = ()
    head_dim: int = 64
    qkv_dtype: str = "float32"
    qkv_steps: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if len(self.layers) != len(self.layer_names):
            raise ValueError("`layer_names` must name every captured layer")
        missing = sorted(set(self.qkv_layers) - set(self.layers))
        if missing:
            raise ValueError(f"`qkv_layers` {missing} are not captured layers {list(self.layers)}")
        if self.qkv_dtype not in ("float16", "float32"):
            raise ValueError(f"`qkv_dtype` must be 'float16' or 'float32' (got {self.qkv_dtype!r})")
        if self.qkv_steps is None:
            object.__setattr__(self, "qkv_steps", tuple(self.steps))
        extra = sorted(set(self.qkv_steps) - set(self.steps))
        if extra:
            raise ValueError(f"`qkv_steps` {extra} are not captured steps {list(self.steps)}")

    @property
    def num_tokens(self) -> int:
        return self.grid.num_tokens

    @property
    def num_blocks(self) -> int:
        return -(-self.grid.num_tokens // self.block)

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of a per-step dataset (see ``DIMS``)."""
        sizes = {
            "layer": len(self.layers),
            "branch": len(self.branches),
            "order": len(self.orders),
            "method": len(self.methods),
            "head": len(self.heads),
            "q_block": self.num_blocks,
            "k_block": self.num_blocks,
            "sample": self.footprints,
            "token": self.num_tokens,
            "qkv_layer": len(self.qkv_layers),
            "dim": self.head_dim,
        }
        return tuple(sizes[d] for d in DIMS[name])

    def has_qkv(self, step: int) -> bool:
        """Whether Q/K/V are stored at ``step``."""
        return bool(self.qkv_layers) and step in self.qkv_steps

    def datasets(self, step: int) -> list[str]:
        """Datasets present in the group of captured step ``step``."""
        names = list(STAT_NAMES) + ["W_q", "W_k"]
        if self.methods:
            names.append("scores")
        if self.footprints:
            names += ["footprint_block", "footprint"]
        if self.has_qkv(step):
            names += ["q", "k", "v"]
        return names

    def bytes_per_step(self, step: int) -> int:
        """Uncompressed bytes of one step's datasets (an upper bound of the file growth)."""
        itemsize = {"footprint": 2, "footprint_block": 4, "W_q": 8, "W_k": 8, "q": 0, "k": 0, "v": 0}
        qkv = 2 if self.qkv_dtype == "float16" else 4
        total = 0
        for name in self.datasets(step):
            size = itemsize.get(name, 4) or qkv
            total += int(np.prod(self.shape(name), dtype=np.int64)) * size
        return total

    def total_bytes(self) -> int:
        """Uncompressed bytes of all captured steps (an upper bound of the file size)."""
        return sum(self.bytes_per_step(step) for step in self.steps)

    def to_attrs(self) -> dict:
        g = self.grid
        return {
            "grid": g.name,
            "grid_frames": g.frames,
            "grid_height": g.height,
            "grid_width": g.width,
            "text_len": g.text_len,
            "text_first": g.text_first,
            "num_tokens": g.num_tokens,
            "block": self.block,
            "num_blocks": self.num_blocks,
            "orders": list(self.orders),
            "methods": list(self.methods),
            "layers": np.asarray(self.layers, dtype=np.int64),
            "layer_names": list(self.layer_names),
            "heads": np.asarray(self.heads, dtype=np.int64),
            "branches": list(self.branches),
            "steps": np.asarray(self.steps, dtype=np.int64),
            "footprints": self.footprints,
            "qkv_layers": np.asarray(self.qkv_layers, dtype=np.int64),
            "head_dim": self.head_dim,
            "qkv_dtype": self.qkv_dtype,
            "qkv_steps": np.asarray(self.qkv_steps, dtype=np.int64),
        }

    @classmethod
    def from_attrs(cls, attrs) -> "StoreLayout":
        grid = LatentGrid(
            int(attrs["grid_frames"]),
            int(attrs["grid_height"]),
            int(attrs["grid_width"]),
            text_len=int(attrs["text_len"]),
            text_first=bool(attrs["text_first"]),
        )
        return cls(
            grid=grid,
            block=int(attrs["block"]),
            orders=_strs(attrs["orders"]),
            methods=_strs(attrs["methods"]),
            layers=_ints(attrs["layers"]),
            layer_names=_strs(attrs["layer_names"]),
            heads=_ints(attrs["heads"]),
            branches=_strs(attrs["branches"]),
            steps=_ints(attrs["steps"]),
            footprints=int(attrs["footprints"]),
            qkv_layers=_ints(attrs["qkv_layers"]),
            head_dim=int(attrs["head_dim"]),
            qkv_dtype=str(attrs["qkv_dtype"]),
            # Files written before `qkv_steps` existed stored Q/K/V at every step.
            qkv_steps=_ints(attrs["qkv_steps"]) if "qkv_steps" in attrs else None,
        )


def _strs(value) -> tuple[str, ...]:
    return tuple(v.decode() if isinstance(v, bytes) else str(v) for v in np.atleast_1d(value))


def _ints(value) -> tuple[int, ...]:
    return tuple(int(v) for v in np.atleast_1d(value))


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


class _ChunkPool:
    """Compress maps on worker threads (zlib releases the GIL) and write them as raw chunks."""

    def __init__(self, workers: int, max_pending: int = 256) -> None:
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dfsviz-h5")
        self._slots = threading.BoundedSemaphore(max_pending)
        self._lock = threading.Lock()
        self._futures: list[Future] = []

    @staticmethod
    def encode(array: np.ndarray) -> bytes:
        """HDF5 shuffle filter, then deflate: the byte planes of the elements, zlib-compressed
        Huffman-only (see GZIP_LEVEL)."""
        flat = np.ascontiguousarray(array).reshape(-1)
        planes = np.ascontiguousarray(flat.view(np.uint8).reshape(flat.size, flat.itemsize).T)
        deflate = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 15, 9, zlib.Z_HUFFMAN_ONLY)
        return deflate.compress(planes) + deflate.flush()

    def _job(self, dset, offset, array, ready):
        try:
            if ready is not None:
                ready.synchronize()  # the GPU -> host copy behind `array` has landed
            data = self.encode(array)
            with self._lock:
                dset.id.write_direct_chunk(offset, data)
        finally:
            self._slots.release()

    def submit(
        self, dset, offset: tuple[int, ...], array: np.ndarray, ready: torch.cuda.Event | None = None
    ) -> None:
        """Queue ``array`` as the chunk at ``offset``; with ``ready``, read it only after that event."""
        self._slots.acquire()
        self._futures.append(self._pool.submit(self._job, dset, offset, array, ready))

    def drain(self) -> None:
        """Wait for every pending chunk; re-raise the first worker error."""
        futures, self._futures = self._futures, []
        for fut in futures:
            fut.result()

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
    leaves a valid file marked incomplete.
    """

    def __init__(self, f, layout: StoreLayout, workers: int | None) -> None:
        self._f = f
        self.layout = layout
        self._pool = _ChunkPool(workers or min(16, os.cpu_count() or 1))
        self._group = None
        self._step: int | None = None
        self._small: dict[str, np.ndarray] = {}
        # CUDA values of the small datasets: copied to `_small` at end_step, not per call
        self._deferred: dict[str, list[tuple[tuple[int, int, int], torch.Tensor]]] = {}
        self.completed: set[int] = {
            int(g.attrs["step"]) for g in f[STEP_GROUP].values() if bool(g.attrs.get("complete", False))
        }

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
    ) -> "CaptureWriter":
        """Create ``path`` with the root attributes, coordinates and order permutations.

        Args:
            layout: the file's shapes.
            attrs: descriptive root attributes (model, prompt, seed, scheduler, capture_config ...).
            orders: order name -> int64 [N] permutation of the whole sequence.
            overwrite: replace an existing file; otherwise an existing ``path`` raises ValueError.
        """
        from dfsviz import __version__

        path = Path(path)
        if path.exists() and not overwrite:
            raise ValueError(f"output {str(path)!r} exists; pass --overwrite to replace it or --resume to continue it")
        if path.parent and not path.parent.exists():
            raise ValueError(f"output directory {str(path.parent)!r} does not exist; create it first")
        h5py = _h5py()
        f = h5py.File(path, "w")
        try:
            root = f.attrs
            root["format"] = FORMAT_NAME
            root["format_version"] = FORMAT_VERSION
            root["dfsviz_version"] = __version__
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
            f.flush()
        except BaseException:
            f.close()
            raise
        return cls(f, layout, workers)

    @classmethod
    def resume(
        cls, path: str | os.PathLike, layout: StoreLayout, capture_config: dict, *, workers: int | None = None
    ) -> "CaptureWriter":
        """Reopen an interrupted capture; drop its incomplete step groups.

        Raises ValueError when the file is not a capture of this format version or was made
        with another capture configuration (the comparison ignores resume/overwrite/progress).
        """
        path = Path(path)
        if not path.exists():
            raise ValueError(f"--resume: {str(path)!r} does not exist; drop --resume to start a new capture")
        reader = CaptureReader(path)  # validates the format version
        try:
            stored = json.loads(reader.attrs["capture_config"])
            stored_layout = reader.layout
        finally:
            reader.close()
        ignore = {"resume", "overwrite", "out"}
        diff = sorted(
            k for k in set(stored) | set(capture_config) if k not in ignore and stored.get(k) != capture_config.get(k)
        )
        if diff or stored_layout != layout:
            raise ValueError(
                f"--resume: {str(path)!r} was captured with other settings (differs in {diff or ['layout']}); "
                "resume with the same options or pass --overwrite"
            )
        f = _h5py().File(path, "r+")
        for name in list(f[STEP_GROUP]):
            if not bool(f[STEP_GROUP][name].attrs.get("complete", False)):
                logger.info("resume: dropping incomplete %s", name)
                del f[STEP_GROUP][name]
        f.attrs["complete"] = False
        f.flush()
        return cls(f, layout, workers)

    # -- steps -----------------------------------------------------------------------------
    @property
    def open_step(self) -> int | None:
        """The step between :meth:`begin_step` and :meth:`end_step`, else None."""
        return self._step

    def begin_step(self, step: int, attrs: dict | None = None) -> None:
        """Create the step's group with every dataset (unwritten maps read as NaN) and flush."""
        if self._step is not None:
            raise RuntimeError(f"step {self._step} is still open; call end_step first")
        if step not in self.layout.steps:
            raise ValueError(f"`step` {step} is not a captured step {list(self.layout.steps)}")
        if step in self.completed:
            raise ValueError(f"step {step} is already complete in this file")
        h5py = _h5py()
        lay = self.layout
        group = self._f[STEP_GROUP].create_group(step_key(step))
        group.attrs["step"] = step
        group.attrs["complete"] = False
        group.attrs["started_utc"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        for key, value in (attrs or {}).items():
            group.attrs[key] = _attr_value(value)
        strs = h5py.string_dtype()
        coords = {
            "layer": np.asarray(lay.layers, dtype=np.int64),
            "branch": np.array(lay.branches, dtype=strs),
            "order": np.array(lay.orders, dtype=strs),
            "method": np.array(lay.methods, dtype=strs),
            "head": np.asarray(lay.heads, dtype=np.int64),
            "q_block": np.arange(lay.num_blocks, dtype=np.int64),
            "k_block": np.arange(lay.num_blocks, dtype=np.int64),
            "sample": np.arange(lay.footprints, dtype=np.int64),
            "token": np.arange(lay.num_tokens, dtype=np.int64),
            "qkv_layer": np.asarray(lay.qkv_layers, dtype=np.int64),
            "dim": np.arange(lay.head_dim, dtype=np.int64),
        }
        used = {d for name in lay.datasets(step) for d in DIMS[name]}
        scales = {}
        for dim in sorted(used):
            ds = group.create_dataset(dim, data=coords[dim])
            ds.make_scale(dim)
            scales[dim] = ds
        for name in lay.datasets(step):
            shape = lay.shape(name)
            dtype, fill = {
                "footprint": (np.float16, np.nan),
                "footprint_block": (np.int32, -1),
                "W_q": (np.float64, np.nan),
                "W_k": (np.float64, np.nan),
            }.get(name, (np.dtype(lay.qkv_dtype) if name in ("q", "k", "v") else np.float32, np.nan))
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
        self._small = {
            "W_q": np.full(lay.shape("W_q"), np.nan),
            "W_k": np.full(lay.shape("W_k"), np.nan),
        }
        if lay.footprints:
            self._small["footprint_block"] = np.full(lay.shape("footprint_block"), -1, dtype=np.int32)
        self._deferred = {}
        self._f.flush()
        self._group = group
        self._step = step

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
        targets = [(g[name], (li, bi, oi)) for name in STAT_NAMES]
        targets += [(g["scores"], (li, bi, oi, mi)) for mi in range(len(self.layout.methods))]
        maps, ready = _to_host([stats[n] for n in STAT_NAMES] + [scores[m] for m in self.layout.methods], torch.float32)
        for (dset, lead), array in zip(targets, maps):
            for h in range(array.shape[0]):
                self._pool.submit(dset, (*lead, h, 0, 0), array[h], ready)
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
            self._pool.submit(self._group["footprint"], (li, bi, oi, h, 0, 0), maps[h], ready)

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
                self._pool.submit(self._group[name], (li, bi, h, 0, 0), arr[h])

    def end_step(self) -> None:
        """Wait for the step's maps, write the small datasets, mark the step complete, flush."""
        if self._step is None:
            raise RuntimeError("no step is open")
        self._pool.drain()
        for name, entries in self._deferred.items():
            values = torch.stack([v for _, v in entries]).cpu().numpy()  # one GPU -> host copy per dataset
            for (index, _), value in zip(entries, values):
                self._small[name][index] = value
        self._deferred = {}
        for name, value in self._small.items():
            self._group[name][...] = value
        self._f.flush()  # every map on disk before the marker
        self._group.attrs["finished_utc"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self._group.attrs["complete"] = True
        self._f.flush()
        self.completed.add(self._step)
        self._step, self._group = None, None

    def finish(self) -> None:
        """Mark the whole run complete (every step of the layout written)."""
        missing = sorted(set(self.layout.steps) - self.completed)
        if missing:
            raise RuntimeError(f"cannot finish: steps {missing} were not written")
        self._f.attrs["complete"] = True
        self._f.flush()

    def has_attr(self, key: str) -> bool:
        """True when the file has root attribute ``key``."""
        return key in self._f.attrs

    def set_attr(self, key: str, value) -> None:
        """Set a root attribute (only between steps, so a crash cannot tear it)."""
        if self._step is not None:
            raise RuntimeError("root attributes change only between steps")
        self._f.attrs[key] = _attr_value(value)
        self._f.flush()

    def close(self) -> None:
        try:
            self._pool.close()
        finally:
            if self._f.id.valid:
                self._f.close()

    def __enter__(self) -> "CaptureWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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


class CaptureReader:
    """Read-only access to a capture file (``dfsviz.open``).

    Accessors take the model's step, layer and head indices and an order/method name;
    ``head=None`` means every captured head. Tensors come back on the CPU in the sparse
    core's layout [B=1, H, ...] so they plug into ``dfsviz.sparse`` functions directly.

    Raises ValueError for a file that is not a dfsviz capture, a format version this
    dfsviz cannot read (naming the dfsviz version that wrote it), or a locked file.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        from dfsviz import __version__

        h5py = _h5py()
        self.path = Path(path)
        if not self.path.exists():
            raise ValueError(f"capture file {str(self.path)!r} does not exist")
        try:
            self._f = h5py.File(self.path, "r")
        except OSError as exc:
            raise ValueError(_open_error_message(self.path, exc)) from None
        attrs = self._f.attrs
        if attrs.get("format") != FORMAT_NAME:
            self._f.close()
            raise ValueError(f"{str(self.path)!r} is not a dfsviz capture (no format={FORMAT_NAME!r} attribute)")
        version = int(attrs.get("format_version", -1))
        if version != FORMAT_VERSION:
            writer = attrs.get("dfsviz_version", "unknown")
            self._f.close()
            raise ValueError(
                f"{str(self.path)!r} has capture format version {version}, written by dfsviz {writer}; this dfsviz "
                f"{__version__} reads format version {FORMAT_VERSION}: open it with dfsviz {writer}"
            )
        self.attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in attrs.items()}
        self.layout = StoreLayout.from_attrs(attrs)

    # -- listing ---------------------------------------------------------------------------
    @property
    def complete(self) -> bool:
        """True when the capture ran to its end."""
        return bool(self._f.attrs["complete"])

    @property
    def steps(self) -> list[int]:
        """Completed steps, ascending (an interrupted run lists the steps it finished)."""
        out = [int(g.attrs["step"]) for g in self._f[STEP_GROUP].values() if bool(g.attrs.get("complete", False))]
        return sorted(out)

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
        return json.loads(self.attrs["capture_config"])

    # -- index helpers ---------------------------------------------------------------------
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
        """Structural checks; returns a list of problems (empty when the file is sound)."""
        problems = []
        lay = self.layout
        n = lay.num_tokens
        for order in lay.orders:
            if order not in self._f["orders"]:
                problems.append(f"missing permutation of order {order!r}")
                continue
            perm = self._f["orders"][order][...]
            if perm.shape != (n,) or not np.array_equal(np.sort(perm), np.arange(n)):
                problems.append(f"order {order!r}: stored permutation is not a bijection of 0..{n - 1}")
        if self._f["coords"].shape != (lay.grid.num_video, 3):
            problems.append(f"coords has shape {self._f['coords'].shape}, expected ({lay.grid.num_video}, 3)")
        for step in self.steps:
            g = self._f[STEP_GROUP][step_key(step)]
            if step not in lay.steps:
                problems.append(f"step {step} is not among the planned steps {list(lay.steps)}")
            for name in lay.datasets(step):
                if name not in g:
                    problems.append(f"{step_key(step)}: missing dataset {name!r}")
                elif g[name].shape != lay.shape(name):
                    problems.append(f"{step_key(step)}/{name}: shape {g[name].shape}, expected {lay.shape(name)}")
            if "m" in g and g["m"].shape == lay.shape("m"):
                # one map per step suffices to catch unwritten (NaN) or non-normalised data cheaply
                first = g["m"][0, 0, 0, 0]
                rows = first.sum(axis=-1)
                if not np.all(np.isfinite(first)) or not np.allclose(rows, 1.0, atol=1e-3):
                    problems.append(f"{step_key(step)}/m: first map is unwritten or its rows do not sum to 1")
        if self.complete and sorted(self.steps) != sorted(lay.steps):
            problems.append(f"marked complete but steps {sorted(set(lay.steps) - set(self.steps))} are missing")
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

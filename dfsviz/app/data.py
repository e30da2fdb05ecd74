"""The dashboard's one data module: the only code of ``dfsviz.app`` that opens HDF5.

A :class:`CaptureCatalog` serves the capture files under one or more root folders:

* it lists every ``*.h5`` / ``*.hdf5`` file under the roots (symlinks that resolve outside
  a root are skipped) and tells, per file, whether it is sound, incomplete, invalid or
  unreadable; ``CaptureReader.validate()`` runs once per file version (path, size, mtime),
  however many requests ask at once, and a file that fails it is never read for a view;
* it refuses any path that does not resolve (symlinks followed) to a file inside a root,
  so a crafted URL (``?file=../../etc/passwd``) reads nothing;
* it opens files read-only as :class:`dfsviz.analysis.measured_capture.MeasuredCapture` (what
  ``dfsviz.open`` returns: the storage reader plus its measured masks), keeps an
  LRU of open readers, and memoises map reads (an LRU bounded in bytes) keyed by the file's
  path, size and mtime, so a rewritten file is never served stale;
* it memoises calibrations (:meth:`CaptureCatalog.calibration`) per file version and settings;
* it turns every failure of a file (not HDF5, truncated, unknown format version, missing
  datasets) into a :class:`CaptureError` whose message is meant for a banner.

Captures are named by an id ``"<root label>/<path inside the root>"`` (the root label is
the root folder's name, made unique), which is what the URL query string carries. Messages
name files by that id, never by their absolute path on the server (:meth:`CaptureCatalog.hide_paths`).
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from dfsviz.analysis.calibrate import Calibration, CalibrationConfig

logger = logging.getLogger(__name__)

__all__ = [
    "CAPTURE_SUFFIXES", "CaptureCatalog", "CaptureEntry", "CaptureError", "exact_footprint", "get_catalog",
]

#: File name endings listed as captures.
CAPTURE_SUFFIXES = (".h5", ".hdf5")
#: Flask config key under which :func:`dfsviz.app.create_app` stores the catalog.
CONFIG_KEY = "DFSVIZ_CATALOG"
_SHOWN_PROBLEMS = 3  # validation problems named in a banner; `dfsviz inspect` lists them all


class CaptureError(ValueError):
    """A capture id that cannot be served (outside the roots, missing, unreadable)."""


@dataclass(frozen=True)
class CaptureEntry:
    """One capture file under the roots.

    Fields:
        id: ``"<root label>/<relative path>"``, the URL key.
        path: resolved absolute path.
        status: "ok", "incomplete" (an interrupted run: its completed steps are usable),
            "invalid" (fails ``CaptureReader.validate()``: never drawn) or "error" (unreadable,
            or no completed step).
        message: banner text; "" when status is "ok".
        size: file size in bytes.
    """

    id: str
    path: Path
    status: str
    message: str
    size: int

    @property
    def usable(self) -> bool:
        """Whether views may read the file (sound or incomplete)."""
        return self.status in ("ok", "incomplete")

    @property
    def label(self) -> str:
        mark = {"ok": "", "incomplete": " (incomplete)", "invalid": " (invalid)", "error": " (unreadable)"}[self.status]
        return f"{self.id}{mark}"


class _LRU:
    """Thread-safe LRU of computed values, bounded by entry count and by tensor/array bytes."""

    def __init__(self, max_items: int, max_bytes: int, on_evict: Callable[[object], None] | None = None) -> None:
        self._data: OrderedDict = OrderedDict()
        self._sizes: dict = {}
        self._bytes = 0
        self._lock = threading.Lock()
        self.max_items, self.max_bytes, self._on_evict = max_items, max_bytes, on_evict
        self.hits = self.misses = 0

    @staticmethod
    def _nbytes(value: object) -> int:
        if isinstance(value, torch.Tensor):
            return value.numel() * value.element_size()
        if isinstance(value, np.ndarray):
            return value.nbytes
        if isinstance(value, (tuple, list)):
            return sum(_LRU._nbytes(v) for v in value)
        if isinstance(value, dict):
            return sum(_LRU._nbytes(v) for v in value.values())
        if is_dataclass(value) and not isinstance(value, type):  # StoredStats, BlockMask: their tensors
            return sum(_LRU._nbytes(getattr(value, f.name)) for f in fields(value))
        if isinstance(value, (str, bytes)):
            return len(value)
        return 64

    def get_or_compute(self, key, compute: Callable[[], object]):
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                self.hits += 1
                return self._data[key]
            self.misses += 1
        # computed outside the lock so slow reads of one view never block the others
        value = compute()
        size = self._nbytes(value)
        evicted = []
        with self._lock:
            if key not in self._data:
                self._data[key] = value
                self._sizes[key] = size
                self._bytes += size
            while len(self._data) > 1 and (len(self._data) > self.max_items or self._bytes > self.max_bytes):
                old_key, old = self._data.popitem(last=False)
                self._bytes -= self._sizes.pop(old_key)
                evicted.append(old)
        if self._on_evict is not None:
            for old in evicted:
                self._on_evict(old)
        return value

    def clear(self) -> None:
        with self._lock:
            items = list(self._data.values())
            self._data.clear()
            self._sizes.clear()
            self._bytes = 0
        if self._on_evict is not None:
            for old in items:
                self._on_evict(old)


def _close_reader(reader: object) -> None:
    try:
        reader.close()
    except Exception:  # a reader that failed half-way has nothing left to close
        logger.debug("closing a cached reader failed", exc_info=True)


def _unique_labels(roots: Sequence[Path]) -> list[str]:
    labels: list[str] = []
    for root in roots:
        base = root.name or "root"
        label, i = base, 2
        while label in labels:
            label, i = f"{base}{i}", i + 1
        labels.append(label)
    return labels


class CaptureCatalog:
    """Read-only, cached access to the capture files under ``roots``.

    Args:
        roots: folders to serve (each must exist); files are listed recursively.
        max_open: open readers kept (LRU; older ones are closed).
        cache_bytes: bytes of memoised maps kept (LRU).

    Raises ValueError when no root is given or a root is not a folder.
    """

    def __init__(self, roots: Sequence[str | os.PathLike], *, max_open: int = 8, cache_bytes: int = 1 << 30) -> None:
        if isinstance(roots, (str, os.PathLike)):
            roots = [roots]
        if not roots:
            raise ValueError("`roots` must name at least one folder of capture files, e.g. runs/")
        resolved = []
        for root in roots:
            path = Path(root).expanduser().resolve()
            if not path.is_dir():
                raise ValueError(f"capture root {str(root)!r} is not a folder; create it or pass another --root")
            if path not in resolved:
                resolved.append(path)
        self.roots: dict[str, Path] = dict(zip(_unique_labels(resolved), resolved))
        if isinstance(max_open, bool) or not isinstance(max_open, int) or max_open < 1:
            raise ValueError(f"`max_open` must be a positive integer (got {max_open!r})")
        self._readers = _LRU(max_open, 1 << 62, on_evict=_close_reader)
        self._maps = _LRU(1 << 20, int(cache_bytes))
        # capture id -> (file stamp, entry) of the latest version checked, and one lock per id
        # so that concurrent requests wait for one validation instead of each running it
        self._status: dict[str, tuple[tuple, CaptureEntry]] = {}
        self._status_locks: dict[str, threading.Lock] = {}
        self._status_lock = threading.Lock()

    def hide_paths(self, text: str) -> str:
        """``text`` with each root's absolute path replaced by its label, so a message shown
        in the browser names captures by their ids, never by where they live on the server."""
        for label, root in sorted(self.roots.items(), key=lambda item: -len(str(item[1]))):
            text = text.replace(str(root), label)
        return text

    # -- paths -----------------------------------------------------------------------------
    def resolve(self, capture_id: object) -> Path:
        """The resolved file of ``capture_id``; CaptureError when it is outside the roots or missing."""
        if not isinstance(capture_id, str) or "/" not in capture_id:
            raise CaptureError(f"capture id must look like '<root>/<file>.h5' (got {capture_id!r})")
        label, _, rel = capture_id.partition("/")
        if label not in self.roots:
            raise CaptureError(f"refused {capture_id!r}: {label!r} is not a served root ({', '.join(self.roots)})")
        root = self.roots[label]
        if not rel or Path(rel).is_absolute() or "\x00" in rel:
            raise CaptureError(f"refused {capture_id!r}: the path must be relative to the root {label!r}")
        path = (root / rel).resolve()
        if not path.is_relative_to(root):
            raise CaptureError(f"refused {capture_id!r}: the path resolves outside the capture root {label!r}")
        if path.suffix.lower() not in CAPTURE_SUFFIXES:
            raise CaptureError(f"refused {capture_id!r}: only {', '.join(CAPTURE_SUFFIXES)} files are served")
        if not path.is_file():
            raise CaptureError(f"capture {capture_id!r} does not exist under {label!r}")
        return path

    def list_ids(self) -> list[str]:
        """Capture ids of every file under the roots, sorted (symlinks leaving a root are skipped)."""
        ids = []
        for label, root in self.roots.items():
            for dirpath, _, files in os.walk(root, followlinks=False):
                for name in files:
                    if not name.lower().endswith(CAPTURE_SUFFIXES):
                        continue
                    rel = (Path(dirpath) / name).relative_to(root).as_posix()
                    cid = f"{label}/{rel}"
                    try:
                        self.resolve(cid)
                    except CaptureError as exc:
                        logger.warning("not serving %s: %s", cid, exc)
                        continue
                    ids.append(cid)
        return sorted(ids)

    @staticmethod
    def _stamp(path: Path) -> tuple[str, int, int]:
        st = path.stat()
        return (str(path), st.st_size, st.st_mtime_ns)

    # -- readers ---------------------------------------------------------------------------
    def _open(self, capture_id: str, path: Path, stamp: tuple):
        """The cached open reader of one file version; CaptureError when it cannot be opened."""
        from dfsviz.analysis.measured_capture import MeasuredCapture

        def open_reader():
            try:
                return MeasuredCapture(path)
            except (ValueError, OSError, KeyError) as exc:
                raise CaptureError(self.hide_paths(f"cannot open {capture_id!r}: {exc}")) from None

        return self._readers.get_or_compute(stamp, open_reader)

    def _usable(self, capture_id: str) -> tuple[tuple, object]:
        """(file stamp, open reader) of a capture that views may read; CaptureError otherwise."""
        path = self.resolve(capture_id)
        stamp = self._stamp(path)
        entry = self._entry(capture_id, path, stamp)
        if not entry.usable:
            raise CaptureError(entry.message)
        return stamp, self._open(capture_id, path, stamp)

    def reader(self, capture_id: str):
        """The cached open :class:`~dfsviz.analysis.measured_capture.MeasuredCapture` of ``capture_id``.

        Raises CaptureError for an id that is refused, a file that cannot be opened and a
        file that is not usable (see :meth:`entry`).
        """
        return self._usable(capture_id)[1]

    def entry(self, capture_id: str) -> CaptureEntry:
        """Status of one capture, validated once per file version. CaptureError when the id is refused."""
        path = self.resolve(capture_id)
        return self._entry(capture_id, path, self._stamp(path))

    def _entry(self, capture_id: str, path: Path, stamp: tuple) -> CaptureEntry:
        with self._status_lock:
            lock = self._status_locks.setdefault(capture_id, threading.Lock())
        with lock:
            known = self._status.get(capture_id)
            if known is not None and known[0] == stamp:
                return known[1]
            status, message = self._check(capture_id, path, stamp)
            entry = CaptureEntry(capture_id, path, status, message, stamp[1])
            self._status[capture_id] = (stamp, entry)
        return entry

    def _check(self, capture_id: str, path: Path, stamp: tuple) -> tuple[str, str]:
        """(status, message) of one file version: opens it and runs ``CaptureReader.validate()``."""
        try:
            reader = self._open(capture_id, path, stamp)
            if not reader.steps:
                return "error", f"{capture_id}: no completed step (the capture stopped before its first step)"
            problems = reader.validate()
            if problems:
                shown = problems[:_SHOWN_PROBLEMS]
                more = f" (and {len(problems) - len(shown)} more)" if len(problems) > len(shown) else ""
                return "invalid", self.hide_paths(
                    f"{capture_id}: invalid capture, not drawn: {'; '.join(shown)}{more}; "
                    "`dfsviz inspect` on the file lists every problem")
            if not reader.complete:
                done, planned = len(reader.steps), len(reader.planned_steps)
                return "incomplete", (f"{capture_id}: incomplete capture, {done} of {planned} steps written "
                                      f"(steps {reader.steps}); pages show the completed steps")
            return "ok", ""
        except CaptureError as exc:
            return "error", str(exc)
        except Exception as exc:  # h5py raises OSError/KeyError/RuntimeError on damaged files
            logger.warning("capture %s failed validation", capture_id, exc_info=True)
            return "error", self.hide_paths(f"{capture_id}: unreadable ({type(exc).__name__}: {exc})")

    def entries(self) -> list[CaptureEntry]:
        """Every capture under the roots with its status."""
        return [self.entry(cid) for cid in self.list_ids()]

    def default_id(self) -> str | None:
        """The first usable capture (sound ones first), or None when the roots hold none."""
        entries = self.entries()
        for wanted in ("ok", "incomplete"):
            for e in entries:
                if e.status == wanted:
                    return e.id
        return None

    # -- memoised reads ----------------------------------------------------------------------
    def cached(self, capture_id: str, key: tuple, compute: Callable[[object], object]):
        """``compute(reader)`` memoised under (file stamp, key); errors of h5py become CaptureError.
        CaptureError too when the file is not usable (see :meth:`entry`)."""
        stamp, reader = self._usable(capture_id)

        def run():
            try:
                return compute(reader)
            except (OSError, KeyError, RuntimeError) as exc:
                raise CaptureError(self.hide_paths(
                    f"{capture_id}: cannot read {key[0]} ({type(exc).__name__}: {exc})")) from None

        return self._maps.get_or_compute((stamp, *key), run)

    def stats(self, cid: str, step: int, layer: int, order: str, head: int | None = None, branch: str = "cond"):
        """StoredStats m, L, r, J float32 [1, Hs, Mq, Mk] (Hs = 1 for one ``head``)."""
        return self.cached(cid, ("stats", step, layer, order, head, branch),
                           lambda r: r.block_stats(step, layer, order, head, branch))

    def mass(self, cid: str, step: int, layer: int, order: str, head: int | None = None, branch: str = "cond") -> torch.Tensor:
        """Block mass m, float32 [1, Hs, Mq, Mk] (``CaptureReader.block_mass``: the m dataset
        alone, the Masks page's most frequent read)."""
        return self.cached(cid, ("m", step, layer, order, head, branch),
                           lambda r: r.block_mass(step, layer, order, head, branch))

    def scores(self, cid: str, step: int, layer: int, order: str, method: str, head: int | None = None,
               branch: str = "cond") -> torch.Tensor:
        """Block scores of ``method``, float32 [1, Hs, Mq, Mk]; "oracle" gives m when not stored."""
        def read(r):
            if method == "oracle" and "oracle" not in r.methods:
                return r.block_mass(step, layer, order, head, branch)
            return r.scores(step, layer, order, method, head, branch)

        return self.cached(cid, ("scores", step, layer, order, method, head, branch), read)

    def variance_ratios(self, cid: str, step: int, layer: int, order: str, branch: str = "cond"):
        """(W_q, W_k) float64 [1, H]."""
        return self.cached(cid, ("W", step, layer, order, branch), lambda r: r.variance_ratios(step, layer, order, branch))

    def footprints(self, cid: str, step: int, layer: int, order: str, head: int, branch: str = "cond"):
        """(blocks int64 [K], attention float32 [K, N]) of the sampled query blocks."""
        return self.cached(cid, ("footprints", step, layer, order, head, branch),
                           lambda r: r.footprints(step, layer, order, head, branch))

    def qkv(self, cid: str, step: int, layer: int, head: int | None = None, branch: str = "cond"):
        """Stored (q, k, v), each [1, Hs, N, D] in original token order."""
        return self.cached(cid, ("qkv", step, layer, head, branch), lambda r: r.qkv(step, layer, head, branch))

    def perm(self, cid: str, order: str) -> torch.Tensor:
        """int64 [N] permutation of ``order``."""
        return self.cached(cid, ("perm", order), lambda r: r.perm(order))

    def token_order(self, cid: str, order: str):
        """The stored order as a :class:`dfsviz.sparse.orders.TokenOrder`."""
        return self.cached(cid, ("token_order", order), lambda r: r.token_order(order))

    def coords(self, cid: str) -> torch.Tensor:
        """int64 [Nv, 3] (frame, row, column) of the video tokens, raster order."""
        return self.cached(cid, ("coords",), lambda r: r.coords())

    def calibration(self, cid: str, config: CalibrationConfig) -> Calibration:
        """:func:`dfsviz.analysis.calibrate.calibrate` of one capture, memoised per file version and settings.

        Args:
            cid: the capture id.
            config: a :class:`~dfsviz.analysis.calibrate.CalibrationConfig` (frozen: equal
                settings share one result).

        Returns the :class:`~dfsviz.analysis.calibrate.Calibration`, its plan naming the capture
        by its id in ``provenance.captures[].path`` (the path ``dfsviz calibrate`` records when
        run in the folder above the root), never by its path on the server. A refusal (one
        captured step, a goal no plan meets, ...) raises calibrate's ValueError; it is not memoised.
        """
        from dataclasses import replace

        from dfsviz.analysis.calibrate import CalibrationConfig, calibrate

        if not isinstance(config, CalibrationConfig):
            raise TypeError(f"`config` must be a CalibrationConfig (got {type(config).__name__})")

        def compute(reader):
            result = calibrate(reader, config)
            plan = result.plan
            captures = [{**c, "path": cid} for c in plan.provenance["captures"]]
            plan = replace(plan, provenance={**plan.provenance, "captures": captures})
            return replace(result, plan=plan, notes=[self.hide_paths(n) for n in result.notes])

        return self.cached(cid, ("calibration", config), compute)

    def cache_info(self) -> dict:
        """Hit/miss counts of the reader and map caches (for the latency benchmark)."""
        return {"readers": {"hits": self._readers.hits, "misses": self._readers.misses},
                "maps": {"hits": self._maps.hits, "misses": self._maps.misses, "bytes": self._maps._bytes}}

    def close(self) -> None:
        """Close every open reader and drop the caches."""
        self._maps.clear()
        self._readers.clear()

    def __enter__(self) -> "CaptureCatalog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def get_catalog() -> CaptureCatalog:
    """The catalog of the Dash app serving the current request (set by ``create_app``)."""
    import flask

    catalog = flask.current_app.config.get(CONFIG_KEY)
    if catalog is None:
        raise RuntimeError("no capture catalog: build the app with dfsviz.app.create_app(root)")
    return catalog


def exact_footprint(catalog: CaptureCatalog, cid: str, step: int, layer: int, order: str, head: int, block_index: int,
                    branch: str = "cond") -> torch.Tensor:
    """Mean attention of one query block over all N keys, from the stored Q/K (memoised).

    Needs a layer captured with ``--save-qkv``. ``block_index`` is the query block u of
    ``order``'s block sequence. Returns float32 [N] in original token order (sums to 1),
    computed by :func:`dfsviz.sparse.footprints.block_footprints`, the function the capture
    uses for its sampled footprints.
    """
    from dfsviz.sparse.footprints import block_footprints

    def compute(reader):
        q, k, _ = reader.qkv(step, layer, head, branch)
        scale = float(reader.attrs.get("softmax_scale", q.shape[-1] ** -0.5))
        perm = reader.perm(order)
        blocks = torch.tensor([[block_index]], dtype=torch.int64)
        return block_footprints(q.float(), k.float(), perm, blocks, reader.block, scale)[0, 0]

    return catalog.cached(cid, ("exact_footprint", step, layer, order, head, block_index, branch), compute)

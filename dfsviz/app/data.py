"""The dashboard's one data module: the only code of ``dfsviz.app`` that opens HDF5.

A :class:`CaptureCatalog` serves the capture files under one or more root folders:

* it lists every ``*.h5`` / ``*.hdf5`` file under the roots (symlinks that resolve outside
  a root are skipped) and tells, per file, whether it is sound, incomplete, invalid or
  unreadable, checking each file version (path, size, mtime) once however many requests ask at
  once: a file up to ``full_check_bytes`` is validated whole (``CaptureReader.validate()``)
  before its first view; a larger one is usable at once with status "checking" (everything but
  its maps checked), each map a view reads is checked before it is returned, and one background
  thread validates the whole file, one file at a time. A file found invalid is never read for
  a view again;
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

import atexit
import functools
import logging
import os
import threading
import time
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

from dfsviz.analysis.measured_capture import MeasuredCapture
from dfsviz.capture.reader import CaptureBusy, CaptureReader
from dfsviz.capture.schema import AFFINE_SUFFIX, DIMS
from dfsviz.capture.validation import read_problem

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
#: Default of ``CaptureCatalog(full_check_bytes=...)``: files up to this size are validated whole
#: before their first view. The shipped samples and test captures (tens of MB) validate in well
#: under a second, so they keep that contract; a 1.15 GB capture took 14.5 s on 2 cores (about
#: 80 MB/s of HDF5 decompression), so the largest file validated so takes about 3 s.
FULL_CHECK_BYTES = 256 << 20
#: Calibrations computed at once (a calibration not yet memoised takes a CPU core for about a
#: second; more requests for new settings meanwhile are refused, so that clients of an exposed
#: dashboard cannot take every core).
MAX_CALIBRATIONS = 2


class CaptureError(ValueError):
    """A capture id that cannot be served (outside the roots, missing, unreadable)."""


class _BeingCaptured(CaptureError):
    """A file that a running capture holds open for writing: status "capturing" until it is done."""


@dataclass(frozen=True)
class CaptureEntry:
    """One capture file under the roots.

    Fields:
        id: ``"<root label>/<relative path>"``, the URL key.
        path: resolved absolute path.
        status: "ok", "incomplete" (an interrupted run: its completed steps are usable),
            "checking" (a file above ``full_check_bytes`` whose background check is under way:
            usable, each map checked as a view reads it), "invalid" (fails
            ``CaptureReader.validate()``: never drawn), "capturing" (a running capture holds it open
            for writing: not readable until it is done) or "error" (unreadable, or no completed step).
        message: banner text; "" when status is "ok" (or "checking" a complete run).
        size: file size in bytes.
    """

    id: str
    path: Path
    status: str
    message: str
    size: int

    @property
    def usable(self) -> bool:
        """Whether views may read the file (sound, incomplete or being checked)."""
        return self.status in ("ok", "incomplete", "checking")

    @property
    def label(self) -> str:
        mark = {"ok": "", "incomplete": " (incomplete)", "checking": " (checking)", "invalid": " (invalid)",
                "capturing": " (capturing)", "error": " (unreadable)"}[self.status]
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

    def discard(self, stale: Callable[[object], bool]) -> None:
        """Drop (and evict) every entry whose key ``stale(key)`` is true."""
        with self._lock:
            keys = [key for key in self._data if stale(key)]
            items = [self._data.pop(key) for key in keys]
            self._bytes -= sum(self._sizes.pop(key) for key in keys)
        if self._on_evict is not None:
            for old in items:
                self._on_evict(old)

    def clear(self) -> None:
        self.discard(lambda key: True)


def _close_reader(reader: object) -> None:
    try:
        reader.close()
    except Exception:  # a reader that failed half-way has nothing left to close
        logger.debug("closing a cached reader failed", exc_info=True)


class _CheckedDataset:
    """A per-step dataset whose reads are checked (:func:`dfsviz.capture.validation.read_problem`)
    before they are handed over; the step's ``refuse(problem)`` raises for a damaged map."""

    def __init__(self, dset, step: "_CheckedStep", name: str) -> None:
        self._dset, self._step, self._name = dset, step, name

    def __getitem__(self, selection):
        index = selection if isinstance(selection, tuple) else (selection,)
        at = DIMS[self._name].index("head")
        lead, heads = index[:at], index[at] if len(index) > at else slice(None)
        whole = slice(None)
        if len(index) > at + 1 or len(lead) < at or not all(isinstance(i, (int, np.integer)) or i == whole for i in lead):
            # the reader's accessors read whole maps of one position before the head dim, or of
            # every position of some of those dims (CaptureReader.step_curves)
            raise TypeError(f"a checked read takes whole maps of one position, or of all positions, of each dim "
                            f"before `head` (got {self._name}[{index!r}])")
        stored = self._dset[selection]
        step = self._step
        spans = [d for d, i in enumerate(lead) if not isinstance(i, (int, np.integer))]  # first in `stored`
        for pos in np.ndindex(*(self._dset.shape[d] for d in spans)):
            at_pos = list(lead)
            for d, i in zip(spans, pos):
                at_pos[d] = i
            problem = read_problem(step, step.layout, step.step, self._name, tuple(at_pos), heads, stored[pos])
            if problem is not None:
                step.refuse(problem)
        return stored

    def __getattr__(self, name: str):
        return getattr(self._dset, name)


class _AffineRows:
    """The ``<name>_affine`` rows of uint8 maps, each selection read once: the check of the codes
    reads them first (to decode), the reader's own read then gets that array."""

    def __init__(self, dset) -> None:
        self._dset, self._read = dset, {}

    def __getitem__(self, selection):
        key = repr(selection)
        if key in self._read:
            return self._read.pop(key)
        self._read[key] = rows = self._dset[selection]
        return rows

    def __getattr__(self, name: str):
        return getattr(self._dset, name)


class _CheckedStep:
    """The HDF5 group of a completed step whose per-step datasets (every name of the schema's
    ``DIMS``: maps, W, footprints, Q/K/V, masks, any dataset added there) check what they read."""

    def __init__(self, group, step: int, layout, refuse: Callable[[str], None]) -> None:
        self.group, self.step, self.layout, self.refuse = group, step, layout, refuse
        self._affine: dict[str, _AffineRows] = {}  # h5py's lookup of a name costs about 0.1 ms

    def __getitem__(self, name: str):
        if name.endswith(AFFINE_SUFFIX):  # checked with their codes
            if name not in self._affine:
                self._affine[name] = _AffineRows(self.group[name])
            return self._affine[name]
        obj = self.group[name]
        return _CheckedDataset(obj, self, name) if name in DIMS else obj

    def __contains__(self, name: str) -> bool:
        return name in self.group

    def __getattr__(self, name: str):
        return getattr(self.group, name)


class _CheckedCapture(MeasuredCapture):
    """The view reader of a file checked in the background: every accessor of the reader reaches
    a step's datasets through ``_step_group``, which hands out a :class:`_CheckedStep`, so each
    map a view reads is checked before it is returned. ``refuse(problem)`` raises for a damaged one."""

    def __init__(self, path: Path, refuse: Callable[[str], None]) -> None:
        super().__init__(path)
        self._refuse = refuse

    def _step_group(self, step: int):
        return _CheckedStep(super()._step_group(step), step, self.layout, self._refuse)


class _Worker(NamedTuple):
    """The background check's thread and the event that asks it to stop."""

    thread: threading.Thread
    stop: threading.Event


def _unique_labels(roots: Sequence[Path]) -> list[str]:
    labels: list[str] = []
    for root in roots:
        base = root.name or "root"
        label, i = base, 2
        while label in labels:
            label, i = f"{base}{i}", i + 1
        labels.append(label)
    return labels


#: catalogs whose background check may be running, stopped (``close``) when the interpreter exits
_CHECKING: "weakref.WeakSet[CaptureCatalog]" = weakref.WeakSet()


@atexit.register
def _stop_checks() -> None:
    for catalog in list(_CHECKING):
        catalog.close()


class CaptureCatalog:
    """Read-only, cached access to the capture files under ``roots``.

    Args:
        roots: folders to serve (each must exist); files are listed recursively.
        max_open: open readers kept (LRU; older ones are closed).
        cache_bytes: bytes of memoised maps kept (LRU).
        full_check_bytes: files up to this size (bytes, >= 0) are validated whole before their
            first view; larger ones are checked map by map as views read them and whole in the
            background (status "checking" until then). The default, :data:`FULL_CHECK_BYTES`
            (256 MiB), keeps the shipped samples and test captures (tens of MB, validated in well
            under a second) on the first contract; whole validation runs at about 80 MB/s on 2
            cores (a 1.15 GB capture: 14.5 s), so no page waits much more than 3 s for it.

    Raises ValueError when no root is given, a root is not a folder or an argument is out of range.
    Call :meth:`close` (or use the catalog as a context manager) to stop the background check.
    """

    def __init__(self, roots: Sequence[str | os.PathLike], *, max_open: int = 8, cache_bytes: int = 1 << 30,
                 full_check_bytes: int = FULL_CHECK_BYTES) -> None:
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
        if isinstance(full_check_bytes, bool) or not isinstance(full_check_bytes, int) or full_check_bytes < 0:
            raise ValueError(f"`full_check_bytes` must be an integer >= 0 (got {full_check_bytes!r}): the size in "
                             "bytes up to which a file is validated whole before its first view")
        self.full_check_bytes = full_check_bytes
        self._readers = _LRU(max_open, 1 << 62, on_evict=_close_reader)
        self._maps = _LRU(1 << 20, int(cache_bytes))
        # capture id -> (file stamp, entry) of the latest version checked, and one lock per id
        # so that concurrent requests wait for one validation instead of each running it
        self._status: dict[str, tuple[tuple, CaptureEntry]] = {}
        self._status_locks: dict[str, threading.Lock] = {}
        self._status_lock = threading.Lock()
        # the background check: files queued in the order first asked for, one worker thread
        self._queue: deque[tuple[str, Path, tuple]] = deque()
        self._queue_lock = threading.Condition()
        self._worker: _Worker | None = None
        # requests being served (:meth:`serving`): the background check waits between maps while
        # any is, so that it takes no CPU or h5py lock from what the user is waiting for
        self._serving = 0
        # notified whenever a status leaves "checking" (or a check is dropped): wait_checked waits on it
        self._checked = threading.Condition()
        self._checks_ended = 0
        self._calibrations = threading.BoundedSemaphore(MAX_CALIBRATIONS)
        # what the listing skipped and why, logged once each (the listing runs on every page render)
        self._skips_logged: set[str] = set()

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
        """Capture ids of every file under the roots, sorted. Symlinks leaving a root and folders
        that cannot be read are skipped, each with one warning in the server's log; a root inside
        another is listed under its own label only."""
        ids = []
        for label, root in self.roots.items():
            def unreadable(exc: OSError, label=label, root=root) -> None:
                where = Path(exc.filename).relative_to(root).as_posix() if exc.filename else "?"
                self._log_skip(f"not listing folder {label}/{where}: {exc.strerror or exc}")

            inner = {other for other in self.roots.values() if other != root and other.is_relative_to(root)}
            for dirpath, dirs, files in os.walk(root, followlinks=False, onerror=unreadable):
                dirs[:] = [d for d in dirs if Path(dirpath, d) not in inner]
                for name in files:
                    if not name.lower().endswith(CAPTURE_SUFFIXES):
                        continue
                    rel = (Path(dirpath) / name).relative_to(root).as_posix()
                    cid = f"{label}/{rel}"
                    try:
                        self.resolve(cid)
                    except CaptureError as exc:
                        self._log_skip(f"not serving {cid}: {exc}")
                        continue
                    ids.append(cid)
        return sorted(ids)

    def _log_skip(self, message: str) -> None:
        if message not in self._skips_logged:
            self._skips_logged.add(message)
            logger.warning("%s", message)

    @staticmethod
    def _stamp(path: Path) -> tuple[str, int, int]:
        st = path.stat()
        return (str(path), st.st_size, st.st_mtime_ns)

    # -- readers ---------------------------------------------------------------------------
    def _open(self, capture_id: str, path: Path, stamp: tuple):
        """The cached open reader of one file version (a file above ``full_check_bytes``: one that
        checks each map it reads); CaptureError when it cannot be opened."""

        def open_reader():
            if stamp[1] > self.full_check_bytes:
                return _CheckedCapture(path, functools.partial(self._refuse_map, capture_id, stamp))
            return MeasuredCapture(path)

        return self._readers.get_or_compute(stamp, lambda: self._opened(capture_id, open_reader))

    def _opened(self, capture_id: str, open_reader: Callable[[], CaptureReader]) -> CaptureReader:
        """``open_reader()``; CaptureError with the banner text when the file cannot be opened."""
        try:
            return open_reader()
        except CaptureBusy:
            raise _BeingCaptured(f"{capture_id}: a running capture is writing it; it opens once that capture is "
                                 "done") from None
        except (ValueError, OSError, KeyError) as exc:
            raise CaptureError(self.hide_paths(f"cannot open {capture_id!r}: {exc}")) from None

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
        """Status of one capture, checked once per file version (see ``full_check_bytes``: a large
        file is "checking" until its background check ends). CaptureError when the id is refused."""
        path = self.resolve(capture_id)
        return self._entry(capture_id, path, self._stamp(path))

    def _lock_of(self, capture_id: str) -> threading.Lock:
        with self._status_lock:
            return self._status_locks.setdefault(capture_id, threading.Lock())

    def _entry(self, capture_id: str, path: Path, stamp: tuple) -> CaptureEntry:
        with self._lock_of(capture_id):
            known = self._status.get(capture_id)
            if known is not None and known[0] == stamp:
                return known[1]
            # a file rewritten in place keeps its inode, and HDF5 would serve the new version through an
            # old version's open handle, with that version's structure: close those first
            self._readers.discard(lambda key: key[0] == stamp[0] and key != stamp)
            status, message = self._check(capture_id, path, stamp)
            entry = CaptureEntry(capture_id, path, status, message, stamp[1])
            if status != "capturing":  # asked again each time: a killed capture leaves the file as it was
                self._status[capture_id] = (stamp, entry)
            if status == "checking":
                self._enqueue(capture_id, path, stamp)
        return entry

    def _check(self, capture_id: str, path: Path, stamp: tuple) -> tuple[str, str]:
        """(status, message) of one file version, from its open view reader: ``CaptureReader.validate()``
        up to ``full_check_bytes``, beyond it everything but the maps ("checking" when that is sound)."""
        def run(reader):
            if stamp[1] <= self.full_check_bytes:
                return self._verdict(capture_id, reader, reader.validate())
            status, message = self._verdict(capture_id, reader, reader.header_problems())
            return (status, message) if status in ("invalid", "error") else ("checking", message)

        return self._reading(capture_id, lambda: run(self._open(capture_id, path, stamp)))

    def _reading(self, capture_id: str, check: Callable[[], tuple[str, str] | None]) -> tuple[str, str] | None:
        """``check()``, its failures turned into status "error" (or "capturing") with the banner text."""
        try:
            return check()
        except _BeingCaptured as exc:
            return "capturing", str(exc)
        except CaptureError as exc:
            return "error", str(exc)
        except Exception as exc:  # h5py raises OSError/KeyError/RuntimeError on damaged files
            logger.warning("capture %s failed validation", capture_id, exc_info=True)
            return "error", self.hide_paths(f"{capture_id}: unreadable ({type(exc).__name__}: {exc})")

    def _verdict(self, capture_id: str, reader, problems: list[str]) -> tuple[str, str]:
        """(status, message) of an open file whose validation found ``problems``."""
        if not reader.steps:
            return "error", f"{capture_id}: no completed step (the capture stopped before its first step)"
        if problems:
            return "invalid", self._invalid_message(capture_id, problems)
        if not reader.complete:
            done, planned = len(reader.steps), len(reader.planned_steps)
            return "incomplete", (f"{capture_id}: incomplete capture, {done} of {planned} steps written "
                                  f"(steps {reader.steps}); pages show the completed steps")
        return "ok", ""

    def _invalid_message(self, capture_id: str, problems: list[str]) -> str:
        shown = problems[:_SHOWN_PROBLEMS]
        more = f" (and {len(problems) - len(shown)} more)" if len(problems) > len(shown) else ""
        return self.hide_paths(f"{capture_id}: invalid capture, not drawn: {'; '.join(shown)}{more}; "
                               "`dfsviz inspect` on the file lists every problem")

    def _settle(self, capture_id: str, stamp: tuple, status: str, message: str, *, only_checking: bool = True) -> None:
        """Record the end of a file version's check (nothing when the file has a newer version, or,
        ``only_checking``, when its check was already settled), and wake :meth:`wait_checked`."""
        with self._lock_of(capture_id):
            known = self._status.get(capture_id)
            if known is not None and known[0] == stamp and (known[1].status == "checking" or not only_checking):
                self._status[capture_id] = (stamp, CaptureEntry(capture_id, known[1].path, status, message, stamp[1]))
        self._wake_waiters()

    def _wake_waiters(self) -> None:
        with self._checked:
            self._checks_ended += 1
            self._checked.notify_all()

    def _refuse_map(self, capture_id: str, stamp: tuple, problem: str) -> None:
        """A view read a damaged map of a file being checked: the file is invalid from now on."""
        message = self._invalid_message(capture_id, [problem])
        with self._lock_of(capture_id):
            known = self._status.get(capture_id)
            if known is not None and known[0] == stamp and not known[1].usable:
                message = known[1].message  # already refused: keep its banner
        self._settle(capture_id, stamp, "invalid", message, only_checking=False)
        logger.warning("%s: a view read a damaged map: %s", capture_id, problem)
        raise CaptureError(message)

    # -- the background check ------------------------------------------------------------------
    def _enqueue(self, capture_id: str, path: Path, stamp: tuple) -> None:
        with self._queue_lock:
            self._queue.append((capture_id, path, stamp))
            if self._worker is None:
                _CHECKING.add(self)  # stopped at interpreter exit: h5py torn down under a running read crashes
                stop = threading.Event()
                thread = threading.Thread(target=self._check_queued, args=(stop,), name="dfsviz-check", daemon=True)
                self._worker = _Worker(thread, stop)
                thread.start()
            self._queue_lock.notify()

    @contextmanager
    def serving(self):
        """Mark a request as being served while the block runs (``create_app`` wraps every request
        in it): the background check pauses between maps until no request is (h5py serialises
        every read behind one lock, and the check would take a core from the request)."""
        with self._queue_lock:
            self._serving += 1
        try:
            yield self
        finally:
            with self._queue_lock:
                self._serving -= 1
                self._queue_lock.notify_all()

    def _wait_idle(self, stop: threading.Event) -> None:
        """The worker, between maps: wait until no request is served (or the check is stopped)."""
        with self._queue_lock:
            self._queue_lock.wait_for(lambda: self._serving == 0 or stop.is_set())

    def _check_queued(self, stop: threading.Event) -> None:
        """The worker: checks queued files one at a time until ``stop`` is set."""
        while True:
            with self._queue_lock:
                while not self._queue and not stop.is_set():
                    self._queue_lock.wait()
                if stop.is_set():
                    return
                capture_id, path, stamp = self._queue.popleft()
            try:
                self._check_whole(capture_id, path, stamp, stop)
            except Exception:  # the worker outlives any one file's failure
                logger.exception("the background check of %s failed", capture_id)
            finally:
                self._wake_waiters()

    def _current(self, capture_id: str, path: Path, stamp: tuple) -> bool:
        """Whether ``stamp`` is still the file's version and its check is still wanted."""
        try:
            same = self._stamp(path) == stamp
        except OSError:
            return False
        known = self._status.get(capture_id)
        return same and known is not None and known[0] == stamp and known[1].status == "checking"

    def _check_whole(self, capture_id: str, path: Path, stamp: tuple, stop: threading.Event) -> None:
        """Validate one file version on a reader of its own (the view readers may be closed by the
        LRU), stopping between reads when ``stop`` is set, the file changes or a view found it invalid."""
        if not self._current(capture_id, path, stamp):
            logger.info("not checking %s: it changed, or was found invalid, since it was queued", capture_id)
            return
        logger.info("checking %s (%.1f MB) in the background", capture_id, stamp[1] / 1e6)
        start = time.perf_counter()

        def run():
            self._wait_idle(stop)
            with self._opened(capture_id, lambda: CaptureReader(path)) as reader:
                problems = reader.header_problems()
                for problem in reader.iter_map_problems():
                    if problem is not None:
                        problems.append(problem)
                    self._wait_idle(stop)
                    if stop.is_set() or not self._current(capture_id, path, stamp):
                        return None
                return self._verdict(capture_id, reader, problems)

        verdict = self._reading(capture_id, run)
        seconds = time.perf_counter() - start
        if verdict is None:
            logger.info("stopped checking %s after %.1f s (closed, changed or found invalid)", capture_id, seconds)
            return
        logger.info("checked %s in %.1f s: %s", capture_id, seconds, verdict[0])
        self._settle(capture_id, stamp, *verdict)

    def wait_checked(self, capture_id: str, timeout: float | None = None) -> CaptureEntry:
        """The entry of ``capture_id`` once its current version is checked (status no longer
        "checking"), for tests and benchmarks; waits at most ``timeout`` seconds (None: no bound).

        Raises CaptureError when the id is refused and TimeoutError when the time runs out.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._checked:
                seen = self._checks_ended
            entry = self.entry(capture_id)
            if entry.status != "checking":
                return entry
            with self._checked:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                if not self._checked.wait_for(lambda: self._checks_ended != seen, left):
                    raise TimeoutError(f"{capture_id} is still being checked after {timeout:g} s")

    def entries(self) -> list[CaptureEntry]:
        """Every capture under the roots with its status."""
        return [self.entry(cid) for cid in self.list_ids()]

    def default_id(self) -> str | None:
        """The first usable capture (sound ones first, then those being checked), or None when the
        roots hold none."""
        entries = self.entries()
        for wanted in ("ok", "checking", "incomplete"):
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

    def curves(self, cid: str, step: int, layer: int, order: str, method: str, head: int | None = None,
               branch: str = "cond") -> tuple[torch.Tensor, torch.Tensor]:
        """(recall, density) float32 [1, Hs, Mk] of ``method``'s top-k masks at k = 1..Mk, as the
        capture stores them (``CaptureReader.recall_curve`` / ``density_curve``: files with
        ``stored_recall``; "oracle" in every such file)."""
        return self.cached(cid, ("curves", step, layer, order, method, head, branch),
                           lambda r: (r.recall_curve(step, layer, order, method, head, branch),
                                      r.density_curve(step, layer, order, method, head, branch)))

    def step_curves(self, cid: str, step: int, order: str, branch: str = "cond", name: str = "recall") -> torch.Tensor:
        """Recall (or, ``name="density"``, density) curves float32 [layers, curve methods, heads, Mk]
        of one step and order, one read (``CaptureReader.step_curves``)."""
        return self.cached(cid, ("step_curves", step, order, branch, name),
                           lambda r: r.step_curves(step, order, branch, name))

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
        So does a calibration asked for while MAX_CALIBRATIONS others run (a memoised one is
        always given).
        """
        from dataclasses import replace

        from dfsviz.analysis.calibrate import CalibrationConfig, calibrate

        if not isinstance(config, CalibrationConfig):
            raise TypeError(f"`config` must be a CalibrationConfig (got {type(config).__name__})")

        def compute(reader):
            if not self._calibrations.acquire(blocking=False):
                raise ValueError(f"the server is running {MAX_CALIBRATIONS} calibrations already (at most "
                                 f"{MAX_CALIBRATIONS}); try again in a few seconds")
            try:
                result = calibrate(reader, config)
            finally:
                self._calibrations.release()
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
        """Stop the background check (between two reads of maps; waits for it), close every open
        reader and drop the caches. A catalog used again checks its large files again."""
        with self._queue_lock:
            worker, self._worker = self._worker, None
            self._queue.clear()
            if worker is not None:
                worker.stop.set()
                self._queue_lock.notify_all()
        if worker is not None:
            worker.thread.join()
        for capture_id, (_, entry) in list(self._status.items()):
            if entry.status == "checking":  # forget it: the next request queues it again
                with self._lock_of(capture_id):
                    if self._status.get(capture_id, (None, entry))[1].status == "checking":
                        del self._status[capture_id]
        self._wake_waiters()
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

"""What keeps a capture file whole: one writer at a time, room on the disk, repair after a crash.

* :class:`CaptureLock`: an exclusive lock on a capture path, taken before anything is
  created or truncated, held until the writer closes. It is a ``flock`` on a hidden lock
  file beside the capture (``.NAME.lock``), so the kernel releases it when the process dies.
* :func:`require_free_space` and :class:`SpaceReservation`: a step starts only when the disk
  has room for it, and that room is reserved (``fallocate``) before HDF5 writes into it, so
  another process filling the disk cannot make a write fail halfway through the step.
* :func:`write_failure_reason`: what a failed HDF5 write means.
* :func:`open_for_reading`: a file cut short by a full disk or a kill reads through
  :class:`ZeroPaddedFile` (its missing tail as zeros), without changing it, once a walk of its
  structure in a child process (:func:`walk_structure`) has shown that HDF5 does not loop on it.
"""

from __future__ import annotations

import errno
import functools
import io
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

__all__ = [
    "CaptureLock",
    "SpaceReservation",
    "ZeroPaddedFile",
    "format_bytes",
    "glob_escape",
    "held_by_another_process",
    "missing_folder",
    "open_for_reading",
    "recorded_end",
    "require_free_space",
    "require_output_folder",
    "run_difference",
    "temporary_path",
    "write_failure_reason",
]

logger = logging.getLogger(__name__)


def held_by_another_process(exc: OSError) -> bool:
    """True when ``h5py.File`` failed because another process holds the file open for writing.

    HDF5 refuses with "unable to lock file, errno = 11" (a BlockingIOError, EAGAIN). Only that
    text or errno means so: other HDF5 errors, such as "bad superblock version number" (which
    contains "lock"), mean the file is not readable HDF5.
    """
    return "unable to lock file" in str(exc).lower() or exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK)

# room kept beyond a step's estimate: HDF5 metadata of the step (object headers, chunk
# indexes, dimension scales) and the file's own bookkeeping
SPACE_MARGIN = 4 << 20


def format_bytes(num_bytes: float) -> str:
    """``1536`` -> ``"1.5 KiB"``; whole bytes below 1 KiB (``"1000 B"``)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if num_bytes < 1024 or unit == "TiB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    raise AssertionError("unreachable")


def missing_folder(folder: Path) -> str | None:
    """Why ``folder`` cannot hold a new file ("is a file", "does not exist; create it first"), or
    None when it is a folder."""
    if folder.is_dir():
        return None
    return "is a file" if folder.exists() else "does not exist; create it first"


def require_output_folder(path: Path) -> None:
    """ValueError unless the folder that is to hold ``path`` exists: a capture creates no folders."""
    state = missing_folder(path.parent)
    if state is not None:
        raise ValueError(f"output directory {str(path.parent)!r} {state}")


def _lock_path(path: Path) -> Path:
    return path.parent / f".{path.name}.lock"


def temporary_path(path: Path) -> Path:
    """Where a new capture is created before it is renamed to ``path`` (same folder, so the
    rename is atomic)."""
    return path.parent / f".{path.name}.{os.getpid()}.tmp"


class CaptureLock:
    """Exclusive right to write the capture at ``path`` (a context manager).

    Raises ValueError when another process (or another writer in this one) holds it, naming
    the holder's pid, or when the folder takes no new file (no permission, read-only); with
    ``wait`` it waits for the holder to release it instead (the ranks of a data-parallel run set
    take turns at its manifest so). Acquiring removes temporary files that a killed creation
    left behind.
    """

    def __init__(self, path: str | os.PathLike, *, wait: bool = False) -> None:
        import fcntl

        self.path = Path(path)
        lock = _lock_path(self.path)
        while True:
            try:
                fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:  # no permission, a read-only file system, a folder that takes no files (/proc)
                if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT):
                    raise
                raise ValueError(f"cannot write in the folder of {str(self.path)!r}: {exc.strerror}") from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                    os.close(fd)
                    raise
                holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
                os.close(fd)
                raise ValueError(
                    f"{str(self.path)!r} is being written by another dfsviz capture (pid {holder}); wait for it to "
                    "finish or write to another --out"
                ) from None
            # a holder that released between our open and flock unlinked the file we locked:
            # lock the file that is on disk now instead
            try:
                on_disk = os.stat(lock)
            except FileNotFoundError:
                on_disk = None
            held = os.fstat(fd)
            if on_disk is not None and (on_disk.st_dev, on_disk.st_ino) == (held.st_dev, held.st_ino):
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd: int | None = fd
        for stale in self.path.parent.glob(f".{glob_escape(self.path.name)}.*.tmp"):
            logger.info("removing %s, left by a capture killed while creating its file", stale)
            stale.unlink(missing_ok=True)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Give the lock up (idempotent); the lock file goes with it."""
        if self._fd is None:
            return
        try:
            _lock_path(self.path).unlink(missing_ok=True)  # while still holding it: see __init__
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "CaptureLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def glob_escape(name: str) -> str:
    """``name`` with glob metacharacters escaped."""
    return re.sub(r"([*?\[\]])", r"[\1]", name)


def _no_space(path: Path, needed: int, free: int, what: str, hint: str) -> ValueError:
    return ValueError(
        f"not enough free space for {what}: it needs up to {format_bytes(needed)}, {format_bytes(free)} free on "
        f"{str(path.parent.resolve())!r}; {hint}"
    )


def require_free_space(path: Path, needed: int, what: str, hint: str) -> None:
    """Raise ValueError when the disk holding ``path`` has less than ``needed`` bytes free."""
    free = shutil.disk_usage(path.parent).free
    if free < needed:
        raise _no_space(path, needed, free, what, hint)


_KEEP_SIZE, _PUNCH_HOLE = 0x01, 0x02  # fallocate(2) mode flags (linux/falloc.h)


@functools.cache
def _fallocate():
    """libc's fallocate(2), or None where there is none (macOS)."""
    import ctypes

    try:
        fn = ctypes.CDLL(None, use_errno=True).fallocate64
    except (AttributeError, OSError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fn.restype = ctypes.c_int
    return fn


class SpaceReservation:
    """Disk blocks reserved past the end of an open file, without changing its size.

    HDF5 appends a step's chunks and metadata at the end of the file; blocks reserved
    there with ``fallocate(FALLOC_FL_KEEP_SIZE)`` are the blocks those writes land in, so no
    write of the step can fail for want of space. Where the filesystem cannot reserve
    (no fallocate), the free-space check alone guards the step.
    """

    def __init__(self, fd: int, path: Path) -> None:
        self.fd, self.path = fd, path
        self._end = 0

    def reserve(self, needed: int, what: str, hint: str) -> None:
        """Reserve ``needed`` bytes after the current end of the file (ValueError without room)."""
        require_free_space(self.path, needed, what, hint)
        fn = _fallocate()
        start = os.fstat(self.fd).st_size
        if fn is None or fn(self.fd, _KEEP_SIZE, start, needed) == 0:
            self._end = start + needed if fn is not None else 0
            return
        err = _ctypes_errno()
        if err in (errno.ENOSPC, errno.EDQUOT):
            raise _no_space(self.path, needed, shutil.disk_usage(self.path.parent).free, what, hint)
        logger.info("cannot reserve space in %s (%s): relying on the free-space check", self.path, os.strerror(err))

    def release(self) -> None:
        """Give back what the step did not use (the blocks past the file's end)."""
        fn = _fallocate()
        if fn is None or not self._end:
            return
        end = os.fstat(self.fd).st_size
        if self._end > end:
            fn(self.fd, _KEEP_SIZE | _PUNCH_HOLE, end, self._end - end)
        self._end = 0


def _ctypes_errno() -> int:
    import ctypes

    return ctypes.get_errno()


_HDF5_ERRNO = re.compile(r"errno = (\d+), error message = '([^']*)'")


def write_failure_reason(exc: BaseException) -> str:
    """A short reason for an HDF5 write error ("No space left on device")."""
    number = getattr(exc, "errno", None)
    if isinstance(number, int) and number > 0:
        return os.strerror(number)
    match = _HDF5_ERRNO.search(str(exc))
    if match:
        return match.group(2) or os.strerror(int(match.group(1)))
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


_TRUNCATED = re.compile(r"truncated file: eof = (\d+).*stored_eof = (\d+)")


def recorded_end(path: Path, message: str) -> int | None:
    """The end that HDF5's superblock records for ``path`` when ``message`` (an open error) says
    the file is shorter than that, as a write cut off by a full disk or a kill leaves it; else None.

    HDF5 records the file's end before the data behind it is written; the missing tail belongs
    to the step that was being written, which readers skip and resume drops, so zero bytes are
    as good as any there (for a file cut anywhere else, :func:`open_for_reading` checks first)."""
    match = _TRUNCATED.search(message)
    if match is None:
        return None
    size, stored = int(match.group(1)), int(match.group(2))
    return stored if size == path.stat().st_size and stored > size else None


class ZeroPaddedFile(io.RawIOBase):
    """A read-only view of ``path`` as ``size`` bytes: past the file's real end it reads zeros.
    h5py opens it (``h5py.File(view, "r")``) where a cut-off write left the file shorter than
    its superblock records (:func:`recorded_end`): its completed steps are read, and the file is
    not changed."""

    def __init__(self, path: Path, size: int) -> None:
        super().__init__()
        self._file = open(path, "rb")
        self._size = size
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        n = max(0, min(len(view), self._size - self._pos))
        self._file.seek(self._pos)
        got = self._file.readinto(view[:n]) or 0
        view[got:n] = bytes(n - got)
        self._pos += n
        return n

    def close(self) -> None:
        self._file.close()
        super().close()


#: How long the walk of a cut-off file's structure may take before the file is refused.
WALK_SECONDS = 20


def walk_structure(path: Path, end: int) -> None:
    """Read the attributes of every group and dataset of ``path`` seen as ``end`` bytes (zeros
    past its real end), skipping what fails to read: what matters is that it ends. A file cut
    inside the structure that every read needs (at 4 kB, say) can make HDF5 loop on the zeros
    for ever, holding the GIL, where no timeout or Ctrl+C reaches it."""
    import h5py

    def walk(group) -> None:
        try:
            dict(group.attrs)
            names = list(group.keys())
        except Exception:  # noqa: BLE001 - a read that fails is an answer; only a loop is not
            return
        for name in names:
            try:
                item = group[name]
            except Exception:  # noqa: BLE001
                continue
            if isinstance(item, h5py.Group):
                walk(item)
            else:
                try:
                    dict(item.attrs)
                except Exception:  # noqa: BLE001
                    pass

    with ZeroPaddedFile(path, end) as view:
        try:
            f = h5py.File(view, "r")
        except Exception:  # noqa: BLE001
            return
        with f:
            walk(f)


def structure_loops(path: Path, end: int) -> bool:
    """True when :func:`walk_structure` of ``path`` (``end`` bytes) in a child process does not
    end within ``WALK_SECONDS`` (the child is then killed). The child runs this module as a
    script, which imports nothing of dfsviz (so it starts in a fraction of a second)."""
    try:
        subprocess.run([sys.executable, __file__, str(path), str(end)], capture_output=True, timeout=WALK_SECONDS,
                       check=False)
    except subprocess.TimeoutExpired:
        return True
    return False


def open_for_reading(path: Path):
    """(h5py.File opened read-only, its ZeroPaddedFile or None): ``path`` as h5py opens it, or,
    where a cut-off write left it shorter than it records (:func:`recorded_end`), through a
    :class:`ZeroPaddedFile` (close that after the h5py file) once :func:`structure_loops` says
    HDF5 does not loop on it. Any other open error, and that loop, are raised (OSError)."""
    import h5py

    try:
        return h5py.File(path, "r"), None
    except OSError as exc:
        end = recorded_end(path, str(exc))
        if end is None:
            raise
    size = path.stat().st_size
    if structure_loops(path, end):
        raise OSError(f"cut off at byte {size} of the {end} it records, inside the structure that every read "
                      f"needs (HDF5 loops on it for over {WALK_SECONDS} s): nothing in it can be read or resumed")
    # A run killed (or stopped by a full disk) while it wrote a step: its completed steps are
    # whole, and the missing tail is the open step's, which readers skip.
    logger.warning("%s ends at byte %d of the %d it records (a run stopped mid-write): reading the missing tail as "
                   "zeros", path, size, end)
    padded = ZeroPaddedFile(path, end)
    return h5py.File(padded, "r"), padded


def run_difference(stored: dict, run: dict, ignore=frozenset()) -> tuple[str, list[str]] | None:
    """How the run ``run`` differs from the ``stored`` one a resume would continue, or None.

    ``("settings", keys)``: settings other than the weights differ (named first: another dtype
    changes the weights' bytes too); ``("weights", [])``: only ``weights_sha256`` differs, the same
    settings with other weights. Keys in ``ignore`` (how a run was started) never count.
    """
    diff = sorted(k for k in set(stored) | set(run) if k not in ignore and stored.get(k) != run.get(k))
    if diff == ["weights_sha256"]:
        return "weights", []
    settings = [k for k in diff if k != "weights_sha256"]
    return ("settings", settings) if settings else None


if __name__ == "__main__":  # structure_loops' child: walk_structure(path, end)
    here = Path(__file__).resolve().parent  # run as a script, its folder leads sys.path: h5py must not see its modules
    sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != here]
    walk_structure(Path(sys.argv[1]), int(sys.argv[2]))

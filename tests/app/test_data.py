"""The dashboard's data module: root confinement, listing, statuses, caching; query parsing
and the CSV of a figure (no browser)."""

from __future__ import annotations

import csv
import io
import logging
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import pytest
import torch

from dfsviz.app.data import CaptureCatalog, CaptureError, exact_footprint
from dfsviz.app.pages.common import Query, figure_csv


@pytest.fixture(scope="module")
def catalog(capture_root):
    cat = CaptureCatalog([capture_root])
    yield cat
    cat.close()


@pytest.mark.parametrize("bad, match", [
    ("runs/../secret/secret.h5", "resolves outside the capture root"),
    ("runs/escape.h5", "resolves outside the capture root"),
    ("elsewhere/good.h5", "'elsewhere' is not a served root"),
    ("good.h5", "capture id must look like"),
    ("runs/", "must be relative to the root"),
    ("runs/missing.h5", "does not exist"),
    ("runs/notes.txt", "only .h5, .hdf5 files are served"),
    (None, "capture id must look like"),
])
def test_paths_outside_the_root_or_missing_are_refused(catalog, bad, match):
    with pytest.raises(CaptureError, match=match):
        catalog.resolve(bad)
    with pytest.raises(CaptureError, match=match):
        catalog.reader(bad)


def test_bad_roots_are_refused(tmp_path):
    with pytest.raises(ValueError, match="must name at least one folder"):
        CaptureCatalog([])
    with pytest.raises(ValueError, match="is not a folder"):
        CaptureCatalog([tmp_path / "nope"])
    with pytest.raises(ValueError, match="`max_open` must be a positive integer"):
        CaptureCatalog([tmp_path], max_open=0)


def test_listing_and_statuses(catalog):
    entries = {e.id: e for e in catalog.entries()}
    # the symlink leaving the root is not listed
    assert sorted(entries) == ["runs/broken.h5", "runs/damaged.h5", "runs/good.h5", "runs/partial.h5"]
    assert entries["runs/good.h5"].status == "ok" and entries["runs/good.h5"].message == ""
    assert entries["runs/partial.h5"].status == "incomplete" and "2 of 3 steps" in entries["runs/partial.h5"].message
    damaged = entries["runs/damaged.h5"]
    assert damaged.status == "invalid" and not damaged.usable and damaged.label == "runs/damaged.h5 (invalid)"
    assert damaged.message.startswith("runs/damaged.h5: invalid capture, not drawn: step_0002/m")
    assert entries["runs/broken.h5"].status == "error" and not entries["runs/broken.h5"].usable
    assert catalog.default_id() == "runs/good.h5"


def test_skipped_files_and_folders_are_logged_once(capture_root, caplog, monkeypatch):
    """The listing runs on every page render: what it skips is said once in the server's log,
    a folder it cannot read too (a permission error, isolated here: tests run as root)."""
    private = capture_root / "private"
    private.mkdir()
    scandir = os.scandir

    def refusing(path="."):
        if Path(path) == private:
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refusing)
    try:
        with CaptureCatalog(capture_root) as catalog, caplog.at_level(logging.WARNING, logger="dfsviz.app.data"):
            for _ in range(3):
                assert "runs/good.h5" in catalog.list_ids()
    finally:
        private.rmdir()
    messages = [r.getMessage() for r in caplog.records]
    assert messages.count("not listing folder runs/private: Permission denied") == 1
    escape = [m for m in messages if m.startswith("not serving runs/escape.h5: ")]
    assert len(escape) == 1 and "outside" in escape[0], messages


def test_a_root_inside_another_is_listed_once(capture_root, tmp_path):
    outer = tmp_path / "all"
    inner = outer / "runs"
    inner.mkdir(parents=True)
    shutil.copy(capture_root / "good.h5", inner / "good.h5")
    shutil.copy(capture_root / "good.h5", outer / "top.h5")
    with CaptureCatalog([outer, inner]) as catalog:
        assert catalog.list_ids() == ["all/top.h5", "runs/good.h5"]
        assert catalog.resolve("all/runs/good.h5") == (inner / "good.h5").resolve()  # its links still open it
    with CaptureCatalog([inner, outer]) as catalog:  # in either order
        assert catalog.list_ids() == ["all/top.h5", "runs/good.h5"]


def test_a_file_a_running_capture_writes_is_capturing_until_it_is_done(capture_root, tmp_path):
    """A capture held open for writing (HDF5's lock, as a running capture holds it) is listed
    "(capturing)", refused with that reason, and usable once the writer is gone, without a new
    file version (a killed capture leaves the file as it was)."""
    import subprocess
    import sys

    root = tmp_path / "runs"
    root.mkdir()
    shutil.copy(capture_root / "good.h5", root / "live.h5")
    cat = CaptureCatalog([root])
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, h5py; f = h5py.File(sys.argv[1], 'r+'); print('open', flush=True); "
         "sys.stdin.read()", str(root / "live.h5")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        if os.environ.get("HDF5_USE_FILE_LOCKING", "").upper() in ("FALSE", "0"):
            pytest.skip("HDF5 file locking is turned off (HDF5_USE_FILE_LOCKING)")
        version = os.stat(root / "live.h5")
        entry = cat.entry("runs/live.h5")
        assert entry.status == "capturing" and not entry.usable and entry.label == "runs/live.h5 (capturing)"
        assert entry.message == "runs/live.h5: a running capture is writing it; it opens once that capture is done"
        with pytest.raises(CaptureError, match="a running capture is writing it"):
            cat.reader("runs/live.h5")
        holder.kill()  # killed, as a capture may be: the file is left as it was, its lock with the process
        holder.wait(timeout=30)
        after = os.stat(root / "live.h5")
        assert (after.st_size, after.st_mtime_ns) == (version.st_size, version.st_mtime_ns)
        assert cat.entry("runs/live.h5").status == "ok"  # the same file version, read now
    finally:
        holder.kill()
        holder.wait(timeout=30)
        cat.close()


def test_an_invalid_file_is_never_read(catalog):
    """Every read of a file that fails validation is refused, its sound steps included."""
    for read in (lambda: catalog.reader("runs/damaged.h5"), lambda: catalog.mass("runs/damaged.h5", 3, 1, "raster"),
                 lambda: exact_footprint(catalog, "runs/damaged.h5", 3, 1, "raster", 0, 0)):
        with pytest.raises(CaptureError, match=r"runs/damaged.h5: invalid capture, not drawn: step_0002/m"):
            read()
    with pytest.raises(CaptureError, match="runs/broken.h5.* is not a readable HDF5 file"):
        catalog.reader("runs/broken.h5")


def scaled_copy(src, dst, step: int, at: str):
    """A copy of capture ``src`` whose block mass m of ``step`` is doubled in one map: the first
    (layer, branch, order, head) or the last one ("first" / "last"), so that map's rows sum to 2."""
    import h5py

    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        m = f["steps"][f"step_{step:04d}"]["m"]
        index = (0, 0, 0, 0) if at == "first" else tuple(n - 1 for n in m.shape[:4])
        m[index] = 2 * m[index]
    return dst


def test_a_file_with_a_scaled_first_map_is_invalid(capture_root, tmp_path):
    root = tmp_path / "scaled"
    root.mkdir()
    scaled_copy(capture_root / "good.h5", root / "first.h5", 2, "first")
    with CaptureCatalog([root]) as cat:
        entry = cat.entry("scaled/first.h5")
        assert entry.status == "invalid" and "step_0002/m" in entry.message
        assert cat.default_id() is None
        with pytest.raises(CaptureError, match="invalid capture, not drawn"):
            cat.scores("scaled/first.h5", 3, 0, "raster", "meanpool")


def test_a_file_with_a_scaled_later_map_is_invalid(capture_root, tmp_path):
    root = tmp_path / "scaled"
    root.mkdir()
    scaled_copy(capture_root / "good.h5", root / "last.h5", 2, "last")
    with CaptureCatalog([root]) as cat:
        assert cat.entry("scaled/last.h5").status == "invalid"


def test_validation_runs_once_per_file_version(capture_root, tmp_path, monkeypatch):
    """However many requests ask at once; a rewritten file (new size or mtime) is validated again."""
    from dfsviz.capture.reader import CaptureReader

    calls = []
    real = CaptureReader.validate
    monkeypatch.setattr(CaptureReader, "validate", lambda self: calls.append(self.path.name) or real(self))
    root = tmp_path / "once"
    root.mkdir()
    shutil.copy(capture_root / "good.h5", root / "a.h5")
    shutil.copy(capture_root / "partial.h5", root / "b.h5")
    with CaptureCatalog([root]) as cat:
        threads = [threading.Thread(target=cat.entries) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        cat.mass("once/a.h5", 0, 0, "raster")
        assert sorted(calls) == ["a.h5", "b.h5"]
        st = os.stat(root / "a.h5")
        os.utime(root / "a.h5", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        assert cat.entry("once/a.h5").status == "ok"
        cat.entries()
        assert sorted(calls) == ["a.h5", "a.h5", "b.h5"]


def test_messages_name_captures_by_id_not_by_server_path(catalog, capture_root):
    base = str(capture_root.parent)
    broken = catalog.entry("runs/broken.h5").message
    assert "runs/broken.h5" in broken and base not in broken
    for entry in catalog.entries():
        assert base not in entry.message, entry.message
    with pytest.raises(CaptureError) as info:
        catalog.reader("runs/broken.h5")
    assert base not in str(info.value)
    assert catalog.hide_paths(f"cannot read {capture_root / 'good.h5'}") == "cannot read runs/good.h5"


def test_two_roots_get_distinct_labels(capture_root, tmp_path):
    other = tmp_path / "runs"
    other.mkdir()
    shutil.copy(capture_root / "good.h5", other / "copy.h5")
    cat = CaptureCatalog([capture_root, other])
    try:
        assert set(cat.roots) == {"runs", "runs2"}
        assert "runs2/copy.h5" in cat.list_ids()
        assert cat.entry("runs2/copy.h5").status == "ok"
    finally:
        cat.close()


def test_reads_match_the_reader_and_are_memoised(catalog, capture_root):
    from dfsviz.capture.reader import CaptureReader

    m = catalog.mass("runs/good.h5", 2, 1, "hilbert3d", 1)
    assert catalog.mass("runs/good.h5", 2, 1, "hilbert3d", 1) is m  # served from the cache
    with CaptureReader(capture_root / "good.h5") as reader:
        assert torch.equal(m, reader.block_stats(2, 1, "hilbert3d", 1).m)
        assert torch.equal(catalog.scores("runs/good.h5", 2, 1, "raster", "oracle", 0), reader.block_stats(2, 1, "raster", 0).m)
    assert catalog.cache_info()["maps"]["hits"] >= 1


def test_a_rewritten_file_is_not_served_stale(capture_root, tmp_path):
    import h5py

    root = tmp_path / "r"
    root.mkdir()
    path = root / "c.h5"
    shutil.copy(capture_root / "good.h5", path)
    cat = CaptureCatalog([root])
    try:
        before = cat.mass("r/c.h5", 0, 0, "raster", 0).clone()
        # a new capture written over the old name (another process): new contents, new mtime
        new = tmp_path / "new.h5"
        shutil.copy(capture_root / "good.h5", new)
        with h5py.File(new, "r+") as f:
            m = f["steps"]["step_0000"]["m"]
            m[0, 0, 0, 0] = 1.0 / m.shape[-1]  # uniform attention: still a valid block mass
        st = os.stat(path)
        os.utime(new, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        os.replace(new, path)
        after = cat.mass("r/c.h5", 0, 0, "raster", 0)
        assert torch.all(after == 1.0 / after.shape[-1]) and not torch.equal(before, after)
    finally:
        cat.close()


def test_a_file_rewritten_in_place_is_read_anew(capture_root, tmp_path):
    """Written over the same inode (``cat new > old``), which HDF5 would serve through the open
    handle of the old version, with the old version's structure."""
    import h5py

    root = tmp_path / "r"
    root.mkdir()
    path = root / "c.h5"
    shutil.copy(capture_root / "good.h5", path)
    new = tmp_path / "new.h5"
    shutil.copy(capture_root / "good.h5", new)
    with h5py.File(new, "r+") as f:  # another layout of the same run: a large attribute moves the structure
        f.attrs["note"] = "x" * 200_000
        m = f["steps"]["step_0000"]["m"]
        m[0, 0, 0, 0] = 1.0 / m.shape[-1]
    cat = CaptureCatalog([root])
    try:
        before = cat.mass("r/c.h5", 0, 0, "raster", 0).clone()
        inode = path.stat().st_ino
        with open(path, "r+b") as out:
            out.write(new.read_bytes())
            out.truncate()
        st = path.stat()
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        assert path.stat().st_ino == inode
        assert cat.entry("r/c.h5").status == "ok", cat.entry("r/c.h5").message
        assert cat.reader("r/c.h5").attrs["note"] == "x" * 200_000
        after = cat.mass("r/c.h5", 0, 0, "raster", 0)
        assert torch.all(after == 1.0 / after.shape[-1]) and not torch.equal(before, after)
    finally:
        cat.close()


def test_reader_lru_closes_evicted_files(capture_root, tmp_path):
    root = tmp_path / "many"
    root.mkdir()
    for i in range(3):
        shutil.copy(capture_root / "good.h5", root / f"c{i}.h5")
    cat = CaptureCatalog([root], max_open=2)
    try:
        first = cat.reader("many/c0.h5")
        cat.reader("many/c1.h5")
        cat.reader("many/c2.h5")
        assert not first._f.id.valid  # evicted and closed
        assert cat.reader("many/c0.h5") is not first
    finally:
        cat.close()


def test_block_stats_view_and_exact_footprint(catalog, capture_root):
    from dfsviz.capture.reader import CaptureReader
    from dfsviz.sparse.theory import recall_bound
    from dfsviz.sparse.select import select_topk

    stored = catalog.stats("runs/good.h5", 3, 1, "raster")
    stats = stored.to_block_stats()
    assert torch.isnan(stats.lse).all() and stats.m is stored.m
    assert torch.equal(catalog.mass("runs/good.h5", 3, 1, "raster"), stored.m)
    mask = select_topk(stored.m, 0.25, seq_len=stored.seq_len, block=stored.block)
    assert bool((recall_bound(stats, mask) <= 1).all())
    # the stored sampled footprint equals the one recomputed from the stored Q/K
    with CaptureReader(capture_root / "good.h5") as reader:
        blocks, att = reader.footprints(3, 1, "hilbert3d", 0)
    got = exact_footprint(catalog, "runs/good.h5", 3, 1, "hilbert3d", 0, int(blocks[1]))
    torch.testing.assert_close(got, att[1], atol=2e-3, rtol=2e-3)
    assert abs(float(got.sum()) - 1.0) < 1e-5


def test_query_parsing_falls_back_with_notes():
    q = Query({"step": "7", "layer": "x", "budget": "1.5", "orders": "raster,bogus", "file": "a/b.h5", "n": "3"})
    assert q.choice("step", [0, 7], 0) == 7
    assert q.choice("layer", [0, 1], 1) == 1
    assert q.number("budget", 0.001, 1.0, 0.2) == 0.2
    assert q.many("orders", ["raster", "hilbert3d"], ["hilbert3d"]) == ["raster"]
    assert q.integer("n", 0, 2, 1) == 1
    assert len(q.notes) == 4 and "layer='x'" in q.notes[0] and "[0.001, 1]" in q.notes[1]


def test_figure_csv_holds_heatmap_cells_and_points():
    z = np.arange(6.0).reshape(2, 3)
    fig = go.Figure(go.Heatmap(z=z, x=["a", "b", "c"], y=[10, 20], name="hm"))
    fig.add_trace(go.Scatter(x=[0.1, 0.2], y=[1.0, 2.0], name="line"))
    fig.add_trace(go.Scatter(x=[0, 1, None], y=[0, 1, None], name="outline", hoverinfo="skip"))
    fig.update_layout(title="Budget per head<br><span style='font-size:12px'>dfs_tile · hilbert3d</span>")
    rows = list(csv.reader(io.StringIO(figure_csv(fig.to_plotly_json()))))
    assert rows[0] == ["figure", "Budget per head · dfs_tile · hilbert3d"]  # plain text, not markup
    assert rows[1] == ["trace", "x", "y", "z"]
    cells = {(r[1], r[2]): float(r[3]) for r in rows[2:] if r[0] == "hm"}
    assert cells == {(x, str(y)): z[i, j] for i, y in enumerate([10, 20]) for j, x in enumerate("abc")}
    assert [r[1:3] for r in rows if r[0] == "line"] == [["0.1", "1.0"], ["0.2", "2.0"]]
    assert not any(r[0] == "outline" for r in rows)


def test_the_map_cache_counts_the_tensors_inside_stored_stats_and_masks():
    """The byte bound of the catalog's LRU sees the tensors a StoredStats or a BlockMask holds
    (they were counted as 64 bytes each, so the bound let them pile up)."""
    import torch

    from dfsviz.app.data import _LRU
    from dfsviz.capture.reader import StoredStats
    from dfsviz.sparse.masks import BlockMask

    maps = {n: torch.rand(1, 2, 8, 8).softmax(-1) if n == "m" else torch.rand(1, 2, 8, 8) for n in "mLrJ"}
    stats = StoredStats(**maps, block=16, seq_len=128, heads=(0, 1))
    mask = BlockMask.full(1, 2, 128, 16)
    assert _LRU._nbytes(stats) >= 4 * 2 * 8 * 8 * 4
    assert _LRU._nbytes(mask) == mask.kv_num_blocks.nbytes + mask.kv_indices.nbytes + 2 * 64
    lru = _LRU(max_items=100, max_bytes=_LRU._nbytes(stats) + 100)
    for i in range(3):
        lru.get_or_compute(i, lambda: stats)
    assert len(lru._data) == 1  # only the latest fits the bound

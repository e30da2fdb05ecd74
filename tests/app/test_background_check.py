"""Files above the catalog's ``full_check_bytes`` are checked map by map and in the background
(issue 14): usable at once with status "checking", every map a view reads checked before it is
returned, the whole-file check in one worker thread. Real captures of the tiny model, damaged with
h5py; ``full_check_bytes=0`` makes their few MB "large".

The worker is held where a test needs a fixed state (:class:`Gate`, a wrapper of the real map
loop ``CaptureReader.iter_map_problems``); every wait is on the condition checked
(``CaptureCatalog.wait_checked``, events), never a sleep.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from app_captures import make_capture, record_dfsattn, save_tiny_wan
from test_data import scaled_copy

from dfsviz.app.data import CaptureCatalog, CaptureError
from dfsviz.capture.reader import CaptureReader
from dfsviz.capture.schema import DIMS
from dfsviz.capture.validation import map_problem

WAIT = 120  # seconds: a bound on a wait that a failing test would otherwise never leave


class Gate:
    """Holds the background check after its first read of maps until :meth:`release` (or the
    end of its ``with`` block, so that a failing test does not leave the worker held): a wrapper of
    the real loop that records which files the checks opened, in order, and how many reads each
    consumed."""

    def __init__(self, monkeypatch) -> None:
        self.held = threading.Event()
        self.go = threading.Event()
        self.runs: list[str] = []
        self.reads: list[int] = []
        self.active = self.most_active = 0
        real = CaptureReader.iter_map_problems

        def gated(reader):
            self.runs.append(reader.path.name)
            self.reads.append(0)
            self.active += 1
            self.most_active = max(self.most_active, self.active)
            try:
                for problem in real(reader):
                    self.reads[-1] += 1
                    if not self.go.is_set():
                        self.held.set()
                        assert self.go.wait(WAIT), "the test never released the gate"
                    yield problem
            finally:
                self.active -= 1

        monkeypatch.setattr(CaptureReader, "iter_map_problems", gated)

    def wait_held(self) -> None:
        assert self.held.wait(WAIT), "the background check never started"
        self.held.clear()

    def release(self) -> None:
        self.go.set()

    def __enter__(self) -> "Gate":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def copy_to(root: Path, src: Path, name: str) -> Path:
    root.mkdir(exist_ok=True)
    shutil.copy(src, root / name)
    return root / name


def full_check(root: Path, cid: str):
    """The entry today's contract gives (whole-file validation before the first view)."""
    with CaptureCatalog([root]) as cat:
        return cat.entry(cid)


@pytest.fixture(scope="module")
def captures(tmp_path_factory):
    """Real captures of the tiny model with float16 and with uint8 maps, and a recording with
    DFSAttn's masks (``app_captures.record_dfsattn``)."""
    base = tmp_path_factory.mktemp("dtypes")
    model = save_tiny_wan(base / "model")
    return {"float16": make_capture(base / "half.h5", model, map_dtype="float16"),
            "uint8": make_capture(base / "codes.h5", model, map_dtype="uint8"),
            "dfsattn": record_dfsattn(base / "sparse.h5")}


def test_a_sound_large_file_is_usable_at_once_and_ends_ok(capture_root, tmp_path):
    root = tmp_path / "big"
    copy_to(root, capture_root / "good.h5", "good.h5")
    copy_to(root, capture_root / "partial.h5", "partial.h5")
    with CaptureCatalog([root], full_check_bytes=0) as cat, CaptureReader(root / "good.h5") as plain:
        entry = cat.entry("big/good.h5")
        assert entry.status == "checking" and entry.usable and entry.label == "big/good.h5 (checking)"
        assert entry.message == ""
        assert torch.equal(cat.mass("big/good.h5", 3, 1, "raster", 0), plain.block_mass(3, 1, "raster", 0))
        assert cat.wait_checked("big/good.h5", WAIT).status == "ok" and cat.entry("big/good.h5").message == ""
        # an interrupted run ends as today: incomplete, with today's message
        assert cat.entry("big/partial.h5").status == "checking"
        assert cat.wait_checked("big/partial.h5", WAIT) == full_check(root, "big/partial.h5")


def test_files_up_to_full_check_bytes_are_validated_before_their_first_view(capture_root, tmp_path):
    root = tmp_path / "small"
    path = copy_to(root, capture_root / "good.h5", "good.h5")
    with CaptureCatalog([root], full_check_bytes=path.stat().st_size) as cat:
        assert cat.entry("small/good.h5").status == "ok"
    with CaptureCatalog([root]) as cat:  # the default keeps test captures and the samples so
        assert cat.entry("small/good.h5").status == "ok"


def test_a_file_above_the_threshold_opens_without_a_map_read(capture_root, tmp_path, monkeypatch):
    """The first call reads no map in the caller's thread (the maps it reads at the threshold
    prove the count sees them); the background worker reads them in its own."""
    root = tmp_path / "threshold"
    path = copy_to(root, capture_root / "good.h5", "good.h5")
    size = path.stat().st_size
    caller = threading.get_ident()
    reads: list[str] = []
    real = h5py.Dataset.__getitem__

    def counted(dset, selection):
        if threading.get_ident() == caller and dset.name.rpartition("/")[2] in DIMS:
            reads.append(dset.name)
        return real(dset, selection)

    monkeypatch.setattr(h5py.Dataset, "__getitem__", counted)
    with CaptureCatalog([root], full_check_bytes=size - 1) as cat:
        assert cat.entry("threshold/good.h5").status == "checking"
        assert reads == []
        assert cat.wait_checked("threshold/good.h5", WAIT).status == "ok"
    with CaptureCatalog([root], full_check_bytes=size) as cat:
        assert cat.entry("threshold/good.h5").status == "ok"
        assert any("/steps/step_0000/m" == name for name in reads)


def test_a_damaged_map_is_refused_while_sound_maps_are_served(capture_root, tmp_path, monkeypatch):
    """One head of one layer whose rows of m sum to 2: refused by name the moment a view reads
    it, the file invalid at once (with today's banner), every later read refused."""
    root = tmp_path / "dmg"
    root.mkdir()
    scaled_copy(capture_root / "good.h5", root / "first.h5", 2, "first")
    today = full_check(root, "dmg/first.h5")
    with (CaptureCatalog([root], full_check_bytes=0) as cat, CaptureReader(root / "first.h5") as plain,
          Gate(monkeypatch) as gate):
        assert cat.entry("dmg/first.h5").status == "checking"
        gate.wait_held()
        # sound maps, even of the damaged step and layer
        assert torch.equal(cat.mass("dmg/first.h5", 2, 0, "raster", 1), plain.block_mass(2, 0, "raster", 1))
        assert torch.equal(cat.mass("dmg/first.h5", 2, 0, "hilbert3d", 0), plain.block_mass(2, 0, "hilbert3d", 0))
        with pytest.raises(CaptureError, match=r"^dmg/first.h5: invalid capture, not drawn: step_0002/m\[layer 0, "
                                               r"branch cond, order raster, head 0\]: rows do not sum to 1"):
            cat.stats("dmg/first.h5", 2, 0, "raster")
        entry = cat.entry("dmg/first.h5")
        assert entry == today and entry.label == "dmg/first.h5 (invalid)"
        with pytest.raises(CaptureError, match="invalid capture, not drawn"):
            cat.mass("dmg/first.h5", 3, 1, "raster", 0)  # a sound map not read before: refused too
        gate.release()
        assert cat.wait_checked("dmg/first.h5", WAIT) == today


def test_a_damaged_map_no_view_reads_makes_the_file_invalid_when_its_check_ends(capture_root, tmp_path):
    root = tmp_path / "late"
    root.mkdir()
    scaled_copy(capture_root / "good.h5", root / "last.h5", 2, "last")
    with CaptureCatalog([root], full_check_bytes=0) as cat:
        assert cat.entry("late/last.h5").status == "checking"
        cat.mass("late/last.h5", 0, 0, "raster", 0)
        assert cat.wait_checked("late/last.h5", WAIT) == full_check(root, "late/last.h5")
        assert cat.entry("late/last.h5").status == "invalid"


# dataset -> (damage of its first map of step 2, the catalog read that returns that map); the
# reads take (catalog, id, layout) and ask for layer, order, head and method at position 0
DAMAGE = {
    "m": (lambda x: 2 * x, lambda c, i, y: c.mass(i, 2, y.layers[0], y.orders[0], y.heads[0])),
    "L": (lambda x: x * np.nan, lambda c, i, y: c.stats(i, 2, y.layers[0], y.orders[0], y.heads[0])),
    "r": (lambda x: -1 - abs(x), lambda c, i, y: c.stats(i, 2, y.layers[0], y.orders[0])),
    "J": (lambda x: x * np.inf, lambda c, i, y: c.stats(i, 2, y.layers[0], y.orders[0], y.heads[0])),
    "scores": (lambda x: x * np.nan,
               lambda c, i, y: c.scores(i, 2, y.layers[0], y.orders[0], y.score_methods[0], y.heads[0])),
    "W_q": (lambda x: x + 2, lambda c, i, y: c.variance_ratios(i, 2, y.layers[0], y.orders[0])),
    "W_k": (lambda x: x - 2, lambda c, i, y: c.variance_ratios(i, 2, y.layers[0], y.orders[0])),
    "footprint": (lambda x: -abs(x) - 1, lambda c, i, y: c.footprints(i, 2, y.layers[0], y.orders[0], y.heads[0])),
    "footprint_block": (lambda x: x + 999, lambda c, i, y: c.footprints(i, 2, y.layers[0], y.orders[0], y.heads[0])),
    "q": (lambda x: x * np.nan, lambda c, i, y: c.qkv(i, 2, y.qkv_layers[0], y.heads[0])),
    "k": (lambda x: x * np.nan, lambda c, i, y: c.qkv(i, 2, y.qkv_layers[0])),
    "v": (lambda x: x * np.inf, lambda c, i, y: c.qkv(i, 2, y.qkv_layers[0], y.heads[0])),
    "recall": (lambda x: x * 1.5 + 0.1,
               lambda c, i, y: c.curves(i, 2, y.layers[0], y.orders[0], y.curve_methods[0], y.heads[0])),
    "density": (lambda x: x[::-1].copy(),
                lambda c, i, y: c.curves(i, 2, y.layers[0], y.orders[0], y.curve_methods[0], y.heads[0])),
    "dfsattn_mask": (lambda x: x + 7, lambda c, i, y: c.cached(i, ("dfsattn_mask",), lambda r: r.dfsattn_mask(
        2, y.layers[0], y.heads[0]))),
}


def test_every_dataset_of_a_step_has_a_checked_read_below(capture_root, captures):
    """The damage table covers every per-step dataset the captures hold (a new dataset needs its row)."""
    names = set()
    for path in (capture_root / "good.h5", captures["dfsattn"]):
        with CaptureReader(path) as reader:
            names |= set(reader.layout.datasets(2))
    assert sorted(n for n in names if not n.endswith("_affine")) == sorted(DAMAGE)


@pytest.mark.parametrize("name", list(DAMAGE))
def test_each_dataset_a_view_reads_is_checked(capture_root, captures, tmp_path, monkeypatch, name):
    damage, read = DAMAGE[name]
    src = captures["dfsattn"] if name == "dfsattn_mask" else capture_root / "good.h5"
    root = tmp_path / "each"
    path = copy_to(root, src, "x.h5")
    with h5py.File(path, "r+") as f:
        dset = f["steps"]["step_0002"][name]
        index = (0,) * (DIMS[name].index("head") + 1)  # the first map of the first head
        dset[index] = damage(dset[index])
    with CaptureCatalog([root], full_check_bytes=0) as cat, Gate(monkeypatch) as gate:
        layout = cat.reader("each/x.h5").layout
        gate.wait_held()
        with pytest.raises(CaptureError, match=rf"invalid capture, not drawn: step_0002/{name}\[[^]]*head "
                                               rf"{layout.heads[0]}\]: "):
            read(cat, "each/x.h5", layout)
        assert cat.entry("each/x.h5").status == "invalid"
        gate.release()


def test_float16_maps_are_checked_as_stored(captures, tmp_path):
    """A float16 row of m summing to 1 + 1.2e-3: within float16's rounding allowance (half an ulp
    of each entry on top of float32's 1e-3), beyond float32's; the view serves it and the check
    ends ok, as validate() says."""
    root = tmp_path / "half"
    path = copy_to(root, captures["float16"], "half.h5")
    with h5py.File(path, "r+") as f:
        m = f["steps"]["step_0002"]["m"]
        row = m[0, 0, 0, 0, 0].astype(np.float64)
        row[row.argmax()] += 1.2e-3
        m[0, 0, 0, 0, 0] = row.astype(np.float16)
        stored = m[0, 0, 0, 0]
    off = abs(stored[0].astype(np.float64).sum() - 1)
    assert 1e-3 < off < 1e-3 + np.finfo(np.float16).eps / 2, off
    assert map_problem("m", stored.astype(np.float32), stored.shape[-1]) is not None  # float32's allowance refuses it
    with CaptureReader(path) as plain:
        assert plain.validate() == []
        layout = plain.layout
    with CaptureCatalog([root], full_check_bytes=0) as cat:
        m = cat.mass("half/half.h5", 2, layout.layers[0], layout.orders[0], layout.heads[0])
        assert abs(float(m[0, 0, 0].double().sum()) - 1) > 1e-3
        assert cat.wait_checked("half/half.h5", WAIT).status == "ok"


def test_uint8_maps_are_checked_decoded(captures, tmp_path, monkeypatch):
    """8-bit codes with a doubled scale in one map's rows: the decoded rows sum to 2."""
    root = tmp_path / "codes"
    path = copy_to(root, captures["uint8"], "codes.h5")
    with h5py.File(path, "r+") as f:
        affine = f["steps"]["step_0002"]["m_affine"]
        affine[0, 0, 0, 1, :, 1] = 2 * affine[0, 0, 0, 1, :, 1]
    with CaptureCatalog([root], full_check_bytes=0) as cat, CaptureReader(path) as plain, Gate(monkeypatch) as gate:
        y = plain.layout
        assert cat.entry("codes/codes.h5").status == "checking"
        gate.wait_held()
        assert torch.equal(cat.mass("codes/codes.h5", 2, y.layers[0], y.orders[0], y.heads[0]),
                           plain.block_mass(2, y.layers[0], y.orders[0], y.heads[0]))
        with pytest.raises(CaptureError, match=rf"step_0002/m\[layer {y.layers[0]}, branch cond, order {y.orders[0]}, "
                                               rf"head {y.heads[1]}\]: rows do not sum to 1"):
            cat.mass("codes/codes.h5", 2, y.layers[0], y.orders[0])
        gate.release()
        assert cat.wait_checked("codes/codes.h5", WAIT) == full_check(root, "codes/codes.h5")


def test_one_check_at_a_time_in_the_order_files_were_first_asked_for(capture_root, tmp_path, monkeypatch):
    root = tmp_path / "queue"
    for name in ("a.h5", "b.h5", "c.h5"):
        copy_to(root, capture_root / "good.h5", name)
    with CaptureCatalog([root], full_check_bytes=0) as cat, Gate(monkeypatch) as gate:
        for name in ("c.h5", "a.h5", "b.h5", "c.h5"):
            assert cat.entry(f"queue/{name}").status == "checking"
        gate.wait_held()
        with pytest.raises(TimeoutError, match=r"queue/b.h5 is still being checked after 0 s"):
            cat.wait_checked("queue/b.h5", 0)
        gate.release()
        assert [cat.wait_checked(f"queue/{n}", WAIT).status for n in ("a.h5", "b.h5", "c.h5")] == ["ok"] * 3
    assert gate.runs == ["c.h5", "a.h5", "b.h5"] and gate.most_active == 1


def test_a_file_rewritten_during_its_check_is_checked_again(capture_root, tmp_path, monkeypatch):
    root = tmp_path / "rw"
    path = copy_to(root, capture_root / "good.h5", "c.h5")
    with CaptureCatalog([root], full_check_bytes=0) as cat, Gate(monkeypatch) as gate:
        assert cat.entry("rw/c.h5").status == "checking"
        gate.wait_held()
        # another capture written over the name: one damaged map, a new mtime
        new = scaled_copy(capture_root / "good.h5", tmp_path / "new.h5", 2, "first")
        st = os.stat(path)
        os.utime(new, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        os.replace(new, path)
        gate.release()
        checked = cat.wait_checked("rw/c.h5", WAIT)
        assert gate.runs == ["c.h5", "c.h5"]
        assert gate.reads[0] == 1 < gate.reads[1]  # the first check stopped at the read it was held in
    assert checked.status == "invalid" and checked == full_check(root, "rw/c.h5")


def test_a_file_changed_before_its_turn_is_not_checked_in_that_version(capture_root, tmp_path, monkeypatch):
    root = tmp_path / "skip"
    copy_to(root, capture_root / "good.h5", "a.h5")
    path = copy_to(root, capture_root / "good.h5", "b.h5")
    with CaptureCatalog([root], full_check_bytes=0) as cat, Gate(monkeypatch) as gate:
        cat.entry("skip/a.h5")
        cat.entry("skip/b.h5")
        gate.wait_held()
        st = os.stat(path)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        gate.release()
        assert cat.wait_checked("skip/a.h5", WAIT).status == "ok"
        assert cat.wait_checked("skip/b.h5", WAIT).status == "ok"  # its new version, queued when asked
    assert gate.runs == ["a.h5", "b.h5"]


def test_close_stops_a_running_check_between_reads(capture_root, tmp_path, monkeypatch):
    root = tmp_path / "stop"
    copy_to(root, capture_root / "good.h5", "c.h5")
    gate = Gate(monkeypatch)
    cat = CaptureCatalog([root], full_check_bytes=0)
    assert cat.entry("stop/c.h5").status == "checking"
    gate.wait_held()
    worker = cat._worker
    closer = threading.Thread(target=cat.close)
    closer.start()
    assert worker.stop.wait(WAIT)  # close() asked the worker to stop; it is held inside a read
    gate.release()
    closer.join(WAIT)
    assert not closer.is_alive() and not worker.thread.is_alive()
    assert gate.reads == [1]  # it stopped at the read it was held in
    # a catalog used after close() checks the file again
    assert cat.entry("stop/c.h5").status == "checking"
    assert cat.wait_checked("stop/c.h5", WAIT).status == "ok"
    cat.close()


def test_the_check_waits_between_maps_while_a_request_is_served(capture_root, tmp_path, monkeypatch):
    """While ``serving()`` is held the worker reads no further map (it cannot end the check);
    after it ends, the check goes on to the end."""
    root = tmp_path / "serving"
    copy_to(root, capture_root / "good.h5", "c.h5")
    gate = Gate(monkeypatch)
    with CaptureCatalog([root], full_check_bytes=0) as cat:
        assert cat.entry("serving/c.h5").status == "checking"
        gate.wait_held()
        with cat.serving():
            gate.release()
            with pytest.raises(TimeoutError, match="still being checked"):
                cat.wait_checked("serving/c.h5", 2)
            assert gate.reads == [1]  # held after its first read, it read nothing more
        assert cat.wait_checked("serving/c.h5", WAIT).status == "ok"
        assert gate.reads[0] > 1


def test_the_dashboard_pauses_the_check_for_every_request(capture_root, tmp_path, monkeypatch):
    """``create_app`` serves each request inside ``CaptureCatalog.serving``: a request answered
    while the worker is held finds the check unable to end."""
    import functools

    from dfsviz.app import create_app, data

    root = tmp_path / "app"
    copy_to(root, capture_root / "good.h5", "c.h5")
    monkeypatch.setattr(data, "CaptureCatalog", functools.partial(data.CaptureCatalog, full_check_bytes=0))
    gate = Gate(monkeypatch)
    app = create_app(root)
    cat = app.server.config[data.CONFIG_KEY]
    seen = []

    @app.server.route("/probe")
    def probe():
        gate.release()
        try:
            cat.wait_checked("app/c.h5", 2)
            seen.append("ended while serving")
        except TimeoutError:
            seen.append("paused")
        return "done"

    try:
        assert cat.entry("app/c.h5").status == "checking"
        gate.wait_held()
        assert app.server.test_client().get("/probe").status_code == 200
        assert seen == ["paused"] and gate.reads == [1]
        assert cat.wait_checked("app/c.h5", WAIT).status == "ok"
    finally:
        cat.close()


def test_the_background_check_logs_its_start_and_end(capture_root, tmp_path, caplog):
    root = tmp_path / "log"
    copy_to(root, capture_root / "good.h5", "c.h5")
    with caplog.at_level(logging.INFO, logger="dfsviz.app.data"), CaptureCatalog([root], full_check_bytes=0) as cat:
        cat.entry("log/c.h5")
        cat.wait_checked("log/c.h5", WAIT)
    lines = [r.getMessage() for r in caplog.records if r.name == "dfsviz.app.data" and r.levelno == logging.INFO]
    assert any(line.startswith("checking log/c.h5 (2.") and "MB) in the background" in line for line in lines), lines
    assert any(line.startswith("checked log/c.h5 in ") and line.endswith(" s: ok") for line in lines), lines


def test_a_checked_read_takes_whole_maps(capture_root, tmp_path):
    root = tmp_path / "whole"
    copy_to(root, capture_root / "good.h5", "c.h5")
    with CaptureCatalog([root], full_check_bytes=0) as cat:
        group = cat.reader("whole/c.h5")._step_group(2)  # the step group every reader accessor reads through
        assert group["m"][0, 0, 0, [1]].shape == (1, 16, 16)
        assert group["recall"][:, 0, 1, :].shape[0] == 2  # every layer's curves of one (branch, order): one read
        with pytest.raises(TypeError, match=r"a checked read takes whole maps of one position, or of all positions, "
                                            r"of each dim before `head` \(got m\[\(0, 0, 0, 0, 0\)\]\)"):
            group["m"][0, 0, 0, 0, 0]
        with pytest.raises(TypeError, match=r"before `head` \(got m\[\(slice\(None, None, None\),\)\]\)"):
            group["m"][:]
        with pytest.raises(TypeError, match=r"before `head` \(got m\[\(slice\(0, 1, None\), 0, 0\)\]\)"):
            group["m"][0:1, 0, 0]


def test_a_read_of_every_layers_curves_checks_each_curve(capture_root, tmp_path, monkeypatch):
    root = tmp_path / "slab"
    path = copy_to(root, capture_root / "good.h5", "c.h5")
    with h5py.File(path, "r+") as f:
        curves = f["steps"]["step_0002"]["recall"]
        curves[1, 0, 1, 2, 1] = curves[1, 0, 1, 2, 1][::-1]  # layer position 1, hilbert3d, method 2, head 1
    with CaptureCatalog([root], full_check_bytes=0) as cat, Gate(monkeypatch) as gate:
        reader = cat.reader("slab/c.h5")
        gate.wait_held()
        with pytest.raises(CaptureError, match=rf"step_0002/recall\[layer {reader.layers[1]}, branch cond, order "
                                               rf"hilbert3d, recall_method {reader.layout.curve_methods[2]}, head "
                                               rf"{reader.heads[1]}\]: decreases with k"):
            cat.step_curves("slab/c.h5", 2, "hilbert3d")
        assert cat.entry("slab/c.h5").status == "invalid"
        gate.release()


@pytest.mark.parametrize("bad", [-1, 1.5, "big", True])
def test_full_check_bytes_must_be_a_byte_count(tmp_path, bad):
    with pytest.raises(ValueError, match=rf"`full_check_bytes` must be an integer >= 0 \(got {bad!r}\)"):
        CaptureCatalog([tmp_path], full_check_bytes=bad)

"""The HDF5 store: round trip, crash-safe step groups, resume, version checks, reader errors."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import zlib

import h5py
import numpy as np
import pytest
import torch

from stored_curves import assert_stored_curves_match_the_maps

from dfsviz.capture.reader import CaptureBusy, CaptureReader, StoredStats, _open_error_message
from dfsviz.capture.schema import FORMAT_VERSION, StoreLayout, step_key
from dfsviz.capture.validation import map_problem
from dfsviz.capture.writer import CaptureWriter, _ChunkPool
from dfsviz.sparse.grid import LatentGrid
from dfsviz.sparse.orders import make_order

GRID = LatentGrid(2, 4, 5, text_len=3, text_first=True)  # N = 43: a ragged last block of 16
CONFIG = {"seed": 0, "out": "x.h5", "resume": False}


def _layout(**kw):
    base = dict(grid=GRID, block=16, orders=("raster", "hilbert3d"), methods=("meanpool", "dfs_tile"), layers=(3, 7),
                layer_names=("blocks.3.attn1", "blocks.7.attn1"), heads=(0, 2), branches=("cond",), steps=(0, 5),
                footprints=2, qkv_layers=(7,), head_dim=8, qkv_dtype="float32")
    base.update(kw)
    return StoreLayout(**base)


def _create(path, layout=None, config=CONFIG):
    layout = layout or _layout()
    perms = {o: make_order(o, layout.grid).perm for o in layout.orders}
    return CaptureWriter.create(path, layout, {"capture_config": config, "prompt": "a cat"}, perms, workers=2)


def _random_maps(gen, heads=2, mb=3):
    maps = {n: torch.rand(heads, mb, mb, generator=gen) for n in ("L", "r", "J")}
    maps["m"] = torch.softmax(torch.randn(heads, mb, mb, generator=gen), dim=-1)  # block mass rows sum to 1
    return maps


def _write_step(writer, step, gen, device="cpu"):
    """Write a random step from tensors on ``device``; returns the written values (CPU)."""
    lay = writer.layout
    expected = {}
    writer.begin_step(step, {"timestep": 900.0})
    for layer in lay.layers:
        for order in lay.orders:
            stats = _random_maps(gen)
            scores = {m: torch.randn(2, 3, 3, generator=gen) for m in lay.methods}
            wq, wk = torch.rand(2, generator=gen, dtype=torch.float64), torch.rand(2, generator=gen, dtype=torch.float64)
            writer.write_maps(layer, "cond", order, {n: x.to(device) for n, x in stats.items()},
                              {n: x.to(device) for n, x in scores.items()}, wq.to(device), wk.to(device))
            blocks = torch.tensor([[0, 2], [1, 2]])
            att = torch.softmax(torch.randn(2, 2, lay.num_tokens, generator=gen), dim=-1)
            writer.write_footprints(layer, "cond", order, blocks.to(device), att.to(device))
            expected[(layer, order)] = (stats, scores, wq, wk, blocks, att)
    qkv = [torch.randn(2, lay.num_tokens, 8, generator=gen) for _ in range(3)]
    writer.write_qkv(7, "cond", *qkv)
    expected["qkv"] = qkv
    writer.end_step()
    return expected


def _write_the_rest(writer, gen, skip_footprints=()):
    """Random maps (and footprints) for every (layer, order) of the open step: a step is complete
    only when every map of it is written."""
    lay = writer.layout
    for layer in lay.layers:
        for order in lay.orders:
            writer.write_maps(layer, "cond", order, _random_maps(gen), {m: torch.randn(2, 3, 3, generator=gen) for m in lay.methods},
                              torch.rand(2, generator=gen, dtype=torch.float64), torch.rand(2, generator=gen, dtype=torch.float64))
            if (layer, order) != skip_footprints:
                att = torch.softmax(torch.randn(2, 2, lay.num_tokens, generator=gen), dim=-1)
                writer.write_footprints(layer, "cond", order, torch.tensor([[0, 2], [1, 2]]), att)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_round_trip(tmp_path, device):
    gen = torch.Generator().manual_seed(0)
    path = tmp_path / "c.h5"
    with _create(path) as writer:
        expected = {s: _write_step(writer, s, gen, device) for s in (0, 5)}
        writer.finish()
    with CaptureReader(path) as reader:
        assert reader.complete and reader.steps == [0, 5] and reader.validate() == []
        assert reader.layers == [3, 7] and reader.heads == [0, 2] and reader.orders == ["raster", "hilbert3d"]
        assert reader.grid == GRID and reader.attrs["prompt"] == "a cat"
        for step in (0, 5):
            for (layer, order), (stats, scores, wq, wk, blocks, att) in (
                (k, v) for k, v in expected[step].items() if k != "qkv"
            ):
                got = reader.block_stats(step, layer, order)
                for name in ("m", "L", "r", "J"):
                    assert torch.equal(getattr(got, name)[0], stats[name])  # float32 stored exactly
                assert torch.equal(reader.block_stats(step, layer, order, head=2).m[0, 0], stats["m"][1])
                assert torch.equal(reader.block_mass(step, layer, order)[0], stats["m"])
                assert torch.equal(reader.block_mass(step, layer, order, head=2)[0, 0], stats["m"][1])
                assert torch.equal(reader.scores(step, layer, order, "dfs_tile")[0], scores["dfs_tile"])
                # meanpool's score is the pooled logit: served from L, not stored a second time
                assert torch.equal(reader.scores(step, layer, order, "meanpool")[0], stats["L"])
                got_wq, got_wk = reader.variance_ratios(step, layer, order)
                assert torch.equal(got_wq[0], wq) and torch.equal(got_wk[0], wk)
                got_blocks, got_att = reader.footprints(step, layer, order, head=2)
                assert torch.equal(got_blocks, blocks[1])
                # float16 of N x probability: relative error below 2^-11
                torch.testing.assert_close(got_att, att[1], rtol=1e-3, atol=1e-7)
            q, k, v = reader.qkv(step, 7)
            for got, want in zip((q, k, v), expected[step]["qkv"]):
                assert torch.equal(got[0], want)
        # every method's recall curves, meanpool's included: those of the maps written (float32: the stored ones)
        assert_stored_curves_match_the_maps(reader)
        curves = reader.recall_curve(5, 7, "hilbert3d", "dfs_tile")
        every = reader.step_curves(5, "hilbert3d")  # [layers, curve methods, heads, Mk] in one read
        at = list(reader.layout.curve_methods).index("dfs_tile"), reader.layers.index(7)
        assert torch.equal(every[at[1], at[0]], curves[0])
        assert torch.equal(reader.step_curves(5, "hilbert3d", name="density")[at[1], at[0]],
                           reader.density_curve(5, 7, "hilbert3d", "dfs_tile")[0])
        with pytest.raises(ValueError, match=r"`name` must be one of \['recall', 'density'\] \(got 'mass'\)"):
            reader.step_curves(5, "hilbert3d", name="mass")
        assert torch.equal(reader.recall_curve(5, 7, "hilbert3d", "dfs_tile", head=2)[0, 0], curves[0, 1])
        assert torch.equal(reader.recall_curve(5, 7, "hilbert3d", "dfs_tile", head=[2, 0])[0], curves[0, [1, 0]])
        assert torch.equal(reader.perm("hilbert3d"), make_order("hilbert3d", GRID).perm)
        assert torch.equal(reader.token_order("hilbert3d").inv, make_order("hilbert3d", GRID).inv)
        assert torch.equal(reader.coords(), GRID.video_coords())


def test_files_are_plain_hdf5_with_named_dims(tmp_path):
    path = tmp_path / "c.h5"
    with _create(path) as writer:
        _write_step(writer, 0, torch.Generator().manual_seed(1))
    with h5py.File(path, "r") as f:
        assert f.attrs["format_version"] == FORMAT_VERSION and not f.attrs["complete"]
        m = f["steps"][step_key(0)]["m"]
        assert list(m.attrs["dims"]) == ["layer", "branch", "order", "head", "q_block", "k_block"]
        assert [d.label for d in m.dims] == ["layer", "branch", "order", "head", "q_block", "k_block"]
        assert list(m.dims[0][0][...]) == [3, 7]  # the layer coordinate
        assert m.chunks == (1, 1, 1, 1, 3, 3) and m.compression == "gzip" and m.shuffle
        assert np.isfinite(m[...]).all()


def test_chunks_are_shuffled_huffman_only_deflate(tmp_path):
    path = tmp_path / "c.h5"
    with _create(path) as writer:
        expected = _write_step(writer, 0, torch.Generator().manual_seed(5))
    want = expected[(7, "hilbert3d")][0]["m"][1].numpy()  # layer 7, order hilbert3d, head 2: chunk (1, 0, 1, 1)
    with h5py.File(path, "r") as f:
        m = f["steps"][step_key(0)]["m"]
        assert np.array_equal(m[1, 0, 1, 1], want)  # decoded by HDF5's own shuffle + gzip filters
        filter_mask, chunk = m.id.read_direct_chunk((1, 0, 1, 1, 0, 0))
    assert filter_mask == 0 and zlib.decompress(chunk) == want.reshape(-1).view(np.uint8).reshape(-1, 4).T.tobytes()
    # Huffman-only: no LZ77 matches, so a periodic map stays >= 1 bit per byte, where level 1 shrinks it ~100x
    periodic = np.tile(np.arange(4, dtype=np.float32), 4096)
    shuffled = periodic.view(np.uint8).reshape(-1, 4).T.tobytes()
    encoded = _ChunkPool.encode(periodic)
    assert zlib.decompress(encoded) == shuffled
    assert len(encoded) >= periodic.nbytes // 8 > 20 * len(zlib.compress(shuffled, 1))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_footprints_round_to_float16_as_numpy_does(tmp_path, device):
    # N x attention beyond float16: 65504 is the largest finite value, from 65520 on it is inf
    n = GRID.num_tokens
    values = torch.tensor([0.0, 6e-8, 1.0, 1 / 3, 65504.0, 65519.0, 65520.0, 1e6])
    att = torch.cat([values, torch.rand(n - values.numel(), generator=torch.Generator().manual_seed(6))]) / n
    att = att.expand(2, 2, n).contiguous()
    with _create(tmp_path / "f.h5", _layout(qkv_layers=())) as writer:
        writer.begin_step(0)
        writer.write_footprints(3, "cond", "raster", torch.tensor([[0, 1], [1, 2]]).to(device), att.to(device))
        _write_the_rest(writer, torch.Generator().manual_seed(7), skip_footprints=(3, "raster"))
        writer.end_step()
    with h5py.File(tmp_path / "f.h5", "r") as f:
        stored = f["steps"][step_key(0)]["footprint"][0, 0, 0, 0]  # head 0: [sample, token]
        assert list(f["steps"][step_key(0)]["footprint_block"][0, 0, 0, 1]) == [1, 2]
    with np.errstate(over="ignore"):
        want = (att[0].numpy() * np.float32(n)).astype(np.float16)
    assert np.array_equal(stored, want) and np.isinf(stored[0, 6]) and stored[0, 5] == 65504


def test_interrupted_step_is_invisible_and_resume_drops_it(tmp_path):
    gen = torch.Generator().manual_seed(2)
    path = tmp_path / "c.h5"
    writer = _create(path)
    _write_step(writer, 0, gen)
    writer.begin_step(5)
    writer.write_maps(3, "cond", "raster", _random_maps(gen), {m: torch.zeros(2, 3, 3) for m in ("meanpool", "dfs_tile")},
                      torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64))
    writer.close()  # as if killed: step 5 never marked complete
    with CaptureReader(path) as reader:
        assert reader.steps == [0] and not reader.complete and reader.validate() == []
        with pytest.raises(ValueError, match=r"`step` 5 is not a completed step of this capture; completed steps: \[0\]"
                                             r" \(the run was interrupted"):
            reader.block_stats(5, 3, "raster")
    writer = CaptureWriter.resume(path, _layout(), CONFIG)
    assert writer.completed == {0}
    with h5py.File(path, "r") as f:
        assert list(f["steps"]) == [step_key(0)]
    _write_step(writer, 5, gen)
    writer.finish()
    writer.close()
    with CaptureReader(path) as reader:
        assert reader.complete and reader.steps == [0, 5]
        assert_stored_curves_match_the_maps(reader)  # the resumed step stores its curves too


def test_resume_refuses_other_settings(tmp_path):
    path = tmp_path / "c.h5"
    _create(path).close()
    with pytest.raises(ValueError, match=r"captured with other settings \(differs in \['seed'\]\)"):
        CaptureWriter.resume(path, _layout(), {**CONFIG, "seed": 1})
    with pytest.raises(ValueError, match=r"differs in \['layout'\]"):
        CaptureWriter.resume(path, _layout(block=32), CONFIG)
    with pytest.raises(ValueError, match="does not exist; drop --resume"):
        CaptureWriter.resume(tmp_path / "none.h5", _layout(), CONFIG)


def test_unknown_format_version_names_the_writer(tmp_path):
    path = tmp_path / "c.h5"
    _create(path).close()
    with h5py.File(path, "r+") as f:
        f.attrs["format_version"] = 99
        f.attrs["dfsviz_version"] = "9.9.9"
    with pytest.raises(ValueError, match="has capture format version 99, written by dfsviz 9.9.9; .* reads format version 1"):
        CaptureReader(path)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["x"] = 1
    with pytest.raises(ValueError, match="is not a dfsviz capture"):
        CaptureReader(other)
    (tmp_path / "text.h5").write_text("hello")
    with pytest.raises(ValueError, match="is not a readable HDF5 file") as refused:
        CaptureReader(tmp_path / "text.h5")
    assert not isinstance(refused.value, CaptureBusy)  # busy means a running capture holds it, nothing else
    with pytest.raises(ValueError, match="does not exist"):
        CaptureReader(tmp_path / "missing.h5")
    with pytest.raises(ValueError, match=f"^{str(tmp_path)!r} is a folder, not a capture file; a run set's folder "
                                         "opens with dfsviz.open_run_set$"):
        CaptureReader(tmp_path)


def test_writer_and_reader_errors(tmp_path):
    gen = torch.Generator().manual_seed(3)
    path = tmp_path / "c.h5"
    with pytest.raises(ValueError, match="exists; pass --overwrite"):
        path.write_bytes(b"")
        _create(path)
    path.unlink()
    writer = _create(path)
    with pytest.raises(ValueError, match=r"`step` 3 is not a captured step \[0, 5\]"):
        writer.begin_step(3)
    _write_step(writer, 0, gen)
    with pytest.raises(ValueError, match="step 0 is already complete"):
        writer.begin_step(0)
    with pytest.raises(RuntimeError, match=r"cannot finish: steps \[5\] were not written"):
        writer.finish()
    writer.close()
    with CaptureReader(path) as r:
        with pytest.raises(ValueError, match=r"`layer` must be one of \[3, 7\] \(got 4\)"):
            r.block_stats(0, 4, "raster")
        with pytest.raises(ValueError, match=r"`head` must be one of \[0, 2\] \(got 1\)"):
            r.scores(0, 3, "raster", "meanpool", head=1)
        with pytest.raises(ValueError, match="`order` must be one of"):
            r.perm("morton3d")
        with pytest.raises(ValueError, match="`method` must be one of"):
            r.scores(0, 3, "raster", "oracle")
        with pytest.raises(ValueError, match=r"Q/K/V of layer 3 were not saved; saved layers: \[7\]"):
            r.qkv(0, 3)
        with pytest.raises(ValueError, match="`branch` must be one of"):
            r.variance_ratios(0, 3, "raster", branch="uncond")
        with pytest.raises(TypeError, match="`head` must be one int"):
            r.footprints(0, 3, "raster", head=None)
    with pytest.raises(ValueError, match=r"`qkv_layers` \[9\] are not captured layers"):
        _layout(qkv_layers=(9,))


def test_bytes_per_step_counts_every_dataset():
    lay = _layout()
    # 2 layers x 1 branch x 2 orders x 2 heads; 3 x 3 blocks; 2 methods, of which dfs_tile is stored
    # (meanpool is L); 2 samples; N = 43; 1 qkv layer, D = 8; float32 recall and density curves of both
    # methods and the oracle, k = 1..3
    maps = 2 * 1 * 2 * 2 * 9
    curves = 2 * (2 * 1 * 2 * 3 * 2 * 3)
    want = (4 * maps * 4 + 1 * maps * 4 + 2 * (2 * 2 * 2 * 8) + 2 * 2 * 2 * 2 * 4 + 2 * 2 * 2 * 2 * 43 * 2 + 3 * 2 * 43 * 8 * 4
            + curves * 4)
    assert lay.bytes_per_step(0) == want
    assert lay.total_bytes() == 2 * want  # steps (0, 5)
    only_5 = _layout(qkv_steps=(5,))
    assert only_5.bytes_per_step(0) == want - 3 * 2 * 43 * 8 * 4 and only_5.bytes_per_step(5) == want


def test_qkv_stored_only_at_qkv_steps(tmp_path):
    gen = torch.Generator().manual_seed(4)
    path = tmp_path / "s.h5"
    with _create(path, _layout(qkv_steps=(5,))) as writer:
        writer.begin_step(0)
        with pytest.raises(ValueError, match=r"Q/K/V are not stored at step 0; `qkv_steps` = \[5\]"):
            writer.write_qkv(7, "cond", *[torch.randn(2, 43, 8, generator=gen) for _ in range(3)])
        _write_the_rest(writer, gen)
        writer.end_step()
        writer.begin_step(5)
        qkv = [torch.randn(2, 43, 8, generator=gen) for _ in range(3)]
        writer.write_qkv(7, "cond", *qkv)
        _write_the_rest(writer, gen)
        writer.end_step()
    with CaptureReader(path) as reader:
        assert reader.layout.qkv_steps == (5,)
        assert "q" not in reader._f["steps"][step_key(0)]
        torch.testing.assert_close(reader.qkv(5, 7)[2][0], qkv[2], rtol=0, atol=0)
        with pytest.raises(ValueError, match=r"Q/K/V were not saved at step 0; saved steps: \[5\] \(--qkv-steps\)"):
            reader.qkv(0, 7)
    with pytest.raises(ValueError, match=r"`qkv_steps` \[3\] are not captured steps \[0, 5\]"):
        _layout(qkv_steps=(3,))


def test_float16_qkv_round_trip_and_overflow_refused(tmp_path):
    gen = torch.Generator().manual_seed(3)
    with _create(tmp_path / "h.h5", _layout(qkv_dtype="float16")) as writer:
        lay = writer.layout
        writer.begin_step(0)
        qkv = [torch.randn(2, lay.num_tokens, 8, generator=gen) for _ in range(3)]
        writer.write_qkv(7, "cond", *qkv)
        too_big = qkv[2] * 1e5
        with pytest.raises(ValueError, match=r"v of layer 7 exceeds the float16 range .* --qkv-dtype float32"):
            writer.write_qkv(7, "cond", qkv[0], qkv[1], too_big)
        _write_the_rest(writer, gen)
        writer.end_step()
    with CaptureReader(tmp_path / "h.h5") as reader:
        q, k, v = reader.qkv(0, 7)
        for got, want in zip((q, k, v), qkv):
            assert got.dtype == torch.float16
            torch.testing.assert_close(got[0].float(), want.half().float(), rtol=0, atol=0)


def test_stored_stats_to_block_stats_has_nan_lse(tmp_path):
    path = tmp_path / "c.h5"
    with _create(path) as writer:
        expected = _write_step(writer, 0, torch.Generator().manual_seed(4))
    with CaptureReader(path) as reader:
        stored = reader.block_stats(0, 7, "hilbert3d", head=[2])
    assert stored.heads == (2,)
    stats = stored.to_block_stats()
    want = expected[(7, "hilbert3d")][0]
    for name in ("m", "L", "r", "J"):
        assert getattr(stats, name) is getattr(stored, name)
        assert torch.equal(getattr(stats, name)[0, 0], want[name][1])
    assert stats.lse.shape == (1, 1, GRID.num_tokens) and stats.lse.dtype == torch.float32
    assert bool(torch.isnan(stats.lse).all())
    assert (stats.block, stats.seq_len) == (16, GRID.num_tokens) and stats.num_blocks == 3
    m = torch.rand(1, 2, 3, 3)
    with pytest.raises(ValueError, match=r"`m` must be a tensor \[B, H, Mq, Mk\] \(got torch.Size\(\[2, 3, 3\]\)\)"):
        StoredStats(m=m[0], L=m[0], r=m[0], J=m[0], block=16, seq_len=43)
    with pytest.raises(ValueError, match=r"`J` must be a tensor of the shape of `m` \[1, 2, 3, 3\]"):
        StoredStats(m=m, L=m, r=m, J=m[0], block=16, seq_len=43)


def test_reader_tells_a_locked_file_from_a_damaged_one(tmp_path):
    # an HDF5 signature followed by superblock version 7: h5py says "bad superblock version
    # number", which contains "lock" but is not a lock
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"\x89HDF\r\n\x1a\n\x07" + bytes(200))
    with pytest.raises(ValueError, match=r"is not a readable HDF5 file \(.*bad superblock version number"):
        CaptureReader(bad)
    # the message mapping itself (also where file locking is off)
    lock_error = BlockingIOError(11, "Unable to synchronously open file (unable to lock file, errno = 11, error message = "
                                     "'Resource temporarily unavailable')")
    assert "open for writing by a running capture" in _open_error_message(bad, lock_error)
    for text in ("Unable to synchronously open file (bad superblock version number)",
                 "Unable to synchronously open file (file signature not found)"):
        message = _open_error_message(bad, OSError(text))
        assert "is not a readable HDF5 file" in message and text in message and "running capture" not in message
    # h5py raises PermissionError for errno 13 (not produced here: the tests may run as root)
    denied = PermissionError(13, "Unable to synchronously open file (unable to open file: name = 'bad.h5', errno = 13, "
                                 "error message = 'Permission denied')")
    message = _open_error_message(bad, denied)
    assert "cannot be read: permission denied" in message and "not a readable HDF5" not in message
    path = tmp_path / "c.h5"
    _create(path).close()
    # a second process holds the file open for writing, as a running capture does
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, h5py; f = h5py.File(sys.argv[1], 'a'); print('open', flush=True); sys.stdin.read()",
         str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        if os.environ.get("HDF5_USE_FILE_LOCKING", "").upper() in ("FALSE", "0"):
            pytest.skip("HDF5 file locking is turned off (HDF5_USE_FILE_LOCKING); the mapping is tested above")
        with pytest.raises(CaptureBusy, match="is open for writing by a running capture; wait for it or copy the file"):
            CaptureReader(path)
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    with CaptureReader(path) as reader:  # readable again once the writer is gone
        assert reader.steps == []


# ----------------------------------------------------------------------------------------
# float16 maps (map_dtype)
# ----------------------------------------------------------------------------------------
def test_float16_maps_round_trip_to_the_float32_values_rounded(tmp_path):
    """The same maps written as float32 and as float16: the float16 file reads back (as float32
    tensors) the float32 file's maps rounded to float16, and validates."""
    paths = {dtype: tmp_path / f"{dtype}.h5" for dtype in ("float32", "float16")}
    for dtype, path in paths.items():
        with _create(path, _layout(map_dtype=dtype)) as writer:
            for step in (0, 5):
                _write_step(writer, step, torch.Generator().manual_seed(11 + step))
            writer.finish()
    with CaptureReader(paths["float32"]) as full, CaptureReader(paths["float16"]) as half:
        assert half.validate() == [] and half.layout.map_dtype == "float16" and full.layout.map_dtype == "float32"
        assert half.attrs["map_dtype"] == "float16"
        for name in ("m", "L", "r", "J", "scores"):
            assert half._f["steps"][step_key(0)][name].dtype == np.float16
        for step, layer, order, want, got in _stats_pairs(full, half):
            for name in ("m", "L", "r", "J"):
                assert getattr(got, name).dtype == torch.float32
                assert torch.equal(getattr(got, name), getattr(want, name).half().float())
            for method in ("meanpool", "dfs_tile"):
                scores = half.scores(step, layer, order, method)
                assert scores.dtype == torch.float32
                assert torch.equal(scores, full.scores(step, layer, order, method).half().float())
                # the curves are those of the maps as written, before their rounding to float16
                assert torch.equal(half.recall_curve(step, layer, order, method), full.recall_curve(step, layer, order, method))


def _stats_pairs(full, other):
    """(step, layer, order, stats of ``full``, stats of ``other``) of every map of two files of _layout()."""
    for step in (0, 5):
        for layer in (3, 7):
            for order in ("raster", "hilbert3d"):
                yield step, layer, order, full.block_stats(step, layer, order), other.block_stats(step, layer, order)


def test_float16_map_beyond_the_range_is_refused_and_the_step_not_kept(tmp_path):
    gen = torch.Generator().manual_seed(12)
    path = tmp_path / "big.h5"
    with _create(path, _layout(map_dtype="float16")) as writer:
        _write_step(writer, 0, gen)
        writer.begin_step(5)
        _write_the_rest(writer, gen)
        stats = _random_maps(gen)
        stats["L"] = stats["L"] * 1e5  # logits beyond +-65504
        writer.write_maps(7, "cond", "hilbert3d", stats, {m: torch.randn(2, 3, 3, generator=gen) for m in ("meanpool", "dfs_tile")},
                          torch.rand(2, generator=gen, dtype=torch.float64), torch.rand(2, generator=gen, dtype=torch.float64))
        with pytest.raises(ValueError, match=r"^step 5, layer 7, .*order hilbert3d, head \d: L has values beyond the float16 "
                                             r"range \(max \|x\| = [0-9.e+]+ > 65504\); nothing of this step was kept\. "
                                             r"Capture again with --map-dtype float32$"):
            writer.end_step()
    with CaptureReader(path) as reader:
        assert reader.steps == [0] and reader.validate() == []


def test_a_file_without_map_dtype_reads_as_float32(tmp_path):
    path = tmp_path / "old.h5"
    with _create(path) as writer:
        expected = _write_step(writer, 0, torch.Generator().manual_seed(13))
    with h5py.File(path, "r+") as f:
        assert f.attrs["map_dtype"] == "float32"
        del f.attrs["map_dtype"]  # as files of dfsviz before map_dtype
    with CaptureReader(path) as reader:
        assert reader.layout.map_dtype == "float32" and reader.validate() == []
        assert torch.equal(reader.block_mass(0, 3, "raster")[0], expected[(3, "raster")][0]["m"])


def test_map_dtype_must_be_a_storage_dtype():
    with pytest.raises(ValueError, match=r"`map_dtype` must be one of \['float32', 'float16', 'uint8'\] \(got 'bfloat16'\)"):
        _layout(map_dtype="bfloat16")


def test_float16_halves_the_maps_bytes_per_step():
    full, half = _layout(), _layout(map_dtype="float16")
    maps = sum(int(np.prod(full.shape(n))) for n in ("m", "L", "r", "J", "scores"))
    assert full.bytes_per_step(0) - half.bytes_per_step(0) == maps * 2


def test_heads_in_any_order_read_as_asked(tmp_path):
    """A head list reads only those heads' maps, in the order asked (repeats too), as the full read
    selects them."""
    gen = torch.Generator().manual_seed(4)
    path = tmp_path / "c.h5"
    with _create(path) as writer:
        _write_step(writer, 0, gen)
    with CaptureReader(path) as reader:
        full = reader.block_mass(0, 7, "hilbert3d")[0]  # heads [0, 2]
        for heads, rows in (([2, 0], [1, 0]), ([2], [1]), ([0, 2, 2], [0, 1, 1])):
            assert torch.equal(reader.block_mass(0, 7, "hilbert3d", head=heads)[0], full[rows])
            assert torch.equal(reader.scores(0, 7, "hilbert3d", "dfs_tile", head=heads)[0],
                               reader.scores(0, 7, "hilbert3d", "dfs_tile")[0][rows])
        q = reader.qkv(0, reader.layout.qkv_layers[0])[0][0]
        assert torch.equal(reader.qkv(0, reader.layout.qkv_layers[0], head=[2, 0])[0][0], q[[1, 0]])


# ----------------------------------------------------------------------------------------
# scores served from a statistic; 8-bit maps (map_dtype uint8)
# ----------------------------------------------------------------------------------------
def test_meanpool_and_oracle_scores_are_not_stored_twice(tmp_path):
    path = tmp_path / "c.h5"
    layout = _layout(methods=("meanpool", "dfs_tile", "oracle"))
    assert layout.score_methods == ("dfs_tile",)
    with _create(path, layout) as writer:
        expected = _write_step(writer, 0, torch.Generator().manual_seed(21))
    with h5py.File(path, "r") as f:
        group = f["steps"][step_key(0)]
        assert group["scores"].shape[3] == 1 and [v.decode() for v in group["method"][...]] == ["dfs_tile"]
        assert [v for v in f.attrs["score_methods"]] == ["dfs_tile"]
    with CaptureReader(path) as reader:
        assert reader.methods == ["meanpool", "dfs_tile", "oracle"] and reader.validate() == []
        stats = expected[(7, "hilbert3d")][0]
        assert torch.equal(reader.scores(0, 7, "hilbert3d", "meanpool")[0], stats["L"])
        assert torch.equal(reader.scores(0, 7, "hilbert3d", "oracle", head=2)[0, 0], stats["m"][1])


def test_a_file_that_stored_meanpool_reads_its_stored_scores(tmp_path):
    """Files written before the scores were served from L hold a meanpool dataset (and no
    `score_methods` attribute): its values are what the reader returns, not L."""
    path = tmp_path / "old.h5"
    with _create(path, _layout(stored_scores=("meanpool", "dfs_tile"))) as writer:
        expected = _write_step(writer, 0, torch.Generator().manual_seed(22))
    with h5py.File(path, "r+") as f:
        del f.attrs["score_methods"]  # as files of dfsviz before score_methods
    with CaptureReader(path) as reader:
        assert reader.layout.score_methods == ("meanpool", "dfs_tile") and reader.validate() == []
        for (layer, order), (stats, scores, *_) in ((k, v) for k, v in expected.items() if k != "qkv"):
            got = reader.scores(0, layer, order, "meanpool")[0]
            assert torch.equal(got, scores["meanpool"]) and not torch.equal(got, stats["L"])


def test_the_shipped_sample_serves_its_stored_meanpool_scores():
    import dfsviz

    with CaptureReader(dfsviz.sample_capture()) as reader:
        assert "meanpool" in reader.layout.score_methods
        mi = reader.layout.score_methods.index("meanpool")
        stored = torch.from_numpy(reader._f["steps"][step_key(13)]["scores"][2, 0, 1, mi])
        assert torch.equal(reader.scores(13, 2, "hilbert3d", "meanpool")[0], stored)


def _uint8_pair(tmp_path, methods=("meanpool", "dfs_tile")):
    """The same random maps written as float32 and as uint8: (float32 reader, uint8 reader)."""
    paths = {dtype: tmp_path / f"{dtype}.h5" for dtype in ("float32", "uint8")}
    for dtype, path in paths.items():
        with _create(path, _layout(map_dtype=dtype, methods=methods)) as writer:
            for step in (0, 5):
                _write_step(writer, step, torch.Generator().manual_seed(31 + step))
            writer.finish()
    return CaptureReader(paths["float32"]), CaptureReader(paths["uint8"])


def _row_range(x: torch.Tensor) -> torch.Tensor:
    return x.amax(-1, keepdim=True) - x.amin(-1, keepdim=True)


def test_uint8_maps_round_trip_within_the_documented_error(tmp_path):
    """Each map row is stored as value = offset + scale x code, code 0..255 (docs/format.md): m
    within one step of 1/K_u (K_u = floor(255 / row max)) with rows summing to 1, L and the
    scores within half a step of their row's range / 255, r and J rounded up by at most a step
    (r also by L's largest rounding in the row)."""
    full, small = _uint8_pair(tmp_path, methods=("meanpool", "dfs_tile", "antidiagonal"))
    slack = 1e-6
    with full, small:
        assert small.validate() == [] and small.layout.map_dtype == "uint8"
        group = small._f["steps"][step_key(0)]
        for name in ("m", "L", "r", "J", "scores"):
            assert group[name].dtype == np.uint8 and group[f"{name}_affine"].dtype == np.float32
            assert group[f"{name}_affine"].shape == (*group[name].shape[:-1], 2)
        for step, layer, order, want, got in _stats_pairs(full, small):
            for name in ("m", "L", "r", "J"):
                assert getattr(got, name).dtype == torch.float32
            m, m8 = want.m.double(), got.m.double()
            k = torch.floor(255 / m.amax(-1, keepdim=True))
            assert bool(((m8 - m).abs() < 1 / k + slack).all())
            assert bool(((m8.sum(-1) - 1).abs() < 1e-5).all())
            big_l, big_l8 = want.L.double(), got.L.double()
            assert bool(((big_l8 - big_l).abs() <= _row_range(big_l) / 510 + slack).all())
            shift = (big_l8 - big_l).abs().amax(-1, keepdim=True)  # L's largest rounding in the row
            r_up = got.r.double() - (want.r.double() + shift)
            assert bool((r_up >= 0).all()) and bool((r_up <= _row_range(want.r.double() + shift) / 255 + slack).all())
            j_up = got.J.double() - want.J.double()
            assert bool((j_up >= 0).all()) and bool((j_up <= _row_range(want.J.double()) / 255 + slack).all())
            for method in ("dfs_tile", "antidiagonal"):
                s, s8 = full.scores(step, layer, order, method).double(), small.scores(step, layer, order, method).double()
                assert bool(((s8 - s).abs() <= _row_range(s) / 510 + slack).all())
            assert torch.equal(small.scores(step, layer, order, "meanpool"), got.L)
            for method in small.methods:  # the curves of the maps as written, before their 8-bit coding
                assert torch.equal(small.recall_curve(step, layer, order, method), full.recall_curve(step, layer, order, method))


def test_uint8_maps_only_lower_bounds_2_and_3(tmp_path):
    """r and J rounded up (r by L's rounding as well): Bounds 2 and 3 computed from the stored
    maps are at most those of the exact maps for every mask, so they stay lower bounds of recall."""
    from dfsviz.sparse.select import select_topk
    from dfsviz.sparse.theory import bound3, recall_bound

    full, small = _uint8_pair(tmp_path)
    with full, small:
        for step, layer, order, want, got in _stats_pairs(full, small):
            exact, coded = want.to_block_stats(), got.to_block_stats()
            for gamma in (0.34, 0.67):
                mask = select_topk(full.scores(step, layer, order, "dfs_tile"), gamma, seq_len=GRID.num_tokens, block=16)
                assert bool((recall_bound(coded, mask) <= recall_bound(exact, mask) + 1e-12).all())
                assert bool((bound3(coded, mask) <= bound3(exact, mask) + 1e-12).all())


def test_uint8_shrinks_the_maps_and_adds_two_floats_per_row():
    full, small = _layout(), _layout(map_dtype="uint8")
    names = ("m", "L", "r", "J", "scores")
    values = sum(int(np.prod(full.shape(n))) for n in names)
    rows = sum(int(np.prod(full.shape(n)[:-1])) for n in names)
    assert full.bytes_per_step(0) - small.bytes_per_step(0) == values * 3 - rows * 2 * 4


def test_a_uint8_map_with_a_damaged_scale_fails_validation(tmp_path):
    full, small = _uint8_pair(tmp_path)
    full.close()
    small.close()
    path = tmp_path / "uint8.h5"
    with h5py.File(path, "r+") as f:
        affine = f["steps"][step_key(5)]["m_affine"]
        damaged = affine[1, 0, 0, 1]
        damaged[:, 1] *= 2  # every row of that map now sums to about 2
        affine[1, 0, 0, 1] = damaged
    with CaptureReader(path) as reader:
        problems = reader.validate()
    assert len(problems) == 1 and problems[0].startswith("step_0005/m[layer 7, branch cond, order raster, head 2]: rows do not sum to 1")


def test_resume_of_a_file_that_stored_meanpool_says_which_dfsviz_finishes_it(tmp_path):
    path = tmp_path / "old.h5"
    with _create(path, _layout(stored_scores=("meanpool", "dfs_tile"))) as writer:
        _write_step(writer, 0, torch.Generator().manual_seed(23))
    with pytest.raises(ValueError, match=r"--resume: '.*old\.h5' stores the scores of \['meanpool', 'dfs_tile'\], as the "
                                         r"dfsviz [0-9.]+ that started it did; .* finish it with that dfsviz, or pass --overwrite"):
        CaptureWriter.resume(path, _layout(), CONFIG)


def test_stored_scores_must_list_every_method_without_a_statistic_in_order():
    assert _layout(stored_scores=("dfs_tile",)).stored_scores is None  # the default, however given
    for stored in (("dfs_tile", "meanpool"), ("meanpool",)):
        with pytest.raises(ValueError, match=r"`stored_scores` \[.*\] must list, in the order of `methods` \['meanpool', "
                                             r"'dfs_tile'\], every method besides \['meanpool', 'oracle'\]"):
            _layout(stored_scores=stored)


def test_the_8_bit_coder_refuses_what_it_cannot_code():
    from dfsviz.capture.codes import encode_maps

    x = np.zeros((3, 3), dtype=np.float32)
    with pytest.raises(ValueError, match=r"r is coded with L's rounding: pass L with it"):
        encode_maps([("r", x)])
    with pytest.raises(ValueError, match=r"`footprint` is not a map of 8-bit storage; maps are m, L, r, J and scores"):
        encode_maps([("footprint", x)])


# ----------------------------------------------------------------------------------------
# recall curves (recall)
# ----------------------------------------------------------------------------------------
def test_recall_curves_of_every_method_are_stored_under_their_dims(tmp_path):
    """One float32 curve [k = 1..Mk] per (layer, branch, order, method, head), for every method of the
    file, meanpool (score L) and the oracle (score m) included though `scores` holds neither."""
    path = tmp_path / "c.h5"
    layout = _layout(methods=("meanpool", "dfs_tile", "oracle"))
    with _create(path, layout) as writer:
        expected = _write_step(writer, 0, torch.Generator().manual_seed(41))
    with h5py.File(path, "r") as f:
        assert bool(f.attrs["stored_recall"])
        group = f["steps"][step_key(0)]
        recall = group["recall"]
        assert recall.dtype == np.float32 and recall.shape == (2, 1, 2, 3, 2, 3)
        assert list(recall.attrs["dims"]) == ["layer", "branch", "order", "recall_method", "head", "kept_blocks"]
        assert [d.label for d in recall.dims] == list(recall.attrs["dims"])
        assert [v.decode() for v in group["recall_method"][...]] == ["meanpool", "dfs_tile", "oracle"]
        assert list(group["kept_blocks"][...]) == [1, 2, 3]
        assert recall.chunks == (1, 1, 1, 1, 2, 3)  # the curves of every head of one (layer, branch, order, method)
    with CaptureReader(path) as reader:
        assert reader.stored_recall and reader.validate() == []
        assert_stored_curves_match_the_maps(reader)
        stats = expected[(7, "hilbert3d")][0]
        oracle = reader.recall_curve(0, 7, "hilbert3d", "oracle")[0].double()
        # the oracle keeps each row's largest masses: R*(k), at or above every method's curve
        weights = torch.tensor([16, 16, 11], dtype=torch.float64) / 43
        best = torch.sort(stats["m"].double(), dim=-1, descending=True).values.cumsum(-1)
        torch.testing.assert_close(oracle, torch.einsum("huk,u->hk", best, weights), rtol=0, atol=1e-6)
        for method in ("meanpool", "dfs_tile"):
            assert bool((reader.recall_curve(0, 7, "hilbert3d", method)[0] <= oracle + 1e-6).all())
        torch.testing.assert_close(oracle[:, -1], torch.ones(2, dtype=torch.float64), rtol=0, atol=1e-6)
        with pytest.raises(ValueError, match=r"`method` must be one of \['meanpool', 'dfs_tile', 'oracle'\] \(got 'antidiagonal'\)"):
            reader.recall_curve(0, 7, "hilbert3d", "antidiagonal")
        with pytest.raises(ValueError, match=r"`head` must be one of \[0, 2\] \(got 1\)"):
            reader.recall_curve(0, 7, "hilbert3d", "oracle", head=1)
        with pytest.raises(ValueError, match=r"`step` 5 is not a completed step of this capture"):
            reader.recall_curve(5, 7, "hilbert3d", "oracle")


def _strip_curves(path) -> None:
    """Make ``path`` a file of dfsviz before recall curves: no `recall` or `density` datasets, `kept_blocks`
    and `recall_method` scales, or `stored_recall` attribute."""
    with h5py.File(path, "r+") as f:
        del f.attrs["stored_recall"]
        for group in f["steps"].values():
            for name in ("recall", "density", "recall_method", "kept_blocks"):
                del group[name]


def test_a_file_without_recall_curves_reads_as_before(tmp_path):
    path = tmp_path / "old.h5"
    with _create(path) as writer:
        expected = _write_step(writer, 0, torch.Generator().manual_seed(42))
    _strip_curves(path)
    with CaptureReader(path) as reader:
        assert not reader.stored_recall and not reader.layout.stored_recall and reader.validate() == []
        assert not {"recall", "density"} & set(reader.layout.datasets(0)) and reader.summary()["stored_recall"] is False
        assert torch.equal(reader.block_mass(0, 3, "raster")[0], expected[(3, "raster")][0]["m"])
        with pytest.raises(ValueError, match=r"'.*old\.h5' stores no recall curves \(no `stored_recall`: written before "
                                             r"captures stored them\): recompute them from the maps with "
                                             r"dfsviz\.analysis\.recall_curve\(.*\), or capture the run again"):
            reader.recall_curve(0, 3, "raster", "dfs_tile")


def test_the_format_v1_fixture_has_no_recall_curves():
    from pathlib import Path

    fixture = Path(__file__).resolve().parents[1] / "data" / "format_v1.h5"
    with CaptureReader(fixture) as reader:
        assert not reader.stored_recall and reader.validate() == []
        with pytest.raises(ValueError, match=r"format_v1\.h5' stores no recall curves"):
            reader.recall_curve(1, 1, "hilbert3d", "dfs_tile")
        with pytest.raises(ValueError, match=r"format_v1\.h5' stores no recall curves"):
            reader.density_curve(1, 1, "hilbert3d", "dfs_tile")
        with pytest.raises(ValueError, match=r"format_v1\.h5' stores no recall curves"):
            reader.step_curves(1, "hilbert3d")


def test_resume_of_a_file_without_curves_continues_it_without_them(tmp_path):
    """An interrupted capture that an older dfsviz started keeps its layout: its remaining steps are
    written without curves, so the file stays one format (`stored_recall` false) and reads as such."""
    gen = torch.Generator().manual_seed(43)
    path = tmp_path / "old.h5"
    writer = _create(path)
    _write_step(writer, 0, gen)
    writer.close()
    _strip_curves(path)
    writer = CaptureWriter.resume(path, _layout(), CONFIG)
    assert not writer.layout.stored_recall
    _write_step(writer, 5, gen)
    writer.finish()
    writer.close()
    with CaptureReader(path) as reader:
        assert reader.complete and reader.steps == [0, 5] and not reader.stored_recall and reader.validate() == []
        assert "recall" not in reader._f["steps"][step_key(5)]


@pytest.mark.parametrize(
    ("curve", "match"),
    [
        ([0.5, np.nan, 1.0], r"^1 non-finite value \(NaN/inf\)$"),
        ([0.5, 0.9, 1.25], r"^outside \[0, 1\] \(1\.25 at k = 3\)$"),
        ([[0.5, 0.9, 1.0], [-0.1, 0.9, 1.0]], r"^outside \[0, 1\] \(curve 1: -0\.1 at k = 1\)$"),
        ([0.6, 0.5, 1.0], r"^decreases with k \(0\.6 at k = 1, 0\.5 at k = 2\)$"),
        ([[[0.2, 0.5, 1.0]], [[0.2, 0.4, 0.6]]], r"^not 1 with every block kept \(curve \(1, 0\): 0\.6 at k = Mk = 3\)$"),
    ],
)
def test_damaged_recall_curves_are_named(curve, match):
    assert re.search(match, map_problem("recall", np.array(curve, dtype=np.float32), 3))


def test_recall_curves_within_the_rounding_of_m_pass():
    # m's rows may miss 1 by its row-sum tolerance (1e-3): so may the curves, and dip by as much
    assert map_problem("recall", np.array([[0.5, 0.4995, 1.0009]], dtype=np.float32), 3) is None
    assert map_problem("recall", np.array([0.1, 0.7, 0.9991], dtype=np.float32), 3) is None

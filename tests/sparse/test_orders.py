"""Token orders: bijections, exact round trips, text in place, curve continuity, locality
against brute force and the reference numbers, the Morton and brick definitions, errors."""

import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dfsviz.sparse.grid import LatentGrid
from dfsviz.sparse.orders import (
    ORDERS,
    TokenOrder,
    gilbert_curve,
    locality_report,
    make_order,
    order_names,
)

NAMES = order_names()
PROPERTY = settings(max_examples=40, deadline=None)

sizes = st.integers(1, 9)
grids = st.builds(LatentGrid, sizes, sizes, sizes, st.integers(0, 5), st.booleans())


def _fyx(grid: LatentGrid, video_perm: torch.Tensor) -> np.ndarray:
    """(frame, row, col) of the video tokens in ordered position, computed without dfsviz."""
    v = video_perm.numpy()
    hw = grid.height * grid.width
    return np.stack([v // hw, v % hw // grid.width, v % grid.width], axis=1)


def _steps(coords: np.ndarray) -> np.ndarray:
    """|difference| of consecutive coordinates, int [n-1, ndim]."""
    return np.abs(np.diff(np.asarray(coords), axis=0))


def test_registry_names_and_factories():
    assert NAMES == ["raster", "hilbert3d", "hilbert2d", "morton3d", "tiled"]
    assert set(ORDERS) == set(NAMES)


# --- every order: bijection, exact round trip, text in place --------------------------


@pytest.mark.parametrize("name", NAMES)
@PROPERTY
@given(grid=grids)
def test_order_is_a_bijection_with_exact_inverse_and_text_in_place(name, grid):
    video = ORDERS[name](grid)
    assert video.dtype == torch.int64 and video.shape == (grid.num_video,)
    assert torch.equal(torch.sort(video).values, torch.arange(grid.num_video))

    order = make_order(name, grid)
    n = grid.num_tokens
    assert order.perm.shape == order.inv.shape == (n,)
    assert torch.equal(order.inv[order.perm], torch.arange(n))
    assert torch.equal(order.perm[order.inv], torch.arange(n))
    assert torch.equal(order.perm[grid.text_slice], torch.arange(n)[grid.text_slice])
    assert torch.equal(order.perm[grid.video_slice], video + grid.video_start)
    assert torch.equal(order.video_perm, video)

    x = torch.randn(2, 3, n, 4)
    ordered = order.apply(x)
    assert torch.equal(ordered, x[:, :, order.perm])
    assert torch.equal(order.restore(ordered), x)
    # the default dim is 2 of [B, H, N, D]; other dims work the same
    y = torch.randn(n, 5)
    assert torch.equal(order.restore(order.apply(y, dim=0), dim=-2), y)
    assert torch.equal(order.apply(y, dim=0)[grid.text_slice], y[grid.text_slice])


@pytest.mark.parametrize("text_first", [False, True])
def test_text_tokens_keep_their_place_on_a_real_grid(text_first):
    grid = LatentGrid(13, 24, 40, text_len=226, text_first=text_first)
    order = make_order("hilbert3d", grid)
    tokens = torch.arange(grid.num_tokens, dtype=torch.float64)[None, None, :, None]
    ordered = order.apply(tokens)[0, 0, :, 0]
    assert torch.equal(ordered[grid.text_slice], tokens[0, 0, grid.text_slice, 0])
    video = range(grid.video_start, grid.video_start + grid.num_video)
    assert set(ordered[grid.video_slice].long().tolist()) == set(video)


def test_make_order_is_cached_and_keyed():
    grid = LatentGrid(33, 45, 80, text_len=256)
    start = time.perf_counter()
    first = make_order("hilbert3d", grid)
    cold = time.perf_counter() - start
    start = time.perf_counter()
    again = make_order("hilbert3d", LatentGrid(33, 45, 80, text_len=256))
    warm = time.perf_counter() - start
    assert again is first
    assert first.key == "hilbert3d_f33h45w80t256"
    assert cold < 3.0, f"building hilbert3d for 33x45x80 took {cold:.2f} s"
    assert warm < 0.01, f"cached make_order took {warm:.4f} s"


def test_perm_on_returns_the_permutation_on_the_device():
    order = make_order("hilbert3d", LatentGrid(3, 4, 5))
    on = order.perm_on("cpu")
    assert on.device == torch.device("cpu") and on.dtype == torch.int64
    assert torch.equal(on, order.perm)
    small = order.perm_on("cpu", torch.int32)  # the kernels' index dtype, cached apart
    assert small.dtype == torch.int32 and torch.equal(small.long(), order.perm)
    assert order.perm_on("cpu", torch.int32) is small and order.perm_on("cpu") is on


def test_apply_reuses_the_index_per_device():
    order = make_order("tiled", LatentGrid(2, 4, 4))
    x = torch.randn(1, 1, 32, 2)
    order.apply(x)
    cached = order._on_device[("perm", x.device, torch.int64)]
    order.apply(x)
    assert order._on_device[("perm", x.device, torch.int64)] is cached


# --- the generalized Hilbert curves ----------------------------------------------------


@PROPERTY
@given(shape=st.tuples(*[st.integers(1, 12)] * 3) | st.tuples(st.integers(1, 30), st.integers(1, 30)))
def test_gilbert_curve_visits_every_cell_with_at_most_one_forced_diagonal(shape):
    coords = gilbert_curve(shape).numpy()
    assert coords.shape == (int(np.prod(shape)), len(shape))
    assert len({tuple(c) for c in coords}) == coords.shape[0]
    assert (coords >= 0).all() and (coords < np.array(shape)).all()
    assert tuple(coords[0]) == (0,) * len(shape)
    if coords.shape[0] == 1:
        return
    steps = _steps(coords)
    diagonal = int((steps.sum(axis=1) > 1).sum())
    assert steps.max() == 1, "every step changes each coordinate by at most 1"
    assert steps.sum(axis=1).max() <= 2 and diagonal <= 1
    cells = int(np.prod(shape))
    if shape[0] % 2 == 0 or cells % 2 == 1:
        assert diagonal == 0, "face steps only when the checkerboard colouring allows it"
    if min(shape) > 1:
        if len(shape) == 2 and shape[1] == 2 and shape[0] % 2 == 1:
            # odd x 2 strips end one column early, which needs no diagonal
            assert tuple(coords[-1]) == (shape[0] - 2, 0) and diagonal == 0
        else:
            # the curve travels along axis 0; start and end share a colour iff shape[0] is
            # odd, so an even cell count then forces exactly one diagonal step
            assert tuple(coords[-1]) == (shape[0] - 1,) + (0,) * (len(shape) - 1)
            assert diagonal == int(shape[0] % 2 == 1 and cells % 2 == 0)


@pytest.mark.parametrize("side", [2, 4, 8])
def test_gilbert_curve_on_a_power_of_two_cube_is_a_hilbert_curve(side):
    coords = gilbert_curve((side, side, side)).numpy()
    # Hilbert property: every run of 8^k consecutive cells fills an aligned cube of side 2^k
    k = 1
    while 2**k <= side:
        run = 8**k
        for start in range(0, side**3, run):
            chunk = coords[start : start + run]
            lo, hi = chunk.min(axis=0), chunk.max(axis=0)
            assert (hi - lo + 1 == 2**k).all() and (lo % 2**k == 0).all()
        k += 1
    assert _steps(coords).sum(axis=1).max() == 1


def test_gilbert_curve_on_a_power_of_two_square_is_a_hilbert_curve():
    coords = gilbert_curve((16, 16)).numpy()
    for size in (4, 16, 64):
        for start in range(0, 256, size):
            chunk = coords[start : start + size]
            side = int(round(size**0.5))
            assert ((chunk.max(axis=0) - chunk.min(axis=0) + 1) == side).all()


@PROPERTY
@given(grid=grids)
def test_hilbert3d_is_continuous_up_to_one_forced_diagonal(grid):
    coords = _fyx(grid, ORDERS["hilbert3d"](grid))
    if grid.num_video == 1:
        return
    steps = _steps(coords)
    assert steps.max() == 1
    assert int((steps.sum(axis=1) > 1).sum()) <= 1
    if max(grid.frames, grid.height, grid.width) % 2 == 0 or grid.num_video % 2 == 1:
        assert steps.sum(axis=1).max() == 1


@pytest.mark.parametrize("dims", [(21, 45, 80), (21, 30, 52), (33, 45, 80), (13, 24, 40)])
def test_hilbert3d_has_no_jump_on_dit_grids(dims):
    coords = _fyx(LatentGrid(*dims), ORDERS["hilbert3d"](LatentGrid(*dims)))
    assert _steps(coords).sum(axis=1).max() == 1


@PROPERTY
@given(grid=grids)
def test_hilbert2d_walks_each_frame_continuously_frames_in_order(grid):
    coords = _fyx(grid, ORDERS["hilbert2d"](grid))
    per_frame = grid.frame_tokens
    assert (coords[:, 0] == np.repeat(np.arange(grid.frames), per_frame)).all()
    first = coords[:per_frame, 1:]
    for f in range(grid.frames):
        frame = coords[f * per_frame : (f + 1) * per_frame, 1:]
        assert (frame == first).all(), "every frame uses the same curve"
    if per_frame > 1:
        steps = _steps(first)
        assert steps.max() == 1 and int((steps.sum(axis=1) > 1).sum()) <= 1
        if max(grid.height, grid.width) % 2 == 0 or per_frame % 2 == 1:
            assert steps.sum(axis=1).max() == 1


def test_hilbert2d_on_a_power_of_two_frame_fills_aligned_squares():
    coords = _fyx(LatentGrid(2, 8, 8), ORDERS["hilbert2d"](LatentGrid(2, 8, 8)))
    for start in range(0, 128, 16):
        chunk = coords[start : start + 16, 1:]
        assert ((chunk.max(axis=0) - chunk.min(axis=0)) == 3).all() and (chunk.min(axis=0) % 4 == 0).all()


# --- Morton and bricks against their definitions ---------------------------------------


def _morton_cells(bits: int) -> list[tuple[int, int, int]]:
    """Cells of the 2^bits cube in Z-order: bit i of (f, y, x) at key bits 3i+2, 3i+1, 3i."""
    cells = []
    for key in range(8**bits):
        f = sum(((key >> (3 * i + 2)) & 1) << i for i in range(bits))
        y = sum(((key >> (3 * i + 1)) & 1) << i for i in range(bits))
        x = sum(((key >> (3 * i)) & 1) << i for i in range(bits))
        cells.append((f, y, x))
    return cells


@pytest.mark.parametrize("side", [2, 4, 8])
def test_morton3d_on_a_power_of_two_cube_is_bit_interleaving(side):
    grid = LatentGrid(side, side, side)
    bits = side.bit_length() - 1
    expected = [(f * side + y) * side + x for f, y, x in _morton_cells(bits)]
    assert torch.equal(ORDERS["morton3d"](grid), torch.tensor(expected))


@pytest.mark.parametrize("dims", [(3, 5, 6), (1, 7, 2), (5, 1, 1)])
def test_morton3d_skips_cells_outside_the_grid(dims):
    grid = LatentGrid(*dims)
    f_, h_, w_ = dims
    bits = max(1, (max(dims) - 1).bit_length())
    expected = [(f * h_ + y) * w_ + x for f, y, x in _morton_cells(bits) if f < f_ and y < h_ and x < w_]
    assert torch.equal(ORDERS["morton3d"](grid), torch.tensor(expected))


@pytest.mark.parametrize("dims", [(4, 8, 8), (6, 7, 9), (1, 3, 5)])
def test_tiled_is_raster_of_4x4x4_bricks(dims):
    grid = LatentGrid(*dims)
    f_, h_, w_ = dims
    expected = []
    for bf in range(0, f_, 4):
        for by in range(0, h_, 4):
            for bx in range(0, w_, 4):
                for f in range(bf, min(bf + 4, f_)):
                    for y in range(by, min(by + 4, h_)):
                        for x in range(bx, min(bx + 4, w_)):
                            expected.append((f * h_ + y) * w_ + x)
    assert torch.equal(ORDERS["tiled"](grid), torch.tensor(expected))


def test_tiled_full_bricks_are_64_token_cubes():
    grid = LatentGrid(8, 8, 12)
    coords = _fyx(grid, ORDERS["tiled"](grid))
    for start in range(0, grid.num_video, 64):
        chunk = coords[start : start + 64]
        assert ((chunk.max(axis=0) - chunk.min(axis=0)) == 3).all()


def test_raster_is_the_identity():
    grid = LatentGrid(3, 4, 5, text_len=2)
    assert torch.equal(make_order("raster", grid).perm, torch.arange(grid.num_tokens))


# --- locality ---------------------------------------------------------------------------


def _brute_locality(grid: LatentGrid, video_perm: torch.Tensor, block: int) -> dict:
    coords = _fyx(grid, video_perm).astype(np.float64)
    boxes, spreads, frames, runs = [], [], [], []
    for start in range(0, len(coords), block):
        chunk = coords[start : start + block]
        positions = sorted(video_perm[start : start + block].tolist())
        runs.append(1 + sum(b != a + 1 for a, b in zip(positions, positions[1:])))
        boxes.append(np.prod(chunk.max(axis=0) - chunk.min(axis=0) + 1))
        centre = chunk.mean(axis=0)
        spreads.append(np.mean([np.sum((c - centre) ** 2) for c in chunk]))
        frames.append(len(set(chunk[:, 0].tolist())))
    jumps = [np.abs(a - b).sum() for a, b in zip(coords[:-1], coords[1:])]
    return {
        "blocks": len(boxes),
        "bbox_volume": float(np.mean(boxes)),
        "sq_spread": float(np.mean(spreads)),
        "frames_per_block": float(np.mean(frames)),
        "raster_runs": float(np.mean(runs)),
        "max_jump": int(max(jumps, default=0)),
    }


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(("dims", "block"), [((5, 7, 9), 16), ((3, 10, 13), 32), ((1, 1, 20), 16)])
def test_locality_report_matches_brute_force(name, dims, block):
    grid = LatentGrid(*dims, text_len=3)
    order = make_order(name, grid)
    report = locality_report(order, block=block)
    expected = _brute_locality(grid, order.video_perm, block)
    assert report["order"] == name
    assert report["blocks"] == expected["blocks"] == -(-grid.num_video // block)
    assert report["max_jump"] == expected["max_jump"]
    for key in ("bbox_volume", "sq_spread", "frames_per_block", "raster_runs"):
        assert report[key] == pytest.approx(expected[key], rel=1e-12), key


def test_raster_runs_of_tiled_bricks_are_their_rows():
    # a 4 x 4 x 4 brick of tiled lies in 16 runs of 4 raster positions (4 rows in each of 4 frames)
    report = locality_report(make_order("tiled", LatentGrid(8, 8, 12)), block=64)
    assert report["raster_runs"] == 16.0
    assert locality_report(make_order("raster", LatentGrid(8, 8, 12)), block=64)["raster_runs"] == 1.0


def test_raster_locality_on_wan_matches_brute_force_and_the_reference_table():
    grid = LatentGrid(21, 45, 80)
    report = locality_report(make_order("raster", grid), block=128)
    expected = _brute_locality(grid, torch.arange(grid.num_video), 128)
    for key in ("bbox_volume", "sq_spread", "frames_per_block", "raster_runs"):
        assert report[key] == pytest.approx(expected[key], rel=1e-12), key
    # the locality table of the DFSAttn analysis for raster blocks on Wan: 591 blocks, bbox 404.9,
    # 1.03 frames, spread 528.7, jump 124
    assert report["blocks"] == 591
    assert report["bbox_volume"] == pytest.approx(404.9, abs=0.05)
    assert report["sq_spread"] == pytest.approx(528.7, abs=0.05)
    assert report["frames_per_block"] == pytest.approx(1.03, abs=0.005)
    # raster's largest step: end of one frame (row 44, col 79) to the next frame's origin
    assert report["max_jump"] == expected["max_jump"] == 1 + 44 + 79


def test_hilbert3d_locality_targets_on_wan():
    grid = LatentGrid(21, 45, 80)
    reports = {name: locality_report(make_order(name, grid), block=128) for name in NAMES}
    spread = {name: r["sq_spread"] for name, r in reports.items()}
    # the reference code's Skilling-Hilbert order reaches 9.69 here
    assert spread["hilbert3d"] <= 9.7
    assert spread["hilbert3d"] == min(spread.values())
    for other in ("raster", "hilbert2d", "tiled", "morton3d"):
        assert spread["hilbert3d"] < spread[other]
        assert reports["hilbert3d"]["bbox_volume"] < reports[other]["bbox_volume"]
    assert reports["hilbert3d"]["max_jump"] == 1
    # the other orders reproduce the reference code's numbers
    assert spread["hilbert2d"] == pytest.approx(59.4, abs=0.05)
    assert reports["hilbert2d"]["bbox_volume"] == pytest.approx(228.7, abs=0.05)
    assert spread["tiled"] == pytest.approx(83.0, abs=0.05)
    assert reports["tiled"]["bbox_volume"] == pytest.approx(346.8, abs=0.05)
    assert reports["tiled"]["frames_per_block"] == pytest.approx(3.87, abs=0.005)


def test_hilbert3d_blocks_are_exact_bricks_on_a_power_of_two_cube():
    report = locality_report(make_order("hilbert3d", LatentGrid(16, 16, 16)), block=128)
    # 128 = 4 x 4 x 8 aligned cells: variance (s^2 - 1) / 12 per axis
    assert report["bbox_volume"] == 128
    assert report["sq_spread"] == pytest.approx(2 * 15 / 12 + 63 / 12)


# --- errors -------------------------------------------------------------------------------


def test_make_order_errors():
    grid = LatentGrid(2, 2, 2)
    names = r"raster, hilbert3d, hilbert2d, morton3d, tiled"
    with pytest.raises(ValueError, match=rf"`name` must be one of {names} \(got 'zorder'\)"):
        make_order("zorder", grid)
    with pytest.raises(ValueError, match=r"`name` must be one of .* \(got \['raster'\]\)"):
        make_order(["raster"], grid)
    with pytest.raises(TypeError, match=r"`grid` must be a LatentGrid \(got str\); use LatentGrid.parse"):
        make_order("raster", "21x45x80")


def test_token_order_validation_errors():
    grid = LatentGrid(2, 2, 2, text_len=2)
    ok = torch.arange(10)
    with pytest.raises(ValueError, match=r"`name` must be a non-empty str \(got ''\)"):
        TokenOrder("", grid, ok, ok)
    with pytest.raises(TypeError, match=r"`grid` must be a LatentGrid \(got tuple\)"):
        TokenOrder("x", (2, 2, 2), ok, ok)
    with pytest.raises(TypeError, match=r"`perm` must be a torch.Tensor of int64 \[N\] \(got list\)"):
        TokenOrder("x", grid, list(range(10)), ok)
    wrong = r"must be int64 \[N\] with N = 10 for this grid \(got "
    with pytest.raises(ValueError, match=r"`inv` " + wrong + r"torch.int32 \(10,\)\)"):
        TokenOrder("x", grid, ok, ok.int())
    with pytest.raises(ValueError, match=r"`perm` " + wrong + r"torch.int64 \(8,\)\)"):
        TokenOrder("x", grid, torch.arange(8), ok)
    duplicate = ok.clone()
    duplicate[1] = 0
    with pytest.raises(ValueError, match=r"`perm` must be a permutation of 0..N-1 and `inv` its inverse"):
        TokenOrder("x", grid, duplicate, ok)
    with pytest.raises(ValueError, match=r"`perm` must be a permutation"):
        TokenOrder("x", grid, ok + 1, ok)
    moved = torch.tensor([0, 1, 2, 3, 4, 5, 6, 8, 7, 9])
    with pytest.raises(ValueError, match=r"`perm` must leave the 2 text tokens at positions 8..9 in place"):
        TokenOrder("x", grid, moved, moved)
    assert TokenOrder("x", grid, ok, ok).key == "x_f2h2w2t2"


def test_from_video_perm_errors():
    grid = LatentGrid(1, 2, 2)
    with pytest.raises(TypeError, match=r"`grid` must be a LatentGrid \(got NoneType\)"):
        TokenOrder.from_video_perm("x", None, torch.arange(4))
    with pytest.raises(ValueError, match=r"`video_perm` must be int64 \[N\] with N = 4"):
        TokenOrder.from_video_perm("x", grid, torch.arange(5))
    message = r"`video_perm` must hold raster video indices in \[0, 3\] \(got values from 1 to 4\)"
    with pytest.raises(ValueError, match=message):
        TokenOrder.from_video_perm("x", grid, torch.arange(1, 5))


def test_apply_and_restore_errors():
    order = make_order("hilbert3d", LatentGrid(2, 3, 4))
    with pytest.raises(TypeError, match=r"`x` must be a torch.Tensor \(got ndarray\)"):
        order.apply(np.zeros((1, 1, 24, 2)))
    with pytest.raises(ValueError, match=r"`dim` must be an int in \[-4, 3\] for a 4-D tensor \(got 4\)"):
        order.apply(torch.zeros(1, 1, 24, 2), dim=4)
    message = r"`x.shape\[dim\]` = 23 tokens does not match grid 2x3x4 with 0 text tokens \(expects 24\)"
    with pytest.raises(ValueError, match=message):
        order.restore(torch.zeros(1, 1, 23, 2))


def test_locality_report_errors():
    order = make_order("raster", LatentGrid(2, 3, 4))
    with pytest.raises(TypeError, match=r"`order` must be a TokenOrder \(got str\); use make_order"):
        locality_report("raster")
    for bad in (96, 8, 512, 128.0, True):
        with pytest.raises(ValueError, match=r"`block` must be a power of two in \[16, 256\] \(got"):
            locality_report(order, block=bad)


@pytest.mark.parametrize(
    ("shape", "match"),
    [
        ((4,), r"`shape` must be a tuple of 2 or 3 positive ints, e.g. \(21, 45, 80\) \(got \(4,\)\)"),
        ("21x45x80", r"`shape` must be a tuple of 2 or 3 positive ints"),
        ((2, 0, 3), r"`shape` must hold positive ints, e.g. \(21, 45, 80\) \(got \(2, 0, 3\)\)"),
        ((2, 2.5), r"`shape` must hold positive ints"),
    ],
)
def test_gilbert_curve_errors(shape, match):
    with pytest.raises(ValueError, match=match):
        gilbert_curve(shape)

"""LatentGrid: parsing, names, token arithmetic and every validation message."""

import pytest
import torch

from dfsviz.sparse.grid import LatentGrid


@pytest.mark.parametrize(
    ("spec", "dims"),
    [("21x45x80", (21, 45, 80)), (" 33 X 45 x 80 ", (33, 45, 80)), ("1x1x1", (1, 1, 1))],
)
def test_parse_reads_frames_height_width(spec, dims):
    grid = LatentGrid.parse(spec, text_len=7, text_first=True)
    assert (grid.frames, grid.height, grid.width, grid.text_len, grid.text_first) == (*dims, 7, True)


@pytest.mark.parametrize("spec", ["21x45", "21x45x80x2", "axbxc", "21*45*80", "", "-1x2x3", 21])
def test_parse_rejects_malformed_specs(spec):
    with pytest.raises(ValueError, match=r"`grid` must look like FRAMESxHEIGHTxWIDTH, e.g. 21x45x80 \(got"):
        LatentGrid.parse(spec)


def test_grids_past_32_bit_token_positions_are_refused_before_anything_is_allocated():
    LatentGrid(1, 1, 2**31 - 1)  # the largest sequence int32 positions index
    with pytest.raises(ValueError, match=r"grid 1x1x2147483647 and 1 text tokens has 2,147,483,648 tokens, "
                                         r"more than 2,147,483,647 \(2\^31 - 1\)"):
        LatentGrid(1, 1, 2**31 - 1, text_len=1)
    with pytest.raises(ValueError, match=r"^grid 99999x99999x99999 has 999,970,000,299,999 tokens"):
        LatentGrid.parse("99999x99999x99999")


def test_parse_rejects_zero_sizes():
    with pytest.raises(ValueError, match=r"`frames` must be a positive integer \(got 0\)"):
        LatentGrid.parse("0x45x80")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(frames=0, height=2, width=2), r"`frames` must be a positive integer \(got 0\); give the latent size"),
        (dict(frames=2, height=-1, width=2), r"`height` must be a positive integer \(got -1\)"),
        (dict(frames=2, height=2, width=2.0), r"`width` must be a positive integer \(got 2.0\)"),
        (dict(frames=True, height=2, width=2), r"`frames` must be a positive integer \(got True\)"),
        (dict(frames=2, height=2, width=2, text_len=-3), r"`text_len` must be an integer >= 0 \(got -3\)"),
        (dict(frames=2, height=2, width=2, text_len=False), r"`text_len` must be an integer >= 0 \(got False\)"),
    ],
)
def test_constructor_value_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LatentGrid(**kwargs)


def test_text_first_must_be_bool():
    with pytest.raises(TypeError, match=r"`text_first` must be a bool \(got int\)"):
        LatentGrid(2, 2, 2, text_len=1, text_first=1)


@pytest.mark.parametrize(
    ("grid", "name"),
    [
        (LatentGrid(21, 45, 80), "f21h45w80"),
        (LatentGrid(33, 45, 80, text_len=256), "f33h45w80t256"),
        (LatentGrid(13, 24, 40, text_len=226, text_first=True), "f13h24w40T226"),
        (LatentGrid(2, 3, 4, text_len=0, text_first=True), "f2h3w4"),
    ],
)
def test_name(grid, name):
    assert grid.name == name


def test_sizes_and_slices_text_after_video():
    grid = LatentGrid(3, 4, 5, text_len=6)
    assert (grid.frame_tokens, grid.num_video, grid.num_tokens) == (20, 60, 66)
    assert grid.video_start == 0
    assert grid.video_slice == slice(0, 60)
    assert grid.text_slice == slice(60, 66)


def test_sizes_and_slices_text_first():
    grid = LatentGrid(3, 4, 5, text_len=6, text_first=True)
    assert grid.video_start == 6
    assert grid.video_slice == slice(6, 66)
    assert grid.text_slice == slice(0, 6)


def test_no_text_gives_an_empty_text_slice():
    grid = LatentGrid(2, 2, 2)
    assert list(range(grid.num_tokens))[grid.text_slice] == []
    assert list(range(grid.num_tokens))[grid.video_slice] == list(range(8))


def test_video_coords_is_frame_major_raster():
    grid = LatentGrid(2, 3, 4)
    expected = torch.tensor([(f, y, x) for f in range(2) for y in range(3) for x in range(4)], dtype=torch.int64)
    coords = grid.video_coords()
    assert coords.dtype == torch.int64
    assert torch.equal(coords, expected)


def test_video_index_inverts_video_coords():
    grid = LatentGrid(3, 5, 7)
    f, y, x = grid.video_coords().unbind(1)
    assert torch.equal(grid.video_index(f, y, x), torch.arange(grid.num_video))
    assert grid.video_index(1, 2, 3) == 1 * 35 + 2 * 7 + 3


def test_check_tokens_accepts_the_right_count_and_names_the_argument():
    grid = LatentGrid(2, 3, 4, text_len=5)
    grid.check_tokens(29)
    message = r"`q.shape\[2\]` = 24 tokens does not match grid 2x3x4 with 5 text tokens \(expects 29\)"
    with pytest.raises(ValueError, match=message):
        grid.check_tokens(24, argument="q.shape[2]")
    with pytest.raises(ValueError, match=r"^`N` = 30 tokens"):
        grid.check_tokens(30)


def test_grid_is_frozen_and_hashable():
    grid = LatentGrid(2, 3, 4)
    assert {grid: 1}[LatentGrid(2, 3, 4)] == 1
    with pytest.raises(AttributeError):
        grid.frames = 5

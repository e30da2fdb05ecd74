"""The procedural video generator: shapes, determinism, class factors, validation."""

import pytest
import torch

from dfsviz.models.videos import (
    COLOURS,
    MOTIONS,
    SHAPES,
    VIDEO_CLASSES,
    VideoClass,
    class_names,
    class_table,
    make_videos,
    sample_labels,
)

SIZE = dict(frames=5, height=20, width=32)


def test_shapes_dtype_range():
    v = make_videos(list(range(len(VIDEO_CLASSES))), seed=0, **SIZE)
    assert v.shape == (len(VIDEO_CLASSES), 3, 5, 20, 32)
    assert v.dtype == torch.float32
    assert torch.isfinite(v).all()
    assert v.min() >= -1.0 and v.max() <= 1.0
    # Not a constant image: textures and objects give spread.
    assert v.std() > 0.2


def test_deterministic_for_a_seed_and_seed_sensitive():
    a = make_videos([0, 3, 5], seed=7, **SIZE)
    b = make_videos(torch.tensor([0, 3, 5]), seed=7, **SIZE)
    c = make_videos([0, 3, 5], seed=8, **SIZE)
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 0.5


def test_frames_change_over_time():
    v = make_videos([0, 1, 2, 3], seed=1, **SIZE)
    assert ((v[:, :, -1] - v[:, :, 0]).abs().amax(dim=(1, 2, 3)) > 0.3).all()


def test_class_table_covers_every_factor():
    assert class_names() == [row["name"] for row in class_table()]
    assert [row["label"] for row in class_table()] == list(range(len(VIDEO_CLASSES)))
    for factor, values, times in (("shape", SHAPES, 2), ("motion", MOTIONS, 2), ("colour", tuple(COLOURS), 1)):
        counts = {v: sum(getattr(c, factor) == v for c in VIDEO_CLASSES) for v in values}
        assert all(n == times for n in counts.values()), (factor, counts)
    # No shape always comes with the same motion.
    pairs = {(c.shape, c.motion) for c in VIDEO_CLASSES}
    assert len(pairs) == len(VIDEO_CLASSES)
    assert len(set(class_names())) == len(VIDEO_CLASSES)


def _near_colour_counts(clip: torch.Tensor) -> torch.Tensor:
    """Pixels of a [3, F, H, W] clip within 0.2 (RGB in [0, 1]) of each named colour."""
    rgb = ((clip + 1) / 2).permute(1, 2, 3, 0).reshape(-1, 3)
    ref = torch.tensor(list(COLOURS.values()))
    return ((rgb[:, None, :] - ref[None]).norm(dim=-1) < 0.2).sum(0)


@pytest.mark.parametrize("seed", [0, 1])
def test_object_colour_identifies_the_class(seed):
    labels = list(range(len(VIDEO_CLASSES)))
    v = make_videos(labels, frames=3, height=36, width=64, seed=seed)
    names = list(COLOURS)
    for label, clip in zip(labels, v):
        counts = _near_colour_counts(clip)
        assert names[int(counts.argmax())] == VIDEO_CLASSES[label].colour, (label, counts.tolist())


def _mask(clip: torch.Tensor, colour: str) -> torch.Tensor:
    rgb = ((clip + 1) / 2).permute(1, 2, 3, 0)                                           # [F, H, W, 3]
    return (rgb - torch.tensor(COLOURS[colour])).norm(dim=-1) < 0.2


def test_grow_class_objects_get_larger():
    label = next(i for i, c in enumerate(VIDEO_CLASSES) if c.motion == "grow" and c.colour == "yellow")
    ratios = []
    for seed in range(4):
        clip = make_videos([label], frames=9, height=36, width=64, seed=seed, min_objects=1, max_objects=1)[0]
        m = _mask(clip, "yellow")
        ratios.append(float(m[-1].sum()) / max(float(m[0].sum()), 1.0))
    assert min(ratios) > 2.0, ratios


def test_translate_class_objects_move():
    label = next(i for i, c in enumerate(VIDEO_CLASSES) if c.motion == "translate" and c.colour == "red")
    for seed in range(4):
        clip = make_videos([label], frames=9, height=36, width=64, seed=seed, min_objects=1, max_objects=1)[0]
        m = _mask(clip, "red")
        ys, xs = torch.meshgrid(torch.arange(36.0), torch.arange(64.0), indexing="ij")

        def centroid(f):
            w = m[f].float()
            return torch.stack([(w * ys).sum(), (w * xs).sum()]) / w.sum()

        # Speed >= 0.035 frame heights per frame: >= 10 pixels over 8 frames; allow for texture.
        assert (centroid(-1) - centroid(0)).norm() > 5.0, seed


def test_object_count_is_respected():
    one = make_videos([0], seed=3, min_objects=1, max_objects=1, frames=1, height=36, width=64)
    many = make_videos([0], seed=3, min_objects=4, max_objects=4, frames=1, height=36, width=64)
    assert _mask(many[0], "red").sum() > _mask(one[0], "red").sum()


def test_sample_labels():
    a, b = sample_labels(64, 5), sample_labels(64, 5)
    assert torch.equal(a, b) and a.dtype == torch.int64
    assert 0 <= int(a.min()) and int(a.max()) < len(VIDEO_CLASSES)
    assert len(set(a.tolist())) > 4


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(labels=[8]), r"`labels` must lie in \[0, 7\]"),
        (dict(labels=[-1]), r"`labels` must lie in"),
        (dict(labels=[]), r"`labels` must be a non-empty 1-D integer tensor"),
        (dict(labels=[[0]]), r"`labels` must be a non-empty 1-D integer tensor"),
        (dict(labels=[0.5]), r"`labels` must be a non-empty 1-D integer tensor"),
        (dict(frames=0), r"`frames` must be an integer >= 1"),
        (dict(height=4), r"`height` must be an integer >= 8"),
        (dict(width=7), r"`width` must be an integer >= 8"),
        (dict(seed=-1), r"`seed` must be an integer >= 0"),
        (dict(min_objects=0), r"`min_objects` must be an integer >= 1"),
        (dict(min_objects=3, max_objects=2), r"`max_objects` must be an integer >= 3"),
        (dict(max_objects=9), r"`max_objects` must be <= 8"),
    ],
)
def test_make_videos_rejects_bad_input(kwargs, match):
    args = dict(labels=[0], frames=2, height=16, width=16, seed=0)
    args.update(kwargs)
    labels = args.pop("labels")
    with pytest.raises(ValueError, match=match):
        make_videos(labels, **args)


def test_sample_labels_rejects_bad_input():
    with pytest.raises(ValueError, match=r"`batch` must be an integer >= 1"):
        sample_labels(0, 0)
    with pytest.raises(ValueError, match=r"`seed` must be an integer >= 0"):
        sample_labels(2, -3)


def test_video_class_validation():
    with pytest.raises(ValueError, match=r"`shape` must be one of"):
        VideoClass("red_hexagon_orbit", "hexagon", "red", "orbit")
    with pytest.raises(ValueError, match=r"`colour` must be one of"):
        VideoClass("teal_disc_orbit", "disc", "teal", "orbit")
    with pytest.raises(ValueError, match=r"`motion` must be one of"):
        VideoClass("red_disc_spin", "disc", "red", "spin")
    with pytest.raises(ValueError, match=r"`name` must be 'red_disc_orbit'"):
        VideoClass("my_class", "disc", "red", "orbit")

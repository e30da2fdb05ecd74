"""The Overview opens on what the capture holds: its default schedule is replayed on the
captured steps (the shipped sample stores 4 of 20 steps), never a schedule that needs steps
the file lacks."""

from __future__ import annotations

import numpy as np
import pytest

import dfsviz
from dfsviz.app import create_app
from dfsviz.analysis.drift import mask_source_step
from dfsviz.app.pages import overview
from dfsviz.sparse.schedule import DFSSchedule


@pytest.fixture(scope="module")
def sample_app():
    app = create_app(dfsviz.sample_capture().parent)
    yield app
    app.server.config["DFSVIZ_CATALOG"].close()


def test_the_default_schedule_replays_on_the_samples_steps(sample_app):
    cid = "captures/" + dfsviz.sample_capture().name
    with sample_app.server.app_context():
        reader = sample_app.server.config["DFSVIZ_CATALOG"].reader(cid)
        base = overview.default_schedule(reader)
        schedule = DFSSchedule(num_steps=base["num_steps"], skip_steps=base["skip"], interval=base["interval"],
                               gamma0=base["gamma0"], decrement=base["decrement"], dense_layers=base["dense_layers"])
        series, notes = overview.schedule_series(cid, "hilbert3d", "dfs_tile", schedule)
    assert notes == []
    captured = reader.steps
    values = series["recall, cached mask"]
    assert len(values) == len(captured) and np.isfinite(values).all()
    # a schedule worth looking at: sparse on several captured steps, one of them on a cached mask
    plans = {s: schedule.at_step(s) for s in captured}
    sparse = [s for s, p in plans.items() if not p.dense]
    assert len(sparse) >= 2 and any(not plans[s].refresh for s in sparse)


def test_a_capture_of_every_step_keeps_the_papers_proportions(sample_app):
    """Where every step was captured, the paper's 12-of-50 warm-up and interval (scaled) replay as they are."""

    class Every:
        attrs = {"num_steps": 50, "adapter": "wan"}
        planned_steps = steps = list(range(50))

    assert overview.default_schedule(Every())["skip"] == 12 and overview.default_schedule(Every())["interval"] == 12


@pytest.fixture(scope="module")
def stored_and_maps(capture_root, tmp_path_factory):
    """An app over two copies of the float32 test capture: runs/stored.h5 with its stored curves,
    runs/maps.h5 with them removed (a file of dfsviz before curves: the pages read its maps)."""
    import shutil

    import h5py

    root = tmp_path_factory.mktemp("curves") / "runs"
    root.mkdir()
    shutil.copy(capture_root / "good.h5", root / "stored.h5")
    shutil.copy(capture_root / "good.h5", root / "maps.h5")
    with h5py.File(root / "maps.h5", "r+") as f:
        del f.attrs["stored_recall"]
        for group in f["steps"].values():
            for name in ("recall", "density", "recall_method", "kept_blocks"):
                del group[name]
    app = create_app(root)
    yield app
    app.server.config["DFSVIZ_CATALOG"].close()


def test_the_recall_grid_and_curves_from_stored_curves_equal_the_maps(stored_and_maps):
    """Overview's recall per layer x step and the Recall page's curves of a capture with stored curves
    (read in a few reads) equal what the pages compute from the maps of the same file with its
    curves removed (float32 maps: the curves were computed from these very values)."""
    from dfsviz.app.pages import recall

    app = stored_and_maps
    with app.server.app_context():
        catalog = app.server.config["DFSVIZ_CATALOG"]
        assert catalog.reader("runs/stored.h5").stored_recall and not catalog.reader("runs/maps.h5").stored_recall
        for budget in (0.1, 0.3):
            layers, steps, stored = overview.recall_grid("runs/stored.h5", "hilbert3d", budget)
            assert (layers, steps) == overview.recall_grid("runs/maps.h5", "hilbert3d", budget)[:2]
            from_maps = overview.recall_grid("runs/maps.h5", "hilbert3d", budget)[2]
            assert sorted(stored) == sorted(from_maps) and len(steps) > 1 and len(layers) > 1
            for method, grid in stored.items():
                np.testing.assert_allclose(grid, from_maps[method], rtol=0, atol=1e-6, err_msg=method)
        reader = catalog.reader("runs/stored.h5")
        args = (reader.steps[-1], "all", "all", list(reader.orders), list(reader.methods))
        (found, oracle), (found_maps, oracle_maps) = recall.curves("runs/stored.h5", *args), recall.curves(
            "runs/maps.h5", *args)
        for label, curve in {**found, **oracle}.items():
            other = {**found_maps, **oracle_maps}[label]
            np.testing.assert_allclose(curve.recall.numpy(), other.recall.numpy(), rtol=0, atol=1e-6, err_msg=label)
            np.testing.assert_allclose(curve.density.numpy(), other.density.numpy(), rtol=0, atol=1e-6, err_msg=label)


# The test capture keeps steps 0, 2 and 3 of 4 (tests/app/app_captures.py): with these warm-ups and
# intervals its steps are dense, refresh or reuse the mask of an earlier captured refresh.
REPLAYED = [
    dict(skip_steps=2, interval=2),  # 0 dense, 2 refresh, 3 cached (mask of 2)
    dict(skip_steps=0, interval=2),  # 0 refresh, 2 refresh with a lower budget, 3 cached (mask of 2)
    dict(skip_steps=0, interval=3),  # 0 refresh, 2 cached (mask of 0), 3 refresh with a lower budget
]


@pytest.mark.parametrize("dense_layers", [(0,), ()], ids=["layer0-dense", "no-dense-layer"])
@pytest.mark.parametrize("cadence", REPLAYED, ids=lambda c: f"skip{c['skip_steps']}-every{c['interval']}")
def test_the_schedule_from_stored_curves_equals_the_replay_of_the_maps(stored_and_maps, monkeypatch, cadence,
                                                                        dense_layers):
    """On a capture with stored curves the schedule's fresh series and refresh steps come from the
    curves and a cached step reads only the scores of its mask's refresh step and its own block
    mass; the series equal drift.replay_schedule's on the maps of the same file without curves
    (float32 maps: the curves were computed from these very values)."""
    app = stored_and_maps
    schedule = DFSSchedule(num_steps=4, gamma0=0.5, decrement=0.2, dense_layers=dense_layers, **cadence)
    with app.server.app_context():
        catalog = app.server.config["DFSVIZ_CATALOG"]
        reader = catalog.reader("runs/stored.h5")
        read = {"mass": set(), "scores": set()}
        for name in read:  # record which maps the curves' path reads, then read them as the catalog does
            real = getattr(catalog, name)

            def spy(cid, step, layer, *args, _real=real, _name=name, **kwargs):
                if cid == "runs/stored.h5":
                    read[_name].add((step, layer))
                return _real(cid, step, layer, *args, **kwargs)

            monkeypatch.setattr(catalog, name, spy)
        stored, notes = overview.schedule_series("runs/stored.h5", "hilbert3d", "dfs_tile", schedule)
        from_maps, notes_maps = overview.schedule_series("runs/maps.h5", "hilbert3d", "dfs_tile", schedule)
    assert notes == notes_maps == []
    sources = {(s, layer): mask_source_step(schedule, s, layer) for s in reader.steps for layer in reader.layers}
    cached = {key: src for key, src in sources.items() if src is not None and src != key[0]}
    assert cached, "the schedule reuses no mask on the captured steps"
    assert read["mass"] == set(cached)
    assert read["scores"] == {(src, layer) for (_, layer), src in cached.items()}
    assert sorted(stored) == sorted(from_maps) == ["density, cached mask", "recall, cached mask",
                                                   "recall, refreshed every step"]
    for name, series in stored.items():
        assert len(series) == len(reader.steps)
        np.testing.assert_allclose(series, from_maps[name], rtol=0, atol=1e-6, err_msg=name)


def test_a_schedule_whose_refresh_steps_were_not_captured_says_so_from_the_curves_too(stored_and_maps):
    """Steps 1 and 3 refresh under warm-up 1 and interval 2; step 2 reuses step 1's mask, which
    the capture (steps 0, 2 and 3) lacks: both paths draw nothing and say which steps to capture."""
    schedule = DFSSchedule(num_steps=4, skip_steps=1, interval=2, dense_layers=(0,))
    with stored_and_maps.server.app_context():
        for cid in ("runs/stored.h5", "runs/maps.h5"):
            series, notes = overview.schedule_series(cid, "hilbert3d", "dfs_tile", schedule)
            assert series == {} and len(notes) == 1, cid
            assert notes[0].startswith("Schedule replay skipped: the schedule reuses masks refreshed at steps [1], "
                                       "which the capture lacks (captured: [0, 2, 3])"), cid

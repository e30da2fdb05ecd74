"""The Overview opens on what the capture holds: its default schedule is replayed on the
captured steps (the shipped sample stores 4 of 20 steps), never a schedule that needs steps
the file lacks."""

from __future__ import annotations

import numpy as np
import pytest

import dfsviz
from dfsviz.app import create_app
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


def test_the_recall_grid_and_curves_from_stored_curves_equal_the_maps(capture_root, tmp_path):
    """Overview's recall per layer x step and the Recall page's curves of a capture with stored curves
    (read in a few reads) equal what the pages compute from the maps of the same file with its
    curves removed (float32 maps: the curves were computed from these very values)."""
    import shutil

    import h5py

    from dfsviz.app.pages import recall

    root = tmp_path / "runs"
    root.mkdir()
    shutil.copy(capture_root / "good.h5", root / "stored.h5")
    shutil.copy(capture_root / "good.h5", root / "maps.h5")
    with h5py.File(root / "maps.h5", "r+") as f:  # a file of dfsviz before curves: the pages read its maps
        del f.attrs["stored_recall"]
        for group in f["steps"].values():
            for name in ("recall", "density", "recall_method", "kept_blocks"):
                del group[name]
    app = create_app(root)
    try:
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
    finally:
        app.server.config["DFSVIZ_CATALOG"].close()

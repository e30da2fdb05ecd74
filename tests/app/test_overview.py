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

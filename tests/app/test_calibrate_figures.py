"""The Calibrate page's figure builders (``dfsviz.figures``): traces, marks, hover text and validation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dfsviz import figures

# 2 layers x 3 heads; layer 1 is all dense, head 2 of layer 0 too.
GAMMA = [[0.25, 0.5, None], [None, None, None]]
DENSE = [[False, False, True], [True, True, True]]


def _values(rows) -> np.ndarray:
    return np.array([[math.nan if v is None else v for v in row] for row in rows])


def test_calibration_heatmap_draws_sparse_values_and_marks_dense_heads():
    fig = figures.calibration_heatmap(_values(GAMMA), DENSE, quantity="gamma", layers=[3, 7],
                                      kept_blocks=[[10, 20, 40], [40, 40, 40]], num_kv_blocks=40, title="budgets")
    sparse, dense = fig.data
    assert sparse.name == "sparse heads" and dense.name == "dense heads"
    z = np.array(sparse.z, dtype=float)
    assert z[0, 0] == 0.25 and z[0, 1] == 0.5 and np.isnan(z[0, 2]) and np.isnan(z[1]).all()
    marks = np.array(dense.z, dtype=float)
    assert np.isnan(marks[0, :2]).all() and marks[0, 2] == 1 and (marks[1] == 1).all()
    # rows are the layers, the all-dense one named so; columns the heads
    assert list(sparse.y) == ["layer 3", "layer 7 (dense)"] and list(sparse.x) == ["head 0", "head 1", "head 2"]
    assert sparse.zmin == 0 and sparse.zmax == 1
    # hover text in words and units, not a bare number
    hover = np.array(sparse.customdata, dtype=object)
    assert "kept fraction γ = 0.25" in hover[0, 0] and "10 of 40 key blocks per query block" in hover[0, 0]
    assert "layer 3 · head 1" in hover[0, 1] and "20 of 40 key blocks" in hover[0, 1]
    assert "dense" in np.array(dense.customdata, dtype=object)[1, 0]
    assert sparse.hovertemplate == "%{customdata}<extra></extra>"
    assert np.array(dense.text, dtype=object)[1, 2] == "dense"
    assert fig.layout.title.text == "budgets"


@pytest.mark.parametrize("quantity, value, words", [
    ("recall", 0.912, "91.2% of the head's attention mass"),
    ("density", 0.27, "27.0% of the dense attention"),
])
def test_calibration_heatmap_hover_names_units(quantity, value, words):
    fig = figures.calibration_heatmap([[value]], [[False]], quantity=quantity)
    hover = np.array(fig.data[0].customdata, dtype=object)[0, 0]
    assert words in hover and "layer 0 · head 0" in hover


def test_calibration_heatmap_validates_its_arguments():
    with pytest.raises(ValueError, match=r"`quantity` must be one of gamma, recall, density \(got 'work'\)"):
        figures.calibration_heatmap([[0.5]], [[False]], quantity="work")
    with pytest.raises(ValueError, match=r"`dense` must have the shape of `values` \(1, 2\) \(got \(1, 1\)\)"):
        figures.calibration_heatmap([[0.5, 0.2]], [[False]], quantity="gamma")
    with pytest.raises(ValueError, match=r"`layers` must hold one label per row \(2\) \(got 1\)"):
        figures.calibration_heatmap(_values(GAMMA), DENSE, quantity="gamma", layers=[0])
    with pytest.raises(ValueError, match=r"`values` must be in \[0, 1\] at the sparse heads \(got 1.5\)"):
        figures.calibration_heatmap([[1.5]], [[False]], quantity="recall")
    with pytest.raises(ValueError, match=r"`kept_blocks` needs `num_kv_blocks`"):
        figures.calibration_heatmap([[0.5]], [[False]], quantity="gamma", kept_blocks=[[2]])


def test_cached_mask_decay_marks_the_interval():
    lags, rel, samples = [0, 2, 5, 9], [1.0, 0.97, 0.9, 0.8], [12, 6, 6, 3]
    fig = figures.cached_mask_decay(lags, rel, interval=4, samples=samples, reuse_factor=0.95)
    line = fig.data[0]
    assert list(line.x) == lags and list(line.y) == rel
    assert "a mask cached 5 steps keeps 90.0% of a fresh mask's recall (6 samples)" in list(line.hovertext)
    # the refresh at lag 4 and the ages a mask serves (0 .. 3) are drawn
    refresh = [s for s in fig.layout.shapes if s.type == "line"]
    assert len(refresh) == 1 and refresh[0].x0 == refresh[0].x1 == 4
    served = [s for s in fig.layout.shapes if s.type == "rect"]
    assert len(served) == 1 and (served[0].x0, served[0].x1) == (0, 3)
    assert any("refresh every 4 steps" in a.text for a in fig.layout.annotations)
    oldest = fig.data[1]
    assert list(oldest.x) == [3] and list(oldest.y) == [0.95]
    assert "oldest cached mask (3 steps)" in oldest.hovertext[0]


def test_cached_mask_decay_without_drift_says_so():
    fig = figures.cached_mask_decay([], [], interval=2)
    assert any("no sparse head" in a.text for a in fig.layout.annotations)


def test_cached_mask_decay_validates_its_arguments():
    with pytest.raises(ValueError, match=r"`interval` must be an integer >= 1 \(got 0\)"):
        figures.cached_mask_decay([0, 1], [1.0, 0.9], interval=0)
    with pytest.raises(ValueError, match=r"`lags` and `relative_recall` must have one length \(got 2 and 1\)"):
        figures.cached_mask_decay([0, 1], [1.0], interval=2)
    with pytest.raises(ValueError, match=r"`samples` must hold one count per lag \(2\) \(got 3\)"):
        figures.cached_mask_decay([0, 1], [1.0, 0.9], interval=2, samples=[1, 2, 3])


METHODS = {
    "meanpool": {"tile": None, "warmup_steps": 0, "interval": 13, "refreshes": 2, "mean_recall": 0.95,
                 "mean_density": 0.65, "run_recall": 0.95, "run_density": 0.65, "attention_work": 0.66},
    "dfs_tile": {"tile": 16, "warmup_steps": 2, "interval": 6, "refreshes": 3, "mean_recall": 0.94,
                 "mean_density": 0.6, "run_recall": 0.95, "run_density": 0.62, "attention_work": 0.64},
    "antidiagonal": None,
}


def test_method_comparison_bars_every_method_and_marks_the_chosen_one():
    fig = figures.method_comparison(METHODS, chosen="dfs_tile")
    assert [t.name for t in fig.data] == ["attention work", "predicted recall (sparse steps)", "density (sparse steps)"]
    work = fig.data[0]
    assert list(work.x) == ["meanpool", "dfs_tile (tile 16) · chosen", "antidiagonal: no plan fits"]
    # drawn upright, broken into lines, so a card a third of the page wide shows them whole
    assert list(fig.layout.xaxis.tickvals) == list(work.x) and fig.layout.xaxis.tickangle == 0
    assert list(fig.layout.xaxis.ticktext) == ["meanpool", "dfs_tile<br>(tile 16)<br>chosen",
                                                "antidiagonal<br>no plan fits"]
    assert list(work.y)[:2] == [0.66, 0.64] and math.isnan(list(work.y)[2])
    assert list(fig.data[1].y)[:2] == [0.95, 0.94] and list(fig.data[2].y)[:2] == [0.65, 0.6]
    assert "attention work 0.640 of dense attention" in work.hovertext[1]
    assert "warm-up 2, refresh every 6 steps" in work.hovertext[1]


def test_method_comparison_validates_its_arguments():
    with pytest.raises(ValueError,
                       match=r"`chosen` must be one of the methods \['meanpool', 'dfs_tile', 'antidiagonal'\]"):
        figures.method_comparison(METHODS, chosen="oracle")
    with pytest.raises(ValueError, match="`methods` must be a non-empty mapping"):
        figures.method_comparison({}, chosen="dfs_tile")


CANDIDATES = [
    {"warmup_steps": w, "interval": i, "refreshes": 1, "mean_recall": 0.9, "mean_density": 0.5,
     "run_recall": 0.9 + w / 100, "run_density": 0.5, "attention_work": 0.5 + i / 100 + w / 10}
    for w in (0, 3) for i in (1, 2, 3)
]


@pytest.mark.parametrize("mode, key, axis", [("target_recall", "attention_work", "attention work"),
                                              ("max_density", "run_recall", "predicted recall of the run")])
def test_schedule_candidates_one_line_per_warmup(mode, key, axis):
    fig = figures.schedule_candidates(CANDIDATES, chosen=(3, 2), mode=mode)
    lines = [t for t in fig.data if t.name.startswith("warm-up")]
    assert [t.name for t in lines] == ["warm-up 0", "warm-up 3"]
    assert list(lines[1].x) == [1, 2, 3]
    assert list(lines[1].y) == [c[key] for c in CANDIDATES[3:]]
    chosen = fig.data[-1]
    assert chosen.name == "chosen" and list(chosen.x) == [2] and list(chosen.y) == [CANDIDATES[4][key]]
    assert axis in fig.layout.yaxis.title.text
    assert fig.layout.xaxis.dtick == 1  # a tick a step over a short range ...
    many = [dict(CANDIDATES[0], interval=i) for i in range(1, 21)]
    wide = figures.schedule_candidates(many, chosen=(0, 5), mode=mode)
    assert wide.layout.xaxis.dtick == 2  # ... about 10 over a long one, whole steps


def test_schedule_candidates_validates_its_arguments():
    with pytest.raises(ValueError, match=r"`mode` must be 'target_recall' or 'max_density' \(got 'fast'\)"):
        figures.schedule_candidates(CANDIDATES, chosen=(0, 1), mode="fast")
    with pytest.raises(ValueError, match=r"`chosen` \(9, 1\) is not among the candidates"):
        figures.schedule_candidates(CANDIDATES, chosen=(9, 1), mode="target_recall")


def test_method_label_names_the_tile_or_the_stride():
    assert figures.method_label("dfs_tile", 16) == "dfs_tile (tile 16)"
    assert figures.method_label("antidiagonal", 8) == "antidiagonal (stride 8)"
    assert figures.method_label("meanpool", None) == "meanpool"

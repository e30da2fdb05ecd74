"""benchmarks/bench_e2e.py on the CPU (tiny Wan, the kernels' PyTorch reference): runs that
differ only in the warm-up calls share one timing of their sparse calls, and a full-depth run's
results file keeps every finished measurement when the run stops early."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from benchmark_scripts import load_script


@pytest.fixture(scope="module")
def bench_e2e():
    return load_script("bench_e2e")


def _args(out: Path, precisions: str) -> list[str]:
    return ["--models", "tiny", "--device", "cpu", "--modes", "permute_once", "--precisions", precisions,
            "--reps", "1", "--dense", "cudnn", "--quality", "", "--out", str(out)]


@pytest.mark.parametrize("run, twin", [("native_dense", "native"), ("fp8_pv_dense+linear_fp8", "fp8_pv+linear_fp8"),
                                       ("fp8", "fp8"), ("native+linear_fp8_all", "native+linear_fp8_all")])
def test_sparse_calls_names_the_run_whose_sparse_calls_a_run_makes(bench_e2e, run, twin):
    assert bench_e2e.sparse_calls(run) == twin


def test_runs_with_the_same_sparse_calls_time_them_once(bench_e2e, tmp_path, monkeypatch):
    calls = []
    time_calls = bench_e2e.time_calls
    monkeypatch.setattr(bench_e2e, "time_calls", lambda *a, **k: calls.append(1) or time_calls(*a, **k))
    out = tmp_path / "e2e.json"
    assert bench_e2e.main(_args(out, "native,native_dense")) == 0
    model = json.loads(out.read_text())["models"]["tiny"]
    assert model["complete"] is True
    # stock dense, DFSAttn's dense call, native_dense's warm-up call, then refresh + cached per gamma once
    assert len(calls) == 3 + 2 * len(bench_e2e.GAMMAS)
    for gamma in bench_e2e.GAMMAS:
        own = model["dfsattn"][f"permute_once_g{gamma:.1f}"]
        shared = model["dfsattn"][f"permute_once_native_dense_g{gamma:.1f}"]
        assert shared["sparse_calls_timed_as"] == "native" and shared["precision"] == "native_dense"
        assert shared["cached_median_ms"] == own["cached_median_ms"]
    schedule = model["schedule_weighted"]
    # the same sparse calls, the warm-up calls timed apart: only those differ between the two schedules
    warm_up_ms = {"permute_once": model["dfsattn_dense"]["median_ms"],
                  "permute_once_native_dense": model["dfsattn_dense_native_dense"]["median_ms"]}
    dense_calls = schedule["permute_once"]["calls"]["dense"]
    sparse_s = {run: s["dfsattn_s"] - dense_calls * warm_up_ms[run] / 1e3 for run, s in schedule.items()}
    assert sparse_s["permute_once"] == pytest.approx(sparse_s["permute_once_native_dense"])
    written = json.loads(out.read_text())
    assert written["commit"] == sys.modules["provenance"].source_commit()  # which code measured it
    assert written["card"] == written["machine"]["cpu"] and written["versions"]["diffusers"]


class Stopped(Exception):
    """What a time limit does to the run, here after the third timed measurement."""


def test_a_run_stopped_midway_keeps_what_it_measured(bench_e2e, tmp_path, monkeypatch):
    calls = []
    time_calls = bench_e2e.time_calls

    def stopping(*a, **k):
        calls.append(1)
        if len(calls) == 4:
            raise Stopped
        return time_calls(*a, **k)

    monkeypatch.setattr(bench_e2e, "time_calls", stopping)
    out = tmp_path / "e2e.json"
    with pytest.raises(Stopped):
        bench_e2e.main(_args(out, "native"))
    model = json.loads(out.read_text())["models"]["tiny"]
    assert model["complete"] is False
    assert model["dense"]["math"]["median_ms"] > 0 and model["dfsattn_dense"]["median_ms"] > 0
    # gamma 0.3's refresh calls were timed, its cached calls were not: no DFSAttn row was written
    assert "dfsattn" not in model and "schedule_weighted" not in model

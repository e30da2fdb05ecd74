"""The data layer's calibration cache: one calibration per (file version, settings), the plan
naming the capture by its id, refusals raised as ValueError (no browser)."""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import pytest

import dfsviz
from dfsviz.analysis.calibrate import CalibrationConfig
from dfsviz.app import data
from dfsviz.app.data import CaptureCatalog

ONE_STEP = Path(__file__).resolve().parents[1] / "data" / "format_v1.h5"  # a capture of one step


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("calibrate") / "runs"
    folder.mkdir()
    shutil.copy(dfsviz.sample_capture(), folder / "sample.h5")
    shutil.copy(ONE_STEP, folder / "one-step.h5")
    return folder


@pytest.fixture
def catalog(root):
    cat = CaptureCatalog([root])
    yield cat
    cat.close()


def test_calibration_is_cached_per_file_version_and_settings(catalog, root):
    config = CalibrationConfig(target_recall=0.9, method="dfs_tile")
    first = catalog.calibration("runs/sample.h5", config)
    misses = catalog.cache_info()["maps"]["misses"]
    assert catalog.calibration("runs/sample.h5", CalibrationConfig(target_recall=0.9, method="dfs_tile")) is first
    assert catalog.cache_info()["maps"]["misses"] == misses
    other = catalog.calibration("runs/sample.h5", CalibrationConfig(target_recall=0.8, method="dfs_tile"))
    assert other is not first and other.plan.provenance["target_recall"] == 0.8
    # a rewritten file (new modification time) is calibrated again
    stat = (root / "sample.h5").stat()
    os.utime(root / "sample.h5", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    again = catalog.calibration("runs/sample.h5", config)
    assert again is not first
    assert again.plan.to_json()["layers"] == first.plan.to_json()["layers"]


def test_the_plan_names_the_capture_by_its_id(catalog, root):
    result = catalog.calibration("runs/sample.h5", CalibrationConfig(target_recall=0.9, method="dfs_tile"))
    assert [c["path"] for c in result.plan.provenance["captures"]] == ["runs/sample.h5"]
    assert str(root) not in json.dumps(result.plan.to_json())


@pytest.mark.parametrize("cid, config, match", [
    ("runs/one-step.h5", CalibrationConfig(target_recall=0.9), "needs at least two captured steps for drift"),
    ("runs/sample.h5", CalibrationConfig(max_density=0.01), "max density 0.01 cannot be met"),
])
def test_refusals_are_value_errors(catalog, cid, config, match):
    with pytest.raises(ValueError, match=match):
        catalog.calibration(cid, config)


def test_settings_must_be_a_calibration_config(catalog):
    with pytest.raises(TypeError, match=r"`config` must be a CalibrationConfig \(got dict\)"):
        catalog.calibration("runs/sample.h5", {"target_recall": 0.9})


def test_calibrations_at_once_are_bounded_and_memoised_ones_still_served(catalog, monkeypatch):
    """An exposed dashboard: new settings while MAX_CALIBRATIONS calibrations run are refused in
    one line (each takes a core), a memoised result is still given, and the refusal is not kept.
    The running ones are held by a stand-in for calibrate that waits (isolating the bound)."""
    import dfsviz.analysis.calibrate as calibrate_module

    shown = catalog.calibration("runs/sample.h5", CalibrationConfig(target_recall=0.9, method="dfs_tile"))
    real, release = calibrate_module.calibrate, threading.Event()
    started = threading.Semaphore(0)

    def held(reader, config):
        started.release()
        assert release.wait(60)
        return real(reader, config)

    monkeypatch.setattr(calibrate_module, "calibrate", held)
    running = [threading.Thread(target=catalog.calibration,
                                args=("runs/sample.h5", CalibrationConfig(target_recall=0.5 + 0.01 * i,
                                                                          method="dfs_tile")))
               for i in range(data.MAX_CALIBRATIONS)]
    for thread in running:
        thread.start()
    for _ in running:
        assert started.acquire(timeout=60)
    new = CalibrationConfig(target_recall=0.7, method="dfs_tile")
    with pytest.raises(ValueError, match=rf"the server is running {data.MAX_CALIBRATIONS} calibrations already "
                                         rf"\(at most {data.MAX_CALIBRATIONS}\); try again in a few seconds"):
        catalog.calibration("runs/sample.h5", new)
    assert catalog.calibration("runs/sample.h5", CalibrationConfig(target_recall=0.9, method="dfs_tile")) is shown
    release.set()
    for thread in running:
        thread.join(60)
    assert catalog.calibration("runs/sample.h5", new).plan.provenance["target_recall"] == 0.7

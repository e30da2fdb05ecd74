"""The data layer's calibration cache: one calibration per (file version, settings), the plan
naming the capture by its id, refusals raised as ValueError (no browser)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

import dfsviz
from dfsviz.analysis.calibrate import CalibrationConfig
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

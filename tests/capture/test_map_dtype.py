"""float16 maps: the block-mass row-sum tolerance follows the stored dtype; the config setting."""

from __future__ import annotations

import numpy as np
import pytest

from dfsviz.capture.config import CaptureConfig
from dfsviz.capture.validation import ROW_SUM_TOL, map_problem

MK = 591  # key blocks of a Wan2.1-14B 720p step at block 128


def _row_rounded_up() -> np.ndarray:
    """A float32 row of MK masses summing to 1 whose float16 roundings all round up by almost
    half a float16 ulp: the worst the float16 storage of a row can do."""
    base = np.float16(1.0 / MK)  # a float16 value in the binade of 1/MK
    ulp = np.spacing(base).astype(np.float32)
    row = np.full(MK, np.float32(base) + np.float32(0.499) * ulp, dtype=np.float32)
    row[-1] = np.float32(1.0) - row[:-1].sum(dtype=np.float64)  # float32 row sums to 1
    return row


def test_float16_rounding_of_a_row_of_591_passes():
    row = _row_rounded_up()
    assert abs(row.sum(dtype=np.float64) - 1) < 1e-6
    stored = row.astype(np.float16)
    assert map_problem("m", stored[None], MK) is None
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(MK, MK)) * 4
    mass = np.exp(logits - logits.max(axis=-1, keepdims=True))
    mass = (mass / mass.sum(axis=-1, keepdims=True)).astype(np.float32)
    assert map_problem("m", mass.astype(np.float16), MK) is None


def _float16_row(excess: float) -> np.ndarray:
    """A float16 row of MK masses whose sum exceeds 1 by ``excess`` to within a float16 ulp of 1/MK."""
    base = np.float16(1.0 / MK)
    ulp = float(np.spacing(base))
    missing = int(round((1 + excess - MK * float(base)) / ulp))  # ulps to add, spread over the entries
    ulps = np.full(MK, missing // MK)
    ulps[: missing % MK] += 1
    return (float(base) + ulps * ulp).astype(np.float16)  # exact: every entry stays in base's binade


def test_the_float16_tolerance_is_derived_from_the_dtype_and_float32_keeps_its_own():
    # a row sum ROW_SUM_TOL + 2^-12 above 1: within float16's rounding of a row (half an ulp
    # relative, 2^-11) beyond ROW_SUM_TOL, so accepted in float16 ...
    row = _float16_row(ROW_SUM_TOL + 2.0**-12)
    assert row.sum(dtype=np.float64) - 1 > ROW_SUM_TOL + 2.0**-13
    assert map_problem("m", row[None], MK) is None
    # ... while float32, whose maps are not rounded on the way to the file, keeps ROW_SUM_TOL
    assert map_problem("m", row.astype(np.float32)[None], MK).startswith("rows do not sum to 1 (query block 0:")
    # twice float16's rounding beyond ROW_SUM_TOL is damage in float16 too
    far = _float16_row(ROW_SUM_TOL + 2 * 2.0**-11)
    assert map_problem("m", far[None], MK).startswith("rows do not sum to 1 (query block 0:")


def test_capture_config_map_dtype():
    assert CaptureConfig(out="x.h5").map_dtype == "float32"
    assert "map_dtype" not in CaptureConfig(out="x.h5").to_json()  # files before map_dtype resume as before
    assert CaptureConfig(out="x.h5", map_dtype="float16").to_json()["map_dtype"] == "float16"
    with pytest.raises(ValueError, match=r"`map_dtype` must be one of \['float32', 'float16'\] \(got 'float64'\)"):
        CaptureConfig(out="x.h5", map_dtype="float64")

"""Fixtures of the DFSAttn processor tests (models and inputs in accel_models.py)."""

from __future__ import annotations

import pytest
from accel_models import ARCHS, build  # tests/accel is on sys.path (rootdir import mode)


@pytest.fixture(scope="module")
def models():
    """arch -> tiny transformer (seeded random weights, float32, eval)."""
    return {arch: build(arch) for arch in ARCHS}

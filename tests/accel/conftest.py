"""Fixtures of the DFSAttn processor tests (models and inputs in accel_models.py)."""

from __future__ import annotations

import pytest
from accel_models import ARCHS  # tests/ and tests/accel are on sys.path (rootdir import mode)
from tiny_models import build_tiny


@pytest.fixture(scope="module")
def models():
    """arch -> tiny transformer (seeded random weights, float32, eval)."""
    return {arch: build_tiny(arch) for arch in ARCHS}

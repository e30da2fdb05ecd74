"""Tiny random-weight video transformers (configs of reference/environment.md section 3),
saved with save_pretrained so tests load them back through the real from_pretrained."""

from __future__ import annotations

import pytest
import torch

from tiny_models import CONFIGS


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    """adapter name -> folder of a saved tiny transformer (seeded random weights)."""
    import diffusers

    root = tmp_path_factory.mktemp("models")
    out = {}
    for i, (name, (cls_name, cfg)) in enumerate(CONFIGS.items()):
        torch.manual_seed(100 + i)
        model = getattr(diffusers, cls_name)(**cfg).eval()
        model.save_pretrained(root / name)
        out[name] = root / name
    return out


@pytest.fixture(scope="session")
def loaded_models(model_dirs):
    """adapter name -> transformer loaded back with from_pretrained (float32, eval)."""
    import diffusers

    return {name: getattr(diffusers, CONFIGS[name][0]).from_pretrained(model_dirs[name]).eval() for name in CONFIGS}

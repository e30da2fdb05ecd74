"""The top-level package: `import dfsviz` stays light; its public names resolve on first use."""

import json
import subprocess
import sys

import pytest


def test_import_dfsviz_loads_no_heavy_dependency():
    code = (
        "import sys, json, dfsviz; "
        "print(json.dumps(sorted(m for m in ('dash', 'diffusers', 'triton', 'h5py') if m in sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_public_names_resolve():
    import dfsviz
    from dfsviz.accel import DFSConfig, apply_dfsattn, remove_dfsattn
    from dfsviz.capture.store import open_capture  # noqa: F401

    assert (dfsviz.apply_dfsattn, dfsviz.remove_dfsattn, dfsviz.DFSConfig) == (apply_dfsattn, remove_dfsattn, DFSConfig)
    assert sorted(dfsviz.__all__) == ["DFSConfig", "__version__", "apply_dfsattn", "open", "remove_dfsattn"]
    with pytest.raises(AttributeError, match="module 'dfsviz' has no attribute 'nothing'"):
        dfsviz.nothing  # noqa: B018

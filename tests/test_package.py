"""The top-level package: `import dfsviz` stays light; its public names resolve on first use."""

import json
import subprocess
import sys
from pathlib import Path

import pytest


def test_import_dfsviz_loads_no_heavy_dependency():
    code = (
        "import sys, json, dfsviz; dfsviz.sample_capture(); "
        "print(json.dumps(sorted(m for m in ('dash', 'diffusers', 'triton', 'h5py', 'torch') if m in sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_public_names_resolve():
    import dfsviz
    from dfsviz.accel import DFSConfig, apply_dfsattn, remove_dfsattn
    from dfsviz.capture.record import record
    from dfsviz.capture.runset import open_run_set
    from dfsviz.capture.reader import open_capture  # noqa: F401

    assert (dfsviz.apply_dfsattn, dfsviz.remove_dfsattn, dfsviz.DFSConfig) == (apply_dfsattn, remove_dfsattn, DFSConfig)
    assert dfsviz.open_run_set is open_run_set
    assert dfsviz.record is record
    assert sorted(dfsviz.__all__) == ["DFSConfig", "__version__", "apply_dfsattn", "open", "open_run_set",
                                      "record", "remove_dfsattn", "sample_capture"]
    with pytest.raises(AttributeError, match="module 'dfsviz' has no attribute 'nothing'"):
        dfsviz.nothing  # noqa: B018


@pytest.mark.parametrize("model, name, blocks", [("tiny", "tiny-wan", 41), ("medium", "medium-wan", 256)])
def test_sample_captures_are_shipped_inside_the_package(model, name, blocks):
    import dfsviz

    path = dfsviz.sample_capture(model)
    assert isinstance(path, Path) and path.is_file()
    assert path == Path(dfsviz.__file__).resolve().parent / "data" / "captures" / f"{name}-sample.h5"
    assert path.stat().st_size <= 40e6
    with dfsviz.open(path) as run:
        assert run.complete and not run.validate()
        assert run.summary()["model_id"] == f"dfsviz-embedded:{name}"
        assert run.summary()["num_blocks"] == blocks
    assert dfsviz.sample_capture() == dfsviz.sample_capture("tiny")


def test_an_unknown_sample_capture_is_refused():
    import dfsviz

    with pytest.raises(ValueError, match=r"`model` must be one of \['medium', 'tiny'\] \(got 'huge'\)"):
        dfsviz.sample_capture("huge")


def test_a_missing_sample_capture_names_the_path(monkeypatch, tmp_path):
    import dfsviz
    import dfsviz._package_data as package_data

    monkeypatch.setattr(package_data, "DATA_DIR", tmp_path)
    with pytest.raises(ValueError, match=r"sample capture .*captures/tiny-wan-sample\.h5.* is missing"):
        dfsviz.sample_capture()

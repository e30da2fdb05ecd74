"""Files shipped inside the package (``dfsviz/data``): the embedded model and a sample capture.

They travel in wheels and sdists as package data, so they are found next to this module
in a checkout, an editable install and a plain ``pip install`` alike.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["DATA_DIR", "sample_capture"]

DATA_DIR = Path(__file__).resolve().parent / "data"


def sample_capture() -> Path:
    """The shipped sample capture of the embedded model (``dfsviz/data/captures/tiny-wan-sample.h5``).

    Open it with ``dfsviz.open(dfsviz.sample_capture())``. Raises ValueError when the file
    is missing from this installation.
    """
    path = DATA_DIR / "captures" / "tiny-wan-sample.h5"
    if not path.is_file():
        raise ValueError(f"the sample capture {path} is missing from this dfsviz installation; "
                         "reinstall dfsviz (pip install --force-reinstall dfsviz) to restore it")
    return path

"""Files shipped inside the package (``dfsviz/data``): the embedded model and a sample capture.

They travel in wheels and sdists as package data, so they are found next to this module
in a checkout, an editable install and a plain ``pip install`` alike.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["DATA_DIR", "SAMPLE_CAPTURES", "sample_capture"]

DATA_DIR = Path(__file__).resolve().parent / "data"


#: Shipped sample captures: embedded model -> file under ``dfsviz/data/captures/``.
SAMPLE_CAPTURES = {"tiny": "tiny-wan-sample.h5", "medium": "medium-wan-sample.h5"}


def sample_capture(model: str = "tiny") -> Path:
    """The shipped sample capture of an embedded model: ``tiny`` (the default,
    ``dfsviz/data/captures/tiny-wan-sample.h5``) or ``medium`` (``medium-wan-sample.h5``).

    Open it with ``dfsviz.open(dfsviz.sample_capture())``. Raises ValueError for another
    name and when the file is missing from this installation.
    """
    if model not in SAMPLE_CAPTURES:
        raise ValueError(f"`model` must be one of {sorted(SAMPLE_CAPTURES)} (got {model!r})")
    path = DATA_DIR / "captures" / SAMPLE_CAPTURES[model]
    if not path.is_file():
        raise ValueError(f"the sample capture {path} is missing from this dfsviz installation; "
                         "reinstall dfsviz (pip install --force-reinstall dfsviz) to restore it")
    return path

"""``CaptureReader.validate()`` in its two parts, on a copy of the shipped sample damaged with h5py:
``header_problems`` (no map read) and ``iter_map_problems`` (one item per read of maps, so that
the dashboard's background check can stop between reads)."""

from __future__ import annotations

import re
import shutil

import h5py
import numpy as np

import dfsviz
from dfsviz.capture.reader import CaptureReader
from dfsviz.capture.schema import DIMS


def test_validate_is_the_header_part_then_each_read_of_maps(tmp_path, monkeypatch):
    path = tmp_path / "sample.h5"
    shutil.copy(dfsviz.sample_capture(), path)
    with h5py.File(path, "r+") as f:
        f["orders"]["raster"][:2] = 0  # not a permutation any more
        m = f["steps"]["step_0013"]["m"]
        m[2, 0, 1, 1] = 3 * m[2, 0, 1, 1]  # layer, order and head at positions 2, 1, 1
    with CaptureReader(path) as reader:
        layout = reader.layout
        reads: list[str] = []
        real = h5py.Dataset.__getitem__
        monkeypatch.setattr(h5py.Dataset, "__getitem__",
                            lambda d, s: reads.append(d.name) or real(d, s))
        header = reader.header_problems()
        assert header == [f"order 'raster': stored permutation is not a bijection of 0..{layout.num_tokens - 1}"]
        assert not [name for name in reads if name.rpartition("/")[2] in DIMS]  # no map read
        found = list(reader.iter_map_problems())
        monkeypatch.undo()
        # one item per (step, dataset, position before the head dim)
        expected = sum(int(np.prod(layout.shape(name)[: DIMS[name].index("head")]))
                       for step in reader.steps for name in layout.datasets(step))
        assert len(found) == expected
        problems = [p for p in found if p is not None]
        assert len(problems) == 1 and re.fullmatch(
            rf"step_0013/m\[layer {layout.layers[2]}, branch cond, order {layout.orders[1]}, head {layout.heads[1]}\]: "
            r"rows do not sum to 1 \(query block \d+: 3\)", problems[0]), problems
        assert reader.validate() == header + problems

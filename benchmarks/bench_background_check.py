"""How fast the dashboard's catalog makes a large capture usable, and what checking maps costs.

    PYTHONPATH=$PWD python3 benchmarks/bench_background_check.py --capture /tmp/big8/big8.h5 \\
        --out benchmarks/results/background_check_uint8.json

(the capture: ``bench_app_latency.py --make``, e.g. a 1.15 GB one with 8-bit maps). On a file
above ``CaptureCatalog(full_check_bytes=...)`` (256 MiB by default) it times:

* usable: the catalog's first ``entry`` (open, structure and everything but the maps checked,
  status "checking"), then the first view's reads: the Masks page's default view (last step,
  middle layer, head 0: block mass, dfs_tile scores and footprints of both orders);
* the background check, from that first ``entry`` to ``wait_checked``, and Masks reads made
  while it runs (each a cache miss: a (step, layer, head) not read before);
* the per-read check, once the background check is over: random Masks reads (m and the dfs_tile
  scores of one head and order, read and decoded) on the catalog's view reader of the file,
  which checks each map it reads, and on a plain reader;
* for comparison, ``CaptureReader.validate()`` (what a file up to the threshold waits for before
  its first view), unless ``--skip-validate``.

The machine's load average is recorded before and after.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
import time
from pathlib import Path

import torch

from provenance import load, run_header  # this script's folder

log = logging.getLogger("bench_background_check")


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1e3, 1)


def _percentiles(values: list[float]) -> dict:
    ordered = sorted(values)
    return {"p50": round(statistics.median(ordered), 2), "p95": round(ordered[int(0.95 * (len(ordered) - 1))], 2),
            "n": len(ordered)}


def masks_view(catalog, cid: str, step: int, layer: int, head: int) -> None:
    """The reads of the Masks page's view: both orders' block mass, dfs_tile scores and footprints."""
    reader = catalog.reader(cid)
    for order in reader.orders:
        catalog.mass(cid, step, layer, order, head)
        catalog.scores(cid, step, layer, order, "dfs_tile", head)
        if reader.layout.footprints:
            catalog.footprints(cid, step, layer, order, head)


def check_cost(checked, path: Path, reads: int, seed: int) -> dict:
    """Per Masks read (m and dfs_tile scores of one head and order, read and decoded): the time on
    ``checked``, the catalog's view reader of a large file (each map checked as it is read), and on
    a plain reader (``dfsviz.open``), alternating which goes first."""
    import dfsviz

    rng = random.Random(seed)
    plain_ms, checked_ms = [], []
    with dfsviz.open(path) as plain:
        for i in range(reads):
            key = (rng.choice(plain.steps), rng.choice(plain.layers), rng.choice(plain.orders), rng.choice(plain.heads))
            for reader, times in ((checked, checked_ms), (plain, plain_ms))[:: 1 if i % 2 else -1]:
                t0 = time.perf_counter()
                reader.block_mass(*key)
                reader.scores(*key[:3], "dfs_tile", key[3])
                times.append((time.perf_counter() - t0) * 1e3)
    added = [c - p for c, p in zip(checked_ms, plain_ms)]
    return {"plain_ms": _percentiles(plain_ms), "checked_ms": _percentiles(checked_ms),
            "added_ms_p50": round(statistics.median(added), 3),
            "added_over_plain_p50": round(statistics.median(added) / statistics.median(plain_ms), 3)}


def measure(capture: Path, reads: int, seed: int, skip_validate: bool) -> dict:
    from dfsviz.app.data import CaptureCatalog
    from dfsviz.capture.reader import CaptureReader

    result: dict = {**run_header(torch.device("cpu")), "capture": str(capture), "bytes": capture.stat().st_size}
    with CaptureCatalog([capture.parent]) as catalog:
        cid = f"{next(iter(catalog.roots))}/{capture.name}"
        t0 = time.perf_counter()
        entry = catalog.entry(cid)
        result["entry_ms"] = _ms(t0)
        assert entry.status == "checking", entry
        reader = catalog.reader(cid)
        step, layer, head = reader.steps[-1], reader.layers[len(reader.layers) // 2], reader.heads[0]
        t1 = time.perf_counter()
        masks_view(catalog, cid, step, layer, head)
        result["first_view_ms"] = _ms(t1)
        result["usable_ms"] = _ms(t0)
        log.info("usable in %.0f ms (entry %.0f ms, first Masks view %.0f ms)", result["usable_ms"],
                 result["entry_ms"], result["first_view_ms"])
        rng = random.Random(seed)
        during = []
        for _ in range(8):  # views while the background check runs, each a (step, layer, head) not read before
            t1 = time.perf_counter()
            masks_view(catalog, cid, rng.choice(reader.steps), rng.choice(reader.layers), rng.choice(reader.heads))
            during.append(_ms(t1))
        result["views_during_check_ms"] = during
        entry = catalog.wait_checked(cid)
        result["background_check_s"] = round(time.perf_counter() - t0, 2)
        result["status"] = entry.status
        log.info("checked in %.1f s from the first entry: %s", result["background_check_s"], entry.status)
        result["per_read"] = check_cost(reader, capture, reads, seed)
    log.info("per Masks read: plain %s ms, checked %s ms", result["per_read"]["plain_ms"], result["per_read"]["checked_ms"])
    if not skip_validate:
        with CaptureReader(capture) as reader:
            t0 = time.perf_counter()
            problems = reader.validate()
            result["validate_s"] = round(time.perf_counter() - t0, 2)
        assert problems == [], problems[:3]
        log.info("CaptureReader.validate(): %.1f s", result["validate_s"])
    result["machine"]["load_end"] = load()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--capture", type=Path, required=True, help="a capture above the catalog's full_check_bytes")
    parser.add_argument("--reads", type=int, default=200, help="random Masks reads timed for the per-read check")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-validate", action="store_true", help="do not time CaptureReader.validate()")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    result = measure(args.capture, args.reads, args.seed, args.skip_validate)
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    log.info("%s", text)


if __name__ == "__main__":
    main()

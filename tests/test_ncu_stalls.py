"""benchmarks/ncu_stalls.py: an Nsight Compute source page split into idle warps, loader and
consumers, the consumers' samples grouped by what each instruction does."""

from __future__ import annotations

import csv

import pytest
from benchmark_scripts import load_script


@pytest.fixture(scope="module")
def ncu_stalls():
    return load_script("ncu_stalls")


def _page(path, launches):
    """Write a source page: per launch, (source, samples) rows."""
    with path.open("w", newline="") as fh:
        out = csv.writer(fh)
        for rows in launches:
            out.writerow(["Kernel Name", "_block_sparse_attention_sm90_kernel", ""])
            out.writerow(["Address", "Source", "Warp Stall Sampling (All Samples)", "stall_wait"])
            for i, (source, samples) in enumerate(rows):
                out.writerow([hex(0x1000 + 16 * i), source, str(samples), "0"])


CONSUMER = [("QGMMA.64x128x32.F32.E4M3.E4M3 R24, R164, gdesc[UR32], RZ, !UPT", 30),
            ("WARPGROUP.DEPBAR.LE gsb0, 0x1", 200), ("FMNMX R1, R2, R3, !PT", 120), ("@!P0 BRA 0x2000", 50),
            ("BAR.SYNC.DEFER_BLOCKING 0x2, 0x80", 10), ("IMAD R1, R2, R3, R4", 5)]
LOADER = [("NOP", 4000), ("UTMALDG.4D [UR8], [UR18]", 7), ("@!P0 BRA 0x3000", 900), ("NOP", 2000)]


def test_launches_are_split_into_idle_loader_and_consumers(ncu_stalls, tmp_path):
    page = tmp_path / "source.csv"
    _page(page, [CONSUMER + LOADER + CONSUMER, CONSUMER + LOADER])
    first, second = (ncu_stalls.summarize(rows) for rows in ncu_stalls.launches(page))
    assert first["idle"] == 6000 and first["loader"] == 907
    assert first["consumers"] == 2 * 415 and first["samples"] == 6000 + 907 + 830
    assert first["consumer_shares"] == {"mma_wait": round(400 / 830, 3), "softmax": round(240 / 830, 3),
                                        "branch": round(100 / 830, 3), "mma_issue": round(60 / 830, 3),
                                        "barrier": round(20 / 830, 3), "other": round(10 / 830, 3)}
    assert first["consumer_by_opcode"]["FMNMX"] == 240 and "NOP" not in first["consumer_by_opcode"]
    assert second["consumers"] == 415


def test_a_launch_without_parked_warps_is_refused(ncu_stalls, tmp_path):
    page = tmp_path / "source.csv"
    _page(page, [CONSUMER])
    with pytest.raises(ValueError, match="not the warp-specialized Gluon kernel"):
        ncu_stalls.summarize(ncu_stalls.launches(page)[0])


def test_opcode_drops_the_predicate_and_operands(ncu_stalls):
    assert ncu_stalls.opcode("@!P0  BRA 0x7fdce9977030") == "BRA"
    assert ncu_stalls.opcode("@UP1 USETMAXREG.TRY_ALLOC.CTAPOOL UP0, 0x78") == "USETMAXREG.TRY_ALLOC.CTAPOOL"
    assert ncu_stalls.opcode("  WARPGROUP.DEPBAR.LE gsb0, 0x1") == "WARPGROUP.DEPBAR.LE"

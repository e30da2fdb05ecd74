"""Where the Gluon attention kernel's warps stall: Nsight Compute's per-instruction samples, summed.

Input: the SASS source page of a report, one section per profiled launch of
``_block_sparse_attention_sm90_kernel`` (profile_kernels.py's ``--ncu-region`` under ncu with
``--set full``, which samples every instruction's warp stalls):

    ncu --clock-control none --profile-from-start off --set full -k regex:sm90 -o rep \\
        python3 benchmarks/profile_kernels.py --ncu-region --cases sparse sparse_fp8_pv
    ncu -i rep.ncu-rep --page source --csv --print-source sass > source.csv
    python3 benchmarks/ncu_stalls.py source.csv --names native fp8_pv --card "NVIDIA H100 80GB HBM3" \\
        --out benchmarks/results/ncu_fp8_pv_stalls_h100.json

Each launch's samples are split into the three unused warps of the loader's warpgroup (``idle``:
the NOPs where they wait at a barrier, the hot NOPs), the loader warp (the code between the first
and the last hot NOP, where the partitions' code is laid out) and the two consumer warpgroups
(the rest), whose samples are then grouped by what the instruction does: waiting for an MMA
(``WARPGROUP.DEPBAR``), issuing MMAs, the softmax's arithmetic, barriers, memory, branches and the
rest; with the consumers' samples by opcode.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from collections import Counter
from pathlib import Path

SAMPLES = "Warp Stall Sampling (All Samples)"
HOT_NOP = 1000  # samples: a NOP this hot is idle warps parked at a barrier
# the softmax's arithmetic: exponentials, row max and sum, scaling, conversions and byte packing
SOFTMAX = {"MUFU", "FMNMX", "FADD", "FMUL", "FFMA", "F2FP", "PRMT", "SHFL", "SEL", "FRND", "FSETP", "FSEL", "LOP3",
           "VOTE", "VOTEU", "HADD2", "HFMA2", "HMUL2"}
MEMORY = {"LDG", "LDS", "STG", "STS", "LDSM", "UTMALDG", "UTMASTG"}


def launches(path: Path) -> list[list[dict]]:
    """The source page's sections, one per launch: each instruction's row as a dict."""
    sections, header = [], None
    with path.open(newline="") as fh:
        for row in csv.reader(fh):
            if not row:
                continue
            if row[0] == "Kernel Name":
                sections.append([])
                header = None
            elif row[0] == "Address":
                header = row
            elif header is not None:
                sections[-1].append(dict(zip(header, row)))
    return sections


def opcode(source: str) -> str:
    """``@!P0 BRA 0x...`` -> ``BRA``; ``WARPGROUP.DEPBAR.LE gsb0, 0x1`` -> ``WARPGROUP.DEPBAR.LE``."""
    return re.sub(r"^@!?U?P\w+\s+", "", source.strip()).split(" ")[0]


def consumer_group(op: str) -> str:
    base = op.split(".")[0]
    if op.startswith("WARPGROUP.DEPBAR"):
        return "mma_wait"
    if base in ("HGMMA", "QGMMA", "WARPGROUP"):
        return "mma_issue"
    if base in SOFTMAX:
        return "softmax"
    if base in ("BAR", "SYNCS"):
        return "barrier"
    if base in MEMORY:
        return "memory"
    return "branch" if base == "BRA" else "other"


def summarize(rows: list[dict]) -> dict:
    """One launch's samples: idle, loader, consumers, and the consumers' shares and opcodes."""
    ops = [opcode(r["Source"]) for r in rows]
    samples = [int(r[SAMPLES] or 0) for r in rows]
    hot = {i for i, (op, s) in enumerate(zip(ops, samples)) if op == "NOP" and s > HOT_NOP}
    if not hot:
        raise ValueError("no hot NOP in this launch: not the warp-specialized Gluon kernel")
    first, last = min(hot), max(hot)
    groups, by_opcode = Counter(), Counter()
    idle = loader = 0
    for i, (op, s) in enumerate(zip(ops, samples)):
        if i in hot:
            idle += s
        elif first < i < last:
            loader += s
        else:
            groups[consumer_group(op)] += s
            by_opcode[op.split(".")[0]] += s
    consumers = sum(groups.values())
    return {"samples": sum(samples), "idle": idle, "loader": loader, "consumers": consumers,
            "consumer_shares": {g: round(n / consumers, 3) for g, n in groups.most_common()},
            "consumer_by_opcode": dict(by_opcode.most_common(16))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source", type=Path, help="ncu --page source --csv --print-source sass output")
    ap.add_argument("--names", nargs="+", required=True, help="a name for each launch, in the report's order")
    ap.add_argument("--card", required=True, help="the card the report was taken on")
    ap.add_argument("--note", default="", help="conditions to record (versions, shape, mask)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    sections = launches(args.source)
    if len(sections) != len(args.names):
        ap.error(f"the report has {len(sections)} launches; --names gives {len(args.names)}")
    result = {"card": args.card, "note": args.note,
              "kernels": {name: summarize(rows) for name, rows in zip(args.names, sections)}}
    text = json.dumps(result, indent=1) + "\n"
    if args.out:
        args.out.write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())

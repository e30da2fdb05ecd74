"""Every claim of the claims report on an embedded model: its shipped sample and a capture with
every order and stored Q/K.

    # tiny (CPU, ~25 min on 2 busy cores)
    .venv/bin/dfsviz capture --orders all --save-qkv 1,4,7 --out runs/tiny_all.h5
    .venv/bin/python benchmarks/claims.py --model tiny --capture runs/tiny_all.h5
    # medium (one GPU, a few minutes; benchmarks/gpu_session.sh claims_medium runs both lines)
    dfsviz capture --model dfsviz-embedded:medium --orders all --layers 1,3,5,7 --capture-steps 0,5,10,15,19 \
        --save-qkv 3 --qkv-steps 10 --out runs/medium_all.h5
    python benchmarks/claims.py --model medium --capture runs/medium_all.h5

Builds ``dfsviz.analysis.report.build_report`` on ``dfsviz.sample_capture(model)`` (or ``--sample``)
and on ``--capture`` and writes benchmarks/results/claims_<model>.json: the machine and its load,
versions, each capture's settings (its stored capture config and summary), the report's wall time,
and the report's numbers (bound violations, Hilbert vs raster, recall, drift and the verdicts of
sections 5-8).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import dfsviz
from provenance import load, run_header  # benchmarks/ is the script's folder
from dfsviz._package_data import SAMPLE_CAPTURES
from dfsviz.analysis.report import ReportConfig, build_report

#: Report keys kept in the results (factor summaries and per-layer drift series stay in report.json).
_KEYS = ("run", "config", "violations", "bound1", "order_comparison", "recall", "oracle", "order_ablation",
         "tile_size", "step_trend", "text_blocks")


def claims(path: str) -> dict:
    with dfsviz.open(path) as reader:
        settings = {"capture_config": reader.config, "summary": reader.summary()}
    start = time.perf_counter()
    report = build_report(path, ReportConfig())
    seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as folder:      # report.json: the report's strict-JSON numbers
        full = json.loads(Path(report.write(folder, png=False)["json"][0]).read_text())
    data = {k: full[k] for k in _KEYS}
    if data["order_comparison"]:
        data["order_comparison"].pop("all")
    data["drift_at_interval"] = full["drift"]["at_interval"]
    return {"settings": settings, "report_seconds": round(seconds, 1), "report": data,
            "notes": report.notes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(SAMPLE_CAPTURES), required=True, help="embedded model")
    parser.add_argument("--capture", required=True, help="a capture of that model with --orders all --save-qkv")
    parser.add_argument("--sample", default=None, help="its sample capture (default: the shipped one)")
    parser.add_argument("--out", default=None, help="default: benchmarks/results/claims_<model>.json")
    args = parser.parse_args()
    sample = args.sample or str(dfsviz.sample_capture(args.model))
    out = args.out or f"benchmarks/results/claims_{args.model}.json"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")    # where the captures ran
    result = {
        "benchmark": "claims",
        **run_header(device),
        "model": args.model,
        "captures": {"sample": claims(sample), "all_orders": claims(args.capture)},
    }
    result["machine"]["load_end"] = load()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    # numpy scalars of the capture summary (e.g. the seed) as Python numbers
    Path(out).write_text(json.dumps(result, indent=1, default=lambda x: x.item()) + "\n")
    for name, entry in result["captures"].items():
        report = entry["report"]
        verdicts = {k: v["verdict"] for k, v in report["order_ablation"]["verdict"].items()}
        print(f"{name}: ablation {verdicts}, tile size {report['tile_size']['verdict']['verdict']}, "
              f"text blocks {report['text_blocks']['verdict']['verdict']}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""DFSAttn under diffusers' Ulysses attention on several GPUs, against dense Ulysses and one GPU.

    torchrun --nproc-per-node 2 benchmarks/bench_multigpu.py                 # Wan2.1-14B 720p, 1 and 2 GPUs
    torchrun --nproc-per-node 2 benchmarks/bench_multigpu.py --quick         # 2 and 3 blocks, composed to 40
    python benchmarks/bench_multigpu.py --quick                              # world size 1: the 1-GPU path only
    python benchmarks/bench_multigpu.py --models tiny --device cpu           # checks the script on CPU

The model is ``bench_e2e.py``'s (diffusers ``WanTransformer3DModel``, Wan2.1-14B architecture, 720p x
81 frames: 75,600 tokens and 512 text tokens, random bf16 weights, batch 1); the timings are
``bench_e2e.run_model``'s, per call mode only (permute-once is refused under context parallelism):

* on rank 0 alone, without parallelism (the other ranks wait): the 1-GPU baseline;
* on every rank, after ``transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=P))``
  with P the torchrun world size: dense Ulysses (stock processors, cuDNN SDPA between diffusers'
  all-to-alls), DFSAttn's dense call, DFSAttn refresh and cached calls at gamma 0.3 / 0.2 / 0.1 (the
  sparse attention of each rank's H/P heads between the same all-to-alls), the breakdown, and the
  schedule-weighted time of the default 50-step CFG schedule; rank 0's CUDA-event timings are kept.

Writes ``benchmarks/results/multigpu_<card>.json``: card, versions, world size, shapes, both runs
and the scaling: DFSAttn's 50-step schedule on P GPUs against 1 GPU (target >= 1.8x at 2 GPUs),
DFSAttn Ulysses against dense Ulysses on P GPUs (target >= 1.9x at 2 GPUs), and dense's own scaling.
``--quick`` times 2 and 3 blocks and composes 40 (``bench_e2e.compose_depth``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_e2e  # noqa: E402
from provenance import run_header  # noqa: E402

log = logging.getLogger("bench_multigpu")

#: Targets at 2 GPUs: DFSAttn's own scaling, and DFSAttn over dense, both under Ulysses.
TARGETS = {"dfsattn_scaling_2gpu": 1.8, "dfsattn_vs_dense_2gpu": 1.9}
MODE = "per_call"


def ulysses(world: int):
    """The ``prepare`` of ``bench_e2e.run_model`` that enables diffusers' Ulysses attention over
    ``world`` ranks on the built model."""
    import diffusers

    def prepare(model):
        model.enable_parallelism(config=diffusers.ContextParallelConfig(ulysses_degree=world))

    return prepare


def measure(name: str, device: torch.device, reps: int, backend: str | None, seed: int, quick: bool,
            prepare=None) -> dict:
    """``bench_e2e.run_model`` of ``name`` (per call, cuDNN dense, native precision, no quality),
    each model ``prepare``d first; with ``quick`` two shallow runs composed to the full depth."""
    def run(units=None):
        return bench_e2e.run_model(name, device, reps, [MODE], backend, seed, ["cudnn"], False, ["native"], units,
                                   prepare)

    if not quick:
        return run()
    family, cfg = bench_e2e.MODELS[name][:2]
    units = bench_e2e.QUICK_UNITS
    return bench_e2e.compose_depth(run(units[0]), run(units[1]), units, cfg[bench_e2e.FULL_UNITS[family]])


def scaling(one: dict, many: dict, world: int) -> dict:
    """Speedups of the 50-step schedule: P GPUs over 1 (DFSAttn, dense) and DFSAttn over dense on P."""
    s1, sp = one["schedule_weighted"][MODE], many["schedule_weighted"][MODE]
    return {"gpus": world, "dfsattn_1gpu_s": s1["dfsattn_s"], "dfsattn_s": sp["dfsattn_s"],
            "dense_1gpu_s": s1["dense_s"], "dense_s": sp["dense_s"],
            "dfsattn_scaling": s1["dfsattn_s"] / sp["dfsattn_s"], "dense_scaling": s1["dense_s"] / sp["dense_s"],
            "dfsattn_vs_dense": sp["speedup"], "dfsattn_vs_dense_1gpu": s1["speedup"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="14b-720p",
                    help=f"comma list of Wan models of bench_e2e.py: {[n for n, m in bench_e2e.MODELS.items() if m[0] == 'wan']}")
    ap.add_argument("--reps", type=int, default=2, help="timed calls per measurement (after one warm-up)")
    ap.add_argument("--device", default="cuda", help="cuda (each rank its LOCAL_RANK GPU) or cpu (world size 1 only)")
    ap.add_argument("--backend", default=None, choices=[None, "triton", "ref"], help="kernel backend (default auto)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-single", action="store_true", help="leave out the 1-GPU baseline on rank 0")
    ap.add_argument("--quick", action="store_true",
                    help="time 2 and 3 blocks (one timed call each) and compose every call at full depth")
    ap.add_argument("--out", type=Path, default=None, help="default benchmarks/results/multigpu_<card>.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.quick:
        args.reps = 1
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    bad = [n for n in names if bench_e2e.MODELS.get(n, ("",))[0] != "wan"]
    if bad:
        ap.error(f"--models: {bad} are not Wan models of bench_e2e.py (diffusers has a context-parallel plan for Wan)")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no GPU visible; use --device cpu --models tiny to check the script")
    if args.device == "cpu" and world > 1:
        ap.error(f"--device cpu runs the 1-GPU path only (world size {world}); launch it without torchrun")
    device = torch.device(args.device, int(os.environ.get("LOCAL_RANK", "0"))) if args.device == "cuda" \
        else torch.device("cpu")
    if world > 1:
        import torch.distributed as dist

        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    if rank > 0:
        logging.getLogger().setLevel(logging.WARNING)  # rank 0 reports
    out = args.out or Path(__file__).resolve().parent / "results" / f"multigpu_{bench_e2e.card_slug(device)}.json"
    result = {
        **run_header(device),
        "gpus": world,
        "parallelism": f"diffusers ContextParallelConfig(ulysses_degree={world})" if world > 1 else None,
        "targets": TARGETS, "quick": args.quick, "models": {},
    }
    for name in names:
        entry = {}
        if rank == 0 and not args.skip_single:
            entry["1_gpu"] = measure(name, device, args.reps, args.backend, args.seed, args.quick)
        if world > 1:
            dist.barrier()
            entry[f"{world}_gpu"] = measure(name, device, args.reps, args.backend, args.seed, args.quick,
                                            ulysses(world))
            if "1_gpu" in entry:
                entry["scaling"] = scaling(entry["1_gpu"], entry[f"{world}_gpu"], world)
        result["models"][name] = entry
        if rank == 0:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=1))  # after each model: a killed run keeps what finished
    if rank == 0:
        for name, entry in result["models"].items():
            for key, run in entry.items():
                if key.endswith("_gpu"):
                    s = run["schedule_weighted"][MODE]
                    print(f"{name} {key}: 50-step CFG schedule DFSAttn {s['dfsattn_s']:.1f} s, dense "
                          f"{s['dense_s']:.1f} s -> {s['speedup']:.2f}x")
            if "scaling" in entry:
                sc = entry["scaling"]
                print(f"{name}: DFSAttn {sc['gpus']} GPUs over 1: {sc['dfsattn_scaling']:.2f}x; dense "
                      f"{sc['dense_scaling']:.2f}x; DFSAttn over dense on {sc['gpus']}: {sc['dfsattn_vs_dense']:.2f}x")
        print(f"wrote {out}")
    if world > 1:
        from dfsviz.capture.ranks import leave_world

        leave_world()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

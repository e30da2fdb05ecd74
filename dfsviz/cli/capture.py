"""``dfsviz capture``: record attention statistics of a video DiT into one HDF5 file, or of several
clips (prompts x seeds) into a run set, one file per clip."""

from __future__ import annotations

import dataclasses
import json
import re

import click

from dfsviz.capture.file_safety import format_bytes
from dfsviz.capture.schema import MAP_DTYPE_CHOICES, MAX_INDEX
from dfsviz.cli import fail_cleanly, main, parse_names
from dfsviz.sparse.orders import order_names
from dfsviz.sparse.scoring import scorer_names

_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def _ranges(spec: str, option: str, high: int, form: str):
    """(lo, hi) of each comma-separated "N" or "N-M" of ``spec``, checked against [0, ``high``]."""
    for part in spec.split(","):
        match = _RANGE.match(part.strip())
        if match is None:
            raise ValueError(f"`{option}` must be {form} (got {spec!r})")
        lo = int(match.group(1))
        hi = int(match.group(2)) if match.group(2) is not None else lo
        if hi < lo:
            raise ValueError(f"`{option}`: range {part.strip()!r} runs backwards; write {hi}-{lo}")
        if hi > high:  # before expanding the range: 0-99999999999 would fill the memory
            raise ValueError(f"`{option}` values must lie in [0, {high}] (got {part.strip()})")
        yield lo, hi


def parse_int_list(spec: str | None, option: str) -> tuple[int, ...] | None:
    """"all"/None -> None; "0,3,5-7" -> (0, 3, 5, 6, 7)."""
    if spec is None or spec.strip().lower() == "all":
        return None
    spans = _ranges(spec, option, MAX_INDEX, "'all' or integers and ranges like 0,3,5-7")
    return tuple(sorted({v for lo, hi in spans for v in range(lo, hi + 1)}))


def parse_seeds(spec: str) -> tuple[int, ...]:
    """"0-3" -> (0, 1, 2, 3); "0,5" -> (0, 5): the seeds of a run set, in the order given."""
    from dfsviz.capture.config import MAX_SEED
    from dfsviz.capture.runset import MAX_CLIPS

    spans = list(_ranges(spec, "--seeds", MAX_SEED, "integers and ranges like 0-3 or 0,5"))
    count = sum(hi - lo + 1 for lo, hi in spans)
    if count > MAX_CLIPS:
        raise ValueError(f"`--seeds` lists {count} seeds; a run set has at most {MAX_CLIPS} clips")
    return tuple(v for lo, hi in spans for v in range(lo, hi + 1))


@main.command(
    "capture",
    epilog=(
        "\b\nExamples:\n"
        "  dfsviz capture --out tiny.h5                       # the embedded model, CPU friendly\n"
        "  dfsviz capture --model Wan-AI/Wan2.1-T2V-1.3B-Diffusers --prompt \"a cat playing piano\" --out wan.h5\n"
        "  dfsviz capture --model Wan-AI/Wan2.1-T2V-1.3B-Diffusers --embeddings prompt.safetensors \\\n"
        "      --capture-steps 0,10,25,49 --layers 0-29 --out wan.h5\n"
        "  dfsviz capture --model ./wan-dir --embeddings random --dry-run --out x.h5\n"
        "  dfsviz capture --prompts all --seeds 0-3 --out runs/classes    # a run set: 32 clips, one file each\n"
        "  dfsviz capture --model ./wan-dir --embeddings random --seeds 0-7 --out runs/wan-seeds\n"
        "  torchrun --nproc-per-node 4 -m dfsviz capture --model ./wan-dir --embeddings random --seeds 0-7 \\\n"
        "      --out runs/wan-seeds                           # the same run set, its clips spread over 4 ranks\n"
        "  dfsviz capture --model ./other-dit --embeddings random --grid 3x8x8 --out x.h5   # a class not in the registry"
    ),
)
@click.option("--model", default=None,
              help="Hub id or local diffusers directory, or dfsviz-embedded:medium (the embedded model at Wan2.1 "
                   "480p's 256 key blocks; needs a GPU to be quick); default: the tiny embedded model.")
@click.option(
    "--prompt", default=None,
    help="Prompt: a class name of the embedded model, or the text of a whole pipeline's call (--model <pipeline "
         "folder or hub id>; needs pip install \"dfsviz[pipelines]\").",
)
@click.option(
    "--prompts", "prompts_spec", default=None,
    help="Several clips: a text file with one prompt per line (blank lines and # comments skipped), or 'all' for "
         "every class of the embedded model. With --seeds, every prompt with every seed.",
)
@click.option("--negative-prompt", default="", help="Unconditional prompt (recorded in the file).")
@click.option(
    "--embeddings",
    default=None,
    help="Precomputed prompt embeddings (.safetensors with prompt_embeds, negative_prompt_embeds, ...) or 'random'.",
)
@click.option("--num-steps", type=int, default=None, help="Denoising steps (default: the model's, 50 for Wan).")
@click.option("--capture-steps", default=None, help="Steps to capture, e.g. 0,10,25-27 (default: 5 spread).")
@click.option("--layers", default=None, help="Layers to capture, e.g. 0-29 or 0,5 (default all).")
@click.option("--heads", default=None, help="Heads to capture, e.g. 0-3 (default all).")
@click.option("--height", type=int, default=None, help="Video height in pixels (default: the model's).")
@click.option("--width", type=int, default=None, help="Video width in pixels (default: the model's).")
@click.option("--frames", type=int, default=None, help="Video frames (default: the model's).")
@click.option("--latent", default=None, help="Latent size FxHxW in latent cells (overrides height/width/frames).")
@click.option("--grid", default=None,
              help="Token grid FxHxW after patching, for a transformer class the registry does not describe "
                   "(the generic entry; docs/models.md lists the described ones).")
@click.option("--text-len", type=int, default=None, help="With --grid: text tokens in the self-attention sequence.")
@click.option("--text-first", is_flag=True, default=None, help="With --grid: the text precedes the video (default: after).")
@click.option("--seed", type=int, default=None, help="Seed of noise, random embeddings, footprints (default 0).")
@click.option("--seeds", "seeds_spec", default=None, help="Several clips: seeds like 0-3 or 0,5 (one clip each).")
@click.option("--guidance-scale", type=float, default=None, help="CFG weight (1 = no unconditional pass).")
@click.option(
    "--branches", type=click.Choice(["cond", "both"]), default="cond", show_default=True,
    help="Capture the conditional pass only, or the unconditional one too.",
)
@click.option(
    "--orders", "orders_spec", default="raster,hilbert3d", show_default=True,
    help=f"Token orders: {','.join(order_names())}, or all.",
)
@click.option(
    "--methods", "methods_spec", default="meanpool,dfs_tile,antidiagonal", show_default=True,
    help=f"Scoring methods: {','.join(scorer_names())}, or all (oracle: the exact block mass, a dense pass).",
)
@click.option("--block", type=int, default=128, show_default=True, help="Tokens per block (power of two, 16-256).")
@click.option("--tile", type=int, default=16, show_default=True, help="dfs_tile pooling tile b.")
@click.option("--stride", type=int, default=8, show_default=True, help="antidiagonal stride S.")
@click.option("--footprints", type=int, default=2, show_default=True, help="Query blocks per head with exact attention.")
@click.option("--save-qkv", default=None, help="Layers whose Q/K/V are stored, e.g. 0,15 (default none).")
@click.option("--qkv-steps", default=None, help="Captured steps at which --save-qkv stores Q/K/V (default all).")
@click.option(
    "--qkv-dtype", type=click.Choice(["auto", "float16", "float32"]), default="auto", show_default=True,
    help="Storage dtype of --save-qkv tensors (auto: float16 for float16 models, else float32).",
)
@click.option(
    "--map-dtype", type=click.Choice(MAP_DTYPE_CHOICES), default="auto", show_default=True,
    help="Storage dtype of the maps m, L, r, J and scores. auto: the widest dtype whose largest step fits --step-budget; "
         "float16 halves the maps (values beyond 65504 are refused), uint8 quarters them (256 levels per row).",
)
@click.option(
    "--step-budget", default="8GB", show_default=True,
    help="Bytes one step may take (uncompressed) with --map-dtype auto, e.g. 8GB, 500MB, 2GiB.",
)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option(
    "--dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16"]), default="auto", show_default=True,
    help="Model dtype (auto: bfloat16 on CUDA, float32 on CPU).",
)
@click.option(
    "--kernel-backend", type=click.Choice(["triton", "ref"]), default=None,
    help="Force the statistics kernels (default: Triton on CUDA, reference on CPU).",
)
@click.option(
    "--context-parallel", type=click.Choice(["ulysses"]), default=None,
    help="Under torchrun --nproc-per-node P: one clip over the P ranks with diffusers' Ulysses attention, each "
         "reducing its heads. Without it, torchrun spreads a run set's clips over the ranks.",
)
@click.option("--out", required=True,
              help="Output HDF5 file; with several clips a directory (the run set: one file per clip and runset.json).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file or run set.")
@click.option("--resume", is_flag=True,
              help="Continue an interrupted capture in --out: same settings and weights, checked; a file a crash "
                   "left half-written is repaired first. A run set skips its complete clips.")
@click.option("--dry-run", is_flag=True,
              help="Print the resolved settings and estimated size; capture nothing. --out is checked as the capture "
                   "would check it.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@fail_cleanly
def capture_command(**opts) -> None:
    """Capture attention statistics of a video DiT into one HDF5 file.

    For every captured (step, layer) and token order: block mass m, pooled logit L,
    diversities r and J, block scores and the recall and density curves (of the top-k
    mask at every k) of every method and the oracle, variance ratios W_q and W_k, footprints of sampled query blocks and
    optionally Q/K/V. Open the file with
    ``dfsviz.open(path)`` or ``dfsviz inspect FILE``.

    With --prompts or --seeds naming several clips, --out is a directory, a run set: one
    capture file per clip and runset.json, the model loaded once (``dfsviz calibrate DIR``
    pools its clips). Under torchrun the run set's clips are spread over the ranks, each rank
    capturing whole clips on its own device (rank r: the r-th, (r+P)-th, ... clip to capture).
    """
    from dfsviz.capture.config import CaptureConfig

    if opts["seed"] is not None and opts["seeds_spec"] is not None:
        raise ValueError("pass --seed or --seeds, not both")
    if opts["prompt"] is not None and opts["prompts_spec"] is not None:
        raise ValueError("pass --prompt or --prompts, not both")
    config = CaptureConfig(
        out=opts["out"],
        model=opts["model"],
        prompt=opts["prompt"] or "",
        negative_prompt=opts["negative_prompt"],
        embeddings=opts["embeddings"],
        num_steps=opts["num_steps"],
        capture_steps=parse_int_list(opts["capture_steps"], "--capture-steps"),
        layers=parse_int_list(opts["layers"], "--layers"),
        heads=parse_int_list(opts["heads"], "--heads"),
        height=opts["height"],
        width=opts["width"],
        frames=opts["frames"],
        latent=opts["latent"],
        grid=opts["grid"],
        text_len=opts["text_len"],
        text_first=opts["text_first"] or None,
        seed=opts["seed"] or 0,
        guidance_scale=opts["guidance_scale"],
        branches=opts["branches"],
        orders=parse_names(opts["orders_spec"], "--orders", order_names()),
        methods=parse_names(opts["methods_spec"], "--methods", scorer_names()),
        block=opts["block"],
        tile=opts["tile"],
        stride=opts["stride"],
        footprints=opts["footprints"],
        save_qkv=parse_int_list(opts["save_qkv"], "--save-qkv") or (),
        qkv_steps=parse_int_list(opts["qkv_steps"], "--qkv-steps"),
        qkv_dtype=opts["qkv_dtype"],
        map_dtype=opts["map_dtype"],
        step_budget=opts["step_budget"],
        device=opts["device"],
        dtype=opts["dtype"],
        overwrite=opts["overwrite"],
        resume=opts["resume"],
        kernel_backend=opts["kernel_backend"],
        context_parallel=opts["context_parallel"],
    )
    if opts["prompts_spec"] is None and opts["seeds_spec"] is None:
        _capture_one(config, opts)
        return
    from dfsviz.capture.runset import RunSetConfig, read_prompts

    spec = opts["prompts_spec"]
    prompts = None if spec is None else "all" if spec.strip().lower() == "all" else read_prompts(spec)
    seeds = None if opts["seeds_spec"] is None else parse_seeds(opts["seeds_spec"])
    run_set = RunSetConfig(config, prompts=prompts, seeds=seeds)
    if len(run_set.clips) == 1:  # one clip: --out is its file, as without --prompts/--seeds
        (clip,) = run_set.clips
        _capture_one(dataclasses.replace(config, prompt=clip.prompt, seed=clip.seed), opts)
    else:
        _capture_set(run_set, opts)


def _echo_dry_run(info: dict, total_bytes: int, what: str) -> None:
    """The resolved settings as JSON, then the estimated size of ``what``."""
    click.echo(json.dumps(info, indent=1))
    click.echo(f"estimated size: {format_bytes(total_bytes)} for {what} "
               "(uncompressed upper bound; maps compress about 1.2-8x)")


def _report_interrupted(out: str) -> None:
    """Ctrl+C: one line on what ``out`` holds, then exit status 130 (a shell's for SIGINT)."""
    from pathlib import Path

    from dfsviz.capture.reader import CaptureReader

    path = Path(out)
    resume = "; the same command with --resume continues it"
    if path.is_dir():
        line = f"run set {out} keeps its completed clips and steps{resume}"
    elif not path.exists():
        line = f"nothing was written to {out}"
    else:
        try:
            with CaptureReader(path) as reader:
                line = f"{out} holds steps {reader.steps}" + (" (complete)" if reader.complete else
                                                               f", marked incomplete{resume}")
        except ValueError as exc:
            line = str(exc)
    click.secho(f"Interrupted: {line}", fg="yellow", err=True)
    raise SystemExit(130)


def _capture_one(config, opts: dict) -> None:
    from dfsviz.capture.resolve import resolve_capture
    from dfsviz.capture.runner import check_capture_output, run_capture

    from dfsviz.capture.ranks import world_size

    if opts["dry_run"]:
        check_capture_output(config)
        info = resolve_capture(config, load_weights=False).describe()
        _echo_dry_run(info, info["estimated_file_bytes_uncompressed"], f"{len(info['capture_steps'])} steps")
        return
    ranks = world_size()
    if ranks > 1 and config.context_parallel is None:  # every rank would capture the same clip into one file
        raise ValueError(f"torchrun started {ranks} ranks, but one clip is captured in one process: pass "
                         "--context-parallel ulysses to spread it over the ranks, or --prompts/--seeds to capture "
                         "several clips (each rank captures whole clips); or run it without torchrun")
    try:
        result = run_capture(config, progress=not opts["quiet"])
    except KeyboardInterrupt:
        _report_interrupted(config.out)
    if not result.wrote:  # another rank of a Ulysses capture: rank 0 reports
        return
    state = "complete" if result.complete else "incomplete"
    click.echo(
        f"wrote {result.path} ({state}): steps {result.steps}"
        + (f", {len(result.skipped)} already there" if result.skipped else "")
        + f", {format_bytes(result.file_bytes)}, {result.seconds:.1f} s"
    )


def _capture_set(run_set, opts: dict) -> None:
    from dfsviz.capture.runset import capture_run_set, describe_run_set

    if opts["dry_run"]:
        info = describe_run_set(run_set)
        _echo_dry_run(info, info["estimated_total_bytes_uncompressed"],
                      f"{len(info['clips'])} clips of {len(info['capture_steps'])} steps")
        return
    try:
        result = capture_run_set(run_set, progress=not opts["quiet"])
    except KeyboardInterrupt:
        _report_interrupted(run_set.capture.out)
    if result.rank:  # under torchrun every rank returns the whole set's result: rank 0 reports it
        return
    state = "complete" if result.complete else "incomplete"
    click.echo(f"wrote run set {result.path} ({state}): {result.clips} clips, {len(result.captured)} captured, "
               f"{len(result.skipped)} already there, {format_bytes(result.file_bytes)}, {result.seconds:.1f} s")

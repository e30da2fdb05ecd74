"""``dfsviz inspect``: settings, completeness, sizes and validity of a capture file, or of each
clip of a run-set folder."""

from __future__ import annotations

import json
from pathlib import Path

import click

from dfsviz.cli import fail_cleanly, main


def _plain(value):
    """JSON-ready scalars (h5py hands back numpy types)."""
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


@main.command(
    "inspect",
    epilog="\b\nExamples:\n  dfsviz inspect capture.h5\n  dfsviz inspect capture.h5 --json\n"
           "  dfsviz inspect runs/classes          # a run set: each clip's state, every clip file validated",
)
@click.argument("path", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@fail_cleanly
def inspect_command(path: str, as_json: bool) -> None:
    """Print a capture's settings, completeness and sizes, and validate every stored map.

    PATH may also be a run-set folder (``dfsviz capture --seeds/--prompts``): its clips are
    listed (prompt, seed, captured steps; complete, incomplete, capturing while a capture writes
    it, missing, unreadable or invalid), and every clip file present is validated.

    Exit code 2 when a file cannot be read (unknown format version, not a capture, a damaged or
    crafted structure) or a value fails validation (block-mass rows that do not sum to 1,
    non-finite statistics, ...); each problem is one line.
    """
    info = _run_set_info(Path(path)) if Path(path).is_dir() else _file_info(path)
    problems = info["problems"]
    if as_json:
        click.echo(json.dumps(info, indent=1))
    elif "clips" in info:
        _echo_run_set(info)
    else:
        _echo_file(info)
    if problems:
        for problem in problems:
            click.secho(f"invalid: {problem}", fg="red", err=True)
        raise SystemExit(2)


def _file_info(path) -> dict:
    """The file's summary with its validation problems (ValueError when it cannot be read)."""
    from dfsviz.capture.reader import CaptureReader

    with CaptureReader(path) as reader:
        info = {k: _plain(v) for k, v in reader.summary().items()}
        info["problems"] = reader.validate()
    return info


def _run_set_info(folder: Path) -> dict:
    """The run set's manifest, each clip's captured steps and every clip file's problems, each
    named by its clip (a clip file that cannot be read is one problem, not the end)."""
    from tqdm.auto import tqdm

    from dfsviz.capture.reader import CaptureBusy
    from dfsviz.capture.runset import open_run_set

    run_set = open_run_set(folder)
    clips, problems = [], []
    for clip in tqdm(run_set.clips, desc="inspect", unit="clip", leave=False, disable=None):
        row = {"index": clip.index, "prompt": clip.prompt, "seed": clip.seed, "file": clip.file,
               "state": "complete" if clip.complete else "incomplete", "completed_steps": None,
               "planned_steps": None, "file_bytes": None}
        file = folder / clip.file
        if not file.is_file():
            row["state"] = "missing"
        else:
            try:
                summary = _file_info(file)
            except CaptureBusy:  # a capture is writing this clip now: not readable yet, no problem
                row["state"] = "capturing"
            except ValueError as exc:
                row["state"] = "unreadable"
                problems.append(f"clip {clip.index} ({clip.file}): {exc}")
            else:
                # the prompt the clip ran with: a blank one is the model's default (the embedded model's first class)
                row.update(prompt=summary["prompt"] or clip.prompt, completed_steps=summary["completed_steps"],
                           planned_steps=summary["planned_steps"], file_bytes=file.stat().st_size)
                if summary["seed"] != clip.seed or clip.prompt and summary["prompt"] != clip.prompt:
                    summary["problems"].append(f"holds the capture of prompt {summary['prompt']!r}, seed "
                                               f"{summary['seed']}, where the manifest lists prompt {clip.prompt!r}, "
                                               f"seed {clip.seed}")
                if summary["problems"]:
                    row["state"] = "invalid"
                problems += [f"clip {clip.index} ({clip.file}): {p}" for p in summary["problems"]]
        clips.append(row)
    return {"run_set": str(folder), "dfsviz_version": run_set.dfsviz_version, "created_utc": run_set.created_utc,
            "updated_utc": run_set.updated_utc, "complete": run_set.complete, "settings": run_set.settings,
            "clips": clips, "problems": problems}


def _echo_file(info: dict) -> None:
    width = max(len(k) for k in info)
    for key, value in info.items():
        if key != "problems":
            click.echo(f"{key.ljust(width)}  {value}")
    if not info["complete"]:
        done, planned = len(info["completed_steps"]), len(info["planned_steps"])
        held = (f"{done} of {planned} steps" if done < planned else
                "every planned step is stored, but the run stopped before it ended (a pixel model's clip is "
                "written after its last step)")
        click.secho(f"incomplete: {held}; continue with `dfsviz capture ... --resume`", fg="yellow")


def _echo_run_set(info: dict) -> None:
    clips = info["clips"]
    done = sum(c["state"] == "complete" for c in clips)
    click.echo(f"run set         {info['run_set']}")
    click.echo(f"clips           {len(clips)} ({done} complete)")
    for key in ("dfsviz_version", "created_utc", "updated_utc"):
        click.echo(f"{key.ljust(15)} {info[key]}")
    prompt_width = max(6, *(len(c["prompt"]) for c in clips))
    click.echo(f"clip  {'prompt'.ljust(prompt_width)}  {'seed':>6}  {'steps':>7}  state       file")
    for c in clips:
        steps = "-" if c["planned_steps"] is None else f"{len(c['completed_steps'])}/{len(c['planned_steps'])}"
        click.echo(f"{c['index']:<4d}  {c['prompt'].ljust(prompt_width)}  {c['seed']:>6d}  {steps:>7}  "
                   f"{c['state']:<10}  {c['file']}")
    if not info["complete"]:
        click.secho(f"incomplete: {done} of {len(clips)} clips complete; continue with the command that captured it "
                    f"and --resume (`dfsviz capture ... --out {info['run_set']} --resume`)", fg="yellow")

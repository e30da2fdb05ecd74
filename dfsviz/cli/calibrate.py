"""``dfsviz calibrate``: per-(layer, head) DFSAttn budgets, warm-up and refresh interval from captures."""

from __future__ import annotations

from pathlib import Path

import click

from dfsviz.cli import check_output, fail_cleanly, main


def _fmt(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


@main.command(
    "calibrate",
    epilog=(
        "\b\nExamples:\n"
        "  dfsviz calibrate run.h5 --target-recall 0.9 --out dfsattn.json\n"
        "  dfsviz calibrate seed0.h5 seed1.h5 --max-density 0.4 --out dfsattn.json\n"
        "  dfsviz calibrate runs/classes --target-recall 0.9 --out dfsattn.json   # a run set: all its clips\n"
        "  dfsviz calibrate wan.h5 --target-recall 0.95 --method dfs_tile --warmup 12 --out wan-dfsattn.json\n"
        "\b\nThen, in Python (steps told by the pipeline's callback, whatever its CFG batching):\n"
        '  with apply_dfsattn(pipe, "dfsattn.json") as handle:\n'
        "      handle.state.set_step(0)\n"
        "      pipe(prompt, num_inference_steps=20, callback_on_step_end=handle.step_callback)"
    ),
)
@click.argument("captures", nargs=-1, required=True, type=click.Path())
@click.option("--target-recall", type=float, default=None,
              help="Recall every sparse (layer, head) keeps, e.g. 0.9; the plan with the least attention work wins.")
@click.option("--max-density", type=float, default=None,
              help="Attention work of the whole run as a fraction of dense (warm-up steps count 1); "
                   "the plan with the best recall wins.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Config file to write (JSON).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out (only a DFSAttn config is replaced).")
@click.option("--order", default=None, help="Token order (default hilbert3d when captured).")
@click.option("--method", default=None, help="Scoring method (default: every captured method, the best kept).")
@click.option("--branch", type=click.Choice(["cond", "uncond"]), default="cond", show_default=True, help="CFG branch.")
@click.option("--warmup", "warmup_steps", type=int, default=None, help="Fix the dense warm-up steps (default: choose).")
@click.option("--interval", type=int, default=None, help="Fix the refresh interval in steps (default: choose).")
@click.option("--dense-above", type=float, default=None,
              help="Heads needing a larger kept fraction run dense (default 0.85, the kernel's break-even).")
@click.option("--refresh-cost", type=float, default=None,
              help="Work of one mask refresh, in dense attention calls of the layer (default 0.05).")
@click.option("--allow-incomplete", is_flag=True,
              help="Calibrate on the complete clips of a run set whose other clips are not complete.")
@fail_cleanly
def calibrate_command(captures, target_recall, max_density, out, overwrite, order, method, branch, warmup_steps,
                      interval, dense_above, refresh_cost, allow_incomplete):
    """Calibrate DFSAttn from one or more CAPTURES of one model at one resolution.

    A CAPTURE is a capture file or a run-set directory (``dfsviz capture --seeds/--prompts``),
    which stands for its clips' files.

    Decides a kept fraction gamma per (layer, head) (or dense), the dense warm-up steps, the
    refresh interval and the scoring method from the stored block mass, scores and their drift
    over the captured steps, and writes them with their predicted recall and density to OUT
    (docs/calibration.md). Several captures (prompts, seeds) are pooled; the summary shows the
    spread of the predicted recall across them.
    """
    from dfsviz.accel.plan import check_replaceable
    from dfsviz.analysis.calibrate import CalibrationConfig, calibrate

    check_output(out, "--out")
    if Path(out).exists() and not overwrite:
        raise ValueError(f"`--out` {out!r} exists; pass --overwrite to replace it")
    check_replaceable(out)  # before any work, as save() checks it again: only a DFSAttn config is replaced
    tuning = {k: v for k, v in (("dense_above", dense_above), ("refresh_cost", refresh_cost)) if v is not None}
    config = CalibrationConfig(target_recall=target_recall, max_density=max_density, order=order, method=method,
                               branch=branch, warmup_steps=warmup_steps, interval=interval, **tuning)
    result = calibrate(list(captures), config, progress=True, allow_incomplete=allow_incomplete)
    path = result.save(out)
    plan, p = result.plan, result.plan.predicted
    goal = (f"every head's recall >= {target_recall:g}" if target_recall is not None
            else f"attention work <= {max_density:g} of dense")
    click.echo(f"wrote {path}: {plan.model.id} ({plan.model.cls}), grid {plan.grid.name}, block {plan.block}; "
               f"{len(plan.provenance['captures'])} capture(s) in {result.seconds:.1f} s")
    click.echo(f"goal: {goal}; order {plan.order}, method {plan.method}"
               + ("" if plan.tile is None
                  else f" ({'stride' if plan.method == 'antidiagonal' else 'tile'} {plan.tile})"))
    click.echo(f"schedule: {plan.warmup_steps} dense warm-up step(s) of {plan.num_steps}, refresh every "
               f"{plan.interval} step(s) ({p['refreshes']} refreshes); a cached mask keeps "
               f"{_fmt(p['reuse_factor'])} of a fresh mask's recall at its oldest")
    click.echo(f"predicted: sparse steps recall {_fmt(p['mean_recall'])} at density {_fmt(p['mean_density'])}; "
               f"whole run recall {_fmt(p['run_recall'])}, attention work {_fmt(p['attention_work'])} of dense")
    if p["dense_query_blocks"]:
        click.echo(f"text query blocks kept dense: {p['dense_query_blocks']}")
    click.echo("layer  mean gamma  recall  density  dense heads  recall range across captures")
    for lb in plan.layers:
        sparse = [g for g in lb.gamma if g is not None]
        gamma = "dense" if not sparse else f"{sum(sparse) / len(sparse):.3f}"
        # Per head the range of its predicted recall over the captures; the layer shows the widest.
        ranges = [max(v) - min(v) for v in ([x for x in r if x is not None] for r in lb.recall_by_clip) if len(v) > 1]
        shown = f"{max(ranges):.3f}" if ranges else "n/a (1 capture)"
        dense = sum(g is None for g in lb.gamma)
        click.echo(f"{lb.layer:<5d}  {gamma:>10s}  {sum(lb.predicted_recall) / len(lb.gamma):6.3f}  "
                   f"{sum(lb.density) / len(lb.gamma):7.3f}  {dense:>5d}/{len(lb.gamma):<5d}  {shown}")
    for name, s in p["methods"].items():
        chosen = " (chosen)" if name == plan.method else ""
        if s is None:
            click.echo(f"method {name}: no plan fits")
        else:
            click.echo(f"method {name}{chosen}: warm-up {s['warmup_steps']}, interval {s['interval']}, recall "
                       f"{_fmt(s['mean_recall'])}, density {_fmt(s['mean_density'])}, work {_fmt(s['attention_work'])}")
    for note in result.notes:
        click.echo(f"note: {note}")

"""``dfsviz report``: the claims report of one capture (Markdown, JSON, figures)."""

from __future__ import annotations

import click

from dfsviz.cli import check_output, fail_cleanly, main


def _fractions(spec: str, option: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in spec.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"`{option}` must be comma-separated fractions in (0, 1], e.g. 0.1,0.2,0.3 (got {spec!r})") from None
    if not values:
        raise ValueError(f"`{option}` must list at least one fraction in (0, 1] (got {spec!r})")
    return values


def _verdicts(data: dict) -> list[tuple[str, dict]]:
    """(claim, verdict) of the report's sections with a verdict, in section order."""
    out = [(f"ordering ablation, {name}", v) for name, v in data["order_ablation"]["verdict"].items()]
    out.append(("tile size", data["tile_size"]["verdict"]))
    out += [(f"recall across steps, {meth}", row["verdict"]) for meth, row in data["step_trend"]["methods"].items()]
    out.append(("text blocks", data["text_blocks"]["verdict"]))
    return out


@main.command(
    "report",
    epilog="\b\nExample:\n  dfsviz report runs/wan.h5 --out runs/wan-report\n"
    "  dfsviz report runs/wan.h5 --out report --budgets 0.1,0.2,0.3 --no-png",
)
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Output folder (created): new, empty, or with --overwrite an earlier report's.")
@click.option("--overwrite", is_flag=True, help="Replace the earlier report in --out (its figures included).")
@click.option("--png/--no-png", default=None, help="Also write PNG figures (needs kaleido, the png extra, and Chromium). Default: when both are found.")
@click.option("--budgets", default="0.1,0.2,0.3", show_default=True, help="Budgets gamma (kept fraction) to tabulate.")
@click.option("--targets", default="0.9,0.95", show_default=True, help="Recall levels whose needed budget is reported.")
@click.option("--method", default=None, help="Method of the drift/schedule analysis (default dfs_tile when captured).")
@click.option("--order", default=None, help="Order of the drift/schedule analysis (default hilbert3d when captured).")
@click.option("--branch", type=click.Choice(["cond", "uncond"]), default="cond", show_default=True, help="CFG branch.")
@click.option("--atol", default=1e-5, show_default=True, type=float, help="Tolerance of the bound-violation count.")
@click.option("--bound1/--no-bound1", default=True, show_default=True,
              help="Check Bound 1 on layers stored with --save-qkv (an exact O(N^2) pass per step and order).")
@fail_cleanly
def report_command(file, out_dir, overwrite, png, budgets, targets, method, order, branch, atol, bound1):
    """Check the claims of docs/theory.md and the DFSAttn paper on one capture FILE.

    Writes OUT/report.md, OUT/report.json and OUT/figures/*.html (and *.png): bound
    violations (must be 0), Hilbert vs raster factors, recall at fixed budgets with the
    oracle gap, mask drift at the schedule's refresh interval, and the paper's claims
    with a verdict each: the ordering ablation (capture with --orders all), dfs_tile's
    tile size (needs --save-qkv), recall across steps, text blocks. Exit code 1 when a
    bound is violated; exit code 2, before anything is written, when FILE fails
    validation (see `dfsviz inspect`).
    """
    from dfsviz.analysis.report import ReportConfig, build_report, check_report_folder

    check_output(out_dir, "--out", folder=True)
    check_report_folder(out_dir, overwrite)  # before the work: a user's files in --out are never replaced
    config = ReportConfig(budgets=_fractions(budgets, "--budgets"), targets=_fractions(targets, "--targets"),
                          method=method, order=order, branch=branch, atol=atol, bound1=bound1)
    report = build_report(file, config, progress=True)
    written = report.write(out_dir, png=png, overwrite=overwrite)
    v = report.data["violations"]
    click.echo(f"report: {written['markdown'][0]}")
    click.echo(f"json:   {written['json'][0]}")
    click.echo(f"figures: {len(written['html'])} HTML, {len(written['png'])} PNG in {out_dir}/figures")
    status = "PASS" if report.violations == 0 else "FAIL"
    click.echo(f"bound violations: {report.violations} of {v['rows']} rows ({status})")
    b1 = report.data["bound1"]
    if b1 is not None:
        click.echo(f"bound 1: {b1['violations']} violations over {b1['rows']} query rows "
                   f"(Q/K of layers {b1['layers']} at steps {b1['steps']})")
    comparison = report.data["order_comparison"]
    if comparison is not None:
        for row in comparison["rows"][:2]:
            if row["relative_change"] is not None:
                click.echo(f"{row['factor']}: raster {row['base_mean']:.3f} -> hilbert3d {row['other_mean']:.3f} "
                           f"({100 * row['relative_change']:+.1f}%)")
    gammas = report.data["config"]["budgets"]
    for row in report.data["recall"]:
        cells = ", ".join(f"{row['recall'][f'{g:g}']:.3f} @ {g:g}" for g in gammas)
        click.echo(f"recall {row['method']} · {row['order']}: {cells}")
    for claim, verdict in _verdicts(report.data):
        click.echo(f"{claim}: {verdict['verdict']} ({verdict['reason']})")
    for note in report.notes:
        click.echo(f"note: {note}")
    if report.violations:
        raise SystemExit(1)

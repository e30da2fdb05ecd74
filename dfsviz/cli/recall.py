"""``dfsviz recall``: recall against budget per token order and scoring method, on token-model Q/K."""

from __future__ import annotations

import json
import math
import time

import click

from dfsviz.analysis.measures import ORACLE, measure_orders
from dfsviz.cli import fail_cleanly, main, parse_names
from dfsviz.sparse._validate import check_block, check_fraction
from dfsviz.sparse.grid import LatentGrid
from dfsviz.sparse.orders import ORDERS, order_names
from dfsviz.sparse.scoring import SCORERS, scorer_key, scorer_names
from dfsviz.sparse.tokenmodel import TokenModelConfig, sample_qk


def _parse_gammas(spec: str) -> list[float]:
    try:
        values = [float(text) for text in spec.split(",") if text.strip()]
    except ValueError:
        raise ValueError(f"`--gammas` must be comma-separated fractions in (0, 1], e.g. 0.1,0.2,0.3 (got {spec!r})") from None
    if not values:
        raise ValueError(f"`--gammas` must list at least one fraction in (0, 1], e.g. 0.1,0.2,0.3 (got {spec!r})")
    return [check_fraction(value, "--gammas") for value in values]


def _sweep(
    config: TokenModelConfig, orders: list[str], methods: list[str], gammas: list[float], block: int, tile: int | None
) -> dict:
    """Recall, Bound 2 and density of top-k masks for every order x method x budget; the oracle row last."""
    ranked = [m for m in methods if m != ORACLE] + [ORACLE]
    result: dict = {"orders": {}}
    for measured in measure_orders(*sample_qk(config), config.grid, orders, ranked, gammas, block=block, tile=tile):
        rows = {}
        for method, per_budget in measured.topk.items():
            row: dict[str, list[float]] = {"recall": [], "bound2": [], "bound3": [], "density": [], "effective_gap": []}
            for topk in per_budget:
                factors = topk.factors
                row["recall"].append(float((topk.oracle_recall if method == ORACLE else topk.recall).mean()))
                row["bound2"].append(float(factors["bound2"].mean()))
                row["bound3"].append(float(factors["bound3"].mean()))
                row["density"].append(float(topk.density.mean()))
                # +/-inf (all kept / none kept) is not JSON: report it as null.
                gap = float(factors["effective_gap"].median())
                row["effective_gap"].append(gap if math.isfinite(gap) else None)
            rows[ORACLE if method == ORACLE else scorer_key(method, tile)] = row
        result["orders"][measured.order] = {"W_q": float(measured.W_q.mean()), "W_k": float(measured.W_k.mean()),
                                            "rows": rows}
    return result


def _table(result: dict, gammas: list[float]) -> str:
    sub = ("R", "bnd2", "rho")
    head = ["order", "method"] + [f"g={g:.2f}" for g in gammas]
    body = []
    for name, entry in result["orders"].items():
        for label, row in entry["rows"].items():
            cells = ["  ".join(f"{row[key][i]:.3f}" for key in ("recall", "bound2", "density")) for i in range(len(gammas))]
            body.append([name, label, *cells])
    cell_w = max(len("  ".join(["0.000"] * 3)), *(len(h) for h in head[2:]))
    w0 = max(len(head[0]), *(len(r[0]) for r in body))
    w1 = max(len(head[1]), *(len(r[1]) for r in body))

    def line(texts: list[str]) -> str:
        return "  ".join([texts[0].ljust(w0), texts[1].ljust(w1), *(t.ljust(cell_w) for t in texts[2:])]).rstrip()

    subline = line(["", "", *(["  ".join(s.ljust(5) for s in sub)] * len(gammas))])
    return "\n".join([line(head), subline, *(line(r) for r in body)])


@main.command(
    "recall",
    epilog=(
        "\b\nExample:\n  dfsviz recall --grid 13x24x40 --heads 2 --head-dim 64 --orders raster,hilbert3d \\\n"
        "      --methods meanpool,dfs_tile,oracle --gammas 0.1,0.2,0.3 --delta 0.3 --seed 0"
    ),
)
@click.option("--grid", "grid_spec", default="13x24x40", show_default=True, help="Latent grid FRAMESxHEIGHTxWIDTH in tokens.")
@click.option("--heads", default=2, show_default=True, type=int, help="Heads H drawn from the token model.")
@click.option("--head-dim", default=64, show_default=True, type=int, help="Head dimension D.")
@click.option("--block", default=128, show_default=True, type=int, help="Tokens per block, a power of two in [16, 256].")
@click.option("--tile", default=None, type=int, help="dfs_tile tile / antidiagonal stride (default: the method's own).")
@click.option("--orders", "orders_spec", default="raster,hilbert3d", show_default=True,
              help=f"Comma-separated token orders from: {','.join(order_names())}, or all.")
@click.option("--methods", "methods_spec", default="meanpool,dfs_tile,oracle", show_default=True,
              help=f"Comma-separated scoring methods from: {','.join(scorer_names())}, or all (the oracle row is always shown).")
@click.option("--gammas", "gammas_spec", default="0.1,0.2,0.3", show_default=True,
              help="Comma-separated budgets gamma (kept fraction of key blocks, top-k with k = max(1, int(gamma*Mk))).")
@click.option("--regions", default=4, show_default=True, type=int, help="Moving regions of the token model.")
@click.option("--delta", default=0.3, show_default=True, type=float, help="Token-model noise std (diversity).")
@click.option("--centre-spread", default=1.5, show_default=True, type=float, help="Class-centre spread (gap).")
@click.option("--locality", default=1.0, show_default=True, type=float, help="Positional-feature amplitude a.")
@click.option("--speed", default=1.0, show_default=True, type=float, help="Region motion, tokens per frame.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the token-model draw.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the table.")
@fail_cleanly
def recall_command(
    grid_spec: str,
    heads: int,
    head_dim: int,
    block: int,
    tile: int | None,
    orders_spec: str,
    methods_spec: str,
    gammas_spec: str,
    regions: int,
    delta: float,
    centre_spread: float,
    locality: float,
    speed: float,
    seed: int,
    as_json: bool,
) -> None:
    """Recall of top-k block masks against the budget, per token order and scoring method.

    Draws Q/K from the token model of docs/theory.md (moving regions on the grid), reorders
    them, and for every budget gamma prints per method the recall R (exact, from the
    block mass m), the Bound 2 lower bound (bnd2, mean over query blocks) and the
    density rho of the top-k mask, averaged over heads; the oracle row is the best any
    mask of that budget can reach.
    """
    config = TokenModelConfig(
        LatentGrid.parse(grid_spec),
        heads=heads,
        head_dim=head_dim,
        num_regions=regions,
        delta=delta,
        centre_spread=centre_spread,
        locality=locality,
        speed=speed,
        seed=seed,
    )
    check_block(block)
    orders = parse_names(orders_spec, "--orders", list(ORDERS))
    methods = parse_names(methods_spec, "--methods", list(SCORERS))
    gammas = _parse_gammas(gammas_spec)
    start = time.perf_counter()
    result = _sweep(config, orders, methods, gammas, block, tile)
    seconds = time.perf_counter() - start
    grid = config.grid
    blocks = -(-grid.num_tokens // block)
    if as_json:
        meta = {
            "model": config.name,
            "grid": grid.name,
            "tokens": grid.num_tokens,
            "block": block,
            "blocks": blocks,
            "heads": heads,
            "head_dim": head_dim,
            "gammas": gammas,
            "seconds": seconds,
        }
        click.echo(json.dumps({**meta, **result}, indent=2))
        return
    click.echo(
        f"token model {config.name}\nN = {grid.num_tokens} tokens, {blocks} blocks of {block}, H = {heads}, "
        f"D = {head_dim}, top-k masks, means over heads\n"
        "R = recall, bnd2 = Bound 2 lower bound (mean over query blocks), rho = density"
    )
    click.echo(_table(result, gammas))
    click.echo(
        "intra-block variance ratio: "
        + ", ".join(f"{name} W_q {e['W_q']:.3f} W_k {e['W_k']:.3f}" for name, e in result["orders"].items())
        + f"  ({seconds:.1f} s)"
    )

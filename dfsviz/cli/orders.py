"""``dfsviz orders``: locality of every registered token order on one latent grid."""

from __future__ import annotations

import json
import time

import click

from dfsviz.cli import fail_cleanly, main, parse_names
from dfsviz.sparse._validate import check_block
from dfsviz.sparse.grid import LatentGrid
from dfsviz.sparse.orders import ORDERS, locality_report, make_order, order_names

# (report key, column header, format) of the table, in print order
_COLUMNS = (
    ("order", "order", "{}"),
    ("blocks", "blocks", "{}"),
    ("bbox_volume", "bbox_volume", "{:.1f}"),
    ("sq_spread", "sq_spread", "{:.2f}"),
    ("frames_per_block", "frames/block", "{:.2f}"),
    ("raster_runs", "raster_runs", "{:.1f}"),
    ("max_jump", "max_jump", "{}"),
    ("build_ms", "build_ms", "{:.1f}"),
)


def _table(rows: list[dict], header: str) -> str:
    cells = [[fmt.format(row[key]).strip() for key, _, fmt in _COLUMNS] for row in rows]
    titles = [title for _, title, _ in _COLUMNS]
    widths = [max(len(text) for text in column) for column in zip(titles, *cells)]

    def line(texts: list[str]) -> str:
        # order names left-aligned, numbers right-aligned
        return "  ".join(t.ljust(w) if i == 0 else t.rjust(w) for i, (t, w) in enumerate(zip(texts, widths)))

    return "\n".join([header, line(titles), *(line(row) for row in cells)])


@main.command(
    "orders",
    epilog="\b\nExample:\n  dfsviz orders --grid 21x45x80 --block 128 --orders raster,hilbert3d",
)
@click.option("--grid", "grid_spec", required=True, help="Latent grid FRAMESxHEIGHTxWIDTH in tokens, e.g. 21x45x80.")
@click.option(
    "--block", default=128, show_default=True, type=int, help="Tokens per block, a power of two in [16, 256]."
)
@click.option("--text-len", default=0, show_default=True, type=int, help="Text tokens sharing the sequence.")
@click.option("--text-first", is_flag=True, help="Text tokens precede the video (CogVideoX); default after it.")
@click.option(
    "--orders",
    "orders_spec",
    default=None,
    help=f"Comma-separated orders to report, or all (the default): {','.join(order_names())}.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the table.")
@fail_cleanly
def orders_command(
    grid_spec: str, block: int, text_len: int, text_first: bool, orders_spec: str | None, as_json: bool
) -> None:
    """Measure how compact each token order's blocks are in (frame, row, column).

    For every order: number of blocks, mean bounding-box volume and mean squared
    spread of a block's tokens around their centroid (grid cells), mean distinct
    frames per block, mean runs of consecutive raster positions per block (the
    contiguous pieces of a raster-order tensor that one block reads), largest L1
    jump between consecutive tokens (video tokens only) and the time to build the
    permutation.
    """
    grid = LatentGrid.parse(grid_spec, text_len=text_len, text_first=text_first)
    check_block(block)
    names = order_names() if orders_spec is None else list(parse_names(orders_spec, "--orders", order_names()))
    rows = []
    for name in names:
        start = time.perf_counter()
        ORDERS[name](grid)
        build_ms = (time.perf_counter() - start) * 1e3
        row = locality_report(make_order(name, grid), block=block)
        row["build_ms"] = build_ms
        rows.append(row)
    if as_json:
        click.echo(json.dumps({"grid": grid.name, "block": block, "orders": rows}, indent=2))
    else:
        header = f"grid {grid.name} ({grid.num_video} video + {grid.text_len} text tokens), block {block}"
        click.echo(_table(rows, header))

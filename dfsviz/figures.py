"""Pure plotly figure builders shared by the claims report, the notebooks and the dashboard.

Every builder takes arrays (NumPy or torch) and plain Python values and returns a
``plotly.graph_objects.Figure``; none reads files, logs or prints. Symbols follow
``docs/theory.md``: block mass m, budget gamma (kept fraction), recall R, the effective gap
Delta - 2r - J, the intra-block variance ratios W_q and W_k.

Builders:

* :func:`mask_heatmap` - log10 block mass of one head (an image), kept blocks outlined or
  shaded (:func:`kept_blocks_layer` draws the mask alone, to redraw it over a map built once;
  :func:`query_row_shape` marks one query block's row as a layout shape).
* :func:`recall_budget` - recall against budget per method and order, oracle on top.
* :func:`bound_scatter` - a recall bound against the measured recall, with y = x.
* :func:`recall_vs_gap` - measured recall against the effective gap, with Bound 3.
* :func:`factor_distributions` - one factor per group (order, method, ...): violin/box/histogram.
* :func:`drift_heatmap` - an s x t matrix of a mask chosen at step s used at step t.
* :func:`recall_grid_figure` - recall per layer x step, one panel per scoring method.
* :func:`footprint_frames` - per-frame heatmaps of one query block's attention in video space
  (:func:`footprint_outlines` draws a token set's outlines alone, on the same panels).
* :func:`footprint_mosaic` - the same, every frame tiled in one heatmap (one plot for the
  browser to draw; :func:`footprint_mosaic_outline` gives an outline alone, a layout shape).
* :func:`schedule_figure` - the DFSAttn budget per step, refreshes, and measured recall/density.
* :func:`sweep_lines` - a token-model sweep: one line per order.
* :func:`calibration_heatmap` - a calibrated plan's γ, predicted recall or density per (layer, head).
* :func:`cached_mask_decay` - the recall a cached mask keeps against steps since its refresh.
* :func:`method_comparison` - each scoring method's best calibrated plan: work, recall, density.
* :func:`schedule_candidates` - every (warm-up, interval) a calibration weighed.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go
import torch

from dfsviz.sparse.grid import LatentGrid
from dfsviz.sparse.theory import closed_form_bound

__all__ = [
    "FACTOR_LABELS",
    "DISTRIBUTION_KINDS",
    "KEPT_STYLES",
    "OUTLINE_MAX_BLOCKS",
    "bound3_curve",
    "mask_heatmap",
    "kept_blocks_layer",
    "kept_caption",
    "query_row_shape",
    "recall_budget",
    "bound_scatter",
    "recall_vs_gap",
    "factor_distributions",
    "drift_heatmap",
    "footprint_frames",
    "footprint_frame_indices",
    "footprint_outlines",
    "footprint_mosaic",
    "footprint_mosaic_outline",
    "recall_grid_figure",
    "schedule_figure",
    "sweep_lines",
    "outline_segments",
    "CALIBRATION_QUANTITIES",
    "calibration_heatmap",
    "cached_mask_decay",
    "method_comparison",
    "method_label",
    "schedule_candidates",
]

#: Axis titles of the quantities of docs/theory.md, keyed by the names used in factor tables.
FACTOR_LABELS: dict[str, str] = {
    "gap": "inter-block gap Δ",
    "r_u": "query-side diversity r",
    "J_u": "block diversity J",
    "effective_gap": "effective gap Δ − 2r − J",
    "delta": "token-model noise δ",
    "centre_spread": "token-model centre spread s",
    "W_q": "intra-block variance ratio W_q",
    "W_k": "intra-block variance ratio W_k",
    "recall": "recall R",
    "bound2": "Bound 2 β",
    "bound3": "Bound 3 (closed form)",
    "gamma": "budget γ (kept fraction)",
    "density": "density ρ",
}

#: Plot kinds accepted by :func:`factor_distributions`.
DISTRIBUTION_KINDS = ("violin", "box", "histogram")

# Qualitative palette (plotly's default) so a label keeps its colour across figures.
_PALETTE = (
    "#636EFA", "#EF553B", "#00CC96", "#AB63FA", "#FFA15A",
    "#19D3F3", "#FF6692", "#B6E880", "#FF97FF", "#FECB52",
)
_ORACLE_COLOUR = "#111111"
_OUTLINE_COLOUR = "#FFFFFF"
_QUERY_COLOUR = "#00E5FF"
# Outline points above which a WebGL trace replaces the SVG one.
_WEBGL_POINTS = 30000

#: Ways :func:`kept_blocks_layer` draws the kept blocks of a mask.
KEPT_STYLES = ("outline", "shade", "auto")
#: Largest key-block count that ``style="auto"`` outlines; above it kept blocks are shaded:
#: at 256 blocks a cell is 1-2 px, an outline per kept cell is invisible and its ~1e5 line
#: vertices would triple a dashboard response (about 2.5 MB per map).
OUTLINE_MAX_BLOCKS = 64


# --------------------------------------------------------------------------- helpers
def _array(x: object, name: str, ndim: int | None = None, dtype=np.float64) -> np.ndarray:
    """NumPy copy of an array-like (torch tensors are detached and moved to the CPU)."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu().numpy()
    try:
        arr = np.asarray(x, dtype=dtype)
    except (TypeError, ValueError):
        raise TypeError(f"`{name}` must be an array of numbers (got {type(x).__name__})") from None
    if ndim is not None and arr.ndim != ndim:
        raise ValueError(f"`{name}` must have {ndim} dimension(s) (got shape {arr.shape})")
    return arr


def _colour(i: int) -> str:
    return _PALETTE[i % len(_PALETTE)]


def _log10(x: np.ndarray, floor: float) -> np.ndarray:
    """log10 with values below ``floor`` (zeros included) clamped to it, so log colour scales stay finite."""
    return np.log10(np.maximum(x, floor))


def _check_floor(floor: object) -> float:
    if isinstance(floor, bool) or not isinstance(floor, (int, float)) or not 0.0 < float(floor) < 1.0:
        raise ValueError(f"`floor` must be a number in (0, 1), the smallest value drawn on the log scale (got {floor!r})")
    return float(floor)


def _runs(edges: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(line, start, stop) of every run of True along the last axis of a bool [L, K] array.

    ``stop`` is exclusive; runs come sorted by line, then by start.
    """
    padded = np.zeros((edges.shape[0], edges.shape[1] + 2), dtype=np.int8)
    padded[:, 1:-1] = edges
    diff = np.diff(padded, axis=1)
    # np.nonzero walks in C order, so the k-th start and the k-th stop belong to one run
    line, start = np.nonzero(diff == 1)
    _, stop = np.nonzero(diff == -1)
    return line, start, stop


def outline_segments(kept: object) -> tuple[np.ndarray, np.ndarray]:
    """Boundary of the True cells of a bool [R, C] grid as line segments.

    Cell (row u, column v) covers [v - 0.5, v + 0.5] x [u - 0.5, u + 0.5], the way plotly
    draws heatmap cells. An edge is drawn wherever a kept cell meets a dropped cell or the
    border; collinear neighbouring edges are merged into one segment so a kept rectangle
    costs four segments whatever its size.

    Returns ``(xs, ys)``: float32 [3 * S] coordinates for one ``go.Scatter`` trace, each of
    the S segments two points followed by NaN (plotly breaks a line at NaN). Arrays, not
    lists: plotly validates and serialises them in bulk, ~10x faster at 256 x 256 blocks;
    float32 holds every half-integer coordinate below 2**22 exactly.
    """
    arr = _array(kept, "kept", ndim=2, dtype=bool)
    rows, cols = arr.shape
    padded = np.zeros((rows + 2, cols + 2), dtype=bool)
    padded[1:-1, 1:-1] = arr
    # Horizontal edges: between padded rows i and i + 1, i.e. at y = i - 0.5 in cell coordinates.
    h_line, h_start, h_stop = _runs(padded[:-1, 1:-1] != padded[1:, 1:-1])
    # Vertical edges: between padded columns j and j + 1, i.e. at x = j - 0.5 (runs along rows).
    v_line, v_start, v_stop = _runs((padded[1:-1, :-1] != padded[1:-1, 1:]).T)
    nh = h_line.size
    xs = np.full((nh + v_line.size, 3), np.nan, dtype=np.float32)
    ys = np.full_like(xs, np.nan)
    xs[:nh, 0], xs[:nh, 1] = h_start - 0.5, h_stop - 0.5
    ys[:nh, 0] = ys[:nh, 1] = h_line - 0.5
    xs[nh:, 0] = xs[nh:, 1] = v_line - 0.5
    ys[nh:, 0], ys[nh:, 1] = v_start - 0.5, v_stop - 0.5
    return xs.ravel(), ys.ravel()


def _outline_trace(kept: np.ndarray, *, name: str, colour: str, width: float, **axes: str) -> go.Scatter | go.Scattergl:
    """One line trace outlining the True cells of bool [R, C] ``kept`` (see :func:`outline_segments`)."""
    xs, ys = outline_segments(kept)
    # Scattered masks of Wan-size maps have ~1e5 edges; WebGL draws those where SVG stalls.
    trace = go.Scattergl if xs.size > _WEBGL_POINTS else go.Scatter
    return trace(x=xs, y=ys, mode="lines", line={"color": colour, "width": width}, name=name,
                 hoverinfo="skip", showlegend=False, **axes)


def bound3_curve(eff_gap: object, gamma: float) -> np.ndarray:
    """Bound 3 of docs/theory.md in closed form, 1 / (1 + ((1 - gamma) / gamma) * exp(-eff_gap)), as NumPy.

    ``eff_gap``: float array of Delta - 2r - J values; ``gamma`` in (0, 1]. Returns float64 of
    the same shape (computed by :func:`dfsviz.sparse.theory.closed_form_bound`); at
    eff_gap = 0 it equals gamma.
    """
    x = _array(eff_gap, "eff_gap")
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0.0 < float(gamma) <= 1.0:
        raise ValueError(f"`gamma` must be a kept fraction in (0, 1] (got {gamma!r})")
    return closed_form_bound(float(gamma), torch.from_numpy(x)).numpy()


# --------------------------------------------------------------------------- masks
@functools.cache
def _viridis_palette() -> np.ndarray:
    """uint8 [256, 3]: entry 0 unused (transparent), entries 1..255 Viridis from its low to its
    high end, interpolated as plotly interpolates a colour scale."""
    from plotly.colors import sample_colorscale

    rgb = sample_colorscale("Viridis", np.linspace(0.0, 1.0, 255).tolist(), colortype="rgb")
    palette = np.zeros((256, 3), dtype=np.uint8)
    palette[1:] = [[int(c) for c in colour[4:-1].split(",")] for colour in rgb]
    return palette


def _png_uri(pixels: np.ndarray, palette: np.ndarray, alpha: np.ndarray) -> str:
    """``data:`` URI of an 8-bit palette PNG: ``pixels`` uint8 [R, C] indices into ``palette``
    (uint8 [256, 3]) with ``alpha`` (uint8 [256]) per index. One byte per cell: a 256 x 256
    block map is a few tens of kB, and the browser decodes it instead of colouring cells."""
    import base64
    import io

    from PIL import Image

    image = Image.fromarray(pixels)  # mode "L"; putpalette makes it "P"
    image.putpalette(palette.ravel().tolist())
    image.info["transparency"] = bytes(alpha.tolist())
    buf = io.BytesIO()
    # level 1: faster than the default 6 and no larger on a 256 x 256 block map (6.5 vs 8 ms, 48 vs 50 kB)
    image.save(buf, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _viridis_png(z: np.ndarray, zmin: float, zmax: float) -> str:
    """Float [R, C] values coloured with Viridis over [zmin, zmax] (NaN transparent), as a PNG URI."""
    unit = (z - zmin) / (zmax - zmin) if zmax > zmin else np.zeros_like(z)
    pixels = (np.rint(np.clip(np.nan_to_num(unit, nan=0.0), 0.0, 1.0) * 254) + 1).astype(np.uint8)
    pixels[np.isnan(z)] = 0
    alpha = np.full(256, 255, dtype=np.uint8)
    alpha[0] = 0
    return _png_uri(pixels, _viridis_palette(), alpha)


def _image(z: np.ndarray, zmin: float, zmax: float, *, name: str, hovertemplate: str) -> go.Image:
    """float [R, C] ``z`` drawn as an image (cell (r, c) at x = c, y = r), its values in
    ``customdata`` for the hover and the CSV."""
    return go.Image(source=_viridis_png(z, zmin, zmax), x0=0, y0=0, dx=1, dy=1, name=name, customdata=z,
                    hovertemplate=hovertemplate)


def _colour_bar(zmin: float, zmax: float, title: str) -> go.Scatter:
    """A trace with no points that draws the Viridis colour bar of an image over [zmin, zmax]
    (image traces have none)."""
    return go.Scatter(x=[None], y=[None], mode="markers", name=f"{title} colour scale", hoverinfo="skip",
                      showlegend=False, marker={"colorscale": "Viridis", "cmin": zmin, "cmax": zmax, "color": [zmin],
                                                "showscale": True, "colorbar": {"title": {"text": title}}})


def _viridis_scale() -> list[list]:
    """plotly's Viridis as the [[position, colour], ...] list a checked colour scale holds."""
    from plotly.colors import sequential

    return [[i / (len(sequential.Viridis) - 1), c] for i, c in enumerate(sequential.Viridis)]


def _white_figure(traces: list, layout: dict) -> go.Figure:
    """A figure of checked traces (built as ``go`` objects) and a layout dict of this module,
    with the plotly_white template, put together without checking them again: plotly would
    copy and check the whole template (every trace type's defaults) for each figure, ~30 ms on
    a busy 2-core machine and the bulk of a dashboard view's server time. The layout dicts
    spell titles out as {"text": ...}, as a checked layout holds them; the tests rebuild each
    figure with checking and compare."""
    import plotly.io as pio

    return go.Figure(data=traces, layout={**layout, "template": pio.templates["plotly_white"]}, _validate=False)


def _check_zrange(zrange: object) -> tuple[float, float]:
    ok = isinstance(zrange, (tuple, list)) and len(zrange) == 2 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in zrange)
    if not ok or not zrange[0] < zrange[1]:
        raise ValueError(f"`zrange` must be two finite numbers low < high, the log10 colour range (got {zrange!r})")
    return float(zrange[0]), float(zrange[1])


def _outline_shape(kept: np.ndarray, *, name: str, colour: str, width: float) -> dict:
    """A layout shape outlining the True cells of bool [R, C] ``kept`` (see :func:`outline_segments`):
    one SVG path "Mx,yLx,y..." in data coordinates. A browser draws a path at once, where a line
    trace of as many NaN-separated segments costs it tens of ms."""
    xs, ys = outline_segments(kept)
    ends = np.stack([xs[0::3], ys[0::3], xs[1::3], ys[1::3]], axis=1).astype(np.float64)
    path = "".join(f"M{a:g},{b:g}L{c:g},{d:g}" for a, b, c, d in ends.tolist())
    return {"type": "path", "path": path, "xref": "x", "yref": "y", "name": name, "line": {"color": colour, "width": width}}


def kept_blocks_layer(kept: object, *, style: str = "outline") -> tuple[list[go.Image], list[dict]]:
    """What draws a block mask's kept blocks over a :func:`mask_heatmap`: (traces, layout shapes).

    Args:
        kept: bool [Mq, Mk], True where key block v is kept for query block u
            (``BlockMask.to_dense()[b, h]``).
        style: one of ``KEPT_STYLES``: "outline" draws the boundary of the kept blocks in
            white, one SVG path shape; "shade" lays a half-transparent white image
            over them (an ``Image`` trace); "auto" outlines up to ``OUTLINE_MAX_BLOCKS`` key
            blocks and shades above.

    Returns ([], [the path shape]) or ([the image], []), each named "kept blocks" (the image
    skips hover, so CSV exports leave it out). Use it to redraw only the mask over a map built
    once (the dashboard does).
    """
    if style not in KEPT_STYLES:
        raise ValueError(f"`style` must be one of {', '.join(KEPT_STYLES)} (got {style!r})")
    dense = _array(kept, "kept", ndim=2, dtype=bool)
    if style == "auto":
        style = "outline" if dense.shape[1] <= OUTLINE_MAX_BLOCKS else "shade"
    if style == "shade":
        palette = np.zeros((256, 3), dtype=np.uint8)
        palette[1] = 255
        alpha = np.zeros(256, dtype=np.uint8)
        alpha[1] = 153  # 60% white, as the shaded heatmap drew it
        image = go.Image(source=_png_uri(dense.astype(np.uint8), palette, alpha), x0=0, y0=0, dx=1, dy=1,
                         name="kept blocks", hoverinfo="skip")
        return [image], []
    return [], [_outline_shape(dense, name="kept blocks", colour=_OUTLINE_COLOUR, width=1)]


def query_row_shape(query_block: int, num_kv_blocks: int) -> dict:
    """A layout shape outlining query block u's row of a block map (:func:`mask_heatmap`) in cyan.

    Args:
        query_block: the row u, an integer >= 0.
        num_kv_blocks: Mk, the map's key blocks (the row's length), >= 1.

    Returns a plotly shape dict for ``layout.shapes``: a marker that a page can move by
    updating the layout alone, without sending the map again (the dashboard marks the row
    whose footprint it shows). :func:`mask_heatmap` marks its ``query_block`` with it.
    """
    for name, value, low in (("query_block", query_block, 0), ("num_kv_blocks", num_kv_blocks, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"`{name}` must be an integer >= {low} (got {value!r})")
    return {"type": "rect", "xref": "x", "yref": "y", "x0": -0.5, "x1": int(num_kv_blocks) - 0.5,
            "y0": int(query_block) - 0.5, "y1": int(query_block) + 0.5, "line": {"color": _QUERY_COLOUR, "width": 2},
            "fillcolor": "rgba(0,0,0,0)", "name": f"query block {int(query_block)}"}


def kept_caption(kept: object) -> str:
    """"kept 12.3% of blocks": the share of True cells of bool [Mq, Mk] ``kept``, as mask titles give it."""
    dense = _array(kept, "kept", dtype=bool)
    return f"kept {float(dense.mean()) if dense.size else 0.0:.1%} of blocks"


def mask_heatmap(
    mass: object,
    kept: object | None = None,
    *,
    title: str = "",
    floor: float = 1e-6,
    query_block: int | None = None,
    kept_style: str = "outline",
    zrange: tuple[float, float] | None = None,
) -> go.Figure:
    """Log10 block mass of one head with the kept key blocks outlined (or shaded).

    Args:
        mass: float [Mq, Mk], block mass m_uv (rows sum to 1) or any non-negative block score.
        kept: bool [Mq, Mk] or None; True where key block v is kept for query block u
            (``BlockMask.to_dense()[b, h]``), drawn by :func:`kept_blocks_layer`.
        title: figure title.
        floor: smallest value drawn; zeros and smaller values get this colour.
        query_block: optional query block u whose row is outlined (:func:`query_row_shape`).
        kept_style: how ``kept`` is drawn, one of ``KEPT_STYLES`` (see :func:`kept_blocks_layer`).
        zrange: (low, high) of the log10 colour scale, e.g. one range for two maps side by
            side; default: the map's own minimum and maximum.

    Returns a figure whose first trace is an ``Image`` named "log10 block mass" (row u =
    query block from the top, column v = key block; the values log10 m as float32 in
    ``customdata``, shown by the hover), then a pointless ``Scatter`` that draws its colour
    bar, then the kept blocks' image for the "shade" style; the kept blocks' outline and the
    query row are ``layout.shapes``.
    """
    m = _array(mass, "mass", ndim=2)
    floor = _check_floor(floor)
    if np.isnan(m).any() or (m < 0).any():
        raise ValueError("`mass` must be non-negative and free of NaN (got negative or NaN entries); pass block mass m or a softmax score")
    # float32: hover shows 2 decimals; halves what the dashboard sends at 256 x 256 blocks
    z = _log10(m, floor).astype(np.float32)
    zmin, zmax = _check_zrange(zrange) if zrange is not None else (float(z.min()), float(z.max()))
    traces = [_image(z, zmin, zmax, name="log10 block mass",
                     hovertemplate="query block %{y}<br>key block %{x}<br>log10 m = %{customdata:.2f}<extra></extra>"),
              _colour_bar(zmin, zmax, "log10 m")]
    shapes: list[dict] = []
    if kept is not None:
        dense = _array(kept, "kept", ndim=2, dtype=bool)
        if dense.shape != m.shape:
            raise ValueError(f"`kept` must have the shape of `mass` {m.shape} (got {dense.shape}); pass mask.to_dense()[b, h]")
        layer, shapes = kept_blocks_layer(dense, style=kept_style)
        traces += layer
        title = f"{title} · {kept_caption(dense)}" if title else kept_caption(dense)
    if query_block is not None:
        if isinstance(query_block, bool) or not isinstance(query_block, int) or not 0 <= query_block < m.shape[0]:
            raise ValueError(f"`query_block` must be an integer in [0, {m.shape[0]}) (got {query_block!r})")
        shapes = [*shapes, query_row_shape(query_block, m.shape[1])]
    layout = {"title": {"text": title}, "margin": {"t": 50}, "shapes": shapes,
              "xaxis": {"title": {"text": "key block v"}, "constrain": "domain", "range": [-0.5, m.shape[1] - 0.5]},
              "yaxis": {"title": {"text": "query block u"}, "autorange": "reversed", "scaleanchor": "x",
                        "constrain": "domain"}}
    return _white_figure(traces, layout)


# --------------------------------------------------------------------------- recall curves
def _curve_xy(value: object, label: str) -> tuple[np.ndarray, np.ndarray]:
    """(gamma, recall) of a RecallCurve-like object (``.gamma``, ``.mean_recall()``) or a pair."""
    if hasattr(value, "gamma") and hasattr(value, "mean_recall"):
        return _array(value.gamma, f"{label}.gamma", ndim=1), _array(value.mean_recall(), f"{label}.recall", ndim=1)
    if isinstance(value, (tuple, list)) and len(value) == 2:
        x = _array(value[0], f"{label} budgets", ndim=1)
        y = _array(value[1], f"{label} recall", ndim=1)
        if x.shape != y.shape:
            raise ValueError(f"curve {label!r}: budgets and recall must have one length (got {x.shape} and {y.shape})")
        return x, y
    raise TypeError(
        f"curve {label!r} must be a RecallCurve or a (gamma, recall) pair of arrays (got {type(value).__name__})"
    )


def recall_budget(
    curves: Mapping[str, object],
    oracle: Mapping[str, object] | None = None,
    *,
    targets: Sequence[float] = (0.9, 0.95),
    title: str = "Recall against budget",
) -> go.Figure:
    """Recall against budget gamma: one line per (method, order), oracle curves on top.

    Args:
        curves: label -> RecallCurve (``dfsviz.analysis.curves``) or (gamma float [K],
            recall float [K]). Labels like ``"dfs_tile · hilbert3d"``.
        oracle: label -> oracle curve (same forms), drawn dashed and black-ish, last so on top.
        targets: recall levels drawn as horizontal dotted lines (e.g. 0.9, 0.95).
        title: figure title.

    Returns a figure with one ``Scatter`` trace per curve (methods first, then oracles).
    """
    if not isinstance(curves, Mapping) or not curves:
        raise ValueError("`curves` must be a non-empty mapping label -> curve; compute them with dfsviz.analysis.recall_curve")
    fig = go.Figure()
    for i, (label, value) in enumerate(curves.items()):
        x, y = _curve_xy(value, label)
        fig.add_trace(go.Scatter(x=x, y=y, mode="lines", name=str(label), line={"color": _colour(i), "width": 2}))
    dashes = ("dash", "dot", "dashdot", "longdash")
    for i, (label, value) in enumerate((oracle or {}).items()):
        x, y = _curve_xy(value, label)
        fig.add_trace(go.Scatter(x=x, y=y, mode="lines", name=str(label),
                                 line={"color": _ORACLE_COLOUR, "width": 2, "dash": dashes[i % len(dashes)]}))
    for t in targets:
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 < float(t) <= 1.0:
            raise ValueError(f"`targets` must hold recall levels in (0, 1] (got {t!r})")
        fig.add_hline(y=float(t), line={"dash": "dot", "color": "#888888", "width": 1},
                      annotation_text=f"R = {float(t):g}", annotation_position="top left")
    fig.update_layout(title=title, xaxis_title=FACTOR_LABELS["gamma"], yaxis_title=FACTOR_LABELS["recall"],
                      template="plotly_white", legend={"orientation": "h", "y": -0.2})
    fig.update_xaxes(range=[0, 1])
    fig.update_yaxes(range=[0, 1.02])
    return fig


# --------------------------------------------------------------------------- theory
def _groups(values: object, n: int, name: str) -> np.ndarray:
    if values is None:
        return np.full(n, "all", dtype=object)
    arr = np.asarray(values, dtype=object)
    if arr.shape != (n,):
        raise ValueError(f"`{name}` must hold one label per point ({n}) (got shape {arr.shape})")
    return arr


def _group_points(x: np.ndarray, y: np.ndarray, groups: object | None) -> list[go.Scattergl]:
    """One small translucent ``Scattergl`` of markers per group label (first-seen order)."""
    g = _groups(groups, x.size, "groups")
    traces = []
    for i, label in enumerate(dict.fromkeys(g.tolist())):
        sel = g == label
        traces.append(go.Scattergl(x=x[sel], y=y[sel], mode="markers", name=str(label),
                                   marker={"size": 4, "opacity": 0.5, "color": _colour(i)}))
    return traces


def bound_scatter(
    bound: object,
    measured: object,
    *,
    groups: object | None = None,
    bound_name: str = "bound2",
    title: str = "",
    atol: float = 0.0,
) -> go.Figure:
    """A recall lower bound against the measured recall, one point per query block, with y = x.

    Args:
        bound: float [P], the bound (e.g. Bound 2 beta_u).
        measured: float [P], the measured recall R_u of the same rows.
        groups: optional label per point (e.g. the order); one trace per label.
        bound_name: key of ``FACTOR_LABELS`` for the x-axis title.
        title: figure title; the number of violations (bound > measured + atol) is appended.
        atol: tolerance of the violation count.

    Every valid point lies on or below y = x in (measured, bound) coordinates, i.e. x
    (measured) >= y (bound). Returns one ``Scattergl`` per group, a "y = x" line, and a
    "violations" trace (red crosses) holding exactly the violating points.
    """
    b = _array(bound, "bound", ndim=1)
    r = _array(measured, "measured", ndim=1)
    if b.shape != r.shape:
        raise ValueError(f"`bound` and `measured` must have one length (got {b.shape} and {r.shape})")
    bad = b > r + atol
    traces = [*_group_points(r, b, groups),
              go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="y = x", line={"color": "#444444", "dash": "dash"}),
              go.Scatter(x=r[bad], y=b[bad], mode="markers", name="violations",
                         marker={"symbol": "x", "size": 9, "color": "red"})]
    label = FACTOR_LABELS.get(bound_name, bound_name)
    head = title or f"{label} against measured recall"
    return _white_figure(traces, {"title": {"text": f"{head} · {int(bad.sum())} violations of {b.size}"},
                                  "xaxis": {"title": {"text": FACTOR_LABELS["recall"]}, "range": [0, 1.02]},
                                  "yaxis": {"title": {"text": label}, "range": [0, 1.02]}})


def recall_vs_gap(
    eff_gap: object,
    measured: object,
    gamma: object,
    *,
    groups: object | None = None,
    title: str = "Recall against the effective gap",
    num_points: int = 200,
) -> go.Figure:
    """Measured recall against the effective gap Delta - 2r - J, with Bound 3 drawn through it.

    Args:
        eff_gap: float [P], Delta_u(S) - 2 r_u - J_u per query block.
        measured: float [P], the measured recall R_u(S).
        gamma: float [P] (or a scalar), the budget of each point; one closed-form curve
            1 / (1 + ((1 - gamma)/gamma) e^{-x}) is drawn per distinct gamma.
        groups: optional label per point (one trace per label).
        num_points: samples of each closed-form curve.

    Returns one ``Scattergl`` per group, then one ``Scatter`` named ``"Bound 3, γ = g"``
    per distinct gamma (sorted).
    """
    x = _array(eff_gap, "eff_gap", ndim=1)
    y = _array(measured, "measured", ndim=1)
    if x.shape != y.shape:
        raise ValueError(f"`eff_gap` and `measured` must have one length (got {x.shape} and {y.shape})")
    gam = _array(gamma, "gamma")
    gam = np.broadcast_to(gam, x.shape) if gam.ndim == 0 else gam
    if gam.shape != x.shape:
        raise ValueError(f"`gamma` must be a scalar or one budget per point ({x.size}) (got shape {gam.shape})")
    if isinstance(num_points, bool) or not isinstance(num_points, int) or num_points < 2:
        raise ValueError(f"`num_points` must be an integer >= 2 (got {num_points!r})")
    traces = _group_points(x, y, groups)
    finite = x[np.isfinite(x)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (-5.0, 5.0)
    lo, hi = min(lo, -1.0), max(hi, 1.0)
    grid = np.linspace(lo, hi, num_points)
    for j, value in enumerate(sorted(set(np.round(gam, 12).tolist()))):
        traces.append(go.Scatter(x=grid, y=bound3_curve(grid, float(value)), mode="lines",
                                 name=f"Bound 3, γ = {value:.3g}",
                                 line={"color": _ORACLE_COLOUR, "dash": ("solid", "dash", "dot", "dashdot")[j % 4], "width": 1.5}))
    return _white_figure(traces, {"title": {"text": title},
                                  "xaxis": {"title": {"text": FACTOR_LABELS["effective_gap"]}},
                                  "yaxis": {"title": {"text": FACTOR_LABELS["recall"]}, "range": [0, 1.02]}})


def factor_distributions(
    values: Mapping[str, object],
    *,
    factor: str,
    kind: str = "violin",
    title: str = "",
) -> go.Figure:
    """Distribution of one factor per group (e.g. per order), as violins, boxes or histograms.

    Args:
        values: group label -> float [P_g] samples (e.g. ``{"raster": W_k, "hilbert3d": W_k}``).
        factor: the factor's name; a key of ``FACTOR_LABELS`` gives the axis title.
        kind: one of ``DISTRIBUTION_KINDS``.
        title: figure title.

    Returns one trace per group (``Violin``, ``Box`` or ``Histogram``) holding its finite samples.
    """
    if kind not in DISTRIBUTION_KINDS:
        raise ValueError(f"`kind` must be one of {', '.join(DISTRIBUTION_KINDS)} (got {kind!r})")
    if not isinstance(values, Mapping) or not values:
        raise ValueError("`values` must be a non-empty mapping group label -> samples")
    axis = FACTOR_LABELS.get(factor, factor)
    traces = []
    for i, (label, samples) in enumerate(values.items()):
        arr = _array(samples, f"values[{label!r}]").ravel()
        arr = arr[np.isfinite(arr)]
        style = {"name": str(label), "marker": {"color": _colour(i)}}
        if kind == "violin":
            traces.append(go.Violin(y=arr, box={"visible": True}, meanline={"visible": True}, points=False, **style))
        elif kind == "box":
            traces.append(go.Box(y=arr, boxmean=True, **style))
        else:
            traces.append(go.Histogram(x=arr, opacity=0.6, histnorm="probability density", **style))
    layout = {"title": {"text": title or f"{axis} per group"}}
    if kind == "histogram":
        layout.update(barmode="overlay", xaxis={"title": {"text": axis}}, yaxis={"title": {"text": "density"}})
    else:
        layout.update(yaxis={"title": {"text": axis}})
    return _white_figure(traces, layout)


# --------------------------------------------------------------------------- drift and schedule
def drift_heatmap(
    steps: Sequence[int],
    matrix: object,
    *,
    quantity: str = "recall",
    title: str = "",
) -> go.Figure:
    """An s x t drift matrix: entry [i, j] = quantity of the mask chosen at steps[i] used at steps[j].

    Args:
        steps: the S captured step indices, ascending.
        matrix: float [S, S] (recall or Jaccard, in [0, 1]).
        quantity: "recall" or "jaccard" (colour bar title).
        title: figure title.

    Returns one ``Heatmap`` (y = mask step s, x = applied step t) with the values as text.
    """
    mat = _array(matrix, "matrix", ndim=2)
    st = [int(s) for s in steps]
    if mat.shape != (len(st), len(st)):
        raise ValueError(f"`matrix` must be [S, S] with S = len(steps) = {len(st)} (got {mat.shape})")
    if quantity not in ("recall", "jaccard"):
        raise ValueError(f"`quantity` must be 'recall' or 'jaccard' (got {quantity!r})")
    labels = [str(s) for s in st]
    fig = go.Figure(go.Heatmap(
        z=mat, x=labels, y=labels, zmin=0.0, zmax=1.0, colorscale="Magma",
        text=np.round(mat, 3), texttemplate="%{text}", colorbar={"title": quantity},
        hovertemplate="mask from step %{y}<br>used at step %{x}<br>" + quantity + " = %{z:.4f}<extra></extra>",
    ))
    fig.update_layout(title=title or f"Mask drift: {quantity}", xaxis_title="step t (mask used)",
                      yaxis_title="step s (mask chosen)", template="plotly_white")
    fig.update_xaxes(type="category")
    fig.update_yaxes(type="category", autorange="reversed")
    return fig


def recall_grid_figure(
    layers: Sequence[int],
    steps: Sequence[int],
    grids: Mapping[str, object],
    *,
    title: str = "Recall per layer × step",
) -> go.Figure:
    """Recall of every (layer, step), one heatmap panel per scoring method, one colour scale.

    Args:
        layers: the L layer indices (rows, top to bottom).
        steps: the S step indices (columns).
        grids: method -> float [L, S] recall in [0, 1] (e.g. mean over heads of a top-k mask).
        title: figure title.

    Returns one ``Heatmap`` per method (named after it, values as text) on a shared
    ``coloraxis`` fixed to [0, 1].
    """
    if not isinstance(grids, Mapping) or not grids:
        raise ValueError("`grids` must be a non-empty mapping method -> recall [layers, steps]")
    lay, st = [str(v) for v in layers], [str(v) for v in steps]
    layout = _panel_grid(1, len(grids), list(grids), hspace=0.06, vspace=0.0)
    traces = []
    for i, (method, values) in enumerate(grids.items()):
        z = _array(values, f"grids[{method!r}]", ndim=2)
        if z.shape != (len(lay), len(st)):
            raise ValueError(f"`grids[{method!r}]` must be [layers, steps] = [{len(lay)}, {len(st)}] (got {list(z.shape)})")
        suffix = "" if i == 0 else str(i + 1)
        traces.append(go.Heatmap(z=z, x=st, y=lay, zmin=0, zmax=1, coloraxis="coloraxis", name=str(method),
                                 text=np.round(z, 3), texttemplate="%{text}", xaxis=f"x{suffix}", yaxis=f"y{suffix}",
                                 hovertemplate=f"{method}<br>step %{{x}}, layer %{{y}}<br>R = %{{z:.4f}}<extra></extra>"))
        layout[f"xaxis{suffix}"].update(title="step", type="category")
        layout[f"yaxis{suffix}"].update(type="category", autorange="reversed", **({"title": "layer"} if i == 0 else {}))
    layout.update(title=title, template="plotly_white",
                  coloraxis={"colorscale": "Viridis", "cmin": 0, "cmax": 1, "colorbar": {"title": "recall R"}})
    return go.Figure(data=traces, layout=layout)


def schedule_figure(
    steps: Sequence[int],
    gamma: Sequence[float | None],
    refresh: Sequence[bool],
    *,
    series: Mapping[str, object] | None = None,
    title: str = "DFSAttn schedule",
) -> go.Figure:
    """The budget per denoising step with refresh steps marked, plus measured series per step.

    Args:
        steps: step indices [T].
        gamma: kept fraction per step, None (or NaN) where the step is dense.
        refresh: True where the cached mask is recomputed.
        series: optional name -> float [T] drawn as lines (e.g. "recall, cached",
            "recall, refreshed every step", "density"); NaN marks a step without a value
            (the line joins its neighbours).
        title: figure title.

    Returns a ``Bar`` trace "budget γ" (dense steps drawn at 1 in grey), a ``Scatter``
    "refresh" of markers, then one ``Scatter`` per series.
    """
    st = np.asarray([int(s) for s in steps])
    gam = np.asarray([np.nan if g is None else float(g) for g in gamma], dtype=np.float64)
    ref = np.asarray([bool(r) for r in refresh])
    if not (st.shape == gam.shape == ref.shape):
        raise ValueError(f"`steps`, `gamma` and `refresh` must have one length (got {st.size}, {gam.size}, {ref.size})")
    dense = np.isnan(gam)
    fig = go.Figure()
    fig.add_trace(go.Bar(x=st, y=np.where(dense, 1.0, gam), name="budget γ",
                         marker={"color": np.where(dense, "#BBBBBB", "#636EFA").tolist()},
                         hovertext=["dense" if d else f"γ = {g:.3g}" for d, g in zip(dense, gam)]))
    fig.add_trace(go.Scatter(x=st[ref], y=np.where(dense, 1.0, gam)[ref], mode="markers", name="refresh",
                             marker={"symbol": "triangle-down", "size": 10, "color": "#EF553B"}))
    for i, (name, values) in enumerate((series or {}).items()):
        y = _array(values, f"series[{name!r}]", ndim=1)
        if y.shape != st.shape:
            raise ValueError(f"`series[{name!r}]` must have one value per step ({st.size}) (got {y.shape})")
        # connectgaps: captures hold a few steps; the line joins them across uncaptured (NaN) steps.
        fig.add_trace(go.Scatter(x=st, y=y, mode="lines+markers", name=str(name), connectgaps=True,
                                 line={"color": _colour(i + 2), "width": 2}))
    fig.update_layout(title=title, xaxis_title="denoising step", yaxis_title="fraction",
                      template="plotly_white", bargap=0.15)
    fig.update_yaxes(range=[0, 1.05])
    return fig


# --------------------------------------------------------------------------- calibration
#: Quantities of :func:`calibration_heatmap`: colour-bar title and the hover line of one head
#: (``{v}`` the value; the kept-block count is appended for "gamma").
CALIBRATION_QUANTITIES: dict[str, tuple[str, str]] = {
    "gamma": ("kept fraction γ", "kept fraction γ = {v:.3g}"),
    "recall": ("predicted recall R", "predicted recall R = {v:.3f}: {v:.1%} of the head's attention mass inside "
                                     "the kept blocks"),
    "density": ("density ρ", "density ρ = {v:.3f}: {v:.1%} of the dense attention (token pairs) computed"),
}
_DENSE_COLOUR = "#D1D5DB"


def _plural(n: int, word: str, plural: str = "") -> str:
    """"1 step", "3 steps" ("2 refreshes" with ``plural``)."""
    return f"{n} {word}" if n == 1 else f"{n} {plural or word + 's'}"


def calibration_heatmap(
    values: object,
    dense: object,
    *,
    quantity: str,
    layers: Sequence[object] | None = None,
    kept_blocks: object | None = None,
    num_kv_blocks: int | None = None,
    title: str = "",
) -> go.Figure:
    """One cell per (layer, head) of a calibrated DFSAttn plan, dense heads marked.

    Args:
        values: float [L, H]: the kept fraction γ, the predicted recall R or the density ρ of
            each head (``LayerBudget.gamma`` / ``.predicted_recall`` / ``.density`` of the
            layers of a ``CalibratedPlan``); ignored (may be NaN) where ``dense``.
        dense: bool [L, H], True where the head keeps every key block (γ is None).
        quantity: one of ``CALIBRATION_QUANTITIES``: "gamma", "recall" or "density".
        layers: the L layer indices (row labels "layer 3"; a layer whose every head is dense
            reads "layer 3 (dense)"); default 0 .. L - 1.
        kept_blocks: optional int [L, H], the kept key blocks k per query block, named in the
            hover of "gamma" as "k of Mk key blocks per query block" (needs ``num_kv_blocks``).
        num_kv_blocks: Mk, the key blocks per query block of the calibrated grid.
        title: figure title.

    Returns a ``Heatmap`` "sparse heads" (z = the values, NaN at dense heads, text = the
    value) and a grey ``Heatmap`` "dense heads" (z = 1 at dense heads, text "dense"); both
    hover a sentence with units (``customdata``). Rows are layers (top to bottom), columns heads.
    """
    if quantity not in CALIBRATION_QUANTITIES:
        raise ValueError(f"`quantity` must be one of {', '.join(CALIBRATION_QUANTITIES)} (got {quantity!r})")
    z = _array(values, "values", ndim=2)
    flags = _array(dense, "dense", ndim=2, dtype=bool)
    if flags.shape != z.shape:
        raise ValueError(f"`dense` must have the shape of `values` {z.shape} (got {flags.shape})")
    rows, heads = z.shape
    layer_ids = list(range(rows)) if layers is None else list(layers)
    if len(layer_ids) != rows:
        raise ValueError(f"`layers` must hold one label per row ({rows}) (got {len(layer_ids)})")
    z = np.where(flags, np.nan, z)
    sparse = z[~flags]
    if np.isnan(sparse).any() or ((sparse < 0) | (sparse > 1)).any():
        bad = sparse[np.isnan(sparse) | (sparse < 0) | (sparse > 1)][0]
        raise ValueError(f"`values` must be in [0, 1] at the sparse heads (got {bad:g})")
    kept = None
    if kept_blocks is not None:
        if num_kv_blocks is None:
            raise ValueError("`kept_blocks` needs `num_kv_blocks` (Mk) to say 'k of Mk key blocks'")
        kept = _array(kept_blocks, "kept_blocks", ndim=2, dtype=np.int64)
        if kept.shape != z.shape:
            raise ValueError(f"`kept_blocks` must have the shape of `values` {z.shape} (got {kept.shape})")
    label, line = CALIBRATION_QUANTITIES[quantity]
    hover, text, dense_hover = [], [], []
    for i in range(rows):
        hover.append([]), text.append([]), dense_hover.append([])
        for h in range(heads):
            where = f"layer {layer_ids[i]} · head {h}"
            if flags[i, h]:
                hover[i].append("")
                text[i].append("")
                dense_hover[i].append(f"{where}<br>dense: keeps every key block (recall 1, density 1)")
                continue
            sentence = line.format(v=float(z[i, h]))
            if kept is not None and quantity == "gamma":
                sentence += f": {int(kept[i, h])} of {int(num_kv_blocks)} key blocks per query block"
            hover[i].append(f"{where}<br>{sentence}")
            text[i].append(f"{z[i, h]:.2f}")
            dense_hover[i].append("")
    names = [f"layer {lay}" + (" (dense)" if flags[i].all() else "") for i, lay in enumerate(layer_ids)]
    columns = [f"head {h}" for h in range(heads)]
    low = 0.0
    if quantity == "recall" and sparse.size:
        low = min(0.5, math.floor(float(sparse.min()) * 20) / 20)  # spread the recalls near the target
    traces = [
        go.Heatmap(z=z, x=columns, y=names, zmin=low, zmax=1.0, colorscale="Viridis", colorbar={"title": label},
                   text=text, texttemplate="%{text}", customdata=hover, hovertemplate="%{customdata}<extra></extra>",
                   name="sparse heads"),
        go.Heatmap(z=np.where(flags, 1.0, np.nan), x=columns, y=names, zmin=0.0, zmax=1.0, showscale=False,
                   colorscale=[[0.0, _DENSE_COLOUR], [1.0, _DENSE_COLOUR]], text=[["dense" if f else "" for f in row]
                                                                               for row in flags.tolist()],
                   texttemplate="%{text}", customdata=dense_hover, hovertemplate="%{customdata}<extra></extra>",
                   name="dense heads"),
    ]
    layout = {"title": title, "template": "plotly_white", "xaxis": {"title": "head", "type": "category"},
              "yaxis": {"title": "layer", "type": "category", "autorange": "reversed"}}
    return go.Figure(data=traces, layout=layout)


def cached_mask_decay(
    lags: Sequence[int],
    relative_recall: object,
    *,
    interval: int,
    samples: Sequence[int] | None = None,
    reuse_factor: float | None = None,
    title: str = "",
) -> go.Figure:
    """The recall a cached mask keeps against the steps since its refresh, the interval marked.

    Args:
        lags: steps d since the mask was computed (0 = fresh), ascending.
        relative_recall: float [len(lags)], recall of a mask cached d steps over the recall of
            a fresh mask at the same step (``predicted["drift"]["relative_recall"]`` of a plan).
        interval: the refresh interval I: a cached mask serves ages 0 .. I - 1, then is recomputed.
        samples: optional count of (step pair, head) values averaged at each lag.
        reuse_factor: optional predicted share at the oldest cached mask (age I - 1), drawn
            as one marker (``predicted["reuse_factor"]``).
        title: figure title.

    Returns a ``Scatter`` of the measured lags (a sentence per point as hover text), the
    optional reuse-factor marker, a shaded band over ages 0 .. I - 1 and a dashed line at
    lag I ("refresh every I steps").
    """
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
        raise ValueError(f"`interval` must be an integer >= 1 (got {interval!r})")
    x = [int(d) for d in lags]
    y = _array(relative_recall, "relative_recall", ndim=1)
    if len(x) != y.size:
        raise ValueError(f"`lags` and `relative_recall` must have one length (got {len(x)} and {y.size})")
    counts = None if samples is None else [int(n) for n in samples]
    if counts is not None and len(counts) != len(x):
        raise ValueError(f"`samples` must hold one count per lag ({len(x)}) (got {len(counts)})")
    hover = [f"a mask cached {_plural(d, 'step')} keeps {r:.1%} of a fresh mask's recall"
             + ("" if counts is None else f" ({_plural(counts[i], 'sample')})") for i, (d, r) in enumerate(zip(x, y))]
    traces = [go.Scatter(x=x, y=y, mode="lines+markers", name="measured: cached / fresh recall", hovertext=hover,
                         hoverinfo="text", line={"color": _colour(0), "width": 2})]
    oldest = interval - 1
    shown = list(y)
    if reuse_factor is not None:
        traces.append(go.Scatter(
            x=[oldest], y=[float(reuse_factor)], mode="markers", name="predicted at the oldest cached mask",
            marker={"symbol": "diamond", "size": 11, "color": _colour(1)}, hoverinfo="text",
            hovertext=[f"oldest cached mask ({_plural(oldest, 'step')}): the prediction keeps "
                       f"{float(reuse_factor):.1%} of a fresh mask's recall (reuse factor, mean over sparse heads)"]))
        shown.append(float(reuse_factor))
    low = max(0.0, min(shown) - 0.02) if shown else 0.0
    shapes = [
        {"type": "rect", "x0": 0, "x1": oldest, "xref": "x", "y0": 0, "y1": 1, "yref": "paper",
         "fillcolor": _colour(0), "opacity": 0.1, "line": {"width": 0}, "layer": "below"},
        {"type": "line", "x0": interval, "x1": interval, "xref": "x", "y0": 0, "y1": 1, "yref": "paper",
         "line": {"color": _colour(1), "dash": "dash", "width": 2}},
    ]
    annotations = [{"x": interval, "y": 1, "xref": "x", "yref": "paper", "yanchor": "bottom", "showarrow": False,
                    "text": f"refresh every {_plural(interval, 'step')}"}]
    if not x:
        annotations.append({"x": 0.5, "y": 0.5, "xref": "paper", "yref": "paper", "showarrow": False,
                            "text": "no sparse head: no drift to draw"})
    layout = {"title": title or "Recall of a cached mask against steps since its refresh", "template": "plotly_white",
              "shapes": shapes, "annotations": annotations, "legend": {"orientation": "h", "y": -0.2},
              "xaxis": {"title": "steps since the mask's refresh", "range": [-0.5, max(x + [interval]) + 0.5]},
              "yaxis": {"title": "recall kept: cached mask / fresh mask", "range": [low, 1.005]}}
    return go.Figure(data=traces, layout=layout)


def method_label(method: str, tile: int | None) -> str:
    """"dfs_tile (tile 16)", "antidiagonal (stride 8)", "meanpool": a scoring method with its tile or stride."""
    return " ".join(_method_lines(method, tile))


def _method_lines(method: str, tile: int | None) -> tuple[str, ...]:
    """("dfs_tile", "(tile 16)"), ("meanpool",): :func:`method_label`'s parts."""
    if tile is None:
        return (str(method),)
    return str(method), f"({'stride' if method == 'antidiagonal' else 'tile'} {tile})"


# Bars of :func:`method_comparison`: summary key, trace name, hover sentence.
_METHOD_BARS = (
    ("attention_work", "attention work", "attention work {v:.3f} of dense attention (whole run, refreshes included)"),
    ("mean_recall", "predicted recall (sparse steps)", "predicted recall {v:.3f} ({v:.1%} of the attention mass)"),
    ("mean_density", "density (sparse steps)", "density {v:.3f}: {v:.1%} of the dense attention on the sparse steps"),
)


def method_comparison(methods: Mapping[str, Mapping | None], *, chosen: str, title: str = "") -> go.Figure:
    """Each scoring method's best calibrated plan side by side: attention work, recall, density.

    Args:
        methods: method -> its best plan's summary (``predicted["methods"]`` of a plan: keys
            ``tile``, ``warmup_steps``, ``interval``, ``attention_work``, ``mean_recall``,
            ``mean_density``), or None when no warm-up and interval fit it.
        chosen: the method the plan uses (its bar label ends in "· chosen").
        title: figure title.

    Returns one ``Bar`` trace per quantity (attention work, predicted recall and density of
    the sparse steps) over the methods; a method without a plan gets NaN bars and the label
    "<method>: no plan fits".
    """
    if not isinstance(methods, Mapping) or not methods:
        raise ValueError("`methods` must be a non-empty mapping method -> summary (predicted['methods'] of a plan)")
    if chosen not in methods:
        raise ValueError(f"`chosen` must be one of the methods {list(methods)} (got {chosen!r})")
    # each label's lines (method, its tile, "chosen") on one line as the bars' x, stacked upright
    # as their tick text: a narrow card tilted and clipped the one-line labels
    labels, ticks = [], []
    for name, s in methods.items():
        if s is None:
            labels.append(f"{name}: no plan fits")
            ticks.append(f"{name}<br>no plan fits")
            continue
        lines = _method_lines(name, s.get("tile"))
        labels.append(" ".join(lines) + (" · chosen" if name == chosen else ""))
        ticks.append("<br>".join(lines) + ("<br>chosen" if name == chosen else ""))
    traces = []
    for i, (key, trace_name, sentence) in enumerate(_METHOD_BARS):
        y, hover = [], []
        for name, s in methods.items():
            if s is None:
                y.append(math.nan)
                hover.append(f"{name}: no warm-up and interval fit the goal")
                continue
            v = float(s[key])
            y.append(v)
            hover.append(f"{name}: {sentence.format(v=v)}<br>warm-up {s['warmup_steps']}, refresh every "
                         f"{_plural(int(s['interval']), 'step')}")
        traces.append(go.Bar(x=labels, y=y, name=trace_name, hovertext=hover, hoverinfo="text",
                             marker={"color": _colour(i)}))
    layout = {"title": title or "Scoring methods: each one's best plan", "template": "plotly_white",
              "barmode": "group", "yaxis": {"title": "fraction", "range": [0, 1.05]},
              "xaxis": {"tickvals": labels, "ticktext": ticks, "tickangle": 0},
              "legend": {"orientation": "h", "y": -0.25}}
    return go.Figure(data=traces, layout=layout)


def schedule_candidates(
    candidates: Sequence[Mapping],
    *,
    chosen: tuple[int, int],
    mode: str,
    title: str = "",
) -> go.Figure:
    """Every (warm-up, interval) a calibration weighed: its objective against the interval.

    Args:
        candidates: summaries of the feasible schedules (``Calibration.candidates``: keys
            ``warmup_steps``, ``interval``, ``refreshes``, ``attention_work``,
            ``mean_recall``, ``run_recall``).
        chosen: (warm-up, interval) of the plan.
        mode: "target_recall" (the objective is the attention work, least wins) or
            "max_density" (the predicted recall of the run, best wins).
        title: figure title.

    Returns one ``Scatter`` line per warm-up (x = interval) and a star "chosen" last.
    """
    keys = {"target_recall": ("attention_work", "attention work (fraction of dense)"),
            "max_density": ("run_recall", "predicted recall of the run")}
    if mode not in keys:
        raise ValueError(f"`mode` must be 'target_recall' or 'max_density' (got {mode!r})")
    if not candidates:
        raise ValueError("`candidates` must be a non-empty sequence of schedule summaries (Calibration.candidates)")
    key, axis = keys[mode]
    by_warmup: dict[int, list[Mapping]] = {}
    for c in candidates:
        by_warmup.setdefault(int(c["warmup_steps"]), []).append(c)
    picked = [c for c in candidates if (int(c["warmup_steps"]), int(c["interval"])) == tuple(chosen)]
    if not picked:
        raise ValueError(f"`chosen` {tuple(chosen)} is not among the candidates (warm-up, interval)")

    def sentence(c: Mapping) -> str:
        return (f"warm-up {c['warmup_steps']}, refresh every {_plural(int(c['interval']), 'step')}: attention work "
                f"{c['attention_work']:.3f} of dense, recall {c['mean_recall']:.3f} on the sparse steps "
                f"({c['run_recall']:.3f} over the run), {_plural(int(c['refreshes']), 'refresh', 'refreshes')}")

    traces = []
    for i, (w, rows) in enumerate(sorted(by_warmup.items())):
        rows = sorted(rows, key=lambda c: int(c["interval"]))
        traces.append(go.Scatter(x=[int(c["interval"]) for c in rows], y=[float(c[key]) for c in rows],
                                 mode="lines+markers", name=f"warm-up {w}", hovertext=[sentence(c) for c in rows],
                                 hoverinfo="text", line={"color": _colour(i), "width": 2}))
    best = picked[0]
    traces.append(go.Scatter(x=[int(best["interval"])], y=[float(best[key])], mode="markers", name="chosen",
                             marker={"symbol": "star", "size": 16, "color": "#111111"}, hovertext=[sentence(best)],
                             hoverinfo="text"))
    intervals = [int(c["interval"]) for c in candidates]
    # whole steps, at most about 10 ticks (one a step crowded 20 intervals into a card)
    step = max(1, math.ceil((max(intervals) - min(intervals)) / 10))
    layout = {"title": title or "Schedules weighed: warm-up and refresh interval", "template": "plotly_white",
              "xaxis": {"title": "refresh interval (steps)", "dtick": step}, "yaxis": {"title": axis},
              "legend": {"orientation": "h", "y": -0.2}}
    return go.Figure(data=traces, layout=layout)


# --------------------------------------------------------------------------- video space
def footprint_frame_indices(grid: LatentGrid, frames: Sequence[int] | None = None, max_frames: int = 8) -> list[int]:
    """The latent frames :func:`footprint_frames` draws: ``frames`` checked, or by default up to
    ``max_frames`` frames spread evenly over [0, grid.frames), ascending."""
    if frames is None:
        if isinstance(max_frames, bool) or not isinstance(max_frames, int) or max_frames < 1:
            raise ValueError(f"`max_frames` must be a positive integer (got {max_frames!r})")
        count = min(max_frames, grid.frames)
        frames = sorted(set(np.linspace(0, grid.frames - 1, count).round().astype(int).tolist()))
    frames = [int(f) for f in frames]
    bad = [f for f in frames if not 0 <= f < grid.frames]
    if bad or not frames:
        raise ValueError(f"`frames` must be a non-empty list of frames in [0, {grid.frames}) (got {frames})")
    return frames


def _video(x: np.ndarray, grid: LatentGrid) -> np.ndarray:
    """[F, Hs, Ws] view of the video tokens of a per-token array [N] (original order)."""
    return x[grid.video_slice].reshape(grid.frames, grid.height, grid.width)


def _panel_axes(i: int) -> dict[str, str]:
    """Axes of the i-th panel of :func:`_panel_grid` (numbered row-major from 1, the first without a number)."""
    suffix = "" if i == 0 else str(i + 1)
    return {"xaxis": f"x{suffix}", "yaxis": f"y{suffix}"}


def _panel_grid(rows: int, cols: int, titles: Sequence[str], *, hspace: float, vspace: float) -> dict:
    """Layout dict of a rows x cols grid of panels, as ``plotly.subplots.make_subplots`` lays
    it out (row-major axes x, x2, ...; row 1 on top; titles as paper annotations above each
    panel), built as a plain dict so the figure is validated once."""
    width = (1.0 - hspace * (cols - 1)) / cols
    height = (1.0 - vspace * (rows - 1)) / rows
    layout: dict = {"annotations": []}
    for i in range(rows * cols):
        r, c = divmod(i, cols)
        x0 = c * (width + hspace)
        y0 = (rows - 1 - r) * (height + vspace)
        # clamp: the sums may overshoot [0, 1] by a rounding error, which plotly refuses
        x1, y1 = min(1.0, x0 + width), min(1.0, y0 + height)
        suffix = "" if i == 0 else str(i + 1)
        layout[f"xaxis{suffix}"] = {"anchor": f"y{suffix}", "domain": [x0, x1]}
        layout[f"yaxis{suffix}"] = {"anchor": f"x{suffix}", "domain": [y0, y1]}
        if i < len(titles):
            layout["annotations"].append({"font": {"size": 16}, "showarrow": False, "text": titles[i], "x": x0 + width / 2,
                                          "xanchor": "center", "xref": "paper", "y": y1, "yanchor": "bottom", "yref": "paper"})
    return layout


def _check_footprint(footprint: object, grid: object, floor: object, cols: object) -> tuple[np.ndarray, float]:
    """(footprint float64 [N], floor) after the checks every footprint builder makes."""
    if not isinstance(grid, LatentGrid):
        raise TypeError(f"`grid` must be a dfsviz LatentGrid (got {type(grid).__name__}); use LatentGrid.parse('21x45x80')")
    fp = _array(footprint, "footprint", ndim=1)
    grid.check_tokens(fp.size, "footprint length")
    if isinstance(cols, bool) or not isinstance(cols, int) or cols < 1:
        raise ValueError(f"`cols` must be a positive integer (got {cols!r})")
    return fp, _check_floor(floor)


def footprint_outlines(
    tokens: object,
    grid: LatentGrid,
    frames: Sequence[int],
    *,
    name: str = "kept keys",
    colour: str = _OUTLINE_COLOUR,
    arg: str = "tokens",
) -> list[go.Scatter | go.Scattergl]:
    """Outlines of a token set on the panels of :func:`footprint_frames`, one trace per frame.

    Args:
        tokens: bool [N] in the original order, e.g. the keys of a query block's kept key blocks.
        grid: the latent grid (N = ``grid.num_tokens``).
        frames: the frames of the panels, in panel order (``footprint_frame_indices``).
        name: trace names are ``f"{name}, frame {f}"``.
        colour: line colour.
        arg: argument name used in error messages.

    Returns one line trace per frame placed on that frame's panel axes. Use it to redraw only
    the outlines over a footprint figure built once (the dashboard does).
    """
    mask = _array(tokens, arg, ndim=1, dtype=bool)
    if mask.size != grid.num_tokens:
        raise ValueError(f"`{arg}` must hold one flag per token ({grid.num_tokens}) (got {mask.size})")
    vid = _video(mask, grid)
    return [_outline_trace(vid[f], name=f"{name}, frame {f}", colour=colour, width=1.5, **_panel_axes(i))
            for i, f in enumerate(frames)]


def footprint_frames(
    footprint: object,
    grid: LatentGrid,
    *,
    kept_tokens: object | None = None,
    query_tokens: object | None = None,
    frames: Sequence[int] | None = None,
    max_frames: int = 8,
    cols: int = 4,
    floor: float = 1e-8,
    title: str = "",
) -> go.Figure:
    """One query block's attention over the video, one heatmap per latent frame.

    Args:
        footprint: float [N], attention of the query block (mean over its queries) on every
            token of the sequence in the ORIGINAL (raster, text in place) order.
        grid: the latent grid; N must equal ``grid.num_tokens``.
        kept_tokens: optional bool [N] (original order), True for keys inside the kept key
            blocks; their boundary is outlined in white on every frame.
        query_tokens: optional bool [N], the query block's own tokens, outlined in cyan.
        frames: latent frames to draw; default: up to ``max_frames`` spread evenly.
        cols: subplot columns.
        floor: smallest value on the log colour scale.
        title: figure title; the attention mass on text tokens is appended when the grid has text.

    Returns a figure with one ``Heatmap`` per drawn frame (z = log10 attention as float32,
    [Hs, Ws], sharing one colour scale), then the query-block outlines and the kept-key
    outlines of :func:`footprint_outlines` (one ``Scatter`` per frame each).
    """
    fp, floor = _check_footprint(footprint, grid, floor, cols)
    frames = footprint_frame_indices(grid, frames, max_frames)
    outlines = []
    for arg, name, tokens, colour in (("query_tokens", "query block", query_tokens, _QUERY_COLOUR),
                                      ("kept_tokens", "kept keys", kept_tokens, _OUTLINE_COLOUR)):
        if tokens is not None:
            outlines += footprint_outlines(tokens, grid, frames, name=name, colour=colour, arg=arg)

    ncols = min(cols, len(frames))
    rows = math.ceil(len(frames) / ncols)
    # float32: hover shows 2 decimals; halves the payload of 21 frames of Wan-size video
    z_all = _log10(_video(fp, grid)[frames], floor).astype(np.float32)
    zmin, zmax = float(z_all.min()), float(z_all.max())
    heatmaps = [go.Heatmap(z=z_all[i], zmin=zmin, zmax=zmax, coloraxis="coloraxis", name=f"frame {f}",
                           hovertemplate=f"frame {f}<br>row %{{y}}, col %{{x}}<br>log10 a = %{{z:.2f}}<extra></extra>",
                           **_panel_axes(i))
                for i, f in enumerate(frames)]
    head = title or "Attention footprint"
    if grid.text_len:
        head += f" · text tokens hold {float(fp[grid.text_slice].sum()):.1%}"
    layout = _panel_grid(rows, ncols, [f"frame {f}" for f in frames], hspace=0.02, vspace=0.08)
    for i in range(rows * ncols):  # empty cells of the last row too
        suffix = "" if i == 0 else str(i + 1)
        layout[f"xaxis{suffix}"]["showticklabels"] = False
        layout[f"yaxis{suffix}"].update(showticklabels=False, autorange="reversed")
        if i < len(frames):
            layout[f"yaxis{suffix}"].update(scaleanchor=f"x{suffix}", constrain="domain")
    layout.update(title=head, template="plotly_white", height=260 * rows + 80,
                  coloraxis={"colorscale": "Viridis", "colorbar": {"title": "log10 a"}})
    # one Figure built from one layout dict: make_subplots and every update_layout or
    # update_*axes call re-validate the layout (and copy the template), ~5 ms each at 21 panels
    return go.Figure(data=heatmaps + outlines, layout=layout)


def _mosaic_place(grid: LatentGrid, cols: int) -> tuple[int, int, int]:
    """(rows, mosaic height, mosaic width) of :func:`footprint_mosaic`'s tiling: frames of
    Hs x Ws cells, row-major, ``cols`` per row, one empty cell between them."""
    rows = math.ceil(grid.frames / cols)
    return rows, rows * (grid.height + 1) - 1, cols * (grid.width + 1) - 1


def _mosaic(values: np.ndarray, grid: LatentGrid, cols: int, fill) -> np.ndarray:
    """A per-token array [N] (original order) tiled as :func:`footprint_mosaic` draws it."""
    _, height, width = _mosaic_place(grid, cols)
    out = np.full((height, width), fill, dtype=values.dtype)
    video = _video(values, grid)
    for f in range(grid.frames):
        r, c = divmod(f, cols)
        y, x = r * (grid.height + 1), c * (grid.width + 1)
        out[y:y + grid.height, x:x + grid.width] = video[f]
    return out


def footprint_mosaic_outline(tokens: object, grid: LatentGrid, *, cols: int, name: str = "kept keys",
                             colour: str = _OUTLINE_COLOUR, arg: str = "tokens") -> dict:
    """The outline of a token set on :func:`footprint_mosaic`, every frame, as one layout shape.

    Args:
        tokens: bool [N] in the original order, e.g. the keys of a query block's kept key blocks.
        grid: the latent grid (N = ``grid.num_tokens``).
        cols: the mosaic's frames per row (as given to :func:`footprint_mosaic`).
        name, colour: the shape's name and line colour; ``arg``: the argument named in errors.

    Returns a plotly path shape dict for ``layout.shapes``. Use it to redraw only the outline
    over a mosaic built once (the dashboard does).
    """
    mask = _array(tokens, arg, ndim=1, dtype=bool)
    if mask.size != grid.num_tokens:
        raise ValueError(f"`{arg}` must hold one flag per token ({grid.num_tokens}) (got {mask.size})")
    return _outline_shape(_mosaic(mask, grid, cols, False), name=name, colour=colour, width=1.5)


def footprint_mosaic(
    footprint: object,
    grid: LatentGrid,
    *,
    kept_tokens: object | None = None,
    query_tokens: object | None = None,
    cols: int = 4,
    floor: float = 1e-8,
    title: str = "",
) -> go.Figure:
    """One query block's attention over the video: every latent frame, tiled in one image.

    What :func:`footprint_frames` shows, drawn as a single heatmap (frames left to right and
    top to bottom, ``cols`` per row, one empty cell between them, each labelled "frame f"),
    so a browser draws one plot instead of one per frame: the dashboard's footprints.

    Args:
        footprint: float [N], attention of the query block (mean over its queries) on every
            token in the ORIGINAL (raster, text in place) order.
        grid: the latent grid; N must equal ``grid.num_tokens``.
        kept_tokens: optional bool [N], keys inside the kept key blocks, outlined in white.
        query_tokens: optional bool [N], the query block's own tokens, outlined in cyan.
        cols: frames per row, >= 1.
        floor: smallest value on the log colour scale.
        title: figure title; the attention mass on text tokens is appended when the grid has text.

    Returns a figure with one ``Heatmap`` (z = log10 attention as float32, NaN between frames;
    hover names the frame, row and column); the query-block outline and the kept-key outline
    of :func:`footprint_mosaic_outline`, when given, are its ``layout.shapes`` in that order.
    """
    fp, floor = _check_footprint(footprint, grid, floor, cols)
    cols = min(cols, grid.frames)
    rows, height, width = _mosaic_place(grid, cols)
    z = _mosaic(_log10(fp, floor).astype(np.float32), grid, cols, np.float32(np.nan))
    # (frame, row, column) of every cell for the hover; -1 between frames
    where = np.stack([_mosaic(_tokens_axis(grid, axis), grid, cols, -1) for axis in (0, 1, 2)], axis=-1)
    heat = go.Heatmap(z=z, customdata=where.astype(np.int16), coloraxis="coloraxis", name="attention",
                      hovertemplate="frame %{customdata[0]}<br>row %{customdata[1]}, col %{customdata[2]}"
                                    "<br>log10 a = %{z:.2f}<extra></extra>", hoverongaps=False)
    outlines = [footprint_mosaic_outline(tokens, grid, cols=cols, name=name, colour=colour, arg=arg)
                for arg, name, tokens, colour in (("query_tokens", "query block", query_tokens, _QUERY_COLOUR),
                                                  ("kept_tokens", "kept keys", kept_tokens, _OUTLINE_COLOUR))
                if tokens is not None]
    head = title or "Attention footprint"
    if grid.text_len:
        head += f" · text tokens hold {float(fp[grid.text_slice].sum()):.1%}"
    # each frame's label in its top left corner, on a light box so it reads over any colour
    labels = [{"text": f"frame {f}", "x": (f % cols) * (grid.width + 1) - 0.5, "y": (f // cols) * (grid.height + 1) - 0.5,
               "xref": "x", "yref": "y", "xanchor": "left", "yanchor": "top", "showarrow": False,
               "font": {"size": 10}, "bgcolor": "rgba(255,255,255,0.7)", "borderpad": 1} for f in range(grid.frames)]
    layout = {"title": {"text": head}, "annotations": labels, "shapes": outlines,
              "xaxis": {"visible": False, "range": [-0.5, width - 0.5], "constrain": "domain"},
              "yaxis": {"visible": False, "range": [height - 0.5, -0.5], "scaleanchor": "x", "constrain": "domain"},
              "coloraxis": {"colorscale": _viridis_scale(), "colorbar": {"title": {"text": "log10 a"}}}}
    return _white_figure([heat], layout)


def _tokens_axis(grid: LatentGrid, axis: int) -> np.ndarray:
    """int [N]: the frame (axis 0), row (1) or column (2) of each token in the original order (-1 for text)."""
    out = np.full(grid.num_tokens, -1, dtype=np.int64)
    shape = (grid.frames, grid.height, grid.width)
    out[grid.video_slice] = np.indices(shape)[axis].ravel()
    return out


# --------------------------------------------------------------------------- sweeps
def sweep_lines(
    x: object,
    series: Mapping[str, object],
    *,
    x_name: str,
    y_name: str,
    title: str = "",
    bands: Mapping[str, tuple[object, object]] | None = None,
) -> go.Figure:
    """A token-model sweep: one line per label (e.g. per order) of y against the swept parameter.

    Args:
        x: float [P], the swept values (e.g. delta).
        series: label -> float [P] (e.g. mean W_k per order).
        x_name, y_name: axis names (keys of ``FACTOR_LABELS`` get its titles).
        bands: optional label -> (low [P], high [P]) drawn as a shaded band around the line.
        title: figure title.

    Returns, per label, an optional band ``Scatter`` (fill) and one line ``Scatter``.
    """
    xs = _array(x, "x", ndim=1)
    if not isinstance(series, Mapping) or not series:
        raise ValueError("`series` must be a non-empty mapping label -> values")
    fig = go.Figure()
    for i, (label, values) in enumerate(series.items()):
        y = _array(values, f"series[{label!r}]", ndim=1)
        if y.shape != xs.shape:
            raise ValueError(f"`series[{label!r}]` must have one value per x ({xs.size}) (got {y.shape})")
        if bands and label in bands:
            lo = _array(bands[label][0], f"bands[{label!r}] low", ndim=1)
            hi = _array(bands[label][1], f"bands[{label!r}] high", ndim=1)
            fig.add_trace(go.Scatter(x=np.concatenate([xs, xs[::-1]]), y=np.concatenate([hi, lo[::-1]]),
                                     fill="toself", line={"width": 0}, fillcolor=_colour(i), opacity=0.2,
                                     name=f"{label} range", showlegend=False, hoverinfo="skip"))
        fig.add_trace(go.Scatter(x=xs, y=y, mode="lines+markers", name=str(label), line={"color": _colour(i), "width": 2}))
    fig.update_layout(title=title, xaxis_title=FACTOR_LABELS.get(x_name, x_name),
                      yaxis_title=FACTOR_LABELS.get(y_name, y_name), template="plotly_white")
    return fig

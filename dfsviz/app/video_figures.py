"""The Video page's figure: the decoded clip with one query block's attention laid over it.

:func:`video_footprint_figure` is pure (arrays in, a plotly figure out): one panel per token
order side by side (raster and Hilbert on the page), each showing video frame t with

* the query block's footprint a_j (docs/theory.md, "Footprints and the video") of the latent
  frame that video frame t belongs to, as a heat overlay: transparent at or below uniform
  attention 1/N, opaque red at the most attended token, one colour range for every panel
  and frame;
* the query block's own tokens outlined in cyan and the tokens of its kept key blocks in white.

Every latent cell is stretched over the pixels it covers (the clip may be a downscaled copy:
cell (row y, column x) covers H / Hs x W / Ws pixels). The figure carries one plotly
animation frame per video frame, a frame slider and play / pause buttons, so playing and
scrubbing run in the browser without a round trip to the server.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import plotly.graph_objects as go

from dfsviz.figures import outline_segments
from dfsviz.sparse.grid import LatentGrid

__all__ = ["FootprintPanel", "check_video", "frame_png", "video_footprint_figure"]

# Heat overlay: transparent at uniform attention, then yellow to red; the video shows through
# where the query block does not look.
_HEAT = [[0.0, "rgba(255,230,0,0)"], [0.25, "rgba(255,200,0,0.35)"], [1.0, "rgba(230,0,0,0.85)"]]
_QUERY_COLOUR = "#00E5FF"
_KEPT_COLOUR = "#FFFFFF"
# Smallest attention the log scale shows (as footprint_frames does): a_j of 0 draws as 1e-8.
_FLOOR = 1e-8
_TRACES_PER_PANEL = 4  # image, heat, query outline, kept-key outline


@dataclass(frozen=True)
class FootprintPanel:
    """One order's side of the figure.

    Fields:
        title: the panel's title ("raster · query block 3").
        footprint: float [N], the query block's mean attention over every token of the
            sequence in the ORIGINAL token order (sums to 1).
        query_tokens: bool [N], the query block's own tokens (original order).
        kept_tokens: bool [N], the tokens of its kept key blocks (original order).
    """

    title: str
    footprint: np.ndarray
    query_tokens: np.ndarray
    kept_tokens: np.ndarray


def check_video(frames: object, latent_frame: object, fps: object, grid: LatentGrid) -> tuple[np.ndarray, np.ndarray, float]:
    """Validate a decoded clip against the latent grid it was captured on.

    Args:
        frames: uint8 [T, H, W, 3] RGB video frames.
        latent_frame: int [T], the latent frame in [0, F) each video frame belongs to, never
            decreasing.
        fps: frames per second, a positive finite number.
        grid: the capture's :class:`LatentGrid` (F latent frames).

    Returns (frames, latent_frame as int64, fps as float); ValueError or TypeError naming the
    argument otherwise.
    """
    if not isinstance(grid, LatentGrid):
        raise TypeError(f"`grid` must be a dfsviz LatentGrid (got {type(grid).__name__}); use LatentGrid.parse('9x18x32')")
    if not isinstance(frames, np.ndarray):
        raise TypeError(f"`frames` must be a numpy array uint8 [T, H, W, 3] (got {type(frames).__name__})")
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[3] != 3 or 0 in frames.shape:
        raise ValueError(f"`frames` must be RGB video frames, uint8 [T, H, W, 3] with T, H, W >= 1 "
                         f"(got {frames.dtype} {list(frames.shape)}); convert with dfsviz.models.sampler.video_to_uint8")
    lf = np.asarray(latent_frame)
    if lf.shape != (frames.shape[0],) or not np.issubdtype(lf.dtype, np.integer):
        raise ValueError(f"`latent_frame` must be integers [T] = [{frames.shape[0]}], one per video frame "
                         f"(got {lf.dtype} {list(lf.shape)})")
    if lf.min() < 0 or lf.max() >= grid.frames or np.any(np.diff(lf) < 0):
        raise ValueError(f"`latent_frame` must be non-decreasing latent frame indices in [0, F - 1 = {grid.frames - 1}] "
                         f"of grid {grid.name} (got {lf.tolist()[:12]}); the clip and the capture must come from one run")
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not math.isfinite(fps) or fps <= 0:
        raise ValueError(f"`fps` must be a positive number of frames per second (got {fps!r})")
    return frames, lf.astype(np.int64), float(fps)


def frame_png(frame: np.ndarray) -> str:
    """One uint8 [H, W, 3] frame as a PNG data URI (what plotly's Image ``source`` takes:
    several times smaller than the pixel array as JSON)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(frame, mode="RGB").save(buf, format="PNG", optimize=False)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _panel_arrays(panel: object, grid: LatentGrid, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(log10 footprint [F, Hs, Ws], query [F, Hs, Ws], kept [F, Hs, Ws]) of one panel's video tokens."""
    if not isinstance(panel, FootprintPanel):
        raise TypeError(f"`panels[{index}]` must be a FootprintPanel (got {type(panel).__name__})")
    shape = (grid.frames, grid.height, grid.width)
    out = []
    for name, value, dtype in (("footprint", panel.footprint, np.float64), ("query_tokens", panel.query_tokens, bool),
                               ("kept_tokens", panel.kept_tokens, bool)):
        arr = np.asarray(value)
        if arr.ndim != 1:
            raise ValueError(f"`panels[{index}].{name}` must be one value per token, [N] (got shape {list(arr.shape)})")
        grid.check_tokens(arr.size, f"panels[{index}].{name} length")
        if dtype is bool and arr.dtype != bool:
            raise ValueError(f"`panels[{index}].{name}` must be bool flags (got {arr.dtype})")
        arr = arr.astype(dtype)[grid.video_slice].reshape(shape)
        if dtype is np.float64:
            if not np.all(np.isfinite(arr)) or arr.min() < 0:
                raise ValueError(f"`panels[{index}].footprint` must hold finite attention >= 0 (got min {arr.min():.3g})")
            arr = np.log10(np.maximum(arr, _FLOOR))
        out.append(arr)
    return out[0], out[1], out[2]


def _outline(cells: np.ndarray, sy: float, sx: float, *, name: str, colour: str, axes: dict) -> go.Scatter:
    """Outline of the True cells of bool [Hs, Ws] in pixel coordinates (a cell covers sy x sx pixels)."""
    xs, ys = outline_segments(cells)
    # cell edges c - 0.5 become pixel edges c * s - 0.5 (pixel i spans [i - 0.5, i + 0.5])
    return go.Scatter(x=(xs + 0.5) * sx - 0.5, y=(ys + 0.5) * sy - 0.5, mode="lines", name=name, hoverinfo="skip",
                      showlegend=False, line={"color": colour, "width": 1.5}, **axes)


def _axes(i: int) -> dict:
    suffix = "" if i == 0 else str(i + 1)
    return {"xaxis": f"x{suffix}", "yaxis": f"y{suffix}"}


def _overlays(f: int, heat: list, query: list, kept: list, shape: tuple, low: float, high: float) -> list[list]:
    """Per panel, the heat map and the two outlines of latent frame f (shared by its video frames)."""
    h, w = shape
    out = []
    for i, (z, q, k) in enumerate(zip(heat, query, kept)):
        sy, sx = h / z.shape[1], w / z.shape[2]
        axes = _axes(i)
        out.append([
            go.Heatmap(z=z[f].astype(np.float32), x0=(sx - 1) / 2, dx=sx, y0=(sy - 1) / 2, dy=sy, zmin=low, zmax=high,
                       coloraxis="coloraxis", name=f"attention, latent frame {f}",
                       hovertemplate=f"latent frame {f}<br>log10 a = %{{z:.2f}}<extra></extra>", **axes),
            _outline(q[f], sy, sx, name=f"query block, latent frame {f}", colour=_QUERY_COLOUR, axes=axes),
            _outline(k[f], sy, sx, name=f"kept keys, latent frame {f}", colour=_KEPT_COLOUR, axes=axes),
        ])
    return out


def _frame_traces(t: int, png: str, overlays: list[list]) -> list:
    """The traces of video frame t for every panel, in panel order: image, heat, query, kept keys."""
    traces = []
    for i, panel in enumerate(overlays):
        traces.append(go.Image(source=png, x0=0, dx=1, y0=0, dy=1, hoverinfo="skip", name=f"video frame {t}",
                               **_axes(i)))
        traces += panel
    return traces


def video_footprint_figure(
    frames: object,
    latent_frame: object,
    fps: object,
    grid: LatentGrid,
    panels: Sequence[FootprintPanel],
    *,
    start: int = 0,
    title: str = "",
    height: int = 460,
    buttons: bool = True,
) -> go.Figure:
    """The decoded clip, frame by frame, with a query block's footprint and kept key blocks per panel.

    Args:
        frames, latent_frame, fps: the clip (see :func:`check_video`): uint8 [T, H, W, 3],
            int [T] latent frame of each video frame, frames per second.
        grid: the capture's latent grid; the footprints hold its N tokens.
        panels: one :class:`FootprintPanel` per order, drawn left to right (at least one).
        start: the video frame shown first, in [0, T).
        title: figure title.
        height: figure height in pixels.
        buttons: plotly's own play / pause buttons. Pausing them leaves plotly's promise of the
            interrupted animation rejected and uncaught (an error in the browser console), so a
            page that plays the animation itself (catching it) passes False.

    Returns a figure whose traces are, per panel, an ``Image`` of the frame, a ``Heatmap`` of
    log10 a on that frame's latent frame (one colour axis from log10(1/N), uniform attention, to
    the largest value of any panel and frame), the query block's outline and the kept keys'
    outline; one animation frame per video frame (named by its index), a slider over them,
    ``layout.meta.fps`` and, with ``buttons``, play / pause buttons playing at ``fps``.
    """
    frames, lf, fps = check_video(frames, latent_frame, fps, grid)
    if isinstance(panels, FootprintPanel) or not isinstance(panels, Sequence) or not panels:
        raise ValueError(f"`panels` must be a non-empty list of FootprintPanel, one per order (got {panels!r:.60})")
    num = frames.shape[0]
    if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start < num:
        raise ValueError(f"`start` must be a video frame index in [0, {num}) (got {start!r})")
    if not isinstance(buttons, bool):
        raise TypeError(f"`buttons` must be a bool (got {type(buttons).__name__})")
    arrays = [_panel_arrays(p, grid, i) for i, p in enumerate(panels)]
    heat, query, kept = ([a[j] for a in arrays] for j in range(3))
    low = math.log10(1.0 / grid.num_tokens)
    high = max(low + 1e-3, max(float(z.max()) for z in heat))
    shape = frames.shape[1:3]
    overlays = {f: _overlays(f, heat, query, kept, shape, low, high) for f in sorted(set(lf.tolist()))}
    per_frame = [_frame_traces(t, frame_png(frames[t]), overlays[int(lf[t])]) for t in range(num)]

    n = len(panels)
    gap = 0.04
    width = (1 - gap * (n - 1)) / n
    layout = {"title": title, "template": "plotly_white", "height": height, "margin": {"t": 80, "b": 10, "l": 10},
              "coloraxis": {"colorscale": _HEAT, "cmin": low, "cmax": high,
                            "colorbar": {"title": "log10 a", "len": 0.8}},
              "annotations": []}
    for i, panel in enumerate(panels):
        suffix = "" if i == 0 else str(i + 1)
        x0 = i * (width + gap)
        layout[f"xaxis{suffix}"] = {"domain": [x0, x0 + width], "range": [-0.5, shape[1] - 0.5], "visible": False,
                                    "anchor": f"y{suffix}"}
        layout[f"yaxis{suffix}"] = {"range": [shape[0] - 0.5, -0.5], "visible": False, "anchor": f"x{suffix}",
                                    "scaleanchor": f"x{suffix}", "constrain": "domain"}
        layout["annotations"].append({"text": panel.title, "showarrow": False, "x": x0 + width / 2, "y": 1.0,
                                      "xref": "paper", "yref": "paper", "yanchor": "bottom", "font": {"size": 14}})
    still = {"frame": {"duration": 0, "redraw": True}, "mode": "immediate", "transition": {"duration": 0}}
    left = 0.16 if buttons else 0.0
    layout["sliders"] = [{
        "active": start, "pad": {"t": 10}, "len": 1.0 - left, "x": left, "currentvalue": {"prefix": "video frame "},
        "steps": [{"label": str(t), "method": "animate", "args": [[str(t)], still]} for t in range(num)],
    }]
    layout["meta"] = {"fps": fps}
    if buttons:
        play = {"frame": {"duration": 1000.0 / fps, "redraw": True}, "fromcurrent": True, "mode": "immediate",
                "transition": {"duration": 0}}
        layout["updatemenus"] = [{
            "type": "buttons", "direction": "left", "showactive": False, "x": 0.0, "y": 0.0, "xanchor": "left",
            "yanchor": "top", "pad": {"t": 20, "r": 10},
            "buttons": [{"label": "▶ play", "method": "animate", "args": [None, play]},
                        {"label": "❚❚ pause", "method": "animate", "args": [[None], still]}],
        }]
    animation = [go.Frame(name=str(t), data=per_frame[t], traces=list(range(_TRACES_PER_PANEL * n)))
                 for t in range(num)]
    return go.Figure(data=per_frame[start], layout=layout, frames=animation)

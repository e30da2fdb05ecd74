"""What every page shares: query-string parsing, the capture picker and its banners, figure
cards with CSV download, the error guard of callbacks and the URL sync.

Deep links: a page's ``layout(**query)`` reads its selection from the query string (Dash
Pages passes the parameters), so ``/masks?file=runs/a.h5&step=12&layer=3`` rebuilds that
view. While the user changes controls, a clientside callback rewrites the query string
with ``history.replaceState`` (no navigation, no re-render) so the address bar always
holds a link to the current view. Changing the capture navigates (the controls' choices
depend on the file). One callback per page (:func:`register_url_sync`) owns the address.
"""

from __future__ import annotations

import base64
import csv
import functools
import io
import logging
import math
import re
from collections.abc import Callable, Sequence

import numpy as np
from dash import MATCH, Input, Output, State, ctx, dcc, html, no_update
from dash.exceptions import PreventUpdate

from dfsviz.app.data import CaptureError, get_catalog

logger = logging.getLogger(__name__)

#: Budgets offered in the budget pickers (kept fraction gamma); a deep link may add others.
BUDGETS = (0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0)
PAGES_CONTENT = "_pages_content"
#: The style of a part of a page not shown (the second run's, until one is chosen).
HIDDEN = {"display": "none"}
# an absolute POSIX path of two or more parts (a capture id, "runs/a.h5", has no leading slash)
_ABSOLUTE_PATH = re.compile(r"(?<![\w./~-])/(?:[\w.~-]+/)+[\w.~-]*")


# --------------------------------------------------------------------------- query strings
class Query:
    """Typed access to a page's query parameters; invalid values fall back and leave a note."""

    def __init__(self, params: dict) -> None:
        self.params = {k: v for k, v in params.items() if isinstance(v, str)}
        self.notes: list[str] = []

    def _bad(self, key: str, value: str, allowed: str) -> None:
        self.notes.append(f"ignored {key}={value!r} from the link: {allowed}")

    def choice(self, key: str, allowed: Sequence, default):
        """One of ``allowed`` (ints are parsed when ``allowed`` holds ints)."""
        raw = self.params.get(key)
        if raw is None or raw == "":
            return default
        for value in allowed:
            if str(value) == raw:
                return value
        self._bad(key, raw, f"must be one of {list(allowed)[:12]}")
        return default

    def many(self, key: str, allowed: Sequence, default: Sequence) -> list:
        """A comma-separated subset of ``allowed`` (order of ``allowed``)."""
        raw = self.params.get(key)
        if raw is None:
            return list(default)
        wanted = [p for p in raw.split(",") if p]
        picked = [v for v in allowed if str(v) in wanted]
        unknown = [p for p in wanted if p not in {str(v) for v in allowed}]
        if unknown:
            self._bad(key, ",".join(unknown), f"must be among {list(allowed)}")
        return picked or list(default)

    def number(self, key: str, low: float, high: float, default: float) -> float:
        """A float in [low, high]."""
        raw = self.params.get(key)
        if raw is None or raw == "":
            return default
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and low <= value <= high):
            self._bad(key, raw, f"must be a number in [{low:g}, {high:g}]")
            return default
        return value

    def integer(self, key: str, low: int, high: int, default: int | None) -> int | None:
        """An int in [low, high]."""
        raw = self.params.get(key)
        if raw is None or raw == "":
            return default
        try:
            value = int(raw)
        except ValueError:
            self._bad(key, raw, "must be an integer")
            return default
        if not low <= value <= high:
            self._bad(key, raw, f"must be an integer in [{low}, {high}]")
            return default
        return value


# --------------------------------------------------------------------------- components
def banner(messages: Sequence[str], kind: str = "error", id: str | None = None) -> html.Div:
    """A banner of one or more messages ("error", "warning" or "info"); empty when no message."""
    kids = [html.Div(m) for m in messages if m]
    props = {"id": id} if id else {}
    if not kids:
        return html.Div([], **props)
    return html.Div(kids, className=f"dfs-banner dfs-banner-{kind}", role="alert", **props)


def info(terms: Sequence[str]) -> html.A:
    """An info icon: hovering shows the glossary's definition of each of ``terms``
    (``dfsviz.app.glossary.help_text``), a click opens the first on the Glossary page."""
    from dfsviz.app.glossary import help_text
    from dfsviz.app.pages.glossary import term_href

    return html.A("i", href=term_href(terms[0]), target="_blank", className="dfs-info",
                  title="\n\n".join(help_text(t) for t in terms))


def control(label: str, component, cls: str = "dfs-control", help: str = "", term: str | None = None) -> html.Div:
    """A labelled control; ``term`` puts the glossary's definition beside the label (:func:`info`),
    ``help`` a short line under it saying what the setting means."""
    kids = [html.Label([label, " ", info([term])] if term else label), component]
    if help:
        kids.append(html.Div(help, className="dfs-help"))
    return html.Div(kids, className=cls)


def dropdown(id: str, options: Sequence, value, *, multi: bool = False, fmt: Callable | None = None) -> dcc.Dropdown:
    fmt = fmt or str
    return dcc.Dropdown(id=id, options=[{"label": fmt(o), "value": o} for o in options], value=value,
                        clearable=False, multi=multi, searchable=False)


def budget_options(value: float) -> list[float]:
    return sorted(set(BUDGETS) | {float(value)})


def head_selection(reader, query: Query) -> tuple[list[str], int, int, int, str, float]:
    """The one-head view of the Masks and Video pages from the query string: (methods, step,
    layer, head, method, budget), defaulting to the last step, the middle layer, the first head,
    dfs_tile (when stored) and gamma 0.2."""
    methods = method_choices(reader)
    step = query.choice("step", reader.steps, reader.steps[-1])
    layer = query.choice("layer", reader.layers, reader.layers[len(reader.layers) // 2])
    head = query.choice("head", reader.heads, reader.heads[0])
    method = query.choice("method", methods, "dfs_tile" if "dfs_tile" in methods else methods[0])
    budget = query.number("budget", 1e-3, 1.0, 0.2)
    return methods, step, layer, head, method, budget


def method_choices(reader) -> list[str]:
    """Stored scoring methods, plus "oracle" (exact block mass) which every capture can rank by
    (``CaptureCatalog.scores`` serves it from m when it was not stored)."""
    return list(reader.methods) + ([] if "oracle" in reader.methods else ["oracle"])


def dfsattn_mask(cid: str, step: int, layer: int, head: int | None = None, branch: str = "cond"):
    """The mask DFSAttn attended at (step, layer) of capture ``cid`` (a recording with
    ``apply_dfsattn`` active), BlockMask [1, Hs, Mq, Mk] in the blocks of its ``dfsattn_order``;
    the stored mask is read once per file version (``CaptureCatalog.cached``)."""
    return get_catalog().cached(cid, ("dfsattn_mask", step, layer, head, branch),
                                lambda r: r.dfsattn_mask(step, layer, head, branch))


def card_title(title: str, *details: str) -> str:
    """A figure title for a card half or a third of the page wide, where one line of title and
    details was clipped: the title, and below it in smaller type the details that are given,
    joined by " · " (the capture compared first, where there is one)."""
    below = " · ".join(d for d in details if d)
    return f"{title}<br><span style='font-size:12px'>{below}</span>" if below else title


def figure_card(name: str, height: int = 440, figure=None, terms: Sequence[str] = ()) -> html.Div:
    """A graph with a CSV download of the plotted numbers (PNG comes from the mode bar), a
    loading indicator while its callback runs and, for ``terms`` (glossary keys of what its
    axes and colours show), an info icon with their definitions (:func:`info`)."""
    graph = dcc.Graph(
        id={"type": "fig", "name": name},
        figure=figure if figure is not None else empty_figure(""),
        style={"height": f"{height}px"},
        config={"displaylogo": False, "modeBarButtonsToRemove": ["sendDataToCloud"], "toImageButtonOptions": {"format": "png", "filename": f"dfsviz_{name}", "scale": 2}},
    )
    bar = html.Div([*([info(terms)] if terms else []),
                    html.Button("CSV", id={"type": "csv", "name": name}, className="dfs-button",
                                title="download the numbers of this figure as CSV"),
                    dcc.Download(id={"type": "csv-dl", "name": name})], className="dfs-card-bar")
    # a spinner over the figure while its callback runs (not before 150 ms: no flicker on quick
    # changes); the figure stays visible, dimmed, until the new one is drawn
    loading = dcc.Loading(graph, type="circle", delay_show=150, overlay_style={"visibility": "visible", "opacity": 0.5},
                          parent_className="dfs-loading")
    return html.Div([bar, loading], className="dfs-card", id=f"{name}-card")


def fig_output(name: str, duplicate: bool = False) -> Output:
    """The figure of card ``name`` as a callback output (``duplicate``: a second callback writes it too)."""
    return Output({"type": "fig", "name": name}, "figure", allow_duplicate=duplicate)


def empty_figure(message: str) -> dict:
    """A blank figure, as the plain dict plotly.js draws, saying ``message`` (none for "").

    Built without plotly.py: a ``go.Figure`` with a template copies the template (34 ms), and
    every figure card of every page layout starts with one."""
    return {"data": [], "layout": {
        "paper_bgcolor": "white", "plot_bgcolor": "white", "xaxis": {"visible": False}, "yaxis": {"visible": False},
        "annotations": [{"text": message, "showarrow": False, "font": {"size": 14}}] if message else []}}


def table(rows: Sequence[Sequence], header: Sequence[str] | None = None, id: str | None = None) -> html.Table:
    head = [html.Tr([html.Th(h) for h in header])] if header else []
    body = [html.Tr([html.Td(_fmt(c)) for c in row]) for row in rows]
    props = {"id": id} if id else {}
    return html.Table(head + body, className="dfs-table", **props)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


# --------------------------------------------------------------------------- capture picker
class PageContext:
    """The capture a page shows, its reader, the parsed query and the banners to show.

    ``compare``: the page can draw a second capture beside the first (``compare=<id>`` in the
    query, validated like ``file=``; an id that cannot be served gives the file banner and no
    comparison). ``compare_id`` is that capture, or None. Every page that shows a capture
    compares; only Live, which runs attention on one capture's tensors, passes False.
    """

    def __init__(self, prefix: str, params: dict, compare: bool = True) -> None:
        self.prefix = prefix
        self.query = Query(params)
        self.catalog = get_catalog()
        self.errors: list[str] = []
        self.warnings: list[str] = []
        self.offers_compare = compare
        requested = self.query.params.get("file")
        self.cid = self._usable(requested) if requested else None
        if self.cid is None:
            self.cid = self.catalog.default_id()
            if self.cid is not None:
                if requested:
                    self.errors[-1] += f"; showing {self.cid} instead"
                entry = self.catalog.entry(self.cid)
                if entry.message:
                    self.warnings.append(entry.message)
        # listed after the requested file is opened: a large file's background check is queued first
        self.entries = self.catalog.entries()
        self.reader = self.catalog.reader(self.cid) if self.cid else None
        wanted = self.query.params.get("compare") if compare else None
        self.compare_id = self._usable(wanted) if wanted else None
        if wanted and self.compare_id is None:
            self.errors[-1] += "; no comparison shown"

    def _usable(self, requested: str) -> str | None:
        """The id of capture ``requested`` when it can be drawn (its status noted as a warning),
        else None with the reason in the errors."""
        try:
            entry = self.catalog.entry(requested)
        except CaptureError as exc:
            self.errors.append(str(exc))
            return None
        if not entry.usable:
            self.errors.append(entry.message)
            return None
        if entry.message:
            self.warnings.append(entry.message)
        return entry.id

    def header(self) -> html.Div:
        options = [{"label": e.label, "value": e.id, "disabled": not e.usable} for e in self.entries]
        picker = dcc.Dropdown(id=f"{self.prefix}-file", options=options, value=self.cid, clearable=False)
        pickers = [control("capture", picker, "dfs-control dfs-file", term="capture")]
        if self.offers_compare:
            second = dcc.Dropdown(id=f"{self.prefix}-compare", options=options, value=self.compare_id, clearable=True,
                                  placeholder="none")
            pickers.append(control("compare with", second, "dfs-control dfs-file", term="compare"))
        missing = [] if self.cid else [
            "no usable capture under the roots " + ", ".join(self.catalog.roots)
            + "; make one with `dfsviz capture`"]
        return html.Div([
            dcc.Store(id=f"{self.prefix}-rendered", data=self.cid),
            html.Div(pickers, className="dfs-controls"),
            banner(self.errors + missing, "error", id=f"{self.prefix}-file-banner"),
            banner(self.warnings + self.query.notes, "warning", id=f"{self.prefix}-link-banner"),
        ])


def lacking(cid: str, selection: Sequence[tuple[str, object, Sequence]], drawn: str = "nothing drawn for it here") -> str:
    """One line saying which of ``selection`` ((name, value chosen, values capture ``cid``
    holds), ...) the capture lacks and what is drawn for it, e.g. "runs/b.h5 has no step 3
    (steps [0, 2]): nothing drawn for it here"; "" when it lacks none."""
    missing = [f"{name} {value} ({name}s {list(held)})" for name, value, held in selection if value not in held]
    return f"{cid} has no {'; no '.join(missing)}: {drawn}" if missing else ""


def compare_section(prefix: str, body: Sequence, shown: bool, part: str = "compare") -> html.Div:
    """Where a page draws the second run under the first: a heading naming it, the line of what
    it lacks of the selection (``{prefix}-{part}-note``) and ``body`` (its figure cards and
    tables, in ``{prefix}-{part}-body``); hidden while no second capture is chosen
    (``shown``: one is, from the link). :func:`register_compare` fills it. ``part`` names a
    second section of one page (Overview's "dfsattn-compare": what the second run lacks there
    hides only that section's body)."""
    return html.Div([
        html.H4(id=f"{prefix}-{part}-heading"),
        html.Div(id=f"{prefix}-{part}-note"),
        html.Div(list(body), id=f"{prefix}-{part}-body"),
    ], id=f"{prefix}-{part}-section", style=None if shown else HIDDEN)


def register_compare(app, prefix: str, figures: Sequence[str], others: Sequence[Output], inputs: Sequence[Input],
                     draw: Callable, part: str = "compare") -> None:
    """The callback that draws the second run in :func:`compare_section` (of that ``part``), with
    the page's controls.

    ``figures``: its figure cards; ``others``: further outputs of the body (a table); ``inputs``:
    the page's controls but the capture. ``draw(compare, *values)`` returns (the figures and the
    other outputs, in that order; the line of what capture ``compare`` lacks, "" when nothing,
    e.g. :func:`lacking`). A lacking selection shows that line and hides the body, so the second
    run's old figures never pass for the new selection; an error shows its banner there.
    """
    shown = len(figures) + len(others)
    note, section, body, heading = range(shown, shown + 4)

    @app.callback(*[fig_output(f) for f in figures], *others, Output(f"{prefix}-{part}-note", "children"),
                  Output(f"{prefix}-{part}-section", "style"), Output(f"{prefix}-{part}-body", "style"),
                  Output(f"{prefix}-{part}-heading", "children"), Input(f"{prefix}-compare", "value"), *inputs)
    @guarded(shown + 4, note, figures=range(len(figures)), on_error={section: None, body: HIDDEN})
    def _compare(compare, *values):
        if not compare:
            return (*[no_update] * shown, [], HIDDEN, HIDDEN, "")
        drawn, missing = draw(compare, *values)
        if missing:
            return (*[no_update] * shown, banner([missing], "info"), None, HIDDEN, f"compared with {compare}")
        return (*drawn, [], None, None, f"compared with {compare}")


def register_url_sync(app, prefix: str, keys: Sequence[tuple[str, str, str]]) -> None:
    """The page's one owner of the address: ``keys`` = (query key, component id, prop), the
    capture picker ("file") among them, and the second capture's ("compare") on a page that
    compares two runs.

    Runs in the browser. A change of any control but the capture rewrites the query string
    with ``history.replaceState`` (no navigation, no re-render), so the address bar always
    links to the view on screen. Choosing another capture navigates instead (a new history
    entry, the page rendered for that file, whose steps, layers and heads differ) the way
    ``dcc.Link`` does, so Dash's location component learns the new address from the browser
    and never restores the one the page was opened with (``replaceState`` does not tell it).
    A second capture ("compare") is kept across that navigation; choosing or clearing it
    only rewrites the address (the page's controls follow the first capture).
    """
    names = [k for k, _, _ in keys]
    if "file" not in names:
        raise ValueError(f"`keys` must include the capture picker ('file', '{prefix}-file', 'value') (got {names})")
    app.clientside_callback(
        """
        function() {
            const names = %s;
            const rendered = arguments[names.length];
            const noUpdate = window.dash_clientside.no_update;
            const clean = s => s.replace(/%%2F/g, '/').replace(/%%2C/g, ',');
            const file = arguments[names.indexOf('file')];
            if (file && rendered && file !== rendered) {
                // what dcc.Link does: a new history entry, then Dash's location component
                // reads it and the router renders the page for that file
                // a second capture being compared stays chosen
                const q = new URLSearchParams({file: file});
                const compare = names.indexOf('compare') >= 0 ? arguments[names.indexOf('compare')] : null;
                if (compare) q.set('compare', compare);
                window.history.pushState({}, '', window.location.pathname + '?' + clean(q.toString()));
                window.dispatchEvent(new CustomEvent('_dashprivate_pushstate'));
                return noUpdate;
            }
            const params = new URLSearchParams();
            for (let i = 0; i < names.length; i++) {
                let v = arguments[i];
                if (v === null || v === undefined || v === '' || (Array.isArray(v) && v.length === 0)) continue;
                params.set(names[i], Array.isArray(v) ? v.join(',') : String(v));
            }
            const search = '?' + clean(params.toString());
            if (window.location.search !== search) {
                window.history.replaceState(window.history.state, '', window.location.pathname + search);
            }
            return search;
        }
        """ % repr(names).replace("'", '"'),
        Output(f"{prefix}-url", "data"),
        [Input(cid, prop) for _, cid, prop in keys],
        State(f"{prefix}-rendered", "data"),
    )


# --------------------------------------------------------------------------- errors
def error_text(exc: BaseException) -> str:
    """What the browser is told of a failure.

    A library error (ValueError/TypeError/CaptureError: messages written for users) keeps its
    text, with the served roots' absolute paths replaced by their labels and any other absolute
    path by "<server path>"; any other failure says only its type, since its text may hold
    server paths (the traceback goes to the log).
    """
    if not isinstance(exc, (ValueError, TypeError)):
        return f"internal error ({type(exc).__name__}); the server log has the details"
    text = str(exc)
    try:
        text = get_catalog().hide_paths(text)
    except RuntimeError:  # no app serving (a page function called outside a request): no roots to name
        pass
    # any other absolute path (a library's message may name one) says where files live on the server
    return _ABSOLUTE_PATH.sub("<server path>", text)


def guarded(outputs: int, banner_at: int, figures: Sequence[int] = (), on_error: dict[int, object] | None = None):
    """Wrap a callback so that no exception reaches the browser.

    A library error (ValueError/TypeError/CaptureError: messages written for users) or any
    other failure (logged with its traceback on the server) becomes an error banner of
    :func:`error_text` at position ``banner_at``, empty figures at the ``figures`` positions
    and ``on_error[i]`` at position i (e.g. a disabled download button); the other outputs keep
    what they show.
    """

    def deco(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except (CaptureError, ValueError, TypeError) as exc:
                message = error_text(exc)
                logger.info("callback %s: %s", fn.__name__, message)
            except Exception as exc:  # noqa: BLE001 - the browser gets a banner, the log the traceback
                logger.exception("callback %s failed", fn.__name__)
                message = error_text(exc)
            out = [no_update] * outputs
            for i in figures:
                out[i] = empty_figure("no data: see the message above")
            for i, value in (on_error or {}).items():
                out[i] = value
            out[banner_at] = banner([message], "error")
            return out if outputs > 1 else out[0]

        return wrapper

    return deco


def guarded_layout(title: str):
    """Wrap a page's ``layout(**query)`` so that a failure renders a banner, not a server error."""

    def deco(fn):
        @functools.wraps(fn)
        def wrapper(**query):
            try:
                return fn(**query)
            except (CaptureError, ValueError, TypeError) as exc:
                message = error_text(exc)
            except Exception as exc:  # noqa: BLE001 - the browser gets a banner, the log the traceback
                logger.exception("layout of %s failed", title)
                message = error_text(exc)
            return html.Div([html.H2(title), banner([message], "error")])

        return wrapper

    return deco


# --------------------------------------------------------------------------- CSV of a figure
def _decode(value):
    """Plotly's JSON arrays may be typed-array dicts {"dtype", "bdata", "shape"}: decode them."""
    if isinstance(value, dict) and "bdata" in value:
        arr = np.frombuffer(base64.b64decode(value["bdata"]), dtype=np.dtype(value["dtype"]))
        shape = value.get("shape")
        if shape:
            arr = arr.reshape([int(s) for s in str(shape).split(",")] if isinstance(shape, str) else shape)
        return arr.tolist()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def cell_flags(flags) -> dict:
    """A bool [R, C] grid (e.g. a block mask's kept blocks) packed for a trace's ``meta``, where
    :func:`figure_csv` finds it: {"flags": {"name": "kept", "shape": [R, C], "bits": base64}}."""
    arr = np.asarray(flags, dtype=bool)
    return {"flags": {"name": "kept", "shape": list(arr.shape),
                      "bits": base64.b64encode(np.packbits(arr, axis=None).tobytes()).decode()}}


def _flags(figure: dict) -> tuple[str, np.ndarray] | None:
    """(name, bool [R, C]) of the :func:`cell_flags` a trace of ``figure`` carries, or None."""
    for trace in (figure or {}).get("data", []):
        packed = (trace.get("meta") or {}).get("flags") if isinstance(trace.get("meta"), dict) else None
        if packed:
            shape = [int(n) for n in packed["shape"]]
            bits = np.unpackbits(np.frombuffer(base64.b64decode(packed["bits"]), dtype=np.uint8))
            return packed["name"], bits[:int(np.prod(shape))].reshape(shape).astype(bool)
    return None


def figure_csv(figure: dict) -> str:
    """Long-form CSV of the data traces of a figure: trace, x, y, z (outline traces skipped),
    after a row with the figure's title as plain text.

    Heatmaps and images (their values in ``customdata``) give one row per cell; line, scatter
    and bar traces one row per point;
    box/violin/histogram traces one row per sample. A figure whose overlay carries
    :func:`cell_flags` (the Masks page's kept blocks) gets one more column, 1 where the
    heatmap's cell is flagged (kept) and 0 elsewhere.

    The figure comes back from the browser: anything but a figure as the pages draw them (a
    request the page never sends) raises ValueError.
    """
    try:
        return _figure_csv(figure)
    except (AttributeError, IndexError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"not a figure this app draws ({type(exc).__name__}: {exc})") from None


def _figure_csv(figure: dict) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    title = (figure or {}).get("layout", {}).get("title")
    text = title.get("text", "") if isinstance(title, dict) else ""
    # the title as read, without its markup: line breaks as " · ", tags (a smaller second line) dropped
    writer.writerow(["figure", re.sub(r"<[^>]*>", "", (text or "").replace("<br>", " · "))])
    flags = _flags(figure)
    writer.writerow(["trace", "x", "y", "z"] + ([flags[0]] if flags else []))
    for trace in (figure or {}).get("data", []):
        if trace.get("hoverinfo") == "skip":
            continue  # outlines and bands: drawn from the data rows, not data themselves
        name = trace.get("name", trace.get("type", ""))
        x, y, z = (_decode(trace.get(k)) for k in ("x", "y", "z"))
        if trace.get("type") == "image":  # an image's z is its colours; the values drawn are its customdata
            z = _decode(trace.get("customdata"))
        if z is not None:
            rows = z if isinstance(z, list) else []
            flagged = flags[1] if flags and flags[1].shape == (len(rows), len(rows[0]) if rows else 0) else None
            for i, row in enumerate(rows):
                for j, value in enumerate(row if isinstance(row, list) else [row]):
                    xi = x[j] if isinstance(x, list) and j < len(x) else j
                    yi = y[i] if isinstance(y, list) and i < len(y) else i
                    writer.writerow([name, xi, yi, value] + ([int(flagged[i, j])] if flagged is not None else []))
            continue
        xs = x if isinstance(x, list) else None
        ys = y if isinstance(y, list) else None
        n = max(len(xs or []), len(ys or []))
        for i in range(n):
            xi = xs[i] if xs is not None and i < len(xs) else ""
            yi = ys[i] if ys is not None and i < len(ys) else ""
            if xi is None and yi is None:
                continue
            writer.writerow([name, xi, yi, ""])
    return out.getvalue()


def register_shell_callbacks(app, modules: Sequence) -> None:
    """CSV downloads of every figure card, and navigation links that keep the chosen capture
    (and the one compared with it)."""

    @app.callback(Output({"type": "csv-dl", "name": MATCH}, "data"), Input({"type": "csv", "name": MATCH}, "n_clicks"),
                  State({"type": "fig", "name": MATCH}, "figure"), prevent_initial_call=True)
    def _download_csv(clicks, figure):
        if not clicks:
            return no_update
        name = ctx.triggered_id.get("name") if isinstance(ctx.triggered_id, dict) else None
        name = re.sub(r"[^A-Za-z0-9_-]", "_", str(name or "figure"))[:64]  # the card's id, or what a request claims
        try:
            text = figure_csv(figure)
        except ValueError as exc:
            logger.warning("CSV download of %s refused: %s", name, exc)
            raise PreventUpdate from None
        return dcc.send_string(text, filename=f"dfsviz_{name}.csv")

    paths = [m.PATH for m in modules]
    app.clientside_callback(
        """
        function() {
            const paths = %s;
            // the capture and the one compared with it (pages that compare nothing ignore it)
            const here = new URLSearchParams(window.location.search);
            const kept = new URLSearchParams();
            for (const key of ['file', 'compare']) if (here.get(key)) kept.set(key, here.get(key));
            const q = kept.toString() ? '?' + kept.toString().replace(/%%2F/g, '/') : '';
            return paths.map(p => p + q);
        }
        """ % repr(paths).replace("'", '"'),
        [Output(f"nav-{m.PREFIX}", "href") for m in modules],
        Input(PAGES_CONTENT, "children"),
    )

"""Live: run dense attention and DFSAttn on stored Q/K/V and compare time, output and recall.

DFSAttn here is the full sparse path: block scoring of the ordered Q/K
(``dfsviz.kernels.block_scores``), top-k selection at the budget, then block-sparse
attention (``dfsviz.kernels.block_sparse_attention``, which gathers through the order and
writes the output back in the original order). Dense attention is PyTorch SDPA on the same
tensors. On a GPU the kernels run in Triton; on CPU both sides run the PyTorch references,
so the times only say how the references scale.

The run happens in a worker thread of the server (one at a time): the Run callback returns
at once with a job id, and a ``dcc.Interval`` polls the job, so the page stays responsive.
Dash's own background callbacks would need ``diskcache`` or Celery, which dfsviz does not
depend on; a thread suffices because the work is PyTorch (it releases the GIL).

A served dashboard may be reachable by others (``dfsviz app --host``): job ids are random
(``secrets.token_urlsafe``), so one client cannot read or guess another's run, and each
client (its address) may have at most ``MAX_PENDING_PER_CLIENT`` runs waiting or running.
"""

from __future__ import annotations

import secrets
import statistics
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import dash
import torch
from dash import Input, Output, State, dcc, html, no_update

from dfsviz.app.data import get_catalog
from dfsviz.app.pages import common

NAME, PATH, PREFIX = "Live", "/live", "lv"
#: Timed repetitions per measurement (after one warm-up run); the median is reported.
REPEATS = 3
#: Runs one client may have waiting or running at once; Run is refused beyond it.
MAX_PENDING_PER_CLIENT = 2
#: Runs waiting or running on the server, all clients together.
MAX_PENDING = 8
_MAX_JOBS = 32  # finished runs kept for their pages to fetch (oldest dropped first)

_POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dfsviz-live")
_JOBS: dict[str, tuple[str, float, Future]] = {}  # job id -> (client, start, future)
_LOCK = threading.Lock()


@common.guarded_layout("Live")
def layout(**query):
    page = common.PageContext(PREFIX, query, compare=False)
    if page.reader is None:
        return html.Div([html.H2("Live"), page.header()])
    r, q = page.reader, page.query
    qkv_layers = list(r.layout.qkv_layers)
    if not qkv_layers:
        return html.Div([html.H2("Live"), page.header(),
                         common.banner(["this capture stored no Q/K/V: capture with --save-qkv LAYER to run attention live"],
                                       "warning", id=f"{PREFIX}-banner")])
    methods = list(r.methods)
    qkv_steps = [s for s in r.steps if s in r.layout.qkv_steps]
    if not qkv_steps:
        return html.Div([html.H2("Live"), page.header(),
                         common.banner(["no completed step of this capture holds Q/K/V yet (--qkv-steps)"],
                                       "warning", id=f"{PREFIX}-banner")])
    step = q.choice("step", qkv_steps, qkv_steps[-1])
    layer = q.choice("layer", qkv_layers, qkv_layers[0])
    order = q.choice("order", r.orders, "hilbert3d" if "hilbert3d" in r.orders else r.orders[0])
    method = q.choice("method", methods, "dfs_tile" if "dfs_tile" in methods else methods[0])
    budget = q.number("budget", 1e-3, 1.0, 0.2)
    device = "cuda (Triton kernels)" if torch.cuda.is_available() else "cpu (PyTorch references)"
    controls = html.Div([
        common.control("step (stored Q/K/V)", common.dropdown(f"{PREFIX}-step", qkv_steps, step), term="step"),
        common.control("layer (stored Q/K/V)", common.dropdown(f"{PREFIX}-layer", qkv_layers, layer), term="layer"),
        common.control("order", common.dropdown(f"{PREFIX}-order", r.orders, order), term="order"),
        common.control("scoring method", common.dropdown(f"{PREFIX}-method", methods, method), term="method"),
        common.control("budget γ", common.dropdown(f"{PREFIX}-budget", common.budget_options(budget), budget), term="gamma"),
        html.Button("Run", id=f"{PREFIX}-run", className="dfs-button", n_clicks=0),
    ], className="dfs-controls")
    return html.Div([
        html.H2("Live: dense attention vs DFSAttn"),
        page.header(),
        html.Div(f"device: {device}", className="dfs-note", id=f"{PREFIX}-device"),
        controls,
        dcc.Store(id=f"{PREFIX}-url"),
        dcc.Store(id=f"{PREFIX}-job"),
        dcc.Interval(id=f"{PREFIX}-poll", interval=300, disabled=True),
        html.Div(id=f"{PREFIX}-banner"),
        html.Div("press Run", id=f"{PREFIX}-status", className="dfs-note"),
        html.Div(id=f"{PREFIX}-result"),
        html.Div([common.figure_card(f"{PREFIX}-times", 420, terms=("attention", "scores", "mask"))], className="dfs-row"),
    ])


# --------------------------------------------------------------------------- the run
def _timed(fn, device: torch.device, repeats: int):
    """(result, median seconds) of ``fn`` after one warm-up call."""
    out = fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


def run_live(catalog, cid: str, step: int, layer: int, order: str, method: str, budget: float,
             repeats: int = REPEATS, device: str | None = None) -> dict:
    """Dense SDPA and DFSAttn (scoring, selection, block-sparse attention) on stored Q/K/V.

    Returns seconds per stage (median of ``repeats``), speedup, relative L2 and max abs error
    of the sparse output against dense, recall (stored block mass) and density of the mask,
    the backend and device, and the settings that produced them (capture, step, layer, order,
    method, budget). Q/K/V: [1, H, N, D]; float16 on CUDA, float32 on CPU.
    """
    from dfsviz.kernels import block_scores, block_sparse_attention, resolve_backend
    from dfsviz.sparse.select import select_topk
    from dfsviz.sparse.stats import block_recall

    reader = catalog.reader(cid)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    q, k, v = (x.to(dev, dtype) for x in catalog.qkv(cid, step, layer))
    scale = float(reader.attrs.get("softmax_scale", q.shape[-1] ** -0.5))
    tok = catalog.token_order(cid, order)
    tok_dev = type(tok)(tok.name, tok.grid, tok.perm.to(dev), tok.inv.to(dev))
    n, block = reader.grid.num_tokens, reader.block
    tiles = reader.attrs.get("method_tiles")
    tile = None
    if isinstance(tiles, str):
        import json

        tile = json.loads(tiles).get(method)
    dense, t_dense = _timed(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale), dev, repeats)
    qo, ko = tok_dev.apply(q), tok_dev.apply(k)
    scores, t_score = _timed(lambda: block_scores(qo, ko, method=method, tile=tile, block=block, scale=scale), dev, repeats)
    mask, t_select = _timed(lambda: select_topk(scores, budget, seq_len=n, block=block), dev, repeats)
    out, t_attn = _timed(lambda: block_sparse_attention(q, k, v, mask, order=tok_dev, scale=scale), dev, repeats)
    diff = (out.double() - dense.double())
    m = catalog.mass(cid, step, layer, order)
    t_sparse = t_score + t_select + t_attn
    return {
        "device": str(dev), "dtype": str(dtype).replace("torch.", ""), "backend": resolve_backend(None, q, k, v),
        "heads": q.shape[1], "tokens": n, "head_dim": q.shape[-1], "capture": cid, "step": step, "layer": layer,
        "budget": budget, "method": method, "order": order,
        "dense_s": t_dense, "score_s": t_score, "select_s": t_select, "attention_s": t_attn, "sparse_s": t_sparse,
        "speedup": t_dense / t_sparse if t_sparse > 0 else float("nan"),
        "speedup_attention_only": t_dense / t_attn if t_attn > 0 else float("nan"),
        "rel_l2_error": float(diff.norm() / dense.double().norm().clamp_min(1e-30)),
        "max_abs_error": float(diff.abs().max()),
        "recall": float(block_recall(m, mask.to("cpu")).mean()),
        "density": float(mask.density().mean()),
    }


def _submit(catalog, client: str, *args) -> str:
    """Queue ``run_live(catalog, *args)`` for ``client``; its job id (random, unguessable).

    Raises ValueError when ``client`` already has ``MAX_PENDING_PER_CLIENT`` runs waiting or
    running, or the server ``MAX_PENDING``.
    """
    with _LOCK:
        waiting = [owner for owner, _, future in _JOBS.values() if not future.done()]
        if len(waiting) >= MAX_PENDING:
            raise ValueError(f"the server has {len(waiting)} runs waiting or running (at most {MAX_PENDING}); "
                             "press Run again in a minute")
        pending = waiting.count(client)
        if pending >= MAX_PENDING_PER_CLIENT:
            raise ValueError(f"{pending} runs of yours are waiting or running (at most {MAX_PENDING_PER_CLIENT}); "
                             "wait for one to finish, then press Run again")
        job = secrets.token_urlsafe(16)
        _JOBS[job] = (client, time.perf_counter(), _POOL.submit(run_live, catalog, *args))
        done = [j for j, (_, _, future) in _JOBS.items() if future.done()]
        for old in done[:max(0, len(_JOBS) - _MAX_JOBS)]:
            _JOBS.pop(old, None)
    return job


def _client() -> str:
    """Who asks: the address of the request's client (the unit of the per-client bound)."""
    import flask

    return flask.request.remote_addr or "unknown"


def _times_figure(res: dict):
    """Stacked bars: dense SDPA against DFSAttn's scoring + selection + sparse attention (ms)."""
    import plotly.graph_objects as go

    fig = go.Figure()
    fig.add_trace(go.Bar(x=["dense SDPA"], y=[res["dense_s"] * 1e3], name="dense attention", marker_color="#888888"))
    for key, name, colour in (("score_s", "block scoring", "#636EFA"), ("select_s", "top-k selection", "#00CC96"),
                              ("attention_s", "block-sparse attention", "#EF553B")):
        fig.add_trace(go.Bar(x=["DFSAttn"], y=[res[key] * 1e3], name=name, marker_color=colour))
    fig.update_layout(barmode="stack", template="plotly_white", yaxis_title="time (ms, median)",
                      title=f"{res['backend']} on {res['device']} · {res['heads']} heads × {res['tokens']} tokens · "
                            f"speedup {res['speedup']:.2f}×")
    return fig


def register(app) -> None:
    dash.register_page(__name__, path=PATH, name=NAME, title=f"dfsviz · {NAME}", layout=layout, order=5)
    ids = ("file", "step", "layer", "order", "method", "budget")

    @app.callback(Output(f"{PREFIX}-job", "data"), Output(f"{PREFIX}-poll", "disabled"),
                  Output(f"{PREFIX}-status", "children"), Output(f"{PREFIX}-run", "disabled"),
                  Output(f"{PREFIX}-banner", "children"),
                  Input(f"{PREFIX}-run", "n_clicks"), *[State(f"{PREFIX}-{c}", "value") for c in ids],
                  prevent_initial_call=True)
    @common.guarded(5, 4)
    def _start(clicks, cid, step, layer, order, method, budget):
        catalog = get_catalog()
        catalog.reader(cid)  # refuse a bad id before a thread sees it
        job = _submit(catalog, _client(), cid, int(step), int(layer), order, method, float(budget))
        return job, False, "running…", True, []

    @app.callback(Output(f"{PREFIX}-result", "children"), common.fig_output(f"{PREFIX}-times"),
                  Output(f"{PREFIX}-poll", "disabled", allow_duplicate=True),
                  Output(f"{PREFIX}-status", "children", allow_duplicate=True),
                  Output(f"{PREFIX}-run", "disabled", allow_duplicate=True),
                  Output(f"{PREFIX}-banner", "children", allow_duplicate=True),
                  Input(f"{PREFIX}-poll", "n_intervals"), State(f"{PREFIX}-job", "data"), prevent_initial_call=True)
    @common.guarded(6, 5)
    def _poll(_, job):
        with _LOCK:
            _, started, future = _JOBS.get(job, (None, None, None))
        if future is None:
            return no_update, no_update, True, "no run in progress", False, []
        if not future.done():
            return no_update, no_update, no_update, f"running… {time.perf_counter() - started:.1f} s", no_update, no_update
        try:
            res = future.result()
        except Exception as exc:  # the thread's error becomes the banner via the guard's rules
            with _LOCK:
                _JOBS.pop(job, None)
            if isinstance(exc, (ValueError, TypeError)):
                return no_update, no_update, True, "failed", False, common.banner([common.error_text(exc)], "error")
            raise
        rows = [
            ("capture", res["capture"]),
            ("step · layer · order", f"{res['step']} · {res['layer']} · {res['order']}"),
            ("scoring method · budget γ", f"{res['method']} · {res['budget']:g}"),
            ("device / backend", f"{res['device']} / {res['backend']} ({res['dtype']})"),
            ("dense SDPA", f"{res['dense_s'] * 1e3:.2f} ms"),
            ("DFSAttn total (score + select + attention)", f"{res['sparse_s'] * 1e3:.2f} ms"),
            ("  block scoring", f"{res['score_s'] * 1e3:.2f} ms"),
            ("  top-k selection", f"{res['select_s'] * 1e3:.2f} ms"),
            ("  block-sparse attention", f"{res['attention_s'] * 1e3:.2f} ms"),
            ("speedup (total / attention only)", f"{res['speedup']:.2f}× / {res['speedup_attention_only']:.2f}×"),
            ("output error (relative L2 / max abs)", f"{res['rel_l2_error']:.3e} / {res['max_abs_error']:.3e}"),
            ("recall R / density ρ", f"{res['recall']:.4f} / {res['density']:.4f}"),
        ]
        note = [] if res["device"].startswith("cuda") else [
            "CPU: both sides run PyTorch references; speedups need the GPU kernels"]
        result = html.Div([common.table(rows, ["quantity", "value"], id=f"{PREFIX}-table"),
                           html.Div(note, className="dfs-note")])
        return result, _times_figure(res), True, f"done in {time.perf_counter() - started:.1f} s", False, []

    common.register_url_sync(app, PREFIX, [(c, f"{PREFIX}-{c}", "value") for c in ids])

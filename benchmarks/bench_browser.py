"""Interaction latency of the dashboard where the user is: in Chromium, change -> last figure drawn.

    # the shipped sample and a capture of >= 1 GB (bench_app_latency.py --make makes one)
    PYTHONPATH=$PWD python3 benchmarks/bench_browser.py --capture /tmp/big/big.h5 \\
        --out benchmarks/results/browser_latency.json

``dfsviz app`` serves the captures in a process of its own (as a user runs it); Debian's
Chromium (``/usr/bin/chromium``, driven by Playwright, headless) opens the Masks and the
Recall page on each capture and makes ``--changes`` random changes of their controls through
the dropdowns, each to a value other than the current one. A change is timed in the page
itself (``performance.now()``): from the click that picks the new value to the last
``plotly_afterplot`` event of any figure of the page, once no callback request is in flight
and no figure has drawn for ``--settle-ms`` (that quiet time is not counted). The server
time of the same change (the time during which at least one of the Dash requests it caused
was in flight, request sent to response body received) is recorded beside it.

Opening a file ("open"): for each capture and each page of ``OPEN_PAGES``, a fresh ``dfsviz app``
(a new process: nothing of the file is open, validated or cached) shows the page on another
capture (the medium sample for the tiny sample, the tiny sample for the others), and the
capture is picked in the page's capture picker, as a user opens a file in the dashboard: timed
in the page from the click to the first figure drawn with data, and to the last figure drawn
once the page is settled. "Cold" beside it: another fresh server over the capture's folder
alone and a fresh tab navigate to the page with the file selected (the dashboard's scripts are
fetched and the server's first request served inside the timed navigation), timed from the
navigation's start to the first figure drawn with data and to every shown figure drawn.
Server start-up is not counted (the server answers before anything is timed).

Results: p50/p95 per page and capture, the open times, with the machine, its load, the versions
and the capture shapes, to ``--out``.
Targets: browser p95 <= 400 ms on Masks and Recall, server p95 <= 150 ms; open + first figure of
any page <= 2 s.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import torch

from bench_app_latency import _summary  # one way to summarise latencies (run from benchmarks/ or with it on the path)
from provenance import load, run_header

log = logging.getLogger("bench_browser")

TARGET_BROWSER_P95_MS = 400.0
TARGET_SERVER_P95_MS = 150.0
TARGET_OPEN_MS = 2000.0
CHROMIUM = "/usr/bin/chromium"
#: page -> (path, prefix, controls changed); Recall's layer and head include "all".
PAGES = {"masks": ("/masks", "mk", ("step", "layer", "head", "method", "budget")),
         "recall": ("/recall", "rc", ("step", "layer", "head", "target"))}
#: pages timed from navigation to their first figure on a freshly started server
OPEN_PAGES = {"overview": "/", "masks": "/masks", "recall": "/recall", "theory": "/theory", "drift": "/drift"}
OPEN_PREFIXES = {"overview": "ov", "masks": "mk", "recall": "rc", "theory": "th", "drift": "dr"}

# Installed once per page load: counts Dash requests in flight and their time, and stamps
# every plotly_afterplot of every figure (graphs are attached as they appear).
_PROBE = """
() => {
  if (window.__probe) return;
  const p = window.__probe = {inflight: 0, lastDraw: 0, lastEvent: 0, t0: 0, draws: 0, firstData: 0, server: []};
  const fetch0 = window.fetch;
  window.fetch = function(url, opts) {
    const dash = String(url).includes('_dash-update-component');
    if (!dash) return fetch0.apply(this, arguments);
    p.inflight++; p.lastEvent = performance.now();
    const start = performance.now();
    return fetch0.apply(this, arguments).then(async r => {
      const copy = r.clone(); await copy.arrayBuffer();
      p.server.push([start, performance.now()]);
      p.inflight--; p.lastEvent = performance.now();
      return r;
    }, e => { p.inflight--; throw e; });
  };
  document.addEventListener('click', () => { p.t0 = performance.now(); p.draws = 0; p.firstData = 0; p.server = []; }, true);
  const hook = () => document.querySelectorAll('.js-plotly-plot').forEach(g => {
    if (g.__probed || !g.on) return;
    g.__probed = true;
    const born = performance.now();  // a graph the page made after the click draws the new capture
    g.on('plotly_afterplot', () => {
      p.lastDraw = p.lastEvent = performance.now(); p.draws++;
      if (!p.firstData && born >= p.t0 && p.t0 > 0 && g.data && g.data.length > 0) p.firstData = p.lastDraw;
    });
  });
  new MutationObserver(hook).observe(document.body, {childList: true, subtree: true});
  hook();
}
"""

# the page's figures in view with data: "some" (the first drawn) or "every"; the time since the
# navigation started when it holds, else false
_DRAWN = """
([which]) => { const g = [...document.querySelectorAll('.js-plotly-plot')].filter(x => x.offsetParent !== null);
  const drawn = g.filter(x => x.data && x.data.length > 0);
  const ok = which === 'some' ? drawn.length > 0 : g.length > 0 && drawn.length === g.length;
  return ok ? performance.now() : false; }
"""

_SETTLED = """
([settle]) => { const p = window.__probe; const now = performance.now();
  return p.t0 > 0 && p.inflight === 0 && p.draws > 0 && now - p.lastEvent > settle; }
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(roots: list[Path]) -> tuple[subprocess.Popen, str]:
    """``dfsviz app`` over ``roots`` in a process of its own; (process, URL) once it answers."""
    port = _free_port()
    cmd = [sys.executable, "-c", "from dfsviz.cli import main; main()", "app", "--port", str(port)]
    for root in roots:
        cmd += ["--root", str(root)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url + "/_dash-layout", timeout=2).read()
            return proc, url
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"dfsviz app exited with {proc.returncode}") from None
            time.sleep(0.2)  # polling a server that is starting: not a measurement
    proc.kill()
    raise RuntimeError("dfsviz app did not answer within 120 s")


def _busy(spans: list[list[float]]) -> float:
    """Milliseconds during which at least one of the (start, end) requests was in flight
    (requests run side by side: their durations overlap and must not be summed)."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(spans):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def _options(page, control_id: str) -> list[str]:
    page.locator(f"#{control_id}").click()
    options = page.locator("[role=listbox] [role=option]")
    options.first.wait_for()
    labels = options.all_inner_texts()
    page.keyboard.press("Escape")
    return labels


def _pick(page, control_id: str, label: str) -> None:
    import re

    page.locator(f"#{control_id}").click()
    page.locator("[role=listbox] [role=option]").filter(has_text=re.compile(f"^{re.escape(label)}$")).first.click()
    page.keyboard.press("Escape")


def measure_page(page, url: str, cid: str, name: str, changes: int, rng: random.Random, settle_ms: float,
                 timeout_ms: float) -> dict:
    """Open page ``name`` on capture ``cid`` and time ``changes`` random control changes."""
    path, prefix, controls = PAGES[name]
    page.goto(f"{url}{path}?file={cid}")
    page.evaluate(_PROBE)
    first = page.locator(f"#{prefix}-banner")
    first.wait_for(state="attached")
    # the first view: wait for every shown figure of the page drawn (a hidden comparison has none)
    page.wait_for_function(_DRAWN, arg=["every"], timeout=timeout_ms)
    options = {c: _options(page, f"{prefix}-{c}") for c in controls}
    current = {c: page.locator(f"#{prefix}-{c}").inner_text().strip() for c in controls}
    browser_ms, server_ms, rows = [], [], []
    for _ in range(changes):
        control = rng.choice([c for c in controls if len(options[c]) > 1])
        label = rng.choice([o for o in options[control] if o != current[control]])
        _pick(page, f"{prefix}-{control}", label)
        current[control] = label
        page.wait_for_function(_SETTLED, arg=[settle_ms], timeout=timeout_ms)
        probe = page.evaluate("() => { const p = window.__probe; return {t0: p.t0, last: p.lastDraw, draws: p.draws,"
                              " server: p.server}; }")
        total = probe["last"] - probe["t0"]
        server = _busy(probe["server"])
        errors = page.locator(".dfs-banner-error").count()
        if errors:
            raise RuntimeError(f"{name} showed an error banner after {control}={label}: "
                               f"{page.locator('.dfs-banner-error').first.inner_text()}")
        browser_ms.append(total)
        server_ms.append(server)
        rows.append({"control": control, "value": label, "browser_ms": round(total, 1), "server_ms": round(server, 1),
                     "requests": len(probe["server"]), "draws": probe["draws"]})
        log.info("%s %s=%s: %.0f ms (server %.0f ms, %d draws)", name, control, label, total, server, probe["draws"])
    return {"browser": _summary(browser_ms), "server": _summary(server_ms), "changes": rows}


def _open_cold(browser, url: str, target: str, timeout_ms: float) -> tuple[float, float]:
    """(first figure, every figure) in ms from a fresh tab's navigation to ``target``."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        page.goto(f"{url}{target}", wait_until="commit")
        first = page.wait_for_function(_DRAWN, arg=["some"], timeout=timeout_ms).json_value()
        every = page.wait_for_function(_DRAWN, arg=["every"], timeout=timeout_ms).json_value()
        _no_error_banner(page, target)
    finally:
        page.close()
    return first, every


def _open_picked(browser, url: str, path: str, prefix: str, start: str, cid: str, settle_ms: float,
                 timeout_ms: float) -> tuple[float, float]:
    """(first figure, every figure) in ms from picking ``cid`` in the capture picker of page
    ``path`` showing capture ``start`` (drawn, the dashboard's scripts loaded) to the first figure
    drawn with data after the pick and to the last figure drawn once the page is settled."""
    import re

    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        page.goto(f"{url}{path}?file={start}")
        page.wait_for_function(_DRAWN, arg=["every"], timeout=timeout_ms)
        page.evaluate(_PROBE)
        page.locator(f"#{prefix}-file").click()
        # the picker's label is the id, with "(checking)" while a large file's whole check runs
        page.locator("[role=listbox] [role=option]").filter(
            has_text=re.compile(f"^{re.escape(cid)}( \\(.+\\))?$")).first.click()
        page.wait_for_function("() => window.__probe.firstData > 0", timeout=timeout_ms)
        page.wait_for_function(_SETTLED, arg=[settle_ms], timeout=timeout_ms)
        probe = page.evaluate("() => { const p = window.__probe; return [p.t0, p.firstData, p.lastDraw]; }")
        _no_error_banner(page, f"{path} after picking {cid}")
    finally:
        page.close()
    t0, first, last = probe
    return first - t0, last - t0


def _no_error_banner(page, where: str) -> None:
    if page.locator(".dfs-banner-error").count():
        raise RuntimeError(f"{where} showed an error banner: {page.locator('.dfs-banner-error').first.inner_text()}")


def measure_open(browser, capture: Path, start: Path, settle_ms: float, timeout_ms: float) -> dict:
    """Per page of ``OPEN_PAGES``, on a fresh server (nothing of ``capture`` open, validated or
    cached): ms to the first figure drawn with ``capture``'s data and to every shown figure
    drawn, when the capture is picked in the page's capture picker while the page shows
    capture ``start`` (the dashboard in use), and when a fresh tab of another fresh server
    navigates to the page with the capture selected ("cold": the dashboard's scripts fetched and
    the server's first request served inside the timed navigation)."""
    cid, start_id = (f"{p.parent.name}/{p.name}" for p in (capture, start))
    roots = sorted({capture.parent, start.parent})
    out = {}
    for name, path in OPEN_PAGES.items():
        proc, url = serve(roots)
        try:
            first, every = _open_picked(browser, url, path, OPEN_PREFIXES[name], start_id, cid, settle_ms, timeout_ms)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        proc, url = serve([capture.parent])
        try:
            cold_first, cold_every = _open_cold(browser, url, f"{path}?file={cid}", timeout_ms)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        out[name] = {"first_figure_ms": round(first, 1), "every_figure_ms": round(every, 1),
                     "cold_first_figure_ms": round(cold_first, 1), "cold_every_figure_ms": round(cold_every, 1)}
        log.info("open %s on %s: first figure %.0f ms, every figure %.0f ms (cold server and tab: %.0f / %.0f ms)",
                 name, capture.name, first, every, cold_first, cold_every)
    return out


def _capture_info(path: Path) -> dict:
    import dfsviz

    with dfsviz.open(path) as r:
        return {"file": path.name, "bytes": path.stat().st_size, "grid": r.grid.name, "num_tokens": r.grid.num_tokens,
                "block": r.block, "num_blocks": r.layout.num_blocks, "steps": len(r.steps), "layers": len(r.layers),
                "heads": len(r.heads), "orders": r.orders, "methods": r.methods}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--capture", type=Path, action="append", default=[],
                        help="a capture file to measure besides the shipped sample (repeatable)")
    parser.add_argument("--changes", type=int, default=30, help="changes per page and capture (>= 30)")
    parser.add_argument("--settle-ms", type=float, default=400.0, help="quiet time that ends a change (not counted)")
    parser.add_argument("--timeout-ms", type=float, default=120000.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--open-only", action="store_true", help="time opening files only (no interactive changes)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/browser_latency.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.changes < 30:
        parser.error(f"--changes must be >= 30 for a p95 (got {args.changes})")
    import dfsviz
    from playwright.sync_api import sync_playwright

    captures = [dfsviz.sample_capture(), *[p.resolve() for p in args.capture]]
    roots = sorted({p.parent for p in captures})
    proc, url = serve(roots)
    labels = {}
    for path in captures:  # the ids dfsviz app gives: "<root folder name>/<file>"
        labels[path] = f"{path.parent.name}/{path.name}"
    header = run_header(torch.device("cpu"))  # its load average: other jobs on the same cores slow every number down
    results = {}
    rng = random.Random(args.seed)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                         args=["--no-sandbox", "--disable-dev-shm-usage", "--no-first-run"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            for path in captures:
                info = _capture_info(path)
                per_page = {}
                for name in () if args.open_only else PAGES:
                    per_page[name] = measure_page(page, url, labels[path], name, args.changes, rng, args.settle_ms,
                                                  args.timeout_ms)
                    log.info("%s on %s: browser p95 %.0f ms, server p95 %.0f ms", name, path.name,
                             per_page[name]["browser"]["p95_ms"], per_page[name]["server"]["p95_ms"])
                results[labels[path]] = {"capture": info, "pages": per_page}
            # after the interactive pages: their server is left alone while the fresh ones start
            for path in captures:
                # the dashboard in use shows another capture: the medium sample before the tiny one
                start = dfsviz.sample_capture("medium") if path == captures[0] else captures[0]
                results[labels[path]]["open"] = measure_open(browser, path, start, args.settle_ms, args.timeout_ms)
            browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    timed = () if args.open_only else PAGES
    met_browser = all(r["pages"][p]["browser"]["p95_ms"] <= TARGET_BROWSER_P95_MS for r in results.values() for p in timed)
    met_server = all(r["pages"][p]["server"]["p95_ms"] <= TARGET_SERVER_P95_MS for r in results.values() for p in timed)
    met_open = all(o["first_figure_ms"] <= TARGET_OPEN_MS for r in results.values() for o in r["open"].values())
    out = {
        **header,
        "results": results,
        "targets": {"browser_p95_ms": TARGET_BROWSER_P95_MS, "server_p95_ms": TARGET_SERVER_P95_MS,
                    "browser_met": met_browser if timed else None, "server_met": met_server if timed else None, "open_first_figure_ms": TARGET_OPEN_MS,
                    "open_met": met_open},
        "method": "Playwright drives /usr/bin/chromium (headless, 1400x1000); per change: click on the new "
                  "dropdown value -> last plotly_afterplot, timed with performance.now() in the page; server: "
                  "time during which a Dash request of the change was in flight (fetch start -> body received); "
                  "open: per page a fresh `dfsviz app`; the page shows another capture (the medium sample for the "
                  "tiny one, the tiny sample for the others), the capture is picked in its picker: click -> "
                  "first plotly_afterplot of a figure with data (and the last once settled), performance.now() "
                  "in the page; cold: a fresh server over the capture's folder alone and a fresh tab, "
                  "navigation start -> first figure drawn with data (and every shown figure)",
        "changes_per_page": args.changes, "settle_ms": args.settle_ms, "seed": args.seed,
    }
    out["machine"]["load_end"] = load()
    out["versions"]["chromium"] = subprocess.run([CHROMIUM, "--version"], capture_output=True, text=True).stdout.strip()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(json.dumps({cid: {p: {k: v["p95_ms"] for k, v in r["pages"][p].items() if isinstance(v, dict)}
                            for p in timed} for cid, r in results.items()}, indent=1))
    print(json.dumps({cid: {p: o["first_figure_ms"] for p, o in r["open"].items()} for cid, r in results.items()},
                     indent=1))
    print(f"browser p95 <= {TARGET_BROWSER_P95_MS:g} ms met: {met_browser if timed else 'not timed'}; "
          f"server p95 <= {TARGET_SERVER_P95_MS:g} ms met: {met_server if timed else 'not timed'}; "
          f"open + first figure <= {TARGET_OPEN_MS:g} ms met: {met_open}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

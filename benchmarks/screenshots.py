"""Refresh the dashboard screenshots of docs/dashboard.md (docs/img/dashboard_*.png).

Starts ``dfsviz app`` over the shipped sample captures (``captures/tiny-wan-sample.h5``; the
``masks_medium`` shot for docs/embedded-model.md shows ``captures/medium-wan-sample.h5``) and a
second capture for the comparison (the embedded model's ``blue_triangle_bounce`` clip, made
here with ``dfsviz capture`` unless ``--second`` names one), opens every page in Debian's
Chromium through Playwright at a fixed viewport (1400 x 1000, full page) and writes one PNG
per page. Each shot waits for what it shows: every visible figure card drawn and no callback
still running (Live: its run done); never a fixed delay.

    .venv/bin/python benchmarks/screenshots.py                 # all of them, into docs/img/
    .venv/bin/python benchmarks/screenshots.py --pages masks compare --out /tmp/shots
"""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLE = "captures/tiny-wan-sample.h5"
MEDIUM = "captures/medium-wan-sample.h5"
SECOND = "runs/blue_triangle_bounce.h5"
VIEWPORT = {"width": 1400, "height": 1000}
CHROMIUM = "/usr/bin/chromium"
DRAWN_TIMEOUT_MS = 180_000
# the Masks view the docs describe: step 19, layer 3, head 1 of the sample
MASKS_VIEW = "step=19&layer=3&head=1&method=dfs_tile&budget=0.2"

#: screenshot name -> the page's address (its query string ends with file=<capture>)
SHOTS = {
    "overview": f"/?file={SAMPLE}",
    "masks": f"/masks?{MASKS_VIEW}&file={SAMPLE}",
    "recall": f"/recall?file={SAMPLE}",
    "theory": f"/theory?file={SAMPLE}",
    "drift": f"/drift?file={SAMPLE}",
    "calibrate": f"/calibrate?target_recall=0.9&file={SAMPLE}",
    "live": f"/live?step=13&layer=1&order=hilbert3d&method=dfs_tile&budget=0.2&file={SAMPLE}",
    "video": f"/video?file={SAMPLE}",
    "compare": f"/masks?compare={SECOND}&{MASKS_VIEW}&file={SAMPLE}",
    "masks_medium": f"/masks?step=19&layer=3&head=0&method=dfs_tile&budget=0.1&file={MEDIUM}",
}

logger = logging.getLogger("screenshots")

# every visible figure card has drawn its data and no Dash callback is on its way
_SETTLED = """() => {
    const cards = Array.from(document.querySelectorAll('.dfs-card')).filter(c => c.offsetParent !== null);
    const drawn = cards.length > 0 && cards.every(c => {
        const g = c.querySelector('.js-plotly-plot');
        return g && g.data && g.data.length > 0;
    });
    return drawn && document.querySelectorAll('[data-dash-is-loading="true"]').length === 0;
}"""


def make_second_capture(root: Path) -> Path:
    """The embedded model's blue_triangle_bounce clip, captured as the docs' comparison is."""
    out = root / Path(SECOND).name
    subprocess.run([str(Path(sys.executable).parent / "dfsviz"), "capture", "--prompt", "blue_triangle_bounce",
                    "--capture-steps", "0,6,13,19", "--save-qkv", "1", "--out", str(out)], check=True)
    return out


def start_app(roots: list[Path], port: int) -> subprocess.Popen:
    """``dfsviz app`` over ``roots``, returned once its server listens (werkzeug logs "Running on")."""
    args = [str(Path(sys.executable).parent / "dfsviz"), "app", "--port", str(port)]
    for root in roots:
        args += ["--root", str(root)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        logger.debug("app: %s", line.rstrip())
        if "Running on" in line:
            # keep reading its log: a full pipe would stop the server
            threading.Thread(target=lambda: [logger.debug("app: %s", x.rstrip()) for x in proc.stderr],
                             daemon=True).start()
            return proc
    raise RuntimeError(f"`dfsviz app` exited (code {proc.wait()}) before serving")


def shoot(url: str, names: list[str], out: Path) -> list[Path]:
    from PIL import Image
    from playwright.sync_api import expect, sync_playwright

    written = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu",
                                                                     "--disable-dev-shm-usage"])
        page = browser.new_page(viewport=VIEWPORT)
        for name in names:
            page.goto(url + SHOTS[name])
            if name == "live":
                page.locator("#lv-run").click()
                expect(page.locator("#lv-status")).to_contain_text("done", timeout=DRAWN_TIMEOUT_MS)
            page.wait_for_function(_SETTLED, timeout=DRAWN_TIMEOUT_MS)
            errors = page.locator(".dfs-banner-error")
            if errors.count():
                raise RuntimeError(f"{name}: the page shows an error: {errors.first.inner_text()}")
            target = out / f"dashboard_{name}.png"
            page.screenshot(path=str(target), full_page=True)
            # 256 colours keep a page of heatmaps near 300 kB in git (a plain screenshot: 650 kB)
            with Image.open(target) as shot:
                image = shot.convert("RGB")
            image.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
                target, optimize=True)
            logger.info("wrote %s", target)
            written.append(target)
        browser.close()
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pages", nargs="+", choices=list(SHOTS), default=list(SHOTS), help="which screenshots")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "img", help="folder of the PNGs (docs/img)")
    parser.add_argument("--second", type=Path,
                        help="a capture to compare with (default: make one with dfsviz capture, minutes on 2 cores)")
    parser.add_argument("--port", type=int, default=8071)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from dfsviz import sample_capture

    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(tmp) / "runs"
        runs.mkdir()
        if args.second is not None:
            shutil.copy(args.second, runs / Path(SECOND).name)
        elif "compare" in args.pages:
            make_second_capture(runs)
        app = start_app([sample_capture().parent, runs], args.port)
        try:
            shoot(f"http://127.0.0.1:{args.port}", args.pages, args.out)
        finally:
            app.terminate()
            app.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())

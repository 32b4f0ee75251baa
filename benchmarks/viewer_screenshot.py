"""Screenshot of a `cpnn view` page in headless Chromium (docs/figures/her2st_C6_view.png).

    cpnn view C6_pred.h5ad --out C6_view
    python benchmarks/viewer_screenshot.py C6_view/index.html docs/figures/her2st_C6_view.png \
        --layer "weight:Cancer Epithelial"

Zooms onto the central 55 % of the spots, hovers the most central spot (so the read-out
shows its values) and saves a 1200 x 760 screenshot. Needs playwright and Debian's
chromium (`apt-get install chromium`); it never downloads a browser.
"""
from __future__ import annotations

import argparse
import shutil

from playwright.sync_api import sync_playwright

FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]

ZOOM_AND_PICK = """(() => {
  const d = window.CPNN_VIEW_DATA, v = window.cpnnView.viewer, it = v.world.getItemAt(0);
  const f32 = s => new Float32Array(Uint8Array.from(atob(s), c => c.charCodeAt(0)).buffer);
  const x = f32(d.x), y = f32(d.y);
  let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
  for (let i = 0; i < x.length; i++) { x0 = Math.min(x0, x[i]); x1 = Math.max(x1, x[i]);
                                       y0 = Math.min(y0, y[i]); y1 = Math.max(y1, y[i]); }
  const cx = (x0 + x1) / 2, cy = (y0 + y1) / 2, w = (x1 - x0) * 0.55, h = (y1 - y0) * 0.55;
  v.viewport.fitBounds(it.imageToViewportRectangle(cx - w / 2, cy - h / 2, w, h), true);
  let best = 0, bd = Infinity;
  for (let i = 0; i < x.length; i++) { const e = (x[i] - cx) ** 2 + (y[i] - cy) ** 2; if (e < bd) { bd = e; best = i; } }
  return [x[best], y[best]];
})()"""

TO_SCREEN = """([x, y]) => { const v = window.cpnnView.viewer, it = v.world.getItemAt(0);
  const p = it.imageToViewerElementCoordinates(new OpenSeadragon.Point(x, y));
  const r = v.canvas.getBoundingClientRect(); return [p.x + r.left, p.y + r.top]; }"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("page", help="index.html written by cpnn view")
    ap.add_argument("out", help="PNG to write")
    ap.add_argument("--layer", default="dominant", help="layer id (dominant, weight:TYPE, gene:GENE)")
    ap.add_argument("--opacity", type=float, default=0.75)
    ap.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    args = ap.parse_args()
    from pathlib import Path

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.chromium, args=FLAGS)
        page = browser.new_page(viewport={"width": 1200, "height": 760})
        page.goto(Path(args.page).resolve().as_uri())
        page.wait_for_function("window.cpnnView && window.cpnnView.ready", timeout=120000)
        page.select_option("#layer", args.layer)
        page.evaluate(f"window.cpnnView.setOpacity({args.opacity})")
        spot = page.evaluate(ZOOM_AND_PICK)
        page.wait_for_timeout(3000)
        page.wait_for_function("window.cpnnView.viewer.world.getItemAt(0).getFullyLoaded()", timeout=120000)
        page.mouse.move(*page.evaluate(TO_SCREEN, spot))
        page.wait_for_timeout(500)
        page.screenshot(path=args.out)
        browser.close()


if __name__ == "__main__":
    main()

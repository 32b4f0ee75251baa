"""Headless Chromium for the viewer tests (Debian's ``chromium``, driven by playwright).

Never downloads a browser: the tests skip, saying why, when either is missing. CI
(``.ci/run``) installs both.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

# playwright adds --headless and an empty temporary profile (--user-data-dir) itself
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1200, "height": 800}


def chromium_path():
    """``$CPNN_CHROMIUM`` or the first of chromium / chromium-browser / google-chrome on PATH."""
    explicit = os.environ.get("CPNN_CHROMIUM")
    if explicit:
        return explicit if Path(explicit).is_file() else None
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def require_browser():
    """Skip (with the reason) unless playwright and a Chromium binary are both here."""
    pytest.importorskip("playwright.sync_api", reason="the viewer's browser tests need playwright "
                        "(pip install -e '.[test]')")
    path = chromium_path()
    if path is None:
        pytest.skip("the viewer's browser tests need Chromium: apt-get install chromium (or set CPNN_CHROMIUM)")
    return path


@contextlib.contextmanager
def open_viewer(index_html: Path, timeout_ms: int = 60000):
    """Load a ``cpnn view`` page from disk; yields ``(page, problems)`` once the H&E is
    fully loaded (``problems``: console errors and uncaught exceptions, as they come)."""
    from playwright.sync_api import sync_playwright

    executable = require_browser()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=FLAGS)
        try:
            page = browser.new_page(viewport=VIEWPORT, device_scale_factor=1)
            problems = []
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.goto(Path(index_html).resolve().as_uri())
            page.wait_for_function("window.cpnnView && window.cpnnView.ready", timeout=timeout_ms)
            page.wait_for_timeout(300)
            yield page, problems
        finally:
            browser.close()


def screenshot(page, path: Path) -> np.ndarray:
    """Save a PNG of the page and return it as an (H, W, 3) uint8 array."""
    from PIL import Image

    page.screenshot(path=str(path))
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def screen_xy(page, x: float, y: float):
    """Where image pixel (x, y) is on the page (CSS px)."""
    return page.evaluate(
        """([x, y]) => { const v = window.cpnnView.viewer, item = v.world.getItemAt(0);
            const p = item.imageToViewerElementCoordinates(new OpenSeadragon.Point(x, y));
            const r = v.canvas.getBoundingClientRect(); return [p.x + r.left, p.y + r.top]; }""", [x, y])


def viewer_box(page):
    """(left, top, right, bottom) of the image viewer on the page."""
    return page.evaluate("""() => { const r = window.cpnnView.viewer.canvas.getBoundingClientRect();
                                  return [r.left, r.top, r.right, r.bottom]; }""")


def save_artifact(src: Path, name: str) -> None:
    """Copy a screenshot to ``$CPNN_TEST_ARTIFACTS/name`` when that variable is set."""
    target = os.environ.get("CPNN_TEST_ARTIFACTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, Path(target) / name)

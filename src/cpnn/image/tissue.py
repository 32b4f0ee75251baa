"""Tissue detection on a low-resolution thumbnail.

H&E tissue is coloured (pink eosin, purple haematoxylin); glass, background and
scanner borders are white or grey, i.e. unsaturated. So the mask is a threshold on HSV
saturation (Otsu by default, kept inside a sane range), minus pixels that look like
pen ink (green/blue hues) or are near black, followed by filling of small holes and
removal of small specks. Sizes are in µm² so results do not depend on ``max_px``.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import numpy as np
from scipy import ndimage

from cpnn.errors import CPNNInputError
from cpnn.image.slide import Slide

__all__ = ["tissue_mask", "otsu_threshold", "rgb_to_hsv"]


def rgb_to_hsv(rgb: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hue in degrees [0, 360), saturation and value in [0, 1] of an (..., 3) uint8 image."""
    x = rgb.astype(np.float32) / 255.0
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    v = x.max(axis=-1)
    c = v - x.min(axis=-1)
    s = np.where(v > 0, c / np.maximum(v, 1e-12), 0.0).astype(np.float32)
    safe = np.maximum(c, 1e-12)
    h = np.where(
        v == r, ((g - b) / safe) % 6.0, np.where(v == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0)
    )
    h = np.where(c > 0, h * 60.0, 0.0).astype(np.float32)
    return h, s, v


def otsu_threshold(values: np.ndarray, bins: int = 256, value_range: Tuple[float, float] = (0.0, 1.0)) -> float:
    """Otsu's threshold of ``values``: the cut maximising between-class variance."""
    hist, edges = np.histogram(values, bins=bins, range=value_range)
    hist = hist.astype(np.float64)
    centers = (edges[:-1] + edges[1:]) / 2.0
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centers)
    mu0 = m0 / np.maximum(w0, 1e-12)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1e-12)
    between = w0 * w1 * (mu0 - mu1) ** 2
    between[(w0 == 0) | (w1 == 0)] = -1.0
    k = int(np.argmax(between))
    return float(edges[k + 1])


def tissue_mask(
    slide: Slide,
    max_px: int = 2048,
    threshold: Union[str, float] = "otsu",
    min_threshold: float = 0.05,
    max_threshold: float = 0.25,
    min_object_um2: float = 20_000.0,
    max_hole_um2: float = 50_000.0,
    remove_pen: bool = True,
    min_value: float = 0.12,
    thumbnail: Optional[np.ndarray] = None,
) -> Tuple[np.ndarray, float]:
    """Boolean tissue mask of a slide on a thumbnail.

    Parameters
    ----------
    slide
        The slide.
    max_px
        Longer side of the thumbnail the mask is computed on.
    threshold
        ``"otsu"`` (default) or a fixed saturation in [0, 1].
    min_threshold, max_threshold
        Range an Otsu threshold is clipped to: keeps faint noise on an almost empty slide
        out (lower bound) and pale tissue in when Otsu splits dark from pale stain
        (upper bound).
    min_object_um2
        Connected tissue pieces smaller than this are dropped (dust, debris).
    max_hole_um2
        Holes inside tissue smaller than this are filled (nuclei-free gaps, fat cells);
        larger ones (real lumens, tears) stay background.
    remove_pen
        Exclude saturated green/blue/cyan pixels (pen marks; H&E hues are pink/purple).
    min_value
        Pixels darker than this HSV value are excluded (black ink, scanner borders).
    thumbnail
        Precomputed ``slide.thumbnail(max_px)`` to reuse.

    Returns
    -------
    mask : numpy.ndarray
        (h, w) bool, True on tissue.
    downsample : float
        Level-0 pixels per mask pixel (mean of x and y).

    Raises
    ------
    CPNNInputError
        If no tissue is found, or a bad parameter.
    """
    thumb = slide.thumbnail(max_px) if thumbnail is None else np.asarray(thumbnail)
    h_px, w_px = thumb.shape[:2]
    w0, h0 = slide.dimensions
    downsample = (w0 / w_px + h0 / h_px) / 2.0
    hue, sat, val = rgb_to_hsv(thumb)

    candidate = val >= min_value
    if remove_pen:
        # pen ink: green..blue hues (70-200 deg) clearly saturated; H&E sits at 270-360/0-30
        candidate &= ~(((hue >= 70.0) & (hue <= 200.0)) & (sat > 0.15))
    if isinstance(threshold, str):
        if threshold != "otsu":
            raise CPNNInputError(
                f"threshold must be 'otsu' or a number in [0, 1], got {threshold!r}.",
                path=slide._label, field="threshold", fix="pass threshold='otsu' or e.g. 0.08.",
            )
        values = sat[candidate]
        thr = otsu_threshold(values) if values.size else min_threshold
        thr = float(np.clip(thr, min_threshold, max_threshold))
        how = f"Otsu saturation threshold {thr:.3f} (clipped to [{min_threshold}, {max_threshold}])"
    else:
        thr = float(threshold)
        if not (0.0 <= thr <= 1.0):
            raise CPNNInputError(
                f"threshold must be in [0, 1], got {thr!r}.",
                path=slide._label, field="threshold", fix="pass threshold='otsu' or e.g. 0.08.",
            )
        how = f"fixed saturation threshold {thr:.3f}"
    mask = candidate & (sat > thr)

    um2_per_px = (slide.mpp * downsample) ** 2
    mask = _fill_small_holes(mask, max_hole_um2 / um2_per_px)
    mask = _remove_small_objects(mask, min_object_um2 / um2_per_px)
    if not mask.any():
        raise CPNNInputError(
            f"no tissue found ({how}; pieces under {min_object_um2:g} µm² dropped).",
            path=slide._label, field="threshold",
            fix="check that this is an H&E image; to keep every tile anyway pass --min-tissue 0 "
            "(in Python, for faint staining: tissue_mask(slide, threshold=0.03), min_object_um2=0, "
            "or your own mask= for tile_grid).",
        )
    return mask, float(downsample)


def _fill_small_holes(mask: np.ndarray, max_hole_px: float) -> np.ndarray:
    holes = ndimage.binary_fill_holes(mask) & ~mask
    if not holes.any():
        return mask
    labels, n = ndimage.label(holes)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    small = sizes <= max_hole_px
    small[0] = False
    return mask | small[labels]


def _remove_small_objects(mask: np.ndarray, min_px: float) -> np.ndarray:
    if min_px <= 1 or not mask.any():
        return mask
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = sizes >= min_px
    keep[0] = False
    return keep[labels]

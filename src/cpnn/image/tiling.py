"""Whole-slide tiling: a grid of tissue tiles and a streaming tile reader."""
from __future__ import annotations

import math
from typing import Iterator, Sequence, Tuple, Union

import numpy as np

from cpnn.errors import CPNNInputError
from cpnn.image.slide import Slide

__all__ = ["tile_grid", "iter_tiles", "tile_size_level0", "tissue_fraction"]

MaskArg = Union[None, np.ndarray, Tuple[np.ndarray, float]]


# the largest glass slide (2 x 3 inch) is 76 x 51 mm: a bigger image means a wrong mpp
MAX_SLIDE_MM = 80.0


def check_physical_size(slide: Slide) -> None:
    """Refuse a slide whose size in millimetres (pixels x mpp) no glass slide has: its
    microns per pixel are wrong, and tiling it would queue millions of tiles."""
    w_mm, h_mm = (d * float(slide.mpp) / 1000.0 for d in slide.dimensions)
    if max(w_mm, h_mm) > MAX_SLIDE_MM:
        raise CPNNInputError(
            f"at {slide.mpp:g} µm per pixel this image would be {w_mm:.0f} x {h_mm:.0f} mm, larger than any "
            f"glass slide ({MAX_SLIDE_MM:g} mm): the microns per pixel are wrong.",
            path=slide._label, field="mpp",
            fix="give the scan's resolution with --mpp (about 0.25 at 40x, 0.5 at 20x), or fix the file's metadata",
        )


def tile_size_level0(slide: Slide, tile_px: int = 256, target_mpp: float = 0.5) -> float:
    """Side of a tile in level-0 pixels: ``tile_px * target_mpp / slide.mpp``."""
    if int(tile_px) != tile_px or tile_px < 1:
        raise CPNNInputError(
            f"tile_px must be a positive integer, got {tile_px!r}.",
            path=slide._label, field="tile_px", fix="pass e.g. --tile-px 256 (tile_px=256 in Python).",
        )
    if not (math.isfinite(target_mpp) and 0 < target_mpp <= 100):
        raise CPNNInputError(
            f"target_mpp must be a positive number of microns per pixel, got {target_mpp!r}.",
            path=slide._label, field="target_mpp", fix="pass e.g. --target-mpp 0.5, i.e. 20x (target_mpp=0.5 in Python).",
        )
    return float(tile_px) * float(target_mpp) / slide.mpp


def _as_mask(slide: Slide, mask: MaskArg) -> np.ndarray:
    m = mask[0] if isinstance(mask, tuple) else mask
    m = np.asarray(m)
    if m.ndim != 2 or m.size == 0:
        raise CPNNInputError(
            f"mask must be a 2-D boolean array, got shape {m.shape}.",
            path=slide._label, field="mask", fix="pass the mask returned by tissue_mask(slide).",
        )
    w0, h0 = slide.dimensions
    dx, dy = w0 / m.shape[1], h0 / m.shape[0]
    # rounding a thumbnail side changes the ratio by at most one mask pixel
    if abs(dx - dy) > 0.02 * max(dx, dy) + max(dx / m.shape[0], dy / m.shape[1]) * 2:
        raise CPNNInputError(
            f"mask shape {m.shape} (h, w) does not have the aspect ratio of the slide "
            f"({w0} x {h0} px, w x h).",
            path=slide._label, field="mask",
            fix="compute the mask on this slide (tissue_mask(slide)); do not transpose it.",
        )
    return m.astype(bool, copy=False)


def tissue_fraction(mask: np.ndarray, slide_dims: Tuple[int, int], coords: np.ndarray, size: float) -> np.ndarray:
    """Exact fraction of each square (top-left ``coords``, side ``size`` level-0 px) on tissue.

    The mask is treated as piecewise constant over its pixels; bilinear interpolation of
    its integral image then gives the exact covered area for fractional boxes. Parts of
    a box outside the slide count as background.
    """
    mh, mw = mask.shape
    w0, h0 = slide_dims
    sx, sy = w0 / mw, h0 / mh
    integral = np.zeros((mh + 1, mw + 1), dtype=np.float64)
    integral[1:, 1:] = np.cumsum(np.cumsum(mask, axis=0, dtype=np.float64), axis=1)

    def area_to(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        u = np.clip(u, 0.0, mw)
        v = np.clip(v, 0.0, mh)
        i0 = np.minimum(np.floor(u).astype(np.int64), mw - 1)
        j0 = np.minimum(np.floor(v).astype(np.int64), mh - 1)
        fu, fv = u - i0, v - j0
        return (
            integral[j0, i0] * (1 - fu) * (1 - fv)
            + integral[j0, i0 + 1] * fu * (1 - fv)
            + integral[j0 + 1, i0] * (1 - fu) * fv
            + integral[j0 + 1, i0 + 1] * fu * fv
        )

    x0 = coords[:, 0] / sx
    y0 = coords[:, 1] / sy
    x1 = (coords[:, 0] + size) / sx
    y1 = (coords[:, 1] + size) / sy
    covered = area_to(x1, y1) - area_to(x0, y1) - area_to(x1, y0) + area_to(x0, y0)
    return covered / ((x1 - x0) * (y1 - y0))


def tile_grid(
    slide: Slide,
    tile_px: int = 256,
    target_mpp: float = 0.5,
    min_tissue: float = 0.25,
    mask: MaskArg = None,
) -> np.ndarray:
    """Top-left level-0 coordinates of the tiles that cover tissue.

    The grid has a step of one tile (``tile_px * target_mpp / slide.mpp`` level-0 px),
    starts at (0, 0) and includes partial tiles at the right and bottom edges (read
    padded with white).

    Parameters
    ----------
    slide
        The slide.
    tile_px
        Tile side in pixels at ``target_mpp``.
    target_mpp
        Resolution the tiles will be read at (µm/px).
    min_tissue
        Minimum fraction of a tile's area on tissue. ``0`` keeps every grid tile and
        skips tissue detection.
    mask
        ``tissue_mask(slide)`` result (``(mask, downsample)`` or the bool array);
        computed with default settings when omitted.

    Returns
    -------
    numpy.ndarray
        (N, 2) int64 (x, y) top-left level-0 coordinates, row-major (by y, then x).

    Raises
    ------
    CPNNInputError
        Bad parameters, a mask that does not fit the slide, or no tile with enough tissue.
    """
    size = tile_size_level0(slide, tile_px, target_mpp)
    if not (0.0 <= float(min_tissue) <= 1.0):
        raise CPNNInputError(
            f"min_tissue must be a fraction in [0, 1], got {min_tissue!r}.",
            path=slide._label, field="min_tissue", fix="pass e.g. --min-tissue 0.25 (min_tissue=0.25 in Python).",
        )
    w0, h0 = slide.dimensions
    check_physical_size(slide)
    nx, ny = int(math.ceil(w0 / size - 1e-9)), int(math.ceil(h0 / size - 1e-9))
    xs = np.round(np.arange(nx) * size).astype(np.int64)
    ys = np.round(np.arange(ny) * size).astype(np.int64)
    gy, gx = np.meshgrid(ys, xs, indexing="ij")  # row-major: y outer, x inner
    coords = np.stack([gx.ravel(), gy.ravel()], axis=1)
    if min_tissue <= 0:
        return coords
    if mask is None:
        from cpnn.image.tissue import tissue_mask

        mask = tissue_mask(slide)
    m = _as_mask(slide, mask)
    frac = tissue_fraction(m, (w0, h0), coords.astype(np.float64), size)
    keep = frac >= float(min_tissue) - 1e-9
    if not keep.any():
        raise CPNNInputError(
            f"no tile has at least {min_tissue:.0%} of its area on tissue "
            f"(best tile: {frac.max():.0%}; {len(coords)} tiles of {size:.0f} level-0 px).",
            path=slide._label, field="min_tissue",
            fix="lower min_tissue, use smaller tiles, or check the tissue mask.",
        )
    return coords[keep]


def iter_tiles(
    slide: Slide,
    coords: Sequence,
    tile_px: int = 256,
    target_mpp: float = 0.5,
    batch_size: int = 64,
    progress: bool = False,
) -> Iterator[np.ndarray]:
    """Read tiles in batches, one tile at a time from the best pyramid level.

    Memory use is one batch plus one tile's read, whatever the slide size.

    Parameters
    ----------
    slide
        The slide.
    coords
        (N, 2) top-left level-0 (x, y), e.g. from ``tile_grid``.
    tile_px, target_mpp
        Tile side in pixels and the resolution to read at (as given to ``tile_grid``).
    batch_size
        Tiles per batch.
    progress
        Show a tqdm progress bar.

    Yields
    ------
    numpy.ndarray
        (B, tile_px, tile_px, 3) uint8, in the order of ``coords``.
    """
    size = tile_size_level0(slide, tile_px, target_mpp)
    arr = np.asarray(coords)
    if arr.ndim != 2 or arr.shape[1] != 2 or not np.isfinite(arr.astype(np.float64)).all():
        raise CPNNInputError(
            f"coords must be a finite (N, 2) array of top-left (x, y), got shape {arr.shape}.",
            path=slide._label, field="coords", fix="pass the output of tile_grid(slide).",
        )
    arr = arr.astype(np.float64)
    w0, h0 = slide.dimensions
    outside = np.flatnonzero(
        (arr[:, 0] + size <= 0) | (arr[:, 1] + size <= 0) | (arr[:, 0] >= w0) | (arr[:, 1] >= h0)
    )
    if outside.size:
        raise CPNNInputError(
            f"{outside.size} of {len(arr)} tiles lie entirely outside the {w0} x {h0} px image "
            f"(indices {outside[:5].tolist()}{'...' if outside.size > 5 else ''}).",
            path=slide._label, field="coords",
            fix="coords must be top-left level-0 pixels of this slide (x first).",
        )
    if int(batch_size) != batch_size or batch_size < 1:
        raise CPNNInputError(
            f"batch_size must be a positive integer, got {batch_size!r}.",
            path=slide._label, field="batch_size", fix="pass e.g. batch_size=64.",
        )
    return _iter(slide, arr, size, int(tile_px), int(batch_size), progress)


def _iter(slide: Slide, coords: np.ndarray, size: float, tile_px: int, batch_size: int,
          progress: bool) -> Iterator[np.ndarray]:
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(coords), unit="tile", desc=f"tiles {slide.name}")
    try:
        for start in range(0, len(coords), batch_size):
            chunk = coords[start : start + batch_size]
            batch = np.empty((len(chunk), tile_px, tile_px, 3), dtype=np.uint8)
            for j, (x, y) in enumerate(chunk):
                batch[j] = slide.read_region(x, y, size, size, out_size=(tile_px, tile_px))
            if bar is not None:
                bar.update(len(chunk))
            yield batch
    finally:
        if bar is not None:
            bar.close()

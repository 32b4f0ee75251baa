"""Square patches of a fixed physical size centred on spots."""
from __future__ import annotations

import math
from typing import Iterator, Sequence

import numpy as np

from cpnn.errors import CPNNInputError
from cpnn.image.slide import Slide

__all__ = ["read_patch", "spot_patches", "validate_centers"]

_SHOW = 5  # how many offending indices an error message lists


def _check_size(slide: Slide, patch_um: float, out_px: int) -> float:
    """Validate sizes; return the patch side in level-0 pixels."""
    if not (isinstance(patch_um, (int, float, np.floating, np.integer)) and math.isfinite(patch_um) and patch_um > 0):
        raise CPNNInputError(
            f"patch_um must be a positive number of microns, got {patch_um!r}.",
            path=slide._label, field="patch_um", fix="pass e.g. patch_um=112.0.",
        )
    if int(out_px) != out_px or out_px < 1:
        raise CPNNInputError(
            f"out_px must be a positive integer, got {out_px!r}.",
            path=slide._label, field="out_px", fix="pass e.g. out_px=224.",
        )
    return float(patch_um) / slide.mpp


def validate_centers(slide: Slide, centers_xy: Sequence, field: str = "centers_xy") -> np.ndarray:
    """Check spot centres against the slide and return them as float64 (N, 2).

    Parameters
    ----------
    slide
        The slide the centres refer to.
    centers_xy
        (N, 2) array-like of (x, y) in level-0 (full-resolution) pixels, x first.
    field
        Name used in error messages.

    Raises
    ------
    CPNNInputError
        Wrong shape, non-numeric, NaN/inf, or centres lying outside the image (which
        usually means the coordinates are scaled for a downsampled image or swapped).
    """
    try:
        arr = np.asarray(centers_xy, dtype=np.float64)
    except (TypeError, ValueError):
        raise CPNNInputError(
            "centres are not numeric.", path=slide._label, field=field,
            fix="pass an (N, 2) array of (x, y) level-0 pixel coordinates.",
        ) from None
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise CPNNInputError(
            f"centres must have shape (N, 2) = (x, y), got {arr.shape}.",
            path=slide._label, field=field,
            fix="pass an (N, 2) array of (x, y) level-0 pixel coordinates.",
        )
    bad = np.flatnonzero(~np.isfinite(arr).all(axis=1))
    if bad.size:
        raise CPNNInputError(
            f"{bad.size} of {len(arr)} centres are NaN or infinite (indices "
            f"{bad[:_SHOW].tolist()}{'...' if bad.size > _SHOW else ''}).",
            path=slide._label, field=field,
            fix="drop spots without image coordinates before extracting patches.",
        )
    w, h = slide.dimensions
    outside = np.flatnonzero(
        (arr[:, 0] < 0) | (arr[:, 0] >= w) | (arr[:, 1] < 0) | (arr[:, 1] >= h)
    )
    if outside.size:
        first = outside[:_SHOW]
        examples = ", ".join(f"#{i} ({arr[i, 0]:.1f}, {arr[i, 1]:.1f})" for i in first)
        raise CPNNInputError(
            f"{outside.size} of {len(arr)} centres lie outside the image of {w} x {h} px: "
            f"{examples}{' ...' if outside.size > _SHOW else ''}.",
            path=slide._label, field=field,
            fix="coordinates must be (x, y) in full-resolution (level-0) pixels: check that "
            "x and y are not swapped and that they were not scaled for a downsampled image "
            "(e.g. Space Ranger's tissue_hires_scalef).",
        )
    return arr


def read_patch(
    slide: Slide, center_xy: Sequence[float], patch_um: float = 112.0, out_px: int = 224
) -> np.ndarray:
    """One square patch of ``patch_um`` microns centred on ``center_xy``.

    Parameters
    ----------
    slide
        Source slide.
    center_xy
        (x, y) centre in level-0 pixels.
    patch_um
        Side of the patch in microns.
    out_px
        Side of the returned patch in pixels.

    Returns
    -------
    numpy.ndarray
        (out_px, out_px, 3) uint8; parts outside the image are white.
    """
    side = _check_size(slide, patch_um, out_px)
    c = validate_centers(slide, np.asarray(center_xy, dtype=np.float64).reshape(1, -1), "center_xy")[0]
    return slide.read_region(c[0] - side / 2.0, c[1] - side / 2.0, side, side, out_size=(out_px, out_px))


def spot_patches(
    slide: Slide,
    centers_xy: Sequence,
    patch_um: float = 112.0,
    out_px: int = 224,
    batch_size: int = 64,
    progress: bool = False,
) -> Iterator[np.ndarray]:
    """Patches centred on spots, in input order, in batches.

    Centres are validated when the function is called (before the first batch).

    Parameters
    ----------
    slide
        Source slide (``open_slide`` or ``ArraySlide``).
    centers_xy
        (N, 2) spot centres (x, y) in level-0 pixels.
    patch_um
        Patch side in microns (default 112 µm, i.e. 224 px at 0.5 µm/px).
    out_px
        Patch side in pixels after resampling.
    batch_size
        Patches per yielded batch (the last one may be smaller).
    progress
        Show a tqdm progress bar.

    Yields
    ------
    numpy.ndarray
        (B, out_px, out_px, 3) uint8 batches; edges outside the image are white.
    """
    side = _check_size(slide, patch_um, out_px)
    centers = validate_centers(slide, centers_xy)
    if int(batch_size) != batch_size or batch_size < 1:
        raise CPNNInputError(
            f"batch_size must be a positive integer, got {batch_size!r}.",
            path=slide._label, field="batch_size", fix="pass e.g. batch_size=64.",
        )
    return _iter_patches(slide, centers, side, int(out_px), int(batch_size), progress)


def _iter_patches(
    slide: Slide, centers: np.ndarray, side: float, out_px: int, batch_size: int, progress: bool
) -> Iterator[np.ndarray]:
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(centers), unit="patch", desc=f"patches {slide.name}")
    try:
        half = side / 2.0
        for start in range(0, len(centers), batch_size):
            chunk = centers[start : start + batch_size]
            batch = np.empty((len(chunk), out_px, out_px, 3), dtype=np.uint8)
            for j, (cx, cy) in enumerate(chunk):
                batch[j] = slide.read_region(cx - half, cy - half, side, side, out_size=(out_px, out_px))
            if bar is not None:
                bar.update(len(chunk))
            yield batch
    finally:
        if bar is not None:
            bar.close()

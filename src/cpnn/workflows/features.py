"""Patch features for the spots of a spatial AnnData (cached as CLAM-style files).

A spot is encoded either as one patch of ``patch_um`` microns centred on it, or — with
``subpatch_grid = g > 1`` — as a bag of ``g x g`` sub-patches tiling that same square,
each of ``patch_um / g`` microns resampled to the encoder's input size (so at ``g`` times
the magnification). Sub-patch features come back as ``(n_spots, g * g, D)``; CPNN mixes
one cell-type composition per sub-patch and averages their expression (its bag head),
while methods without bags use the mean over the sub-patches.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .._constants import SPATIAL, UNS_INPUT
from ..errors import CPNNInputError


def slide_for(adata, slide: Any = None, mpp: Optional[float] = None):
    """The slide of a spatial AnnData: ``slide`` if given, else ``uns['cpnn_input']['image_path']``."""
    if slide is not None:
        return slide
    info = dict(adata.uns.get(UNS_INPUT, {}))
    path = info.get("image_path")
    if not path:
        raise CPNNInputError(
            "this spatial data has no image path", field=f"uns['{UNS_INPUT}']['image_path']",
            fix="pass the full-resolution image (--image) or precomputed features (--features)",
        )
    from ..image import open_slide

    return open_slide(path, mpp=mpp if mpp is not None else info.get("mpp"))


def spot_features(
    adata,
    encoder,
    *,
    slide: Any = None,
    patch_um: float = 112.0,
    out_px: Optional[int] = None,
    cache_path: Optional[os.PathLike] = None,
    tta: str = "none",
    batch_size: int = 32,
    progress: bool = True,
    subpatch_grid: int = 1,
) -> np.ndarray:
    """Encode one patch of ``patch_um`` microns centred on every spot (or a grid of sub-patches).

    Parameters
    ----------
    adata
        Spatial AnnData with ``obsm['spatial']`` (x, y) full-resolution pixels.
    encoder
        A :class:`cpnn.encoders.Encoder`.
    slide
        The image (any ``cpnn.image`` slide); default: opened from
        ``uns['cpnn_input']['image_path']`` with its ``mpp``.
    patch_um, out_px, tta, batch_size
        Patch geometry and test-time augmentation (see ``cpnn.encoders``).
    cache_path
        Feature file to write or reuse (skipped when complete with the same settings).
        Sub-patch files hold one row per sub-patch, with ids ``"{spot}#{j}"``.
    subpatch_grid
        1: one patch per spot. ``g > 1``: the spot's ``patch_um`` square cut into ``g x g``
        sub-patches of ``patch_um / g`` microns, each resampled to ``out_px``.

    Returns
    -------
    numpy.ndarray
        ``(n_obs, D)`` float32 in ``obs`` order, or ``(n_obs, g * g, D)`` with sub-patches
        (row-major: left to right, then top to bottom).
    """
    from ..encoders import encode_batches, extract_spot_features
    from ..image import spot_patches

    if SPATIAL not in adata.obsm:
        raise CPNNInputError("no spot coordinates", field=f"obsm['{SPATIAL}']",
                             fix="read the data with a cpnn reader or set obsm['spatial'] to (x, y) pixels")
    centers = np.asarray(adata.obsm[SPATIAL], dtype=np.float64)
    ids = list(map(str, adata.obs_names))
    sl = slide_for(adata, slide)
    px = out_px or encoder.input_px
    grid = check_subpatch_grid(subpatch_grid)
    if grid > 1:
        centers, ids = subpatch_centres(centers, ids, patch_um, grid, sl)
        patch_um = float(patch_um) / grid
    if cache_path is not None:
        ff = extract_spot_features(sl, centers, ids, encoder, Path(cache_path),
                                   patch_um=patch_um, out_px=px, batch_size=batch_size, tta=tta, progress=progress)
        feats = np.asarray(ff.features, dtype=np.float32)
    else:
        batches = spot_patches(sl, centers, patch_um=patch_um, out_px=px, batch_size=batch_size)
        feats = encode_batches(batches, encoder, progress=progress, total=len(centers), tta=tta)
    return feats.reshape(adata.n_obs, grid * grid, -1) if grid > 1 else feats


def check_subpatch_grid(grid: Any) -> int:
    """``grid`` as a positive int, or a CPNNInputError."""
    try:
        g = int(grid)
    except (TypeError, ValueError):
        g = 0
    if g < 1 or g != grid:
        raise CPNNInputError(f"subpatch_grid must be a whole number >= 1, got {grid!r}", field="subpatch_grid",
                             fix="use 1 (one patch per spot) or e.g. 2 (2 x 2 sub-patches)")
    return g


def subpatch_offsets(side: float, grid: int) -> np.ndarray:
    """``(grid * grid, 2)`` (dx, dy) of the sub-patch centres from the centre of a square of
    ``side`` (any unit), row-major: left to right, then top to bottom."""
    rel = (np.arange(grid) + 0.5) * (float(side) / grid) - float(side) / 2.0
    return np.array([[dx, dy] for dy in rel for dx in rel], dtype=np.float64)


def subpatch_centres(centers_xy: np.ndarray, ids, patch_um: float, grid: int, slide):
    """Centres and ids of the ``grid x grid`` sub-patches tiling each spot's square.

    Parameters
    ----------
    centers_xy
        ``(N, 2)`` spot centres (x, y) in level-0 pixels.
    ids
        ``N`` spot ids; sub-patch ``j`` of spot ``s`` gets id ``f"{s}#{j}"``.
    patch_um
        Side of the spot's square in microns (the sub-patches are ``patch_um / grid``).
    grid
        Sub-patches per side.
    slide
        The slide (for its ``mpp`` and size: a sub-patch centre beyond the image edge is
        moved onto it; its patch is then padded like any edge patch).

    Returns
    -------
    (numpy.ndarray, list of str)
        ``(N * grid * grid, 2)`` centres, spot after spot, row-major within a spot; their ids.
    """
    offsets = subpatch_offsets(float(patch_um) / float(slide.mpp), grid)
    out = (np.asarray(centers_xy, dtype=np.float64)[:, None, :] + offsets[None]).reshape(-1, 2)
    w, h = slide.dimensions
    np.clip(out[:, 0], 0, w - 1, out=out[:, 0])
    np.clip(out[:, 1], 0, h - 1, out=out[:, 1])
    sub_ids = [f"{s}#{j}" for s in ids for j in range(grid * grid)]
    return out, sub_ids

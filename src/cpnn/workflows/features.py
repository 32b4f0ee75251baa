"""Patch features for the spots of a spatial AnnData (cached as CLAM-style files)."""
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
) -> np.ndarray:
    """Encode one patch of ``patch_um`` microns centred on every spot.

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

    Returns
    -------
    numpy.ndarray
        ``(n_obs, D)`` float32 in ``obs`` order.
    """
    from ..encoders import encode_batches, extract_spot_features
    from ..image import spot_patches

    if SPATIAL not in adata.obsm:
        raise CPNNInputError("no spot coordinates", field=f"obsm['{SPATIAL}']",
                             fix="read the data with a cpnn reader or set obsm['spatial'] to (x, y) pixels")
    centers = np.asarray(adata.obsm[SPATIAL], dtype=np.float64)
    sl = slide_for(adata, slide)
    px = out_px or encoder.input_px
    if cache_path is not None:
        ff = extract_spot_features(sl, centers, list(map(str, adata.obs_names)), encoder, Path(cache_path),
                                   patch_um=patch_um, out_px=px, batch_size=batch_size, tta=tta, progress=progress)
        return np.asarray(ff.features, dtype=np.float32)
    batches = spot_patches(sl, centers, patch_um=patch_um, out_px=px, batch_size=batch_size)
    return encode_batches(batches, encoder, progress=progress, total=len(centers), tta=tta)

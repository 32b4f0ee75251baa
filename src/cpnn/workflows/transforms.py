"""Per-slide feature standardisation: each slide re-centred on its own unlabelled statistics.

A new patient's stain, scanner and tissue shift the patch features of the whole slide.
Re-centring every slide on its own features (and, with ``robust``, rescaling them) removes
that slide-level shift before the model sees them. It uses no targets, only the slide's
own images, so it is as legitimate at prediction time as at training time: at fit each
training sample is standardised on its own spots, at predict each new slide on its own.
"""
from __future__ import annotations

import numpy as np

from ..errors import CPNNInputError

__all__ = ["SLIDE_STANDARDISE_MODES", "check_slide_standardise", "standardise_slide"]

SLIDE_STANDARDISE_MODES = ("none", "center", "robust")
# IQR of a standard normal: robust scale = IQR / this, comparable to a standard deviation.
_IQR_NORMAL = 1.3489795
_TINY = 1e-8


def check_slide_standardise(mode) -> str:
    """``mode`` if it is one of :data:`SLIDE_STANDARDISE_MODES`, else a CPNNInputError."""
    if mode not in SLIDE_STANDARDISE_MODES:
        raise CPNNInputError(f"unknown slide standardisation {mode!r}", field="slide_standardise",
                             fix=f"use one of {', '.join(SLIDE_STANDARDISE_MODES)}")
    return mode


def standardise_slide(features: np.ndarray, mode: str = "none", clip: float = 5.0) -> np.ndarray:
    """Standardise the features of **one** slide on that slide's own statistics.

    Parameters
    ----------
    features
        ``(N, D)`` features of the spots/tiles of one slide, or ``(N, k, D)`` sub-patch
        features (statistics over all ``N * k`` rows).
    mode
        ``"none"``: unchanged. ``"center"``: minus the slide's mean feature.
        ``"robust"``: minus the slide's median, divided by its IQR / 1.349 (the standard
        deviation where the IQR is 0, 1 where that is 0 too), clipped to ``[-clip, clip]``.
    clip
        Bound of robust scores (outlier patches: folds, pen marks).

    Returns
    -------
    numpy.ndarray
        float32, the shape of ``features``.
    """
    check_slide_standardise(mode)
    x = np.asarray(features, dtype=np.float32)
    if mode == "none":
        return x
    if x.ndim not in (2, 3) or x.shape[0] == 0:
        raise CPNNInputError(f"expected (N, D) or (N, k, D) features of one slide, got shape {x.shape}",
                             field="features", fix="pass the features of one slide with at least one spot")
    flat = x.reshape(-1, x.shape[-1]).astype(np.float64)
    if mode == "center":
        return (x - flat.mean(axis=0).astype(np.float32)).astype(np.float32)
    q25, med, q75 = np.quantile(flat, [0.25, 0.5, 0.75], axis=0)
    scale = (q75 - q25) / _IQR_NORMAL
    low = scale < _TINY
    if low.any():
        sd = flat[:, low].std(axis=0)
        scale[low] = np.where(sd < _TINY, 1.0, sd)
    z = (flat - med) / scale
    np.clip(z, -float(clip), float(clip), out=z)
    return z.astype(np.float32).reshape(x.shape)

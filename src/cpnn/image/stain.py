"""Macenko stain normalisation of H&E patches (torchstain, numpy backend).

A new patient's slide is stained and scanned differently from the training slides; the
CNN features shift with its colours. Macenko's method estimates each patch's
haematoxylin and eosin optical-density vectors and stain concentrations, and redraws
the patch with a **target**'s vectors and concentration scale.

The target is fitted on the training slides of each run (:func:`fit_stain_target`, on
a seeded sample of their spot patches) and stored in the model's feature record, so
prediction redraws new slides in the colours the model was trained on; there is no
shipped reference image, whose stain would match nobody's data in particular.

Patches where Macenko cannot work — background, too few tissue pixels, a degenerate
colour distribution — are passed through unchanged and counted
(:attr:`MacenkoNormaliser.n_passed`).
"""
from __future__ import annotations

import hashlib
import json
import warnings
from typing import Any, Dict, Iterable, Optional

import numpy as np

from cpnn.errors import CPNNInputError
from cpnn.image.slide import Slide

__all__ = [
    "STAIN_METHODS",
    "fit_stain_target",
    "MacenkoNormaliser",
    "StainNormalisedSlide",
    "stain_target_tag",
]

STAIN_METHODS = ("none", "macenko")

# torchstain's defaults: transmitted light, angle percentile, optical-density cut-off.
_IO, _ALPHA, _BETA = 240, 1, 0.15
# A patch needs this share of tissue pixels (every channel's OD >= beta) to be normalised.
_MIN_TISSUE_FRACTION = 0.05
_MIN_TISSUE_PIXELS = 200


def _tissue_fraction(rgb: np.ndarray) -> tuple:
    od = -np.log((rgb.reshape(-1, 3).astype(np.float64) + 1.0) / _IO)
    keep = ~np.any(od < _BETA, axis=1)
    return float(keep.mean()) if keep.size else 0.0, int(keep.sum())


def _usable(rgb: np.ndarray) -> bool:
    frac, n = _tissue_fraction(rgb)
    return frac >= _MIN_TISSUE_FRACTION and n >= _MIN_TISSUE_PIXELS


def fit_stain_target(patches: Iterable[np.ndarray], max_patches: int = 64,
                     seed: int = 0) -> Dict[str, Any]:
    """Macenko target (stain vectors and concentration scale) of a set of patches.

    Parameters
    ----------
    patches
        RGB uint8 patches of one size (each ``(H, W, 3)``, or batches ``(N, H, W, 3)``),
        e.g. spot patches sampled from the training slides.
    max_patches
        At most this many tissue patches (a seeded random subset) are pooled.
    seed
        Seed of that subset.

    Returns
    -------
    dict
        ``{"method": "macenko", "he": 3 x 2 list, "max_c": 2 list, "n_patches": int}``,
        JSON-ready (it goes into the model file).

    Raises
    ------
    CPNNInputError
        When no patch holds enough tissue to estimate stains from.
    """
    import torchstain

    tissue = []
    for p in patches:
        p = np.asarray(p)
        for q in (p if p.ndim == 4 else p[None]):
            if _usable(q):
                tissue.append(q)
    if not tissue:
        raise CPNNInputError("no patch holds enough stained tissue to fit a Macenko target",
                             field="stain_norm",
                             fix="check the images and spot coordinates, or use --stain-norm none")
    if len(tissue) > max_patches:
        pick = np.sort(np.random.default_rng(seed).choice(len(tissue), max_patches, replace=False))
        tissue = [tissue[i] for i in pick]
    mosaic = np.concatenate(tissue, axis=0)
    norm = torchstain.normalizers.MacenkoNormalizer(backend="numpy")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        norm.fit(mosaic, Io=_IO, alpha=_ALPHA, beta=_BETA)
    he, max_c = np.asarray(norm.HERef, float), np.asarray(norm.maxCRef, float)
    if not (np.isfinite(he).all() and np.isfinite(max_c).all() and (max_c > 0).all()):
        raise CPNNInputError("the Macenko target of the training patches is degenerate",
                             field="stain_norm", fix="use --stain-norm none for these images")
    return {"method": "macenko", "he": he.round(6).tolist(), "max_c": max_c.round(6).tolist(),
            "n_patches": len(tissue)}


def stain_target_tag(target: Optional[Dict[str, Any]]) -> str:
    """Short stable hash of a target (feature-cache names change with it)."""
    if not target:
        return "none"
    key = json.dumps({"he": target["he"], "max_c": target["max_c"]}, sort_keys=True)
    return hashlib.sha1(key.encode()).hexdigest()[:8]


class MacenkoNormaliser:
    """Redraws patches in a target's stain colours (see :func:`fit_stain_target`).

    Parameters
    ----------
    target
        The dict :func:`fit_stain_target` returns (or a model's recorded one).

    Attributes
    ----------
    n_normalised, n_passed
        Patches redrawn, and patches passed through unchanged (background, too little
        tissue, or Macenko failed on them).
    """

    def __init__(self, target: Dict[str, Any]) -> None:
        import torchstain

        try:
            he = np.asarray(target["he"], dtype=np.float64)
            max_c = np.asarray(target["max_c"], dtype=np.float64)
        except (KeyError, TypeError, ValueError):
            he = max_c = np.zeros(0)
        if he.shape != (3, 2) or max_c.shape != (2,) or not np.isfinite(he).all() \
                or not (max_c > 0).all():
            raise CPNNInputError("the stain target needs 'he' (3 x 2) and 'max_c' (2, > 0)",
                                 field="stain_target",
                                 fix="fit it with cpnn.image.stain.fit_stain_target")
        self.target = dict(target)
        self._norm = torchstain.normalizers.MacenkoNormalizer(backend="numpy")
        self._norm.HERef, self._norm.maxCRef = he, max_c
        self.n_normalised = 0
        self.n_passed = 0

    def __call__(self, patch: np.ndarray) -> np.ndarray:
        """One ``(H, W, 3)`` uint8 patch, normalised, or unchanged when Macenko cannot."""
        patch = np.asarray(patch)
        if patch.ndim != 3 or patch.shape[2] != 3 or patch.dtype != np.uint8:
            raise CPNNInputError(f"expected an (H, W, 3) uint8 patch, got {patch.shape} {patch.dtype}",
                                 field="patch", fix="pass RGB uint8 pixels")
        if not _usable(patch):
            self.n_passed += 1
            return patch
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                out, _, _ = self._norm.normalize(patch, Io=_IO, alpha=_ALPHA, beta=_BETA,
                                                 stains=False)
        except (np.linalg.LinAlgError, ValueError, IndexError, FloatingPointError):
            out = None
        if out is None or out.shape != patch.shape:
            self.n_passed += 1
            return patch
        self.n_normalised += 1
        return np.ascontiguousarray(out, dtype=np.uint8)

    def batch(self, patches: np.ndarray) -> np.ndarray:
        """``(N, H, W, 3)`` patches, each normalised or passed through."""
        return np.stack([self(p) for p in patches]) if len(patches) else patches


class StainNormalisedSlide(Slide):
    """A slide whose :meth:`read_region` returns stain-normalised pixels.

    Every region read (a spot patch, a sub-patch) is normalised on its own after
    resampling, exactly as the encoder sees it. Geometry is the wrapped slide's.

    Parameters
    ----------
    slide
        Any ``cpnn.image`` slide.
    normaliser
        A :class:`MacenkoNormaliser`; its counters tell how many patches were redrawn.
    """

    def __init__(self, slide: Slide, normaliser: MacenkoNormaliser) -> None:
        self._slide = slide
        self.normaliser = normaliser
        self.path = slide.path
        self.name = slide.name
        self.mpp = slide.mpp
        self.level_dimensions = slide.level_dimensions

    def _read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        return self._slide._read_level(level, x, y, w, h)

    def read_region(self, x, y, w, h, out_size=None) -> np.ndarray:
        return self.normaliser(self._slide.read_region(x, y, w, h, out_size=out_size))

    def thumbnail(self, max_px: int = 2048) -> np.ndarray:
        return self._slide.thumbnail(max_px)  # for display: the original colours

    def close(self) -> None:
        self._slide.close()

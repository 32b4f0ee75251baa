"""Nuclear-morphology features of H&E patches, from the haematoxylin channel.

What separates lymphocytes, plasma cells, tumour and stroma in H&E is largely their
nuclei: how many there are, how big, how round, how dark and how textured. This module
turns a patch into :data:`NUCLEUS_FEATURES` (16 numbers) that sit next to the CNN
features:

1. the haematoxylin optical density of every pixel (``skimage.color.rgb2hed``);
2. a threshold per **slide** (:func:`slide_threshold`: Otsu on the haematoxylin of the
   tissue pixels of sampled patches of that slide), so that the patches of one slide are
   segmented alike whatever their own content;
3. connected components above it (``skimage.measure.label``), components smaller than
   ``min_area_um2`` dropped, then ``regionprops_table`` for shape and intensity.

Touching nuclei are not split (no watershed): the features describe texture-level
statistics of a patch, not a cell count to be trusted one by one. A patch without
nuclei (background, blank) gives zeros, never NaN.
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import numpy as np

from cpnn.errors import CPNNInputError

__all__ = [
    "NUCLEUS_FEATURES",
    "haematoxylin",
    "slide_threshold",
    "nucleus_features",
    "patch_nucleus_features",
    "slide_nucleus_features",
]

NUCLEUS_FEATURES = (
    "nuclei_per_mm2",
    "nucleus_area_mean_um2",
    "nucleus_area_std_um2",
    "nucleus_area_q10_um2",
    "nucleus_area_q50_um2",
    "nucleus_area_q90_um2",
    "nucleus_major_axis_mean_um",
    "nucleus_eccentricity_mean",
    "nucleus_eccentricity_std",
    "nucleus_solidity_mean",
    "nucleus_haematoxylin_mean",
    "nucleus_haematoxylin_std",
    "nucleus_texture",
    "nuclear_area_fraction",
    "nn_distance_mean_um",
    "nn_distance_median_um",
)

# Pixels whose summed RGB optical density is below this are background (glass).
_TISSUE_OD = 0.15
# A threshold is never below this haematoxylin density: it keeps pale cytoplasm and the
# noise of nearly empty slides out of the nuclei.
_MIN_THRESHOLD = 0.02


def haematoxylin(rgb: np.ndarray) -> np.ndarray:
    """Haematoxylin optical density of an RGB image (Ruifrok-Johnston deconvolution).

    Parameters
    ----------
    rgb
        ``(H, W, 3)`` uint8 (or ``(N, H, W, 3)``) RGB.

    Returns
    -------
    numpy.ndarray
        ``(H, W)`` (or ``(N, H, W)``) float32, >= 0; 0 on white.
    """
    from skimage.color import rgb2hed

    rgb = _check_rgb(rgb, allow_batch=True)
    h = rgb2hed(rgb)[..., 0]
    return np.clip(h, 0.0, None).astype(np.float32)


def _tissue(rgb: np.ndarray) -> np.ndarray:
    od = -np.log((rgb.astype(np.float32) + 1.0) / 256.0).sum(axis=-1)
    return od > _TISSUE_OD


def slide_threshold(patches: Iterable[np.ndarray], max_pixels: int = 2_000_000,
                    seed: int = 0) -> float:
    """Otsu threshold on the haematoxylin of the tissue pixels of one slide's patches.

    Parameters
    ----------
    patches
        RGB uint8 patches (each ``(H, W, 3)``, or batches ``(N, H, W, 3)``) of one slide,
        e.g. a sample of its spot patches.
    max_pixels
        Pixels pooled at most (a seeded random subset beyond that).
    seed
        Seed of that subset.

    Returns
    -------
    float
        The threshold (>= 0.02); ``inf`` when the patches hold no tissue, so that nothing
        is segmented.
    """
    from skimage.filters import threshold_otsu

    values = []
    for p in patches:
        p = _check_rgb(p, allow_batch=True)
        h = haematoxylin(p)
        values.append(h[_tissue(p)])
    pooled = np.concatenate(values) if values else np.zeros(0, np.float32)
    if pooled.size > max_pixels:
        pooled = np.random.default_rng(seed).choice(pooled, max_pixels, replace=False)
    if pooled.size < 64 or float(pooled.max() - pooled.min()) < 1e-4:
        return float("inf")
    return float(max(threshold_otsu(pooled), _MIN_THRESHOLD))


def nucleus_features(patch: np.ndarray, mpp: float, threshold: float,
                     min_area_um2: float = 8.0) -> np.ndarray:
    """The :data:`NUCLEUS_FEATURES` of one patch.

    Parameters
    ----------
    patch
        ``(H, W, 3)`` uint8 RGB.
    mpp
        Microns per pixel of the patch.
    threshold
        Haematoxylin density above which a pixel is nuclear (:func:`slide_threshold`).
    min_area_um2
        Components smaller than this are noise, not nuclei (a lymphocyte is ~20 µm²).

    Returns
    -------
    numpy.ndarray
        ``(16,)`` float32 in :data:`NUCLEUS_FEATURES` order; zeros without nuclei.
    """
    patch = _check_rgb(patch)
    mpp = _check_mpp(mpp)
    return _features(patch, haematoxylin(patch), mpp, float(threshold), float(min_area_um2))


def patch_nucleus_features(patches: np.ndarray, mpp: float, threshold: float,
                           min_area_um2: float = 8.0) -> np.ndarray:
    """:func:`nucleus_features` of a batch ``(N, H, W, 3)``; returns ``(N, 16)`` float32."""
    patches = _check_rgb(patches, allow_batch=True)
    if patches.ndim == 3:
        patches = patches[None]
    mpp = _check_mpp(mpp)
    haem = haematoxylin(patches)  # one deconvolution for the whole batch
    out = np.zeros((len(patches), len(NUCLEUS_FEATURES)), dtype=np.float32)
    for i in range(len(patches)):
        out[i] = _features(patches[i], haem[i], mpp, float(threshold), float(min_area_um2))
    return out


def slide_nucleus_features(slide, centers_xy: Sequence, patch_um: float, *,
                           analysis_mpp: float = 0.5, threshold: Optional[float] = None,
                           n_threshold_patches: int = 64, batch_size: int = 64,
                           min_area_um2: float = 8.0, seed: int = 0):
    """Nucleus features of the patches of ``patch_um`` microns centred on ``centers_xy``.

    Patches are read at ``analysis_mpp`` (resampled from the slide), so features are
    measured at one scale whatever the scanner. The slide's threshold is computed once
    from up to ``n_threshold_patches`` of these patches (a seeded sample).

    Parameters
    ----------
    slide
        A ``cpnn.image`` slide.
    centers_xy
        ``(N, 2)`` patch centres (x, y), level-0 pixels.
    patch_um
        Patch side in microns.
    analysis_mpp
        Microns per pixel at which nuclei are segmented.
    threshold
        Use this haematoxylin threshold instead of computing the slide's own.
    n_threshold_patches, seed
        How many patches (seeded sample) set the slide's threshold.
    batch_size, min_area_um2
        Patches read at once; smallest nucleus.

    Returns
    -------
    (numpy.ndarray, float)
        ``(N, 16)`` float32 features and the threshold used.
    """
    from cpnn.image.patches import spot_patches, validate_centers

    centers = validate_centers(slide, centers_xy)
    mpp = _check_mpp(analysis_mpp)
    out_px = max(8, int(round(float(patch_um) / mpp)))
    mpp = float(patch_um) / out_px  # the exact scale after rounding to whole pixels
    if threshold is None:
        rng = np.random.default_rng(seed)
        pick = np.sort(rng.choice(len(centers), min(len(centers), n_threshold_patches),
                                  replace=False))
        threshold = slide_threshold(spot_patches(slide, centers[pick], patch_um=patch_um,
                                                 out_px=out_px, batch_size=batch_size),
                                    seed=seed)
    feats = [patch_nucleus_features(batch, mpp, threshold, min_area_um2)
             for batch in spot_patches(slide, centers, patch_um=patch_um, out_px=out_px,
                                       batch_size=batch_size)]
    out = np.concatenate(feats) if feats else np.zeros((0, len(NUCLEUS_FEATURES)), np.float32)
    return out, float(threshold)


# --------------------------------------------------------------------------- internals
def _features(rgb: np.ndarray, haem: np.ndarray, mpp: float, threshold: float,
              min_area_um2: float) -> np.ndarray:
    from scipy import ndimage
    from skimage.measure import label, regionprops_table

    out = np.zeros(len(NUCLEUS_FEATURES), dtype=np.float32)
    if not np.isfinite(threshold):
        return out
    labels = label(haem > threshold, connectivity=1)
    if labels.max() == 0:
        return out
    min_px = max(1, int(np.ceil(min_area_um2 / mpp ** 2)))
    sizes = np.bincount(labels.ravel())
    small = sizes < min_px
    small[0] = True  # background
    labels[small[labels]] = 0
    if labels.max() == 0 or not (labels > 0).any():
        return out
    labels = label(labels > 0, connectivity=1)
    # local standard deviation of the haematoxylin (3 x 3): chromatin texture
    mean = ndimage.uniform_filter(haem, 3)
    sq = ndimage.uniform_filter(haem * haem, 3)
    local_sd = np.sqrt(np.clip(sq - mean * mean, 0.0, None))
    props = regionprops_table(labels, intensity_image=np.stack([haem, local_sd], axis=-1),
                              properties=("area", "eccentricity", "solidity",
                                          "axis_major_length", "centroid", "intensity_mean"))
    area = np.asarray(props["area"], dtype=np.float64) * mpp ** 2
    n = len(area)
    patch_mm2 = rgb.shape[0] * rgb.shape[1] * (mpp / 1000.0) ** 2
    ecc = np.asarray(props["eccentricity"], dtype=np.float64)
    h_mean = np.asarray(props["intensity_mean-0"], dtype=np.float64)
    tex = np.asarray(props["intensity_mean-1"], dtype=np.float64)
    centroid = np.stack([props["centroid-0"], props["centroid-1"]], axis=1) * mpp
    nn = _nearest_neighbour(centroid)
    q10, q50, q90 = np.quantile(area, [0.1, 0.5, 0.9])
    out[:] = [
        n / patch_mm2,
        area.mean(), area.std(), q10, q50, q90,
        np.mean(props["axis_major_length"]) * mpp,
        ecc.mean(), ecc.std(),
        np.mean(props["solidity"]),
        np.average(h_mean, weights=area), h_mean.std(),
        np.average(tex, weights=area),
        area.sum() / (patch_mm2 * 1e6),
        nn.mean() if nn.size else 0.0, np.median(nn) if nn.size else 0.0,
    ]
    return out


def _nearest_neighbour(points: np.ndarray) -> np.ndarray:
    if len(points) < 2:
        return np.zeros(0)
    from scipy.spatial import cKDTree

    dist, _ = cKDTree(points).query(points, k=2)
    return dist[:, 1]


def _check_rgb(rgb, allow_batch: bool = False) -> np.ndarray:
    arr = np.asarray(rgb)
    ok = arr.dtype == np.uint8 and arr.shape[-1:] == (3,) and (
        arr.ndim == 3 or (allow_batch and arr.ndim == 4))
    if not ok:
        raise CPNNInputError(f"expected RGB uint8 patches (H, W, 3), got shape {arr.shape} "
                             f"dtype {arr.dtype}", field="patch",
                             fix="pass uint8 RGB pixels, e.g. np.asarray(PIL image.convert('RGB'))")
    return arr


def _check_mpp(mpp) -> float:
    try:
        v = float(mpp)
    except (TypeError, ValueError):
        v = float("nan")
    if not np.isfinite(v) or v <= 0:
        raise CPNNInputError(f"microns per pixel must be a positive number, got {mpp!r}",
                             field="mpp", fix="pass the patch's microns per pixel, e.g. 0.5")
    return v

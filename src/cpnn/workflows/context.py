"""Spatial context: each spot's feature next to the mean feature of its neighbourhood.

Expression varies smoothly over tissue while the features of one patch are noisy; the
mean over a spot and its first ring of neighbours (on the test image itself, never its
counts) is a cheap, honest denoiser, in the spirit of TRIPLEX's neighbour context. The
ring is counted in the data's own pitch, not in microns: ``rings=1`` averages ~300 µm of
tissue on legacy ST (200 µm pitch), ~150 µm on Visium (100 µm) and only ~84 µm on a grid
of 56 µm whole-slide tiles (a sub-patch model's tiles). A model trained with context on
spots therefore sees a smaller neighbourhood on whole-slide tiles; the setting is used
identically, the physical scale is not the same.
"""
from __future__ import annotations

import numpy as np

from ..errors import CPNNInputError


def spot_pitch(xy: np.ndarray) -> float:
    """Median distance from each spot to its nearest neighbour (in the units of ``xy``)."""
    from scipy.spatial import cKDTree

    xy = np.asarray(xy, dtype=np.float64)
    if len(xy) < 2:
        raise CPNNInputError("spatial context needs at least two spots", field="obsm['spatial']")
    dist, _ = cKDTree(xy).query(xy, k=2)
    pitch = float(np.median(dist[:, 1]))
    if not pitch > 0:
        raise CPNNInputError("spots share coordinates: the nearest-neighbour distance is 0",
                             field="obsm['spatial']", fix="check for duplicated spots")
    return pitch


def context_features(features: np.ndarray, xy: np.ndarray, rings: float = 1.0) -> np.ndarray:
    """``[f_i, mean_{j: |x_j - x_i| <= r} f_j]`` with ``r = (rings + 0.5) * pitch``.

    Parameters
    ----------
    features
        ``(N, D)`` features of the spots (or tiles) of **one** section/slide, or
        ``(N, k, D)`` sub-patch features: the neighbourhood mean is then taken over the
        spots' mean sub-patch features and appended to every sub-patch.
    xy
        ``(N, 2)`` their centres, any unit.
    rings
        Neighbourhood radius in spot pitches (1: the first ring, diagonals of a square
        grid included). 0 returns ``features`` unchanged.

    Returns
    -------
    numpy.ndarray
        ``(N, 2 D)`` float32 (``(N, k, 2 D)`` for sub-patches; unchanged when ``rings == 0``).
    """
    features = np.asarray(features, dtype=np.float32)
    if rings <= 0:
        return features
    if features.ndim == 3:
        ring = context_features(features.mean(axis=1), xy, rings)[:, features.shape[2]:]
        return np.concatenate([features, np.broadcast_to(ring[:, None, :], features.shape)], axis=2)
    from scipy import sparse
    from scipy.spatial import cKDTree

    xy = np.asarray(xy, dtype=np.float64)
    if len(xy) != len(features):
        raise CPNNInputError(f"{len(xy)} coordinates for {len(features)} feature rows", field="obsm['spatial']")
    radius = (rings + 0.5) * spot_pitch(xy)
    pairs = cKDTree(xy).query_pairs(radius, output_type="ndarray")
    n = len(xy)
    rows = np.concatenate([pairs[:, 0], pairs[:, 1], np.arange(n)])
    cols = np.concatenate([pairs[:, 1], pairs[:, 0], np.arange(n)])
    adj = sparse.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(n, n))
    deg = np.asarray(adj.sum(axis=1)).ravel()
    mean = (adj @ features) / deg[:, None]
    return np.concatenate([features, mean.astype(np.float32)], axis=1)

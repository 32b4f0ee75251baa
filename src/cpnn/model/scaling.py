"""Robust feature scaling, optionally followed by PCA, fitted on training features only."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import numpy as np


@dataclass
class FeatureScaler:
    """``clip((x - center) / scale, -clip, clip)``, then optionally a PCA projection.

    ``robust`` uses the median and the inter-quartile range (÷1.349 so that it matches a
    standard deviation on Gaussian data); ``standard`` the mean and standard deviation.
    Near-constant dimensions get their scale floored at a fraction of the median scale,
    so that a feature that never varied in training cannot explode on a new slide.

    With ``n_components``, the scaled features are centred and projected on their first
    principal components (as the HEST-Benchmark probe does before its ridge): a head on
    a few hundred spots then sees a few hundred well-conditioned inputs instead of
    thousands of correlated ones.
    """

    center: np.ndarray
    scale: np.ndarray
    clip: float = 8.0
    pca_mean: Optional[np.ndarray] = None  # (D,) mean of the scaled training features
    pca_components: Optional[np.ndarray] = None  # (D, k) orthonormal principal axes

    @property
    def in_dim(self) -> int:
        """Dimension of the raw features this scaler expects."""
        return int(len(self.center))

    @property
    def out_dim(self) -> int:
        """Dimension of the transformed features."""
        return self.in_dim if self.pca_components is None else int(self.pca_components.shape[1])

    @classmethod
    def fit(cls, features: np.ndarray, method: str = "robust", clip: float = 8.0,
            n_components: Optional[int] = None, max_pca_rows: int = 20000, seed: int = 0) -> "FeatureScaler":
        """Fit on training features.

        Parameters
        ----------
        features
            ``(N, D)`` training features.
        method
            ``"robust"``, ``"standard"`` or ``"none"``.
        clip
            Bound on the absolute scaled value.
        n_components
            Keep this many principal components of the scaled features (capped by the
            number of rows and by ``D``); None or 0 keeps the scaled features.
        max_pca_rows
            Principal axes are estimated on at most this many rows (a seeded sample), so
            that slide-level training on 100k tiles stays cheap.
        seed
            Seeds that sample.
        """
        scaler = cls._fit_scaling(features, method, clip)
        if n_components:
            z = scaler.transform(features).astype(np.float64)
            if len(z) > max_pca_rows:
                z = z[np.random.default_rng(seed).choice(len(z), max_pca_rows, replace=False)]
            k = int(min(n_components, z.shape[0], z.shape[1]))
            mean = z.mean(axis=0)
            _, _, vt = np.linalg.svd(z - mean, full_matrices=False)
            scaler.pca_mean = mean.astype(np.float32)
            scaler.pca_components = np.ascontiguousarray(vt[:k].T, dtype=np.float32)
        return scaler

    @classmethod
    def _fit_scaling(cls, features: np.ndarray, method: str, clip: float) -> "FeatureScaler":
        d = features.shape[1]
        if method == "none":
            return cls(np.zeros(d), np.ones(d), clip=float("inf"))
        if method not in ("robust", "standard"):
            raise ValueError(f"unknown feature scaling {method!r}")
        center, scale = np.empty(d), np.empty(d)
        # a few columns at a time in float64: slide-level training data (bags x 4,096 tiles)
        # would otherwise be copied whole, twice, just for column statistics
        step = max(1, (1 << 22) // max(1, features.shape[0]))
        for c in range(0, d, step):
            x = np.asarray(features[:, c:c + step], dtype=np.float64)
            if method == "robust":
                q25, center[c:c + step], q75 = np.percentile(x, [25, 50, 75], axis=0)
                iqr = (q75 - q25) / 1.349
                scale[c:c + step] = np.where(iqr > 0, iqr, x.std(axis=0))
            else:
                center[c:c + step], scale[c:c + step] = x.mean(axis=0), x.std(axis=0)
        positive = scale[scale > 0]
        floor = 0.1 * float(np.median(positive)) if positive.size else 1.0
        scale = np.maximum(scale, floor)
        return cls(center.astype(np.float32), scale.astype(np.float32), clip=clip)

    def transform(self, features: np.ndarray) -> np.ndarray:
        z = (np.asarray(features, dtype=np.float32) - self.center) / self.scale
        if np.isfinite(self.clip):
            np.clip(z, -self.clip, self.clip, out=z)
        if self.pca_components is not None:
            z = (z - self.pca_mean) @ self.pca_components
        return z.astype(np.float32, copy=False)

    def to_dict(self) -> Dict[str, object]:
        d: Dict[str, object] = {"center": self.center.tolist(), "scale": self.scale.tolist(),
                                "clip": float(self.clip)}
        if self.pca_components is not None:
            d["pca_mean"] = self.pca_mean.tolist()
            d["pca_components"] = self.pca_components.tolist()
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, object]) -> "FeatureScaler":
        pca_mean = d.get("pca_mean")
        pca_components = d.get("pca_components")
        return cls(np.asarray(d["center"], np.float32), np.asarray(d["scale"], np.float32), float(d["clip"]),
                   None if pca_mean is None else np.asarray(pca_mean, np.float32),
                   None if pca_components is None else np.asarray(pca_components, np.float32))

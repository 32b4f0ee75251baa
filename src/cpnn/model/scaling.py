"""Robust feature scaling fitted on training features only."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

import numpy as np


@dataclass
class FeatureScaler:
    """``clip((x - center) / scale, -clip, clip)``.

    ``robust`` uses the median and the inter-quartile range (÷1.349 so that it matches a
    standard deviation on Gaussian data); ``standard`` the mean and standard deviation.
    Near-constant dimensions get their scale floored at a fraction of the median scale,
    so that a feature that never varied in training cannot explode on a new slide.
    """

    center: np.ndarray
    scale: np.ndarray
    clip: float = 8.0

    @classmethod
    def fit(cls, features: np.ndarray, method: str = "robust", clip: float = 8.0) -> "FeatureScaler":
        x = np.asarray(features, dtype=np.float64)
        d = x.shape[1]
        if method == "none":
            return cls(np.zeros(d), np.ones(d), clip=float("inf"))
        if method == "robust":
            q25, center, q75 = np.percentile(x, [25, 50, 75], axis=0)
            scale = (q75 - q25) / 1.349
            alt = x.std(axis=0)
            scale = np.where(scale > 0, scale, alt)
        elif method == "standard":
            center, scale = x.mean(axis=0), x.std(axis=0)
        else:
            raise ValueError(f"unknown feature scaling {method!r}")
        positive = scale[scale > 0]
        floor = 0.1 * float(np.median(positive)) if positive.size else 1.0
        scale = np.maximum(scale, floor)
        return cls(center.astype(np.float32), scale.astype(np.float32), clip=clip)

    def transform(self, features: np.ndarray) -> np.ndarray:
        z = (np.asarray(features, dtype=np.float32) - self.center) / self.scale
        if np.isfinite(self.clip):
            np.clip(z, -self.clip, self.clip, out=z)
        return z.astype(np.float32, copy=False)

    def to_dict(self) -> Dict[str, object]:
        return {"center": self.center.tolist(), "scale": self.scale.tolist(), "clip": float(self.clip)}

    @classmethod
    def from_dict(cls, d: Dict[str, object]) -> "FeatureScaler":
        return cls(np.asarray(d["center"], np.float32), np.asarray(d["scale"], np.float32), float(d["clip"]))

"""Bags of patch features with one expression target per bag.

A spot is a bag of one patch (or of its neighbourhood); a slide is a bag of all its
tiles. Bags are stored contiguously (CSR-like ``offsets``), so that any set of bags of
different sizes goes through the network in one vectorised pass.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np


@dataclass
class BagData:
    """Patch features grouped into bags.

    Attributes
    ----------
    features
        ``(N, D)`` float32 features of all patches, bag after bag.
    offsets
        ``(B + 1,)`` int64: bag ``b`` owns ``features[offsets[b]:offsets[b + 1]]``.
    counts
        ``(B, G)`` float32 raw counts per bag, or None (prediction only).
    targets
        ``(B, K)`` composition targets (rows sum to 1), or None.
    """

    features: np.ndarray
    offsets: np.ndarray
    counts: Optional[np.ndarray] = None
    targets: Optional[np.ndarray] = None

    def __post_init__(self) -> None:
        self.features = np.ascontiguousarray(self.features, dtype=np.float32)
        self.offsets = np.asarray(self.offsets, dtype=np.int64)
        if self.features.ndim != 2:
            raise ValueError(f"features must be 2-D (patches x dims), got shape {self.features.shape}")
        if self.offsets[0] != 0 or self.offsets[-1] != len(self.features) or np.any(np.diff(self.offsets) < 0):
            raise ValueError("offsets must start at 0, be non-decreasing and end at the number of patches")
        if self.counts is not None:
            self.counts = np.asarray(self.counts, dtype=np.float32)
            if self.counts.shape[0] != self.n_bags:
                raise ValueError(f"{self.counts.shape[0]} count rows for {self.n_bags} bags")
        if self.targets is not None:
            self.targets = np.asarray(self.targets, dtype=np.float32)
            if self.targets.shape[0] != self.n_bags:
                raise ValueError(f"{self.targets.shape[0]} target rows for {self.n_bags} bags")

    @property
    def n_bags(self) -> int:
        return len(self.offsets) - 1

    @property
    def sizes(self) -> np.ndarray:
        return np.diff(self.offsets)

    def bag_means(self) -> np.ndarray:
        """``(B, D)`` mean feature row of every bag (float64)."""
        sums = np.add.reduceat(self.features.astype(np.float64), self.offsets[:-1], axis=0)
        return sums / np.maximum(self.sizes, 1)[:, None]

    @classmethod
    def from_spots(cls, features, counts=None, targets=None) -> "BagData":
        """One bag per row of ``features``."""
        n = len(features)
        return cls(features, np.arange(n + 1), counts, targets)

    @classmethod
    def from_bags(cls, bag_features: Sequence[np.ndarray], counts=None, targets=None) -> "BagData":
        """Concatenate a list of ``(n_b, D)`` arrays into one bag set."""
        sizes = [len(f) for f in bag_features]
        if any(s == 0 for s in sizes):
            empty = [i for i, s in enumerate(sizes) if s == 0]
            from ..errors import CPNNInputError

            raise CPNNInputError(f"bag(s) {empty[:5]} have zero patches", field="bags",
                                 fix="drop them or check their tissue mask")
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        return cls(np.concatenate(bag_features, axis=0), offsets, counts, targets)

    def subset(self, bags: Sequence[int]) -> "BagData":
        """The bags with the given indices, in that order."""
        bags = np.asarray(bags, dtype=np.int64)
        if len(bags) == self.n_bags and np.array_equal(bags, np.arange(self.n_bags)):
            # every bag in order (no validation part): share the features, do not copy them
            return BagData(self.features, self.offsets, self.counts, self.targets)
        starts, ends = self.offsets[bags], self.offsets[bags + 1]
        idx = _ranges(starts, ends)
        offsets = np.concatenate([[0], np.cumsum(ends - starts)])
        return BagData(
            self.features[idx],
            offsets,
            None if self.counts is None else self.counts[bags],
            None if self.targets is None else self.targets[bags],
        )

    def patch_index(self, bags: np.ndarray, cap: Optional[int], rng: Optional[np.random.Generator]):
        """Patch rows and local bag ids for ``bags``; bags above ``cap`` are subsampled."""
        starts, ends = self.offsets[bags], self.offsets[bags + 1]
        sizes = ends - starts
        if cap is None or rng is None or np.all(sizes <= cap):
            idx = _ranges(starts, ends)
            local = np.repeat(np.arange(len(bags)), sizes)
            return idx, local
        parts, local = [], []
        for j, (s, e) in enumerate(zip(starts, ends)):
            n = e - s
            rows = s + (rng.choice(n, cap, replace=False) if n > cap else np.arange(n))
            parts.append(rows)
            local.append(np.full(len(rows), j))
        return np.concatenate(parts), np.concatenate(local)


def _ranges(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, e)`` for each pair, without a Python loop."""
    sizes = ends - starts
    total = int(sizes.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    bag_of_row = np.repeat(np.arange(len(sizes)), sizes)
    first_row = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    return starts[bag_of_row] + (np.arange(total) - first_row[bag_of_row])

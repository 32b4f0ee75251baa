"""An optional cell-state term on top of the cell-type mixture.

A mixture of fixed cell-type prototypes can only express what differs *between* types.
Programs that every type switches on together in some regions (HLA class I and B2M
under interferon, stress and ribosomal programs) are invisible to it. The residual head
is a ridge map from a bag's (already scaled) mean features to what the mixture leaves
unexplained on log1p CP10k, fitted after the networks, *cross-fitted*: its targets are the
mixture's out-of-fold predictions (each training bag predicted by the ensemble members
that held it out for validation), so it learns what the mixture misses on tissue it has
not seen rather than the networks' training error.

It only acts when it helps: its penalty is chosen by inner cross-validation over the
training groups (sections / patients) on the *final* out-of-fold prediction — mixture plus residual —
with "no residual" among the candidates, so on data where the mixture already explains
what the features can predict the head stays off. It never changes the cell-type weights.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import numpy as np

from .probes import DEFAULT_ALPHA_GRID, RidgeProbe, _mean_pearson, inner_folds


class ResidualHead:
    """Ridge from bag features to ``log1p CP10k(observed) - log1p CP10k(mixture)``.

    Parameters
    ----------
    n_components
        PCA dimensions of the standardised features (as in the HEST probe).
    alphas
        Ridge penalties to choose from; "off" is always a candidate.
    n_inner_folds
        Folds of the inner cross-validation (grouped when groups are given).
    seed
        For the inner folds when there are no groups.
    """

    def __init__(self, n_components: int = 256, alphas: Sequence[float] = DEFAULT_ALPHA_GRID,
                 n_inner_folds: int = 4, seed: int = 0) -> None:
        self.n_components = n_components
        self.alphas = tuple(float(a) for a in alphas)
        self.n_inner_folds = n_inner_folds
        self.seed = seed
        self.alpha_: Optional[float] = None  # None: off
        self.cv_scores_: Dict[str, float] = {}
        self.oof_fraction_: Optional[float] = None  # share of training bags with an out-of-fold mixture
        self._probe: Optional[RidgeProbe] = None

    @property
    def active(self) -> bool:
        """Whether the inner cross-validation switched the head on."""
        return self._probe is not None

    def fit(self, features: np.ndarray, mixture_log: np.ndarray, observed_log: np.ndarray,
            groups: Optional[Sequence] = None) -> "ResidualHead":
        """Choose the penalty (or off) and fit on all rows.

        Parameters
        ----------
        features
            ``(N, D)`` one feature row per bag.
        mixture_log, observed_log
            ``(N, G)`` log1p CP10k of the model's mixture and of the observed counts.
        groups
            Group of each row; inner folds hold out whole groups.
        """
        x = np.asarray(features, dtype=np.float64)
        base = np.asarray(mixture_log, dtype=np.float64)
        y = np.asarray(observed_log, dtype=np.float64)
        if not (x.shape[0] == base.shape[0] == y.shape[0]) or base.shape != y.shape:
            raise ValueError(f"residual head: shapes {x.shape}, {base.shape}, {y.shape} do not agree")
        resid = y - base
        probe = RidgeProbe(n_components=self.n_components, alphas=self.alphas, seed=self.seed)
        folds = inner_folds(len(x), groups, self.n_inner_folds, self.seed)
        if len(x) < 4 or len(folds) < 2:
            return self
        n_folds = len(folds)
        usable = [f for f in folds if (~f).sum() >= 3 and f.sum() >= 2]  # Pearson needs a few rows
        off, scores = 0.0, np.zeros(len(self.alphas))
        for test, preds in probe.cv_path(x, resid, self.alphas, usable):
            off += _mean_pearson(base[test], y[test]) / n_folds
            for i, pred in enumerate(preds):
                scores[i] += _mean_pearson(base[test] + pred, y[test]) / n_folds
        self.cv_scores_ = {"off": float(off), **{repr(a): float(s) for a, s in zip(self.alphas, scores)}}
        best = int(np.nanargmax(scores))
        if not np.isfinite(scores[best]) or scores[best] <= off:
            return self
        self.alpha_ = self.alphas[best]
        self._probe = probe.fit_alpha(x, resid, self.alpha_)
        return self

    def predict(self, features: np.ndarray) -> np.ndarray:
        """``(N, G)`` residual on log1p CP10k (only when :attr:`active`)."""
        if self._probe is None:
            raise RuntimeError("the residual head is off or not fitted; check .active first")
        return self._probe.predict(features)

    # -- files -----------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        """Numbers and numpy arrays (the model file stores the arrays as tensors)."""
        out: Dict[str, Any] = {"alpha": self.alpha_, "cv_scores": dict(self.cv_scores_),
                               "n_components": self.n_components, "oof_fraction": self.oof_fraction_}
        if self._probe is not None:
            p = self._probe
            out.update(mean=p.mean_.astype(np.float32), std=p.std_.astype(np.float32),
                       components=p.components_.astype(np.float32), coef=p.coef_.astype(np.float32),
                       intercept=p.intercept_.astype(np.float32))
        return out

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "ResidualHead":
        head = cls(n_components=int(d.get("n_components", 256)))
        head.alpha_ = d.get("alpha")
        head.cv_scores_ = dict(d.get("cv_scores") or {})
        oof = d.get("oof_fraction")
        head.oof_fraction_ = None if oof is None else float(oof)
        if head.alpha_ is not None:
            p = RidgeProbe(n_components=head.n_components, alphas=[head.alpha_])
            p.alpha_ = head.alpha_
            p.mean_, p.std_ = np.asarray(d["mean"], np.float64), np.asarray(d["std"], np.float64)
            p.components_ = np.asarray(d["components"], np.float64)
            p.coef_, p.intercept_ = np.asarray(d["coef"], np.float64), np.asarray(d["intercept"], np.float64)
            head._probe = p
        return head

"""Baselines that regress log1p CP10k expression directly from features.

- :class:`RidgeProbe` — the HEST-Benchmark probe (standardise, PCA to 256, ridge). Its
  published penalty ``100 / (256 * n_genes)`` is almost no regularisation on a few hundred
  spots; ``alphas="cv"`` picks it by inner cross-validation on the training groups, the
  fair comparison.
- :class:`MLPRegressor` — a small MLP with MSE on log1p CP10k and early stopping.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np

from .._numerics import mean_column_pearson

DEFAULT_ALPHA_GRID = tuple(10.0 ** np.arange(-2, 9))


class RidgeProbe:
    """Standardise -> PCA(n_components) -> ridge, solved for all penalties at once by SVD.

    Parameters
    ----------
    n_components
        PCA dimensions (256 in HEST-Benchmark); capped by the number of training rows.
    alphas
        ``"hest"`` — HEST-Benchmark's fixed ``100 / (n_components * n_genes)``;
        ``"cv"`` — chosen from :data:`DEFAULT_ALPHA_GRID` by inner cross-validation
        (grouped by ``groups`` in :meth:`fit` when given); or a list to cross-validate over.
    n_inner_folds
        Folds of the inner cross-validation.
    seed
        For the inner folds when there are no groups.
    """

    def __init__(self, n_components: int = 256, alphas: Union[str, Sequence[float]] = "cv",
                 n_inner_folds: int = 4, seed: int = 0) -> None:
        self.n_components = n_components
        self.alphas = alphas
        self.n_inner_folds = n_inner_folds
        self.seed = seed
        self.alpha_: Optional[float] = None
        self.cv_scores_: Optional[dict] = None

    # -- plumbing --------------------------------------------------------------
    def _fit_transform_basis(self, x: np.ndarray):
        mean = x.mean(axis=0)
        std = x.std(axis=0)
        std[std == 0] = 1.0
        z = (x - mean) / std
        k = min(self.n_components, z.shape[0] - 1, z.shape[1])
        _, _, vt = np.linalg.svd(z - z.mean(axis=0), full_matrices=False)
        comps = vt[:k]
        return mean, std, comps

    @staticmethod
    def _ridge_path(p: np.ndarray, y: np.ndarray, alphas: Sequence[float]):
        """Coefficients (len(alphas), k, G) and intercepts for each alpha, via one SVD."""
        pm, ym = p.mean(axis=0), y.mean(axis=0)
        u, s, vt = np.linalg.svd(p - pm, full_matrices=False)
        uty = u.T @ (y - ym)
        coefs = []
        for a in alphas:
            d = s / (s * s + a)
            coefs.append(vt.T @ (d[:, None] * uty))
        coefs = np.stack(coefs)
        intercepts = ym[None, :] - np.einsum("k,akg->ag", pm, coefs)
        return coefs, intercepts

    def _project(self, x, mean, std, comps):
        return ((x - mean) / std) @ comps.T

    # -- API -------------------------------------------------------------------
    def fit(self, features: np.ndarray, targets: np.ndarray, groups: Optional[Sequence] = None) -> "RidgeProbe":
        """Fit on ``(N, D)`` features and ``(N, G)`` targets (log1p CP10k)."""
        x = np.asarray(features, dtype=np.float64)
        y = np.asarray(targets, dtype=np.float64)
        if isinstance(self.alphas, str) and self.alphas == "hest":
            k = min(self.n_components, x.shape[0] - 1, x.shape[1])
            self.alpha_ = 100.0 / (k * y.shape[1])
        else:
            grid = DEFAULT_ALPHA_GRID if isinstance(self.alphas, str) else tuple(self.alphas)
            self.alpha_ = self._inner_cv(x, y, grid, groups)
        self.fit_alpha(x, y, self.alpha_)
        return self

    def fit_alpha(self, x: np.ndarray, y: np.ndarray, alpha: float) -> "RidgeProbe":
        """Fit basis and coefficients on all rows at one given penalty."""
        self.alpha_ = float(alpha)
        self.mean_, self.std_, self.components_ = self._fit_transform_basis(x)
        coefs, inter = self._ridge_path(self._project(x, self.mean_, self.std_, self.components_), y, [alpha])
        self.coef_, self.intercept_ = coefs[0], inter[0]
        return self

    def cv_path(self, x: np.ndarray, y: np.ndarray, grid: Sequence[float], folds: Sequence[np.ndarray]):
        """For each inner fold, ``(test_mask, predictions)``: the held-out rows' predicted
        targets at every penalty of ``grid`` (``len(grid)`` arrays), basis and ridge fitted
        on the other rows."""
        for test_mask in folds:
            tr = ~test_mask
            mean, std, comps = self._fit_transform_basis(x[tr])
            coefs, inter = self._ridge_path(self._project(x[tr], mean, std, comps), y[tr], grid)
            pte = self._project(x[test_mask], mean, std, comps)
            yield test_mask, [pte @ coefs[i] + inter[i] for i in range(len(grid))]

    def _inner_cv(self, x, y, grid, groups) -> float:
        if len(grid) == 1:
            self.cv_scores_ = {float(grid[0]): float("nan")}
            return float(grid[0])
        folds = inner_folds(len(x), groups, self.n_inner_folds, self.seed)
        scores = np.zeros(len(grid))
        if min(int(m.sum()) for m in folds) < 3:
            # slide level: a fold of one or two slides has no correlation of its own, so
            # the held-out predictions of every fold are pooled and scored together
            pooled = np.zeros((len(grid),) + y.shape)
            for test_mask, preds in self.cv_path(x, y, grid, folds):
                for i, pred in enumerate(preds):
                    pooled[i][test_mask] = pred
            scores = np.array([_mean_pearson(pooled[i], y) for i in range(len(grid))])
        else:
            for test_mask, preds in self.cv_path(x, y, grid, folds):
                for i, pred in enumerate(preds):
                    scores[i] += _mean_pearson(pred, y[test_mask]) / len(folds)
        self.cv_scores_ = dict(zip(map(float, grid), scores.tolist()))
        return float(grid[int(np.nanargmax(scores))])

    def predict(self, features: np.ndarray) -> np.ndarray:
        """``(N, G)`` predicted targets."""
        p = self._project(np.asarray(features, dtype=np.float64), self.mean_, self.std_, self.components_)
        return p @ self.coef_ + self.intercept_


def inner_folds(n: int, groups: Optional[Sequence], n_folds: int, seed: int = 0) -> list:
    """Boolean test masks of an inner cross-validation over ``n`` rows: whole groups per
    fold when there are at least two groups, else a seeded random split."""
    if groups is not None and len(np.unique(groups)) >= 2:
        g = np.asarray(groups)
        uniq = np.unique(g)
        return [np.isin(g, chunk) for chunk in np.array_split(uniq, min(n_folds, len(uniq)))]
    perm = np.random.default_rng(seed).permutation(n)
    folds = []
    for chunk in np.array_split(perm, n_folds):
        m = np.zeros(n, bool)
        m[chunk] = True
        folds.append(m)
    return folds


_mean_pearson = mean_column_pearson  # the inner-CV score (also the residual head's)


class MLPRegressor:
    """Features -> hidden -> genes, MSE on log1p CP10k, AdamW, early stopping on a
    validation part of the training data (grouped when groups are given).

    Parameters
    ----------
    hidden
        Hidden width.
    dropout, weight_decay, lr, max_epochs, patience, batch_size, val_fraction, seed
        Usual meanings.
    """

    def __init__(self, hidden: int = 256, dropout: float = 0.25, weight_decay: float = 1e-2, lr: float = 1e-3,
                 max_epochs: int = 300, patience: int = 20, batch_size: int = 64, val_fraction: float = 0.15,
                 seed: int = 0) -> None:
        self.hidden, self.dropout, self.weight_decay, self.lr = hidden, dropout, weight_decay, lr
        self.max_epochs, self.patience, self.batch_size = max_epochs, patience, batch_size
        self.val_fraction, self.seed = val_fraction, seed

    def fit(self, features: np.ndarray, targets: np.ndarray, groups: Optional[Sequence] = None) -> "MLPRegressor":
        import torch
        from torch import nn

        from ..config import TrainConfig
        from ..train.trainer import fit_epochs
        from .scaling import FeatureScaler

        rng = np.random.default_rng(self.seed)
        torch.manual_seed(self.seed)
        self.scaler_ = FeatureScaler.fit(features, "robust")
        x = torch.from_numpy(self.scaler_.transform(features))
        y_np = np.asarray(targets, dtype=np.float32)
        self.y_mean_ = y_np.mean(0)
        y = torch.from_numpy(y_np - self.y_mean_)
        n = len(x)
        if groups is not None and len(np.unique(groups)) >= 3:
            g = np.asarray(groups)
            vg = rng.choice(np.unique(g), max(1, int(round(self.val_fraction * len(np.unique(g))))), replace=False)
            val = np.isin(g, vg)
        else:
            val = np.zeros(n, bool)
            val[rng.permutation(n)[: max(1, int(round(self.val_fraction * n)))]] = True
        tr_idx, va_idx = np.nonzero(~val)[0], np.nonzero(val)[0]
        self.net_ = nn.Sequential(nn.Dropout(self.dropout), nn.Linear(x.shape[1], self.hidden), nn.GELU(),
                                  nn.Dropout(self.dropout), nn.Linear(self.hidden, y.shape[1]))
        # the bag models' epoch loop (cpnn.train.trainer), as this probe always trained:
        # constant learning rate, no clipping, early stopping on validation Pearson
        tc = TrainConfig(lr=self.lr, weight_decay=self.weight_decay, max_epochs=self.max_epochs,
                         batch_size=self.batch_size, grad_clip=0.0, step_size=max(1, self.max_epochs), gamma=1.0,
                         early_stopping="val_pcc", patience=self.patience, seed=self.seed, progress=False)

        def step(batch: np.ndarray, _rng):
            b = torch.from_numpy(tr_idx[batch])
            loss = torch.mean((self.net_(x[b]) - y[b]) ** 2)
            return loss, {"mse": loss}

        def validate():
            self.net_.eval()
            with torch.no_grad():
                return {"val_pcc": _mean_pearson(self.net_(x[va_idx]).numpy(), y[va_idx].numpy())}

        fit_epochs(self.net_, len(tr_idx), tc, step, validate, rng=rng)
        self.net_.eval()
        return self

    def predict(self, features: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            out = self.net_(torch.from_numpy(self.scaler_.transform(features))).numpy()
        return out + self.y_mean_

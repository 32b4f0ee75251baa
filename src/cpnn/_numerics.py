"""Numerical pieces every layer shares, each written once: the expression transform
(log1p CP10k), Pearson correlation per column, and the negative-binomial / Poisson
log-likelihoods.

This is the lowest layer of the package: numpy at import time only; the likelihoods take
torch tensors and import torch when called, and scipy is imported only for sparse input.
"""
from __future__ import annotations

import numpy as np

#: Counts per 10,000: the library size every expression is scaled to before ``log1p``.
CP10K = 1e4


# ----------------------------------------------------------------------------- transforms
def log1p_cp10k(counts, dtype=np.float64) -> np.ndarray:
    """``log1p(counts / row sum * 1e4)`` of raw counts, dense, computed in float64.

    Parameters
    ----------
    counts
        ``(N, G)`` raw counts (numpy or scipy sparse).
    dtype
        Type of the result (the arithmetic is float64 either way).

    Returns
    -------
    numpy.ndarray
        ``(N, G)``; rows with a zero total stay zero.
    """
    if hasattr(counts, "toarray"):
        counts = counts.toarray()
    x = np.asarray(counts, dtype=np.float64)
    totals = x.sum(axis=1, keepdims=True)
    totals[totals == 0] = 1.0
    return np.log1p(x / totals * CP10K).astype(dtype, copy=False)


def composition_log1p(composition) -> np.ndarray:
    """``log1p(composition * 1e4)``: a predicted composition (rows sum to 1) on the scale
    of :func:`log1p_cp10k`, in the input's precision."""
    return np.log1p(np.asarray(composition) * CP10K)


def log1p_cp10k_torch(x, already_composition: bool = False, eps: float = 1e-10):
    """Torch twin of :func:`log1p_cp10k` (differentiable): ``log1p(x / sum(x) * 1e4)`` row-wise.

    Parameters
    ----------
    x
        ``(..., G)`` non-negative tensor.
    already_composition
        ``x`` already sums to 1 over its last axis.
    eps
        Floor of the row sums.
    """
    import torch

    comp = x if already_composition else x / x.sum(dim=-1, keepdim=True).clamp_min(eps)
    return torch.log1p(comp * CP10K)


# ----------------------------------------------------------------------------- Pearson
def pearson_columns(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of every column of ``a`` with the same column of ``b``
    (across rows), in the arrays' precision.

    Returns
    -------
    numpy.ndarray
        ``(G,)``; NaN where either column is constant (relative to the largest spread).
    """
    a = a - a.mean(axis=0)
    b = b - b.mean(axis=0)
    denom = np.sqrt((a * a).sum(axis=0) * (b * b).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (a * b).sum(axis=0) / denom
    r = np.asarray(r, dtype=np.result_type(r, np.float32))
    r[denom <= 1e-12 * max(1.0, float(np.abs(denom).max(initial=0.0)))] = np.nan
    return r


def mean_column_pearson(pred: np.ndarray, true: np.ndarray) -> float:
    """Mean over columns of :func:`pearson_columns` (columns constant on either side
    skipped); NaN when every column is."""
    r = pearson_columns(np.asarray(pred), np.asarray(true))
    ok = np.isfinite(r)
    return float(r[ok].mean()) if ok.any() else float("nan")


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two vectors (flattened); NaN when either is constant."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 1)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 1)
    return float(pearson_columns(a, b)[0])


# ----------------------------------------------------------------------------- likelihoods
def nb_log_prob(y, mu, r, eps: float = 0.0, constant: bool = True):
    """Element-wise negative-binomial log-probability (torch).

    Mean ``mu`` and inverse dispersion ``r`` (``Var = mu + mu**2 / r``), i.e.
    ``scipy.stats.nbinom(n=r, p=r / (r + mu))``:
    ``lgamma(y + r) - lgamma(r) - lgamma(y + 1) + r log(r / (r + mu)) + y log(mu / (r + mu))``.

    Parameters
    ----------
    y, mu, r
        Counts, positive means and positive inverse dispersions (broadcastable tensors).
    eps
        Added inside the logarithms (a loss on predictions that may reach 0 uses 1e-10).
    constant
        Include ``-lgamma(y + 1)`` (callers that sum it once leave it out).
    """
    import torch

    log_r_mu = torch.log(r + mu + eps) if eps else torch.log(r + mu)
    ll = torch.lgamma(y + r) - torch.lgamma(r)
    if constant:
        ll = ll - torch.lgamma(y + 1.0)
    log_r = torch.log(r + eps) if eps else torch.log(r)
    log_mu = torch.log(mu + eps) if eps else torch.log(mu)
    return ll + r * (log_r - log_r_mu) + y * (log_mu - log_r_mu)


def poisson_log_prob(y, mu, eps: float = 0.0, constant: bool = True):
    """Element-wise Poisson log-probability ``y log mu - mu - lgamma(y + 1)`` (torch);
    ``eps`` and ``constant`` as in :func:`nb_log_prob`."""
    import torch

    ll = y * (torch.log(mu + eps) if eps else torch.log(mu)) - mu
    return ll - torch.lgamma(y + 1.0) if constant else ll

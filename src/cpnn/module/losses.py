"""Losses of method §4, docs/ARCHITECTURE.md, as plain functions of tensors.

All expression losses take ``pred`` as a composition over genes (rows sum to 1) and
``counts`` as raw counts, so that every variant sees the same inputs.
"""
from __future__ import annotations

from typing import Optional

import torch

from .._numerics import log1p_cp10k_torch, nb_log_prob, poisson_log_prob

_EPS = 1e-10


def nb_log_likelihood(counts: torch.Tensor, mean: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Element-wise negative-binomial log-likelihood (:func:`cpnn._numerics.nb_log_prob`,
    with ``1e-10`` inside the logarithms).

    Parameterised by mean ``mu`` and inverse dispersion ``theta`` (variance
    ``mu + mu^2 / theta``), i.e. ``scipy.stats.nbinom(n=theta, p=theta / (theta + mu))``.
    """
    return nb_log_prob(counts, mean, theta, eps=_EPS)


def nb_nll(pred: torch.Tensor, counts: torch.Tensor, log_theta: torch.Tensor) -> torch.Tensor:
    """Mean NB negative log-likelihood of ``counts`` with mean ``pred * library size``."""
    library = counts.sum(dim=1, keepdim=True)
    ll = nb_log_likelihood(counts, pred * library, torch.exp(log_theta))
    return -ll.sum(dim=1).mean() / counts.shape[1]


def poisson_nll(pred: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Mean Poisson negative log-likelihood with mean ``pred * library size``."""
    ll = poisson_log_prob(counts, pred * counts.sum(dim=1, keepdim=True), eps=_EPS)
    return -ll.sum(dim=1).mean() / counts.shape[1]


def log1p_cp10k(x: torch.Tensor, already_composition: bool = False) -> torch.Tensor:
    """``log1p(x / sum(x) * 1e4)`` row-wise (:func:`cpnn._numerics.log1p_cp10k_torch`)."""
    return log1p_cp10k_torch(x, already_composition, eps=_EPS)


def mse_log1p(pred: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """MSE between log1p CP10k of prediction and of counts."""
    return torch.mean((log1p_cp10k(pred, True) - log1p_cp10k(counts)) ** 2)


def pearson_loss(pred: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``1 - mean_g Pearson_g`` across the batch's observations, on log1p CP10k."""
    x = log1p_cp10k(pred, True)
    y = log1p_cp10k(counts)
    x = x - x.mean(dim=0)
    y = y - y.mean(dim=0)
    r = (x * y).sum(0) / (x.norm(dim=0) * y.norm(dim=0) + _EPS)
    return 1.0 - r.mean()


def composition_loss(weights: torch.Tensor, targets: torch.Tensor,
                     type_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``mean_k (mean_i p_i - W)^2`` averaged over bags (method §4, docs/ARCHITECTURE.md).

    ``type_weights`` (K,), mean 1, re-weights the types (see ``CPNNConfig.composition_balance``).
    """
    sq = (weights - targets) ** 2
    if type_weights is not None:
        sq = sq * type_weights
    return torch.mean(sq)


def expression_loss(name: str, pred: torch.Tensor, counts: torch.Tensor, log_theta: torch.Tensor) -> torch.Tensor:
    """Dispatch to the expression loss called ``name`` (see ``CPNNConfig.loss``)."""
    if name == "nb":
        return nb_nll(pred, counts, log_theta)
    if name == "poisson":
        return poisson_nll(pred, counts)
    if name == "mse_log1p":
        return mse_log1p(pred, counts)
    if name == "pearson":
        return pearson_loss(pred, counts)
    raise ValueError(f"unknown loss {name!r}")

"""Deconvolution of bulk / spot counts against cell-type prototypes.

The cell2location-style spatial model of method §2, docs/ARCHITECTURE.md::

    y_ng ~ NB(mu_ng, r_g),   mu_ng = m_g * sum_k w_nk T_kg + s_g

with abundances ``w`` (N x K), a gene-wise platform factor ``m`` between single-cell and
target chemistry, a gene-wise background ``s`` and inverse dispersion ``r``
(``likelihood="poisson"``: no dispersion). It is fitted by MAP with multiplicative
majorise-minimise updates (the negative-binomial NMF updates of Gouvert et al., 2020),
which keep everything positive, increase the objective at every step and cost two
matrix products per update, so all observations are fitted at once. A Normal(0,
``platform_prior_sd``) prior on ``log m_g`` fixes the scale shared by ``w`` and ``m``.
``r`` gets a damped Newton step on ``log r`` every ``dispersion_every`` iterations.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import List, Optional, Union

import numpy as np
import scipy.sparse as sp
import torch

from cpnn.errors import CPNNInputError
from cpnn.prototypes.container import Prototypes

__all__ = ["Deconvolution", "deconvolve"]

_R_MIN, _R_MAX = 1e-3, 1e5


@dataclass
class Deconvolution:
    """Result of :func:`deconvolve`.

    Attributes
    ----------
    proportions
        (N, K) abundances normalised so each row sums to 1.
    abundances
        (N, K) non-negative ``w``, in units of "cells" whose expression is one prototype
        row times ``m``.
    platform_factor
        (G,) ``m_g``.
    background
        (G,) ``s_g``.
    dispersion
        (G,) inverse dispersion ``r_g`` (``inf`` for Poisson).
    loglik
        Final log-likelihood (sum over all counts, without the prior).
    n_iter, converged, seconds
        Fit diagnostics.
    cell_types
        K names when prototypes were given as :class:`Prototypes`.
    """

    proportions: np.ndarray
    abundances: np.ndarray
    platform_factor: np.ndarray
    background: np.ndarray
    dispersion: np.ndarray
    loglik: float
    n_iter: int = 0
    converged: bool = False
    seconds: float = 0.0
    cell_types: Optional[List[str]] = None
    history: list = field(default_factory=list)


def _check_counts(counts, n_genes: int) -> np.ndarray:
    if sp.issparse(counts):
        counts = counts.toarray()
    y = np.asarray(counts, dtype=np.float64)
    if y.ndim != 2:
        raise CPNNInputError(f"counts must be 2-D (observations x genes), got shape {y.shape}.",
                             field="counts", fix="pass an N x G matrix.")
    if y.shape[1] != n_genes:
        raise CPNNInputError(
            f"counts have {y.shape[1]} genes but the prototypes have {n_genes}.", field="counts",
            fix="put the counts' columns in the prototypes' gene order, e.g. "
            "prototypes.subset_genes(shared) and counts[:, idx] from cpnn.data.genes.match_genes.")
    if not np.all(np.isfinite(y)):
        raise CPNNInputError(f"counts contain {int((~np.isfinite(y)).sum())} NaN/inf values.",
                             field="counts", fix="remove or repair those observations.")
    if y.size and y.min() < 0:
        raise CPNNInputError(f"counts contain negative values (min {y.min():g}).", field="counts",
                             fix="pass raw non-negative counts, not scaled or log data.")
    empty = np.flatnonzero(y.sum(axis=1) <= 0)
    if len(empty):
        raise CPNNInputError(
            f"{len(empty)} of {y.shape[0]} observations have zero counts over these genes "
            f"(rows {empty[:10].tolist()}{' ...' if len(empty) > 10 else ''}).", field="counts",
            fix="filter those observations out first (e.g. keep rows with total >= 50 UMI).")
    return y


def _check_prototypes(prototypes) -> tuple[np.ndarray, Optional[List[str]]]:
    if isinstance(prototypes, Prototypes):
        return prototypes.values.astype(np.float64), list(prototypes.cell_types)
    T = np.asarray(prototypes, dtype=np.float64)
    if T.ndim != 2 or T.shape[0] < 1:
        raise CPNNInputError(f"prototypes must be a K x G array, got shape {T.shape}.",
                             field="prototypes", fix="pass Prototypes or a (types, genes) array.")
    if not np.all(np.isfinite(T)) or np.any(T < 0) or np.any(T.sum(axis=1) <= 0):
        raise CPNNInputError("prototypes must be finite, non-negative, with no all-zero type.",
                             field="prototypes", fix="use positive prototypes (build_prototypes).")
    return T, None


def _nb_loglik(y, mu, r, lgamma_y1):
    """Total log-likelihood; ``lgamma(y + 1)`` is summed once by the caller."""
    from .._numerics import nb_log_prob, poisson_log_prob

    ll = poisson_log_prob(y, mu, constant=False) if r is None else nb_log_prob(y, mu, r, constant=False)
    return float(ll.sum(dtype=torch.float64) - lgamma_y1)


def deconvolve(
    counts,
    prototypes: Union[Prototypes, np.ndarray],
    likelihood: str = "nb",
    seed: int = 0,
    max_iter: int = 1000,
    tol: float = 1e-5,
    platform_prior_sd: float = 1.0,
    fit_background: bool = True,
    dispersion_every: int = 10,
    scale_every: int = 2,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Deconvolution:
    """Cell-type abundances of each observation given prototypes (method §2, docs/ARCHITECTURE.md).

    Parameters
    ----------
    counts
        (N, G) raw counts (numpy or scipy sparse), genes in the order of the prototype
        columns.
    prototypes
        :class:`Prototypes` or a (K, G) non-negative array.
    likelihood
        ``"nb"`` (gene-wise dispersion) or ``"poisson"``.
    seed
        Seed of the small random perturbation of the initial abundances.
    max_iter
        Maximum multiplicative-update iterations.
    tol
        Stop when the relative change of the objective over 10 iterations is below this.
    platform_prior_sd
        Standard deviation of the Normal prior on ``log m_g``.
    fit_background
        Fit the gene-wise background ``s_g`` (else fixed at 0).
    dispersion_every
        Iterations between dispersion updates (NB only).
    scale_every
        Iterations between updates of ``m`` and ``s`` (each costs one more pass).
    device, dtype
        Torch device and dtype (log-likelihoods are accumulated in float64).

    Returns
    -------
    Deconvolution
    """
    if likelihood not in ("nb", "poisson"):
        raise CPNNInputError(f"unknown likelihood {likelihood!r}.", field="likelihood",
                             fix="use 'nb' or 'poisson'.")
    start = time.perf_counter()
    T_np, types = _check_prototypes(prototypes)
    y_np = _check_counts(counts, T_np.shape[1])
    n, g = y_np.shape
    k = T_np.shape[0]
    dt = dict(dtype=dtype, device=device)
    Y = torch.as_tensor(y_np, **dt)
    T = torch.as_tensor(T_np, **dt)
    lgamma_y1 = float(torch.lgamma(Y + 1).sum(dtype=torch.float64))
    rng = np.random.default_rng(seed)

    # start: m = 1, every type equally abundant, total expression matching the totals
    tot = Y.sum(dim=1)
    per_type = T.sum(dim=1).mean()
    W = (tot / (k * per_type))[:, None] * torch.as_tensor(rng.uniform(0.8, 1.2, (n, k)), **dt)
    log_m = torch.zeros(g, **dt)
    s = (1e-2 * Y.mean(dim=0)).clamp_min(1e-8) if fit_background else torch.zeros(g, **dt)
    r = torch.full((g,), 10.0, **dt) if likelihood == "nb" else None
    prec = 1.0 / platform_prior_sd ** 2
    eps = 1e-30

    def ratios(mu):
        a = Y / mu
        b = torch.ones_like(mu) if r is None else (Y + r) / (r + mu)
        return a, b

    history: List[float] = []
    converged = False
    it = 0
    for it in range(1, max_iter + 1):
        m = torch.exp(log_m)
        mu = (W @ T) * m + s
        a, b = ratios(mu)
        W = W * (((a * m) @ T.T) / ((b * m) @ T.T).clamp_min(eps))
        if it % scale_every == 0:
            WT = W @ T
            mu = WT * m + s
            a, b = ratios(mu)
            # m_g: maximise A log m - B m - (log m)^2 / (2 sd^2), Newton in log m
            A = m * (WT * a).sum(dim=0)
            B = (WT * b).sum(dim=0)
            u = log_m
            for _ in range(3):
                grad = A - B * torch.exp(u) - prec * u
                hess = -B * torch.exp(u) - prec
                u = u - (grad / hess).clamp(-2.0, 2.0)
            log_m = u
            if fit_background:
                s = (s * a.sum(dim=0) / b.sum(dim=0).clamp_min(eps)).clamp_min(1e-12)
        if r is not None and it % dispersion_every == 1:
            r = _dispersion_step(Y, (W @ T) * torch.exp(log_m) + s, r)
        if it % 10 == 0 or it == max_iter:
            mu = (W @ T) * torch.exp(log_m) + s
            obj = _nb_loglik(Y, mu, r, lgamma_y1) - 0.5 * prec * float((log_m ** 2).sum())
            history.append(obj)
            if len(history) > 1 and abs(history[-1] - history[-2]) <= tol * abs(history[-2]):
                converged = True
                break
    mu = (W @ T) * torch.exp(log_m) + s
    loglik = _nb_loglik(Y, mu, r, lgamma_y1)
    w = W.double().cpu().numpy()
    totals = w.sum(axis=1, keepdims=True)
    # an observation the background explains entirely has no cell-type signal: uniform,
    # never 0/0 (W is float32, where a 1e-300 floor underflows to zero)
    props = np.where(totals > 0, w / np.where(totals > 0, totals, 1.0), 1.0 / w.shape[1])
    disp = np.full(g, np.inf) if r is None else r.cpu().numpy()
    return Deconvolution(props, w, torch.exp(log_m).cpu().numpy(), s.cpu().numpy(), disp,
                         loglik, it, converged, time.perf_counter() - start, types, history)


def _dispersion_step(Y: torch.Tensor, mu: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """One damped Newton step on ``log r_g`` of the NB log-likelihood (vectorised)."""
    rr = r[None, :]
    yr, rmu = Y + rr, rr + mu
    g_r = (torch.digamma(yr) - torch.digamma(rr) + torch.log(rr) - torch.log(rmu)
           + 1.0 - yr / rmu).sum(dim=0)
    h_r = (torch.polygamma(1, yr) - torch.polygamma(1, rr) + 1.0 / rr - 2.0 / rmu
           + yr / rmu ** 2).sum(dim=0)
    g_u = r * g_r
    h_u = r * r * h_r + g_u
    step = torch.where(h_u < 0, -g_u / h_u, 0.5 * torch.sign(g_u))
    return torch.exp(torch.log(r) + step.clamp(-1.0, 1.0)).clamp(_R_MIN, _R_MAX)

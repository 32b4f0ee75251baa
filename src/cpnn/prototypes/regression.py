"""Negative-binomial regression of single-cell counts on cell-type labels (tensors only).

Model (method §1, docs/ARCHITECTURE.md; cell2location's ``RegressionModel`` fitted by MAP instead of
variational inference)::

    C_cg ~ NB(mu_cg, r_g)
    mu_cg = (s_{b(c),g} * theta_{l(c),g} + add_{b(c),g}) * (L_c / 1e4) * d_c

``theta`` (K x G) are the prototypes in counts per 10k; ``L_c`` is the cell's total
count over all genes, so ``theta`` is on the same scale as the naive mean of CP10k.
``s`` is a per-batch multiplicative gene effect with ``log s`` centred over batches
(fixed to 1 with one batch); ``add`` a small additive per-batch background with an
exponential prior of mean ``background_scale * mean CP10k of the gene``; ``d_c`` a
per-cell detection factor with a Gamma(alpha + 1, alpha) prior (mode 1, so along the
direction the likelihood cannot see -- the overall scale of a type -- the detection
factors average exactly 1); ``r_g`` the gene-wise inverse dispersion. All parameters
are optimised in log space with L-BFGS, full batch.

Speed: only non-zero counts are touched individually; the dense part of the likelihood
is computed per (label, batch) group from a tabulated function of the cells' scale
factors (:func:`cpnn.prototypes._nb.grouped_softplus_sums`).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from cpnn.prototypes._nb import grouped_softplus_sums

_LOG_R_MIN, _LOG_R_MAX = math.log(1e-3), math.log(1e5)


@dataclass
class RegressionFit:
    """Result of :func:`fit_nb_regression` (numpy arrays)."""

    theta: np.ndarray  # K x G
    batch_scale: np.ndarray  # B x G
    background: np.ndarray  # B x G
    detection: np.ndarray  # N
    dispersion: np.ndarray  # G
    nll: float  # final negative log-likelihood (sum over all counts, no priors)
    objective: float  # final objective (NLL + prior penalties)
    n_iter: int
    n_evals: int
    converged: bool
    seconds: float
    history: list


class _Problem:
    """Tensors and parameters of one fit; ``objective()`` returns (objective, nll)."""

    def __init__(self, X, labels, n_labels, batches, n_batches, library, init_theta,
                 detection_alpha, background_scale, batch_prior_sd, device, dtype, n_grid=256):
        self.n_grid = n_grid
        X = sp.csr_matrix(X)
        n, g = X.shape
        self.n, self.g, self.k, self.b = n, g, n_labels, n_batches
        t = dict(device=device, dtype=dtype)
        # group = (label, batch) pair actually present
        pair = np.asarray(labels, np.int64) * n_batches + np.asarray(batches, np.int64)
        uniq, cell_group = np.unique(pair, return_inverse=True)
        self.n_groups = len(uniq)
        self.group_label = torch.as_tensor(uniq // n_batches, device=device)
        self.group_batch = torch.as_tensor(uniq % n_batches, device=device)
        self.cell_group = torch.as_tensor(cell_group, device=device)
        coo = X.tocoo()
        rows, cols = coo.row.astype(np.int64), coo.col.astype(np.int64)
        vals = coo.data.astype(np.float64)
        # Terms linear in log mu only need sums of counts: per (group, gene) and per cell.
        self.group_sums = torch.as_tensor(
            sp.csr_matrix((vals, (cell_group[rows], cols)), shape=(self.n_groups, g)).toarray(), **t)
        self.cell_sums = torch.as_tensor(np.asarray(X.sum(axis=1), np.float64).ravel(), **t)
        self.gene_sums = torch.as_tensor(np.asarray(X.sum(axis=0), np.float64).ravel(), **t)
        # lgamma(y + r_g) - lgamma(r_g) only depends on (gene, value): group equal pairs.
        pairs, pair_n = np.unique(np.stack([cols, vals.astype(np.int64)]), axis=1, return_counts=True)
        self.pair_gene = torch.as_tensor(pairs[0], device=device)
        self.pair_val = torch.as_tensor(pairs[1], **t)
        self.pair_n = torch.as_tensor(pair_n, **t)
        self.nnz_gene = torch.as_tensor(np.bincount(cols, minlength=g), **t)
        self.nz_row = torch.as_tensor(rows, device=device)
        self.nz_u = torch.as_tensor(cell_group[rows] * g + cols, device=device)
        self.nz_val = torch.as_tensor(vals, **t)
        self.lgamma_y1 = float(torch.lgamma(self.nz_val + 1).sum())
        self.log_lib = torch.as_tensor(np.log(np.asarray(library, np.float64) / 1e4), **t)
        self.q_group = torch.arange(self.n_groups, device=device)[:, None].expand(self.n_groups, g)

        cp10k = np.asarray(X.multiply(1e4 / np.asarray(library, np.float64)[:, None]).mean(axis=0)).ravel()
        floor = np.maximum(cp10k, 1e-8)
        self.add_prior_mean = torch.as_tensor(background_scale * floor, **t)
        self.detection_alpha = detection_alpha
        self.batch_prior_sd = batch_prior_sd

        init = np.maximum(np.asarray(init_theta, np.float64), 1e-3 * floor[None, :])
        self.log_theta = torch.tensor(np.log(init), requires_grad=True, **t)
        self.log_add = torch.tensor(np.log(np.tile(1e-3 * floor, (n_batches, 1))), requires_grad=True, **t)
        self.log_det = torch.zeros(n, requires_grad=True, **t)
        self.log_r = torch.full((g,), math.log(2.0), requires_grad=True, **t)
        self.params = [self.log_theta, self.log_add, self.log_det, self.log_r]
        if n_batches > 1:
            self.log_s_raw = torch.zeros(n_batches, g, requires_grad=True, **t)
            self.params.append(self.log_s_raw)
        else:
            self.log_s_raw = None

    def log_s(self) -> torch.Tensor:
        if self.log_s_raw is None:
            return torch.zeros(1, self.g, dtype=self.log_theta.dtype, device=self.log_theta.device)
        return self.log_s_raw - self.log_s_raw.mean(dim=0, keepdim=True)

    def objective(self):
        log_s = self.log_s()
        phi = (torch.exp(self.log_theta)[self.group_label] * torch.exp(log_s)[self.group_batch]
               + torch.exp(self.log_add)[self.group_batch])  # groups x G
        log_phi = torch.log(phi)
        log_r = self.log_r.clamp(_LOG_R_MIN, _LOG_R_MAX)
        r = torch.exp(log_r)
        log_y = self.log_lib + self.log_det
        u = log_phi - log_r[None, :]  # log(phi / r), groups x G
        # log mu = log phi + log y ; log(r + mu) = log r + softplus(u + log y)
        ll = (self.pair_n * torch.lgamma(self.pair_val + r[self.pair_gene])).sum()
        ll = ll - (self.nnz_gene * torch.lgamma(r)).sum()
        ll = ll + (self.group_sums * log_phi).sum() + (self.cell_sums * log_y).sum()
        ll = ll - (self.gene_sums * log_r).sum()
        ll = ll - (self.nz_val * F.softplus(u.reshape(-1)[self.nz_u] + log_y[self.nz_row])).sum()
        # r * log(r / (r + mu)) = -r * softplus(u + log y), summed over all cells per group
        h = grouped_softplus_sums(log_y, self.cell_group, self.n_groups, u, self.q_group,
                                  n_grid=self.n_grid)
        ll_nz, ll_dense = ll, -(r[None, :] * h).sum()
        nll = -(ll_nz + ll_dense) + self.lgamma_y1
        d = torch.exp(self.log_det)
        penalty = self.detection_alpha * (d - 1.0 - self.log_det).sum()
        penalty = penalty + (torch.exp(self.log_add) / self.add_prior_mean).sum()
        if self.log_s_raw is not None:
            penalty = penalty + 0.5 * (log_s ** 2).sum() / self.batch_prior_sd ** 2
        return nll + penalty, nll


def fit_nb_regression(
    X,
    labels: np.ndarray,
    n_labels: int,
    library: np.ndarray,
    init_theta: np.ndarray,
    batches: Optional[np.ndarray] = None,
    n_batches: int = 1,
    max_epochs: int = 100,
    tol: float = 1e-9,
    history_size: int = 20,
    detection_alpha: float = 10.0,
    background_scale: float = 0.1,
    batch_prior_sd: float = 1.0,
    seed: int = 0,
    device: str = "cpu",
    dtype: torch.dtype = torch.float64,
) -> RegressionFit:
    """Fit the NB regression by MAP with L-BFGS.

    Parameters
    ----------
    X
        (N, G) raw counts, scipy sparse or dense, genes already selected.
    labels
        (N,) integer label of each cell in ``[0, n_labels)``; every label needs cells.
    n_labels
        K.
    library
        (N,) total counts of each cell over *all* genes (sets the CP10k scale).
    init_theta
        (K, G) starting prototypes in CP10k (the naive means).
    batches, n_batches
        (N,) batch index per cell in ``[0, n_batches)``; ``None`` means one batch.
    max_epochs
        L-BFGS iterations (full passes over the data; each may take several function
        evaluations in the line search).
    tol
        Stop when the objective per count changes by less than this in an iteration.
    history_size
        L-BFGS memory.
    detection_alpha, background_scale, batch_prior_sd
        Prior strengths (see the module docstring).
    seed
        Seeds torch (the fit itself is deterministic given the data).
    device, dtype
        Torch device and dtype.

    Returns
    -------
    RegressionFit
    """
    torch.manual_seed(seed)
    start = time.perf_counter()
    if batches is None:
        batches = np.zeros(len(labels), dtype=np.int64)
        n_batches = 1
    prob = _Problem(X, labels, n_labels, batches, n_batches, library, init_theta,
                    detection_alpha, background_scale, batch_prior_sd, device, dtype)
    scale = 1.0 / (prob.n * prob.g)  # objective per count: tolerances independent of size
    opt = torch.optim.LBFGS(prob.params, lr=1.0, max_iter=max_epochs,
                            max_eval=int(max_epochs * 1.25) + 1, history_size=history_size,
                            tolerance_grad=1e-9, tolerance_change=tol,
                            line_search_fn="strong_wolfe")
    history: list = []

    def closure():
        opt.zero_grad()
        obj, nll = prob.objective()
        history.append(float(nll.detach()))
        loss = obj * scale
        loss.backward()
        return loss

    opt.step(closure)
    st = opt.state[opt._params[0]]
    iters, n_evals = int(st.get("n_iter", 0)), int(st.get("func_evals", len(history)))
    converged = iters < max_epochs and n_evals < opt.defaults["max_eval"]
    with torch.no_grad():
        obj, nll = prob.objective()
        theta = torch.exp(prob.log_theta).cpu().numpy()
        s = torch.exp(prob.log_s()).expand(n_batches, prob.g).cpu().numpy()
        add = torch.exp(prob.log_add).cpu().numpy()
        det = torch.exp(prob.log_det).cpu().numpy()
        r = torch.exp(prob.log_r.clamp(_LOG_R_MIN, _LOG_R_MAX)).cpu().numpy()
    return RegressionFit(theta, s, add, det, r, float(nll), float(obj), iters, n_evals,
                         converged, time.perf_counter() - start, history)

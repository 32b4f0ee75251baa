"""Negative-binomial log-likelihood pieces of the regression prototypes (the element-wise
log-probabilities themselves are :func:`cpnn._numerics.nb_log_prob` / ``poisson_log_prob``).

Parameterisation: mean ``mu`` and inverse dispersion (``total_count``) ``r``, so that
``Var = mu + mu**2 / r``; this is ``scipy.stats.nbinom(n=r, p=r / (r + mu))``.

``log p(y) = lgamma(y + r) - lgamma(r) - lgamma(y + 1)
             + r * log(r / (r + mu)) + y * log(mu / (r + mu))``

For sparse count matrices only the last term and the gamma terms need the non-zero
entries; the ``r * log(r / (r + mu))`` term is dense. :func:`grouped_softplus_sums`
evaluates that dense part exactly (to interpolation error ~1e-9 relative) when ``mu``
factorises as ``phi[group(c), g] * y[c]``, at a cost independent of the number of cells
per gene, which is what makes the regression prototypes fast on all genes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def grouped_softplus_sums(
    log_y: torch.Tensor,
    cell_group: torch.Tensor,
    n_groups: int,
    u: torch.Tensor,
    query_group: torch.Tensor,
    n_grid: int = 1024,
) -> torch.Tensor:
    """``H[q] = sum_{c in group q} softplus(u[q] + log_y[c])`` for many queries at once.

    With ``u = log(phi / r)`` this is ``sum_c log1p(phi * y_c / r)``, the dense part of
    the NB likelihood for all cells of a group. Each group's function of ``u`` is
    tabulated on a grid spanning the queried range (values and exact derivatives) and
    evaluated by cubic Hermite interpolation, so the cost is
    ``O(n_grid * n_cells + n_queries)`` instead of ``O(n_cells * n_queries / n_groups)``.
    Gradients flow to both ``u`` and ``log_y``.

    Parameters
    ----------
    log_y
        (N,) log per-cell scale factors.
    cell_group
        (N,) group index of each cell, in ``[0, n_groups)``.
    n_groups
        Number of groups.
    u
        Query points (any shape).
    query_group
        Group index of each query point (same shape as ``u``).
    n_grid
        Grid points; the Hermite error is ``O(step**4)``.

    Returns
    -------
    torch.Tensor
        Same shape as ``u``.
    """
    with torch.no_grad():
        lo = float(u.min()) - 1e-3
        hi = float(u.max()) + 1e-3
    step = (hi - lo) / (n_grid - 1)
    grid = lo + step * torch.arange(n_grid, dtype=log_y.dtype, device=log_y.device)
    arg = grid[:, None] + log_y[None, :]  # n_grid x N
    onehot = torch.zeros(log_y.shape[0], n_groups, dtype=log_y.dtype, device=log_y.device)
    onehot[torch.arange(log_y.shape[0], device=log_y.device), cell_group] = 1.0
    values = F.softplus(arg) @ onehot  # n_grid x n_groups
    slopes = torch.sigmoid(arg) @ onehot  # d values / du
    pos = ((u - lo) / step).clamp(0.0, n_grid - 1 - 1e-6)
    j = pos.detach().floor().long()
    t = pos - j
    flat_lo = j * n_groups + query_group
    flat_hi = flat_lo + n_groups
    v_flat, s_flat = values.reshape(-1), slopes.reshape(-1)
    t2, t3 = t * t, t * t * t
    return (
        (2 * t3 - 3 * t2 + 1) * v_flat[flat_lo]
        + (t3 - 2 * t2 + t) * step * s_flat[flat_lo]
        + (-2 * t3 + 3 * t2) * v_flat[flat_hi]
        + (t3 - t2) * step * s_flat[flat_hi]
    )

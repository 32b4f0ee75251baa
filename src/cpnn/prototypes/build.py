"""``build_prototypes``: naive or negative-binomial regression prototypes from a reference."""
from __future__ import annotations

import time
import warnings
from typing import Optional, Sequence

import anndata as ad
import numpy as np
import scipy.sparse as sp

from cpnn._constants import UNS
from cpnn.data.genes import match_genes
from cpnn.errors import CPNNInputError
from cpnn.prototypes.container import Prototypes
from cpnn.prototypes.reference import QC_KEY, reference_qc, validate_counts

__all__ = ["build_prototypes", "naive_prototypes", "MIN_VALUE"]

#: Floor applied to prototype values (CP10k) so that they are strictly positive and
#: ``log`` is finite; far below one count in any cell.
MIN_VALUE = 1e-6
CP10K = 1e4


def _label_codes(adata: ad.AnnData, key: str, role: str):
    if key not in adata.obs.columns:
        raise CPNNInputError(f"{role} column {key!r} not found; available columns: "
                             f"{list(adata.obs.columns)}.", field=f"obs['{key}']",
                             fix=f"pass --{role} with one of those ({role}_key= in Python).")
    col = adata.obs[key]
    if col.isna().any():
        raise CPNNInputError(f"{int(col.isna().sum())} cells have no {role}.", field=f"obs['{key}']",
                             fix="drop those cells or fill in the column.")
    values = col.astype(str).to_numpy()
    names, codes = np.unique(values, return_inverse=True)
    # keep a categorical column's own order when there is one
    if col.dtype.name == "category":
        order = [str(c) for c in col.cat.categories if str(c) in set(names)]
        remap = {n: i for i, n in enumerate(order)}
        codes = np.fromiter((remap[v] for v in values), dtype=np.int64, count=len(values))
        names = np.asarray(order)
    return [str(n) for n in names], codes.astype(np.int64)


def naive_prototypes(X: sp.csr_matrix, codes: np.ndarray, n_types: int,
                     library: np.ndarray) -> np.ndarray:
    """Mean over the cells of each type of counts per 10k (K x G, float64).

    Parameters
    ----------
    X
        (N, G) counts (genes already selected).
    codes
        (N,) type index of each cell.
    n_types
        K.
    library
        (N,) total counts per cell over all genes (before gene selection).
    """
    n = X.shape[0]
    scaled = sp.diags(CP10K / library) @ sp.csr_matrix(X, dtype=np.float64)
    member = sp.csr_matrix((np.ones(n), (codes, np.arange(n))), shape=(n_types, n))
    sums = np.asarray((member @ scaled).todense())
    return sums / np.bincount(codes, minlength=n_types)[:, None]


def build_prototypes(
    adata: ad.AnnData,
    label_key: str,
    method: str = "naive",
    batch_key: Optional[str] = None,
    genes: Optional[Sequence[str]] = None,
    seed: int = 0,
    qc: bool = True,
    max_epochs: int = 100,
    device: str = "cpu",
    **regression_kwargs,
) -> Prototypes:
    """Cell-type prototypes (K x G) from a single-cell reference.

    Both methods return the expected normalised expression of a cell of each type in
    counts per 10,000 of the cell's total over *all* genes of the (QC-filtered)
    reference, so a prototype sums to about 10,000 over all genes and the two methods
    are comparable gene by gene.

    * ``"naive"``: per-type mean of each cell's counts scaled to 10,000 in total.
    * ``"regression"``: the negative-binomial regression of method §1, docs/ARCHITECTURE.md (see
      :mod:`cpnn.prototypes.regression`), which separates per-batch gene effects, an
      additive background and per-cell detection from the type means; initialised
      from the naive prototypes.

    Parameters
    ----------
    adata
        Cells x genes raw counts in ``X`` (e.g. from :func:`read_reference`).
    label_key
        ``obs`` column with the cell type.
    method
        ``"naive"`` or ``"regression"``.
    batch_key
        ``obs`` column with the batch (patient/sample); used by the regression only.
    genes
        Target genes (e.g. the spatial panel). They are matched after symbol
        harmonisation and returned in this order, spelled as given; genes absent from
        the reference (after QC) are dropped with a warning and listed in
        ``provenance["genes_missing"]``. ``None`` means all genes passing QC.
    seed
        Random seed.
    qc
        Run :func:`reference_qc` first (skipped if ``adata`` already carries its record).
    max_epochs
        L-BFGS iterations of the regression.
    device
        Torch device of the regression.
    **regression_kwargs
        Passed to :func:`cpnn.prototypes.regression.fit_nb_regression` (``tol``,
        ``detection_alpha``, ``background_scale``, ``batch_prior_sd``).

    Returns
    -------
    Prototypes
        ``provenance`` holds the number of cells per type, QC record, genes missing and
        for the regression the final NLL, iterations and timings.
    """
    if method not in ("naive", "regression"):
        raise CPNNInputError(f"unknown method {method!r}.", field="method",
                             fix="use 'naive' or 'regression'.")
    start = time.perf_counter()
    X = validate_counts(adata.X, field="X", hint="Use read_reference() to pick the counts layer.")
    if X.shape[0] == 0 or X.shape[1] == 0:
        raise CPNNInputError(f"the reference is empty ({X.shape[0]} cells x {X.shape[1]} genes).",
                             field="X", fix="check the input.")
    if qc and QC_KEY not in adata.uns.get(UNS, {}):
        adata = reference_qc(ad.AnnData(X=X, obs=adata.obs.copy(), var=adata.var.copy(),
                                        uns=dict(adata.uns)), label_key=label_key)
        X = sp.csr_matrix(adata.X, dtype=np.float32)
    qc_record = dict(adata.uns.get(UNS, {}).get(QC_KEY, {})) or None

    types, codes = _label_codes(adata, label_key, "label")
    library = np.asarray(X.sum(axis=1), dtype=np.float64).ravel()
    if np.any(library <= 0):
        bad = np.flatnonzero(library <= 0)
        raise CPNNInputError(f"{len(bad)} cells have no counts (e.g. {adata.obs_names[bad[:3]].tolist()}).",
                             field="X", fix="drop empty cells (reference_qc does).")

    ref_genes = [str(g) for g in adata.var_names]
    missing: list = []
    if genes is None:
        gene_names, col_idx = ref_genes, np.arange(len(ref_genes))
    else:
        genes = [str(g) for g in genes]
        t_idx, col_idx, gene_names = match_genes(genes, ref_genes)
        found = set(t_idx.tolist())
        missing = [g for i, g in enumerate(genes) if i not in found]
        if missing:
            warnings.warn(f"{len(missing)} of {len(genes)} requested genes are not in the "
                          f"reference after QC and are left out, e.g. {missing[:10]}.", stacklevel=2)
    Xg = X[:, col_idx]
    naive = naive_prototypes(Xg, codes, len(types), library)
    n_cells = np.bincount(codes, minlength=len(types))
    provenance = {
        "method": method,
        "label_key": label_key,
        "batch_key": batch_key,
        "n_cells": int(X.shape[0]),
        "n_cells_per_type": {t: int(c) for t, c in zip(types, n_cells)},
        "n_genes": len(gene_names),
        "n_genes_requested": None if genes is None else len(genes),
        "genes_missing": missing,
        "scale": "counts per 10,000 over all reference genes",
        "min_value": MIN_VALUE,
        "qc": qc_record,
        "seed": int(seed),
    }
    values = naive
    if method == "regression":
        from cpnn.prototypes.regression import fit_nb_regression

        batches, n_batches, batch_names = None, 1, None
        if batch_key is not None:
            batch_names, batches = _label_codes(adata, batch_key, "batch")
            n_batches = len(batch_names)
        fit = fit_nb_regression(Xg, codes, len(types), library, naive, batches=batches,
                                n_batches=n_batches, max_epochs=max_epochs, seed=seed,
                                device=device, **regression_kwargs)
        values = fit.theta
        provenance.update({
            "final_nll": fit.nll,
            "final_objective": fit.objective,
            "nll_per_count": fit.nll / (Xg.shape[0] * Xg.shape[1]),
            "iterations": fit.n_iter,
            "function_evaluations": fit.n_evals,
            "converged": fit.converged,
            "fit_seconds": round(fit.seconds, 3),
            "batches": batch_names,
            "detection_mean": float(fit.detection.mean()),
            # background summed over genes, relative to the mean type's summed prototype
            "background_fraction": float(fit.background.sum(axis=1).mean()
                                         / max(fit.theta.sum(axis=1).mean(), 1e-12)),
            "dispersion_median": float(np.median(fit.dispersion)),
            **{k: v for k, v in regression_kwargs.items()},
        })
    provenance["seconds"] = round(time.perf_counter() - start, 3)
    values = np.maximum(np.asarray(values, dtype=np.float64), MIN_VALUE).astype(np.float32)
    return Prototypes(values, types, list(gene_names), method, label_key, provenance)

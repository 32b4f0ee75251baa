"""Gene panels chosen from training observations only, and reference clusters.

A benchmark's gene panel is a choice; a choice made on test data inflates the scores.
Here every panel is computed from the *training* part of a fold: a fixed list (kept in
its order, restricted to the candidate genes), the most expressed genes, or the most
variable genes. Candidates are the genes measured in every sample (their *names* only,
never test values) that also match the single-cell reference when prototypes are needed.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from .._numerics import log1p_cp10k
from ..errors import CPNNInputError

GENE_SET_KINDS = ("list", "top_expressed", "top_variable")


def _cp10k(counts: np.ndarray, totals: np.ndarray) -> np.ndarray:
    totals = np.where(totals > 0, totals, 1.0)
    return counts / totals[:, None] * 1e4


def select_gene_set(
    spec: Dict[str, Any],
    candidates: Sequence[str],
    train_counts: np.ndarray,
    train_totals: np.ndarray,
    panel: Optional[Sequence[str]] = None,
) -> Dict[str, Any]:
    """Genes of one gene set for one fold, from training observations only.

    Parameters
    ----------
    spec
        ``{"name", "kind": "list"|"top_expressed"|"top_variable", "n"}``.
    candidates
        Candidate genes (columns of ``train_counts``).
    train_counts
        ``(N_train, len(candidates))`` raw counts of the training observations.
    train_totals
        ``(N_train,)`` total counts over *all* measured genes (the CP10k denominator).
    panel
        The gene list of a ``list`` set (already read from its file).

    Returns
    -------
    dict
        ``genes`` (list, in the panel's order or by decreasing score), ``n_requested``,
        ``n_missing`` (panel genes not among the candidates) and ``missing`` (first 20).
    """
    kind = spec.get("kind")
    cand = [str(g) for g in candidates]
    n = spec.get("n")
    if kind == "list":
        if panel is None:
            raise CPNNInputError(f"gene set {spec.get('name')!r} of kind 'list' has no genes",
                                 field="gene_sets[].path", fix="give path: a file with one gene per line")
        pos = set(cand)
        genes, seen = [], set()
        for g in panel:
            if g in pos and g not in seen:
                genes.append(g)
                seen.add(g)
        missing = [g for g in dict.fromkeys(panel) if g not in pos]
        if n is not None:
            genes = genes[: int(n)]
        if not genes:
            raise CPNNInputError(f"no gene of the list {spec.get('name')!r} is a candidate gene",
                                 field="gene_sets[].path", fix="check the gene symbols of the panel file")
        return {"genes": genes, "n_requested": len(panel), "n_missing": len(missing), "missing": missing[:20]}
    if kind not in GENE_SET_KINDS:
        raise CPNNInputError(f"unknown gene set kind {kind!r}", field="gene_sets[].kind",
                             fix=f"use one of {', '.join(GENE_SET_KINDS)}")
    if n is None or int(n) < 1:
        raise CPNNInputError(f"gene set {spec.get('name')!r} needs n >= 1", field="gene_sets[].n", fix="e.g. n: 250")
    x = _cp10k(np.asarray(train_counts, dtype=np.float64), np.asarray(train_totals, dtype=np.float64))
    if kind == "top_expressed":
        score = x.mean(axis=0)
    else:
        score = np.log1p(x).var(axis=0)
    # stable sort on -score: ties keep the candidates' order, so the result is reproducible
    order = np.argsort(-score, kind="stable")[: int(n)]
    order = order[score[order] > 0]
    return {"genes": [cand[i] for i in order], "n_requested": int(n), "n_missing": 0, "missing": []}


def kmeans_labels(reference, k: int, seed: int = 0, n_pcs: int = 30, n_hvg: int = 2000,
                  n_init: int = 4, max_iter: int = 100) -> np.ndarray:
    """Cluster labels of reference cells: k-means on PCA of log1p CP10k (highly variable genes).

    The paper's default granularity is Leiden clusters of the reference; without
    ``leidenalg``/``igraph`` (not dependencies of cpnn) this seeded k-means is the stated
    fallback. Labels are ``"kmeans{k}_{i:02d}"``, numbered by decreasing cluster size.
    """
    from scipy import sparse

    X = reference.X
    X = X.toarray() if sparse.issparse(X) else np.asarray(X)
    X = np.asarray(X, dtype=np.float64)
    L = log1p_cp10k(X)
    var = L.var(0)
    hv = np.argsort(-var, kind="stable")[: min(n_hvg, L.shape[1])]
    Z = L[:, hv] - L[:, hv].mean(0)
    sd = Z.std(0)
    Z /= np.where(sd > 0, sd, 1.0)
    u, s, _ = np.linalg.svd(Z, full_matrices=False)
    P = u[:, :n_pcs] * s[:n_pcs]
    rng = np.random.default_rng(seed)
    best_inertia, best = np.inf, None
    for _ in range(n_init):
        centres = _kmeanspp(P, k, rng)
        for _ in range(max_iter):
            d = ((P[:, None, :] - centres[None]) ** 2).sum(-1)
            lab = d.argmin(1)
            new = np.stack([P[lab == j].mean(0) if (lab == j).any() else centres[j] for j in range(k)])
            if np.allclose(new, centres):
                break
            centres = new
        inertia = float(((P - centres[lab]) ** 2).sum())
        if inertia < best_inertia:
            best_inertia, best = inertia, lab
    sizes = np.bincount(best, minlength=k)
    rank = np.empty(k, dtype=np.int64)
    rank[np.argsort(-sizes, kind="stable")] = np.arange(k)
    return np.array([f"kmeans{k}_{rank[j]:02d}" for j in best], dtype=object)


def _kmeanspp(P: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    centres = [P[rng.integers(len(P))]]
    d2 = ((P - centres[0]) ** 2).sum(1)
    for _ in range(1, k):
        p = d2 / d2.sum() if d2.sum() > 0 else None
        c = P[rng.choice(len(P), p=p)]
        centres.append(c)
        d2 = np.minimum(d2, ((P - c) ** 2).sum(1))
    return np.stack(centres)


def read_gene_list(path) -> List[str]:
    """Gene symbols, one per line (see :func:`cpnn.workflows.fit.read_gene_list`)."""
    from ..workflows.fit import read_gene_list as _read

    return _read(path, field="gene_sets[].path")

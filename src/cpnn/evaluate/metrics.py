"""Per-gene correlation metrics across held-out observations (METHOD.md §5).

Every method is scored on the same target: log1p CP10k of the measured counts, per gene
across test observations, then the mean and the median over genes. A gene the method predicts as
a constant (while the truth varies) scores 0 in the mean: a model cannot raise its mean by
giving up on hard genes. Genes constant in the truth cannot be scored by any method; they
are left out of the mean and counted.
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence

import numpy as np
from scipy import sparse, stats


def to_log1p_cp10k(counts) -> np.ndarray:
    """``log1p(counts / row sum * 1e4)`` as a dense float64 array."""
    x = counts.toarray() if sparse.issparse(counts) else np.asarray(counts, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    totals = x.sum(axis=1, keepdims=True)
    totals[totals == 0] = 1.0
    return np.log1p(x / totals * 1e4)


def _pearson_columns(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(axis=0)
    b = b - b.mean(axis=0)
    denom = np.sqrt((a * a).sum(axis=0) * (b * b).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (a * b).sum(axis=0) / denom
    r[denom <= 1e-12 * max(1.0, float(np.abs(denom).max(initial=0.0)))] = np.nan
    return r


def per_gene_correlations(pred: np.ndarray, true: np.ndarray) -> Dict[str, np.ndarray]:
    """Pearson and Spearman per gene (column) across observations (rows).

    Parameters
    ----------
    pred, true
        ``(N, G)`` arrays on the same scale (e.g. log1p CP10k), genes in the same order.

    Returns
    -------
    dict
        ``pcc`` and ``scc`` arrays of length G; NaN where either column is constant.
    """
    pred = np.asarray(pred, dtype=np.float64)
    true = np.asarray(true, dtype=np.float64)
    if pred.shape != true.shape:
        raise ValueError(f"prediction shape {pred.shape} != truth shape {true.shape}")
    if pred.shape[0] < 3:
        raise ValueError(f"need at least 3 observations to correlate, got {pred.shape[0]}")
    pcc = _pearson_columns(pred, true)
    scc = _pearson_columns(stats.rankdata(pred, axis=0), stats.rankdata(true, axis=0))
    return {"pcc": pcc, "scc": scc}


def benjamini_hochberg(p: np.ndarray) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values (q-values); NaN stays NaN."""
    p = np.asarray(p, dtype=np.float64)
    q = np.full_like(p, np.nan)
    ok = np.isfinite(p)
    pv = p[ok]
    m = pv.size
    if m == 0:
        return q
    order = np.argsort(pv)
    ranked = pv[order] * m / np.arange(1, m + 1)
    ranked = np.minimum.accumulate(ranked[::-1])[::-1]
    out = np.empty(m)
    out[order] = np.clip(ranked, 0, 1)
    q[ok] = out
    return q


def _positive_correlation_pvalues(r: np.ndarray, n: int) -> np.ndarray:
    """One-sided p-values for r > 0 from the t distribution with n - 2 df."""
    with np.errstate(invalid="ignore", divide="ignore"):
        t = r * np.sqrt((n - 2) / np.clip(1 - r * r, 1e-300, None))
    return stats.t.sf(t, df=n - 2)


def expression_metrics(
    pred: np.ndarray,
    true: np.ndarray,
    genes: Optional[Sequence[str]] = None,
    q_threshold: float = 0.05,
) -> Dict[str, object]:
    """Summary of per-gene correlations: mean, median, dropped and significant genes.

    Parameters
    ----------
    pred, true
        ``(N, G)`` on the same scale.
    genes
        Gene names (for the per-gene table).
    q_threshold
        Benjamini–Hochberg level for counting genes with significant positive Pearson.

    Returns
    -------
    dict
        ``pcc_mean, pcc_median, scc_mean, scc_median`` over the genes whose truth
        varies (a constant prediction of such a gene counts as r = 0), ``n_genes``,
        ``n_genes_scored``, ``n_genes_constant`` (constant in the truth: not scored),
        ``n_genes_constant_prediction`` (scored as 0), ``n_significant`` and
        ``per_gene`` (dict of lists: gene, pcc, scc; NaN where the truth is constant).
    """
    cors = per_gene_correlations(pred, true)
    pcc, scc = cors["pcc"], cors["scc"]
    true = np.asarray(true, dtype=np.float64)
    spread = true.max(axis=0) - true.min(axis=0)
    truth_varies = spread > 1e-12 * max(1.0, float(np.abs(true).max(initial=0.0)))
    # the truth varies but the prediction gives no correlation: a constant prediction,
    # counted as r = 0 rather than dropped from the mean
    pred_constant = truth_varies & ~(np.isfinite(pcc) & np.isfinite(scc))
    pcc = np.where(pred_constant, 0.0, pcc)
    scc = np.where(pred_constant, 0.0, scc)
    scored = truth_varies
    pvals = _positive_correlation_pvalues(pcc, pred.shape[0])
    q = benjamini_hochberg(np.where(scored & ~pred_constant, pvals, np.where(scored, 1.0, np.nan)))
    names = list(genes) if genes is not None else [str(i) for i in range(pcc.size)]

    def _agg(fn, v):
        v = v[scored]
        return float(fn(v)) if v.size else float("nan")

    return {
        "pcc_mean": _agg(np.mean, pcc),
        "pcc_median": _agg(np.median, pcc),
        "scc_mean": _agg(np.mean, scc),
        "scc_median": _agg(np.median, scc),
        "n_obs": int(pred.shape[0]),
        "n_genes": int(pcc.size),
        "n_genes_scored": int(scored.sum()),
        "n_genes_constant": int((~scored).sum()),
        "n_genes_constant_prediction": int(pred_constant.sum()),
        "n_significant": int(np.nansum(q < q_threshold)),
        "per_gene": {"gene": names, "pcc": pcc.tolist(), "scc": scc.tolist()},
    }


def composition_agreement(
    weights: np.ndarray,
    reference: np.ndarray,
    weight_types: Sequence[str],
    reference_types: Sequence[str],
    mapping: Optional[Mapping[str, str]] = None,
) -> Dict[str, object]:
    """Per cell type, Pearson across observations between weight and reference proportion.

    Types are matched by name after ``mapping`` (predicted name -> reference name; the
    reference's columns of one mapped type are summed). Types constant on either side
    are reported as NaN and left out of the mean.

    Returns
    -------
    dict
        ``per_type`` {type: r}, ``mean`` over matched types, ``n_types``, and
        ``per_observation_mean`` (Pearson across types per observation — shown only as a
        contrast: a constant average composition already scores high on it).
    """
    weights = np.asarray(weights, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    if weights.shape[0] != reference.shape[0]:
        raise ValueError(f"{weights.shape[0]} weight rows vs {reference.shape[0]} reference rows")
    mapping = dict(mapping or {})
    ref_index = {name: i for i, name in enumerate(reference_types)}
    per_type: Dict[str, float] = {}
    pairs_w, pairs_r = [], []
    for k, name in enumerate(weight_types):
        target = mapping.get(name, name)
        cols = [ref_index[t] for t in ([target] if isinstance(target, str) else target) if t in ref_index]
        if not cols:
            continue
        ref_col = reference[:, cols].sum(axis=1)
        r = _pearson_columns(weights[:, [k]], ref_col[:, None])[0]
        per_type[name] = float(r)
        pairs_w.append(weights[:, k])
        pairs_r.append(ref_col)
    if not per_type:
        raise ValueError(
            "no cell type names in common between weights "
            f"({', '.join(weight_types)}) and reference ({', '.join(reference_types)}); pass a mapping"
        )
    vals = np.array([v for v in per_type.values() if np.isfinite(v)])
    w = np.stack(pairs_w, axis=1)
    rr = np.stack(pairs_r, axis=1)
    per_obs = _pearson_columns(w.T, rr.T)
    return {
        "per_type": per_type,
        "mean": float(vals.mean()) if vals.size else float("nan"),
        "n_types": int(len(per_type)),
        "per_observation_mean": float(np.nanmean(per_obs)) if np.isfinite(per_obs).any() else float("nan"),
    }

"""Metrics and evaluation protocols."""
from .metrics import (
    benjamini_hochberg,
    composition_agreement,
    expression_metrics,
    per_gene_correlations,
    to_log1p_cp10k,
)

__all__ = [
    "benjamini_hochberg",
    "composition_agreement",
    "expression_metrics",
    "per_gene_correlations",
    "to_log1p_cp10k",
]

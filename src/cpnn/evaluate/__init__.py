"""Metrics and evaluation protocols."""
from .metrics import (
    benjamini_hochberg,
    composition_agreement,
    expression_metrics,
    per_gene_correlations,
    to_log1p_cp10k,
)
from . import slide_methods  # noqa: F401  (registers the slide-level method kinds)

__all__ = [
    "benjamini_hochberg",
    "composition_agreement",
    "expression_metrics",
    "per_gene_correlations",
    "to_log1p_cp10k",
]

"""The metrics under their former name: they live in :mod:`cpnn.metrics` (numerics layer)."""
from ..metrics import (  # noqa: F401
    benjamini_hochberg,
    composition_agreement,
    expression_metrics,
    per_gene_correlations,
    to_log1p_cp10k,
)

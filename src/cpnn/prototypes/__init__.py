"""Single-cell reference -> cell-type prototypes; deconvolution against prototypes."""
from cpnn.data.genes import GENE_ALIASES, harmonise_gene_symbols, match_genes
from cpnn.prototypes.build import build_prototypes, naive_prototypes
from cpnn.prototypes.container import Prototypes
from cpnn.prototypes.deconvolve import Deconvolution, deconvolve
from cpnn.prototypes.reference import read_reference, reference_qc

__all__ = [
    "GENE_ALIASES",
    "Deconvolution",
    "deconvolve",
    "Prototypes",
    "build_prototypes",
    "harmonise_gene_symbols",
    "match_genes",
    "naive_prototypes",
    "read_reference",
    "reference_qc",
]

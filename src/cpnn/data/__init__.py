"""Readers (spatial and bulk) -> AnnData, the synthetic cohort, grouped splits.

Spatial readers return AnnData with raw counts in ``X`` (CSR float32), unique gene
symbols, ``obsm["spatial"]`` = (x, y) full-resolution pixels, ``obs["section"]``,
``obs["patient"]`` and ``uns["cpnn_input"]`` (image path, microns per pixel, spot
diameter, sample and patient ids, platform, and how each was obtained).

Everything is loaded lazily on first attribute access, so ``import cpnn.data`` is cheap
and never fails because one submodule is missing.
"""
from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    # spatial readers
    "read_her2st": "her2st",
    "read_her2st_proportions": "her2st",
    "read_her2st_clusters": "her2st",
    "read_visium": "visium",
    "read_10x_h5": "visium",
    "read_hest": "hest",
    "read_hest_metadata": "hest",
    "read_spatial_h5ad": "spatial_h5ad",
    # bulk
    "read_gdc_star_counts": "bulk",
    "read_gdc_star_folder": "bulk",
    "read_gdc_sample_sheet": "bulk",
    "read_bulk_table": "bulk",
    "parse_tcga_barcode": "bulk",
    "TCGABarcode": "bulk",
    "patient_id": "bulk",
    "sample_id": "bulk",
    "match_slides_to_samples": "bulk",
    # splits
    "grouped_folds": "splits",
    "leave_one_group_out": "splits",
    "patient_transfer": "splits",
    "check_no_leakage": "splits",
    "save_splits": "splits",
    "load_splits": "splits",
    # written by other modules of the package
    "make_synthetic_cohort": "synthetic",
    "load_synthetic_cohort": "synthetic",
    "harmonise_gene_symbols": "genes",
    "match_genes": "genes",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'cpnn.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))

"""cpnn: gene expression from H&E images through single-cell cell-type prototypes.

``import cpnn`` is kept cheap: heavy modules (torch, anndata, openslide) load only when
the attribute that needs them is first used.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> "module:attribute"; resolved lazily by __getattr__
_LAZY = {
    "CPNNInputError": "cpnn.errors:CPNNInputError",
    "build_prototypes": "cpnn.prototypes:build_prototypes",
    "Prototypes": "cpnn.prototypes:Prototypes",
    "deconvolve": "cpnn.prototypes:deconvolve",
    "CPNN": "cpnn.model:CPNN",
    "CPNNConfig": "cpnn.config:CPNNConfig",
    "TrainConfig": "cpnn.config:TrainConfig",
    "read_reference": "cpnn.prototypes:read_reference",
    "fit_spatial": "cpnn.api:fit_spatial",
    "predict_spatial": "cpnn.api:predict_spatial",
    "spatial_features": "cpnn.api:spatial_features",
    "plot_prediction": "cpnn.plot.maps:plot_prediction",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'cpnn' has no attribute {name!r}")
    module_name, attr = target.split(":")
    value = getattr(importlib.import_module(module_name), attr)
    globals()[name] = value
    return value

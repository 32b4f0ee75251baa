"""Spots and tiles as QuPath detections (GeoJSON), cell-type weights as measurements.

QuPath (0.3 and later) imports a GeoJSON FeatureCollection by drag and drop or
*File > Import objects*: each Feature with ``properties.objectType = "detection"`` becomes
a detection whose ``measurements`` show in its measurement table and can colour the
objects. Coordinates are the full-resolution (level-0) pixels of the image the prediction
was made on — the image to open in QuPath. Spots are polygons approximating circles of
the spot's diameter; tiles are squares.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Union

import numpy as np

CIRCLE_VERTICES = 32


def observation_polygons(xy: np.ndarray, size: float, shape: str, n_vertices: int = CIRCLE_VERTICES) -> np.ndarray:
    """Closed outlines of every observation, ``(N, V + 1, 2)`` (the first vertex repeated).

    Parameters
    ----------
    xy
        ``(N, 2)`` centres (x, y) in pixels.
    size
        Spot diameter or tile side, in the same pixels.
    shape
        ``"circle"`` (a regular ``n_vertices``-gon inscribed in the circle) or ``"square"``.
    """
    xy = np.asarray(xy, dtype=np.float64)
    if shape == "circle":
        angles = np.linspace(0.0, 2.0 * np.pi, n_vertices, endpoint=False)
        ring = 0.5 * size * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    elif shape == "square":
        h = 0.5 * size
        ring = np.array([[-h, -h], [h, -h], [h, h], [-h, h]])
    else:
        raise ValueError(f"shape must be 'circle' or 'square', got {shape!r}")
    ring = np.vstack([ring, ring[:1]])
    return xy[:, None, :] + ring[None, :, :]


def prediction_geojson(pred, genes: Optional[Sequence[str]] = None, include_genes: bool = True) -> Dict[str, Any]:
    """The GeoJSON FeatureCollection of a prediction's spots or tiles.

    Parameters
    ----------
    pred
        Prediction AnnData or ``.h5ad`` path.
    genes
        Predicted genes to add as measurements (``"{gene} (log1p CP10k)"``); default all
        of them when ``include_genes``.
    include_genes
        False: the cell-type weights only.

    Returns
    -------
    dict
        ``{"type": "FeatureCollection", "features": [...]}``; each feature a Polygon with
        ``properties`` ``objectType: "detection"``, ``name`` (the observation id),
        ``classification`` (the dominant type and its colour) and ``measurements``
        (``"{type} weight"`` for every cell type, then genes).
    """
    from ..plot.maps import _gene_index, _load, palette, read_prediction

    adata, where = _load(pred, "prediction")
    view = read_prediction(adata, where)
    shape = "square" if view.level == "tile" else "circle"
    polys = observation_polygons(view.xy, view.size_px, shape)
    names = [f"{t} weight" for t in view.cell_types]
    values = [view.weights]
    if include_genes:
        idx = _gene_index(adata, genes) if genes is not None else list(range(adata.n_vars))
        x = adata.X[:, idx]
        values.append(np.asarray(x.toarray() if hasattr(x, "toarray") else x, dtype=np.float64))
        names += [f"{adata.var_names[i]} (log1p CP10k)" for i in idx]
    table = np.concatenate(values, axis=1)
    colours = [[int(round(255 * c)) for c in col[:3]] for col in palette(len(view.cell_types))]
    dom = view.weights.argmax(axis=1)
    features = []
    for i, obs in enumerate(map(str, adata.obs_names)):
        features.append({
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [np.round(polys[i], 3).tolist()]},
            "properties": {
                "objectType": "detection",
                "name": obs,
                "classification": {"name": view.cell_types[dom[i]], "color": colours[dom[i]]},
                "measurements": {k: float(v) for k, v in zip(names, table[i])},
            },
        })
    return {"type": "FeatureCollection", "features": features}


def write_geojson(pred, path: Union[str, os.PathLike], genes: Optional[Sequence[str]] = None,
                  include_genes: bool = True) -> Path:
    """Write :func:`prediction_geojson` to ``path`` (atomically); returns the path."""
    from ..utils import atomic_path

    collection = prediction_geojson(pred, genes=genes, include_genes=include_genes)
    path = Path(path)
    with atomic_path(path, suffix=".geojson") as tmp:
        with open(tmp, "w") as fh:
            json.dump(collection, fh, allow_nan=False)
    return path

"""The overlay data of the viewer: where every spot/tile is and each layer's values.

Everything is in the pixels of the image the viewer shows (the full-resolution image,
or the stored hires image times its scale factor). Values travel as base64 float32 so a
50,000-tile slide stays a few MB; the page turns them into colours itself, which lets a
user switch between per-type and shared colour scales without new data.
"""
from __future__ import annotations

import base64
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from ..plot.maps import (PredictionView, _gene_index, _measured_log1p, _pearson, _Raster, palette,
                         shared_weight_vmax, top_spread_genes, weight_vmax)

COLORMAPS = ("magma", "viridis")
MAX_IDS = 20000  # observation names are embedded (for the cursor read-out) up to this many


def b64_array(values: np.ndarray, dtype=np.float32) -> str:
    """``values`` as little-endian ``dtype`` bytes, base64 (what the page decodes)."""
    return base64.b64encode(np.ascontiguousarray(values, dtype=np.dtype(dtype).newbyteorder("<")).tobytes()).decode()


def colormap_table(name: str) -> List[int]:
    """256 RGB entries of a matplotlib colormap, flattened (r0, g0, b0, r1, ...)."""
    from matplotlib import colormaps

    rgb = colormaps[name](np.linspace(0.0, 1.0, 256))[:, :3]
    return [int(v) for v in np.round(rgb * 255).astype(np.int64).ravel()]


def _hex(colour) -> str:
    return "#" + "".join(f"{int(round(c * 255)):02x}" for c in colour[:3])


def overlay_data(adata, view: PredictionView, scale: float, genes: Optional[Sequence[str]] = None,
                 n_genes: int = 4) -> Dict[str, Any]:
    """Geometry and layers of a prediction for the viewer page.

    Parameters
    ----------
    adata
        The prediction AnnData.
    view
        Its :func:`cpnn.plot.maps.read_prediction` view.
    scale
        Image pixels per full-resolution pixel of ``obsm['spatial']``.
    genes
        Genes to show (default: the ``n_genes`` with the largest predicted spread). With
        measured counts (``layers['counts']``) each gene also gets a measured layer on the
        same colour scale as its prediction, and the Pearson r between them.

    Returns
    -------
    dict
        JSON-ready: ``x``, ``y`` (base64 float32 centres, image px), ``size`` (spot
        diameter / tile side, image px), ``shape`` (``circle``/``square``), ``raster``
        (grid cells of tiles, or None), ``layers`` (id, group, label, kind, values,
        colour scale, legend note), ``colormaps``.
    """
    xy = view.xy * scale
    size = view.size_px * scale
    data: Dict[str, Any] = {
        "title": view.title, "level": view.level, "n": int(len(xy)), "size": float(size),
        "shape": "square" if view.raster else "circle",
        "x": b64_array(xy[:, 0]), "y": b64_array(xy[:, 1]),
        "ids": [str(o) for o in adata.obs_names] if len(xy) <= MAX_IDS else None,
        "mpp": None if view.mpp is None else float(view.mpp) / scale,
        "raster": _raster(view, scale) if view.raster else None,
        "colormaps": {name: colormap_table(name) for name in COLORMAPS},
        "layers": [],
    }
    layers = data["layers"]
    w = view.weights
    dom = w.argmax(axis=1)
    counts = np.bincount(dom, minlength=len(view.cell_types))
    layers.append({
        "id": "dominant", "group": "Cell types", "label": "dominant cell type", "kind": "categorical",
        "values": b64_array(dom), "names": list(view.cell_types), "colors": [_hex(c) for c in palette(len(view.cell_types))],
        "counts": [int(c) for c in counts], "note": f"highest-weight type of each {view.level}",
    })
    shared = shared_weight_vmax(w)
    for k in np.argsort(-w.mean(axis=0), kind="stable"):
        name = view.cell_types[k]
        layers.append({
            "id": f"weight:{name}", "group": "Cell-type weights", "label": f"{name} (mean {w[:, k].mean():.2f})",
            "kind": "continuous", "values": b64_array(w[:, k]), "cmap": "magma", "unit": "weight",
            "vmin": 0.0, "vmax": weight_vmax(w[:, k]), "vmax_shared": shared, "shareable": True,
            "note": "colour scale 0 to this type's 99th percentile",
            "note_shared": "one colour scale for every type: 0 to the largest 99th percentile",
        })
    layers += _gene_layers(adata, genes if genes else top_spread_genes(adata, n_genes), view.level)
    return data


def _raster(view: PredictionView, scale: float) -> Dict[str, Any]:
    r = _Raster(view)
    h, w = r.shape
    return {"x0": float(r.x0 * scale), "y0": float(r.y0 * scale), "cell": float(r.size * scale),
            "width": int(w), "height": int(h), "col": b64_array(r.cols, np.int32), "row": b64_array(r.rows, np.int32)}


def _gene_layers(adata, genes: Sequence[str], level: str) -> List[Dict[str, Any]]:
    idx = _gene_index(adata, list(genes))
    x = adata.X[:, idx]
    pred = np.asarray(x.toarray() if hasattr(x, "toarray") else x, dtype=np.float64)
    measured = _measured_log1p(adata, idx)
    out = []
    for j, g in enumerate(genes):
        both = pred[:, j] if measured is None else np.concatenate([pred[:, j], measured[:, j]])
        lo, hi = (float(q) for q in np.quantile(both, [0.01, 0.99]))
        hi = max(hi, lo + 1e-6)
        r = None if measured is None else _pearson(pred[:, j], measured[:, j])
        label = f"{g} predicted" + ("" if r is None else f" (r = {r:.2f} with measured)")
        scale_note = "colour scale 1st to 99th percentile" + ("" if measured is None else
                                                              " of predicted and measured together")
        common = {"group": "Genes", "kind": "continuous", "cmap": "viridis", "unit": "log1p CP10k",
                  "vmin": lo, "vmax": hi, "note": scale_note}
        out.append({"id": f"gene:{g}", "label": label, "values": b64_array(pred[:, j]), **common})
        if measured is not None:
            out.append({"id": f"measured:{g}", "label": f"{g} measured (r = {r:.2f} with predicted)",
                        "values": b64_array(measured[:, j]), **common})
    return out

"""Figures of a prediction AnnData: cell-type weight maps, dominant type, genes, drivers.

A prediction AnnData is what ``cpnn predict`` writes (spots) or a whole-slide tile
prediction: ``X`` log1p CP10k, ``obsm['spatial']`` (x, y) full-resolution pixels,
``obsm['cpnn_weights']``, ``varm['cpnn_prototypes']`` (genes x types),
``uns['cpnn']['cell_types']`` and, for the background, scanpy's
``uns['spatial'][library_id]`` (``images['hires']`` + ``scalefactors``).

Spots are drawn as true-size circles; tiles (``uns['cpnn']['level']`` ``'tile'`` or
``'slide'``, as :func:`cpnn.workflows.wsi.predict_slide` writes) and very
large spot sets are rasterised onto a grid, so a 50,000-tile slide renders in seconds.
Spots predicted as bags of sub-patches (``obsm['cpnn_subpatch_weights']``) also get a map
of every sub-patch, drawn as squares where it lies inside its spot.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import pandas as pd

from .._constants import COUNTS, PROTOTYPES, SPATIAL, SUBPATCH_WEIGHTS, UNS, WEIGHTS
from ..errors import CPNNInputError
from .spatial import add_scale_bar, use_agg

RASTER_MIN_OBS = 20000  # above this many observations, draw a raster instead of circles
MAX_RASTER_SIDE = 4000  # cells per side of a raster grid (coarsened beyond)


@dataclass
class PredictionView:
    """What a figure needs from a prediction AnnData, validated once.

    Attributes
    ----------
    xy
        ``(N, 2)`` centres, full-resolution pixels (x, y).
    weights
        ``(N, K)`` cell-type weights.
    cell_types
        K names.
    image, image_scale
        Background image (or None) and display pixels per full-resolution pixel.
    size_px
        Spot diameter / tile side in full-resolution pixels.
    mpp
        Microns per full-resolution pixel, or None.
    level
        ``"spot"`` or ``"tile"``.
    raster
        Draw as a raster grid (tiles, or very many spots) instead of circles.
    title
        Library / sample id.
    """

    xy: np.ndarray
    weights: np.ndarray
    cell_types: List[str]
    image: Optional[np.ndarray]
    image_scale: float
    size_px: float
    mpp: Optional[float]
    level: str
    raster: bool
    title: str


def _load(pred, where: str):
    if isinstance(pred, (str, os.PathLike)):
        import anndata as ad

        path = Path(pred)
        if not path.is_file():
            raise CPNNInputError("prediction file not found", path=path, fix="pass a .h5ad written by `cpnn predict`")
        return ad.read_h5ad(path), str(path)
    return pred, where


def read_prediction(pred, where: str = "prediction") -> PredictionView:
    """Validate a prediction AnnData (or ``.h5ad`` path) and collect what plots need.

    Parameters
    ----------
    pred
        AnnData or path to a ``.h5ad`` written by ``cpnn predict``.
    where
        Name used in error messages when ``pred`` is an in-memory AnnData.

    Returns
    -------
    PredictionView
    """
    adata, where = _load(pred, where)
    path = where if isinstance(pred, (str, os.PathLike)) else None
    for key, store in ((SPATIAL, adata.obsm), (WEIGHTS, adata.obsm)):
        if key not in store:
            raise CPNNInputError(f"missing obsm['{key}']", path=path, field=f"obsm['{key}']",
                                 fix="plot a file written by `cpnn predict` (or CPNN predictions as AnnData)")
    info = dict(adata.uns.get(UNS, {}))
    xy = np.asarray(adata.obsm[SPATIAL], dtype=np.float64)
    weights = np.asarray(adata.obsm[WEIGHTS], dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] != 2:
        raise CPNNInputError(f"obsm['{SPATIAL}'] has shape {xy.shape}, expected (n_obs, 2) x, y pixels",
                             path=path, field=f"obsm['{SPATIAL}']")
    types = info.get("cell_types")
    types = [str(t) for t in (types if types is not None else [f"type {k}" for k in range(weights.shape[1])])]
    if len(types) != weights.shape[1]:
        raise CPNNInputError(f"{len(types)} cell-type names for {weights.shape[1]} weight columns", path=path,
                             field=f"uns['{UNS}']['cell_types']", fix="store one name per column of cpnn_weights")
    level = str(info.get("level", "spot"))
    # whole-slide predictions ("tile", or "slide" as predict_slide writes) are tiles on a grid
    level = "tile" if level in ("tile", "slide") else level
    lib, entry = _library(adata)
    sf = dict(entry.get("scalefactors", {})) if entry else {}
    images = dict(entry.get("images", {})) if entry else {}
    image, scale = None, 1.0
    for name, key in (("hires", "tissue_hires_scalef"), ("lowres", "tissue_lowres_scalef")):
        if name in images and key in sf:
            image, scale = np.asarray(images[name]), float(sf[key])
            break
    mpp = sf.get("microns_per_pixel", info.get("mpp"))
    mpp = float(mpp) if mpp else None
    size = sf.get("spot_diameter_fullres") or info.get("tile_size_fullres")
    size = float(size) if size else _pitch(xy)
    raster = level == "tile" or len(xy) >= RASTER_MIN_OBS
    title = str(info.get("sample_id") or lib or "")
    return PredictionView(xy, weights, types, image, scale, size, mpp, level, raster, title)


def subpatch_view(pred, view: PredictionView) -> Optional[PredictionView]:
    """The sub-patches of a spot prediction as their own observations (squares at their
    place in the spot), or None when the prediction has no sub-patch weights or layout."""
    if SUBPATCH_WEIGHTS not in pred.obsm:
        return None
    layout = dict(dict(pred.uns.get(UNS, {})).get("subpatches", {}))
    if "offsets_fullres" not in layout or "side_fullres" not in layout:
        return None
    sub = np.asarray(pred.obsm[SUBPATCH_WEIGHTS], dtype=np.float64)
    offsets = np.asarray(layout["offsets_fullres"], dtype=np.float64)
    if sub.ndim != 3 or sub.shape[1] != len(offsets) or sub.shape[2] != len(view.cell_types):
        raise CPNNInputError(f"obsm['{SUBPATCH_WEIGHTS}'] has shape {sub.shape}, expected (n_obs, "
                             f"{len(offsets)}, {len(view.cell_types)})", field=f"obsm['{SUBPATCH_WEIGHTS}']")
    xy = (view.xy[:, None, :] + offsets[None]).reshape(-1, 2)
    return PredictionView(xy, sub.reshape(-1, sub.shape[2]), view.cell_types, view.image, view.image_scale,
                          float(layout["side_fullres"]), view.mpp, "sub-patch", True, view.title)


def _library(adata):
    spatial = adata.uns.get("spatial") or {}
    if not spatial:
        return None, None
    lib = str(adata.uns.get(UNS, {}).get("sample_id", ""))
    if lib not in spatial:
        lib = next(iter(spatial))
    return lib, spatial[lib]


def _pitch(xy: np.ndarray) -> float:
    """Median nearest-neighbour distance (a spot size when the file does not give one)."""
    if len(xy) < 2:
        return 1.0
    from scipy.spatial import cKDTree

    d, _ = cKDTree(xy).query(xy, k=2)
    d = d[:, 1][d[:, 1] > 0]
    return float(np.median(d)) if len(d) else 1.0


# --------------------------------------------------------------------------- numbers
def driver_shares(pred, genes: Optional[Sequence[str]] = None) -> pd.DataFrame:
    """Each cell type's share of the predicted expression of ``genes``.

    ``share_kg = mean_i(p_ik) T_kg / sum_k' mean_i(p_ik') T_k'g`` with ``p`` the weights in
    ``obsm['cpnn_weights']`` and ``T`` the prototypes in ``varm['cpnn_prototypes']``
    (genes x types): the decomposition of the mean of ``p_i @ T`` over observations. With
    a residual head the shares are those of the mixture part (``layers['cpnn_mixture']``);
    the cell-state term belongs to no type.

    Parameters
    ----------
    pred
        Prediction AnnData or ``.h5ad`` path.
    genes
        Genes to report (default: all, in ``var`` order).

    Returns
    -------
    pandas.DataFrame
        Genes x cell types; rows sum to 1.
    """
    adata, where = _load(pred, "prediction")
    if PROTOTYPES not in adata.varm:
        raise CPNNInputError(f"missing varm['{PROTOTYPES}'] (genes x cell types)", field=f"varm['{PROTOTYPES}']",
                             path=where if where != "prediction" else None,
                             fix="plot a file written by `cpnn predict`, which stores the model's prototypes")
    view = read_prediction(adata)
    idx = _gene_index(adata, genes)
    t = np.asarray(adata.varm[PROTOTYPES], dtype=np.float64)[idx]  # (g, K)
    contrib = t * view.weights.mean(axis=0)[None, :]
    total = contrib.sum(axis=1, keepdims=True)
    total[total == 0] = 1.0
    names = [str(adata.var_names[i]) for i in idx]
    return pd.DataFrame(contrib / total, index=pd.Index(names, name="gene"), columns=view.cell_types)


def _gene_index(adata, genes: Optional[Sequence[str]]) -> List[int]:
    names = [str(g) for g in adata.var_names]
    if genes is None:
        return list(range(len(names)))
    pos = {g: i for i, g in enumerate(names)}
    missing = [g for g in genes if g not in pos]
    if missing:
        upper = {g.upper(): g for g in names}
        hints = [upper[m.upper()] for m in missing if m.upper() in upper]
        raise CPNNInputError(f"{len(missing)} requested genes are not predicted: {', '.join(missing[:5])}",
                             field="genes", fix=("did you mean " + ", ".join(hints[:5]) + "?") if hints
                             else "choose genes of the model's panel (var_names of the prediction)")
    return [pos[g] for g in genes]


def top_spread_genes(adata, n: int = 4) -> List[str]:
    """The ``n`` genes whose predicted values vary most across observations (std of ``X``)."""
    from scipy import sparse

    x = adata.X
    if sparse.issparse(x):
        mean = np.asarray(x.mean(axis=0)).ravel()
        sq = np.asarray(x.multiply(x).mean(axis=0)).ravel()
        sd = np.sqrt(np.clip(sq - mean ** 2, 0, None))
    else:
        sd = np.asarray(x, dtype=np.float64).std(axis=0)
    order = np.argsort(-sd, kind="stable")[:n]
    return [str(adata.var_names[i]) for i in order]


def _measured_log1p(adata, idx: Sequence[int]) -> Optional[np.ndarray]:
    """Measured ``layers['counts']`` as log1p CP10k over the predicted genes (same scale as X)."""
    if COUNTS not in adata.layers:
        return None
    from .._numerics import log1p_cp10k

    return log1p_cp10k(adata.layers[COUNTS])[:, list(idx)]


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    from .._numerics import pearson

    return pearson(a, b)


# --------------------------------------------------------------------------- drawing
def palette(n: int) -> List[tuple]:
    """``n`` distinguishable categorical colours (tab10, then tab20 + tab20b + tab20c)."""
    from matplotlib import colormaps

    if n <= 10:
        return [colormaps["tab10"](i) for i in range(n)]
    cols = [colormaps[m](i) for m in ("tab20", "tab20b", "tab20c") for i in range(20)]
    if n <= len(cols):
        return cols[:n]
    return [colormaps["hsv"](i / n) for i in range(n)]


class _Raster:
    """Observations binned onto a square grid (cell = one tile), for fast drawing."""

    def __init__(self, view: PredictionView):
        size = view.size_px
        span = np.ptp(view.xy, axis=0) + size
        size = max(size, float(span.max()) / MAX_RASTER_SIDE)
        self.x0, self.y0 = view.xy.min(axis=0) - size / 2
        self.cols = np.floor((view.xy[:, 0] - self.x0) / size).astype(np.int64)
        self.rows = np.floor((view.xy[:, 1] - self.y0) / size).astype(np.int64)
        self.shape = (int(self.rows.max()) + 1, int(self.cols.max()) + 1)
        self.size = size

    def grid(self, values: np.ndarray) -> np.ndarray:
        out = np.full(self.shape, np.nan)
        out[self.rows, self.cols] = values
        return out

    def extent(self, scale: float):
        h, w = self.shape
        return [self.x0 * scale, (self.x0 + w * self.size) * scale, (self.y0 + h * self.size) * scale,
                self.y0 * scale]


def _draw(ax, view: PredictionView, values: np.ndarray, *, cmap, vmin, vmax, raster: Optional[_Raster]):
    """One value per observation over the tissue image; returns the mappable."""
    from matplotlib.collections import EllipseCollection

    s = view.image_scale
    if view.image is not None:
        ax.imshow(view.image, alpha=0.6 if view.level == "spot" else 0.45, interpolation="antialiased")
    if raster is not None:
        m = ax.imshow(raster.grid(values), cmap=cmap, vmin=vmin, vmax=vmax, extent=raster.extent(s),
                      interpolation="nearest", alpha=0.9)
    else:
        d = np.full(len(values), view.size_px * s)
        m = EllipseCollection(d, d, np.zeros_like(d), units="xy", offsets=view.xy * s,
                              offset_transform=ax.transData, cmap=cmap, linewidths=0)
        m.set_array(np.asarray(values, dtype=float))
        m.set_clim(vmin, vmax)
        ax.add_collection(m)
    _frame(ax, view)
    return m


def _frame(ax, view) -> None:
    """Crop the axes to the observations (plus one spot/tile), image orientation, no ticks."""
    s = view.image_scale
    pad = view.size_px * s
    lo, hi = view.xy.min(axis=0) * s - pad, view.xy.max(axis=0) * s + pad
    ax.set_xlim(lo[0], hi[0])
    ax.set_ylim(hi[1], lo[1])
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])


def _scale_bar(ax, view: PredictionView) -> None:
    if view.mpp is None:
        return
    x0, x1 = ax.get_xlim()
    width_um = abs(x1 - x0) / view.image_scale * view.mpp
    target = width_um / 5
    exp = 10 ** math.floor(math.log10(target))
    um = max(m * exp for m in (1, 2, 5) if m * exp <= target)
    add_scale_bar(ax, um, view.mpp, view.image_scale)


def _colorbar(fig, ax, mappable, label: str) -> None:
    cb = fig.colorbar(mappable, ax=ax, fraction=0.046, pad=0.02)
    cb.ax.tick_params(labelsize=7)
    if label:
        cb.set_label(label, fontsize=7)


def _grid_figure(n: int, view: PredictionView, panel_in: float = 3.0, ncols: Optional[int] = None):
    import matplotlib.pyplot as plt

    span = np.ptp(view.xy, axis=0) + 2 * view.size_px
    aspect = float(span[1] / span[0]) if span[0] > 0 else 1.0
    aspect = min(max(aspect, 0.4), 2.5)
    ncols = ncols or min(n, 4 if n > 6 else 3 if n > 4 else n)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(panel_in * 1.2 * ncols, panel_in * aspect * nrows + 0.6),
                             squeeze=False)
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    return fig, axes


def _save(fig, path: Path, dpi: int) -> Path:
    import matplotlib.pyplot as plt

    from ..utils import atomic_path

    with atomic_path(path, suffix=".png") as tmp:
        # "tight" grows the canvas to every artist, so legends placed beside an axes are never cut
        fig.savefig(tmp, dpi=dpi, format="png", bbox_inches="tight", pad_inches=0.1)
    plt.close(fig)
    return path


def weight_vmax(w: np.ndarray) -> float:
    """Top of one type's colour scale: the 99th percentile of its weights (at least 1e-3)."""
    return max(float(np.quantile(w, 0.99)) if len(w) else 1.0, 1e-3)


def shared_weight_vmax(weights: np.ndarray) -> float:
    """Top of a colour scale shared by every type: the largest per-type 99th percentile,
    so a type at 0.09 looks dim next to one at 0.7."""
    return max(weight_vmax(weights[:, k]) for k in range(weights.shape[1]))


def plot_weights(view: PredictionView, path: Path, max_types: Optional[int] = None, dpi: int = 110,
                 shared_scale: bool = False) -> Path:
    """``celltype_weights.png``: one panel per type (the ``max_types`` most abundant when given).

    Each type's map is scaled 0 to its own 99th percentile (patterns of rare types stay
    visible), or with ``shared_scale`` all on one scale, 0 to the largest of those (levels
    compare across panels)."""
    use_agg()
    order = np.argsort(-view.weights.mean(axis=0), kind="stable")
    if max_types is not None:
        order = order[:max_types]
    raster = _Raster(view) if view.raster else None
    fig, axes = _grid_figure(len(order), view)
    shared = shared_weight_vmax(view.weights) if shared_scale else None
    for ax, k in zip(axes.ravel(), order):
        w = view.weights[:, k]
        m = _draw(ax, view, w, cmap="magma", vmin=0.0, vmax=shared or weight_vmax(w), raster=raster)
        ax.set_title(f"{view.cell_types[k]} (mean {w.mean():.2f})", fontsize=9)
        _colorbar(fig, ax, m, "weight")
    _scale_bar(axes.ravel()[0], view)
    plural = {"sub-patch": "sub-patches of each spot"}.get(view.level, f"{view.level}s")
    scale = (f"one colour scale for all types, 0 to {shared:.2f}" if shared_scale
             else "colour scale 0 to the 99th percentile of each type")
    fig.suptitle(f"{view.title} — CPNN cell-type weights ({plural}; {scale})", fontsize=10)
    fig.tight_layout()
    return _save(fig, path, dpi)


def plot_dominant(view: PredictionView, path: Path, dpi: int = 110) -> Path:
    """``dominant_type.png``: the highest-weight type of every observation, with a legend."""
    use_agg()
    import matplotlib.pyplot as plt
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.patches import Patch

    k = len(view.cell_types)
    colours = palette(k)
    dom = view.weights.argmax(axis=1)
    counts = np.bincount(dom, minlength=k)
    raster = _Raster(view) if view.raster else None
    fig, axes = _grid_figure(1, view, panel_in=5.0)
    ax = axes[0, 0]
    cmap = ListedColormap(colours).with_extremes(bad=(0, 0, 0, 0))
    if raster is not None:
        # categorical raster: the colour index per cell, exact colours via a boundary norm
        norm = BoundaryNorm(np.arange(k + 1) - 0.5, k)
        if view.image is not None:
            ax.imshow(view.image, alpha=0.45)
        ax.imshow(raster.grid(dom.astype(float)), cmap=cmap, norm=norm, extent=raster.extent(view.image_scale),
                  interpolation="nearest", alpha=0.9)
        _frame(ax, view)
    else:
        _draw(ax, view, dom.astype(float), cmap=cmap, vmin=-0.5, vmax=k - 0.5, raster=None)
    _scale_bar(ax, view)
    handles = [Patch(color=colours[i], label=f"{view.cell_types[i]} ({counts[i]})") for i in range(k) if counts[i]]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False,
              title=f"dominant type ({view.level}s)", title_fontsize=8)
    ax.set_title(f"{view.title} — dominant cell type", fontsize=10)
    fig.tight_layout()
    out = _save(fig, path, dpi)
    plt.close("all")
    return out


def plot_genes(adata, view: PredictionView, genes: Sequence[str], path: Path, dpi: int = 110) -> Path:
    """``genes.png``: predicted maps, next to the measured ones (with Pearson r) when counts exist."""
    use_agg()
    idx = _gene_index(adata, genes)
    pred = np.asarray(adata.X[:, idx].toarray() if hasattr(adata.X, "toarray") else adata.X[:, idx], dtype=float)
    measured = _measured_log1p(adata, idx)
    raster = _Raster(view) if view.raster else None
    ncols = 2 if measured is not None else min(len(idx), 3)
    n = 2 * len(idx) if measured is not None else len(idx)
    fig, axes = _grid_figure(n, view, ncols=ncols)
    flat = axes.ravel()
    for j, g in enumerate(genes):
        panels = [(pred[:, j], f"{g} predicted")]
        if measured is not None:
            r = _pearson(pred[:, j], measured[:, j])
            panels = [(pred[:, j], f"{g} predicted (r = {r:.2f})"), (measured[:, j], f"{g} measured (r = {r:.2f})")]
        # one colour scale per gene, over predicted and measured together: a weak prediction
        # must not look as contrasted as the measurement
        lo, hi = (float(q) for q in np.quantile(np.concatenate([v for v, _ in panels]), [0.01, 0.99]))
        for p, (v, title) in enumerate(panels):
            ax = flat[j * len(panels) + p]
            m = _draw(ax, view, v, cmap="viridis", vmin=lo, vmax=max(hi, lo + 1e-6), raster=raster)
            ax.set_title(title, fontsize=9)
            _colorbar(fig, ax, m, "log1p CP10k")
    _scale_bar(flat[0], view)
    if measured is not None:
        what = f"predicted vs measured\n(one colour scale per gene; r: Pearson across {view.level}s)"
    else:
        what = "predicted\n(no measured counts in this file: no correlation to show)"
    fig.suptitle(f"{view.title} — genes, {what}", fontsize=10)
    fig.tight_layout()
    return _save(fig, path, dpi)


def plot_drivers(shares: pd.DataFrame, path: Path, title: str = "", dpi: int = 110) -> Path:
    """``drivers.png``: one stacked bar per gene, each type's share of its predicted expression."""
    use_agg()
    import matplotlib.pyplot as plt

    types = list(shares.columns)
    colours = palette(len(types))
    fig, ax = plt.subplots(figsize=(8.0, 0.55 * len(shares) + 1.6))
    left = np.zeros(len(shares))
    y = np.arange(len(shares))
    for k, name in enumerate(types):
        v = shares[name].to_numpy()
        ax.barh(y, v, left=left, color=colours[k], label=name, edgecolor="white", linewidth=0.5)
        for i in np.nonzero(v >= 0.08)[0]:
            ax.text(left[i] + v[i] / 2, y[i], f"{100 * v[i]:.0f}%", ha="center", va="center", fontsize=7,
                    color="white" if sum(colours[k][:3]) < 1.8 else "black")
        left += v
    ax.set_yticks(y, list(shares.index), fontsize=9)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of the predicted expression (mean weight × prototype, normalised per gene)", fontsize=8)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False, title="cell type",
              title_fontsize=8)
    ax.set_title(f"{title} — which cell types drive each gene's prediction".strip(" —"), fontsize=10)
    fig.tight_layout()
    return _save(fig, path, dpi)


def plot_prediction(
    pred,
    out_dir: Union[str, os.PathLike],
    genes: Optional[Sequence[str]] = None,
    max_types: Optional[int] = None,
    n_genes: int = 4,
    dpi: int = 110,
    shared_scale: bool = False,
) -> Dict[str, Path]:
    """Write the standard figures of a prediction.

    Parameters
    ----------
    pred
        Prediction AnnData (from ``cpnn predict``, :func:`cpnn.api.predict_spatial` or a
        whole-slide prediction) or the path of its ``.h5ad``.
    out_dir
        Folder for the PNGs (created).
    genes
        Genes for ``genes.png`` and ``drivers.png``; default: the ``n_genes`` genes with the
        largest predicted spread across observations.
    max_types
        Draw only the most abundant types in ``celltype_weights.png``.
    n_genes
        How many genes to pick when ``genes`` is None.
    dpi
        Resolution of the PNGs.
    shared_scale
        Draw every cell type's weight map on one colour scale (0 to the largest per-type
        99th percentile) instead of each on its own.

    Returns
    -------
    dict
        ``{"celltype_weights", "dominant_type", "genes", "drivers", "drivers_table"}`` -> path,
        and ``"celltype_weights_subpatches"`` for spots predicted as bags of sub-patches.
        ``drivers.tsv`` holds the shares plotted in ``drivers.png``; both are skipped (with a
        warning) when the file has no ``varm['cpnn_prototypes']``.

    Examples
    --------
    >>> from cpnn.plot import plot_prediction
    >>> paths = plot_prediction("C6.h5ad", "figures/C6", genes=["ERBB2", "CD74"])
    >>> sorted(paths)
    ['celltype_weights', 'dominant_type', 'drivers', 'drivers_table', 'genes']
    """
    adata, where = _load(pred, "prediction")
    view = read_prediction(adata, where)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    genes = list(genes) if genes else top_spread_genes(adata, n_genes)
    _gene_index(adata, genes)  # fail early on unknown genes
    paths = {
        "celltype_weights": plot_weights(view, out / "celltype_weights.png", max_types=max_types, dpi=dpi,
                                         shared_scale=shared_scale),
        "dominant_type": plot_dominant(view, out / "dominant_type.png", dpi=dpi),
        "genes": plot_genes(adata, view, genes, out / "genes.png", dpi=dpi),
    }
    sub = subpatch_view(adata, view)
    if sub is not None:
        paths["celltype_weights_subpatches"] = plot_weights(sub, out / "celltype_weights_subpatches.png",
                                                            max_types=max_types, dpi=dpi, shared_scale=shared_scale)
    if PROTOTYPES not in adata.varm:
        import warnings

        warnings.warn(f"{where}: no varm['{PROTOTYPES}'], so drivers.png is skipped (the prototypes are "
                      "needed to split a gene's prediction by cell type)", stacklevel=2)
        return paths
    shares = driver_shares(adata, genes)
    from ..utils import atomic_path

    with atomic_path(out / "drivers.tsv", suffix=".tsv") as tmp:
        shares.to_csv(tmp, sep="\t", float_format="%.5f")
    paths["drivers_table"] = out / "drivers.tsv"
    paths["drivers"] = plot_drivers(shares, out / "drivers.png", title=view.title, dpi=dpi)
    return paths

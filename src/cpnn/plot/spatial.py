"""Spot-level maps drawn over the tissue image, spots as true-size circles."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np


def use_agg() -> None:
    """Select the non-interactive backend (figures are written to files)."""
    import matplotlib

    matplotlib.use("Agg", force=False)


def spot_map(ax, xy: np.ndarray, values: np.ndarray, diameter_px: float, *, image: Optional[np.ndarray] = None,
             image_scale: float = 1.0, cmap: str = "viridis", vmin=None, vmax=None, title: str = "",
             colorbar: bool = True, label: str = ""):
    """Draw one value per spot as a filled circle of the spot's real size.

    Parameters
    ----------
    ax
        Matplotlib axes.
    xy
        ``(N, 2)`` spot centres in full-resolution pixels (x, y).
    values
        ``(N,)`` numbers to colour by.
    diameter_px
        Spot diameter in full-resolution pixels.
    image
        Optional background image, downsampled by ``image_scale`` (display px per full-res px).
    """
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Circle

    xy = np.asarray(xy, dtype=float) * image_scale
    r = 0.5 * diameter_px * image_scale
    if image is not None:
        ax.imshow(image, alpha=0.55)
    circles = [Circle((x, y), r) for x, y in xy]
    coll = PatchCollection(circles, cmap=cmap, linewidths=0)
    coll.set_array(np.asarray(values, dtype=float))
    coll.set_clim(vmin if vmin is not None else np.nanmin(values), vmax if vmax is not None else np.nanmax(values))
    ax.add_collection(coll)
    if image is None:
        pad = 2 * r
        ax.set_xlim(xy[:, 0].min() - pad, xy[:, 0].max() + pad)
        ax.set_ylim(xy[:, 1].max() + pad, xy[:, 1].min() - pad)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=9)
    if colorbar:
        cb = ax.figure.colorbar(coll, ax=ax, fraction=0.046, pad=0.02)
        cb.ax.tick_params(labelsize=7)
        if label:
            cb.set_label(label, fontsize=7)
    return coll


def add_scale_bar(ax, um: float, mpp: float, image_scale: float = 1.0, color: str = "black") -> None:
    """A horizontal scale bar of ``um`` microns in the lower-left corner, on a white box
    so it stays legible over dark spots and tissue."""
    from matplotlib.font_manager import FontProperties
    from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar

    y0, y1 = ax.get_ylim()
    bar = AnchoredSizeBar(ax.transData, um / mpp * image_scale, f"{um:g} µm", "lower left", pad=0.25,
                          borderpad=0.4, sep=2, color=color, frameon=True, label_top=True,
                          size_vertical=0.012 * abs(y1 - y0), fontproperties=FontProperties(size=7))
    bar.patch.set_facecolor("white")
    bar.patch.set_alpha(0.85)
    bar.patch.set_edgecolor("none")
    ax.add_artist(bar)


def composition_panel(path, xy, true: Optional[np.ndarray], pred: np.ndarray, cell_types: Sequence[str],
                      diameter_px: float, image=None, image_scale: float = 1.0, mpp: Optional[float] = None,
                      title: str = "", true_label: str = "true", pred_label: str = "CPNN weight",
                      shared_scale: bool = True) -> None:
    """One column per cell type: reference (top, if given) and inferred (bottom) maps.

    ``shared_scale`` puts both rows of a type on one colour scale (right when both are
    fractions of the same thing); False scales each map to its own range, which shows
    whether the *pattern* agrees when the two differ in level (e.g. vs stereoscope)."""
    use_agg()
    import matplotlib.pyplot as plt

    rows = 2 if true is not None else 1
    k = len(cell_types)
    fig, axes = plt.subplots(rows, k, figsize=(2.6 * k, 2.5 * rows + 0.4), squeeze=False)
    for j, name in enumerate(cell_types):
        vmax = float(max(np.nanmax(pred[:, j]), np.nanmax(true[:, j]) if true is not None else 0))
        if true is not None:
            spot_map(axes[0, j], xy, true[:, j], diameter_px, image=image, image_scale=image_scale,
                     vmin=0, vmax=vmax if shared_scale else None, title=f"{name}\n{true_label}", cmap="magma",
                     label=f"{true_label} proportion")
        spot_map(axes[rows - 1, j], xy, pred[:, j], diameter_px, image=image, image_scale=image_scale,
                 vmin=0 if shared_scale else None, vmax=vmax if shared_scale else None,
                 title=f"{name}\n{pred_label}", cmap="magma", label=pred_label)
        if mpp is not None and j == 0:
            add_scale_bar(axes[rows - 1, 0], 100.0 if diameter_px * mpp < 500 else 1000.0, mpp, image_scale)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight", pad_inches=0.1)
    plt.close(fig)


def gene_panel(path, xy, values: Sequence[np.ndarray], titles: Sequence[str], diameter_px: float, image=None,
               image_scale: float = 1.0, label: str = "log1p CP10k", suptitle: str = "",
               mpp: Optional[float] = None) -> None:
    """Side-by-side maps of one gene (e.g. measured vs predicted) on one colour scale (1st
    to 99th percentile of all of them), each with a labelled colour bar."""
    use_agg()
    import matplotlib.pyplot as plt

    lo, hi = (float(q) for q in np.nanquantile(np.concatenate([np.ravel(v) for v in values]), [0.01, 0.99]))
    fig, axes = plt.subplots(1, len(values), figsize=(3.4 * len(values), 3.2), squeeze=False)
    for ax, v, t in zip(axes[0], values, titles):
        spot_map(ax, xy, v, diameter_px, image=image, image_scale=image_scale, title=t, label=label,
                 vmin=lo, vmax=max(hi, lo + 1e-6))
    if mpp is not None:
        add_scale_bar(axes[0, 0], 100.0 if diameter_px * mpp < 500 else 1000.0, mpp, image_scale)
    if suptitle:
        fig.suptitle(suptitle, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight", pad_inches=0.1)
    plt.close(fig)

"""Figures of a benchmark report: per-gene scatter, box plots per method, gene maps."""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np

from .spatial import spot_map, use_agg


def per_gene_scatter(path, a: np.ndarray, b: np.ndarray, name_a: str, name_b: str, title: str = "",
                     metric: str = "Pearson") -> None:
    """Per-gene correlation of method ``a`` (x) against method ``b`` (y), with the diagonal."""
    use_agg()
    import matplotlib.pyplot as plt

    a, b = np.asarray(a, float), np.asarray(b, float)
    ok = np.isfinite(a) & np.isfinite(b)
    fig, ax = plt.subplots(figsize=(4.6, 4.4))
    ax.scatter(a[ok], b[ok], s=7, alpha=0.5, color="#1f77b4", linewidths=0)
    lo = float(min(a[ok].min(initial=0), b[ok].min(initial=0), 0)) - 0.05
    hi = float(max(a[ok].max(initial=0), b[ok].max(initial=0))) + 0.05
    ax.plot([lo, hi], [lo, hi], color="0.3", lw=1, ls="--")
    ax.axhline(0, color="0.8", lw=0.8)
    ax.axvline(0, color="0.8", lw=0.8)
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel(f"{name_a}: per-gene {metric}")
    ax.set_ylabel(f"{name_b}: per-gene {metric}")
    above = int((b[ok] > a[ok]).sum())
    ax.text(0.03, 0.97, f"{above} of {int(ok.sum())} genes higher with {name_b}", transform=ax.transAxes,
            va="top", fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def method_boxplots(path, values: Dict[str, Dict[str, np.ndarray]], metric: str = "Pearson",
                    title: str = "") -> None:
    """Box plots of per-gene correlations, one panel per gene set, one box per method.

    ``values[gene_set][method]`` is an array of per-gene values (NaN ignored).
    """
    use_agg()
    import matplotlib.pyplot as plt

    sets = list(values)
    n_methods = max(len(v) for v in values.values())
    fig, axes = plt.subplots(1, len(sets), figsize=(max(3.2, 0.9 * n_methods + 1.6) * len(sets), 4.0),
                             squeeze=False)
    for ax, gs in zip(axes[0], sets):
        names = list(values[gs])
        data = [np.asarray(values[gs][m], float)[np.isfinite(values[gs][m])] for m in names]
        ax.boxplot(data, showfliers=False, widths=0.6)
        for i, d in enumerate(data, start=1):
            jitter = np.random.default_rng(i).uniform(-0.18, 0.18, len(d))
            ax.scatter(i + jitter, d, s=3, alpha=0.25, color="#444444", linewidths=0)
            if len(d):
                ax.text(i, np.max(d), f"mean {np.mean(d):.3f}", ha="center",
                        va="bottom", fontsize=7, color="#b22222")
        ax.set_xticks(range(1, len(names) + 1))
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
        ax.axhline(0, color="0.7", lw=0.8)
        ax.set_ylabel(f"per-gene {metric} (mean over folds)")
        ax.set_title(f"gene set: {gs}", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def gene_maps(path, xy: np.ndarray, measured: np.ndarray, predicted: np.ndarray, genes: Sequence[str],
              scores: Sequence[float], diameter_px: float, image: Optional[np.ndarray] = None,
              image_scale: float = 1.0, method: str = "", title: str = "") -> None:
    """Rows = genes; columns = measured and predicted log1p CP10k on one held-out section.

    Measured and predicted values live on different ranges (predictions are smoother), so
    each map has its own colour bar; the gene's Pearson on this section is in the title.
    """
    use_agg()
    import matplotlib.pyplot as plt

    n = len(genes)
    fig, axes = plt.subplots(n, 2, figsize=(6.6, 2.9 * n), squeeze=False)
    for i, g in enumerate(genes):
        spot_map(axes[i, 0], xy, measured[:, i], diameter_px, image=image, image_scale=image_scale,
                 title=f"{g} measured", label="log1p CP10k")
        spot_map(axes[i, 1], xy, predicted[:, i], diameter_px, image=image, image_scale=image_scale,
                 title=f"{g} predicted ({method}), r = {scores[i]:.2f}", label="log1p CP10k")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.25 / n))
    fig.savefig(path, dpi=100)
    plt.close(fig)

"""Figures that compare fairly: one colour scale for predicted and measured, an optional
shared scale for cell types, labelled colour bars, legends never cut, legible scale bars."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("anndata")

from test_plot_maps import make_prediction  # noqa: E402

import cpnn.plot.maps as maps  # noqa: E402


@pytest.fixture
def figures(monkeypatch):
    """Every figure ``cpnn.plot.maps`` saves, kept open for inspection, with its file."""
    import matplotlib.figure

    kept = []
    original = matplotlib.figure.Figure.savefig

    def savefig(self, fname, *args, **kwargs):
        original(self, fname, *args, **kwargs)
        kept.append(self)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    monkeypatch.setattr("matplotlib.pyplot.close", lambda *a, **k: None)
    yield kept
    import matplotlib.pyplot as plt

    for fig in kept:
        plt.close(fig)


def _clims(ax):
    """Colour limits of the value layers of an axes (not the RGB background image)."""
    return [tuple(round(float(v), 9) for v in m.get_clim()) for m in ax.collections + ax.images
            if m.get_array() is not None and np.ndim(m.get_array()) < 3 and m.get_cmap().name in ("viridis", "magma")]


def test_predicted_and_measured_share_one_scale_with_r_in_both_titles(tmp_path, figures):
    a = make_prediction()
    view = maps.read_prediction(a)
    maps.plot_genes(a, view, ["G01", "G02"], tmp_path / "genes.png", dpi=50)
    fig = figures[-1]
    axes = [ax for ax in fig.axes if ax.get_title()]
    measured = maps._measured_log1p(a, [1])[:, 0]
    predicted = np.asarray(a.X)[:, 1]
    r = np.corrcoef(predicted, measured)[0, 1]
    pred_ax = next(ax for ax in axes if ax.get_title().startswith("G01 predicted"))
    meas_ax = next(ax for ax in axes if ax.get_title().startswith("G01 measured"))
    assert f"r = {r:.2f}" in pred_ax.get_title() and f"r = {r:.2f}" in meas_ax.get_title()
    lo, hi = np.quantile(np.concatenate([predicted, measured]), [0.01, 0.99])
    assert _clims(pred_ax) == _clims(meas_ax) == [(round(float(lo), 9), round(float(hi), 9))]
    # colour bars say what the colours are
    labels = [ax.get_ylabel() for ax in fig.axes if not ax.get_title()]
    assert labels and all(lab == "log1p CP10k" for lab in labels)


def test_without_measured_counts_no_r_is_promised(tmp_path, figures):
    a = make_prediction(level="tile", counts=False)
    maps.plot_genes(a, maps.read_prediction(a), ["G01"], tmp_path / "genes.png", dpi=50)
    fig = figures[-1]
    text = fig._suptitle.get_text() + " ".join(ax.get_title() for ax in fig.axes)
    assert "r =" not in text and "r:" not in text and "no correlation" in fig._suptitle.get_text()


def test_shared_scale_puts_every_type_on_one_scale(tmp_path, figures):
    a = make_prediction()
    view = maps.read_prediction(a)
    maps.plot_weights(view, tmp_path / "own.png", dpi=50)
    own = [c for ax in figures[-1].axes for c in _clims(ax)]
    maps.plot_weights(view, tmp_path / "shared.png", dpi=50, shared_scale=True)
    shared = [c for ax in figures[-1].axes for c in _clims(ax)]
    tops = [np.quantile(view.weights[:, k], 0.99) for k in range(view.weights.shape[1])]
    assert len(set(own)) > 1  # each type its own 99th percentile
    assert set(shared) == {(0.0, round(float(max(tops)), 9))}
    assert "one colour scale for all types" in figures[-1]._suptitle.get_text()


def test_cli_plot_shared_scale_flag(tmp_path, monkeypatch):
    from cpnn.cli import main

    seen = {}
    real = maps.plot_prediction

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(maps, "plot_prediction", spy)
    a = make_prediction(n_side=6)
    a.write_h5ad(tmp_path / "p.h5ad")
    assert main(["plot", str(tmp_path / "p.h5ad"), "--out", str(tmp_path / "f"), "--shared-scale",
                 "--genes", "G01", "--dpi", "40"]) == 0
    assert seen["shared_scale"] is True


def test_dominant_type_legend_is_inside_the_saved_image(tmp_path, figures):
    """Long type names beside the map: the legend runs past the figure's edge, and the saved
    PNG still holds all of it."""
    a = make_prediction(level="tile", counts=False)
    a.uns["cpnn"]["cell_types"] = ["Cancer Epithelial cells of a long name", "Stroma", "Immune", "Endothelial"]
    path = maps.plot_dominant(maps.read_prediction(a), tmp_path / "dom.png", dpi=60)
    fig = figures[-1]
    legend = fig.axes[0].get_legend()
    renderer = fig.canvas.get_renderer()
    inches = fig.dpi_scale_trans.inverted()
    leg = legend.get_window_extent(renderer).transformed(inches)
    whole = fig.get_tightbbox(renderer)
    assert leg.x1 > fig.get_size_inches()[0]  # would be cut at the figure's edge
    with Image.open(path) as im:
        width_in = im.size[0] / 60
    assert width_in >= leg.x1 - whole.x0 - 0.05
    assert any("Cancer Epithelial cells of a long name (" in t.get_text() for t in legend.get_texts())


def test_scale_bar_sits_on_a_white_box(tmp_path, figures):
    from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar

    a = make_prediction()
    maps.plot_weights(maps.read_prediction(a), tmp_path / "w.png", dpi=50)
    bars = [art for ax in figures[-1].axes for art in ax.artists if isinstance(art, AnchoredSizeBar)]
    assert len(bars) == 1
    patch = bars[0].patch
    assert patch.get_visible() and patch.get_facecolor()[:3] == (1.0, 1.0, 1.0) and patch.get_alpha() >= 0.8
    assert bars[0].txt_label.get_text().endswith("µm")


def test_demo_panels_label_colour_bars_and_share_the_gene_scale(tmp_path, figures):
    from cpnn.plot.spatial import composition_panel, gene_panel

    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 1000, size=(30, 2))
    p = rng.dirichlet(np.ones(3), size=30)
    composition_panel(tmp_path / "c.png", xy, p, p[::-1], ["a", "b", "c"], 50.0, mpp=0.5)
    bar_labels = [ax.get_ylabel() for ax in figures[-1].axes if not ax.get_title()]
    assert len(bar_labels) == 6 and all(bar_labels)
    gene_panel(tmp_path / "g.png", xy, [p[:, 0], 0.1 * p[:, 1]], ["measured", "predicted"], 50.0, mpp=0.5)
    maps_axes = [ax for ax in figures[-1].axes if ax.get_title()]
    clims = {tuple(np.round(c.get_clim(), 9)) for ax in maps_axes for c in ax.collections if c.get_array() is not None}
    assert len(clims) == 1

"""Figures of prediction AnnDatas: spot and tile layouts, drivers shares, `cpnn plot`."""
from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest
from PIL import Image

ad = pytest.importorskip("anndata")

from cpnn.cli import main  # noqa: E402
from cpnn.errors import CPNNInputError  # noqa: E402
from cpnn.plot import driver_shares, plot_prediction, read_prediction, top_spread_genes  # noqa: E402

TYPES = ["tumour", "stroma", "immune", "endothelial"]


def make_prediction(n_side=12, pitch=200.0, level="spot", n_genes=30, seed=0, counts=True, image=True):
    """A prediction AnnData laid out like `cpnn predict`'s, with known weights and prototypes."""
    rng = np.random.default_rng(seed)
    k = len(TYPES)
    yy, xx = np.mgrid[0:n_side, 0:n_side]
    xy = np.c_[xx.ravel(), yy.ravel()].astype(float) * pitch + 2 * pitch
    n = len(xy)
    logits = np.c_[xy[:, 0] / pitch, xy[:, 1] / pitch, rng.normal(size=(n, k - 2))]
    w = np.exp(logits - logits.max(1, keepdims=True))
    w /= w.sum(1, keepdims=True)
    t = rng.gamma(0.5, 1.0, size=(k, n_genes)) + 1e-3
    t /= t.sum(1, keepdims=True)
    expr = w @ t
    expr /= expr.sum(1, keepdims=True)
    genes = [f"G{i:02d}" for i in range(n_genes)]
    a = ad.AnnData(X=np.log1p(expr * 1e4).astype(np.float32),
                   obs=pd.DataFrame(index=[f"s{i}" for i in range(n)]), var=pd.DataFrame(index=genes))
    a.obsm["spatial"] = xy
    a.obsm["cpnn_weights"] = w.astype(np.float32)
    a.varm["cpnn_prototypes"] = t.T.astype(np.float32)
    if counts:
        from scipy import sparse

        a.layers["counts"] = sparse.csr_matrix(rng.poisson(expr * 5000).astype(np.float32))
    a.uns["cpnn"] = {"cell_types": TYPES, "level": level, "sample_id": "S1"}
    full = int(xy.max() + 3 * pitch)
    scale = 400 / full
    entry = {"images": {}, "scalefactors": {"spot_diameter_fullres": pitch * (0.5 if level == "spot" else 1.0),
                                            "microns_per_pixel": 0.5}}
    if image:
        entry["images"]["hires"] = np.full((400, 400, 3), 220, dtype=np.uint8)
        entry["scalefactors"]["tissue_hires_scalef"] = scale
    a.uns["spatial"] = {"S1": entry}
    return a


def _png_size(path):
    with Image.open(path) as im:
        return im.size


def test_drivers_match_reference_and_sum_to_one():
    a = make_prediction()
    genes = ["G03", "G10", "G00"]
    shares = driver_shares(a, genes)
    assert list(shares.index) == genes and list(shares.columns) == TYPES
    np.testing.assert_allclose(shares.sum(1).to_numpy(), 1.0, atol=1e-9)
    # reference: loop over genes and types, straight from the formula
    w = np.asarray(a.obsm["cpnn_weights"], dtype=float)
    t = np.asarray(a.varm["cpnn_prototypes"], dtype=float)
    for gi, g in enumerate(genes):
        j = list(a.var_names).index(g)
        num = [np.mean([w[i, k] * t[j, k] for i in range(a.n_obs)]) for k in range(len(TYPES))]
        np.testing.assert_allclose(shares.iloc[gi].to_numpy(), np.array(num) / sum(num), rtol=1e-5)
    # on this fixture X is exactly log1p(1e4 * normalise(p @ T)) and every spot's p @ T sums
    # to 1, so the contributions add up to the mean predicted expression
    contrib = (w.mean(0)[None, :] * t).sum(1)
    np.testing.assert_allclose(contrib, np.expm1(np.asarray(a.X, dtype=float)).mean(0) / 1e4, rtol=1e-4)


def test_unknown_gene_is_a_clear_error():
    a = make_prediction()
    with pytest.raises(CPNNInputError, match="g03.*did you mean G03"):
        driver_shares(a, ["g03"])


def test_spot_figures_have_expected_size(tmp_path):
    a = make_prediction()
    paths = plot_prediction(a, tmp_path / "figs", genes=["G01", "G02"], dpi=80)
    assert set(paths) == {"celltype_weights", "dominant_type", "genes", "drivers", "drivers_table"}
    for key in ("celltype_weights", "dominant_type", "genes", "drivers"):
        w, h = _png_size(paths[key])
        assert 200 < w < 3000 and 150 < h < 3000, (key, w, h)
    # 4 types -> 4 columns of 3.6 in at 80 dpi; genes with counts -> 2 columns x 2 rows
    # (saved with a tight bounding box: within a few per cent of the figure's size)
    w, _ = _png_size(paths["celltype_weights"])
    assert abs(w - 4 * 3.6 * 80) <= 0.05 * 4 * 3.6 * 80
    w, h = _png_size(paths["genes"])
    assert abs(w - 2 * 3.6 * 80) <= 0.05 * 2 * 3.6 * 80 and h > 2 * 2.5 * 80
    table = pd.read_csv(paths["drivers_table"], sep="\t", index_col=0)
    np.testing.assert_allclose(table.to_numpy(), driver_shares(a, ["G01", "G02"]).to_numpy(), atol=1e-5)


def test_spot_weight_map_draws_values_where_spots_are(tmp_path):
    """The weight map is not blank: pixels over spots differ from the background."""
    a = make_prediction(image=False)
    paths = plot_prediction(a, tmp_path, genes=["G01"], max_types=1, dpi=60)
    im = np.asarray(Image.open(paths["celltype_weights"]).convert("RGB"), dtype=int)
    colourful = (im.max(2) - im.min(2)) > 40
    assert colourful.mean() > 0.05


def test_default_genes_are_largest_spread():
    a = make_prediction()
    sd = np.asarray(a.X).std(0)
    assert top_spread_genes(a, 3) == [a.var_names[i] for i in np.argsort(-sd)[:3]]


def test_tile_prediction_rasterised_quickly(tmp_path):
    """A 50k-tile whole-slide prediction renders in seconds (raster, not 50k patches)."""
    a = make_prediction(n_side=224, pitch=256.0, level="tile", n_genes=12, counts=False)
    assert a.n_obs > 50000
    view = read_prediction(a)
    assert view.raster and view.level == "tile"
    t0 = time.perf_counter()
    paths = plot_prediction(a, tmp_path, dpi=60)
    elapsed = time.perf_counter() - t0
    assert elapsed < 20, elapsed
    w, h = _png_size(paths["genes"])  # 4 genes, no counts -> 3 columns, 2 rows
    assert abs(w - 3 * 3.6 * 60) <= 0.05 * 3 * 3.6 * 60


def test_raster_grid_puts_each_tile_in_its_own_cell():
    from cpnn.plot.maps import _Raster

    a = make_prediction(n_side=5, pitch=256.0, level="tile", counts=False)
    view = read_prediction(a)
    r = _Raster(view)
    assert r.shape == (5, 5)
    v = np.arange(a.n_obs, dtype=float)
    grid = r.grid(v)
    # tile i sits at row y/pitch, column x/pitch
    xy = (a.obsm["spatial"] - a.obsm["spatial"].min(0)) / 256.0
    np.testing.assert_array_equal(grid[xy[:, 1].astype(int), xy[:, 0].astype(int)], v)


def test_missing_keys_are_clear_errors(tmp_path):
    a = make_prediction()
    del a.obsm["cpnn_weights"]
    with pytest.raises(CPNNInputError, match="cpnn_weights"):
        read_prediction(a)
    b = make_prediction()
    b.uns["cpnn"]["cell_types"] = TYPES[:2]
    with pytest.raises(CPNNInputError, match="2 cell-type names for 4"):
        read_prediction(b)


def test_cli_plot_end_to_end(tmp_path, capsys):
    a = make_prediction()
    path = tmp_path / "pred.h5ad"
    a.write_h5ad(path)
    rc = main(["plot", str(path), "--out", str(tmp_path / "out"), "--genes", "G05,G06", "--dpi", "60"])
    assert rc == 0
    for name in ("celltype_weights.png", "dominant_type.png", "genes.png", "drivers.png", "drivers.tsv"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    assert list(pd.read_csv(tmp_path / "out" / "drivers.tsv", sep="\t", index_col=0).index) == ["G05", "G06"]
    rc = main(["plot", str(path), "--out", str(tmp_path / "bad"), "--genes", "NOPE"])
    assert rc == 2
    assert "NOPE" in capsys.readouterr().err

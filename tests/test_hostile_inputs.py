"""Hostile inputs: every one ends in a CPNNInputError naming the file and the field.

Truncated or corrupt tables / .h5ad / .h5, NaN and inf, negative and non-integer counts,
zero-count spots, duplicate barcodes and genes, Ensembl ids against symbols, empty tissue,
missing or absurd microns per pixel, bags with zero tiles — through the real readers.
"""
from __future__ import annotations

import gzip
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import sparse

from cpnn.errors import CPNNInputError


def _raises(fn, *, path=None, field=None, match=None) -> CPNNInputError:
    """Run ``fn``; it must raise CPNNInputError whose message names ``path`` and ``field``."""
    with pytest.raises(CPNNInputError) as info:
        fn()
    msg = str(info.value)
    if path is not None:
        assert Path(path).name in msg, f"file {Path(path).name} not named in: {msg}"
    if field is not None:
        assert field in msg, f"field {field!r} not named in: {msg}"
    if match is not None:
        assert pytest.importorskip("re").search(match, msg), f"{match!r} not in: {msg}"
    return info.value


def _spatial_adata(n=6, g=5, seed=0, X=None):
    rng = np.random.default_rng(seed)
    X = rng.poisson(5, size=(n, g)).astype(np.float32) if X is None else X
    a = ad.AnnData(X=X, obs=pd.DataFrame(index=[f"s{i}" for i in range(n)]),
                   var=pd.DataFrame(index=[f"G{j}" for j in range(g)]))
    a.obsm["spatial"] = rng.uniform(0, 100, size=(n, 2))
    return a


def _reference_adata(n=40, g=8, seed=0, X=None):
    rng = np.random.default_rng(seed)
    X = rng.poisson(3, size=(n, g)).astype(np.float32) if X is None else X
    obs = pd.DataFrame({"cell_type": np.where(np.arange(n) % 2, "A", "B")}, index=[f"c{i}" for i in range(n)])
    return ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=[f"G{j}" for j in range(g)]))


def _truncate(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


# ----------------------------------------------------------------- truncated / corrupt files
def test_truncated_gzip_count_table(tmp_path):
    from cpnn.data import read_bulk_table

    df = pd.DataFrame(np.random.default_rng(0).poisson(5, size=(300, 4)), index=[f"G{i}" for i in range(300)],
                      columns=["s1", "s2", "s3", "s4"])
    p = tmp_path / "bulk.tsv.gz"
    with gzip.open(p, "wt") as fh:
        df.to_csv(fh, sep="\t")
    _truncate(p, 0.6)
    _raises(lambda: read_bulk_table(p), path=p)


def test_truncated_plain_count_table_is_not_silently_short(tmp_path):
    from cpnn.data import read_bulk_table

    p = tmp_path / "bulk.tsv"
    p.write_text("gene\ts1\ts2\nG1\t1\t2\nG2\t3\t4\nG3\t5")  # last row cut after its first value
    _raises(lambda: read_bulk_table(p), path=p)


@pytest.mark.parametrize("kind", ["garbage", "truncated"])
def test_corrupt_h5ad_spatial(tmp_path, kind):
    from cpnn.data import read_spatial_h5ad

    p = tmp_path / "spots.h5ad"
    _spatial_adata(n=200, g=50).write_h5ad(p)
    if kind == "garbage":
        p.write_bytes(b"\x89HDF not really" * 50)
    else:
        _truncate(p, 0.5)
    _raises(lambda: read_spatial_h5ad(p), path=p)


def test_corrupt_h5ad_reference(tmp_path):
    from cpnn.prototypes import read_reference

    p = tmp_path / "ref.h5ad"
    _reference_adata(n=200).write_h5ad(p)
    _truncate(p, 0.4)
    _raises(lambda: read_reference(p, "cell_type"), path=p)


def test_corrupt_h5ad_bulk(tmp_path):
    from cpnn.data import read_bulk_table

    p = tmp_path / "bulk.h5ad"
    _spatial_adata(n=50, g=50).write_h5ad(p)
    _truncate(p, 0.5)
    _raises(lambda: read_bulk_table(p), path=p)


def test_corrupt_feature_h5(tmp_path):
    from cpnn.encoders import read_feature_file, write_feature_file

    p = tmp_path / "feats.h5"
    rng = np.random.default_rng(0)
    write_feature_file(p, rng.normal(size=(500, 64)).astype(np.float32), rng.integers(0, 1000, size=(500, 2)))
    _truncate(p, 0.5)
    _raises(lambda: read_feature_file(p), path=p)


def test_feature_h5_missing_dataset(tmp_path):
    from cpnn.encoders import read_feature_file

    p = tmp_path / "feats.h5"
    with h5py.File(p, "w") as fh:
        fh["coords"] = np.zeros((3, 2), np.int64)
    _raises(lambda: read_feature_file(p), path=p, field="features")


def test_corrupt_10x_h5(tmp_path):
    from cpnn.data import read_10x_h5

    p = tmp_path / "filtered_feature_bc_matrix.h5"
    p.write_bytes(b"\x00" * 4096)
    _raises(lambda: read_10x_h5(p), path=p)


def test_corrupt_slide_file(tmp_path):
    from cpnn.image import open_slide

    p = tmp_path / "broken.svs"
    p.write_bytes(b"II*\x00" + b"\x00" * 200)
    _raises(lambda: open_slide(p, mpp=0.5), path=p)
    png = tmp_path / "cut.png"
    Image.fromarray(np.zeros((300, 300, 3), np.uint8) + 120).save(png)
    _truncate(png, 0.3)
    _raises(lambda: open_slide(png, mpp=0.5).read_region(0, 0, 300, 300), path=png)


# ----------------------------------------------------------------- bad values
@pytest.mark.parametrize("bad, what", [(np.nan, "NaN"), (np.inf, "infinite"), (-1.0, "negative"),
                                       (2.5, "non-integer")])
def test_bad_values_spatial_h5ad(tmp_path, bad, what):
    from cpnn.data import read_spatial_h5ad

    a = _spatial_adata()
    a.X[2, 3] = bad
    p = tmp_path / "spots.h5ad"
    a.write_h5ad(p)
    _raises(lambda: read_spatial_h5ad(p), path=p, field="X", match=what)


@pytest.mark.parametrize("bad, what", [(np.nan, "NaN"), (-3.0, "negative"), (0.5, "integer")])
def test_bad_values_reference(tmp_path, bad, what):
    from cpnn.prototypes import read_reference

    a = _reference_adata()
    a.X[5, 1] = bad
    p = tmp_path / "ref.h5ad"
    a.write_h5ad(p)
    _raises(lambda: read_reference(p, "cell_type"), path=p, field="X", match=what)


@pytest.mark.parametrize("cell, what", [("nan", "NaN"), ("inf", "infinite"), ("-4", "negative"),
                                        ("3.7", "non-integer")])
def test_bad_values_bulk_table(tmp_path, cell, what):
    from cpnn.data import read_bulk_table

    p = tmp_path / "bulk.csv"
    p.write_text(f"gene,s1,s2\nACTB,10,20\nGAPDH,{cell},7\nTP53,1,2\n")
    _raises(lambda: read_bulk_table(p, orientation="genes_x_samples"), path=p, match=what)


def test_model_fit_rejects_nan_negative_and_zero_count_spots():
    from cpnn import CPNN, CPNNConfig, TrainConfig

    class P:
        values = np.ones((2, 4))
        cell_types = ["A", "B"]
        genes = ["G0", "G1", "G2", "G3"]

    model = CPNN(P(), CPNNConfig(hidden=()), TrainConfig(max_epochs=1, progress=False))
    feats = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
    counts = np.ones((5, 4), np.float32)
    for value, what in ((np.nan, "NaN"), (-1, "negative")):
        c = counts.copy()
        c[1, 2] = value
        _raises(lambda: model.fit(feats, c, composition_targets=None), field="counts", match=what)
    c = counts.copy()
    c[3] = 0
    _raises(lambda: model.fit(feats, c, composition_targets=None), field="counts", match="zero counts")
    f = feats.copy()
    f[0, 0] = np.inf
    _raises(lambda: model.fit(f, counts, composition_targets=None), field="features", match="NaN/inf")


def test_zero_count_spots_are_reported_by_the_spatial_reader(tmp_path):
    """A spatial file with empty spots reads, but the empty spots are visible, not hidden."""
    from cpnn.data import read_spatial_h5ad

    a = _spatial_adata()
    a.X[1] = 0
    p = tmp_path / "spots.h5ad"
    a.write_h5ad(p)
    out = read_spatial_h5ad(p)
    totals = np.asarray(out.X.sum(axis=1)).ravel()
    # either dropped (and counted in uns) or kept with their zero total; never altered
    if out.n_obs == a.n_obs:
        assert totals[1] == 0
    else:
        assert "s1" not in out.obs_names
        assert any("zero" in k or "empty" in k or "min_counts" in k for k in out.uns["cpnn_input"])


# ----------------------------------------------------------------- duplicates and gene ids
def test_duplicate_barcodes(tmp_path):
    from cpnn.data import read_spatial_h5ad

    a = _spatial_adata()
    a.obs_names = ["s0", "s1", "s1", "s3", "s4", "s5"]
    p = tmp_path / "spots.h5ad"
    a.write_h5ad(p)
    _raises(lambda: read_spatial_h5ad(p), path=p, field="obs_names", match="s1")


def test_duplicate_genes_are_summed_and_listed(tmp_path):
    from cpnn.data import read_spatial_h5ad

    a = _spatial_adata(g=4)
    X = np.asarray(a.X).copy()
    a.var_names = ["G0", "G1", "G1", "G3"]
    p = tmp_path / "spots.h5ad"
    a.write_h5ad(p)
    out = read_spatial_h5ad(p)
    assert list(out.var_names) == ["G0", "G1", "G3"]
    np.testing.assert_array_equal(out[:, "G1"].X.toarray().ravel(), X[:, 1] + X[:, 2])
    assert "G1" in list(out.uns["cpnn_input"]["duplicated_genes"])


def test_duplicate_genes_in_reference_kept_unique(tmp_path):
    from cpnn.prototypes import read_reference

    a = _reference_adata(g=4)
    a.var_names = ["G0", "G1", "G1", "G3"]
    p = tmp_path / "ref.h5ad"
    a.write_h5ad(p)
    out = read_reference(p, "cell_type")
    assert out.var_names.is_unique


def test_ensembl_ids_against_symbols_are_named():
    from cpnn.data.genes import match_genes

    symbols = ["ACTB", "GAPDH", "TP53", "ERBB2"]
    ensembl = ["ENSG00000075624", "ENSG00000111640", "ENSG00000141510", "ENSG00000141736"]
    err = _raises(lambda: match_genes(symbols, ensembl), field="genes")
    assert "Ensembl" in str(err) and "reference" in str(err)


def test_10x_h5_uses_symbols_and_keeps_ensembl_ids(tmp_path):
    """With both ids and symbols present (10x features), genes come out as symbols."""
    from cpnn.data import read_10x_h5

    p = tmp_path / "filtered_feature_bc_matrix.h5"
    X = sparse.csc_matrix(np.array([[1, 0, 2], [0, 3, 0]], np.int32))  # genes x barcodes (10x)
    with h5py.File(p, "w") as fh:
        g = fh.create_group("matrix")
        g["barcodes"] = np.array([b"AAA-1", b"CCC-1", b"GGG-1"])
        g["data"], g["indices"], g["indptr"] = X.data, X.indices, X.indptr
        g["shape"] = np.array(X.shape, np.int32)
        f = g.create_group("features")
        f["id"] = np.array([b"ENSG00000075624", b"ENSG00000111640"])
        f["name"] = np.array([b"ACTB", b"GAPDH"])
        f["feature_type"] = np.array([b"Gene Expression"] * 2)
        f["genome"] = np.array([b"GRCh38"] * 2)
    mat, barcodes_or_genes, var, info = read_10x_h5(p)
    text = " ".join(map(str, list(var.index) + list(np.ravel(var.values))))
    assert "ACTB" in text and "ENSG00000075624" in text


# ----------------------------------------------------------------- images
def test_empty_tissue_mask(tmp_path):
    from cpnn.image import open_slide, tile_grid

    p = tmp_path / "blank.png"
    Image.fromarray(np.full((512, 512, 3), 250, np.uint8)).save(p)
    slide = open_slide(p, mpp=0.5)
    _raises(lambda: tile_grid(slide, tile_px=256, target_mpp=0.5), path=p, field="threshold", match="no tissue")


def test_missing_mpp(tmp_path):
    from cpnn.image import open_slide

    p = tmp_path / "he.png"
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(p)
    _raises(lambda: open_slide(p), path=p, field="mpp")


@pytest.mark.parametrize("mpp", [0.0, -0.5, 1e6, float("nan"), float("inf")])
def test_absurd_mpp_argument(tmp_path, mpp):
    from cpnn.image import open_slide

    p = tmp_path / "he.png"
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(p)
    _raises(lambda: open_slide(p, mpp=mpp), path=p, field="mpp")


def test_absurd_mpp_in_tiff_metadata(tmp_path):
    import tifffile

    from cpnn.image import open_slide

    p = tmp_path / "he.tif"
    # 1 pixel per centimetre = 10,000 µm per pixel: not a microscope
    tifffile.imwrite(p, np.full((64, 64, 3), 200, np.uint8), resolution=(1.0, 1.0), resolutionunit="CENTIMETER")
    _raises(lambda: open_slide(p), path=p, field="mpp")
    assert open_slide(p, mpp=0.5).mpp == pytest.approx(0.5)  # an explicit value overrides it


# ----------------------------------------------------------------- bags with zero tiles
def test_bag_with_zero_tiles_in_training():
    from cpnn import CPNN, CPNNConfig, TrainConfig

    class P:
        values = np.ones((2, 3))
        cell_types = ["A", "B"]
        genes = ["G0", "G1", "G2"]

    model = CPNN(P(), CPNNConfig(hidden=()), TrainConfig(max_epochs=1, progress=False))
    bags = [np.ones((4, 3), np.float32), np.zeros((0, 3), np.float32), np.ones((2, 3), np.float32)]
    with pytest.raises(ValueError, match=r"bag\(s\) \[1\] have zero patches"):
        model.fit(bags, np.ones((3, 3), np.float32), composition_targets=None)


def test_feature_file_with_zero_tiles_cannot_become_a_bag(tmp_path):
    from cpnn.encoders import read_feature_file, write_feature_file
    from cpnn.train import BagData

    p = tmp_path / "empty.h5"
    write_feature_file(p, np.zeros((0, 8), np.float32), np.zeros((0, 2), np.int64))
    ff = read_feature_file(p)
    assert ff.features.shape == (0, 8)  # an empty slide reads as what it is ...
    with pytest.raises(ValueError, match="zero patches"):  # ... and is refused as a training bag
        BagData.from_bags([np.ones((3, 8), np.float32), ff.features])


def test_predict_with_an_empty_bag_in_offsets_is_refused():
    from cpnn import CPNN, CPNNConfig, TrainConfig

    class P:
        values = np.ones((2, 3))
        cell_types = ["A", "B"]
        genes = ["G0", "G1", "G2"]

    rng = np.random.default_rng(0)
    model = CPNN(P(), CPNNConfig(hidden=()), TrainConfig(max_epochs=1, progress=False, early_stopping="none"))
    model.fit(rng.normal(size=(6, 3)).astype(np.float32), rng.poisson(5, size=(6, 3)).astype(np.float32) + 1,
              composition_targets=None)
    _raises(lambda: model.predict(rng.normal(size=(4, 3)).astype(np.float32), bags=[0, 2, 2, 4]), field="bags")

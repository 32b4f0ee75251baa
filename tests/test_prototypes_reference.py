"""Reading and QC of single-cell references (cpnn.prototypes.reference)."""
import gzip
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp

from cpnn.errors import CPNNInputError
from cpnn.prototypes import read_reference, reference_qc


def _toy_reference(n_cells=60, n_genes=40, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.poisson(2.0, size=(n_cells, n_genes)).astype(np.int64)
    genes = [f"G{i}" for i in range(n_genes)]
    cells = [f"cell{i}" for i in range(n_cells)]
    obs = pd.DataFrame({"type": np.where(np.arange(n_cells) % 2 == 0, "A", "B"),
                        "patient": np.where(np.arange(n_cells) < n_cells // 2, "p1", "p2")}, index=cells)
    return X, genes, cells, obs


def _write_h5ad(path, X, genes, obs, layer=None):
    a = ad.AnnData(X=sp.csr_matrix(X.astype(np.float32)), obs=obs.copy(), var=pd.DataFrame(index=genes))
    if layer is not None:
        a.layers[layer] = a.X.copy()
        a.X = sp.csr_matrix(np.log1p(X.astype(np.float32)))
    a.write_h5ad(path)


def test_read_h5ad_counts_in_x_and_layer(tmp_path):
    X, genes, cells, obs = _toy_reference()
    _write_h5ad(tmp_path / "x.h5ad", X, genes, obs)
    _write_h5ad(tmp_path / "layer.h5ad", X, genes, obs, layer="counts")
    for name in ("x.h5ad", "layer.h5ad"):
        a = read_reference(tmp_path / name, "type", batch_key="patient")
        assert sp.isspmatrix_csr(a.X) and a.X.dtype == np.float32
        np.testing.assert_array_equal(a.X.toarray(), X)
        assert list(a.var_names) == genes and list(a.obs_names) == cells
        assert a.obs["type"].tolist() == obs["type"].tolist()


def test_read_10x_folder_with_metadata(tmp_path):
    X, genes, cells, obs = _toy_reference()
    folder = tmp_path / "filtered_feature_bc_matrix"
    folder.mkdir()
    with gzip.open(folder / "matrix.mtx.gz", "wb") as fh:
        scipy.io.mmwrite(fh, sp.coo_matrix(X.T))
    feats = pd.DataFrame({"id": [f"ENSG{i:011d}" for i in range(len(genes))], "name": genes,
                          "type": "Gene Expression"})
    feats.loc[3, "type"] = "Antibody Capture"  # must be dropped
    feats.to_csv(folder / "features.tsv.gz", sep="\t", header=False, index=False)
    pd.Series(cells).to_csv(folder / "barcodes.tsv.gz", sep="\t", header=False, index=False)
    meta = obs.drop(index=cells[:5])  # five cells without metadata are dropped
    meta.to_csv(tmp_path / "meta.csv")
    with pytest.warns(UserWarning, match="no metadata"):
        a = read_reference(folder, "type", metadata=tmp_path / "meta.csv")
    keep_genes = [g for i, g in enumerate(genes) if i != 3]
    assert list(a.var_names) == keep_genes
    assert list(a.obs_names) == cells[5:]
    np.testing.assert_array_equal(a.X.toarray(), np.delete(X, 3, axis=1)[5:])
    assert a.obs["type"].tolist() == obs["type"].tolist()[5:]
    with pytest.raises(CPNNInputError, match="metadata"):
        read_reference(folder, "type")


def test_missing_label_lists_columns(tmp_path):
    X, genes, _, obs = _toy_reference()
    _write_h5ad(tmp_path / "r.h5ad", X, genes, obs)
    with pytest.raises(CPNNInputError) as exc:
        read_reference(tmp_path / "r.h5ad", "celltype_major")
    assert "celltype_major" in str(exc.value) and "'type'" in str(exc.value) and "patient" in str(exc.value)


@pytest.mark.parametrize("bad,match", [("negative", "negative"), ("fraction", "not integers"),
                                       ("nan", "NaN")])
def test_bad_counts_rejected(tmp_path, bad, match):
    X, genes, _, obs = _toy_reference()
    Xf = X.astype(np.float32)
    if bad == "negative":
        Xf[0, 0] = -1
    elif bad == "fraction":
        Xf = np.log1p(Xf)
    else:
        Xf[1, 2] = np.nan
    a = ad.AnnData(X=Xf, obs=obs, var=pd.DataFrame(index=genes))
    a.raw = ad.AnnData(X=X.astype(np.float32), obs=obs, var=pd.DataFrame(index=genes))
    a.write_h5ad(tmp_path / "bad.h5ad")
    with pytest.raises(CPNNInputError, match=match) as exc:
        read_reference(tmp_path / "bad.h5ad", "type")
    assert "bad.h5ad" in str(exc.value)
    if bad != "nan":
        assert "raw" in str(exc.value)  # says where raw counts may be
        fixed = read_reference(tmp_path / "bad.h5ad", "type", counts_layer="raw")
        np.testing.assert_array_equal(fixed.X.toarray(), X)


def test_duplicate_genes(tmp_path):
    X, genes, _, obs = _toy_reference()
    genes[5] = genes[4]
    _write_h5ad(tmp_path / "d.h5ad", X, genes, obs)
    with pytest.warns(UserWarning, match="duplicated"):
        a = read_reference(tmp_path / "d.h5ad", "type")
    assert a.var_names.is_unique
    with pytest.raises(CPNNInputError, match="duplicated"):
        read_reference(tmp_path / "d.h5ad", "type", duplicate_genes="error")


def test_qc_rules_and_record():
    rng = np.random.default_rng(1)
    n, g = 100, 600
    X = np.zeros((n, g), dtype=np.float32)
    for i in range(n):  # 300 detected genes per cell by default
        X[i, rng.choice(np.arange(2, g), 300, replace=False)] = 1
    X[0, :] = 1  # 600 genes -> over max_genes=500
    X[1, :] = 0
    X[1, 2:150] = 1  # 148 genes -> under 200
    X[2, 0] = 1000  # mitochondrial gene dominates
    X[3:20, 0] = 1  # a little mitochondrial signal elsewhere
    X[:, 1] = 0
    X[3:5, 1] = 1  # gene seen in 2 cells -> dropped with min_cells_per_gene=3
    genes = ["MT-CO1", "RARE"] + [f"G{i}" for i in range(g - 2)]
    labels = ["A"] * 50 + ["B"] * 48 + ["C"] * 2
    a = ad.AnnData(X=sp.csr_matrix(X), obs=pd.DataFrame({"t": labels}, index=[f"c{i}" for i in range(n)]),
                   var=pd.DataFrame(index=genes))
    with pytest.warns(UserWarning, match="labels with"):
        q = reference_qc(a, "t", max_genes=500, min_cells_per_gene=3)
    rec = q.uns["cpnn"]["reference_qc"]
    assert rec["cells_dropped_mito"] == 1 and rec["cells_dropped_max_genes"] == 1
    assert rec["cells_dropped_min_genes"] == 1 and rec["labels_dropped"] == {"C": 2}
    assert "RARE" not in q.var_names and "MT-CO1" in q.var_names
    assert q.n_obs == n - 5
    assert not {"c0", "c1", "c2", "c98", "c99"} & set(q.obs_names)
    # default gene rule on 97 cells: max(3, round(200 * 97 / 1e5)) = 3
    q2 = reference_qc(a, None, max_genes=500)
    assert q2.uns["cpnn"]["reference_qc"]["min_cells_per_gene"] == 3


def test_qc_on_real_reference_keeps_it(data_dir):
    path = data_dir / "reference" / "wu2021_CID4465.h5ad"
    if not path.exists():
        pytest.skip(f"{path} not present")
    a = read_reference(path, "celltype_major")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = reference_qc(a, "celltype_major")
    rec = q.uns["cpnn"]["reference_qc"]
    assert rec["max_genes"] == 2500 and rec["min_cells_per_gene"] == 3
    assert q.n_obs >= 0.95 * a.n_obs  # the 2,500-gene cap removes ~1 % here
    assert 10_000 < q.n_vars < 20_000
    assert set(q.obs["celltype_major"].unique()) == set(a.obs["celltype_major"].unique())

"""Space Ranger (v1/v2), HEST-1k and generic h5ad readers on fixtures generated here."""
from __future__ import annotations

import json

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import tifffile
from scipy import sparse

from cpnn.data import read_hest, read_spatial_h5ad, read_visium
from cpnn.errors import CPNNInputError

GENES = ["GAPDH", "ACTB", "KRT19", "ACTB", "EPCAM"]  # ACTB twice: summed
IDS = ["ENSG01", "ENSG02", "ENSG03", "ENSG04", "ENSG05"]
N_BC = 12


def _write_10x_h5(path, counts, barcodes, names, ids, ftypes, library="libA"):
    """Counts: barcodes x features dense ints; stored CSC with barcodes as columns."""
    csc = sparse.csr_matrix(counts)  # rows barcodes -> indptr over barcodes
    with h5py.File(path, "w") as f:
        f.attrs["library_ids"] = np.array([library.encode()])
        g = f.create_group("matrix")
        g["data"] = csc.data.astype(np.int32)
        g["indices"] = csc.indices.astype(np.int64)
        g["indptr"] = csc.indptr.astype(np.int64)
        g["shape"] = np.array([counts.shape[1], counts.shape[0]], dtype=np.int32)
        g["barcodes"] = np.array([b.encode() for b in barcodes])
        fg = g.create_group("features")
        fg["name"] = np.array([n.encode() for n in names])
        fg["id"] = np.array([i.encode() for i in ids])
        fg["feature_type"] = np.array([t.encode() for t in ftypes])
        fg["genome"] = np.array([b"GRCh38"] * len(names))


@pytest.fixture()
def visium(tmp_path):
    rng = np.random.default_rng(0)
    outs = tmp_path / "sampleX" / "outs"
    (outs / "spatial").mkdir(parents=True)
    names = GENES + ["CD3_TotalSeqB"]
    ids = IDS + ["CD3"]
    ftypes = ["Gene Expression"] * len(GENES) + ["Antibody Capture"]
    counts = rng.poisson(5, size=(N_BC, len(names)))
    barcodes = [f"AAAC{i:04d}-1" for i in range(N_BC)]
    _write_10x_h5(outs / "filtered_feature_bc_matrix.h5", counts, barcodes, names, ids, ftypes)
    # positions: all matrix barcodes + two off-matrix ones; barcode 3 marked out of tissue
    rows = []
    for i, b in enumerate(barcodes + ["TTTT0000-1", "TTTT0001-1"]):
        rows.append((b, 0 if i == 3 else 1, i // 4, i % 4, 40 + 20 * (i // 4), 30 + 25 * (i % 4)))
    pos = pd.DataFrame(rows, columns=["barcode", "in_tissue", "array_row", "array_col",
                                      "pxl_row_in_fullres", "pxl_col_in_fullres"])
    pos = pos.sample(frac=1.0, random_state=1)  # order differs from the matrix
    (outs / "spatial" / "scalefactors_json.json").write_text(json.dumps(
        {"spot_diameter_fullres": 110.0, "tissue_hires_scalef": 0.17, "fiducial_diameter_fullres": 170.0,
         "tissue_lowres_scalef": 0.05}))
    img = tmp_path / "fullres.tif"
    tifffile.imwrite(img, np.full((200, 160, 3), 220, np.uint8))  # H=200, W=160
    return outs, counts, barcodes, pos, img


def _expected(counts):
    ge = counts[:, : len(GENES)].astype(np.float32)
    # GAPDH, ACTB(+ACTB), KRT19, EPCAM
    return np.column_stack([ge[:, 0], ge[:, 1] + ge[:, 3], ge[:, 2], ge[:, 4]])


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_visium_v1_v2(visium, version):
    outs, counts, barcodes, pos, img = visium
    if version == "v2":
        pos.to_csv(outs / "spatial" / "tissue_positions.csv", index=False)
    else:
        pos.to_csv(outs / "spatial" / "tissue_positions_list.csv", index=False, header=False)
    with pytest.warns(UserWarning, match="duplicated gene"):
        a = read_visium(outs, image_path=img)
    keep = [i for i in range(N_BC) if i != 3]
    assert list(a.obs_names) == [barcodes[i] for i in keep]
    assert list(a.var_names) == ["GAPDH", "ACTB", "KRT19", "EPCAM"]
    np.testing.assert_array_equal(a.X.toarray(), _expected(counts)[keep])
    assert a.X.format == "csr" and a.X.dtype == np.float32
    p = pos.set_index("barcode").loc[a.obs_names]
    np.testing.assert_array_equal(a.obsm["spatial"][:, 0], p["pxl_col_in_fullres"])  # x = column
    np.testing.assert_array_equal(a.obsm["spatial"][:, 1], p["pxl_row_in_fullres"])
    rec = a.uns["cpnn_input"]
    assert rec["mpp"] == pytest.approx(55 / 110)
    assert rec["mpp_source"] == "derived_from_spot_diameter_fullres"
    assert rec["positions_version"] == version
    assert rec["n_barcodes_not_in_tissue_dropped"] == 1
    assert rec["sample_id"] == "libA" and rec["patient_id"] == "libA"
    assert rec["platform"] == "visium" and rec["spot_diameter_um"] == 55
    assert rec["image_size"] == [160, 200]
    assert rec["duplicated_genes"] == ["ACTB"]
    assert a.var["gene_ids"].tolist() == ["ENSG01", "ENSG02", "ENSG03", "ENSG05"]
    assert set(a.obs["section"]) == {"libA"}


def test_visium_hd_binned_outputs_parquet(tmp_path):
    """Visium HD: bins of binned_outputs/square_016um, positions in parquet, mpp and bin size
    from the scale factors (not from a 55 um spot)."""
    pytest.importorskip("pyarrow")
    rng = np.random.default_rng(1)
    outs = tmp_path / "sampleHD" / "outs" / "binned_outputs" / "square_016um"
    (outs / "spatial").mkdir(parents=True)
    n = 9
    barcodes = [f"s_016um_{r:05d}_{c:05d}-1" for r in range(3) for c in range(3)]
    counts = rng.poisson(3, size=(n, 2))
    _write_10x_h5(outs / "filtered_feature_bc_matrix.h5", counts, barcodes, ["GAPDH", "KRT19"],
                  ["ENSG01", "ENSG03"], ["Gene Expression"] * 2, library="")
    pos = pd.DataFrame({"barcode": barcodes, "in_tissue": [1] * n,
                        "array_row": [i // 3 for i in range(n)], "array_col": [i % 3 for i in range(n)],
                        "pxl_row_in_fullres": [50.0 + 58.4 * (i // 3) for i in range(n)],
                        "pxl_col_in_fullres": [40.0 + 58.4 * (i % 3) for i in range(n)]})
    pos.to_parquet(outs / "spatial" / "tissue_positions.parquet", index=False)
    (outs / "spatial" / "scalefactors_json.json").write_text(json.dumps(
        {"spot_diameter_fullres": 58.4, "bin_size_um": 16.0, "microns_per_pixel": 0.274,
         "tissue_hires_scalef": 0.08, "tissue_lowres_scalef": 0.02}))
    a = read_visium(outs)
    rec = a.uns["cpnn_input"]
    assert rec["platform"] == "visium_hd" and rec["positions_version"] == "hd_parquet"
    assert rec["mpp"] == pytest.approx(0.274) and rec["mpp_source"] == "scalefactors_microns_per_pixel"
    assert rec["spot_diameter_um"] == 16.0 and rec["inter_spot_distance_um"] == 16.0
    assert rec["sample_id"] == "sampleHD"
    assert list(a.obs_names) == barcodes
    np.testing.assert_array_equal(a.X.toarray(), counts)
    np.testing.assert_allclose(a.obsm["spatial"], pos[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy())
    # a corrupt parquet file names itself
    (outs / "spatial" / "tissue_positions.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(CPNNInputError, match="tissue_positions.parquet"):
        read_visium(outs)


def test_visium_given_mpp_and_ids(visium):
    outs, counts, barcodes, pos, img = visium
    pos.to_csv(outs / "spatial" / "tissue_positions.csv", index=False)
    with pytest.warns(UserWarning):
        a = read_visium(outs, mpp=0.2631, library_id="s1", patient_id="P7")
    rec = a.uns["cpnn_input"]
    assert rec["mpp"] == 0.2631 and rec["mpp_source"] == "given"
    assert rec["image_path"] is None
    assert set(a.obs["patient"]) == {"P7"} and rec["sample_id"] == "s1"


def test_visium_barcodes_missing_from_positions(visium):
    outs, counts, barcodes, pos, img = visium
    pos[~pos["barcode"].isin(barcodes[:5])].to_csv(outs / "spatial" / "tissue_positions.csv", index=False)
    with pytest.raises(CPNNInputError, match=r"5 of 12 matrix barcodes are absent.*AAAC000") as ei:
        read_visium(outs)
    assert "tissue_positions.csv" in str(ei.value)


def test_visium_missing_files_and_outside_image(visium, tmp_path):
    outs, counts, barcodes, pos, img = visium
    with pytest.raises(CPNNInputError, match="no tissue_positions"):
        read_visium(outs)
    pos.to_csv(outs / "spatial" / "tissue_positions.csv", index=False)
    small = tmp_path / "small.tif"
    tifffile.imwrite(small, np.zeros((50, 50, 3), np.uint8))
    with pytest.raises(CPNNInputError, match="outside the image"):
        read_visium(outs, image_path=small)
    (outs / "spatial" / "scalefactors_json.json").unlink()
    with pytest.raises(CPNNInputError, match="scale factors not found"):
        read_visium(outs)


def test_visium_rejects_non_integer_counts(visium):
    outs, counts, barcodes, pos, img = visium
    pos.to_csv(outs / "spatial" / "tissue_positions.csv", index=False)
    with h5py.File(outs / "filtered_feature_bc_matrix.h5", "a") as f:
        d = f["matrix/data"][()].astype(np.float32)
        d[0] = 1.5
        del f["matrix/data"]
        f["matrix/data"] = d
    with pytest.raises(CPNNInputError, match="non-integer"):
        read_visium(outs)


# ------------------------------------------------------------------------------ HEST
def _hest_root(tmp_path, sid="SPA51", meta=None, wsi=True, layers=False):
    root = tmp_path / "hest"
    for d in ("st", "wsis", "metadata", "patches"):
        (root / d).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    X = rng.poisson(3, size=(9, 6)).astype(np.float32)
    xy = np.column_stack([np.arange(9) * 30 + 10.0, np.arange(9) * 20 + 15.0])
    a = ad.AnnData(X=sparse.csr_matrix(X) if not layers else np.log1p(X),
                   obs=pd.DataFrame({"in_tissue": 1}, index=[f"{i}x{i}" for i in range(9)]),
                   var=pd.DataFrame(index=[f"G{i}" for i in range(6)]))
    if layers:
        a.layers["counts"] = X
    a.obsm["spatial"] = xy
    a.write_h5ad(root / "st" / f"{sid}.h5ad")
    if wsi:
        tifffile.imwrite(root / "wsis" / f"{sid}.tif", np.full((300, 400, 3), 200, np.uint8))
    m = {"id": sid, "pixel_size_um_estimated": 0.97, "pixel_size_um_embedded": 1.0,
         "spot_diameter": 100.0, "inter_spot_dist": 200.0, "st_technology": "Spatial Transcriptomics",
         "patient": "Patient 1", "organ": "Breast", "species": "Homo sapiens", "subseries": None}
    m.update(meta or {})
    (root / "metadata" / f"{sid}.json").write_text(json.dumps(m))
    return root, X, xy


def test_hest_reads_sample(tmp_path):
    root, X, xy = _hest_root(tmp_path)
    with h5py.File(root / "patches" / "SPA51.h5", "w") as f:
        f["barcode"] = np.array([b"0x0"])
    a = read_hest(root, "SPA51")
    np.testing.assert_array_equal(a.X.toarray(), X)
    np.testing.assert_array_equal(a.obsm["spatial"], xy)
    rec = a.uns["cpnn_input"]
    assert rec["mpp"] == 0.97 and rec["mpp_source"] == "pixel_size_um_estimated"
    assert rec["platform"] == "legacy_st" and rec["st_technology"] == "Spatial Transcriptomics"
    assert rec["spot_diameter_um"] == 100.0 and rec["inter_spot_distance_um"] == 200.0
    assert rec["patient_id"] == "Patient 1" and rec["patient_source"] == "metadata"
    assert rec["patches_path"].endswith("SPA51.h5")
    assert rec["image_size"] == [400, 300]
    assert set(a.obs["section"]) == {"SPA51"} and set(a.obs["patient"]) == {"Patient 1"}
    assert "in_tissue" in a.obs


def test_hest_fallbacks_and_errors(tmp_path):
    root, X, xy = _hest_root(tmp_path, meta={"pixel_size_um_estimated": None, "patient": None,
                                             "spot_diameter": None, "st_technology": "Visium"},
                             wsi=False, layers=True)
    with pytest.raises(CPNNInputError, match="whole-slide image not found"):
        read_hest(root, "SPA51")
    a = read_hest(root, "SPA51", require_image=False)
    rec = a.uns["cpnn_input"]
    assert rec["mpp"] == 1.0 and rec["mpp_source"] == "pixel_size_um_embedded"
    assert rec["patient_id"] == "SPA51" and rec["patient_source"] == "sample_id"
    assert rec["spot_diameter_um"] == 55.0 and rec["platform"] == "visium"
    assert rec["counts_source"] == "layers['counts']"
    np.testing.assert_array_equal(a.X.toarray(), X)
    with pytest.raises(CPNNInputError, match=r"'NCBI759' not found; available: \['SPA51'\]"):
        read_hest(root, "NCBI759")
    meta = json.loads((root / "metadata" / "SPA51.json").read_text())
    meta["pixel_size_um_embedded"] = None
    (root / "metadata" / "SPA51.json").write_text(json.dumps(meta))
    with pytest.raises(CPNNInputError, match="no pixel size"):
        read_hest(root, "SPA51", require_image=False)
    assert read_hest(root, "SPA51", mpp=0.5, require_image=False).uns["cpnn_input"]["mpp"] == 0.5


# ------------------------------------------------------------------------ generic h5ad
def test_spatial_h5ad_uses_uns_and_relative_image(tmp_path):
    rng = np.random.default_rng(1)
    X = rng.poisson(2, size=(6, 4)).astype(np.float32)
    a = ad.AnnData(X=np.log1p(X), obs=pd.DataFrame(
        {"section": ["s1"] * 3 + ["s2"] * 3, "patient": ["p1"] * 3 + ["p2"] * 3},
        index=[f"c{i}" for i in range(6)]), var=pd.DataFrame(index=list("ABCD")))
    a.layers["counts"] = X
    a.obsm["spatial"] = np.column_stack([np.arange(6) * 10.0, np.arange(6) * 5.0])
    a.uns["cpnn_input"] = {"image_path": "img.png", "mpp": 0.5, "spot_diameter_um": 55.0,
                           "sample_id": "cohort", "patient_id": "multiple", "platform": "synthetic"}
    from PIL import Image

    Image.fromarray(np.zeros((100, 100, 3), np.uint8)).save(tmp_path / "img.png")
    a.write_h5ad(tmp_path / "x.h5ad")
    b = read_spatial_h5ad(tmp_path / "x.h5ad")
    np.testing.assert_array_equal(b.X.toarray(), X)
    assert b.uns["cpnn_input"]["image_path"] == str(tmp_path / "img.png")
    assert b.uns["cpnn_input"]["mpp"] == 0.5 and b.uns["cpnn_input"]["platform"] == "synthetic"
    assert b.uns["cpnn_input"]["counts_source"] == "layers['counts']"
    assert b.obs["section"].tolist() == ["s1"] * 3 + ["s2"] * 3
    assert b.obs["patient"].tolist() == ["p1"] * 3 + ["p2"] * 3
    # the file's own mpp wins; a disagreeing mpp= / --mpp is ignored, loudly (issue 16)
    with pytest.warns(UserWarning, match="is ignored"):
        c = read_spatial_h5ad(tmp_path / "x.h5ad", mpp=0.25, sample_id="only")
    assert c.uns["cpnn_input"]["mpp"] == 0.5 and set(c.obs["section"]) == {"only"}


def test_spatial_h5ad_errors(tmp_path):
    a = ad.AnnData(X=np.array([[0.5, 1.0], [2.0, 3.0]], np.float32))
    a.write_h5ad(tmp_path / "noxy.h5ad")
    with pytest.raises(CPNNInputError, match="non-integer"):
        read_spatial_h5ad(tmp_path / "noxy.h5ad")
    a.X = np.array([[1, 1], [2, 3]], np.float32)
    a.write_h5ad(tmp_path / "noxy.h5ad")
    with pytest.raises(CPNNInputError, match=r"no obsm\['spatial'\]"):
        read_spatial_h5ad(tmp_path / "noxy.h5ad")
    a.obsm["spatial"] = np.zeros((2, 2))
    a.write_h5ad(tmp_path / "ok.h5ad")
    with pytest.raises(CPNNInputError, match="image not found"):
        read_spatial_h5ad(tmp_path / "ok.h5ad", image_path=tmp_path / "nope.png")
    with pytest.raises(CPNNInputError, match="no image given"):
        read_spatial_h5ad(tmp_path / "ok.h5ad", require_image=True)
    with pytest.raises(CPNNInputError, match=".h5ad file not found"):
        read_spatial_h5ad(tmp_path / "missing.h5ad")

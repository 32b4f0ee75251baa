"""HER2ST reader on the real data (skips when ../shared/data is absent)."""
from __future__ import annotations

import os
import shutil

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from cpnn.data import read_her2st, read_her2st_clusters, read_her2st_proportions, read_spatial_h5ad
from cpnn.data.her2st import fit_pixel_pitch, read_spot_file
from cpnn.errors import CPNNInputError
from cpnn.utils import find_data_dir

pytestmark = pytest.mark.realdata

DATA = find_data_dir()
ROOT = None if DATA is None else DATA / "her2st"
if ROOT is None or not (ROOT / "data" / "ST-cnts" / "C2.tsv.gz").is_file():
    pytest.skip("real HER2ST data not found (set CPNN_DATA_DIR or place ../shared/data/her2st)",
                allow_module_level=True)


@pytest.fixture(scope="module")
def c2():
    return read_her2st(ROOT, "C2")["C2"]


@pytest.fixture(scope="module")
def c2_counts():
    return pd.read_csv(ROOT / "data" / "ST-cnts" / "C2.tsv.gz", sep="\t", index_col=0)


def test_c2_shape_genes_and_counts_match_file(c2, c2_counts):
    assert 170 <= c2.n_obs <= 200
    assert c2.n_vars == c2_counts.shape[1]
    assert list(c2.var_names) == list(c2_counts.columns)
    # reference: the same rows straight from pandas
    ref = c2_counts.loc[c2.obs_names].to_numpy()
    np.testing.assert_array_equal(c2.X.toarray(), ref.astype(np.float32))
    assert c2.X.dtype == np.float32 and c2.X.format == "csr"
    # obs order follows the counts file
    pos = c2_counts.index.get_indexer(c2.obs_names)
    assert (np.diff(pos) > 0).all()


def test_c2_min_counts_drop_recorded(c2, c2_counts):
    rec = c2.uns["cpnn_input"]
    low = c2_counts.index[c2_counts.sum(axis=1) < 50].tolist()
    assert rec["n_dropped_min_counts"] == len(low) >= 1
    assert rec["dropped_min_counts"] == low
    assert np.asarray(c2.X.sum(axis=1)).min() >= 50


def test_c2_coordinates_mpp_and_record(c2):
    rec = c2.uns["cpnn_input"]
    spots = read_spot_file(ROOT / "data" / "ST-spotfiles" / "C2_selection.tsv")
    np.testing.assert_array_equal(c2.obsm["spatial"], spots.loc[c2.obs_names, ["pixel_x", "pixel_y"]].to_numpy())
    w, h = rec["image_size"]
    xy = c2.obsm["spatial"]
    assert (xy[:, 0] >= 0).all() and (xy[:, 0] < w).all()
    assert (xy[:, 1] >= 0).all() and (xy[:, 1] < h).all()
    assert w > 9000 and h > 9000
    assert 0.68 < rec["mpp"] < 0.70
    # reference fit with numpy.polyfit
    sx = np.polyfit(spots["x"], spots["pixel_x"], 1)[0]
    sy = np.polyfit(spots["y"], spots["pixel_y"], 1)[0]
    assert rec["mpp"] == pytest.approx(200 / ((sx + sy) / 2), rel=1e-9)
    assert 5 < rec["pitch_fit"]["residual_rms_px_x"] < 60
    assert rec["mpp_source"] == "fitted_pitch"
    assert rec["spot_diameter_um"] == 100 and rec["platform"] == "legacy_st"
    assert rec["sample_id"] == "C2" and rec["patient_id"] == "C"
    assert rec["image_path"].endswith("5714_HE_BT_C2.jpg")
    assert set(c2.obs["section"]) == {"C2"} and set(c2.obs["patient"]) == {"C"}


def test_given_mpp_kept_and_h5ad_roundtrip(tmp_path):
    a = read_her2st(ROOT, ["C3"], mpp=0.7)["C3"]
    assert a.uns["cpnn_input"]["mpp"] == 0.7
    assert a.uns["cpnn_input"]["mpp_source"] == "given"
    assert 0.68 < a.uns["cpnn_input"]["mpp_fitted"] < 0.70
    a.write_h5ad(tmp_path / "c3.h5ad")
    b = ad.read_h5ad(tmp_path / "c3.h5ad")
    np.testing.assert_array_equal(b.obsm["spatial"], a.obsm["spatial"])
    # the generic reader takes image and mpp back from uns["cpnn_input"]
    c = read_spatial_h5ad(tmp_path / "c3.h5ad")
    assert (c.X != a.X).nnz == 0
    assert c.uns["cpnn_input"]["mpp"] == 0.7
    assert c.uns["cpnn_input"]["image_path"] == a.uns["cpnn_input"]["image_path"]
    assert c.uns["cpnn_input"]["platform"] == "legacy_st"
    assert set(c.obs["patient"]) == {"C"}


@pytest.mark.parametrize("level,n_types", [("major", 8), ("minor", 22), ("subset", 41)])
def test_proportions_align_with_counts(c2, level, n_types):
    p = read_her2st_proportions(ROOT, "C2", level, obs_names=c2.obs_names)
    assert list(p.index) == list(c2.obs_names)
    assert p.shape == (c2.n_obs, n_types)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-3)
    raw = pd.read_csv(ROOT / "res" / "ST-deconv" / "props" / level / "C2-proportion.tsv", sep="\t", index_col=0)
    np.testing.assert_allclose(p.to_numpy(), raw.loc[c2.obs_names].to_numpy())


def test_clusters_reindexed_by_array_ids(c2):
    cl = read_her2st_clusters(ROOT, "C2")
    assert cl.index[0] == "25x13"  # the file names this row '6930.58x3510.24'
    common = cl.index.intersection(c2.obs_names)
    assert len(common) >= c2.n_obs - 5
    spots = read_spot_file(ROOT / "data" / "ST-spotfiles" / "C2_selection.tsv")
    np.testing.assert_allclose(cl.loc[common, "pixel_x"], spots.loc[common, "pixel_x"])
    with pytest.raises(CPNNInputError, match="absent"):
        read_her2st_clusters(ROOT, "C2", obs_names=c2.obs_names)  # two spots lack a label


# ----------------------------------------------------------------------- error cases
@pytest.fixture()
def mini(tmp_path):
    """A small copy of C2 (40 spots, 400 genes) in the her2st layout."""
    root = tmp_path / "her2st"
    (root / "data" / "ST-cnts").mkdir(parents=True)
    (root / "data" / "ST-spotfiles").mkdir(parents=True)
    img_dir = root / "data" / "ST-imgs" / "C" / "C2"
    img_dir.mkdir(parents=True)
    counts = pd.read_csv(ROOT / "data" / "ST-cnts" / "C2.tsv.gz", sep="\t", index_col=0)
    top = counts.sum(axis=0).sort_values(ascending=False).index[:400]
    counts = counts.iloc[:40][list(top)]
    counts.to_csv(root / "data" / "ST-cnts" / "C2.tsv.gz", sep="\t")
    spots = pd.read_csv(ROOT / "data" / "ST-spotfiles" / "C2_selection.tsv", sep="\t")
    ids = spots["x"].astype(str) + "x" + spots["y"].astype(str)
    spots[ids.isin(counts.index)].to_csv(root / "data" / "ST-spotfiles" / "C2_selection.tsv", sep="\t", index=False)
    src = ROOT / "data" / "ST-imgs" / "C" / "C2" / "5714_HE_BT_C2.jpg"
    try:
        os.symlink(src, img_dir / src.name)
    except OSError:
        shutil.copy(src, img_dir / src.name)
    return root, counts


def _spots_path(root):
    return root / "data" / "ST-spotfiles" / "C2_selection.tsv"


def test_mini_reads_like_real(mini):
    root, counts = mini
    a = read_her2st(root, "C2", min_counts=0)["C2"]
    assert a.n_obs == 40 and a.n_vars == 400
    np.testing.assert_array_equal(a.X.toarray(), counts.to_numpy(np.float32))


def test_missing_section_lists_available(mini):
    root, _ = mini
    with pytest.raises(CPNNInputError, match=r"\['Z9'\] not found; available: \['C2'\]"):
        read_her2st(root, ["Z9"])


def test_missing_image_names_searched_folder(mini):
    root, _ = mini
    for p in (root / "data" / "ST-imgs" / "C" / "C2").iterdir():
        p.unlink()
    with pytest.raises(CPNNInputError, match=r"ST-imgs/C/C2.*no image") as ei:
        read_her2st(root, "C2")
    assert "require_image=False" in str(ei.value)
    a = read_her2st(root, "C2", require_image=False, min_counts=0)["C2"]
    assert a.uns["cpnn_input"]["image_path"] is None
    assert a.n_obs == 40


def test_few_unmatched_spot_ids_are_dropped_and_counted(mini):
    root, _ = mini
    sp = pd.read_csv(_spots_path(root), sep="\t")
    removed = sp.iloc[:3]
    sp.iloc[3:].to_csv(_spots_path(root), sep="\t", index=False)
    a = read_her2st(root, "C2", min_counts=0)["C2"]
    assert a.n_obs == 37
    assert a.uns["cpnn_input"]["n_counts_without_position"] == 3
    gone = set(removed["x"].astype(str) + "x" + removed["y"].astype(str))
    assert not gone & set(a.obs_names)


def test_mismatched_spot_ids_raise_with_counts_and_examples(mini):
    root, _ = mini
    sp = pd.read_csv(_spots_path(root), sep="\t")
    sp["x"] = sp["x"] + 100  # ids of another array region
    sp.to_csv(_spots_path(root), sep="\t", index=False)
    with pytest.raises(CPNNInputError, match=r"0 matched, 40 selected spot\(s\) without counts \(e\.g\. \['1\d\dx"):
        read_her2st(root, "C2")


def test_float_array_coordinates_accepted(mini):
    root, _ = mini
    sp = pd.read_csv(_spots_path(root), sep="\t")
    sp["x"] = sp["x"].astype(float)
    sp["y"] = sp["y"].astype(float)
    sp.to_csv(_spots_path(root), sep="\t", index=False)
    assert "10.0" in _spots_path(root).read_text()
    a = read_her2st(root, "C2", min_counts=0)["C2"]
    assert a.n_obs == 40


@pytest.mark.parametrize("bad,pattern", [(np.nan, "NaN"), (-1, "negative"), (2.5, "non-integer")])
def test_invalid_counts_raise(mini, bad, pattern):
    root, counts = mini
    c = counts.astype(float)
    c.iloc[5, 7] = bad
    c.to_csv(root / "data" / "ST-cnts" / "C2.tsv.gz", sep="\t")
    with pytest.raises(CPNNInputError, match=pattern) as ei:
        read_her2st(root, "C2")
    assert "C2.tsv.gz" in str(ei.value) and "Fix:" in str(ei.value)


def test_proportions_missing_spot_raises(c2):
    names = list(c2.obs_names[:5]) + ["99x99"]
    with pytest.raises(CPNNInputError, match=r"1 of 6 requested spots are absent, e\.g\. \['99x99'\]"):
        read_her2st_proportions(ROOT, "C2", "major", obs_names=names)
    with pytest.raises(CPNNInputError, match="unknown level"):
        read_her2st_proportions(ROOT, "C2", "tiny")


def test_pitch_fit_reference_on_exact_grid():
    xs, ys = np.meshgrid(np.arange(5, 15), np.arange(3, 9))
    df = pd.DataFrame({"x": xs.ravel(), "y": ys.ravel()})
    df["pixel_x"] = 290.0 * df["x"] + 12
    df["pixel_y"] = 290.0 * df["y"] - 40
    fit = fit_pixel_pitch(df)
    assert fit["px_per_step_x"] == pytest.approx(290.0)
    assert fit["residual_rms_px_y"] == pytest.approx(0.0, abs=1e-6)
    assert fit["mpp"] == pytest.approx(200 / 290)

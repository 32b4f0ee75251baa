"""Whole-slide prediction: tissue tiles -> cached features -> per-tile and bulk outputs."""
from __future__ import annotations

import h5py
import numpy as np
import pytest
from PIL import Image

from cpnn.config import CPNNConfig, TrainConfig
from cpnn.errors import CPNNInputError


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A CPNN on 1,280-d features (EfficientNet-Lite0's), trained one epoch on noise.

    Its patches are 448 µm (224 px at 2 µm/px), so that test slides give a few tiles."""
    from cpnn.model import CPNN

    rng = np.random.default_rng(0)

    class P:
        values = rng.gamma(1.0, 1.0, size=(3, 10)) + 0.1
        cell_types = ["tumour", "stroma", "immune"]
        genes = [f"G{j}" for j in range(10)]
        provenance = {"method": "test"}

    model = CPNN(P(), CPNNConfig(hidden=(8,)), TrainConfig(max_epochs=1, early_stopping="none", progress=False),
                 encoder={"name": "efficientnet-lite0", "patch_um": 448.0, "out_px": 224, "tta": "none"})
    model.fit(rng.normal(size=(40, 1280)).astype(np.float32), rng.poisson(20, size=(40, 10)) + 1,
              composition_targets=None)
    path = tmp_path_factory.mktemp("run") / "model.cpnn"
    model.save(path)
    return model, path


def tissue_png(path, size=(900, 700)):
    """Pink tissue blob on a white background (a slide without metadata: mpp must be given)."""
    h, w = size[1], size[0]
    yy, xx = np.mgrid[:h, :w]
    img = np.full((h, w, 3), 245, np.uint8)
    blob = ((xx - 450) / 330.0) ** 2 + ((yy - 350) / 250.0) ** 2 < 1
    noise = np.random.default_rng(0).integers(0, 40, size=(h, w, 1))
    img[blob] = (np.array([200, 120, 170]) - noise[blob]).astype(np.uint8)
    Image.fromarray(img).save(path)
    return path


def test_predict_slide_outputs_and_cache(tiny_model, tmp_path):
    from cpnn.workflows.wsi import predict_slide

    model, _ = tiny_model
    slide = tissue_png(tmp_path / "blob.png")
    feats = tmp_path / "feats"
    # 224 px at 2 µm/px = 448 µm tiles; at 1 µm/px level 0 a tile is 448 px
    a = predict_slide(model, slide, mpp=1.0, features_dir=feats, out=tmp_path / "pred.h5ad", progress=False)
    with h5py.File(feats / "blob.h5", "r") as fh:
        coords = fh["coords"][:]
        f = fh["features"][:]
    assert 1 <= a.n_obs == len(coords) < 4  # only tiles on the blob (a 2 x 2 grid has one blank corner)
    np.testing.assert_allclose(a.obsm["spatial"], coords + 224.0, atol=1)  # centres = corner + half a tile
    assert list(a.var_names) == model.genes
    assert a.obsm["cpnn_weights"].shape == (a.n_obs, 3)
    ref = model.predict(f, bags=[0, len(f)])
    np.testing.assert_allclose(a.X, np.log1p(ref["spot_expr"] * 1e4), rtol=1e-5)
    np.testing.assert_allclose(a.uns["cpnn"]["bulk_prediction"], np.log1p(ref["bag_expr"][0] * 1e4), rtol=1e-5)
    sp = a.uns["spatial"]["blob"]
    assert sp["scalefactors"]["spot_diameter_fullres"] == pytest.approx(448.0)
    assert sp["images"]["hires"].shape[1] == pytest.approx(900 * sp["scalefactors"]["tissue_hires_scalef"], abs=1)
    import anndata as ad

    back = ad.read_h5ad(tmp_path / "pred.h5ad")
    np.testing.assert_allclose(back.X, a.X)
    mtime = (feats / "blob.h5").stat().st_mtime_ns
    predict_slide(model, slide, mpp=1.0, tile_px=224, target_mpp=2.0, features_dir=feats, progress=False)
    assert (feats / "blob.h5").stat().st_mtime_ns == mtime  # features reused, not re-extracted
    with pytest.raises(CPNNInputError, match="trained on 448 µm patches"):
        predict_slide(model, slide, mpp=1.0, tile_px=224, target_mpp=0.5, features_dir=feats, progress=False)


def test_predict_slide_needs_mpp_and_a_real_file(tiny_model, tmp_path):
    from cpnn.workflows.wsi import predict_slide

    model, _ = tiny_model
    slide = tissue_png(tmp_path / "blob.png")
    with pytest.raises(CPNNInputError, match="mpp"):
        predict_slide(model, slide, features_dir=tmp_path, progress=False)
    with pytest.raises(CPNNInputError, match="not found"):
        predict_slide(model, tmp_path / "nope.svs", mpp=0.5, features_dir=tmp_path, progress=False)
    bad = tmp_path / "bad.svs"
    bad.write_bytes(b"II*\x00" + b"\x00" * 64)
    with pytest.raises(CPNNInputError):
        predict_slide(model, bad, mpp=0.5, features_dir=tmp_path, progress=False)


def test_cli_predict_slide(tiny_model, tmp_path, capsys):
    from cpnn.cli import main

    _, model_path = tiny_model
    slide = tissue_png(tmp_path / "blob.png")
    out = tmp_path / "o" / "pred.h5ad"
    rc = main(["predict-slide", str(model_path), "--slide", str(slide), "--mpp", "1.0", "--tile-px", "224",
               "--target-mpp", "2.0", "--out", str(out), "--no-progress"])
    assert rc == 0 and out.is_file() and (tmp_path / "o" / "features" / "blob.h5").is_file()
    assert main(["predict-slide", str(model_path), "--slide", str(slide), "--out", str(out), "--no-progress"]) == 2
    assert "--mpp" in capsys.readouterr().err


def test_predict_slide_is_a_deprecated_alias_of_predict_with_slide(tiny_model, tmp_path, capsys):
    # one command per job: `predict --slide` takes every option `predict-slide` had
    import anndata as ad

    from cpnn.cli import main

    _, model_path = tiny_model
    slide = tissue_png(tmp_path / "blob.png")
    common = ["--slide", str(slide), "--mpp", "1.0", "--tile-px", "224", "--target-mpp", "2.0", "--min-tissue",
              "0.2", "--no-progress"]
    assert main(["predict", str(model_path), *common, "--out", str(tmp_path / "a.h5ad")]) == 0
    assert "deprecated" not in capsys.readouterr().err
    assert main(["predict-slide", str(model_path), *common, "--out", str(tmp_path / "b.h5ad")]) == 0
    assert "`cpnn predict-slide` is deprecated" in capsys.readouterr().err
    a, b = ad.read_h5ad(tmp_path / "a.h5ad"), ad.read_h5ad(tmp_path / "b.h5ad")
    assert a.n_obs > 0 and a.uns["cpnn"]["tile_px"] == 224
    np.testing.assert_array_equal(a.X, b.X)


def test_real_svs_tiling_extraction_and_errors(data_dir, tmp_path, tiny_model):
    from cpnn.cli import main
    from cpnn.workflows.wsi import predict_slide, slide_features

    wsi = data_dir / "wsi"
    # small scale: 448 µm tiles keep this to a handful of tiles per slide
    ff, facts = slide_features(wsi / "cmu-1-small-region.svs", "efficientnet-lite0", tile_px=224, target_mpp=2.0,
                               features_dir=tmp_path, progress=False)
    assert facts["mpp"] == pytest.approx(0.499) and ff.features.shape[1] == 1280 and len(ff) > 0
    assert np.isfinite(ff.features).all()
    with h5py.File(tmp_path / "cmu-1-small-region.h5", "r") as fh:  # CLAM/TRIDENT layout
        assert fh["features"].shape == (len(ff), 1280) and fh["coords"].shape == (len(ff), 2)
    with pytest.raises(CPNNInputError, match="microns-per-pixel"):
        slide_features(wsi / "tcga-cr-7395-01a-01-ts1.svs", "efficientnet-lite0", features_dir=tmp_path)
    model, _ = tiny_model
    a = predict_slide(model, wsi / "tcga-cr-7395-01a-01-ts1.svs", mpp=0.25, tile_px=224, target_mpp=2.0,
                      features_dir=tmp_path, progress=False)
    assert a.n_obs > 0 and a.uns["spatial"]["tcga-cr-7395-01a-01-ts1"]["scalefactors"]["spot_diameter_fullres"] \
        == pytest.approx(448 / 0.25)
    with pytest.raises(CPNNInputError, match="could not be opened"):
        predict_slide(model, wsi / "broken.svs", mpp=0.5, features_dir=tmp_path, progress=False)
    assert main(["extract-tiles", "--slide", str(wsi / "broken.svs"), "--out", str(tmp_path), "--no-progress"]) == 2


def test_predict_slide_uses_a_trident_file_as_is(tiny_model, tmp_path):
    from cpnn.workflows.wsi import predict_slide

    model, _ = tiny_model
    slide = tissue_png(tmp_path / "blob.png")
    feats = tmp_path / "feats"
    feats.mkdir()
    rng = np.random.default_rng(0)
    f = rng.normal(size=(5, 1280)).astype(np.float32)
    with h5py.File(feats / "blob.h5", "w") as fh:  # TRIDENT-like: no cpnn attributes
        fh["features"] = f
        fh["coords"] = np.arange(10).reshape(5, 2) * 100
        fh["coords"].attrs["patch_size_level0"] = 448
        fh["coords"].attrs["level0_mpp"] = 1.0
    before = (feats / "blob.h5").read_bytes()
    a = predict_slide(model, slide, mpp=1.0, features_dir=feats, progress=False)
    assert a.n_obs == 5 and (feats / "blob.h5").read_bytes() == before
    np.testing.assert_allclose(a.obsm["spatial"], np.arange(10).reshape(5, 2) * 100 + 224.0)
    np.testing.assert_allclose(a.X, np.log1p(model.predict(f, bags=[0, 5])["spot_expr"] * 1e4), rtol=1e-5)
    with h5py.File(feats / "blob.h5", "a") as fh:
        fh["coords"].attrs["patch_size_level0"] = 224  # 224 µm tiles: not the model's 448 µm
    with pytest.raises(CPNNInputError, match="224 µm tiles"):
        predict_slide(model, slide, mpp=1.0, features_dir=feats, progress=False)


def test_cpnn_predict_routes_a_whole_slide(tiny_model, tmp_path):
    """`cpnn predict RUN --slide SLIDE` is the same verb as for spots (issue 6)."""
    import anndata as ad

    from cpnn.cli import main

    _, model_path = tiny_model
    slide = tissue_png(tmp_path / "blob.png")
    out = tmp_path / "pred.h5ad"
    assert main(["predict", str(model_path), "--slide", str(slide), "--mpp", "1.0", "--out", str(out),
                 "--no-progress"]) == 0
    a = ad.read_h5ad(out)
    assert {"spatial", "cpnn_weights"} <= set(a.obsm) and "bulk_prediction" in a.uns["cpnn"]

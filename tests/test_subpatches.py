"""Spots as bags of sub-patches: geometry, extraction, files, context, CPNN bags, the
benchmark harness and the run folder, each against a reference computation."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import anndata as ad

from cpnn.encoders import Encoder, read_feature_file, write_feature_file
from cpnn.errors import CPNNInputError
from cpnn.image import ArraySlide
from cpnn.workflows.context import context_features
from cpnn.workflows.features import spot_features, subpatch_centres


def _encoder():
    """A cheap deterministic CNN encoder; ``.calls`` counts its forward passes."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 5, stride=2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten())
    net.calls = 0
    net.register_forward_hook(lambda module, args, out: setattr(module, "calls", module.calls + 1))
    return Encoder("tiny", net, dim=8, input_px=32, mean=(0.5,) * 3, std=(0.25,) * 3)


@pytest.fixture(scope="module")
def slide():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(300, 400, 3), dtype=np.uint8)
    img[:, :200] //= 2
    return ArraySlide(img, mpp=0.5, name="synthetic")


def _spots(xy):
    a = ad.AnnData(np.ones((len(xy), 3), np.float32),
                   obs=pd.DataFrame(index=[f"s{i}" for i in range(len(xy))]))
    a.obsm["spatial"] = np.asarray(xy, dtype=np.float64)
    return a


def test_subpatch_centres_tile_the_spot_square(slide):
    # 40 um at 0.5 um/px = 80 px square; 2 x 2 sub-patches of 40 px centred +-20 px away
    centres, ids = subpatch_centres(np.array([[200.0, 150.0], [5.0, 290.0]]), ["a", "b"], 40.0, 2, slide)
    np.testing.assert_allclose(centres[:4], [[180, 130], [220, 130], [180, 170], [220, 170]])
    assert ids == ["a#0", "a#1", "a#2", "a#3", "b#0", "b#1", "b#2", "b#3"]
    # beyond the image edge: moved onto it (x >= 0, y <= H - 1)
    np.testing.assert_allclose(centres[4:], [[0, 270], [25, 270], [0, 299], [25, 299]])
    three, _ = subpatch_centres(np.array([[200.0, 150.0]]), ["a"], 60.0, 3, slide)
    assert len(three) == 9
    np.testing.assert_allclose(np.unique(three[:, 0]), [160, 200, 240])  # 120 px square in thirds


def test_subpatch_features_equal_separately_encoded_sub_patches(slide, tmp_path):
    adata = _spots([[120.0, 100.0], [300.0, 200.0], [200.0, 60.0]])
    enc = _encoder()
    feats = spot_features(adata, enc, slide=slide, patch_um=40.0, out_px=32, subpatch_grid=2, progress=False,
                          cache_path=tmp_path / "sub.h5")
    assert feats.shape == (3, 4, 8) and enc.model.calls > 0
    # reference: each sub-patch as its own 20 um "spot"
    centres, ids = subpatch_centres(adata.obsm["spatial"], list(adata.obs_names), 40.0, 2, slide)
    ref = spot_features(_spots(centres), _encoder(), slide=slide, patch_um=20.0, out_px=32, progress=False)
    np.testing.assert_allclose(feats.reshape(12, 8), ref, rtol=1e-5, atol=1e-6)
    ff = read_feature_file(tmp_path / "sub.h5")
    assert ff.ids == ids and ff.attrs["patch_um"] == pytest.approx(20.0)
    # a rerun reuses the complete file: no forward pass
    enc2 = _encoder()
    again = spot_features(adata, enc2, slide=slide, patch_um=40.0, out_px=32, subpatch_grid=2, progress=False,
                          cache_path=tmp_path / "sub.h5")
    assert enc2.model.calls == 0
    np.testing.assert_array_equal(again, feats)
    with pytest.raises(CPNNInputError, match="subpatch_grid"):
        spot_features(adata, enc, slide=slide, patch_um=40.0, subpatch_grid=0, progress=False)


def test_sub_patch_files_are_read_back_as_bags_by_id(tmp_path):
    from cpnn.workflows.spatial import SpatialSample, check_feature_grid, read_features_for

    rng = np.random.default_rng(0)
    adata = _spots(rng.uniform(0, 100, size=(5, 2)))
    f = rng.normal(size=(5, 4, 6)).astype(np.float32)
    ids = [f"s{i}#{j}" for i in range(5) for j in range(4)]
    order = rng.permutation(20)  # any row order: aligned by id
    write_feature_file(tmp_path / "S.h5", f.reshape(20, 6)[order], np.zeros((20, 2), np.int64),
                       {"encoder": "tiny"}, ids=[ids[i] for i in order])
    got = read_features_for(SpatialSample("S", adata), tmp_path)
    np.testing.assert_array_equal(got, f)
    check_feature_grid(got, 2)
    with pytest.raises(CPNNInputError, match="4 sub-patches per spot.*--subpatch-grid 2"):
        check_feature_grid(got, 1)
    with pytest.raises(CPNNInputError, match="one patch per spot"):
        check_feature_grid(f[:, 0], 2)
    keep = [i for i in range(20) if ids[i] != "s3#2"]
    write_feature_file(tmp_path / "T.h5", f.reshape(20, 6)[keep], np.zeros((19, 2), np.int64), {},
                       ids=[ids[i] for i in keep])
    with pytest.raises(CPNNInputError, match="s3#2"):
        read_features_for(SpatialSample("T", adata), tmp_path)


def test_context_of_sub_patch_bags_is_the_ring_mean_of_spot_means():
    rng = np.random.default_rng(1)
    gx, gy = np.meshgrid(np.arange(4), np.arange(3))
    xy = np.stack([gx.ravel(), gy.ravel()], 1) * 200.0
    f = rng.normal(size=(12, 4, 3)).astype(np.float32)
    out = context_features(f, xy, rings=1)
    assert out.shape == (12, 4, 6)
    np.testing.assert_array_equal(out[:, :, :3], f)
    ring = context_features(f.mean(1), xy, rings=1)[:, 3:]
    for j in range(4):
        np.testing.assert_allclose(out[:, j, 3:], ring, rtol=1e-6)
    assert context_features(f, xy, rings=0).shape == f.shape


def test_cpnn_takes_sub_patch_bags(toy_problem, one_torch_thread):
    from cpnn.config import CPNNConfig, TrainConfig
    from cpnn.model import CPNN
    from cpnn.model.cpnn_model import per_observation

    rng = np.random.default_rng(0)
    base = toy_problem["features"]
    bags = np.stack([base + 0.1 * rng.normal(size=base.shape) for _ in range(3)], axis=1).astype(np.float32)
    model = CPNN(toy_problem["prototypes"], CPNNConfig(hidden=(8,)),
                 TrainConfig(max_epochs=3, progress=False, seed=0))
    model.fit(bags, toy_problem["counts"])
    out = model.predict(bags)
    n, k, _ = bags.shape
    assert out["weights"].shape == (n * k, 4) and out["bag_weights"].shape == (n, 4)
    # the same as the explicit list-of-bags form
    ref = model.predict([b for b in bags])
    for key in out:
        np.testing.assert_allclose(out[key], ref[key], rtol=1e-6)
    per = per_observation(out, bags)
    np.testing.assert_array_equal(per["expression"], out["bag_expr"])
    np.testing.assert_allclose(per["weights"], out["weights"].reshape(n, k, 4).mean(1), rtol=1e-5, atol=1e-6)
    flat = per_observation(model.predict(bags[:, 0]), bags[:, 0])
    assert flat["expression"].shape == (n, len(model.genes))


def test_model_record_refuses_a_different_grid():
    from cpnn.model.cpnn_model import check_encoder

    check_encoder({"name": "e", "subpatch_grid": 2}, {"name": "e", "subpatch_grid": 2})
    with pytest.raises(CPNNInputError, match="subpatch_grid: model 2, features 1.*--subpatch-grid 2"):
        check_encoder({"name": "e", "patch_um": 112.0, "subpatch_grid": 2}, {"subpatch_grid": 1})
    with pytest.raises(CPNNInputError, match="subpatch_grid: model 1, features 2"):
        check_encoder({"name": "e"}, {"subpatch_grid": 2})  # older records: one patch per spot


def test_whole_slide_tiles_take_the_sub_patch_scale():
    from cpnn.workflows.wsi import _tile_settings

    class M:
        encoder = {"patch_um": 112.0, "out_px": 224, "subpatch_grid": 2}

    assert _tile_settings(M(), None, None) == (224, 0.25)
    M.encoder = {"patch_um": 112.0, "out_px": 224}
    assert _tile_settings(M(), None, None) == (224, 0.5)


def test_benchmark_probes_see_the_mean_and_cpnn_the_bags(one_torch_thread):
    """Ridge on (N, k, D) bags == ridge on their mean (reference run); CPNN runs on bags."""
    from cpnn._constants import TRUE_PROPORTIONS
    from cpnn.data.synthetic import make_synthetic_cohort
    from cpnn.evaluate.benchmark import BenchmarkData, resolve_config, run_benchmark
    from cpnn.workflows.spatial import SpatialSample

    cohort = make_synthetic_cohort(n_slides=4, n_types=3, n_genes=40, image_px=512, spot_pitch_um=40,
                                   spot_diameter_um=40, n_ref_cells=300, seed=0)
    rng = np.random.default_rng(0)
    w = rng.normal(size=(3, 10))
    bags, means = [], []
    for sl in cohort.slides:
        p = np.asarray(sl.spots.obsm[TRUE_PROPORTIONS])
        f = (p @ w)[:, None, :] + 0.3 * rng.normal(size=(len(p), 4, 10))
        bags.append(SpatialSample(sl.slide_id, sl.spots.copy(), f.astype(np.float32)))
        means.append(SpatialSample(sl.slide_id, sl.spots.copy(), f.mean(1).astype(np.float32)))
    cfg = resolve_config({
        "data": {"kind": "synthetic", "proportions": {"level": "true"}},
        "split": {"by": "patient", "scheme": "leave_one_group_out", "val_fraction": 0.2},
        "reference": {"label": "cell_type", "qc": {"min_genes": 10}},
        "gene_sets": [{"name": "top20", "kind": "top_expressed", "n": 20}],
        "methods": [{"name": "ridge", "kind": "ridge", "alphas": [1.0, 10.0], "n_components": 8},
                    {"name": "cpnn", "kind": "cpnn", "prototypes": "naive", "hidden": [8],
                     "train": {"max_epochs": 2, "n_models": 1}}],
        "evaluation": {"figures": False},
    })
    res_bags = run_benchmark(BenchmarkData(bags, reference=cohort.reference), cfg, None, progress=False)
    res_mean = run_benchmark(BenchmarkData(means, reference=cohort.reference), cfg, None, progress=False,
                             methods=["ridge"])
    a = res_bags.results.query("method == 'ridge'").reset_index(drop=True)
    b = res_mean.results.query("method == 'ridge'").reset_index(drop=True)
    np.testing.assert_allclose(a["pcc_mean"], b["pcc_mean"], rtol=1e-6)
    cp = res_bags.results.query("method == 'cpnn'")
    assert len(cp) == len(a) and np.isfinite(cp["pcc_mean"]).all()


def test_fit_and_predict_run_folder_with_sub_patch_features(tmp_path, one_torch_thread, capsys):
    """`cpnn fit --subpatch-grid 2 --features DIR` then `cpnn predict`: one row per spot,
    the grid recorded in the model, a one-patch feature folder refused."""
    import cpnn
    from cpnn.cli import main
    from cpnn.data import make_synthetic_cohort, read_spatial_h5ad
    from cpnn.prototypes import reference_qc

    cohort = make_synthetic_cohort(n_slides=3, n_types=3, n_genes=40, image_px=512, n_ref_cells=300, seed=2)
    cohort.save(tmp_path / "cohort")
    rng = np.random.default_rng(0)
    mix = rng.normal(size=(3, 16))
    (tmp_path / "sub").mkdir()
    (tmp_path / "one").mkdir()
    for sl in cohort.slides:
        a = read_spatial_h5ad(tmp_path / "cohort" / f"{sl.slide_id}.h5ad")
        p = np.asarray(a.obsm["true_proportions"])
        f = ((p @ mix)[:, None, :] + 0.1 * rng.normal(size=(a.n_obs, 4, 16))).astype(np.float32)
        ids = [f"{o}#{j}" for o in map(str, a.obs_names) for j in range(4)]
        write_feature_file(tmp_path / "sub" / f"{sl.slide_id}.h5", f.reshape(-1, 16),
                           np.zeros((len(ids), 2), np.int64), {"encoder": "efficientnet-lite0", "patch_um": 56.0},
                           ids=ids)
        write_feature_file(tmp_path / "one" / f"{sl.slide_id}.h5", f.mean(1), np.zeros((a.n_obs, 2), np.int64),
                           {"encoder": "efficientnet-lite0", "patch_um": 112.0}, ids=list(map(str, a.obs_names)))
    ref = reference_qc(cohort.reference, "cell_type", min_genes=5)
    cpnn.build_prototypes(ref, "cell_type", method="naive", genes=cohort.genes).save(tmp_path / "protos.h5ad")
    h5 = [str(tmp_path / "cohort" / f"{s.slide_id}.h5ad") for s in cohort.slides[:2]]
    test = str(tmp_path / "cohort" / f"{cohort.slides[2].slide_id}.h5ad")
    common = ["--reference", str(tmp_path / "protos.h5ad"), "--epochs", "2", "--no-progress",
              "--context-rings", "1", "--patch-um", "112"]
    assert main(["fit", "--h5ad", *h5, "--features", str(tmp_path / "sub"), *common, "--subpatch-grid", "1",
                 "--out", str(tmp_path / "bad")]) != 0
    assert "holds 4 sub-patches per spot" in capsys.readouterr().err
    # no grid asked for: the feature files decide
    assert main(["fit", "--h5ad", *h5, "--features", str(tmp_path / "sub"), *common,
                 "--out", str(tmp_path / "run")]) == 0
    import json

    assert json.loads((tmp_path / "run" / "config.json").read_text())["options"]["features"]["subpatch_grid"] == 2
    model = cpnn.CPNN.load(tmp_path / "run" / "model.cpnn")
    assert model.encoder["subpatch_grid"] == 2 and model.scaler.in_dim == 32  # sub-patch + ring mean
    assert main(["predict", str(tmp_path / "run"), "--h5ad", test, "--features", str(tmp_path / "sub"),
                 "--out", str(tmp_path / "pred.h5ad"), "--no-progress"]) == 0
    pred = ad.read_h5ad(tmp_path / "pred.h5ad")
    n = read_spatial_h5ad(test).n_obs
    assert pred.shape == (n, len(model.genes)) and pred.obsm["cpnn_weights"].shape == (n, 3)
    np.testing.assert_allclose(pred.obsm["cpnn_weights"].sum(1), 1.0, rtol=1e-5)
    # every sub-patch's own mixture, and where it lies: the spot's weights are their mean
    sub = pred.obsm["cpnn_subpatch_weights"]
    assert sub.shape == (n, 4, 3)
    np.testing.assert_allclose(sub.mean(1), pred.obsm["cpnn_weights"], rtol=1e-5, atol=1e-6)
    layout = pred.uns["cpnn"]["subpatches"]
    mpp = float(read_spatial_h5ad(test).uns["cpnn_input"]["mpp"])
    side = 112.0 / 2 / mpp
    assert layout["grid"] == 2 and layout["side_fullres"] == pytest.approx(side)
    np.testing.assert_allclose(layout["offsets_fullres"], [[-side / 2, -side / 2], [side / 2, -side / 2],
                                                           [-side / 2, side / 2], [side / 2, side / 2]])
    from cpnn.plot.maps import read_prediction, subpatch_view

    view = subpatch_view(pred, read_prediction(pred))
    assert view.weights.shape == (4 * n, 3) and view.size_px == pytest.approx(side)
    np.testing.assert_allclose(view.xy[1] - pred.obsm["spatial"][0], [side / 2, -side / 2])
    assert main(["plot", str(tmp_path / "pred.h5ad"), "--out", str(tmp_path / "figs"), "--dpi", "40"]) == 0
    assert (tmp_path / "figs" / "celltype_weights_subpatches.png").stat().st_size > 1000
    assert main(["predict", str(tmp_path / "run"), "--h5ad", test, "--features", str(tmp_path / "one"),
                 "--out", str(tmp_path / "p2.h5ad"), "--no-progress"]) != 0
    assert "holds one patch per spot" in capsys.readouterr().err
    # one patch per spot (e.g. CLAM/TRIDENT files) trains a one-patch model
    assert main(["fit", "--h5ad", *h5, "--features", str(tmp_path / "one"), *common,
                 "--out", str(tmp_path / "run1")]) == 0
    assert cpnn.CPNN.load(tmp_path / "run1" / "model.cpnn").encoder["subpatch_grid"] == 1


def test_fit_defaults_choose_the_grid():
    from types import SimpleNamespace

    from cpnn.workflows.fit import FitOptions, resolve_subpatch_grid

    base = dict(reference="r.h5ad", label=None, batch=None, prototype_method=None, genes=None, n_top_genes=None,
                level=None, seed=None, encoder=None, patch_um=None, tta=None, context_rings=None,
                subpatch_grid=None, features=None, epochs=None)

    def grid(cfg=None, features_dir=None, **over):
        opts = FitOptions.from_sources(cfg or {}, SimpleNamespace(**{**base, **over}))
        resolve_subpatch_grid(opts, features_dir)
        return opts.features.subpatch_grid

    assert grid() == 2  # spots extracted: 2 x 2 sub-patches
    assert grid(features_dir="dir") is None  # the feature files decide
    assert grid(level="bulk") == 1
    assert grid({"features": {"subpatch_grid": 3}}, features_dir="dir") == 3
    assert grid(subpatch_grid=1) == 1
    opts = FitOptions(reference="r.h5ad")  # Python: the same rules
    resolve_subpatch_grid(opts)
    assert opts.features.subpatch_grid == 2


def test_real_her2st_spots_as_sub_patch_bags(data_dir, tmp_path, one_torch_thread):
    """Three real HER2ST C2 spots: 2 x 2 EfficientNet-Lite0 sub-patches of 56 um each, in a
    resumable file whose rows are the sub-patches, read back as the same bags."""
    from cpnn.data import read_her2st
    from cpnn.encoders import create_encoder
    from cpnn.workflows.spatial import SpatialSample, read_features_for

    c2 = read_her2st(data_dir / "her2st", ["C2"])["C2"][:3].copy()
    enc = create_encoder("efficientnet-lite0")
    (tmp_path / "f").mkdir()
    feats = spot_features(c2, enc, patch_um=112.0, out_px=224, subpatch_grid=2, progress=False,
                          cache_path=tmp_path / "f" / "C2.h5")
    assert feats.shape == (3, 4, 1280) and np.isfinite(feats).all()
    # four different pieces of tissue per spot, not one patch repeated
    assert np.abs(feats[:, 1:] - feats[:, :1]).max(axis=2).min() > 1e-3
    ff = read_feature_file(tmp_path / "f" / "C2.h5")
    assert len(ff) == 12 and ff.ids[:4] == [f"{c2.obs_names[0]}#{j}" for j in range(4)]
    assert ff.attrs["patch_um"] == pytest.approx(56.0) and ff.attrs["patch_size_px"] == 224
    np.testing.assert_array_equal(read_features_for(SpatialSample("C2", c2), tmp_path / "f"), feats)

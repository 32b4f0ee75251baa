"""Prediction AnnDatas (spots via the API and `cpnn predict`, whole slides) carry every key
scanpy/squidpy and `cpnn plot` need; model files describe themselves; save/load is exact."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

ad = pytest.importorskip("anndata")
pytest.importorskip("torch")

import cpnn  # noqa: E402
from cpnn.api import fit_spatial, predict_spatial  # noqa: E402
from cpnn.cli import main  # noqa: E402
from cpnn.errors import CPNNInputError  # noqa: E402

ENCODER = {"name": "efficientnet-lite0", "patch_um": 224.0, "out_px": 112}


def _features(adata, dim, seed):
    """Features that carry the true composition (so the model has signal), plus noise."""
    rng = np.random.default_rng(seed)
    p = np.asarray(adata.obsm["true_proportions"], dtype=np.float32)
    mix = np.random.default_rng(0).normal(size=(p.shape[1], dim)).astype(np.float32)
    return p @ mix + 0.05 * rng.normal(size=(adata.n_obs, dim)).astype(np.float32)


@pytest.fixture(scope="module")
def cohort_run(tmp_path_factory):
    from cpnn.data import make_synthetic_cohort, read_spatial_h5ad
    from cpnn.encoders import write_feature_file
    from cpnn.prototypes import reference_qc

    root = tmp_path_factory.mktemp("cohort")
    cohort = make_synthetic_cohort(n_slides=4, n_types=3, n_genes=40, image_px=768, n_ref_cells=300, seed=1)
    cohort.save(root / "cohort")
    sections = {s.slide_id: read_spatial_h5ad(root / "cohort" / f"{s.slide_id}.h5ad") for s in cohort.slides}
    feats = {sid: _features(a, 1280, i) for i, (sid, a) in enumerate(sections.items())}
    (root / "feats").mkdir()
    for sid, a in sections.items():
        write_feature_file(root / "feats" / f"{sid}.h5", feats[sid],
                           np.asarray(a.obsm["spatial"], dtype=np.int64), {"encoder": ENCODER["name"]},
                           ids=list(map(str, a.obs_names)))
    ref = reference_qc(cohort.reference, "cell_type", min_genes=5)
    protos = cpnn.build_prototypes(ref, "cell_type", method="naive", genes=cohort.genes)
    protos.save(root / "prototypes.h5ad")
    model = fit_spatial({k: sections[k] for k in ("S01", "S02", "S03")}, feats, protos,
                        cpnn.CPNNConfig(hidden=(16,)), cpnn.TrainConfig(max_epochs=5, progress=False),
                        encoder=ENCODER)
    return dict(root=root, cohort=cohort, sections=sections, feats=feats, protos=protos, model=model)


def check_prediction(pred, model, source=None, level="spot"):
    """Every key of a prediction AnnData, against the model (and the input section)."""
    n, g, k = pred.n_obs, len(model.genes), len(model.cell_types)
    assert list(pred.var_names) == model.genes
    x = np.asarray(pred.X)
    assert x.shape == (n, g) and x.dtype == np.float32 and np.isfinite(x).all()
    np.testing.assert_allclose(np.expm1(x.astype(np.float64)).sum(1), 1e4, rtol=1e-3)  # log1p CP10k
    w = np.asarray(pred.obsm["cpnn_weights"])
    assert w.shape == (n, k)
    np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-4)
    assert pred.obsm["spatial"].shape == (n, 2)
    assert list(pred.obs["cpnn_dominant_type"].astype(str)) == [model.cell_types[i] for i in w.argmax(1)]
    if level == "spot" or "cpnn_prototypes" in pred.varm:  # predict_slide does not write them (yet)
        t = np.asarray(pred.varm["cpnn_prototypes"])
        assert t.shape == (g, k) and (t > 0).all()
    info = pred.uns["cpnn"]
    assert list(info["cell_types"]) == model.cell_types
    assert info["level"] == level
    assert info["encoder"]["name"] == model.encoder["name"]
    libs = list(pred.uns["spatial"])
    assert len(libs) == 1
    entry = pred.uns["spatial"][libs[0]]
    img = np.asarray(entry["images"]["hires"])
    assert img.ndim == 3 and img.shape[2] == 3 and img.dtype == np.uint8 and max(img.shape[:2]) <= 2000
    sf = entry["scalefactors"]
    for key in ("tissue_hires_scalef", "spot_diameter_fullres", "microns_per_pixel"):
        assert float(sf[key]) > 0, key
    if source is not None:
        np.testing.assert_allclose(pred.obsm["spatial"], source.obsm["spatial"])
        info_in = source.uns["cpnn_input"]
        np.testing.assert_allclose(sf["spot_diameter_fullres"], info_in["spot_diameter_um"] / info_in["mpp"])
        assert float(sf["microns_per_pixel"]) == pytest.approx(info_in["mpp"])
        from PIL import Image

        with Image.open(info_in["image_path"]) as im:
            full_w = im.size[0]
        assert abs(sf["tissue_hires_scalef"] * full_w - img.shape[1]) <= 1
        counts = source[:, model.genes].X
        counts = counts.toarray() if hasattr(counts, "toarray") else counts
        lc = pred.layers["counts"]
        np.testing.assert_array_equal(lc.toarray() if hasattr(lc, "toarray") else lc, counts)
        assert libs[0] == info_in["sample_id"]


def test_api_prediction_has_every_key_and_survives_h5ad(cohort_run, tmp_path):
    model, sec = cohort_run["model"], cohort_run["sections"]["S04"]
    pred = predict_spatial(model, sec, cohort_run["feats"]["S04"])
    check_prediction(pred, model, sec)
    pred.write_h5ad(tmp_path / "p.h5ad")
    back = ad.read_h5ad(tmp_path / "p.h5ad")
    check_prediction(back, model, sec)
    np.testing.assert_array_equal(back.X, pred.X)


def test_save_load_predict_again_is_identical_through_anndata(cohort_run, tmp_path):
    model, sec, f = cohort_run["model"], cohort_run["sections"]["S04"], cohort_run["feats"]["S04"]
    model.save(tmp_path / "m.cpnn")
    again = cpnn.CPNN.load(tmp_path / "m.cpnn", genes=model.genes, encoder=ENCODER["name"])
    a, b = predict_spatial(model, sec, f), predict_spatial(again, sec, f)
    np.testing.assert_array_equal(a.X, b.X)
    np.testing.assert_array_equal(a.obsm["cpnn_weights"], b.obsm["cpnn_weights"])
    np.testing.assert_array_equal(a.varm["cpnn_prototypes"], b.varm["cpnn_prototypes"])


def test_model_file_describes_itself_and_refuses_mismatches(cohort_run, tmp_path):
    import torch

    model = cohort_run["model"]
    path = model.save(tmp_path / "m.cpnn")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    assert payload["format"] == "cpnn-model" and payload["cpnn_version"] == cpnn.__version__
    assert payload["genes"] == model.genes and payload["cell_types"] == model.cell_types
    assert payload["config"]["hidden"] == [16] and "max_epochs" in payload["train_config"]
    assert payload["prototype_provenance"]["method"] == "naive"
    assert payload["prototype_provenance"]["label_key"] == "cell_type"
    assert payload["encoder"] == ENCODER  # name and patch geometry
    assert payload["state_dict"] and tuple(payload["prototypes"].shape) == (3, len(model.genes))
    with pytest.raises(CPNNInputError, match="same genes in a different order"):
        cpnn.CPNN.load(path, genes=list(reversed(model.genes)))
    with pytest.raises(CPNNInputError, match="name: model 'efficientnet-lite0', features 'uni'"):
        cpnn.CPNN.load(path, encoder="uni")


def test_api_input_errors(cohort_run):
    model, sec = cohort_run["model"], cohort_run["sections"]["S04"]
    with pytest.raises(CPNNInputError, match="expected"):
        predict_spatial(model, sec, cohort_run["feats"]["S04"][:-1])
    with pytest.raises(CPNNInputError, match="no features for samples"):
        fit_spatial({"S01": sec}, {"S02": cohort_run["feats"]["S04"]}, cohort_run["protos"])


def test_cli_fit_predict_plot_files(cohort_run, tmp_path):
    """`cpnn fit` / `cpnn predict` / `cpnn plot` on files, as a user would run them."""
    root = cohort_run["root"]
    h5 = [str(root / "cohort" / f"{s}.h5ad") for s in ("S01", "S02", "S03")]
    rc = main(["fit", "--h5ad", *h5, "--features", str(root / "feats"), "--reference", str(root / "prototypes.h5ad"),
               "--epochs", "3", "--out", str(tmp_path / "run"), "--no-progress"])
    assert rc == 0
    out = tmp_path / "S04.h5ad"
    rc = main(["predict", str(tmp_path / "run"), "--h5ad", str(root / "cohort" / "S04.h5ad"),
               "--features", str(root / "feats"), "--out", str(out), "--no-progress"])
    assert rc == 0
    pred = ad.read_h5ad(out)
    model = cpnn.CPNN.load(tmp_path / "run" / "model.cpnn")
    check_prediction(pred, model, cohort_run["sections"]["S04"])
    # the command line and the Python API give the same numbers
    again = predict_spatial(model, cohort_run["sections"]["S04"], cohort_run["feats"]["S04"])
    np.testing.assert_allclose(pred.X, again.X, rtol=1e-6)
    assert main(["plot", str(out), "--out", str(tmp_path / "figs"), "--dpi", "50", "--max-types", "2"]) == 0
    assert (tmp_path / "figs" / "celltype_weights.png").stat().st_size > 1000


@pytest.mark.slow
def test_whole_slide_prediction_file(cohort_run, tmp_path):
    """`predict_slide` on the real CMU-1 crop: every key, the bulk profile, and its figures."""
    from cpnn.plot import plot_prediction
    from cpnn.utils import find_data_dir
    from cpnn.workflows.wsi import predict_slide

    data = find_data_dir()
    slide = None if data is None else data / "wsi" / "cmu-1-small-region.svs"
    if slide is None or not slide.is_file():
        pytest.skip("real data folder (wsi/cmu-1-small-region.svs) not found; set CPNN_DATA_DIR")
    pytest.importorskip("openslide")
    model = cohort_run["model"]  # 1,280-d input: EfficientNet-Lite0 tile features fit it
    pred = predict_slide(model, slide, out=tmp_path / "cmu1.h5ad", features_dir=tmp_path / "f", progress=False)
    back = ad.read_h5ad(tmp_path / "cmu1.h5ad")
    check_prediction(back, model, level="slide")
    entry = back.uns["spatial"]["cmu-1-small-region"]
    # tiles of 224 µm at the slide's 0.499 µm/px
    assert entry["scalefactors"]["spot_diameter_fullres"] == pytest.approx(224.0 / 0.499, rel=0.01)
    bulk = np.asarray(back.uns["cpnn"]["bulk_prediction"])
    assert bulk.shape == (len(model.genes),)
    np.testing.assert_allclose(np.expm1(bulk.astype(np.float64)).sum(), 1e4, rtol=1e-3)
    np.testing.assert_allclose(back.uns["cpnn"]["bulk_weights"], pred.obsm["cpnn_weights"].mean(0), atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no prototypes in slide files -> no drivers figure
        paths = plot_prediction(back, tmp_path / "figs", dpi=50)
    assert {"celltype_weights", "dominant_type", "genes"} <= set(paths)
    assert all(p.stat().st_size > 1000 for p in paths.values())


def test_scanpy_renders_a_prediction_file(cohort_run, tmp_path):
    sc = pytest.importorskip("scanpy", reason="scanpy is optional; install scanpy<1.12 to check the layout")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pred = predict_spatial(cohort_run["model"], cohort_run["sections"]["S04"], cohort_run["feats"]["S04"])
    pred.write_h5ad(tmp_path / "p.h5ad")
    back = ad.read_h5ad(tmp_path / "p.h5ad")
    sc.pl.spatial(back, color=[back.var_names[0], "cpnn_dominant_type"], library_id="S04", show=False)
    plt.savefig(tmp_path / "scanpy.png", dpi=50)
    plt.close("all")
    assert (tmp_path / "scanpy.png").stat().st_size > 1000


@pytest.mark.slow
def test_cpnn_fit_under_torchrun_matches_one_process(cohort_run, tmp_path):
    """`torchrun --nproc_per_node 2 -m cpnn.cli fit ...` trains data-parallel (gloo) and
    gives the model one process gives, within float tolerance."""
    import os
    import subprocess
    import sys

    root = cohort_run["root"]
    h5 = [str(root / "cohort" / f"{s}.h5ad") for s in ("S01", "S02", "S03")]
    # no dropout: its random masks are drawn per process, so they cannot match one process
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("model: {dropout: 0.0}\ntrain: {n_models: 2}\n")
    args = ["fit", "--h5ad", *h5, "--features", str(root / "feats"), "--reference", str(root / "prototypes.h5ad"),
            "--epochs", "3", "--config", str(cfg), "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "cpnn.cli", *args, "--out", str(tmp_path / "two")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = cpnn.CPNN.load(tmp_path / "one" / "model.cpnn")
    two = cpnn.CPNN.load(tmp_path / "two" / "model.cpnn")
    f = cohort_run["feats"]["S04"]
    a = predict_spatial(one, cohort_run["sections"]["S04"], f)
    b = predict_spatial(two, cohort_run["sections"]["S04"], f)
    np.testing.assert_allclose(b.X, a.X, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(b.obsm["cpnn_weights"], a.obsm["cpnn_weights"], rtol=1e-3, atol=1e-4)


@pytest.mark.slow
def test_cpnn_fit_and_predict_on_held_out_real_her2st_section(data_dir, tmp_path, one_torch_thread):
    """The `cpnn fit` / `cpnn predict` functions on real HER2ST spots with the package
    defaults (EfficientNet-Lite0, 2 x 2 sub-patches, context): the held-out C6 prediction
    file has every key, against the section it came from."""
    from cpnn.data import read_her2st
    from cpnn.prototypes import read_reference
    from cpnn.workflows.fit import FitOptions, read_gene_list, run_fit, run_predict
    from cpnn.workflows.spatial import SpatialSample

    secs = read_her2st(data_dir / "her2st", ["C2", "C3", "C6"])
    panel = [g for g in read_gene_list(data_dir / "her2st" / "her2st_785_genes.txt")
             if all(g in set(a.var_names) for a in secs.values())][:40]
    (tmp_path / "genes.txt").write_text("\n".join(panel))
    ref = read_reference(data_dir / "reference" / "wu2021_CID4465.h5ad", "celltype_major")
    cpnn.build_prototypes(ref, "celltype_major", method="naive", genes=panel).save(tmp_path / "protos.h5ad")
    # a few spots per section keep extraction to seconds; the whole images are still read
    train = [SpatialSample(s, secs[s][:25].copy()) for s in ("C2", "C3")]
    opts = FitOptions(reference=str(tmp_path / "protos.h5ad"), genes_file=str(tmp_path / "genes.txt"))
    opts.train.update(max_epochs=2)
    model = run_fit(train, opts, tmp_path / "run", progress=False)
    assert model.encoder["subpatch_grid"] == 2 and model.encoder["context_rings"] == 1.0
    c6 = secs["C6"][:20].copy()
    run_predict(tmp_path / "run", [SpatialSample("C6", c6)], tmp_path / "C6.h5ad", progress=False)
    back = ad.read_h5ad(tmp_path / "C6.h5ad")
    check_prediction(back, cpnn.CPNN.load(tmp_path / "run" / "model.cpnn"), c6)
    assert list(back.obs_names) == list(c6.obs_names)
    assert back.obsm["cpnn_subpatch_weights"].shape == (20, 4, len(model.cell_types))
    head = back.uns["cpnn"]["residual_head"]  # the spot default: on or off as inner CV chose
    assert model.residual is not None and bool(head["active"]) == model.residual.active
    assert ("cpnn_mixture" in back.layers) == model.residual.active
    import json

    record = json.loads((tmp_path / "run" / "metrics.json").read_text())["residual_head"]
    assert record["active"] == model.residual.active and "off" in record["inner_cv_pearson"]

"""`cpnn fit --slide-standardise/--nuclei/--stain-norm` then `cpnn predict`: the options are
recorded in the model, predict applies exactly what fit used, caches never mix, and
whole-slide prediction refuses what it cannot apply."""
from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pytest

from cpnn.errors import CPNNInputError

TINY = "tiny-new-patient-test"  # a cheap CNN: extraction cost must not dominate these tests
TINY_DIM = 8


def _tiny_encoder(device="cpu"):
    import torch

    from cpnn.encoders import Encoder

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, TINY_DIM, 5, stride=2), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    return Encoder(TINY, net.eval(), dim=TINY_DIM, input_px=32, mean=(0.5,) * 3, std=(0.25,) * 3)


def _register_tiny():
    from cpnn.encoders import list_encoders, register_encoder

    if TINY not in list_encoders():
        register_encoder(TINY, dim=TINY_DIM, input_px=32, weights="offline")(_tiny_encoder)


@pytest.fixture(scope="module")
def cohort_files(tmp_path_factory):
    import cpnn
    from cpnn.data import make_synthetic_cohort
    from cpnn.prototypes import reference_qc

    _register_tiny()
    root = tmp_path_factory.mktemp("newpatient")
    cohort = make_synthetic_cohort(n_slides=3, n_types=3, n_genes=40, image_px=320, mpp=1.0,
                                   spot_pitch_um=40.0, spot_diameter_um=40.0, n_ref_cells=300, seed=5,
                                   patient_effects={"stain": 1.0})
    cohort.save(root / "cohort")
    ref = reference_qc(cohort.reference, "cell_type", min_genes=5)
    cpnn.build_prototypes(ref, "cell_type", method="naive", genes=cohort.genes).save(root / "protos.h5ad")
    (root / "cfg.yaml").write_text(
        f"features: {{encoder: {TINY}, out_px: 32}}\n"
        "model: {residual_head: none, hidden: [16]}\ntrain: {n_models: 1}\n")
    h5 = [str(root / "cohort" / f"{s.slide_id}.h5ad") for s in cohort.slides]
    return root, h5


def _fit_predict(root, h5, name, extra):
    from cpnn.cli import main

    run, pred = root / f"run_{name}", root / f"pred_{name}.h5ad"
    common = ["--reference", str(root / "protos.h5ad"), "--config", str(root / "cfg.yaml"), "--epochs", "2",
              "--no-progress", "--patch-um", "40", "--context-rings", "0", "--subpatch-grid", "1"]
    assert main(["fit", "--h5ad", *h5[:2], *common, *extra, "--out", str(run)]) == 0
    assert main(["predict", str(run), "--h5ad", h5[2], "--out", str(pred), "--no-progress"]) == 0
    return run, ad.read_h5ad(pred)


def _cached(run, name):
    from cpnn.encoders import read_feature_file

    return np.asarray(read_feature_file(run / "features" / name).features, dtype=np.float32)


def _predicted(model, feats):
    from cpnn.model.cpnn_model import per_observation

    return np.log1p(per_observation(model.predict(feats), feats)["expression"] * 1e4)


@pytest.mark.parametrize("option", ["robust", "nuclei", "macenko"])
def test_fit_predict_round_trip_applies_the_recorded_option(cohort_files, option, one_torch_thread):
    import cpnn
    from cpnn.image.nuclei import NUCLEUS_FEATURES
    from cpnn.workflows.transforms import standardise_slide

    root, h5 = cohort_files
    flags = {"robust": ["--slide-standardise", "robust"], "nuclei": ["--nuclei"],
             "macenko": ["--stain-norm", "macenko"]}[option]
    run, pred = _fit_predict(root, h5, option, flags)
    model = cpnn.CPNN.load(run / "model.cpnn")
    enc = model.encoder
    used = json.loads((run / "config.json").read_text())["used"]["features"]
    test_id = "S03"
    if option == "robust":
        assert enc["slide_standardise"] == "robust" and used["slide_standardise"] == "robust"
        raw = _cached(run, f"{test_id}.h5")
        expected = _predicted(model, standardise_slide(raw, "robust"))
        assert not np.allclose(_predicted(model, raw), expected, atol=1e-3)  # the option matters
    elif option == "nuclei":
        assert enc["nuclei"] is True and model.scaler.in_dim == TINY_DIM + len(NUCLEUS_FEATURES)
        from cpnn.data import read_spatial_h5ad
        from cpnn.workflows.spatial import FeatureSpec, SpatialSample, sample_nucleus_features

        s = SpatialSample(test_id, read_spatial_h5ad(h5[2]))
        nuc = sample_nucleus_features(s, FeatureSpec.from_encoder_info(enc))
        assert nuc.shape == (s.adata.n_obs, len(NUCLEUS_FEATURES)) and nuc[:, 0].max() > 0
        expected = _predicted(model, np.concatenate([_cached(run, f"{test_id}.h5"), nuc], axis=1))
    else:
        target = enc["stain_target"]
        assert enc["stain_norm"] == "macenko" and np.array(target["he"]).shape == (3, 2)
        assert used["stain_target"] == target
        from cpnn.image.stain import stain_target_tag

        names = sorted(p.name for p in (run / "features").iterdir())
        tag = stain_target_tag(target)
        assert names == [f"S0{i}_macenko-{tag}.h5" for i in (1, 2, 3)]  # never a plain cache name
        normed = _cached(run, f"{test_id}_macenko-{tag}.h5")
        from cpnn.data import read_spatial_h5ad
        from cpnn.workflows.features import spot_features

        plain = spot_features(read_spatial_h5ad(h5[2]), _tiny_encoder(), patch_um=40.0, out_px=32,
                              progress=False)  # the same patches in their original colours
        assert not np.allclose(normed, plain, atol=1e-3)
        expected = _predicted(model, normed)
    np.testing.assert_allclose(pred.X, expected, rtol=1e-4, atol=1e-4)
    assert pred.uns["cpnn"]["encoder"][{"robust": "slide_standardise", "nuclei": "nuclei",
                                        "macenko": "stain_norm"}[option]] not in ("none", False)


@pytest.mark.parametrize("form", ["stacked", "blend"])
def test_cli_offers_the_other_residual_head_forms_when_asked(cohort_files, one_torch_thread, form):
    root, h5 = cohort_files
    run, pred = _fit_predict(root, h5, form, ["--residual-head", form])
    record = json.loads((run / "metrics.json").read_text())["residual_head"]
    assert record["forms_offered"] == ["additive", form]
    assert any(k.startswith(f"{form} ") for k in record["inner_cv_pearson"])  # the form was scored
    assert pred.uns["cpnn"]["residual_head"]["form"] == record["form"]
    if record["form"] == "blend":
        assert pred.uns["cpnn"]["residual_head"]["mixture_weight"] == record["mixture_weight"]


def test_whole_slide_prediction_refuses_patch_options_it_cannot_apply(cohort_files):
    import cpnn
    from cpnn.workflows.wsi import predict_bag_streaming, predict_slide

    root, _ = cohort_files
    for name, flag in (("nuclei", "--nuclei"), ("macenko", "--stain-norm")):
        if not (root / f"run_{name}").is_dir():
            pytest.skip("needs the round-trip runs of this module")
        model = cpnn.CPNN.load(root / f"run_{name}" / "model.cpnn")
        with pytest.raises(CPNNInputError, match=flag) as err:
            predict_slide(model, root / "no_such_slide.svs")
        assert "spots" in err.value.fix
        with pytest.raises(CPNNInputError):
            predict_bag_streaming(model, [np.zeros((2, model.scaler.in_dim), np.float32)])


def test_bad_option_values_are_clear_errors(capsys):
    from cpnn.cli import main
    from cpnn.workflows.spatial import FeatureSpec

    with pytest.raises(CPNNInputError) as err:
        FeatureSpec(slide_standardise="zscore")
    assert err.value.field == "slide_standardise"
    with pytest.raises(CPNNInputError) as err:
        FeatureSpec(stain_norm="reinhard")
    assert err.value.field == "stain_norm" and "macenko" in err.value.fix
    with pytest.raises(CPNNInputError):
        FeatureSpec(nuclei="yes")
    with pytest.raises(SystemExit):
        main(["fit", "--h5ad", "x.h5ad", "--reference", "r", "--out", "o", "--stain-norm", "reinhard"])
    assert "invalid choice" in capsys.readouterr().err


def test_precomputed_features_cannot_be_stain_normalised(tmp_path):
    from cpnn.workflows.spatial import FeatureSpec, attach_features

    with pytest.raises(CPNNInputError, match="stain-normalised") as err:
        attach_features([], FeatureSpec(stain_norm="macenko"), features_dir=tmp_path, progress=False)
    assert err.value.field == "--stain-norm"


def test_old_model_records_have_the_options_off():
    from cpnn.workflows.spatial import FeatureSpec

    spec = FeatureSpec.from_encoder_info({"name": "efficientnet-lite0", "patch_um": 112.0, "out_px": 224})
    assert (spec.slide_standardise, spec.nuclei, spec.stain_norm, spec.stain_target) == ("none", False, "none", None)
    assert spec.cache_name("C2") == "C2.h5"


def test_python_api_applies_the_recorded_slide_standardisation(cohort_files, one_torch_thread):
    import cpnn
    from cpnn.api import fit_spatial, predict_spatial
    from cpnn.data import read_spatial_h5ad
    from cpnn.workflows.transforms import standardise_slide

    root, h5 = cohort_files
    adatas = {f"S0{i + 1}": read_spatial_h5ad(p) for i, p in enumerate(h5)}
    rng = np.random.default_rng(0)
    feats = {k: (rng.normal(size=(a.n_obs, 6)) * 3 + 10 * (k == "S03")).astype(np.float32)
             for k, a in adatas.items()}
    protos = cpnn.Prototypes.load(root / "protos.h5ad")
    model = fit_spatial({k: adatas[k] for k in ("S01", "S02")}, feats, protos,
                        cpnn.CPNNConfig(hidden=(8,)), cpnn.TrainConfig(max_epochs=2, n_models=1, progress=False),
                        encoder={"name": "x", "slide_standardise": "center"})
    pred = predict_spatial(model, adatas["S03"], feats["S03"])
    np.testing.assert_allclose(pred.X, _predicted(model, standardise_slide(feats["S03"], "center")),
                               rtol=1e-4, atol=1e-4)
    assert not np.allclose(pred.X, _predicted(model, feats["S03"]), atol=1e-3)

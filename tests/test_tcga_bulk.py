"""Slide level with GDC bulk RNA-seq: the TCGA-shaped cohort through `cpnn fit --level bulk
--bulk`, `cpnn predict RUN --features` (and --slides), with the bad cases reported."""
import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from cpnn.cli import main
from cpnn.errors import CPNNInputError


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    from cpnn.workflows.synthetic_tcga import write_tcga_cohort

    return write_tcga_cohort(tmp_path_factory.mktemp("tcga"), n_patients=8, seed=3)


@pytest.fixture(scope="module")
def fast_cfg(tmp_path_factory):
    p = tmp_path_factory.mktemp("cfg") / "fast.yaml"
    p.write_text("train:\n  n_models: 2\n  max_epochs: 6\n")
    return p


def _fit_args(c, out, cfg, *extra):
    return ["fit", "--level", "bulk", "--bulk", str(c.gdc_dir), "--sample-sheet", str(c.sample_sheet),
            "--features", str(c.features_dir), "--reference", str(c.reference), "--label", "cell_type",
            "--prototype-method", "naive", "--config", str(cfg), "--out", str(out), "--no-progress", *extra]


@pytest.fixture(scope="module")
def run(cohort, fast_cfg, tmp_path_factory):
    import contextlib
    import io

    out = tmp_path_factory.mktemp("run") / "run"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(_fit_args(cohort, out, fast_cfg)) == 0
    return out, buf.getvalue()


def test_cohort_is_a_gdc_download_with_the_bad_cases(cohort):
    from cpnn.data.bulk import read_gdc_sample_sheet, read_gdc_star_folder
    from cpnn.encoders import read_feature_file

    stars = sorted(cohort.gdc_dir.glob("*/*.rna_seq.augmented_star_gene_counts.tsv"))
    assert len(stars) == 7 and all(p.parent.name == p.name.split(".")[0] for p in stars)  # File-ID folders
    lines = stars[0].read_text().splitlines()
    assert lines[0].startswith("# gene-model") and lines[2].startswith("N_unmapped")
    first_gene = lines[6].split("\t")
    assert first_gene[0].startswith("ENSG") and "." in first_gene[0] and first_gene[1] == "ACTB"
    sheet = read_gdc_sample_sheet(cohort.sample_sheet)
    assert {"File ID", "Case ID", "Sample ID", "Sample Type"} <= set(sheet.columns)
    bulk = read_gdc_star_folder(cohort.gdc_dir, cohort.sample_sheet)
    assert bulk.n_obs == 7 and bulk.obs["sample"].str.fullmatch(r"TCGA-XS-A\d{3}-01A").all()
    feats = sorted(cohort.features_dir.glob("*.h5"))
    assert len(feats) == 8 and all(p.name.startswith("TCGA-XS-A") and "-01Z-00-DX" in p.name for p in feats)
    ff = read_feature_file(feats[0])
    assert ff.features.shape == (len(ff.coords), 32) and ff.attrs["cpnn_version"] is None  # TRIDENT-like
    bad = cohort.truth["bad_cases"]
    assert len(bad["two_slides_one_sample"]["slides"]) == 2 and bad["rna_without_slide"] == ["TCGA-XS-A003-01A"]
    assert len(bad["slide_without_rna"]) == 1


def test_fit_matches_by_barcode_pools_two_slides_and_reports_the_rest(cohort, run):
    out, console = run
    bad = cohort.truth["bad_cases"]
    # every left-out case is named on the console, even with --no-progress
    assert "matched 7 of 8 slide(s) to 6 RNA sample(s)" in console
    assert bad["slide_without_rna"][0] in console and "TCGA-XS-A003-01A" in console
    assert "2 slides pooled into one bag" in console
    cfg = json.loads((out / "config.json").read_text())
    met = json.loads((out / "metrics.json").read_text())
    for rec in (cfg["matching"], met["matching"]):
        assert rec["slides_without_rna"] == bad["slide_without_rna"]
        assert rec["rna_without_slide"] == bad["rna_without_slide"]
        assert rec["samples_with_several_slides"] == {bad["two_slides_one_sample"]["sample"]:
                                                      bad["two_slides_one_sample"]["slides"]}
    assert met["n_bags"] == 6 and cfg["options"]["level"] == "bulk" and cfg["inputs"]["sample_sheet"]
    assert cfg["used"]["train"]["n_models"] == 2 and cfg["used"]["features"]["name"] == "synthetic-composition"
    table = pd.read_csv(out / "matching.tsv", sep="\t")
    assert len(table) == 8 and table["sample"].isna().sum() == 1
    assert {"model.cpnn", "prototypes.h5ad"} <= {p.name for p in out.iterdir()}


def test_predict_one_row_per_slide_every_member_and_tile_maps(cohort, run, tmp_path):
    from cpnn.encoders import read_feature_file
    from cpnn.model import CPNN
    from cpnn.plot.maps import read_prediction

    out_dir, _ = run
    pred_path = tmp_path / "pred.h5ad"
    assert main(["predict", str(out_dir), "--features", str(cohort.features_dir), "--out", str(pred_path),
                 "--no-progress"]) == 0
    pred = ad.read_h5ad(pred_path)
    assert pred.n_obs == 8 and len(pred.uns["cpnn"]["cell_types"]) == 5 and pred.obsm["cpnn_weights"].shape[0] == 8
    np.testing.assert_allclose(pred.obsm["cpnn_weights"].sum(1), 1.0, atol=1e-4)
    model = CPNN.load(out_dir / "model.cpnn")
    assert len(model.modules) == 2
    sid = pred.obs_names[3]
    ff = read_feature_file(cohort.features_dir / f"{sid}.h5")
    want = model.predict(ff.features, bags=[0, len(ff)])
    np.testing.assert_allclose(pred[sid].X.ravel(), np.log1p(want["bag_expr"][0] * 1e4), rtol=1e-4, atol=1e-5)
    # the streamed bag prediction averages every member too (it used the first only)
    from cpnn.workflows.wsi import predict_bag_streaming

    streamed = predict_bag_streaming(model, (ff.features[s:s + 7] for s in range(0, len(ff), 7)))
    np.testing.assert_allclose(streamed["bag_expr"], want["bag_expr"][0], rtol=1e-4, atol=1e-7)
    first_only = model.modules[:1]
    model.modules, full = first_only, model.modules
    assert not np.allclose(model.predict(ff.features, bags=[0, len(ff)])["bag_expr"][0], want["bag_expr"][0])
    model.modules = full
    tiles = ad.read_h5ad(pred.obs.loc[sid, "tile_map"])
    assert tiles.n_obs == len(ff) and tiles.uns["cpnn"]["sample_id"] == sid
    view = read_prediction(pred.obs.loc[sid, "tile_map"])
    assert view.level == "tile" and view.weights.shape == (len(ff), len(model.cell_types))
    assert main(["plot", pred.obs.loc[sid, "tile_map"], "--out", str(tmp_path / "fig")]) == 0
    assert (tmp_path / "fig" / "celltype_weights.png").is_file()


def test_gene_ids_with_versions_map_through_the_reference(cohort, tmp_path):
    from cpnn.workflows.synthetic_tcga import ensembl_id
    from cpnn.workflows.bulk import map_genes_to_reference, read_bulk_input, reference_gene_table

    var = reference_gene_table(cohort.reference)
    genes = cohort.truth["genes"]
    versioned = [ensembl_id(i) for i in range(len(genes))] + ["ENSG07777777777.3"]
    idx, names, rep = map_genes_to_reference(versioned, var)
    assert names == genes and len(idx) == len(genes) and "gene_ids" in rep["how"]
    # symbols map as they are; an empty overlap is an error that names the input
    assert map_genes_to_reference(genes[:5], var)[1] == genes[:5]
    with pytest.raises(CPNNInputError, match="no gene is shared") as exc:
        map_genes_to_reference(["FOO1", "BAR2"], var, where="bulk.tsv")
    assert "bulk.tsv" in str(exc.value)
    # a samples x genes table labelled by GDC file id, renamed through the sample sheet
    sheet = pd.read_csv(cohort.sample_sheet, sep="\t")
    rng = np.random.default_rng(0)
    table = pd.DataFrame(rng.poisson(20, (len(sheet), len(versioned))), index=sheet["File ID"], columns=versioned)
    path = tmp_path / "bulk.tsv"
    table.to_csv(path, sep="\t")
    bulk = read_bulk_input(path, cohort.sample_sheet)
    assert sorted(bulk.obs_names) == sorted(sheet["Sample ID"]) and bulk.obs["patient"].str.len().eq(12).all()


def test_fit_on_an_ensembl_table_and_clear_errors(cohort, fast_cfg, tmp_path, capsys):
    from cpnn.data.bulk import read_gdc_star_folder

    bulk = read_gdc_star_folder(cohort.gdc_dir, cohort.sample_sheet, index="gene_id")
    table = pd.DataFrame(bulk.X.toarray().astype(int), index=bulk.obs["sample"],
                         columns=[f"{g}.{i % 5 + 1}" for i, g in enumerate(bulk.var_names)])  # versions again
    path = tmp_path / "bulk.csv"
    table.to_csv(path)
    args = _fit_args(cohort, tmp_path / "r", fast_cfg)
    args[args.index("--bulk") + 1] = str(path)
    args.remove("--sample-sheet"), args.remove(str(cohort.sample_sheet))
    assert main(args) == 0
    rep = json.loads((tmp_path / "r" / "config.json").read_text())["genes"]
    assert rep["n_mapped"] == len(cohort.truth["genes"]) and "gene_ids" in rep["how"]
    capsys.readouterr()
    # no slides given / spatial inputs mixed in / too few matched samples / genes that map to nothing
    assert main([a for a in _fit_args(cohort, tmp_path / "x", fast_cfg) if a not in ("--features",
                                                                                     str(cohort.features_dir))]) == 2
    assert "--bulk needs the slides" in capsys.readouterr().err
    few = tmp_path / "few"
    few.mkdir()
    for p in sorted(cohort.features_dir.glob("*.h5"))[:3]:
        (few / p.name).write_bytes(p.read_bytes())
    args = _fit_args(cohort, tmp_path / "y", fast_cfg)
    args[args.index("--features") + 1] = str(few)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "cpnn: error:" in err and "have a slide; training needs at least 4" in err and "Fix:" in err
    bad = tmp_path / "nogenes.tsv"
    table.iloc[:, :3].set_axis(["FOO1", "BAR2", "BAZ3"], axis=1).to_csv(bad, sep="\t")
    args = _fit_args(cohort, tmp_path / "z", fast_cfg)
    args[args.index("--bulk") + 1] = str(bad)
    args.remove("--sample-sheet"), args.remove(str(cohort.sample_sheet))
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "no gene is shared" in err and "nogenes.tsv" in err


@pytest.mark.slow
def test_fit_and_predict_from_pyramidal_tiff_slides(fast_cfg, tmp_path, capsys):
    """--slides: the cohort's H&E as small pyramidal TIFFs, tiled and encoded (EfficientNet-Lite0)."""
    from cpnn.workflows.synthetic_tcga import write_tcga_cohort

    c = write_tcga_cohort(tmp_path / "c", n_patients=6, seed=1, image_px=1024, tile_px=128, write_slides=True)
    args = _fit_args(c, tmp_path / "run", fast_cfg, "--patch-um", "256")
    i = args.index("--features")
    args[i:i + 2] = ["--slides", str(c.slides_dir / "*.tif")]
    assert main(args) == 0
    assert "1 RNA sample(s) without a slide" in capsys.readouterr().out
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["used"]["features"]["name"] == "efficientnet-lite0" and cfg["used"]["features"]["patch_um"] == 256
    assert len(list((tmp_path / "run" / "features").glob("*.h5"))) == 6
    out = tmp_path / "p" / "pred.h5ad"
    assert main(["predict", str(tmp_path / "run"), "--slides", str(c.slides_dir / "*A004*.tif"), "--out", str(out),
                 "--no-progress"]) == 0
    pred = ad.read_h5ad(out)
    assert pred.n_obs == 1 and pred.obs["n_tiles"].iloc[0] > 0 and pred.obsm["cpnn_weights"].shape == (1, 5)


def test_benchmark_bulk_kind_folds_by_patient_every_slide_method(tmp_path):
    """`cpnn benchmark` with data kind bulk: one observation per sample (pooled bags), 4
    patient folds, the package's slide-level methods, nested candidates on bags."""
    import yaml

    cfg = {
        "seed": 0,
        "data": {"kind": "bulk", "synthetic": {"dir": str(tmp_path / "cohort"), "n_patients": 14, "seed": 0},
                 "proportions": True},
        "split": {"by": "patient", "scheme": "k_fold", "n_folds": 4, "val_fraction": 0.2},
        "reference": {"path": "synthetic", "label": "cell_type", "qc": {"min_genes": 10}},
        "gene_sets": [{"name": "top60", "kind": "top_expressed", "n": 60}],
        "methods": [{"name": "cpnn", "kind": "cpnn", "prototypes": "naive", "train": {"max_epochs": 3, "n_models": 1}},
                    {"name": "cpnn_paper", "kind": "cpnn", "preset": "paper", "prototypes": "naive",
                     "train": {"max_epochs": 3}},
                    *[{"name": k, "kind": k, "train": {"max_epochs": 3}}
                      for k in ("meanpool_mlp", "abmil", "he2rna", "sum_of_tiles")],
                    {"name": "ridge_mean", "kind": "ridge", "alphas": "cv",
                     "candidates": {"n_components": [4, 8]}}],
        "evaluation": {"figures": False},
        # 9 training patients per outer fold: 3 inner folds keep >= 3 slides per inner test fold
        "selection": {"max_inner_folds": 3},
    }
    path = tmp_path / "b.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["benchmark", str(path), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    res = pd.read_csv(tmp_path / "out" / "results.csv")
    assert set(res["method"]) == {"cpnn", "cpnn_paper", "meanpool_mlp", "abmil", "he2rna", "sum_of_tiles",
                                  "ridge_mean"}
    assert res.groupby("method")["fold"].nunique().eq(4).all() and res["n_test"].sum() == 7 * 12
    assert res[["pcc_mean", "scc_mean"]].notna().all().all()
    # slides of one patient never straddle folds; the pooled sample is one observation
    splits = json.loads((tmp_path / "out" / "splits.json").read_text())
    tests = [i for f in splits["folds"] for i in f["test_ids"]] if "folds" in splits else None
    if tests is not None:
        assert sorted(tests) == sorted(set(tests)) and len(tests) == 12
    assert res.loc[res["method"] == "cpnn", "composition_mean"].notna().all()  # weights vs the true composition
    assert res.loc[res["method"] == "ridge_mean", "selected"].str.contains("n_components").all()
    resolved = yaml.safe_load((tmp_path / "out" / "config.resolved.yaml").read_text())
    assert resolved["data"]["matching"]["rna_without_slide"] == ["TCGA-XS-A003-01A"]
    assert len(resolved["data"]["matching"]["slides_without_rna"]) == 1


def test_bulk_benchmark_refuses_folds_of_under_three_slides(tmp_path, capsys):
    import yaml

    cfg = {"data": {"kind": "bulk", "synthetic": {"dir": str(tmp_path / "c"), "n_patients": 8, "seed": 0}},
           "split": {"by": "patient", "scheme": "k_fold", "n_folds": 4},
           "reference": {"path": "synthetic", "label": "cell_type"},
           "methods": [{"name": "ridge", "kind": "ridge"}]}
    path = tmp_path / "b.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["benchmark", str(path), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "test folds of fewer than 3 slides" in err and "Fix:" in err


@pytest.mark.slow
def test_readme_tcga_commands_run_as_written(tmp_path, monkeypatch, capsys):
    """The README's TCGA block: every `cpnn` line runs (the benchmark line's config is
    checked by test_shipped_configs; its run takes minutes)."""
    import glob
    import re
    import shlex
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = text.split("### TCGA", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1).replace("\\\n", " ")
    lines = [ln.split("#", 1)[0].strip() for ln in block.splitlines()]
    commands = [ln for ln in lines if ln.startswith("cpnn ")]
    assert [c.split()[1] for c in commands] == ["synthetic-tcga", "fit", "predict", "plot", "benchmark"]
    monkeypatch.chdir(tmp_path)
    for cmd in commands[:-1]:
        argv = []
        for a in shlex.split(cmd)[1:]:
            argv += sorted(glob.glob(a)) if "*" in a else [a]
        assert main(argv) == 0, cmd
    pred = ad.read_h5ad(tmp_path / "tcga-pred" / "slides.h5ad")
    assert pred.n_obs == 12 and len(list((tmp_path / "tcga-figures").glob("*/celltype_weights.png"))) == 12
    assert "TCGA-XS-A003-01A" in capsys.readouterr().out


def test_fit_chooses_the_composition_loss_on_training_patients(tmp_path, fast_cfg):
    """`--composition-targets auto` (the default) compares the composition loss with none by
    inner CV over the training patients and records the scores; few patients keep it."""
    from cpnn.workflows.synthetic_tcga import write_tcga_cohort

    c = write_tcga_cohort(tmp_path / "c", n_patients=12, seed=0)
    assert main(_fit_args(c, tmp_path / "run", fast_cfg)) == 0
    met = json.loads((tmp_path / "run" / "metrics.json").read_text())["composition_targets"]
    assert met["compared"] and set(met["scores"]) == {"deconvolve", "none"} and met["inner_folds"] == 3
    assert met["chosen"] == max(met["scores"], key=lambda k: (met["scores"][k], k == "deconvolve"))
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["used"]["features"]["training"]["composition_targets"]["chosen"] == met["chosen"]
    assert main(_fit_args(c, tmp_path / "run2", fast_cfg, "--composition-targets", "none")) == 0
    met2 = json.loads((tmp_path / "run2" / "metrics.json").read_text())["composition_targets"]
    assert met2 == {"compared": False, "reason": "given", "chosen": "none"}


def test_patient_level_labels_take_the_patients_slides(cohort):
    import anndata as ad_

    from cpnn.workflows.bulk import list_feature_files, match_slides

    slides = list(list_feature_files(cohort.features_dir))
    bulk = ad_.AnnData(np.ones((3, 2), np.float32), obs=pd.DataFrame(index=["TCGA-XS-A001", "TCGA-XS-A004-01",
                                                                             "other"]))
    m = match_slides(slides, bulk)
    assert len(m.bags["TCGA-XS-A001"]) == 2 and len(m.bags["TCGA-XS-A004-01"]) == 1  # 15-char sample labels too
    assert m.rna_without_slide == ["other"] and len(m.slides_without_rna) == len(slides) - 3


def test_paper_preset_on_bags_is_the_slide_head():
    """On slide bags the paper preset keeps the platform factors a, b and exp(T) (METHOD.md §3),
    not the spot head that the spot-level paper preset uses."""
    from cpnn.config import CPNNConfig
    from cpnn.evaluate import slide_methods
    from cpnn.evaluate.methods import MethodContext, TestData, TrainData

    seen = {}

    class Stop(Exception):
        pass

    def spy(options, seed, progress=False):
        seen.update(options)
        raise Stop

    ctx = MethodContext(genes=["a"], seed=0, fold=0, gene_set="g", prototypes=None, deconvolution=None)
    train = TrainData(np.empty(0, object), np.ones((0, 1)), np.empty(0), np.zeros(0, bool))
    orig = slide_methods.cpnn_configs
    slide_methods.cpnn_configs = spy
    try:
        with pytest.raises(Stop):
            slide_methods.run_cpnn_bags(train, TestData(np.empty(0, object), np.empty(0)), ctx, preset="paper")
    finally:
        slide_methods.cpnn_configs = orig
    assert seen["preset"] == "paper_slide"  # the paper's slide head, not its spot head
    from cpnn.presets import get_preset

    head = get_preset("paper_slide").model
    assert head.gene_factors == CPNNConfig().gene_factors and head.normalise_prototypes is False

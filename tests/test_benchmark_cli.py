"""``cpnn benchmark CONFIG --out DIR`` end to end on saved files (h5ad + feature files)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest


@pytest.fixture(scope="module")
def saved_cohort(tmp_path_factory):
    from cpnn._constants import SPATIAL, TRUE_PROPORTIONS
    from cpnn.data.synthetic import make_synthetic_cohort
    from cpnn.encoders import write_feature_file

    root = tmp_path_factory.mktemp("cohort")
    cohort = make_synthetic_cohort(n_slides=4, n_types=3, n_genes=40, image_px=512, spot_pitch_um=40,
                                   spot_diameter_um=40, n_ref_cells=240, seed=3)
    cohort.save(root)
    rng = np.random.default_rng(0)
    w = rng.normal(size=(3, 16))
    feats = root / "features"
    for sl in cohort.slides:
        p = np.asarray(sl.spots.obsm[TRUE_PROPORTIONS])
        f = (p @ w + 0.2 * rng.normal(size=(len(p), 16))).astype(np.float32)
        xy = np.asarray(sl.spots.obsm[SPATIAL]).astype(np.int64)
        write_feature_file(feats / f"{sl.slide_id}.h5", f, xy, {"encoder": "test-linear"},
                           ids=list(map(str, sl.spots.obs_names)))
    return root, cohort


def test_cli_benchmark_writes_results_and_report(saved_cohort, tmp_path, monkeypatch):
    from PIL import Image

    from cpnn.cli import main

    root, cohort = saved_cohort
    monkeypatch.setenv("COHORT_DIR", str(root))
    cfg = tmp_path / "bench.yaml"
    cfg.write_text(
        "seed: 1\n"
        "data:\n  kind: h5ad\n  paths: [" + ", ".join(f'"${{COHORT_DIR}}/{s.slide_id}.h5ad"' for s in cohort.slides)
        + "]\n"
        "split: {by: section, scheme: k_fold, n_folds: 2, val_fraction: 0.25}\n"
        "features: {features_dir: '${COHORT_DIR}/features'}\n"
        "reference: {path: '${COHORT_DIR}/reference.h5ad', label: cell_type, qc: {min_genes: 10}}\n"
        "gene_sets:\n  - {name: top20, kind: top_expressed, n: 20}\n  - {name: var10, kind: top_variable, n: 10}\n"
        "methods:\n"
        "  - {name: cpnn_mse, kind: cpnn, prototypes: naive, loss: mse_log1p, train: {max_epochs: 5}}\n"
        "  - {name: ridge_hest, kind: ridge, alphas: hest, n_components: 8}\n"
    )
    out = tmp_path / "out"
    assert main(["benchmark", str(cfg), "--out", str(out), "--quiet", "--no-progress"]) == 0
    res = pd.read_csv(out / "results.csv")
    assert len(res) == 2 * 2 * 2  # methods x folds x gene sets
    assert sorted(res["method"].unique()) == ["cpnn_mse", "ridge_hest"]
    assert res.groupby("gene_set")["n_genes"].max().to_dict() == {"top20": 20, "var10": 10}
    report = (out / "report.md").read_text()
    assert "by section" in report and "Wall time" in report
    resolved = (out / "config.resolved.yaml").read_text()
    assert "${COHORT_DIR}" not in resolved and str(root) in resolved
    for png in ("boxplot_pcc.png", "scatter_pcc.png", "gene_maps.png"):
        with Image.open(out / png) as im:
            assert im.format == "PNG" and min(im.size) > 200


def test_cli_benchmark_reports_bad_config(tmp_path, capsys):
    from cpnn.cli import main

    cfg = tmp_path / "bad.yaml"
    cfg.write_text("data: {kind: h5ad, paths: [x.h5ad]}\nmethods: [{name: a, kind: unknown}]\n")
    assert main(["benchmark", str(cfg), "--out", str(tmp_path / "o")]) == 2
    assert "unknown method kind" in capsys.readouterr().err


def test_benchmark_logs_each_method_and_fold_as_it_starts_and_ends(saved_cohort, tmp_path, monkeypatch, capsys):
    """A long benchmark is never silent: every method x fold announces itself before training."""
    from cpnn.cli import main

    root, cohort = saved_cohort
    monkeypatch.setenv("COHORT_DIR", str(root))
    cfg = tmp_path / "bench.yaml"
    cfg.write_text(
        "data:\n  kind: h5ad\n  paths: [" + ", ".join(f'"${{COHORT_DIR}}/{s.slide_id}.h5ad"' for s in cohort.slides)
        + "]\n"
        "split: {by: section, scheme: k_fold, n_folds: 2, val_fraction: 0.25}\n"
        "features: {features_dir: '${COHORT_DIR}/features'}\n"
        "gene_sets:\n  - {name: top20, kind: top_expressed, n: 20}\n"
        "methods:\n  - {name: ridge_hest, kind: ridge, alphas: hest, n_components: 8}\n"
        "evaluation: {figures: false}\n"
    )
    assert main(["benchmark", str(cfg), "--out", str(tmp_path / "o"), "--no-progress"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for fold in (0, 1):
        start = [i for i, ln in enumerate(lines) if f"fold {fold} " in ln and "ridge_hest: training on" in ln]
        end = [i for i, ln in enumerate(lines) if f"fold {fold} " in ln and "ridge_hest: PCC" in ln]
        assert len(start) == 1 and len(end) == 1 and start[0] < end[0], lines

"""A newcomer's path: every flag explained, `cpnn encoders`, stage lines, resolved config,
run outputs ignored by git."""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from cpnn.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]


def _subparsers(parser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices
    return {}


def test_every_flag_of_every_command_has_help():
    missing = []
    for name, sub in _subparsers(build_parser()).items():
        for action in sub._actions:
            if not isinstance(action, argparse._HelpAction) and not action.help:
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    assert not missing, missing


def test_help_lists_encoders_view_and_export(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in ("encoders", "view", "export", "fit", "predict-slide", "extract-tiles"):
        assert f"    {command}" in out, command


def test_encoders_lists_registry_without_building_models(capsys, monkeypatch):
    import cpnn.encoders.registry as registry

    def refuse(*a, **k):  # listing must never build (or download) a model
        raise AssertionError("create_encoder called")

    monkeypatch.setattr(registry, "create_encoder", refuse)
    assert main(["encoders"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines() if line and not line.startswith(("-", " "))}
    assert "offline" in rows["efficientnet-lite0"] and "1280-d" in rows["efficientnet-lite0"]
    assert "224 px" in rows["efficientnet-lite0"]
    assert "Hugging Face hub" in rows["uni"] and "1024-d" in rows["uni"] and "MahmoodLab/UNI" in rows["uni"]
    assert "448 px" in rows["conch"] and "512-d" in rows["conch"]
    assert "Patch geometry" in out


def test_encoder_info_matches_built_encoder_and_reports_missing_packages():
    from cpnn.encoders import create_encoder, encoder_info
    from cpnn.errors import CPNNInputError

    info = encoder_info("efficientnet-lite0")
    enc = create_encoder("efficientnet-lite0")
    assert (info["dim"], info["input_px"], info["weights"]) == (enc.dim, enc.input_px, "offline")
    assert info["missing"] == ()
    hub = encoder_info("phikon-v2")
    assert hub["requires"] == ("transformers",) and hub["weights"] == "hub"
    import importlib.util

    assert hub["missing"] == (() if importlib.util.find_spec("transformers") else ("transformers",))
    with pytest.raises(CPNNInputError, match="unknown encoder"):
        encoder_info("no-such-encoder")


@pytest.mark.slow
def test_fit_says_each_stage_and_records_what_it_used(tmp_path, capsys, one_torch_thread):
    """`cpnn fit` with extracted features: stage lines, labelled member bars, and a
    config.json whose sub-patch grid is the one used (it was null before)."""
    import cpnn
    from cpnn.data import make_synthetic_cohort
    from cpnn.prototypes import reference_qc

    cohort = make_synthetic_cohort(n_slides=3, n_types=3, n_genes=40, image_px=384, spot_pitch_um=60.0, spot_diameter_um=55.0,
                                   n_ref_cells=200, seed=3)
    cohort.save(tmp_path / "cohort")
    ref = reference_qc(cohort.reference, "cell_type", min_genes=5)
    cpnn.build_prototypes(ref, "cell_type", method="naive", genes=cohort.genes).save(tmp_path / "protos.h5ad")
    h5 = [str(tmp_path / "cohort" / f"{s.slide_id}.h5ad") for s in cohort.slides[:2]]
    args = ["fit", "--h5ad", *h5, "--reference", str(tmp_path / "protos.h5ad"), "--patch-um", "60",
            "--epochs", "2", "--out", str(tmp_path / "run")]
    assert main(args + ["--config", str(_two_members(tmp_path))]) == 0
    captured = capsys.readouterr()
    out, err = captured.out, captured.err
    assert "reading prototypes from" in out
    assert "features 1/2 (S01): extracting" in out and "features 2/2 (S02)" in out and "2x2 sub-patches" in out
    assert "training CPNN on the spots of 2 section(s): 2 ensemble member(s)" in out
    assert "residual head:" in out
    assert f"wrote {tmp_path / 'run'}/" in out
    assert "member 1/2" in err and "member 2/2" in err  # tqdm writes to stderr
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["options"]["features"]["subpatch_grid"] == 2
    used = config["used"]
    assert used["features"]["subpatch_grid"] == 2 and used["train"]["n_models"] == 2
    assert used["train"]["max_epochs"] == 2 and used["cell_types"] == list(cohort.cell_types)
    assert used["n_genes"] == len(used["genes"]) == 40 and used["residual_head"] is not None
    # a rerun reuses the cached features and says so
    assert main(args + ["--config", str(_two_members(tmp_path)), "--no-progress"]) == 0
    assert capsys.readouterr().out == ""
    assert main(args + ["--config", str(_two_members(tmp_path))]) == 0
    assert "reusing" in capsys.readouterr().out


def _two_members(tmp_path: Path) -> Path:
    path = tmp_path / "fit.yaml"
    path.write_text("train:\n  n_models: 2\nmodel:\n  hidden: [16]\n")
    return path


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs a git checkout")
def test_run_outputs_are_ignored_by_git_but_docs_figures_are_not():
    def ignored(path: str) -> bool:
        return subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=ROOT).returncode == 0

    for path in ("run/model.cpnn", "run_sub/config.json", "figures/genes.png", "C6_pred.h5ad",
                 "slide_pred.h5ad", "cpnn-demo/report.md", "cohort/S01.png", "viewer/index.html", "C6_view/index.html",
                 "C6.zarr/zmetadata", "C6.geojson", "model.cpnn", "prototypes.h5ad", "S04_prediction.h5ad",
                 "feats/slide.h5", "features/x.h5"):
        assert ignored(path), path
    for path in ("docs/figures/her2st_C6_celltype_weights.png", "src/cpnn/resources/viewer/viewer.js",
                 "configs/her2st_benchmark.yaml", "tests/test_newcomer_cli.py"):
        assert not ignored(path), path

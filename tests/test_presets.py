"""Presets: one place for every default, read by CPNN, cpnn fit (spot/bulk), the benchmark and
the demo; typos in configs are errors; the model file records the preset and its version."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from cpnn.config import CPNNConfig, TrainConfig, config_to_dict
from cpnn.errors import CPNNInputError
from cpnn.presets import PRESETS, get_preset

# the values each entry point used before the presets (issue 15 keeps them exactly)
OLD_SPOT_MODEL = dict(hidden=[256], dropout=0.25, loss="mse_log1p", composition_weight=1e3,
                      template_weight=1e3, residual_head="ridge")
OLD_SPOT_TRAIN = dict(max_epochs=200, batch_size=64, lr=1e-3, weight_decay=1e-2, patience=30,
                      early_stopping="val_pcc", n_models=8, val_fraction=0.25)
# ... except the spot ensemble size, re-derived by nested selection (issue 13): 4 -> 8


def _fit_args(**over):
    base = dict(reference="r.h5ad", label=None, batch=None, prototype_method=None, genes=None, n_top_genes=None,
                level=None, seed=None, encoder=None, patch_um=None, tta=None, context_rings=None,
                subpatch_grid=None, features=None, epochs=None)
    return SimpleNamespace(**{**base, **over})


def test_entry_points_keep_their_values():
    from cpnn.evaluate.methods import cpnn_configs
    from cpnn.workflows.demo import demo_settings
    from cpnn.workflows.fit import FitOptions

    spot_model = config_to_dict(CPNNConfig(**OLD_SPOT_MODEL))
    spot_train = config_to_dict(TrainConfig(**OLD_SPOT_TRAIN))
    opts = FitOptions.from_sources({}, _fit_args())
    assert opts.preset == "spot"
    assert config_to_dict(opts.model_config()) == spot_model
    assert {**config_to_dict(opts.train_config()), "progress": True} == {**spot_train, "progress": True}
    assert (opts.features.context_rings, opts.features.subpatch_grid) == (1.0, None)
    bulk = FitOptions(reference="r.h5ad", level="bulk")
    assert bulk.preset == "bulk" and bulk.train_config().batch_size == 8
    assert bulk.model_config().residual_head == "none"
    assert {**config_to_dict(bulk.train_config()), "batch_size": 64, "n_models": 8} == spot_train
    cfg, tc = cpnn_configs({}, seed=0)
    assert config_to_dict(cfg) == spot_model
    assert {**config_to_dict(tc), "progress": True} == {**spot_train, "progress": True}
    cfg, tc = cpnn_configs({"preset": "paper"}, seed=0)  # the paper's spot head and stopping rule
    assert cfg == CPNNConfig(normalise_prototypes=True, gene_factors=False) and tc.early_stopping == "val_loss"
    assert get_preset("paper_slide").model == CPNNConfig()
    demo = demo_settings()
    assert CPNNConfig(**demo["spot_model"]) == CPNNConfig(hidden=(256,), dropout=0.1, loss="nb",
                                                          composition_weight=1e2, template_weight=1e3)
    assert TrainConfig(**demo["slide_train"]) == TrainConfig(max_epochs=150, batch_size=4, patience=30)


def test_cpnn_reads_its_preset(toy_problem):
    from cpnn.model import CPNN

    plain = CPNN(toy_problem["prototypes"])
    assert plain.preset == "slide" and plain.config == CPNNConfig() and plain.train_config == TrainConfig()
    spot = CPNN(toy_problem["prototypes"], preset="spot")
    assert spot.config == PRESETS["spot"].model and spot.train_config == PRESETS["spot"].train
    spot.config.hidden = (3,)  # a model's config is its own, not the shared preset
    assert PRESETS["spot"].model.hidden == (256,)
    with pytest.raises(CPNNInputError, match="valid presets: .*paper.*spot"):
        CPNN(toy_problem["prototypes"], preset="papr")


def test_unknown_config_keys_are_errors(tmp_path):
    from cpnn.workflows.fit import FitOptions

    with pytest.raises(CPNNInputError, match="unknown config key.*modle") as err:
        FitOptions.from_sources({"modle": {"loss": "nb"}}, _fit_args(), path=tmp_path / "c.yaml")
    assert "valid keys" in str(err.value) and "model" in str(err.value)
    with pytest.raises(CPNNInputError, match="unknown key.*'train'.*max_epoch\\b.*max_epochs"):
        FitOptions.from_sources({"train": {"max_epoch": 3}}, _fit_args())
    with pytest.raises(CPNNInputError, match="'features'.*contxt_rings"):
        FitOptions.from_sources({"features": {"contxt_rings": 1}}, _fit_args())
    with pytest.raises(CPNNInputError, match="loss must be one of"):
        FitOptions.from_sources({"model": {"loss": "nbb"}}, _fit_args())


def test_model_file_records_preset_and_refuses_newer_format(toy_problem, tmp_path):
    import torch

    from cpnn.model import CPNN
    from cpnn.model.cpnn_model import FORMAT_VERSION

    model = CPNN(toy_problem["prototypes"], CPNNConfig(hidden=(8,)),
                 TrainConfig(max_epochs=2, progress=False, early_stopping="none"), preset="spot")
    model.fit(toy_problem["features"][:60], toy_problem["counts"][:60], composition_targets=None)
    path = model.save(tmp_path / "m.cpnn")
    payload = torch.load(path, weights_only=True)
    assert payload["preset"] == "spot" and payload["format_version"] == FORMAT_VERSION
    assert payload["config"]["hidden"] == [8] and payload["train_config"]["max_epochs"] == 2
    assert CPNN.load(path).preset == "spot"
    payload["format_version"] = FORMAT_VERSION + 1
    torch.save(payload, tmp_path / "new.cpnn")
    with pytest.raises(CPNNInputError, match="format version .* not one this cpnn"):
        CPNN.load(tmp_path / "new.cpnn")
    payload["format_version"] = 1
    del payload["preset"]
    torch.save(payload, tmp_path / "v1.cpnn")
    assert CPNN.load(tmp_path / "v1.cpnn").preset is None  # older files still load


def test_get_preset_returns_copies():
    p = get_preset("package")
    assert p.name == "spot"
    with pytest.raises(ValueError, match="unknown preset 'x'; valid presets"):
        get_preset("x")


def test_benchmark_config_typos_are_errors(tmp_path):
    from cpnn.evaluate.benchmark import load_config, resolve_config

    base = {"data": {"kind": "synthetic"}}
    path = tmp_path / "bench.yaml"
    path.write_text("data: {kind: synthetic}\nmethdos:\n  - {name: r, kind: ridge}\n")
    with pytest.raises(CPNNInputError, match="bench.yaml.*unknown key.*methdos.*valid keys:.*methods"):
        load_config(path)
    with pytest.raises(CPNNInputError, match=r"methods\[c\].*lsos.*valid keys:.*loss"):
        resolve_config({**base, "methods": [{"name": "c", "kind": "cpnn", "lsos": "nb"}]})
    with pytest.raises(CPNNInputError, match=r"methods\[r\]\.candidates.*alpha\b"):
        resolve_config({**base, "methods": [{"name": "r", "kind": "ridge", "candidates": {"alpha": [1, 2]}}]})
    with pytest.raises(CPNNInputError, match=r"methods\[m\].*hiden.*hidden"):
        resolve_config({**base, "methods": [{"name": "m", "kind": "mlp", "hiden": 64}]})
    with pytest.raises(CPNNInputError, match=r"split.*n_fold\b.*n_folds"):
        resolve_config({**base, "split": {"n_fold": 3}})
    ok = resolve_config({**base, "methods": [{"name": "c", "kind": "cpnn", "preset": "paper", "loss": "nb",
                                               "train": {"max_epochs": 3}}]})
    assert ok["methods"][0]["loss"] == "nb"
    with pytest.raises(CPNNInputError, match=r"methods\[c\].*max_epoch\b.*valid options:.*max_epochs"):
        resolve_config({**base, "methods": [{"name": "c", "kind": "cpnn", "train": {"max_epoch": 3}}]})

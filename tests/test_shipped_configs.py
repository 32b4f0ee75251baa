"""Every benchmark config shipped in configs/ resolves: known method kinds, unique names,
valid split settings, environment variables expanded (a typo fails here, not after an
hour of feature extraction)."""
from __future__ import annotations

from pathlib import Path

import pytest

from cpnn.evaluate.benchmark import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_configs_are_shipped():
    assert len(CONFIGS) >= 5


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_resolves(path, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = load_config(path, data_dir=str(tmp_path / "data"))
    assert cfg["methods"] and cfg["gene_sets"] and cfg["data"]["kind"]
    feat = cfg["features"]
    assert int(feat.get("subpatch_grid", 1) or 1) >= 1
    if cfg["data"]["kind"] == "her2st":
        assert cfg["data"]["root"] == str((tmp_path / "data").resolve() / "her2st")


@pytest.mark.parametrize("path", [p for p in CONFIGS if "kind: synthetic" in p.read_text()],
                         ids=lambda p: p.name)
def test_synthetic_configs_pass_valid_generator_arguments(path, tmp_path, monkeypatch):
    """data.params go to make_synthetic_cohort as they are: every key must be one of its
    arguments and patient_effects must validate, and cohorts that differ keep apart caches."""
    import inspect

    from cpnn.data.synthetic import _check_patient_effects, make_synthetic_cohort

    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = load_config(path, data_dir=str(tmp_path / "data"))
    params = dict(cfg["data"].get("params") or {})
    inspect.signature(make_synthetic_cohort).bind(**params)
    strengths = _check_patient_effects(params.get("patient_effects", 0.0))
    cache = cfg["features"].get("cache_dir", "")
    if any(strengths.values()):
        assert cache and not cache.rstrip("/").endswith("synthetic_features")
    elif cache:
        assert "patients" not in cache

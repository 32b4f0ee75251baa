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

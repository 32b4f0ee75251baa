"""The Python examples of README.md and docs/USAGE.md run as written."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [p for p in (ROOT / "README.md", ROOT / "docs" / "USAGE.md") if p.is_file()]


def _python_blocks(path: Path):
    return re.findall(r"^```python\n(.*?)^```", path.read_text(encoding="utf-8"), flags=re.S | re.M)


def test_usage_doc_exists_and_has_examples():
    assert ROOT.joinpath("docs", "USAGE.md").is_file()
    assert _python_blocks(ROOT / "docs" / "USAGE.md")
    # the README's own short usage section is executed too (it must not silently vanish)
    assert _python_blocks(ROOT / "README.md")


@pytest.mark.slow
@pytest.mark.parametrize("doc", DOCS, ids=[p.name for p in DOCS])
def test_python_examples_run_as_written(doc, tmp_path, monkeypatch):
    pytest.importorskip("torch")
    import matplotlib

    matplotlib.use("Agg")
    blocks = _python_blocks(doc)
    if not blocks:
        pytest.skip(f"{doc.name} has no python examples")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__usage__"}
    for i, code in enumerate(blocks):
        exec(compile(code, f"{doc.name}[python block {i + 1}]", "exec"), namespace)
    assert os.listdir(tmp_path)

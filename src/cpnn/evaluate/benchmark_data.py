"""What a benchmark runs on: every observation, concatenated over samples."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List

import pandas as pd


@dataclass
class BenchmarkData:
    """Every observation of the benchmark, concatenated over samples."""

    samples: List[Any]  # SpatialSample (adata, features, sample_id)
    proportions: Dict[str, pd.DataFrame] = field(default_factory=dict)  # sample -> (obs x types)
    reference: Any = None  # single-cell AnnData (raw counts) or None
    description: str = ""

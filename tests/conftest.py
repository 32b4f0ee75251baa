"""Shared fixtures; also makes an empty test run fail instead of exiting 5 quietly."""
from __future__ import annotations

import numpy as np
import pytest

from cpnn.utils import find_data_dir


def pytest_sessionfinish(session, exitstatus):
    # pytest exits with 5 when it collected nothing; CI must never read that as success
    if session.testscollected == 0:
        session.exitstatus = 1


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models: thread hand-offs cost more than the maths on a loaded 2-core box."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def data_dir():
    """The shared real-data folder, or skip with the reason."""
    path = find_data_dir()
    if path is None:
        pytest.skip("real data folder not found: set CPNN_DATA_DIR or place it at ../shared/data")
    return path


class SimplePrototypes:
    def __init__(self, values, cell_types, genes):
        self.values = values
        self.cell_types = cell_types
        self.genes = genes
        self.provenance = {"method": "test"}


@pytest.fixture
def toy_problem():
    """Features that are a noisy linear image of known proportions; NB counts."""
    rng = np.random.default_rng(0)
    k, g, d, n = 4, 60, 16, 400
    t0 = rng.gamma(0.5, 2.0, size=(k, g)) + 0.01
    t0 = t0 / t0.sum(1, keepdims=True) * 1e4
    p = rng.dirichlet(np.ones(k) * 0.7, size=n)
    feats = p @ rng.normal(size=(k, d)) + 0.2 * rng.normal(size=(n, d))
    mean = p @ t0
    mean = mean / mean.sum(1, keepdims=True) * rng.uniform(2000, 6000, size=(n, 1))
    counts = rng.negative_binomial(5, 5 / (5 + mean)).astype(np.float32)
    protos = SimplePrototypes(t0, [f"type{i}" for i in range(k)], [f"G{i}" for i in range(g)])
    return {"features": feats.astype(np.float32), "counts": counts, "proportions": p, "prototypes": protos}


def proportion_feature_samples(cohort, seed=0, dim=24, noise=0.3):
    """Spatial samples of a synthetic cohort whose 'image features' are a fixed random linear
    map of the true cell-type fractions plus noise: informative, cheap, and the same map for
    every slide (benchmark protocol and nested-selection tests)."""
    from cpnn._constants import TRUE_PROPORTIONS
    from cpnn.workflows.spatial import SpatialSample

    rng = np.random.default_rng(seed)
    w = rng.normal(size=(len(cohort.cell_types), dim))
    out = []
    for sl in cohort.slides:
        p = np.asarray(sl.spots.obsm[TRUE_PROPORTIONS])
        f = (p @ w + noise * rng.normal(size=(len(p), dim))).astype(np.float32)
        out.append(SpatialSample(sl.slide_id, sl.spots.copy(), f, meta={"image": sl.image}))
    return out

"""Deconvolution against prototypes on synthetic NB data with known proportions."""
import time

import numpy as np
import pytest
import scipy.sparse as sp

from cpnn.errors import CPNNInputError
from cpnn.prototypes import Prototypes, deconvolve


def _synthetic(n, g, k, seed=0):
    rng = np.random.default_rng(seed)
    T = rng.gamma(0.6, 1.0, (k, g))
    T = T / T.sum(1, keepdims=True) * 1e4
    P = rng.dirichlet(np.full(k, 0.5), n)
    W = P * rng.uniform(0.5, 1.5, n)[:, None]
    m = np.exp(rng.normal(0, 0.5, g))
    mu = m * (W @ T) + 0.05
    r = rng.uniform(5, 20, g)
    Y = rng.negative_binomial(r, r / (r + mu))
    return Y, T, P, m


def _mean_row_pearson(a, b):
    return float(np.mean([np.corrcoef(x, y)[0, 1] for x, y in zip(a, b)]))


@pytest.mark.parametrize("likelihood", ["nb", "poisson"])
def test_recovers_proportions_and_platform_factor(likelihood):
    Y, T, P, m = _synthetic(400, 300, 6)
    proto = Prototypes(T, [f"t{i}" for i in range(6)], [f"g{i}" for i in range(300)], "test")
    res = deconvolve(sp.csr_matrix(Y), proto, likelihood=likelihood, seed=0)
    assert res.proportions.shape == (400, 6) and res.cell_types == proto.cell_types
    np.testing.assert_allclose(res.proportions.sum(1), 1.0, atol=1e-6)
    assert np.all(res.abundances >= 0)
    assert _mean_row_pearson(P, res.proportions) >= 0.9
    assert np.corrcoef(np.log(m), np.log(res.platform_factor))[0, 1] >= 0.95
    assert np.isfinite(res.loglik) and res.platform_factor.shape == (300,)
    if likelihood == "nb":
        assert np.all(np.isfinite(res.dispersion)) and res.dispersion.shape == (300,)


def test_objective_increases_monotonically():
    Y, T, P, _ = _synthetic(200, 150, 4, seed=3)
    res = deconvolve(Y, T, likelihood="poisson", max_iter=200, tol=0)
    hist = np.asarray(res.history)
    assert np.all(np.diff(hist) >= -1e-6 * np.abs(hist[:-1]))  # majorise-minimise: monotone
    assert hist[-1] > hist[0]
    assert _mean_row_pearson(P, res.proportions) >= 0.9


def test_fast_on_2000_by_800():
    Y, T, _, _ = _synthetic(2000, 800, 10, seed=1)
    start = time.process_time()
    res = deconvolve(Y, T, likelihood="nb")
    used = time.process_time() - start
    assert res.proportions.shape == (2000, 10)
    assert used < 60, used  # a few seconds on an idle 2-core machine


def test_input_errors():
    Y, T, _, _ = _synthetic(20, 30, 3)
    with pytest.raises(CPNNInputError, match="genes"):
        deconvolve(Y[:, :29], T)
    bad = Y.astype(float)
    bad[0, 0] = -1
    with pytest.raises(CPNNInputError, match="negative"):
        deconvolve(bad, T)
    bad[0, 0] = np.nan
    with pytest.raises(CPNNInputError, match="NaN"):
        deconvolve(bad, T)
    empty = Y.copy()
    empty[[2, 5]] = 0
    with pytest.raises(CPNNInputError, match=r"2 of 20 .*rows \[2, 5\].*filter"):
        deconvolve(empty, T)
    with pytest.raises(CPNNInputError, match="likelihood"):
        deconvolve(Y, T, likelihood="gaussian")


def test_background_only_observation_gets_finite_uniform_proportions():
    # regression test: a row whose abundances all shrink to zero once gave 0/0 = NaN
    # proportions (float32 W with a 1e-300 floor), which poisoned CPNN training
    import numpy as np

    from cpnn.prototypes import deconvolve

    rng = np.random.default_rng(0)
    t = rng.gamma(1.0, 1.0, size=(3, 40)) + 0.01
    y = rng.poisson(rng.dirichlet(np.ones(3), size=30) @ t * 50).astype(np.float32)
    y[0] = 0
    y[0, 0] = 1  # one count in one gene: nothing for the cell types to explain
    out = deconvolve(y, t, seed=0)
    assert np.isfinite(out.proportions).all()
    np.testing.assert_allclose(out.proportions.sum(1), 1.0, rtol=1e-6)

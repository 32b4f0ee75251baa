import numpy as np
import pytest
from scipy import stats

from cpnn.evaluate import benjamini_hochberg, composition_agreement, expression_metrics, per_gene_correlations


def test_per_gene_correlations_match_scipy():
    rng = np.random.default_rng(1)
    true = rng.normal(size=(30, 5))
    pred = true + rng.normal(size=(30, 5))
    pred[:, 2] = np.round(pred[:, 2])  # ties
    out = per_gene_correlations(pred, true)
    for g in range(5):
        assert out["pcc"][g] == pytest.approx(stats.pearsonr(pred[:, g], true[:, g])[0], abs=1e-10)
        assert out["scc"][g] == pytest.approx(stats.spearmanr(pred[:, g], true[:, g])[0], abs=1e-10)


def test_constant_prediction_scores_zero_in_the_mean():
    rng = np.random.default_rng(2)
    true = rng.normal(size=(20, 4))
    pred = true.copy()
    pred[:, 1] = 3.0  # the method gave up on gene 1: it must cost the method, not vanish
    m = expression_metrics(pred, true)
    assert m["n_genes_scored"] == 4 and m["n_genes_constant_prediction"] == 1
    assert m["n_genes_constant"] == 0
    assert m["pcc_mean"] == pytest.approx(0.75) and m["scc_mean"] == pytest.approx(0.75)
    assert m["per_gene"]["pcc"][1] == 0.0
    assert m["n_significant"] == 3


def test_genes_constant_in_the_truth_are_counted_not_scored():
    rng = np.random.default_rng(2)
    true = rng.normal(size=(20, 4))
    true[:, 2] = 0.0  # not expressed in any test spot: no method can be scored on it
    pred = true + 0.1 * rng.normal(size=(20, 4))
    m = expression_metrics(pred, true)
    assert m["n_genes_constant"] == 1 and m["n_genes_scored"] == 3
    assert m["n_genes_constant_prediction"] == 0
    assert np.isnan(m["per_gene"]["pcc"][2])
    assert m["pcc_mean"] > 0.9


def test_benjamini_hochberg_matches_manual():
    p = np.array([0.01, 0.04, 0.03, 0.5, np.nan])
    q = benjamini_hochberg(p)
    assert np.isnan(q[4])
    np.testing.assert_allclose(q[:4], [0.04, 0.16 / 3, 0.16 / 3, 0.5])


def test_composition_agreement_per_type_and_mapping():
    rng = np.random.default_rng(3)
    ref = rng.dirichlet(np.ones(3), size=50)
    w = ref[:, [0, 1, 2]] + 0.01 * rng.normal(size=(50, 3))
    out = composition_agreement(w, ref, ["A", "B", "C"], ["A", "B", "C"])
    assert out["mean"] > 0.95 and set(out["per_type"]) == {"A", "B", "C"}
    # a constant composition has undefined per-type correlation, so it cannot score
    const = np.tile(ref.mean(0), (50, 1))
    bad = composition_agreement(const, ref, ["A", "B", "C"], ["A", "B", "C"])
    assert np.isnan(bad["mean"])
    mapped = composition_agreement(w[:, :1], ref, ["Cancer"], ["A", "B", "C"], mapping={"Cancer": "A"})
    assert mapped["n_types"] == 1
    with pytest.raises(ValueError, match="no cell type names in common"):
        composition_agreement(w, ref, ["X", "Y", "Z"], ["A", "B", "C"])

"""Nested selection in ``cpnn benchmark``: candidates are chosen per outer fold on inner
folds of that fold's training groups, and no choice can see the outer test fold."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from cpnn.errors import CPNNInputError
from cpnn.evaluate.benchmark import BenchmarkData, resolve_config, run_benchmark
from cpnn.evaluate.methods import _METHODS, MethodOutput, register_method
from cpnn.evaluate.metrics import to_log1p_cp10k
from cpnn.evaluate.selection import candidate_grid, inner_splits, select

from conftest import proportion_feature_samples


@pytest.fixture(scope="module")
def cohort():
    from cpnn.data.synthetic import make_synthetic_cohort

    # 8 sections of 4 patients: each outer fold keeps 3 training patients -> 3 inner folds
    return make_synthetic_cohort(n_slides=8, n_types=4, n_genes=50, image_px=512, spot_pitch_um=40,
                                 spot_diameter_um=40, n_ref_cells=300, seed=1)


def _samples(cohort, dim=16, noise=0.3, seed=0):
    return proportion_feature_samples(cohort, seed=seed, dim=dim, noise=noise)


def _counts_by_id(samples):
    """id -> (gene -> count) of every observation (the spy's oracle knowledge)."""
    table = {}
    for s in samples:
        x = np.asarray(s.adata.X.toarray() if hasattr(s.adata.X, "toarray") else s.adata.X, dtype=np.float64)
        frame = pd.DataFrame(x, index=[f"{s.sample_id}:{o}" for o in map(str, s.adata.obs_names)],
                             columns=list(map(str, s.adata.var_names)))
        table[s.sample_id] = frame
    return pd.concat(table.values())


@pytest.fixture()
def spy(cohort):
    """A method kind whose ``mode: oracle`` predicts the exact truth on one patient's
    spots (noise elsewhere) and ``mode: honest`` predicts truth + noise everywhere; every
    call records the ids it was given."""
    samples = _samples(cohort)
    counts = _counts_by_id(samples)
    patient_of = {sl.slide_id: sl.patient_id for sl in cohort.slides}
    calls = []
    state = {"oracle_patient": None}

    @register_method("spy")
    def run_spy(train, test, ctx, /, mode="honest", **_):
        calls.append({"fold": ctx.fold, "mode": mode, "train": set(train.ids), "test": set(test.ids)})
        truth = to_log1p_cp10k(counts.loc[list(test.ids), list(ctx.genes)].to_numpy())
        rng = np.random.default_rng(len(calls))
        if mode == "oracle":
            planted = np.array([patient_of[i.split(":")[0]] == state["oracle_patient"] for i in test.ids])
            pred = np.where(planted[:, None], truth, rng.normal(size=truth.shape))
        else:
            pred = truth + 1.5 * rng.normal(size=truth.shape)
        return MethodOutput(expression=pred)

    yield samples, calls, state, patient_of
    _METHODS.pop("spy", None)


def _cfg(methods, **over):
    cfg = {
        "data": {"kind": "synthetic"},
        "split": {"by": "patient", "scheme": "leave_one_group_out", "val_fraction": 0.2},
        "reference": {"label": "cell_type", "qc": {"min_genes": 10}},
        "gene_sets": [{"name": "top30", "kind": "top_expressed", "n": 30},
                      {"name": "var20", "kind": "top_variable", "n": 20}],
        "methods": methods,
        "evaluation": {"figures": False},
    }
    cfg.update(over)
    return resolve_config(cfg)


def test_no_choice_sees_the_outer_test_fold_and_a_test_only_oracle_is_not_chosen(spy, cohort, tmp_path):
    samples, calls, state, patient_of = spy
    cfg = _cfg([{"name": "spy", "kind": "spy", "candidates": {"mode": ["oracle", "honest"]}}])
    splits_patients = sorted(set(patient_of.values()))
    state["oracle_patient"] = splits_patients[0]  # the outer test patient of fold 0 (sorted groups)
    res = run_benchmark(BenchmarkData(samples, reference=cohort.reference), cfg, tmp_path / "b", progress=False)

    saved = json.loads((tmp_path / "b" / "splits.json").read_text())
    outer_test = {f["fold"]: set(f["test_ids"]) for f in saved["folds"]}
    assert saved["folds"][0]["test_groups"] == [state["oracle_patient"]]
    n_final = 0
    for c in calls:
        held = outer_test[c["fold"]]
        assert not (c["train"] & held), "a call trained on the outer test fold"
        if c["test"] == held:
            n_final += 1  # the one outer prediction per gene set, after the choice
        else:
            assert not (c["test"] & held), "a selection call was scored on the outer test fold"
    assert n_final == len(saved["folds"]) * 2

    r = res.results
    fold0 = r[(r["fold"] == 0)]
    # scored on the outer test fold the oracle would win fold 0 by far; nested selection
    # never sees that fold, and on the inner folds the oracle is noise
    assert set(fold0["selected"]) == {json.dumps({"mode": "honest"})}
    assert np.isfinite(r["inner_score"]).all()
    assert r.groupby("fold")["selected"].nunique().max() == 1  # one choice per fold, reused per gene set

    sel = json.loads((tmp_path / "b" / "selection.json").read_text())
    assert set(sel["spy"]) == {"0", "1", "2", "3"}
    f0 = sel["spy"]["0"]
    assert len(f0["table"]) == 2 and all(len(t["folds"]) == 3 for t in f0["table"])
    assert state["oracle_patient"] not in sum(f0["inner_test_groups"], [])


def test_ties_keep_the_first_candidate_and_scores_are_inner_means():
    groups = np.repeat(["a", "b", "c"], 5)
    seen = []

    def score(opts, tr, val, te, k):
        seen.append((opts["x"], k, set(groups[te])))
        return {"scc_mean": {1: 0.5, 2: 0.5, 3: 0.2}[opts["x"]] + 0.1 * k}

    s = select(candidate_grid({"x": [1, 2, 3]}), score, groups, max_inner_folds=4)
    assert s.choice == {"x": 1}
    assert s.score == pytest.approx(0.5 + 0.1)
    assert {frozenset(g) for _, _, g in seen} == {frozenset({"a"}), frozenset({"b"}), frozenset({"c"})}


def test_inner_splits_use_grouped_k_fold_beyond_max_inner_folds():
    groups = np.repeat(list("abcdef"), 4)
    folds = inner_splits(groups, max_inner_folds=3, seed=0, val_fraction=0.0)
    assert len(folds) == 3
    held = [set(groups[f["test"]]) for f in folds]
    assert set().union(*held) == set("abcdef") and sum(map(len, held)) == 6


def test_real_method_candidates_are_chosen_and_reported(cohort, tmp_path):
    samples = _samples(cohort)
    cfg = _cfg([{"name": "ridge", "kind": "ridge", "alphas": "cv",
                 "candidates": {"n_components": [2, 12]}}], selection={"max_inner_folds": 2})
    res = run_benchmark(BenchmarkData(samples, reference=cohort.reference), cfg, tmp_path / "r", progress=False)
    chosen = set(res.results["selected"])
    assert chosen <= {json.dumps({"n_components": 2}), json.dumps({"n_components": 12})}
    sel = json.loads((tmp_path / "r" / "selection.json").read_text())
    assert all(len(v["table"][0]["folds"]) == 2 for v in sel["ridge"].values())
    report = (tmp_path / "r" / "report.md").read_text()
    assert "## Nested selection" in report and "n_components" in report


@pytest.mark.parametrize("methods, selection, field", [
    ([{"name": "r", "kind": "ridge", "candidates": {"n_components": 4}}], None, "candidates.n_components"),
    ([{"name": "r", "kind": "ridge", "candidates": {"n_components": []}}], None, "candidates.n_components"),
    ([{"name": "r", "kind": "ridge", "candidates": {"kind": ["mlp"]}}], None, "candidates"),
    ([{"name": "r", "kind": "ridge"}], {"max_inner_fold": 3}, "selection"),
    ([{"name": "r", "kind": "ridge"}], {"metric": "r2"}, None),
])
def test_bad_candidates_are_clear_errors(methods, selection, field):
    over = {"selection": selection} if selection else {}
    if field is None:  # an unknown metric is refused when selection runs
        with pytest.raises(CPNNInputError, match="selection metric"):
            select([{"a": 1}, {"a": 2}], lambda *a: {}, np.array(["x", "y"]), metric=selection["metric"])
        return
    with pytest.raises(CPNNInputError) as err:
        _cfg(methods, **over)
    assert field in str(err.value)


def test_paper_preset_is_the_papers_spot_head_and_stopping_rule():
    from cpnn.evaluate.methods import cpnn_configs

    model, train = cpnn_configs({"preset": "paper"}, seed=0)
    assert model.normalise_prototypes and not model.gene_factors  # p_i @ softmax_genes(T), no a, b
    assert model.loss == "nb" and model.hidden == (1024, 512)
    assert train.early_stopping == "val_loss"
    over, _ = cpnn_configs({"preset": "paper", "gene_factors": True}, seed=0)
    assert over.gene_factors  # shortcuts still override the preset


def test_feature_variants_are_candidates_and_slide_standardisation_wins_under_slide_shifts(cohort, tmp_path):
    """Every slide's features carry a scanner-like offset: re-centring each slide on its
    own (unlabelled) statistics removes it, and nested selection finds that on inner folds."""
    samples = _samples(cohort, noise=0.2)
    rng = np.random.default_rng(5)
    for s in samples:
        s.features = s.features + rng.normal(scale=3.0, size=s.features.shape[1]).astype(np.float32)
        s.meta["raw_features"] = s.features  # no context in this config
    cfg = _cfg([{"name": "ridge", "kind": "ridge", "alphas": "cv", "n_components": 8,
                 "candidates": {"features": ["base", "center"]}},
                {"name": "ridge_center", "kind": "ridge", "alphas": "cv", "n_components": 8, "features": "center"},
                {"name": "ridge_base", "kind": "ridge", "alphas": "cv", "n_components": 8}],
               selection={"max_inner_folds": 3})
    res = run_benchmark(BenchmarkData(samples, reference=cohort.reference), cfg, tmp_path / "v", progress=False)
    r = res.results[res.results["gene_set"] == "top30"].set_index(["method", "fold"])
    assert (r.loc["ridge_center", "scc_mean"] > r.loc["ridge_base", "scc_mean"]).all()
    assert set(r.loc["ridge", "selected"]) == {json.dumps({"features": "center"})}
    np.testing.assert_allclose(r.loc["ridge", "scc_mean"], r.loc["ridge_center", "scc_mean"])


def test_unknown_feature_variant_is_a_clear_error():
    with pytest.raises(CPNNInputError, match="feature variant"):
        _cfg([{"name": "r", "kind": "ridge", "candidates": {"features": ["base", "hematoxylin"]}}])


def test_patient_transfer_choices_see_only_the_training_patients_sections(spy, cohort, tmp_path):
    """Train on one patient, test on the next: every call of fold f trains on sections of
    its training patient only, inner folds are scored on that patient's sections, and the
    one outer prediction per gene set is on the next patient."""
    samples, calls, state, patient_of = spy
    state["oracle_patient"] = sorted(set(patient_of.values()))[1]  # fold 0's test patient
    cfg = _cfg([{"name": "spy", "kind": "spy", "candidates": {"mode": ["oracle", "honest"]}}],
               split={"by": "section", "scheme": "patient_transfer", "val_fraction": 0.2},
               selection={"max_inner_folds": 2})
    res = run_benchmark(BenchmarkData(samples, reference=cohort.reference), cfg, tmp_path / "t", progress=False)
    saved = json.loads((tmp_path / "t" / "splits.json").read_text())
    assert saved["meta"]["scheme"] == "patient_transfer"
    patients = sorted(set(patient_of.values()))
    assert [f["train_patient"] for f in saved["folds"]] == patients
    n_final = 0
    for c in calls:
        fold = saved["folds"][c["fold"]]
        assert {patient_of[i.split(":")[0]] for i in c["train"]} == {fold["train_patient"]}
        tested = {patient_of[i.split(":")[0]] for i in c["test"]}
        if c["test"] == set(fold["test_ids"]):
            n_final += 1
            assert tested == {fold["test_patient"]}
        else:
            assert tested == {fold["train_patient"]}, "an inner fold was scored outside the training patient"
    assert n_final == len(saved["folds"]) * 2
    assert set(res.results[res.results["fold"] == 0]["selected"]) == {json.dumps({"mode": "honest"})}
    pairs = res.results.groupby("fold")[["train_patient", "test_patient"]].first()
    assert list(pairs["train_patient"]) == patients and list(pairs["test_patient"]) == patients[1:] + patients[:1]
    report = (tmp_path / "t" / "report.md").read_text()
    assert "trains on every section of one patient" in report
    assert f"| 0 | {patients[0]} → {patients[1]} |" in report  # the selection table names the pair


def test_patient_transfer_needs_section_groups():
    with pytest.raises(CPNNInputError, match="sections"):
        _cfg([{"name": "r", "kind": "ridge"}], split={"by": "patient", "scheme": "patient_transfer"})


def test_one_se_rule_keeps_the_first_candidate_unless_the_inner_folds_resolve_the_gain():
    from cpnn.evaluate.selection import choose

    tie = [{"mean": 0.271, "folds": [0.26, 0.282]}, {"mean": 0.272, "folds": [0.250, 0.294]}]
    assert choose(tie, "best") == 1  # the best mean wins by 0.001
    assert choose(tie, "one_se") == 0  # d = (-0.010, +0.012): mean 0.001 < its standard error
    clear = [{"mean": 0.20, "folds": [0.19, 0.21, 0.20]}, {"mean": 0.25, "folds": [0.245, 0.26, 0.245]},
             {"mean": 0.26, "folds": [0.20, 0.40, 0.18]}]
    assert choose(clear, "best") == 2
    assert choose(clear, "one_se") == 1  # candidate 2's gain is not resolved, candidate 1's is
    assert choose([{"mean": 0.1, "folds": [0.1]}, {"mean": 0.3, "folds": [0.3]}], "one_se") == 0  # one fold: no SE
    with pytest.raises(CPNNInputError, match="rule"):
        choose(tie, "median")


def test_one_se_rule_reaches_the_benchmark_and_its_report(spy, cohort, tmp_path):
    samples, calls, state, patient_of = spy
    cfg = _cfg([{"name": "spy", "kind": "spy", "candidates": {"mode": ["honest", "oracle"]}}],
               selection={"rule": "one_se"})
    res = run_benchmark(BenchmarkData(samples, reference=cohort.reference), cfg, tmp_path / "r", progress=False,
                        folds=[0])
    assert set(res.results["selected"]) == {json.dumps({"mode": "honest"})}
    assert res.meta["selection"]["rule"] == "one_se"
    assert "Rule `one_se`" in (tmp_path / "r" / "report.md").read_text()
    with pytest.raises(CPNNInputError, match="selection.rule"):
        _cfg([{"name": "r", "kind": "ridge"}], selection={"rule": "median"})

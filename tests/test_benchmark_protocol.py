"""The benchmark's protocol: grouped deterministic splits, training-only gene panels, no
access to test targets, and a readable report — on a small synthetic cohort."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from cpnn.errors import CPNNInputError
from cpnn.evaluate.benchmark import (
    BenchmarkData,
    _aggregate_weights,
    _comparison_mapping,
    _composition,
    _more_training_genes,
    _PrototypeCache,
    make_splits,
    resolve_config,
    run_benchmark,
)
from cpnn.evaluate.genesets import kmeans_labels, select_gene_set
from cpnn.evaluate.methods import MethodOutput, TestData, _METHODS, register_method
from cpnn.evaluate.metrics import to_log1p_cp10k

from conftest import proportion_feature_samples


@pytest.fixture(scope="module")
def cohort():
    from cpnn.data.synthetic import make_synthetic_cohort

    # 6 sections of 3 patients (two sections each), 64 spots per section
    return make_synthetic_cohort(n_slides=6, n_types=4, n_genes=60, image_px=640, spot_pitch_um=40,
                                 spot_diameter_um=40, n_ref_cells=300, seed=0)


def _samples(cohort, seed=0, dim=24, noise=0.3):
    return proportion_feature_samples(cohort, seed=seed, dim=dim, noise=noise)


def _cfg(**over):
    cfg = {
        "data": {"kind": "synthetic", "proportions": {"level": "true"}},
        "split": {"by": "patient", "scheme": "leave_one_group_out", "val_fraction": 0.2},
        "reference": {"label": "cell_type", "qc": {"min_genes": 10}},
        "gene_sets": [{"name": "top30", "kind": "top_expressed", "n": 30},
                      {"name": "var20", "kind": "top_variable", "n": 20}],
        "methods": [{"name": "ridge_cv", "kind": "ridge", "alphas": "cv", "n_components": 16}],
        "evaluation": {"figures": False},
    }
    cfg.update(over)
    return resolve_config(cfg)


def _patient_of(cohort):
    return {sl.slide_id: sl.patient_id for sl in cohort.slides}


def test_splits_never_share_a_patient_and_are_deterministic(cohort, tmp_path):
    samples = _samples(cohort)
    data = BenchmarkData(samples, reference=cohort.reference)
    res = run_benchmark(data, _cfg(), tmp_path / "a", progress=False)
    saved = json.loads((tmp_path / "a" / "splits.json").read_text())
    assert saved["meta"]["by"] == "patient"
    patient = _patient_of(cohort)
    assert len(saved["folds"]) == 3
    for f in saved["folds"]:
        sides = {k: {patient[i.split(":")[0]] for i in f[f"{k}_ids"]} for k in ("train", "val", "test")}
        assert sides["test"] and sides["train"]
        assert not sides["test"] & (sides["train"] | sides["val"])
        if f["val_mode"] == "groups":
            assert not sides["train"] & sides["val"]
        else:  # two training patients: the validation part is a random subset of their spots
            assert f["val_mode"] == "observations" and f["val_ids"]
    # every observation is tested exactly once over the folds
    tested = [i for f in saved["folds"] for i in f["test_ids"]]
    assert len(tested) == len(set(tested)) == sum(s.adata.n_obs for s in samples)
    # same seed -> byte-identical splits file and identical scores
    res2 = run_benchmark(data, _cfg(), tmp_path / "b", progress=False)
    assert (tmp_path / "a" / "splits.json").read_text() == (tmp_path / "b" / "splits.json").read_text()
    pd.testing.assert_frame_equal(res.results.drop(columns="seconds"), res2.results.drop(columns="seconds"))
    # k-fold by section: a different seed gives a different assignment, each still grouped
    groups = np.repeat([s.sample_id for s in samples], [s.adata.n_obs for s in samples])
    ids = np.arange(len(groups)).astype(str)
    k0 = make_splits(groups, {"scheme": "k_fold", "n_folds": 3, "val_fraction": 0.0}, 0, ids)
    k0b = make_splits(groups, {"scheme": "k_fold", "n_folds": 3, "val_fraction": 0.0}, 0, ids)
    assert k0 == k0b
    assigned = [{tuple(f["test_groups"]) for f in make_splits(groups, {"scheme": "k_fold", "n_folds": 3,
                                                                          "val_fraction": 0.0}, s, ids)}
                for s in range(6)]
    assert len({frozenset(a) for a in assigned}) > 1


def test_gene_panel_depends_on_training_data_only(cohort, tmp_path):
    base = _samples(cohort)
    cfg = _cfg(split={"by": "patient", "scheme": "leave_one_group_out", "val_fraction": 0.2})
    res = run_benchmark(BenchmarkData(base, reference=cohort.reference), cfg, tmp_path / "a", progress=False)
    # change the test patient of fold 0 (P01 = S01, S02) beyond recognition
    changed = _samples(cohort)
    rng = np.random.default_rng(1)
    for s in changed:
        if s.sample_id in ("S01", "S02"):
            x = s.adata.X.toarray() if hasattr(s.adata.X, "toarray") else np.asarray(s.adata.X)
            x = x[:, rng.permutation(x.shape[1])] * 7 + rng.poisson(5, size=x.shape)
            s.adata.X = x.astype(np.float32)
    res2 = run_benchmark(BenchmarkData(changed, reference=cohort.reference), cfg, tmp_path / "b", progress=False)
    assert res.splits[0]["test_groups"] == ["P01"]
    for gs in ("top30", "var20"):
        assert res.gene_sets[f"{gs}/fold0"]["genes"] == res2.gene_sets[f"{gs}/fold0"]["genes"]
        # the folds where the changed sections are *training* data do change: the check can fail
        assert res.gene_sets[f"{gs}/fold1"]["genes"] != res2.gene_sets[f"{gs}/fold1"]["genes"]
    # the test scores of fold 0 did change (the test data really was different)
    a = res.results.query("fold == 0")["pcc_mean"].to_numpy()
    b = res2.results.query("fold == 0")["pcc_mean"].to_numpy()
    assert not np.allclose(a, b)


def test_select_gene_set_reference_computation():
    rng = np.random.default_rng(0)
    counts = rng.poisson(rng.gamma(1.0, 3.0, size=40), size=(50, 40)).astype(float)
    totals = counts.sum(1) + rng.integers(100, 200, size=50)
    genes = [f"G{i}" for i in range(40)]
    cp = counts / totals[:, None] * 1e4
    top = select_gene_set({"name": "t", "kind": "top_expressed", "n": 5}, genes, counts, totals)["genes"]
    assert top == [genes[i] for i in np.argsort(-cp.mean(0), kind="stable")[:5]]
    var = select_gene_set({"name": "v", "kind": "top_variable", "n": 5}, genes, counts, totals)["genes"]
    assert var == [genes[i] for i in np.argsort(-np.log1p(cp).var(0), kind="stable")[:5]]
    lst = select_gene_set({"name": "l", "kind": "list"}, genes, counts, totals, panel=["G3", "XX", "G1", "G3"])
    assert lst["genes"] == ["G3", "G1"] and lst["n_missing"] == 1
    with pytest.raises(CPNNInputError):
        select_gene_set({"name": "l", "kind": "list"}, genes, counts, totals, panel=["XX"])


@pytest.fixture
def memorise_method():
    seen = {}

    def memorise(train, test, ctx, **opts):
        """1-nearest-neighbour lookup of the training targets: pure memorisation."""
        seen["test_fields"] = sorted(vars(test))
        seen["test_type"] = type(test)
        y = to_log1p_cp10k(train.counts)
        d = ((test.features[:, None, :] - train.features[None, :, :]) ** 2).sum(-1)
        return MethodOutput(expression=y[d.argmin(1)])

    register_method("memorise")(memorise)
    yield seen
    _METHODS.pop("memorise", None)


def test_methods_cannot_see_test_targets(cohort, tmp_path, memorise_method):
    """A memorising model scores high when the test spots *are* training spots, and at
    chance once the test targets are permuted: the harness gives it nothing else."""
    from cpnn.workflows.spatial import SpatialSample

    base = _samples(cohort)
    # test section "COPY" = exact copy of S03 (features and counts) under a fresh patient
    src = next(s for s in base if s.sample_id == "S03")
    copy = src.adata.copy()
    copy.obs["patient"] = "PX"
    copy.obs_names = [f"c{o}" for o in copy.obs_names]
    perm = np.random.default_rng(0).permutation(copy.n_obs)
    permuted = copy.copy()
    x = permuted.X.toarray() if hasattr(permuted.X, "toarray") else np.asarray(permuted.X)
    permuted.X = x[perm].astype(np.float32)
    cfg = _cfg(methods=[{"name": "memorise", "kind": "memorise"}],
               gene_sets=[{"name": "top30", "kind": "top_expressed", "n": 30}])

    def score(test_adata):
        samples = [s for s in base if s.sample_id in ("S03", "S04", "S05", "S06")]
        samples = samples + [SpatialSample("COPY", test_adata, src.features.copy())]
        res = run_benchmark(BenchmarkData(samples, reference=cohort.reference), cfg, None, progress=False)
        row = res.results[res.results["test_groups"] == "PX"].iloc[0]
        return row["pcc_mean"], row["n_genes_scored"]

    same, n_same = score(copy)
    shuffled, n_shuf = score(permuted)
    assert same > 0.99 and n_same >= 25
    # 64 spots: the sd of a null correlation is ~0.125; its mean over 30 genes ~0.03
    assert abs(shuffled) < 0.1 and n_shuf >= 25
    assert memorise_method["test_type"] is TestData
    assert memorise_method["test_fields"] == ["features", "groups", "ids"]


def test_cpnn_and_report_end_to_end(cohort, tmp_path):
    """CPNN (naive prototypes, a few epochs) next to ridge; composition scored against the
    cohort's true fractions; report and figures written and readable."""
    from PIL import Image

    samples = _samples(cohort, noise=0.1)
    cfg = _cfg(
        methods=[{"name": "cpnn_naive", "kind": "cpnn", "prototypes": "naive",
                  "train": {"max_epochs": 15, "patience": 5}},
                 {"name": "ridge_cv", "kind": "ridge", "alphas": "cv", "n_components": 16},
                 {"name": "mlp", "kind": "mlp", "hidden": 32, "max_epochs": 20}],
        gene_sets=[{"name": "top30", "kind": "top_expressed", "n": 30}],
        evaluation={"figures": True, "map_genes": 2},
    )
    out = tmp_path / "bench"
    res = run_benchmark(BenchmarkData(samples, {s.sample_id: _props(s) for s in samples}, cohort.reference),
                        cfg, out, progress=False)
    r = res.results
    assert len(r) == 3 * 3  # methods x folds x gene sets
    assert set(r.columns) >= {"method", "fold", "gene_set", "pcc_mean", "pcc_median", "scc_mean", "scc_median",
                              "n_genes_constant", "n_significant", "composition_mean"}
    cp = r[r["method"] == "cpnn_naive"]
    assert cp["composition_mean"].notna().all() and (cp["composition_mean"] > 0.3).all()
    assert r[r["method"] != "cpnn_naive"]["composition_mean"].isna().all()
    assert (r["pcc_mean"] > 0.2).all()
    # results.csv round-trips
    back = pd.read_csv(out / "results.csv")
    assert len(back) == len(r) and np.allclose(back["pcc_mean"], r["pcc_mean"])
    per_gene = pd.read_csv(out / "per_gene.csv")
    assert len(per_gene) == 3 * 3 * 30
    report = (out / "report.md").read_text()
    assert "by patient" in report and "cpnn_naive" in report and "± " in report
    for png in ("boxplot_pcc.png", "scatter_pcc.png", "gene_maps.png"):
        assert f"({png})" in report
        with Image.open(out / png) as im:
            im.load()
            assert im.size[0] > 300 and im.size[1] > 300
            # not a blank canvas
            arr = np.asarray(im.convert("L"))
            assert arr.std() > 10
    assert (out / "config.resolved.yaml").is_file()


def test_cpnn_may_model_more_genes_than_it_is_scored_on(cohort, tmp_path):
    # reference computation of the extra genes: by mean CP10k over training rows, scored ones left out
    y = np.array([[1, 9, 0, 5], [3, 1, 0, 2]], dtype=float)
    tot = np.array([20.0, 10.0])
    genes, counts = _more_training_genes(y, tot, ["a", "b", "c", "d"], ["d"])
    assert genes == ["b", "a", "c"] and np.array_equal(counts, y[:, [1, 0, 2]])

    samples = _samples(cohort, noise=0.1)
    cfg = _cfg(methods=[{"name": "cpnn", "kind": "cpnn", "prototypes": "naive", "train_genes": 50,
                         "train": {"max_epochs": 5, "patience": 5, "n_models": 1}}],
               gene_sets=[{"name": "top30", "kind": "top_expressed", "n": 30}])
    res = run_benchmark(BenchmarkData(samples, {s.sample_id: _props(s) for s in samples}, cohort.reference),
                        cfg, tmp_path / "b", progress=False)
    assert (res.results["info_n_model_genes"] == 50).all()
    assert len(res.per_gene) == 3 * 30 and res.results["pcc_mean"].notna().all()


def _props(sample):
    from cpnn._constants import TRUE_PROPORTIONS

    return pd.DataFrame(np.asarray(sample.adata.obsm[TRUE_PROPORTIONS]), index=list(map(str, sample.adata.obs_names)),
                        columns=list(sample.adata.uns["cell_types"]))


def test_config_errors(monkeypatch):
    monkeypatch.delenv("NO_SUCH_VAR_CPNN", raising=False)
    with pytest.raises(CPNNInputError, match="NO_SUCH_VAR_CPNN"):
        resolve_config({"data": {"kind": "h5ad", "paths": ["${NO_SUCH_VAR_CPNN}/a.h5ad"]}})
    with pytest.raises(CPNNInputError, match="unknown method kind"):
        resolve_config({"data": {"kind": "h5ad"}, "methods": [{"name": "x", "kind": "nope"}]})
    with pytest.raises(CPNNInputError, match="split.by"):
        resolve_config({"data": {"kind": "h5ad"}, "split": {"by": "slide"}})
    with pytest.raises(CPNNInputError, match="unique name"):
        resolve_config({"data": {"kind": "h5ad"}, "methods": [{"name": "a", "kind": "ridge"},
                                                               {"name": "a", "kind": "mlp"}]})


def test_weights_mapped_and_summed():
    w = np.array([[0.2, 0.3, 0.5], [0.6, 0.1, 0.3]])
    agg, names = _aggregate_weights(w, ["Cancer Epithelial", "Normal Epithelial", "T-cells"],
                                    {"Cancer Epithelial": "Epithelial", "Normal Epithelial": "Epithelial"})
    assert names == ["Epithelial", "T-cells"]
    assert np.allclose(agg, [[0.5, 0.5], [0.7, 0.3]])


def test_subtype_weights_are_summed_into_their_major_type():
    """A 41-type model compared with 8-type proportions: every subtype counts towards its
    parent (from the reference's own labels), not just the few whose names coincide."""
    import anndata as ad

    rng = np.random.default_rng(0)
    sub = np.array(["Cancer Her2", "Cancer LumA", "T CD8", "T CD4", "Plasmablasts"])
    major = np.array(["Cancer Epithelial", "Cancer Epithelial", "T-cells", "T-cells", "Plasmablasts"])
    idx = rng.integers(0, 5, size=300)
    ref = ad.AnnData(X=rng.poisson(2.0, size=(300, 300)).astype(np.float32),
                     obs=pd.DataFrame({"celltype_subset": sub[idx], "celltype_major": major[idx]},
                                      index=[f"c{i}" for i in range(300)]))
    ref.obs.loc["c0", "celltype_major"] = "T-cells"  # one mislabelled cell: the majority wins
    cache = _PrototypeCache(ref, {"qc": {"min_genes": 1}}, 0)
    parents = cache.parent_types("celltype_subset", "celltype_major")
    assert parents == dict(zip(sub.tolist(), major.tolist()))
    mapping = {"Cancer Epithelial": "Epithelial", "Plasmablasts": "Plasma Cells"}
    cols = ["Epithelial", "T-cells", "Plasma Cells"]
    to = _comparison_mapping(list(sub), cols, mapping, parents)
    assert to == {"Cancer Her2": "Epithelial", "Cancer LumA": "Epithelial", "T CD8": "T-cells",
                  "T CD4": "T-cells", "Plasmablasts": "Plasma Cells"}
    w = rng.dirichlet(np.ones(5), size=50)
    truth = pd.DataFrame(np.stack([w[:, 0] + w[:, 1], w[:, 2] + w[:, 3], w[:, 4]], 1), columns=cols)
    comp = _composition(w, list(sub), truth, to)
    assert comp["composition_n_types"] == 3 and comp["composition_mean"] > 0.999
    # name matching alone would have compared a single type
    assert _composition(w, list(sub), truth, mapping)["composition_n_types"] == 1


def test_kmeans_clusters_recover_planted_types():
    import anndata as ad

    rng = np.random.default_rng(0)
    k, g = 4, 300
    means = rng.gamma(0.5, 2.0, size=(k, g))
    means[np.arange(k)[:, None], rng.choice(g, (k, 15))] += 30  # markers
    labels = np.repeat(np.arange(k), 60)
    x = rng.poisson(means[labels] * rng.uniform(0.5, 1.5, size=(len(labels), 1)))
    lab = kmeans_labels(ad.AnnData(x.astype(np.float32)), k, seed=0, n_pcs=10)
    assert lab[0].startswith("kmeans4_")
    # each planted type maps to exactly one cluster (perfect contingency)
    table = pd.crosstab(labels, lab)
    assert (table.gt(0).sum(axis=1) == 1).all() and table.shape == (k, k)

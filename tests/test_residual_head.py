"""The residual (cell-state) head: on when a shared program is visible, harmless when not."""
import numpy as np
import pytest

from cpnn.config import CPNNConfig, TrainConfig
from cpnn.errors import CPNNInputError
from cpnn.evaluate import expression_metrics, to_log1p_cp10k
from cpnn.model import CPNN
from cpnn.model.residual import ResidualHead

from conftest import SimplePrototypes

N_STATE_GENES = 10


@pytest.fixture(scope="module")
def state_problem():
    """Like the toy problem, plus a state every type shares: genes 0-9 scale with exp(s),
    and s is visible in two feature dimensions. Four groups of 100 spots."""
    rng = np.random.default_rng(1)
    k, g, d, n = 4, 60, 16, 400
    t0 = rng.gamma(0.5, 2.0, size=(k, g)) + 0.01
    t0 = t0 / t0.sum(1, keepdims=True) * 1e4
    p = rng.dirichlet(np.ones(k) * 0.7, size=n)
    state = rng.normal(size=n)
    feats = np.concatenate([p @ rng.normal(size=(k, d)) + 0.2 * rng.normal(size=(n, d)),
                            state[:, None] + 0.2 * rng.normal(size=(n, 2))], axis=1)
    mean = p @ t0
    mean[:, :N_STATE_GENES] *= np.exp(1.0 * state)[:, None]
    mean = mean / mean.sum(1, keepdims=True) * rng.uniform(2000, 6000, size=(n, 1))
    counts = rng.negative_binomial(5, 5 / (5 + mean)).astype(np.float32)
    protos = SimplePrototypes(t0, [f"type{i}" for i in range(k)], [f"G{i}" for i in range(g)])
    return {"features": feats.astype(np.float32), "counts": counts, "proportions": p, "prototypes": protos,
            "groups": np.repeat(np.arange(4), 100)}


def _fit(problem, head, features=None):
    model = CPNN(problem["prototypes"], CPNNConfig(hidden=(64,), residual_head=head),
                 TrainConfig(max_epochs=40, batch_size=32, patience=10, progress=False, seed=0))
    feats = problem["features"] if features is None else features
    groups = problem.get("groups", np.repeat(np.arange(4), 100))
    model.fit(feats[:300], problem["counts"][:300], composition_targets=problem["proportions"][:300],
              groups=groups[:300])
    return model


def _pcc(expr, counts, genes=slice(None)):
    return expression_metrics(np.log1p(expr[:, genes] * 1e4), to_log1p_cp10k(counts)[:, genes])["pcc_mean"]


def test_head_recovers_a_shared_state_and_leaves_weights_alone(state_problem):
    plain = _fit(state_problem, "none")
    with_head = _fit(state_problem, "ridge")
    assert plain.residual is None and with_head.residual.active
    test_x, test_y = state_problem["features"][300:], state_problem["counts"][300:]
    a, b = plain.predict(test_x), with_head.predict(test_x)
    np.testing.assert_array_equal(a["weights"], b["weights"])  # the head never touches the weights
    np.testing.assert_array_equal(a["spot_expr"], b["spot_expr_mixture"])
    state_genes = slice(0, N_STATE_GENES)
    before, after = _pcc(a["spot_expr"], test_y, state_genes), _pcc(b["spot_expr"], test_y, state_genes)
    assert after > before + 0.2, (before, after)  # held-out group, state genes
    assert _pcc(b["spot_expr"], test_y) > _pcc(a["spot_expr"], test_y)
    np.testing.assert_allclose(b["spot_expr"].sum(1), 1.0, rtol=1e-5)
    # a reference computation of the correction
    scaled = with_head.scaler.transform(test_x)
    mix_log = np.log1p(a["spot_expr"].astype(np.float64) * 1e4)
    ref = mix_log + with_head.residual.predict(scaled, mix_log)
    ref = np.clip(np.expm1(ref), 0, None)
    np.testing.assert_allclose(b["spot_expr"], ref / ref.sum(1, keepdims=True), rtol=1e-4, atol=1e-9)


def test_head_is_harmless_without_a_state(toy_problem):
    # no shared program: the head stays off or changes held-out correlation very little
    plain, with_head = _fit(toy_problem, "none"), _fit(toy_problem, "ridge")
    test_x, test_y = toy_problem["features"][300:], toy_problem["counts"][300:]
    before = _pcc(plain.predict(test_x)["spot_expr"], test_y)
    after = _pcc(with_head.predict(test_x)["spot_expr"], test_y)
    assert after > before - 0.01, (before, after, with_head.residual.cv_scores_)


def test_head_stays_off_on_pure_noise():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(200, 12))
    base = rng.normal(size=(200, 30))
    observed = base + rng.normal(size=(200, 30))  # residual unrelated to the features
    head = ResidualHead(n_components=8).fit(x, base, observed, groups=np.repeat(np.arange(4), 50))
    if head.active:  # a near-constant correction at most
        assert head.predict(x).std(axis=0).max() < 0.05 * observed.std()
    assert "off" in head.cv_scores_


def test_head_round_trips_through_the_model_file(state_problem, tmp_path):
    model = _fit(state_problem, "ridge")
    again = CPNN.load(model.save(tmp_path / "m.cpnn"))
    assert again.residual.active and again.residual.alpha_ == model.residual.alpha_
    a, b = model.predict(state_problem["features"][300:]), again.predict(state_problem["features"][300:])
    assert set(a) == set(b)
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-7)


def test_sub_patch_bags_are_corrected_per_spot_from_their_mean(state_problem):
    rng = np.random.default_rng(2)
    base = state_problem["features"]
    bags = np.stack([base + 0.05 * rng.normal(size=base.shape).astype(np.float32) for _ in range(4)], axis=1)
    model = _fit(state_problem, "ridge", features=bags)
    assert model.residual.active
    out = model.predict(bags[300:])
    scaled = model.scaler.transform(bags[300:].reshape(-1, bags.shape[2])).reshape(100, 4, -1)
    np.testing.assert_allclose(model._as_bags(scaled).bag_means(), scaled.mean(1), rtol=1e-5, atol=1e-6)
    mix_log = np.log1p(out["bag_expr_mixture"].astype(np.float64) * 1e4)
    expected = np.clip(np.expm1(mix_log + model.residual.predict(scaled.mean(1), mix_log)), 0, None)
    expected /= expected.sum(1, keepdims=True)
    np.testing.assert_allclose(out["bag_expr"], expected, rtol=1e-5, atol=1e-8)
    assert out["spot_expr"].shape == (400, 60)  # sub-patch outputs stay the mixture's


def test_head_refuses_slide_level_bags(toy_problem):
    model = CPNN(toy_problem["prototypes"], CPNNConfig(hidden=(16,), residual_head="ridge"),
                 TrainConfig(max_epochs=1, progress=False))
    with pytest.raises(CPNNInputError, match="spot-level"):
        model.fit(toy_problem["features"][:300], toy_problem["counts"][:30], bags=np.arange(0, 301, 10),
                  composition_targets=None)
    with pytest.raises(ValueError, match="residual_head"):
        CPNNConfig(residual_head="mlp")


def test_prediction_file_keeps_the_mixture_alone(state_problem, tmp_path):
    import anndata as ad

    from cpnn.api import predict_spatial

    model = _fit(state_problem, "ridge")
    counts = state_problem["counts"][300:]
    section = ad.AnnData(X=counts, var={"gene": model.genes})
    section.var_names = model.genes
    section.obs_names = [f"s{i}" for i in range(len(counts))]
    section.obsm["spatial"] = np.stack(np.meshgrid(np.arange(10), np.arange(10)), -1).reshape(-1, 2) * 200.0
    pred = predict_spatial(model, section, state_problem["features"][300:], sample_id="held_out")
    raw = model.predict(state_problem["features"][300:])
    np.testing.assert_allclose(pred.X, np.log1p(raw["spot_expr"] * 1e4), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pred.layers["cpnn_mixture"], np.log1p(raw["spot_expr_mixture"] * 1e4),
                               rtol=1e-5, atol=1e-6)
    assert pred.uns["cpnn"]["residual_head"] == {"active": True, "form": model.residual.form_,
                                                 "alpha": model.residual.alpha_}
    pred.write_h5ad(tmp_path / "p.h5ad")
    back = ad.read_h5ad(tmp_path / "p.h5ad")
    assert "cpnn_mixture" in back.layers and bool(back.uns["cpnn"]["residual_head"]["active"])


def test_cli_defaults_turn_the_head_on_at_spot_level_only():
    from types import SimpleNamespace

    from cpnn.workflows.fit import FitOptions

    base = dict(reference="r.h5ad", label=None, batch=None, prototype_method=None, genes=None, n_top_genes=None,
                level=None, seed=None, encoder=None, patch_um=None, tta=None, context_rings=None,
                subpatch_grid=None, features=None, epochs=None, residual_head=None)

    def head(cfg=None, **over):
        return FitOptions.from_sources(cfg or {}, SimpleNamespace(**{**base, **over})).model_config().residual_head

    assert head() == "ridge"
    assert head(residual_head="none") == "none"
    assert head({"model": {"residual_head": "none"}}) == "none"
    assert head(level="bulk") == "none"  # pseudo-bulk bags are slides: the head is spot-level
    with pytest.raises(CPNNInputError, match="spot-level"):
        head(level="bulk", residual_head="ridge")
    assert FitOptions(reference="r.h5ad").model_config().residual_head == "ridge"


@pytest.mark.parametrize("patients, expected", [(["P1", "P1", "P2", "P2"], "patients"), (["P1"] * 4, "sections")])
def test_head_holds_out_patients_when_there_are_several(state_problem, monkeypatch, patients, expected):
    import anndata as ad

    from cpnn.model import residual
    from cpnn.workflows.spatial import SpatialSample, fit_spot_model

    seen = {}
    original = residual.ResidualHead.fit

    def spy(self, features, mixture_log, observed_log, groups=None):
        seen["groups"] = np.asarray(groups)
        return original(self, features, mixture_log, observed_log, groups)

    monkeypatch.setattr(residual.ResidualHead, "fit", spy)
    samples = []
    for i in range(4):
        rows = slice(100 * i, 100 * (i + 1))
        a = ad.AnnData(X=state_problem["counts"][rows])
        a.var_names = list(state_problem["prototypes"].genes)
        a.obs["patient"] = patients[i]
        samples.append(SpatialSample(f"S{i}", a, state_problem["features"][rows]))
    # four members, each holding out one section: every spot has an out-of-fold mixture
    fit_spot_model(samples, state_problem["prototypes"], CPNNConfig(hidden=(16,), residual_head="ridge"),
                   TrainConfig(max_epochs=2, n_models=4, val_fraction=0.25, progress=False),
                   composition_targets=None)
    want = np.repeat(patients, 100) if expected == "patients" else np.repeat([f"S{i}" for i in range(4)], 100)
    np.testing.assert_array_equal(seen["groups"], want)


def test_head_is_cross_fitted_on_out_of_fold_mixture_predictions(state_problem, monkeypatch):
    """Each training spot's mixture target comes from the member that held its group out,
    never from a member that trained on it (a reference computation per member)."""
    from cpnn.model import residual
    from cpnn.train.loop import predict_bags

    seen = {}
    original = residual.ResidualHead.fit

    def spy(self, features, mixture_log, observed_log, groups=None):
        seen.update(mixture=np.asarray(mixture_log), groups=np.asarray(groups))
        return original(self, features, mixture_log, observed_log, groups)

    monkeypatch.setattr(residual.ResidualHead, "fit", spy)
    model = CPNN(state_problem["prototypes"], CPNNConfig(hidden=(16,), residual_head="ridge"),
                 TrainConfig(max_epochs=3, n_models=3, val_fraction=0.34, progress=False, seed=0))
    x, y, groups = state_problem["features"][:300], state_problem["counts"][:300], state_problem["groups"][:300]
    model.fit(x, y, composition_targets=None, groups=groups)
    assert model.residual.oof_fraction_ == pytest.approx(1.0)
    data = model._as_bags(x)
    data.features = model.scaler.transform(data.features)
    expected = np.empty((300, len(model.genes)))
    for member, split in zip(model.modules, model.split["members"]):
        val = np.asarray(split["val"])
        assert not set(split["train"]) & set(val)
        expected[val] = predict_bags(member, data.subset(val), return_patch_outputs=False)["bag_expr"]
    np.testing.assert_allclose(seen["mixture"], np.log1p(expected * 1e4), rtol=1e-5, atol=1e-6)
    in_sample = model._ensemble_outputs(data, return_patch_outputs=False)["bag_expr"]
    assert np.abs(np.log1p(in_sample * 1e4) - seen["mixture"]).max() > 1e-3  # not the in-sample fit


def test_head_without_held_out_spots_is_a_clear_error(state_problem):
    model = CPNN(state_problem["prototypes"], CPNNConfig(hidden=(16,), residual_head="ridge"),
                 TrainConfig(max_epochs=1, early_stopping="none", progress=False))
    with pytest.raises(CPNNInputError, match="out-of-fold"):
        model.fit(state_problem["features"][:300], state_problem["counts"][:300], composition_targets=None,
                  groups=state_problem["groups"][:300])


# -- the stacked form: a_g * mixture + ridge(features) ---------------------------------------
def _reference_stacked(p, m, y, alpha):
    """Per gene, the penalised normal equations of [1, m_g, p] with the penalty on p only;
    the mixture coefficient refitted at 0 where it comes out negative."""
    n, k = p.shape
    cs, preds = [], []
    for g in range(y.shape[1]):
        design = np.column_stack([np.ones(n), m[:, g], p])
        pen = np.diag([0.0, 0.0] + [alpha] * k)
        sol = np.linalg.solve(design.T @ design + pen, design.T @ y[:, g])
        if sol[1] < 0:
            reduced = np.column_stack([np.ones(n), p])
            sol = np.linalg.solve(reduced.T @ reduced + np.diag([0.0] + [alpha] * k), reduced.T @ y[:, g])
            sol = np.concatenate([sol[:1], [0.0], sol[1:]])
        cs.append(sol[1])
        preds.append(design @ sol)
    return np.array(cs), np.column_stack(preds)


def test_stacked_path_matches_the_normal_equations():
    from cpnn.model.probes import RidgeProbe
    from cpnn.model.residual import stacked_ridge_path

    rng = np.random.default_rng(0)
    p = rng.normal(size=(80, 6))
    y = p @ rng.normal(size=(6, 5)) + rng.normal(size=(80, 5))
    m = np.column_stack([y[:, :3] + 0.3 * rng.normal(size=(80, 3)), -y[:, 3], rng.normal(size=80)])
    for alpha in (0.5, 30.0):
        c, coef, inter = stacked_ridge_path(p, m, y, [alpha])[0]
        ref_c, ref_pred = _reference_stacked(p, m, y, alpha)
        np.testing.assert_allclose(c, ref_c, atol=1e-8)
        np.testing.assert_allclose(c * m + p @ coef + inter, ref_pred, atol=1e-8)
        assert c[3] == 0.0  # an anti-correlated mixture gene is not used upside down
        a_coefs, a_inters = RidgeProbe._ridge_path(p, y - m, [alpha])  # the additive form: ridge on y - m
        a_coef, a_inter = a_coefs[0], a_inters[0]
        design = np.column_stack([np.ones(80), p])
        sol = np.linalg.solve(design.T @ design + np.diag([0.0] + [alpha] * 6), design.T @ (y - m))
        np.testing.assert_allclose(m + p @ a_coef + a_inter, m + design @ sol, atol=1e-8)


BOTH = ("additive", "stacked")


def _noisy_mixture_problem(seed=0, n=400, d=10, g=20):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    signal = x @ rng.normal(size=(d, g))
    observed = signal + 0.5 * rng.normal(size=(n, g))
    mixture = signal.copy()
    mixture[:, g // 2:] = 3.0 * rng.normal(size=(n, g - g // 2))  # half the genes: a useless mixture
    return x, mixture, observed, np.repeat(np.arange(4), n // 4), signal


def test_head_stacks_when_the_mixture_is_noise_for_some_genes():
    x, mix, obs, groups, _ = _noisy_mixture_problem()
    head = ResidualHead(n_components=8, forms=BOTH).fit(x[:300], mix[:300], obs[:300], groups[:300])
    assert head.active and head.form_ == "stacked", head.cv_scores_
    c = head.mixture_coef_
    assert np.all(c[:10] > 0.5) and np.all(c[10:] < 0.1), c
    additive = ResidualHead(n_components=8, forms=("additive",)).fit(x[:300], mix[:300], obs[:300], groups[:300])
    held = slice(300, 400)
    stacked_pred = mix[held] + head.predict(x[held], mix[held])
    additive_pred = mix[held] + additive.predict(x[held])
    from cpnn._numerics import mean_column_pearson

    assert mean_column_pearson(stacked_pred, obs[held]) > mean_column_pearson(additive_pred, obs[held]) + 0.1
    with pytest.raises(ValueError, match="mixture_log"):
        head.predict(x[held])
    again = ResidualHead.from_dict(head.to_dict())
    np.testing.assert_allclose(again.predict(x[held], mix[held]), head.predict(x[held], mix[held]), rtol=1e-5, atol=1e-5)
    d = head.describe()
    assert d["form"] == "stacked" and d["mixture_coef_quantiles_10_50_90"][2] > 0.5


def test_head_keeps_the_additive_or_off_form_when_the_mixture_is_right():
    # the mixture knows a part of expression the features cannot reach linearly
    x, _, obs, groups, signal = _noisy_mixture_problem()
    beyond = 2.0 * np.tanh(x[:, :1] * x[:, 1:2]) * np.linspace(0.5, 1.5, obs.shape[1])
    mixture, observed = signal + beyond, obs + beyond
    head = ResidualHead(n_components=8, forms=BOTH).fit(x, mixture, observed, groups)
    if head.form_ == "stacked":  # the mixture keeps its weight
        assert np.all(np.abs(head.mixture_coef_ - 1) < 0.2), head.mixture_coef_


def test_fit_summary_names_the_form_the_head_chose():
    from cpnn.workflows.fit import residual_summary

    x, mix, obs, groups, _ = _noisy_mixture_problem()
    line = residual_summary(ResidualHead(n_components=8, forms=BOTH).fit(x, mix, obs, groups))
    assert line.startswith("residual head: kept (stacked, median mixture coefficient"), line
    off = ResidualHead(n_components=8).fit(x[:, :2] * 0 + 1, obs, obs, groups)
    assert residual_summary(off).startswith("residual head: off"), residual_summary(off)


def test_model_offers_the_stacked_form_only_when_asked(state_problem, tmp_path):
    ridge = _fit(state_problem, "ridge")
    assert ridge.residual.forms == ("additive",) and ridge.residual.form_ in ("off", "additive")
    stacked = _fit(state_problem, "stacked")
    assert stacked.residual.forms == ("additive", "stacked")
    assert any(k.startswith("stacked ") for k in stacked.residual.cv_scores_)  # the form was scored
    np.testing.assert_array_equal(stacked.predict(state_problem["features"][300:])["weights"],
                                  ridge.predict(state_problem["features"][300:])["weights"])
    again = CPNN.load(stacked.save(tmp_path / "s.cpnn"))
    assert again.residual.form_ == stacked.residual.form_
    a, b = stacked.predict(state_problem["features"][300:]), again.predict(state_problem["features"][300:])
    np.testing.assert_allclose(a["spot_expr"], b["spot_expr"], rtol=1e-5, atol=1e-7)


def test_blend_is_the_weighted_average_of_the_additive_head_and_a_probe():
    """For one penalty, c * m + ridge(y - c m) = c * (m + ridge(y - m)) + (1 - c) * ridge(y)."""
    from cpnn.model.probes import RidgeProbe

    rng = np.random.default_rng(3)
    p = rng.normal(size=(90, 7))
    y = p @ rng.normal(size=(7, 4)) + rng.normal(size=(90, 4))
    m = y + rng.normal(size=(90, 4))
    for c in (0.75, 0.5, 0.25):
        (bc,), (ic,) = RidgeProbe._ridge_path(p, y - c * m, [4.0])
        (ba,), (ia,) = RidgeProbe._ridge_path(p, y - m, [4.0])
        (bp,), (ip,) = RidgeProbe._ridge_path(p, y, [4.0])
        np.testing.assert_allclose(c * m + p @ bc + ic, c * (m + p @ ba + ia) + (1 - c) * (p @ bp + ip), atol=1e-9)


def test_head_blends_when_the_mixture_is_noisy_for_every_gene():
    x, _, obs, groups, signal = _noisy_mixture_problem()
    mix = signal + 1.5 * np.random.default_rng(5).normal(size=signal.shape)  # every gene: signal + noise
    head = ResidualHead(n_components=8, forms=("additive", "blend")).fit(x[:300], mix[:300], obs[:300], groups[:300])
    assert head.active and head.form_ == "blend" and head.mixture_weight_ < 1, head.cv_scores_
    assert any(k.startswith("blend ") for k in head.cv_scores_)
    additive = ResidualHead(n_components=8, forms=("additive",)).fit(x[:300], mix[:300], obs[:300], groups[:300])
    held = slice(300, 400)
    from cpnn._numerics import mean_column_pearson

    blended = mix[held] + head.predict(x[held], mix[held])
    assert mean_column_pearson(blended, obs[held]) > mean_column_pearson(mix[held] + additive.predict(x[held]),
                                                                         obs[held]) + 0.02
    with pytest.raises(ValueError, match="mixture_log"):
        head.predict(x[held])
    again = ResidualHead.from_dict(head.to_dict())
    assert again.form_ == "blend" and again.mixture_weight_ == head.mixture_weight_
    np.testing.assert_allclose(again.predict(x[held], mix[held]), head.predict(x[held], mix[held]), rtol=1e-5, atol=1e-5)
    assert head.describe()["mixture_weight"] == head.mixture_weight_
    from cpnn.workflows.fit import residual_summary

    assert f"blend, mixture weight {head.mixture_weight_:g}" in residual_summary(head)


def test_model_offers_the_blend_form_when_asked_and_keeps_it_in_the_file(state_problem, tmp_path):
    model = _fit(state_problem, "blend")
    assert model.residual.forms == ("additive", "blend")
    assert any(k.startswith("blend ") for k in model.residual.cv_scores_)
    again = CPNN.load(model.save(tmp_path / "b.cpnn"))
    assert again.residual.form_ == model.residual.form_ and again.residual.mixture_weight_ == model.residual.mixture_weight_
    a, b = model.predict(state_problem["features"][300:]), again.predict(state_problem["features"][300:])
    np.testing.assert_allclose(a["spot_expr"], b["spot_expr"], rtol=1e-5, atol=1e-7)

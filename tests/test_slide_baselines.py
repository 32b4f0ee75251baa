"""Slide-level baselines and bag evaluation: planted signals, streaming = forward, determinism."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cpnn.config import CPNNConfig, TrainConfig
from cpnn.errors import CPNNInputError
from cpnn.model.slide_baselines import BASELINE_NAMES, SlideBaseline, log1p_cp10k, mean_gene_pearson
from cpnn.module.slide_baselines import SLIDE_BASELINES, segment_softmax, segment_topk_mean
from cpnn.train.bags import BagData


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class _Protos:
    def __init__(self, values):
        self.values = values
        self.cell_types = [f"t{k}" for k in range(values.shape[0])]
        self.genes = [f"g{j}" for j in range(values.shape[1])]
        self.provenance = {"method": "test"}


def planted_bags(n_bags, seed=0, d=8, g=12, k=3):
    """Tiles carry cell-type logits linear in their features; bag counts are Poisson
    draws of the mean tile expression through fixed prototypes."""
    rng = np.random.default_rng(seed)
    w = np.random.default_rng(100).normal(size=(d, k)) * 1.5
    t = np.random.default_rng(101).gamma(0.7, 1.0, size=(k, g)) + 0.02
    bags, counts = [], []
    for _ in range(n_bags):
        n = int(rng.integers(4, 30))
        f = (rng.normal(size=(n, d)) + rng.normal(size=d) * 1.5).astype(np.float32)
        p = np.exp(f @ w)
        p /= p.sum(1, keepdims=True)
        mu = (p @ t).mean(0)
        counts.append(rng.poisson(mu / mu.sum() * 2e4))
        bags.append(f)
    return bags, np.asarray(counts, dtype=np.float64), t


@pytest.mark.parametrize("kind", BASELINE_NAMES)
def test_baseline_learns_planted_signal(kind):
    tr_b, tr_c, _ = planted_bags(80, seed=0)
    te_b, te_c, _ = planted_bags(30, seed=1)
    genes = [f"g{j}" for j in range(tr_c.shape[1])]
    tc = TrainConfig(max_epochs=40, batch_size=8, patience=10, lr=3e-3, progress=False, seed=0)
    model = SlideBaseline(kind, genes, tc).fit(tr_b, tr_c)
    pred = model.predict(te_b)
    assert pred.shape == te_c.shape
    r = mean_gene_pearson(pred, log1p_cp10k(te_c))
    # a model predicting the training mean scores ~0; the planted signal is strong
    assert r > 0.5, (kind, r)
    assert model.split["val"] and not set(model.split["val"]) & set(model.split["train"])


@pytest.mark.parametrize("kind", BASELINE_NAMES)
def test_streaming_prediction_equals_forward_and_ignores_tile_order(kind):
    torch.manual_seed(0)
    module = SLIDE_BASELINES[kind](8, 5).eval()
    rng = np.random.default_rng(3)
    bags = [rng.normal(size=(n, 8)).astype(np.float32) for n in (1, 7, 40, 150)]
    data = BagData.from_bags(bags)
    with torch.no_grad():
        full = module(torch.from_numpy(data.features), torch.from_numpy(np.repeat(np.arange(4), data.sizes)), 4)
        for b, bag in enumerate(bags):
            for order, chunk in ((np.arange(len(bag)), 1000), (rng.permutation(len(bag)), 9)):
                state = module.stream_init()
                x = torch.from_numpy(bag[order])
                for s in range(0, len(x), chunk):
                    module.stream_update(state, x[s:s + chunk])
                np.testing.assert_allclose(module.stream_finish(state).numpy(), full[b].numpy(), rtol=1e-4, atol=1e-5)


def test_segment_topk_mean_matches_loop():
    rng = np.random.default_rng(0)
    sizes = [1, 3, 8, 2]
    scores = torch.from_numpy(rng.normal(size=(sum(sizes), 4)))
    seg = torch.from_numpy(np.repeat(np.arange(4), sizes)[rng.permutation(sum(sizes))])
    for k in (1, 2, 5, 100):
        got = segment_topk_mean(scores, seg, 4, k).numpy()
        for b in range(4):
            rows = scores.numpy()[seg.numpy() == b]
            want = np.sort(rows, axis=0)[::-1][:min(k, len(rows))].mean(0)
            np.testing.assert_allclose(got[b], want, rtol=1e-12)


def test_segment_softmax_sums_to_one_per_bag():
    logits = torch.tensor([1.0, 1000.0, -3.0, 2.0, 2.0])
    seg = torch.tensor([0, 0, 1, 1, 2])
    a = segment_softmax(logits, seg, 3)
    np.testing.assert_allclose(torch.zeros(3).index_add_(0, seg, a).numpy(), 1.0, rtol=1e-6)
    assert torch.isfinite(a).all()


def test_baseline_rejects_bad_inputs():
    model = SlideBaseline("meanpool_mlp", ["a", "b"], TrainConfig(max_epochs=1, progress=False))
    bags = [np.ones((3, 4), np.float32)] * 4
    with pytest.raises(CPNNInputError, match="expected \\(4, 2\\)"):
        model.fit(bags, np.ones((4, 3)))
    with pytest.raises(CPNNInputError, match="bag 1"):
        model.fit([bags[0], np.ones((0, 4), np.float32)], np.ones((2, 2)))
    with pytest.raises(ValueError, match="kind must be"):
        SlideBaseline("transformer", ["a"])


# ----------------------------------------------------------------- CPNN bag evaluation
def _tiny_cpnn(max_patches=4096, epochs=2):
    from cpnn.model import CPNN

    bags, counts, t = planted_bags(24, seed=5)
    model = CPNN(_Protos(t * 100), CPNNConfig(hidden=(16,)),
                 TrainConfig(max_epochs=epochs, batch_size=4, max_patches_per_bag=max_patches, progress=False,
                             early_stopping="none"))
    model.fit(bags, counts, composition_targets=None)
    return model, bags


def test_cpnn_bag_prediction_is_deterministic_and_order_free():
    model, bags = _tiny_cpnn()
    bag = bags[3]
    a = model.predict(bag, bags=[0, len(bag)])
    b = model.predict(bag, bags=[0, len(bag)])
    perm = np.random.default_rng(0).permutation(len(bag))
    c = model.predict(bag[perm], bags=[0, len(bag)], chunk_patches=3)
    np.testing.assert_array_equal(a["bag_expr"], b["bag_expr"])
    np.testing.assert_allclose(c["bag_expr"], a["bag_expr"], rtol=1e-5)
    np.testing.assert_allclose(c["bag_weights"], a["bag_weights"], rtol=1e-5)
    # the bag is the normalised mean of its tiles' (gene-factored) expression: recompute it
    with torch.no_grad():
        x = torch.from_numpy(model.scaler.transform(bag))
        e = model.module._apply_gene_factors(model.module.weights(x) @ model.module.prototype_expression())
        ref = e.double().mean(0)
    np.testing.assert_allclose(a["bag_expr"][0], (ref / ref.sum()).numpy(), rtol=1e-5)


def test_streaming_bag_prediction_equals_in_memory():
    from cpnn.workflows.wsi import predict_bag_streaming

    model, bags = _tiny_cpnn()
    big = np.concatenate(bags)
    whole = model.predict(big, bags=[0, len(big)])
    streamed = predict_bag_streaming(model, (big[s:s + 37] for s in range(0, len(big), 37)))
    assert streamed["n_tiles"] == len(big)
    np.testing.assert_allclose(streamed["bag_expr"], whole["bag_expr"][0], rtol=1e-5)
    np.testing.assert_allclose(streamed["bag_weights"], whole["bag_weights"][0], rtol=1e-5)


def _numpy_bag_reference(model, bag):
    """The ensemble's bag prediction written out in numpy from each member's parameters."""
    x = model.scaler.transform(bag).astype(np.float64)
    exprs, weights = [], []
    for m in model.modules:
        h = x
        layers = [layer for layer in m.mlp if isinstance(layer, torch.nn.Linear)]
        for i, layer in enumerate(layers):
            h = h @ layer.weight.detach().double().numpy().T + layer.bias.detach().double().numpy()
            if i < len(layers) - 1:  # GELU (exact, erf form)
                from scipy.special import erf

                h = 0.5 * h * (1.0 + erf(h / np.sqrt(2.0)))
        p = np.exp(h - h.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        t = np.exp(m.log_prototypes.detach().double().numpy())
        a, b = m.gene_scale.detach().double().numpy(), m.gene_offset.detach().double().numpy()
        e = (np.exp(a) * (p @ t) + np.exp(b)).mean(0)  # mean over tiles of per-tile expression
        exprs.append(e / e.sum())
        weights.append(p.mean(0))
    return np.mean(exprs, 0), np.mean(weights, 0)


def test_streamed_ensemble_equals_predict_and_numpy_reference():
    # issue 15: the streamed slide prediction once used only the first of 4 members
    from cpnn.model import CPNN
    from cpnn.workflows.wsi import predict_bag_streaming

    bags, counts, t = planted_bags(16, seed=7)
    model = CPNN(_Protos(t * 100), CPNNConfig(hidden=(16,)),
                 TrainConfig(max_epochs=2, batch_size=4, n_models=4, progress=False, early_stopping="none"))
    model.fit(bags, counts, composition_targets=None)
    assert len(model.modules) == 4
    big = np.concatenate(bags)
    whole = model.predict(big, bags=[0, len(big)], chunk_patches=50)
    streamed = predict_bag_streaming(model, (big[s:s + 37] for s in range(0, len(big), 37)))
    ref_expr, ref_w = _numpy_bag_reference(model, big)
    np.testing.assert_allclose(streamed["bag_expr"], whole["bag_expr"][0], rtol=1e-5)
    np.testing.assert_allclose(streamed["bag_weights"], whole["bag_weights"][0], rtol=1e-5)
    np.testing.assert_allclose(whole["bag_expr"][0], ref_expr, rtol=1e-4)
    np.testing.assert_allclose(streamed["bag_expr"], ref_expr, rtol=1e-4)
    np.testing.assert_allclose(streamed["bag_weights"], ref_w, rtol=1e-4, atol=1e-7)
    # the members differ, so a first-member-only prediction would not pass the above
    first = predict_bag_streaming(_first_member(model), iter([big]))
    assert np.abs(first["bag_expr"] - ref_expr).max() > 1e-4 * np.abs(ref_expr).max()


def _first_member(model):
    import copy

    one = copy.copy(model)
    one.modules = model.modules[:1]
    return one


def test_bag_subsampling_happens_only_in_training():
    rng = np.random.default_rng(0)
    data = BagData.from_bags([rng.normal(size=(n, 3)).astype(np.float32) for n in (50, 5, 20)])
    bags = np.array([0, 1, 2])
    rows, local = data.patch_index(bags, cap=8, rng=np.random.default_rng(1))  # a training step
    assert np.bincount(local).tolist() == [8, 5, 8]
    assert len(np.unique(rows)) == len(rows)
    rows_eval, local_eval = data.patch_index(bags, cap=8, rng=None)  # evaluation: every tile
    assert np.bincount(local_eval).tolist() == [50, 5, 20]
    np.testing.assert_array_equal(rows_eval, np.arange(75))
    # a model trained with a tiny cap still predicts from every tile
    model, tbags = _tiny_cpnn(max_patches=2, epochs=1)
    big = tbags[0]
    full = model.predict(big, bags=[0, len(big)])["bag_expr"]
    half = model.predict(big[: len(big) // 2], bags=[0, len(big) // 2])["bag_expr"]
    assert not np.allclose(full, half)


def test_streaming_from_a_feature_file(tmp_path):
    import h5py

    from cpnn.workflows.wsi import iter_feature_file, predict_bag_streaming

    model, bags = _tiny_cpnn()
    big = np.concatenate(bags)
    path = tmp_path / "slide.h5"
    with h5py.File(path, "w") as fh:
        fh["features"] = big
        fh["coords"] = np.zeros((len(big), 2), np.int64)
    chunks = list(iter_feature_file(path, chunk=50))
    assert [len(c) for c in chunks][:-1] == [50] * (len(chunks) - 1) and sum(map(len, chunks)) == len(big)
    out = predict_bag_streaming(model, iter_feature_file(path, chunk=50))
    np.testing.assert_allclose(out["bag_expr"], model.predict(big, bags=[0, len(big)])["bag_expr"][0], rtol=1e-5)
    with h5py.File(tmp_path / "empty.h5", "w") as fh:
        fh["coords"] = np.zeros((1, 2))
    with pytest.raises(CPNNInputError, match="features"):
        list(iter_feature_file(tmp_path / "empty.h5"))
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    with pytest.raises(CPNNInputError, match="HDF5"):
        list(iter_feature_file(tmp_path / "junk.h5"))


@pytest.mark.parametrize("kind", BASELINE_NAMES)
def test_baseline_save_load_predicts_identically(kind, tmp_path):
    tr_b, tr_c, _ = planted_bags(30, seed=0)
    te_b, _, _ = planted_bags(5, seed=1)
    genes = [f"g{j}" for j in range(tr_c.shape[1])]
    model = SlideBaseline(kind, genes, TrainConfig(max_epochs=3, batch_size=8, progress=False, seed=0)).fit(tr_b, tr_c)
    again = SlideBaseline.load(model.save(tmp_path / f"{kind}.pt"), genes=genes)
    np.testing.assert_array_equal(again.predict(te_b), model.predict(te_b))
    assert again.kind == kind and again.best_epoch == model.best_epoch
    with pytest.raises(CPNNInputError, match="different order"):
        SlideBaseline.load(tmp_path / f"{kind}.pt", genes=list(reversed(genes)))
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(CPNNInputError, match="junk.pt"):
        SlideBaseline.load(tmp_path / "junk.pt")


@pytest.mark.parametrize("kind", ["meanpool_mlp", "cpnn"])
def test_every_bag_model_trains_through_the_shared_loop(kind):
    # issue 15: the slide baselines train with CPNN's epoch loop (cpnn.train.trainer.fit_epochs),
    # so they inherit its checks, e.g. a diverging run stops with a clear error instead of
    # finishing on NaN weights
    bags, counts, t = planted_bags(12, seed=2)
    tc = TrainConfig(max_epochs=3, batch_size=4, lr=float("inf"), progress=False, early_stopping="none")
    if kind == "cpnn":
        from cpnn.model import CPNN

        model = CPNN(_Protos(t * 100), CPNNConfig(hidden=(8,)), tc)
        fit = lambda: model.fit(bags, counts, composition_targets=None)  # noqa: E731
    else:
        model = SlideBaseline(kind, [f"g{j}" for j in range(counts.shape[1])], tc)
        fit = lambda: model.fit(bags, counts)  # noqa: E731
    with pytest.raises(FloatingPointError, match="non-finite training loss"):
        fit()


def test_streamed_bag_with_an_active_residual_head_equals_predict():
    # a spot model with a residual head predicting a slide: every tile is corrected, the bag
    # is the mean of the corrected tiles, streamed or in memory
    from cpnn.workflows.wsi import predict_bag_streaming

    model, bags = _tiny_cpnn()
    w = np.random.default_rng(3).normal(size=(bags[0].shape[1], model.n_genes)) * 0.3

    from cpnn.model.residual import ResidualHead

    class _Residual(ResidualHead):  # a fitted head's stand-in: a fixed map of the scaled features
        active = True                # and, as the stacked form, of the mixture itself

        def predict(self, x, mixture_log=None):
            return np.tanh(np.asarray(x, np.float64) @ w) - 0.3 * mixture_log

    model.residual = _Residual()
    big = np.concatenate(bags)
    whole = model.predict(big, bags=[0, len(big)])
    assert not np.allclose(whole["bag_expr"], whole["bag_expr_mixture"])
    streamed = predict_bag_streaming(model, (big[s:s + 29] for s in range(0, len(big), 29)))
    np.testing.assert_allclose(streamed["bag_expr"], whole["bag_expr"][0], rtol=1e-5)
    np.testing.assert_allclose(streamed["bag_weights"], whole["bag_weights"][0], rtol=1e-5)


def test_the_mlp_probe_trains_through_the_shared_loop_too():
    from cpnn.model.probes import MLPRegressor

    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 5)).astype(np.float32)
    y = (x @ rng.normal(size=(5, 4))).astype(np.float32)
    MLPRegressor(hidden=8, max_epochs=3).fit(x, y)  # trains
    with pytest.raises(FloatingPointError, match="non-finite training loss"):
        MLPRegressor(hidden=8, max_epochs=3, lr=float("inf")).fit(x, y)

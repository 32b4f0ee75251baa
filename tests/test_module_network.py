import math

import numpy as np
import pytest
import torch
from scipy import stats

from cpnn.config import CPNNConfig
from cpnn.module import CPNNModule, losses, segment_mean


def _module(cfg, k=3, g=7, d=5, seed=0):
    torch.manual_seed(seed)
    log_t0 = torch.randn(k, g)
    return CPNNModule(d, log_t0, cfg, log_platform_factor=torch.randn(g) * 0.1), log_t0


def test_forward_matches_reference_computation():
    m, log_t0 = _module(CPNNConfig(hidden=(8,)))
    with torch.no_grad():
        m.gene_offset.fill_(math.log(1e-3))
    x = torch.randn(6, 5)
    bag = torch.tensor([0, 0, 1, 2, 2, 2])
    out = m(x, bag, n_bags=3, patch_outputs=True)
    # reference: written out with numpy from the module's own parameters
    p = torch.softmax(m.mlp(x), 1).detach().numpy()
    t = np.exp(log_t0.numpy())
    a, b = m.gene_scale.detach().numpy(), m.gene_offset.detach().numpy()
    e = np.exp(a) * (p @ t) + np.exp(b)
    bulk = np.stack([e[[0, 1]].mean(0), e[[2]].mean(0), e[[3, 4, 5]].mean(0)])
    np.testing.assert_allclose(out["bag_expr"].detach().numpy(), bulk / bulk.sum(1, keepdims=True), rtol=1e-5)
    np.testing.assert_allclose(out["spot_expr"].detach().numpy(), e / e.sum(1, keepdims=True), rtol=1e-5)
    np.testing.assert_allclose(out["weights"].sum(1).detach().numpy(), 1.0, rtol=1e-6)
    np.testing.assert_allclose(out["bag_weights"].detach().numpy()[2], p[3:].mean(0), rtol=1e-5)


def test_spot_head_without_gene_factors_is_p_times_softmax_T():
    m, log_t0 = _module(CPNNConfig(hidden=(), gene_factors=False, normalise_prototypes=True))
    x = torch.randn(4, 5)
    out = m(x)
    p = torch.softmax(m.mlp(x), 1)
    ref = p @ torch.softmax(log_t0, 1)
    torch.testing.assert_close(out["spot_expr"], ref / ref.sum(1, keepdim=True))
    assert not hasattr(m, "gene_scale")


def test_frozen_prototypes_are_not_parameters():
    m, _ = _module(CPNNConfig(learn_prototypes=False))
    names = {n for n, _ in m.named_parameters()}
    assert "log_prototypes" not in names
    assert float(m.template_penalty()) == 0.0


def test_segment_mean_handles_unequal_bags():
    v = torch.arange(12.0).reshape(6, 2)
    seg = torch.tensor([2, 0, 0, 2, 2, 1])
    out = segment_mean(v, seg, 4)
    expected = torch.stack([v[[1, 2]].mean(0), v[[5]].mean(0), v[[0, 3, 4]].mean(0), torch.zeros(2)])
    torch.testing.assert_close(out, expected)


def test_nb_log_likelihood_matches_scipy():
    y = torch.tensor([0.0, 1.0, 5.0, 40.0, 300.0])
    mu = torch.tensor([0.5, 2.0, 4.0, 50.0, 250.0])
    theta = torch.tensor([0.3, 1.0, 10.0, 2.0, 50.0])
    ours = losses.nb_log_likelihood(y, mu, theta).double().numpy()
    ref = stats.nbinom.logpmf(y.numpy(), theta.numpy(), (theta / (theta + mu)).numpy())
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)


def test_poisson_and_mse_losses_reference():
    counts = torch.tensor([[1.0, 3.0, 0.0], [2.0, 2.0, 6.0]])
    pred = torch.tensor([[0.2, 0.7, 0.1], [0.3, 0.3, 0.4]])
    mean = pred * counts.sum(1, keepdim=True)
    ref = -stats.poisson.logpmf(counts.numpy(), mean.numpy()).sum(1).mean() / 3
    assert float(losses.poisson_nll(pred, counts)) == pytest.approx(ref, rel=1e-5)
    y = np.log1p(counts.numpy() / counts.numpy().sum(1, keepdims=True) * 1e4)
    x = np.log1p(pred.numpy() * 1e4)
    assert float(losses.mse_log1p(pred, counts)) == pytest.approx(((x - y) ** 2).mean(), rel=1e-5)


def test_pearson_loss_is_zero_for_perfect_prediction():
    counts = torch.tensor([[1.0, 3.0, 6.0], [2.0, 2.0, 6.0], [5.0, 1.0, 4.0]])
    pred = counts / counts.sum(1, keepdim=True)
    assert float(losses.pearson_loss(pred, counts)) == pytest.approx(0.0, abs=1e-5)
    assert float(losses.pearson_loss(pred.flip(0), counts)) > 0.5


def test_nb_loss_decreases_when_prediction_improves():
    counts = torch.tensor([[10.0, 30.0, 60.0]])
    good = torch.tensor([[0.1, 0.3, 0.6]])
    bad = torch.tensor([[0.6, 0.3, 0.1]])
    lt = torch.zeros(3)
    assert float(losses.nb_nll(good, counts, lt)) < float(losses.nb_nll(bad, counts, lt))


def test_config_rejects_unknown_options():
    from cpnn.config import CPNNConfig, config_from_dict

    with pytest.raises(ValueError, match="loss must be one of"):
        CPNNConfig(loss="huber")
    with pytest.raises(ValueError, match="unknown CPNNConfig option"):
        config_from_dict(CPNNConfig, {"hiden": [3]})


def _old_per_patch_forward(m, x, bag, n_bags):
    """The head as it was before issue 15: every patch's expression, then the bag mean."""
    weights = m.weights(x)
    patch_expr = m._apply_gene_factors(weights @ m.prototype_expression())
    bag_raw = segment_mean(patch_expr, bag, n_bags)
    return bag_raw / bag_raw.sum(dim=1, keepdim=True).clamp_min(1e-30), segment_mean(weights, bag, n_bags)


@pytest.mark.parametrize("cfg", [CPNNConfig(hidden=(16,)), CPNNConfig(hidden=(8,), gene_factors=False),
                                 CPNNConfig(hidden=(), normalise_prototypes=True, learn_prototypes=True)])
def test_bag_forward_from_mean_weights_equals_per_patch_arithmetic(cfg):
    # the bag head is linear in the weights: the training forward never builds patches x genes,
    # yet gives the old per-patch numbers, and the same gradients
    m, _ = _module(cfg, k=6, g=50, d=12, seed=3)
    if cfg.gene_factors:
        with torch.no_grad():
            m.gene_offset.normal_(-4.0, 1.0)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(300, 12, generator=gen)
    bag = torch.randint(0, 7, (300,), generator=gen)
    out = m(x, bag, n_bags=7)
    assert "spot_expr" not in out
    ref_expr, ref_w = _old_per_patch_forward(m, x, bag, 7)
    torch.testing.assert_close(out["bag_expr"], ref_expr, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(out["bag_weights"], ref_w, rtol=1e-5, atol=1e-9)
    counts = torch.poisson(torch.full((7, 50), 5.0, dtype=torch.float32), generator=gen)
    grads = []
    for pred in (out["bag_expr"], ref_expr):
        m.zero_grad()
        losses.nb_nll(pred, counts, m.log_theta).backward(retain_graph=True)
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6)


def test_one_patch_bags_are_bit_identical_to_spots():
    # spot-level training (every spot a bag of one patch) keeps its exact numbers
    m, _ = _module(CPNNConfig(hidden=(8,)), k=4, g=30, d=5)
    x = torch.randn(9, 5)
    spot = m(x)
    bag = m(x, torch.arange(9), n_bags=9, patch_outputs=True)
    assert torch.equal(spot["bag_expr"], bag["bag_expr"]) and torch.equal(spot["spot_expr"], bag["spot_expr"])
    assert torch.equal(bag["spot_expr"], bag["bag_expr"])

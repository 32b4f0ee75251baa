import numpy as np
import pytest

from cpnn.errors import CPNNInputError
from cpnn.workflows.context import context_features, spot_pitch


def test_context_is_the_mean_over_the_first_ring_reference():
    # a 4 x 3 square grid, pitch 200 px, with a little jitter like real ST spots
    rng = np.random.default_rng(0)
    gx, gy = np.meshgrid(np.arange(4), np.arange(3))
    xy = np.stack([gx.ravel(), gy.ravel()], 1) * 200.0 + rng.normal(0, 5, size=(12, 2))
    f = rng.normal(size=(12, 3)).astype(np.float32)
    out = context_features(f, xy, rings=1)
    assert out.shape == (12, 6)
    np.testing.assert_array_equal(out[:, :3], f)
    pitch = spot_pitch(xy)
    assert 180 < pitch < 220
    for i in range(12):  # brute force: self + neighbours within 1.5 pitches (diagonals included)
        near = np.linalg.norm(xy - xy[i], axis=1) <= 1.5 * pitch
        np.testing.assert_allclose(out[i, 3:], f[near].mean(0), rtol=1e-5)
    corner = np.argmin(xy.sum(1))
    assert (np.linalg.norm(xy - xy[corner], axis=1) <= 1.5 * pitch).sum() == 4  # corner: self + 3


def test_no_context_and_bad_inputs():
    f = np.ones((3, 2), np.float32)
    xy = np.array([[0, 0], [1, 0], [2, 0]], float)
    assert context_features(f, xy, rings=0) is not None and context_features(f, xy, rings=0).shape == (3, 2)
    with pytest.raises(CPNNInputError, match="coordinates"):
        context_features(f, xy[:2], rings=1)
    with pytest.raises(CPNNInputError, match="share coordinates"):
        context_features(f, np.zeros((3, 2)), rings=1)

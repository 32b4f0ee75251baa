"""Per-slide feature standardisation (cpnn.workflows.transforms)."""
from __future__ import annotations

import numpy as np
import pytest

from cpnn.errors import CPNNInputError
from cpnn.workflows.transforms import standardise_slide


@pytest.fixture
def slide():
    return np.random.default_rng(0).gamma(2.0, 1.0, (300, 6)).astype(np.float32)


def test_none_is_identity_and_center_removes_a_slide_shift(slide):
    assert np.array_equal(standardise_slide(slide, "none"), slide)
    shifted = slide + np.arange(6, dtype=np.float32) * 3.0  # another scanner: features move
    a, b = standardise_slide(slide, "center"), standardise_slide(shifted, "center")
    assert np.allclose(a, b, atol=1e-4) and np.allclose(a.mean(0), 0, atol=1e-5)
    assert not np.allclose(slide, shifted)


def test_robust_removes_shift_and_scale_and_clips(slide):
    other = slide * np.array([0.5, 2, 3, 1, 7, 0.1], np.float32) + 4.0
    a, b = standardise_slide(slide, "robust"), standardise_slide(other, "robust")
    assert np.allclose(a, b, atol=1e-4)
    assert np.allclose(np.median(a, 0), 0, atol=1e-5)
    q25, q75 = np.quantile(a, [0.25, 0.75], axis=0)
    assert np.allclose(q75 - q25, 1.349, rtol=1e-3)
    spiked = slide.copy()
    spiked[0, 0] = 1e6
    assert standardise_slide(spiked, "robust", clip=5.0)[0, 0] == 5.0


def test_constant_and_sparse_features_stay_finite(slide):
    x = slide.copy()
    x[:, 0] = 3.0  # constant (e.g. no nuclei anywhere)
    x[:, 1] = 0.0
    x[:5, 1] = 2.0  # mostly zero: IQR 0, standard deviation not
    z = standardise_slide(x, "robust")
    assert np.isfinite(z).all() and np.all(z[:, 0] == 0)
    assert z[0, 1] > 0 and z[10, 1] == 0


def test_subpatch_features_use_all_rows(slide):
    bags = slide.reshape(100, 3, 6)
    assert np.allclose(standardise_slide(bags, "robust").reshape(300, 6), standardise_slide(slide, "robust"))
    assert standardise_slide(bags, "center").shape == (100, 3, 6)


def test_bad_mode_or_shape_is_refused(slide):
    with pytest.raises(CPNNInputError) as err:
        standardise_slide(slide, "zscore")
    assert err.value.field == "slide_standardise" and "robust" in err.value.fix
    with pytest.raises(CPNNInputError):
        standardise_slide(np.zeros((0, 4)), "center")

"""Macenko stain normalisation (cpnn.image.stain): a stain-shifted copy of the same tissue
is drawn back towards the target's colours; background passes through and is counted."""
from __future__ import annotations

import numpy as np
import pytest

from cpnn.errors import CPNNInputError
from cpnn.image import ArraySlide, spot_patches
from cpnn.image.stain import MacenkoNormaliser, StainNormalisedSlide, fit_stain_target, stain_target_tag

KW = dict(n_slides=1, n_types=5, image_px=512, mpp=0.5, spot_pitch_um=100.0, spot_diameter_um=100.0,
          n_genes=50, n_ref_cells=50, seed=4)


@pytest.fixture(scope="module")
def pair():
    """The same tissue rendered with the cohort's stain and with a strong patient stain shift."""
    from cpnn.data.synthetic import make_synthetic_cohort

    plain = make_synthetic_cohort(**KW).slides[0]
    shifted = make_synthetic_cohort(**KW, patient_effects={"stain": 2.0}).slides[0]
    centers = plain.spots.obsm["spatial"]
    read = lambda img: np.concatenate(list(spot_patches(ArraySlide(img, 0.5), centers, patch_um=100.0,
                                                         out_px=100)))
    return read(plain.image), read(shifted.image)


def _mean_od(p):
    return -np.log((p.reshape(-1, 3).astype(float) + 1) / 256).mean(0)


def test_stain_shifted_patches_are_brought_towards_the_target(pair):
    plain, shifted = pair
    target = fit_stain_target(plain)
    assert target["method"] == "macenko" and np.array(target["he"]).shape == (3, 2)
    norm = MacenkoNormaliser(target)
    fixed = norm.batch(shifted)
    assert norm.n_normalised == len(shifted) and norm.n_passed == 0
    ref = norm.batch(plain)  # the target's own patches, as the normaliser redraws them
    before = np.abs(shifted.astype(float) - ref).mean()
    after = np.abs(fixed.astype(float) - ref).mean()
    assert after < 0.85 * before
    assert np.abs(_mean_od(fixed) - _mean_od(plain)).max() < 0.5 * np.abs(_mean_od(shifted) - _mean_od(plain)).max()


def test_background_passes_through_and_is_counted(pair):
    norm = MacenkoNormaliser(fit_stain_target(pair[0]))
    white = np.full((64, 64, 3), 255, np.uint8)
    speck = white.copy()
    speck[30:33, 30:33] = (90, 60, 150)  # a few stained pixels: too little tissue
    for p in (white, speck):
        out = norm(p)
        assert out is p
    assert norm.n_passed == 2 and norm.n_normalised == 0


def test_slide_wrapper_normalises_what_is_read(pair):
    plain, shifted = pair
    norm = MacenkoNormaliser(fit_stain_target(plain))
    img = np.concatenate(list(shifted[:4]), axis=1)  # 100 x 400 px strip
    wrapped = StainNormalisedSlide(ArraySlide(img, 0.5), norm)
    assert wrapped.dimensions == (400, 100) and wrapped.mpp == 0.5
    got = wrapped.read_region(100, 0, 100, 100)
    assert np.array_equal(got, MacenkoNormaliser(norm.target)(shifted[1]))
    assert norm.n_normalised == 1


def test_targets_are_validated_and_tagged(pair):
    t = fit_stain_target(pair[0])
    assert stain_target_tag(t) == stain_target_tag(dict(t)) != stain_target_tag(fit_stain_target(pair[1]))
    with pytest.raises(CPNNInputError, match="no patch holds enough"):
        fit_stain_target([np.full((32, 32, 3), 255, np.uint8)])
    with pytest.raises(CPNNInputError) as err:
        MacenkoNormaliser({"he": [[1, 2]], "max_c": [1, 1]})
    assert err.value.field == "stain_target"

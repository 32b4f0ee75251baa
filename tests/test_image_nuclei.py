"""Nuclear-morphology features (cpnn.image.nuclei) on drawn nuclei of known number and size,
on blank patches and on the synthetic cohort's rendered cell types."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

from cpnn.errors import CPNNInputError
from cpnn.image import ArraySlide
from cpnn.image.nuclei import (
    NUCLEUS_FEATURES,
    nucleus_features,
    patch_nucleus_features,
    slide_nucleus_features,
    slide_threshold,
)

H_OD = np.array([0.650, 0.704, 0.286])
E_OD = np.array([0.072, 0.990, 0.105])
MPP = 0.5
F = {name: i for i, name in enumerate(NUCLEUS_FEATURES)}


def disc_patch(n_side: int, radius_px: float, size: int = 240, seed: int = 0) -> np.ndarray:
    """Pink stroma with an n_side x n_side grid of dark-blue discs (Beer-Lambert)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    haem = np.zeros((size, size))
    step = size / n_side
    for i in range(n_side):
        for j in range(n_side):
            cx, cy = (j + 0.5) * step, (i + 0.5) * step
            haem[(xx - cx) ** 2 + (yy - cy) ** 2 <= radius_px ** 2] = 0.9
    od = haem[..., None] * H_OD + 0.25 * E_OD
    rgb = 255.0 * np.exp(-od) + rng.normal(0, 2.0, od.shape)
    return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)


def test_drawn_discs_give_known_density_and_area():
    patches = [disc_patch(5, 6.0, seed=s) for s in range(3)]
    t = slide_threshold(patches)
    assert np.isfinite(t)
    f = nucleus_features(patches[0], MPP, t)
    side_mm = 240 * MPP / 1000.0
    assert f[F["nuclei_per_mm2"]] == pytest.approx(25 / side_mm ** 2, rel=0.02)
    true_area = np.pi * (6.0 * MPP) ** 2  # 28.3 µm²
    assert f[F["nucleus_area_mean_um2"]] == pytest.approx(true_area, rel=0.1)
    assert f[F["nucleus_area_q50_um2"]] == pytest.approx(true_area, rel=0.1)
    assert f[F["nucleus_area_std_um2"]] < 0.1 * true_area
    assert f[F["nucleus_eccentricity_mean"]] < 0.4 and f[F["nucleus_solidity_mean"]] > 0.9
    assert f[F["nucleus_major_axis_mean_um"]] == pytest.approx(2 * 6.0 * MPP, rel=0.1)
    assert f[F["nuclear_area_fraction"]] == pytest.approx(25 * true_area / (240 * MPP) ** 2, rel=0.1)
    assert f[F["nn_distance_mean_um"]] == pytest.approx(48 * MPP, rel=0.02)  # grid step
    big = nucleus_features(disc_patch(4, 10.0), MPP, t)
    assert big[F["nucleus_area_mean_um2"]] > 2.5 * f[F["nucleus_area_mean_um2"]]
    assert big[F["nuclei_per_mm2"]] < f[F["nuclei_per_mm2"]]


def test_blank_patches_give_zeros_without_warnings_or_nan():
    white = np.full((120, 120, 3), 255, np.uint8)
    pink = np.clip(255 * np.exp(-0.25 * E_OD), 0, 255).astype(np.uint8) * np.ones((120, 120, 1), np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert slide_threshold([white, white]) == float("inf")
        t = slide_threshold([disc_patch(5, 6.0)])
        for patch in (white, pink):
            f = nucleus_features(patch, MPP, t)
            assert f.shape == (len(NUCLEUS_FEATURES),) and np.all(f == 0)
        assert np.all(nucleus_features(white, MPP, float("inf")) == 0)
        one = patch_nucleus_features(np.stack([disc_patch(1, 6.0, size=120), white]), MPP, t)
        assert one[0, F["nuclei_per_mm2"]] > 0 and one[0, F["nn_distance_mean_um"]] == 0
        assert np.all(one[1] == 0) and np.isfinite(one).all()


def test_slide_features_read_patches_at_the_analysis_scale():
    # 480 x 480 px at 0.25 µm/px, four 60-µm squares of 25 nuclei of 3 µm radius each
    mosaic = np.concatenate([np.concatenate([disc_patch(5, 12.0, seed=i + 2 * j) for i in range(2)], 1)
                             for j in range(2)], 0)
    slide = ArraySlide(mosaic, mpp=0.25)
    centers = np.array([[120.0, 120.0], [360.0, 120.0], [120.0, 360.0], [360.0, 360.0]])
    f, t = slide_nucleus_features(slide, centers, patch_um=60.0, analysis_mpp=0.5)
    assert f.shape == (4, len(NUCLEUS_FEATURES)) and np.isfinite(t)
    side_mm = 0.060
    assert f[:, F["nuclei_per_mm2"]] == pytest.approx(np.full(4, 25 / side_mm ** 2), rel=0.05)
    assert f[:, F["nucleus_area_mean_um2"]] == pytest.approx(np.full(4, np.pi * 3.0 ** 2), rel=0.15)
    again, t2 = slide_nucleus_features(slide, centers, patch_um=60.0, analysis_mpp=0.5, threshold=t)
    assert t2 == t and np.array_equal(f, again)


def test_nucleus_features_separate_lymphocytes_from_epithelium():
    from cpnn.data.synthetic import make_synthetic_cohort

    c = make_synthetic_cohort(n_slides=1, n_types=2, image_px=640, mpp=0.5, spot_pitch_um=40.0,
                              spot_diameter_um=40.0, n_genes=40, n_ref_cells=50, seed=2)
    s = c.slides[0]
    f, _ = slide_nucleus_features(ArraySlide(s.image, c.mpp), s.spots.obsm["spatial"], patch_um=40.0)
    t_cells = s.spots.obsm["true_proportions"][:, 1]
    # lymphocyte nuclei: small and dark; epithelial nuclei: large and vesicular
    assert np.corrcoef(t_cells, f[:, F["nucleus_area_mean_um2"]])[0, 1] < -0.3
    assert np.corrcoef(t_cells, f[:, F["nucleus_haematoxylin_mean"]])[0, 1] > 0.3


def test_bad_inputs_are_refused():
    with pytest.raises(CPNNInputError, match="RGB uint8"):
        nucleus_features(np.zeros((10, 10)), MPP, 0.1)
    with pytest.raises(CPNNInputError) as err:
        nucleus_features(np.zeros((10, 10, 3), np.uint8), -1, 0.1)
    assert err.value.field == "mpp"

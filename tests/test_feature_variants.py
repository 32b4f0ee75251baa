"""Feature variants for nested selection (cpnn.workflows.feature_variants): built from the
base features without re-encoding them, equal to what `cpnn fit` would make per option."""
from __future__ import annotations

import numpy as np
import pytest

from cpnn.errors import CPNNInputError


@pytest.fixture(scope="module")
def samples():
    from cpnn.data import make_synthetic_cohort
    from cpnn.workflows.spatial import SpatialSample

    c = make_synthetic_cohort(n_slides=2, n_types=3, n_genes=40, image_px=240, mpp=1.0, spot_pitch_um=40.0,
                              spot_diameter_um=40.0, n_ref_cells=60, seed=1, patient_effects={"stain": 1.0})
    rng = np.random.default_rng(0)
    return [SpatialSample(s.slide_id, s.spots, rng.normal(size=(s.spots.n_obs, 4, 5)).astype(np.float32),
                          meta={"image": s.image}) for s in c.slides]


class CountingEncoder:
    """Wraps a tiny CNN encoder and counts encoded patches."""

    def __init__(self):
        import torch

        from cpnn.encoders import Encoder

        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 5, stride=2), torch.nn.ReLU(),
                                  torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        self.enc = Encoder("tiny-variants", net.eval(), dim=5, input_px=32, mean=(0.5,) * 3, std=(0.25,) * 3)
        self.n = 0

    def __getattr__(self, name):
        return getattr(self.enc, name)

    def encode(self, batch, **kw):
        self.n += len(batch)
        return self.enc.encode(batch, **kw)


def _spec():
    from cpnn.workflows.spatial import FeatureSpec

    return FeatureSpec(encoder="tiny-variants", patch_um=40.0, out_px=32, subpatch_grid=2)


def test_variants_reuse_the_base_features(samples):
    from cpnn.image.nuclei import NUCLEUS_FEATURES
    from cpnn.workflows.feature_variants import feature_variants
    from cpnn.workflows.spatial import sample_nucleus_features
    from cpnn.workflows.transforms import standardise_slide

    before = [s.features.copy() for s in samples]
    enc = CountingEncoder()
    out = feature_variants(samples, _spec(), ["base", "nuclei", "robust", "nuclei+center"], encoder=enc,
                           context_rings=0)
    assert enc.n == 0  # nothing re-encoded without the stain variant
    for s, b in zip(samples, before):
        assert np.array_equal(s.features, b)
        assert np.array_equal(out["base"][s.sample_id], b)
        nuc = sample_nucleus_features(s, _spec())
        assert nuc.shape == (s.adata.n_obs, 4, len(NUCLEUS_FEATURES))
        np.testing.assert_array_equal(out["nuclei"][s.sample_id], np.concatenate([b, nuc], axis=-1))
        np.testing.assert_array_equal(out["robust"][s.sample_id], standardise_slide(b, "robust"))
        np.testing.assert_array_equal(out["nuclei+center"][s.sample_id],
                                      standardise_slide(np.concatenate([b, nuc], -1), "center"))


def test_nocontext_variant_leaves_out_only_the_spatial_context(samples):
    from cpnn.workflows.context import context_features
    from cpnn.workflows.feature_variants import feature_variants

    out = feature_variants(samples, _spec(), ["base", "nocontext", "robust+nocontext"], context_rings=1)
    for s in samples:
        with_context = context_features(s.features, s.adata.obsm["spatial"], 1)
        assert with_context.shape[-1] == 2 * s.features.shape[-1]  # the context really is there
        np.testing.assert_array_equal(out["base"][s.sample_id], with_context)
        np.testing.assert_array_equal(out["nocontext"][s.sample_id], s.features)
        assert out["robust+nocontext"][s.sample_id].shape == s.features.shape


def test_stain_variant_fits_on_the_given_training_samples_and_caches(samples, tmp_path):
    from cpnn.image.stain import stain_target_tag
    from cpnn.workflows.feature_variants import feature_variants_with_target
    from cpnn.workflows.spatial import fit_sample_stain_target

    enc = CountingEncoder()
    out, target = feature_variants_with_target(samples, _spec(), ["stain", "stain+robust"], encoder=enc,
                                               stain_fit_ids=["S01"], cache_dir=tmp_path)
    n_patches = sum(s.adata.n_obs * 4 for s in samples)
    assert enc.n == n_patches  # encoded once for both variants
    assert target == fit_sample_stain_target([samples[0]], _spec())  # the training sample only
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"S0{i}_macenko-{stain_target_tag(target)}.h5"
                                                          for i in (1, 2)]
    assert out["stain"]["S01"].shape == (samples[0].adata.n_obs, 4, 5)
    again, _ = feature_variants_with_target(samples, _spec(), ["stain"], encoder=enc, stain_target=target,
                                            cache_dir=tmp_path)
    assert enc.n == n_patches  # read from the cache
    np.testing.assert_array_equal(again["stain"]["S02"], out["stain"]["S02"])


def test_bad_variants_and_missing_stain_inputs_are_refused(samples):
    from cpnn.workflows.feature_variants import feature_variants, parse_variant

    assert parse_variant("nuclei+robust") == {"nuclei": True, "stain": False, "standardise": "robust",
                                              "context": True}
    assert parse_variant("nocontext")["context"] is False
    for bad in ("zscore", "center+robust", ""):
        with pytest.raises(CPNNInputError):
            parse_variant(bad)
    with pytest.raises(CPNNInputError) as err:
        feature_variants(samples, _spec(), ["stain"])
    assert err.value.field == "stain_fit_ids"

"""Batched, resumable extraction: encode_batches, extract_spot_features, extract_tile_features."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from cpnn.encoders import (
    Encoder,
    encode_batches,
    extract_spot_features,
    read_feature_file,
)
from cpnn.errors import CPNNInputError
from cpnn.image import ArraySlide, spot_patches


class _Tiny(torch.nn.Module):
    """A cheap deterministic CNN so that extraction tests run in milliseconds."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 6, 5, stride=2)
        self.calls = 0
        self.fail_on_call = None

    def forward(self, x):
        self.calls += 1
        if self.fail_on_call is not None and self.calls >= self.fail_on_call:
            raise RuntimeError("boom")
        y = torch.relu(self.conv(x))
        return torch.cat([y.mean((2, 3)), y.amax((2, 3))], dim=1)


def _encoder(name="tiny", input_px=32):
    return Encoder(name, _Tiny(), dim=12, input_px=input_px, mean=(0.5,) * 3, std=(0.25,) * 3)


@pytest.fixture(scope="module")
def slide():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(300, 400, 3), dtype=np.uint8)
    img[:, :200] //= 2  # some structure
    return ArraySlide(img, mpp=0.5, name="synthetic")


@pytest.fixture(scope="module")
def spots():
    rng = np.random.default_rng(1)
    centers = np.column_stack([rng.uniform(0, 400, 11), rng.uniform(0, 300, 11)])
    ids = [f"spot{i}" for i in range(11)]
    return centers, ids


def test_encode_batches_matches_encode():
    enc = _encoder()
    rng = np.random.default_rng(2)
    batches = [rng.integers(0, 256, size=(b, 40, 40, 3), dtype=np.uint8) for b in (4, 4, 3)]
    out = encode_batches(iter(batches), enc, progress=False, total=11)
    ref = np.concatenate([enc.encode(b) for b in batches])
    assert out.shape == (11, 12) and out.dtype == np.float32
    np.testing.assert_array_equal(out, ref)
    np.testing.assert_array_equal(encode_batches(batches, enc, progress=False, prefetch=False), ref)
    assert encode_batches([], enc, progress=False).shape == (0, 12)


def test_encode_batches_propagates_producer_errors():
    enc = _encoder()

    def gen():
        yield np.zeros((2, 32, 32, 3), dtype=np.uint8)
        raise OSError("disk gone")

    before = threading.active_count()
    with pytest.raises(OSError, match="disk gone"):
        encode_batches(gen(), enc, progress=False)
    assert threading.active_count() == before  # the prefetch thread has ended


def test_spot_features_match_reference(slide, spots, tmp_path):
    centers, ids = spots
    enc = _encoder()
    ff = extract_spot_features(slide, centers, ids, enc, tmp_path / "f.h5", patch_um=20.0,
                               batch_size=4, progress=False)
    patches = np.concatenate(list(spot_patches(slide, centers, patch_um=20.0, out_px=32)))
    np.testing.assert_allclose(ff.features, enc.encode(patches), rtol=1e-6, atol=1e-6)
    side = 20.0 / 0.5
    np.testing.assert_array_equal(ff.coords, np.round(centers - side / 2).astype(np.int64))
    assert ff.ids == ids
    a = ff.attrs
    assert (a["encoder"], a["patch_size_px"], a["patch_um"], a["mpp"], a["level0_mpp"]) == \
        ("tiny", 32, 20.0, 20.0 / 32, 0.5)
    assert a["patch_size_level0"] == 40 and a["tta"] == "none" and a["complete"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.h5"]


@pytest.mark.parametrize("workers", [0, 3])
def test_num_workers_do_not_change_results(slide, spots, tmp_path, workers):
    centers, ids = spots
    enc = _encoder()
    ref = extract_spot_features(slide, centers, ids, enc, tmp_path / "a.h5", patch_um=20.0,
                                batch_size=3, num_workers=1, progress=False)
    got = extract_spot_features(slide, centers, ids, enc, tmp_path / "b.h5", patch_um=20.0,
                                batch_size=3, num_workers=workers, progress=False)
    np.testing.assert_array_equal(got.features, ref.features)


def test_resume_skips_complete_matching_file(slide, spots, tmp_path):
    centers, ids = spots
    out = tmp_path / "f.h5"
    enc = _encoder()
    first = extract_spot_features(slide, centers, ids, enc, out, patch_um=20.0, batch_size=4,
                                  progress=False)
    calls = enc.model.calls
    assert calls == 3
    mtime = out.stat().st_mtime_ns
    again = extract_spot_features(slide, centers, ids, enc, out, patch_um=20.0, batch_size=8,
                                  progress=False)
    assert enc.model.calls == calls  # nothing recomputed
    assert out.stat().st_mtime_ns == mtime
    np.testing.assert_array_equal(again.features, first.features)
    # overwrite forces it
    extract_spot_features(slide, centers, ids, enc, out, patch_um=20.0, batch_size=4,
                          overwrite=True, progress=False)
    assert enc.model.calls == 2 * calls


@pytest.mark.parametrize("change", ["encoder", "patch_um", "out_px", "ids", "centers", "tta"])
def test_changed_settings_recompute(slide, spots, tmp_path, change):
    centers, ids = spots
    out = tmp_path / "f.h5"
    extract_spot_features(slide, centers, ids, _encoder(), out, patch_um=20.0, progress=False)
    kw = dict(patch_um=20.0, out_px=None, tta="none")
    enc = _encoder()
    if change == "encoder":
        enc = _encoder(name="tiny-v2")
    elif change == "patch_um":
        kw["patch_um"] = 24.0
    elif change == "out_px":
        kw["out_px"] = 16
    elif change == "ids":
        ids = list(reversed(ids))
    elif change == "centers":
        centers = centers + np.array([5.0, 0.0])
    elif change == "tta":
        kw["tta"] = "flips"
    ff = extract_spot_features(slide, centers, ids, enc, out, progress=False, **kw)
    assert enc.model.calls > 0
    assert ff.attrs["encoder"] == enc.name and ff.ids == ids
    assert ff.attrs["patch_um"] == kw["patch_um"] and ff.attrs["tta"] == kw["tta"]


def test_unreadable_existing_file_is_recomputed(slide, spots, tmp_path):
    centers, ids = spots
    out = tmp_path / "f.h5"
    out.write_bytes(b"garbage")
    enc = _encoder()
    with pytest.warns(UserWarning, match="recomputed"):
        ff = extract_spot_features(slide, centers, ids, enc, out, patch_um=20.0, progress=False)
    assert enc.model.calls > 0 and len(ff) == 11


def test_failure_midway_leaves_no_file(slide, spots, tmp_path):
    centers, ids = spots
    out = tmp_path / "f.h5"
    enc = _encoder()
    enc.model.fail_on_call = 2
    with pytest.raises(RuntimeError, match="boom"):
        extract_spot_features(slide, centers, ids, enc, out, patch_um=20.0, batch_size=4,
                              progress=False)
    assert list(tmp_path.iterdir()) == []
    # an existing file survives a failed recompute untouched
    good = extract_spot_features(slide, centers, ids, _encoder(), out, patch_um=20.0,
                                 progress=False)
    enc2 = _encoder(name="other")
    enc2.model.fail_on_call = 1
    with pytest.raises(RuntimeError):
        extract_spot_features(slide, centers, ids, enc2, out, patch_um=20.0, progress=False)
    np.testing.assert_array_equal(read_feature_file(out).features, good.features)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.h5"]


def test_input_errors(slide, spots, tmp_path):
    centers, ids = spots
    enc = _encoder()
    with pytest.raises(CPNNInputError, match="ids"):
        extract_spot_features(slide, centers, ids[:3], enc, tmp_path / "x.h5", progress=False)
    with pytest.raises(CPNNInputError, match="outside the image"):
        extract_spot_features(slide, centers[:, ::-1] * 10, ids, enc, tmp_path / "x.h5",
                              progress=False)
    with pytest.raises(CPNNInputError, match="tta"):
        extract_spot_features(slide, centers, ids, enc, tmp_path / "x.h5", tta="x",
                              progress=False)
    with pytest.raises(CPNNInputError, match="batch_size"):
        extract_spot_features(slide, centers, ids, enc, tmp_path / "x.h5", batch_size=0,
                              progress=False)
    assert not any(tmp_path.iterdir())


def test_lite0_on_real_slide(tmp_path):
    from cpnn.encoders import create_encoder
    from cpnn.image import open_slide
    from cpnn.utils import find_data_dir

    root = find_data_dir()
    if root is None or not (root / "wsi" / "cmu-1-small-region.svs").is_file():
        pytest.skip("real data (../shared/data/wsi) not available")
    slide = open_slide(root / "wsi" / "cmu-1-small-region.svs")
    enc = create_encoder("efficientnet-lite0")
    centers = np.array([[1100.0, 1500.0], [600.0, 900.0]])
    ff = extract_spot_features(slide, centers, ["a", "b"], enc, tmp_path / "cmu.h5",
                               progress=False)
    assert ff.features.shape == (2, 1280) and np.isfinite(ff.features).all()
    assert ff.attrs["level0_mpp"] == pytest.approx(0.499, abs=1e-3)
    assert ff.attrs["patch_size_level0"] == round(112.0 / slide.mpp)
    direct = enc.encode(np.concatenate(list(spot_patches(slide, centers))))
    np.testing.assert_allclose(ff.features, direct, rtol=1e-4, atol=1e-4)


def _tissue_slide():
    rng = np.random.default_rng(3)
    img = np.full((256, 384, 3), 245, dtype=np.uint8)
    # a pink/purple "tissue" block on white glass, with texture
    img[40:200, 60:300] = rng.integers(90, 200, size=(160, 240, 3), dtype=np.uint8)
    return ArraySlide(img, mpp=1.0, name="tissue")


def test_tile_features_match_reference_and_resume(tmp_path):
    from cpnn.encoders import extract_tile_features
    from cpnn.image import iter_tiles, tile_grid

    slide = _tissue_slide()
    enc = _encoder()
    out = tmp_path / "tiles.h5"
    # 32 px at 2 um/px = 64 level-0 px per tile
    ff = extract_tile_features(slide, out, enc, tile_px=32, target_mpp=2.0, batch_size=5,
                               min_tissue=0.5, progress=False)
    grid = tile_grid(slide, tile_px=32, target_mpp=2.0, min_tissue=0.5)
    assert 0 < len(grid) < 24  # background tiles dropped
    np.testing.assert_array_equal(ff.coords, grid)
    ref = enc.encode(np.concatenate(list(iter_tiles(slide, grid, tile_px=32, target_mpp=2.0))))
    np.testing.assert_allclose(ff.features, ref, rtol=1e-6, atol=1e-6)
    a = ff.attrs
    assert (a["patch_size_px"], a["patch_um"], a["mpp"], a["level0_mpp"], a["patch_size_level0"]) \
        == (32, 64.0, 2.0, 1.0, 64)
    assert a["kind"] == "tiles" and ff.ids is None
    calls = enc.model.calls
    extract_tile_features(slide, out, enc, tile_px=32, target_mpp=2.0, min_tissue=0.5,
                          progress=False)
    assert enc.model.calls == calls  # resumed
    # other tiles -> recomputed
    ff2 = extract_tile_features(slide, out, enc, tile_px=32, target_mpp=2.0, min_tissue=0.0,
                                progress=False)
    assert enc.model.calls > calls and len(ff2) == 24
    with pytest.raises(CPNNInputError, match="tile_px"):
        extract_tile_features(slide, tmp_path / "x.h5", enc, tile_px=0, progress=False)

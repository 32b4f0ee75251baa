"""Slides and spot patches: real SVS files, generated TIFF/JPEG/PNG, in-memory arrays."""
from __future__ import annotations

import numpy as np
import pytest
import tifffile
from PIL import Image

from cpnn.errors import CPNNInputError
from cpnn.image import (
    ArraySlide,
    OpenSlideSlide,
    PILSlide,
    TiffSlide,
    open_slide,
    read_patch,
    spot_patches,
    validate_mpp,
)
from cpnn.image import slide as slide_mod
from cpnn.utils import find_data_dir


# --------------------------------------------------------------------------- helpers
def _wsi(name: str):
    root = find_data_dir()
    if root is None or not (root / "wsi" / name).exists():
        pytest.skip("real slides not available (../shared/data/wsi); set CPNN_DATA_DIR")
    return root / "wsi" / name


def _smooth_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Low-frequency colour pattern: resampling filters agree on it to within a level or two."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    chans = []
    for _ in range(3):
        fx, fy, ph = rng.uniform(0.005, 0.02), rng.uniform(0.005, 0.02), rng.uniform(0, 6)
        chans.append(128 + 100 * np.sin(fx * xx + ph) * np.cos(fy * yy))
    return np.clip(np.stack(chans, -1), 0, 255).round().astype(np.uint8)


def _block_mean(a: np.ndarray, f: int) -> np.ndarray:
    h, w = a.shape[0] // f, a.shape[1] // f
    return a[: h * f, : w * f].reshape(h, f, w, f, 3).astype(np.float64).mean(axis=(1, 3))


def _write_pyramid(path, levels, mpp0, subifds=False, unit="CENTIMETER", compression="zlib"):
    per_unit = 1e4 if unit == "CENTIMETER" else 25400.0
    kw = dict(tile=(128, 128), photometric="rgb", compression=compression, resolutionunit=unit)
    with tifffile.TiffWriter(path) as tw:
        for i, lvl in enumerate(levels):
            res = per_unit / (mpp0 * 2**i)
            extra = {"subifds": len(levels) - 1} if (subifds and i == 0) else {}
            if i > 0:
                extra["subfiletype"] = 1
            tw.write(lvl, resolution=(res, res), **kw, **extra)


@pytest.fixture(scope="module")
def pyramid_levels():
    l0 = _smooth_image(960, 1280)
    l1 = _block_mean(l0, 2).round().astype(np.uint8)
    l2 = _block_mean(l1, 2).round().astype(np.uint8)
    return [l0, l1, l2]


# --------------------------------------------------------------------------- real SVS
def test_svs_dimensions_and_mpp():
    with open_slide(_wsi("cmu-1-small-region.svs")) as s:
        assert isinstance(s, OpenSlideSlide)
        assert s.dimensions == (2220, 2967)
        assert s.mpp == pytest.approx(0.499)
        region = s.read_region(10, 20, 64, 32)
        assert region.shape == (32, 64, 3) and region.dtype == np.uint8


def test_svs_without_mpp_errors_and_override_works():
    path = _wsi("tcga-cr-7395-01a-01-ts1.svs")
    with pytest.raises(CPNNInputError) as ei:
        open_slide(path)
    msg = str(ei.value)
    assert "tcga-cr-7395" in msg and "mpp" in msg and "--mpp" in msg
    with open_slide(path, mpp=0.25) as s:
        assert s.mpp == 0.25
        assert s.dimensions == (4443, 3567)
        assert s.level_count == 2


def test_slide_mpp_wins_over_user_mpp_which_is_validated():
    """--mpp applies only to slides without one (issue 16): a disagreeing value is ignored, loudly."""
    path = _wsi("cmu-1-small-region.svs")
    with pytest.warns(UserWarning, match="is ignored"):
        with open_slide(path, mpp=0.3) as s:
            assert s.mpp == pytest.approx(0.499, abs=0.01)
    for bad in (0, -1, 250, 1e-6, 100, float("nan")):
        with pytest.raises(CPNNInputError, match="mpp"):
            open_slide(path, mpp=bad)


def test_broken_and_missing_files():
    path = _wsi("broken.svs")
    with pytest.raises(CPNNInputError, match="broken.svs"):
        open_slide(path)
    with pytest.raises(CPNNInputError, match="not found"):
        open_slide(path.parent / "does-not-exist.svs")


def test_reduced_read_uses_level_and_matches_manual_downsample():
    """Level-1 read of the real slide vs block mean of the level-0 read (reference)."""
    with open_slide(_wsi("tcga-cr-7395-01a-01-ts1.svs"), mpp=0.5) as s:
        assert s.best_level_for_downsample(2.0) == 1
        assert s.best_level_for_downsample(1.9) == 0
        full = s.read_region(1000, 1000, 800, 600)
        small = s.read_region(1000, 1000, 800, 600, out_size=(400, 300)).astype(np.float64)
    ref = _block_mean(full, 2)
    inner = (slice(4, -4), slice(4, -4))
    aligned = np.abs(small - ref)[inner].mean()
    shifted = min(
        np.abs(small - np.roll(ref, (dy, dx), (0, 1)))[inner].mean()
        for dy, dx in [(0, 1), (1, 0), (0, -1), (-1, 0)]
    )
    # the scanner's own level 1 (JPEG 2000) differs from a box filter, but far less than
    # a one-pixel misregistration does
    assert aligned < 10.0
    assert aligned < 0.75 * shifted


def test_level0_downsample_matches_block_mean():
    with open_slide(_wsi("cmu-1-small-region.svs")) as s:
        full = s.read_region(300, 400, 512, 512)
        small = s.read_region(300, 400, 512, 512, out_size=(256, 256)).astype(np.float64)
    assert np.abs(small - _block_mean(full, 2)).mean() < 3.0


# --------------------------------------------------------------------------- generated TIFF
@pytest.mark.parametrize("subifds", [False, True])
def test_pyramidal_tiff_levels_mpp_and_exact_level_reads(tmp_path, pyramid_levels, subifds):
    path = tmp_path / "pyr.tif"
    _write_pyramid(path, pyramid_levels, mpp0=0.25, subifds=subifds)
    with open_slide(path) as s:
        # OpenSlide reads pyramids stored as separate IFDs; SubIFD pyramids go to tifffile
        assert isinstance(s, TiffSlide if subifds else OpenSlideSlide)
        assert s.mpp == pytest.approx(0.25)
        assert s.level_dimensions == ((1280, 960), (640, 480), (320, 240))
        assert s.level_downsamples == pytest.approx((1.0, 2.0, 4.0))
        l0, l1, l2 = pyramid_levels
        np.testing.assert_array_equal(s.read_region(128, 256, 300, 200), l0[256:456, 128:428])
        # exact factor-2 / factor-4 reads come straight from levels 1 and 2
        np.testing.assert_array_equal(
            s.read_region(128, 256, 400, 200, out_size=(200, 100)), l1[128:228, 64:264]
        )
        np.testing.assert_array_equal(
            s.read_region(128, 256, 400, 200, out_size=(100, 50)), l2[64:114, 32:132]
        )
        # a factor-3 read resamples level 1; compare to a level-0 block mean
        r3 = s.read_region(300, 300, 600, 300, out_size=(200, 100)).astype(np.float64)
        assert np.abs(r3 - _block_mean(l0[300:600, 300:900], 3)).mean() < 2.0


def test_tiff_inch_units_and_absurd_resolution(tmp_path, pyramid_levels):
    path = tmp_path / "inch.tif"
    _write_pyramid(path, pyramid_levels[:1], mpp0=0.5, unit="INCH")
    with open_slide(path) as s:
        assert s.mpp == pytest.approx(0.5)
    # a desktop 72-dpi tag is not a microscope resolution: refuse, name the fix
    plain = tmp_path / "plain72.tif"
    tifffile.imwrite(plain, pyramid_levels[2], photometric="rgb", resolution=(72, 72), resolutionunit="INCH")
    with pytest.raises(CPNNInputError, match="plausible") as ei:
        open_slide(plain)
    assert "mpp=" in str(ei.value)
    with open_slide(plain, mpp=2.0) as s:  # single-level strip TIFF via tifffile
        assert isinstance(s, TiffSlide) and s.mpp == 2.0
        np.testing.assert_array_equal(s.read_region(0, 0, 320, 240), pyramid_levels[2])


def test_tiff_without_resolution_needs_mpp(tmp_path, pyramid_levels):
    path = tmp_path / "nores.tif"
    tifffile.imwrite(path, pyramid_levels[2], photometric="rgb", tile=(64, 64))
    with pytest.raises(CPNNInputError, match="no microns-per-pixel"):
        open_slide(path)
    with open_slide(path, mpp=1.0) as s:
        np.testing.assert_array_equal(s.read_region(-10, 5, 50, 40)[:, 10:], pyramid_levels[2][5:45, :40])


def test_validate_mpp_rejects_anisotropic():
    assert validate_mpp(0.5, 0.52) == pytest.approx(0.51)
    with pytest.raises(CPNNInputError, match="differ"):
        validate_mpp(0.5, 0.6)


# --------------------------------------------------------------------------- PIL / array
@pytest.fixture()
def halves_jpeg(tmp_path):
    img = np.zeros((300, 400, 3), np.uint8)
    img[:, :200] = (200, 40, 60)  # red-ish left half
    img[:, 200:] = (40, 60, 190)  # blue-ish right half
    path = tmp_path / "halves.jpg"
    Image.fromarray(img).save(path, quality=95)
    return path, img


def test_jpeg_needs_mpp(halves_jpeg):
    path, _ = halves_jpeg
    with pytest.raises(CPNNInputError, match="mpp"):
        open_slide(path)


def test_jpeg_patch_at_known_centre(halves_jpeg):
    path, img = halves_jpeg
    with open_slide(path, mpp=0.5) as s:
        assert isinstance(s, PILSlide) and s.dimensions == (400, 300)
        # 40 µm at 0.5 µm/px = 80 px, centred on the boundary at x=200
        p = read_patch(s, (200, 150), patch_um=40, out_px=80).astype(int)
        assert p.shape == (80, 80, 3)
        assert np.abs(p[:, :36] - img[0, 0]).max() < 12
        assert np.abs(p[:, 44:] - img[0, 399]).max() < 12
        # resampled to a quarter of the pixels: the halves stay where they were
        q = read_patch(s, (200, 150), patch_um=40, out_px=20).astype(int)
        assert np.abs(q[:, :8] - img[0, 0]).max() < 12
        assert np.abs(q[:, 12:] - img[0, 399]).max() < 12


def test_png_patches_exact_white_padding_and_order(tmp_path):
    rng = np.random.default_rng(1)
    img = rng.integers(0, 200, (120, 160, 3), dtype=np.uint8)  # never pure white
    path = tmp_path / "img.png"
    Image.fromarray(img).save(path)
    centers = np.array([[50, 60], [100, 20], [2, 3], [159, 119], [80, 80]])
    with open_slide(path, mpp=1.0) as s:
        batches = list(spot_patches(s, centers, patch_um=20, out_px=20, batch_size=2))
    assert [b.shape for b in batches] == [(2, 20, 20, 3), (2, 20, 20, 3), (1, 20, 20, 3)]
    patches = np.concatenate(batches)
    np.testing.assert_array_equal(patches[0], img[50:70, 40:60])
    np.testing.assert_array_equal(patches[1], img[10:30, 90:110])
    np.testing.assert_array_equal(patches[4], img[70:90, 70:90])
    # (2, 3): 8 columns and 7 rows fall left of / above the image and are white
    assert (patches[2][:7] == 255).all() and (patches[2][:, :8] == 255).all()
    np.testing.assert_array_equal(patches[2][7:, 8:], img[0:13, 0:12])
    # last pixel (159, 119) as centre: 11 image rows/columns (109..119, 149..159), then white
    assert (patches[3][11:] == 255).all() and (patches[3][:, 11:] == 255).all()
    np.testing.assert_array_equal(patches[3][:11, :11], img[109:120, 149:160])


def test_resampled_patch_of_array_matches_block_mean():
    img = _smooth_image(400, 500, seed=3)
    s = ArraySlide(img, mpp=0.25)
    # 112 µm at 0.25 µm/px = 448 px -> 224 px: a factor-2 downsample
    p = read_patch(s, (250.0, 200.0), patch_um=112, out_px=224).astype(np.float64)
    full = s.read_region(26, -24, 448, 448)  # top 24 rows are white padding
    assert (full[:24] == 255).all()
    ref = _block_mean(full, 2)
    assert np.abs(p - ref).mean() < 2.0


def test_bad_centres_are_reported():
    s = ArraySlide(np.zeros((100, 200, 3), np.uint8), mpp=0.5)
    with pytest.raises(CPNNInputError, match="NaN") as ei:
        spot_patches(s, [[1, 2], [np.nan, 3]])
    assert "[1]" in str(ei.value)
    # centres scaled for a downsampled image / swapped x-y: caught before any reading
    with pytest.raises(CPNNInputError) as ei:
        spot_patches(s, [[10, 10], [150, 150], [-1, 5], [300, 20]])
    msg = str(ei.value)
    assert "3 of 4 centres" in msg and "#1" in msg and "#2" in msg and "200 x 100" in msg
    with pytest.raises(CPNNInputError, match="shape"):
        spot_patches(s, np.zeros((3, 3)))
    with pytest.raises(CPNNInputError, match="patch_um"):
        spot_patches(s, [[1, 1]], patch_um=0)


def test_array_slide_validation_and_rgba():
    with pytest.raises(CPNNInputError, match="uint8"):
        ArraySlide(np.zeros((10, 10, 3), np.float32), mpp=0.5)
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 100
    rgba[:2, :, 3] = 255  # top rows opaque, bottom transparent
    s = ArraySlide(rgba, mpp=0.5)
    out = s.read_region(0, 0, 4, 4)
    assert (out[:2, :, 0] == 100).all() and (out[2:] == 255).all()


def test_banded_thumbnail_equals_single_read(monkeypatch):
    img = _smooth_image(700, 900, seed=5)
    s = ArraySlide(img, mpp=0.5)
    whole = s.thumbnail(200)
    monkeypatch.setattr(slide_mod, "_THUMB_BAND_PIXELS", 20_000)
    banded = s.thumbnail(200)
    assert whole.shape == banded.shape == (156, 200, 3)
    assert np.abs(whole.astype(int) - banded.astype(int)).max() <= 1


def test_large_jpeg_real_her2st_keeps_pil_limit():
    root = find_data_dir()
    path = None if root is None else root / "her2st/data/ST-imgs/C/C2/5714_HE_BT_C2.jpg"
    if path is None or not path.exists():
        pytest.skip("HER2ST images not available (../shared/data/her2st)")
    limit = Image.MAX_IMAGE_PIXELS
    with pytest.raises(CPNNInputError, match="mpp"):
        open_slide(path)
    with open_slide(path, mpp=0.69) as s:
        assert s.dimensions[0] > 9000 and s.dimensions[1] > 9000
        th = s.thumbnail(512)  # JPEG draft decoding: no full decode
        assert max(th.shape[:2]) == 512 and s._array is None
    assert Image.MAX_IMAGE_PIXELS == limit

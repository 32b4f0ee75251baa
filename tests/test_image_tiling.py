"""Tissue detection and whole-slide tiling on synthetic slides with known tissue."""
from __future__ import annotations

import colorsys

import numpy as np
import pytest

from cpnn.errors import CPNNInputError
from cpnn.image import (
    ArraySlide,
    iter_tiles,
    open_slide,
    otsu_threshold,
    rgb_to_hsv,
    tile_grid,
    tissue_fraction,
    tissue_mask,
)
from cpnn.utils import find_data_dir

H, W = 1600, 2000
CX, CY, R = 900.0, 700.0, 450.0  # the tissue disc, level-0 pixels


def _disc(yy, xx):
    return (xx - CX) ** 2 + (yy - CY) ** 2 <= R**2


@pytest.fixture(scope="module")
def synthetic():
    rng = np.random.default_rng(0)
    img = np.clip(rng.normal(242, 4, (H, W, 3)), 0, 255).astype(np.uint8)  # glass
    yy, xx = np.mgrid[0:H, 0:W]
    disc = _disc(yy, xx)
    tissue = np.array([205, 120, 175], float) + rng.normal(0, 12, (H, W, 3))  # pink/purple
    img[disc] = np.clip(tissue[disc], 0, 255).astype(np.uint8)
    img[100:400, 1600:1900] = 200  # grey background patch (e.g. out-of-focus glass)
    img[1300:1330, 200:1400] = (40, 150, 60)  # green pen stroke
    img[1500:1504, 1800:1804] = (200, 100, 170)  # a speck of debris
    return ArraySlide(img, mpp=0.5, name="synthetic"), disc


def test_hsv_and_otsu_against_references():
    rgb = np.random.default_rng(2).integers(0, 256, (200, 3)).astype(np.uint8)
    h, s, v = rgb_to_hsv(rgb)
    ref = np.array([colorsys.rgb_to_hsv(*(c / 255.0)) for c in rgb])
    np.testing.assert_allclose(h, ref[:, 0] * 360, atol=1e-3)
    np.testing.assert_allclose(s, ref[:, 1], atol=1e-6)
    np.testing.assert_allclose(v, ref[:, 2], atol=1e-6)
    # two well-separated modes: Otsu lands between them
    vals = np.concatenate([np.full(500, 0.1), np.full(300, 0.6)])
    assert 0.1 < otsu_threshold(vals) <= 0.6


def test_tissue_mask_finds_blob_only(synthetic):
    slide, disc = synthetic
    mask, ds = tissue_mask(slide, max_px=500)
    assert mask.shape == (400, 500) and ds == pytest.approx(4.0)
    truth = disc[::4, ::4][: mask.shape[0], : mask.shape[1]]
    iou = (mask & truth).sum() / (mask | truth).sum()
    assert iou > 0.95
    assert not mask[25:100, 400:475].any()  # grey patch
    assert not mask[326:332, 50:350].any()  # pen stroke
    assert not mask[370:380, 445:455].any()  # speck removed


def test_empty_slide_reports_no_tissue():
    blank = ArraySlide(np.full((300, 400, 3), 245, np.uint8), mpp=0.5, name="blank")
    with pytest.raises(CPNNInputError, match="no tissue found") as ei:
        tissue_mask(blank)
    msg = str(ei.value)
    assert "threshold" in msg and "blank" in msg


def test_tile_grid_tiles_lie_on_tissue(synthetic):
    slide, disc = synthetic
    # slide 0.5 µm/px, tiles of 64 px at 1.0 µm/px -> 128 level-0 px
    coords = tile_grid(slide, tile_px=64, target_mpp=1.0, min_tissue=0.5)
    assert coords.dtype == np.int64 and coords.shape[1] == 2
    assert (coords % 128 == 0).all()
    order = np.lexsort((coords[:, 0], coords[:, 1]))
    np.testing.assert_array_equal(order, np.arange(len(coords)))  # row-major
    # independent reference: fraction of each grid tile inside the true disc
    offs = (np.arange(16) + 0.5) * 8
    true_frac = {}
    for y in range(0, H, 128):
        for x in range(0, W, 128):
            yy, xx = np.meshgrid(y + offs, x + offs, indexing="ij")
            true_frac[(x, y)] = (_disc(yy, xx) & (yy < H) & (xx < W)).mean()
    got = {tuple(c) for c in coords.tolist()}
    assert all(true_frac[c] >= 0.4 for c in got)
    assert {c for c, f in true_frac.items() if f >= 0.6} <= got
    # min_tissue=0: the full grid, partial edge tiles included
    assert len(tile_grid(slide, 64, 1.0, min_tissue=0)) == 16 * 13


def test_tile_grid_errors(synthetic):
    slide, _ = synthetic
    mask, _ = tissue_mask(slide, max_px=500)
    with pytest.raises(CPNNInputError, match="aspect"):
        tile_grid(slide, mask=mask.T)
    with pytest.raises(CPNNInputError, match="no tile"):
        tile_grid(slide, tile_px=64, target_mpp=1.0, min_tissue=1.0, mask=np.zeros_like(mask) | (np.arange(500) == 3))
    with pytest.raises(CPNNInputError, match="min_tissue"):
        tile_grid(slide, min_tissue=2)


def test_tissue_fraction_matches_supersampling():
    rng = np.random.default_rng(4)
    mask = rng.random((30, 40)) > 0.5
    dims = (400, 300)  # 10 level-0 px per mask pixel
    coords = rng.uniform(-30, 390, (25, 2))
    size = 37.3
    frac = tissue_fraction(mask, dims, coords, size)
    n = 300
    ref = []
    for x, y in coords:
        u = x + (np.arange(n) + 0.5) * size / n
        v = y + (np.arange(n) + 0.5) * size / n
        vv, uu = np.meshgrid(v, u, indexing="ij")
        inside = (uu >= 0) & (uu < 400) & (vv >= 0) & (vv < 300)
        val = np.zeros(uu.shape, bool)
        val[inside] = mask[(vv[inside] // 10).astype(int), (uu[inside] // 10).astype(int)]
        ref.append(val.mean())
    np.testing.assert_allclose(frac, ref, atol=0.01)


def test_iter_tiles_streams_in_order(synthetic):
    slide, _ = synthetic
    coords = tile_grid(slide, tile_px=64, target_mpp=1.0, min_tissue=0.5)[:11]
    batches = list(iter_tiles(slide, coords, tile_px=64, target_mpp=1.0, batch_size=4))
    assert [len(b) for b in batches] == [4, 4, 3]
    tiles = np.concatenate(batches)
    assert tiles.shape == (11, 64, 64, 3) and tiles.dtype == np.uint8
    for t, (x, y) in zip(tiles, coords):
        np.testing.assert_array_equal(t, slide.read_region(x, y, 128, 128, out_size=(64, 64)))
    with pytest.raises(CPNNInputError, match="outside"):
        iter_tiles(slide, [[0, 0], [5000, 10]], tile_px=64, target_mpp=1.0)


def test_real_svs_tiles_inside_slide():
    root = find_data_dir()
    if root is None or not (root / "wsi/cmu-1-small-region.svs").exists():
        pytest.skip("real slides not available (../shared/data/wsi)")
    with open_slide(root / "wsi/cmu-1-small-region.svs") as s:
        mask = tissue_mask(s, max_px=1024)
        coords = tile_grid(s, tile_px=224, target_mpp=0.5, mask=mask)
        assert 20 < len(coords) < 130  # 10 x 14 grid, roughly a third tissue
        assert (coords >= 0).all() and (coords[:, 0] < 2220).all() and (coords[:, 1] < 2967).all()
        first = next(iter_tiles(s, coords, tile_px=224, target_mpp=0.5, batch_size=8))
        assert first.shape == (8, 224, 224, 3)
        _, sat, _ = rgb_to_hsv(first)
        assert sat.mean() > 0.1  # tiles on tissue are stained, not glass

"""`cpnn view`: the overlay data, the Deep Zoom pyramid, and the page in headless Chromium
(synthetic spots and tiles; the real HER2ST C6 section and a real whole slide)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("anndata")

from _browser import open_viewer, save_artifact, screen_xy, screenshot, viewer_box  # noqa: E402
from test_plot_maps import make_prediction  # noqa: E402

from cpnn.errors import CPNNInputError  # noqa: E402


def read_data_js(folder: Path) -> dict:
    text = (folder / "data.js").read_text()
    prefix = "window.CPNN_VIEW_DATA = "
    assert text.startswith(prefix)
    return json.loads(text[len(prefix):].rstrip().rstrip(";"))


def decode(b64: str, dtype=np.float32) -> np.ndarray:
    import base64

    return np.frombuffer(base64.b64decode(b64), dtype=np.dtype(dtype).newbyteorder("<"))


def pink_slide(path: Path, size: int = 1000) -> Path:
    """An H&E-like pink disc on white, ``size`` px square."""
    yy, xx = np.mgrid[:size, :size]
    img = np.full((size, size, 3), 246, np.uint8)
    disc = (xx - size * 0.45) ** 2 + (yy - size * 0.45) ** 2 < (0.42 * size) ** 2
    noise = np.random.default_rng(0).integers(0, 40, size=(size, size, 1))
    img[disc] = (np.array([205, 120, 175]) - noise[disc]).astype(np.uint8)
    Image.fromarray(img).save(path)
    return path


def small_prediction(level="spot"):
    """Spots 100 px apart (diameter 50) or touching 100 px tiles, inside a 1,000 px image."""
    return make_prediction(n_side=6, pitch=100.0, level=level, n_genes=12)


# --------------------------------------------------------------------------- data
@pytest.mark.parametrize("level", ["spot", "tile"])
def test_overlay_data_matches_the_prediction(level):
    from cpnn.plot.maps import _Raster, read_prediction
    from cpnn.viewer.layers import overlay_data

    a = small_prediction(level)
    view = read_prediction(a)
    data = json.loads(json.dumps(overlay_data(a, view, scale=0.5, genes=["G01", "G02"])))
    xy = np.asarray(a.obsm["spatial"])
    np.testing.assert_allclose(decode(data["x"]), xy[:, 0] * 0.5, rtol=1e-6)
    np.testing.assert_allclose(decode(data["y"]), xy[:, 1] * 0.5, rtol=1e-6)
    assert data["size"] == pytest.approx(view.size_px * 0.5)
    assert data["shape"] == ("square" if level == "tile" else "circle")
    layers = {layer["id"]: layer for layer in data["layers"]}
    w = np.asarray(a.obsm["cpnn_weights"], dtype=np.float64)
    np.testing.assert_array_equal(decode(layers["dominant"]["values"]), w.argmax(1))
    assert layers["dominant"]["counts"] == np.bincount(w.argmax(1), minlength=4).tolist()
    tops = np.quantile(w, 0.99, axis=0)
    for k, name in enumerate(a.uns["cpnn"]["cell_types"]):
        layer = layers[f"weight:{name}"]
        np.testing.assert_allclose(decode(layer["values"]), w[:, k], rtol=1e-6)
        assert layer["vmax"] == pytest.approx(tops[k]) and layer["vmax_shared"] == pytest.approx(tops.max())
    from cpnn.evaluate.metrics import to_log1p_cp10k

    measured = to_log1p_cp10k(a.layers["counts"])[:, 1]
    predicted = np.asarray(a.X)[:, 1]
    r = np.corrcoef(predicted, measured)[0, 1]
    assert f"r = {r:.2f}" in layers["gene:G01"]["label"] and f"r = {r:.2f}" in layers["measured:G01"]["label"]
    lo, hi = np.quantile(np.concatenate([predicted, measured]), [0.01, 0.99])
    for key in ("gene:G01", "measured:G01"):
        assert (layers[key]["vmin"], layers[key]["vmax"]) == (pytest.approx(lo), pytest.approx(hi))
    if level == "tile":
        raster = _Raster(view)
        np.testing.assert_array_equal(decode(data["raster"]["col"], np.int32), raster.cols)
        np.testing.assert_array_equal(decode(data["raster"]["row"], np.int32), raster.rows)
        assert data["raster"]["cell"] == pytest.approx(raster.size * 0.5)
    else:
        assert data["raster"] is None


def test_deep_zoom_pyramid_tiles_reproduce_the_image(tmp_path):
    import openslide

    from cpnn.viewer.pyramid import write_dzi

    yy, xx = np.mgrid[:300, :520]
    img = np.stack([xx * 255 / 520, yy * 255 / 300, 128 + 100 * np.sin(xx / 20) * np.cos(yy / 15)], axis=2)
    img = img.round().astype(np.uint8)  # smooth, so JPEG keeps it close
    Image.fromarray(img).save(tmp_path / "img.png")
    src = openslide.open_slide(str(tmp_path / "img.png"))
    desc = write_dzi(src, tmp_path / "out", progress=False, source="img.png")
    assert desc["Image"]["Size"] == {"Width": "520", "Height": "300"} and desc["Image"]["TileSize"] == "254"
    levels = math.ceil(math.log2(520)) + 1
    top = tmp_path / "out" / "slide_files" / str(levels - 1)
    assert sorted(p.name for p in top.iterdir()) == sorted(f"{c}_{r}.jpeg" for c in range(3) for r in range(2))
    assert (tmp_path / "out" / "slide_files" / "0" / "0_0.jpeg").is_file()
    # tile (1, 0) of the full-resolution level starts one overlap pixel before x = 254
    with Image.open(top / "1_0.jpeg") as t:
        tile = np.asarray(t.convert("RGB"), dtype=float)
    ref = img[0:255, 253:509].astype(float)
    assert tile.shape == ref.shape and np.abs(tile - ref).mean() < 3
    # a rerun keeps the tiles; another image in the same folder replaces them
    mtime = (top / "1_0.jpeg").stat().st_mtime_ns
    write_dzi(src, tmp_path / "out", progress=False, source="img.png")
    assert (top / "1_0.jpeg").stat().st_mtime_ns == mtime
    Image.fromarray(img[:100, :100]).save(tmp_path / "small.png")
    write_dzi(openslide.open_slide(str(tmp_path / "small.png")), tmp_path / "out", progress=False, source="small.png")
    assert not top.exists()


def test_viewer_folder_is_self_contained(tmp_path, capsys):
    from cpnn.cli import main

    a = small_prediction()
    a.write_h5ad(tmp_path / "p.h5ad")
    slide = pink_slide(tmp_path / "he.png")
    assert main(["view", str(tmp_path / "p.h5ad"), "--slide", str(slide), "--out", str(tmp_path / "v"),
                 "--genes", "G01", "--no-progress"]) == 0
    assert f"wrote {tmp_path / 'v' / 'index.html'}" in capsys.readouterr().out
    out = tmp_path / "v"
    for name in ("index.html", "data.js", "viewer.js", "viewer.css", "openseadragon/openseadragon.min.js",
                 "openseadragon/LICENSE.txt", "openseadragon/images/zoomin_rest.png", "slide.dzi"):
        assert (out / name).is_file(), name
    html = (out / "index.html").read_text()
    assert "http://" not in html and "https://" not in html  # nothing fetched from a network
    data = read_data_js(out)
    assert data["tiles"]["Image"]["Size"] == {"Width": "1000", "Height": "1000"}
    assert [layer["id"] for layer in data["layers"]][:2] == ["dominant", "weight:tumour"] or data["layers"][0]["id"] == "dominant"
    assert {"gene:G01", "measured:G01"} <= {layer["id"] for layer in data["layers"]}


def test_viewer_falls_back_to_the_stored_image_and_refuses_a_wrong_one(tmp_path):
    from cpnn.viewer import write_viewer

    a = small_prediction()
    write_viewer(a, tmp_path / "v", genes=["G01"], progress=False)
    data = read_data_js(tmp_path / "v")
    scale = a.uns["spatial"]["S1"]["scalefactors"]["tissue_hires_scalef"]
    assert data["tiles"]["Image"]["Size"] == {"Width": "400", "Height": "400"}
    np.testing.assert_allclose(decode(data["x"]), np.asarray(a.obsm["spatial"])[:, 0] * scale, rtol=1e-6)
    tiny = pink_slide(tmp_path / "tiny.png", size=100)
    with pytest.raises(CPNNInputError, match="outside the 100 x 100 px image"):
        write_viewer(a, tmp_path / "w", slide=tiny, progress=False)
    with pytest.raises(CPNNInputError, match="image file not found"):
        write_viewer(a, tmp_path / "w", slide=tmp_path / "nope.svs", progress=False)


def test_cli_view_reports_a_missing_prediction(tmp_path, capsys):
    from cpnn.cli import main

    assert main(["view", str(tmp_path / "none.h5ad"), "--out", str(tmp_path / "v")]) == 2
    assert "prediction file not found" in capsys.readouterr().err


# --------------------------------------------------------------------------- browser
def _expected_colour(adata, layer_id: str, j: int):
    """The colour observation ``j`` must have in a layer, computed here from the AnnData."""
    from matplotlib import colormaps

    from cpnn.plot.maps import palette

    w = np.asarray(adata.obsm["cpnn_weights"], dtype=np.float64)
    types = list(adata.uns["cpnn"]["cell_types"])
    if layer_id == "dominant":
        return np.round(np.asarray(palette(len(types))[int(w[j].argmax())][:3]) * 255)
    k = types.index(layer_id.split(":", 1)[1])
    top = max(float(np.quantile(w[:, k], 0.99)), 1e-3)
    idx = int(np.clip(round(w[j, k] / top * 255), 0, 255))
    return np.round(colormaps["magma"](np.linspace(0, 1, 256))[idx, :3] * 255)


def _crop(img, box):
    left, top, right, bottom = (int(round(v)) for v in box)
    return img[top:bottom, left:right].astype(int)


def _pink(img) -> float:
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    return float(((r > 120) & (r - g > 30) & (b - g > 10)).mean())


def check_viewer_in_browser(index: Path, adata, shots: Path, name: str, layers, probe=None):
    """The page loads without errors; the H&E shows; each overlay puts the right colour on
    an observation; switching the overlay (through the page's control) changes the picture;
    the value under the cursor is read out. Returns the path of the final screenshot."""
    xy = np.asarray(adata.obsm["spatial"], dtype=np.float64)
    data = read_data_js(index.parent)
    scale = float(decode(data["x"])[0] / xy[0, 0]) if xy[0, 0] else 1.0
    w = np.asarray(adata.obsm["cpnn_weights"])
    j = int(np.argmax(w[:, 0])) if probe is None else probe
    with open_viewer(index) as (page, problems):
        box = viewer_box(page)
        page.evaluate("window.cpnnView.setOpacity(0)")
        tissue = _crop(screenshot(page, shots / f"{name}_tissue.png"), box)
        assert _pink(tissue) > 0.02, "no H&E visible"
        page.evaluate("window.cpnnView.setOpacity(1)")
        pictures = []
        for layer in layers:
            page.select_option("#layer", layer)
            assert page.evaluate("window.cpnnView.layer") == layer
            shot = screenshot(page, shots / f"{name}_{layer.replace(':', '_')}.png")
            sx, sy = screen_xy(page, xy[j, 0] * scale, xy[j, 1] * scale)
            got = shot[int(round(sy)), int(round(sx))].astype(float)
            want = _expected_colour(adata, layer, j)
            assert np.abs(got - want).max() <= 8, (layer, got, want)
            pictures.append(_crop(shot, box))
            assert (np.abs(pictures[-1] - tissue).sum(2) > 40).mean() > 0.01, f"{layer}: no overlay drawn"
        changed = (np.abs(pictures[0] - pictures[1]).sum(2) > 40).mean()
        assert changed > 0.005, "switching the overlay changed nothing"
        page.mouse.move(sx, sy)
        page.wait_for_timeout(200)
        readout = page.inner_text("#readout")
        assert str(adata.obs_names[j]) in readout or f" {j}" in readout
        assert "dominant type: " + adata.uns["cpnn"]["cell_types"][int(w[j].argmax())] in readout
        legend = page.inner_text("#legend")
        assert legend.strip()
        page.evaluate("window.cpnnView.setOpacity(0.6)")
        final = shots / f"{name}.png"
        screenshot(page, final)
        assert not problems, problems
    save_artifact(final, f"{name}.png")
    return final


@pytest.mark.parametrize("level", ["spot", "tile"])
def test_viewer_in_headless_chromium(level, tmp_path):
    from cpnn.viewer import write_viewer

    a = small_prediction(level)
    slide = pink_slide(tmp_path / "he.png")
    index = write_viewer(a, tmp_path / "v", slide=slide, genes=["G01"], progress=False)
    check_viewer_in_browser(index, a, tmp_path, f"synthetic_{level}", ["weight:tumour", "dominant"])


# --------------------------------------------------------------------------- real data
@pytest.fixture(scope="module")
def her2st_c6_and_wsi(data_dir, tmp_path_factory):
    """A small model trained on HER2ST C5 (naive prototypes of 60 panel genes, one 112 µm
    patch per spot read at 64 px to keep extraction cheap, 5 epochs), its prediction of C6,
    and its prediction of a real whole slide (cmu-1-small-region.svs)."""
    import cpnn
    from cpnn.api import fit_spatial, predict_spatial, spatial_features
    from cpnn.data import read_her2st
    from cpnn.prototypes import read_reference
    from cpnn.workflows.wsi import predict_slide

    root = tmp_path_factory.mktemp("her2st_view")
    sections = read_her2st(data_dir / "her2st", ["C5", "C6"])
    panel = [g.strip() for g in (data_dir / "her2st" / "her2st_785_genes.txt").read_text().split() if g.strip()]
    common = set(sections["C5"].var_names) & set(sections["C6"].var_names)
    ref = read_reference(data_dir / "reference" / "wu2021_CID4465.h5ad", "celltype_major")
    genes = [g for g in panel if g in common and g in set(ref.var_names)][:60]
    protos = cpnn.build_prototypes(ref, "celltype_major", method="naive", genes=genes)
    encoder = {"name": "efficientnet-lite0", "patch_um": 112.0, "out_px": 64}
    feats = {sid: spatial_features(a, "efficientnet-lite0", patch_um=112.0, out_px=64) for sid, a in sections.items()}
    model = fit_spatial({"C5": sections["C5"]}, feats, protos, cpnn.CPNNConfig(hidden=(32,)),
                        cpnn.TrainConfig(max_epochs=5, progress=False), encoder=encoder)
    c6 = predict_spatial(model, sections["C6"], feats["C6"])
    c6.write_h5ad(root / "C6_pred.h5ad")
    wsi = predict_slide(model, data_dir / "wsi" / "cmu-1-small-region.svs", features_dir=root / "features",
                        out=root / "cmu_pred.h5ad", progress=False)
    return root, c6, wsi


@pytest.mark.slow
@pytest.mark.realdata
def test_viewer_of_her2st_c6_in_chromium(her2st_c6_and_wsi, tmp_path):
    from cpnn.cli import main

    root, c6, _ = her2st_c6_and_wsi
    assert Path(c6.uns["cpnn"]["image_path"]).is_file()  # the full-resolution JPEG
    assert main(["view", str(root / "C6_pred.h5ad"), "--out", str(tmp_path / "C6_view"), "--no-progress"]) == 0
    data = read_data_js(tmp_path / "C6_view")
    assert int(data["tiles"]["Image"]["Size"]["Width"]) > 9000  # full resolution, not the stored image
    top = c6.uns["cpnn"]["cell_types"][int(np.argmax(np.asarray(c6.obsm["cpnn_weights"]).mean(0)))]
    check_viewer_in_browser(tmp_path / "C6_view" / "index.html", c6, tmp_path, "her2st_C6_view",
                            [f"weight:{top}", "dominant"])


@pytest.mark.slow
@pytest.mark.realdata
def test_viewer_of_a_whole_slide_in_chromium(her2st_c6_and_wsi, tmp_path):
    from cpnn.viewer import write_viewer

    root, _, wsi = her2st_c6_and_wsi
    index = write_viewer(root / "cmu_pred.h5ad", tmp_path / "wsi_view", progress=False)
    data = read_data_js(index.parent)
    assert data["shape"] == "square" and data["tiles"]["Image"]["Size"] == {"Width": "2220", "Height": "2967"}
    top = wsi.uns["cpnn"]["cell_types"][int(np.argmax(np.asarray(wsi.obsm["cpnn_weights"]).mean(0)))]
    check_viewer_in_browser(index, wsi, tmp_path, "cmu_wsi_view", [f"weight:{top}", "dominant"])

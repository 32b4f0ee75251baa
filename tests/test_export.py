"""Predictions out to QuPath (GeoJSON detections) and SpatialData (zarr) — structure,
coordinates against a reference computation, and a SpatialData round trip."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

pytest.importorskip("anndata")

from test_plot_maps import make_prediction  # noqa: E402
from test_viewer import pink_slide  # noqa: E402


@pytest.mark.parametrize("level", ["spot", "tile"])
def test_geojson_detections_structure_and_coordinates(level, tmp_path, capsys):
    from cpnn.cli import main

    a = make_prediction(n_side=5, pitch=100.0, level=level, n_genes=8)
    a.write_h5ad(tmp_path / "p.h5ad")
    assert main(["export", str(tmp_path / "p.h5ad"), "--to", "geojson", "--out", str(tmp_path / "p.geojson"),
                 "--genes", "G01,G03"]) == 0
    assert "wrote" in capsys.readouterr().out
    fc = json.loads((tmp_path / "p.geojson").read_text())
    assert fc["type"] == "FeatureCollection" and len(fc["features"]) == a.n_obs
    xy = np.asarray(a.obsm["spatial"])
    w = np.asarray(a.obsm["cpnn_weights"])
    size = a.uns["spatial"]["S1"]["scalefactors"]["spot_diameter_fullres"]
    types = a.uns["cpnn"]["cell_types"]
    for i, feat in enumerate(fc["features"]):
        assert feat["type"] == "Feature" and feat["geometry"]["type"] == "Polygon"
        props = feat["properties"]
        assert props["objectType"] == "detection" and props["name"] == a.obs_names[i]
        assert props["classification"]["name"] == types[int(w[i].argmax())]
        ring = np.asarray(feat["geometry"]["coordinates"][0])
        assert len(feat["geometry"]["coordinates"]) == 1 and np.array_equal(ring[0], ring[-1])
        if level == "spot":  # a 32-gon on the circle of the spot's diameter, centred on the spot
            theta = 2 * math.pi * np.arange(32) / 32
            ref = xy[i] + 0.5 * size * np.c_[np.cos(theta), np.sin(theta)]
            np.testing.assert_allclose(ring[:-1], ref, atol=1e-3)
        else:  # the tile's square
            h = size / 2
            ref = xy[i] + np.array([[-h, -h], [h, -h], [h, h], [-h, h]])
            np.testing.assert_allclose(ring[:-1], ref, atol=1e-3)
        m = props["measurements"]
        assert list(m)[:len(types)] == [f"{t} weight" for t in types]
        np.testing.assert_allclose([m[f"{t} weight"] for t in types], w[i], rtol=1e-6)
        np.testing.assert_allclose([m["G01 (log1p CP10k)"], m["G03 (log1p CP10k)"]],
                                   np.asarray(a.X)[i, [1, 3]], rtol=1e-6)


def test_geojson_weights_only_and_bad_gene(tmp_path):
    from cpnn.errors import CPNNInputError
    from cpnn.export import prediction_geojson

    a = make_prediction(n_side=3)
    fc = prediction_geojson(a, include_genes=False)
    assert all(len(f["properties"]["measurements"]) == 4 for f in fc["features"])
    with pytest.raises(CPNNInputError, match="not predicted"):
        prediction_geojson(a, genes=["NOPE"])


@pytest.mark.parametrize("level", ["spot", "tile"])
def test_spatialdata_store_round_trips(level, tmp_path, capsys):
    sd = pytest.importorskip("spatialdata", reason="the SpatialData export needs pip install 'cpnn[spatialdata]'")
    from cpnn.cli import main
    from cpnn.export.spatialdata_store import weight_column

    a = make_prediction(n_side=5, pitch=100.0, level=level, n_genes=8)
    a.uns["cpnn"]["cell_types"] = ["Cancer Epithelial", "CAFs", "T-cells", "B cells"]
    a.write_h5ad(tmp_path / "p.h5ad")
    slide = pink_slide(tmp_path / "he.png", size=1000)
    out = tmp_path / "p.zarr"
    args = ["export", str(tmp_path / "p.h5ad"), "--to", "spatialdata", "--out", str(out), "--slide", str(slide)]
    assert main(args) == 0
    assert main(args) == 2 and "already exists" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0
    back = sd.read_zarr(out)
    region = "S1_tiles" if level == "tile" else "S1_spots"
    assert set(back.images) == {"S1_image"} and set(back.shapes) == {region} and set(back.tables) == {"table"}
    image = back.images["S1_image"]  # one scale under 1,024 px; a DataTree of scales above
    image = image["scale0"]["image"] if "scale0" in getattr(image, "children", {}) else image
    assert image.shape == (3, 1000, 1000)
    from PIL import Image

    np.testing.assert_array_equal(np.asarray(image.values).transpose(1, 2, 0), np.asarray(Image.open(slide)))
    table = back.tables["table"]
    assert table.uns["spatialdata_attrs"]["region"] == region
    assert list(table.obs["instance_id"]) == list(map(str, a.obs_names))
    np.testing.assert_allclose(np.asarray(table.X), np.asarray(a.X), rtol=1e-6)
    w = np.asarray(a.obsm["cpnn_weights"])
    for k, t in enumerate(a.uns["cpnn"]["cell_types"]):
        np.testing.assert_allclose(table.obs[weight_column(t)].to_numpy(), w[:, k], rtol=1e-6)
    assert weight_column("Cancer Epithelial") == "weight_Cancer_Epithelial"
    shapes = back.shapes[region]
    assert list(shapes.index.astype(str)) == list(map(str, a.obs_names))
    xy = np.asarray(a.obsm["spatial"])
    size = a.uns["spatial"]["S1"]["scalefactors"]["spot_diameter_fullres"]
    if level == "spot":
        np.testing.assert_allclose(np.c_[shapes.geometry.x, shapes.geometry.y], xy)
        np.testing.assert_allclose(shapes["radius"], size / 2)
    else:
        np.testing.assert_allclose(np.c_[shapes.geometry.centroid.x, shapes.geometry.centroid.y], xy)
        np.testing.assert_allclose(shapes.geometry.area, size * size)
    from spatialdata.transformations import get_transformation

    for element in (back.images["S1_image"], shapes):
        assert type(get_transformation(element, "global")).__name__ == "Identity"


def test_spatialdata_places_the_stored_image_with_its_scale(tmp_path):
    pytest.importorskip("spatialdata", reason="the SpatialData export needs pip install 'cpnn[spatialdata]'")
    from spatialdata.transformations import get_transformation

    from cpnn.export.spatialdata_store import prediction_spatialdata

    a = make_prediction(n_side=4)  # no image file: the stored 400 px image, scale factor < 1
    sdata = prediction_spatialdata(a)
    scale = a.uns["spatial"]["S1"]["scalefactors"]["tissue_hires_scalef"]
    t = get_transformation(sdata.images["S1_image"], "global")
    np.testing.assert_allclose(t.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))[:2, :2],
                               np.eye(2) / scale)

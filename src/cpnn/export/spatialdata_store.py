"""A prediction as a SpatialData store (zarr): the H&E, spots/tiles as shapes, a table.

``spatialdata.read_zarr`` reads it back and napari-spatialdata shows it: the image
``"{sample}_image"`` (multiscale), the shapes ``"{sample}_spots"`` (circles of the spot
diameter) or ``"{sample}_tiles"`` (squares), and the table ``"table"`` annotating those
shapes: ``X`` the predicted expression, ``obsm['cpnn_weights']`` and one
``obs['weight_{type}']`` column per cell type (so viewers colour the shapes by them; see
:func:`weight_column`),
``obs['cpnn_dominant_type']``. Everything sits in the ``"global"`` coordinate system, in
full-resolution pixels of the image the prediction was made on. Needs the extra
``pip install 'cpnn[spatialdata]'``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

import numpy as np

from .._constants import UNS
from ..errors import CPNNInputError

INSTALL = "pip install 'cpnn[spatialdata]'"
IMAGE_CHUNK = 2048


def _require_spatialdata():
    try:
        import spatialdata  # noqa: F401
    except ImportError as exc:
        raise CPNNInputError(f"exporting to SpatialData needs the optional package spatialdata ({exc})",
                             field="--to spatialdata", fix=INSTALL) from exc
    return spatialdata


def prediction_spatialdata(pred, slide: Optional[os.PathLike] = None, include_image: bool = True):
    """Build the SpatialData object of a prediction (nothing written).

    Parameters
    ----------
    pred
        Prediction AnnData or ``.h5ad`` path.
    slide
        The full-resolution image (default: the one the prediction records, else its
        stored downsampled image, placed with its scale factor).
    include_image
        False: shapes and table only.

    Returns
    -------
    spatialdata.SpatialData
    """
    _require_spatialdata()
    import geopandas as gpd
    import pandas as pd
    import shapely
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel, ShapesModel, TableModel
    from spatialdata.transformations import Identity, Scale

    from ..plot.maps import _load, read_prediction
    from .geojson import observation_polygons
    from .source import check_inside, prediction_image

    adata, where = _load(pred, "prediction")
    view = read_prediction(adata, where)
    sample = _element_name(view.title or Path(where).stem)
    images = {}
    if include_image:
        source = prediction_image(adata, slide)
        osl = source.open_openslide()
        check_inside(view.xy, osl.dimensions, source.scale, source)
        to_global = Identity() if source.scale == 1.0 else Scale([1.0 / source.scale] * 2, axes=("y", "x"))
        images[f"{sample}_image"] = Image2DModel.parse(
            _lazy_rgb(osl), dims=("c", "y", "x"), c_coords=["r", "g", "b"], scale_factors=_scale_factors(osl.dimensions),
            transformations={"global": to_global}, chunks=(3, IMAGE_CHUNK, IMAGE_CHUNK))
    ids = pd.Index([str(o) for o in adata.obs_names], name="instance_id")
    if view.level == "tile":
        region = f"{sample}_tiles"
        polys = observation_polygons(view.xy, view.size_px, "square")
        shapes = ShapesModel.parse(gpd.GeoDataFrame(geometry=shapely.polygons(polys[:, :-1, :]), index=ids),
                                   transformations={"global": Identity()})
    else:
        region = f"{sample}_spots"
        shapes = ShapesModel.parse(np.asarray(view.xy, dtype=np.float64), geometry=0,
                                   radius=np.full(len(view.xy), view.size_px / 2.0), index=ids,
                                   transformations={"global": Identity()})
    table = adata.copy()
    table.obs_names = ids.astype(str)
    for k, name in enumerate(view.cell_types):
        table.obs[weight_column(name)] = np.asarray(view.weights[:, k], dtype=np.float32)
    table.obs["region"] = pd.Categorical([region] * table.n_obs)
    table.obs["instance_id"] = ids.to_numpy()
    table.uns.pop("spatial", None)  # the image lives in the store itself
    table.uns[UNS] = _plain(dict(table.uns.get(UNS, {})))
    table = TableModel.parse(table, region=region, region_key="region", instance_key="instance_id")
    return SpatialData(images=images, shapes={region: shapes}, tables={"table": table})


def write_spatialdata(pred, path: Union[str, os.PathLike], slide: Optional[os.PathLike] = None,
                      include_image: bool = True, overwrite: bool = False) -> Path:
    """Write :func:`prediction_spatialdata` as a zarr store at ``path``; returns the path."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise CPNNInputError("the output store already exists", path=path, field="--out",
                             fix="choose a new path, or pass --overwrite")
    sdata = prediction_spatialdata(pred, slide=slide, include_image=include_image)
    if path.exists():
        import shutil

        shutil.rmtree(path)
    import warnings

    with warnings.catch_warnings():  # zarr announcing a future default, not about this store
        warnings.filterwarnings("ignore", message=".*autosharding.*", category=UserWarning)
        sdata.write(path)
    return path


def weight_column(cell_type: str) -> str:
    """The table column of a type's weights: ``weight_{type}`` with characters SpatialData
    refuses in names (anything but letters, digits, ``_``, ``-``, ``.``) replaced by ``_``."""
    return "weight_" + _element_name(cell_type)


def _element_name(name: str) -> str:
    """A SpatialData element name (letters, digits, ``_``, ``-``, ``.``) from a sample id."""
    import re

    cleaned = re.sub(r"[^A-Za-z0-9_.-]", "_", str(name)).strip("._") or "sample"
    return cleaned


def _scale_factors(size) -> list:
    """Halvings until the coarsest level is under ~1,024 px (a multiscale pyramid)."""
    factors, side = [], max(size)
    while side > 1024 and len(factors) < 8:
        factors.append(2)
        side //= 2
    return factors


def _lazy_rgb(osl):
    """The level-0 image as a dask array (3, H, W) read region by region (never all at once)."""
    import dask.array as da

    w, h = osl.dimensions

    def chunks(n):
        return tuple(min(IMAGE_CHUNK, n - s) for s in range(0, n, IMAGE_CHUNK))

    def read(block_info=None):
        (_, _), (y0, y1), (x0, x1) = block_info[None]["array-location"]
        rgba = np.asarray(osl.read_region((x0, y0), 0, (x1 - x0, y1 - y0)).convert("RGB"))
        return np.ascontiguousarray(rgba.transpose(2, 0, 1))

    return da.map_blocks(read, dtype=np.uint8, chunks=((3,), chunks(h), chunks(w)))


def _plain(d):
    """``uns['cpnn']`` without values zarr cannot store as attributes (nested None)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out[k] = _plain(v)
        elif v is not None:
            out[k] = v
    return out


__all__ = ["prediction_spatialdata", "write_spatialdata", "weight_column"]

"""``cpnn view``: a self-contained HTML viewer of a prediction that opens from disk.

The output folder holds ``index.html``, the vendored OpenSeadragon, ``viewer.js`` /
``viewer.css``, ``data.js`` (every overlay, embedded: pages opened from ``file://`` may not
fetch local JSON) and the H&E as a Deep Zoom pyramid (``slide_files/``). No server, no
network: open ``index.html`` in a browser, or copy the folder anywhere.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Union

from .. import __version__
from ..utils import atomic_path

OPENSEADRAGON_VERSION = "6.1.1"


def resources_dir() -> Path:
    """The package folder of the viewer's static files (``viewer/``, ``openseadragon/``)."""
    return Path(__file__).resolve().parent.parent / "resources"


def write_viewer(pred, out_dir: Union[str, os.PathLike], slide: Optional[os.PathLike] = None,
                 genes: Optional[Sequence[str]] = None, n_genes: int = 4, workers: int = 2,
                 progress: bool = True) -> Path:
    """Write the viewer of a prediction.

    Parameters
    ----------
    pred
        Prediction AnnData (``cpnn predict`` / ``predict-slide``) or its ``.h5ad`` path.
    out_dir
        Output folder (created); open ``out_dir/index.html``.
    slide
        The full-resolution image the prediction was made on; default the path the
        prediction records (``uns['cpnn']['slide_path']`` / ``['image_path']``), else its
        stored downsampled image.
    genes
        Genes to show as layers (default: the ``n_genes`` with the largest predicted spread).
    workers
        Threads cutting the H&E pyramid.
    progress
        Progress bar while the pyramid is cut.

    Returns
    -------
    pathlib.Path
        ``out_dir/index.html``.
    """
    from ..export.source import check_inside, prediction_image
    from ..plot.maps import _load, read_prediction
    from .layers import overlay_data
    from .pyramid import write_dzi

    adata, where = _load(pred, "prediction")
    view = read_prediction(adata, where)
    source = prediction_image(adata, slide)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with source.open_openslide() as osl:
        check_inside(view.xy, osl.dimensions, source.scale, source)
        tiles = write_dzi(osl, out, workers=workers, progress=progress,
                          source=str(source.path.resolve()) if source.path else f"stored image of {where}")
        size = osl.dimensions
    data = overlay_data(adata, view, source.scale, genes=genes, n_genes=n_genes)
    data["tiles"] = tiles
    n_obs = f"{view.xy.shape[0]:,} {view.level}s"
    data["subtitle"] = f"{n_obs}, {len(view.cell_types)} cell types; image {size[0]:,} x {size[1]:,} px"
    data["about"] = (f"Image: {source.path.name if source.path else 'the downsampled image stored in the prediction'}. "
                     f"Made by cpnn {__version__} (cpnn view) with OpenSeadragon {OPENSEADRAGON_VERSION}.")
    _write_page(out, data, view.title or Path(where).stem)
    return out / "index.html"


def _write_page(out: Path, data: Dict[str, Any], title: str) -> None:
    import html

    res = resources_dir()
    shutil.copytree(res / "openseadragon", out / "openseadragon", dirs_exist_ok=True)
    for name in ("viewer.js", "viewer.css"):
        shutil.copyfile(res / "viewer" / name, out / name)
    with atomic_path(out / "data.js", suffix=".js") as tmp:
        tmp.write_text("window.CPNN_VIEW_DATA = " + json.dumps(data, separators=(",", ":"), allow_nan=False) + ";\n")
    page = (res / "viewer" / "index.html").read_text(encoding="utf-8").replace("__TITLE__", html.escape(title))
    with atomic_path(out / "index.html", suffix=".html") as tmp:
        tmp.write_text(page, encoding="utf-8")

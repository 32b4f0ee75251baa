"""Which image a prediction's coordinates refer to, and how to open it.

A prediction's ``obsm['spatial']`` holds (x, y) in the full-resolution pixels of the image
it was made on: ``uns['cpnn']['slide_path']`` for whole slides, ``uns['cpnn']['image_path']``
for spot sections. When that file is gone, the downsampled image kept in
``uns['spatial'][library]['images']['hires']`` stands in, with its scale factor.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import numpy as np

from .._constants import UNS
from ..errors import CPNNInputError


@dataclass
class ImageSource:
    """The background image of a prediction.

    Attributes
    ----------
    path
        Image file (whole slide, JPEG/PNG/TIFF), or None when only ``array`` exists.
    array
        In-memory RGB image (the prediction's stored hires image) when there is no file.
    scale
        Image pixels per full-resolution pixel of ``obsm['spatial']`` (1 for the
        full-resolution file).
    what
        Where it came from, for messages (``"--slide"``, ``"uns['cpnn']['slide_path']"``, ...).
    """

    path: Optional[Path]
    array: Optional[np.ndarray]
    scale: float
    what: str

    def open_openslide(self):
        """An ``openslide`` object of the image (``OpenSlide`` for slide formats,
        ``ImageSlide`` for plain JPEG/PNG/TIFF and in-memory images)."""
        import openslide
        from PIL import Image

        from ..image.slide import _large_images_allowed

        if self.path is None:
            return openslide.ImageSlide(Image.fromarray(np.ascontiguousarray(self.array[..., :3]).astype(np.uint8)))
        try:
            with _large_images_allowed():  # PIL checks the size when it opens the file
                return openslide.open_slide(str(self.path))
        except Exception as exc:  # OpenSlide and PIL raise many kinds on unreadable files
            raise CPNNInputError(f"cannot open the image ({type(exc).__name__}: {exc})", path=self.path,
                                 field="--slide", fix="pass a slide OpenSlide reads (svs, ndpi, tiff, mrxs, ...) "
                                 "or a plain JPEG/PNG/TIFF image") from exc


def prediction_image(adata, slide: Optional[os.PathLike] = None) -> ImageSource:
    """The image behind a prediction AnnData.

    Parameters
    ----------
    adata
        A prediction from ``cpnn predict`` / ``predict-slide``.
    slide
        An explicit image (``--slide``); it must be the full-resolution image whose pixels
        ``obsm['spatial']`` uses.

    Returns
    -------
    ImageSource
        ``--slide`` if given, else the recorded slide or image path when that file
        exists, else the stored hires image.

    Raises
    ------
    CPNNInputError
        ``slide`` does not exist, or there is no image at all.
    """
    if slide is not None:
        path = Path(slide)
        if not path.is_file():
            raise CPNNInputError("image file not found", path=path, field="--slide",
                                 fix="pass the full-resolution image the prediction was made on")
        return ImageSource(path, None, 1.0, "--slide")
    info = dict(adata.uns.get(UNS, {}))
    for key in ("slide_path", "image_path"):
        p = info.get(key)
        if p and Path(str(p)).is_file():
            return ImageSource(Path(str(p)), None, 1.0, f"uns['{UNS}']['{key}']")
    image, scale = stored_image(adata)
    if image is None:
        raise CPNNInputError("the prediction names no image that exists here and stores none", field="--slide",
                             fix="pass the full-resolution image with --slide")
    return ImageSource(None, image, scale, "the prediction's stored hires image")


def stored_image(adata) -> Tuple[Optional[np.ndarray], float]:
    """``uns['spatial'][library]['images']['hires' or 'lowres']`` and its scale factor, or (None, 1)."""
    spatial = adata.uns.get("spatial") or {}
    if not spatial:
        return None, 1.0
    lib = str(dict(adata.uns.get(UNS, {})).get("sample_id", ""))
    entry = spatial[lib] if lib in spatial else next(iter(spatial.values()))
    images, sf = dict(entry.get("images", {})), dict(entry.get("scalefactors", {}))
    for name, key in (("hires", "tissue_hires_scalef"), ("lowres", "tissue_lowres_scalef")):
        if name in images and key in sf:
            return np.asarray(images[name]), float(sf[key])
    return None, 1.0


def check_inside(xy: np.ndarray, size: Tuple[int, int], scale: float, source: ImageSource) -> None:
    """Refuse an image that most observations fall outside (the wrong image or resolution)."""
    w, h = size
    p = np.asarray(xy, dtype=np.float64) * scale
    inside = (p[:, 0] >= 0) & (p[:, 0] <= w) & (p[:, 1] >= 0) & (p[:, 1] <= h)
    if len(p) and inside.mean() < 0.5:
        raise CPNNInputError(
            f"{int((~inside).sum())} of {len(p)} observations lie outside the {w} x {h} px image "
            f"({source.what}): it is not the full-resolution image the prediction was made on",
            path=source.path, field="--slide", fix="pass the image whose pixels obsm['spatial'] uses")

"""Slide access: one interface over OpenSlide, tifffile, PIL and in-memory arrays.

Every backend exposes level-0 geometry (``dimensions`` = (W, H), ``mpp`` in µm per
level-0 pixel) and a pyramid (``level_dimensions``, ``level_downsamples``).
``Slide.read_region`` works in level-0 coordinates, picks the cheapest pyramid level
that still has enough resolution, resamples with a Lanczos filter, and fills whatever
lies outside the image with white, so callers never see partial or transparent reads.
"""
from __future__ import annotations

import contextlib
import math
import os
import threading
from pathlib import Path
from typing import Iterator, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from cpnn.errors import CPNNInputError

__all__ = [
    "Slide",
    "OpenSlideSlide",
    "TiffSlide",
    "PILSlide",
    "ArraySlide",
    "open_slide",
    "validate_mpp",
]

OPENSLIDE_SUFFIXES = {".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide"}
TIFF_SUFFIXES = {".tif", ".tiff", ".btf", ".tf8"}
PIL_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"}

MPP_FIX = "pass the slide's microns per pixel: --mpp on the command line (mpp=... in Python)."
_RESAMPLE = Image.Resampling.LANCZOS
_LANCZOS_SUPPORT = 3.0
# pixels held in memory at once while building a thumbnail band by band
_THUMB_BAND_PIXELS = 16_000_000


@contextlib.contextmanager
def _large_images_allowed() -> Iterator[None]:
    """Lift PIL's decompression-bomb limit only while our own reader runs.

    Microscopy images (e.g. HER2ST JPEGs of ~9,300 x 9,900 px) exceed PIL's default guard;
    we do not want to change the limit for the rest of the user's program.
    """
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


def validate_mpp(
    mpp_x: float,
    mpp_y: Optional[float] = None,
    *,
    source: str = "mpp",
    path: Optional[str] = None,
) -> float:
    """Check microns per pixel and return one value (the mean of x and y).

    Parameters
    ----------
    mpp_x, mpp_y
        Microns per level-0 pixel along x and y (``mpp_y`` defaults to ``mpp_x``).
    source
        Where the value came from (used in the error message).
    path
        The slide file, for the error message.

    Raises
    ------
    CPNNInputError
        When a value is not finite, outside 0.05-20 µm/px (``cpnn._constants.MPP_MIN`` /
        ``MPP_MAX``), or x and y differ by more than 10 %.
    """
    from .._constants import MPP_MAX, MPP_MIN

    mpp_y = mpp_x if mpp_y is None else mpp_y
    try:
        mx, my = float(mpp_x), float(mpp_y)
    except (TypeError, ValueError):
        raise CPNNInputError(
            f"microns per pixel from {source} is not a number ({mpp_x!r}, {mpp_y!r}).",
            path=path, field="mpp", fix=MPP_FIX,
        ) from None
    for v in (mx, my):
        if not math.isfinite(v) or not MPP_MIN <= v <= MPP_MAX:
            raise CPNNInputError(
                f"microns per pixel from {source} is {v!r}, which is not a plausible "
                f"microscope resolution (expected {MPP_MIN:g}-{MPP_MAX:g}; H&E scans are ~0.25-1).",
                path=path, field="mpp", fix=MPP_FIX,
            )
    if abs(mx - my) > 0.1 * min(mx, my):
        raise CPNNInputError(
            f"microns per pixel from {source} differ between x ({mx:g}) and y ({my:g}) by "
            "more than 10 %; cpnn needs square pixels.",
            path=path, field="mpp", fix=MPP_FIX,
        )
    return (mx + my) / 2.0


def _mpp_from_resolution(xres: float, yres: float, unit) -> Optional[Tuple[float, float]]:
    """Microns per pixel from TIFF XResolution/YResolution (pixels per unit) and unit."""
    unit_s = str(unit).strip().lower()
    # tifffile RESUNIT enum values / names and OpenSlide's property spellings
    per_unit_um = {
        "2": 25400.0, "inch": 25400.0, "resunit.inch": 25400.0,
        "3": 10000.0, "centimeter": 10000.0, "resunit.centimeter": 10000.0,
        "4": 1000.0, "millimeter": 1000.0, "resunit.millimeter": 1000.0,
        "5": 1.0, "micrometer": 1.0, "resunit.micrometer": 1.0,
    }.get(unit_s)
    if per_unit_um is None or not xres or not yres:
        return None
    if xres <= 0 or yres <= 0:
        return None
    return per_unit_um / float(xres), per_unit_um / float(yres)


def _rational(value) -> float:
    if isinstance(value, tuple) and len(value) == 2:
        return value[0] / value[1] if value[1] else 0.0
    return float(value)


def _as_rgb_uint8(arr: np.ndarray) -> np.ndarray:
    """(h, w), (h, w, 1|3|4) uint8 -> (h, w, 3) uint8, alpha composited on white."""
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.shape[2] == 1:
        return np.repeat(arr, 3, axis=2)
    if arr.shape[2] == 4:
        alpha = arr[..., 3:4]
        if alpha.min() == 255:
            return np.ascontiguousarray(arr[..., :3])
        a = alpha.astype(np.uint16)
        rgb = (arr[..., :3].astype(np.uint16) * a + 255 * (255 - a) + 127) // 255
        return rgb.astype(np.uint8)
    return np.ascontiguousarray(arr[..., :3])


class Slide:
    """Common interface of all slide backends (level-0 coordinates, RGB uint8 output).

    Subclasses set ``path``, ``name``, ``mpp`` and ``level_dimensions`` and implement
    ``_read_level(level, x, y, w, h)`` for a box lying entirely inside that level.
    """

    path: Optional[str] = None
    name: str = "slide"
    mpp: float
    level_dimensions: Tuple[Tuple[int, int], ...]

    # --- geometry -------------------------------------------------------------------
    @property
    def dimensions(self) -> Tuple[int, int]:
        """(width, height) in level-0 pixels."""
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    @property
    def level_downsamples(self) -> Tuple[float, ...]:
        """Mean of the x and y downsampling factor of each level relative to level 0."""
        w0, h0 = self.level_dimensions[0]
        return tuple((w0 / w + h0 / h) / 2.0 for w, h in self.level_dimensions)

    def _axis_downsample(self, level: int) -> Tuple[float, float]:
        w0, h0 = self.level_dimensions[0]
        w, h = self.level_dimensions[level]
        return w0 / w, h0 / h

    def best_level_for_downsample(self, downsample: float) -> int:
        """The coarsest level whose downsample does not exceed ``downsample`` (1 % slack)."""
        best = 0
        for i, ds in enumerate(self.level_downsamples):
            if ds <= downsample * 1.01 and ds >= self.level_downsamples[best]:
                best = i
        return best

    @property
    def _label(self) -> str:
        return self.path if self.path is not None else self.name

    # --- reading ----------------------------------------------------------------------
    def _read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        raise NotImplementedError

    def _read_padded(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Integer box at ``level``; whatever falls outside the level is white."""
        lw, lh = self.level_dimensions[level]
        ix0, iy0 = max(x, 0), max(y, 0)
        ix1, iy1 = min(x + w, lw), min(y + h, lh)
        if ix0 == x and iy0 == y and ix1 == x + w and iy1 == y + h:
            return self._read_level(level, x, y, w, h)
        out = np.full((h, w, 3), 255, dtype=np.uint8)
        if ix1 > ix0 and iy1 > iy0:
            out[iy0 - y : iy1 - y, ix0 - x : ix1 - x] = self._read_level(
                level, ix0, iy0, ix1 - ix0, iy1 - iy0
            )
        return out

    def read_region(
        self,
        x: float,
        y: float,
        w: float,
        h: float,
        out_size: Optional[Tuple[int, int]] = None,
    ) -> np.ndarray:
        """Read a level-0 box, optionally resampled, as RGB uint8.

        Parameters
        ----------
        x, y
            Top-left corner in level-0 pixels (may be fractional or negative).
        w, h
            Box size in level-0 pixels (may be fractional).
        out_size
            (width, height) of the result; default ``(round(w), round(h))``. When smaller
            than the box, the read comes from the coarsest pyramid level that still has at
            least the requested resolution and is resampled with a Lanczos filter.

        Returns
        -------
        numpy.ndarray
            ``(out_h, out_w, 3)`` uint8; parts outside the image are white (255).
        """
        if not (w > 0 and h > 0):
            raise CPNNInputError(
                f"read_region needs a positive width and height, got w={w!r}, h={h!r}.",
                path=self._label, field="read_region", fix="pass w > 0 and h > 0.",
            )
        if out_size is None:
            out_size = (max(1, int(round(w))), max(1, int(round(h))))
        ow, oh = int(out_size[0]), int(out_size[1])
        if ow < 1 or oh < 1:
            raise CPNNInputError(
                f"out_size must be positive, got {out_size!r}.",
                path=self._label, field="out_size", fix="pass out_size=(width, height) >= 1.",
            )
        if abs(w - ow) < 1e-6 and abs(h - oh) < 1e-6:
            # no scaling: snap to the pixel grid instead of interpolating half a pixel
            return self._read_padded(0, int(round(x)), int(round(y)), ow, oh)

        level = self.best_level_for_downsample(min(w / ow, h / oh))
        sx, sy = self._axis_downsample(level)
        lx0, ly0, lx1, ly1 = x / sx, y / sy, (x + w) / sx, (y + h) / sy
        if (
            abs((lx1 - lx0) - ow) < 1e-6 and abs((ly1 - ly0) - oh) < 1e-6
            and abs(lx0 - round(lx0)) < 1e-6 and abs(ly0 - round(ly0)) < 1e-6
        ):
            return self._read_padded(level, int(round(lx0)), int(round(ly0)), ow, oh)
        scale = max((lx1 - lx0) / ow, (ly1 - ly0) / oh, 1.0)
        # read the filter's support around the box too, so that adjacent reads (tiles,
        # thumbnail bands) join without seams and image edges fade into white correctly
        margin = int(math.ceil(_LANCZOS_SUPPORT * scale)) + 1
        ix0, iy0 = int(math.floor(lx0)) - margin, int(math.floor(ly0)) - margin
        ix1, iy1 = int(math.ceil(lx1)) + margin, int(math.ceil(ly1)) + margin
        src = self._read_padded(level, ix0, iy0, ix1 - ix0, iy1 - iy0)
        img = Image.fromarray(src, mode="RGB") if src.flags.c_contiguous else Image.fromarray(
            np.ascontiguousarray(src)
        )
        out = img.resize(
            (ow, oh), resample=_RESAMPLE, box=(lx0 - ix0, ly0 - iy0, lx1 - ix0, ly1 - iy0)
        )
        return np.asarray(out)

    def thumbnail(self, max_px: int = 2048) -> np.ndarray:
        """Whole slide, downsampled so that its longer side is at most ``max_px``.

        Read in horizontal bands from the best pyramid level, so memory stays bounded
        even for slides without a low-resolution level.
        """
        w0, h0 = self.dimensions
        scale = max(w0, h0) / float(max_px)
        if scale <= 1.0:
            ow, oh = w0, h0
        else:
            ow, oh = max(1, int(round(w0 / scale))), max(1, int(round(h0 / scale)))
        sy0 = h0 / oh  # level-0 rows per output row
        level = self.best_level_for_downsample(min(w0 / ow, sy0))
        lw = self.level_dimensions[level][0]
        rows_per_out = sy0 / self._axis_downsample(level)[1]
        band = max(1, int(_THUMB_BAND_PIXELS / max(1.0, lw * rows_per_out)))
        if band >= oh:
            return self.read_region(0, 0, w0, h0, out_size=(ow, oh))
        out = np.empty((oh, ow, 3), dtype=np.uint8)
        for r0 in range(0, oh, band):
            r1 = min(oh, r0 + band)
            out[r0:r1] = self.read_region(0, r0 * sy0, w0, (r1 - r0) * sy0, out_size=(ow, r1 - r0))
        return out

    # --- lifetime ---------------------------------------------------------------------
    def close(self) -> None:
        """Release file handles and cached pixels."""

    def __enter__(self) -> "Slide":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        w, h = self.dimensions
        return (
            f"{type(self).__name__}({self._label!r}, {w}x{h} px, mpp={self.mpp:.4g}, "
            f"levels={self.level_count})"
        )


def _resolve_mpp(
    user_mpp: Optional[float],
    path: Optional[str],
    candidates: Sequence[Tuple[str, Optional[Tuple[float, float]]]],
) -> float:
    """The slide's own (plausible) metadata > the user's value (for slides without one) > error.

    A user value that disagrees with the slide's by more than 10 % is ignored with a warning."""
    user = None if user_mpp is None else validate_mpp(user_mpp, source="the mpp argument", path=path)
    meta_error = None
    for source, pair in candidates:
        if pair is None:
            continue
        try:
            own = validate_mpp(pair[0], pair[1], source=source, path=path)
        except CPNNInputError as exc:  # e.g. a desktop 72-dpi tag: not the scan's resolution
            meta_error = meta_error or exc
            continue
        if user is not None and abs(user - own) > 0.1 * own:
            import warnings

            warnings.warn(f"{path}: the slide records {own:.4g} µm per pixel ({source}); the given mpp {user:g} "
                          "is ignored (it applies only to images without one)", stacklevel=3)
        return own
    if user is not None:
        return user
    if meta_error is not None:
        raise meta_error
    raise CPNNInputError(
        "the slide has no microns-per-pixel metadata, so patch sizes in microns cannot be "
        "converted to pixels.",
        path=path, field="mpp", fix=MPP_FIX,
    )


class OpenSlideSlide(Slide):
    """A whole-slide image read with OpenSlide (svs, ndpi, mrxs, scn, generic tiled TIFF...)."""

    def __init__(self, path: os.PathLike | str, mpp: Optional[float] = None) -> None:
        import openslide

        self.path = os.fspath(path)
        self.name = Path(self.path).name
        try:
            self._osr = openslide.OpenSlide(self.path)
        except (openslide.OpenSlideError, OSError) as exc:
            raise CPNNInputError(
                f"could not be opened as a whole-slide image (corrupt or unsupported "
                f"file: {exc}).",
                path=self.path, field="image",
                fix="check that the file is complete (re-download it) and is a format "
                "OpenSlide reads (svs, ndpi, mrxs, scn, vms, bif, tiled TIFF).",
            ) from None
        self.level_dimensions = tuple(tuple(int(v) for v in d) for d in self._osr.level_dimensions)
        props = self._osr.properties
        candidates = []
        if "openslide.mpp-x" in props:
            candidates.append(
                ("OpenSlide metadata (openslide.mpp-x/y)",
                 (_float(props["openslide.mpp-x"]), _float(props.get("openslide.mpp-y", props["openslide.mpp-x"]))))
            )
        if "tiff.XResolution" in props:
            candidates.append(
                ("the TIFF resolution tags",
                 _mpp_from_resolution(
                     _float(props["tiff.XResolution"]),
                     _float(props.get("tiff.YResolution", props["tiff.XResolution"])),
                     props.get("tiff.ResolutionUnit", "inch"),
                 ))
            )
        self.mpp = _resolve_mpp(mpp, self.path, candidates)
        self._os_downsamples = tuple(float(d) for d in self._osr.level_downsamples)

    def _read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        ds = self._os_downsamples[level]
        loc = (int(round(x * ds)), int(round(y * ds)))
        try:
            img = self._osr.read_region(loc, level, (w, h))
        except Exception as exc:  # openslide raises OpenSlideError on corrupt tiles
            raise CPNNInputError(
                f"reading a region failed ({exc}); the file may be corrupt.",
                path=self.path, field="image", fix="re-download or re-export the slide.",
            ) from None
        return _as_rgb_uint8(np.asarray(img))

    def close(self) -> None:
        osr = getattr(self, "_osr", None)
        if osr is not None:
            osr.close()
            self._osr = None


def _float(v) -> Optional[float]:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


class TiffSlide(Slide):
    """A TIFF read with tifffile: tiled pyramids (levels or SubIFDs) or single images.

    Tiled levels are decoded tile by tile; untiled (strip) levels are decoded whole once
    and cached.
    """

    def __init__(self, path: os.PathLike | str, mpp: Optional[float] = None) -> None:
        import tifffile

        self.path = os.fspath(path)
        self.name = Path(self.path).name
        try:
            self._tif = tifffile.TiffFile(self.path)
            series = self._tif.series[0]
            levels = list(series.levels) or [series]
            self._pages = [lvl.keyframe for lvl in levels]
        except Exception as exc:
            raise CPNNInputError(
                f"could not be read as a TIFF image (corrupt or unsupported: {exc}).",
                path=self.path, field="image", fix="check that the file is a complete TIFF.",
            ) from None
        dims = []
        for page in self._pages:
            shape = page.shape
            if page.dtype != np.uint8:
                self.close()
                raise CPNNInputError(
                    f"pixels are {page.dtype}, but an 8-bit RGB image is needed.",
                    path=self.path, field="dtype", fix="convert the image to 8-bit RGB.",
                )
            if page.planarconfig == 2 and len(shape) == 3:  # separate samples: (S, H, W)
                h, w = shape[1], shape[2]
            else:
                h, w = shape[0], shape[1]
            dims.append((int(w), int(h)))
        # keep only levels that really are smaller versions of level 0 (same aspect)
        w0, h0 = dims[0]
        keep = [0]
        for i in range(1, len(dims)):
            (w, h), (pw, ph) = dims[i], dims[keep[-1]]
            if w < pw and h < ph and abs((w0 / w) / (h0 / h) - 1.0) < 0.05:
                keep.append(i)
        self._pages = [self._pages[i] for i in keep]
        self.level_dimensions = tuple(dims[i] for i in keep)
        self._cache: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()
        page0 = self._pages[0]
        tags = page0.tags
        candidates = []
        if "XResolution" in tags:
            unit = tags["ResolutionUnit"].value if "ResolutionUnit" in tags else 2
            yres = tags["YResolution"].value if "YResolution" in tags else tags["XResolution"].value
            candidates.append(
                ("the TIFF resolution tags",
                 _mpp_from_resolution(_rational(tags["XResolution"].value), _rational(yres), int(unit)))
            )
        self.mpp = _resolve_mpp(mpp, self.path, candidates)

    def _read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        page = self._pages[level]
        if page.is_tiled and page.planarconfig != 2:
            return self._read_tiled(page, x, y, w, h)
        arr = self._cache.get(level)
        if arr is None:
            with self._lock:
                raw = page.asarray()
            if page.planarconfig == 2 and raw.ndim == 3:
                raw = np.moveaxis(raw, 0, -1)
            arr = _as_rgb_uint8(raw)
            self._cache[level] = arr
        return arr[y : y + h, x : x + w]

    def _read_tiled(self, page, x: int, y: int, w: int, h: int) -> np.ndarray:
        tw, th = int(page.tilewidth), int(page.tilelength)
        width = int(page.imagewidth)
        ntx = -(-width // tw)
        spp = int(page.samplesperpixel)
        out = np.empty((h, w, spp), dtype=np.uint8)
        decode = page.decode
        fh = page.parent.filehandle
        for ty in range(y // th, (y + h - 1) // th + 1):
            for tx in range(x // tw, (x + w - 1) // tw + 1):
                idx = ty * ntx + tx
                offset, count = page.dataoffsets[idx], page.databytecounts[idx]
                with self._lock:
                    if count:
                        fh.seek(offset)
                        data = fh.read(count)
                    else:
                        data = None
                try:
                    seg, _, _ = decode(data, idx, jpegtables=page.jpegtables)
                except Exception as exc:
                    raise CPNNInputError(
                        f"tile {idx} could not be decoded ({exc}).",
                        path=self.path, field="image",
                        fix="the TIFF compression may need the 'imagecodecs' package "
                        "(pip install imagecodecs), or the file is corrupt.",
                    ) from None
                tile = (
                    np.full((th, tw, spp), 255, np.uint8) if seg is None
                    else np.asarray(seg).reshape(th, tw, spp)
                )
                # intersection of this tile with the requested box, in level pixels
                gx0, gy0 = max(x, tx * tw), max(y, ty * th)
                gx1, gy1 = min(x + w, (tx + 1) * tw), min(y + h, (ty + 1) * th)
                out[gy0 - y : gy1 - y, gx0 - x : gx1 - x] = tile[
                    gy0 - ty * th : gy1 - ty * th, gx0 - tx * tw : gx1 - tx * tw
                ]
        return _as_rgb_uint8(out)

    def close(self) -> None:
        tif = getattr(self, "_tif", None)
        if tif is not None:
            tif.close()
            self._tif = None
        self._cache = {}


class PILSlide(Slide):
    """A plain image (JPEG, PNG, ...) read with Pillow; decoded whole once, then cached."""

    def __init__(self, path: os.PathLike | str, mpp: Optional[float] = None) -> None:
        self.path = os.fspath(path)
        self.name = Path(self.path).name
        try:
            with _large_images_allowed(), Image.open(self.path) as im:
                size, mode, fmt = im.size, im.mode, im.format
        except Exception as exc:
            raise CPNNInputError(
                f"could not be read as an image (corrupt or unsupported: {exc}).",
                path=self.path, field="image", fix="check that the file is a complete JPEG/PNG/TIFF.",
            ) from None
        if mode not in {"RGB", "RGBA", "L", "LA", "P", "CMYK", "YCbCr", "1"}:
            raise CPNNInputError(
                f"image mode {mode!r} is not 8-bit colour or grey.",
                path=self.path, field="mode", fix="convert the image to 8-bit RGB.",
            )
        self.format = fmt
        self.level_dimensions = ((int(size[0]), int(size[1])),)
        # plain images carry no trustworthy physical pixel size (JPEG DPI is usually 72)
        self.mpp = _resolve_mpp(mpp, self.path, [])
        self._array: Optional[np.ndarray] = None

    def _load(self) -> np.ndarray:
        if self._array is None:
            try:
                with _large_images_allowed(), Image.open(self.path) as im:
                    im.load()
                    if im.mode in ("RGBA", "LA", "P"):
                        arr = _as_rgb_uint8(np.asarray(im.convert("RGBA")))
                    else:
                        arr = np.asarray(im.convert("RGB"))
            except Exception as exc:
                raise CPNNInputError(
                    f"decoding the image failed ({exc}); the file may be truncated or corrupt.",
                    path=self.path, field="image", fix="re-download or re-export the image.",
                ) from None
            self._array = arr
        return self._array

    def _read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        return self._load()[y : y + h, x : x + w]

    def thumbnail(self, max_px: int = 2048) -> np.ndarray:
        w0, h0 = self.dimensions
        if self._array is not None or self.format != "JPEG" or max(w0, h0) <= max_px:
            return super().thumbnail(max_px)
        # JPEG can decode at 1/2, 1/4, 1/8 scale directly: no need for the full array
        scale = max(w0, h0) / float(max_px)
        ow, oh = max(1, int(round(w0 / scale))), max(1, int(round(h0 / scale)))
        try:
            with _large_images_allowed(), Image.open(self.path) as im:
                im.draft("RGB", (ow, oh))
                small = im.convert("RGB")
                return np.asarray(small.resize((ow, oh), resample=_RESAMPLE))
        except Exception as exc:
            raise CPNNInputError(
                f"decoding the image failed ({exc}); the file may be truncated or corrupt.",
                path=self.path, field="image", fix="re-download or re-export the image.",
            ) from None

    def close(self) -> None:
        self._array = None


class ArraySlide(Slide):
    """An in-memory H x W x 3 (or x 4, or grey H x W) uint8 image with a known mpp.

    Parameters
    ----------
    array
        The pixels, level 0.
    mpp
        Microns per pixel (required: an array has no metadata).
    name
        Label used in messages and ``repr``.
    """

    def __init__(self, array: np.ndarray, mpp: float, name: str = "array") -> None:
        self.path = None
        self.name = name
        arr = np.asarray(array)
        if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 3, 4)):
            raise CPNNInputError(
                f"expected an (H, W, 3) uint8 image, got shape {arr.shape} dtype {arr.dtype}.",
                path=name, field="array", fix="pass an RGB uint8 array (e.g. np.asarray(PIL image)).",
            )
        if arr.shape[0] < 1 or arr.shape[1] < 1:
            raise CPNNInputError("the image is empty.", path=name, field="array", fix="pass a non-empty image.")
        self._array = arr if (arr.ndim == 3 and arr.shape[2] == 3) else _as_rgb_uint8(arr)
        self.level_dimensions = ((int(arr.shape[1]), int(arr.shape[0])),)
        if mpp is None:
            raise CPNNInputError(
                "an in-memory image needs its microns per pixel.", path=name, field="mpp", fix=MPP_FIX
            )
        self.mpp = validate_mpp(mpp, source="the mpp argument", path=name)

    def _read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        return self._array[y : y + h, x : x + w]


def open_slide(path: os.PathLike | str, mpp: Optional[float] = None) -> Slide:
    """Open a slide or a plain image with the right backend.

    Parameters
    ----------
    path
        Whole-slide file (svs, ndpi, mrxs, scn, vms, bif), pyramidal or plain TIFF, or a
        plain image (JPEG, PNG).
    mpp
        Microns per level-0 pixel for files without (plausible) metadata: required there
        (plain JPEG/PNG, some TIFFs and SVS files); a file's own value wins, with a
        warning when the two differ by more than 10 %.

    Returns
    -------
    Slide
        ``OpenSlideSlide``, ``TiffSlide`` or ``PILSlide``; use it as a context manager or
        call ``close()``.

    Raises
    ------
    CPNNInputError
        Missing, unreadable or corrupt file; no or implausible microns per pixel.
    """
    p = Path(os.fspath(path))
    if not p.exists():
        raise CPNNInputError("file not found.", path=p, field="image", fix="check the image path.")
    if p.is_dir() and p.suffix.lower() not in OPENSLIDE_SUFFIXES:
        raise CPNNInputError(
            "is a folder, not an image file.", path=p, field="image", fix="pass the image file itself."
        )
    suffix = p.suffix.lower()
    if suffix in OPENSLIDE_SUFFIXES:
        return OpenSlideSlide(p, mpp)
    if suffix in PIL_SUFFIXES:
        return PILSlide(p, mpp)
    if suffix in TIFF_SUFFIXES:
        import openslide

        fmt = _detect_openslide(openslide, p)
        # OpenSlide reads tiled pyramids fast (and JPEG tiles without extra codecs); plain
        # strip TIFFs and SubIFD pyramids it rejects go to tifffile.
        if fmt is not None:
            try:
                slide = OpenSlideSlide(p, mpp)
            except CPNNInputError as exc:
                if exc.field == "mpp":
                    raise
            else:
                # OpenSlide ignores pyramids stored as SubIFDs (e.g. OME-TIFF); without
                # them every downsampled read would decode full resolution
                if slide.level_count > 1 or _tifffile_level_count(p) <= 1:
                    return slide
                slide.close()
        return TiffSlide(p, mpp)
    import openslide

    if _detect_openslide(openslide, p) is not None:
        return OpenSlideSlide(p, mpp)
    return PILSlide(p, mpp)


def _tifffile_level_count(p: Path) -> int:
    import tifffile

    try:
        with tifffile.TiffFile(str(p)) as tif:
            return len(tif.series[0].levels)
    except Exception:
        return 0


def _detect_openslide(openslide, p: Path) -> Optional[str]:
    try:
        return openslide.OpenSlide.detect_format(str(p))
    except Exception:
        return None

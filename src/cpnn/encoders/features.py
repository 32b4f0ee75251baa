"""Patch feature files in the CLAM / TRIDENT HDF5 layout.

Layout written: datasets ``features`` (N x D float32), ``coords`` (N x 2 int64, top-left
corner of each patch in level-0 pixels, x first), optional ``ids`` (utf-8 strings); file
attributes ``encoder``, ``patch_size_px``, ``patch_um``, ``mpp`` (of the extracted
patches), ``level0_mpp``, ``complete`` = 1, ``cpnn_version``; and on ``coords`` the
TRIDENT-style ``patch_size`` and ``patch_size_level0``. Files made by CLAM (features
(N, D) or (1, N, D)) and TRIDENT (attributes on ``coords``) are read too.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import h5py
import numpy as np

from cpnn.errors import CPNNInputError
from cpnn.utils import atomic_path

#: attributes every FeatureFile.attrs has (None when the file does not say)
STANDARD_ATTRS = ("encoder", "patch_size_px", "patch_um", "mpp", "level0_mpp", "complete",
                  "cpnn_version", "tta", "patch_size_level0", "level0_magnification")

_CHUNK_ROWS = 65536


@dataclass
class FeatureFile:
    """Contents of a patch feature file.

    Attributes
    ----------
    features
        (N, D) float32.
    coords
        (N, 2) int64, top-left level-0 pixel of each patch (x, y).
    ids
        Observation ids (spot barcodes...) or None.
    attrs
        File and ``coords`` attributes; the keys in ``STANDARD_ATTRS`` are always present.
    """

    features: np.ndarray
    coords: np.ndarray
    ids: Optional[List[str]] = None
    attrs: Dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.features.shape[0])


def _cpnn_version() -> str:
    try:
        from cpnn import __version__
    except ImportError:  # pragma: no cover
        return "unknown"
    return __version__


def _check_finite(features: np.ndarray, path: Any) -> None:
    for start in range(0, features.shape[0], _CHUNK_ROWS):
        block = features[start:start + _CHUNK_ROWS]
        if not np.isfinite(block).all():
            row = start + int(np.nonzero(~np.isfinite(block).all(axis=1))[0][0])
            raise CPNNInputError(
                f"features contain NaN or infinite values (first at row {row}).",
                path=path, field="features",
                fix="re-extract the features; check the encoder and the input patches.",
            )


def _to_attr(value: Any) -> Any:
    if isinstance(value, (str, bytes, int, float, bool, np.integer, np.floating, np.bool_)):
        return value
    if isinstance(value, (list, tuple, np.ndarray)):
        return np.asarray(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    import json

    return json.dumps(value, default=str)


def write_feature_file(path: os.PathLike | str, features: np.ndarray, coords: np.ndarray,
                       attrs: Optional[Dict[str, Any]] = None,
                       ids: Optional[Sequence[str]] = None) -> Path:
    """Write patch features as a CLAM/TRIDENT-compatible HDF5 file, atomically.

    Parameters
    ----------
    path
        Output ``.h5`` file; written to a temporary file then renamed, so a crash never
        leaves a partial file at ``path``.
    features
        (N, D) array, stored as float32; must be finite.
    coords
        (N, 2) integer array: top-left corner (x, y) of each patch in level-0 pixels
        (for spots, the top-left of the patch centred on the spot).
    attrs
        File attributes, e.g. ``encoder``, ``patch_size_px``, ``patch_um``, ``mpp``,
        ``level0_mpp``. ``complete`` = 1 and ``cpnn_version`` are added. None values are
        not written.
    ids
        Optional N unique observation ids, stored as utf-8 strings.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    path = Path(path)
    features = np.asarray(features)
    if features.ndim != 2:
        raise CPNNInputError(f"features have shape {features.shape}, expected (N, D).",
                             path=path, field="features", fix="pass a 2-D array, one row per patch.")
    features = features.astype(np.float32, copy=False)
    _check_finite(features, path)
    coords = validate_coords(coords, features.shape[0], path)
    ids = validate_ids(ids, features.shape[0], path)
    with atomic_path(path, suffix=".h5") as tmp:
        with h5py.File(tmp, "w") as fh:
            _write_layout(fh, coords, ids, attrs, features=features)
            fh.attrs["complete"] = 1
    return path


def validate_coords(coords: Any, n: int, path: Any = None) -> np.ndarray:
    """(n, 2) whole-pixel coords as int64, or a CPNNInputError."""
    coords = np.asarray(coords)
    if coords.shape != (n, 2):
        raise CPNNInputError(
            f"coords have shape {coords.shape}, expected ({n}, 2) to match features.",
            path=path, field="coords", fix="pass one (x, y) top-left corner per feature row.")
    if not np.issubdtype(coords.dtype, np.integer):
        if (not np.issubdtype(coords.dtype, np.number) or not np.all(np.isfinite(coords))
                or not np.allclose(coords, np.round(coords))):
            raise CPNNInputError("coords are not whole numbers.", path=path, field="coords",
                                 fix="round patch corners to whole level-0 pixels.")
        coords = np.round(coords)
    return coords.astype(np.int64)


def validate_ids(ids: Optional[Sequence[Any]], n: int, path: Any = None) -> Optional[List[str]]:
    """``ids`` as n unique strings (or None), or a CPNNInputError."""
    if ids is None:
        return None
    ids = [str(i) for i in ids]
    if len(ids) != n:
        raise CPNNInputError(f"{len(ids)} ids for {n} feature rows.",
                             path=path, field="ids", fix="pass one id per row.")
    if len(set(ids)) != n:
        seen: set = set()
        dup = next(i for i in ids if i in seen or seen.add(i))
        raise CPNNInputError(f"ids are not unique (e.g. {dup!r} repeats).", path=path,
                             field="ids", fix="pass one distinct id per observation.")
    return ids


def _write_layout(fh: h5py.File, coords: np.ndarray, ids: Optional[List[str]],
                  attrs: Optional[Dict[str, Any]], features: Optional[np.ndarray] = None,
                  dim: Optional[int] = None) -> h5py.Dataset:
    """Create datasets and attributes (all but ``complete``); return ``features``."""
    if features is not None:
        dset = fh.create_dataset("features", data=features)
    else:
        dset = fh.create_dataset("features", shape=(coords.shape[0], int(dim)), dtype=np.float32)
    dc = fh.create_dataset("coords", data=coords)
    if ids is not None:
        fh.create_dataset("ids", data=np.array(ids, dtype=object),
                          dtype=h5py.string_dtype("utf-8"))
    attrs = dict(attrs or {})
    attrs.pop("complete", None)
    attrs.setdefault("cpnn_version", _cpnn_version())
    for key, value in attrs.items():
        if value is not None:
            fh.attrs[key] = _to_attr(value)
    # TRIDENT keeps the patch geometry on `coords`
    if attrs.get("patch_size_px") is not None:
        dc.attrs["patch_size"] = int(attrs["patch_size_px"])
    if attrs.get("patch_size_level0") is not None:
        dc.attrs["patch_size_level0"] = int(attrs["patch_size_level0"])
    return dset


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, np.ndarray):
        return value.tolist() if value.ndim else value.item()
    if isinstance(value, np.generic):
        return value.item()
    return value


def read_feature_attrs(path: os.PathLike | str) -> Dict[str, Any]:
    """Only the attributes of a feature file (cheap; no features are read).

    Same rules as :func:`read_feature_file` for ``attrs``.
    """
    path = Path(path)
    with _open(path) as fh:
        try:
            return _collect_attrs(fh)
        except (OSError, KeyError, RuntimeError) as exc:
            raise _corrupt(path, exc) from exc


def _open(path: Path) -> h5py.File:
    if not path.is_file():
        raise CPNNInputError("feature file not found.", path=path,
                             fix="check the path, or extract features first.")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise _corrupt(path, exc) from exc


def _corrupt(path: Path, exc: BaseException) -> CPNNInputError:
    return CPNNInputError(
        f"not a readable HDF5 feature file; it is truncated or corrupt ({exc}).",
        path=path, fix="delete it and extract the features again.")


def _collect_attrs(fh: h5py.File) -> Dict[str, Any]:
    attrs: Dict[str, Any] = {k: None for k in STANDARD_ATTRS}
    if "coords" in fh:
        attrs.update({k: _plain(v) for k, v in fh["coords"].attrs.items()})
    if "features" in fh:
        attrs.update({k: _plain(v) for k, v in fh["features"].attrs.items()})
    attrs.update({k: _plain(v) for k, v in fh.attrs.items()})
    # TRIDENT / CLAM names -> ours
    if attrs["patch_size_px"] is None and attrs.get("patch_size") is not None:
        attrs["patch_size_px"] = attrs["patch_size"]
    if attrs["level0_mpp"] is not None and attrs["patch_size_level0"] is not None:
        if attrs["patch_um"] is None:
            attrs["patch_um"] = float(attrs["level0_mpp"]) * float(attrs["patch_size_level0"])
        if attrs["mpp"] is None and attrs["patch_size_px"]:
            attrs["mpp"] = float(attrs["patch_um"]) / float(attrs["patch_size_px"])
    return attrs


def read_feature_file(path: os.PathLike | str) -> FeatureFile:
    """Read a CLAM / TRIDENT / cpnn patch feature file.

    Parameters
    ----------
    path
        HDF5 file with datasets ``features`` ((N, D) or CLAM's (1, N, D)) and ``coords``
        (N, 2), optionally ``ids``.

    Returns
    -------
    FeatureFile
        Features as float32, coords as int64; ``attrs`` merges the attributes of the file,
        of ``coords`` and of ``features`` (the file's win), with absent standard keys set
        to None and TRIDENT's ``patch_size`` also given as ``patch_size_px``.

    Raises
    ------
    CPNNInputError
        Missing file or dataset, truncated/corrupt HDF5, shape mismatch, NaN/inf features.
    """
    path = Path(path)
    with _open(path) as fh:
        try:
            for name in ("features", "coords"):
                if name not in fh or not isinstance(fh[name], h5py.Dataset):
                    raise CPNNInputError(
                        f"the file has no {name!r} dataset (found: {sorted(fh.keys())}).",
                        path=path, field=name,
                        fix="pass a CLAM/TRIDENT feature file with 'features' and 'coords'.")
            features = fh["features"][()]
            coords = fh["coords"][()]
            ids = None
            if "ids" in fh:
                ids = [_plain(i) for i in fh["ids"][()]]
            attrs = _collect_attrs(fh)
        except CPNNInputError:
            raise
        except (OSError, KeyError, RuntimeError, ValueError) as exc:
            raise _corrupt(path, exc) from exc
    if features.ndim == 3 and features.shape[0] == 1:
        features = features[0]
    if features.ndim != 2:
        raise CPNNInputError(f"features have shape {features.shape}, expected (N, D) or (1, N, D).",
                             path=path, field="features",
                             fix="store one feature row per patch.")
    if coords.ndim == 3 and coords.shape[0] == 1:
        coords = coords[0]
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise CPNNInputError(f"coords have shape {coords.shape}, expected (N, 2).",
                             path=path, field="coords", fix="store one (x, y) pair per patch.")
    if coords.shape[0] != features.shape[0]:
        raise CPNNInputError(
            f"{features.shape[0]} feature rows but {coords.shape[0]} coords.",
            path=path, field="coords", fix="the file is inconsistent; extract the features again.")
    if ids is not None and len(ids) != features.shape[0]:
        raise CPNNInputError(f"{len(ids)} ids for {features.shape[0]} feature rows.",
                             path=path, field="ids", fix="extract the features again.")
    if not np.issubdtype(features.dtype, np.floating):
        raise CPNNInputError(f"features have dtype {features.dtype}, expected floating point.",
                             path=path, field="features", fix="store features as float32.")
    features = features.astype(np.float32, copy=False)
    _check_finite(features, path)
    if np.issubdtype(coords.dtype, np.floating):
        coords = np.round(coords)
    return FeatureFile(features=features, coords=coords.astype(np.int64), ids=ids, attrs=attrs)

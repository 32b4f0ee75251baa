"""Validation and assembly shared by the spatial and bulk readers.

Every reader funnels its counts through :func:`check_counts` and builds its AnnData with
:func:`make_spatial_adata`, so that all of them give the same guarantees: raw integer
counts as CSR float32, unique gene names, ``obsm["spatial"]`` as float64 (x, y) in
full-resolution pixels, and the ``uns["cpnn_input"]`` record.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import anndata as ad
import numpy as np
import pandas as pd
from scipy import sparse

from cpnn import _constants as K
from cpnn.errors import CPNNInputError

# An image is rejected when more than this fraction of spot centres fall outside it:
# that points to coordinates on another scale (hires / lowres) or the wrong image.
MAX_OUTSIDE_FRACTION = 0.05


# "many spots dropped" above this share of a section's spots
DROPPED_SPOTS_WARN = 0.10


def warn_dropped(n_dropped: int, n_total: int, what: str, where: Any) -> None:
    """One visible line whenever a reader or fit drops spots, with their share."""
    if n_dropped <= 0 or n_total <= 0:
        return
    share = n_dropped / n_total
    level = "many spots dropped" if share > DROPPED_SPOTS_WARN else "spots dropped"
    warnings.warn(f"{where}: {level}: {n_dropped} of {n_total} ({share:.0%}) {what}", stacklevel=3)


def require_file(path: os.PathLike | str, what: str, fix: str) -> Path:
    """Return ``path`` as a Path, or raise a CPNNInputError saying ``what`` is missing."""
    path = Path(path)
    if not path.is_file():
        raise CPNNInputError(f"{what} not found.", path=path, fix=fix)
    return path


def check_mpp(value: Any, *, path: Optional[os.PathLike | str] = None, field: str = "mpp") -> float:
    """Microns per pixel as a float within the plausible range, else a CPNNInputError
    naming ``--mpp`` (a value of 1e-6 would otherwise ask for petabytes of patches)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = float("nan")
    if not np.isfinite(v) or not K.MPP_MIN <= v <= K.MPP_MAX:
        raise CPNNInputError(
            f"microns per pixel {value!r} is outside the plausible range {K.MPP_MIN:g}-{K.MPP_MAX:g} "
            "(H&E scans are about 0.25 at 40x, 0.5 at 20x).", path=path, field=field,
            fix="give the scan's resolution with --mpp (mpp= in Python), e.g. --mpp 0.5")
    return v


def pick_mpp(user: Any, own: Any, own_source: str, *, path: Optional[os.PathLike | str] = None
             ) -> tuple[Optional[float], Optional[str]]:
    """``(mpp, source)``: the file's own plausible value wins; the user's (``--mpp``) applies
    only when the file has none (or an implausible one); a disagreeing user value is
    ignored with a warning. ``(None, None)`` when neither exists."""
    user_v = None if user is None else check_mpp(user, path=path)
    own_v = None
    if own is not None:
        try:
            own_v = check_mpp(own, path=path, field=own_source)
        except CPNNInputError:
            if user_v is None:
                raise
    if own_v is not None:
        if user_v is not None and abs(user_v - own_v) > 0.1 * own_v:
            warnings.warn(f"{path}: the file records {own_v:.4g} µm per pixel ({own_source}); --mpp {user_v:g} "
                          "is ignored (it applies only to files without one)", stacklevel=3)
        return own_v, own_source
    if user_v is not None:
        return user_v, "given"
    return None, None


def check_counts(
    matrix: Any,
    *,
    path: Optional[os.PathLike | str],
    field: str,
) -> sparse.csr_matrix:
    """Validate a count matrix and return it as CSR float32.

    Parameters
    ----------
    matrix
        Dense array, scipy sparse matrix or DataFrame of counts (observations x genes).
    path, field
        Where the matrix came from, used in error messages.

    Returns
    -------
    scipy.sparse.csr_matrix
        float32, sorted indices, explicit zeros removed.

    Raises
    ------
    CPNNInputError
        If the matrix holds NaN/inf, negative or non-integer values.
    """
    if isinstance(matrix, pd.DataFrame):
        matrix = matrix.to_numpy()
    if sparse.issparse(matrix):
        csr = sparse.csr_matrix(matrix)
        values = csr.data
    else:
        arr = np.asarray(matrix)
        if arr.dtype.kind not in "biuf":
            raise CPNNInputError(
                f"count matrix has non-numeric dtype {arr.dtype}.",
                path=path, field=field, fix="provide numeric raw UMI counts.",
            )
        csr = None
        values = arr
    values = np.asarray(values)
    if values.dtype.kind == "f":
        bad = ~np.isfinite(values)
        if bad.any():
            raise CPNNInputError(
                f"count matrix holds {int(bad.sum())} NaN/infinite value(s).",
                path=path, field=field,
                fix="provide raw UMI counts without missing values (fill true zeros with 0).",
            )
    if values.size and values.min() < 0:
        raise CPNNInputError(
            f"count matrix holds {int((values < 0).sum())} negative value(s) "
            f"(minimum {values.min()}).",
            path=path, field=field,
            fix="provide raw UMI counts, not log-normalised or scaled values.",
        )
    if values.dtype.kind == "f":
        nonint = values != np.round(values)
        if nonint.any():
            example = values[nonint][:3].tolist()
            raise CPNNInputError(
                f"count matrix holds {int(nonint.sum())} non-integer value(s), e.g. {example}.",
                path=path, field=field,
                fix="provide raw integer UMI counts (not normalised, TPM or log values); "
                "look for them in layers['counts'] or adata.raw.",
            )
    if csr is None:
        csr = sparse.csr_matrix(np.asarray(matrix, dtype=np.float32))
    out = csr.astype(np.float32)
    out.eliminate_zeros()
    out.sort_indices()
    return out


def dedupe_genes(
    names: Sequence[str], X: sparse.csr_matrix, how: str = "sum"
) -> tuple[list[str], sparse.csr_matrix, list[str]]:
    """Make gene names unique.

    ``how="sum"`` adds the columns of duplicated symbols (right for raw counts of
    several Ensembl ids mapping to one symbol); ``how="first"`` keeps the first.
    Returns the unique names (order of first appearance), the matrix and the list of
    names that were duplicated.
    """
    names = pd.Index([str(n) for n in names])
    if names.is_unique:
        return list(names), X, []
    codes, uniques = pd.factorize(names)
    dup = sorted(set(names[names.duplicated()]))
    if how == "sum":
        agg = sparse.csr_matrix(
            (np.ones(len(codes), dtype=np.float32), (np.arange(len(codes)), codes)),
            shape=(len(codes), len(uniques)),
        )
        X = sparse.csr_matrix(X @ agg)
    elif how == "first":
        first = ~names.duplicated()
        X = sparse.csr_matrix(X[:, np.flatnonzero(first)])
    else:
        raise ValueError(f"how must be 'sum' or 'first', got {how!r}")
    return [str(u) for u in uniques], X, dup


def image_size(path: os.PathLike | str) -> Optional[tuple[int, int]]:
    """(width, height) of level 0 of an image, reading only its header; None if unknown."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix in {".tif", ".tiff", ".svs", ".btf", ".ndpi", ".scn"}:
            import tifffile

            with tifffile.TiffFile(path) as tf:
                page = tf.series[0].levels[0] if tf.series else tf.pages[0]
                shape = page.shape
                axes = page.axes
            h = shape[axes.index("Y")]
            w = shape[axes.index("X")]
            return int(w), int(h)
        from PIL import Image

        with warnings.catch_warnings():
            # large H&E JPEGs trip PIL's decompression-bomb warning; only the header is read
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                return int(im.size[0]), int(im.size[1])
    except Exception:  # unreadable header: the image module will complain properly
        return None


def check_coords_in_image(
    xy: np.ndarray,
    image_path: Optional[os.PathLike | str],
    *,
    coords_path: Optional[os.PathLike | str],
    field: str,
) -> dict[str, Any]:
    """Check that spot centres lie inside the image; return a summary for ``uns``.

    Raises when more than 5 % of spots fall outside (coordinates on another scale, or
    the wrong image); warns when a few do (:func:`make_spatial_adata` then drops those,
    so that every kept spot has a patch and extraction never refuses the section).
    """
    info: dict[str, Any] = {"image_size": None, "n_spots_outside_image": None}
    if image_path is None:
        return info
    size = image_size(image_path)
    if size is None:
        return info
    w, h = size
    info["image_size"] = [w, h]
    outside = (xy[:, 0] < 0) | (xy[:, 0] >= w) | (xy[:, 1] < 0) | (xy[:, 1] >= h)
    n_out = int(outside.sum())
    info["n_spots_outside_image"] = n_out
    if len(xy) and n_out / len(xy) > MAX_OUTSIDE_FRACTION:
        raise CPNNInputError(
            f"{n_out} of {len(xy)} spot centres lie outside the image "
            f"({w} x {h} px; x range {xy[:, 0].min():.0f}-{xy[:, 0].max():.0f}, "
            f"y range {xy[:, 1].min():.0f}-{xy[:, 1].max():.0f}).",
            path=coords_path, field=field,
            fix=f"check that the coordinates are full-resolution pixels of {image_path} "
            "(not hires/lowres image pixels) and that x and y are not swapped.",
        )
    if n_out:  # make_spatial_adata drops them: no patch can be cut around them
        warnings.warn(
            f"{n_out} of {len(xy)} spot centres lie outside {image_path} ({w} x {h} px); those spots are dropped.",
            stacklevel=3,
        )
    return info


def make_spatial_adata(
    X: sparse.csr_matrix,
    *,
    obs_names: Sequence[str],
    var_names: Sequence[str],
    xy: np.ndarray,
    section: str | Sequence[str],
    patient: str | Sequence[str],
    cpnn_input: Mapping[str, Any],
    path: Optional[os.PathLike | str],
    obs: Optional[pd.DataFrame] = None,
    var: Optional[pd.DataFrame] = None,
    dedupe: str = "sum",
) -> ad.AnnData:
    """Assemble a spatial AnnData with the conventions of ``docs/ARCHITECTURE.md``.

    Duplicated gene names are summed (``dedupe="sum"``) or the first kept
    (``"first"``); the duplicated names are listed in ``uns["cpnn_input"]["duplicated_genes"]``.
    """
    xy = np.asarray(xy, dtype=np.float64)
    if xy.ndim != 2 or xy.shape != (X.shape[0], 2):
        raise CPNNInputError(
            f"spatial coordinates have shape {xy.shape}, expected ({X.shape[0]}, 2).",
            path=path, field="spatial", fix="give one (x, y) pair per spot.",
        )
    if not np.isfinite(xy).all():
        raise CPNNInputError(
            f"{int((~np.isfinite(xy)).any(axis=1).sum())} spot(s) have missing coordinates.",
            path=path, field="spatial", fix="remove those spots or fill their pixel positions.",
        )
    size = cpnn_input.get("image_size")
    if size:  # spots outside the image (check_coords_in_image warned): dropped, everywhere alike
        w, h = size
        inside = (xy[:, 0] >= 0) & (xy[:, 0] < w) & (xy[:, 1] >= 0) & (xy[:, 1] < h)
        if not inside.all():
            cpnn_input = {**cpnn_input, "dropped_outside_image": [str(o) for o, k in zip(obs_names, inside) if not k]}
            keep = np.flatnonzero(inside)
            X, xy = X[keep], xy[keep]
            obs_names = [obs_names[i] for i in keep]
            obs = None if obs is None else obs.iloc[keep]
            section = section if isinstance(section, str) else [section[i] for i in keep]
            patient = patient if isinstance(patient, str) else [patient[i] for i in keep]
    obs_index = pd.Index([str(o) for o in obs_names])
    if not obs_index.is_unique:
        dup = obs_index[obs_index.duplicated()].unique()[:5].tolist()
        raise CPNNInputError(
            f"spot ids are not unique, e.g. {dup}.", path=path, field="obs_names",
            fix="give every spot a unique id.",
        )
    n_var_in = len(var_names)
    first = ~pd.Index([str(v) for v in var_names]).duplicated()
    var_names, X, dup = dedupe_genes(var_names, X, how=dedupe)
    if var is not None and dup:
        # annotation of a summed symbol: that of its first occurrence
        var = var.iloc[np.flatnonzero(first)].copy()
    if dup:
        warnings.warn(
            f"{len(dup)} duplicated gene name(s) in {path} "
            f"({'summed' if dedupe == 'sum' else 'first kept'}), e.g. {dup[:5]}.",
            stacklevel=3,
        )
    obs_df = pd.DataFrame(index=obs_index) if obs is None else obs.copy()
    obs_df.index = obs_index
    for key, value in ((K.SECTION, section), (K.PATIENT, patient)):
        if isinstance(value, str):
            value = [value] * len(obs_index)
        value = [str(v) for v in value]
        if len(value) != len(obs_index):
            raise CPNNInputError(
                f"{key} has {len(value)} values for {len(obs_index)} spots.",
                path=path, field=key, fix="give one value per spot.",
            )
        obs_df[key] = pd.Categorical(value)
    var_df = pd.DataFrame(index=pd.Index(var_names)) if var is None else var
    var_df.index = pd.Index(var_names)
    adata = ad.AnnData(X=X, obs=obs_df, var=var_df)
    adata.obsm[K.SPATIAL] = xy
    record = dict(cpnn_input)
    if isinstance(section, str):
        record.setdefault("sample_id", section)
    if isinstance(patient, str):
        record.setdefault("patient_id", patient)
    record["n_genes_in_file"] = int(n_var_in)
    record["duplicated_genes"] = list(dup)
    record["duplicates_handling"] = dedupe
    adata.uns[K.UNS_INPUT] = record
    return adata

"""Reader for a generic spatial ``.h5ad`` (counts + ``obsm["spatial"]``).

Counts are taken from ``layers["counts"]`` when present, else from ``X``; either must
hold raw integer counts. Image path, microns per pixel and spot diameter come from the
arguments, else from ``uns["cpnn_input"]`` (which cpnn's own writers, e.g. the
synthetic cohort, fill in).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import anndata as ad
import numpy as np

from cpnn import _constants as K
from cpnn.data._validate import (
    check_coords_in_image,
    check_counts,
    make_spatial_adata,
    pick_mpp,
    require_file,
)
from cpnn.errors import CPNNInputError


def read_h5ad_checked(path: os.PathLike | str) -> ad.AnnData:
    """``anndata.read_h5ad`` with a CPNNInputError for a missing or unreadable file."""
    path = require_file(path, ".h5ad file", "check the path.")
    try:
        return ad.read_h5ad(path)
    except Exception as exc:  # h5py/anndata raise many types for corrupt files
        raise CPNNInputError(f"cannot read as AnnData ({type(exc).__name__}: {exc}).",
                             path=path, fix="re-copy or re-write the file.") from exc


def counts_of(adata: ad.AnnData, path: os.PathLike | str) -> tuple[Any, str]:
    """Validated raw counts of ``adata`` (CSR float32) and where they were found."""
    if K.COUNTS in adata.layers:
        return check_counts(adata.layers[K.COUNTS], path=path, field=f"layers['{K.COUNTS}']"), f"layers['{K.COUNTS}']"
    try:
        return check_counts(adata.X, path=path, field="X"), "X"
    except CPNNInputError as exc:
        if adata.raw is not None and adata.raw.n_vars == adata.n_vars:
            return check_counts(adata.raw.X, path=path, field="raw.X"), "raw.X"
        raise exc


def spatial_of(adata: ad.AnnData, path: os.PathLike | str) -> np.ndarray:
    """``obsm["spatial"]`` as float64 (n, 2), validated."""
    if K.SPATIAL not in adata.obsm:
        raise CPNNInputError(
            f"no obsm['{K.SPATIAL}'] (obsm keys: {list(adata.obsm.keys())}).",
            path=path, field=f"obsm['{K.SPATIAL}']",
            fix="store the (x, y) full-resolution pixel centre of each spot there.",
        )
    xy = np.asarray(adata.obsm[K.SPATIAL], dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] < 2:
        raise CPNNInputError(f"obsm['{K.SPATIAL}'] has shape {xy.shape}.", path=path,
                             field=f"obsm['{K.SPATIAL}']", fix="give an (n, 2) array of x, y.")
    return xy[:, :2].copy()


def resolve_image(image: Optional[os.PathLike | str], relative_to: Path) -> Optional[Path]:
    """An image path as given, or relative to the h5ad's folder when it does not exist as given."""
    if image is None:
        return None
    p = Path(image)
    if not p.is_absolute() and not p.exists() and (relative_to / p).exists():
        p = relative_to / p
    return p


def read_spatial_h5ad(
    path: os.PathLike | str,
    image_path: Optional[os.PathLike | str] = None,
    mpp: Optional[float] = None,
    *,
    sample_id: Optional[str] = None,
    patient_id: Optional[str] = None,
    spot_diameter_um: Optional[float] = None,
    require_image: bool = False,
) -> ad.AnnData:
    """Read a spatial ``.h5ad`` and normalise it to cpnn's conventions.

    Parameters
    ----------
    path
        ``.h5ad`` with ``obsm["spatial"]`` (x, y full-resolution pixels) and raw counts
        in ``layers["counts"]`` or ``X``.
    image_path, mpp, spot_diameter_um, sample_id, patient_id
        Override the values of ``uns["cpnn_input"]``. A relative image path stored in
        the file is resolved against the file's folder.
    require_image
        Raise if no image is known or it does not exist.

    Returns
    -------
    anndata.AnnData
        ``X`` = counts (CSR float32), the original ``obs``/``var`` columns, ``obs``
        ``section``/``patient`` (kept from the file when present, else the sample and
        patient ids), ``uns["cpnn_input"]`` updated (``counts_source`` says where
        counts were found).
    """
    path = Path(path)
    src = read_h5ad_checked(path)
    X, source = counts_of(src, path)
    xy = spatial_of(src, path)
    prev = dict(src.uns.get(K.UNS_INPUT, {}) or {})

    image = resolve_image(image_path if image_path is not None else prev.get("image_path"), path.parent)
    if image is not None and not image.is_file():
        if require_image or image_path is not None:
            raise CPNNInputError("image not found.", path=image, field="image_path",
                                 fix="pass --image with the H&E of this sample (image_path= in Python).")
        image = None
    if image is None and require_image:
        raise CPNNInputError("no image given and none recorded in uns['cpnn_input'].",
                             path=path, field="uns['cpnn_input']['image_path']",
                             fix="pass --image with the full-resolution H&E (image_path= in Python).")
    mpp_used, _ = pick_mpp(mpp, prev.get("mpp"), f"uns['{K.UNS_INPUT}']['mpp']", path=path)
    sample = sample_id or prev.get("sample_id") or path.stem
    patient_default = patient_id or prev.get("patient_id") or sample
    obs = src.obs.copy()
    section = obs[K.SECTION].astype(str).tolist() if K.SECTION in obs and sample_id is None else sample
    patient = (obs[K.PATIENT].astype(str).tolist() if K.PATIENT in obs and patient_id is None
               else patient_default)
    obs = obs.drop(columns=[c for c in (K.SECTION, K.PATIENT) if c in obs.columns])
    img_info = check_coords_in_image(xy, image, coords_path=path, field=f"obsm['{K.SPATIAL}']")
    record = {
        **{k: v for k, v in prev.items() if k not in ("image_path", "mpp")},
        "image_path": None if image is None else str(image),
        "mpp": None if mpp_used is None else float(mpp_used),
        "spot_diameter_um": spot_diameter_um if spot_diameter_um is not None else prev.get("spot_diameter_um"),
        "sample_id": str(sample),
        "patient_id": str(patient_default) if isinstance(patient, str) else prev.get("patient_id", "multiple"),
        "platform": prev.get("platform", "unknown"),
        "counts_source": source,
        "source_path": str(path),
        **img_info,
    }
    out = make_spatial_adata(
        X, obs_names=list(src.obs_names), var_names=list(src.var_names), xy=xy,
        section=section, patient=patient, cpnn_input=record, path=path,
        obs=obs, var=src.var.copy() if src.var_names.is_unique else None,
    )
    for k, v in src.obsm.items():
        if k != K.SPATIAL:
            out.obsm[k] = v
    for k, v in src.uns.items():
        if k != K.UNS_INPUT:
            out.uns[k] = v
    return out

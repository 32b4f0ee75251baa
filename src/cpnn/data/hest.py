"""Reader for one sample of HEST-1k (Jaume et al. 2024, ``MahmoodLab/hest``).

Layout of a (partial) HEST-1k download::

    st/{id}.h5ad          counts per spot, obsm["spatial"] = (x, y) full-resolution pixels
    wsis/{id}.tif         pyramidal generic TIFF (level 0 = the pixels of obsm["spatial"])
    metadata/{id}.json    pixel_size_um_estimated / pixel_size_um_embedded (µm per px),
                          spot_diameter and inter_spot_dist (µm), st_technology,
                          patient, organ, species, ...
    patches/{id}.h5       optional 224-px patches at 0.5 µm/px with their barcodes

HEST ids of the paper's other spot-level datasets: STNet (He et al. 2020, breast,
legacy ST) = ``SPA51``-``SPA118``; cSCC (Ji et al. 2020, skin, legacy ST) =
``NCBI759``-``NCBI770``. In HEST-1k the patient field is often empty; the sample id is
then used as the patient and ``uns["cpnn_input"]["patient_source"]`` says so — group
such samples by their source patient yourself before splitting.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Optional

import anndata as ad

from cpnn.data._validate import check_coords_in_image, make_spatial_adata, pick_mpp, require_file
from cpnn.data.spatial_h5ad import counts_of, read_h5ad_checked, spatial_of
from cpnn.errors import CPNNInputError

# spot diameter (µm) when the metadata lacks it
_DEFAULT_SPOT_DIAMETER = {"visium": 55.0, "spatial transcriptomics": 100.0, "st": 100.0}
_PLATFORM = {"visium": "visium", "spatial transcriptomics": "legacy_st", "st": "legacy_st",
             "visium hd": "visium_hd", "xenium": "xenium"}


def _present(v: Any) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v)) and v != ""


def read_hest_metadata(root: os.PathLike | str, sample_id: str) -> dict:
    """The ``metadata/{id}.json`` of a HEST-1k sample as a dict."""
    path = require_file(Path(root) / "metadata" / f"{sample_id}.json", "HEST metadata",
                        "download the sample's metadata/{id}.json as well.")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CPNNInputError(f"invalid JSON ({exc}).", path=path, fix="re-download it.") from exc


def read_hest(
    root: os.PathLike | str,
    sample_id: str,
    *,
    mpp: Optional[float] = None,
    patient_id: Optional[str] = None,
    require_image: bool = True,
) -> ad.AnnData:
    """Read a HEST-1k sample.

    Parameters
    ----------
    root
        Folder holding ``st/``, ``wsis/``, ``metadata/`` (and optionally ``patches/``).
    sample_id
        HEST id, e.g. ``"TENX95"`` or ``"SPA51"``.
    mpp
        Override of the metadata's pixel size. Default: ``pixel_size_um_estimated``,
        else ``pixel_size_um_embedded`` (``uns["cpnn_input"]["mpp_source"]`` says which).
    patient_id
        Override of the metadata's ``patient``.
    require_image
        If False, a missing ``wsis/{id}.tif`` gives ``image_path=None``.

    Returns
    -------
    anndata.AnnData
        Counts (CSR float32), ``obsm["spatial"]`` full-resolution (x, y) pixels,
        ``uns["cpnn_input"]`` with ``platform``, ``st_technology``, ``spot_diameter_um``,
        ``inter_spot_distance_um``, ``patches_path`` and the metadata in ``hest_metadata``.
    """
    root = Path(root)
    st = root / "st" / f"{sample_id}.h5ad"
    if not st.is_file():
        have = sorted(p.stem for p in (root / "st").glob("*.h5ad")) if (root / "st").is_dir() else []
        raise CPNNInputError(
            f"HEST sample {sample_id!r} not found; available: {have[:20]}"
            f"{' ...' if len(have) > 20 else ''}.",
            path=st, field="sample_id",
            fix="download it (st/, wsis/, metadata/ for this id) or choose an available id.",
        )
    meta = read_hest_metadata(root, sample_id)
    src = read_h5ad_checked(st)
    X, source = counts_of(src, st)
    xy = spatial_of(src, st)

    mpath = root / "metadata" / f"{sample_id}.json"
    own_key = next((k for k in ("pixel_size_um_estimated", "pixel_size_um_embedded") if _present(meta.get(k))), None)
    mpp_used, mpp_source = pick_mpp(mpp, None if own_key is None else meta[own_key], own_key or "mpp", path=mpath)
    if mpp_used is None:
        raise CPNNInputError(
            "no pixel size in the metadata.", path=mpath,
            field="pixel_size_um_estimated", fix="pass --mpp (mpp= in Python).",
        )

    tech = str(meta.get("st_technology") or "unknown")
    tkey = tech.lower()
    spot_d = meta.get("spot_diameter")
    spot_d = float(spot_d) if _present(spot_d) else _DEFAULT_SPOT_DIAMETER.get(tkey)
    pitch = meta.get("inter_spot_dist")

    image: Optional[Path] = root / "wsis" / f"{sample_id}.tif"
    if not image.is_file():
        if require_image:
            raise CPNNInputError(
                "whole-slide image not found.", path=image, field="image",
                fix="download wsis/{id}.tif, or give precomputed features with --features (require_image=False in Python).",
            )
        image = None
    img_info = check_coords_in_image(xy, image, coords_path=st, field="obsm['spatial']")
    patches = root / "patches" / f"{sample_id}.h5"

    if patient_id is not None:
        patient, patient_source = str(patient_id), "given"
    elif _present(meta.get("patient")):
        patient, patient_source = str(meta["patient"]), "metadata"
    else:
        patient, patient_source = str(sample_id), "sample_id"

    meta_clean = {k: v for k, v in meta.items()
                  if isinstance(v, (str, int, float, bool)) and _present(v)}
    record = {
        "image_path": None if image is None else str(image),
        "mpp": mpp_used,
        "spot_diameter_um": spot_d,
        "sample_id": str(sample_id),
        "patient_id": patient,
        "platform": _PLATFORM.get(tkey, tkey.replace(" ", "_")),
        "st_technology": tech,
        "mpp_source": mpp_source,
        "inter_spot_distance_um": float(pitch) if _present(pitch) else None,
        "patient_source": patient_source,
        "patches_path": str(patches) if patches.is_file() else None,
        "counts_source": source,
        "source_path": str(st),
        "hest_metadata": meta_clean,
        **img_info,
    }
    obs = src.obs.drop(columns=[c for c in ("section", "patient") if c in src.obs.columns])
    return make_spatial_adata(
        X, obs_names=list(src.obs_names), var_names=list(src.var_names), xy=xy,
        section=str(sample_id), patient=patient, cpnn_input=record, path=st, obs=obs,
        var=src.var.copy() if src.var_names.is_unique else None,
    )

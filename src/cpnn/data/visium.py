"""Reader for 10x Genomics Visium (Space Ranger ``outs/``), without scanpy.

Files used::

    filtered_feature_bc_matrix.h5       10x HDF5 v3: matrix/{data,indices,indptr,shape,barcodes,
                                        features/{name,id,feature_type}}; columns = barcodes
    spatial/tissue_positions.csv        Space Ranger >= 2.0, with header
    spatial/tissue_positions_list.csv   Space Ranger 1.x, headerless, same six columns:
        barcode, in_tissue, array_row, array_col, pxl_row_in_fullres, pxl_col_in_fullres
    spatial/tissue_positions.parquet    Visium HD binned outputs (``binned_outputs/square_008um``
                                        or ``square_016um``), same six columns
    spatial/scalefactors_json.json      spot_diameter_fullres, tissue_hires_scalef, ...
                                        (Visium HD adds microns_per_pixel and bin_size_um)

Coordinates: x = ``pxl_col_in_fullres``, y = ``pxl_row_in_fullres`` (pixels of the
full-resolution image given to Space Ranger, which is not in ``outs/``; the
``tissue_hires_image.png`` there is a downscaled copy).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import anndata as ad
import h5py
import numpy as np
import pandas as pd
from scipy import sparse

from cpnn.data._validate import (
    check_coords_in_image,
    check_counts,
    make_spatial_adata,
    pick_mpp,
    require_file,
)
from cpnn.errors import CPNNInputError

VISIUM_SPOT_DIAMETER_UM = 55.0
VISIUM_PITCH_UM = 100.0
POSITION_COLUMNS = [
    "barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres",
]


def _decode(arr: np.ndarray) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in arr]


def read_10x_h5(
    path: os.PathLike | str, feature_type: Optional[str] = "Gene Expression"
) -> tuple[sparse.csr_matrix, list[str], pd.DataFrame, dict]:
    """Read a 10x Genomics HDF5 (v3) feature-barcode matrix with h5py.

    Parameters
    ----------
    path
        ``filtered_feature_bc_matrix.h5`` (or ``raw_...``).
    feature_type
        Keep only features of this type (None keeps all).

    Returns
    -------
    X, barcodes, features, attrs
        ``X`` barcodes x features (CSR float32, validated raw counts), the barcodes,
        a frame with ``name, id, feature_type`` (index = position), and the file's
        root attributes (e.g. ``library_ids``).
    """
    path = require_file(path, "10x feature-barcode matrix",
                        "pass the Space Ranger outs/ folder holding filtered_feature_bc_matrix.h5.")
    try:
        fh = h5py.File(path, "r")
    except OSError as exc:
        raise CPNNInputError(f"not a readable HDF5 file ({exc}).", path=path,
                             fix="re-copy the file; it may be truncated.") from exc
    with fh:
        if "matrix" not in fh:
            raise CPNNInputError(
                f"no 'matrix' group (found {list(fh.keys())}); this is a Cell Ranger 2 "
                "(v2) file or not a 10x matrix.",
                path=path, field="matrix",
                fix="use a Space Ranger / Cell Ranger >= 3 filtered_feature_bc_matrix.h5.",
            )
        g = fh["matrix"]
        need = ["data", "indices", "indptr", "shape", "barcodes", "features"]
        missing = [k for k in need if k not in g]
        if missing:
            raise CPNNInputError(f"matrix group lacks {missing}.", path=path,
                                 field="matrix/" + missing[0],
                                 fix="re-export the matrix with Space Ranger.")
        n_feat, n_bc = (int(v) for v in g["shape"][()])
        data = g["data"][()]
        indices = g["indices"][()]
        indptr = g["indptr"][()]
        barcodes = _decode(g["barcodes"][()])
        f = g["features"]
        names = _decode(f["name"][()])
        ids = _decode(f["id"][()]) if "id" in f else names
        ftypes = _decode(f["feature_type"][()]) if "feature_type" in f else ["Gene Expression"] * len(names)
        attrs = {k: (_decode(v) if isinstance(v, np.ndarray) else v) for k, v in fh.attrs.items()}
    if len(indptr) != n_bc + 1 or len(barcodes) != n_bc or len(names) != n_feat:
        raise CPNNInputError(
            f"inconsistent matrix: shape ({n_feat}, {n_bc}), {len(indptr)} indptr, "
            f"{len(barcodes)} barcodes, {len(names)} features.",
            path=path, field="matrix/shape", fix="re-copy the file; it may be corrupt.",
        )
    # stored column-compressed with barcodes as columns == CSR with barcodes as rows
    X = sparse.csr_matrix((data, indices, indptr), shape=(n_bc, n_feat))
    X = check_counts(X, path=path, field="matrix/data")
    features = pd.DataFrame({"name": names, "id": ids, "feature_type": ftypes})
    if feature_type is not None:
        keep = np.flatnonzero(features["feature_type"].to_numpy() == feature_type)
        if keep.size == 0:
            raise CPNNInputError(
                f"no '{feature_type}' features (types: {sorted(set(ftypes))}).",
                path=path, field="matrix/features/feature_type",
                fix="check that this is a Gene Expression matrix (feature_type=None or another type in Python).",
            )
        X = sparse.csr_matrix(X[:, keep])
        features = features.iloc[keep].reset_index(drop=True)
    return X, barcodes, features, attrs


def read_tissue_positions(spatial_dir: os.PathLike | str) -> tuple[pd.DataFrame, Path]:
    """Read ``tissue_positions.csv`` (v2, header), ``tissue_positions_list.csv`` (v1) or
    ``tissue_positions.parquet`` (Visium HD binned outputs).

    Returns the frame indexed by barcode with the six standard columns, and the file read.
    """
    spatial_dir = Path(spatial_dir)
    v2 = spatial_dir / "tissue_positions.csv"
    v1 = spatial_dir / "tissue_positions_list.csv"
    hd = spatial_dir / "tissue_positions.parquet"
    if hd.is_file() and not v2.is_file():
        path = hd
        try:
            df = pd.read_parquet(path)
        except ImportError as exc:
            raise CPNNInputError("reading parquet positions needs pyarrow.", path=path,
                                 fix="pip install pyarrow") from exc
        except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same clear message
            raise CPNNInputError(f"unreadable parquet file ({type(exc).__name__}: {exc}).", path=path,
                                 fix="re-copy spatial/tissue_positions.parquet from Space Ranger's binned outputs.") from exc
    elif v2.is_file():
        path = v2
        df = pd.read_csv(path)
        if "barcode" not in df.columns:
            # some pipelines write the v1 headerless layout under the v2 name
            df = pd.read_csv(path, header=None, names=POSITION_COLUMNS)
    elif v1.is_file():
        path = v1
        df = pd.read_csv(path, header=None)
        if df.shape[1] != 6:
            raise CPNNInputError(
                f"expected 6 headerless columns, found {df.shape[1]}.", path=path,
                field="columns", fix=f"columns must be {POSITION_COLUMNS}.",
            )
        df.columns = POSITION_COLUMNS
    else:
        raise CPNNInputError(
            "no tissue_positions.csv, tissue_positions_list.csv or tissue_positions.parquet.", path=spatial_dir,
            fix="pass the Space Ranger outs/ folder (Visium HD: a binned_outputs/square_016um folder) "
            "with its spatial/ subfolder.",
        )
    missing = [c for c in POSITION_COLUMNS if c not in df.columns]
    if missing:
        raise CPNNInputError(f"missing column(s) {missing}.", path=path, field=missing[0],
                             fix=f"columns must be {POSITION_COLUMNS}.")
    for c in POSITION_COLUMNS[1:]:
        v = pd.to_numeric(df[c], errors="coerce")
        if v.isna().any():
            raise CPNNInputError(f"{int(v.isna().sum())} non-numeric value(s).", path=path,
                                 field=c, fix="fix or remove those rows.")
        df[c] = v
    df["barcode"] = df["barcode"].astype(str)
    if df["barcode"].duplicated().any():
        dup = df["barcode"][df["barcode"].duplicated()].head(3).tolist()
        raise CPNNInputError(f"duplicated barcodes, e.g. {dup}.", path=path, field="barcode",
                             fix="remove the duplicated rows.")
    return df.set_index("barcode"), path


def read_visium(
    outs_dir: os.PathLike | str,
    image_path: Optional[os.PathLike | str] = None,
    mpp: Optional[float] = None,
    library_id: Optional[str] = None,
    *,
    patient_id: Optional[str] = None,
    count_file: str = "filtered_feature_bc_matrix.h5",
) -> ad.AnnData:
    """Read a Space Ranger output folder into AnnData.

    Parameters
    ----------
    outs_dir
        The ``outs/`` folder; for Visium HD one of its ``binned_outputs/square_XXXum``
        folders (bins then play the role of spots; their size and the image's microns per
        pixel come from ``scalefactors_json.json``).
    image_path
        Full-resolution H&E given to Space Ranger (not part of ``outs/``). Optional;
        when given, spot centres are checked to lie inside it.
    mpp
        Microns per pixel of the full-resolution image. None: derived as
        55 µm / ``spot_diameter_fullres`` and ``uns["cpnn_input"]["mpp_source"]`` says so.
    library_id
        Sample id; default the file's ``library_ids`` attribute, else the folder name.
    patient_id
        Patient of the sample; default the sample id (state it when splitting).
    count_file
        Matrix file name inside ``outs_dir``.

    Returns
    -------
    anndata.AnnData
        In-tissue spots of the matrix, Gene Expression features; ``var`` has
        ``gene_ids, feature_types``; ``obs`` has ``array_row, array_col``;
        ``obsm["spatial"]`` = (pxl_col, pxl_row) in full-resolution pixels;
        ``uns["cpnn_input"]`` with platform ``"visium"`` and the scale factors.
    """
    outs = Path(outs_dir)
    if not outs.is_dir():
        raise CPNNInputError("Space Ranger outs folder not found.", path=outs,
                             fix="pass the path of the 'outs' folder.")
    mpath = outs / count_file
    X, barcodes, features, attrs = read_10x_h5(mpath)
    pos, ppath = read_tissue_positions(outs / "spatial")
    spath = require_file(outs / "spatial" / "scalefactors_json.json", "scale factors",
                         "copy spatial/scalefactors_json.json from Space Ranger's outs.")
    try:
        scalef = json.loads(spath.read_text())
    except json.JSONDecodeError as exc:
        raise CPNNInputError(f"invalid JSON ({exc}).", path=spath,
                             fix="re-copy the file.") from exc

    bc = pd.Index(barcodes)
    absent = bc[~bc.isin(pos.index)]
    if len(absent):
        raise CPNNInputError(
            f"{len(absent)} of {len(bc)} matrix barcodes are absent from the positions, "
            f"e.g. {absent[:3].tolist()}.",
            path=ppath, field="barcode",
            fix="use the positions file of the same Space Ranger run (and barcodes without "
            "added suffixes such as '-1_sample').",
        )
    p = pos.loc[bc]
    in_tissue = p["in_tissue"].to_numpy() == 1
    n_out_tissue = int((~in_tissue).sum())
    if not in_tissue.any():
        raise CPNNInputError("no matrix barcode is marked in_tissue.", path=ppath,
                             field="in_tissue", fix="check the positions file.")
    X = X[np.flatnonzero(in_tissue)]
    p = p.loc[in_tissue]
    xy = p[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(np.float64)

    diam_px = scalef.get("spot_diameter_fullres")
    bin_um = scalef.get("bin_size_um")
    spot_um = float(bin_um) if bin_um else VISIUM_SPOT_DIAMETER_UM
    pitch_um = float(bin_um) if bin_um else VISIUM_PITCH_UM
    mpp_used, mpp_source = pick_mpp(mpp, scalef.get("microns_per_pixel") or None, "scalefactors_microns_per_pixel",
                                    path=spath)
    if mpp_used is None:  # neither the file nor --mpp: from the spot diameter in pixels
        if diam_px is None or not float(diam_px) > 0:
            raise CPNNInputError(
                "mpp not given and spot_diameter_fullres missing: cannot derive microns per pixel.",
                path=spath, field="spot_diameter_fullres", fix="pass --mpp (mpp= in Python).",
            )
        mpp_used, mpp_source = VISIUM_SPOT_DIAMETER_UM / float(diam_px), "derived_from_spot_diameter_fullres"

    if image_path is not None:
        image_path = require_file(image_path, "full-resolution image",
                                  "pass the image that was given to Space Ranger.")
    img_info = check_coords_in_image(xy, image_path, coords_path=ppath,
                                     field="pxl_col_in_fullres,pxl_row_in_fullres")
    if library_id is None:
        lib = attrs.get("library_ids")
        if isinstance(lib, list) and len(lib) == 1 and lib[0]:
            library_id = lib[0]
        else:
            base = outs.parent.parent if outs.parent.name == "binned_outputs" else outs  # Visium HD bins
            library_id = base.parent.name if base.name == "outs" else base.name
    library_id = str(library_id)
    patient = str(patient_id) if patient_id is not None else library_id

    obs = pd.DataFrame(
        {"array_row": p["array_row"].to_numpy(np.int64), "array_col": p["array_col"].to_numpy(np.int64)},
        index=bc[in_tissue],
    )
    var = pd.DataFrame({"gene_ids": features["id"].to_numpy(),
                        "feature_types": features["feature_type"].to_numpy()})
    record = {
        "image_path": None if image_path is None else str(image_path),
        "mpp": mpp_used,
        "spot_diameter_um": spot_um,
        "sample_id": library_id,
        "patient_id": patient,
        "platform": "visium_hd" if bin_um else "visium",
        "mpp_source": mpp_source,
        "inter_spot_distance_um": pitch_um,
        "scalefactors": {k: float(v) for k, v in scalef.items() if isinstance(v, (int, float))},
        "matrix_path": str(mpath),
        "positions_path": str(ppath),
        "positions_version": {"tissue_positions.csv": "v2", "tissue_positions.parquet": "hd_parquet"}.get(ppath.name, "v1"),
        "n_barcodes_not_in_tissue_dropped": n_out_tissue,
        "patient_source": "given" if patient_id is not None else "sample_id",
        **img_info,
    }
    return make_spatial_adata(
        X, obs_names=list(bc[in_tissue]), var_names=list(features["name"]), xy=xy,
        section=library_id, patient=patient, cpnn_input=record, path=mpath, obs=obs, var=var,
    )

"""Reader for the HER2-positive breast cancer legacy-ST dataset (Andersson et al. 2021).

Layout of the public ``almaan/her2st`` repository::

    data/ST-cnts/{sec}.tsv.gz                 counts; rows "{x}x{y}" (array coords), cols genes
    data/ST-spotfiles/{sec}_selection.tsv     x y new_x new_y pixel_x pixel_y selected
    data/ST-imgs/{patient}/{sec}/*.jpg        H&E (file name does not follow the section id)
    res/ST-deconv/props/{level}/{sec}-proportion.tsv      stereoscope proportions
    res/ST-cluster/lbl/{sec}-cluster-annotation.tsv.gz    cluster label per spot

What the files look like (checked on patient C): the spot files hold integer array
coordinates ``x, y`` and float pixel positions; the count rows are named
``f"{x}x{y}"`` with the same integers; the proportion rows use the counts' naming, while
the cluster files name rows by *pixel* position (``"6930.58x3510.24"``) and carry ``x, y``
columns. Every selected spot file lists 0-3 spots more than the counts hold; those
spots are dropped and counted in ``uns["cpnn_input"]``.

The image has no pixel size in its metadata. The legacy ST array puts spots 200 µm
centre to centre, so microns per pixel = 200 / (pixels per array step), with the step
fitted by least squares of ``pixel_x`` on ``x`` and ``pixel_y`` on ``y`` per section
(≈ 291 px per step, ≈ 0.687 µm/px on patient C; single spots are off by tens of pixels,
so two spots are not enough).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

import anndata as ad
import numpy as np
import pandas as pd

from cpnn.data._validate import check_coords_in_image, check_counts, check_mpp, make_spatial_adata, warn_dropped
from cpnn.data.tables import read_table
from cpnn.errors import CPNNInputError

ST_PITCH_UM = 200.0
ST_SPOT_DIAMETER_UM = 100.0
PLATFORM = "legacy_st"
PROPORTION_LEVELS = ("major", "minor", "subset")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".tif", ".tiff", ".png")

_SPOT_RE = re.compile(r"^\s*(-?\d+(?:\.0*)?)x(-?\d+(?:\.0*)?)\s*$")
_SECTION_RE = re.compile(r"^([A-Za-z]+)\d+$")


def _counts_dir(root: Path) -> Path:
    d = root / "data" / "ST-cnts"
    if not d.is_dir():
        raise CPNNInputError(
            "no data/ST-cnts folder: this does not look like the almaan/her2st layout.",
            path=root, fix="pass the root of the her2st repository (the folder holding data/ and res/).",
        )
    return d


def available_sections(root: os.PathLike | str) -> list[str]:
    """Section ids with a counts file under ``root/data/ST-cnts``, sorted."""
    d = _counts_dir(Path(root))
    return sorted(p.name[: -len(".tsv.gz")] for p in d.glob("*.tsv.gz"))


def patient_of(section: str) -> str:
    """Patient letter of a HER2ST section id (``"C2"`` -> ``"C"``)."""
    m = _SECTION_RE.match(section)
    if not m:
        raise CPNNInputError(
            f"section id {section!r} is not a letter followed by a number.",
            field="sections", fix="use ids such as 'A1' or 'C2'.",
        )
    return m.group(1)


def _parse_spot_ids(ids: Sequence[str], path: Path, field: str) -> np.ndarray:
    """Array coordinates (n x 2 int) from spot names ``"{x}x{y}"``."""
    out = np.empty((len(ids), 2), dtype=np.int64)
    bad = []
    for i, s in enumerate(ids):
        m = _SPOT_RE.match(str(s))
        if m is None:
            bad.append(str(s))
            continue
        out[i] = (int(float(m.group(1))), int(float(m.group(2))))
    if bad:
        raise CPNNInputError(
            f"{len(bad)} of {len(ids)} spot names are not '{{x}}x{{y}}' array coordinates, "
            f"e.g. {bad[:3]}.",
            path=path, field=field,
            fix="name rows by integer array coordinates, e.g. '10x21'.",
        )
    return out


def _int_column(df: pd.DataFrame, col: str, path: Path) -> np.ndarray:
    v = pd.to_numeric(df[col], errors="coerce").to_numpy(dtype=np.float64)
    if not np.isfinite(v).all() or (v != np.round(v)).any():
        bad = df[col][~(np.isfinite(v) & (v == np.round(v)))].head(3).tolist()
        raise CPNNInputError(
            f"column {col!r} must hold integer array coordinates, found e.g. {bad}.",
            path=path, field=col,
            fix="use the spot file's 'x'/'y' array columns (not new_x/new_y or pixels).",
        )
    return v.astype(np.int64)


def read_spot_file(path: os.PathLike | str) -> pd.DataFrame:
    """Read a ``{sec}_selection.tsv`` spot file, indexed by ``"{x}x{y}"``.

    Integer-valued float array coordinates (``10.0``) are accepted; columns
    ``x, y, pixel_x, pixel_y`` are required, ``selected`` is optional (all kept).
    """
    path = Path(path)
    df = read_table(path, sep="\t", what="spot file")
    need = ["x", "y", "pixel_x", "pixel_y"]
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise CPNNInputError(
            f"spot file lacks column(s) {missing}; it has {list(df.columns)}.",
            path=path, field=",".join(missing),
            fix="use the her2st ST-spotfiles/{sec}_selection.tsv (x y new_x new_y pixel_x pixel_y selected).",
        )
    x = _int_column(df, "x", path)
    y = _int_column(df, "y", path)
    df = df.assign(x=x, y=y)
    for c in ("pixel_x", "pixel_y"):
        v = pd.to_numeric(df[c], errors="coerce")
        if v.isna().any():
            raise CPNNInputError(
                f"{int(v.isna().sum())} spot(s) have a missing or non-numeric {c}.",
                path=path, field=c, fix="fill the pixel position of every spot.",
            )
        df[c] = v.astype(np.float64)
    df.index = pd.Index([f"{a}x{b}" for a, b in zip(x, y)], name="spot")
    if not df.index.is_unique:
        dup = df.index[df.index.duplicated()].unique()[:5].tolist()
        raise CPNNInputError(
            f"spot file lists the same array position twice, e.g. {dup}.",
            path=path, field="x,y", fix="remove the duplicated rows.",
        )
    return df


def fit_pixel_pitch(spots: pd.DataFrame, path: Optional[os.PathLike | str] = None) -> dict:
    """Least-squares pixels per array step along x and y, and the implied µm per pixel.

    Returns a dict with ``px_per_step_x``, ``px_per_step_y``, ``residual_rms_px_x``,
    ``residual_rms_px_y``, ``n_spots`` and ``mpp`` (= 200 µm / mean step).
    """
    out: dict = {"n_spots": int(len(spots))}
    for a, p in (("x", "pixel_x"), ("y", "pixel_y")):
        arr = spots[a].to_numpy(np.float64)
        pix = spots[p].to_numpy(np.float64)
        if len(arr) < 3 or np.unique(arr).size < 2:
            raise CPNNInputError(
                f"cannot fit the pixel pitch along {a}: need >= 3 spots on >= 2 array {a} values.",
                path=path, field=f"{a},{p}", fix="pass --mpp (mpp= in Python).",
            )
        A = np.column_stack([arr, np.ones_like(arr)])
        coef, *_ = np.linalg.lstsq(A, pix, rcond=None)
        resid = pix - A @ coef
        out[f"px_per_step_{a}"] = float(coef[0])
        out[f"offset_px_{a}"] = float(coef[1])
        out[f"residual_rms_px_{a}"] = float(np.sqrt(np.mean(resid**2)))
    step = 0.5 * (abs(out["px_per_step_x"]) + abs(out["px_per_step_y"]))
    if step <= 0:
        raise CPNNInputError(
            "fitted pixel pitch is zero.", path=path, field="pixel_x,pixel_y",
            fix="check the spot file or pass --mpp (mpp= in Python).",
        )
    out["mpp"] = ST_PITCH_UM / step
    return out


def find_section_image(root: Path, section: str) -> tuple[Optional[Path], Path]:
    """Image of a section (glob in ``data/ST-imgs/{patient}/{section}/``) and the folder searched."""
    folder = root / "data" / "ST-imgs" / patient_of(section) / section
    if not folder.is_dir():
        return None, folder
    found = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if len(found) > 1:
        raise CPNNInputError(
            f"{len(found)} candidate images for section {section}: {[p.name for p in found]}.",
            path=folder, field="image",
            fix=f"keep only the H&E image in that folder (images={{'{section}': <path>}} in Python).",
        )
    return (found[0] if found else None), folder


def _read_section(
    root: Path,
    section: str,
    *,
    min_counts: int,
    mpp: Optional[float],
    image: Optional[Path],
    require_image: bool,
    max_unmatched_fraction: float,
) -> ad.AnnData:
    cpath = root / "data" / "ST-cnts" / f"{section}.tsv.gz"
    spath = root / "data" / "ST-spotfiles" / f"{section}_selection.tsv"
    if not spath.is_file():
        raise CPNNInputError(
            f"spot file of section {section} not found.", path=spath,
            fix="download data/ST-spotfiles from the her2st repository.",
        )
    patient = patient_of(section)
    counts = read_table(cpath, sep="\t", index_col=0, what="counts table")
    if counts.shape[0] == 0 or counts.shape[1] == 0:
        raise CPNNInputError(
            f"counts table is empty ({counts.shape}).", path=cpath,
            fix="re-download the counts file.",
        )
    X = check_counts(counts.to_numpy(), path=cpath, field="counts")
    arr_xy = _parse_spot_ids(list(counts.index), cpath, "row names")
    count_ids = pd.Index([f"{a}x{b}" for a, b in arr_xy])
    if not count_ids.is_unique:
        dup = count_ids[count_ids.duplicated()].unique()[:5].tolist()
        raise CPNNInputError(
            f"counts list the same spot twice, e.g. {dup}.", path=cpath, field="row names",
            fix="remove duplicated rows.",
        )

    spots = read_spot_file(spath)
    if "selected" in spots.columns:
        sel = spots[pd.to_numeric(spots["selected"], errors="coerce").fillna(0) == 1]
    else:
        sel = spots
    in_counts = sel.index.isin(count_ids)
    n_matched = int(in_counts.sum())
    no_counts = sel.index[~in_counts]
    no_position = count_ids[~count_ids.isin(sel.index)]
    denom = max(1, min(len(sel), len(count_ids)))
    if n_matched == 0 or (denom - n_matched) / denom > max_unmatched_fraction:
        raise CPNNInputError(
            f"spot ids of the spot file do not match the counts: {n_matched} matched, "
            f"{len(no_counts)} selected spot(s) without counts (e.g. {no_counts[:3].tolist()}), "
            f"{len(no_position)} count row(s) without a selected position "
            f"(e.g. {no_position[:3].tolist()}).",
            path=spath, field="x,y",
            fix=f"check that {spath.name} and {cpath.name} belong to the same section.",
        )

    # keep the counts' row order (the proportion files follow it)
    keep = np.flatnonzero(count_ids.isin(sel.index))
    X = X[keep]
    ids = count_ids[keep]
    pos = sel.loc[ids]
    totals = np.asarray(X.sum(axis=1)).ravel()
    low = totals < min_counts
    dropped = ids[low].tolist()
    warn_dropped(len(no_counts), len(sel), "selected spots have no row in the counts table", f"section {section}")
    warn_dropped(len(no_position), len(count_ids), "count rows have no selected spot position", f"section {section}")
    warn_dropped(int(low.sum()), len(ids), f"spots have fewer than {min_counts} UMI (min_counts)", f"section {section}")
    X = X[~low]
    ids = ids[~low]
    pos = pos.loc[ids]
    if len(ids) == 0:
        raise CPNNInputError(
            f"no spot of section {section} has >= {min_counts} UMI.",
            path=cpath, field="min_counts", fix="lower min_counts.",
        )

    fit = fit_pixel_pitch(sel, spath)
    if mpp is None:
        mpp_used, mpp_source = fit["mpp"], "fitted_pitch"
    else:
        mpp_used, mpp_source = check_mpp(mpp), "given"

    if image is None:
        image, folder = find_section_image(root, section)
        if image is None and require_image:
            raise CPNNInputError(
                f"no image (*{', *'.join(IMAGE_SUFFIXES)}) for section {section}.",
                path=folder, field="image",
                fix="add the H&E image there, or give precomputed features with --features "
                "(images= / require_image=False in Python).",
            )
    elif not Path(image).is_file():
        raise CPNNInputError(f"image of section {section} not found.", path=image,
                             field="images", fix="pass an existing image file.")
    xy = pos[["pixel_x", "pixel_y"]].to_numpy(np.float64)
    img_info = check_coords_in_image(xy, image, coords_path=spath, field="pixel_x,pixel_y")

    obs = pd.DataFrame(
        {"array_x": pos["x"].to_numpy(), "array_y": pos["y"].to_numpy(),
         "total_counts": totals[~low]},
        index=ids,
    )
    record = {
        "image_path": None if image is None else str(image),
        "mpp": float(mpp_used),
        "spot_diameter_um": ST_SPOT_DIAMETER_UM,
        "sample_id": section,
        "patient_id": patient,
        "platform": PLATFORM,
        "mpp_source": mpp_source,
        "mpp_fitted": fit["mpp"],
        "pitch_fit": fit,
        "inter_spot_distance_um": ST_PITCH_UM,
        "counts_path": str(cpath),
        "spots_path": str(spath),
        "min_counts": int(min_counts),
        "n_dropped_min_counts": int(low.sum()),
        "dropped_min_counts": dropped,
        "n_selected_without_counts": int(len(no_counts)),
        "selected_without_counts": no_counts.tolist(),
        "n_counts_without_position": int(len(no_position)),
        **img_info,
    }
    return make_spatial_adata(
        X, obs_names=ids, var_names=list(counts.columns), xy=xy, section=section,
        patient=patient, cpnn_input=record, path=cpath, obs=obs,
    )


def read_her2st(
    root: os.PathLike | str,
    sections: Optional[str | Iterable[str]] = None,
    min_counts: int = 50,
    mpp: Optional[float] = None,
    *,
    require_image: bool = True,
    images: Optional[Mapping[str, os.PathLike | str]] = None,
    max_unmatched_fraction: float = 0.5,
) -> dict[str, ad.AnnData]:
    """Read HER2ST sections into AnnData objects.

    Parameters
    ----------
    root
        Root of the ``almaan/her2st`` repository (holding ``data/`` and ``res/``).
    sections
        A section id (``"C2"``), several, or None for every section with counts.
    min_counts
        Spots with fewer total UMI are dropped; how many (and which) is recorded in
        ``uns["cpnn_input"]["n_dropped_min_counts"]`` / ``["dropped_min_counts"]``.
    mpp
        Microns per pixel of the images. None: estimated per section from the fitted
        array pitch (200 µm per step); the fit is stored in ``uns["cpnn_input"]["pitch_fit"]``.
    require_image
        If False, a section without an image is read with ``image_path=None``.
    images
        Optional ``{section: image path}`` overriding the glob in ``data/ST-imgs``.
    max_unmatched_fraction
        Raise when more than this fraction of the selected spots (or count rows,
        whichever is smaller) cannot be joined; smaller mismatches are dropped and
        counted in ``uns["cpnn_input"]``.

    Returns
    -------
    dict[str, anndata.AnnData]
        Per section: ``X`` raw counts (CSR float32), ``obs_names`` ``"{x}x{y}"`` array
        ids in the counts' order, ``obs`` with ``array_x, array_y, total_counts,
        section, patient``, ``obsm["spatial"]`` (x, y) full-resolution pixels and
        ``uns["cpnn_input"]`` (platform ``"legacy_st"``, spot diameter 100 µm).

    Raises
    ------
    CPNNInputError
        Missing section (the available ones are listed), missing spot file or image,
        spot ids that do not match the counts, invalid counts.
    """
    root = Path(root)
    available = available_sections(root)
    if sections is None:
        sections = available
    elif isinstance(sections, str):
        sections = [sections]
    sections = list(sections)
    missing = [s for s in sections if s not in available]
    if missing:
        raise CPNNInputError(
            f"section(s) {missing} not found; available: {available}.",
            path=root / "data" / "ST-cnts", field="sections",
            fix="choose among the available sections or download the missing counts files.",
        )
    images = dict(images or {})
    return {
        s: _read_section(
            root, s, min_counts=min_counts, mpp=mpp,
            image=Path(images[s]) if s in images else None,
            require_image=require_image, max_unmatched_fraction=max_unmatched_fraction,
        )
        for s in sections
    }


def _align_rows(
    df: pd.DataFrame, obs_names: Optional[Sequence[str]], path: Path
) -> pd.DataFrame:
    if obs_names is None:
        return df
    obs_names = pd.Index([str(o) for o in obs_names])
    missing = obs_names[~obs_names.isin(df.index)]
    if len(missing):
        raise CPNNInputError(
            f"{len(missing)} of {len(obs_names)} requested spots are absent, "
            f"e.g. {missing[:3].tolist()}.",
            path=path, field="row names",
            fix="read the proportions of the same section as the counts.",
        )
    return df.loc[obs_names]


def read_her2st_proportions(
    root: os.PathLike | str,
    section: str,
    level: str = "major",
    obs_names: Optional[Sequence[str]] = None,
) -> pd.DataFrame:
    """Stereoscope cell-type proportions of a section (``res/ST-deconv/props``).

    Parameters
    ----------
    root, section
        As in :func:`read_her2st`.
    level
        ``"major"`` (8 types), ``"minor"`` (22) or ``"subset"`` (41).
    obs_names
        If given (e.g. ``adata.obs_names``), rows are returned in this order; a spot
        absent from the file raises.

    Returns
    -------
    pandas.DataFrame
        Rows spot ids ``"{x}x{y}"`` as in the counts, columns cell-type names, float64.
    """
    if level not in PROPORTION_LEVELS:
        raise CPNNInputError(f"unknown level {level!r}.", field="level",
                             fix=f"use one of {list(PROPORTION_LEVELS)}.")
    root = Path(root)
    path = root / "res" / "ST-deconv" / "props" / level / f"{section}-proportion.tsv"
    if not path.is_file():
        folder = path.parent
        have = sorted(p.name.split("-")[0] for p in folder.glob("*-proportion.tsv")) if folder.is_dir() else []
        raise CPNNInputError(
            f"no {level} proportions for section {section}; available: {have}.", path=path,
            fix="download res/ST-deconv from the her2st repository.",
        )
    df = read_table(path, sep="\t", index_col=0)
    xy = _parse_spot_ids(list(df.index), path, "row names")
    df.index = pd.Index([f"{a}x{b}" for a, b in xy], name="spot")
    df.columns = [str(c) for c in df.columns]
    vals = df.to_numpy(dtype=np.float64)
    if not np.isfinite(vals).all() or (vals < -1e-9).any():
        raise CPNNInputError("proportions hold NaN or negative values.", path=path,
                             field="values", fix="re-download the proportions file.")
    df = df.astype(np.float64)
    return _align_rows(df, obs_names, path)


def read_her2st_clusters(
    root: os.PathLike | str,
    section: str,
    obs_names: Optional[Sequence[str]] = None,
) -> pd.DataFrame:
    """Expression-cluster annotation of a section (``res/ST-cluster/lbl``).

    The file names rows by *pixel* position; the returned frame is re-indexed by the
    counts' array ids ``"{x}x{y}"`` using its ``x``/``y`` columns. Columns: ``label``
    plus the file's others. ``obs_names`` aligns rows as in
    :func:`read_her2st_proportions`.
    """
    root = Path(root)
    path = root / "res" / "ST-cluster" / "lbl" / f"{section}-cluster-annotation.tsv.gz"
    if not path.is_file():
        raise CPNNInputError(f"no cluster annotation for section {section}.", path=path,
                             fix="download res/ST-cluster from the her2st repository.")
    df = read_table(path, sep="\t", index_col=0)
    for c in ("x", "y", "label"):
        if c not in df.columns:
            raise CPNNInputError(f"column {c!r} missing; have {list(df.columns)}.",
                                 path=path, field=c, fix="use the her2st cluster annotation file.")
    x = _int_column(df, "x", path)
    y = _int_column(df, "y", path)
    df.index = pd.Index([f"{a}x{b}" for a, b in zip(x, y)], name="spot")
    return _align_rows(df, obs_names, path)

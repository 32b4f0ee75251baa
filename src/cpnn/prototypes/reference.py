"""Reading and quality-controlling a single-cell reference (counts + cell-type labels)."""
from __future__ import annotations

import gzip
import os
import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import anndata as ad
import numpy as np
import pandas as pd
import scipy.io
import scipy.sparse as sp

from cpnn._constants import COUNTS, UNS
from cpnn.errors import CPNNInputError

__all__ = ["read_reference", "reference_qc", "validate_counts"]

QC_KEY = "reference_qc"


def _open_maybe_gz(path: Path):
    return gzip.open(path, "rt") if path.suffix == ".gz" else open(path, "rt")


def _first_existing(folder: Path, names: Sequence[str]) -> Optional[Path]:
    for n in names:
        p = folder / n
        if p.exists():
            return p
    return None


def _read_10x_folder(folder: Path) -> ad.AnnData:
    mtx = _first_existing(folder, ["matrix.mtx.gz", "matrix.mtx"])
    feats = _first_existing(folder, ["features.tsv.gz", "features.tsv", "genes.tsv.gz", "genes.tsv"])
    bcs = _first_existing(folder, ["barcodes.tsv.gz", "barcodes.tsv"])
    missing = [n for n, p in (("matrix.mtx[.gz]", mtx), ("features.tsv[.gz] or genes.tsv[.gz]", feats),
                              ("barcodes.tsv[.gz]", bcs)) if p is None]
    if missing:
        raise CPNNInputError(
            f"not a 10x matrix folder: missing {', '.join(missing)}.",
            path=folder,
            fix="point to the folder holding matrix.mtx, features.tsv and barcodes.tsv "
            "(e.g. Space Ranger/Cell Ranger 'filtered_feature_bc_matrix'), or to an .h5ad file.",
        )
    with _open_maybe_gz(mtx) as fh:
        try:
            mat = scipy.io.mmread(fh)
        except Exception as exc:  # scipy raises ValueError/IndexError on corrupt files
            raise CPNNInputError(f"cannot parse the Matrix Market file ({exc}).", path=mtx,
                                 fix="re-export the matrix; it looks truncated or corrupt.") from exc
    from ..data.tables import read_table

    features = read_table(feats, sep="\t", header=None, dtype=str, what="10x features table")
    barcodes = read_table(bcs, sep="\t", header=None, dtype=str, what="10x barcodes table")[0].to_numpy()
    mat = sp.csr_matrix(mat.T)  # 10x stores genes x cells
    if mat.shape != (len(barcodes), len(features)):
        raise CPNNInputError(
            f"matrix is {mat.shape[1]} features x {mat.shape[0]} barcodes but the tables list "
            f"{len(features)} features and {len(barcodes)} barcodes.",
            path=mtx,
            fix="use the matrix, features and barcodes files of one and the same export.",
        )
    if features.shape[1] >= 3:  # keep gene expression only (drop antibody capture etc.)
        keep = features[2].fillna("Gene Expression").str.contains("Gene Expression").to_numpy()
        features, mat = features[keep], mat[:, np.flatnonzero(keep)]
    names = features[1] if features.shape[1] >= 2 else features[0]
    var = pd.DataFrame({"gene_ids": features[0].to_numpy()}, index=pd.Index(names.to_numpy(), dtype=str))
    return ad.AnnData(X=mat, obs=pd.DataFrame(index=pd.Index(barcodes, dtype=str)), var=var)


def _read_metadata(path: Path) -> pd.DataFrame:
    if not path.exists():
        raise CPNNInputError("metadata table not found.", path=path, fix="check the path.")
    name = path.name.lower().removesuffix(".gz")
    sep = "," if name.endswith(".csv") else "\t"
    from ..data.tables import read_table

    table = read_table(path, sep=sep, index_col=0, what="metadata table", keep_duplicate_columns=False)
    table.index = table.index.astype(str)
    if table.index.has_duplicates:
        dup = table.index[table.index.duplicated()].unique()[:5].tolist()
        raise CPNNInputError(f"duplicated barcodes in the metadata index, e.g. {dup}.", path=path,
                             fix="the first column must hold one unique cell barcode per row.")
    return table


def _counts_matrix(adata: ad.AnnData, counts_layer: Optional[str], path: Path) -> tuple[Any, str, Any]:
    """Pick the counts matrix; return (matrix, where, var_names)."""
    if counts_layer is None:
        counts_layer = COUNTS if COUNTS in adata.layers else "X"
    if counts_layer == "X":
        return adata.X, "X", adata.var_names
    if counts_layer == "raw":
        if adata.raw is None:
            raise CPNNInputError("this AnnData has no .raw.", path=path, field="raw",
                                 fix="store the raw counts in X or layers['counts'] of the reference (counts_layer= in Python).")
        return adata.raw.X, "raw.X", adata.raw.var_names
    if counts_layer not in adata.layers:
        raise CPNNInputError(f"no layer {counts_layer!r}; layers: {list(adata.layers)}.", path=path,
                             field=f"layers['{counts_layer}']",
                             fix="store the raw counts in X or layers['counts'] (counts_layer= 'X', 'raw' or a layer in Python).")
    return adata.layers[counts_layer], f"layers['{counts_layer}']", adata.var_names


def _integer_like(values: np.ndarray) -> bool:
    return bool(np.all(values == np.round(values)))


def validate_counts(matrix: Any, *, path: Optional[os.PathLike | str] = None, field: str = "X",
                    hint: str = "") -> sp.csr_matrix:
    """Return ``matrix`` as CSR float32 after checking it holds raw counts.

    Parameters
    ----------
    matrix
        Dense array or scipy sparse matrix (cells x genes).
    path, field
        Where it came from, for the error message.
    hint
        Extra text appended to the fix of a non-integer error (where raw counts live).

    Raises
    ------
    CPNNInputError
        On NaN/inf, negative or non-integer values.
    """
    mat = sp.csr_matrix(matrix)
    data = np.asarray(mat.data)
    if not np.issubdtype(data.dtype, np.number):
        raise CPNNInputError(f"counts have non-numeric dtype {data.dtype}.", path=path, field=field,
                             fix="store counts as integers or floats.")
    if data.size:
        if not np.all(np.isfinite(data)):
            n = int((~np.isfinite(data)).sum())
            raise CPNNInputError(f"counts contain {n} NaN/inf values.", path=path, field=field,
                                 fix="remove or repair the affected cells; raw UMI counts have no NaN.")
        if data.min() < 0:
            raise CPNNInputError(f"counts contain negative values (min {data.min():g}); this looks "
                                 "like scaled or log-transformed data.", path=path, field=field,
                                 fix="provide raw integer UMI counts. " + hint)
        if not _integer_like(data):
            raise CPNNInputError("counts are not integers; this looks like normalised or "
                                 "log-transformed data.", path=path, field=field,
                                 fix="provide raw integer UMI counts. " + hint)
    out = sp.csr_matrix(mat, dtype=np.float32)
    out.eliminate_zeros()
    out.sort_indices()
    return out


def read_reference(
    path: os.PathLike | str,
    label_key: str,
    batch_key: Optional[str] = None,
    metadata: Optional[os.PathLike | str | pd.DataFrame] = None,
    counts_layer: Optional[str] = None,
    duplicate_genes: str = "make_unique",
) -> ad.AnnData:
    """Read and validate a single-cell reference.

    Parameters
    ----------
    path
        An ``.h5ad`` file, or a 10x folder (``matrix.mtx[.gz]``,
        ``features.tsv[.gz]``/``genes.tsv[.gz]``, ``barcodes.tsv[.gz]``).
    label_key
        ``obs`` column (or metadata column) with the cell-type label.
    batch_key
        Optional column with the batch (patient/sample) of each cell.
    metadata
        A csv/tsv table (or DataFrame) indexed by cell barcode holding the label/batch
        columns; required for a 10x folder, optional for ``.h5ad`` (its columns are
        added to ``obs``). Cells absent from it are dropped with a warning.
    counts_layer
        Where the raw counts are in an ``.h5ad``: ``None`` (``layers['counts']`` if present,
        else ``X``), ``"X"``, ``"raw"`` or a layer name.
    duplicate_genes
        ``"make_unique"`` (append ``-1``, ``-2``..., with a warning) or ``"error"``.

    Returns
    -------
    anndata.AnnData
        Cells x genes, ``X`` = CSR float32 integer-valued counts; ``obs[label_key]`` (and
        ``obs[batch_key]``) as strings. Cells with a missing label are dropped (warning).

    Raises
    ------
    CPNNInputError
        Missing file/columns, non-count data, NaNs, duplicated genes with ``"error"``.
    """
    path = Path(path)
    if not path.exists():
        raise CPNNInputError("reference not found.", path=path, fix="check the path.")
    if path.is_dir():
        adata = _read_10x_folder(path)
        where, hint = "matrix.mtx", ""
        counts, var_names = adata.X, adata.var_names
        if metadata is None:
            raise CPNNInputError("a 10x folder has no cell-type labels.", path=path, field="metadata",
                                 fix="pass --metadata with a csv/tsv indexed by barcode holding the "
                                 f"'{label_key}' column (metadata= in Python).")
    elif path.suffix.lower() == ".h5ad":
        try:
            adata = ad.read_h5ad(path)
        except Exception as exc:
            raise CPNNInputError(f"cannot read this .h5ad ({exc}).", path=path,
                                 fix="check that the file is a complete AnnData .h5ad.") from exc
        counts, where, var_names = _counts_matrix(adata, counts_layer, path)
        options = [f"layers['{k}']" for k in adata.layers] + (["raw"] if adata.raw is not None else [])
        hint = ("Raw counts are often in layers['counts'] or .raw (available here: "
                f"{options or 'none'}); store them in X or layers['counts'] (counts_layer= in Python).")
    else:
        raise CPNNInputError(f"unsupported reference type {path.suffix!r}.", path=path,
                             fix="give an .h5ad file or a 10x matrix folder.")

    X = validate_counts(counts, path=path, field=where, hint=hint)
    obs = adata.obs.copy()
    obs.index = obs.index.astype(str)
    out = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=pd.Index(np.asarray(var_names, dtype=str))))

    if metadata is not None:
        meta = metadata.copy() if isinstance(metadata, pd.DataFrame) else _read_metadata(Path(metadata))
        meta.index = meta.index.astype(str)
        shared = out.obs_names.intersection(meta.index)
        if len(shared) == 0:
            raise CPNNInputError(
                f"no barcode of the metadata matches the counts (counts e.g. "
                f"{out.obs_names[:3].tolist()}, metadata e.g. {meta.index[:3].tolist()}).",
                path=None if isinstance(metadata, pd.DataFrame) else metadata, field="index",
                fix="index the metadata by the same cell barcodes as barcodes.tsv / obs_names.")
        if len(shared) < out.n_obs:
            warnings.warn(f"{out.n_obs - len(shared)} of {out.n_obs} cells have no metadata row "
                          "and are dropped.", stacklevel=2)
        out = out[np.asarray(out.obs_names.isin(shared))].copy()
        new_cols = meta.loc[out.obs_names]
        for c in new_cols.columns:
            out.obs[c] = new_cols[c].to_numpy()

    for key, role in ((label_key, "label"), (batch_key, "batch")):
        if key is None:
            continue
        if key not in out.obs.columns:
            raise CPNNInputError(
                f"{role} column {key!r} not found; available columns: {list(out.obs.columns)}.",
                path=path, field=key,
                fix=f"pass --{role} with one of those, or --metadata with a table holding it "
                f"({role}_key= in Python).")
        col = out.obs[key]
        missing = col.isna().to_numpy()
        if missing.any():
            if missing.all():
                raise CPNNInputError(f"the {role} column is empty.", path=path, field=key,
                                     fix="fill it in or choose another column.")
            warnings.warn(f"{int(missing.sum())} cells have no {role} ({key!r}) and are dropped.",
                          stacklevel=2)
            out = out[~missing].copy()
        out.obs[key] = out.obs[key].astype(str).astype("category")

    if out.var_names.has_duplicates:
        dup = out.var_names[out.var_names.duplicated()].unique()
        if duplicate_genes == "error":
            raise CPNNInputError(f"{len(dup)} duplicated gene names, e.g. {dup[:5].tolist()}.",
                                 path=path, field="var_names",
                                 fix="make the gene names of the reference unique (duplicate_genes='make_unique' in Python).")
        warnings.warn(f"{len(dup)} duplicated gene names (e.g. {dup[:5].tolist()}) made unique "
                      "by appending -1, -2, ...", stacklevel=2)
        out.var_names_make_unique()
    out.uns[UNS] = {"reference_path": str(path), "counts_from": where}
    done = dict(adata.uns.get(UNS, {}) or {}).get(QC_KEY) if not path.is_dir() else None
    if done:  # a reference saved after reference_qc: build_prototypes must not filter it again
        out.uns[UNS][QC_KEY] = done
    return out


def _mito_mask(var_names: pd.Index, prefixes: Sequence[str]) -> np.ndarray:
    upper = pd.Index(var_names).astype(str).str.upper()
    return np.asarray(upper.str.startswith(tuple(p.upper() for p in prefixes)), dtype=bool)


def reference_qc(
    adata: ad.AnnData,
    label_key: Optional[str] = None,
    *,
    max_mito_fraction: float = 0.30,
    max_genes: Optional[float] = None,
    min_genes: int = 200,
    min_cells_per_gene: Optional[int] = None,
    min_cells_per_label: int = 3,
    mito_prefixes: Sequence[str] = ("MT-",),
) -> ad.AnnData:
    """The reference quality control of method §1, docs/ARCHITECTURE.md, scaled to the reference.

    Cells are dropped when they have ``>= max_mito_fraction`` mitochondrial counts,
    ``>= max_genes`` or ``< min_genes`` detected genes; then genes detected in fewer than
    ``min_cells_per_gene`` of the remaining cells; then labels with fewer than
    ``min_cells_per_label`` cells (with a warning).

    Default thresholds, and why:

    * ``max_genes=None`` -> ``max(2500, 3 * median detected genes)``. The 2,500 cap (a
      doublet filter) was set for shallow 10x v2 data where a typical cell has under
      1,000 genes; on deeper data it would remove most cells, so it grows with the median.
      On the Wu et al. CID4465 reference (median 410 genes) it stays 2,500 (17 cells).
    * ``min_cells_per_gene=None`` -> ``max(3, round(200 * n_cells / 100_000))``: the
      200-cell rule was made for the ~100k-cell Wu et al. atlas, so it is scaled to the
      reference's size with a floor of 3 cells (3 on a 1,564-cell reference).

    Parameters
    ----------
    adata
        Cells x genes raw counts (as returned by :func:`read_reference`).
    label_key
        Label column for the per-label filter; skipped when ``None``.
    max_mito_fraction, max_genes, min_genes, min_cells_per_gene, min_cells_per_label
        Thresholds (see above); pass numbers to override.
    mito_prefixes
        Gene-name prefixes of mitochondrial genes (case-insensitive).

    Returns
    -------
    anndata.AnnData
        A filtered copy; ``uns["cpnn"]["reference_qc"]`` records thresholds and how many
        cells/genes/labels each rule dropped. ``obs["total_counts"]`` and
        ``obs["n_genes"]`` are computed before the gene filter.
    """
    X = sp.csr_matrix(adata.X)
    n_cells0, n_genes0 = X.shape
    if n_cells0 == 0:
        raise CPNNInputError("the reference has no cells.", field="X", fix="check the input file.")
    n_genes = np.diff(X.indptr)
    total = np.asarray(X.sum(axis=1)).ravel()
    mito = _mito_mask(adata.var_names, mito_prefixes)
    mito_frac = np.asarray(X[:, np.flatnonzero(mito)].sum(axis=1)).ravel() / np.maximum(total, 1)
    if max_genes is None:
        max_genes = max(2500.0, 3.0 * float(np.median(n_genes)))
    drop_mito = mito_frac >= max_mito_fraction
    drop_high = n_genes >= max_genes
    drop_low = n_genes < min_genes
    keep_cells = ~(drop_mito | drop_high | drop_low)
    if not keep_cells.any():
        raise CPNNInputError(
            f"QC removed every cell (median detected genes {np.median(n_genes):.0f}, median "
            f"mitochondrial fraction {np.median(mito_frac):.2f}).", field="X",
            fix="relax min_genes / max_genes / max_mito_fraction of reference_qc, or check the "
            "counts are per cell and raw.")
    if min_cells_per_gene is None:
        min_cells_per_gene = max(3, int(round(200 * int(keep_cells.sum()) / 100_000)))
    Xk = X[np.flatnonzero(keep_cells)]
    cells_per_gene = np.bincount(Xk.indices, minlength=n_genes0)
    keep_genes = cells_per_gene >= min_cells_per_gene

    out = adata[np.flatnonzero(keep_cells)][:, np.flatnonzero(keep_genes)].copy()
    out.X = sp.csr_matrix(out.X)
    out.obs["total_counts"] = total[keep_cells]
    out.obs["n_genes"] = n_genes[keep_cells]
    dropped_labels: Dict[str, int] = {}
    if label_key is not None:
        if label_key not in out.obs.columns:
            raise CPNNInputError(f"label column {label_key!r} not found; available columns: "
                                 f"{list(out.obs.columns)}.", field=label_key,
                                 fix="pass an existing obs column with --label (label_key= in Python).")
        counts = out.obs[label_key].astype(str).value_counts()
        small = counts[counts < min_cells_per_label]
        if len(small):
            dropped_labels = {str(k): int(v) for k, v in small.items()}
            warnings.warn(f"labels with < {min_cells_per_label} cells after QC are dropped: "
                          f"{dropped_labels}.", stacklevel=2)
            out = out[~out.obs[label_key].astype(str).isin(small.index).to_numpy()].copy()
        if out.obs[label_key].dtype.name == "category":
            out.obs[label_key] = out.obs[label_key].cat.remove_unused_categories()
        if out.n_obs == 0:
            raise CPNNInputError("no label keeps enough cells after QC.", field=label_key,
                                 fix="lower min_cells_per_label or use coarser labels.")
    record = {
        "max_mito_fraction": float(max_mito_fraction),
        "max_genes": float(max_genes),
        "min_genes": int(min_genes),
        "min_cells_per_gene": int(min_cells_per_gene),
        "min_cells_per_label": int(min_cells_per_label),
        "n_cells_before": int(n_cells0),
        "n_genes_before": int(n_genes0),
        "cells_dropped_mito": int(drop_mito.sum()),
        "cells_dropped_max_genes": int((drop_high & ~drop_mito).sum()),
        "cells_dropped_min_genes": int((drop_low & ~drop_mito & ~drop_high).sum()),
        "genes_dropped": int((~keep_genes).sum()),
        "labels_dropped": dropped_labels,
        "cells_dropped_labels": int(sum(dropped_labels.values())),
        "n_cells_after": int(out.n_obs),
        "n_genes_after": int(out.n_vars),
        "n_mito_genes": int(mito.sum()),
    }
    uns = dict(out.uns.get(UNS, {}))
    uns[QC_KEY] = record
    out.uns[UNS] = uns
    return out

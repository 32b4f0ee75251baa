"""Bulk RNA-seq readers (GDC/TCGA STAR counts, generic tables) and TCGA barcode helpers.

GDC "augmented STAR gene counts" files (``*.rna_seq.augmented_star_gene_counts.tsv``)
look like::

    # gene-model: GENCODE v36
    gene_id  gene_name  gene_type  unstranded  stranded_first  stranded_second  tpm_unstranded  fpkm_unstranded  fpkm_uq_unstranded
    N_unmapped        <counts in the first three count columns only>
    N_multimapping    ...
    N_noFeature       ...
    N_ambiguous       ...
    ENSG00000000003.15  TSPAN6  protein_coding  3044  1526  1518  31.2  8.8  9.1

TCGA barcodes: ``TCGA-{TSS}-{participant}-{sample type}{vial}-{portion}{analyte}-{plate}-{center}``
for aliquots, ``TCGA-{TSS}-{participant}-{sample type}{vial}-{portion}-{slide}`` for
slides (slide = TS/BS/MS/DX + number; TS/BS = frozen top/bottom section, DX = FFPE
diagnostic slide).
"""
from __future__ import annotations

import csv
import gzip
import logging
import os
import re
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

import anndata as ad
import numpy as np
import pandas as pd
from scipy import sparse

from cpnn import _constants as K
from cpnn.data._validate import check_counts, dedupe_genes, require_file
from cpnn.errors import CPNNInputError

log = logging.getLogger(__name__)

STAR_COLUMNS = ("unstranded", "stranded_first", "stranded_second",
                "tpm_unstranded", "fpkm_unstranded", "fpkm_uq_unstranded")
COUNT_COLUMNS = ("unstranded", "stranded_first", "stranded_second")
_ENSEMBL_VERSION = re.compile(r"^(ENS[A-Z]*[GT]\d+)\.\d+(_PAR_Y)?$")


# --------------------------------------------------------------------------- STAR counts
def _strip_version(gene_id: str) -> str:
    m = _ENSEMBL_VERSION.match(gene_id)
    if m is None:
        return gene_id
    return m.group(1) + (m.group(2) or "")


def _read_star_frame(path: Path) -> tuple[pd.DataFrame, Optional[str]]:
    gene_model = None
    n_comment = 0
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as fh:
        for line in fh:
            if not line.startswith("#"):
                break
            n_comment += 1
            if "gene-model" in line:
                gene_model = line.split(":", 1)[-1].strip()
    df = pd.read_csv(path, sep="\t", skiprows=n_comment, dtype={"gene_id": str, "gene_name": str})
    return df, gene_model


def read_gdc_star_counts(
    path: os.PathLike | str,
    column: str = "unstranded",
    index: str = "gene_name",
    gene_types: Optional[Iterable[str]] = None,
) -> pd.Series:
    """Read one GDC STAR "augmented" gene-counts TSV.

    Parameters
    ----------
    path
        The ``*.augmented_star_gene_counts.tsv`` file (``.gz`` allowed).
    column
        ``"unstranded"`` (raw counts, the default), ``"stranded_first"``,
        ``"stranded_second"``, ``"tpm_unstranded"``, ``"fpkm_unstranded"`` or
        ``"fpkm_uq_unstranded"``.
    index
        ``"gene_name"`` (symbols; duplicated symbols are summed, listed in
        ``series.attrs["duplicated_genes"]`` and warned about) or ``"gene_id"``
        (Ensembl id without version; ``_PAR_Y`` copies keep their suffix).
    gene_types
        Keep only these ``gene_type`` values (e.g. ``["protein_coding"]``).

    Returns
    -------
    pandas.Series
        Values per gene (float64), named after the file; ``attrs`` hold
        ``gene_model``, ``column``, ``star_summary`` (the ``N_*`` rows) and
        ``duplicated_genes``.
    """
    path = require_file(path, "STAR gene-counts file", "download it from the GDC.")
    if column not in STAR_COLUMNS:
        raise CPNNInputError(f"unknown column {column!r}.", field="column",
                             fix=f"use one of {list(STAR_COLUMNS)}.")
    if index not in ("gene_name", "gene_id"):
        raise CPNNInputError(f"unknown index {index!r}.", field="index",
                             fix="use 'gene_name' or 'gene_id'.")
    df, gene_model = _read_star_frame(path)
    need = ["gene_id", "gene_name", "gene_type", column]
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise CPNNInputError(
            f"missing column(s) {missing}; found {list(df.columns)[:10]}.",
            path=path, field=missing[0],
            fix="use a GDC 'augmented_star_gene_counts' file (STAR - Counts workflow).",
        )
    special = df["gene_id"].str.startswith("N_")
    summary = {}
    for _, row in df.loc[special].iterrows():
        v = pd.to_numeric(row.get("unstranded"), errors="coerce")
        summary[str(row["gene_id"])] = None if pd.isna(v) else int(v)
    genes = df.loc[~special]
    if gene_types is not None:
        genes = genes[genes["gene_type"].isin(list(gene_types))]
    values = pd.to_numeric(genes[column], errors="coerce").to_numpy(np.float64)
    bad = ~np.isfinite(values)
    if bad.any():
        raise CPNNInputError(
            f"{int(bad.sum())} gene row(s) have a missing or non-numeric value, e.g. "
            f"{genes['gene_id'][bad].head(3).tolist()}.",
            path=path, field=column, fix="re-download the file; it may be truncated.",
        )
    if (values < 0).any():
        raise CPNNInputError(f"{int((values < 0).sum())} negative value(s).", path=path,
                             field=column, fix="re-download the file.")
    if column in COUNT_COLUMNS and (values != np.round(values)).any():
        raise CPNNInputError("non-integer values in a count column.", path=path, field=column,
                             fix="use a TPM/FPKM column name if these are not counts.")
    if index == "gene_id":
        names = [_strip_version(g) for g in genes["gene_id"]]
    else:
        names = genes["gene_name"].fillna(genes["gene_id"]).astype(str).tolist()
    X = sparse.csr_matrix(values[None, :])
    names, X, dup = dedupe_genes(names, X, how="sum")
    if dup:
        warnings.warn(
            f"{path.name}: {len(dup)} duplicated {index} value(s) summed, e.g. {dup[:5]}.",
            stacklevel=2,
        )
    out = pd.Series(np.asarray(X.todense()).ravel().astype(np.float64), index=pd.Index(names, name=index),
                    name=path.name.split(".")[0])
    out.attrs.update({"gene_model": gene_model, "column": column, "star_summary": summary,
                      "duplicated_genes": dup, "path": str(path)})
    return out


def read_gdc_sample_sheet(path: os.PathLike | str) -> pd.DataFrame:
    """Read a GDC sample sheet TSV, indexed by ``File Name``.

    Columns used: ``File Name``, ``File ID``, ``Case ID``, ``Sample ID``,
    ``Sample Type``, ``Project ID`` (the last three optional). Multi-valued cells
    (``"A, A"``) are reduced to their distinct values joined by ``", "``.
    """
    path = require_file(path, "GDC sample sheet", "download the sample sheet from the GDC cart.")
    df = pd.read_csv(path, sep="\t", dtype=str)
    for c in ("File Name", "Case ID", "Sample ID"):
        if c not in df.columns:
            raise CPNNInputError(f"column {c!r} missing; found {list(df.columns)}.", path=path,
                                 field=c, fix="use the GDC 'Sample Sheet' download (TSV).")
    for c in df.columns:
        df[c] = df[c].map(lambda v: ", ".join(dict.fromkeys(s.strip() for s in str(v).split(",")))
                          if isinstance(v, str) else v)
    if df["File Name"].duplicated().any():
        dup = df["File Name"][df["File Name"].duplicated()].head(3).tolist()
        raise CPNNInputError(f"file names listed twice, e.g. {dup}.", path=path,
                             field="File Name", fix="remove duplicated rows.")
    return df.set_index("File Name")


def read_gdc_star_folder(
    directory: os.PathLike | str,
    sample_sheet: Optional[os.PathLike | str] = None,
    column: str = "unstranded",
    index: str = "gene_name",
    gene_types: Optional[Iterable[str]] = None,
) -> ad.AnnData:
    """Read every STAR gene-counts file under a GDC download folder into one AnnData.

    Parameters
    ----------
    directory
        Folder searched recursively for ``*star_gene_counts.tsv[.gz]`` (the GDC client
        puts each file in a folder named by its file id).
    sample_sheet
        GDC sample sheet; maps each file name to its case (patient) and sample id.
        Without it, observations are named by file and the patient is parsed from a
        TCGA barcode in the file name when there is one, else left as the file name.
    column, index, gene_types
        As in :func:`read_gdc_star_counts`.

    Returns
    -------
    anndata.AnnData
        Samples x genes; ``X`` CSR float32; ``obs`` with ``file_name``, ``file_id``,
        ``sample``, ``patient``, ``sample_type``, ``project``; ``uns["cpnn_input"]``
        with ``gene_model``, ``column``, ``platform="bulk_rnaseq"``.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CPNNInputError("folder not found.", path=directory, fix="pass the GDC download folder.")
    files = sorted(p for p in directory.rglob("*") if p.is_file()
                   and re.search(r"star_gene_counts\.tsv(\.gz)?$", p.name))
    if not files:
        raise CPNNInputError("no '*star_gene_counts.tsv' file found (searched recursively).",
                             path=directory,
                             fix="download 'Gene Expression Quantification' files of the "
                             "'STAR - Counts' workflow from the GDC.")
    sheet = read_gdc_sample_sheet(sample_sheet) if sample_sheet is not None else None
    if sheet is not None:
        absent = [f.name for f in files if f.name not in sheet.index]
        if absent:
            raise CPNNInputError(
                f"{len(absent)} of {len(files)} files are not in the sample sheet, e.g. {absent[:3]}.",
                path=sample_sheet, field="File Name",
                fix="use the sample sheet of the same GDC cart as the downloaded files.",
            )
    genes: Optional[pd.Index] = None
    rows = []
    gene_model = None
    meta = []
    for f in files:
        s = read_gdc_star_counts(f, column=column, index=index, gene_types=gene_types)
        if genes is None:
            genes, gene_model = s.index, s.attrs["gene_model"]
        elif not s.index.equals(genes):
            raise CPNNInputError(
                f"gene list differs from that of {files[0].name} "
                f"(gene model {s.attrs['gene_model']} vs {gene_model}).",
                path=f, field=index, fix="download files of one GDC data release / gene model only.",
            )
        rows.append(s.to_numpy(np.float32))
        if sheet is not None:
            r = sheet.loc[f.name]
            meta.append({"file_name": f.name, "file_id": r.get("File ID", f.parent.name),
                         "sample": r["Sample ID"], "patient": r["Case ID"],
                         "sample_type": r.get("Sample Type"), "project": r.get("Project ID")})
        else:
            stem = f.name.split(".")[0]
            try:
                bc = parse_tcga_barcode(stem)
                sample, patient, stype = bc.sample if bc.sample_type else stem, bc.patient, bc.sample_type_name
            except CPNNInputError:
                sample, patient, stype = stem, stem, None
            meta.append({"file_name": f.name, "file_id": f.parent.name, "sample": sample,
                         "patient": patient, "sample_type": stype, "project": None})
    obs = pd.DataFrame(meta)
    names = pd.Index(obs["sample"].astype(str))
    renamed = 0
    if not names.is_unique:
        # several files per sample (re-sequenced aliquots): keep all, say so
        dups = names.duplicated(keep=False)
        renamed = int(dups.sum())
        names = pd.Index([f"{n}|{fid}" if d else n for n, fid, d in
                          zip(names, obs["file_id"].astype(str), dups)])
        warnings.warn(f"{renamed} files share a sample id; named '<sample>|<file id>'.", stacklevel=2)
    obs.index = names
    obs = obs.astype({c: "object" for c in obs.columns})
    X = sparse.csr_matrix(np.vstack(rows))
    if column in COUNT_COLUMNS:
        X = check_counts(X, path=directory, field=column)
    adata = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=genes.astype(str)))
    adata.obs[K.PATIENT] = adata.obs["patient"].astype(str)
    adata.obs[K.SAMPLE] = adata.obs["sample"].astype(str)
    adata.uns[K.UNS_INPUT] = {
        "platform": "bulk_rnaseq", "gene_model": gene_model, "column": column, "index": index,
        "n_files": len(files), "n_samples_renamed": renamed, "source_path": str(directory),
    }
    return adata


# --------------------------------------------------------------------------- generic tables
_ENSEMBL = re.compile(r"^ENS[A-Z]*G\d{6,}(\.\d+)?(_PAR_Y)?$")
_SYMBOL = re.compile(r"^[A-Z][A-Z0-9]*(?:[-.][A-Z0-9]+)*$")
_TCGA = re.compile(r"^TCGA-", re.IGNORECASE)


def _gene_score(labels: pd.Index) -> dict:
    s = labels.astype(str)
    return {
        "ensembl": float(np.mean([bool(_ENSEMBL.match(v)) for v in s])),
        "symbol": float(np.mean([bool(_SYMBOL.match(v)) and 2 <= len(v) <= 15 for v in s])),
        "tcga": float(np.mean([bool(_TCGA.match(v)) for v in s])),
        "n": len(s),
    }


def detect_orientation(df: pd.DataFrame) -> tuple[str, str]:
    """Guess whether a table is ``"genes_x_samples"`` or ``"samples_x_genes"``.

    Looks, in order, at Ensembl-like labels, TCGA-barcode-like labels, gene-symbol-like
    labels, and finally at which axis is at least 5 times longer. Returns the
    orientation and the reason; raises when nothing decides.
    """
    r, c = _gene_score(df.index), _gene_score(df.columns)
    if abs(r["ensembl"] - c["ensembl"]) > 0.5:
        o = "genes_x_samples" if r["ensembl"] > c["ensembl"] else "samples_x_genes"
        return o, f"Ensembl gene ids on the {'rows' if o.startswith('genes') else 'columns'}"
    if abs(r["tcga"] - c["tcga"]) > 0.5:
        o = "samples_x_genes" if r["tcga"] > c["tcga"] else "genes_x_samples"
        return o, f"TCGA barcodes on the {'rows' if o.startswith('samples') else 'columns'}"
    if abs(r["symbol"] - c["symbol"]) > 0.3:
        o = "genes_x_samples" if r["symbol"] > c["symbol"] else "samples_x_genes"
        return o, f"gene-symbol-like labels on the {'rows' if o.startswith('genes') else 'columns'}"
    if r["n"] >= 5 * c["n"]:
        return "genes_x_samples", f"{r['n']} rows vs {c['n']} columns (genes outnumber samples)"
    if c["n"] >= 5 * r["n"]:
        return "samples_x_genes", f"{c['n']} columns vs {r['n']} rows (genes outnumber samples)"
    raise CPNNInputError(
        f"cannot tell which axis holds genes ({r['n']} rows, {c['n']} columns, labels "
        f"alike).", field="orientation",
        fix="pass orientation='genes_x_samples' or 'samples_x_genes'.",
    )


def _read_labelled_table(path: Path, sep: str) -> pd.DataFrame:
    """Table with labels in the first column and the header, keeping duplicated header
    labels as they are (pandas would rename the second ``ACTB`` to ``ACTB.1``)."""
    import zlib

    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt") as fh:
            header = next(csv.reader([fh.readline().rstrip("\r\n")], delimiter=sep))
        df = pd.read_csv(path, sep=sep, header=None, skiprows=1, index_col=0)
    except (EOFError, zlib.error, gzip.BadGzipFile, UnicodeDecodeError, pd.errors.ParserError, StopIteration) as exc:
        raise CPNNInputError(f"truncated or corrupt table ({type(exc).__name__}: {exc}).", path=path,
                             fix="re-download or re-export the file.") from None
    if len(header) == df.shape[1] + 1:
        header = header[1:]
    elif len(header) != df.shape[1]:  # R's write.table omits the corner label
        raise CPNNInputError(
            f"header has {len(header)} fields for {df.shape[1]} value columns.", path=path,
            field="header", fix="give one header label per column (the first may be empty).",
        )
    df.columns = [str(h) for h in header]
    df.index = df.index.astype(str)
    return df


def read_bulk_table(
    path: os.PathLike | str,
    orientation: str = "auto",
    require_counts: bool = True,
) -> ad.AnnData:
    """Read a bulk expression table (csv / tsv / txt, optionally gzipped, or ``.h5ad``).

    Parameters
    ----------
    path
        Table with gene labels on one axis and sample labels on the other, labels in
        the first column / header; or an ``.h5ad`` (samples x genes; ``layers["counts"]``
        preferred over ``X``).
    orientation
        ``"auto"`` (decided by :func:`detect_orientation`; the choice and its reason are
        logged and stored in ``uns["cpnn_input"]``), ``"genes_x_samples"`` or
        ``"samples_x_genes"``. Ignored for ``.h5ad``.
    require_counts
        Require non-negative integers (raw counts). False accepts any non-negative
        finite values (TPM, FPKM).

    Returns
    -------
    anndata.AnnData
        Samples x genes, ``X`` CSR float32; duplicated genes summed (listed in
        ``uns["cpnn_input"]["duplicated_genes"]``).
    """
    path = require_file(path, "bulk expression table", "check the path.")
    name = path.name.lower()
    if name.endswith(".h5ad"):
        from .spatial_h5ad import read_h5ad_checked

        src = read_h5ad_checked(path)
        mat = src.layers[K.COUNTS] if K.COUNTS in src.layers else src.X
        field = f"layers['{K.COUNTS}']" if K.COUNTS in src.layers else "X"
        df_obs, samples, genes = src.obs.copy(), list(src.obs_names), list(src.var_names)
        chosen, reason = "samples_x_genes", "h5ad (obs = samples)"
    else:
        sep = "," if re.search(r"\.csv(\.gz)?$", name) else "\t"
        df = _read_labelled_table(path, sep)
        if df.shape[1] == 0:
            raise CPNNInputError("table has a single column; wrong separator?", path=path,
                                 fix="use ',' for .csv and tab for .tsv/.txt files.")
        non_num = [c for c, dt in zip(df.columns, df.dtypes) if not pd.api.types.is_numeric_dtype(dt)]
        if non_num:
            raise CPNNInputError(
                f"{len(non_num)} non-numeric column(s), e.g. {non_num[:3]}.", path=path,
                field=str(non_num[0]),
                fix="keep one label column (first) and numeric values only; move annotations "
                "(gene type, description) to another file.",
            )
        if orientation == "auto":
            try:
                chosen, reason = detect_orientation(df)
            except CPNNInputError as exc:
                raise CPNNInputError(exc.problem, path=path, field="orientation", fix=exc.fix) from None
            log.info("%s: read as %s (%s)", path, chosen, reason)
        elif orientation in ("genes_x_samples", "samples_x_genes"):
            chosen, reason = orientation, "given"
        else:
            raise CPNNInputError(f"unknown orientation {orientation!r}.", field="orientation",
                                 fix="use 'auto', 'genes_x_samples' or 'samples_x_genes'.")
        if chosen == "genes_x_samples":
            df = df.T
        mat = df.to_numpy(np.float64)
        field = "values"
        samples, genes = [str(s) for s in df.index], [str(g) for g in df.columns]
        df_obs = pd.DataFrame(index=samples)
    if require_counts:
        X = check_counts(mat, path=path, field=field)
    else:
        X = sparse.csr_matrix(np.asarray(mat.todense() if sparse.issparse(mat) else mat, dtype=np.float64))
        if not np.isfinite(X.data).all() or (X.data < 0).any():
            raise CPNNInputError("values must be finite and non-negative.", path=path, field=field,
                                 fix="provide counts, TPM or FPKM (not log-ratios or z-scores).")
        X = X.astype(np.float32)
    genes, X, dup = dedupe_genes(genes, sparse.csr_matrix(X), how="sum")
    if dup:
        warnings.warn(f"{path.name}: {len(dup)} duplicated gene(s) summed, e.g. {dup[:5]}.", stacklevel=2)
    if not pd.Index(samples).is_unique:
        raise CPNNInputError("sample labels are not unique.", path=path, field="samples",
                             fix="give every sample a unique label.")
    df_obs.index = pd.Index(samples)
    adata = ad.AnnData(X=X, obs=df_obs, var=pd.DataFrame(index=pd.Index(genes)))
    adata.uns[K.UNS_INPUT] = {"platform": "bulk_rnaseq", "orientation": chosen,
                              "orientation_reason": reason, "duplicated_genes": dup,
                              "source_path": str(path), "require_counts": bool(require_counts)}
    return adata


# --------------------------------------------------------------------------- TCGA barcodes
SAMPLE_TYPES = {
    "01": "Primary Solid Tumor", "02": "Recurrent Solid Tumor",
    "03": "Primary Blood Derived Cancer - Peripheral Blood", "04": "Recurrent Blood Derived Cancer - Bone Marrow",
    "05": "Additional - New Primary", "06": "Metastatic", "07": "Additional Metastatic",
    "08": "Human Tumor Original Cells", "09": "Primary Blood Derived Cancer - Bone Marrow",
    "10": "Blood Derived Normal", "11": "Solid Tissue Normal", "12": "Buccal Cell Normal",
    "13": "EBV Immortalized Normal", "14": "Bone Marrow Normal", "20": "Control Analyte",
    "40": "Recurrent Blood Derived Cancer - Peripheral Blood", "50": "Cell Lines",
    "60": "Primary Xenograft Tissue", "61": "Cell Line Derived Xenograft Tissue",
}

_BARCODE = re.compile(
    r"^(?P<project>[A-Z]+)-(?P<tss>[A-Z0-9]{2})-(?P<participant>[A-Z0-9]{4,6})"
    r"(?:-(?P<sample_type>\d{2})(?P<vial>[A-Z])?"
    r"(?:-(?P<portion>\d{2})"
    r"(?:(?P<analyte>[A-Z])(?:-(?P<plate>[A-Z0-9]{4})(?:-(?P<center>\d{2}))?)?"
    r"|-(?P<slide>(?:TS|BS|MS|DX)[0-9A-Z]*))?"
    r")?)?$"
)


@dataclass(frozen=True)
class TCGABarcode:
    """Parts of a TCGA barcode (missing parts are None)."""

    barcode: str
    project: str
    tss: str
    participant: str
    sample_type: Optional[str] = None
    vial: Optional[str] = None
    portion: Optional[str] = None
    analyte: Optional[str] = None
    plate: Optional[str] = None
    center: Optional[str] = None
    slide: Optional[str] = None

    @property
    def patient(self) -> str:
        """``TCGA-CR-7395``."""
        return f"{self.project}-{self.tss}-{self.participant}"

    @property
    def sample(self) -> Optional[str]:
        """``TCGA-CR-7395-01A`` (the GDC "Sample ID"); None when there is no sample part."""
        if self.sample_type is None:
            return None
        return f"{self.patient}-{self.sample_type}{self.vial or ''}"

    @property
    def sample_type_name(self) -> Optional[str]:
        """Human-readable sample type (``"Primary Solid Tumor"``)."""
        return None if self.sample_type is None else SAMPLE_TYPES.get(self.sample_type, "unknown")

    @property
    def is_slide(self) -> bool:
        return self.slide is not None

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(patient=self.patient, sample=self.sample, sample_type_name=self.sample_type_name)
        return d


def _barcode_text(s: str) -> str:
    """Barcode part of a file name: base name, up to the first '.', upper case."""
    return Path(str(s).strip()).name.split(".")[0].upper()


def parse_tcga_barcode(s: str) -> TCGABarcode:
    """Parse a TCGA barcode (or a slide / data file name starting with one).

    ``"TCGA-CR-7395-01A-01-TS1.<uuid>.svs"`` -> patient ``TCGA-CR-7395``, sample
    ``TCGA-CR-7395-01A``, portion ``01``, slide ``TS1``. Case-insensitive.

    Raises
    ------
    CPNNInputError
        If the text is not a TCGA-style barcode.
    """
    text = _barcode_text(s)
    m = _BARCODE.match(text)
    if m is None:
        raise CPNNInputError(
            f"{s!r} is not a TCGA barcode.", field="barcode",
            fix="expected e.g. 'TCGA-CR-7395-01A-01-TS1' or 'TCGA-CR-7395-01A-11R-2016-07'.",
        )
    return TCGABarcode(barcode=text, **m.groupdict())


def patient_id(barcode: str) -> str:
    """Patient (case) id of a barcode: ``TCGA-CR-7395``."""
    return parse_tcga_barcode(barcode).patient


def sample_id(barcode: str) -> str:
    """Sample id of a barcode: ``TCGA-CR-7395-01A`` (raises if it has no sample part)."""
    bc = parse_tcga_barcode(barcode)
    if bc.sample is None:
        raise CPNNInputError(f"{barcode!r} has no sample part.", field="barcode",
                             fix="pass a sample, aliquot or slide barcode, not a patient id.")
    return bc.sample


def _read_match_table(table: pd.DataFrame | os.PathLike | str | Mapping[str, str]) -> dict[str, str]:
    if isinstance(table, Mapping):
        return {str(k): str(v) for k, v in table.items()}
    path = None
    if not isinstance(table, pd.DataFrame):
        path = require_file(table, "slide-to-sample table", "check the path.")
        table = pd.read_csv(path, sep=None, engine="python", dtype=str)
    cols = {c.lower(): c for c in table.columns}
    if "slide" not in cols or "sample" not in cols:
        raise CPNNInputError(f"table needs columns 'slide' and 'sample'; found {list(table.columns)}.",
                             path=path, field="slide,sample", fix="rename the columns.")
    return dict(zip(table[cols["slide"]].astype(str), table[cols["sample"]].astype(str)))


def match_slides_to_samples(
    slide_names: Sequence[str],
    sample_ids: Sequence[str],
    table: Optional[pd.DataFrame | os.PathLike | str | Mapping[str, str]] = None,
) -> pd.DataFrame:
    """Match slide files to bulk samples of the same TCGA sample.

    Parameters
    ----------
    slide_names
        Slide file names or paths (``TCGA-CR-7395-01A-01-TS1.<uuid>.svs``).
    sample_ids
        Bulk sample labels: sample ids (``TCGA-CR-7395-01A``) or aliquot barcodes.
    table
        Optional explicit mapping (DataFrame / CSV / TSV with columns ``slide`` and
        ``sample``, or a dict); it wins over barcode matching for the slides it lists.
        A slide is looked up by its full name, then by its base name.

    Returns
    -------
    pandas.DataFrame
        One row per slide: ``slide``, ``patient``, ``slide_sample``, ``sample`` (the
        matched bulk label or None), ``match`` (``"table"``, ``"sample_vial"``: same
        patient, sample type and vial; ``"sample_type"``: same sample type, other or no
        vial; ``"unmatched"``; ``"unparsed"``) and ``n_candidates``. ``attrs`` hold
        ``unmatched_slides`` and ``unmatched_samples`` (bulk labels no slide matched).
        A warning gives the unmatched counts.
    """
    explicit = _read_match_table(table) if table is not None else {}
    bulk = []
    for s in sample_ids:
        try:
            bc = parse_tcga_barcode(s)
            bulk.append((str(s), bc.patient, bc.sample_type, bc.vial))
        except CPNNInputError:
            bulk.append((str(s), None, None, None))
    bulk_set = {b[0] for b in bulk}
    rows = []
    for name in slide_names:
        name = str(name)
        base = Path(name).name
        row = {"slide": name, "patient": None, "slide_sample": None, "sample": None,
               "match": "unmatched", "n_candidates": 0}
        try:
            bc = parse_tcga_barcode(base)
            row["patient"], row["slide_sample"] = bc.patient, bc.sample
        except CPNNInputError:
            bc = None
        mapped = explicit.get(name, explicit.get(base))
        if mapped is not None:
            if mapped not in bulk_set:
                raise CPNNInputError(f"table maps {base!r} to {mapped!r}, which is not a bulk sample.",
                                     field="sample", fix="fix the table or the sample list.")
            row.update(sample=mapped, match="table", n_candidates=1)
        elif bc is None:
            row["match"] = "unparsed"
        elif bc.sample_type is not None:
            same_type = [b for b in bulk if b[1] == bc.patient and b[2] == bc.sample_type]
            exact = [b for b in same_type if bc.vial is not None and b[3] == bc.vial]
            cands = exact or same_type
            if cands:
                # deterministic choice among re-sequenced aliquots: the lowest label
                row.update(sample=sorted(b[0] for b in cands)[0],
                           match="sample_vial" if exact else "sample_type",
                           n_candidates=len(cands))
        rows.append(row)
    out = pd.DataFrame(rows, columns=["slide", "patient", "slide_sample", "sample", "match", "n_candidates"])
    used = set(out["sample"].dropna())
    out.attrs["unmatched_slides"] = out.loc[out["sample"].isna(), "slide"].tolist()
    out.attrs["unmatched_samples"] = [b[0] for b in bulk if b[0] not in used]
    n_s, n_b = len(out.attrs["unmatched_slides"]), len(out.attrs["unmatched_samples"])
    if n_s or n_b:
        warnings.warn(
            f"{n_s} of {len(out)} slide(s) without a bulk sample "
            f"(e.g. {out.attrs['unmatched_slides'][:3]}); {n_b} of {len(bulk)} bulk sample(s) "
            f"without a slide (e.g. {out.attrs['unmatched_samples'][:3]}).",
            stacklevel=2,
        )
    return out

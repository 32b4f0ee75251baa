"""The :class:`Prototypes` container: a K x G matrix of cell-type expression profiles."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Sequence

import numpy as np
import pandas as pd

from cpnn._constants import PROTOTYPES, UNS
from cpnn.errors import CPNNInputError
from cpnn.utils import atomic_path, write_json

_TABLE_SUFFIXES = {".tsv": "\t", ".txt": "\t", ".csv": ","}


@dataclass
class Prototypes:
    """Cell-type expression prototypes learned from a single-cell reference.

    Values are on one scale for every method: the expected normalised expression of a
    cell of the type, in counts per 10,000 of the cell's total counts over *all* genes
    of the reference (so a prototype sums to about 10,000 before any gene subsetting).

    Attributes
    ----------
    values
        (K, G) float32, strictly positive.
    cell_types
        K type names (row order of ``values``).
    genes
        G gene names (column order of ``values``).
    method
        ``"naive"``, ``"regression"`` or where it came from.
    label_key
        The ``obs`` column the types came from.
    provenance
        How they were made: reference size, cells per type, QC, fit diagnostics.
    """

    values: np.ndarray
    cell_types: List[str]
    genes: List[str]
    method: str = "unknown"
    label_key: str = ""
    provenance: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.values = np.asarray(self.values, dtype=np.float32)
        self.cell_types = [str(c) for c in self.cell_types]
        self.genes = [str(g) for g in self.genes]
        k, g = len(self.cell_types), len(self.genes)
        if self.values.shape != (k, g):
            raise CPNNInputError(
                f"prototype values have shape {self.values.shape}, expected "
                f"({k} cell types, {g} genes).",
                field="values",
                fix="pass values as a (n_cell_types, n_genes) array matching the names.",
            )
        if not np.all(np.isfinite(self.values)) or np.any(self.values <= 0):
            raise CPNNInputError(
                "prototype values must be finite and strictly positive.",
                field="values",
                fix="add a small floor (e.g. 1e-6) to zero entries before building Prototypes.",
            )
        for what, names in (("cell_types", self.cell_types), ("genes", self.genes)):
            dup = pd.Index(names)[pd.Index(names).duplicated()].unique().tolist()
            if dup:
                raise CPNNInputError(
                    f"duplicated {what}: {dup[:5]}.", field=what, fix=f"make {what} unique."
                )

    @property
    def n_types(self) -> int:
        """Number of cell types K."""
        return len(self.cell_types)

    @property
    def n_genes(self) -> int:
        """Number of genes G."""
        return len(self.genes)

    def to_frame(self) -> pd.DataFrame:
        """Genes x types table (a copy)."""
        return pd.DataFrame(self.values.T.copy(), index=pd.Index(self.genes, name="gene"),
                            columns=self.cell_types)

    def subset_genes(self, genes: Sequence[str]) -> "Prototypes":
        """Prototypes restricted to ``genes``, in that order.

        Parameters
        ----------
        genes
            Gene names, all of which must be present.

        Returns
        -------
        Prototypes

        Raises
        ------
        CPNNInputError
            When some genes are missing (the message lists them).
        """
        genes = [str(g) for g in genes]
        pos = {g: i for i, g in enumerate(self.genes)}
        missing = [g for g in genes if g not in pos]
        if missing:
            raise CPNNInputError(
                f"{len(missing)} of {len(genes)} requested genes are not in the prototypes, "
                f"e.g. {missing[:10]}.",
                field="genes",
                fix="intersect first (cpnn.data.genes.match_genes) or rebuild the prototypes "
                "with genes=<your panel>.",
            )
        idx = np.fromiter((pos[g] for g in genes), dtype=np.int64, count=len(genes))
        prov = dict(self.provenance)
        prov["subset_from_n_genes"] = self.n_genes
        return Prototypes(self.values[:, idx], list(self.cell_types), genes, self.method,
                          self.label_key, prov)

    def to_anndata(self):
        """AnnData with ``var`` = genes, ``varm["cpnn_prototypes"]`` (genes x types).

        ``uns["cpnn"]`` holds ``cell_types``, ``method``, ``label_key`` and the provenance
        as a JSON string (``provenance_json``). There are no observations.
        """
        import anndata as ad

        adata = ad.AnnData(obs=pd.DataFrame(index=pd.Index([], dtype=str)),
                           var=pd.DataFrame(index=pd.Index(self.genes)))
        adata.varm[PROTOTYPES] = self.values.T.copy()
        adata.uns[UNS] = {
            "cell_types": np.asarray(self.cell_types, dtype=object),
            "method": self.method,
            "label_key": self.label_key,
            "provenance_json": json.dumps(self.provenance, default=_json_default),
        }
        return adata

    def save(self, path: os.PathLike | str) -> Path:
        """Write to ``.h5ad`` (AnnData, see :meth:`to_anndata`) or a ``.tsv``/``.csv``.

        A table is genes x types with a ``gene`` column; its metadata goes to
        ``<path>.json`` next to it. Writes are atomic.

        Returns
        -------
        pathlib.Path
        """
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix == ".h5ad":
            with atomic_path(path, suffix=".h5ad") as tmp:
                self.to_anndata().write_h5ad(tmp)
        elif suffix in _TABLE_SUFFIXES:
            with atomic_path(path, suffix=suffix) as tmp:
                self.to_frame().to_csv(tmp, sep=_TABLE_SUFFIXES[suffix], float_format="%.8g")
            write_json(str(path) + ".json", {
                "method": self.method,
                "label_key": self.label_key,
                "cell_types": self.cell_types,
                "provenance": self.provenance,
            })
        else:
            raise CPNNInputError(
                f"unsupported prototype file type {suffix!r}.",
                path=path,
                fix="use a .h5ad, .tsv or .csv file name.",
            )
        return path

    @classmethod
    def load(cls, path: os.PathLike | str) -> "Prototypes":
        """Read prototypes written by :meth:`save` (or any genes x types table).

        Parameters
        ----------
        path
            ``.h5ad`` with ``varm["cpnn_prototypes"]``, or a ``.tsv``/``.csv`` whose first
            column is the gene name and other columns the cell types.

        Returns
        -------
        Prototypes
        """
        path = Path(path)
        if not path.exists():
            raise CPNNInputError("file not found.", path=path, fix="check the path.")
        suffix = path.suffix.lower()
        if suffix == ".h5ad":
            import anndata as ad

            adata = ad.read_h5ad(path)
            if PROTOTYPES not in adata.varm:
                raise CPNNInputError(
                    "no prototype matrix in this AnnData.",
                    path=path,
                    field=f"varm['{PROTOTYPES}']",
                    fix="write it with Prototypes.save().",
                )
            meta = dict(adata.uns.get(UNS, {}))
            values = np.asarray(adata.varm[PROTOTYPES]).T
            types = [str(t) for t in meta.get("cell_types", [f"type_{i}" for i in range(values.shape[0])])]
            prov = json.loads(meta.get("provenance_json", "{}"))
            return cls(values, types, list(adata.var_names), str(meta.get("method", "unknown")),
                       str(meta.get("label_key", "")), prov)
        if suffix in _TABLE_SUFFIXES:
            from ..data.tables import read_table

            table = read_table(path, sep=_TABLE_SUFFIXES[suffix], index_col=0, what="prototypes table",
                               keep_duplicate_columns=False)
            bad = [c for c in table.columns if not pd.api.types.is_numeric_dtype(table[c])]
            if bad:
                raise CPNNInputError(
                    f"non-numeric cell-type columns {bad[:5]}.",
                    path=path,
                    fix="the table must be genes x types: first column gene names, then "
                    "one numeric column per cell type.",
                )
            meta: Dict[str, Any] = {}
            side = Path(str(path) + ".json")
            if side.exists():
                meta = json.loads(side.read_text())
            return cls(table.to_numpy(dtype=np.float32).T, [str(c) for c in table.columns],
                       [str(g) for g in table.index], meta.get("method", "unknown"),
                       meta.get("label_key", ""), meta.get("provenance", {}))
        raise CPNNInputError(
            f"unsupported prototype file type {suffix!r}.",
            path=path,
            fix="use a .h5ad, .tsv or .csv file.",
        )


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)

"""Reading delimited tables (plain or gzipped) with clear errors and honest headers.

``pandas.read_csv`` raises ``EOFError`` on a truncated gzip, ``BadGzipFile`` on plain text
named ``.gz``, ``EmptyDataError`` on an empty file, and renames a duplicated column
``X`` to ``X.1`` (so a gene silently disappears). :func:`read_table` turns the first into
a CPNNInputError naming the file and keeps duplicated labels as they are written, so the
readers can sum them with a warning like every other duplicated gene.
"""
from __future__ import annotations

import gzip
import os
import zlib
from typing import Any, List, Optional

import pandas as pd

from cpnn.errors import CPNNInputError

_READ_ERRORS = (EOFError, zlib.error, gzip.BadGzipFile, UnicodeDecodeError, pd.errors.EmptyDataError,
                pd.errors.ParserError, OSError)


def _header(path: os.PathLike | str, sep: str) -> Optional[List[str]]:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as fh:  # type: ignore[operator]
        line = fh.readline().rstrip("\r\n")
    return None if not line else [c.strip().strip('"') for c in line.split(sep)]


def read_table(path: os.PathLike | str, *, sep: str = "\t", what: str = "table", field: Optional[str] = None,
               keep_duplicate_columns: bool = True, **kwargs: Any) -> pd.DataFrame:
    """``pandas.read_csv(path, sep=sep, **kwargs)`` with clear errors; duplicated column
    labels are kept (not renamed ``X.1``).

    Raises
    ------
    CPNNInputError
        Missing, empty, truncated or mis-compressed file (names ``what`` and the file).
    """
    try:
        df = pd.read_csv(path, sep=sep, **kwargs)
        header = _header(path, sep) if kwargs.get("header", "infer") in ("infer", 0) else None
    except FileNotFoundError:
        raise CPNNInputError(f"{what} not found", path=path, field=field, fix="check the path") from None
    except _READ_ERRORS as exc:
        kind = "gzip-compressed text" if str(path).endswith(".gz") else "delimited text"
        raise CPNNInputError(f"{what} is empty, truncated or not {kind} ({type(exc).__name__}: {exc})",
                             path=path, field=field, fix="re-download or re-export the file") from None
    if header is not None and keep_duplicate_columns:
        cols = header[-len(df.columns):] if len(header) >= len(df.columns) else None
        if cols is not None and len(set(cols)) < len(cols) and len(df.columns) == len(cols):
            df.columns = cols  # as written: the caller sums or refuses duplicates
    return df

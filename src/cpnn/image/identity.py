"""The identity of an image, for feature-cache keys.

A cached feature file is reused only when it was made from the same pixels: the key holds
the image file's size and the sha256 of its content (for a multi-file slide such as
``.mrxs``, of its data folder's listing), or the sha256 of an in-memory array. A rotated,
re-scanned or replaced image therefore misses the cache even when its name, its size or
its modification time did not change.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np


def file_identity(path: os.PathLike | str) -> Dict[str, Any]:
    """``{"bytes", "mtime_ns", "sha256"}`` of a file (a folder: of its files' names, sizes and mtimes)."""
    p = Path(path)
    st = p.stat()
    h = hashlib.sha256()
    if p.is_dir():
        for f in sorted(q for q in p.rglob("*") if q.is_file()):
            fs = f.stat()
            h.update(f"{f.relative_to(p).as_posix()}\0{fs.st_size}\0{fs.st_mtime_ns}\n".encode())
    else:
        from ..outputs import file_sha256

        return {"bytes": int(st.st_size), "mtime_ns": int(st.st_mtime_ns), "sha256": file_sha256(p)}
    return {"bytes": int(st.st_size), "mtime_ns": int(st.st_mtime_ns), "sha256": h.hexdigest()}


def slide_identity(slide: Any) -> Optional[str]:
    """A string that changes whenever the slide's pixels may have: ``"<bytes>:<sha256>"`` of
    its file (plus a companion data folder, e.g. MIRAX), or ``"array:<sha256>"`` of an
    in-memory image; None when neither is known. A wrapper that transforms a slide's pixels
    (e.g. stain normalisation, whose settings name the cache file) has its inner slide's."""
    inner = getattr(slide, "_slide", None)
    if inner is not None and inner is not slide:
        return slide_identity(inner)
    path = getattr(slide, "path", None)
    if path:
        p = Path(path)
        if p.exists():
            ident = file_identity(p)
            key = f"{ident['bytes']}:{ident['sha256']}"
            companion = p.with_suffix("")
            if p.is_file() and companion.is_dir():  # MIRAX & co: pixels live in a sibling folder
                key += ":" + file_identity(companion)["sha256"]
            return key
    arr = getattr(slide, "_array", None)
    if arr is not None:
        a = np.ascontiguousarray(arr)
        h = hashlib.sha256(str(a.shape).encode())
        h.update(a.tobytes())
        return f"array:{h.hexdigest()}"
    return None

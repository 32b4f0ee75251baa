"""Small shared helpers: seeding, atomic writes, locating the shared data folder."""
from __future__ import annotations

import contextlib
import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

DATA_ENV = "CPNN_DATA_DIR"


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and (if imported) torch random generators."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a core dependency
        return
    torch.manual_seed(seed)


@contextlib.contextmanager
def atomic_path(path: os.PathLike | str, suffix: Optional[str] = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; move it into place only on success.

    A crash or an exception leaves no half-written file at ``path``. The file gets the
    permissions the umask gives new files (not ``mkstemp``'s 0600); a write that fails
    because the disk is full raises a CPNNInputError saying so.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = suffix if suffix is not None else "".join(path.suffixes) or ".tmp"
    from .outputs import apply_umask, disk_full_error, free_bytes, is_disk_full, MIN_FREE_BYTES

    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=suffix + ".part", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    apply_umask(tmp_path)  # mkstemp makes 0600; a written output should look like any other new file
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except Exception as exc:
        # HDF5 and torch's zip writer word a full disk as a crash ("unexpected pos ...")
        free = free_bytes(path.parent)
        if is_disk_full(exc) or (free is not None and free < MIN_FREE_BYTES):
            raise disk_full_error(path.parent) from exc
        raise
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_json(path: os.PathLike | str, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_path(path, suffix=".json") as tmp:
        with open(tmp, "w") as fh:
            json.dump(obj, fh, indent=2, sort_keys=False, default=_json_default)
            fh.write("\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def find_data_dir(explicit: Optional[os.PathLike | str] = None) -> Optional[Path]:
    """Locate the shared real-data folder.

    Order: ``explicit`` argument, the ``CPNN_DATA_DIR`` environment variable, then
    ``../shared/data`` relative to the current directory and to the package checkout.
    Returns ``None`` when none exists.
    """
    candidates = []
    if explicit is not None:
        candidates.append(Path(explicit))
    if os.environ.get(DATA_ENV):
        candidates.append(Path(os.environ[DATA_ENV]))
    candidates.append(Path.cwd().parent / "shared" / "data")
    here = Path(__file__).resolve()
    # src/cpnn/utils.py -> repo root is parents[2]
    candidates.append(here.parents[2].parent / "shared" / "data")
    for c in candidates:
        if c.is_dir():
            return c
    return None

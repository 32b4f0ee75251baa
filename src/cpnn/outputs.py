"""Where cpnn writes: safe file names from ids, ``--out`` checks, disk space, umask.

Every id that becomes part of a path (a sample id read from an input file, a section id,
a prediction's stem) goes through :func:`safe_stem`, so that no input can make cpnn write
outside the folder it was given. The rule:

- separators (``/``, ``\\``) and every non-printable character (controls, NUL, lone
  surrogates) become ``_``;
- leading dots are dropped (no ``..``, no hidden files), as are surrounding blanks;
- an id that is empty after that is an error; an over-long one is cut and given a short
  hash so it stays unique.

Two inputs whose ids give the same file name (also when they differ only in case, for
case-insensitive file systems) are an error naming both — never a silent overwrite.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Dict, Iterable, Iterator, Optional, Sequence, Tuple

from .errors import CPNNInputError

MAX_STEM = 120  # bytes of UTF-8
# below this much free space a write is refused up front (HDF5 and torch's zip writer
# crash or report nonsense when the disk fills mid-write)
MIN_FREE_BYTES = 16 * 1024 * 1024


def safe_stem(name: object, *, field: str = "sample id", source: Optional[object] = None) -> str:
    """A file-name stem for ``name`` that cannot leave its folder.

    Parameters
    ----------
    name
        The id (sample, section, slide, prediction).
    field
        What the id is, for messages (e.g. ``"uns['cpnn_input']['sample_id']"``).
    source
        The file the id came from, for messages.

    Returns
    -------
    str
        ``name`` itself when it is already safe, else the cleaned stem (with a warning).

    Raises
    ------
    CPNNInputError
        When nothing usable is left (an empty id, only dots or separators).
    """
    raw = str(name)
    stem = "".join(c if c.isprintable() and c not in "/\\" else "_" for c in raw)
    stem = re.sub(r"^[\s.]+", "", stem).strip()  # no leading dot, also behind spaces (". .0")
    if not stem or set(stem) <= {"_", "."}:
        raise CPNNInputError(f"the id {raw!r} cannot be used as a file name", path=source, field=field,
                             fix="give the sample a name made of letters, digits, '-' or '_'")
    if len(stem.encode("utf-8")) > MAX_STEM:  # file systems count bytes (255), suffixes need room
        cut = stem
        while len(cut.encode("utf-8")) > MAX_STEM - 9:
            cut = cut[:-1]
        stem = cut + "-" + hashlib.sha256(raw.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    if stem != raw:
        warnings.warn(f"{field} {raw!r}" + (f" (in {source})" if source else "")
                      + f" is not a safe file name; its output files are named {stem!r}", stacklevel=2)
    return stem


def unique_stems(items: Sequence[Tuple[object, object]], *, field: str = "sample id",
                 fix: str = "give every input a distinct sample id (rename one of the files)") -> Dict[str, str]:
    """Safe stems of ``(id, source)`` pairs, refusing two inputs that would share a file.

    Returns
    -------
    dict
        ``{str(id): stem}``.

    Raises
    ------
    CPNNInputError
        Two ids equal, or giving the same stem (case-insensitively).
    """
    seen: Dict[str, Tuple[object, object]] = {}
    out: Dict[str, str] = {}
    for ident, source in items:
        stem = safe_stem(ident, field=field, source=source)
        key = stem.casefold()
        if key in seen:
            other_id, other_src = seen[key]
            where = f" ({other_src} and {source})" if source is not None and other_src is not None else ""
            raise CPNNInputError(
                f"two inputs share the {field} {str(ident)!r}" + (f" / {str(other_id)!r}" if other_id != ident else "")
                + f"{where}, so their outputs would overwrite each other", field=field, fix=fix)
        seen[key] = (ident, source)
        out[str(ident)] = stem
    return out


def file_sha256(path: os.PathLike | str) -> str:
    """Hex sha256 of a file's content, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def current_umask() -> int:
    """The process umask, read without changing it where the system allows."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)  # no read-only query elsewhere; restored at once
    os.umask(old)
    return old


def apply_umask(path: os.PathLike | str, mode: int = 0o666) -> None:
    """Give ``path`` the permissions a freshly created file would have (``mode & ~umask``)."""
    os.chmod(path, mode & ~current_umask())


def human_bytes(n: float) -> str:
    """``1536`` -> ``'1.5 KiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024.0
    return f"{n:.1f} TiB"  # pragma: no cover


def free_bytes(path: os.PathLike | str) -> Optional[int]:
    """Free bytes on the file system holding ``path`` (its nearest existing parent); None if unknown."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return int(shutil.disk_usage(p).free)
    except OSError:
        return None


def disk_full_error(path: os.PathLike | str, flag: str = "--out") -> CPNNInputError:
    """The error for a write that ran out of space at ``path``."""
    free = free_bytes(path)
    return CPNNInputError(f"disk full at {path}, free space {human_bytes(free) if free is not None else 'unknown'}",
                          field=flag, fix=f"free some space on that disk, or give {flag} on another disk")


def check_free_space(path: os.PathLike | str, need_bytes: int = 0, flag: str = "--out") -> None:
    """Refuse to start writing under ``path`` when less than ``need_bytes`` (at least
    :data:`MIN_FREE_BYTES`) is free."""
    free = free_bytes(path)
    if free is not None and free < max(int(need_bytes), MIN_FREE_BYTES):
        raise disk_full_error(path, flag)


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it wraps) is a no-space-left error, also as HDF5 or torch word it."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
            return True
        text = str(exc)
        if "No space left" in text or "errno = 28" in text or "Disk quota exceeded" in text:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def check_writable_dir(folder: os.PathLike | str, flag: str = "--out") -> None:
    """Refuse a folder cpnn could not write into (read-only, not a folder), before any work.

    The nearest existing parent of ``folder`` is probed with a real file, so read-only
    mounts and permission bits are both caught."""
    p = Path(folder).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    if not p.is_dir():
        raise CPNNInputError("is a file, not a folder", path=p, field=flag,
                             fix=f"give {flag} a folder path (or remove the file)")
    probe = p / f".cpnn-write-test.{os.getpid()}"
    try:
        with open(probe, "wb"):
            pass
    except OSError as exc:
        if is_disk_full(exc):
            raise disk_full_error(p, flag) from None
        raise CPNNInputError(f"cannot write here ({exc.strerror or exc})", path=p, field=flag,
                             fix=f"give {flag} a folder you can write to") from None
    finally:
        try:
            probe.unlink()
        except OSError:
            pass


def check_out_folder(out: os.PathLike | str, flag: str = "--out") -> Path:
    """``--out`` that must be a folder: not an existing file, writable."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CPNNInputError("exists and is a file, not a folder", path=out, field=flag,
                             fix=f"give {flag} a new or existing folder (this file is left alone)")
    check_writable_dir(out, flag)
    return out


def is_h5ad(path: os.PathLike | str) -> bool:
    """Whether ``path`` is an HDF5 file (the container of ``.h5ad``)."""
    try:
        with open(path, "rb") as fh:
            return fh.read(8) == b"\x89HDF\r\n\x1a\n"
    except OSError:
        return False


def check_out_file(out: os.PathLike | str, suffixes: Iterable[str] = (".h5ad",), flag: str = "--out") -> Path:
    """``--out`` that will be one file: refuse an existing folder or an unrelated existing file.

    An existing file is replaced only when it is of the kind cpnn writes there (an HDF5
    file with one of ``suffixes``)."""
    out = Path(out)
    suffixes = tuple(suffixes)
    if out.is_dir():
        raise CPNNInputError("is an existing folder, but one output file is written", path=out, field=flag,
                             fix=f"give {flag} a file name, e.g. {flag} {out / ('prediction' + suffixes[0])}")
    if out.exists() and not (out.suffix.lower() in suffixes and is_h5ad(out)):
        raise CPNNInputError(f"exists and is not a {'/'.join(suffixes)} file cpnn wrote; it is not replaced",
                             path=out, field=flag,
                             fix=f"give {flag} a new file name ending in {suffixes[0]}, or remove that file yourself")
    check_writable_dir(out.parent, flag)
    return out


class FolderLock:
    """An exclusive ``fcntl.flock`` on ``folder/name``, held while a command writes there.

    The kernel drops the lock when the process dies (also on ``kill -9``), so a stale lock
    file never blocks a later run. Where ``fcntl`` is missing (Windows) it is a no-op."""

    def __init__(self, folder: os.PathLike | str, name: str, what: str, flag: str = "--out") -> None:
        self.path = Path(folder) / name
        self.what = what
        self.flag = flag
        self._fh = None

    def __enter__(self) -> "FolderLock":
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            return self
        fh = open(self.path, "a+")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            raise CPNNInputError(f"{self.what} is already writing into this folder ({holder})",
                                 path=self.path.parent, field=self.flag,
                                 fix=f"wait for it to finish, or give {self.flag} another folder") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}\n")
        fh.flush()
        self._fh = fh
        return self

    def __exit__(self, *exc) -> None:
        if self._fh is not None:
            self._fh.close()  # closing releases the lock
            self._fh = None


@contextlib.contextmanager
def record_lock(lock_file: os.PathLike | str, key: str, what: str, flag: str = "--out") -> Iterator[None]:
    """Hold an exclusive POSIX record lock on one byte of ``lock_file`` chosen by ``key``
    (one lock file serves any number of keys, e.g. one per slide); a CPNNInputError when
    another process holds it. Released by the kernel when the process dies."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    offset = int.from_bytes(hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()[:4], "big") >> 1
    with open(lock_file, "a+") as fh:
        try:
            fcntl.lockf(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB, 1, offset)
        except OSError:
            raise CPNNInputError(f"another process is {what} right now", path=Path(lock_file).parent, field=flag,
                                 fix="let it finish, then rerun this command to pick up what is left") from None
        try:
            yield
        finally:
            fcntl.lockf(fh.fileno(), fcntl.LOCK_UN, 1, offset)

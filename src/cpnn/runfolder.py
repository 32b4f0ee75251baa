"""Run folders that are never half old, half new, and feature caches that can always be placed.

``cpnn fit --out RUN`` builds the whole run in a temporary sibling (``.RUN.partial-<pid>-*``)
and swaps it in only when everything is written: with ``renameat2(RENAME_EXCHANGE)`` on
Linux the old and the new folder trade places in one step, elsewhere the old one is moved
aside first. A failure, Ctrl-C or ``kill -9`` therefore leaves the previous run intact
(plus a leftover ``.partial`` sibling that the next run removes). The feature cache of the
previous run is hard-linked into the new one, so a re-fit does not re-extract, and so is
anything else the user kept in the folder (figures, predictions): nothing is lost.

Every run folder gets ``manifest.json``: the run's files with their size and sha256;
``predict`` refuses a folder whose files no longer match it.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, Iterator, Optional

from .errors import CPNNInputError
from .outputs import file_sha256 as _sha256

MANIFEST = "manifest.json"
CACHE_DIR = "features"  # a run's feature cache: not part of the manifest (predict adds to it)
RUN_MARKERS = ("model.cpnn", "config.json", MANIFEST)
# what `cpnn fit` writes at the top of a run folder; anything else there is the user's
FIT_WRITES = ("model.cpnn", "prototypes.h5ad", "config.json", "metrics.json", MANIFEST)
CACHE_ENV = "CPNN_CACHE_DIR"


def is_run_folder(path: Path) -> bool:
    """Whether ``path`` looks like a folder ``cpnn fit`` wrote."""
    return path.is_dir() and any((path / m).is_file() for m in RUN_MARKERS)


def check_run_target(out: os.PathLike | str, flag: str = "--out") -> Path:
    """Refuse an ``--out`` that fit must not replace: an existing file, or a non-empty
    folder that is not a cpnn run (it would be swapped away); also an unwritable place."""
    from .outputs import check_writable_dir

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CPNNInputError("exists and is a file, not a run folder", path=out, field=flag,
                             fix=f"give {flag} a new folder name (this file is left alone)")
    if out.is_dir() and not is_run_folder(out) and any(out.iterdir()):
        raise CPNNInputError("is a non-empty folder that is not a cpnn run folder; it is not replaced",
                             path=out, field=flag, fix=f"give {flag} a new folder name, e.g. {flag} {out / 'run'}")
    check_writable_dir(out.parent if not out.exists() else out, flag)
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_partials(out: Path) -> None:
    """Leftovers of runs killed before their swap (their process is gone)."""
    for p in out.parent.glob(f".{out.name}.partial-*"):
        try:
            pid = int(p.name[len(f".{out.name}.partial-"):].split("-")[0])
        except ValueError:
            continue
        if not _pid_alive(pid):
            shutil.rmtree(p, ignore_errors=True)


def _carry_cache(old: Path, new: Path) -> None:
    """Hard-link (else copy) the old run's cached features into the new run."""
    src = old / CACHE_DIR
    if not src.is_dir():
        return
    dst = new / CACHE_DIR
    dst.mkdir(exist_ok=True)
    for f in src.iterdir():
        if not f.is_file() or f.name.endswith(".part"):
            continue
        try:
            os.link(f, dst / f.name)  # cache files are replaced, never edited in place: sharing is safe
        except OSError:
            try:
                shutil.copy2(f, dst / f.name)
            except OSError:
                pass  # a cache: recomputed when missing


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _carry_other_files(old: Path, new: Path) -> None:
    """Files the user put into the old run folder (figures, predictions) move on with it:
    the swap must not delete what fit did not write."""
    for entry in old.iterdir():
        if entry.name in FIT_WRITES or entry.name == CACHE_DIR or entry.name.endswith(".part"):
            continue
        target = new / entry.name
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, target, symlinks=True, copy_function=_link_or_copy)
        else:
            try:
                _link_or_copy(str(entry), str(target))
            except OSError:
                if entry.is_symlink():
                    os.symlink(os.readlink(entry), target)
                else:
                    raise


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2``); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    rc = fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    return rc == 0


def swap_in(staged: Path, out: Path) -> None:
    """Put the finished ``staged`` folder at ``out``; the old ``out`` (if any) is removed after."""
    if not out.exists():
        os.rename(staged, out)
        return
    if _exchange(staged, out):
        shutil.rmtree(staged, ignore_errors=True)  # now holds the old run
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.rmdir(aside)
    os.rename(out, aside)
    os.rename(staged, out)
    shutil.rmtree(aside, ignore_errors=True)


def write_manifest(run: Path) -> Dict[str, Dict[str, object]]:
    """Write ``manifest.json`` listing the files fit wrote (not the feature cache, not the
    user's own files) with size and sha256."""
    from . import __version__
    from .utils import write_json

    files = {}
    for name in FIT_WRITES:  # the user's own files in the folder are theirs to change
        f = run / name
        if name != MANIFEST and f.is_file():
            files[name] = {"bytes": f.stat().st_size, "sha256": _sha256(f)}
    write_json(run / MANIFEST, {"cpnn_version": __version__, "files": files,
                                "cache": f"{CACHE_DIR}/ (cached patch features; not listed, safe to delete)"})
    return files


@contextlib.contextmanager
def staged_run_folder(out: os.PathLike | str, flag: str = "--out") -> Iterator[Path]:
    """Yield a temporary sibling of ``out`` to write a run into; swap it in on success.

    Raises
    ------
    CPNNInputError
        Before anything is written, when ``out`` is a file, a non-empty folder that is not
        a run, or not writable.
    """
    from .outputs import apply_umask

    out = Path(os.path.abspath(out))  # "." or "run/" still name a folder with a parent
    check_run_target(out, flag)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(out)
    staged = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent))
    apply_umask(staged, 0o777)
    try:
        if out.is_dir():
            _carry_cache(out, staged)
            _carry_other_files(out, staged)
        yield staged
        write_manifest(staged)
        swap_in(staged, out)
    finally:
        if staged.exists():
            shutil.rmtree(staged, ignore_errors=True)


def verify_run_folder(run: os.PathLike | str) -> None:
    """Refuse a run folder whose files differ from its manifest, or (older runs without
    one) whose ``config.json`` describes another model than ``model.cpnn`` holds."""
    run = Path(run)
    if not run.is_dir():
        return
    manifest = run / MANIFEST
    if manifest.is_file():
        try:
            files = json.loads(manifest.read_text())["files"]
        except (OSError, ValueError, KeyError, TypeError):
            raise CPNNInputError("the run's manifest is unreadable", path=manifest,
                                 fix="re-run `cpnn fit` into this folder") from None
        for rel, info in files.items():
            f = run / rel
            if not f.is_file() or f.stat().st_size != info.get("bytes") or _sha256(f) != info.get("sha256"):
                raise CPNNInputError(f"{rel} is missing or differs from what `cpnn fit` wrote (manifest.json): "
                                     "the run folder is incomplete or mixed", path=run, field=rel,
                                     fix="re-run `cpnn fit` into this folder")


def check_config_matches(run: os.PathLike | str, model) -> None:
    """A manifest-less (older) run: ``config.json``'s genes and cell types must be the model's."""
    run = Path(run)
    cfg = run / "config.json"
    if not run.is_dir() or (run / MANIFEST).is_file() or not cfg.is_file():
        return
    try:
        used = json.loads(cfg.read_text()).get("used") or {}
    except (OSError, ValueError, AttributeError):
        return
    for key, have in (("genes", list(model.genes)), ("cell_types", list(model.cell_types))):
        if key in used and list(used[key]) != have:
            raise CPNNInputError(f"config.json lists {len(used[key])} {key.replace('_', ' ')}, model.cpnn has "
                                 f"{len(have)}: the run folder mixes two runs", path=run, field=key,
                                 fix="re-run `cpnn fit` into this folder (or a new one)")


def user_cache_dir() -> Path:
    """``$CPNN_CACHE_DIR``, else ``$XDG_CACHE_HOME/cpnn``, else ``~/.cache/cpnn``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "cpnn"


def _writable(folder: Path) -> bool:
    p = folder
    while not p.exists() and p != p.parent:
        p = p.parent
    return p.is_dir() and os.access(p, os.W_OK | os.X_OK)


def prediction_cache_dir(run: os.PathLike | str) -> Optional[Path]:
    """Where ``predict`` caches features: the run's ``features/``; for a run in a read-only
    place, the user cache (a folder per run); None (no cache) when neither is writable."""
    run = Path(run)
    base = run if run.is_dir() else run.parent
    here = base / CACHE_DIR
    if _writable(here):
        return here
    key = hashlib.sha256(os.fsencode(base.resolve())).hexdigest()[:16]
    user = user_cache_dir() / "features" / f"{base.name}-{key}"
    return user if _writable(user) else None

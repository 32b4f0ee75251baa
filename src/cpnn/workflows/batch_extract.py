"""Sharded, resumable tile-feature extraction over many slides (``cpnn extract``).

Made for thousands of slides split over cluster array jobs or several worker processes:

- the slide list (paths, globs or job-list files) is sorted, and shard ``i`` of ``n`` takes
  slides ``i, i + n, i + 2n, ...`` — every worker computes the same split on its own;
- one slide is handled by one worker process from start to end (a process pool with the
  ``spawn`` start method; the encoder is loaded once per process);
- each slide writes ``OUT/{stem}.h5`` atomically (via :func:`extract_tile_features`) and
  then a completion marker ``OUT/{stem}.done.json`` (settings, tile count, checksum);
  a slide with a marker that matches the settings is skipped without opening it, so a
  killed run restarted with the same command finishes only what was left;
- a slide that fails is recorded with its clear error in ``OUT/failed*.json`` and does not
  stop the others; a summary is returned, printed and written to ``OUT/summary*.json``.
"""
from __future__ import annotations

import glob
import importlib
import os
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from ..errors import CPNNInputError
from ..utils import write_json

LIST_SUFFIXES = {".txt", ".csv", ".tsv", ".lst"}
MARKER_SUFFIX = ".done.json"
SLIDE_LOCKS = ".cpnn-extract.slides.lock"  # one byte-range lock per slide being extracted


@dataclass
class ExtractSettings:
    """What every slide's extraction uses (saved in each completion marker).

    Parameters
    ----------
    encoder
        Registered encoder name (``cpnn.encoders.list_encoders()``).
    tile_px, target_mpp
        Tile side in pixels at ``target_mpp`` microns per pixel.
    min_tissue
        Minimum tissue fraction of a tile (0 keeps every tile).
    mpp
        Microns per level-0 pixel for slides whose metadata lack it (a job list may give
        one per slide, which wins); None = read it from each slide's metadata.
    batch_size
        Tiles per forward pass.
    tta
        Test-time augmentation (``"none"``, ``"flips"``, ``"flips8"``).
    device
        Torch device of the encoder.
    plugins
        Modules imported in every worker before the encoder is created (to register
        custom encoders with ``cpnn.encoders.register_encoder``).
    """

    encoder: str = "efficientnet-lite0"
    tile_px: int = 256
    target_mpp: float = 0.5
    min_tissue: float = 0.25
    mpp: Optional[float] = None
    batch_size: int = 32
    tta: str = "none"
    device: str = "cpu"
    plugins: Tuple[str, ...] = field(default_factory=tuple)

    def identity(self) -> Dict[str, Any]:
        """The settings that change the features (a marker must match them to be reused)."""
        return {"encoder": self.encoder, "tile_px": int(self.tile_px), "target_mpp": float(self.target_mpp),
                "min_tissue": float(self.min_tissue), "tta": self.tta}


@dataclass
class SlideJob:
    """One slide to extract: its file, optional mpp override and output paths."""

    path: Path
    mpp: Optional[float] = None

    @property
    def stem(self) -> str:
        name = self.path.name
        return name[: -len(self.path.suffix)] if self.path.suffix else name


# ---------------------------------------------------------------------------- slide lists
def _read_job_list(path: Path) -> List[SlideJob]:
    jobs = []
    for lineno, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = [p.strip() for p in line.replace("\t", ",").split(",")]
        if lineno == 1 and parts[0].lower() in ("path", "slide", "slide_path"):
            continue  # a header
        p = Path(parts[0]).expanduser()
        if not p.is_absolute():
            p = path.parent / p
        mpp = None
        if len(parts) > 1 and parts[1]:
            from ..data._validate import check_mpp

            try:
                mpp = float(parts[1])
            except ValueError:
                raise CPNNInputError(f"line {lineno}: mpp {parts[1]!r} is not a number", path=path, field="mpp",
                                     fix="write 'slide_path,mpp' with mpp in microns per pixel, or leave it out"
                                     ) from None
            mpp = check_mpp(mpp, path=path, field=f"mpp (line {lineno})")
        jobs.append(SlideJob(p, mpp))
    return jobs


def resolve_slides(specs: Sequence[os.PathLike | str]) -> List[SlideJob]:
    """Expand slide paths, glob patterns and job-list files into a sorted, unique list.

    Parameters
    ----------
    specs
        Each item is a slide file, a glob pattern (``"/data/*.svs"``, ``**`` allowed) or a
        job list (``.txt``/``.csv``/``.tsv``: one ``path[,mpp]`` per line, ``#`` comments,
        paths relative to the list's folder).

    Returns
    -------
    list of SlideJob
        Sorted by absolute path, so every worker derives the same shards.

    Raises
    ------
    CPNNInputError
        A pattern that matches nothing, a missing file, or two slides whose file names
        would write the same output.
    """
    jobs: Dict[Path, SlideJob] = {}
    for spec in specs:
        s = os.fspath(spec)
        p = Path(s).expanduser()
        if p.is_file() and p.suffix.lower() in LIST_SUFFIXES:
            found = _read_job_list(p)
        elif glob.has_magic(s):
            found = [SlideJob(Path(m)) for m in glob.glob(s, recursive=True) if Path(m).is_file()]
            if not found:
                raise CPNNInputError("glob pattern matches no file", path=s, field="--slides",
                                     fix="check the pattern (quote it so the shell does not expand it)")
        else:
            found = [SlideJob(p)]
        for job in found:
            job.path = job.path.resolve()
            if not job.path.exists():
                raise CPNNInputError("slide file not found", path=job.path, field="--slides",
                                     fix="fix the path or remove it from the list")
            jobs[job.path] = job
    ordered = [jobs[k] for k in sorted(jobs)]
    seen: Dict[str, Path] = {}
    for job in ordered:
        if job.stem in seen:
            raise CPNNInputError(f"two slides share the file name {job.stem!r} ({seen[job.stem]} and {job.path}), "
                                 "so their outputs would collide", path=job.path, field="--slides",
                                 fix="rename one, or extract the two folders into different --out folders")
        seen[job.stem] = job.path
    return ordered


def parse_shard(text: str) -> Tuple[int, int]:
    """``"i/n"`` -> ``(i, n)`` with ``0 <= i < n`` (shards are numbered from 0)."""
    try:
        i_s, n_s = str(text).split("/")
        i, n = int(i_s), int(n_s)
    except ValueError:
        raise CPNNInputError(f"shard {text!r} is not of the form i/n", field="--shard",
                             fix="pass e.g. --shard 0/8 (shards are numbered 0..n-1; with SLURM arrays "
                                 "--shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT)") from None
    if n < 1 or not 0 <= i < n:
        raise CPNNInputError(f"shard {text!r} is out of range: need 0 <= i < n", field="--shard",
                             fix="shards are numbered from 0: the last of 8 is 7/8")
    return i, n


def shard_slides(jobs: Sequence[SlideJob], index: int, count: int) -> List[SlideJob]:
    """Slides ``index, index + count, ...`` of the sorted list (round-robin balances sizes)."""
    return list(jobs[index::count])


# ---------------------------------------------------------------------------- per slide
def output_paths(out_dir: Path, job: SlideJob) -> Tuple[Path, Path]:
    """``(features .h5, completion marker)`` of a slide."""
    return out_dir / f"{job.stem}.h5", out_dir / f"{job.stem}{MARKER_SUFFIX}"


def _sha256(path: Path) -> str:
    from ..outputs import file_sha256

    return file_sha256(path)


def _source_stamp(path: Path) -> Dict[str, Any]:
    st = path.stat()
    return {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def is_done(out_dir: Path, job: SlideJob, settings: ExtractSettings) -> bool:
    """Whether the slide has a completion marker for these settings and its file is intact."""
    import json

    h5, marker = output_paths(out_dir, job)
    if not (marker.is_file() and h5.is_file()):
        return False
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return (info.get("settings") == settings.identity() and info.get("h5_bytes") == h5.stat().st_size
            and info.get("source") == _source_stamp(job.path)
            and info.get("mpp_override") == (job.mpp if job.mpp is not None else settings.mpp)
            and info.get("h5_sha256") == _sha256(h5))  # a corrupted file of the right size is redone


_WORKER_ENCODERS: Dict[Tuple[str, str], Any] = {}


def die_with_parent() -> None:
    """Make this (worker) process end when its parent dies, even by ``kill -9``: Linux's
    ``PR_SET_PDEATHSIG``, elsewhere a thread that watches the parent's pid."""
    parent = os.getppid()
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        if libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0) == 0:
            if os.getppid() != parent:  # the parent died before the call
                os._exit(1)
            return
    except (OSError, AttributeError):
        pass
    import threading

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="cpnn-parent-watch", daemon=True).start()


def _init_worker(threads: int, plugins: Sequence[str], die_with_parent_: bool = False) -> None:
    if die_with_parent_:
        die_with_parent()
    import torch

    torch.set_num_threads(max(1, int(threads)))
    for name in plugins:
        importlib.import_module(name)


def _encoder(settings: ExtractSettings):
    key = (settings.encoder, settings.device)
    if key not in _WORKER_ENCODERS:
        from ..encoders import create_encoder

        _WORKER_ENCODERS[key] = create_encoder(settings.encoder, device=settings.device)
    return _WORKER_ENCODERS[key]


def _clean_partials(out_dir: Path, stem: str) -> None:
    # temporary files of an earlier attempt at this slide that was killed (atomic_path names
    # them ".{stem}.*.part"); this shard owns the slide, so nobody else is writing them
    for part in out_dir.glob(f".{glob.escape(stem)}.*.part"):
        try:
            part.unlink()
        except OSError:
            pass


def extract_one(job: SlideJob, out_dir: Path, settings: ExtractSettings) -> Dict[str, Any]:
    """Extract one slide and write its marker; errors are returned, not raised.

    Returns
    -------
    dict
        ``slide``, ``status`` (``"done"``/``"failed"``), and ``n_tiles``, ``seconds`` or
        ``error``, ``error_type``, ``traceback``.
    """
    from ..encoders import extract_tile_features
    from ..image import open_slide

    t0 = time.perf_counter()
    h5, marker = output_paths(out_dir, job)
    mpp = job.mpp if job.mpp is not None else settings.mpp
    try:
        from ..outputs import check_free_space, record_lock

        check_free_space(out_dir)  # HDF5 crashes (SIGSEGV) instead of reporting a full disk
        # runs with other shard layouts may share the folder: one slide, one writer
        with record_lock(out_dir / SLIDE_LOCKS, job.stem, f"extracting {job.path.name}"):
            _clean_partials(out_dir, job.stem)
            with open_slide(job.path, mpp=mpp) as slide:
                ff = extract_tile_features(slide, h5, _encoder(settings), tile_px=settings.tile_px,
                                           target_mpp=settings.target_mpp, batch_size=settings.batch_size,
                                           tta=settings.tta, progress=False, min_tissue=settings.min_tissue)
                level0_mpp = float(slide.mpp)
            info = {"slide": str(job.path), "source": _source_stamp(job.path), "settings": settings.identity(),
                    "mpp_override": mpp, "level0_mpp": level0_mpp, "n_tiles": int(len(ff.features)),
                    "dim": int(ff.features.shape[1]), "h5": h5.name, "h5_bytes": h5.stat().st_size,
                    "h5_sha256": _sha256(h5), "seconds": round(time.perf_counter() - t0, 3)}
            write_json(marker, info)
        return {"slide": str(job.path), "status": "done", "n_tiles": info["n_tiles"], "seconds": info["seconds"]}
    except Exception as exc:  # noqa: BLE001 - one bad slide must not stop the others
        from ..outputs import disk_full_error, is_disk_full

        if is_disk_full(exc):
            exc = disk_full_error(out_dir)
        clear = isinstance(exc, CPNNInputError)
        return {"slide": str(job.path), "status": "failed", "error_type": type(exc).__name__,
                "error": str(exc) if clear else f"unexpected {type(exc).__name__} while extracting: {exc}",
                "traceback": None if clear else traceback.format_exc(limit=-6),
                "seconds": round(time.perf_counter() - t0, 3)}


# ---------------------------------------------------------------------------- the run
def _shard_suffix(shard: Tuple[int, int]) -> str:
    return "" if shard[1] == 1 else f".shard{shard[0]}-of-{shard[1]}"


def extract_slides(
    slides: Sequence[os.PathLike | str] | Sequence[SlideJob],
    out_dir: os.PathLike | str,
    settings: Optional[ExtractSettings] = None,
    shard: Tuple[int, int] = (0, 1),
    workers: int = 1,
    threads_per_worker: Optional[int] = None,
    log: Optional[Callable[[str], None]] = print,
) -> Dict[str, Any]:
    """Extract tile features of this shard's slides, skipping those already done.

    Parameters
    ----------
    slides
        Paths, glob patterns or job lists (see :func:`resolve_slides`), or SlideJobs.
    out_dir
        Output folder: ``{stem}.h5``, ``{stem}.done.json``, ``failed*.json``, ``summary*.json``.
    settings
        Encoder and tiling settings.
    shard
        ``(i, n)``: this worker's shard.
    workers
        Worker processes, one slide each at a time (``0`` runs in this process).
    threads_per_worker
        Torch threads per worker (default: CPU count // workers).
    log
        Called with one line per slide (None: silent).

    Returns
    -------
    dict
        ``done``, ``skipped``, ``failed`` (lists of results), ``n_slides``, ``shard``, ``seconds``.
    """
    from ..outputs import FolderLock, check_out_folder

    settings = settings or ExtractSettings()
    out_dir = check_out_folder(out_dir)  # an existing file or a read-only place: refused before any work
    jobs = slides if slides and isinstance(slides[0], SlideJob) else resolve_slides(slides)  # type: ignore[index]
    out_dir.mkdir(parents=True, exist_ok=True)
    # one run per shard and folder: a second would delete the first one's .part files
    with FolderLock(out_dir, f".cpnn-extract{_shard_suffix(shard)}.lock", "another `cpnn extract` of this shard"):
        return _extract_locked(jobs, out_dir, settings, shard, workers, threads_per_worker, log)


def _extract_locked(jobs: Sequence[SlideJob], out_dir: Path, settings: ExtractSettings, shard: Tuple[int, int],
                    workers: int, threads_per_worker: Optional[int], log) -> Dict[str, Any]:
    mine = shard_slides(jobs, *shard)
    t0 = time.perf_counter()
    say = log or (lambda _msg: None)
    done_before = [is_done(out_dir, j, settings) for j in mine]  # hashes each finished file once
    skipped = [{"slide": str(j.path), "status": "skipped"} for j, d in zip(mine, done_before) if d]
    todo = [j for j, d in zip(mine, done_before) if not d]
    say(f"shard {shard[0]}/{shard[1]}: {len(mine)} of {len(jobs)} slides; {len(skipped)} already done, "
        f"{len(todo)} to extract")
    results: List[Dict[str, Any]] = []

    def record(res: Dict[str, Any]) -> None:
        results.append(res)
        k = len(results)
        if res["status"] == "done":
            say(f"[{k}/{len(todo)}] {Path(res['slide']).name}: {res['n_tiles']} tiles in {res['seconds']:.1f} s")
        else:
            say(f"[{k}/{len(todo)}] {Path(res['slide']).name}: FAILED: {res['error']}")

    threads = threads_per_worker or max(1, (os.cpu_count() or 1) // max(1, workers))
    if workers <= 0:
        _init_worker(threads, settings.plugins)
        for job in todo:
            record(extract_one(job, out_dir, settings))
    elif todo:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        with ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=ctx, initializer=_init_worker,
                                 initargs=(threads, tuple(settings.plugins), True)) as pool:
            futures = {pool.submit(extract_one, job, out_dir, settings): job for job in todo}
            for fut in as_completed(futures):
                job = futures[fut]
                try:
                    record(fut.result())
                except BrokenProcessPool as exc:
                    from ..outputs import MIN_FREE_BYTES, disk_full_error, free_bytes

                    free = free_bytes(out_dir)
                    why = (str(disk_full_error(out_dir)) if free is not None and free < MIN_FREE_BYTES
                           else "out of memory or a crash in a native library")
                    record({"slide": str(job.path), "status": "failed", "error_type": "BrokenProcessPool",
                            "error": f"the worker process died while extracting this slide or another ({exc}); "
                                     + why, "traceback": None})
    done = [r for r in results if r["status"] == "done"]
    failed = [r for r in results if r["status"] == "failed"]
    suffix = _shard_suffix(shard)
    failed_path = out_dir / f"failed{suffix}.json"
    if failed:
        write_json(failed_path, {"shard": list(shard), "failed": failed})
    elif failed_path.exists():
        failed_path.unlink()  # an earlier run's failures are fixed now
    summary = {"shard": list(shard), "n_slides": len(mine), "done": done, "skipped": skipped, "failed": failed,
               "settings": asdict(settings), "seconds": round(time.perf_counter() - t0, 3)}
    write_json(out_dir / f"summary{suffix}.json", summary)
    say(f"shard {shard[0]}/{shard[1]}: {len(done)} extracted, {len(skipped)} skipped, {len(failed)} failed "
        f"in {summary['seconds']:.1f} s" + (f"; see {failed_path}" if failed else ""))
    return summary

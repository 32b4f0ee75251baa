"""Batched, resumable feature extraction: patches -> encoder -> feature file.

Decoding (JPEG/OpenSlide reads, Lanczos resampling) runs in background threads while the
encoder runs its forward pass: PIL, OpenSlide and torch release the GIL, so the two
overlap. Output files are streamed into a temporary HDF5 file and renamed when complete;
an existing complete file made with the same settings is read back instead of recomputed.
"""
from __future__ import annotations

import collections
import os
import queue
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence

import h5py
import numpy as np

from cpnn.errors import CPNNInputError
from cpnn.encoders.features import (
    FeatureFile,
    _check_finite,
    _write_layout,
    read_feature_attrs,
    read_feature_file,
    validate_coords,
    validate_ids,
)
from cpnn.encoders.registry import TTA_VIEWS, Encoder
from cpnn.utils import atomic_path

_END = object()


def _prefetch(iterable: Iterable[Any], depth: int = 2) -> Iterator[Any]:
    """Iterate ``iterable`` in a background thread, up to ``depth`` items ahead."""
    q: "queue.Queue[Any]" = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in iterable:
                if not put((True, item)):
                    return
        except BaseException as exc:  # handed to the consumer, re-raised there
            put((False, exc))
            return
        put((True, _END))

    thread = threading.Thread(target=work, name="cpnn-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            ok, item = q.get()
            if not ok:
                raise item
            if item is _END:
                return
            yield item
    finally:
        stop.set()
        thread.join()


def _ordered_map(fn: Callable[[Any], Any], items: Iterable[Any], num_workers: int) -> Iterator[Any]:
    """``map(fn, items)`` on ``num_workers`` threads, in order, a few items ahead.

    ``num_workers=0`` runs in the calling thread (no overlap).
    """
    if num_workers <= 0:
        for item in items:
            yield fn(item)
        return
    it = iter(items)
    pending: "collections.deque" = collections.deque()
    with ThreadPoolExecutor(max_workers=num_workers, thread_name_prefix="cpnn-decode") as ex:
        try:
            for _ in range(num_workers + 1):
                item = next(it, _END)
                if item is _END:
                    break
                pending.append(ex.submit(fn, item))
            while pending:
                result = pending.popleft().result()
                item = next(it, _END)
                if item is not _END:
                    # queue the next decode before handing this batch to the encoder
                    pending.append(ex.submit(fn, item))
                yield result
        finally:
            for fut in pending:
                fut.cancel()


def _progress(progress: bool, total: Optional[int], desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="patch", desc=desc, disable=not progress, dynamic_ncols=True)


def _check_tta(tta: str) -> str:
    if tta not in TTA_VIEWS:
        raise CPNNInputError(f"unknown test-time augmentation {tta!r}.", field="tta",
                             fix=f"use one of {sorted(TTA_VIEWS)}.")
    return tta


def encode_batches(batches: Iterable[Any], encoder: Encoder, progress: bool = True,
                   total: Optional[int] = None, tta: str = "none",
                   prefetch: bool = True) -> np.ndarray:
    """Encode an iterable of uint8 patch batches into one feature matrix.

    Parameters
    ----------
    batches
        Iterable of uint8 (B, H, W, 3) arrays/tensors, e.g. ``cpnn.image.spot_patches(...)``.
    encoder
        From :func:`create_encoder`.
    progress
        Show a tqdm progress bar (in patches).
    total
        Total number of patches, for the progress bar.
    tta
        ``"none"``, ``"flips"`` or ``"flips8"`` (see :meth:`Encoder.encode`).
    prefetch
        Produce the next batch in a background thread while the current one is encoded.

    Returns
    -------
    numpy.ndarray
        float32 (N, D), rows in input order.
    """
    _check_tta(tta)
    source = _prefetch(batches) if prefetch else iter(batches)
    out: List[np.ndarray] = []
    with _progress(progress, total, f"encoding ({encoder.name})") as bar:
        for batch in source:
            feats = encoder.encode(batch, tta=tta)
            out.append(feats)
            bar.update(len(feats))
    if not out:
        return np.zeros((0, encoder.dim), dtype=np.float32)
    return np.concatenate(out, axis=0)


def _slide_label(slide: Any) -> str:
    return str(getattr(slide, "path", None) or getattr(slide, "name", "slide"))


def _settings_match(path: Path, expected: Dict[str, Any], ids: Optional[List[str]],
                    coords: np.ndarray) -> bool:
    """Whether ``path`` is a complete feature file made with ``expected`` settings."""
    try:
        attrs = read_feature_attrs(path)
    except CPNNInputError as exc:
        warnings.warn(f"{path}: existing file is unreadable and will be recomputed ({exc.problem})",
                      stacklevel=3)
        return False
    if attrs.get("complete") != 1:
        return False
    for key, value in expected.items():
        got = attrs.get(key)
        if isinstance(value, float):
            if got is None or not np.isclose(float(got), value, rtol=1e-9, atol=0.0):
                return False
        elif got != value:
            return False
    try:
        with h5py.File(path, "r") as fh:
            if ("ids" in fh) != (ids is not None):
                return False
            if ids is not None:
                stored = [i.decode("utf-8") if isinstance(i, bytes) else str(i) for i in fh["ids"][()]]
                if stored != ids:
                    return False
            stored_coords = fh["coords"][()]
            if stored_coords.shape != coords.shape or not np.array_equal(stored_coords, coords):
                return False
    except (OSError, KeyError):
        return False
    return True


def _extract_to_file(out_path: Path, batches: Iterable[np.ndarray], n: int, coords: np.ndarray,
                     ids: Optional[List[str]], encoder: Encoder, attrs: Dict[str, Any],
                     tta: str, progress: bool) -> FeatureFile:
    """Encode ``batches`` straight into a temporary HDF5 file; rename when complete."""
    from cpnn.outputs import check_free_space

    # HDF5 may crash (SIGSEGV) rather than report a disk that fills mid-write: check first
    check_free_space(out_path.parent, need_bytes=n * (encoder.dim * 4 + 16) + (1 << 20))
    with atomic_path(out_path, suffix=".h5") as tmp:
        with h5py.File(tmp, "w") as fh:
            dset = _write_layout(fh, coords, ids, attrs, dim=encoder.dim)
            row = 0
            with _progress(progress, n, f"features ({encoder.name})") as bar:
                for batch in batches:
                    feats = encoder.encode(batch, tta=tta)
                    if row + len(feats) > n:
                        raise RuntimeError("more patches than coordinates")  # pragma: no cover
                    _check_finite(feats, out_path)
                    dset[row:row + len(feats)] = feats
                    row += len(feats)
                    bar.update(len(feats))
            if row != n:  # pragma: no cover - guarded by the patch iterators
                raise RuntimeError(f"encoded {row} patches, expected {n}")
            fh.attrs["complete"] = 1
    return read_feature_file(out_path)


def _warm_up(slide: Any, num_workers: int) -> None:
    # backends that decode the whole image on first read (plain JPEG/PNG) would otherwise
    # do it once per worker thread, all at the same time
    if num_workers > 1:
        slide.read_region(0, 0, 1, 1)


def _chunks(n: int, batch_size: int) -> List[slice]:
    return [slice(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]


def _check_batch_size(batch_size: int) -> int:
    if int(batch_size) != batch_size or batch_size < 1:
        raise CPNNInputError(f"batch_size must be a positive integer, got {batch_size!r}.",
                             field="batch_size", fix="pass e.g. batch_size=32.")
    return int(batch_size)


def extract_spot_features(slide: Any, centers_xy: Any, ids: Optional[Sequence[Any]],
                          encoder: Encoder, out_path: os.PathLike | str,
                          patch_um: float = 112.0, out_px: Optional[int] = None,
                          batch_size: int = 32, overwrite: bool = False, num_workers: int = 1,
                          tta: str = "none", progress: bool = True) -> FeatureFile:
    """Encode a square patch centred on every spot and save a feature file.

    Parameters
    ----------
    slide
        A ``cpnn.image`` slide (``open_slide(...)`` or ``ArraySlide``) with ``mpp`` set.
    centers_xy
        (N, 2) spot centres (x, y) in level-0 pixels.
    ids
        N unique spot ids (stored in the file, used to check a resumed file), or None.
    encoder
        From :func:`create_encoder`.
    out_path
        ``.h5`` feature file to write (CLAM/TRIDENT layout; coords = top-left corner of
        each patch in level-0 pixels).
    patch_um
        Patch side in microns.
    out_px
        Patch side in pixels after resampling; default ``encoder.input_px``.
    batch_size
        Patches per forward pass.
    overwrite
        Recompute even if ``out_path`` is complete and matches these settings.
    num_workers
        Threads decoding patches while the encoder runs (0: no overlap).
    tta
        ``"none"``, ``"flips"`` or ``"flips8"`` test-time augmentation (stored as attr ``tta``).
    progress
        Show a progress bar.

    Returns
    -------
    FeatureFile
        The file's contents. When ``out_path`` already held a complete file made with the
        same encoder, patch_um, out_px, tta, ids and patch positions, it is read back and
        nothing is recomputed.
    """
    from cpnn.image import spot_patches, validate_centers

    out_path = Path(out_path)
    _check_tta(tta)
    batch_size = _check_batch_size(batch_size)
    out_px = int(encoder.input_px if out_px is None else out_px)
    if not (np.isfinite(patch_um) and patch_um > 0):
        raise CPNNInputError(f"patch_um must be a positive number of microns, got {patch_um!r}.",
                             field="patch_um", fix="pass e.g. patch_um=112.0.")
    centers = validate_centers(slide, centers_xy)
    n = len(centers)
    ids = validate_ids(ids, n, out_path)
    side = float(patch_um) / float(slide.mpp)  # level-0 pixels
    coords = validate_coords(np.round(centers - side / 2.0), n, out_path)
    attrs = {
        "encoder": encoder.name,
        "encoder_dim": encoder.dim,
        "patch_size_px": out_px,
        "patch_um": float(patch_um),
        "mpp": float(patch_um) / out_px,
        "level0_mpp": float(slide.mpp),
        "patch_size_level0": int(round(side)),
        "tta": tta,
        "kind": "spots",
        "slide": _slide_label(slide),
        "encoder_config": encoder.config,
    }
    def decode(sl: slice) -> np.ndarray:
        return next(iter(spot_patches(slide, centers[sl], patch_um=patch_um, out_px=out_px,
                                      batch_size=sl.stop - sl.start)))

    return _extract_or_reuse(out_path, overwrite, slide, decode, n, coords, ids, encoder, attrs, tta,
                             batch_size, num_workers, progress)


def extract_tile_features(slide: Any, out_path: os.PathLike | str, encoder: Encoder,
                          tile_px: int = 256, target_mpp: float = 0.5,
                          batch_size: int = 32, overwrite: bool = False, num_workers: int = 1,
                          tta: str = "none", progress: bool = True,
                          coords: Optional[Any] = None, **grid_kw: Any) -> FeatureFile:
    """Encode a grid of tiles over the slide's tissue and save a feature file.

    Parameters
    ----------
    slide
        A ``cpnn.image`` slide with ``mpp`` set.
    out_path
        ``.h5`` feature file (CLAM/TRIDENT layout; coords = top-left corner of each tile
        in level-0 pixels).
    encoder
        From :func:`create_encoder`; tiles are resized to ``encoder.input_px`` by it.
    tile_px
        Tile side in pixels at ``target_mpp`` (256 px at 0.5 µm/px = 128 µm).
    target_mpp
        Resolution of the tiles, microns per pixel.
    batch_size, overwrite, num_workers, tta, progress
        As in :func:`extract_spot_features`.
    coords
        (N, 2) top-left level-0 corners of the tiles; default
        ``cpnn.image.tile_grid(slide, tile_px, target_mpp, **grid_kw)`` (tissue tiles).
    **grid_kw
        Passed to ``tile_grid`` (``min_tissue``, ``mask``).

    Returns
    -------
    FeatureFile
        Read back from ``out_path`` (and not recomputed when it is complete and was made
        with the same encoder, tile size, resolution, tta and tile positions).
    """
    from cpnn.image import iter_tiles, tile_grid, tile_size_level0

    out_path = Path(out_path)
    _check_tta(tta)
    batch_size = _check_batch_size(batch_size)
    side = tile_size_level0(slide, tile_px, target_mpp)  # validates tile_px, target_mpp
    tile_px = int(tile_px)
    if coords is None:
        coords = tile_grid(slide, tile_px=tile_px, target_mpp=target_mpp, **grid_kw)
    coords = validate_coords(coords, len(np.asarray(coords)), out_path)
    n = len(coords)
    patch_um = tile_px * float(target_mpp)
    attrs = {
        "encoder": encoder.name,
        "encoder_dim": encoder.dim,
        "patch_size_px": tile_px,
        "patch_um": patch_um,
        "mpp": float(target_mpp),
        "level0_mpp": float(slide.mpp),
        "patch_size_level0": int(round(side)),
        "tta": tta,
        "kind": "tiles",
        "slide": _slide_label(slide),
        "encoder_config": encoder.config,
    }
    def decode(sl: slice) -> np.ndarray:
        return next(iter(iter_tiles(slide, coords[sl], tile_px=tile_px, target_mpp=target_mpp,
                                    batch_size=sl.stop - sl.start)))

    return _extract_or_reuse(out_path, overwrite, slide, decode, n, coords, None, encoder, attrs, tta,
                             batch_size, num_workers, progress)


def _extract_or_reuse(out_path: Path, overwrite: bool, slide: Any, decode: Callable[[slice], np.ndarray], n: int,
                      coords: np.ndarray, ids: Optional[Sequence[str]], encoder: Encoder, attrs: Dict[str, Any],
                      tta: str, batch_size: int, num_workers: int, progress: bool) -> FeatureFile:
    """Read ``out_path`` back when it is complete with these settings; else decode, encode
    and write it (decoding of the next batches overlapped with the encoder)."""
    from cpnn.image.identity import slide_identity

    source = slide_identity(slide)
    if source is not None:
        attrs["source_identity"] = source  # a changed image (rotated, re-scanned) misses the cache
    expected = {k: attrs[k] for k in ("encoder", "patch_size_px", "patch_um", "tta", "level0_mpp")}
    expected["source_identity"] = source if source is not None else "unknown"
    if out_path.exists() and not overwrite and _settings_match(out_path, expected, ids, coords):
        return read_feature_file(out_path)
    _warm_up(slide, num_workers)
    batches = _ordered_map(decode, _chunks(n, batch_size), num_workers)
    return _extract_to_file(out_path, batches, n, coords, ids, encoder, attrs, tta, progress)

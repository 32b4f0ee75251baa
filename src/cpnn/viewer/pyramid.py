"""A Deep Zoom (DZI) tile pyramid of the H&E, written with OpenSlide's DeepZoomGenerator.

Works for whole slides (``openslide.OpenSlide``) and plain images (``openslide.ImageSlide``:
JPEG/PNG/TIFF spot sections, or an in-memory image). Tiles land in
``{out}/{name}_files/{level}/{col}_{row}.jpeg`` exactly as the DZI format lays them out;
tiles already on disk are kept, so a rerun finishes an interrupted pyramid.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict

TILE_SIZE = 254  # + 1 px overlap on each side = 256 px tiles, the DZI convention
OVERLAP = 1


def write_dzi(slide: Any, out_dir: os.PathLike, name: str = "slide", quality: int = 85, workers: int = 2,
              progress: bool = True, source: str = "") -> Dict[str, Any]:
    """Write the tile pyramid of ``slide`` and return its DZI description.

    Parameters
    ----------
    slide
        An ``openslide.OpenSlide`` or ``openslide.ImageSlide``.
    out_dir
        Folder that receives ``{name}_files/`` and ``{name}.dzi``.
    name
        Base name of the pyramid.
    quality
        JPEG quality of the tiles.
    workers
        Threads encoding tiles (OpenSlide and PIL release the GIL while decoding/encoding).
    progress
        Show a progress bar over tiles.
    source
        Identity of the image (e.g. its path); tiles left by a pyramid of another image
        in the same folder are removed first.

    Returns
    -------
    dict
        ``{"Image": {...}}``: the DZI descriptor as OpenSeadragon takes it inline
        (``Url`` relative to ``out_dir``, ``Format``, ``Overlap``, ``TileSize``, ``Size``).
    """
    from openslide.deepzoom import DeepZoomGenerator
    from tqdm.auto import tqdm

    from ..utils import atomic_path

    out = Path(out_dir)
    gen = DeepZoomGenerator(slide, tile_size=TILE_SIZE, overlap=OVERLAP, limit_bounds=False)
    _forget_other_pyramid(out, name, {"source": source, "size": list(gen.level_dimensions[-1]),
                                      "tile_size": TILE_SIZE, "overlap": OVERLAP, "quality": quality})
    jobs = []
    for level in range(gen.level_count):
        folder = out / f"{name}_files" / str(level)
        folder.mkdir(parents=True, exist_ok=True)
        cols, rows = gen.level_tiles[level]
        jobs += [(level, c, r, folder / f"{c}_{r}.jpeg") for r in range(rows) for c in range(cols)]
    todo = [j for j in jobs if not j[3].is_file()]

    def write(job) -> None:
        level, c, r, path = job
        tile = gen.get_tile(level, (c, r))
        with atomic_path(path, suffix=".jpeg") as tmp:
            tile.convert("RGB").save(tmp, format="JPEG", quality=quality)

    with tqdm(total=len(todo), desc="H&E pyramid", unit="tile", disable=not progress, leave=False) as bar:
        if todo:  # the first tile decodes a plain image once, before threads share it
            write(todo.pop())
            bar.update(1)
        if workers > 1 and len(todo) > 16:
            with ThreadPoolExecutor(workers) as pool:
                for _ in pool.map(write, todo):
                    bar.update(1)
        else:
            for job in todo:
                write(job)
                bar.update(1)
    width, height = gen.level_dimensions[-1]
    (out / f"{name}.dzi").write_text(gen.get_dzi("jpeg"))
    return {"Image": {"xmlns": "http://schemas.microsoft.com/deepzoom/2008", "Url": f"{name}_files/",
                      "Format": "jpeg", "Overlap": str(OVERLAP), "TileSize": str(TILE_SIZE),
                      "Size": {"Width": str(width), "Height": str(height)}}}


def _forget_other_pyramid(out: Path, name: str, identity: Dict[str, Any]) -> None:
    """Keep existing tiles only when they were cut from the same image with the same settings."""
    import json
    import shutil

    from ..utils import write_json

    marker = out / f"{name}.pyramid.json"
    try:
        same = json.loads(marker.read_text()) == identity
    except (OSError, ValueError):
        same = False
    if not same and (out / f"{name}_files").exists():
        shutil.rmtree(out / f"{name}_files")
    write_json(marker, identity)

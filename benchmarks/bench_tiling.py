"""Whole-slide tiling throughput and memory on generated gigapixel slides.

For each size, a child process writes a pyramidal, tiled, JPEG-compressed BigTIFF
(0.25 µm/px, 256-px tiles, levels down to < 1,000 px) tile by tile -- the slide is never
held in memory -- with tissue-like content in elliptical regions, then runs
``tissue_mask`` + ``tile_grid`` + ``iter_tiles`` (224 px at 0.5 µm/px) over every tissue
tile and reports tiles/s and peak RSS. Running each size in its own process makes the
peak RSS of the sizes comparable: it must not grow with the slide.

Usage::

    python benchmarks/bench_tiling.py                    # 25,000 and 50,000 px
    python benchmarks/bench_tiling.py --sizes 20000 60000 --keep /tmp/slides
"""
from __future__ import annotations

import argparse
import io
import json
import os
import resource
import struct
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image

MPP = 0.25
TILE = 256
# tissue: ellipses (cx, cy, rx, ry) in fractions of the slide side
ELLIPSES = [(0.30, 0.35, 0.22, 0.18), (0.68, 0.62, 0.18, 0.25), (0.35, 0.78, 0.12, 0.08)]


def _jpeg(arr: np.ndarray, quality: int = 80) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _texture_bank(n: int, seed: int = 0) -> list[np.ndarray]:
    """H&E-like tiles: pink stroma with purple nuclei, smooth enough to compress."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:TILE, 0:TILE]
    bank = []
    for _ in range(n):
        base = np.empty((TILE, TILE, 3), np.float32)
        base[:] = (232, 170, 205)
        waves = 12 * np.sin(xx / rng.uniform(8, 20) + rng.uniform(0, 6)) * np.cos(yy / rng.uniform(8, 20))
        base += waves[..., None]
        for cx, cy, r in zip(rng.uniform(0, TILE, 60), rng.uniform(0, TILE, 60), rng.uniform(3, 7, 60)):
            nucleus = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
            base[nucleus] = (110, 70, 160)
        bank.append(np.clip(base, 0, 255).astype(np.uint8))
    return bank


def _inside(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    m = np.zeros(np.broadcast(u, v).shape, bool)
    for cx, cy, rx, ry in ELLIPSES:
        m |= ((u - cx) / rx) ** 2 + ((v - cy) / ry) ** 2 <= 1.0
    return m


def write_pyramid(path: str, side: int) -> dict:
    """Stream a pyramidal tiled JPEG BigTIFF of ``side`` x ``side`` px to ``path``.

    A minimal BigTIFF writer (tifffile cannot store JPEG without the optional
    imagecodecs package): tile data are written as they are encoded, and each level's
    IFD follows its tiles. Levels are separate IFDs, which OpenSlide reads as a pyramid.
    """
    bank = _texture_bank(16)
    bank_jpeg = [_jpeg(t) for t in bank]
    white = np.full((TILE, TILE, 3), 255, np.uint8)
    white_jpeg = _jpeg(white)
    sizes = []
    s = side
    while True:
        sizes.append(s)
        if s < 1000:
            break
        s = (s + 1) // 2
    counts = {"interior": 0, "background": 0, "edge": 0}
    with open(path, "wb") as fh:
        fh.write(b"II" + struct.pack("<HHHQ", 43, 8, 0, 0))  # BigTIFF header; IFD offset patched
        prev_ifd_ptr = 8
        for level, lside in enumerate(sizes):
            n = -(-lside // TILE)
            offsets = np.zeros(n * n, np.uint64)
            bytecounts = np.zeros(n * n, np.uint64)
            probe = (np.arange(9) + 0.5) / 9 * TILE
            for ty in range(n):
                for tx in range(n):
                    px0, py0 = tx * TILE, ty * TILE
                    u = (px0 + probe)[None, :] / lside
                    v = (py0 + probe)[:, None] / lside
                    inside = _inside(u, v)
                    k = (tx * 7 + ty * 13) % len(bank)
                    if inside.all():
                        data = bank_jpeg[k]
                        counts["interior"] += 1
                    elif not inside.any():
                        data = white_jpeg
                        counts["background"] += 1
                    else:
                        uu = (px0 + np.arange(TILE) + 0.5)[None, :] / lside
                        vv = (py0 + np.arange(TILE) + 0.5)[:, None] / lside
                        m = _inside(uu, vv)
                        data = _jpeg(np.where(m[..., None], bank[k], white))
                        counts["edge"] += 1
                    offsets[ty * n + tx] = fh.tell()
                    bytecounts[ty * n + tx] = len(data)
                    fh.write(data)
            # out-of-line arrays, then the IFD
            def put(arr: np.ndarray) -> int:
                pos = fh.tell()
                fh.write(arr.astype("<u8").tobytes())
                return pos

            # BigTIFF keeps values of up to 8 bytes inside the IFD entry itself
            if n * n == 1:
                off_val, cnt_val = int(offsets[0]), int(bytecounts[0])
            else:
                off_val, cnt_val = put(offsets), put(bytecounts)
            res = int(1e4 / (MPP * 2**level) * 1000) | (1000 << 32)  # px per cm, as num/den
            # (tag, type, count, value); types: 3 SHORT, 4 LONG, 5 RATIONAL, 16 LONG8
            entries = [
                (254, 4, 1, 0 if level == 0 else 1),
                (256, 4, 1, lside), (257, 4, 1, lside),
                (258, 3, 3, 8 | (8 << 16) | (8 << 32)), (259, 3, 1, 7), (262, 3, 1, 6),
                (277, 3, 1, 3), (282, 5, 1, res), (283, 5, 1, res),
                (284, 3, 1, 1), (296, 3, 1, 3),
                (322, 3, 1, TILE), (323, 3, 1, TILE),
                (324, 16, n * n, off_val), (325, 16, n * n, cnt_val),
                (530, 3, 2, 2 | (2 << 16)),
            ]
            ifd_pos = fh.tell()
            fh.write(struct.pack("<Q", len(entries)))
            for tag, typ, count, value in entries:
                fh.write(struct.pack("<HHQQ", tag, typ, count, value))
            next_ptr = fh.tell()
            fh.write(struct.pack("<Q", 0))
            end = fh.tell()
            fh.seek(prev_ifd_ptr)
            fh.write(struct.pack("<Q", ifd_pos))
            fh.seek(end)
            prev_ifd_ptr = next_ptr
    return {"levels": sizes, "tiles_written": counts, "bytes": os.path.getsize(path)}


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def run_one(side: int, folder: str, tile_px: int, target_mpp: float, batch_size: int) -> dict:
    from cpnn.image import iter_tiles, open_slide, tile_grid, tissue_mask

    path = os.path.join(folder, f"bench_{side}.tif")
    t0 = time.perf_counter()
    info = write_pyramid(path, side)
    t_write = time.perf_counter() - t0
    rss_after_write = _peak_rss_mib()

    with open_slide(path) as slide:
        assert slide.dimensions == (side, side) and abs(slide.mpp - MPP) < 1e-6
        t0 = time.perf_counter()
        mask, ds = tissue_mask(slide)
        coords = tile_grid(slide, tile_px=tile_px, target_mpp=target_mpp, mask=(mask, ds))
        t_grid = time.perf_counter() - t0
        t0 = time.perf_counter()
        n = 0
        checksum = 0.0
        for batch in iter_tiles(slide, coords, tile_px=tile_px, target_mpp=target_mpp, batch_size=batch_size):
            n += len(batch)
            checksum += float(batch[:, ::32, ::32].mean())
        t_read = time.perf_counter() - t0
    return {
        "side_px": side,
        "levels": len(info["levels"]),
        "file_mib": round(info["bytes"] / 2**20, 1),
        "write_s": round(t_write, 1),
        "mask_px": list(mask.shape),
        "tissue_fraction": round(float(mask.mean()), 3),
        "tiles": int(n),
        "grid_s": round(t_grid, 2),
        "read_s": round(t_read, 1),
        "tiles_per_s": round(n / t_read, 1),
        "peak_rss_mib_after_write": round(rss_after_write, 1),
        "peak_rss_mib": round(_peak_rss_mib(), 1),
        "mean_tile_value": round(checksum / max(1, -(-n // batch_size)), 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[25_000, 50_000])
    ap.add_argument("--tile-px", type=int, default=224)
    ap.add_argument("--target-mpp", type=float, default=0.5)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--keep", default=None, help="folder to keep the generated slides in")
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        res = run_one(args.child, args.folder, args.tile_px, args.target_mpp, args.batch_size)
        print(json.dumps(res))
        return

    results = []
    with tempfile.TemporaryDirectory(prefix="cpnn_bench_tiling_") as tmp:
        folder = args.keep or tmp
        os.makedirs(folder, exist_ok=True)
        for side in args.sizes:
            cmd = [sys.executable, __file__, "--child", str(side), "--folder", folder,
                   "--tile-px", str(args.tile_px), "--target-mpp", str(args.target_mpp),
                   "--batch-size", str(args.batch_size)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            res = json.loads(out.strip().splitlines()[-1])
            results.append(res)
            print(json.dumps(res), flush=True)
            if not args.keep:
                os.remove(os.path.join(folder, f"bench_{side}.tif"))
    print()
    print(f"{'slide px':>10} {'levels':>6} {'file MiB':>9} {'tiles':>7} {'tiles/s':>8} {'peak RSS MiB':>13}")
    for r in results:
        print(f"{r['side_px']:>10} {r['levels']:>6} {r['file_mib']:>9} {r['tiles']:>7} "
              f"{r['tiles_per_s']:>8} {r['peak_rss_mib']:>13}")


if __name__ == "__main__":
    main()

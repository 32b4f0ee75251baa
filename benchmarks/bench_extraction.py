"""Throughput of spot feature extraction: the full pipeline against the bare encoder.

Full pipeline = ``extract_spot_features`` (patch decode + Lanczos resample in a background
thread, preprocessing, forward pass, streaming HDF5 write). Bare encoder = ``Encoder.encode``
on the same patches decoded beforehand. Their ratio shows how much of the decode cost the
prefetching hides (1.0 = all of it).

Uses the HER2ST section C2 (``<data>/her2st/data/ST-imgs/C/C2/5714_HE_BT_C2.jpg``, spot
centres from ``C2_selection.tsv``, µm/px from a fit of pixel position on array position at
200 µm per array step) when the shared data folder is found, else a generated image.

    python benchmarks/bench_extraction.py [--n 128] [--batch-size 32] [--encoder efficientnet-lite0]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from cpnn.encoders import create_encoder, extract_spot_features
from cpnn.image import ArraySlide, open_slide, spot_patches
from cpnn.utils import find_data_dir

ST_PITCH_UM = 200.0  # legacy ST array: spot centre to centre


def her2st_c2(root: Path):
    import pandas as pd

    img = root / "her2st/data/ST-imgs/C/C2/5714_HE_BT_C2.jpg"
    spots = pd.read_csv(root / "her2st/data/ST-spotfiles/C2_selection.tsv", sep="\t")
    spots = spots[spots["selected"] == 1]
    px_per_step = np.mean([np.polyfit(spots["x"], spots["pixel_x"], 1)[0],
                           np.polyfit(spots["y"], spots["pixel_y"], 1)[0]])
    mpp = ST_PITCH_UM / px_per_step
    centers = spots[["pixel_x", "pixel_y"]].to_numpy(dtype=np.float64)
    return open_slide(img, mpp=mpp), centers, f"HER2ST C2 ({img.name}, {mpp:.3f} um/px)"


def generated(n: int):
    rng = np.random.default_rng(0)
    img = rng.integers(80, 230, size=(6000, 6000, 3), dtype=np.uint8)
    centers = rng.uniform(200, 5800, size=(n, 2))
    return ArraySlide(img, mpp=0.69, name="generated"), centers, "generated 6000x6000 image"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=96, help="spots to extract")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--encoder", default="efficientnet-lite0")
    ap.add_argument("--patch-um", type=float, default=112.0)
    ap.add_argument("--workers", type=int, default=1, help="decode threads")
    ap.add_argument("--repeats", type=int, default=2,
                    help="interleaved repeats; the best time of each is kept (shared CPUs are noisy)")
    args = ap.parse_args()

    import torch

    root = find_data_dir()
    t0 = time.perf_counter()
    if root is not None and (root / "her2st/data/ST-imgs/C/C2/5714_HE_BT_C2.jpg").is_file():
        slide, centers, what = her2st_c2(root)
    else:
        slide, centers, what = generated(args.n)
    rng = np.random.default_rng(0)
    if len(centers) > args.n:
        centers = centers[np.sort(rng.choice(len(centers), args.n, replace=False))]
    n = len(centers)
    # decode the whole JPEG once (a one-off cost, not per patch)
    slide.read_region(0, 0, 8, 8)
    t_open = time.perf_counter() - t0
    enc = create_encoder(args.encoder)
    ids = [f"s{i}" for i in range(n)]
    print(f"data: {what}; {n} spots, {args.patch_um:g} um -> {enc.input_px} px; "
          f"torch threads {torch.get_num_threads()}; open+decode image {t_open:.1f} s")

    enc.encode(np.zeros((2, enc.input_px, enc.input_px, 3), np.uint8))  # warm-up

    t = time.perf_counter()
    batches = list(spot_patches(slide, centers, patch_um=args.patch_um, out_px=enc.input_px,
                                batch_size=args.batch_size))
    t_decode = time.perf_counter() - t

    t_raw = float("inf")
    results = {w: float("inf") for w in sorted({0, args.workers})}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(max(1, args.repeats)):
            t = time.perf_counter()
            for b in batches:
                enc.encode(b)
            t_raw = min(t_raw, time.perf_counter() - t)
            for workers in results:
                t = time.perf_counter()
                extract_spot_features(slide, centers, ids, enc, Path(tmp) / f"f{workers}.h5",
                                      patch_um=args.patch_um, batch_size=args.batch_size,
                                      num_workers=workers, overwrite=True, progress=False)
                results[workers] = min(results[workers], time.perf_counter() - t)

    raw_rate = n / t_raw
    print(f"decode + resample only      : {n / t_decode:7.1f} patches/s")
    print(f"encoder forward (pre-decoded): {raw_rate:7.1f} patches/s")
    for workers, dt in results.items():
        label = "no prefetch (workers=0)" if workers == 0 else f"prefetch (workers={workers})"
        print(f"full pipeline, {label:24s}: {n / dt:7.1f} patches/s  "
              f"ratio to forward {n / dt / raw_rate:.2f}")


if __name__ == "__main__":
    main()

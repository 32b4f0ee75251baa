"""Predicting one very large bag (a whole slide): wall time and peak memory.

A CPNN (1,280-d input, the paper's 1024-512 MLP, 9 types, 1,000 genes) is trained one
epoch on random data; then a bag of N random 1,280-d tiles is written to a CLAM-style
HDF5 file in chunks and predicted two ways, each in a fresh process so that peak RSS is
its own:

- ``stream``: :func:`cpnn.workflows.wsi.predict_bag_streaming` over the file, 16,384
  rows at a time — the slide's bulk profile and mean weights; memory must not grow with N;
- ``in-memory``: ``CPNN.predict(features, bags=[0, N])`` as ``predict_slide`` does, which
  also returns per-tile weights and expression (N x G), so it grows with N by design.

Usage::

    python benchmarks/bench_slide_predict.py --sizes 25000,100000 [--genes 1000]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def make_model(path: Path, n_genes: int, n_types: int = 9, dim: int = 1280) -> None:
    import numpy as np

    from cpnn.config import CPNNConfig, TrainConfig
    from cpnn.model import CPNN

    rng = np.random.default_rng(0)

    class P:
        values = rng.gamma(1.0, 1.0, size=(n_types, n_genes)) + 0.01
        cell_types = [f"type{k}" for k in range(n_types)]
        genes = [f"G{j}" for j in range(n_genes)]
        provenance = {"method": "random"}

    model = CPNN(P(), CPNNConfig(hidden=(1024, 512)), TrainConfig(max_epochs=1, early_stopping="none", progress=False))
    bags = [rng.normal(size=(int(n), dim)).astype(np.float32) for n in rng.integers(50, 200, size=16)]
    model.fit(bags, rng.poisson(5.0, size=(16, n_genes)) + 1, composition_targets=None)
    model.save(path)


def make_features(path: Path, n: int, dim: int = 1280, chunk: int = 16384) -> None:
    import h5py
    import numpy as np

    rng = np.random.default_rng(1)
    with h5py.File(path, "w") as fh:
        ds = fh.create_dataset("features", shape=(n, dim), dtype="float32", chunks=(min(chunk, n), dim))
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            ds[s:e] = rng.normal(size=(e - s, dim)).astype(np.float32)
        fh.create_dataset("coords", data=np.zeros((n, 2), dtype=np.int64))


def child(mode: str, model_path: str, feat_path: str) -> None:
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    from cpnn.model import CPNN
    from cpnn.workflows.wsi import iter_feature_file, predict_bag_streaming

    model = CPNN.load(model_path)
    base = _peak_rss_mb()
    t = time.perf_counter()
    if mode == "stream":
        out = predict_bag_streaming(model, iter_feature_file(feat_path))
        n = out["n_tiles"]
    else:
        import h5py

        with h5py.File(feat_path, "r") as fh:
            feats = fh["features"][:]
        out = model.predict(feats, bags=[0, len(feats)])
        n = len(feats)
    print(json.dumps({"mode": mode, "n_tiles": n, "seconds": round(time.perf_counter() - t, 2),
                      "tiles_per_s": round(n / (time.perf_counter() - t)), "rss_after_load_mb": round(base),
                      "peak_rss_mb": round(_peak_rss_mb())}))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="25000,100000")
    ap.add_argument("--genes", type=int, default=1000)
    ap.add_argument("--modes", default="stream,in-memory")
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_path = Path(tmp) / "model.cpnn"
        make_model(model_path, args.genes)
        for n in [int(s) for s in args.sizes.split(",")]:
            feat = Path(tmp) / f"bag{n}.h5"
            make_features(feat, n)
            for mode in args.modes.split(","):
                res = subprocess.run([sys.executable, __file__, "--child", mode, str(model_path), str(feat)],
                                     capture_output=True, text=True, check=True)
                row = json.loads(res.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(json.dumps(row), flush=True)
            feat.unlink()
    print("\n| mode | tiles | seconds | tiles/s | peak RSS (MB) |\n| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['mode']} | {r['n_tiles']:,} | {r['seconds']} | {r['tiles_per_s']:,} | {r['peak_rss_mb']:,} |")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        sys.exit(main())

"""HER2ST: a spot as a bag of sub-patches (CPNN) vs mean-pooled sub-patches (ridge probe).

Leave-one-section-out over C2-C6, 785-gene panel, Spearman per gene across the held-out
spots. Every spot's 112 um square is cut into ``grid x grid`` sub-patches (default 2 x 2
of 56 um), each resampled to 224 px (0.25 um/px, twice the magnification of the usual
112 um -> 224 px patch) and encoded by EfficientNet-Lite0. Compared, all without the
neighbour-context ring:

- ``ridge_112`` / ``cpnn_112``: the usual single 112 um patch per spot;
- ``ridge_sub_mean``: the HEST probe (inner-CV penalty) on the mean of the sub-patch features;
- ``ridge_112+sub``: the probe on [112 um feature, mean sub-patch feature];
- ``cpnn_sub_bag``: CPNN (package defaults, ``celltype_subset`` regression prototypes) with
  each spot a bag of its sub-patches: one cell-type mixture per sub-patch, the spot's
  expression the mean of theirs (the method's bag head, docs/ARCHITECTURE.md §3, used at spot level).

    python benchmarks/her2st_subpatch_bags.py --data-dir ../shared/data --cache /tmp/subpatch \
        --features-112 /tmp/her2st_none --json subpatch.json

``--features-112`` is a folder of ``{section}.h5`` 112 um feature files (made there if
absent). The five sections are one patient: new sections, not new patients.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from scipy import sparse

from _her2st import SECTIONS, load_sections, panel_prototypes


def sub_patch_features(sample, encoder, grid: int, cache: Path) -> np.ndarray:
    """(N spots, grid*grid, D) features of the sub-patches tiling each spot's 112 um square."""
    from cpnn.workflows.features import spot_features

    return spot_features(sample.adata, encoder, patch_um=112.0, out_px=224, subpatch_grid=grid,
                         cache_path=cache / f"{sample.sample_id}_grid{grid}.h5", progress=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--cache", default="subpatch-features")
    ap.add_argument("--features-112", default="subpatch-features/112um")
    ap.add_argument("--grid", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from cpnn.config import CPNNConfig, TrainConfig
    from cpnn.encoders import create_encoder
    from cpnn.evaluate import expression_metrics, to_log1p_cp10k
    from cpnn.model import CPNN
    from cpnn.model.probes import RidgeProbe
    from cpnn.presets import get_preset

    spot = get_preset("spot")

    t_start = time.perf_counter()
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    data, samples = load_sections(args.data_dir, args.features_112)
    encoder = create_encoder("efficientnet-lite0")
    sub = {s: sub_patch_features(samples[s], encoder, args.grid, cache) for s in SECTIONS}
    protos = panel_prototypes(data, samples, "celltype_subset", same_names_only=True)
    genes = list(protos.genes)

    def counts(s):
        x = samples[s].adata[:, genes].X
        return (x.toarray() if sparse.issparse(x) else np.asarray(x)).astype(np.float32)

    per_fold = {}
    for test in SECTIONS:
        train = [s for s in SECTIONS if s != test]
        y_tr, y_te = np.concatenate([counts(s) for s in train]), counts(test)
        keep, keep_te = y_tr.sum(1) >= 1, y_te.sum(1) >= 1
        groups = np.concatenate([[s] * len(samples[s].features) for s in train])[keep]
        truth = to_log1p_cp10k(y_te[keep_te])
        f112 = np.concatenate([samples[s].features for s in train])[keep]
        t112 = samples[test].features[keep_te]
        fsub, tsub = np.concatenate([sub[s] for s in train])[keep], sub[test][keep_te]
        row = {}
        for name, x_tr, x_te in [("ridge_112", f112, t112), ("ridge_sub_mean", fsub.mean(1), tsub.mean(1)),
                                 ("ridge_112+sub", np.hstack([f112, fsub.mean(1)]), np.hstack([t112, tsub.mean(1)]))]:
            probe = RidgeProbe(n_components=256, alphas="cv", seed=0).fit(x_tr, to_log1p_cp10k(y_tr[keep]), groups=groups)
            row[name] = expression_metrics(probe.predict(x_te), truth)["scc_mean"]
        for name, bags_tr, bags_te in [("cpnn_112", list(f112[:, None]), list(t112[:, None])),
                                       ("cpnn_sub_bag", list(fsub), list(tsub))]:
            model = CPNN(protos, spot.model, TrainConfig(**{**spot.train_options(), "progress": False}),
                         preset="spot")
            model.fit(bags_tr, y_tr[keep], groups=groups)
            pred = model.predict(bags_te)["bag_expr"].astype(np.float64)
            row[name] = expression_metrics(np.log1p(pred * 1e4), truth)["scc_mean"]
        per_fold[test] = row
        print(test, {k: round(v, 3) for k, v in row.items()}, flush=True)
    mean = {k: float(np.mean([per_fold[s][k] for s in SECTIONS])) for k in per_fold[SECTIONS[0]]}
    print("mean", {k: round(v, 3) for k, v in mean.items()})
    if args.json:
        Path(args.json).write_text(json.dumps({"per_fold": per_fold, "mean": mean, "grid": args.grid,
                                               "n_genes": len(genes),
                                               "seconds": round(time.perf_counter() - t_start, 1)}, indent=2))


if __name__ == "__main__":
    main()

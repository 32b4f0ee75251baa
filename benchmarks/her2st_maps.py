"""HER2ST cell-type maps of the `celltype_major` model vs stereoscope, leave-one-section-out.

For each held-out section C2..C6: train CPNN (package spot defaults) on the other four,
predict the held-out spots, and compare each type's weight with stereoscope's `major`
proportion (Pearson across spots, then the mean over types). Writes one figure per
section (stereoscope top, CPNN bottom) and prints the table quoted in BENCHMARKS.md.

    python benchmarks/her2st_maps.py --data-dir ../shared/data --out runs/her2st_maps \
        [--tta flips8] [--feature-cache DIR] [--subpatch-grid 2]

Weights of Cancer + Normal Epithelial are summed into stereoscope's Epithelial and
Plasmablasts map to Plasma Cells. The five sections are one patient (C): this measures
new sections, not new patients.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from cpnn.data import read_her2st_proportions
from cpnn.evaluate import composition_agreement
from cpnn.evaluate.benchmark import HER2ST_MAJOR_MAPPING
from cpnn.model.cpnn_model import per_observation
from cpnn.plot.spatial import composition_panel
from cpnn.utils import write_json
from cpnn.presets import get_preset
from cpnn.workflows.spatial import FeatureSpec, fit_spot_model

from _her2st import SECTIONS, load_sections, panel_prototypes


def merged_weights(weights: np.ndarray, cell_types, mapping):
    """Sum model types that map to the same reference name; returns (matrix, names)."""
    names = [mapping.get(c, c) for c in cell_types]
    uniq = sorted(set(names))
    return np.stack([weights[:, [i for i, n in enumerate(names) if n == u]].sum(1) for u in uniq], 1), uniq


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default="runs/her2st_maps")
    ap.add_argument("--tta", default="flips8", choices=["none", "flips", "flips8"])
    ap.add_argument("--feature-cache", default=None, help="folder of {section}.h5 feature files (made if absent)")
    ap.add_argument("--prototypes", default="regression", choices=["naive", "regression"])
    ap.add_argument("--subpatch-grid", type=int, default=1,
                    help="each spot a bag of G x G sub-patches (features cached under FEATURE_CACHE/gridG)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a model/train default, e.g. --set composition_weight=1e4 --set max_epochs=150")
    args = ap.parse_args()
    import torch

    from cpnn.config import CPNNConfig, TrainConfig

    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    spec = FeatureSpec(tta=args.tta, context_rings=1.0, subpatch_grid=args.subpatch_grid)
    data, samples = load_sections(args.data_dir, args.feature_cache or out / "features", args.tta, 1.0,
                                  args.subpatch_grid)
    protos = panel_prototypes(data, samples, "celltype_major", args.prototypes)
    spot = get_preset("spot")
    model_cfg, train_cfg = spot.model_options(), {**spot.train_options(), "progress": False}
    for item in args.set:
        key, value = item.split("=", 1)
        target = model_cfg if key in model_cfg or key in CPNNConfig.__dataclass_fields__ else train_cfg
        target[key] = json.loads(value) if value[:1] in "[{" else type(target.get(key, 0.0))(float(value)) \
            if key in target and isinstance(target.get(key), (int, float)) else value
    rows, per_type = [], {}
    for test in SECTIONS:
        torch.manual_seed(0)
        train = [samples[s] for s in SECTIONS if s != test]
        model = fit_spot_model(train, protos, CPNNConfig(**model_cfg), TrainConfig(**train_cfg),
                               encoder=spec.as_dict())
        pred = per_observation(model.predict(samples[test].features), samples[test].features)
        obs = list(samples[test].adata.obs_names)
        props = read_her2st_proportions(data / "her2st", test, level="major", obs_names=obs)
        w, names = merged_weights(pred["weights"], model.cell_types, HER2ST_MAJOR_MAPPING)
        agree = composition_agreement(w, props.values, names, list(props.columns))
        rows.append({"section": test, "mean_r": agree["mean"], **{k: round(v, 3) for k, v in agree["per_type"].items()}})
        for k, v in agree["per_type"].items():
            per_type.setdefault(k, []).append(v)
        common = [n for n in names if n in props.columns]
        xy = np.asarray(samples[test].adata.obsm["spatial"])
        diameter = 100.0 / float(samples[test].adata.uns["cpnn_input"]["mpp"])
        composition_panel(out / f"maps_{test}.png", xy, props[common].values, w[:, [names.index(n) for n in common]],
                          common, diameter, title=f"HER2ST {test} (held out): stereoscope (top) vs CPNN weights "
                          f"(bottom, own colour scale); mean per-type r = {agree['mean']:.2f}", true_label="stereoscope",
                          shared_scale=False)
        print(f"{test}: mean per-type r {agree['mean']:.3f}  " +
              " ".join(f"{k} {v:.2f}" for k, v in agree["per_type"].items()), flush=True)
    mean = float(np.mean([r["mean_r"] for r in rows]))
    summary = {"mean_over_sections": mean, "per_section": rows,
               "per_type_mean": {k: float(np.nanmean(v)) for k, v in per_type.items()},
               "settings": {"tta": args.tta, "context_rings": 1.0, "prototypes": args.prototypes,
                            "subpatch_grid": args.subpatch_grid,
                            "model": model_cfg, "train": train_cfg},
               "seconds": round(time.perf_counter() - t0, 1)}
    write_json(out / "maps_summary.json", summary)
    print(json.dumps({"mean_over_sections": round(mean, 3), "per_type_mean":
                      {k: round(v, 3) for k, v in summary["per_type_mean"].items()}, "seconds": summary["seconds"]}))


if __name__ == "__main__":
    main()

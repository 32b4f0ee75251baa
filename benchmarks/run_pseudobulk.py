"""Pseudo-bulk benchmark on HER2ST (patient C, sections C2-C6), leave one section out.

Each section's spots are cut into 3 x 3-pitch blocks (``cpnn.workflows.pseudobulk``); a
region's bulk is the sum of its spots' counts and its bag the features of its spots.
For every held-out section:

- slide-level models trained on the other sections' regions only: CPNN (bulk-trained,
  ``fit_bulk_model`` = ``cpnn fit --level bulk``), MeanPoolMLP, ABMIL, HE2RNA,
  SumOfTiles (CPNN without prototypes), and the ridge probe on mean-pooled features;
  scored per gene (Pearson / Spearman) across the held-out section's regions on
  log1p CP10k, then mean / median over genes;
- bulk-trained spot maps: the bulk-trained CPNN's spot predictions on the held-out
  section (Spearman per gene across spots) next to the spot-supervised CPNN
  (``fit_spot_model``), and both models' weights vs the stereoscope ``major`` proportions
  (per-type Pearson across spots).

Usage::

    python benchmarks/run_pseudobulk.py --features /tmp/her2st/{section}_none.h5 \
        --prototypes /tmp/protos.h5ad --json pseudobulk.json --figures docs/figures

Without ``--features`` spot features are extracted (cached under ``--cache``);
without ``--prototypes`` naive prototypes are built from the Wu et al. reference.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

SECTIONS = ["C2", "C3", "C4", "C5", "C6"]
# stereoscope "major" names <- model cell types (weights of the listed types are summed)
STEREOSCOPE_MAJOR = {
    "B-cells": ["B-cells"], "CAFs": ["CAFs"], "Endothelial": ["Endothelial"],
    "Epithelial": ["Cancer Epithelial", "Normal Epithelial"], "Myeloid": ["Myeloid"],
    "Plasma Cells": ["Plasmablasts"], "PVL": ["PVL"], "T-cells": ["T-cells"],
}


def merged_weights(weights: np.ndarray, cell_types, mapping=STEREOSCOPE_MAJOR):
    """Sum model weight columns into the reference's types; returns (matrix, names)."""
    idx = {c: i for i, c in enumerate(cell_types)}
    names, cols = [], []
    for ref, parts in mapping.items():
        present = [idx[p] for p in parts if p in idx]
        if present:
            names.append(ref)
            cols.append(weights[:, present].sum(1))
    return np.stack(cols, axis=1), names


def load_samples(root, features_pattern, cache, progress):
    from cpnn.encoders import read_feature_file
    from cpnn.workflows.spatial import FeatureSpec, attach_features, load_inputs

    samples = load_inputs(her2st=str(root), sections=SECTIONS)
    if features_pattern:
        for s in samples:
            ff = read_feature_file(features_pattern.format(section=s.sample_id))
            index = {str(i): k for k, i in enumerate(ff.ids)}
            s.features = ff.features[[index[str(o)] for o in s.adata.obs_names]]
    else:
        attach_features(samples, FeatureSpec(), cache_dir=cache, progress=progress)
    return samples


def summarise(pred, true, genes):
    from cpnn.evaluate import expression_metrics

    m = expression_metrics(pred, true, genes)
    return {k: m[k] for k in ("pcc_mean", "pcc_median", "scc_mean", "scc_median", "n_obs", "n_genes_scored",
                              "n_genes_constant", "n_significant")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", default=None, help="her2st root (default: <data dir>/her2st)")
    ap.add_argument("--features", default=None, help="feature file pattern with {section}")
    ap.add_argument("--cache", default="pseudobulk-features")
    ap.add_argument("--prototypes", default=None, help="prototypes .h5ad (default: naive from the reference)")
    ap.add_argument("--block-spots", type=int, default=3)
    ap.add_argument("--min-spots", type=int, default=2)
    ap.add_argument("--folds", default=",".join(SECTIONS), help="held-out sections to run")
    ap.add_argument("--max-epochs", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--min-panel-counts", type=int, default=50, help="drop spots with fewer UMI on the model genes")
    ap.add_argument("--cpnn-loss", default=None, help="override the CPNN loss (nb, poisson, mse_log1p, pearson)")
    ap.add_argument("--skip-baselines", action="store_true", help="CPNN (and ridge) only")
    ap.add_argument("--no-spot-model", action="store_true", help="skip the spot-supervised comparison")
    ap.add_argument("--figures", default=None, help="folder for the weight-map figure")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from cpnn.config import TrainConfig
    from cpnn.data import read_her2st_proportions
    from cpnn.evaluate import composition_agreement
    from cpnn.model.probes import RidgeProbe
    from cpnn.model.slide_baselines import BASELINE_NAMES, SlideBaseline, log1p_cp10k
    from cpnn.prototypes import Prototypes, build_prototypes, read_reference
    from cpnn.utils import find_data_dir, seed_everything
    from cpnn.presets import get_preset
    from cpnn.workflows.fit import FitOptions

    SPOT_TRAIN_DEFAULTS = get_preset("spot").train_options()
    from cpnn.workflows.pseudobulk import fit_bulk_model, region_bags
    from cpnn.workflows.spatial import counts_matrix, fit_spot_model

    data = find_data_dir()
    root = Path(args.root) if args.root else (data / "her2st" if data else None)
    if root is None or not root.is_dir():
        print("HER2ST data not found: pass --root or set CPNN_DATA_DIR", file=sys.stderr)
        return 2
    t_start = time.perf_counter()
    samples = load_samples(root, args.features, args.cache, progress=True)
    panel = [g.strip() for g in open(root / "her2st_785_genes.txt") if g.strip()]
    common = set.intersection(*[set(map(str, s.adata.var_names)) for s in samples])
    if args.prototypes:
        protos = Prototypes.load(args.prototypes)
    else:
        ref = read_reference(data / "reference" / "wu2021_CID4465.h5ad", "celltype_major")
        protos = build_prototypes(ref, "celltype_major", method="naive", genes=[g for g in panel if g in common])
    genes = [g for g in protos.genes if g in common]
    protos = protos.subset_genes(genes)
    print(f"{len(genes)} genes, {len(protos.cell_types)} cell types ({protos.method} prototypes)", flush=True)
    # a UMI floor on the model's genes: a spot with 13 panel UMI got NaN deconvolution
    # proportions, which made the spot-supervised model's training diverge
    n_dropped = {}
    for s in samples:
        keep = counts_matrix(s.adata, genes).sum(1) >= args.min_panel_counts
        n_dropped[s.sample_id] = int((~keep).sum())
        s.adata, s.features = s.adata[keep].copy(), s.features[keep]
    print(f"spots under {args.min_panel_counts} UMI on the model genes dropped: {n_dropped}", flush=True)

    opts = FitOptions(reference=str(args.prototypes or "naive"), level="bulk")
    opts.train["max_epochs"] = args.max_epochs
    if args.cpnn_loss:
        opts.model["loss"] = args.cpnn_loss
    tc_slide = TrainConfig(**{**SPOT_TRAIN_DEFAULTS, "max_epochs": args.max_epochs, "batch_size": 8,
                              "progress": False})
    by_id = {s.sample_id: s for s in samples}
    results = {"settings": vars(args), "genes": len(genes), "cell_types": list(protos.cell_types),
               "prototypes": protos.method, "spots_dropped": n_dropped, "folds": {}}
    for test_id in [f for f in args.folds.split(",") if f]:
        seed_everything(0)
        t0 = time.perf_counter()
        train_s = [s for s in samples if s.sample_id != test_id]
        test_s = by_id[test_id]
        tr = region_bags(train_s, genes, block_spots=args.block_spots, min_spots=args.min_spots)
        te = region_bags([test_s], genes, block_spots=args.block_spots, min_spots=args.min_spots)
        y_true = log1p_cp10k(te.counts)
        fold = {"n_train_regions": len(tr.bags), "n_test_regions": len(te.bags), "region_level": {},
                "seconds": {}}
        # CPNN trained on region bags only
        t = time.perf_counter()
        cpnn_bulk = fit_bulk_model(train_s, protos, opts, progress=False, block_spots=args.block_spots,
                                   min_spots=args.min_spots)
        pb = cpnn_bulk.predict(te.bags)
        fold["region_level"]["CPNN (bulk-trained)"] = summarise(np.log1p(pb["bag_expr"] * 1e4), y_true, genes)
        fold["seconds"]["CPNN"] = round(time.perf_counter() - t, 1)
        fold["cpnn_best_epoch"] = cpnn_bulk.train_result.best_epoch
        for kind in () if args.skip_baselines else BASELINE_NAMES:
            t = time.perf_counter()
            bl = SlideBaseline(kind, genes, tc_slide).fit(tr.bags, tr.counts, groups=tr.sections)
            fold["region_level"][kind] = summarise(bl.predict(te.bags), y_true, genes)
            fold["seconds"][kind] = round(time.perf_counter() - t, 1)
        t = time.perf_counter()
        probe = RidgeProbe(alphas="cv").fit(np.stack([b.mean(0) for b in tr.bags]), log1p_cp10k(tr.counts),
                                            groups=tr.sections)
        fold["region_level"]["ridge (mean-pooled)"] = summarise(
            probe.predict(np.stack([b.mean(0) for b in te.bags])), y_true, genes)
        fold["seconds"]["ridge"] = round(time.perf_counter() - t, 1)

        # bulk-trained spot maps on the held-out section
        spot_true = log1p_cp10k(counts_matrix(test_s.adata, genes))
        props = read_her2st_proportions(root, test_id, "major", obs_names=list(map(str, test_s.adata.obs_names)))
        spot = {}
        models = {"CPNN bulk-trained": cpnn_bulk}
        if not args.no_spot_model:
            t = time.perf_counter()
            models["CPNN spot-supervised"] = fit_spot_model(train_s, protos, opts.model_config(),
                                                            TrainConfig(**{**SPOT_TRAIN_DEFAULTS,
                                                                           "max_epochs": args.max_epochs,
                                                                           "progress": False}),
                                                            encoder=opts.features.as_dict())
            fold["seconds"]["CPNN spot"] = round(time.perf_counter() - t, 1)
        for name, m in models.items():
            out = m.predict(test_s.features)
            w, wn = merged_weights(out["weights"], m.cell_types)
            agree = composition_agreement(w, props.to_numpy(), wn, list(props.columns))
            spot[name] = {**summarise(np.log1p(out["spot_expr"] * 1e4), spot_true, genes),
                          "stereoscope_per_type": agree["per_type"], "stereoscope_mean": agree["mean"]}
            if name == "CPNN bulk-trained" and args.figures and test_id == args.folds.split(",")[0]:
                save_figure(Path(args.figures), test_s, w, props[wn].to_numpy(), wn, agree)
        fold["spot_level"] = spot
        fold["seconds"]["fold"] = round(time.perf_counter() - t0, 1)
        results["folds"][test_id] = fold
        print(json.dumps({test_id: {k: {m: round(v["scc_mean"], 3) for m, v in fold[k].items()}
                                    for k in ("region_level", "spot_level")}, "s": fold["seconds"]}), flush=True)
    results["seconds_total"] = round(time.perf_counter() - t_start, 1)
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=float))
    return 0


def save_figure(folder: Path, sample, weights, stereo, names, agree) -> None:
    """Weight maps of the held-out section (spots only, no background: small PNG)."""
    from PIL import Image

    from cpnn.plot.spatial import composition_panel

    folder.mkdir(parents=True, exist_ok=True)
    info = sample.adata.uns["cpnn_input"]
    path = folder / f"pseudobulk_weights_{sample.sample_id}.png"
    composition_panel(path, sample.adata.obsm["spatial"], stereo, weights,
                      [f"{n} (r={agree['per_type'][n]:.2f})" for n in names], diameter_px=100.0 / info["mpp"],
                      mpp=info["mpp"],
                      title=f"{sample.sample_id} held out: CPNN trained on pseudo-bulk regions only (bottom) "
                            "vs stereoscope (top)", true_label="stereoscope", pred_label="CPNN (bulk-trained)")
    Image.open(path).convert("RGB").quantize(colors=96).save(path, optimize=True)


def table(results) -> str:
    folds = list(results["folds"].values())
    lines = ["| model | region Pearson mean | region Pearson median | region Spearman mean | region Spearman median |",
             "| --- | --- | --- | --- | --- |"]
    for name in folds[0]["region_level"]:
        vals = {k: np.mean([f["region_level"][name][k] for f in folds])
                for k in ("pcc_mean", "pcc_median", "scc_mean", "scc_median")}
        lines.append(f"| {name} | {vals['pcc_mean']:.3f} | {vals['pcc_median']:.3f} | {vals['scc_mean']:.3f} | "
                     f"{vals['scc_median']:.3f} |")
    lines += ["", "| spot level (held-out sections) | Spearman mean | Pearson mean | stereoscope r (mean over types) |",
              "| --- | --- | --- | --- |"]
    for name in folds[0]["spot_level"]:
        v = [f["spot_level"][name] for f in folds]
        lines.append(f"| {name} | {np.mean([x['scc_mean'] for x in v]):.3f} | {np.mean([x['pcc_mean'] for x in v]):.3f}"
                     f" | {np.nanmean([x['stereoscope_mean'] for x in v]):.3f} |")
    types = list(folds[0]["spot_level"]["CPNN bulk-trained"]["stereoscope_per_type"])
    lines += ["", "| per type (stereoscope major) | " + " | ".join(types) + " |", "| --- |" + " --- |" * len(types)]
    for name in folds[0]["spot_level"]:
        row = [np.nanmean([f["spot_level"][name]["stereoscope_per_type"][t] for f in folds]) for t in types]
        lines.append(f"| {name} | " + " | ".join(f"{r:.2f}" for r in row) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

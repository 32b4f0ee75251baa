"""``report.md`` of a benchmark: protocol, tables (mean ± sd over folds), figures."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import pandas as pd

SUMMARY_COLUMNS = [("pcc_mean", "Pearson mean", 3), ("pcc_median", "Pearson median", 3),
                   ("scc_mean", "Spearman mean", 3), ("scc_median", "Spearman median", 3),
                   ("n_significant", "genes q<0.05", 0), ("n_genes_constant_prediction", "constant predictions (r = 0)", 0),
                   ("composition_mean", "composition r", 3)]


def summary_table(results: pd.DataFrame) -> pd.DataFrame:
    """Mean and sd over folds per (gene set, method), methods in config order."""
    order = list(dict.fromkeys(results["method"]))
    cols = [c for c, _, _ in SUMMARY_COLUMNS] + ["n_genes", "seconds"]
    g = results.groupby(["gene_set", "method"], sort=False)[cols]
    mean, sd = g.mean(), g.std(ddof=1)
    out = mean.join(sd, lsuffix="", rsuffix="_sd")
    out["n_folds"] = g.size()
    out = out.reset_index()
    out["_o"] = out["method"].map({m: i for i, m in enumerate(order)})
    return out.sort_values(["gene_set", "_o"], kind="stable").drop(columns="_o")


def _pm(mean: float, sd: float, digits: int) -> str:
    if not np.isfinite(mean):
        return "–"
    if not np.isfinite(sd):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def markdown_summary(results: pd.DataFrame) -> List[str]:
    """Markdown lines: one table per gene set, mean ± sd over folds."""
    s = summary_table(results)
    lines: List[str] = []
    for gs, part in s.groupby("gene_set", sort=False):
        n_genes = part["n_genes"].iloc[0]
        lines += [f"**Gene set `{gs}`** ({n_genes:.0f} genes on average per fold; mean ± sd over "
                  f"{int(part['n_folds'].max())} folds)", "",
                  "| method | " + " | ".join(h for _, h, _ in SUMMARY_COLUMNS) + " | s / fold |",
                  "|---" * (len(SUMMARY_COLUMNS) + 2) + "|"]
        for _, r in part.iterrows():
            cells = [_pm(r[c], r[f"{c}_sd"], d) for c, _, d in SUMMARY_COLUMNS]
            lines.append(f"| {r['method']} | " + " | ".join(cells) + f" | {r['seconds']:.0f} |")
        lines.append("")
    return lines


def _test_label(r) -> str:
    """What a fold tested: its groups, or ``P01 → P02`` for a patient_transfer fold."""
    train_p, test_p = r.get("train_patient"), r.get("test_patient")
    if isinstance(train_p, str) and isinstance(test_p, str):
        return f"{train_p} → {test_p}"
    return str(r["test_groups"])


def markdown_per_fold(results: pd.DataFrame) -> List[str]:
    lines = ["| gene set | fold (test) | method | n test | Pearson mean | Spearman mean | q<0.05 | composition r |",
             "|---|---|---|---|---|---|---|---|"]
    for _, r in results.iterrows():
        comp = f"{r['composition_mean']:.3f}" if np.isfinite(r["composition_mean"]) else "–"
        lines.append(f"| {r['gene_set']} | {r['fold']} ({_test_label(r)}) | {r['method']} | {r['n_test']} | "
                     f"{r['pcc_mean']:.3f} | {r['scc_mean']:.3f} | {r['n_significant']}/{r['n_genes_scored']} | {comp} |")
    return lines


def markdown_selection(results: pd.DataFrame, metric: str = "scc_mean") -> List[str]:
    """What nested selection chose per method and outer fold (first gene set), with the mean
    inner score that chose it and the outer score it then got."""
    if "selected" not in results or not (results["selected"].fillna("") != "").any():
        return []
    rows = results[results["selected"].fillna("") != ""]
    first_gs = rows["gene_set"].iloc[0]
    rows = rows[rows["gene_set"] == first_gs]
    lines = [f"Chosen per outer fold on `{first_gs}` by inner folds over that fold's training groups only "
             f"(`selection.json` has every candidate's inner scores); the same choice is used for every gene set.",
             "", f"| method | fold | test | chosen | inner {metric} | outer {metric} |", "|---|---|---|---|---|---|"]
    for _, r in rows.iterrows():
        lines.append(f"| {r['method']} | {r['fold']} | {_test_label(r)} | `{r['selected']}` | "
                     f"{r['inner_score']:.3f} | {r[metric]:.3f} |")
    counts = rows.groupby("method")["selected"].agg(lambda v: v.value_counts().to_dict())
    lines += ["", "Most often chosen: " + "; ".join(
        f"{m}: " + ", ".join(f"`{k}` ×{n}" for k, n in c.items()) for m, c in counts.items()) + ".", ""]
    return lines


def _per_gene_means(per_gene: pd.DataFrame, metric: str = "pcc") -> Dict[str, Dict[str, pd.Series]]:
    out: Dict[str, Dict[str, pd.Series]] = {}
    for (gs, m), part in per_gene.groupby(["gene_set", "method"], sort=False):
        out.setdefault(gs, {})[m] = part.groupby("gene", sort=False)[metric].mean()
    return out


def make_figures(out: Path, res, cfg: Dict[str, Any], data) -> Dict[str, str]:
    """Scatter of the first two methods, box plots per method, best/worst gene maps."""
    from ..plot.report import method_boxplots, per_gene_scatter

    figs: Dict[str, str] = {}
    if res.per_gene.empty:
        return figs
    means = _per_gene_means(res.per_gene)
    method_boxplots(out / "boxplot_pcc.png", {gs: {m: v.to_numpy() for m, v in d.items()} for gs, d in means.items()},
                    title="Per-gene Pearson on held-out folds")
    figs["boxplot"] = "boxplot_pcc.png"
    first_set = next(iter(means))
    methods = list(means[first_set])
    if len(methods) >= 2:
        a, b = methods[0], methods[1]
        joined = pd.concat([means[first_set][a], means[first_set][b]], axis=1, join="inner")
        per_gene_scatter(out / "scatter_pcc.png", joined.iloc[:, 0].to_numpy(), joined.iloc[:, 1].to_numpy(), a, b,
                         title=f"gene set {first_set}: per-gene Pearson, mean over folds")
        figs["scatter"] = "scatter_pcc.png"
    maps = _gene_map_figure(out, res, cfg, data, first_set, methods[0])
    if maps:
        figs["maps"] = maps
    return figs


def _gene_map_figure(out: Path, res, cfg, data, gene_set: str, method: str):
    from .._constants import SPATIAL, UNS_INPUT
    from ..plot.report import gene_maps

    n_show = int((cfg.get("evaluation") or {}).get("map_genes", 3))
    if n_show < 1:
        return None
    fold = int(res.results.loc[(res.results["method"] == method) & (res.results["gene_set"] == gene_set), "fold"].min())
    key = (method, gene_set, fold)
    if key not in res.predictions:
        return None
    pred = res.predictions[key]
    truth = res.predictions[("__truth__", gene_set, fold)]
    ids = res.predictions[("__ids__", gene_set, fold)]
    pg = res.per_gene[(res.per_gene["method"] == method) & (res.per_gene["gene_set"] == gene_set)
                      & (res.per_gene["fold"] == fold)].reset_index(drop=True)
    ok = pg["pcc"].notna()
    order = pg.loc[ok, "pcc"].sort_values(ascending=False, kind="stable").index
    chosen = list(order[:n_show]) + [i for i in order[::-1][:n_show] if i not in set(order[:n_show])]
    # one section: the first sample of the test fold
    sid = ids[0].split(":", 1)[0]
    rows = np.array([i.split(":", 1)[0] == sid for i in ids])
    sample = next(s for s in data.samples if s.sample_id == sid)
    obs_pos = {o: k for k, o in enumerate(map(str, sample.adata.obs_names))}
    xy = np.asarray(sample.adata.obsm[SPATIAL], float)[[obs_pos[i.split(":", 1)[1]] for i in ids[rows]]]
    info = dict(sample.adata.uns.get(UNS_INPUT, {}))
    mpp, diam = info.get("mpp"), info.get("spot_diameter_um")
    diameter_px = float(diam) / float(mpp) if mpp and diam else 0.8 * _min_spacing(xy)
    image, scale = None, 1.0
    if sample.meta.get("image") is not None:
        image = sample.meta["image"]
    elif info.get("image_path") and Path(str(info["image_path"])).exists():
        from ..image import open_slide

        with open_slide(info["image_path"], mpp=mpp) as sl:
            image = sl.thumbnail(1200)
            scale = image.shape[1] / sl.dimensions[0]
        # crop to the spots (plus one spot of margin) so the tissue fills the panels
        pad = diameter_px
        x0, y0 = np.maximum(0, np.floor((xy.min(0) - pad) * scale)).astype(int)
        x1, y1 = np.ceil((xy.max(0) + pad) * scale).astype(int)
        image = image[y0:y1, x0:x1]
        xy = xy - np.array([x0, y0]) / scale
    genes = [pg.loc[i, "gene"] for i in chosen]
    gene_maps(out / "gene_maps.png", xy, truth[rows][:, chosen], pred[rows][:, chosen], genes,
              [float(pg.loc[i, "pcc"]) for i in chosen], diameter_px, image=image, image_scale=scale,
              method=method,
              title=f"{method}, gene set {gene_set}, held-out {sid} (fold {fold}): best {min(n_show, len(order))} "
                    "and worst genes")
    return "gene_maps.png"


def _min_spacing(xy: np.ndarray) -> float:
    from scipy.spatial import cKDTree

    if len(xy) < 2:
        return 1.0
    d, _ = cKDTree(xy).query(xy, k=2)
    return float(np.median(d[:, 1]))


def write_report(out: Path, res, cfg: Dict[str, Any], data) -> Path:
    """Write ``report.md`` (and its figures) into ``out``."""
    out = Path(out)
    figs = make_figures(out, res, cfg, data) if (cfg.get("evaluation") or {}).get("figures", True) else {}
    m = res.meta
    mach = m["machine"]
    by = m["split_by"]
    if cfg["split"].get("scheme") == "patient_transfer":
        split_txt = (f"Each fold **trains on every section of one patient and tests on the next patient's "
                     f"sections** ({m['n_groups']} sections from {m['n_patients']} patients; `train_patient` and "
                     "`test_patient` in `splits.json`): new patients, as a user meets them. Validation parts and "
                     "inner folds are whole sections of the training patient.")
    elif by == "section":
        split_txt = (f"Folds are grouped **by section** ({m['n_groups']} sections from {m['n_patients']} "
                     f"patient(s)); no section is on two sides of a fold.")
        if m["n_patients"] < m["n_groups"]:
            split_txt += (" Sections of one patient appear in training and test folds, so these numbers measure "
                          "generalisation to new sections, not to new patients.")
    else:
        split_txt = f"Folds are grouped **by patient** ({m['n_patients']} patients); no patient is on two sides."
    sp = cfg["split"]
    gs_lines = []
    for gs in cfg["gene_sets"]:
        sizes = [v["genes"] for k, v in res.gene_sets.items() if k.startswith(gs["name"] + "/")]
        missing = [v["n_missing"] for k, v in res.gene_sets.items() if k.startswith(gs["name"] + "/")]
        desc = {"list": f"the list {Path(str(gs.get('path'))).name}", "top_expressed": f"the {gs.get('n')} most "
                "expressed genes (mean CP10k) of the training spots", "top_variable": f"the {gs.get('n')} most "
                "variable genes (variance of log1p CP10k) of the training spots"}[gs["kind"]]
        lo, hi = (min(map(len, sizes)), max(map(len, sizes))) if sizes else (0, 0)
        n_txt = f"{lo}" if lo == hi else f"{lo}–{hi}"
        extra = f"; {max(missing)} listed genes not measured in every sample or absent from the reference" \
            if missing and max(missing) else ""
        stable = ""
        if len(sizes) > 1:
            stable = " (the same genes in every fold)" if all(s == sizes[0] for s in sizes) else \
                " (recomputed per fold)"
        gs_lines.append(f"  - `{gs['name']}`: {desc}; {n_txt} genes per fold{stable}{extra}.")
    meth_lines = []
    for mcfg in cfg["methods"]:
        opts = ", ".join(f"{k}={v}" for k, v in mcfg.items() if k not in ("name", "kind"))
        meth_lines.append(f"- `{mcfg['name']}`: {mcfg['kind']}" + (f" ({opts})" if opts else ""))
    lines = [
        "# cpnn benchmark report",
        "",
        f"Data: {m['data_kind']} — samples {', '.join(m['samples'])}; {m['n_observations']} observations. "
        f"Seed {cfg.get('seed', 0)}.",
        "",
        "## Protocol",
        "",
        f"- {split_txt} Scheme: {sp['scheme']}; splits in `splits.json`.",
        f"- Early stopping uses a validation part of the training folds (val_fraction {sp.get('val_fraction')}, "
        "whole groups when at least 3 training groups remain); the ridge penalty is chosen by inner "
        "cross-validation over training groups; options listed as `candidates` are chosen per fold by inner "
        "folds over that fold's training groups (see *Nested selection*). No choice of any kind is made on the "
        "test fold: methods receive the test features only.",
        f"- Gene sets, computed per fold from the training spots only, among the {m['n_candidate_genes']} genes "
        f"measured in every sample{' and present in the single-cell reference' if m['n_candidate_genes'] < m['n_genes_measured_everywhere'] else ''}:",
        *gs_lines,
        "- Metric: per gene, Pearson and Spearman across the test spots of log1p CP10k (normalised over the "
        "gene set), then mean and median over genes; a gene predicted as a constant scores 0, genes constant in "
        "the test truth are left out (no method can be scored on them); *genes q<0.05* = genes with a significant positive Pearson (one-sided, Benjamini–Hochberg).",
        "- Composition r: per cell type, Pearson across test spots between predicted weight and reference "
        "proportion, mean over types" + (f" (types mapped: {m['composition_mapping']})" if m['composition_mapping'] else "")
        + ".",
        "",
        "Methods:",
        *meth_lines,
        "",
        "## Results",
        "",
        *markdown_summary(res.results),
        "<details><summary>per fold</summary>",
        "",
        *markdown_per_fold(res.results),
        "",
        "</details>",
        "",
    ]
    sel_lines = markdown_selection(res.results, (res.meta.get("selection") or {}).get("metric", "scc_mean"))
    if sel_lines and (res.meta.get("selection") or {}).get("rule") == "one_se":
        sel_lines = ["Rule `one_se`: a candidate replaces the first one listed only when it beats it by more than one "
                     "standard error of their paired inner-fold differences.", "", *sel_lines]
    if sel_lines:
        lines += ["## Nested selection", "", *sel_lines]
    if figs:
        lines += ["## Figures", ""]
        for key, cap in (("boxplot", "Per-gene Pearson per method"), ("scatter", "Per-gene Pearson, two methods"),
                         ("maps", "Best and worst genes on a held-out section")):
            if key in figs:
                lines += [f"![{cap}]({figs[key]})", ""]
    lines += [
        "## Run",
        "",
        f"Wall time {m['seconds_total']:.0f} s (prototypes and deconvolution {m['seconds_prototypes_and_deconvolution']:.0f} s); "
        f"machine: {mach['cpu']}, {mach['cores_available']} cores available, torch threads {mach['torch_threads']}, "
        f"Python {mach['python']}, {mach['os']}; cpnn {m['cpnn_version']}.",
        "Files: `results.csv` (method × fold × gene set), `per_gene.csv`, `gene_sets.json`, `splits.json`, "
        "`config.resolved.yaml`, `meta.json`.",
        "",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path

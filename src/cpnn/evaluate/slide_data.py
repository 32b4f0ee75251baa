"""The ``bulk`` data kind of ``cpnn benchmark``: whole slides with bulk RNA-seq.

Config (``data:`` section)::

    data:
      kind: bulk
      bulk: PATH                 # GDC download folder (STAR files) or samples x genes table
      sample_sheet: TSV          # the GDC sample sheet (optional for tables)
      features_dir: DIR          # CLAM/TRIDENT '{slide}.h5' files, one per slide
      # or, instead of the three: the TCGA-shaped synthetic cohort, written once into dir
      synthetic: {dir: ..., n_patients: 12, seed: 0}
      proportions: true          # synthetic only: score slide weights against the true composition
    reference: {path: REF.h5ad, label: cell_type}   # path 'synthetic': the cohort's reference

Slides are matched to RNA samples and pooled per sample exactly as ``cpnn fit --level
bulk`` does (:func:`cpnn.workflows.bulk.load_slide_bags`); every observation is one sample
(a bag of tiles), grouped by patient. What was matched and left out is printed and stored
in the resolved config (``data.matching``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict

import numpy as np
import pandas as pd

from ..errors import CPNNInputError

_SYNTHETIC_KEYS = ("n_patients", "seed", "n_types", "n_genes", "image_px", "tile_px", "feature_dim",
                   "feature_noise", "n_ref_cells")


def synthetic_cohort(spec: Dict[str, Any], progress: bool = True) -> Path:
    """The TCGA-shaped cohort of ``spec`` (``dir`` + :func:`write_tcga_cohort` arguments),
    written unless ``dir`` already holds one made with the same arguments."""
    from ..workflows.synthetic_tcga import write_tcga_cohort

    if not spec.get("dir"):
        raise CPNNInputError("data.synthetic needs a dir to write the cohort to", field="data.synthetic.dir",
                             fix="e.g. synthetic: {dir: ~/.cache/cpnn/tcga_synthetic, n_patients: 12}")
    unknown = set(spec) - set(_SYNTHETIC_KEYS) - {"dir"}
    if unknown:
        raise CPNNInputError(f"unknown data.synthetic option(s) {sorted(unknown)}", field="data.synthetic",
                             fix=f"use dir and {', '.join(_SYNTHETIC_KEYS)}")
    root = Path(spec["dir"]).expanduser()
    params = {k: spec[k] for k in _SYNTHETIC_KEYS if k in spec}
    stamp = root / "params.json"
    if not (stamp.is_file() and json.loads(stamp.read_text()) == params and (root / "truth.json").is_file()):
        if progress:
            print(f"writing the TCGA-shaped synthetic cohort to {root} ({params})", flush=True)
        write_tcga_cohort(root, **params)
        stamp.write_text(json.dumps(params))
    return root


def load_bulk_data(cfg: Dict[str, Any], progress: bool = True):
    """:class:`cpnn.evaluate.benchmark.BenchmarkData` of a ``kind: bulk`` config: one
    sample holding every matched bag (``features`` a 1-D object array of bags)."""
    from ..prototypes import read_reference
    from ..workflows.bulk import as_bag_array, load_slide_bags
    from ..workflows.spatial import SpatialSample
    from .benchmark_data import BenchmarkData

    d = cfg["data"]
    ref_cfg = dict(cfg.get("reference") or {})
    root = synthetic_cohort(d["synthetic"], progress) if d.get("synthetic") else None
    if root is not None:
        d.setdefault("bulk", str(root / "gdc"))
        d.setdefault("sample_sheet", str(root / "gdc_sample_sheet.tsv"))
        d.setdefault("features_dir", str(root / "features"))
        if ref_cfg.get("path") in (None, "synthetic"):
            ref_cfg["path"] = str(root / "reference.h5ad")
            cfg["reference"] = {**(cfg.get("reference") or {}), "path": ref_cfg["path"]}
    for key in ("bulk", "features_dir"):
        if not d.get(key):
            raise CPNNInputError(f"a bulk benchmark needs data.{key}", field=f"data.{key}",
                                 fix="give bulk (GDC folder or table), sample_sheet and features_dir, "
                                     "or synthetic: {dir: ...}")
    if not ref_cfg.get("path"):
        raise CPNNInputError("a bulk benchmark maps genes to the reference's names", field="reference.path",
                             fix="add reference: {path: REF.h5ad, label: celltype_major}")
    sb = load_slide_bags(d["bulk"], ref_cfg["path"], sample_sheet=d.get("sample_sheet"),
                         features_dir=d["features_dir"], progress=progress)
    if sb.adata.n_obs < 4:
        raise CPNNInputError(f"only {sb.adata.n_obs} RNA sample(s) have a slide", field="data",
                             fix="check the slide names (TCGA barcodes) against the sample sheet")
    sp = cfg.get("split") or {}
    n_folds = len(set(sb.adata.obs["patient"])) if sp.get("scheme") == "leave_one_group_out" else int(
        sp.get("n_folds", 4))
    if sb.adata.n_obs < 3 * n_folds:
        # per-gene correlation across the test slides of a fold needs >= 3 of them
        raise CPNNInputError(f"{sb.adata.n_obs} matched samples give test folds of fewer than 3 slides "
                             f"({n_folds} folds)", field="split",
                             fix="use split: {by: patient, scheme: k_fold, n_folds: 4} (the paper's) with at "
                                 f"least {3 * min(n_folds, 4)} matched samples, or fewer folds")
    d["matching"] = sb.matching.report()  # lands in config.resolved.yaml
    d["genes_mapped"] = sb.gene_report
    # gene maps need spot coordinates; a slide is one observation
    cfg["evaluation"] = {**(cfg.get("evaluation") or {}), "map_genes": 0}
    cfg["features"] = {**(cfg.get("features") or {}), "encoder": sb.record.get("name"),
                       "patch_um": sb.record.get("patch_um"), "out_px": sb.record.get("out_px"),
                       "context_rings": 0, "subpatch_grid": 1}
    sample = SpatialSample("bulk", sb.adata, as_bag_array(sb.bags), meta={"matching": sb.matching.report()})
    reference = read_reference(ref_cfg["path"], ref_cfg.get("label", "celltype_major"), batch_key=ref_cfg.get("batch"))
    props: Dict[str, pd.DataFrame] = {}
    if d.get("proportions") is True:
        d["proportions"] = {"level": "true"}  # the benchmark reads a mapping
    if d.get("proportions") and root is not None:
        truth = json.loads((root / "truth.json").read_text())
        table = pd.DataFrame(truth["sample_proportions"], index=truth["cell_types"]).T
        props["bulk"] = table.loc[list(map(str, sb.adata.obs_names))].astype(np.float64)
    elif d.get("proportions"):
        raise CPNNInputError("true proportions exist for the synthetic cohort only", field="data.proportions",
                             fix="drop proportions, or use synthetic: {dir: ...}")
    return BenchmarkData([sample], props, reference, description="bulk")


def load_pseudobulk_data(cfg: Dict[str, Any], progress: bool = True, *, load_source):
    """:class:`cpnn.evaluate.benchmark.BenchmarkData` of a ``kind: pseudobulk`` config:
    the spatial data of ``data.source`` (any spot kind, e.g. ``{kind: her2st, root: ...,
    sections: [...]}``, read by ``load_source``, i.e. :func:`cpnn.evaluate.benchmark.load_data`)
    cut into regions of ``block_spots`` x ``block_spots`` spot pitches
    (:func:`cpnn.workflows.pseudobulk.region_bags`, as ``cpnn fit --level bulk`` on spots);
    one observation per region: the sum of its spots' counts and a bag of their (sub-)patch
    features. One sample per section, so ``split.by: section`` holds whole sections out."""
    from .._constants import PATIENT, UNS_INPUT
    from ..workflows.bulk import as_bag_array
    from ..workflows.pseudobulk import region_bags
    from ..workflows.spatial import SpatialSample
    from .benchmark_data import BenchmarkData

    import anndata as ad

    d = cfg["data"]
    src = dict(d.get("source") or {})
    if src.get("kind") in (None, "bulk", "pseudobulk"):
        raise CPNNInputError("a pseudobulk benchmark needs the spatial data it pools", field="data.source",
                             fix="e.g. source: {kind: her2st, root: ${CPNN_DATA_DIR}/her2st, sections: [C2, C3]}")
    block, min_spots = int(d.get("block_spots", 3)), int(d.get("min_spots", 2))
    spots = load_source({**cfg, "data": src}, progress)
    genes = None
    for s in spots.samples:
        names = list(map(str, s.adata.var_names))
        genes = names if genes is None else [g for g in genes if g in set(names)]
    samples = []
    for s in spots.samples:
        rb = region_bags([s], genes, block_spots=block, min_spots=min_spots)
        keep = np.flatnonzero(rb.counts.sum(1) > 0)
        obs = pd.DataFrame({"section": s.sample_id, "n_spots": [len(rb.members[i]) for i in keep]},
                           index=pd.Index([rb.names[i] for i in keep]))
        if PATIENT in s.adata.obs:
            obs[PATIENT] = str(s.adata.obs[PATIENT].iloc[0])
        elif (s.adata.uns.get(UNS_INPUT) or {}).get("patient_id"):
            obs[PATIENT] = str(s.adata.uns[UNS_INPUT]["patient_id"])
        adata = ad.AnnData(X=rb.counts[keep].astype(np.float32), obs=obs, var=pd.DataFrame(index=pd.Index(genes)))
        samples.append(SpatialSample(s.sample_id, adata, as_bag_array([rb.bags[i] for i in keep])))
        if progress:
            print(f"{s.sample_id}: {len(keep)} regions of up to {block} x {block} spots", flush=True)
    cfg["evaluation"] = {**(cfg.get("evaluation") or {}), "map_genes": 0}  # maps need spot coordinates
    return BenchmarkData(samples, {}, spots.reference, description="pseudobulk")

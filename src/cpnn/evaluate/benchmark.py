"""``cpnn benchmark``: methods x folds x gene sets from one config, honestly.

The protocol, enforced here rather than left to the user:

* folds are grouped (by patient, or by section — the report says which), seeded, checked
  for leakage and written to ``splits.json`` before anything is trained;
* gene panels are computed per fold from the training observations only;
* each method gets the training part (with the fold's validation part marked, for early
  stopping) and the test *features* only — never the test targets;
* a method entry's ``candidates`` (option -> list of values) are chosen per outer fold by
  inner folds over that fold's training groups only (:mod:`cpnn.evaluate.selection`);
  ``results.csv`` says what each fold chose, ``selection.json`` every inner score;
* every method is scored on the same target: per gene, Pearson and Spearman across the
  test observations of log1p CP10k, then mean / median over genes, constant genes
  counted, genes with significant positive Pearson (BH q < 0.05) counted;
* composition agreement (per cell type, Pearson across observations between weight and
  reference proportion, then the mean over types) where reference proportions exist.

Outputs in ``DIR``: ``config.resolved.yaml``, ``splits.json``, ``results.csv`` (one row
per method x fold x gene set), ``per_gene.csv``, ``gene_sets.json``, ``report.md`` and
figures (see :mod:`cpnn.evaluate.report`).
"""
from __future__ import annotations

import copy
import os
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import pandas as pd

from ..errors import CPNNInputError
from .genesets import kmeans_labels, read_gene_list, select_gene_set
from .benchmark_data import BenchmarkData
from .methods import MethodContext, TestData, TrainData, get_method
from .metrics import composition_agreement, expression_metrics, to_log1p_cp10k
from .selection import DEFAULT_SELECTION, Selection, candidate_grid, check_rule, describe, select

#: stereoscope's ``major`` names in HER2ST vs ``celltype_major`` of the Wu et al. atlas
HER2ST_MAJOR_MAPPING = {"Cancer Epithelial": "Epithelial", "Normal Epithelial": "Epithelial",
                        "Plasmablasts": "Plasma Cells"}

#: outer split schemes of ``split.scheme`` (see :func:`make_splits`)
SPLIT_SCHEMES = ("leave_one_group_out", "k_fold", "patient_transfer")

DEFAULTS: Dict[str, Any] = {
    "seed": 0,
    "split": {"by": "patient", "scheme": "leave_one_group_out", "n_folds": 4, "val_fraction": 0.2},
    "features": {"encoder": "efficientnet-lite0", "patch_um": 112.0, "out_px": 224, "tta": "none",
                 "subpatch_grid": 1, "cache_dir": None, "file_pattern": "{sample}.h5"},
    "reference": None,
    "gene_sets": [{"name": "top250_expressed", "kind": "top_expressed", "n": 250}],
    "methods": [{"name": "cpnn", "kind": "cpnn"}, {"name": "ridge_cv", "kind": "ridge", "alphas": "cv"}],
    "evaluation": {"min_counts": 1, "figures": True, "map_genes": 3},
    "selection": dict(DEFAULT_SELECTION),
}

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


# --------------------------------------------------------------------------- config
def _expand(obj: Any, where: str = "") -> Any:
    if isinstance(obj, dict):
        return {k: _expand(v, f"{where}.{k}" if where else str(k)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_expand(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, str):
        missing = [m for m in _VAR.findall(obj) if m not in os.environ]
        if missing:
            raise CPNNInputError(f"config value {obj!r} uses unset environment variable(s) {missing}",
                                 field=where, fix=f"export {missing[0]}=... (or use --data-dir for CPNN_DATA_DIR)")
        return os.path.expanduser(_VAR.sub(lambda m: os.environ[m.group(1)], obj))
    return obj


def resolve_config(cfg: Dict[str, Any], data_dir: Optional[str] = None) -> Dict[str, Any]:
    """Defaults <- ``cfg``; ``${VAR}`` expanded (``data_dir`` sets ``CPNN_DATA_DIR``); validated."""
    if data_dir is not None:
        os.environ["CPNN_DATA_DIR"] = str(Path(data_dir).resolve())
    elif "CPNN_DATA_DIR" not in os.environ:
        from ..utils import find_data_dir

        found = find_data_dir()
        if found is not None:
            os.environ["CPNN_DATA_DIR"] = str(found.resolve())
    from .config_check import check_benchmark_keys

    check_benchmark_keys(cfg or {}, [*DEFAULTS, "data"])
    out = copy.deepcopy(DEFAULTS)
    for key, value in (cfg or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    out = _expand(out)
    if "data" not in out or not isinstance(out["data"], dict) or "kind" not in out["data"]:
        raise CPNNInputError("the config has no data: section with a kind", field="data.kind",
                             fix="e.g. data: {kind: her2st, root: ${CPNN_DATA_DIR}/her2st, sections: [C2, C3]}")
    sp = out["split"]
    if sp["by"] not in ("patient", "section"):
        raise CPNNInputError(f"split.by must be patient or section, got {sp['by']!r}", field="split.by")
    if sp["scheme"] not in SPLIT_SCHEMES:
        raise CPNNInputError(f"unknown split.scheme {sp['scheme']!r}", field="split.scheme",
                             fix=f"use one of {', '.join(SPLIT_SCHEMES)}")
    if sp["scheme"] == "patient_transfer" and sp["by"] != "section":
        raise CPNNInputError("split.scheme patient_transfer trains on one patient's sections, so its groups "
                             "are sections", field="split.by", fix="use split: {by: section, scheme: patient_transfer}")
    names = [m.get("name") for m in out["methods"]]
    if any(not n for n in names) or len(set(names)) != len(names):
        raise CPNNInputError(f"every method needs a unique name (got {names})", field="methods[].name")
    sel = out["selection"]
    unknown = set(sel) - set(DEFAULT_SELECTION)
    if unknown:
        raise CPNNInputError(f"unknown selection option(s) {sorted(unknown)}", field="selection",
                             fix=f"use {', '.join(DEFAULT_SELECTION)}")
    check_rule(sel["rule"])
    if int(sel["max_inner_folds"]) < 2:
        raise CPNNInputError(f"selection.max_inner_folds must be >= 2, got {sel['max_inner_folds']}",
                             field="selection.max_inner_folds", fix="use e.g. 4")
    for m in out["methods"]:
        get_method(m.get("kind", ""))
        cands = m.get("candidates") or {}
        clash = {"name", "kind", "candidates"} & set(cands)
        if clash:
            raise CPNNInputError(f"method {m.get('name')}: {sorted(clash)} cannot be a candidate option",
                                 field=f"methods[{m.get('name')}].candidates")
        candidate_grid(cands, where=f"methods[{m.get('name')}].candidates",
                       max_candidates=int(sel["max_candidates"]))
        from ..workflows.feature_variants import parse_variant

        for v in [m.get("features", "base"), *(cands.get("features") or [])]:
            parse_variant(v)
    gnames = [g.get("name") for g in out["gene_sets"]]
    if any(not n for n in gnames) or len(set(gnames)) != len(gnames):
        raise CPNNInputError(f"every gene set needs a unique name (got {gnames})", field="gene_sets[].name")
    from ..workflows.features import check_subpatch_grid

    out["features"]["subpatch_grid"] = check_subpatch_grid(out["features"].get("subpatch_grid") or 1)
    return out


def load_config(path, data_dir: Optional[str] = None) -> Dict[str, Any]:
    """Read and resolve a benchmark YAML file."""
    import yaml

    try:
        with open(path) as fh:
            cfg = yaml.safe_load(fh) or {}
    except FileNotFoundError as exc:
        raise CPNNInputError("benchmark config not found", path=path) from exc
    except yaml.YAMLError as exc:
        raise CPNNInputError(f"invalid YAML: {exc}", path=path) from exc
    if not isinstance(cfg, dict):
        raise CPNNInputError("a benchmark config must be a mapping", path=path)
    from .config_check import check_benchmark_keys

    check_benchmark_keys(cfg, [*DEFAULTS, "data"], path)  # again here, to name the file
    return resolve_config(cfg, data_dir)


# --------------------------------------------------------------------------- data
def load_data(cfg: Dict[str, Any], progress: bool = True) -> BenchmarkData:
    """Samples with features (read from the cache or extracted), proportions and reference."""
    from ..workflows.spatial import load_inputs

    d = cfg["data"]
    kind = d["kind"]
    feat = cfg["features"]
    if kind == "bulk":  # whole slides with bulk RNA-seq: one observation per sample, a bag of tiles
        from .slide_data import load_bulk_data

        return load_bulk_data(cfg, progress)
    if kind == "pseudobulk":  # regions of spatial data: summed counts, a bag of their spots' patches
        from .slide_data import load_pseudobulk_data

        return load_pseudobulk_data(cfg, progress, load_source=load_data)
    if kind == "synthetic":
        samples, reference = _synthetic_samples(d, feat, progress)
    else:
        need_image = not feat.get("features_dir")
        if kind == "her2st":
            samples = load_inputs(her2st=d["root"], sections=d.get("sections"), require_image=need_image)
        elif kind == "visium":
            samples = load_inputs(visium=d["paths"], image=d.get("images"), mpp=d.get("mpp"))
        elif kind == "hest":
            samples = load_inputs(hest=d["root"], hest_ids=d.get("sample_ids"), mpp=d.get("mpp"),
                                  require_image=need_image)
        elif kind == "h5ad":
            samples = load_inputs(h5ad=d["paths"], image=d.get("images"), mpp=d.get("mpp"), require_image=need_image)
        else:
            raise CPNNInputError(f"unknown data kind {kind!r}", field="data.kind",
                                 fix="use her2st, visium, hest, h5ad, synthetic, bulk or pseudobulk")
        _attach(samples, feat, progress)
        reference = None
    ref_cfg = cfg.get("reference")
    if ref_cfg and ref_cfg.get("path") and ref_cfg["path"] != "synthetic":
        from ..prototypes import read_reference

        reference = read_reference(ref_cfg["path"], ref_cfg.get("label", "celltype_major"),
                                   batch_key=ref_cfg.get("batch"))
    props: Dict[str, pd.DataFrame] = {}
    pcfg = d.get("proportions")
    if pcfg and kind == "her2st":
        from ..data import read_her2st_proportions

        for s in samples:
            props[s.sample_id] = read_her2st_proportions(d["root"], s.sample_id, level=pcfg.get("level", "major"),
                                                         obs_names=list(map(str, s.adata.obs_names)))
    elif pcfg and kind == "synthetic":
        from .._constants import TRUE_PROPORTIONS

        for s in samples:
            props[s.sample_id] = pd.DataFrame(np.asarray(s.adata.obsm[TRUE_PROPORTIONS]),
                                              index=list(map(str, s.adata.obs_names)),
                                              columns=list(s.adata.uns["cell_types"]))
    return BenchmarkData(samples, props, reference, description=kind)


def _attach(samples, feat: Dict[str, Any], progress: bool) -> None:
    from ..workflows.context import context_features

    _attach_raw(samples, feat, progress)
    rings = float(feat.get("context_rings", 0.0) or 0.0)
    for s in samples:  # every method sees the same (context) features
        s.meta["raw_features"] = s.features  # before context: feature variants start from these
        s.features = context_features(s.features, s.adata.obsm["spatial"], rings)


def _attach_raw(samples, feat: Dict[str, Any], progress: bool) -> None:
    from ..workflows.spatial import check_feature_grid, read_features_for

    if feat.get("features_dir"):
        for s in samples:
            s.features = read_features_for(s, Path(feat["features_dir"]))
            check_feature_grid(s.features, feat.get("subpatch_grid", 1),
                               Path(feat["features_dir"]) / f"{s.file_stem}.h5")
        return
    from ..encoders import create_encoder
    from ..workflows.features import spot_features

    encoder = None
    for s in samples:
        cache = None
        if feat.get("cache_dir"):
            cache = Path(feat["cache_dir"]) / _cache_name(feat, s.sample_id)
        if encoder is None:
            encoder = create_encoder(feat.get("encoder", "efficientnet-lite0"))
        s.features = spot_features(s.adata, encoder, patch_um=float(feat.get("patch_um", 112.0)),
                                   out_px=feat.get("out_px"), cache_path=cache, tta=feat.get("tta", "none"),
                                   progress=progress, subpatch_grid=feat.get("subpatch_grid", 1))


def _cache_name(feat: Dict[str, Any], sample_id: str) -> str:
    """Feature file name of a sample: ``file_pattern`` with ``{sample}``, ``{tta}``, ``{grid}``
    filled; sub-patch features get a ``_grid{g}`` suffix unless the pattern names ``{grid}``
    (so that one cache folder can hold both kinds)."""
    pattern = feat.get("file_pattern", "{sample}.h5")
    grid = feat.get("subpatch_grid", 1)
    name = pattern.format(sample=sample_id, tta=feat.get("tta", "none"), grid=grid)
    if grid > 1 and "{grid}" not in pattern:
        stem, dot, ext = name.rpartition(".")
        name = f"{stem}_grid{grid}.{ext}" if dot else f"{name}_grid{grid}"
    return name


def _synthetic_samples(d: Dict[str, Any], feat: Dict[str, Any], progress: bool):
    from ..data.synthetic import make_synthetic_cohort
    from ..encoders import create_encoder
    from ..image import ArraySlide
    from ..workflows.features import spot_features
    from ..workflows.spatial import SpatialSample

    cohort = make_synthetic_cohort(**(d.get("params") or {}))
    encoder = create_encoder(feat.get("encoder", "efficientnet-lite0"))
    samples = []
    for sl in cohort.slides:
        cache = (Path(feat["cache_dir"]) / _cache_name({**feat, "file_pattern": "{sample}.h5"}, sl.slide_id)
                 if feat.get("cache_dir") else None)
        f = spot_features(sl.spots, encoder, slide=ArraySlide(sl.image, cohort.mpp),
                          patch_um=float(feat.get("patch_um", 100.0)), out_px=feat.get("out_px"),
                          cache_path=cache, tta=feat.get("tta", "none"), progress=progress,
                          subpatch_grid=feat.get("subpatch_grid", 1))
        samples.append(SpatialSample(sl.slide_id, sl.spots, f, meta={"image": sl.image}))
    from ..workflows.context import context_features

    rings = float(feat.get("context_rings", 0.0) or 0.0)
    for s in samples:  # the same context as real data (it was skipped here before 2026-12-07)
        s.meta["raw_features"] = s.features
        s.features = context_features(s.features, s.adata.obsm["spatial"], rings)
    return samples, cohort.reference


# --------------------------------------------------------------------------- helpers
def _group_labels(samples, by: str) -> np.ndarray:
    from .._constants import PATIENT, UNS_INPUT

    out = []
    for s in samples:
        if by == "section":
            out.append(np.full(s.adata.n_obs, s.sample_id, dtype=object))
            continue
        if PATIENT in s.adata.obs:
            out.append(s.adata.obs[PATIENT].astype(str).to_numpy(dtype=object))
        else:
            pid = s.adata.uns.get(UNS_INPUT, {}).get("patient_id")
            if not pid:
                raise CPNNInputError(f"sample {s.sample_id} has no patient id", field="obs['patient']",
                                     fix="set the patient column, or split.by: section (and say so)")
            out.append(np.full(s.adata.n_obs, str(pid), dtype=object))
    return np.concatenate(out)


def make_splits(groups: Sequence[str], split_cfg: Dict[str, Any], seed: int, ids: Sequence[str],
                patients: Optional[Sequence[str]] = None) -> List[dict]:
    """Grouped, seeded folds (``cpnn.data.splits``), checked for leakage.

    ``patients`` (one label per observation) is needed by ``patient_transfer`` only.
    """
    from ..data.splits import check_no_leakage, grouped_folds, leave_one_group_out, patient_transfer

    vf = float(split_cfg.get("val_fraction", 0.2))
    seed = int(split_cfg.get("seed", seed))
    if split_cfg["scheme"] == "patient_transfer":
        if patients is None:
            raise CPNNInputError("split.scheme patient_transfer needs a patient label per observation",
                                 field="obs['patient']", fix="give every sample its patient id")
        folds = patient_transfer(groups, patients, seed=seed, val_fraction=vf)
    elif split_cfg["scheme"] == "leave_one_group_out":
        folds = leave_one_group_out(groups, seed=seed, val_fraction=vf)
    else:
        folds = grouped_folds(groups, n_folds=int(split_cfg.get("n_folds", 4)), seed=seed, val_fraction=vf)
    check_no_leakage(folds, groups)
    return folds


def _common_genes(samples) -> List[str]:
    common = None
    for s in samples:
        names = list(map(str, s.adata.var_names))
        common = names if common is None else [g for g in common if g in set(names)]
    return common or []


def _dense(x) -> np.ndarray:
    return np.asarray(x.toarray() if hasattr(x, "toarray") else x, dtype=np.float32)


class _PrototypeCache:
    """Prototypes per (label, method, genes) and deconvolutions per (prototypes, rows)."""

    def __init__(self, reference, ref_cfg: Dict[str, Any], seed: int) -> None:
        self.reference = reference
        self.cfg = ref_cfg or {}
        self.seed = seed
        self._qc = None
        self._protos: Dict[tuple, Any] = {}
        self._dec: Dict[tuple, Any] = {}
        self._parents: Dict[tuple, Dict[str, str]] = {}
        self.seconds = 0.0

    def qc_reference(self):
        if self._qc is None:
            from ..prototypes import reference_qc

            if self.reference is None:
                raise CPNNInputError("a cpnn method needs a single-cell reference", field="reference.path",
                                     fix="add reference: {path: ..., label: celltype_major}")
            self._qc = reference_qc(self.reference, None, **(self.cfg.get("qc") or {}))
        return self._qc

    def genes(self) -> List[str]:
        return list(map(str, self.qc_reference().var_names))

    def _labelled(self, label: str):
        ref = self.qc_reference()
        if label in ref.obs:
            return ref
        m = re.fullmatch(r"kmeans(\d+)", label or "")
        if not m:
            raise CPNNInputError(f"reference has no column {label!r}", field="methods[].label",
                                 fix=f"use one of {list(ref.obs.columns)} or kmeans<k>")
        ref.obs[label] = kmeans_labels(ref, int(m.group(1)), seed=self.seed)
        return ref

    def prototypes(self, genes: Sequence[str], label: Optional[str] = None, method: str = "regression"):
        import warnings

        from ..prototypes import build_prototypes

        label = label or self.cfg.get("label", "celltype_major")
        key = (label, method, tuple(genes))
        if key not in self._protos:
            t0 = time.perf_counter()
            ref = self._labelled(label)
            counts = ref.obs[label].astype(str).value_counts()
            small = counts[counts < int(self.cfg.get("min_cells_per_type", 3))].index
            if len(small):
                ref = ref[~ref.obs[label].astype(str).isin(small)].copy()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                p = build_prototypes(ref, label, method=method, batch_key=self.cfg.get("batch"),
                                     genes=list(genes), seed=self.seed)
            p.provenance["types_dropped_few_cells"] = list(map(str, small))
            self._protos[key] = p
            self.seconds += time.perf_counter() - t0
        return self._protos[key]

    def parent_types(self, label: Optional[str], parent: Optional[str]) -> Dict[str, str]:
        """Each ``label`` type -> the ``parent`` type most of its reference cells carry.

        Lets a model with finer types (``celltype_subset``) be compared with proportions
        given at a coarser level (stereoscope's ``major``): its weights are summed per
        parent type. Empty when either column is missing (e.g. k-means labels).
        """
        if not label or not parent or label == parent:
            return {}
        if (label, parent) not in self._parents:  # asked once per method, fold and gene set
            ref = self.qc_reference()
            if label not in ref.obs or parent not in ref.obs:
                self._parents[label, parent] = {}
            else:
                pairs = pd.crosstab(ref.obs[label].astype(str), ref.obs[parent].astype(str))
                self._parents[label, parent] = {str(child): str(row.idxmax()) for child, row in pairs.iterrows()}
        return self._parents[label, parent]

    def deconvolution(self, key: tuple, protos, counts: np.ndarray, **kw):
        from ..prototypes import deconvolve

        full = key + (id(protos), tuple(sorted(kw.items())))
        if full not in self._dec:
            t0 = time.perf_counter()
            self._dec[full] = deconvolve(counts, protos.values, seed=self.seed, **kw)
            self.seconds += time.perf_counter() - t0
        return self._dec[full]


def _aggregate_weights(weights: np.ndarray, types: Sequence[str], mapping: Dict[str, str]):
    """Sum weight columns whose types map to the same reference name."""
    names: List[str] = []
    cols: List[np.ndarray] = []
    for k, t in enumerate(types):
        target = mapping.get(t, t)
        if target in names:
            cols[names.index(target)] = cols[names.index(target)] + weights[:, k]
        else:
            names.append(target)
            cols.append(weights[:, k].astype(np.float64))
    return np.stack(cols, axis=1), names


# --------------------------------------------------------------------------- run
@dataclass
class BenchmarkResult:
    """Everything ``run_benchmark`` measured (also written to ``DIR``)."""

    results: pd.DataFrame
    per_gene: pd.DataFrame
    splits: List[dict]
    gene_sets: Dict[str, Dict[str, Any]]
    meta: Dict[str, Any]
    predictions: Dict[tuple, np.ndarray] = field(default_factory=dict)


def run_benchmark(
    data: BenchmarkData,
    cfg: Dict[str, Any],
    out: Optional[os.PathLike] = None,
    methods: Optional[Sequence[str]] = None,
    folds: Optional[Sequence[int]] = None,
    progress: bool = True,
    report: bool = True,
) -> BenchmarkResult:
    """Run every method on every fold and gene set; write results and the report to ``out``.

    Parameters
    ----------
    data
        Samples with features (see :func:`load_data`).
    cfg
        A resolved config (:func:`resolve_config`).
    out
        Output folder (None: nothing written).
    methods, folds
        Optional subsets (method names, fold numbers) — for quick checks.
    progress
        Log lines and progress bars.
    report
        Write ``report.md`` and figures (needs ``out``).
    """
    from .. import __version__
    from ..utils import seed_everything, write_json

    t_start = time.perf_counter()
    seed = int(cfg.get("seed", 0))
    seed_everything(seed)
    out = Path(out) if out is not None else None
    log = _logger(progress, t_start)
    samples = data.samples
    for s in samples:
        if s.features is None or len(s.features) != s.adata.n_obs:
            raise CPNNInputError(f"sample {s.sample_id} has no features for every spot", field="features")
    ids = np.concatenate([[f"{s.sample_id}:{o}" for o in map(str, s.adata.obs_names)] for s in samples])
    sample_of = np.concatenate([[s.sample_id] * s.adata.n_obs for s in samples])
    by = cfg["split"]["by"]
    groups = _group_labels(samples, by)
    patients = _group_labels(samples, "patient") if cfg["split"]["scheme"] == "patient_transfer" else None
    splits = make_splits(groups, cfg["split"], seed, ids, patients)
    from ..workflows.input_checks import check_choices  # before anything is written

    check_choices(folds, [f["fold"] for f in splits], "--folds", "fold")
    check_choices(methods, [m["name"] for m in cfg["methods"]], "--methods", "method")
    if out is not None:
        from ..data.splits import save_splits

        out.mkdir(parents=True, exist_ok=True)
        _write_yaml(out / "config.resolved.yaml", cfg)
        save_splits(out / "splits.json", [{**f, "train_ids": [ids[i] for i in f["train"]],
                                            "val_ids": [ids[i] for i in f["val"]],
                                            "test_ids": [ids[i] for i in f["test"]]} for f in splits],
                    meta={"by": by, "scheme": cfg["split"]["scheme"], "seed": seed,
                          "val_fraction": cfg["split"].get("val_fraction"), "n_observations": len(ids)})
    n_patients = len(set(_group_labels(samples, "patient"))) if by == "section" else len(set(groups))

    x_all = _stack_features(samples)
    method_cfgs_all = [m for m in cfg["methods"] if methods is None or m["name"] in methods]
    x_variants = {"base": x_all}
    wanted = _feature_variant_names(method_cfgs_all) - {"base"}
    if wanted:
        x_variants.update(_variant_matrices(data, cfg, sorted(wanted), seed, progress, log))
    candidates = _common_genes(samples)
    method_cfgs = [m for m in cfg["methods"] if methods is None or m["name"] in methods]
    wants_more_genes = any(m.get("train_genes") for m in method_cfgs)
    needs_ref = any(m["kind"] == "cpnn" for m in method_cfgs)
    cache = _PrototypeCache(data.reference, cfg.get("reference") or {}, seed)
    n_candidates_all = len(candidates)
    if needs_ref:
        from ..data.genes import match_genes

        t_idx, _, _ = match_genes(candidates, cache.genes())
        candidates = [candidates[i] for i in t_idx]
    log(f"{len(samples)} samples, {len(ids)} observations, {len(splits)} folds by {by}; "
        f"{len(candidates)} candidate genes (of {n_candidates_all} measured in every sample)")
    y_all = np.concatenate([_counts(s.adata, candidates) for s in samples])
    totals = np.concatenate([np.asarray(s.adata.X.sum(axis=1)).ravel() for s in samples]).astype(np.float64)

    panels = {g["name"]: read_gene_list(g["path"]) for g in cfg["gene_sets"] if g.get("kind") == "list"}
    eval_cfg = cfg.get("evaluation") or {}
    min_counts = float(eval_cfg.get("min_counts", 1))
    pcfg = (cfg["data"].get("proportions") or {})
    mapping = dict(pcfg.get("mapping") or (HER2ST_MAJOR_MAPPING if cfg["data"]["kind"] == "her2st"
                                           and pcfg.get("level", "major") == "major" else {}))
    feat_cfg = cfg.get("features") or {}
    encoder = {"name": feat_cfg.get("encoder"), "patch_um": feat_cfg.get("patch_um"),
               "out_px": feat_cfg.get("out_px"), "tta": feat_cfg.get("tta"),
               "context_rings": feat_cfg.get("context_rings"), "subpatch_grid": feat_cfg.get("subpatch_grid")}
    rows, gene_rows, gene_sets_used = [], [], {}
    predictions: Dict[tuple, np.ndarray] = {}
    sel_cfg = {**DEFAULT_SELECTION, **(cfg.get("selection") or {})}
    grids = {m["name"]: candidate_grid(m.get("candidates") or {}, max_candidates=int(sel_cfg["max_candidates"]))
             for m in method_cfgs}
    selections: Dict[tuple, Selection] = {}
    cand_pos = {g: i for i, g in enumerate(candidates)}
    for fold in splits:
        if folds is not None and fold["fold"] not in folds:
            continue
        tr_idx = np.asarray(fold["train"] + fold["val"], dtype=np.int64)
        tr_idx.sort()
        val_mask = np.isin(tr_idx, np.asarray(fold["val"], dtype=np.int64))
        te_idx = np.asarray(fold["test"], dtype=np.int64)
        for gs in cfg["gene_sets"]:
            t_fold = time.perf_counter()
            sel = select_gene_set(gs, candidates, y_all[tr_idx], totals[tr_idx], panels.get(gs["name"]))
            genes = sel["genes"]
            gene_sets_used[f"{gs['name']}/fold{fold['fold']}"] = {k: v for k, v in sel.items()}
            cols = np.asarray([cand_pos[g] for g in genes])
            ytr = y_all[np.ix_(tr_idx, cols)]
            yte = y_all[np.ix_(te_idx, cols)]
            keep_tr = ytr.sum(1) >= min_counts
            keep_te = yte.sum(1) >= min_counts
            tri, tei = tr_idx[keep_tr], te_idx[keep_te]
            train = TrainData(x_all[tri], ytr[keep_tr], groups[tri], val_mask[keep_tr], [ids[i] for i in tri])
            if wants_more_genes:
                # every other candidate gene of the training spots, most expressed first: a
                # method may model more genes than it is scored on (training data only)
                train.more_genes, train.more_counts = _more_training_genes(y_all[tri], totals[tri], candidates, genes)
            test = TestData(x_all[tei], groups[tei], [ids[i] for i in tei])
            truth = to_log1p_cp10k(yte[keep_te])
            ref_props = _test_proportions(data.proportions, sample_of[tei], ids[tei])
            dec_key = (fold["fold"], gs["name"])
            ctx = MethodContext(
                genes=list(genes), seed=seed, fold=int(fold["fold"]), gene_set=gs["name"],
                prototypes=lambda label=None, method="regression", genes=None, _g=tuple(genes): cache.prototypes(
                    tuple(genes) if genes is not None else _g, label, method),
                deconvolution=lambda protos, counts, _k=dec_key, **kw: cache.deconvolution(_k, protos, counts, **kw),
                encoder=encoder, progress=False,
            )
            for m in method_cfgs:
                opts = {k: v for k, v in m.items() if k not in ("name", "kind", "candidates")}
                selected: Optional[Selection] = None
                if len(grids[m["name"]]) > 1:
                    # chosen once per outer fold (on the first gene set), from the training groups only
                    skey = (m["name"], int(fold["fold"]))
                    if skey not in selections:
                        log(f"fold {fold['fold']} {gs['name']} {m['name']}: nested selection among "
                            f"{len(grids[m['name']])} candidates on the training groups "
                            f"({', '.join(sorted(set(map(str, train.groups))))}) ...")
                        selections[skey] = select(
                            grids[m["name"]],
                            _inner_scorer(m["kind"], opts, train, ctx, cache, genes, dec_key,
                                          (y_all[tri], totals[tri], candidates) if wants_more_genes else None,
                                          {k: x_variants[k][tri] for k in _feature_variant_names([m])}),
                            train.groups, metric=sel_cfg["metric"], max_inner_folds=int(sel_cfg["max_inner_folds"]),
                            seed=seed, val_fraction=float(cfg["split"].get("val_fraction", 0.2)), log=log,
                            rule=str(sel_cfg["rule"]))
                    selected = selections[skey]
                    opts = {**opts, **selected.choice}
                    log(f"fold {fold['fold']} {gs['name']} {m['name']}: chose {describe(selected.choice)} "
                        f"(inner {selected.metric} {selected.score:.3f})")
                log(f"fold {fold['fold']} (test {','.join(fold['test_groups'])}) {gs['name']} {m['name']}: "
                    f"training on {len(tri)} observations, predicting {len(tei)} ...")
                variant = opts.pop("features", "base")
                m_train, m_test = train, test
                if variant != "base":  # this method (or its choice) uses another feature variant
                    m_train = replace(train, features=x_variants[variant][tri])
                    m_test = replace(test, features=x_variants[variant][tei])
                t0 = time.perf_counter()
                pred = _call_method(m["kind"], opts, m_train, m_test, ctx)
                secs = time.perf_counter() - t0
                expr = np.asarray(pred.expression, dtype=np.float64)
                if expr.shape != truth.shape:
                    raise CPNNInputError(f"method {m['name']} returned shape {expr.shape}, expected {truth.shape}",
                                         field="methods[]")
                met = expression_metrics(expr, truth, genes)
                row = {"method": m["name"], "kind": m["kind"], "gene_set": gs["name"], "fold": int(fold["fold"]),
                       "test_groups": ",".join(fold["test_groups"]), "val_groups": ",".join(fold["val_groups"]),
                       **{k: fold[k] for k in ("train_patient", "test_patient") if k in fold},
                       "n_train": int((~val_mask[keep_tr]).sum()), "n_val": int(val_mask[keep_tr].sum()),
                       "n_test": int(keep_te.sum()), "n_test_dropped": int((~keep_te).sum()),
                       **{k: v for k, v in met.items() if k != "per_gene"},
                       "composition_mean": np.nan, "composition_n_types": 0, "seconds": round(secs, 2),
                       "selected": describe(selected.choice) if selected else "",
                       "inner_score": selected.score if selected else np.nan}
                if pred.weights is not None and ref_props is not None:
                    parents = cache.parent_types(m.get("label") or cache.cfg.get("label", "celltype_major"),
                                                 pcfg.get("reference_label") or cache.cfg.get("label", "celltype_major"))
                    row.update(_composition(pred.weights, pred.cell_types, ref_props,
                                            _comparison_mapping(pred.cell_types, ref_props.columns, mapping, parents)))
                row.update({f"info_{k}": v for k, v in pred.info.items()})
                rows.append(row)
                pg = met["per_gene"]
                gene_rows.append(pd.DataFrame({"method": m["name"], "gene_set": gs["name"], "fold": int(fold["fold"]),
                                               "gene": pg["gene"], "pcc": pg["pcc"], "scc": pg["scc"]}))
                predictions[(m["name"], gs["name"], int(fold["fold"]))] = expr.astype(np.float32)
                predictions[("__truth__", gs["name"], int(fold["fold"]))] = truth.astype(np.float32)
                predictions[("__ids__", gs["name"], int(fold["fold"]))] = np.asarray(test.ids)
                log(f"fold {fold['fold']} (test {','.join(fold['test_groups'])}) {gs['name']} {m['name']}: "
                    f"PCC {met['pcc_mean']:.3f} SCC {met['scc_mean']:.3f} sig {met['n_significant']}/{met['n_genes']}"
                    + (f" comp {row['composition_mean']:.3f}" if np.isfinite(row["composition_mean"]) else "")
                    + f" ({secs:.0f} s)")
            log(f"fold {fold['fold']} {gs['name']} done in {time.perf_counter() - t_fold:.0f} s")
    results = pd.DataFrame(rows)
    per_gene = pd.concat(gene_rows, ignore_index=True) if gene_rows else pd.DataFrame()
    meta = {
        "cpnn_version": __version__,
        "machine": machine_description(),
        "seconds_total": round(time.perf_counter() - t_start, 1),
        "seconds_prototypes_and_deconvolution": round(cache.seconds, 1),
        "split_by": by, "n_patients": n_patients, "n_groups": len(set(groups)),
        "n_observations": int(len(ids)), "samples": [s.sample_id for s in samples],
        "n_candidate_genes": len(candidates), "n_genes_measured_everywhere": n_candidates_all,
        "composition_mapping": mapping, "data_kind": cfg["data"]["kind"],
    }
    meta["selection"] = {"metric": sel_cfg["metric"], "max_inner_folds": int(sel_cfg["max_inner_folds"]),
                         "rule": str(sel_cfg["rule"]),
                         "methods": [m["name"] for m in method_cfgs if len(grids[m["name"]]) > 1]}
    res = BenchmarkResult(results, per_gene, splits, gene_sets_used, meta, predictions)
    if out is not None:
        from ..utils import atomic_path

        with atomic_path(out / "results.csv") as tmp:
            results.to_csv(tmp, index=False)
        with atomic_path(out / "per_gene.csv") as tmp:
            per_gene.to_csv(tmp, index=False)
        write_json(out / "gene_sets.json", gene_sets_used)
        if selections:
            write_json(out / "selection.json", {m: {str(f): v.to_dict() for (mm, f), v in selections.items() if mm == m}
                                                for m in dict.fromkeys(k[0] for k in selections)})
        if report:
            from .report import write_report

            write_report(out, res, cfg, data)
        meta["seconds_total"] = round(time.perf_counter() - t_start, 1)
        write_json(out / "meta.json", meta)
        log(f"wrote {out / 'results.csv'} and {out / 'report.md'} ({meta['seconds_total']:.0f} s)")
    return res


def _stack_features(samples) -> np.ndarray:
    """Every observation's features in one array; slide bags (object arrays) as one 1-D
    object array of ``(n_tiles, D)`` bags."""
    if any(getattr(s.features, "dtype", None) == object for s in samples):
        from ..workflows.bulk import as_bag_array

        return as_bag_array([b for s in samples for b in s.features])
    return np.concatenate([np.asarray(s.features, dtype=np.float32) for s in samples])


def _feature_variant_names(method_cfgs) -> set:
    """Every feature variant a method entry asks for (``features:`` or among its candidates)."""
    names = set()
    for m in method_cfgs:
        names.add(m.get("features", "base"))
        names.update((m.get("candidates") or {}).get("features") or [])
    return names


def canonical_stain_target() -> Dict[str, Any]:
    """torchstain's built-in Macenko reference: a stain target that depends on no sample,
    so stain-normalised features are computed once and no fold's test slide chooses it."""
    import torchstain

    norm = torchstain.normalizers.MacenkoNormalizer(backend="numpy")
    return {"method": "macenko", "he": np.asarray(norm.HERef, float).round(6).tolist(),
            "max_c": np.asarray(norm.maxCRef, float).round(6).tolist(), "n_patches": 0, "source": "torchstain default"}


def _variant_matrices(data: BenchmarkData, cfg: Dict[str, Any], names: Sequence[str], seed: int, progress: bool,
                      log) -> Dict[str, np.ndarray]:
    """Observation-stacked features of each variant (``cpnn.workflows.feature_variants``),
    built from every sample's features before context, then given the configured context."""
    from ..workflows.feature_variants import feature_variants
    from ..workflows.spatial import FeatureSpec, SpatialSample

    feat = cfg.get("features") or {}
    raw = []
    for s in data.samples:
        if s.meta.get("raw_features") is None:
            raise CPNNInputError(f"sample {s.sample_id} has no features before context, needed for feature "
                                 "variants", field="methods[].features",
                                 fix="load the data with cpnn.evaluate.benchmark.load_data, or drop the features option")
        raw.append(SpatialSample(s.sample_id, s.adata, s.meta["raw_features"], s.meta))
    spec = FeatureSpec(encoder=feat.get("encoder", "efficientnet-lite0"), patch_um=float(feat.get("patch_um", 112.0)),
                       out_px=feat.get("out_px"), tta=feat.get("tta", "none"),
                       subpatch_grid=int(feat.get("subpatch_grid", 1) or 1))
    log(f"feature variants {', '.join(names)} ...")
    stain = canonical_stain_target() if any("stain" in n for n in names) else None
    out = feature_variants(raw, spec, list(names), stain_target=stain, cache_dir=feat.get("cache_dir"),
                           context_rings=float(feat.get("context_rings", 0.0) or 0.0), seed=seed, progress=progress)
    return {name: np.concatenate([np.asarray(per[s.sample_id], dtype=np.float32) for s in data.samples])
            for name, per in out.items()}


def _call_method(kind: str, opts: Dict[str, Any], train: TrainData, test: TestData, ctx: MethodContext):
    return get_method(kind)(train, test, ctx, **opts)


def _inner_scorer(kind: str, opts: Dict[str, Any], train: TrainData, ctx: MethodContext, cache,
                  genes: Sequence[str], dec_key: tuple, more: Optional[tuple], x_train: Dict[str, np.ndarray]):
    """``train_and_score`` of :func:`cpnn.evaluate.selection.select` for one method on one
    outer fold: every array comes from ``train`` (the outer training part) and ``x_train``
    (its rows of each feature variant), never the test fold."""

    def score(choice: Dict[str, Any], itr: np.ndarray, ival: np.ndarray, ite: np.ndarray, k: int) -> Dict[str, float]:
        full = {**opts, **choice}
        x = x_train[full.pop("features", "base")]
        sub = TrainData(x[itr], train.counts[itr], train.groups[itr], ival, [train.ids[i] for i in itr])
        if more is not None:
            y_tr, tot_tr, candidates = more
            sub.more_genes, sub.more_counts = _more_training_genes(y_tr[itr], tot_tr[itr], candidates, genes)
        held = TestData(x[ite], train.groups[ite], [train.ids[i] for i in ite])
        # deconvolutions are cached per row set: an inner fold has its own key
        ictx = replace(ctx, deconvolution=lambda protos, counts, _k=dec_key + ("inner", k), **kw:
                       cache.deconvolution(_k, protos, counts, **kw))
        pred = _call_method(kind, full, sub, held, ictx)
        met = expression_metrics(np.asarray(pred.expression, dtype=np.float64), to_log1p_cp10k(train.counts[ite]),
                                 genes)
        met.pop("per_gene", None)
        return met

    return score


def _counts(adata, genes: Sequence[str]) -> np.ndarray:
    pos = {g: i for i, g in enumerate(map(str, adata.var_names))}
    return _dense(adata.X[:, [pos[g] for g in genes]])


def _test_proportions(props: Dict[str, pd.DataFrame], sample_of: np.ndarray, ids: np.ndarray):
    if not props:
        return None
    parts = []
    for sid in dict.fromkeys(sample_of.tolist()):
        if sid not in props:
            return None
        obs = [i.split(":", 1)[1] for i in ids[sample_of == sid]]
        parts.append(props[sid].loc[obs])
    return pd.concat(parts)


def _more_training_genes(y_train: np.ndarray, totals: np.ndarray, candidates: Sequence[str],
                         scored: Sequence[str], n_max: int = 5000):
    """Candidate genes outside the scored set, by decreasing mean CP10k over the training
    observations (at most ``n_max``), and their training counts."""
    scored_set = set(scored)
    mean_cp10k = (y_train / np.maximum(totals, 1.0)[:, None]).mean(0)
    order = [i for i in np.argsort(-mean_cp10k, kind="stable") if candidates[i] not in scored_set][:n_max]
    return [candidates[i] for i in order], y_train[:, order]


def _comparison_mapping(types, columns, mapping: Dict[str, str], parents: Dict[str, str]) -> Dict[str, str]:
    """Model type -> proportion column: by name (after ``mapping``), else through the
    reference's parent type (a subtype counts towards its major type)."""
    columns = set(map(str, columns))
    out = {}
    for t in types or []:
        name = mapping.get(t, t)
        if name not in columns and t in parents:
            name = mapping.get(parents[t], parents[t])
        out[t] = name
    return out


def _composition(weights, types, ref: pd.DataFrame, mapping: Dict[str, str]) -> Dict[str, Any]:
    w, names = _aggregate_weights(np.asarray(weights), list(types or []), mapping)
    try:
        comp = composition_agreement(w, ref.to_numpy(), names, list(ref.columns))
    except ValueError:
        return {"composition_mean": np.nan, "composition_n_types": 0}
    out = {"composition_mean": comp["mean"], "composition_n_types": comp["n_types"]}
    out.update({f"composition_{k}": v for k, v in comp["per_type"].items()})
    return out


def machine_description() -> Dict[str, Any]:
    """CPU model, logical cores, torch threads, Python and OS."""
    import platform

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        n_avail = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        n_avail = os.cpu_count()
    threads = None
    try:
        import torch

        threads = torch.get_num_threads()
    except ImportError:  # pragma: no cover
        pass
    return {"cpu": cpu, "cores_available": n_avail, "torch_threads": threads,
            "python": platform.python_version(), "os": f"{platform.system()} {platform.release()}"}


def _write_yaml(path: Path, obj: Dict[str, Any]) -> None:
    import yaml

    from ..utils import atomic_path

    with atomic_path(path, suffix=".yaml") as tmp:
        tmp.write_text(yaml.safe_dump(obj, sort_keys=False))


def _logger(progress: bool, t0: float):
    def log(msg: str) -> None:
        if progress:
            print(f"[cpnn benchmark {time.perf_counter() - t0:7.1f}s] {msg}", flush=True)

    return log

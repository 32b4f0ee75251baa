"""``cpnn fit`` / ``cpnn predict`` as functions: resolve options, train, write a run folder.

A run folder holds ``model.cpnn`` (the self-describing model), ``prototypes.h5ad``,
``config.json`` (every resolved option), ``metrics.json`` (training history, validation
scores, timings) and ``features/`` (the cached patch features).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from .. import __version__
from ..config import CPNNConfig, TrainConfig, config_from_dict, config_to_dict
from ..errors import CPNNInputError
from ..utils import atomic_path, seed_everything, write_json
from .spatial import FeatureSpec, SpatialSample, attach_features, fit_spot_model, prediction_anndata, target_genes

# Spot-level defaults, chosen on HER2ST sections C2-C6 (leave-one-section-out, see
# BENCHMARKS.md) and the synthetic cohort, never on a test fold: a small MLP head; MSE on
# log1p CP10k (the scale every method is scored on; the paper's NB loss trained for 1-3
# epochs there); the paper's composition and template weights; four ensemble members, each
# early-stopped on a different training section; the first ring of neighbours as context;
# each spot a bag of 2 x 2 sub-patches (56 µm at 224 px): one mixture per sub-patch, which
# lifted CPNN's expression and maps and the baselines given the same sub-patches (one
# setting tried, on those sections; BENCHMARKS.md). With --features DIR and no explicit
# grid, the feature files decide (a CLAM/TRIDENT file of one patch per spot: grid 1).
SPOT_MODEL_DEFAULTS = dict(hidden=[256], dropout=0.25, loss="mse_log1p", composition_weight=1e3,
                           template_weight=1e3, residual_head="ridge")
SPOT_TRAIN_DEFAULTS = dict(max_epochs=200, batch_size=64, lr=1e-3, weight_decay=1e-2, patience=30,
                           early_stopping="val_pcc", n_models=4, val_fraction=0.25)
SPOT_FEATURE_DEFAULTS = dict(context_rings=1.0, subpatch_grid=None)  # None: see resolve_subpatch_grid
SPOT_SUBPATCH_GRID = 2


@dataclass
class FitOptions:
    """Everything ``cpnn fit`` needs, resolved from defaults, a YAML config and flags."""

    reference: str
    label: Optional[str] = None
    batch: Optional[str] = None
    prototype_method: str = "regression"
    genes_file: Optional[str] = None
    n_top_genes: int = 1000
    level: str = "spot"
    seed: int = 0
    features: FeatureSpec = field(default_factory=lambda: FeatureSpec(**SPOT_FEATURE_DEFAULTS))
    model: Dict[str, Any] = field(default_factory=lambda: dict(SPOT_MODEL_DEFAULTS))
    train: Dict[str, Any] = field(default_factory=lambda: dict(SPOT_TRAIN_DEFAULTS))
    # --level bulk only: how spots are pooled into pseudo-bulk regions
    # (keys of cpnn.workflows.pseudobulk.fit_bulk_model, e.g. block_spots, min_spots)
    pseudobulk: Dict[str, Any] = field(default_factory=dict)
    # --level bulk --bulk only (cpnn.workflows.bulk.run_bulk_fit), e.g. composition_targets
    bulk: Dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_sources(cls, cfg: Dict[str, Any], args: Any) -> "FitOptions":
        """Defaults <- YAML ``cfg`` <- command-line ``args`` (flags win)."""
        protos = dict(cfg.get("prototypes", {}))
        opts = cls(reference=args.reference)
        opts.label = args.label or protos.get("label")
        opts.batch = args.batch or protos.get("batch")
        opts.prototype_method = args.prototype_method or protos.get("method", opts.prototype_method)
        opts.genes_file = args.genes or cfg.get("genes")
        opts.n_top_genes = args.n_top_genes or cfg.get("n_top_genes", opts.n_top_genes)
        opts.level = args.level or cfg.get("level", opts.level)
        opts.seed = args.seed if args.seed is not None else cfg.get("seed", opts.seed)
        feat = dict(cfg.get("features", {}))
        for key, flag in (("encoder", "encoder"), ("patch_um", "patch_um"), ("tta", "tta"),
                          ("context_rings", "context_rings"), ("subpatch_grid", "subpatch_grid"),
                          ("slide_standardise", "slide_standardise"), ("nuclei", "nuclei"),
                          ("stain_norm", "stain_norm")):
            if getattr(args, flag, None) is not None:
                feat[key] = getattr(args, flag)
        opts.features = FeatureSpec(**{**SPOT_FEATURE_DEFAULTS, **feat})
        opts.model.update(cfg.get("model", {}))
        if getattr(args, "residual_head", None) is not None:
            if args.residual_head != "none" and opts.level == "bulk":
                raise CPNNInputError("--residual-head applies to spot-level models, not --level bulk",
                                     field="--residual-head", fix="drop --residual-head, or train at spot level")
            opts.model["residual_head"] = args.residual_head
        opts.train.update(cfg.get("train", {}))
        opts.pseudobulk.update(cfg.get("pseudobulk", {}))
        opts.bulk.update(cfg.get("bulk", {}))
        if getattr(args, "composition_targets", None) is not None:
            opts.bulk["composition_targets"] = args.composition_targets
        if getattr(args, "epochs", None):
            opts.train["max_epochs"] = args.epochs
        opts.train["seed"] = opts.seed
        return opts

    def model_config(self) -> CPNNConfig:
        model = dict(self.model)
        if self.level == "bulk":  # the residual head is a spot-level term (pseudo-bulk bags are slides)
            model["residual_head"] = "none"
        return config_from_dict(CPNNConfig, model)

    def train_config(self, progress: bool = True) -> TrainConfig:
        return config_from_dict(TrainConfig, {**self.train, "progress": progress})

    def as_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["model"] = config_to_dict(self.model_config())
        d["train"] = config_to_dict(self.train_config())
        return d


def resolve_subpatch_grid(opts: FitOptions, features_dir=None) -> None:
    """Fill an unset (None) ``opts.features.subpatch_grid``: left unset with ``features_dir``
    (the feature files decide, see ``attach_features``); :data:`SPOT_SUBPATCH_GRID` when
    spots are extracted; 1 at ``--level bulk`` (its bags were measured with one patch per tile)."""
    if opts.features.subpatch_grid is None and features_dir is None:
        opts.features.subpatch_grid = SPOT_SUBPATCH_GRID if opts.level == "spot" else 1


def read_gene_list(path, field: str = "--genes") -> List[str]:
    """Gene symbols, one per line (blank lines and ``#`` comments ignored)."""
    try:
        with open(path) as fh:
            genes = [ln.strip() for ln in fh if ln.strip() and not ln.lstrip().startswith("#")]
    except FileNotFoundError as exc:
        raise CPNNInputError("gene list file not found", path=path, field=field) from exc
    if not genes:
        raise CPNNInputError("gene list file is empty", path=path, field=field)
    return genes


def load_or_build_prototypes(opts: FitOptions, genes: Sequence[str]):
    """Prototypes for ``genes``: read a prototypes file, or build them from a reference."""
    from ..prototypes import Prototypes, build_prototypes, read_reference

    ref = Path(opts.reference)
    if ref.suffix in (".tsv", ".csv") or _is_prototypes_h5ad(ref):
        protos = Prototypes.load(ref)
        shared = [g for g in genes if g in set(protos.genes)]
        if not shared:
            raise CPNNInputError("the prototypes share no genes with the data", path=ref, field="genes")
        return protos.subset_genes(shared)
    if not opts.label:
        raise CPNNInputError("building prototypes needs the cell-type column", field="--label",
                             fix="e.g. --label celltype_major")
    adata = read_reference(ref, opts.label, batch_key=opts.batch)
    return build_prototypes(adata, opts.label, method=opts.prototype_method, batch_key=opts.batch,
                            genes=list(genes), seed=opts.seed)


def _is_prototypes_h5ad(path: Path) -> bool:
    if path.suffix != ".h5ad" or not path.is_file():
        return False
    import h5py

    with h5py.File(path, "r") as fh:
        return "varm" in fh and "cpnn_prototypes" in fh["varm"]


def run_fit(samples: List[SpatialSample], opts: FitOptions, out: Path, features_dir=None,
            progress: bool = True):
    """Train on ``samples`` and write the run folder ``out``; returns the model.

    With ``progress``, every stage is announced on stdout as it starts (prototypes,
    features sample by sample, ensemble training, residual head) and the files written
    are listed at the end. Under ``torchrun`` with several processes, training is
    data-parallel and only rank 0 writes the run folder (every process extracts or reads
    the same features)."""
    from ..train.distributed import dist_env

    main_process = dist_env()[0] == 0
    say = stage_printer(progress and main_process)
    t0 = time.perf_counter()
    seed_everything(opts.seed)
    out.mkdir(parents=True, exist_ok=True)
    resolve_subpatch_grid(opts, features_dir)
    if main_process:
        _write_config(out, opts, samples)
    panel = read_gene_list(opts.genes_file) if opts.genes_file else None
    genes = target_genes(samples, panel=panel, n_top=None if panel else opts.n_top_genes)
    say(_prototype_stage(opts, len(genes)))
    protos = load_or_build_prototypes(opts, genes)
    if main_process:
        protos.save(out / "prototypes.h5ad")
    say(f"prototypes: {len(protos.cell_types)} cell types x {len(protos.genes)} genes")
    t_protos = time.perf_counter() - t0
    attach_features(samples, opts.features, cache_dir=out / "features", features_dir=features_dir,
                    progress=progress and main_process)
    t_feats = time.perf_counter() - t0 - t_protos
    if main_process and features_dir is not None:  # again, with the grid the feature files decided
        _write_config(out, opts, samples)
    tc = opts.train_config(progress)
    what = "spots" if opts.level == "spot" else "pseudo-bulk regions"
    say(f"training CPNN on the {what} of {len(samples)} section(s): {tc.n_models} ensemble member(s), "
        f"up to {tc.max_epochs} epochs each (early stopping: {tc.early_stopping})")
    if opts.level == "spot":
        model = fit_spot_model(samples, protos, opts.model_config(), tc, encoder=opts.features.as_dict())
    else:
        from .pseudobulk import fit_bulk_model

        model = fit_bulk_model(samples, protos, opts, progress=progress)
    if model.residual is not None:
        say(residual_summary(model.residual))
    if not main_process:
        return model
    model.save(out / "model.cpnn")
    _write_config(out, opts, samples, model)
    hist = model.train_result.history
    best = hist[model.train_result.best_epoch] if hist and model.train_result.best_epoch >= 0 else {}
    write_json(out / "metrics.json", {
        "level": opts.level,
        "n_genes": len(model.genes),
        "n_cell_types": len(model.cell_types),
        "n_train_observations": len(model.split.get("train", [])),
        "n_val_observations": len(model.split.get("val", [])),
        "best_epoch": model.train_result.best_epoch,
        "epochs_run": len(hist),
        "best": best,
        "residual_head": None if model.residual is None else {
            "active": bool(model.residual.active), "alpha": model.residual.alpha_,
            "inner_cv_pearson": model.residual.cv_scores_,
            "out_of_fold_fraction": model.residual.oof_fraction_},
        "history": hist,
        "seconds": {"prototypes": round(t_protos, 1), "features": round(t_feats, 1),
                    "total": round(time.perf_counter() - t0, 1)},
    })
    say(f"wrote {out}/ (model.cpnn, prototypes.h5ad, config.json, metrics.json, features/) in "
        f"{time.perf_counter() - t0:.0f} s")
    return model


def stage_printer(enabled: bool):
    """A ``say(message)`` that prints one stage line (flushed at once), or does nothing."""
    if not enabled:
        return lambda message: None
    return lambda message: print(message, flush=True)


def _prototype_stage(opts: FitOptions, n_genes: int) -> str:
    ref = Path(opts.reference)
    if ref.suffix in (".tsv", ".csv") or _is_prototypes_h5ad(ref):
        return f"reading prototypes from {ref} ({n_genes} target genes)"
    return (f"building prototypes ({opts.prototype_method}) from {ref.name}, cell types in "
            f"'{opts.label}', {n_genes} target genes")


def residual_summary(head) -> str:
    """One line on the residual head's inner-CV choice (kept with its penalty, or off)."""
    scores = dict(head.cv_scores_ or {})
    off = scores.get("off")
    if head.active:
        best = max((v for k, v in scores.items() if k != "off"), default=None)
        detail = f"inner-CV Pearson {best:.3f} vs {off:.3f} without" if best is not None and off is not None else ""
        return f"residual head: kept, penalty {head.alpha_:g}" + (f" ({detail})" if detail else "")
    detail = f" (inner-CV Pearson without it {off:.3f}: no penalty did better)" if off is not None else ""
    return "residual head: off" + detail


def _write_config(out: Path, opts: FitOptions, samples: Sequence[SpatialSample], model=None) -> None:
    """``config.json``: the resolved options; once trained, also what the model actually used
    (its model/train settings after level-specific overrides, feature geometry, genes, types)."""
    record: Dict[str, Any] = {"cpnn_version": __version__, "options": opts.as_dict(),
                              "samples": [s.sample_id for s in samples]}
    if model is not None:
        record["used"] = {
            "model": config_to_dict(model.config),
            "train": config_to_dict(model.train_config),
            "features": dict(model.encoder),
            "n_genes": len(model.genes),
            "genes": list(model.genes),
            "cell_types": list(model.cell_types),
            "prototypes": {k: v for k, v in model.prototype_provenance.items()
                           if isinstance(v, (str, int, float, bool)) or v is None},
            "residual_head": None if model.residual is None else {
                "active": bool(model.residual.active), "alpha": model.residual.alpha_},
        }
    write_json(out / "config.json", record)


def load_run_model(run: Path):
    """The model of a run folder (or a model file)."""
    from ..model import CPNN

    path = run / "model.cpnn" if run.is_dir() else run
    return CPNN.load(path)


def run_predict(run: Path, samples: List[SpatialSample], out: Path, features_dir=None, progress: bool = True):
    """Predict every sample with the run's model; write ``.h5ad`` file(s). Returns the AnnDatas."""
    import anndata as ad  # noqa: F401  (AnnData writing)

    model = load_run_model(run)
    enc = model.encoder or {}
    spec = FeatureSpec.from_encoder_info(enc)
    cache = (run if run.is_dir() else run.parent) / "features"
    attach_features(samples, spec, cache_dir=cache, features_dir=features_dir, progress=progress)
    preds = []
    several = len(samples) > 1
    if several:
        out.mkdir(parents=True, exist_ok=True)
    for s in samples:
        if features_dir is not None:
            from ..model.cpnn_model import check_encoder

            attrs = s.meta.get("feature_attrs", {})
            # a sub-patch file records its sub-patches' side, the model the spot's square
            # (attach_features has checked the file's grid against the model's)
            patch_um = attrs.get("patch_um")
            check_encoder(enc, {"name": attrs.get("encoder"), "out_px": attrs.get("patch_size_px"),
                                "patch_um": None if patch_um is None else float(patch_um) * spec.subpatch_grid,
                                "tta": attrs.get("tta")},
                          Path(features_dir) / f"{s.sample_id}.h5")
        pred = prediction_anndata(model, s)
        target = out / f"{s.sample_id}.h5ad" if several else out
        with atomic_path(target, suffix=".h5ad") as tmp:
            pred.write_h5ad(tmp)
        preds.append(pred)
        if progress:
            print(f"wrote {target} ({pred.n_obs} spots x {pred.n_vars} genes, {len(model.cell_types)} cell types)")
    return preds

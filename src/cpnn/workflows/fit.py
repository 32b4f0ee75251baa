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
from ..config import LEVELS, CPNNConfig, TrainConfig, config_from_dict, config_to_dict
from ..errors import CPNNInputError
from ..presets import FeatureDefaults, get_preset
from ..utils import atomic_path, seed_everything, write_json
from .spatial import FeatureSpec, SpatialSample, attach_features, fit_spot_model, prediction_anndata, target_genes

#: Top-level keys of a ``cpnn fit --config`` YAML, and the keys of its sections.
CONFIG_KEYS = {
    "preset": None, "prototypes": ("label", "batch", "method"), "genes": None, "n_top_genes": None,
    "level": None, "seed": None, "features": (),  # the fields of FeatureSpec
    "model": None, "train": None, "pseudobulk": ("block_spots", "min_spots"),
}


def check_config_keys(cfg: Dict[str, Any], path=None) -> None:
    """Refuse unknown keys in a ``cpnn fit`` config (a typo would silently keep a default).

    Raises
    ------
    CPNNInputError
        Naming the unknown key(s) and the valid ones; ``model:``/``train:`` keys are
        checked against :class:`~cpnn.config.CPNNConfig` / :class:`~cpnn.config.TrainConfig`.
    """
    unknown = sorted(set(cfg) - set(CONFIG_KEYS))
    if unknown:
        raise CPNNInputError(f"unknown config key(s): {', '.join(unknown)}", path=path, field=unknown[0],
                             fix=f"valid keys: {', '.join(sorted(CONFIG_KEYS))}")
    for section, keys in CONFIG_KEYS.items():
        value = cfg.get(section)
        if keys is None and section not in ("model", "train") or value is None:
            continue
        if not isinstance(value, dict):
            raise CPNNInputError(f"'{section}' must be a mapping", path=path, field=section)
        if section in ("model", "train", "features"):
            cls = {"model": CPNNConfig, "train": TrainConfig, "features": FeatureSpec}[section]
            valid = sorted(f.name for f in dataclasses.fields(cls))
        else:
            valid = sorted(keys)
        bad = sorted(set(value) - set(valid))
        if bad:
            raise CPNNInputError(f"unknown key(s) in '{section}': {', '.join(bad)}", path=path,
                                 field=f"{section}.{bad[0]}", fix=f"valid keys: {', '.join(valid)}")


def _level_preset(level: str) -> str:
    return "bulk" if level == "bulk" else "spot"


@dataclass
class FitOptions:
    """Everything ``cpnn fit`` needs, resolved from a preset, a YAML config and flags.

    ``preset`` None means the level's: ``spot`` (:mod:`cpnn.presets`) or ``bulk`` for
    ``level="bulk"``; ``model``/``train`` None take every option from that preset.
    """

    reference: str
    label: Optional[str] = None
    batch: Optional[str] = None
    prototype_method: str = "regression"
    genes_file: Optional[str] = None
    n_top_genes: int = 1000
    level: str = "spot"
    seed: int = 0
    preset: Optional[str] = None
    features: Optional[FeatureSpec] = None
    model: Optional[Dict[str, Any]] = None
    train: Optional[Dict[str, Any]] = None
    # --level bulk only: how spots are pooled into pseudo-bulk regions
    # (keys of cpnn.workflows.pseudobulk.fit_bulk_model, e.g. block_spots, min_spots)
    pseudobulk: Dict[str, Any] = field(default_factory=dict)
    # --level bulk --bulk only (cpnn.workflows.bulk.run_bulk_fit), e.g. composition_targets
    bulk: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise CPNNInputError(f"unknown level {self.level!r}", field="level", fix=f"use one of {', '.join(LEVELS)}")
        if self.preset is None:
            self.preset = _level_preset(self.level)
        try:
            preset = get_preset(self.preset)
        except ValueError as exc:
            raise CPNNInputError(str(exc), field="preset") from None
        if self.features is None:
            feat = preset.features or FeatureDefaults()
            self.features = FeatureSpec(context_rings=feat.context_rings, subpatch_grid=feat.subpatch_grid)
        if self.model is None:
            self.model = preset.model_options()
        if self.train is None:
            self.train = preset.train_options()

    @classmethod
    def from_sources(cls, cfg: Dict[str, Any], args: Any, path=None) -> "FitOptions":
        """Preset <- YAML ``cfg`` <- command-line ``args`` (flags win); unknown keys refused."""
        check_config_keys(cfg, path)
        protos = dict(cfg.get("prototypes", {}))
        level = getattr(args, "level", None) or cfg.get("level", "spot")
        opts = cls(reference=args.reference, level=level, preset=cfg.get("preset"))
        opts.label = args.label or protos.get("label")
        opts.batch = args.batch or protos.get("batch")
        opts.prototype_method = args.prototype_method or protos.get("method", opts.prototype_method)
        opts.genes_file = args.genes or cfg.get("genes")
        opts.n_top_genes = args.n_top_genes or cfg.get("n_top_genes", opts.n_top_genes)
        opts.seed = args.seed if args.seed is not None else cfg.get("seed", opts.seed)
        feat = dict(cfg.get("features", {}))
        for key, flag in (("encoder", "encoder"), ("patch_um", "patch_um"), ("tta", "tta"),
                          ("context_rings", "context_rings"), ("subpatch_grid", "subpatch_grid"),
                          ("slide_standardise", "slide_standardise"), ("nuclei", "nuclei"),
                          ("stain_norm", "stain_norm")):
            if getattr(args, flag, None) is not None:
                feat[key] = getattr(args, flag)
        opts.features = dataclasses.replace(opts.features, **feat)
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
        try:  # every option resolved now, so a bad value is reported before any work
            opts.model_config(), opts.train_config()
        except ValueError as exc:
            raise CPNNInputError(str(exc), path=path, field="model/train") from None
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
    (the feature files decide, see ``attach_features``); the preset's ``extract_subpatch_grid``
    when spots are extracted (2 for ``spot``; 1 for ``bulk``: its bags were measured with one
    patch per tile)."""
    if opts.features.subpatch_grid is None and features_dir is None:
        preset = get_preset(opts.preset or _level_preset(opts.level))
        grid = (preset.features or FeatureDefaults()).extract_subpatch_grid
        opts.features.subpatch_grid = grid if opts.level == "spot" else 1


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
    from .input_checks import check_reference_types, warn_panel_shrunk

    ref = Path(opts.reference)
    if ref.suffix in (".tsv", ".csv") or _is_prototypes_h5ad(ref):
        protos = Prototypes.load(ref)
        shared = [g for g in genes if g in set(protos.genes)]
        if not shared:
            raise CPNNInputError("the prototypes share no genes with the data", path=ref, field="genes")
        check_reference_types(protos.cell_types, ref, field="cell types")
        warn_panel_shrunk(len(genes), len(shared), ref)
        return protos.subset_genes(shared)
    if not opts.label:
        raise CPNNInputError("building prototypes needs the cell-type column", field="--label",
                             fix="e.g. --label celltype_major")
    adata = read_reference(ref, opts.label, batch_key=opts.batch)
    protos = build_prototypes(adata, opts.label, method=opts.prototype_method, batch_key=opts.batch,
                              genes=list(genes), seed=opts.seed)
    check_reference_types(protos.cell_types, ref)
    return protos


def _is_prototypes_h5ad(path: Path) -> bool:
    if path.suffix != ".h5ad" or not path.is_file():
        return False
    import h5py

    with h5py.File(path, "r") as fh:
        return "varm" in fh and "cpnn_prototypes" in fh["varm"]


def run_fit(samples: List[SpatialSample], opts: FitOptions, out: Path, features_dir=None,
            progress: bool = True):
    """Train on ``samples`` and write the run folder ``out``; returns the model.

    The run is written into a temporary sibling and swapped in when complete
    (:func:`cpnn.runfolder.staged_run_folder`): a failure or a kill leaves the previous run
    at ``out`` untouched; ``out`` must be new, empty or an earlier run folder."""
    from ..runfolder import staged_run_folder
    from ..train.distributed import dist_env

    out = Path(out)
    if dist_env()[0] != 0:  # only rank 0 writes; the others keep their features in memory
        return _fit_into(samples, opts, None, out, features_dir, progress)
    with staged_run_folder(out) as staged:
        return _fit_into(samples, opts, staged, out, features_dir, progress)


def _fit_into(samples: List[SpatialSample], opts: FitOptions, out: Optional[Path], shown: Path, features_dir=None,
              progress: bool = True):
    """Train on ``samples`` and write the run into ``out`` (None: write nothing); ``shown`` is
    the folder named in messages.

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
    attach_features(samples, opts.features, cache_dir=out / "features" if out is not None else None,
                    features_dir=features_dir,
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
    model.preset = opts.preset  # recorded in the model file beside every resolved option
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
            **model.residual.describe(),
            "inner_cv_pearson": model.residual.cv_scores_,
            "out_of_fold_fraction": model.residual.oof_fraction_},
        "history": hist,
        "seconds": {"prototypes": round(t_protos, 1), "features": round(t_feats, 1),
                    "total": round(time.perf_counter() - t0, 1)},
    })
    say(f"wrote {shown}/ (model.cpnn, prototypes.h5ad, config.json, metrics.json, manifest.json, features/) in "
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
        described = head.describe()
        form = described["form"]
        if "mixture_coef_quantiles_10_50_90" in described:
            form += f", median mixture coefficient {described['mixture_coef_quantiles_10_50_90'][1]:.2f}"
        if described.get("mixture_weight") is not None:
            form += f", mixture weight {described['mixture_weight']:g}"
        return f"residual head: kept ({form}), penalty {head.alpha_:g}" + (f" ({detail})" if detail else "")
    detail = f" (inner-CV Pearson without it {off:.3f}: no form or penalty did better)" if off is not None else ""
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
            "residual_head": None if model.residual is None else model.residual.describe(),
        }
    write_json(out / "config.json", record)


def load_run_model(run: Path):
    """The model of a run folder (or a model file); a run folder must match its manifest."""
    from ..model import CPNN
    from ..runfolder import check_config_matches, verify_run_folder

    verify_run_folder(run)
    path = run / "model.cpnn" if run.is_dir() else run
    model = CPNN.load(path)
    check_config_matches(run, model)
    return model


def run_predict(run: Path, samples: List[SpatialSample], out: Path, features_dir=None, progress: bool = True):
    """Predict every sample with the run's model; write ``.h5ad`` file(s). Returns the AnnDatas."""
    import anndata as ad  # noqa: F401  (AnnData writing)

    from ..outputs import check_out_file, check_out_folder
    from ..runfolder import prediction_cache_dir
    from .spatial import assign_file_stems

    several = len(samples) > 1
    assign_file_stems(samples)
    if several:  # --out checked before any work
        check_out_folder(out)
    else:
        check_out_file(out)
    model = load_run_model(run)
    enc = model.encoder or {}
    spec = FeatureSpec.from_encoder_info(enc)
    attach_features(samples, spec, cache_dir=prediction_cache_dir(run), features_dir=features_dir,
                    progress=progress)
    preds = []
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
                          Path(features_dir) / f"{s.file_stem}.h5")
        pred = prediction_anndata(model, s)
        target = out / f"{s.file_stem}.h5ad" if several else out
        with atomic_path(target, suffix=".h5ad") as tmp:
            pred.write_h5ad(tmp)
        preds.append(pred)
        if progress:
            print(f"wrote {target} ({pred.n_obs} spots x {pred.n_vars} genes, {len(model.cell_types)} cell types)")
    return preds

"""``cpnn fit`` and ``cpnn predict``: train on spatial (or pseudo-bulk) data, predict spots."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Dict

from .cli_types import mpp_value, non_negative_float, positive_float, positive_int
from .errors import CPNNInputError


def add_input_args(p: argparse.ArgumentParser) -> None:
    """Input options shared by fit, predict and benchmark."""
    g = p.add_argument_group("spatial input (one kind)")
    g.add_argument("--her2st", metavar="ROOT", help="root of an almaan/her2st layout")
    g.add_argument("--sections", type=lambda s: [x for x in s.split(",") if x], help="section ids, e.g. C2,C3")
    g.add_argument("--visium", nargs="+", metavar="OUTS", help="Space Ranger outs/ folders")
    g.add_argument("--hest", metavar="ROOT", help="HEST-1k root (st/, wsis/, metadata/)")
    g.add_argument("--hest-ids", type=lambda s: [x for x in s.split(",") if x], help="HEST sample ids")
    g.add_argument("--h5ad", nargs="+", help="generic .h5ad files with obsm['spatial']")
    g.add_argument("--image", nargs="+", help="full-resolution images for --visium/--h5ad (same order)")
    g.add_argument("--mpp", type=mpp_value, help="microns per pixel of the images, when the files do not say")
    f = p.add_argument_group("features")
    f.add_argument("--encoder", default=None, help="encoder name (see `cpnn encoders`); default efficientnet-lite0")
    f.add_argument("--patch-um", type=positive_float, default=None, help="patch side in microns (default 112)")
    f.add_argument("--features", metavar="DIR", help="precomputed CLAM/TRIDENT/cpnn feature files {sample}.h5")
    f.add_argument("--tta", choices=["none", "flips", "flips8"], default=None,
                   help="test-time augmentation: average features over 4 flips or 8 flips/rotations (default none)")
    f.add_argument("--context-rings", type=non_negative_float, default=None,
                   help="append the mean feature of neighbours within this many spot pitches (0: none)")
    f.add_argument("--subpatch-grid", type=positive_int, default=None,
                   help="fit: each spot a bag of G x G sub-patches of patch-um/G microns (default 2; 1: one "
                        "patch; with --features the files decide); predict uses the model's")


def load_yaml(path) -> Dict[str, Any]:
    import yaml

    if path is None:
        return {}
    try:
        with open(path) as fh:
            data = yaml.safe_load(fh) or {}
    except FileNotFoundError as exc:
        raise CPNNInputError("config file not found", path=path) from exc
    if not isinstance(data, dict):
        raise CPNNInputError("config must be a mapping (sections model/train/features/prototypes)", path=path)
    return data


def _inputs(args, require_image: bool):
    from .workflows.spatial import load_inputs

    return load_inputs(her2st=args.her2st, sections=args.sections, visium=args.visium, hest=args.hest,
                       hest_ids=args.hest_ids, h5ad=args.h5ad, image=args.image, mpp=args.mpp,
                       require_image=require_image)


def _spatial_given(args) -> bool:
    return any(getattr(args, k, None) for k in ("her2st", "visium", "hest", "h5ad"))


def _cmd_fit(args: argparse.Namespace) -> int:
    from .workflows.fit import FitOptions, run_fit

    cfg = load_yaml(args.config)
    if args.bulk or args.slides or args.sample_sheet:
        return _fit_bulk(args, cfg)
    opts = FitOptions.from_sources(cfg, args, path=args.config)
    samples = _inputs(args, require_image=args.features is None)
    run_fit(samples, opts, Path(args.out), features_dir=args.features, progress=not args.no_progress)
    return 0


def _fit_bulk(args: argparse.Namespace, cfg) -> int:
    """``cpnn fit --level bulk --bulk PATH (--features DIR | --slides GLOB)``: real bulk RNA-seq."""
    from .workflows.bulk import run_bulk_fit
    from .workflows.fit import FitOptions

    if not args.bulk:
        raise CPNNInputError("--slides/--sample-sheet need the bulk RNA-seq", field="--bulk",
                             fix="add --bulk GDC_FOLDER (or a samples x genes table)")
    if _spatial_given(args):
        raise CPNNInputError("--bulk trains on whole slides; spatial inputs are another kind of training data",
                             field="--bulk", fix="drop --her2st/--visium/--hest/--h5ad (or drop --bulk)")
    if (args.level or cfg.get("level")) == "spot":
        raise CPNNInputError("--bulk trains at slide level", field="--level", fix="use --level bulk with --bulk")
    if not args.features and not args.slides:
        raise CPNNInputError("--bulk needs the slides", field="--features/--slides",
                             fix="add --features DIR (CLAM/TRIDENT '{slide}.h5' files) or --slides 'GLOB'")
    args.level = "bulk"
    opts = FitOptions.from_sources(cfg, args, path=args.config)
    feat_cfg = dict(cfg.get("features", {}))
    if args.context_rings is None and "context_rings" not in feat_cfg:
        opts.features.context_rings = 0.0  # tiles of a slide bag: no neighbourhood context
    opts.features.subpatch_grid = 1
    run_bulk_fit(opts, Path(args.out), args.bulk, sample_sheet=args.sample_sheet, features_dir=args.features,
                 slides=args.slides, mpp=args.mpp, progress=not args.no_progress)
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from .workflows.input_checks import warn_ignored_predict_flags

    warn_ignored_predict_flags(args)
    if args.slide:  # whole slide: every tissue tile, and the slide's bulk profile
        from .cli_slide import predict_slide_command

        return predict_slide_command(args, args.features)
    if args.slides or (args.features and not _spatial_given(args)):
        # whole slides through their tile features: one row per slide + per-tile maps
        from .workflows.bulk import run_bulk_predict

        run_bulk_predict(Path(args.run), Path(args.out), features_dir=None if args.slides else args.features,
                         slides=args.slides, mpp=args.mpp, progress=not args.no_progress)
        return 0
    from .workflows.fit import run_predict

    samples = _inputs(args, require_image=args.features is None)
    run_predict(Path(args.run), samples, Path(args.out), features_dir=args.features,
                progress=not args.no_progress)
    return 0


def add_slide_args(p: argparse.ArgumentParser, fit: bool) -> None:
    """Whole-slide inputs (bulk RNA-seq training, slide tables)."""
    g = p.add_argument_group("whole slides with bulk RNA-seq (TCGA/GDC; use with --features DIR or --slides)")
    if fit:
        g.add_argument("--bulk", metavar="PATH",
                       help="bulk RNA-seq: a GDC download folder (STAR '*star_gene_counts.tsv' files in File-ID "
                            "folders) or a samples x genes table (.tsv/.csv/.h5ad). Slides are matched to RNA "
                            "samples by TCGA barcode (sample = first 15 characters); several slides of one sample "
                            "form one bag; unmatched slides and samples are reported, not used")
        g.add_argument("--sample-sheet", metavar="TSV", help="the GDC sample sheet of the download (file -> sample)")
        g.add_argument("--composition-targets", choices=["auto", "deconvolve", "none"], default=None,
                       help="the composition loss against deconvolved training bulks: 'auto' (default) keeps it "
                            "only when inner cross-validation over training patients says it helps")
    g.add_argument("--slides", metavar="GLOB", help="slide images (quoted glob, e.g. 'slides/*.svs'), tiled and "
                   "encoded with --encoder (fit) or the model's encoder (predict); --mpp when files lack it. "
                   "With --features DIR instead: one CLAM/TRIDENT '{slide}.h5' per slide")


def register(sub) -> None:
    p = sub.add_parser("fit", help="train CPNN on spatial data (spot level, or pseudo-bulk with --level bulk) "
                                   "or on whole slides with bulk RNA-seq (--level bulk --bulk)")
    add_input_args(p)
    add_slide_args(p, fit=True)
    p.add_argument("--reference", required=True, help="single-cell reference .h5ad (raw counts) or prototypes file")
    p.add_argument("--label", default=None, help="obs column of cell types in the reference (e.g. celltype_major)")
    p.add_argument("--batch", default=None, help="obs column of batches in the reference")
    p.add_argument("--prototype-method", choices=["naive", "regression"], default=None,
                   help="naive type means or the negative-binomial regression (default regression)")
    p.add_argument("--genes", default=None, help="gene panel file (one symbol per line); default: top expressed")
    p.add_argument("--n-top-genes", type=positive_int, default=None, help="without --genes: the N most expressed (default 1000)")
    p.add_argument("--level", choices=["spot", "bulk"], default=None,
                   help="spot supervision, or bags: pseudo-bulk regions of spatial data, or whole slides with --bulk")
    p.add_argument("--residual-head", choices=["none", "ridge", "blend", "stacked"], default=None,
                   help="cell-state term on top of the cell-type mixture, kept only when inner "
                        "cross-validation over training sections says it helps (spot level); "
                        "blend: that cross-validation may also weight the mixture by one c < 1 "
                        "(c * mixture + ridge: the mixture blended with a linear probe); "
                        "stacked: it may down-weight noisy mixture genes one by one (a_g * mixture + ridge)")
    n = p.add_argument_group("options for a new patient's scan (recorded in the model; predict applies them)")
    n.add_argument("--slide-standardise", choices=["none", "center", "robust"], default=None,
                   help="standardise each slide's features on that slide's own statistics: subtract its mean "
                        "(center) or median and divide by its IQR (robust); default none")
    n.add_argument("--nuclei", action="store_true", default=None,
                   help="append 16 nuclear-morphology features (haematoxylin channel) to each patch's features")
    n.add_argument("--stain-norm", choices=["none", "macenko"], default=None,
                   help="Macenko stain normalisation of every patch before the encoder, to a target fitted on "
                        "the training patches; default none")
    p.add_argument("--config", default=None, help="YAML with sections model/train/features/prototypes")
    p.add_argument("--seed", type=int, default=None, help="seed of splits, initialisation and sampling (default 0)")
    p.add_argument("--epochs", type=positive_int, default=None, help="max epochs (at least 1)")
    p.add_argument("--out", required=True, help="run folder (model, prototypes, config, metrics)")
    p.add_argument("--no-progress", action="store_true", help="no stage lines or progress bars")
    p.set_defaults(func=_cmd_fit)

    p = sub.add_parser("predict", help="predict spot expression and cell-type weights with a trained run "
                                       "(or every slide's bulk and per-tile maps with --features DIR / --slides)")
    p.add_argument("run", help="run folder written by `cpnn fit` (or a model .cpnn file)")
    p.add_argument("--slide", default=None,
                   help="a whole-slide image instead of spots: per-tile maps and the slide's bulk profile")
    add_input_args(p)
    from .cli_slide import slide_tile_args

    slide_tile_args(p.add_argument_group("with --slide (tiles default to the model's patch)"))
    add_slide_args(p, fit=False)
    p.add_argument("--out", required=True, help="output .h5ad (one sample) or folder (several); whole slides "
                   "(--features DIR alone, or --slides): one .h5ad, a row per slide, per-tile maps in OUT_tiles/")
    p.add_argument("--no-progress", action="store_true", help="no stage lines or progress bars")
    p.set_defaults(func=_cmd_predict)

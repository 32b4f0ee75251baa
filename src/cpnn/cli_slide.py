"""Whole-slide images: ``cpnn predict RUN --slide S`` (its implementation is here) and the
deprecated aliases ``cpnn predict-slide`` (= ``predict --slide``) and ``cpnn extract-tiles``
(= ``cpnn extract`` of one slide at the model patch's 224 px)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .cli_types import mpp_value, positive_int


def deprecation_note(old: str, new: str) -> None:
    """One line on stderr: ``cpnn OLD`` still works, ``NEW`` is the command to use."""
    print(f"cpnn: note: `cpnn {old}` is deprecated and will be removed; use `{new}` (same result)",
          file=sys.stderr, flush=True)


def predict_slide_command(args: argparse.Namespace, features_dir) -> int:
    """``cpnn predict RUN --slide S``: every tissue tile and the slide's bulk profile."""
    from .workflows.wsi import predict_slide

    out = Path(args.out)
    features_dir = features_dir or str(out.parent / "features")
    a = predict_slide(Path(args.run), args.slide, mpp=args.mpp, tile_px=args.tile_px, target_mpp=args.target_mpp,
                      out=out, features_dir=features_dir, min_tissue=args.min_tissue,
                      batch_size=args.batch_size, num_workers=args.num_workers, progress=not args.no_progress)
    print(wrote_slide_line(a, out), flush=True)
    return 0


def _cmd_predict_slide(args: argparse.Namespace) -> int:
    deprecation_note("predict-slide", "cpnn predict RUN --slide SLIDE --out OUT.h5ad")
    return predict_slide_command(args, args.features_dir)


def wrote_slide_line(adata, out) -> str:
    """What a whole-slide prediction wrote, in one line (``predict-slide`` and ``predict --slide``)."""
    return (f"wrote {out} ({adata.n_obs} tiles x {adata.n_vars} genes, {len(adata.uns['cpnn']['cell_types'])} "
            "cell types; slide bulk in uns['cpnn']['bulk_prediction'])")


def _cmd_extract_tiles(args: argparse.Namespace) -> int:
    from .workflows.wsi import slide_features

    deprecation_note("extract-tiles", f"cpnn extract --slides SLIDE --tile-px {args.tile_px} "
                                      f"--target-mpp {args.target_mpp} --out DIR")

    ff, facts = slide_features(args.slide, args.encoder, mpp=args.mpp, tile_px=args.tile_px,
                               target_mpp=args.target_mpp, features_dir=args.out, min_tissue=args.min_tissue,
                               batch_size=args.batch_size, num_workers=args.num_workers, tta=args.tta,
                               progress=not args.no_progress)
    print(f"wrote {Path(args.out) / (facts['slide_id'] + '.h5')} ({len(ff.features)} tissue tiles x "
          f"{ff.features.shape[1]} dims, {args.tile_px} px at {args.target_mpp} µm/px)")
    return 0


def _tile_args(p: argparse.ArgumentParser, defaults_from_model: bool) -> None:
    p.add_argument("--slide", required=True, help="whole-slide image (svs, ndpi, tiff, ...)")
    p.add_argument("--mpp", type=mpp_value, default=None, help="level-0 microns per pixel when the file has none")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    slide_tile_args(p, defaults_from_model)


def slide_tile_args(p, defaults_from_model: bool = True) -> None:
    """Tiling options of a whole-slide command (``predict --slide`` and the aliases)."""
    hint = " (default: the model's patch)" if defaults_from_model else ""
    p.add_argument("--tile-px", type=positive_int, default=None if defaults_from_model else 224, help="tile side in px" + hint)
    p.add_argument("--target-mpp", type=mpp_value, default=None if defaults_from_model else 0.5,
                   help="tile resolution in µm/px" + hint)
    p.add_argument("--min-tissue", type=float, default=0.25, help="minimum tissue fraction of a kept tile")
    p.add_argument("--batch-size", type=positive_int, default=32, help="tiles per forward pass (default 32)")
    p.add_argument("--num-workers", type=int, default=1, help="image decoding threads")


def register(sub) -> None:
    p = sub.add_parser("predict-slide", help="deprecated: use `cpnn predict RUN --slide SLIDE`")
    p.add_argument("run", help="run folder written by `cpnn fit` (or a model .cpnn file)")
    _tile_args(p, True)
    p.add_argument("--features-dir", default=None, help="tile feature cache (default: OUT's folder/features)")
    p.add_argument("--out", required=True, help="output .h5ad (one obs per tile)")
    p.set_defaults(func=_cmd_predict_slide)

    p = sub.add_parser("extract-tiles", help="deprecated: use `cpnn extract --slides SLIDE --tile-px 224`")
    _tile_args(p, False)
    p.add_argument("--encoder", default="efficientnet-lite0",
                   help="encoder name (see `cpnn encoders`; default efficientnet-lite0)")
    p.add_argument("--tta", choices=["none", "flips", "flips8"], default="none",
                   help="test-time augmentation: average features over 4 flips or 8 flips/rotations")
    p.add_argument("--out", required=True, help="output folder ({slide}.h5)")
    p.set_defaults(func=_cmd_extract_tiles)

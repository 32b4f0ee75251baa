"""``cpnn extract``: sharded, resumable tile-feature extraction over many slides.

Registered by ``cpnn.cli`` (``register(subparsers)``); also runnable on its own as
``python -m cpnn.cli_extract ...``.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from .cli_types import mpp_value, positive_int


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``extract`` sub-command to a ``cpnn`` sub-parser group."""
    p = subparsers.add_parser(
        "extract",
        help="tile features for many slides: sharded, resumable, one slide per worker process",
        description="Extract CLAM-style tile feature files (OUT/{slide}.h5) with a completion marker "
                    "(OUT/{slide}.done.json) per slide. Re-running the same command skips finished slides; "
                    "failures are listed in OUT/failed*.json without stopping the other slides.",
    )
    _add_arguments(p)
    p.set_defaults(func=_run)
    return p


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--slides", required=True, nargs="+",
                   help="slide files, glob patterns (quoted) or job lists (.txt/.csv: 'path[,mpp]' per line)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--shard", default="0/1", help="this worker's shard i/n, numbered from 0 (default 0/1)")
    p.add_argument("--workers", type=int, default=1,
                   help="worker processes, one slide each (0: run in this process; default 1)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: CPUs / workers)")
    p.add_argument("--encoder", default="efficientnet-lite0", help="encoder name (default efficientnet-lite0)")
    p.add_argument("--device", default="cpu", help="torch device of the encoder (default cpu)")
    p.add_argument("--tile-px", type=positive_int, default=256, help="tile side in pixels at --target-mpp (default 256)")
    p.add_argument("--target-mpp", type=mpp_value, default=0.5, help="tile resolution, µm per pixel (default 0.5)")
    p.add_argument("--min-tissue", type=float, default=0.25, help="minimum tissue fraction per tile (default 0.25)")
    p.add_argument("--mpp", type=mpp_value, default=None,
                   help="µm per level-0 pixel for slides whose metadata lack it (a job list's value wins)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="tiles per forward pass (default 32)")
    p.add_argument("--tta", choices=["none", "flips", "flips8"], default="none",
                   help="test-time augmentation: average features over 4 flips or 8 flips/rotations")
    p.add_argument("--plugin", action="append", default=[],
                   help="module to import in every worker first (registers custom encoders); repeatable")
    p.add_argument("--quiet", action="store_true", help="no per-slide lines")


def _run(args: argparse.Namespace) -> int:
    from .workflows.batch_extract import ExtractSettings, extract_slides, parse_shard

    shard = parse_shard(args.shard)
    settings = ExtractSettings(encoder=args.encoder, tile_px=args.tile_px, target_mpp=args.target_mpp,
                               min_tissue=args.min_tissue, mpp=args.mpp, batch_size=args.batch_size,
                               tta=args.tta, device=args.device, plugins=tuple(args.plugin))
    summary = extract_slides(args.slides, args.out, settings, shard=shard, workers=args.workers,
                             threads_per_worker=args.threads,
                             log=None if args.quiet else (lambda m: print(m, flush=True)))
    return 1 if summary["failed"] else 0


def main(argv: Optional[List[str]] = None) -> int:
    """Run ``cpnn extract`` with ``argv`` (for ``python -m cpnn.cli_extract`` and tests)."""
    from .cli import run_guarded

    parser = argparse.ArgumentParser(prog="cpnn extract", description=__doc__.splitlines()[0])
    _add_arguments(parser)
    return run_guarded(_run, parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""``cpnn view PRED.h5ad --out DIR``: an offline HTML viewer of a prediction over its H&E."""
from __future__ import annotations

import argparse


def _cmd_view(args: argparse.Namespace) -> int:
    from .viewer import write_viewer

    genes = [g for g in (args.genes or "").split(",") if g] or None
    page = write_viewer(args.prediction, args.out, slide=args.slide, genes=genes, n_genes=args.n_genes,
                        workers=args.workers, progress=not args.no_progress)
    print(f"wrote {page} (open it in a browser; the folder {args.out} is self-contained and works offline)")
    return 0


def register(sub) -> None:
    """Add ``view`` to the ``cpnn`` sub-commands."""
    p = sub.add_parser("view", help="write an offline HTML viewer: the H&E to zoom into, cell-type and gene overlays")
    p.add_argument("prediction", metavar="PRED.h5ad", help="prediction file written by `cpnn predict` or `predict-slide`")
    p.add_argument("--slide", default=None,
                   help="the full-resolution image the prediction was made on (default: the path the prediction "
                        "records, else its stored downsampled image)")
    p.add_argument("--out", required=True, help="output folder; open OUT/index.html")
    p.add_argument("--genes", default=None, help="comma-separated genes to show (default: the most variable predicted)")
    p.add_argument("--n-genes", type=int, default=4, help="without --genes: how many genes to show (default 4)")
    p.add_argument("--workers", type=int, default=2, help="threads cutting the image pyramid (default 2)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_view)

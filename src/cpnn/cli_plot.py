"""``cpnn plot``: figures of prediction files (weight maps, dominant type, genes, drivers)."""
from __future__ import annotations

import argparse
from pathlib import Path

from .errors import CPNNInputError


def _cmd_plot(args: argparse.Namespace) -> int:
    from .plot.maps import plot_prediction

    from .outputs import check_out_folder, is_h5ad, unique_stems

    genes = [g for g in (args.genes or "").split(",") if g] or None
    several = len(args.predictions) > 1
    for pred in args.predictions:  # every input checked before the first figure is drawn
        if not is_h5ad(pred):
            problem = "is not an .h5ad prediction file" if Path(pred).is_file() else "file not found"
            raise CPNNInputError(problem, path=pred, field="PRED.h5ad", fix="pass files written by `cpnn predict`")
    stems = unique_stems([(Path(p).stem, p) for p in args.predictions], field="prediction file name",
                         fix="plot them one at a time with different --out folders, or rename one")
    check_out_folder(args.out)
    for pred in args.predictions:
        out = Path(args.out) / stems[Path(pred).stem] if several else Path(args.out)
        paths = plot_prediction(pred, out, genes=genes, max_types=args.max_types, n_genes=args.n_genes, dpi=args.dpi,
                                shared_scale=args.shared_scale)
        print(f"{pred}: wrote {', '.join(p.name for p in paths.values())} to {out}")
    return 0


def register(sub) -> None:
    """Add ``plot`` to the ``cpnn`` sub-commands."""
    p = sub.add_parser("plot", help="draw cell-type weight maps, dominant types, gene maps and drivers of predictions")
    p.add_argument("predictions", nargs="+", metavar="PRED.h5ad", help="prediction files written by `cpnn predict`")
    p.add_argument("--out", required=True, help="output folder (one sub-folder per file when several)")
    p.add_argument("--genes", default=None, help="comma-separated genes for genes.png/drivers.png "
                   "(default: the most variable predicted genes)")
    p.add_argument("--n-genes", type=int, default=4, help="without --genes: how many genes to pick (default 4)")
    p.add_argument("--max-types", type=int, default=None, help="only the N most abundant cell types in the weight maps")
    p.add_argument("--shared-scale", action="store_true",
                   help="one colour scale for every cell type's weight map (default: each type 0 to its own "
                        "99th percentile, which makes a rare type look as bright as an abundant one)")
    p.add_argument("--dpi", type=int, default=110, help="resolution of the PNGs in dots per inch (default 110)")
    p.set_defaults(func=_cmd_plot)

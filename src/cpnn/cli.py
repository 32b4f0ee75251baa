"""Command-line interface: a thin layer over the Python API.

Each sub-command lives in a small function that parses nothing itself; heavy modules are
imported only when a command runs, so ``cpnn --help`` is instant.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from . import __version__


def _cmd_demo(args: argparse.Namespace) -> int:
    from .workflows.demo import run_demo

    run_demo(args.out, seed=args.seed, quick=args.quick, quiet=args.quiet, progress=not args.no_progress)
    return 0


def _cmd_prototypes(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .errors import CPNNInputError
    from .outputs import check_writable_dir
    from .prototypes import build_prototypes, read_reference
    from .workflows.fit import read_gene_list

    if Path(args.out).is_dir():  # before the reference is read
        raise CPNNInputError("is an existing folder, but one prototypes file is written", path=args.out,
                             field="--out", fix="give --out a file name ending in .h5ad or .tsv")
    check_writable_dir(Path(args.out).parent)
    genes = read_gene_list(args.genes) if args.genes else None
    ref = read_reference(args.reference, args.label, batch_key=args.batch, metadata=args.metadata)
    protos = build_prototypes(ref, args.label, method=args.method, batch_key=args.batch, genes=genes, seed=args.seed)
    protos.save(args.out)
    print(f"wrote {len(protos.cell_types)} prototypes x {len(protos.genes)} genes to {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``cpnn`` argument parser (exposed for documentation and tests)."""
    parser = argparse.ArgumentParser(
        prog="cpnn",
        description="Gene expression from H&E images through single-cell cell-type prototypes (CPNN).",
    )
    parser.add_argument("--version", action="version", version=f"cpnn {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("demo", help="run the whole method on a synthetic cohort (offline, ~2 minutes)")
    p.add_argument("--out", default="cpnn-demo", help="output folder (default: ./cpnn-demo)")
    p.add_argument("--seed", type=int, default=0, help="seed of the cohort, the split and training (default 0)")
    p.add_argument("--quick", action="store_true", help="a smaller cohort (seconds; for smoke tests)")
    p.add_argument("--quiet", action="store_true", help="no stage lines")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("prototypes", help="build cell-type prototypes from a single-cell reference")
    p.add_argument("--reference", required=True, help=".h5ad or 10x matrix folder (raw counts)")
    p.add_argument("--label", required=True, help="obs column with the cell type (e.g. celltype_major)")
    p.add_argument("--batch", default=None, help="obs column with the batch/patient (optional)")
    p.add_argument("--metadata", default=None, help="cell metadata table for a 10x folder")
    p.add_argument("--method", choices=["naive", "regression"], default="regression",
                   help="naive type means or the negative-binomial regression (default regression)")
    p.add_argument("--genes", default=None, help="text file of target genes, one per line")
    p.add_argument("--seed", type=int, default=0, help="seed of the regression (default 0)")
    p.add_argument("--out", required=True, help="output .h5ad or .tsv")
    p.set_defaults(func=_cmd_prototypes)

    _register_optional(sub)
    return parser


def _register_optional(sub) -> None:
    """Sub-commands defined in their own modules (fit, predict, plot, benchmark, ...)."""
    import importlib

    for module_name in (
        "cpnn.cli_spatial",
        "cpnn.cli_slide",
        "cpnn.cli_extract",
        "cpnn.cli_plot",
        "cpnn.cli_benchmark",
        "cpnn.cli_encoders",
        "cpnn.cli_view",
        "cpnn.cli_export",
        "cpnn.cli_tcga",
    ):
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                continue
            raise
        module.register(sub)


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``cpnn`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return run_guarded(args.func, args)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"cpnn: warning: {message}", file=sys.stderr if file is None else file, flush=True)


def run_guarded(func, args: argparse.Namespace) -> int:
    """Run a sub-command: input errors and a full disk become ``cpnn: error: ... Fix: ...``
    (exit 2), warnings one ``cpnn: warning: ...`` line each."""
    import warnings

    from .errors import CPNNInputError
    from .outputs import disk_full_error, is_disk_full

    old_show = warnings.showwarning
    warnings.showwarning = _show_warning
    try:
        return int(func(args) or 0)
    except CPNNInputError as exc:
        print(f"cpnn: error: {exc}", file=sys.stderr)
        return 2
    except (OSError, RuntimeError) as exc:
        if not is_disk_full(exc):
            raise
        where = getattr(exc, "filename", None) or getattr(args, "out", None) or "."
        print(f"cpnn: error: {disk_full_error(where)}", file=sys.stderr)
        return 2
    finally:
        warnings.showwarning = old_show


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

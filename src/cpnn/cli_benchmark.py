"""``cpnn benchmark CONFIG.yaml --out DIR``: methods x folds x gene sets, one report."""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path


def _cmd_benchmark(args: argparse.Namespace) -> int:
    from .evaluate.benchmark import load_config, load_data, run_benchmark

    from .workflows.input_checks import check_choices

    cfg = load_config(args.config, data_dir=args.data_dir)
    check_choices(args.methods, [m["name"] for m in cfg["methods"]], "--methods", "method")  # before any work
    if args.seed is not None:
        cfg["seed"] = args.seed
    cfg["command"] = "cpnn " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else None
    data = load_data(cfg, progress=not args.no_progress)
    run_benchmark(data, cfg, Path(args.out), methods=args.methods, folds=args.folds,
                  progress=not args.quiet)
    return 0


def register(sub) -> None:
    """Add the ``benchmark`` sub-command."""
    p = sub.add_parser("benchmark", help="compare methods over grouped folds and gene sets (one config, one report)")
    p.add_argument("config", help="benchmark YAML (data, split, features, reference, gene_sets, methods)")
    p.add_argument("--out", required=True, help="output folder (results.csv, report.md, splits.json, figures)")
    p.add_argument("--data-dir", default=None, help="sets ${CPNN_DATA_DIR} used in the config")
    p.add_argument("--methods", type=lambda s: [x for x in s.split(",") if x], default=None,
                   help="only these method names (comma-separated)")
    p.add_argument("--folds", type=lambda s: [int(x) for x in s.split(",") if x], default=None,
                   help="only these fold numbers (comma-separated), for quick checks")
    p.add_argument("--seed", type=int, default=None, help="override the config's seed")
    p.add_argument("--quiet", action="store_true", help="no log lines")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_benchmark)

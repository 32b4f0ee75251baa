"""``cpnn synthetic-tcga``: write the TCGA-shaped synthetic cohort (a GDC download to try
``cpnn fit --level bulk --bulk`` on, offline)."""
from __future__ import annotations

import argparse


def _cmd_synthetic_tcga(args: argparse.Namespace) -> int:
    from .workflows.synthetic_tcga import write_tcga_cohort

    c = write_tcga_cohort(args.out, n_patients=args.n_patients, seed=args.seed, image_px=1024 if args.slides else 512,
                          tile_px=128 if args.slides else 64, write_slides=args.slides)
    bad = c.truth["bad_cases"]
    print(f"wrote {c.root}/: gdc/ ({len(c.truth['rna'])} STAR files), gdc_sample_sheet.tsv, features/ "
          f"({len(c.truth['slides'])} TRIDENT-style files)" + (", slides/ (pyramidal TIFF)" if args.slides else "")
          + ", reference.h5ad, truth.json")
    print(f"bad cases on purpose: {bad['two_slides_one_sample']['sample']} has 2 slides; "
          f"{len(bad['slide_without_rna'])} slide without RNA; {bad['rna_without_slide'][0]} has no slide")
    return 0


def register(sub) -> None:
    """Add ``synthetic-tcga``."""
    p = sub.add_parser("synthetic-tcga", help="write a TCGA-shaped synthetic cohort: GDC STAR folder, sample sheet, "
                                              "TRIDENT-style tile features, reference (offline)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--n-patients", type=int, default=12, help="patients (>= 6; default 12)")
    p.add_argument("--seed", type=int, default=0, help="seed of everything (default 0)")
    p.add_argument("--slides", action="store_true", help="also write each slide as a pyramidal TIFF (slides/)")
    p.set_defaults(func=_cmd_synthetic_tcga)

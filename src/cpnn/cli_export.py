"""``cpnn export PRED.h5ad --to geojson|spatialdata --out PATH``: predictions for QuPath
(GeoJSON detections with the weights as measurements) or SpatialData/napari (zarr store)."""
from __future__ import annotations

import argparse


def _cmd_export(args: argparse.Namespace) -> int:
    genes = [g for g in (args.genes or "").split(",") if g] or None
    if args.to == "geojson":
        from .export.geojson import write_geojson

        path = write_geojson(args.prediction, args.out, genes=genes, include_genes=not args.weights_only)
        print(f"wrote {path} (QuPath: File > Import objects, on the image the prediction was made on)")
        return 0
    from .export.spatialdata_store import write_spatialdata

    path = write_spatialdata(args.prediction, args.out, slide=args.slide, include_image=not args.no_image,
                             overwrite=args.overwrite)
    print(f"wrote {path} (spatialdata.read_zarr reads it; napari-spatialdata shows it)")
    return 0


def register(sub) -> None:
    """Add ``export`` to the ``cpnn`` sub-commands."""
    p = sub.add_parser("export", help="write a prediction for QuPath (GeoJSON) or SpatialData/napari (zarr)")
    p.add_argument("prediction", metavar="PRED.h5ad", help="prediction file written by `cpnn predict` or `predict-slide`")
    p.add_argument("--to", required=True, choices=["geojson", "spatialdata"],
                   help="geojson: QuPath detections with the weights as measurements; spatialdata: a zarr store "
                        "with the image, the spots/tiles as shapes and a table (needs pip install 'cpnn[spatialdata]')")
    p.add_argument("--out", required=True, help="output .geojson file or .zarr store")
    p.add_argument("--slide", default=None, help="spatialdata: the full-resolution image (default: the one the "
                   "prediction records, else its stored downsampled image)")
    p.add_argument("--no-image", action="store_true", help="spatialdata: shapes and table only")
    p.add_argument("--overwrite", action="store_true", help="spatialdata: replace an existing store")
    p.add_argument("--genes", default=None, help="geojson: comma-separated genes to add as measurements "
                   "(default: every predicted gene)")
    p.add_argument("--weights-only", action="store_true", help="geojson: cell-type weights only, no genes")
    p.set_defaults(func=_cmd_export)

"""A TCGA-shaped synthetic cohort on disk: a GDC download, its sample sheet, tile features.

:func:`write_tcga_cohort` takes the seeded synthetic cohort
(:func:`cpnn.data.synthetic.make_synthetic_cohort`) and writes it the way a user holds
TCGA data, so that ``cpnn fit --level bulk``, ``cpnn predict`` and ``cpnn benchmark``
run end to end offline::

    OUT/
      gdc/{file id}/{file id}.rna_seq.augmented_star_gene_counts.tsv   # as the GDC client writes
      gdc_sample_sheet.tsv        # File ID, File Name, Data Category, ..., Case ID, Sample ID, Sample Type
      features/{slide}.h5         # TRIDENT/CLAM layout: features (N, D), coords (N, 2) + attrs
      slides/{slide}.tif          # optional small pyramidal TIFFs (write_slides=True)
      reference.h5ad              # single-cell reference (raw counts, obs 'cell_type', 'batch', QC done)
      truth.json                  # barcodes, the bad cases, true slide compositions

Slide names follow TCGA (``TCGA-XS-A001-01Z-00-DX1.{uuid}``), RNA samples too
(``TCGA-XS-A001-01A``; aliquot ``...-01A-11R-A00X-07``): a slide's sample (``01Z``) and the
RNA's (``01A``) share the first 15 characters, not the vial, as in TCGA. STAR files carry
versioned Ensembl ids (``ENSG00000000001.7``) and symbols (``gene_name``), the four ``N_``
summary rows and a ``# gene-model`` header.

**Bad cases** (always present, listed in ``truth.json``): the first patient has two
slides of one sample (DX1, DX2; its RNA is the sum of both slides' tissue); the second
patient has a slide but no RNA file; the third has an RNA file but no slide.

**Features.** ``features/*.h5`` are not image features: each tile's feature vector is
a fixed random projection of the tile's true cell-type composition (fractions of the
cells whose centres lie in the tile) plus Gaussian noise and a per-slide offset
(``encoder = "synthetic-composition"``). They are cheap (no network), carry what an
image encoder would need to carry, and keep tests fast. The TIFF slides
(``write_slides=True``) are the rendered H&E images, for the ``--slides`` path with a real
encoder.
"""
from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import pandas as pd

from ..errors import CPNNInputError
from ..utils import atomic_path, write_json

SYNTHETIC_ENCODER = "synthetic-composition"
STAR_SUFFIX = ".rna_seq.augmented_star_gene_counts.tsv"
_PROJECT = "TCGA-SYN"


@dataclass
class TCGACohortPaths:
    """Where :func:`write_tcga_cohort` wrote each part (and what it holds)."""

    root: Path
    gdc_dir: Path
    sample_sheet: Path
    features_dir: Path
    reference: Path
    slides_dir: Optional[Path]
    truth: Dict = field(default_factory=dict)


def _uuid(rng: np.random.Generator) -> str:
    return str(uuid.UUID(bytes=rng.bytes(16), version=4))


def ensembl_id(i: int) -> str:
    """A fake, stable, versioned Ensembl gene id of the synthetic gene number ``i``."""
    return f"ENSG{i + 1:011d}.{(i % 9) + 1}"


def _barcodes(i: int) -> Dict[str, str]:
    participant = f"A{i + 1:03d}"
    patient = f"TCGA-XS-{participant}"
    return {"patient": patient, "rna_sample": f"{patient}-01A", "aliquot": f"{patient}-01A-11R-A00X-07",
            "slide_sample": f"{patient}-01Z"}


def tile_compositions(cells: pd.DataFrame, n_types: int, image_px: int, tile_px: int):
    """Per tile of a ``tile_px`` grid: top-left corners and cell-type fractions.

    Tiles holding no cell (lumen) are dropped, as a tissue detector would.
    """
    nx = image_px // tile_px
    col = np.minimum((cells["x"].to_numpy() // tile_px).astype(np.int64), nx - 1)
    row = np.minimum((cells["y"].to_numpy() // tile_px).astype(np.int64), nx - 1)
    codes = cells["cell_type"].cat.codes.to_numpy().astype(np.int64)
    counts = np.zeros((nx * nx, n_types))
    np.add.at(counts, (row * nx + col, codes), 1.0)
    keep = counts.sum(1) > 0
    idx = np.flatnonzero(keep)
    coords = np.stack([idx % nx, idx // nx], axis=1).astype(np.int64) * tile_px
    comp = counts[keep] / counts[keep].sum(1, keepdims=True)
    return coords, comp, counts[keep].sum(1)


def _write_star(path: Path, genes: List[str], counts: np.ndarray, rng: np.random.Generator) -> None:
    lines = ["# gene-model: GENCODE v36 (synthetic)",
             "\t".join(["gene_id", "gene_name", "gene_type", "unstranded", "stranded_first", "stranded_second",
                        "tpm_unstranded", "fpkm_unstranded", "fpkm_uq_unstranded"])]
    total = int(counts.sum())
    for name, frac in (("N_unmapped", 0.02), ("N_multimapping", 0.03), ("N_noFeature", 0.01),
                       ("N_ambiguous", 0.005)):
        v = int(total * frac)
        lines.append(f"{name}\t\t\t{v}\t{v}\t{v}\t\t\t")
    tpm = counts / max(counts.sum(), 1.0) * 1e6
    for i, (g, c) in enumerate(zip(genes, counts)):
        first = int(rng.binomial(int(c), 0.5)) if c > 0 else 0
        lines.append(f"{ensembl_id(i)}\t{g}\tprotein_coding\t{int(c)}\t{first}\t{int(c) - first}\t"
                     f"{tpm[i]:.4f}\t{tpm[i] / 2:.4f}\t{tpm[i] / 3:.4f}")
    # a gene the reference lacks (zero everywhere), as GENCODE has many
    lines.append(f"ENSG09999999999.1\tLINC99999\tlncRNA\t0\t0\t0\t0\t0\t0")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, suffix=".tsv") as tmp:
        tmp.write_text("\n".join(lines) + "\n")


def _write_pyramid_tiff(path: Path, image: np.ndarray, mpp: float) -> None:
    """A two-level tiled pyramidal TIFF (SubIFDs) with its resolution in µm/px."""
    import tifffile

    levels = [image]
    half = image[: image.shape[0] // 2 * 2, : image.shape[1] // 2 * 2].astype(np.float64)
    levels.append(half.reshape(half.shape[0] // 2, 2, half.shape[1] // 2, 2, 3).mean(axis=(1, 3))
                  .round().astype(np.uint8))
    kw = dict(tile=(128, 128), photometric="rgb", compression="zlib", resolutionunit="CENTIMETER")
    with atomic_path(path, suffix=".tif") as tmp:
        with tifffile.TiffWriter(tmp) as tw:
            for i, lvl in enumerate(levels):
                res = 1e4 / (mpp * 2 ** i)
                extra = {"subifds": len(levels) - 1} if i == 0 else {"subfiletype": 1}
                tw.write(lvl, resolution=(res, res), **kw, **extra)


def write_tcga_cohort(out_dir: os.PathLike | str, n_patients: int = 10, seed: int = 0, n_types: int = 5,
                      n_genes: int = 200, image_px: int = 512, tile_px: int = 64, feature_dim: int = 32,
                      feature_noise: float = 0.3, n_ref_cells: int = 1500,
                      write_slides: bool = False) -> TCGACohortPaths:
    """Write a seeded TCGA-shaped cohort (GDC STAR folder, sample sheet, tile features).

    Parameters
    ----------
    out_dir
        Output folder (created). A cohort written there before is replaced; other
        content in ``gdc/``, ``features/``, ``slides/`` is refused.
    n_patients
        Patients (>= 6). Patient 1 has two slides of one sample, patient 2 a slide
        without RNA, patient 3 RNA without a slide; the others one slide and one RNA file.
    seed
        Seed of everything (the same seed writes the same numbers).
    n_types, n_genes, n_ref_cells
        As in :func:`cpnn.data.synthetic.make_synthetic_cohort`.
    image_px
        Side of each slide image in pixels (0.5 µm/px).
    tile_px
        Side of a feature tile in pixels (64 px = 32 µm: (image_px / tile_px)^2 tiles).
    feature_dim, feature_noise
        Dimension of the synthetic tile features and the standard deviation of their
        noise (see the module docstring).
    write_slides
        Also write each slide as a small pyramidal TIFF under ``slides/`` (needs
        ``image_px >= 800``: the tissue detector drops pieces under 20,000 µm²).

    Returns
    -------
    TCGACohortPaths
        Paths, and ``truth`` (also ``truth.json``): per slide its barcode, sample and true
        composition; per RNA file its sample; the bad cases.
    """
    from ..data.synthetic import _rng, make_synthetic_cohort

    if not isinstance(n_patients, (int, np.integer)) or n_patients < 6:
        raise CPNNInputError(f"n_patients must be an integer >= 6, got {n_patients!r}", field="n_patients",
                             fix="pass n_patients >= 6 (three patients carry the bad cases)")
    if tile_px < 16 or image_px % tile_px:
        raise CPNNInputError(f"tile_px {tile_px} must be >= 16 and divide image_px {image_px}", field="tile_px")
    if write_slides and image_px < 800:
        raise CPNNInputError(f"slides of {image_px} px (0.5 µm/px) are too small for the tissue detector",
                             field="image_px", fix="use image_px >= 800 (e.g. 1024) with write_slides=True")
    root = Path(out_dir)
    parts = [root / n for n in ("gdc", "features", "slides")]
    if any(p.exists() for p in parts):
        if not (root / "truth.json").is_file():
            raise CPNNInputError("the folder holds gdc/, features/ or slides/ not written by write_tcga_cohort",
                                 path=root, fix="pass an empty or new folder")
        import shutil

        for p in parts:  # a previous synthetic cohort: its files must not mix with the new ones
            shutil.rmtree(p, ignore_errors=True)
    n_slides = n_patients + 1  # the first patient has a second slide
    cohort = make_synthetic_cohort(n_slides=n_slides, n_patients=n_slides, n_types=n_types, n_genes=n_genes,
                                   image_px=image_px, mpp=0.5, spot_pitch_um=100.0, spot_diameter_um=100.0,
                                   n_ref_cells=n_ref_cells, seed=seed)
    rng_id = _rng(seed, 900)
    proj = _rng(seed, 901).normal(0.0, 1.0, (n_types, feature_dim))
    # slide k -> (patient index, slide suffix); the extra slide is patient 0's DX2
    owners = [(p, "DX1") for p in range(n_patients)] + [(0, "DX2")]
    no_rna, no_slide = 1, 2
    gdc_dir, feat_dir = root / "gdc", root / "features"
    slides_dir = root / "slides" if write_slides else None
    feat_dir.mkdir(parents=True, exist_ok=True)
    truth: Dict = {"seed": int(seed), "encoder": SYNTHETIC_ENCODER, "cell_types": list(cohort.cell_types),
                   "slides": {}, "rna": {}, "bad_cases": {}}
    bulk_of_patient: Dict[int, np.ndarray] = {}
    cells_of_patient: Dict[int, np.ndarray] = {}
    for k, (p, suffix) in enumerate(owners):
        sl = cohort.slides[k]
        bc = _barcodes(p)
        slide_id = f"{bc['slide_sample']}-00-{suffix}.{_uuid(rng_id)}"
        bulk_of_patient[p] = bulk_of_patient.get(p, 0) + sl.bulk_counts.astype(np.int64)
        n_type = np.bincount(sl.cells["cell_type"].cat.codes.to_numpy(), minlength=n_types).astype(np.float64)
        cells_of_patient[p] = cells_of_patient.get(p, 0) + n_type
        if p == no_slide:
            continue
        coords, comp, n_cells = tile_compositions(sl.cells, n_types, image_px, tile_px)
        rng = _rng(seed, 1000 + k)
        feats = comp @ proj + rng.normal(0.0, 0.1, feature_dim) + rng.normal(0.0, feature_noise, (len(comp), feature_dim))
        from ..encoders.features import write_feature_file

        write_feature_file(feat_dir / f"{slide_id}.h5", feats, coords,
                           attrs={"encoder": SYNTHETIC_ENCODER, "patch_size_px": tile_px,
                                  "patch_um": tile_px * cohort.mpp, "mpp": cohort.mpp, "level0_mpp": cohort.mpp,
                                  "patch_size_level0": tile_px,
                                  "cpnn_version": None})  # written like a TRIDENT file, not a cpnn cache
        if slides_dir is not None:
            slides_dir.mkdir(parents=True, exist_ok=True)
            _write_pyramid_tiff(slides_dir / f"{slide_id}.tif", sl.image, cohort.mpp)
        truth["slides"][slide_id] = {"patient": bc["patient"], "sample": bc["rna_sample"], "n_tiles": int(len(comp)),
                                     "proportions": np.asarray(sl.bulk_proportions).round(5).tolist(),
                                     "synthetic_section": sl.slide_id}
    rows = []
    for p in range(n_patients):
        if p == no_rna:
            continue
        bc = _barcodes(p)
        file_id = _uuid(rng_id)
        name = f"{file_id}{STAR_SUFFIX}"
        _write_star(gdc_dir / file_id / name, cohort.genes, bulk_of_patient[p], _rng(seed, 2000 + p))
        rows.append({"File ID": file_id, "File Name": name, "Data Category": "Transcriptome Profiling",
                     "Data Type": "Gene Expression Quantification", "Project ID": _PROJECT,
                     "Case ID": bc["patient"], "Sample ID": bc["rna_sample"], "Sample Type": "Primary Tumor"})
        truth["rna"][name] = {"patient": bc["patient"], "sample": bc["rna_sample"], "aliquot": bc["aliquot"]}
    sheet = root / "gdc_sample_sheet.tsv"
    with atomic_path(sheet, suffix=".tsv") as tmp:
        pd.DataFrame(rows).to_csv(tmp, sep="\t", index=False)
    from ..prototypes import reference_qc

    # QC'd here with a floor suited to a 200-gene panel (as `cpnn demo` does); the record in
    # uns makes `cpnn fit` skip its own QC, whose 200-genes-per-cell floor is for whole transcriptomes
    ref = reference_qc(cohort.reference, "cell_type", min_genes=10)
    ref.var["gene_ids"] = [ensembl_id(cohort.genes.index(g)).split(".")[0] if g in cohort.genes
                           else f"ENSG{9000000000 + j:011d}" for j, g in enumerate(ref.var_names)]
    ref_path = root / "reference.h5ad"
    with atomic_path(ref_path, suffix=".h5ad") as tmp:
        ref.write_h5ad(tmp)
    two = [s for s, v in truth["slides"].items() if v["patient"] == _barcodes(0)["patient"]]
    truth["bad_cases"] = {"two_slides_one_sample": {"sample": _barcodes(0)["rna_sample"], "slides": sorted(two)},
                          "slide_without_rna": [s for s, v in truth["slides"].items()
                                                if v["patient"] == _barcodes(no_rna)["patient"]],
                          "rna_without_slide": [_barcodes(no_slide)["rna_sample"]]}
    truth["genes"] = list(cohort.genes)
    # the composition of the tissue each RNA sample measured (all cells of its slides)
    truth["sample_proportions"] = {_barcodes(p)["rna_sample"]: (c / c.sum()).round(5).tolist()
                                   for p, c in sorted(cells_of_patient.items())}
    write_json(root / "truth.json", truth)
    return TCGACohortPaths(root, gdc_dir, sheet, feat_dir, ref_path, slides_dir, truth)

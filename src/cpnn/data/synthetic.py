"""A seeded synthetic cohort with known ground truth: prototypes, tissue, H&E, spots, bulk.

The cohort follows the generative story CPNN assumes, so that every stage of the package
can be checked against the truth:

1. **Prototypes.** ``K`` cell types with readable names and ``G`` panel genes. Each type
   has five marker genes (e.g. ``EPCAM`` for epithelial cells), eight housekeeping genes
   are shared by all, the rest (``GENE001`` ...) vary by type at random. The values are
   expected counts per cell in single-cell chemistry; per-cell totals differ by type.
2. **Tissue.** Per slide, the log-odds of each type are a slide-level bias (patient bias
   plus a small section deviation) plus Gaussian-filtered random fields at two scales
   (sigma 40 and 100 microns). Cells sit on a jittered 8-micron lattice thinned by a
   type-dependent density (lymphocytes dense, fibroblasts sparse), so cell spacing is
   8-13 microns; lumen-like gaps, lined by endothelial cells, hold no cells.
3. **H&E image.** Haematoxylin and eosin optical densities are stamped per cell,
   vectorised over all cells, then turned into RGB by Beer-Lambert with per-slide stain
   variation. Nuclei differ by type in size, elongation, darkness, texture and shape;
   stroma is pink with fibrous streaks where fibroblasts are; blur and noise come last.
4. **Spots.** A square grid; a spot's truth is the cell-type fractions among cells whose
   centres lie in its disc; counts ~ NB(capture * m_g * sum of those cells' prototypes).
5. **Bulk.** Per slide, counts ~ NB(depth * m'_g * sum over all cells' prototypes) with
   its own platform factor ``m'_g`` and 2-8 million reads.
6. **Single-cell reference.** Cells ~ NB(prototype * batch effect * depth) in two
   batches, with extra genes outside the panel, mitochondrial genes and a few damaged
   cells (high mitochondrial fraction) for quality control to remove.
7. **Patient effects** (off by default, see :data:`PATIENT_EFFECTS`): per-patient stain
   and scanner shifts of the image, composition shifts, a patient-specific tumour state
   and an immune-driven inflammation program. The last two make expression depart from
   a fixed prototype mixture, so the cohort can show a mixture model losing to a free
   regression on a held-out patient.

All randomness comes from ``numpy.random.SeedSequence(seed)`` with a fixed key per part,
so the same seed gives byte-identical arrays and slide ``i`` does not depend on how many
slides are made.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy import ndimage
from scipy.spatial import cKDTree

from cpnn._constants import PATIENT, SECTION, SPATIAL, TRUE_PROPORTIONS, UNS_INPUT
from cpnn.errors import CPNNInputError
from cpnn.utils import atomic_path, write_json

__all__ = [
    "SyntheticCohort",
    "SyntheticSlide",
    "make_synthetic_cohort",
    "load_synthetic_cohort",
    "CELL_TYPE_NAMES",
    "PATIENT_EFFECTS",
]

TRUTH_FILE = "truth.json"
REFERENCE_FILE = "reference.h5ad"
BULK_FILE = "bulk.h5ad"
CELLS_DIR = "cells"
FORMAT_VERSION = 1

HOUSEKEEPING = ["ACTB", "GAPDH", "B2M", "EEF1A1", "RPLP0", "TPT1", "MALAT1", "FTL"]
MT_GENES = ["MT-CO1", "MT-CO2", "MT-CO3", "MT-ND1", "MT-ND2", "MT-ND4", "MT-CYB", "MT-ATP6"]

# Lattice spacing of candidate cell positions (microns); types thin it by their density.
_LATTICE_UM = 8.0
# Grid step (microns) of the smooth composition / fibre / lumen fields.
_FIELD_STEP_UM = 8.0
_LUMEN_STEP_UM = 4.0
# Mean capture efficiency of a spatial spot relative to single-cell chemistry.
_SPOT_CAPTURE = 0.1


@dataclass(frozen=True)
class _TypeSpec:
    """Expression and morphology of one cell type (lengths in microns)."""

    name: str
    markers: tuple
    total: float  # expected panel counts per cell (single-cell chemistry)
    abundance: float  # baseline share in tissue
    density: float  # probability a lattice site holding this type keeps its cell
    axis_long: float  # nucleus semi-axes
    axis_short: float
    darkness: float  # haematoxylin optical density of the nucleus
    vesicular: float = 0.0  # 0..1: pale centre, dark rim, nucleolus
    kidney: float = 0.0  # 0..1: depth of a bean-shaped notch
    offset: float = 0.0  # nucleus displaced from the cell centre (eccentric)
    cyto_radius: float = 3.0
    cyto_eosin: float = 0.05
    cyto_haem: float = 0.0
    orient: str = "random"  # "random", "fibre" (along stroma streaks) or "vessel"


_NAMED_TYPES = (
    _TypeSpec("Epithelial", ("EPCAM", "KRT8", "KRT18", "KRT19", "CDH1"), 600.0, 0.32, 0.85,
              5.4, 4.4, 0.45, vesicular=1.0, cyto_radius=7.0, cyto_eosin=0.22,
              cyto_haem=0.14),
    _TypeSpec("T-cells", ("CD3D", "CD3E", "CD2", "TRAC", "IL7R"), 180.0, 0.18, 1.0,
              2.6, 2.4, 1.35, cyto_radius=3.2, cyto_eosin=0.04),
    _TypeSpec("Fibroblasts", ("COL1A1", "COL1A2", "DCN", "LUM", "PDGFRB"), 400.0, 0.22, 0.40,
              7.0, 1.25, 1.00, cyto_radius=2.0, cyto_eosin=0.10, orient="fibre"),
    _TypeSpec("Endothelial", ("PECAM1", "VWF", "CDH5", "PLVAP", "CLDN5"), 300.0, 0.10, 0.55,
              6.0, 1.20, 0.90, cyto_radius=2.0, cyto_eosin=0.10, orient="vessel"),
    _TypeSpec("Myeloid", ("CD68", "LYZ", "CD14", "C1QA", "AIF1"), 500.0, 0.18, 0.55,
              3.8, 2.7, 0.95, kidney=1.0, offset=1.6, cyto_radius=6.5, cyto_eosin=0.38),
    _TypeSpec("B-cells", ("MS4A1", "CD79A", "CD79B", "CD19", "BANK1"), 250.0, 0.10, 1.0,
              3.0, 2.8, 1.20, cyto_radius=3.5, cyto_eosin=0.05),
    _TypeSpec("Plasma cells", ("JCHAIN", "MZB1", "IGKC", "XBP1", "SDC1"), 900.0, 0.08, 0.70,
              3.0, 2.8, 1.05, vesicular=0.5, offset=1.8, cyto_radius=5.5, cyto_eosin=0.30,
              cyto_haem=0.12),
    _TypeSpec("Pericytes", ("RGS5", "ACTA2", "MYH11", "NOTCH3", "MCAM"), 350.0, 0.08, 0.50,
              5.5, 1.8, 0.80, cyto_radius=3.5, cyto_eosin=0.35, orient="fibre"),
)

CELL_TYPE_NAMES = tuple(t.name for t in _NAMED_TYPES)

# Patient effects (strength 0 = off): see make_synthetic_cohort(patient_effects=...).
PATIENT_EFFECTS = ("stain", "scanner", "composition", "tumour_state", "inflammation")
_IMMUNE_TYPES = ("T-cells", "B-cells", "Plasma cells", "Myeloid")
# Radius (microns) of the neighbourhood whose immune fraction drives inflammation.
_INFLAMMATION_RADIUS_UM = 30.0

# Ruifrok & Johnston optical-density vectors (R, G, B) of haematoxylin and eosin.
_H_VEC = np.array([0.650, 0.704, 0.286])
_E_VEC = np.array([0.072, 0.990, 0.105])


# --------------------------------------------------------------------------- containers
@dataclass
class SyntheticSlide:
    """One synthetic section: image, spots with truth, slide bulk, and its cells.

    Attributes
    ----------
    slide_id, patient_id
        Identifiers; several sections share a patient.
    image
        uint8 H x W x 3 RGB H&E-like image at the cohort's ``mpp``.
    spots
        AnnData (spots x panel genes): integer counts in ``X``, ``obsm["spatial"]`` spot
        centres (x, y) in pixels, ``obsm["true_proportions"]`` (spots x types),
        ``obs["section"]``, ``obs["patient"]``, ``obs["n_cells"]``,
        ``obs["capture_efficiency"]``, ``obs["array_row"]``, ``obs["array_col"]``,
        ``uns["cpnn_input"]`` and ``uns["cell_types"]``.
    bulk_counts
        (G,) int64 bulk RNA-seq counts of the whole slide.
    bulk_proportions
        (K,) cell-type fractions over all cells of the slide.
    cells
        DataFrame with one row per cell: ``x``, ``y`` (pixels) and ``cell_type``
        (categorical over the cohort's cell types).
    """

    slide_id: str
    patient_id: str
    image: np.ndarray
    spots: ad.AnnData
    bulk_counts: np.ndarray
    bulk_proportions: np.ndarray
    cells: pd.DataFrame


@dataclass
class SyntheticCohort:
    """A synthetic cohort with its generating truth (see :func:`make_synthetic_cohort`).

    Attributes
    ----------
    cell_types
        K type names, the column order of every proportion matrix.
    genes
        G spatial/bulk panel genes, the column order of ``true_prototypes``.
    true_prototypes
        K x G expected counts per cell (single-cell chemistry), positive.
    platform_factor
        (G,) gene-wise factor shared by all spatial data (``m_g``).
    bulk_platform_factor
        (G,) gene-wise factor of the bulk assay.
    slides
        The sections.
    reference
        Single-cell AnnData: integer counts (CSR) in ``X``, ``obs["cell_type"]``,
        ``obs["batch"]``, ``obs["damaged"]`` (truth: high mitochondrial fraction),
        ``var["in_panel"]``, ``var["mt"]``.
    mpp, spot_diameter_um, spot_pitch_um, seed
        Geometry and seed.
    params
        All arguments of :func:`make_synthetic_cohort` that made it (``patient_effects``
        only when an effect is on).
    patient_effects
        With patient effects on: ``{"strengths": {name: float}, "tumour_type": str,
        "immune_types": [...], "inflammation_program": [G], "patients": {patient_id:
        {parameter: value}}}`` (what each patient drew); empty otherwise.
    """

    cell_types: list
    genes: list
    true_prototypes: np.ndarray
    platform_factor: np.ndarray
    bulk_platform_factor: np.ndarray
    slides: list
    reference: ad.AnnData
    mpp: float
    spot_diameter_um: float
    spot_pitch_um: float
    seed: int
    params: dict = field(default_factory=dict)
    patient_effects: dict = field(default_factory=dict)

    @property
    def slide_ids(self) -> list:
        """Identifiers of the slides, in order."""
        return [s.slide_id for s in self.slides]

    def slide(self, slide_id: str) -> SyntheticSlide:
        """Return the slide called ``slide_id``."""
        for s in self.slides:
            if s.slide_id == slide_id:
                return s
        raise CPNNInputError(
            f"no slide {slide_id!r} in this cohort.", field="slide_id",
            fix=f"use one of {self.slide_ids}.",
        )

    def spots_anndata(self, slide_ids: Optional[Sequence[str]] = None) -> ad.AnnData:
        """Concatenate the spots of several slides into one AnnData.

        Parameters
        ----------
        slide_ids
            Slides to include, in this order; all slides when None.

        Returns
        -------
        AnnData
            Spots x genes with ``obs["section"]``, ``obs["patient"]``,
            ``obsm["spatial"]`` (pixels of each spot's own slide),
            ``obsm["true_proportions"]``, ``uns["cell_types"]`` and
            ``uns["cpnn_inputs"]`` = {slide_id: that slide's ``uns["cpnn_input"]``}.
        """
        ids = self.slide_ids if slide_ids is None else list(slide_ids)
        parts = [self.slide(i).spots for i in ids]
        out = ad.concat(parts, axis=0, join="inner", merge="same")
        out.uns["cell_types"] = list(self.cell_types)
        out.uns["cpnn_inputs"] = {i: dict(p.uns[UNS_INPUT]) for i, p in zip(ids, parts)}
        return out

    def bulk_anndata(self) -> ad.AnnData:
        """Slide-level bulk counts as AnnData (slides x genes).

        Returns
        -------
        AnnData
            int64 counts in ``X``, ``obs["section"]``, ``obs["patient"]``,
            ``obsm["true_proportions"]`` (slides x types), ``uns["cell_types"]``.
        """
        X = np.stack([s.bulk_counts for s in self.slides]).astype(np.int64)
        obs = pd.DataFrame(
            {SECTION: [s.slide_id for s in self.slides],
             PATIENT: [s.patient_id for s in self.slides]},
            index=pd.Index([s.slide_id for s in self.slides]),
        )
        out = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=pd.Index(self.genes)))
        out.obsm[TRUE_PROPORTIONS] = np.stack([s.bulk_proportions for s in self.slides])
        out.uns["cell_types"] = list(self.cell_types)
        return out

    def save(self, directory: os.PathLike | str) -> Path:
        """Write the cohort as files that the package's readers consume.

        Layout: ``{slide_id}.png`` (image) and ``{slide_id}.h5ad`` (spots, with
        ``uns["cpnn_input"]["image_path"]`` = absolute path of the PNG) per slide,
        ``cells/{slide_id}.csv.gz``, ``reference.h5ad``, ``bulk.h5ad`` and
        ``truth.json`` (types, genes, prototypes, platform factors, parameters).
        Every file is written atomically.

        Parameters
        ----------
        directory
            Output folder; created if needed.

        Returns
        -------
        Path
            The folder.
        """
        from PIL import Image

        root = Path(directory)
        root.mkdir(parents=True, exist_ok=True)
        (root / CELLS_DIR).mkdir(exist_ok=True)
        for s in self.slides:
            png = root / f"{s.slide_id}.png"
            with atomic_path(png) as tmp:
                Image.fromarray(s.image).save(tmp, format="PNG", compress_level=1)
            spots = s.spots.copy()
            spots.uns[UNS_INPUT] = dict(spots.uns[UNS_INPUT])
            spots.uns[UNS_INPUT]["image_path"] = str(png.resolve())
            _write_h5ad(spots, root / f"{s.slide_id}.h5ad")
            with atomic_path(root / CELLS_DIR / f"{s.slide_id}.csv.gz") as tmp:
                s.cells.to_csv(tmp, index=False, compression="gzip", float_format="%.17g")
        _write_h5ad(self.reference, root / REFERENCE_FILE)
        _write_h5ad(self.bulk_anndata(), root / BULK_FILE)
        write_json(root / TRUTH_FILE, {
            "format": "cpnn-synthetic",
            "version": FORMAT_VERSION,
            "seed": self.seed,
            "mpp": self.mpp,
            "spot_diameter_um": self.spot_diameter_um,
            "spot_pitch_um": self.spot_pitch_um,
            "params": self.params,
            "cell_types": list(self.cell_types),
            "genes": list(self.genes),
            "true_prototypes": self.true_prototypes.tolist(),
            "platform_factor": self.platform_factor.tolist(),
            "bulk_platform_factor": self.bulk_platform_factor.tolist(),
            "slides": [
                {"slide_id": s.slide_id, "patient_id": s.patient_id,
                 "image": f"{s.slide_id}.png", "spots": f"{s.slide_id}.h5ad",
                 "cells": f"{CELLS_DIR}/{s.slide_id}.csv.gz",
                 "bulk_proportions": s.bulk_proportions.tolist()}
                for s in self.slides
            ],
            **({"patient_effects": self.patient_effects} if self.patient_effects else {}),
        })
        return root


def _write_h5ad(adata: ad.AnnData, path: Path) -> None:
    with atomic_path(path) as tmp:
        adata.write_h5ad(tmp)


# --------------------------------------------------------------------------- loading
def load_synthetic_cohort(directory: os.PathLike | str) -> SyntheticCohort:
    """Read a cohort written by :meth:`SyntheticCohort.save`.

    ``uns["cpnn_input"]["image_path"]`` of each slide is pointed at the PNG in
    ``directory``, so a moved folder still loads.

    Parameters
    ----------
    directory
        Folder holding ``truth.json`` and the files it lists.

    Returns
    -------
    SyntheticCohort

    Raises
    ------
    CPNNInputError
        When the folder, ``truth.json`` or a file it lists is missing or malformed.
    """
    from PIL import Image

    root = Path(directory)
    fix = "write the cohort again with make_synthetic_cohort(...).save(directory)."
    truth_path = root / TRUTH_FILE
    if not truth_path.is_file():
        raise CPNNInputError("no synthetic cohort here: truth.json is missing.",
                             path=truth_path, fix=fix)
    try:
        truth = json.loads(truth_path.read_text())
    except (OSError, ValueError) as exc:
        raise CPNNInputError(f"cannot parse it as JSON ({exc}).", path=truth_path, fix=fix)
    if truth.get("format") != "cpnn-synthetic":
        raise CPNNInputError("not a cpnn synthetic cohort description.", path=truth_path,
                             field="format", fix=fix)
    for key in ("cell_types", "genes", "true_prototypes", "platform_factor",
                "bulk_platform_factor", "slides", "mpp", "spot_diameter_um", "seed"):
        if key not in truth:
            raise CPNNInputError("required entry is missing.", path=truth_path, field=key,
                                 fix=fix)

    def need(name: str) -> Path:
        p = root / name
        if not p.is_file():
            raise CPNNInputError("file listed in truth.json is missing.", path=p, fix=fix)
        return p

    cell_types = list(truth["cell_types"])
    slides = []
    for entry in truth["slides"]:
        png = need(entry["image"])
        with Image.open(png) as im:
            image = np.asarray(im.convert("RGB"))
        spots = ad.read_h5ad(need(entry["spots"]))
        spots.uns[UNS_INPUT] = dict(spots.uns[UNS_INPUT])
        spots.uns[UNS_INPUT]["image_path"] = str(png.resolve())
        cells = pd.read_csv(need(entry["cells"]), float_precision="round_trip")
        cells["cell_type"] = pd.Categorical(cells["cell_type"], categories=cell_types)
        slides.append(SyntheticSlide(
            slide_id=entry["slide_id"], patient_id=entry["patient_id"], image=image,
            spots=spots, bulk_counts=np.zeros(0, dtype=np.int64),
            bulk_proportions=np.asarray(entry["bulk_proportions"], dtype=np.float64),
            cells=cells,
        ))
    bulk = ad.read_h5ad(need(BULK_FILE))
    for s in slides:
        if s.slide_id not in bulk.obs_names:
            raise CPNNInputError(f"slide {s.slide_id!r} has no bulk row.",
                                 path=root / BULK_FILE, field="obs_names", fix=fix)
        s.bulk_counts = np.asarray(bulk[s.slide_id].X).reshape(-1).astype(np.int64)
    reference = ad.read_h5ad(need(REFERENCE_FILE))
    return SyntheticCohort(
        cell_types=cell_types,
        genes=list(truth["genes"]),
        true_prototypes=np.asarray(truth["true_prototypes"], dtype=np.float64),
        platform_factor=np.asarray(truth["platform_factor"], dtype=np.float64),
        bulk_platform_factor=np.asarray(truth["bulk_platform_factor"], dtype=np.float64),
        slides=slides,
        reference=reference,
        mpp=float(truth["mpp"]),
        spot_diameter_um=float(truth["spot_diameter_um"]),
        spot_pitch_um=float(truth.get("spot_pitch_um", truth["spot_diameter_um"])),
        seed=int(truth["seed"]),
        params=dict(truth.get("params", {})),
        patient_effects=dict(truth.get("patient_effects", {})),
    )


# --------------------------------------------------------------------------- generator
def make_synthetic_cohort(
    n_slides: int = 24,
    n_patients: Optional[int] = None,
    n_types: int = 5,
    n_genes: int = 200,
    image_px: int = 1024,
    mpp: float = 0.5,
    spot_pitch_um: float = 100.0,
    spot_diameter_um: float = 100.0,
    n_ref_cells: int = 1500,
    seed: int = 0,
    patient_effects: float | dict = 0.0,
) -> SyntheticCohort:
    """Generate a seeded synthetic cohort with known cell-type composition.

    The defaults (24 slides of 1024 x 1024 px at 0.5 um/px, i.e. 512 x 512 um, with a
    5 x 5 grid of 100-um spots = 600 spots, about 2,600 cells per slide) keep the whole
    ``cpnn demo`` (generation, EfficientNet-Lite0 features of every spot, training)
    within a few minutes on two CPU cores; generation itself takes about 5 s of one core
    (measured on the 2-core development machine), and scales with the image area.

    Parameters
    ----------
    n_slides
        Number of sections.
    n_patients
        Number of patients; sections are dealt to patients in contiguous blocks and
        share the patient's composition bias. None means ``max(1, n_slides // 2)``
        (two serial sections per patient, as in HER2ST).
    n_types
        Number of cell types K (>= 2). The first eight have fixed names, markers and
        morphologies (Epithelial, T-cells, Fibroblasts, Endothelial, Myeloid, B-cells,
        Plasma cells, Pericytes); further ones ("Type9", ...) get random ones.
    n_genes
        Panel size G (spatial and bulk genes); at least ``5 * K + 8 + 10``.
    image_px
        Side of each square image in pixels.
    mpp
        Microns per pixel of the images.
    spot_pitch_um, spot_diameter_um
        Centre-to-centre distance and diameter of the spots (square grid, centred, with
        every disc inside the image).
    n_ref_cells
        Cells in the single-cell reference.
    seed
        Seed of everything (non-negative int).
    patient_effects
        Strength (>= 0; 1 is a clearly visible effect) of per-patient departures from
        CPNN's generative story: one number for every effect, or ``{name: strength}``
        for some of :data:`PATIENT_EFFECTS` (the others off):

        - ``stain``: the patient's haematoxylin/eosin optical-density vectors and gains
          are shifted, so the colour of every image of that patient shifts;
        - ``scanner``: per-patient blur, brightness/gamma and JPEG compression;
        - ``composition``: the patient's cell-type log-odds are tilted towards a few
          types (log of a flat Dirichlet draw), on top of the usual patient bias;
        - ``tumour_state``: a patient-specific log-fold-change program on the tumour
          (Epithelial, else the first) cells, its strength varying smoothly over each
          section, so their expression is no fixed prototype;
        - ``inflammation``: one program shared by the non-immune types, its strength
          per cell the immune fraction of its neighbourhood (30 um) times a
          per-patient gain.

        Effect parameters come from their own random streams, so 0 (the default)
        gives byte-identical output to a cohort made without the argument, and
        turning one effect on leaves the others' draws unchanged. What each patient
        drew is in :attr:`SyntheticCohort.patient_effects`.

    Returns
    -------
    SyntheticCohort
    """
    _check_args(n_slides, n_patients, n_types, n_genes, image_px, mpp, spot_pitch_um,
                spot_diameter_um, n_ref_cells, seed)
    params = dict(n_slides=n_slides, n_patients=n_patients, n_types=n_types,
                  n_genes=n_genes, image_px=image_px, mpp=mpp, spot_pitch_um=spot_pitch_um,
                  spot_diameter_um=spot_diameter_um, n_ref_cells=n_ref_cells, seed=seed)
    strengths = _check_patient_effects(patient_effects)
    if any(strengths.values()):
        params["patient_effects"] = strengths
    if n_patients is None:
        n_patients = max(1, n_slides // 2)

    specs = _type_specs(n_types, _rng(seed, 1))
    genes, protos = _make_prototypes(specs, n_genes, _rng(seed, 2))
    rng_pf = _rng(seed, 3)
    platform = np.exp(rng_pf.normal(0.0, 0.5, n_genes))
    platform /= np.exp(np.mean(np.log(platform)))
    bulk_platform = np.exp(rng_pf.normal(0.0, 0.5, n_genes))
    bulk_platform /= np.exp(np.mean(np.log(bulk_platform)))
    spot_disp = rng_pf.uniform(0.1, 0.3, n_genes)
    bulk_disp = rng_pf.uniform(0.05, 0.15, n_genes)

    rng_pat = _rng(seed, 4)
    base_logit = np.log(np.array([t.abundance for t in specs]))
    patient_bias = rng_pat.normal(0.0, 0.8, (n_patients, n_types))
    patient_of_slide = (np.arange(n_slides) * n_patients) // n_slides

    effects = (_draw_patient_effects(strengths, n_patients, specs, n_genes, _rng(seed, 6))
               if any(strengths.values()) else None)

    grid = _spot_grid(image_px, mpp, spot_pitch_um, spot_diameter_um)
    slides = []
    for i in range(n_slides):
        rng = _rng(seed, 100 + i)
        p = int(patient_of_slide[i])
        slide_id, patient_id = f"S{i + 1:02d}", f"P{p + 1:02d}"
        bias = base_logit + patient_bias[p] + rng.normal(0.0, 0.3, n_types)
        pe = None if effects is None else effects["patients"][p]
        if pe is not None:
            bias = bias + pe["composition_tilt"]
        tissue = _make_tissue(specs, bias, image_px, mpp, rng)
        image = _render(specs, tissue, image_px, mpp, rng, stain=pe)
        cell_expr = None
        if pe is not None:
            image = _scanner(image, pe)
            cell_expr = _cell_expression(specs, tissue, protos, effects, pe, mpp,
                                         _rng(seed, 300 + i))
        spots, bulk_counts, bulk_props = _measure(
            slide_id, patient_id, specs, tissue, protos, platform, spot_disp,
            bulk_platform, bulk_disp, grid, genes, mpp, spot_diameter_um, rng,
            cell_expr=cell_expr)
        if effects is not None:
            spots.uns["patient_effects"] = {
                "strengths": dict(strengths),
                **{k: v for k, v in _patient_record(pe).items() if not isinstance(v, list)}}
        cells = pd.DataFrame({
            "x": tissue["xy"][:, 0], "y": tissue["xy"][:, 1],
            "cell_type": pd.Categorical.from_codes(tissue["types"],
                                                   categories=[t.name for t in specs]),
        })
        slides.append(SyntheticSlide(slide_id, patient_id, image, spots, bulk_counts,
                                     bulk_props, cells))

    reference = _make_reference(specs, genes, protos, n_ref_cells, _rng(seed, 5))
    return SyntheticCohort(
        cell_types=[t.name for t in specs], genes=genes, true_prototypes=protos,
        platform_factor=platform, bulk_platform_factor=bulk_platform, slides=slides,
        reference=reference, mpp=float(mpp), spot_diameter_um=float(spot_diameter_um),
        spot_pitch_um=float(spot_pitch_um), seed=int(seed), params=params,
        patient_effects={} if effects is None else {
            "strengths": dict(strengths),
            "tumour_type": specs[effects["tumour_type"]].name,
            "immune_types": [specs[k].name for k in effects["immune"]],
            "inflamed_types": [specs[k].name for k in effects["inflamed"]],
            "inflammation_program": effects["inflammation_program"].tolist(),
            "patients": {f"P{p + 1:02d}": _patient_record(pe)
                         for p, pe in enumerate(effects["patients"])},
        },
    )


def _check_patient_effects(value) -> dict:
    """``{name: strength}`` over every name of :data:`PATIENT_EFFECTS` (0 = off)."""
    fix = (f"pass a number >= 0 for all effects or a dict over {', '.join(PATIENT_EFFECTS)}, "
           "e.g. {'stain': 1.0, 'tumour_state': 0.5}.")

    def strength(name, v):
        if (isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating))
                or not np.isfinite(v) or v < 0):
            raise CPNNInputError(f"strength {v!r} is not a number >= 0.",
                                 field=f"patient_effects[{name!r}]" if name else "patient_effects",
                                 fix=fix)
        return float(v)

    if isinstance(value, dict):
        unknown = [k for k in value if k not in PATIENT_EFFECTS]
        if unknown:
            raise CPNNInputError(f"unknown patient effect(s) {unknown}.", field="patient_effects",
                                 fix=fix)
        return {k: strength(k, value.get(k, 0.0)) for k in PATIENT_EFFECTS}
    s = strength(None, value)
    return {k: s for k in PATIENT_EFFECTS}


def _draw_patient_effects(strengths: dict, n_patients: int, specs: list, n_genes: int,
                          rng: np.random.Generator) -> dict:
    """Per-patient effect parameters. Every parameter is drawn whatever the strengths
    (then scaled by them), so one effect's draws never depend on which others are on."""
    K = len(specs)
    names = [t.name for t in specs]
    tumour = names.index("Epithelial") if "Epithelial" in names else 0
    immune = [k for k, n in enumerate(names) if n in _IMMUNE_TYPES]
    inflamed = [k for k in range(K) if k not in immune]
    active = rng.random(n_genes) < 0.3
    inflammation_program = active * rng.normal(0.0, 1.0, n_genes)
    s = strengths
    patients = []
    for _ in range(n_patients):
        tilt = np.log(rng.dirichlet(np.ones(K)))
        patients.append(dict(
            stain_h=np.exp(s["stain"] * rng.normal(0.0, 0.2, 3)),
            stain_e=np.exp(s["stain"] * rng.normal(0.0, 0.2, 3)),
            stain_gain=np.exp(s["stain"] * rng.normal(0.0, 0.25, 2)),
            blur_px=s["scanner"] * rng.uniform(0.3, 1.5),
            gamma=float(np.exp(s["scanner"] * rng.normal(0.0, 0.2))),
            brightness=s["scanner"] * rng.normal(0.0, 10.0),
            jpeg_quality=int(np.clip(round(95 - s["scanner"] * rng.uniform(20.0, 70.0)), 5, 95)),
            composition_tilt=s["composition"] * 0.8 * (tilt - tilt.mean()),
            tumour_program=s["tumour_state"] * rng.normal(0.0, 0.8, n_genes),
            inflammation_gain=s["inflammation"] * 2.0 * float(np.exp(rng.normal(0.0, 0.4))),
        ))
    return dict(patients=patients, tumour_type=tumour, immune=immune, inflamed=inflamed,
                inflammation_program=inflammation_program, strengths=dict(strengths))


def _patient_record(pe: dict) -> dict:
    """JSON-ready copy of one patient's effect parameters."""
    return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in pe.items()}


def _scanner(image: np.ndarray, pe: dict) -> np.ndarray:
    """The patient's scanner: blur, gamma and brightness, then JPEG compression."""
    if pe["blur_px"] <= 0 and pe["gamma"] == 1.0 and pe["brightness"] == 0 \
            and pe["jpeg_quality"] >= 95:
        return image
    from io import BytesIO

    from PIL import Image

    img = image.astype(np.float32)
    if pe["blur_px"] > 0:
        img = ndimage.gaussian_filter(img, (pe["blur_px"], pe["blur_px"], 0), truncate=3.0)
    img = 255.0 * (np.clip(img, 0, 255) / 255.0) ** pe["gamma"] + pe["brightness"]
    out = np.clip(img + 0.5, 0, 255).astype(np.uint8)
    if pe["jpeg_quality"] < 95:
        buf = BytesIO()
        Image.fromarray(out).save(buf, format="JPEG", quality=int(pe["jpeg_quality"]))
        buf.seek(0)
        with Image.open(buf) as im:
            out = np.asarray(im.convert("RGB")).copy()
    return out


def _cell_expression(specs: list, tissue: dict, protos: np.ndarray, effects: dict, pe: dict,
                     mpp: float, rng: np.random.Generator) -> np.ndarray:
    """Expected expression of every cell (cells x G): its type's prototype times the
    tumour-state and inflammation programs (exp of their log-fold changes)."""
    xy, types = tissue["xy"], tissue["types"]
    expr = protos[types].copy()
    if len(xy) == 0:
        return expr
    logfc = np.zeros_like(expr)
    tumour = types == effects["tumour_type"]
    if tumour.any() and np.any(pe["tumour_program"]):
        # smooth per-section strength in [0, 1]: tumour states vary within a section too
        shape = tissue["comp"].shape[1:]
        field_ = _gaussian_field(shape, 60.0 / _FIELD_STEP_UM, rng)
        strength = 1.0 / (1.0 + np.exp(-2.0 * _sample_grid(field_, xy[tumour],
                                                            tissue["step_px"])))
        logfc[tumour] += strength[:, None] * pe["tumour_program"][None, :]
    inflamed = np.isin(types, effects["inflamed"])
    if inflamed.any() and effects["immune"] and pe["inflammation_gain"] > 0:
        tree = cKDTree(xy)
        radius = _INFLAMMATION_RADIUS_UM / mpp
        nbrs = tree.query_ball_point(xy[inflamed], r=radius)
        is_immune = np.isin(types, effects["immune"]).astype(np.float64)
        frac = np.array([is_immune[np.asarray(n, dtype=np.int64)].mean() for n in nbrs])
        logfc[inflamed] += (pe["inflammation_gain"] * frac)[:, None] \
            * effects["inflammation_program"][None, :]
    expr *= np.exp(logfc)
    return expr


def _rng(seed: int, key: int) -> np.random.Generator:
    """Independent stream ``key`` of ``seed`` (stable whatever else is generated)."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(key,)))


def _check_args(n_slides, n_patients, n_types, n_genes, image_px, mpp, spot_pitch_um,
                spot_diameter_um, n_ref_cells, seed) -> None:
    def bad(name, problem, fix):
        raise CPNNInputError(problem, field=name, fix=fix)

    for name, value, low in (("n_slides", n_slides, 1), ("n_types", n_types, 2),
                             ("image_px", image_px, 64), ("n_ref_cells", n_ref_cells, 0),
                             ("seed", seed, 0)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
            bad(name, f"must be an integer >= {low}, got {value!r}.",
                f"pass an integer >= {low}.")
    if n_ref_cells < 2 * n_types:
        bad("n_ref_cells", f"{n_ref_cells} cells cannot cover {n_types} types.",
            f"pass at least {2 * n_types} (the default is 1500).")
    if n_patients is not None and (not isinstance(n_patients, (int, np.integer))
                                   or not 1 <= n_patients <= n_slides):
        bad("n_patients", f"must be None or an integer in [1, n_slides], got {n_patients!r}.",
            "pass None (two sections per patient) or a number of patients <= n_slides.")
    min_genes = 5 * n_types + len(HOUSEKEEPING) + 10
    if not isinstance(n_genes, (int, np.integer)) or n_genes < min_genes:
        bad("n_genes", f"{n_genes!r} genes cannot hold 5 markers for each of {n_types} "
            f"types, {len(HOUSEKEEPING)} housekeeping genes and 10 others.",
            f"pass n_genes >= {min_genes}.")
    for name, value in (("mpp", mpp), ("spot_pitch_um", spot_pitch_um),
                        ("spot_diameter_um", spot_diameter_um)):
        if not isinstance(value, (int, float, np.number)) or not np.isfinite(value) or value <= 0:
            bad(name, f"must be a positive number, got {value!r}.", "pass a positive number.")
    if not 0.1 <= mpp <= 2.0:
        bad("mpp", f"{mpp} um/px is outside the rendered range [0.1, 2.0].",
            "use 0.25-1.0 um/px (0.5 is a 20x scan).")
    if spot_diameter_um < 2 * _LATTICE_UM:
        bad("spot_diameter_um", f"{spot_diameter_um} um spots would hold no cells.",
            f"use a diameter >= {2 * _LATTICE_UM} um (Visium: 55, legacy ST: 100).")
    if image_px * mpp < spot_diameter_um:
        bad("image_px", f"a {image_px * mpp:g}-um image cannot hold a {spot_diameter_um}-um "
            "spot.", "increase image_px or mpp, or reduce spot_diameter_um.")


# --------------------------------------------------------------------------- prototypes
def _type_specs(n_types: int, rng: np.random.Generator) -> list:
    specs = list(_NAMED_TYPES[:n_types])
    for k in range(len(specs), n_types):
        name = f"Type{k + 1}"
        specs.append(_TypeSpec(
            name, tuple(f"{name.upper()}_M{j + 1}" for j in range(5)),
            total=float(rng.uniform(200, 800)), abundance=0.08,
            density=float(rng.uniform(0.4, 1.0)),
            axis_long=float(rng.uniform(2.5, 6.5)), axis_short=float(rng.uniform(1.2, 3.5)),
            darkness=float(rng.uniform(0.5, 1.3)), vesicular=float(rng.uniform(0, 1)),
            kidney=float(rng.uniform(0, 1) > 0.7), cyto_radius=float(rng.uniform(2.5, 6.5)),
            cyto_eosin=float(rng.uniform(0.05, 0.35)), cyto_haem=float(rng.uniform(0, 0.1)),
        ))
    return specs


def _make_prototypes(specs: list, n_genes: int, rng: np.random.Generator):
    """K x G expected counts per cell; markers high in their type, housekeeping shared."""
    K = len(specs)
    markers = [m for t in specs for m in t.markers]
    n_generic = n_genes - len(markers) - len(HOUSEKEEPING)
    width = max(3, len(str(n_generic)))
    genes = list(HOUSEKEEPING) + markers + [f"GENE{i + 1:0{width}d}" for i in range(n_generic)]
    n_hk, n_mk = len(HOUSEKEEPING), len(markers)

    logp = np.empty((K, n_genes))
    logp[:, :n_hk] = rng.normal(2.0, 0.5, n_hk) + rng.normal(0, 0.2, (K, n_hk))
    mk = slice(n_hk, n_hk + n_mk)
    logp[:, mk] = rng.normal(-3.0, 0.6, (K, n_mk))
    for k in range(K):
        logp[k, n_hk + 5 * k:n_hk + 5 * k + 5] += rng.normal(5.0, 0.5, 5)
    gen = slice(n_hk + n_mk, n_genes)
    active = rng.random((K, n_generic)) < 0.35
    logp[:, gen] = (rng.normal(-1.0, 1.3, n_generic)
                    + active * rng.normal(0.0, 1.0, (K, n_generic)))
    protos = np.exp(logp)
    totals = np.array([t.total for t in specs])
    protos *= (totals / protos.sum(axis=1))[:, None]
    return genes, protos


# --------------------------------------------------------------------------- tissue
def _gaussian_field(shape: tuple, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian-filtered white noise with unit (theoretical) standard deviation."""
    pad = int(math.ceil(3 * sigma))
    noise = rng.standard_normal((shape[0] + 2 * pad, shape[1] + 2 * pad))
    f = ndimage.gaussian_filter(noise, sigma, mode="wrap")[pad:pad + shape[0], pad:pad + shape[1]]
    delta = np.zeros(2 * pad + 1)
    delta[pad] = 1.0
    k1 = ndimage.gaussian_filter1d(delta, sigma, mode="constant")
    return f / np.sum(k1 ** 2)


def _upsample(grid: np.ndarray, n_out: int, step: float) -> np.ndarray:
    """Bilinear values of node grids (nodes at ``j * step`` px) at the centres of an
    ``n_out`` x ``n_out`` pixel image; ``grid`` is (..., n, n), output (..., n_out, n_out)."""
    n_in = grid.shape[-1]
    pos = np.clip((np.arange(n_out) + 0.5) / step, 0, n_in - 1 - 1e-6)
    j0 = np.floor(pos).astype(np.intp)
    w = (pos - j0).astype(np.float32)
    g = grid.astype(np.float32)
    rows = g[..., j0, :] * (1 - w)[:, None] + g[..., j0 + 1, :] * w[:, None]
    return rows[..., j0] * (1 - w) + rows[..., j0 + 1] * w


def _sample_grid(grid: np.ndarray, xy_px: np.ndarray, step_px: float) -> np.ndarray:
    """Bilinear value of a node grid (nodes at ``j * step_px``) at pixel positions."""
    coords = np.stack([xy_px[:, 1] / step_px, xy_px[:, 0] / step_px])
    return ndimage.map_coordinates(grid, coords, order=1, mode="nearest")


def _make_tissue(specs: list, bias: np.ndarray, image_px: int, mpp: float,
                 rng: np.random.Generator) -> dict:
    """Composition fields, fibre and lumen fields, and the cells (positions, types)."""
    K = len(specs)
    size_um = image_px * mpp
    step_px = _FIELD_STEP_UM / mpp
    n_nodes = int(math.ceil(image_px / step_px)) + 2
    shape = (n_nodes, n_nodes)
    s_small, s_large = 40.0 / _FIELD_STEP_UM, 100.0 / _FIELD_STEP_UM
    logits = np.stack([
        bias[k] + 1.0 * _gaussian_field(shape, s_small, rng)
        + 1.3 * _gaussian_field(shape, s_large, rng)
        for k in range(K)
    ]) * 1.4  # a temperature > 1 makes compartments purer, as tissue is
    comp = np.exp(logits - logits.max(axis=0))
    comp /= comp.sum(axis=0)

    # Stroma streaks: phase of a wavy plane wave; fibres run along its level lines.
    theta = rng.uniform(0, np.pi)
    wavelength_um = rng.uniform(10.0, 14.0)
    warp = 5.0 * _gaussian_field(shape, 50.0 / _FIELD_STEP_UM, rng)

    # Lumen-like gaps: a fine field thresholded, more of them where endothelium is.
    lstep_px = _LUMEN_STEP_UM / mpp
    n_lnodes = int(math.ceil(image_px / lstep_px)) + 2
    lumen_noise = _gaussian_field((n_lnodes, n_lnodes), 7.0 / _LUMEN_STEP_UM, rng)
    endo = [k for k, t in enumerate(specs) if t.orient == "vessel"]
    if endo:
        node_px = np.arange(n_lnodes) * lstep_px
        ny, nx = np.meshgrid(node_px, node_px, indexing="ij")
        endo_comp_fine = _sample_grid(comp[endo[0]], np.stack([nx.ravel(), ny.ravel()], 1),
                                      step_px).reshape(n_lnodes, n_lnodes)
        lumen_logit = 6.0 * (lumen_noise - 2.6 + 2.0 * endo_comp_fine)
    else:
        lumen_logit = np.full((n_lnodes, n_lnodes), -20.0)
    lumen = 1.0 / (1.0 + np.exp(-lumen_logit))

    # Candidate cells on a jittered lattice.
    n_lat = int(math.ceil(size_um / _LATTICE_UM))
    gy, gx = np.mgrid[0:n_lat, 0:n_lat]
    xy_um = (np.stack([gx.ravel(), gy.ravel()], axis=1) + 0.5) * _LATTICE_UM
    xy_um += rng.uniform(-0.4, 0.4, xy_um.shape) * _LATTICE_UM
    xy = xy_um / mpp
    inside = (xy >= 0).all(axis=1) & (xy < image_px).all(axis=1)
    xy = xy[inside]

    lum_at = _sample_grid(lumen, xy, lstep_px)
    p = np.stack([_sample_grid(comp[k], xy, step_px) for k in range(K)], axis=1)
    if endo:
        edge = 4.0 * lum_at * (1.0 - lum_at)  # 1 on a lumen's rim
        p[:, endo[0]] *= 1.0 + 6.0 * edge
    p /= p.sum(axis=1, keepdims=True)
    u = rng.random(len(xy))
    types = np.minimum((np.cumsum(p, axis=1) < u[:, None]).sum(axis=1), K - 1)
    density = np.array([t.density for t in specs])
    keep = (rng.random(len(xy)) < density[types]) & (lum_at < 0.5)
    xy, types = xy[keep], types[keep]

    # Orientation of each nucleus (radians, image axes, y down).
    orient = rng.uniform(0, np.pi, len(xy))
    kind = np.array([t.orient for t in specs])[types]
    is_fibre = kind == "fibre"
    if is_fibre.any():
        gwy, gwx = np.gradient(warp, step_px)
        k = 2 * np.pi / (wavelength_um / mpp)
        gx_ = k * np.cos(theta) + _sample_grid(gwx, xy[is_fibre], step_px)
        gy_ = k * np.sin(theta) + _sample_grid(gwy, xy[is_fibre], step_px)
        orient[is_fibre] = np.arctan2(gy_, gx_) + np.pi / 2 + rng.normal(0, 0.15, is_fibre.sum())
    is_vessel = kind == "vessel"
    if is_vessel.any():
        gly, glx = np.gradient(lumen_noise, lstep_px)
        orient[is_vessel] = np.arctan2(_sample_grid(gly, xy[is_vessel], lstep_px),
                                       _sample_grid(glx, xy[is_vessel], lstep_px)) + np.pi / 2
    return dict(xy=xy, types=types, orient=orient, comp=comp, step_px=step_px,
                theta=theta, wavelength_um=wavelength_um, warp=warp, lumen=lumen,
                lstep_px=lstep_px)


# --------------------------------------------------------------------------- rendering
def _render(specs: list, tissue: dict, image_px: int, mpp: float,
            rng: np.random.Generator, stain: Optional[dict] = None) -> np.ndarray:
    """Render the H&E-like RGB image (uint8 H x W x 3) of one slide's cells; ``stain``
    (a patient's effect parameters) scales the stain vectors and gains."""
    H = W = image_px
    step_px = tissue["step_px"]

    # Eosin of the extracellular tissue: base tone, and fibrous streaks in the stroma.
    tone_grid = _gaussian_field(tissue["comp"].shape[1:], 30.0 / _FIELD_STEP_UM, rng)
    stroma_grid = np.zeros_like(tone_grid)
    for k, t in enumerate(specs):
        if t.orient == "fibre":
            stroma_grid += tissue["comp"][k]
    stroma, tone, warp = _upsample(np.stack([stroma_grid, tone_grid, tissue["warp"]]), W,
                                   step_px)
    kwave = 2 * np.pi / (tissue["wavelength_um"] / mpp)
    pix = np.arange(W, dtype=np.float32)
    phase = warp
    phase += (kwave * np.cos(tissue["theta"]) * pix)[None, :]
    phase += (kwave * np.sin(tissue["theta"]) * pix)[:, None]
    streak = np.sin(phase, out=phase)
    streak += 1.0
    streak *= 0.5
    streak **= 3
    eosin = 0.16 + 0.03 * tone + np.clip(stroma, 0, 1) * (0.22 + 0.40 * streak)
    haem = np.zeros((H, W), dtype=np.float32)

    _stamp_cells(specs, tissue, mpp, haem, eosin, rng)

    # Chromatin texture in nuclei and fibrillar texture in the eosin: blurred noise on a
    # 256-px tile repeated over the image (cheap, and the repeat is hidden by the cells).
    tile = 256
    reps = (int(math.ceil(H / tile)), int(math.ceil(W / tile)))
    tex = ndimage.gaussian_filter(rng.standard_normal((2, tile, tile), dtype=np.float32),
                                  (0, 0.9, 0.9), mode="wrap")
    tex /= tex.std(axis=(1, 2), keepdims=True)
    haem *= 1.0 + 0.35 * np.tile(tex[0], reps)[:H, :W]
    eosin *= 1.0 + 0.15 * np.tile(tex[1], reps)[:H, :W]
    np.clip(haem, 0, 1.8, out=haem)

    clear = _upsample(tissue["lumen"], W, tissue["lstep_px"])
    np.clip(clear, 0, 1, out=clear)
    clear *= -0.92
    clear += 1.0
    haem *= clear
    eosin *= clear
    haem = ndimage.gaussian_filter(haem, 0.7, truncate=3.0)

    # Beer-Lambert with per-slide stain variation.
    hv = (_H_VEC * np.exp(rng.normal(0, 0.05, 3))).astype(np.float32)
    ev = (_E_VEC * np.exp(rng.normal(0, 0.05, 3))).astype(np.float32)
    h_gain, e_gain = np.exp(rng.normal(0, 0.08, 2))
    if stain is not None:  # after the slide's own draws, so the RNG stream is unchanged
        hv = (hv * stain["stain_h"]).astype(np.float32)
        ev = (ev * stain["stain_e"]).astype(np.float32)
        h_gain, e_gain = h_gain * stain["stain_gain"][0], e_gain * stain["stain_gain"][1]
    noise = rng.standard_normal((H, W), dtype=np.float32)
    noise *= 2.5
    noise += 0.5  # so that truncation to uint8 below rounds
    rgb = np.empty((H, W, 3), dtype=np.uint8)
    for ch in range(3):
        od = haem * np.float32(h_gain * hv[ch]) + eosin * np.float32(e_gain * ev[ch])
        od += 0.03
        val = np.exp(-od, out=od)
        val *= 255.0
        val += noise
        np.clip(val, 0, 255.49, out=val)
        rgb[..., ch] = val
    return rgb


def _stamp_cells(specs: list, tissue: dict, mpp: float, haem: np.ndarray,
                 eosin: np.ndarray, rng: np.random.Generator, chunk: int = 4096) -> None:
    """Add every cell's nucleus (haematoxylin) and cytoplasm (eosin) into the images.

    Cells of one type share a square window of offsets (sized to that type); optical
    densities are computed for all its windows at once and summed into a padded canvas
    with ``bincount``.
    """
    H, W = haem.shape
    xy, types, orient = tissue["xy"], tissue["types"], tissue["orient"]
    n = len(xy)
    if n == 0:
        return
    jitter = np.clip(np.exp(rng.normal(0, 0.12, (n, 3))), 0.75, 1.3).astype(np.float32)
    extents = [max(t.axis_long * 1.3 + t.offset, t.cyto_radius + 0.5) for t in specs]
    pad = int(math.ceil(max(extents) / mpp)) + 1
    Wp, Hp = W + 2 * pad, H + 2 * pad
    acc_h = np.zeros(Hp * Wp)
    acc_e = np.zeros(Hp * Wp)
    idx, h_parts, e_parts = [], [], []

    def flush() -> None:
        # one bincount per channel over many cells; flushed often enough that big
        # images never hold all windows at once
        if idx:
            flat = np.concatenate(idx)
            acc_h[:] += np.bincount(flat, weights=np.concatenate(h_parts), minlength=Hp * Wp)
            acc_e[:] += np.bincount(flat, weights=np.concatenate(e_parts), minlength=Hp * Wp)
            idx.clear(), h_parts.clear(), e_parts.clear()

    f32 = np.float32
    for k, t in enumerate(specs):
        sel_all = np.flatnonzero(types == k)
        R = int(math.ceil(extents[k] / mpp))
        off = np.arange(-R, R + 1)
        win = (off[:, None] * Wp + off[None, :]).reshape(1, -1)
        off_um = off.astype(f32) * f32(mpp)
        for s in range(0, len(sel_all), chunk):
            sel = sel_all[s:s + chunk]
            cx, cy = xy[sel, 0], xy[sel, 1]
            ix, iy = np.floor(cx).astype(np.int64), np.floor(cy).astype(np.int64)
            # microns from the cell centre to each window pixel's centre
            dx = ((ix - cx + 0.5) * mpp).astype(f32)[:, None, None] + off_um[None, None, :]
            dy = ((iy - cy + 0.5) * mpp).astype(f32)[:, None, None] + off_um[None, :, None]
            c = np.cos(orient[sel]).astype(f32)[:, None, None]
            si = np.sin(orient[sel]).astype(f32)[:, None, None]
            a = (t.axis_long * jitter[sel, 0])[:, None, None]
            b = np.minimum(t.axis_short * jitter[sel, 1], t.axis_long * jitter[sel, 0])[:, None, None]
            dark = (t.darkness * jitter[sel, 2])[:, None, None]
            along = dx * c + dy * si  # dx (n, 1, w) and dy (n, w, 1) broadcast here
            if t.offset:
                along -= f32(t.offset)
            across = dy * c - dx * si
            # squared elliptic radius; near the rim 1 - r2 ~ 2 (1 - r), so the soft
            # edge below is ~0.5 um wide without taking a square root
            r2 = along * (1 / a)
            r2 *= r2
            tmp = across * (1 / b)
            tmp *= tmp
            r2 += tmp
            nuc = np.subtract(1.0, r2, out=tmp)
            nuc *= b
            nuc += 0.5
            np.clip(nuc, 0, 1, out=nuc)
            if t.kidney:  # bean shape: a disc cut from one flank
                notch2 = (along ** 2 + (across - 1.05 * b) ** 2) * (1 / (0.55 * a) ** 2)
                nuc *= 1.0 - t.kidney * np.clip((1.0 - notch2) * 2.0, 0, 1)
            h_val = nuc * dark
            if t.vesicular:  # pale centre, darker rim, a nucleolus
                v = f32(t.vesicular)
                h_val *= (1 - v) + v * (0.35 + 0.65 * np.minimum(r2, 1)) \
                    + v * 0.9 * np.exp(-(along ** 2 + across ** 2) / 0.7)
            cr = t.cyto_radius
            cyto = dx * dx + dy * dy
            np.subtract(cr * cr, cyto, out=cyto)
            cyto *= 0.5 / cr
            cyto += 0.5
            np.clip(cyto, 0, 1, out=cyto)
            if t.cyto_haem:
                h_val += f32(t.cyto_haem) * cyto
            nuc *= -0.7
            nuc += 1.0
            nuc *= cyto
            nuc *= f32(t.cyto_eosin)  # now the eosin of the cytoplasm around the nucleus
            idx.append((((iy + pad) * Wp + ix + pad)[:, None] + win).ravel())
            h_parts.append(h_val.ravel())
            e_parts.append(nuc.ravel())
            if sum(len(i) for i in idx) > 8_000_000:
                flush()
    flush()
    haem += acc_h.reshape(Hp, Wp)[pad:pad + H, pad:pad + W]
    eosin += acc_e.reshape(Hp, Wp)[pad:pad + H, pad:pad + W]


# --------------------------------------------------------------------------- measurement
def _spot_grid(image_px: int, mpp: float, pitch_um: float, diameter_um: float):
    """Centres (x, y) in pixels and (row, col) of a square grid fully inside the image."""
    size_um = image_px * mpp
    n = int(math.floor((size_um - diameter_um) / pitch_um + 1e-9)) + 1
    start = (size_um - (n - 1) * pitch_um) / 2.0
    pos = (start + pitch_um * np.arange(n)) / mpp
    row, col = np.divmod(np.arange(n * n), n)
    return np.stack([pos[col], pos[row]], axis=1), row, col


def _nb(rng: np.random.Generator, mean: np.ndarray, disp: np.ndarray) -> np.ndarray:
    """Negative binomial draws with variance ``mean + disp * mean**2`` (gamma-Poisson)."""
    shape = 1.0 / disp
    lam = rng.gamma(np.broadcast_to(shape, mean.shape), mean / shape)
    return rng.poisson(lam)


def _measure(slide_id, patient_id, specs, tissue, protos, platform, spot_disp,
             bulk_platform, bulk_disp, grid, genes, mpp, diameter_um, rng, cell_expr=None):
    """Spot counts and truth, and the slide's bulk counts and proportions; ``cell_expr``
    (cells x G) replaces each cell's prototype when patient effects change expression."""
    K = len(specs)
    xy, types = tissue["xy"], tissue["types"]
    onehot = np.zeros((len(xy), K))
    onehot[np.arange(len(xy)), types] = 1.0

    centres, row, col = grid
    members = cKDTree(xy).query_ball_point(centres, r=diameter_um / 2.0 / mpp)
    n_sk = np.stack([onehot[np.asarray(m, dtype=np.int64)].sum(axis=0) for m in members])
    has_cells = n_sk.sum(axis=1) > 0
    centres, row, col, n_sk = centres[has_cells], row[has_cells], col[has_cells], n_sk[has_cells]
    n_cells = n_sk.sum(axis=1)
    props = n_sk / n_cells[:, None]
    capture = _SPOT_CAPTURE * np.exp(rng.normal(0.0, 0.25, len(n_sk)))
    if cell_expr is None:
        spot_expr = n_sk @ protos
    else:
        spot_expr = np.stack([cell_expr[np.asarray(m, dtype=np.int64)].sum(axis=0)
                              for m, keep in zip(members, has_cells) if keep])
    mean = capture[:, None] * platform[None, :] * spot_expr
    counts = _nb(rng, mean, spot_disp[None, :]).astype(np.int32)

    obs = pd.DataFrame(
        {SECTION: slide_id, PATIENT: patient_id, "n_cells": n_cells.astype(np.int64),
         "capture_efficiency": capture, "array_row": row.astype(np.int64),
         "array_col": col.astype(np.int64)},
        index=pd.Index([f"{slide_id}_{i}" for i in range(len(n_sk))]),
    )
    spots = ad.AnnData(X=counts, obs=obs, var=pd.DataFrame(index=pd.Index(genes)))
    spots.obsm[SPATIAL] = centres.astype(np.float64)
    spots.obsm[TRUE_PROPORTIONS] = props
    spots.uns[UNS_INPUT] = {"image_path": None, "mpp": float(mpp),
                            "spot_diameter_um": float(diameter_um),
                            "sample_id": slide_id, "patient_id": patient_id}
    spots.uns["cell_types"] = [t.name for t in specs]

    n_k = onehot.sum(axis=0)
    bulk_props = n_k / n_k.sum()
    raw = bulk_platform * (n_k @ protos if cell_expr is None else cell_expr.sum(axis=0))
    depth = np.exp(rng.uniform(np.log(2e6), np.log(8e6)))
    bulk_counts = _nb(rng, raw * (depth / raw.sum()), bulk_disp).astype(np.int64)
    return spots, bulk_counts, bulk_props


# --------------------------------------------------------------------------- reference
def _make_reference(specs, genes, protos, n_cells, rng) -> ad.AnnData:
    """Single-cell reference: two batches, extra genes, MT genes, a few damaged cells."""
    K, G = protos.shape
    n_extra = max(50, G // 2)
    width = max(3, len(str(G + n_extra)))
    taken = set(genes)
    extra = []
    i = G
    while len(extra) < n_extra:
        i += 1
        name = f"GENE{i:0{width}d}"
        if name not in taken:
            extra.append(name)
    active = rng.random((K, n_extra)) < 0.35
    extra_log = rng.normal(-1.0, 1.3, n_extra) + active * rng.normal(0, 1.0, (K, n_extra))
    expr = np.concatenate([protos, np.exp(extra_log)], axis=1)  # K x (G + extra)

    weights = np.array([t.abundance for t in specs])
    weights = 0.5 / K + 0.5 * weights / weights.sum()
    labels = rng.choice(K, size=n_cells, p=weights / weights.sum())
    labels[:K] = np.arange(K)  # every type present
    labels = rng.permutation(labels)
    batch = rng.integers(0, 2, n_cells)
    batch_effect = np.exp(rng.normal(0.0, 0.3, (2, expr.shape[1])))
    ambient = 0.01 * expr.mean(axis=0)
    depth = np.exp(rng.normal(-0.5 * 0.45 ** 2, 0.45, n_cells))
    mean = (batch_effect[batch] * expr[labels] + ambient) * depth[:, None]

    # Mitochondrial reads: ~5% of a cell, 35-60% in damaged cells.
    damaged = rng.random(n_cells) < 0.03
    frac = np.where(damaged, rng.uniform(0.35, 0.6, n_cells), rng.beta(4, 76, n_cells))
    mt_total = mean.sum(axis=1) * frac / (1 - frac)
    mt_w = rng.dirichlet(np.full(len(MT_GENES), 5.0))
    mean = np.concatenate([mean, mt_total[:, None] * mt_w[None, :]], axis=1)

    disp = rng.uniform(0.1, 0.4, mean.shape[1])
    counts = sp.csr_matrix(_nb(rng, mean, disp[None, :]).astype(np.int32))
    names = [t.name for t in specs]
    obs = pd.DataFrame(
        {"cell_type": pd.Categorical.from_codes(labels, categories=names),
         "batch": pd.Categorical.from_codes(batch, categories=["batch1", "batch2"]),
         "damaged": damaged},
        index=pd.Index([f"cell{j:05d}" for j in range(n_cells)]),
    )
    all_genes = list(genes) + extra + list(MT_GENES)
    var = pd.DataFrame({"in_panel": np.arange(len(all_genes)) < G,
                        "mt": np.arange(len(all_genes)) >= G + n_extra},
                       index=pd.Index(all_genes))
    return ad.AnnData(X=counts, obs=obs, var=var)

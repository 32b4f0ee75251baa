"""Slide level with real bulk RNA-seq (TCGA/GDC): ``cpnn fit --level bulk --bulk ...`` and
``cpnn predict RUN --features DIR`` as functions.

Inputs: bulk RNA-seq (a GDC download folder of STAR count files, with its sample sheet,
or a samples x genes table), and whole-slide tiles (a folder of CLAM/TRIDENT feature files
``{slide}.h5``, or slide images that are tiled and encoded here).

Matching: a slide goes with the RNA sample of the same TCGA sample — the first 15
characters of the barcode (``TCGA-XS-A001-01``: patient and sample type; the vial letter
may differ, slides are ``01Z``, RNA ``01A``), the vial kept when both agree
(:func:`cpnn.data.bulk.match_slides_to_samples`). A slide whose name equals a sample label
matches it directly (non-TCGA cohorts), and a table labelled by patient (``TCGA-XS-A001``)
takes that patient's slides. **Several slides of one sample form one bag**:
their tiles are pooled, so the sample's bulk is predicted from all of its tissue. Slides
without RNA and RNA samples without a slide are not used, and are reported on the console,
in ``config.json`` / ``metrics.json`` and in ``matching.tsv`` — never dropped silently.

Genes: the bulk's gene ids (symbols, or Ensembl ids with or without versions) are mapped
to the reference's names (through a column of Ensembl ids of the reference, e.g.
``var['gene_ids']``, when one side has symbols and the other Ensembl ids).
"""
from __future__ import annotations

import glob as _glob
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import pandas as pd

from .._constants import PATIENT, PROTOTYPES, SAMPLE, SPATIAL, UNS, WEIGHTS
from ..errors import CPNNInputError

#: at most this many names in a console line (all of them are in the run's files)
_SHOW = 5


# --------------------------------------------------------------------------- slides
def list_feature_files(features_dir) -> Dict[str, Path]:
    """``{slide id: path}`` of every ``*.h5`` in a CLAM/TRIDENT features folder (slide id =
    file name without ``.h5``)."""
    d = Path(features_dir)
    if not d.is_dir():
        raise CPNNInputError("features folder not found", path=d, field="--features",
                             fix="pass the folder of CLAM/TRIDENT '{slide}.h5' files (e.g. TRIDENT's features_conch_v15/)")
    files = sorted(p for p in d.glob("*.h5") if p.is_file())
    if not files:
        raise CPNNInputError("no '*.h5' feature file in the folder", path=d, field="--features",
                             fix="point --features at the folder that holds one '{slide}.h5' per slide")
    return {p.name[:-3]: p for p in files}


def list_slides(pattern: str) -> Dict[str, Path]:
    """``{slide id: path}`` of the slide images matching a glob (slide id = file stem)."""
    paths = sorted(Path(p) for p in _glob.glob(str(pattern)) if Path(p).is_file())
    if not paths:
        raise CPNNInputError(f"no file matches {pattern!r}", field="--slides",
                             fix="quote the pattern, e.g. --slides 'slides/*.svs'")
    out: Dict[str, Path] = {}
    for p in paths:
        sid = p.stem
        if sid in out:
            raise CPNNInputError(f"two slides share the name {sid!r}", path=p, field="--slides",
                                 fix="give every slide a distinct file name")
        out[sid] = p
    return out


# --------------------------------------------------------------------------- bulk
def reference_gene_table(reference) -> pd.DataFrame:
    """The reference's genes (index) and gene annotations (columns), read cheaply.

    ``reference`` is a single-cell ``.h5ad`` (read in backed mode), a prototypes file
    (``.h5ad``/``.tsv``/``.csv``) or anything :func:`cpnn.prototypes.read_reference` reads.
    """
    from .fit import _is_prototypes_h5ad

    ref = Path(reference)
    if not ref.exists():
        raise CPNNInputError("reference not found", path=ref, field="--reference",
                             fix="pass a single-cell .h5ad (raw counts) or a prototypes file")
    if ref.suffix in (".tsv", ".csv") or _is_prototypes_h5ad(ref):
        from ..prototypes import Prototypes

        return pd.DataFrame(index=pd.Index(list(Prototypes.load(ref).genes)))
    if ref.suffix == ".h5ad":
        import anndata as ad

        a = ad.read_h5ad(ref, backed="r")
        try:
            var = a.var.copy()
        finally:
            a.file.close()
        var.index = var.index.astype(str)
        return var
    from ..prototypes.reference import _read_10x_folder

    return _read_10x_folder(ref).var


def _ensembl_column(var: pd.DataFrame) -> Optional[str]:
    from ..data.genes import looks_like_ensembl

    for c in var.columns:
        if var[c].dtype == object or str(var[c].dtype) in ("category", "string"):
            if looks_like_ensembl(var[c].astype(str).head(2000), 0.8):
                return str(c)
    return None


def map_genes_to_reference(genes: Sequence[str], ref_var: pd.DataFrame, where=None):
    """Map bulk gene ids to the reference's gene names.

    Parameters
    ----------
    genes
        Bulk gene ids: symbols, or Ensembl ids (versions such as ``.15`` ignored).
    ref_var
        The reference's genes (index) and annotations (:func:`reference_gene_table`).
    where
        The bulk input, for error messages.

    Returns
    -------
    (numpy.ndarray, list of str, dict)
        Positions in ``genes`` of the mapped genes, their reference names, and a report
        (``how``, ``n_bulk_genes``, ``n_reference_genes``, ``n_mapped``).

    Raises
    ------
    CPNNInputError
        When no gene maps, with examples from both sides.
    """
    from ..data.bulk import _strip_version
    from ..data.genes import looks_like_ensembl, match_genes

    genes = [str(g) for g in genes]
    ref_names = list(map(str, ref_var.index))
    bulk_ens, ref_ens = looks_like_ensembl(genes), looks_like_ensembl(ref_names)
    col = _ensembl_column(ref_var) if bulk_ens and not ref_ens else None
    if col is not None:  # bulk Ensembl ids -> the reference's symbols through its id column
        lookup: Dict[str, str] = {}
        for name, gid in zip(ref_names, ref_var[col].astype(str)):
            lookup.setdefault(_strip_version(gid), name)
        idx, names, seen = [], [], set()
        for i, g in enumerate(genes):
            n = lookup.get(_strip_version(g))
            if n is not None and n not in seen:
                seen.add(n)
                idx.append(i)
                names.append(n)
        how = f"Ensembl ids through the reference's var['{col}']"
        if not idx:
            raise CPNNInputError(
                f"no bulk gene id (e.g. {genes[:3]}) is in the reference's var['{col}'] (e.g. "
                f"{ref_var[col].astype(str).head(3).tolist()})", path=where, field="genes",
                fix="use a reference of the same species and gene annotation")
        t_idx = np.asarray(idx, dtype=np.int64)
    else:
        try:
            t_idx, r_idx, _ = match_genes(genes, ref_names)
        except CPNNInputError as exc:
            raise CPNNInputError(exc.problem, path=where, field="genes",
                                 fix=exc.fix + (" A GDC folder's gene_name column is used when the reference "
                                                "has symbols; a table needs the reference's kind of ids."
                                                if bulk_ens != ref_ens else "")) from None
        names = [ref_names[j] for j in r_idx]
        how = "Ensembl ids (versions ignored)" if bulk_ens else "gene symbols (retired symbols renamed)"
    report = {"how": how, "n_bulk_genes": len(genes), "n_reference_genes": len(ref_names), "n_mapped": len(names)}
    return t_idx, names, report


def read_bulk_input(path, sample_sheet=None, ensembl: bool = False):
    """Bulk RNA-seq as AnnData (samples x genes, raw counts) with ``obs['patient']``.

    Parameters
    ----------
    path
        A GDC download folder (STAR ``*star_gene_counts.tsv`` files in File-ID folders) or
        a samples x genes table (``.tsv``/``.csv``/``.h5ad``; genes x samples is detected).
    sample_sheet
        The GDC sample sheet: file -> case and sample ids. For a table whose labels are
        GDC file ids or file names, it renames them to sample ids.
    ensembl
        For a GDC folder, index genes by Ensembl id (the reference has Ensembl ids) rather
        than by ``gene_name``.

    Returns
    -------
    anndata.AnnData
        Observations named by sample id; ``obs['patient']`` from the sample sheet / the
        table's own ``patient`` column, else parsed from the TCGA barcode (else the label);
        ``uns['cpnn_input']['duplicate_rna_files']``
        lists RNA files of an already-seen sample (the first file, by sample-sheet order of
        file names, is kept).
    """
    from .._constants import UNS_INPUT
    from ..data.bulk import parse_tcga_barcode, read_bulk_table, read_gdc_sample_sheet, read_gdc_star_folder

    p = Path(path)
    if p.is_dir():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # duplicated symbols / samples: reported below instead
            adata = read_gdc_star_folder(p, sample_sheet, index="gene_id" if ensembl else "gene_name")
        sample = adata.obs["sample"].astype(str)
    else:
        if not p.exists():
            raise CPNNInputError("bulk input not found", path=p, field="--bulk",
                                 fix="pass a GDC download folder or a samples x genes table (.tsv/.csv/.h5ad)")
        adata = read_bulk_table(p)
        sample = pd.Series(list(map(str, adata.obs_names)), index=adata.obs_names)
        if sample_sheet is not None:
            sheet = read_gdc_sample_sheet(sample_sheet)
            by_id = dict(zip(sheet["File ID"].astype(str), sheet["Sample ID"])) if "File ID" in sheet else {}
            by_name = dict(zip(map(str, sheet.index), sheet["Sample ID"]))
            sample = sample.map(lambda s: by_id.get(s, by_name.get(s, s)))
    patients = []
    for s in sample:
        try:
            patients.append(parse_tcga_barcode(s).patient)
        except CPNNInputError:
            patients.append(str(s))
    adata.obs[SAMPLE] = sample.to_numpy().astype(str)
    if PATIENT not in adata.obs or adata.obs[PATIENT].isna().any():  # else: the file's own patient column
        adata.obs[PATIENT] = patients
    adata.obs[PATIENT] = adata.obs[PATIENT].astype(str)
    dup = adata.obs[SAMPLE].duplicated(keep="first").to_numpy()
    extra = adata.obs_names[dup].tolist()
    if dup.any():
        adata = adata[~dup].copy()
    adata.obs_names = adata.obs[SAMPLE].astype(str).to_numpy()
    info = dict(adata.uns.get(UNS_INPUT, {}))
    info["duplicate_rna_files"] = extra
    adata.uns[UNS_INPUT] = info
    return adata


# --------------------------------------------------------------------------- matching
@dataclass
class Matching:
    """Slides <-> RNA samples: the bags (one per matched sample) and what was left out."""

    table: pd.DataFrame  # one row per slide: slide, patient, sample, match
    bags: Dict[str, List[str]]  # sample -> its slides (sorted)
    slides_without_rna: List[str]
    rna_without_slide: List[str]
    duplicate_rna_files: List[str] = field(default_factory=list)

    def report(self) -> Dict[str, Any]:
        several = {s: v for s, v in self.bags.items() if len(v) > 1}
        return {"n_slides": int(len(self.table)), "n_bags": len(self.bags),
                "n_slides_used": int(sum(len(v) for v in self.bags.values())),
                "bag_rule": "several slides of one sample form one bag (their tiles pooled)",
                "samples_with_several_slides": several,
                "slides_without_rna": list(self.slides_without_rna),
                "rna_without_slide": list(self.rna_without_slide),
                "duplicate_rna_files": list(self.duplicate_rna_files)}

    def lines(self) -> List[str]:
        """Console lines: what was matched and what was left out (every case named)."""
        r = self.report()
        out = [f"matched {r['n_slides_used']} of {r['n_slides']} slide(s) to {r['n_bags']} RNA sample(s) "
               f"(one bag per sample)"]
        for s, v in r["samples_with_several_slides"].items():
            out.append(f"  sample {s}: {len(v)} slides pooled into one bag ({', '.join(v)})")
        for key, what in (("slides_without_rna", "slide(s) without an RNA sample, not used"),
                          ("rna_without_slide", "RNA sample(s) without a slide, not used"),
                          ("duplicate_rna_files", "extra RNA file(s) of an already-seen sample, not used")):
            names = r[key]
            if names:
                more = f" ... (+{len(names) - _SHOW}, all in matching.tsv / config.json)" if len(names) > _SHOW else ""
                out.append(f"  {len(names)} {what}: {', '.join(names[:_SHOW])}{more}")
        return out


def match_slides(slide_ids: Sequence[str], bulk) -> Matching:
    """Match slides to the bulk's samples (see the module docstring)."""
    from ..data.bulk import match_slides_to_samples

    from ..data.bulk import parse_tcga_barcode

    labels = list(map(str, bulk.obs_names))
    exact = {s: s for s in slide_ids if s in set(labels)}
    patient_labels = set()  # tables labelled by patient (TCGA-XS-A001): a slide goes to its patient
    for lab in labels:
        try:
            if parse_tcga_barcode(lab).sample is None:
                patient_labels.add(lab)
        except CPNNInputError:
            pass
    for s in slide_ids:
        if s not in exact and patient_labels:
            try:
                pid = parse_tcga_barcode(s).patient
            except CPNNInputError:
                continue
            if pid in patient_labels:
                exact[s] = pid
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # counted and named in Matching.lines()
        table = match_slides_to_samples(list(slide_ids), labels, table=exact or None)
    bags: Dict[str, List[str]] = {}
    for slide, sample in zip(table["slide"], table["sample"]):
        if isinstance(sample, str):
            bags.setdefault(sample, []).append(str(slide))
    bags = {k: sorted(v) for k, v in sorted(bags.items())}
    info = dict(bulk.uns.get("cpnn_input", {}))
    return Matching(table, bags, list(table.attrs["unmatched_slides"]), list(table.attrs["unmatched_samples"]),
                    list(info.get("duplicate_rna_files", [])))


# --------------------------------------------------------------------------- features
def _read_tiles(path: Path):
    from ..encoders import read_feature_file

    ff = read_feature_file(path)
    if len(ff) == 0:
        raise CPNNInputError("the feature file has no tiles", path=path, field="features",
                             fix="re-extract the slide (check its tissue detection)")
    return ff


def slide_feature_files(features_dir=None, slides=None, spec=None, mpp: Optional[float] = None,
                        cache_dir=None, progress: bool = True) -> Dict[str, Path]:
    """``{slide id: feature file}``: the given folder's files, or the slides tiled and
    encoded (``spec``: encoder and tile size) into ``cache_dir``."""
    if (features_dir is None) == (slides is None):
        raise CPNNInputError("give the slides one way", field="--features/--slides",
                             fix="pass --features DIR (CLAM/TRIDENT files) or --slides 'GLOB' (images), not both")
    if features_dir is not None:
        return list_feature_files(features_dir)
    from .wsi import slide_features

    paths = list_slides(slides) if isinstance(slides, str) else {Path(s).stem: Path(s) for s in slides}
    out = {}
    tile_px = int(spec.out_px or 224)
    for i, (sid, p) in enumerate(paths.items()):
        if progress:
            print(f"tiling and encoding slide {i + 1}/{len(paths)}: {p.name}", flush=True)
        _, facts = slide_features(p, spec.encoder, mpp=mpp, tile_px=tile_px, target_mpp=spec.patch_um / tile_px,
                                  features_dir=cache_dir, tta=spec.tta, progress=progress)
        out[sid] = Path(facts["features_path"])
    return out


def feature_record(path: Path, attrs: Dict[str, Any], dim: int) -> Dict[str, Any]:
    """The model's ``encoder`` record from a feature file's attributes."""
    patch_um = attrs.get("patch_um")
    if patch_um is None and attrs.get("patch_size_level0") and attrs.get("level0_mpp"):
        patch_um = float(attrs["patch_size_level0"]) * float(attrs["level0_mpp"])
    return {"name": attrs.get("encoder"), "patch_um": None if patch_um is None else float(patch_um),
            "out_px": attrs.get("patch_size_px") or attrs.get("patch_size"), "tta": attrs.get("tta"),
            "context_rings": 0.0, "subpatch_grid": 1, "dim": int(dim)}


# --------------------------------------------------------------------------- bags
@dataclass
class SlideBags:
    """Matched bulk samples and their slide bags, genes named as in the reference.

    Attributes
    ----------
    adata
        Samples with a slide x mapped genes: raw counts in ``X``, ``obs`` ``patient``,
        ``sample``, ``slides`` (``;``-joined), ``n_tiles``.
    bags
        One ``(n_tiles, D)`` array per sample: the tiles of all its slides.
    record
        The features' encoder record (:func:`feature_record`).
    matching, gene_report
        What was matched / left out, and how genes were mapped.
    """

    adata: Any
    bags: List[np.ndarray]
    record: Dict[str, Any]
    matching: Matching
    gene_report: Dict[str, Any]


def _dense(x) -> np.ndarray:
    return np.asarray(x.toarray() if hasattr(x, "toarray") else x, dtype=np.float64)


def load_slide_bags(bulk, reference, sample_sheet=None, features_dir=None, slides=None, spec=None,
                    mpp: Optional[float] = None, cache_dir=None, progress: bool = True) -> SlideBags:
    """Read bulk RNA-seq and slide features, match them and build one bag per sample.

    The matching lines (what is pooled, what is left out) are printed always.

    Parameters
    ----------
    bulk, sample_sheet
        See :func:`read_bulk_input`.
    reference
        Single-cell reference or prototypes file whose gene names the genes are mapped to.
    features_dir, slides, spec, mpp, cache_dir
        See :func:`slide_feature_files`.
    """
    import anndata as ad

    from ..data.genes import looks_like_ensembl

    ref_var = reference_gene_table(reference)
    if progress:
        print(f"reading bulk RNA-seq from {bulk}", flush=True)
    adata = read_bulk_input(bulk, sample_sheet, ensembl=looks_like_ensembl(list(ref_var.index)))
    files = slide_feature_files(features_dir, slides, spec, mpp, cache_dir=cache_dir, progress=progress)
    matching = match_slides(list(files), adata)
    for line in matching.lines():  # also with --no-progress: what is left out is never silent
        print(line, flush=True)
    t_idx, ref_names, gene_report = map_genes_to_reference(list(map(str, adata.var_names)), ref_var, where=bulk)
    samples = list(matching.bags)
    bags, record, n_tiles = [], None, []
    for s in samples:
        parts = []
        for sid in matching.bags[s]:
            ff = _read_tiles(files[sid])
            rec = feature_record(files[sid], ff.attrs, ff.features.shape[1])
            if record is None:
                record = rec
            elif rec["dim"] != record["dim"] or (rec["name"] and record["name"] and rec["name"] != record["name"]):
                raise CPNNInputError(f"features of {sid} ({rec['name']}, {rec['dim']} dims) differ from the first "
                                     f"slide's ({record['name']}, {record['dim']} dims)", path=files[sid],
                                     field="features", fix="use features of one encoder for every slide")
            parts.append(ff.features)
        bags.append(np.concatenate(parts))
        n_tiles.append(len(bags[-1]))
    obs = adata.obs.loc[samples, [PATIENT, SAMPLE]].copy()
    obs["slides"] = [";".join(matching.bags[s]) for s in samples]
    obs["n_tiles"] = n_tiles
    X = _dense(adata[samples].X)[:, t_idx] if samples else np.zeros((0, len(t_idx)))
    out = ad.AnnData(X=X.astype(np.float32), obs=obs, var=pd.DataFrame(index=pd.Index(ref_names)))
    return SlideBags(out, bags, dict(record or {}), matching, gene_report)


def as_bag_array(bags: Sequence[np.ndarray]) -> np.ndarray:
    """A 1-D object array of bags (fancy indexing works; equal-sized bags are not merged)."""
    arr = np.empty(len(bags), dtype=object)
    for i, b in enumerate(bags):
        arr[i] = b
    return arr


# --------------------------------------------------------------------------- fit
def choose_genes(counts: np.ndarray, names: Sequence[str], panel: Optional[Sequence[str]], n_top: int) -> List[str]:
    """A given panel (those mapped), or the ``n_top`` genes of highest mean CP10k."""
    if panel is not None:
        have = set(names)
        genes = [g for g in panel if g in have]
        if not genes:
            raise CPNNInputError("none of the panel genes is in both the bulk data and the reference",
                                 field="--genes", fix="check the gene names of the panel file")
        return genes
    tot = np.maximum(counts.sum(1, keepdims=True), 1.0)
    mean = (counts / tot).mean(0)
    keep = np.argsort(-mean, kind="stable")[:n_top]
    keep = keep[mean[keep] > 0]
    return [names[i] for i in sorted(keep)]


#: fewer training patients than this: no inner cross-validation, the paper's deconvolution targets
MIN_PATIENTS_TO_CHOOSE = 8
COMPOSITION_CHOICES = ("deconvolve", "none")


def choose_composition_targets(prototypes, model_config, train_config, bags: Sequence[np.ndarray], counts: np.ndarray,
                               patients: np.ndarray, encoder=None, n_folds: int = 3, seed: int = 0):
    """Whether the composition loss (targets from deconvolving the training bulks) helps,
    by inner cross-validation over the training patients.

    Each candidate (``deconvolve``, ``none``) is trained as one model per inner fold (whole
    patients held out); the held-out bags' predictions of all folds are pooled and scored
    by the mean per-gene Spearman against their log1p CP10k. Ties keep ``deconvolve`` (the
    paper's). Deconvolving high-depth bulk against prototypes with a free gene-wise platform
    factor can give near-uniform targets (seen on the TCGA-shaped cohort, BENCHMARKS.md), and
    then the loss pulls the weights the wrong way: this is the check.

    Returns
    -------
    (str, dict)
        The choice, and the inner scores (or why nothing was compared).
    """
    import dataclasses

    from ..data.splits import grouped_folds
    from ..metrics import expression_metrics, to_log1p_cp10k
    from ..model import CPNN

    n_pat = len(set(map(str, patients)))
    if n_pat < MIN_PATIENTS_TO_CHOOSE:
        return "deconvolve", {"compared": False,
                              "reason": f"{n_pat} patients (< {MIN_PATIENTS_TO_CHOOSE}): the paper's targets kept"}
    folds = grouped_folds(np.asarray(patients), n_folds=min(n_folds, n_pat), seed=seed)
    tc = dataclasses.replace(train_config, n_models=1, progress=False)
    oof = {c: np.zeros(counts.shape, dtype=np.float64) for c in COMPOSITION_CHOICES}
    for f in folds:
        tr, te = sorted(f["train"] + f["val"]), list(f["test"])
        for c in COMPOSITION_CHOICES:
            m = CPNN(prototypes, model_config, tc, encoder=encoder)
            m.fit([bags[i] for i in tr], counts[tr], groups=np.asarray(patients)[tr],
                  composition_targets="deconvolve" if c == "deconvolve" else None)
            oof[c][te] = np.log1p(m.predict([bags[i] for i in te])["bag_expr"].astype(np.float64) * 1e4)
    truth = to_log1p_cp10k(counts)
    scores = {c: float(expression_metrics(oof[c], truth, list(prototypes.genes))["scc_mean"]) for c in oof}
    choice = max(COMPOSITION_CHOICES, key=lambda c: (scores[c], c == "deconvolve"))
    return choice, {"compared": True, "inner_folds": len(folds), "metric": "scc_mean (pooled out-of-fold)",
                    "scores": scores}


def run_bulk_fit(opts, out: Path, bulk: str, sample_sheet=None, features_dir=None, slides=None,
                 mpp: Optional[float] = None, progress: bool = True):
    """Train a slide-level CPNN on bulk RNA-seq and slides; write the run folder ``out``.

    Parameters
    ----------
    opts
        :class:`cpnn.workflows.fit.FitOptions` (``level == 'bulk'``).
    out
        Run folder: ``model.cpnn``, ``prototypes.h5ad``, ``config.json`` (resolved options,
        inputs, the matching report), ``metrics.json`` (training history and the
        matching report), ``matching.tsv`` (one row per slide), ``features/`` (tiles
        encoded here, with ``slides``).
    bulk, sample_sheet
        See :func:`read_bulk_input`.
    features_dir, slides, mpp
        Precomputed CLAM/TRIDENT feature files, or slide images (a glob) and their
        microns per pixel when the files do not say.

    Returns
    -------
    cpnn.model.CPNN
    """
    from ..config import TrainConfig, config_from_dict, config_to_dict
    from ..model import CPNN
    from ..utils import atomic_path, seed_everything, write_json
    from .fit import load_or_build_prototypes, read_gene_list, stage_printer

    say = stage_printer(progress)
    t0 = time.perf_counter()
    seed_everything(opts.seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    inputs = {"bulk": str(bulk), "sample_sheet": None if sample_sheet is None else str(sample_sheet),
              "features": None if features_dir is None else str(features_dir), "slides": slides, "mpp": mpp}
    sb = load_slide_bags(bulk, opts.reference, sample_sheet=sample_sheet, features_dir=features_dir, slides=slides,
                         spec=opts.features, mpp=mpp, cache_dir=out / "features", progress=progress)
    t_feats = time.perf_counter() - t0
    with atomic_path(out / "matching.tsv", suffix=".tsv") as tmp:
        sb.matching.table.to_csv(tmp, sep="\t", index=False)
    matching, gene_report, samples = sb.matching, sb.gene_report, list(sb.adata.obs_names)
    if len(samples) < 4:
        raise CPNNInputError(f"only {len(samples)} RNA sample(s) have a slide; training needs at least 4",
                             path=out / "matching.tsv", field="slides/samples",
                             fix="check that slide names start with the TCGA barcode of their sample "
                                 "(TCGA-XX-XXXX-01...) or equal the bulk's sample labels")
    say(f"genes: {gene_report['n_mapped']} of {gene_report['n_bulk_genes']} bulk genes map to the reference "
        f"({gene_report['how']})")
    counts = _dense(sb.adata.X)
    ref_names = list(map(str, sb.adata.var_names))
    panel = read_gene_list(opts.genes_file) if opts.genes_file else None
    genes = choose_genes(counts, ref_names, panel, opts.n_top_genes)
    say(f"building prototypes ({opts.prototype_method}) from {Path(opts.reference).name}, {len(genes)} target genes")
    protos = load_or_build_prototypes(opts, genes)
    protos.save(out / "prototypes.h5ad")
    say(f"prototypes: {len(protos.cell_types)} cell types x {len(protos.genes)} genes")
    t_protos = time.perf_counter() - t0 - t_feats
    pos = {g: i for i, g in enumerate(ref_names)}
    y = counts[:, [pos[g] for g in protos.genes]].astype(np.float32)
    empty = [s for s, t in zip(samples, y.sum(1)) if t <= 0]
    if empty:
        raise CPNNInputError(f"{len(empty)} RNA sample(s) have no counts on the model's genes (e.g. {empty[:3]})",
                             path=bulk, field="counts", fix="check the files of these samples (truncated download?)")
    bags, record = sb.bags, sb.record
    patients = np.asarray(sb.adata.obs[PATIENT].astype(str))
    train = dict(opts.train)  # the `bulk` preset (8 bags a step) unless the config says otherwise
    tc = config_from_dict(TrainConfig, {**train, "progress": progress})
    encoder = dict(record or {})
    if slides is not None:
        encoder.update(name=opts.features.encoder, out_px=int(opts.features.out_px or 224),
                       patch_um=float(opts.features.patch_um), tta=opts.features.tta)
    encoder.update(level="bulk", training={
        "trained_on": "bulk RNA-seq of whole slides (bag = every tile of the sample's slides)",
        "n_samples": len(samples), "n_patients": int(len(set(patients.tolist()))),
        "n_tiles": int(sum(len(b) for b in bags))})
    cfg_record = {"options": opts.as_dict(), "inputs": inputs, "matching": matching.report(), "genes": gene_report}
    _write_bulk_config(out, cfg_record)
    say(f"training CPNN on {len(samples)} slide bags of {len(set(patients.tolist()))} patients: {tc.n_models} "
        f"ensemble member(s), up to {tc.max_epochs} epochs each (early stopping: {tc.early_stopping})")
    mode = str(opts.bulk.get("composition_targets", "auto"))
    if mode not in ("auto",) + COMPOSITION_CHOICES:
        raise CPNNInputError(f"unknown composition_targets {mode!r}", field="bulk.composition_targets",
                             fix="use auto, deconvolve or none")
    choice_info: Dict[str, Any] = {"compared": False, "reason": "given"}
    if mode == "auto":
        say("choosing the composition loss by inner cross-validation over the training patients ...")
        mode, choice_info = choose_composition_targets(protos, opts.model_config(), tc, bags, y, patients,
                                                       encoder=encoder, seed=opts.seed)
        scores = choice_info.get("scores")
        say(f"composition targets: {mode}" + (" (inner Spearman " + ", ".join(f"{k} {v:.3f}" for k, v in
                                                                            scores.items()) + ")" if scores else
                                              f" ({choice_info['reason']})"))
    choice_info["chosen"] = mode
    model = CPNN(protos, opts.model_config(), tc, encoder=encoder)
    model.fit(bags, y, groups=patients, composition_targets="deconvolve" if mode == "deconvolve" else None)
    model.encoder["training"]["composition_targets"] = choice_info
    model.prototype_provenance["trained_level"] = "bulk"
    model.save(out / "model.cpnn")
    cfg_record["used"] = {"model": config_to_dict(model.config), "train": config_to_dict(model.train_config),
                          "features": dict(model.encoder), "n_genes": len(model.genes), "genes": list(model.genes),
                          "cell_types": list(model.cell_types), "samples": samples,
                          "patients": sorted(set(patients.tolist()))}
    _write_bulk_config(out, cfg_record)
    hist = model.train_result.history
    best = hist[model.train_result.best_epoch] if hist and model.train_result.best_epoch >= 0 else {}
    write_json(out / "metrics.json", {
        "level": "bulk", "input": "bulk RNA-seq + slides", "n_genes": len(model.genes),
        "n_cell_types": len(model.cell_types), "n_bags": len(samples),
        "n_train_observations": len(model.split.get("train", [])),
        "n_val_observations": len(model.split.get("val", [])),
        "matching": matching.report(), "genes": gene_report, "composition_targets": choice_info,
        "best_epoch": model.train_result.best_epoch, "epochs_run": len(hist), "best": best, "history": hist,
        "seconds": {"prototypes": round(t_protos, 1), "features": round(t_feats, 1),
                    "total": round(time.perf_counter() - t0, 1)},
    })
    say(f"wrote {out}/ (model.cpnn, prototypes.h5ad, config.json, metrics.json, matching.tsv) in "
        f"{time.perf_counter() - t0:.0f} s")
    return model


def _write_bulk_config(out: Path, record: Dict[str, Any]) -> None:
    from .. import __version__
    from ..utils import write_json

    write_json(out / "config.json", {"cpnn_version": __version__, **record})


# --------------------------------------------------------------------------- predict
def tile_map_path(out: Path, slide_id: str) -> Path:
    """Where ``cpnn predict`` puts a slide's per-tile map: ``{PRED stem}_tiles/{slide}.h5ad``."""
    out = Path(out)
    return out.parent / f"{out.name[:-5] if out.name.endswith('.h5ad') else out.name}_tiles" / f"{slide_id}.h5ad"


def run_bulk_predict(run: Path, out: Path, features_dir=None, slides=None, mpp: Optional[float] = None,
                     progress: bool = True):
    """Predict every slide with a run's model: one row per slide, and per-tile maps.

    Parameters
    ----------
    run
        Run folder of ``cpnn fit`` (or its ``model.cpnn``); every ensemble member is used.
    out
        Output ``.h5ad``: ``X`` each slide's predicted bulk (log1p CP10k),
        ``obsm['cpnn_weights']`` its mean cell-type weights over tiles, ``obs`` (``patient``,
        ``sample`` from the TCGA barcode when there is one, ``n_tiles``, ``tile_map``),
        ``uns['cpnn']['cell_types']``. Per-tile maps (the layout ``cpnn plot`` reads) go to
        ``{out stem}_tiles/{slide}.h5ad``.
    features_dir, slides, mpp
        CLAM/TRIDENT feature files, or slide images (glob) encoded with the model's encoder.

    Returns
    -------
    anndata.AnnData
        The slide table written to ``out``.
    """
    import anndata as ad

    from ..data.bulk import parse_tcga_barcode
    from ..model.cpnn_model import check_encoder
    from ..utils import atomic_path
    from .fit import load_run_model
    from .spatial import FeatureSpec

    run = Path(run)
    out = Path(out)
    if out.suffix != ".h5ad":
        raise CPNNInputError("the slide table is one .h5ad file", path=out, field="--out",
                             fix="e.g. --out predictions.h5ad (per-tile maps go to predictions_tiles/)")
    model = load_run_model(run)
    enc = dict(model.encoder or {})
    spec = FeatureSpec.from_encoder_info({**enc, "name": enc.get("name") or "efficientnet-lite0",
                                          "patch_um": enc.get("patch_um") or 112.0})
    cache = out.parent / f"{out.stem}_features"
    files = slide_feature_files(features_dir, slides, spec, mpp, cache_dir=cache, progress=progress)
    rows, X, W = [], [], []
    for i, (sid, path) in enumerate(files.items()):
        ff = _read_tiles(path)
        check_encoder(enc, {"name": ff.attrs.get("encoder"), "patch_um": feature_record(path, ff.attrs, 0)["patch_um"]},
                      path)
        pred = model.predict(ff.features, bags=[0, len(ff)])
        tiles = tile_anndata(model, pred, ff, sid, path)
        target = tile_map_path(out, sid)
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(target, suffix=".h5ad") as tmp:
            tiles.write_h5ad(tmp)
        try:
            bc = parse_tcga_barcode(sid)
            patient, sample = bc.patient, bc.sample
        except CPNNInputError:
            patient, sample = None, None
        rows.append({"slide": sid, PATIENT: patient, SAMPLE: sample, "n_tiles": int(len(ff)),
                     "features": str(path), "tile_map": str(target)})
        X.append(np.log1p(pred["bag_expr"][0].astype(np.float64) * 1e4))
        W.append(pred["bag_weights"][0])
        if progress:
            print(f"slide {i + 1}/{len(files)} {sid}: {len(ff)} tiles -> {target}", flush=True)
    obs = pd.DataFrame(rows).set_index("slide")
    obs.index = obs.index.astype(str)
    for c in (PATIENT, SAMPLE):
        obs[c] = obs[c].astype(object).where(obs[c].notna(), "").astype(str)
    table = ad.AnnData(X=np.asarray(X, dtype=np.float32), obs=obs,
                       var=pd.DataFrame(index=pd.Index(model.genes, name="gene")))
    table.obsm[WEIGHTS] = np.asarray(W, dtype=np.float32)
    table.uns[UNS] = {"cell_types": list(model.cell_types), "level": "slide",
                      "expression": "log1p CP10k (predicted bulk per slide; every tile, every ensemble member)",
                      "run": str(run), "n_models": len(model.modules),
                      "tile_maps": str(tile_map_path(out, "x").parent)}
    with atomic_path(out, suffix=".h5ad") as tmp:
        table.write_h5ad(tmp)
    if progress:
        print(f"wrote {out} ({table.n_obs} slides x {table.n_vars} genes, {len(model.cell_types)} cell types) "
              f"and per-tile maps in {tile_map_path(out, 'x').parent}/", flush=True)
    return table


def tile_anndata(model, pred: Dict[str, np.ndarray], ff, slide_id: str, path: Path):
    """One slide's per-tile prediction as AnnData (the layout ``cpnn plot`` reads)."""
    import anndata as ad

    n = len(ff)
    side = float(ff.attrs.get("patch_size_level0") or ff.attrs.get("patch_size") or ff.attrs.get("patch_size_px")
                 or 1.0)
    coords = np.asarray(ff.coords, dtype=np.float64)
    obs = pd.DataFrame({"x0": ff.coords[:, 0].astype(np.int64), "y0": ff.coords[:, 1].astype(np.int64)},
                       index=pd.Index([f"tile{i}" for i in range(n)], name="tile"))
    obs["cpnn_dominant_type"] = pd.Categorical([model.cell_types[i] for i in pred["weights"].argmax(1)],
                                               categories=model.cell_types)
    a = ad.AnnData(X=np.log1p(pred["spot_expr"].astype(np.float64) * 1e4).astype(np.float32), obs=obs,
                   var=pd.DataFrame(index=pd.Index(model.genes, name="gene")))
    a.obsm[SPATIAL] = coords + side / 2.0
    a.obsm[WEIGHTS] = pred["weights"].astype(np.float32)
    a.varm[PROTOTYPES] = model.prototype_matrix().T.astype(np.float32)  # what `cpnn plot` splits drivers by
    mpp = ff.attrs.get("level0_mpp")
    a.uns[UNS] = {"cell_types": list(model.cell_types), "level": "slide", "sample_id": slide_id,
                  "expression": "log1p CP10k (predicted, per tile)",
                  "bulk_prediction": np.log1p(pred["bag_expr"][0] * 1e4).astype(np.float32),
                  "bulk_weights": pred["bag_weights"][0].astype(np.float32), "features_path": str(path),
                  "n_tiles": int(n)}
    sf = {"spot_diameter_fullres": side}
    if mpp:
        sf["microns_per_pixel"] = float(mpp)
    a.uns["spatial"] = {slide_id: {"images": {}, "scalefactors": sf, "metadata": {"source": "cpnn predict"}}}
    return a

"""Spot-level workflow: spatial inputs -> features -> prototypes -> CPNN -> AnnData.

Used by ``cpnn fit`` / ``cpnn predict`` and by the benchmarks, so that the command line,
the Python API and the published numbers all run the same code.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from .._constants import MIXTURE_LAYER, PATIENT, PROTOTYPES, SECTION, SPATIAL, SUBPATCH_WEIGHTS, UNS, UNS_INPUT, WEIGHTS
from .._numerics import composition_log1p
from ..errors import CPNNInputError


@dataclass
class FeatureSpec:
    """How patch features are made: encoder, physical patch size, resampled size, TTA,
    spatial context (``context_rings`` spot pitches of neighbours averaged and appended;
    0 = the spot's own patch only) and sub-patches (``subpatch_grid`` g > 1: each spot a
    bag of g x g sub-patches of ``patch_um / g`` microns, each resampled to ``out_px``;
    None: whatever precomputed feature files hold, set by :func:`attach_features`).

    Options for a new patient's scan (all off by default; see docs/USAGE.md):
    ``stain_norm`` ``"macenko"`` redraws every patch in the training slides' stain colours
    before the encoder (``stain_target``, fitted at fit time on the training patches and
    recorded with the model); ``nuclei`` appends the 16 nuclear-morphology features of
    :mod:`cpnn.image.nuclei` to each patch's CNN features; ``slide_standardise``
    (``"center"`` or ``"robust"``) standardises each slide's features on that slide's own
    statistics (:func:`cpnn.workflows.transforms.standardise_slide`), before the context."""

    encoder: str = "efficientnet-lite0"
    patch_um: float = 112.0
    out_px: Optional[int] = 224
    tta: str = "none"
    batch_size: int = 32
    context_rings: float = 0.0
    subpatch_grid: Optional[int] = 1
    slide_standardise: str = "none"
    nuclei: bool = False
    stain_norm: str = "none"
    stain_target: Optional[Dict[str, Any]] = None

    def __post_init__(self) -> None:
        from ..image.stain import STAIN_METHODS
        from .transforms import check_slide_standardise

        check_slide_standardise(self.slide_standardise)
        if self.stain_norm not in STAIN_METHODS:
            raise CPNNInputError(f"unknown stain normalisation {self.stain_norm!r}", field="stain_norm",
                                 fix=f"use one of {', '.join(STAIN_METHODS)}")
        if not isinstance(self.nuclei, (bool, np.bool_)):
            raise CPNNInputError(f"nuclei must be true or false, got {self.nuclei!r}", field="nuclei",
                                 fix="use nuclei: true (append nuclear-morphology features) or false")
        self.nuclei = bool(self.nuclei)
        for name, zero_ok, example in (("context_rings", True, 1), ("patch_um", False, 112)):
            value = getattr(self, name)
            ok = isinstance(value, (int, float)) and math.isfinite(value) and (value >= 0 if zero_ok else value > 0)
            if not ok:  # NaN would be written into config.json as NaN, which is not JSON
                flag = "--" + name.replace("_", "-")
                raise CPNNInputError(f"{name} must be a finite number {'>= 0' if zero_ok else '> 0'}, got {value!r}",
                                     field=f"features.{name}",
                                     fix=f"give e.g. {flag} {example} (features.{name} in a --config YAML)")

    def as_dict(self) -> Dict[str, Any]:
        return {"name": self.encoder, "patch_um": self.patch_um, "out_px": self.out_px, "tta": self.tta,
                "context_rings": self.context_rings, "subpatch_grid": self.subpatch_grid,
                "slide_standardise": self.slide_standardise, "nuclei": self.nuclei,
                "stain_norm": self.stain_norm, "stain_target": self.stain_target}

    @classmethod
    def from_encoder_info(cls, enc: Dict[str, Any]) -> "FeatureSpec":
        """The spec a trained model's ``encoder`` record describes (records written before
        the new-patient options have them off)."""
        return cls(encoder=enc.get("name", "efficientnet-lite0"), patch_um=float(enc.get("patch_um", 112.0)),
                   out_px=enc.get("out_px"), tta=enc.get("tta", "none"),
                   context_rings=float(enc.get("context_rings", 0.0) or 0.0),
                   subpatch_grid=int(enc.get("subpatch_grid", 1) or 1),
                   slide_standardise=enc.get("slide_standardise") or "none",
                   nuclei=bool(enc.get("nuclei", False)), stain_norm=enc.get("stain_norm") or "none",
                   stain_target=enc.get("stain_target"))

    def cache_name(self, sample_id: str) -> str:
        """File name of a sample's cached CNN features: stain-normalised features carry the
        method and the target's hash, so caches of different colours never mix."""
        if self.stain_norm == "none":
            return f"{sample_id}.h5"
        from ..image.stain import stain_target_tag

        return f"{sample_id}_{self.stain_norm}-{stain_target_tag(self.stain_target)}.h5"


@dataclass
class SpatialSample:
    """One spatial section with its features."""

    sample_id: str
    adata: Any
    features: Optional[np.ndarray] = None
    meta: Dict[str, Any] = field(default_factory=dict)

    @property
    def file_stem(self) -> str:
        """The sample's name in file paths (``cpnn.outputs.safe_stem`` of its id)."""
        if "file_stem" not in self.meta:
            from ..outputs import safe_stem

            self.meta["file_stem"] = safe_stem(self.sample_id, source=self.meta.get("source"))
        return self.meta["file_stem"]


# --------------------------------------------------------------------------- inputs
def load_inputs(
    her2st: Optional[str] = None,
    sections: Optional[Sequence[str]] = None,
    visium: Optional[Sequence[str]] = None,
    hest: Optional[str] = None,
    hest_ids: Optional[Sequence[str]] = None,
    h5ad: Optional[Sequence[str]] = None,
    image: Optional[Sequence[str]] = None,
    mpp: Optional[float] = None,
    require_image: bool = True,
) -> List[SpatialSample]:
    """Read spatial samples from any supported layout (exactly one kind at a time).

    Parameters
    ----------
    her2st, sections
        Root of an ``almaan/her2st`` layout and section ids (e.g. ``["C2", "C3"]``).
    visium, image
        Space Ranger ``outs/`` folders and their full-resolution images (same order).
    hest, hest_ids
        HEST-1k root and sample ids.
    h5ad, image
        Generic ``.h5ad`` files with ``obsm['spatial']`` and their images.
    mpp
        Microns per pixel of the images when the files do not say.
    require_image
        False when features are given (images are then not needed).
    """
    from .. import data as D

    kinds = [k for k, v in (("her2st", her2st), ("visium", visium), ("hest", hest), ("h5ad", h5ad)) if v]
    if len(kinds) != 1:
        raise CPNNInputError(
            "give exactly one input kind" + (f" (got {', '.join(kinds)})" if kinds else ""),
            field="--her2st/--visium/--hest/--h5ad", fix="e.g. --her2st ROOT --sections C2,C3",
        )
    images = list(image or [])
    out: List[SpatialSample] = []
    if her2st:
        if not sections:
            raise CPNNInputError("no sections given", field="--sections", fix="e.g. --sections C2,C3,C4")
        for sid, a in D.read_her2st(her2st, list(sections), mpp=mpp, require_image=require_image).items():
            out.append(SpatialSample(sid, a))
    elif visium:
        for i, outs in enumerate(visium):
            img = images[i] if i < len(images) else None
            a = D.read_visium(outs, image_path=img, mpp=mpp)
            out.append(SpatialSample(str(a.uns[UNS_INPUT]["sample_id"]), a, meta={"source": outs}))
    elif hest:
        for sid in hest_ids or []:
            out.append(SpatialSample(sid, D.read_hest(hest, sid, mpp=mpp, require_image=require_image)))
        if not out:
            raise CPNNInputError("no HEST sample ids given", field="--hest-ids", fix="e.g. --hest-ids TENX95,NCBI759")
    else:
        for i, path in enumerate(h5ad):
            img = images[i] if i < len(images) else None
            a = D.read_spatial_h5ad(path, image_path=img, mpp=mpp, require_image=require_image)
            out.append(SpatialSample(str(a.uns[UNS_INPUT].get("sample_id") or Path(path).stem), a,
                                     meta={"source": path}))
    assign_file_stems(out)
    return out


def assign_file_stems(samples: Sequence[SpatialSample]) -> None:
    """Give every sample its safe file stem; two samples that would share files are an error."""
    from ..outputs import unique_stems

    stems = unique_stems([(s.sample_id, s.meta.get("source")) for s in samples], field="sample id",
                         fix="give each input its own sample id (two files named alike in different "
                             "folders: rename one, or set uns['cpnn_input']['sample_id'] in the .h5ad)")
    for s in samples:
        s.meta["file_stem"] = stems[s.sample_id]


def attach_features(
    samples: List[SpatialSample],
    spec: FeatureSpec,
    cache_dir: Optional[os.PathLike] = None,
    features_dir: Optional[os.PathLike] = None,
    progress: bool = True,
) -> None:
    """Fill ``sample.features``: read from ``features_dir/{sample}.h5`` or extract (cached),
    then the new-patient options of ``spec`` (nuclei appended, slide standardisation), then
    the spatial context when ``spec.context_rings > 0``.

    With ``features_dir`` and ``spec.subpatch_grid`` None, the first file's grid is taken
    (and written into ``spec``); every file must then match it. With ``spec.stain_norm``
    ``"macenko"`` and no ``spec.stain_target`` (fit), the target is fitted on these samples'
    patches and written into ``spec`` (predict passes the model's). With ``progress``, one
    line per sample says which it is and where its features come from."""
    from .context import context_features
    from .transforms import standardise_slide

    if features_dir is not None and spec.stain_norm != "none":
        raise CPNNInputError("precomputed feature files cannot be stain-normalised (the patches are "
                             "normalised before the encoder)", field="--stain-norm",
                             fix="drop --features to let cpnn extract normalised features, or use --stain-norm none")
    if spec.stain_norm != "none" and spec.stain_target is None:
        spec.stain_target = fit_sample_stain_target(samples, spec)
        if progress:
            print(f"stain normalisation: Macenko target fitted on {spec.stain_target['n_patches']} "
                  f"training patches", flush=True)
    encoder = None
    for i, s in enumerate(samples):
        if progress:
            print(_feature_stage(s, spec, i, len(samples), features_dir, cache_dir), flush=True)
        if features_dir is not None:
            s.features = read_features_for(s, Path(features_dir))
            if spec.subpatch_grid is None:
                spec.subpatch_grid = feature_grid(s.features, Path(features_dir) / f"{s.file_stem}.h5")
            check_feature_grid(s.features, spec.subpatch_grid, Path(features_dir) / f"{s.file_stem}.h5")
        else:
            if spec.subpatch_grid is None:
                raise CPNNInputError("the sub-patch grid is unset and there are no feature files to take it from",
                                     field="subpatch_grid",
                                     fix="set subpatch_grid (e.g. 2, or 1 for one patch per spot)")
            if encoder is None:
                from ..encoders import create_encoder

                encoder = create_encoder(spec.encoder)
            from .features import spot_features

            cache = None if cache_dir is None else Path(cache_dir) / spec.cache_name(s.file_stem)
            slide, normaliser = _slide_for_spec(s, spec)
            s.features = spot_features(s.adata, encoder, slide=slide, patch_um=spec.patch_um, out_px=spec.out_px,
                                       cache_path=cache, tta=spec.tta, batch_size=spec.batch_size,
                                       progress=progress, subpatch_grid=spec.subpatch_grid)
            if normaliser is not None:
                s.meta["stain_norm"] = {"normalised": normaliser.n_normalised, "passed_through": normaliser.n_passed}
                if progress and normaliser.n_passed:
                    print(f"  stain normalisation: {normaliser.n_passed} of "
                          f"{normaliser.n_passed + normaliser.n_normalised} patches passed through unchanged "
                          "(background or too little tissue)", flush=True)
        if spec.nuclei:
            s.features = np.concatenate([s.features, sample_nucleus_features(s, spec)], axis=-1)
        s.features = standardise_slide(s.features, spec.slide_standardise)
        s.features = context_features(s.features, s.adata.obsm[SPATIAL], spec.context_rings)


def _slide_for_spec(sample: SpatialSample, spec: FeatureSpec):
    """The sample's slide, wrapped in the stain normaliser when ``spec`` asks for one."""
    if spec.stain_norm == "none":
        return None, None  # spot_features opens the image itself
    from ..image.stain import MacenkoNormaliser, StainNormalisedSlide

    normaliser = MacenkoNormaliser(spec.stain_target)
    return StainNormalisedSlide(_sample_slide(sample), normaliser), normaliser


def _sample_slide(sample: SpatialSample):
    """The image of a sample: an in-memory one in ``meta['image']`` (synthetic data) or its file."""
    from .features import slide_for

    if sample.meta.get("image") is not None:
        from ..image import ArraySlide

        mpp = dict(sample.adata.uns.get(UNS_INPUT, {})).get("mpp")
        return ArraySlide(sample.meta["image"], mpp)
    try:
        return slide_for(sample.adata)
    except CPNNInputError as exc:
        raise CPNNInputError(f"sample {sample.sample_id}: {exc.problem}", field=exc.field,
                             fix="--nuclei and --stain-norm read the images: give them (--image), "
                                 "or drop these options") from None


def _patch_centres(sample: SpatialSample, spec: FeatureSpec, slide):
    """Centres and side (microns) of the patches the features describe (sub-patches when g > 1)."""
    from .features import subpatch_centres

    centers = np.asarray(sample.adata.obsm[SPATIAL], dtype=np.float64)
    grid = int(spec.subpatch_grid or 1)
    if grid > 1:
        centers, _ = subpatch_centres(centers, [str(o) for o in sample.adata.obs_names], spec.patch_um, grid, slide)
    return centers, float(spec.patch_um) / grid


def sample_nucleus_features(sample: SpatialSample, spec: FeatureSpec, seed: int = 0) -> np.ndarray:
    """Nuclear-morphology features of a sample's patches (the same squares as its CNN
    features; the original colours, with the slide's own haematoxylin threshold).

    Returns
    -------
    numpy.ndarray
        ``(N, 16)``, or ``(N, g * g, 16)`` with ``g x g`` sub-patches, float32.
    """
    from ..image.nuclei import slide_nucleus_features

    slide = _sample_slide(sample)
    centers, side_um = _patch_centres(sample, spec, slide)
    feats, threshold = slide_nucleus_features(slide, centers, side_um, seed=seed)
    sample.meta["nuclei_threshold"] = threshold
    grid = int(spec.subpatch_grid or 1)
    return feats.reshape(sample.adata.n_obs, grid * grid, -1) if grid > 1 else feats


def fit_sample_stain_target(samples: Sequence[SpatialSample], spec: FeatureSpec, max_patches: int = 64,
                     seed: int = 0) -> Dict[str, Any]:
    """Macenko target of the (training) samples: up to ``max_patches`` of their spot patches
    (sub-patches when g > 1, at the encoder's input size), a seeded sample spread over the
    samples."""
    from ..image import spot_patches
    from ..image.stain import fit_stain_target as fit_target

    rng = np.random.default_rng(seed)
    per_sample = max(1, int(np.ceil(max_patches / max(1, len(samples)))))
    patches = []
    for s in samples:
        slide = _sample_slide(s)
        centers, side_um = _patch_centres(s, spec, slide)
        pick = np.sort(rng.choice(len(centers), min(len(centers), per_sample), replace=False))
        out_px = int(spec.out_px or 224)
        patches.extend(spot_patches(slide, centers[pick], patch_um=side_um, out_px=out_px, batch_size=len(pick)))
    return fit_target(patches, max_patches=max_patches, seed=seed)


def _feature_stage(sample: SpatialSample, spec: FeatureSpec, i: int, n: int, features_dir, cache_dir) -> str:
    head = f"features {i + 1}/{n} ({sample.sample_id})"
    if features_dir is not None:
        return f"{head}: reading {Path(features_dir) / f'{sample.file_stem}.h5'}"
    grid = int(spec.subpatch_grid or 1)
    n_obs = sample.adata.n_obs
    what = f"{n_obs} spots x {grid}x{grid} sub-patches" if grid > 1 else f"{n_obs} spots"
    cache = None if cache_dir is None else Path(cache_dir) / spec.cache_name(sample.file_stem)
    extra = "".join(f", {x}" for x, on in (("Macenko-normalised", spec.stain_norm != "none"),
                                           ("+ nuclei", spec.nuclei)) if on)
    if cache is not None and cache.is_file():
        return f"{head}: {what}{extra}, reusing {cache} (re-extracted if its settings or the image differ)"
    return f"{head}: extracting {what} ({spec.encoder}, {spec.patch_um:g} µm patches{extra})"


def feature_grid(features: np.ndarray, path=None) -> int:
    """The sub-patch grid of spot features: 1 for ``(N, D)``, ``g`` for ``(N, g * g, D)``."""
    if np.ndim(features) != 3:
        return 1
    k = int(features.shape[1])
    g = int(round(np.sqrt(k)))
    if g * g != k:
        raise CPNNInputError(f"the feature file holds {k} sub-patches per spot, not a square grid", path=path,
                             field="ids", fix="store g x g sub-patches per spot, ids '{spot}#0' ... '{spot}#(g*g-1)'")
    return g


def check_feature_grid(features: np.ndarray, grid: int, path=None) -> None:
    """Refuse feature files whose sub-patches per spot differ from ``grid x grid``."""
    k = features.shape[1] if np.ndim(features) == 3 else 1
    if k != int(grid) ** 2:
        got = f"{k} sub-patches per spot" if k > 1 else "one patch per spot"
        fix = f"--subpatch-grid {int(round(np.sqrt(k)))}" if k > 1 else "--subpatch-grid 1"
        raise CPNNInputError(f"the feature file holds {got}, the settings ask for a {grid} x {grid} grid",
                             path=path, field="subpatch_grid", fix=f"use {fix} (features.subpatch_grid in a config)")


def read_features_for(sample: SpatialSample, features_dir: Path) -> np.ndarray:
    """Features of ``sample`` from a CLAM/TRIDENT/cpnn file, aligned to its spots by id.

    A sub-patch file (ids ``"{spot}#{j}"``, as :func:`cpnn.workflows.features.spot_features`
    writes them) gives ``(n_spots, k, D)``."""
    from ..encoders import read_feature_file

    path = features_dir / f"{sample.file_stem}.h5"
    if not path.is_file():
        raise CPNNInputError(f"no feature file for sample {sample.sample_id}", path=path,
                             fix="name feature files {sample_id}.h5, or drop --features to extract them")
    ff = read_feature_file(path)
    obs = [str(o) for o in sample.adata.obs_names]
    if ff.ids is None:
        if len(ff) != len(obs):
            raise CPNNInputError(f"feature file has {len(ff)} rows without ids, the data has {len(obs)} spots",
                                 path=path, field="ids", fix="store spot ids in the file (dataset 'ids')")
        return ff.features
    index = {i: k for k, i in enumerate(map(str, ff.ids))}
    sample.meta["feature_attrs"] = dict(ff.attrs)
    if obs and obs[0] not in index and f"{obs[0]}#0" in index:
        return _subpatch_rows(ff, index, obs, path)
    missing = [o for o in obs if o not in index]
    if missing:
        raise CPNNInputError(f"{len(missing)} of {len(obs)} spots have no features (e.g. {', '.join(missing[:3])})",
                             path=path, field="ids", fix="re-extract features for these spots")
    return ff.features[[index[o] for o in obs]]


def _subpatch_rows(ff, index: Dict[str, int], obs: List[str], path: Path) -> np.ndarray:
    """``(n_spots, k, D)`` from a file of ``"{spot}#{j}"`` rows (k sub-patches per spot)."""
    k = 0
    while f"{obs[0]}#{k}" in index:
        k += 1
    try:
        rows = [index[f"{o}#{j}"] for o in obs for j in range(k)]
    except KeyError as exc:
        raise CPNNInputError(f"sub-patch {exc.args[0]} has no features (every spot needs {k} sub-patches)",
                             path=path, field="ids", fix="re-extract the sub-patch features for these spots") from None
    return ff.features[rows].reshape(len(obs), k, -1)


# --------------------------------------------------------------------------- fit
def counts_matrix(adata, genes: Sequence[str]) -> np.ndarray:
    """Dense float32 counts of ``genes`` (in that order) from a spatial AnnData."""
    from scipy import sparse

    pos = {g: i for i, g in enumerate(map(str, adata.var_names))}
    missing = [g for g in genes if g not in pos]
    if missing:
        raise CPNNInputError(f"{len(missing)} model genes are absent from the data (e.g. {', '.join(missing[:5])})",
                             field="var_names", fix="use the same gene panel as in training")
    x = adata.X[:, [pos[g] for g in genes]]
    return np.asarray(x.toarray() if sparse.issparse(x) else x, dtype=np.float32)


def target_genes(samples: Sequence[SpatialSample], panel: Optional[Sequence[str]] = None,
                 n_top: Optional[int] = None) -> List[str]:
    """Genes to model: a given panel (kept in its order, those present in every sample), or
    the ``n_top`` most expressed genes over the (training) samples."""
    common = None
    for s in samples:
        names = set(map(str, s.adata.var_names))
        common = names if common is None else common & names
    common = common or set()
    if panel is not None:
        genes = [g for g in panel if g in common]
        if not genes:
            raise CPNNInputError("none of the panel genes is measured in the data", field="--genes",
                                 fix="check the gene symbols (case, aliases) of the panel file")
        from .input_checks import warn_panel_shrunk

        warn_panel_shrunk(len(panel), len(genes), "--genes", what="the data (genes measured in every sample)")
        return genes
    ordered = sorted(common)
    if n_top is None:
        return ordered
    totals = np.zeros(len(ordered))
    for s in samples:
        totals += counts_matrix(s.adata, ordered).sum(0) / max(1, s.adata.n_obs)
    keep = np.argsort(-totals, kind="stable")[:n_top]
    return [ordered[i] for i in sorted(keep)]


def fit_spot_model(
    samples: Sequence[SpatialSample],
    prototypes,
    config=None,
    train_config=None,
    encoder: Optional[Dict[str, Any]] = None,
    composition_targets="deconvolve",
):
    """Train CPNN on the spots of ``samples`` (validation carved by section; the residual
    head's inner cross-validation by patient when ``obs['patient']`` names at least two)."""
    from ..model import CPNN

    genes = list(prototypes.genes)
    x = np.concatenate([s.features for s in samples])
    y = np.concatenate([counts_matrix(s.adata, genes) for s in samples])
    groups = np.concatenate([[s.sample_id] * s.adata.n_obs for s in samples])
    patients = None
    if all(PATIENT in s.adata.obs for s in samples):
        patients = np.concatenate([s.adata.obs[PATIENT].astype(str).to_numpy() for s in samples])
        if len(np.unique(patients)) < 2:
            patients = None
    keep = y.sum(1) > 0
    from .input_checks import warn_dropped

    for sid in dict.fromkeys(groups):
        in_sample = groups == sid
        warn_dropped(int((~keep[in_sample]).sum()), int(in_sample.sum()),
                     "spots have no counts of the model's genes and are left out of training", f"sample {sid}")
    model = CPNN(prototypes, config, train_config, encoder=encoder)
    model.fit(x[keep], y[keep], groups=groups[keep], composition_targets=composition_targets,
              residual_groups=None if patients is None else patients[keep])
    return model


# --------------------------------------------------------------------------- predict
def prediction_anndata(model, sample: SpatialSample, image_max_px: int = 2000):
    """Predictions of ``model`` on ``sample`` as an AnnData scanpy/squidpy read directly.

    ``X`` log1p CP10k predicted expression; ``obsm['cpnn_weights']`` cell-type weights;
    ``obsm['spatial']`` (x, y) full-res pixels; ``varm['cpnn_prototypes']`` the learnt
    prototypes as the network mixes them (genes x types, see ``CPNN.prototype_matrix``); ``uns['cpnn']`` names and provenance; ``uns['spatial'][library_id]`` a
    downsampled image with scale factors; ``layers['counts']`` the measured counts of the
    model's genes when the input has them; with an active residual head,
    ``layers['cpnn_mixture']`` the cell-type mixture's expression alone (``X`` adds the
    cell-state term).
    """
    import anndata as ad
    import pandas as pd

    from ..model.cpnn_model import per_observation

    raw = model.predict(sample.features)
    out = per_observation(raw, sample.features)
    a = sample.adata
    obs = pd.DataFrame(index=pd.Index([str(o) for o in a.obs_names], name="spot"))
    for col in (SECTION, "patient"):
        if col in a.obs:
            obs[col] = a.obs[col].astype(str).values
    weights = out["weights"]
    obs["cpnn_dominant_type"] = pd.Categorical([model.cell_types[i] for i in weights.argmax(1)],
                                               categories=model.cell_types)
    pred = ad.AnnData(X=composition_log1p(out["expression"]).astype(np.float32), obs=obs,
                      var=pd.DataFrame(index=pd.Index(model.genes, name="gene")))
    pred.obsm[SPATIAL] = np.asarray(a.obsm[SPATIAL], dtype=np.float64)
    pred.obsm[WEIGHTS] = weights.astype(np.float32)
    if np.ndim(sample.features) == 3:
        n, k = sample.features.shape[:2]
        pred.obsm[SUBPATCH_WEIGHTS] = raw["weights"].reshape(n, k, -1).astype(np.float32)
    if "mixture" in out:  # residual head on: X = mixture + cell-state term
        pred.layers[MIXTURE_LAYER] = composition_log1p(out["mixture"]).astype(np.float32)
    pred.varm[PROTOTYPES] = model.prototype_matrix().T.astype(np.float32)
    present = [g for g in model.genes if g in set(map(str, a.var_names))]
    if len(present) == len(model.genes):
        from scipy import sparse

        pred.layers["counts"] = sparse.csr_matrix(counts_matrix(a, model.genes))
    info = dict(a.uns.get(UNS_INPUT, {}))
    pred.uns[UNS] = {
        "cell_types": list(model.cell_types),
        "level": "spot",
        "expression": "log1p CP10k (predicted)",
        "encoder": {k: v for k, v in model.encoder.items() if v is not None},
        "prototypes": {k: str(v) for k, v in model.prototype_provenance.items() if k in ("method", "label_key")},
        "sample_id": sample.sample_id,
    }
    if info.get("image_path"):  # the full-resolution image obsm['spatial'] refers to (cpnn view, export)
        pred.uns[UNS]["image_path"] = str(info["image_path"])
    if model.residual is not None:
        pred.uns[UNS]["residual_head"] = {"active": bool(model.residual.active), "form": model.residual.form_,
                                          "alpha": model.residual.alpha_ if model.residual.active else "off"}
        if model.residual.mixture_weight_ is not None:
            pred.uns[UNS]["residual_head"]["mixture_weight"] = float(model.residual.mixture_weight_)
    if SUBPATCH_WEIGHTS in pred.obsm:
        pred.uns[UNS]["subpatches"] = _subpatch_layout(pred.obsm[SUBPATCH_WEIGHTS].shape[1], model.encoder,
                                                       info.get("mpp"))
    _add_spatial_image(pred, sample.file_stem, info, image_max_px)  # an h5 key: no "/"
    return pred


def _subpatch_layout(k: int, encoder: Dict[str, Any], mpp) -> Dict[str, Any]:
    """Where sub-patch ``j`` of a spot lies: ``offsets_fullres`` (k, 2) from the spot centre
    and ``side_fullres``, in full-resolution pixels (row-major, as extracted); without
    ``mpp`` or the model's ``patch_um`` only the grid is known."""
    grid = int(round(np.sqrt(k)))
    layout: Dict[str, Any] = {"grid": grid, "order": "row-major: left to right, then top to bottom"}
    patch_um = (encoder or {}).get("patch_um")
    if mpp and patch_um:
        from .features import subpatch_offsets

        square = float(patch_um) / float(mpp)
        layout["offsets_fullres"] = subpatch_offsets(square, grid)
        layout["side_fullres"] = square / grid
    return layout


def _add_spatial_image(pred, library_id: str, info: Dict[str, Any], max_px: int) -> None:
    """``uns['spatial'][library_id]`` with a 'hires' image and its scale factor (scanpy's layout)."""
    mpp = info.get("mpp")
    diameter_um = info.get("spot_diameter_um")
    entry: Dict[str, Any] = {"images": {}, "scalefactors": {}, "metadata": {"source": "cpnn"}}
    if mpp and diameter_um:
        entry["scalefactors"]["spot_diameter_fullres"] = float(diameter_um) / float(mpp)
    image_path = info.get("image_path")
    if image_path and os.path.exists(str(image_path)):
        from ..image import open_slide

        with open_slide(image_path, mpp=mpp) as sl:
            thumb = sl.thumbnail(max_px)
            scale = thumb.shape[1] / sl.dimensions[0]
        entry["images"]["hires"] = thumb
        entry["scalefactors"]["tissue_hires_scalef"] = float(scale)
        entry["scalefactors"]["tissue_lowres_scalef"] = float(scale)
    if mpp:
        entry["scalefactors"]["microns_per_pixel"] = float(mpp)
    pred.uns["spatial"] = {library_id: entry}

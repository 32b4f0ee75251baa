"""Feature variants for a benchmark: nuclei, stain normalisation, slide standardisation.

Nested selection compares the new-patient options of :class:`~cpnn.workflows.spatial.FeatureSpec`
on the same samples. :func:`feature_variants` builds them from features already in hand,
so the CNN features are extracted once: nucleus features are computed once per sample and
appended, standardisation is applied to copies, and only the ``stain`` variant encodes
patches again (Macenko-normalised, cached by target like ``cpnn fit`` does).

Variants are names joined by ``+`` (applied in the order stain, nuclei, standardisation,
the order :func:`~cpnn.workflows.spatial.attach_features` uses):

- ``base``: the given features;
- ``nuclei``: ``base`` ⊕ the 16 nuclear-morphology features per patch;
- ``stain``: CNN features of Macenko-normalised patches instead of ``base``;
- ``center`` / ``robust``: each sample standardised on its own features;
- ``nocontext``: without the spatial context that ``context_rings`` would add (so nested
  selection can weigh the context itself).

e.g. ``["base", "nuclei", "robust", "nuclei+robust", "stain+center", "nocontext"]``. Spatial
context is not applied unless ``context_rings`` is given (the benchmark applies it itself).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import numpy as np

from ..errors import CPNNInputError

__all__ = ["VARIANT_PARTS", "parse_variant", "feature_variants", "feature_variants_with_target"]

VARIANT_PARTS = ("base", "nuclei", "stain", "center", "robust", "nocontext")


def parse_variant(name: str) -> Dict[str, Any]:
    """``"nuclei+robust"`` -> ``{"nuclei": True, "stain": False, "standardise": "robust", "context": True}``."""
    parts = [p.strip() for p in str(name).split("+") if p.strip()]
    unknown = [p for p in parts if p not in VARIANT_PARTS]
    if not parts or unknown:
        raise CPNNInputError(f"unknown feature variant {name!r}", field="variants",
                             fix=f"join names of {', '.join(VARIANT_PARTS)} with '+', e.g. 'nuclei+robust'")
    modes = [p for p in parts if p in ("center", "robust")]
    if len(modes) > 1:
        raise CPNNInputError(f"variant {name!r} asks for two standardisations", field="variants",
                             fix="use center or robust, not both")
    return {"nuclei": "nuclei" in parts, "stain": "stain" in parts,
            "standardise": modes[0] if modes else "none", "context": "nocontext" not in parts}


def feature_variants(
    samples: Sequence[Any],
    spec,
    variants: Sequence[str],
    *,
    encoder: Any = None,
    stain_target: Optional[Dict[str, Any]] = None,
    stain_fit_ids: Optional[Sequence[str]] = None,
    cache_dir: Optional[os.PathLike] = None,
    context_rings: float = 0.0,
    seed: int = 0,
    progress: bool = False,
) -> Dict[str, Dict[str, np.ndarray]]:
    """Feature matrices of several variants for the same samples.

    Parameters
    ----------
    samples
        :class:`~cpnn.workflows.spatial.SpatialSample` s with ``features`` = the base CNN
        features **without** spatial context, ``(N, D)`` or ``(N, g * g, D)``;
        ``adata.obsm['spatial']`` spot centres (level-0 px) and ``adata.uns['cpnn_input']``
        ``mpp``; the image as ``meta['image']`` (an RGB array, e.g. the synthetic cohort)
        or ``uns['cpnn_input']['image_path']``. Needed only by ``nuclei`` and ``stain``.
    spec
        The :class:`~cpnn.workflows.spatial.FeatureSpec` the base features were made with
        (``patch_um``, ``out_px``, ``subpatch_grid``, ``tta``, ``encoder``).
    variants
        Variant names (see the module docstring).
    encoder
        A :class:`cpnn.encoders.Encoder` for ``stain`` variants (default: built from
        ``spec.encoder``).
    stain_target
        Macenko target (:func:`cpnn.image.stain.fit_stain_target`), or
    stain_fit_ids
        the sample ids whose patches fit it — a fold's **training** samples, so the test
        slides' colours never choose the target. One of the two is required for ``stain``.
    cache_dir
        Where stain-normalised CNN features are cached (``{sample}_macenko-{hash}.h5``).
    context_rings
        Append the neighbourhood mean last (0: not, as the benchmark adds it itself).
    seed
        Seed of the patches sampled for thresholds and the stain target.

    Returns
    -------
    dict
        ``{variant: {sample_id: features}}``, float32 copies (the base arrays are never
        modified). :func:`feature_variants_with_target` also returns the stain target.
    """
    return feature_variants_with_target(samples, spec, variants, encoder=encoder, stain_target=stain_target,
                                        stain_fit_ids=stain_fit_ids, cache_dir=cache_dir,
                                        context_rings=context_rings, seed=seed, progress=progress)[0]


def feature_variants_with_target(samples, spec, variants, *, encoder=None, stain_target=None, stain_fit_ids=None,
                                 cache_dir=None, context_rings: float = 0.0, seed: int = 0, progress: bool = False):
    """:func:`feature_variants`, also returning the Macenko target used (None without ``stain``)."""
    from .context import context_features
    from .spatial import FeatureSpec, check_feature_grid, fit_sample_stain_target, sample_nucleus_features
    from .transforms import standardise_slide

    parsed = {v: parse_variant(v) for v in variants}
    grid = int(spec.subpatch_grid or 1)
    for s in samples:
        if s.features is None:
            raise CPNNInputError(f"sample {s.sample_id} has no base features", field="features",
                                 fix="attach the CNN features (without context) first")
        check_feature_grid(s.features, grid)
    target = None
    stain_feats: Dict[str, np.ndarray] = {}
    if any(p["stain"] for p in parsed.values()):
        target = stain_target
        if target is None:
            if not stain_fit_ids:
                raise CPNNInputError("the stain variant needs a target or the samples to fit it on",
                                     field="stain_fit_ids",
                                     fix="pass stain_fit_ids=<the fold's training sample ids> (or stain_target)")
            by_id = {s.sample_id: s for s in samples}
            missing = [i for i in stain_fit_ids if i not in by_id]
            if missing:
                raise CPNNInputError(f"stain_fit_ids names unknown samples {missing}", field="stain_fit_ids")
            target = fit_sample_stain_target([by_id[i] for i in stain_fit_ids], spec, seed=seed)
        stain_spec = FeatureSpec(**{**_spec_kwargs(spec), "stain_norm": "macenko", "stain_target": target})
        stain_feats = _stain_features(samples, stain_spec, encoder, cache_dir, progress)
    nuclei: Dict[str, np.ndarray] = {}
    if any(p["nuclei"] for p in parsed.values()):
        for s in samples:
            nuclei[s.sample_id] = sample_nucleus_features(s, spec, seed=seed)
    out: Dict[str, Dict[str, np.ndarray]] = {}
    for name, p in parsed.items():
        per: Dict[str, np.ndarray] = {}
        for s in samples:
            x = stain_feats[s.sample_id] if p["stain"] else np.asarray(s.features, dtype=np.float32)
            if p["nuclei"]:
                x = np.concatenate([x, nuclei[s.sample_id]], axis=-1)
            x = standardise_slide(x, p["standardise"])
            if p["context"]:
                x = context_features(x, s.adata.obsm["spatial"], context_rings)
            per[s.sample_id] = np.array(x, dtype=np.float32, copy=True)
        out[name] = per
    return out, target


def _spec_kwargs(spec) -> Dict[str, Any]:
    import dataclasses

    return {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}


def _stain_features(samples, spec, encoder, cache_dir, progress) -> Dict[str, np.ndarray]:
    """CNN features of Macenko-normalised patches, per sample (cached by target)."""
    from .features import spot_features
    from .spatial import _slide_for_spec

    if encoder is None:
        from ..encoders import create_encoder

        encoder = create_encoder(spec.encoder)
    out = {}
    for s in samples:
        slide, _ = _slide_for_spec(s, spec)
        cache = None if cache_dir is None else Path(cache_dir) / spec.cache_name(s.file_stem)
        out[s.sample_id] = spot_features(s.adata, encoder, slide=slide, patch_um=spec.patch_um, out_px=spec.out_px,
                                         cache_path=cache, tta=spec.tta, batch_size=spec.batch_size,
                                         progress=progress, subpatch_grid=int(spec.subpatch_grid or 1))
    return out

"""AnnData in, AnnData out: the few calls most users need, in the shape scvi-tools users know.

>>> import cpnn
>>> protos = cpnn.build_prototypes(reference, "cell_type")             # single cell -> K x G
>>> feats = {sid: cpnn.api.spatial_features(a) for sid, a in sections.items()}
>>> model = cpnn.api.fit_spatial(sections, feats, protos)              # trained CPNN
>>> pred = cpnn.api.predict_spatial(model, test_section, test_feats)   # AnnData
>>> model.save("model.cpnn"); model = cpnn.CPNN.load("model.cpnn")
>>> cpnn.api.plot_prediction(pred, "figures/")

Everything here is a thin layer over :mod:`cpnn.workflows.spatial` (the code behind
``cpnn fit`` / ``cpnn predict``), so the command line and Python give the same results.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Sequence, Union

import numpy as np

from ._constants import SECTION, UNS_INPUT
from .errors import CPNNInputError
from .plot.maps import driver_shares, plot_prediction

__all__ = ["spatial_features", "fit_spatial", "predict_spatial", "plot_prediction", "driver_shares"]

AnnDataLike = Any


def _sample_id(adata, fallback: str) -> str:
    sid = dict(adata.uns.get(UNS_INPUT, {})).get("sample_id")
    if sid:
        return str(sid)
    if SECTION in adata.obs and adata.obs[SECTION].nunique() == 1:
        return str(adata.obs[SECTION].iloc[0])
    return fallback


def _as_samples(adatas, features) -> list:
    """Pair AnnDatas with feature arrays (dicts by sample id, sequences by position)."""
    from .workflows.spatial import SpatialSample

    if hasattr(adatas, "obs"):
        adatas = [adatas]
        if features is not None and not isinstance(features, (Mapping, list, tuple)):
            features = [features]
    if isinstance(adatas, Mapping):
        ids, items = [str(k) for k in adatas], list(adatas.values())
    else:
        items = list(adatas)
        ids = [_sample_id(a, f"sample{i + 1}") for i, a in enumerate(items)]
    if len(set(ids)) != len(ids):
        raise CPNNInputError(f"sample ids are not unique: {ids}", field="adatas",
                             fix="pass a dict {sample_id: AnnData}")
    if isinstance(features, Mapping):
        missing = [s for s in ids if s not in features]
        if missing:
            raise CPNNInputError(f"no features for samples {missing}", field="features",
                                 fix="give one (n_spots, D) array per sample, keyed by sample id")
        feats = [features[s] for s in ids]
    else:
        feats = list(features)
        if len(feats) != len(items):
            raise CPNNInputError(f"{len(feats)} feature arrays for {len(items)} samples", field="features")
    samples = []
    for sid, a, f in zip(ids, items, feats):
        f = np.asarray(f, dtype=np.float32)
        if f.ndim not in (2, 3) or f.shape[0] != a.n_obs:
            raise CPNNInputError(f"features of sample {sid} have shape {f.shape}; expected ({a.n_obs} spots, D) "
                                 f"or ({a.n_obs} spots, sub-patches, D) in obs order", field="features",
                                 fix="compute them with cpnn.api.spatial_features(adata)")
        samples.append(SpatialSample(sid, a, f))
    return samples


def spatial_features(
    adata: AnnDataLike,
    encoder: Union[str, Any] = "efficientnet-lite0",
    *,
    slide: Any = None,
    patch_um: float = 112.0,
    out_px: Optional[int] = None,
    tta: str = "none",
    cache_path=None,
    progress: bool = False,
    subpatch_grid: int = 1,
) -> np.ndarray:
    """Patch features of every spot of a spatial AnnData.

    Parameters
    ----------
    adata
        Spots with ``obsm['spatial']`` (x, y full-resolution pixels) and
        ``uns['cpnn_input']['image_path']`` (as the cpnn readers write), or pass ``slide``.
    encoder
        Encoder name (see :func:`cpnn.encoders.list_encoders`) or an encoder object.
    slide
        An open slide or a :class:`cpnn.image.ArraySlide` of an in-memory image.
    patch_um, out_px, tta
        Patch side in microns, resampled size (default: the encoder's input) and
        test-time augmentation.
    cache_path
        Feature file (CLAM-style ``.h5``) to write or reuse.
    progress
        Show a progress bar.
    subpatch_grid
        ``g > 1``: each spot's ``patch_um`` square cut into ``g x g`` sub-patches, each
        encoded at ``out_px`` (``g`` times the magnification); CPNN then treats the spot as
        a bag of them.

    Returns
    -------
    numpy.ndarray
        ``(n_obs, D)`` float32 features in ``obs`` order, or ``(n_obs, g * g, D)``.

    Examples
    --------
    >>> feats = cpnn.api.spatial_features(adata, "efficientnet-lite0", patch_um=112)
    """
    from .workflows.features import spot_features

    if isinstance(encoder, str):
        from .encoders import create_encoder

        encoder = create_encoder(encoder)
    return spot_features(adata, encoder, slide=slide, patch_um=patch_um, out_px=out_px, cache_path=cache_path,
                         tta=tta, progress=progress, subpatch_grid=subpatch_grid)


def fit_spatial(
    adatas: Union[AnnDataLike, Sequence[AnnDataLike], Mapping[str, AnnDataLike]],
    features: Union[np.ndarray, Sequence[np.ndarray], Mapping[str, np.ndarray]],
    prototypes: Any,
    config=None,
    train_config=None,
    *,
    encoder: Optional[Union[str, Dict[str, Any]]] = None,
    composition_targets: Any = "deconvolve",
):
    """Train CPNN on the spots of one or more spatial sections.

    Parameters
    ----------
    adatas
        AnnData(s) with raw counts in ``X`` (genes by name), one per section — a list
        (ids from ``uns['cpnn_input']['sample_id']``) or a dict ``{sample_id: AnnData}``.
        Early-stopping validation is carved section-wise when there are 3 or more.
    features
        One ``(n_spots, D)`` array per section, in the same order / with the same keys.
    prototypes
        :class:`cpnn.Prototypes`; its genes are the model's genes (they must all be
        measured in every section).
    config, train_config
        :class:`cpnn.CPNNConfig`, :class:`cpnn.TrainConfig`.
    encoder
        Name of the feature encoder, or a dict (``name``, ``patch_um``, ``out_px``,
        ``tta``; ``context_rings`` and ``slide_standardise`` are applied to ``features``
        here and again by :func:`predict_spatial`); stored in the model and checked when
        it is loaded.
    composition_targets
        ``"deconvolve"`` (default), a ``(n_spots_total, K)`` array, or None.

    Returns
    -------
    cpnn.CPNN
        The trained model (``.predict``, ``.save``, ``CPNN.load``).

    Examples
    --------
    >>> model = cpnn.api.fit_spatial({"C2": c2, "C3": c3, "C4": c4}, feats, protos,
    ...                              cpnn.CPNNConfig(hidden=(256,)), cpnn.TrainConfig(max_epochs=50))
    """
    from .workflows.spatial import fit_spot_model

    samples = _as_samples(adatas, features)
    enc = {"name": encoder} if isinstance(encoder, str) else (dict(encoder) if encoder else None)
    for s in samples:  # the encoder record's spatial context, if any, is part of the model's input
        s.features = _with_context(s.features, s.adata, enc)
    return fit_spot_model(samples, prototypes, config, train_config, encoder=enc,
                          composition_targets=composition_targets)


def predict_spatial(model, adata: AnnDataLike, features: np.ndarray, *, sample_id: Optional[str] = None,
                    image_max_px: int = 2000):
    """Predict one section: an AnnData scanpy and squidpy plot directly.

    Parameters
    ----------
    model
        A trained :class:`cpnn.CPNN`.
    adata
        The section (``obsm['spatial']``; counts optional — when all model genes are
        measured they are kept in ``layers['counts']`` for comparison).
    features
        ``(n_spots, D)`` patch features made with the model's encoder (``(n_spots, k, D)``
        for a model trained on sub-patch bags); when the model was
        trained with spatial context (``model.encoder['context_rings']``), the
        neighbourhood mean is appended here exactly as in training.
    sample_id
        Library id in ``uns['spatial']`` (default: the section's sample id).
    image_max_px
        Longest side of the tissue image stored in ``uns['spatial']``.

    Returns
    -------
    anndata.AnnData
        ``X`` predicted log1p CP10k (model genes), ``obsm['cpnn_weights']``,
        ``obsm['spatial']``, ``obs['cpnn_dominant_type']``, ``varm['cpnn_prototypes']``,
        ``uns['cpnn']``, ``uns['spatial'][sample_id]`` (image + scale factors).

    Examples
    --------
    >>> pred = cpnn.api.predict_spatial(model, c6, feats_c6)
    >>> pred.obsm["cpnn_weights"].shape == (c6.n_obs, len(model.cell_types))
    True
    """
    from .workflows.spatial import prediction_anndata

    sid = sample_id or _sample_id(adata, "sample1")
    sample = _as_samples({sid: adata}, {sid: features})[0]
    rings = float((model.encoder or {}).get("context_rings", 0.0) or 0.0)
    if model.scaler is not None and (sample.features.shape[-1] != model.scaler.in_dim or rings <= 0):
        # raw patch features (slide standardisation is idempotent, so features already
        # standardised without context come out the same)
        sample.features = _with_context(sample.features, adata, model.encoder)
    return prediction_anndata(model, sample, image_max_px=image_max_px)


def _with_context(features: np.ndarray, adata, encoder: Optional[Dict[str, Any]]) -> np.ndarray:
    """Patch features standardised on their slide when ``encoder['slide_standardise']`` says
    so, plus the neighbourhood mean when ``encoder['context_rings'] > 0``."""
    from .workflows.context import context_features
    from .workflows.transforms import standardise_slide

    enc = encoder or {}
    rings = float(enc.get("context_rings", 0.0) or 0.0)
    features = standardise_slide(features, enc.get("slide_standardise") or "none")
    return context_features(features, adata.obsm["spatial"], rings)

"""Whole-slide prediction: tissue tiles -> features (cached) -> CPNN -> one AnnData per slide.

The slide is one bag: every tissue tile is used (no sampling), the bag prediction is the
slide's bulk profile and each tile gets its own expression and cell-type weights.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Iterable, Optional, Union

import numpy as np

from .._constants import MIXTURE_LAYER, SPATIAL, UNS, WEIGHTS
from .._numerics import composition_log1p
from ..errors import CPNNInputError


def _tile_settings(model, tile_px: Optional[int], target_mpp: Optional[float]):
    """Tile size and resolution: the model's patch (``patch_um`` at ``out_px``) unless given.

    A model trained on spots as bags of g x g sub-patches sees tissue at the sub-patches'
    scale, so its tiles are ``patch_um / g`` microns, each with its own cell-type mixture."""
    enc = dict(model.encoder or {})
    patch_um = float(enc.get("patch_um") or 112.0) / int(enc.get("subpatch_grid") or 1)
    out_px = int(enc.get("out_px") or 224)
    tile_px = int(tile_px or out_px)
    target_mpp = float(target_mpp or patch_um / tile_px)
    if abs(tile_px * target_mpp - patch_um) > 0.01 * patch_um:
        # a model sees tissue at one physical scale; other tiles give silently wrong maps
        raise CPNNInputError(
            f"tiles of {tile_px} px at {target_mpp:g} µm/px cover {tile_px * target_mpp:g} µm, but the model was "
            f"trained on {patch_um:g} µm patches", field="--tile-px/--target-mpp",
            fix=f"drop --tile-px/--target-mpp (default {out_px} px at {patch_um / out_px:g} µm/px), "
                f"or keep tile_px x target_mpp = {patch_um:g}")
    return tile_px, target_mpp


def slide_features(slide_path: Union[str, os.PathLike], encoder_name: str, *, mpp: Optional[float] = None,
                   tile_px: int = 224, target_mpp: float = 0.5, features_dir: Optional[os.PathLike] = None,
                   min_tissue: float = 0.25, batch_size: int = 32, num_workers: int = 1, tta: str = "none",
                   progress: bool = True):
    """Tile a slide's tissue and encode every tile; cached as ``{features_dir}/{slide}.h5``.

    Parameters
    ----------
    slide_path
        Any slide :func:`cpnn.image.open_slide` reads (svs, tiff, ndpi, jpg, ...).
    encoder_name
        Registered encoder (e.g. ``"efficientnet-lite0"``).
    mpp
        Microns per pixel at level 0 when the file does not say (else an error).
    tile_px, target_mpp
        Tile side in pixels at ``target_mpp`` µm/px.
    features_dir
        Folder of the CLAM/TRIDENT-style feature file ``{slide stem}.h5`` (default
        ``./features``); a complete cpnn file made with the same settings is reused, and
        a file from another tool (CLAM, TRIDENT) is used as it is — never overwritten —
        after checking its encoder name and patch size when it records them.

    Returns
    -------
    (FeatureFile, dict)
        The features (``coords`` = top-left level-0 px) and slide facts
        (``slide_id``, ``mpp``, ``dimensions``, ``tile_level0``, ``thumbnail``, ``scale``).
    """
    from ..encoders import create_encoder, extract_tile_features
    from ..image import open_slide, tile_size_level0

    slide_path = Path(slide_path)
    if not slide_path.exists():
        raise CPNNInputError("slide file not found", path=slide_path, field="--slide")
    slide_id = slide_path.stem
    from ..outputs import check_out_folder

    out_dir = check_out_folder(Path(features_dir) if features_dir is not None else Path("features"))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{slide_id}.h5"
    with open_slide(slide_path, mpp=mpp) as slide:
        side = float(tile_size_level0(slide, tile_px, target_mpp))
        external = _external_feature_file(path, encoder_name, tile_px * target_mpp)
        if external is not None:
            ff = external
            side = float(ff.attrs.get("patch_size_level0") or side)
        else:
            encoder = create_encoder(encoder_name)
            ff = extract_tile_features(slide, path, encoder, tile_px=tile_px, target_mpp=target_mpp,
                                       batch_size=batch_size, num_workers=num_workers, tta=tta, progress=progress,
                                       min_tissue=min_tissue)
        thumb = slide.thumbnail(2000)
        facts = {"slide_id": slide_id, "mpp": float(slide.mpp), "dimensions": tuple(slide.dimensions),
                 "tile_level0": side, "thumbnail": thumb, "scale": thumb.shape[1] / slide.dimensions[0],
                 "path": str(slide_path), "features_path": str(path), "external_features": external is not None}
    return ff, facts


def _external_feature_file(path: Path, encoder_name: str, patch_um: float):
    """A CLAM/TRIDENT file the user put there (not written by cpnn): use it, never overwrite it.

    Returns None when there is no such file (cpnn then extracts, or reuses its own file).
    """
    from ..encoders import read_feature_attrs, read_feature_file

    if not path.is_file():
        return None
    attrs = read_feature_attrs(path)
    if attrs.get("cpnn_version") is not None:
        return None  # cpnn's own cache: extract_tile_features reuses or refreshes it
    if attrs.get("encoder") and str(attrs["encoder"]) != encoder_name:
        raise CPNNInputError(f"tile features were made with '{attrs['encoder']}', the model with '{encoder_name}'",
                             path=path, field="encoder", fix="move the file away to let cpnn extract its own")
    if attrs.get("patch_um") and abs(float(attrs["patch_um"]) - patch_um) > 0.01 * patch_um:
        raise CPNNInputError(f"tile features cover {float(attrs['patch_um']):g} µm tiles, the model "
                             f"{patch_um:g} µm patches", path=path, field="patch_um",
                             fix="move the file away to let cpnn extract matching tiles")
    return read_feature_file(path)


def predict_slide(model, slide_path: Union[str, os.PathLike], mpp: Optional[float] = None,
                  tile_px: Optional[int] = None, target_mpp: Optional[float] = None,
                  out: Optional[Union[str, os.PathLike]] = None, features_dir: Optional[os.PathLike] = None,
                  min_tissue: float = 0.25, batch_size: int = 32, num_workers: int = 1,
                  chunk_patches: int = 16384, progress: bool = True):
    """Predict a whole slide: per-tile expression and weights, and the slide's bulk profile.

    Parameters
    ----------
    model
        A trained :class:`cpnn.model.CPNN` (or the path of a run folder / model file).
    slide_path
        The slide.
    mpp
        Level-0 microns per pixel when the file has none.
    tile_px, target_mpp
        Tile size; default the model's patch (``encoder['patch_um']`` at ``out_px``,
        e.g. 112 µm -> 224 px at 0.5 µm/px), so tiles look like the training patches.
    out
        Optional ``.h5ad`` path to write.
    features_dir
        Where the tile feature file is cached (default ``./features``).

    Returns
    -------
    anndata.AnnData
        One obs per tile: ``X`` per-tile log1p CP10k; ``obsm['spatial']`` tile centres
        (x, y) level-0 px; ``obsm['cpnn_weights']``; ``obs`` ``x0, y0`` (top-left),
        ``cpnn_dominant_type``; ``uns['cpnn']['bulk_prediction']`` the slide's predicted
        bulk (log1p CP10k, var order) and ``bulk_weights``; ``uns['spatial'][slide_id]``
        with a ``hires`` thumbnail, ``tissue_hires_scalef`` and ``spot_diameter_fullres``
        = tile side in level-0 px.
    """
    import anndata as ad
    import pandas as pd

    if out is not None:  # an existing folder or an unrelated file: refused before any work
        from ..outputs import check_out_file

        check_out_file(out)
    if isinstance(model, (str, os.PathLike)):
        from .fit import load_run_model

        model = load_run_model(Path(model))
    enc = dict(model.encoder or {})
    _refuse_patch_options(enc)
    tile_px, target_mpp = _tile_settings(model, tile_px, target_mpp)
    if progress:
        print(f"tiling the tissue of {Path(slide_path).name}: {tile_px} px tiles at {target_mpp:g} µm/px "
              f"(features cached in {Path(features_dir) if features_dir is not None else Path('features')})",
              flush=True)
    ff, facts = slide_features(slide_path, enc.get("name", "efficientnet-lite0"), mpp=mpp, tile_px=tile_px,
                               target_mpp=target_mpp, features_dir=features_dir, min_tissue=min_tissue,
                               batch_size=batch_size, num_workers=num_workers, tta=enc.get("tta", "none"),
                               progress=progress)
    n = len(ff.features)
    side = facts["tile_level0"]
    from .transforms import standardise_slide

    # the slide standardisation the model was trained with, on this slide's own tiles
    feats = standardise_slide(ff.features, enc.get("slide_standardise") or "none") if n else ff.features
    rings = float(enc.get("context_rings", 0.0) or 0.0)
    if rings > 0 and n > 1:  # the same neighbourhood context the model was trained with
        from .context import context_features

        feats = context_features(feats, np.asarray(ff.coords, dtype=np.float64) + side / 2.0, rings)
    elif rings > 0:
        feats = np.concatenate([feats, feats], axis=1)
    if progress:
        print(f"predicting {n} tissue tiles and the slide's bulk profile", flush=True)
    pred = model.predict(feats, bags=[0, n], chunk_patches=chunk_patches)
    coords = np.asarray(ff.coords, dtype=np.float64)
    obs = pd.DataFrame({"x0": ff.coords[:, 0].astype(np.int64), "y0": ff.coords[:, 1].astype(np.int64)},
                       index=pd.Index([f"tile{i}" for i in range(n)], name="tile"))
    obs["cpnn_dominant_type"] = pd.Categorical([model.cell_types[i] for i in pred["weights"].argmax(1)],
                                               categories=model.cell_types)
    adata = ad.AnnData(X=composition_log1p(pred["spot_expr"]).astype(np.float32), obs=obs,
                       var=pd.DataFrame(index=pd.Index(model.genes, name="gene")))
    adata.obsm[SPATIAL] = coords + side / 2.0
    adata.obsm[WEIGHTS] = pred["weights"].astype(np.float32)
    if "spot_expr_mixture" in pred:  # residual head on: X = mixture + cell-state term
        adata.layers[MIXTURE_LAYER] = composition_log1p(pred["spot_expr_mixture"]).astype(np.float32)
    sid = facts["slide_id"]
    adata.uns[UNS] = {
        "cell_types": list(model.cell_types),
        "level": "slide",
        "expression": "log1p CP10k (predicted)",
        "bulk_prediction": composition_log1p(pred["bag_expr"][0]).astype(np.float32),
        "bulk_weights": pred["bag_weights"][0].astype(np.float32),
        "slide_path": facts["path"],
        "n_tiles": int(n),
        "tile_px": int(tile_px),
        "target_mpp": float(target_mpp),
        "encoder": {k: v for k, v in enc.items() if v is not None and not isinstance(v, dict)},
    }
    adata.uns["spatial"] = {sid: {
        "images": {"hires": facts["thumbnail"]},
        "scalefactors": {"tissue_hires_scalef": float(facts["scale"]), "tissue_lowres_scalef": float(facts["scale"]),
                         "spot_diameter_fullres": float(side), "microns_per_pixel": facts["mpp"]},
        "metadata": {"source": "cpnn predict-slide"},
    }}
    if out is not None:
        from ..utils import atomic_path

        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(out, suffix=".h5ad") as tmp:
            adata.write_h5ad(tmp)
    return adata


def _refuse_patch_options(enc: Dict) -> None:
    """Whole-slide tiles are encoded without stain normalisation or nucleus features: a
    model trained with either would get features unlike its training ones."""
    used = [f"{flag} {value}" for flag, value, off in (
        ("--stain-norm", enc.get("stain_norm") or "none", "none"), ("--nuclei", bool(enc.get("nuclei")), False))
        if value != off]
    if used:
        raise CPNNInputError(
            f"whole-slide prediction does not support models trained with {' and '.join(used)}",
            field="--slide", fix="predict the slide's spots (cpnn predict RUN --h5ad/--visium ...), or train "
                                 "without these options for whole-slide maps")


def predict_bag_streaming(model, chunks: Iterable[np.ndarray]) -> Dict[str, np.ndarray]:
    """Bulk prediction of one bag read chunk by chunk (memory does not grow with the bag).

    Every ensemble member sees every chunk, and the members' outputs are averaged, exactly
    as :meth:`cpnn.model.CPNN.predict` does (same :class:`cpnn.module.network.BagAccumulator`).

    Parameters
    ----------
    model
        A trained :class:`cpnn.model.CPNN`.
    chunks
        Iterable of ``(n_i, D)`` raw (unscaled) feature arrays, e.g. slices of an HDF5
        ``features`` dataset.

    Returns
    -------
    dict
        ``bag_expr`` (G,) composition and ``bag_weights`` (K,) — equal to
        ``model.predict(features, bags=[0, N])``'s bag outputs — and ``n_tiles``.
    """
    import torch

    from ..module.network import BagAccumulator

    model._check_fitted()
    enc = dict(model.encoder or {})
    _refuse_patch_options(enc)
    if (enc.get("slide_standardise") or "none") != "none":
        # chunk by chunk, the slide's own statistics are unknown until the end
        raise CPNNInputError("streaming bag prediction does not support per-slide standardisation",
                             field="slide_standardise",
                             fix="use model.predict(standardise_slide(features, mode), bags=[0, n]) or predict_slide")
    for m in model.modules:
        m.eval()
    device = model.train_config.device
    acc = BagAccumulator(model.modules, 1)
    # an active residual head corrects every tile's expression; the bag is then the mean
    # of the corrected tiles (as CPNN.predict), so those tiles' maps are needed chunk by chunk
    residual = model.residual if model.residual is not None and model.residual.active else None
    corrected = np.zeros(model.n_genes, dtype=np.float64)
    for chunk in chunks:
        raw = np.asarray(chunk, dtype=np.float32)
        if raw.ndim != 2 or raw.shape[1] != model.scaler.in_dim:
            raise CPNNInputError(f"feature chunk has shape {raw.shape}; the model expects (n, "
                                 f"{model.scaler.in_dim})", field="features",
                                 fix="extract features with the encoder the model was trained with")
        if not len(raw):
            continue
        scaled = model.scaler.transform(raw)
        res = acc.add(torch.from_numpy(scaled).to(device), torch.zeros(len(raw), dtype=torch.int64),
                      patch_outputs=residual is not None)
        if residual is not None:
            spot = residual.correct(res[1].cpu().numpy(), scaled)
            corrected += spot.astype(np.float64).sum(0)
    n = acc.n_patches
    if n == 0:
        raise CPNNInputError("the bag has no tiles", field="features")
    bag = acc.finish()
    expr = bag["bag_expr"][0].numpy() if residual is None else corrected / corrected.sum()
    return {"bag_expr": expr.astype(np.float32), "bag_weights": bag["bag_weights"][0].float().numpy(),
            "n_tiles": n}


def iter_feature_file(path: Union[str, os.PathLike], chunk: int = 16384):
    """Yield ``features`` of a CLAM/TRIDENT HDF5 file in row chunks (never all at once)."""
    import h5py

    path = Path(path)
    try:
        fh = h5py.File(path, "r")
    except OSError as exc:
        raise CPNNInputError(f"not a readable HDF5 feature file ({exc})", path=path) from exc
    with fh:
        if "features" not in fh:
            raise CPNNInputError("no 'features' dataset", path=path, field="features")
        ds = fh["features"]
        for s in range(0, ds.shape[0], chunk):
            yield ds[s:s + chunk]

"""Pseudo-bulk from spatial data: regions of neighbouring spots as slide-level samples.

A section's spots are cut into square blocks of ``block_spots x block_spots`` spot
pitches (a fixed grid in microns anchored at the section's top-left spot, so regions do
not depend on which other sections are present). A region's bulk profile is the sum of
its spots' raw counts; its bag is the patch features of its spots.

Bag choice: the bag holds the spot patches themselves (112 µm around each spot centre),
not a dense tile grid over the region. Those patches cover exactly the tissue whose RNA
was measured; tissue between legacy-ST spots (100 µm spots, 200 µm apart) contributed
no counts, so tiling it would add image content the target never saw. It also reuses the
cached spot features (no extra extraction).

``fit_bulk_model`` trains CPNN on region bags only (no spot-level target is seen), which
is what ``cpnn fit --level bulk`` runs; its ``predict`` on spot features then gives
spot-level maps, so ``cpnn predict`` works unchanged on held-out sections.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from .._constants import SPATIAL, UNS_INPUT
from ..errors import CPNNInputError



@dataclass
class Regions:
    """A partition of one section's spots into regions.

    Attributes
    ----------
    labels
        ``(n_obs,)`` int region index of each spot, ``-1`` for spots left out (regions
        with fewer than ``min_spots`` spots).
    names
        Region names ``{sample}_r{row}c{col}`` (block row / column), one per region.
    members
        Spot row indices of each region (sorted).
    block_um
        Side of a block in microns.
    """

    labels: np.ndarray
    names: List[str]
    members: List[np.ndarray]
    block_um: float
    info: Dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.names)


def spot_pitch_um(adata) -> float:
    """Centre-to-centre spot distance in microns.

    The reader's ``inter_spot_distance_um`` when recorded, else the median distance of
    each spot to its 4 nearest neighbours (square and hexagonal grids) times the image's
    microns per pixel.
    """
    info = dict(adata.uns.get(UNS_INPUT, {}))
    if info.get("inter_spot_distance_um"):
        return float(info["inter_spot_distance_um"])
    mpp = info.get("mpp")
    if not mpp:
        raise CPNNInputError("cannot size regions in microns: the data has no microns per pixel",
                             field=f"uns['{UNS_INPUT}']['mpp']", fix="pass --mpp (mpp= in Python)")
    xy = np.asarray(adata.obsm[SPATIAL], dtype=np.float64)
    if len(xy) < 2:
        raise CPNNInputError("need at least two spots to measure the spot pitch", field="obsm['spatial']")
    from scipy.spatial import cKDTree

    # the 4 nearest neighbours, not only the nearest: with noisy centres the minimum
    # distance is biased low (~10 % at a jitter of 8 % of the pitch)
    k = min(5, len(xy))
    d, _ = cKDTree(xy).query(xy, k=k)
    return float(np.median(d[:, 1:]) * float(mpp))


def make_regions(adata, block_spots: int = 3, min_spots: int = 1, pitch_um: Optional[float] = None,
                 sample_id: Optional[str] = None) -> Regions:
    """Cut a section's spots into square blocks of neighbouring spots.

    Parameters
    ----------
    adata
        One section (``obsm['spatial']`` in full-resolution pixels and
        ``uns['cpnn_input']['mpp']``).
    block_spots
        Block side in spot pitches (3 -> blocks of up to 3 x 3 legacy-ST spots, 600 µm).
    min_spots
        Regions with fewer spots are dropped (their spots get label -1).
    pitch_um
        Spot pitch in microns; default :func:`spot_pitch_um`.
    sample_id
        Prefix of the region names; default the section id.

    Returns
    -------
    Regions
        Every spot belongs to exactly one block; blocks are numbered row-major.
    """
    if int(block_spots) < 1:
        raise CPNNInputError(f"block_spots must be >= 1, got {block_spots}", field="block_spots")
    info = dict(adata.uns.get(UNS_INPUT, {}))
    mpp = info.get("mpp")
    if not mpp:
        raise CPNNInputError("the data has no microns per pixel", field=f"uns['{UNS_INPUT}']['mpp']",
                             fix="pass --mpp (mpp= in Python)")
    pitch = float(pitch_um) if pitch_um else spot_pitch_um(adata)
    block_um = int(block_spots) * pitch
    xy_um = np.asarray(adata.obsm[SPATIAL], dtype=np.float64) * float(mpp)
    # block edges sit half a pitch before the spot lattice, whose phase is the median over
    # all spots (not the first spot's: centres are off by tens of pixels on HER2ST), so
    # that position noise never moves a spot across an edge
    c0 = xy_um.min(axis=0)
    phase = np.median(xy_um - pitch * np.round((xy_um - c0) / pitch), axis=0)
    cell = np.floor((xy_um - (phase - 0.5 * pitch)) / block_um).astype(np.int64)
    cell -= cell.min(axis=0)
    key = cell[:, 1] * (int(cell[:, 0].max()) + 1) + cell[:, 0]  # row-major: y then x
    uniq, inverse, counts = np.unique(key, return_inverse=True, return_counts=True)
    keep = counts >= int(min_spots)
    new_index = np.full(len(uniq), -1, dtype=np.int64)
    new_index[keep] = np.arange(int(keep.sum()))
    labels = new_index[inverse]
    sid = sample_id or str(info.get("sample_id") or "sample")
    ncol = int(cell[:, 0].max()) + 1
    names = [f"{sid}_r{int(k) // ncol}c{int(k) % ncol}" for k in uniq[keep]]
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(len(names) + 1))
    members = [np.sort(order[bounds[i]:bounds[i + 1]]) for i in range(len(names))]
    return Regions(labels, names, members, block_um,
                   {"block_spots": int(block_spots), "pitch_um": pitch, "min_spots": int(min_spots),
                    "n_spots_dropped": int((labels < 0).sum())})


@dataclass
class RegionBags:
    """Region bags of several sections, ready for slide-level training."""

    bags: List[np.ndarray]  # (n_spots_r, D) features per region
    counts: np.ndarray  # (R, G) summed raw counts
    names: List[str]
    sections: np.ndarray  # (R,) section of each region
    members: List[np.ndarray]  # spot rows (within the section) of each region
    genes: List[str]


def region_bags(samples: Sequence[Any], genes: Sequence[str], block_spots: int = 3, min_spots: int = 1,
                require_features: bool = True) -> RegionBags:
    """Regions of every sample, their summed counts and their bags of spot features.

    Parameters
    ----------
    samples
        :class:`cpnn.workflows.spatial.SpatialSample` objects (``.adata``, ``.features``
        aligned to the spots, ``.sample_id``).
    genes
        Genes of the bulk profiles, in this order.
    block_spots, min_spots
        See :func:`make_regions`.
    """
    from .spatial import counts_matrix

    bags, counts, names, sections, members = [], [], [], [], []
    for s in samples:
        if require_features:
            if s.features is None or len(s.features) != s.adata.n_obs:
                raise CPNNInputError(f"sample {s.sample_id} has no features aligned to its {s.adata.n_obs} spots",
                                     field="features", fix="attach spot features first (attach_features)")
        reg = make_regions(s.adata, block_spots=block_spots, min_spots=min_spots, sample_id=s.sample_id)
        y = counts_matrix(s.adata, list(genes))
        # (R, n) indicator @ (n, G): every region's sum in one product
        onehot = np.zeros((len(reg), s.adata.n_obs), dtype=np.float32)
        ok = reg.labels >= 0
        onehot[reg.labels[ok], np.flatnonzero(ok)] = 1.0
        counts.append(onehot @ y)
        for m in reg.members:
            if require_features:
                # sub-patch features (n, k, D): the region's bag holds all their sub-patches
                f = np.asarray(s.features[m], dtype=np.float32)
                bags.append(f.reshape(-1, f.shape[-1]))
        names += reg.names
        sections += [s.sample_id] * len(reg)
        members += reg.members
    return RegionBags(bags, np.concatenate(counts), names, np.asarray(sections), members, list(genes))


def fit_bulk_model(samples: Sequence[Any], prototypes, opts, progress: bool = True, block_spots: int = 3,
                   min_spots: int = 2):
    """Train CPNN on pseudo-bulk region bags of ``samples`` (``cpnn fit --level bulk``).

    Parameters
    ----------
    samples
        Training sections with spot features attached.
    prototypes
        :class:`cpnn.prototypes.Prototypes` (defines genes and cell types).
    opts
        :class:`cpnn.workflows.fit.FitOptions`. Its ``model`` / ``train`` settings are
        used as given (``FitOptions(level="bulk")`` starts from the ``bulk`` preset of
        :mod:`cpnn.presets`: 8 regions a step). ``block_spots`` / ``min_spots`` are read from ``opts.pseudobulk``
        (a dict) when ``FitOptions`` has that attribute, else from the keywords.
    progress
        Show a progress bar.

    Returns
    -------
    cpnn.model.CPNN
        Trained on region bags only; ``model.encoder['level'] == 'bulk'`` and
        ``model.encoder['training']`` describe the regions.
    """
    from ..config import TrainConfig, config_from_dict
    from ..model import CPNN

    extra = dict(getattr(opts, "pseudobulk", None) or {})
    block_spots = int(extra.get("block_spots", block_spots))
    min_spots = int(extra.get("min_spots", min_spots))
    genes = list(prototypes.genes)
    rb = region_bags(samples, genes, block_spots=block_spots, min_spots=min_spots)
    keep = rb.counts.sum(1) > 0
    if keep.sum() < 4:
        raise CPNNInputError(f"only {int(keep.sum())} non-empty regions to train on", field="--sections",
                             fix="give more (or larger) training sections, or a smaller block size")
    tc = config_from_dict(TrainConfig, {**opts.train, "progress": progress})
    encoder = dict(opts.features.as_dict())
    encoder["level"] = "bulk"
    encoder["training"] = {
        "trained_on": "pseudo-bulk regions (sum of spot counts; bag = spot patches)",
        "block_spots": block_spots, "min_spots": min_spots, "n_regions": int(keep.sum()),
        "sections": sorted({str(s) for s in rb.sections}),
    }
    model = CPNN(prototypes, opts.model_config(), tc, encoder=encoder)
    idx = np.flatnonzero(keep)
    model.fit([rb.bags[i] for i in idx], rb.counts[idx], groups=rb.sections[idx], composition_targets="deconvolve")
    model.prototype_provenance["trained_level"] = "bulk"
    return model

"""The CPNN network (method §3, docs/ARCHITECTURE.md), vectorised over bags of different sizes."""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..config import CPNNConfig


def make_mlp(in_dim: int, hidden: Sequence[int], out_dim: int, dropout: float = 0.0) -> nn.Sequential:
    """``in_dim -> hidden... -> out_dim`` with GELU and optional dropout."""
    layers = []
    width = in_dim
    for h in hidden:
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        layers += [nn.Linear(width, h), nn.GELU()]
        width = h
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(width, out_dim))
    return nn.Sequential(*layers)


def segment_mean(values: torch.Tensor, segment: torch.Tensor, n_segments: int) -> torch.Tensor:
    """Mean of the rows of ``values`` per segment id, in one vectorised pass.

    Parameters
    ----------
    values
        ``(N, G)`` rows to average.
    segment
        ``(N,)`` int64 segment (bag) id of each row, in ``[0, n_segments)``.
    n_segments
        Number of segments ``B``.

    Returns
    -------
    torch.Tensor
        ``(B, G)``; a segment without rows gets zeros.
    """
    sums = values.new_zeros((n_segments, values.shape[1])).index_add_(0, segment, values)
    counts = torch.bincount(segment, minlength=n_segments).clamp_min(1).to(values.dtype)
    return sums / counts[:, None]


class CPNNModule(nn.Module):
    """Patch features -> cell-type weights -> expression through prototypes.

    ``p_i = softmax(MLP(f_i))``, ``e_i = p_i @ exp(T)`` (or ``softmax_genes(T)``), with
    optional gene factors ``exp(a_g) * e_i + exp(b_g)``; a spot's prediction is its
    normalised ``e_i``, a bag's the normalised mean of its patches' ``e_i``.

    Parameters
    ----------
    in_dim
        Feature dimension ``D``.
    log_prototypes
        ``(K, G)`` log of the initial prototypes ``T0``.
    config
        Architecture options.
    log_platform_factor
        Optional ``(G,)`` initial ``a_g`` (e.g. ``log m_g`` from deconvolution).
    """

    def __init__(
        self,
        in_dim: int,
        log_prototypes: torch.Tensor,
        config: Optional[CPNNConfig] = None,
        log_platform_factor: Optional[torch.Tensor] = None,
    ) -> None:
        super().__init__()
        self.config = config or CPNNConfig()
        log_prototypes = torch.as_tensor(log_prototypes, dtype=torch.float32)
        if log_prototypes.ndim != 2:
            raise ValueError(f"log_prototypes must be K x G, got shape {tuple(log_prototypes.shape)}")
        if not torch.isfinite(log_prototypes).all():
            raise ValueError("log_prototypes contains NaN or infinite values (zero prototypes? add a pseudo-count)")
        n_types, n_genes = log_prototypes.shape
        self.in_dim, self.n_types, self.n_genes = int(in_dim), int(n_types), int(n_genes)
        self.mlp = make_mlp(in_dim, self.config.hidden, n_types, self.config.dropout)
        # the template regulariser pulls towards the initial prototypes, kept as a buffer
        self.register_buffer("log_prototypes_init", log_prototypes.clone())
        if self.config.learn_prototypes:
            self.log_prototypes = nn.Parameter(log_prototypes.clone())
        else:
            self.register_buffer("log_prototypes", log_prototypes.clone())
        a0 = torch.zeros(n_genes) if log_platform_factor is None else torch.as_tensor(
            log_platform_factor, dtype=torch.float32
        ).clone()
        if self.config.gene_factors:
            self.gene_scale = nn.Parameter(a0)
            self.gene_offset = nn.Parameter(torch.full((n_genes,), math.log(1e-10)))
        # learnable gene-wise NB dispersion (log inverse-dispersion, theta = exp)
        self.log_theta = nn.Parameter(torch.full((n_genes,), math.log(10.0)))
        # per-type weights of the composition loss (training only, so not saved)
        self.register_buffer("composition_type_weights", torch.ones(n_types), persistent=False)

    def prototype_expression(self) -> torch.Tensor:
        """``(K, G)`` per-type expression used in the forward pass."""
        if self.config.normalise_prototypes:
            return torch.softmax(self.log_prototypes, dim=1)
        return torch.exp(self.log_prototypes)

    def weights(self, features: torch.Tensor) -> torch.Tensor:
        """``(N, K)`` cell-type weights of each patch (rows sum to 1)."""
        return torch.softmax(self.mlp(features), dim=1)

    def _apply_gene_factors(self, expr: torch.Tensor) -> torch.Tensor:
        if not self.config.gene_factors:
            return expr
        return torch.exp(self.gene_scale) * expr + torch.exp(self.gene_offset)

    def bag_expression(self, bag_weights: torch.Tensor) -> torch.Tensor:
        """``(B, G)`` bag compositions from the bags' mean weights ``(B, K)``.

        The head is linear in the weights, so the mean over a bag's patches of
        ``exp(a) * (p_i E) + exp(b)`` is ``exp(a) * ((mean_i p_i) E) + exp(b)``: a bag never
        needs its patches' expression (patches x genes), only its mean weights.
        """
        raw = self._apply_gene_factors(bag_weights @ self.prototype_expression().to(bag_weights.dtype))
        return raw / raw.sum(dim=1, keepdim=True).clamp_min(1e-30)

    def patch_expression(self, weights: torch.Tensor) -> torch.Tensor:
        """``(N, G)`` per-patch compositions (the maps); only prediction asks for them."""
        e = self._apply_gene_factors(weights @ self.prototype_expression())
        return e / e.sum(dim=1, keepdim=True)

    def forward(
        self,
        features: torch.Tensor,
        bag_index: Optional[torch.Tensor] = None,
        n_bags: Optional[int] = None,
        patch_outputs: bool = False,
    ) -> Dict[str, torch.Tensor]:
        """Run the network.

        Parameters
        ----------
        features
            ``(N, D)`` patch features (already scaled).
        bag_index
            ``(N,)`` bag id of every patch; ``None`` means every patch is its own bag.
        n_bags
            Number of bags (defaults to ``bag_index.max() + 1``).
        patch_outputs
            Also return ``spot_expr`` (N, G), every patch's expression; training and
            validation never need it (see :meth:`bag_expression`).

        Returns
        -------
        dict
            ``weights`` (N, K), ``bag_weights`` (B, K) — the mean patch weights per bag —
            and ``bag_expr`` (B, G), a composition over genes (rows sum to 1); with
            ``patch_outputs`` (or without ``bag_index``) also ``spot_expr`` (N, G).
        """
        weights = self.weights(features)
        if bag_index is None:
            bag_weights = weights
        else:
            if n_bags is None:
                n_bags = int(bag_index.max().item()) + 1
            bag_weights = segment_mean(weights, bag_index, n_bags)
        out = {"weights": weights, "bag_weights": bag_weights, "bag_expr": self.bag_expression(bag_weights)}
        if bag_index is None:
            out["spot_expr"] = out["bag_expr"]
        elif patch_outputs:
            out["spot_expr"] = self.patch_expression(weights)
        return out

    def template_penalty(self) -> torch.Tensor:
        """MSE between ``softmax_genes(T)`` and ``softmax_genes(log T0)`` (method §4, docs/ARCHITECTURE.md)."""
        if not self.config.learn_prototypes:
            return self.log_prototypes.new_zeros(())
        current = torch.softmax(self.log_prototypes, dim=1)
        initial = torch.softmax(self.log_prototypes_init, dim=1)
        return torch.mean((current - initial) ** 2)


class BagAccumulator:
    """Bag outputs of an ensemble from patches seen chunk by chunk.

    Memory is ``members x bags x types`` (the weight sums), whatever the bag sizes: the
    bag expression comes from the mean weights at :meth:`finish` (see
    :meth:`CPNNModule.bag_expression`). Members' compositions and weights are averaged,
    as :meth:`cpnn.model.CPNN.predict` does.

    Parameters
    ----------
    modules
        The ensemble members (one or more :class:`CPNNModule`), in eval mode.
    n_bags
        Number of bags ``B``.
    """

    def __init__(self, modules: Sequence[CPNNModule], n_bags: int) -> None:
        self.modules = list(modules)
        if not self.modules:
            raise ValueError("BagAccumulator needs at least one module")
        self.n_bags = int(n_bags)
        self._wsum = [torch.zeros((self.n_bags, m.n_types), dtype=torch.float64) for m in self.modules]
        self._count = torch.zeros(self.n_bags, dtype=torch.float64)

    @property
    def n_patches(self) -> int:
        return int(self._count.sum().item())

    @torch.no_grad()
    def add(self, features: torch.Tensor, segment: torch.Tensor, patch_outputs: bool = False):
        """Add ``(n, D)`` scaled features of patches in bags ``segment`` ``(n,)``.

        Returns
        -------
        None, or with ``patch_outputs`` the chunk's member-averaged ``(weights (n, K),
        spot_expr (n, G))`` as float32 tensors on the modules' device.
        """
        seg = segment.detach().to("cpu", torch.int64)
        self._count.index_add_(0, seg, torch.ones(len(seg), dtype=torch.float64))
        w_mean = e_mean = None
        for m, wsum in zip(self.modules, self._wsum):
            w = m.weights(features)
            wsum.index_add_(0, seg, w.detach().double().cpu())
            if patch_outputs:
                e = m.patch_expression(w)
                w_mean = w if w_mean is None else w_mean + w
                e_mean = e if e_mean is None else e_mean + e
        if not patch_outputs:
            return None
        if len(self.modules) > 1:
            w_mean, e_mean = w_mean / len(self.modules), e_mean / len(self.modules)
        return w_mean, e_mean

    @torch.no_grad()
    def finish(self) -> Dict[str, torch.Tensor]:
        """``bag_expr`` (B, G) and ``bag_weights`` (B, K), float64 on the CPU, member means."""
        count = self._count.clamp_min(1.0)[:, None]
        expr = weights = None
        for m, wsum in zip(self.modules, self._wsum):
            mean_w = wsum / count
            dev = m.log_prototypes.device
            e = m.bag_expression(mean_w.to(dev, torch.float32 if dev.type == "mps" else torch.float64))
            e = e.double().cpu()
            expr = e if expr is None else expr + e
            weights = mean_w if weights is None else weights + mean_w
        n = len(self.modules)
        return {"bag_expr": expr / n, "bag_weights": weights / n}


@torch.no_grad()
def predict_bag_outputs(
    modules: Sequence[CPNNModule],
    features: np.ndarray,
    offsets: np.ndarray,
    chunk_patches: int = 16384,
    device: str = "cpu",
    return_patch_outputs: bool = True,
) -> Dict[str, np.ndarray]:
    """Deterministic ensemble prediction on every patch of every bag, in bounded chunks.

    Parameters
    ----------
    modules
        Ensemble members (a list of one for a single network).
    features
        ``(N, D)`` scaled features, bag after bag.
    offsets
        ``(B + 1,)`` bag offsets into ``features``.
    chunk_patches
        Patches per forward chunk.
    return_patch_outputs
        Also return the per-patch maps ``weights`` (N, K) and ``spot_expr`` (N, G).

    Returns
    -------
    dict
        ``bag_expr`` (B, G) and ``bag_weights`` (B, K) float32; optionally the patch maps.
    """
    for m in modules:
        m.eval()
    offsets = np.asarray(offsets, dtype=np.int64)
    n_patches, n_bags = int(offsets[-1]), len(offsets) - 1
    bag_of_patch = np.repeat(np.arange(n_bags), np.diff(offsets))
    acc = BagAccumulator(modules, n_bags)
    if return_patch_outputs:
        patch_w = np.empty((n_patches, modules[0].n_types), dtype=np.float32)
        patch_e = np.empty((n_patches, modules[0].n_genes), dtype=np.float32)
    for start in range(0, n_patches, chunk_patches):
        stop = min(start + chunk_patches, n_patches)
        x = torch.from_numpy(np.asarray(features[start:stop], dtype=np.float32)).to(device)
        res = acc.add(x, torch.from_numpy(bag_of_patch[start:stop]), patch_outputs=return_patch_outputs)
        if return_patch_outputs:
            patch_w[start:stop] = res[0].cpu().numpy()
            patch_e[start:stop] = res[1].cpu().numpy()
    bag = acc.finish()
    out = {"bag_expr": bag["bag_expr"].float().numpy(), "bag_weights": bag["bag_weights"].float().numpy()}
    if return_patch_outputs:
        out["weights"], out["spot_expr"] = patch_w, patch_e
    return out

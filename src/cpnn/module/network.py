"""The CPNN network (METHOD.md §3), vectorised over bags of different sizes."""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence

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

    def forward(
        self,
        features: torch.Tensor,
        bag_index: Optional[torch.Tensor] = None,
        n_bags: Optional[int] = None,
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

        Returns
        -------
        dict
            ``weights`` (N, K), ``spot_expr`` (N, G) and ``bag_expr`` (B, G) — both
            compositions over genes (rows sum to 1) — and ``bag_weights`` (B, K), the
            mean patch weights per bag.
        """
        weights = self.weights(features)
        patch_expr = self._apply_gene_factors(weights @ self.prototype_expression())
        spot_expr = patch_expr / patch_expr.sum(dim=1, keepdim=True)
        if bag_index is None:
            bag_expr, bag_weights = spot_expr, weights
        else:
            if n_bags is None:
                n_bags = int(bag_index.max().item()) + 1
            bag_raw = segment_mean(patch_expr, bag_index, n_bags)
            bag_expr = bag_raw / bag_raw.sum(dim=1, keepdim=True).clamp_min(1e-30)
            bag_weights = segment_mean(weights, bag_index, n_bags)
        return {"weights": weights, "spot_expr": spot_expr, "bag_expr": bag_expr, "bag_weights": bag_weights}

    def template_penalty(self) -> torch.Tensor:
        """MSE between ``softmax_genes(T)`` and ``softmax_genes(log T0)`` (METHOD.md §4)."""
        if not self.config.learn_prototypes:
            return self.log_prototypes.new_zeros(())
        current = torch.softmax(self.log_prototypes, dim=1)
        initial = torch.softmax(self.log_prototypes_init, dim=1)
        return torch.mean((current - initial) ** 2)

"""Slide-level (bag) regression baselines, tensors only.

Every module maps a bag of patch features to one expression vector per bag, on the
log1p CP10k scale, so that all of them (and CPNN) are scored on the same target:

- :class:`MeanPoolMLP` — mean of the bag's features, then an MLP.
- :class:`ABMIL` — gated attention pooling (Ilse, Tomczak & Welling 2018) and a linear head.
- :class:`HE2RNA` — a per-tile MLP gives per-gene scores; each gene is pooled over its
  top-``k`` tiles (Schmauch et al. 2020). ``k`` is drawn from ``ks`` in training; the
  prediction is the mean over all ``ks`` (deterministic).
- :class:`SumOfTiles` — CPNN without prototypes: a per-tile non-negative expression
  head (softplus, no softmax over cell types) averaged over the bag and normalised to a
  composition. The ablation that shows what the prototype bottleneck adds.

Each module has ``forward(features, bag_index, n_bags) -> (B, G)`` for vectorised
training over several bags, and a streaming form (``stream_init``, ``stream_update``,
``stream_finish``) that predicts one bag of any size chunk by chunk, in constant memory,
with the same result as ``forward``.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Sequence

import torch
from torch import nn

from .._numerics import log1p_cp10k_torch
from .network import make_mlp, segment_mean


def segment_softmax(logits: torch.Tensor, segment: torch.Tensor, n_segments: int) -> torch.Tensor:
    """Softmax of ``logits`` (N,) within each segment (bag)."""
    seg_max = torch.full((n_segments,), -math.inf, dtype=logits.dtype, device=logits.device)
    seg_max = seg_max.scatter_reduce(0, segment, logits, reduce="amax", include_self=True)
    e = torch.exp(logits - seg_max[segment])
    denom = torch.zeros(n_segments, dtype=logits.dtype, device=logits.device).index_add_(0, segment, e)
    return e / denom[segment]


def segment_topk_mean(scores: torch.Tensor, segment: torch.Tensor, n_segments: int, k: int) -> torch.Tensor:
    """Per segment and per column, the mean of the ``min(k, n_b)`` largest values.

    ``scores`` (N, G) -> (B, G). Bags are padded to the largest one with ``-inf`` so that
    one ``torch.topk`` call serves every bag.
    """
    sizes = torch.bincount(segment, minlength=n_segments)
    order = torch.argsort(segment, stable=True)
    seg_sorted = segment[order]
    starts = torch.cumsum(sizes, 0) - sizes
    pos = torch.arange(len(segment), device=scores.device) - starts[seg_sorted]
    width = int(sizes.max().item()) if len(segment) else 1
    padded = scores.new_full((n_segments, width, scores.shape[1]), -math.inf)
    padded[seg_sorted, pos] = scores[order]
    kk = max(1, min(int(k), width))
    top = torch.topk(padded, kk, dim=1).values  # (B, kk, G), -inf where a bag is short
    keff = sizes.clamp(min=1, max=kk).to(scores.dtype)
    valid = torch.arange(kk, device=scores.device)[None, :] < keff[:, None]
    top = torch.where(valid[:, :, None], top, torch.zeros_like(top))
    return top.sum(dim=1) / keff[:, None]


class _BagRegressor(nn.Module):
    """Shared pieces: an output bias initialised at the training targets' mean."""

    n_genes: int

    def set_output_bias(self, mean_target: torch.Tensor) -> None:
        """Start the head at the mean training target (faster, stabler regression)."""
        last = self.head[-1] if isinstance(self.head, nn.Sequential) else self.head
        with torch.no_grad():
            last.bias.copy_(torch.as_tensor(mean_target, dtype=last.bias.dtype))


class MeanPoolMLP(_BagRegressor):
    """``MLP(mean_i f_i)`` -> (B, G)."""

    def __init__(self, in_dim: int, n_genes: int, hidden: Sequence[int] = (256,), dropout: float = 0.25) -> None:
        super().__init__()
        self.in_dim, self.n_genes = int(in_dim), int(n_genes)
        self.head = make_mlp(in_dim, hidden, n_genes, dropout)

    def forward(self, features: torch.Tensor, bag_index: torch.Tensor, n_bags: int) -> torch.Tensor:
        return self.head(segment_mean(features, bag_index, n_bags))

    def stream_init(self) -> Dict[str, Any]:
        return {"sum": torch.zeros(self.in_dim, dtype=torch.float64), "n": 0}

    def stream_update(self, state: Dict[str, Any], x: torch.Tensor) -> None:
        state["sum"] += x.double().sum(0)
        state["n"] += len(x)

    def stream_finish(self, state: Dict[str, Any]) -> torch.Tensor:
        return self.head((state["sum"] / max(state["n"], 1)).float()[None])[0]


class ABMIL(_BagRegressor):
    """Gated attention MIL: ``h = ReLU(W f)``, ``a = softmax_bag(w^T (tanh(V h) * sigm(U h)))``,
    ``z = sum_i a_i h_i``, output ``head(z)``."""

    def __init__(self, in_dim: int, n_genes: int, embed_dim: int = 256, attn_dim: int = 128,
                 dropout: float = 0.25) -> None:
        super().__init__()
        self.in_dim, self.n_genes, self.embed_dim = int(in_dim), int(n_genes), int(embed_dim)
        self.embed = nn.Sequential(nn.Dropout(dropout), nn.Linear(in_dim, embed_dim), nn.ReLU())
        self.attn_v = nn.Linear(embed_dim, attn_dim)
        self.attn_u = nn.Linear(embed_dim, attn_dim)
        self.attn_w = nn.Linear(attn_dim, 1)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(embed_dim, n_genes))

    def _embed_attend(self, features: torch.Tensor):
        h = self.embed(features)
        logits = self.attn_w(torch.tanh(self.attn_v(h)) * torch.sigmoid(self.attn_u(h)))[:, 0]
        return h, logits

    def attention(self, features: torch.Tensor, bag_index: torch.Tensor, n_bags: int) -> torch.Tensor:
        """``(N,)`` attention weights (sum to 1 within each bag)."""
        _, logits = self._embed_attend(features)
        return segment_softmax(logits, bag_index, n_bags)

    def forward(self, features: torch.Tensor, bag_index: torch.Tensor, n_bags: int) -> torch.Tensor:
        h, logits = self._embed_attend(features)
        a = segment_softmax(logits, bag_index, n_bags)
        z = h.new_zeros((n_bags, h.shape[1])).index_add_(0, bag_index, a[:, None] * h)
        return self.head(z)

    # online softmax: running max m, running sum s = sum exp(l - m), z = sum exp(l - m) h
    def stream_init(self) -> Dict[str, Any]:
        return {"m": -math.inf, "s": torch.zeros((), dtype=torch.float64),
                "z": torch.zeros(self.embed_dim, dtype=torch.float64)}

    def stream_update(self, state: Dict[str, Any], x: torch.Tensor) -> None:
        h, logits = self._embed_attend(x)
        h, logits = h.double(), logits.double()
        m_new = max(state["m"], float(logits.max()))
        rescale = math.exp(state["m"] - m_new) if math.isfinite(state["m"]) else 0.0
        e = torch.exp(logits - m_new)
        state["s"] = state["s"] * rescale + e.sum()
        state["z"] = state["z"] * rescale + (e[:, None] * h).sum(0)
        state["m"] = m_new

    def stream_finish(self, state: Dict[str, Any]) -> torch.Tensor:
        return self.head((state["z"] / state["s"]).float()[None])[0]


class HE2RNA(_BagRegressor):
    """Per-tile MLP scores (N, G); per gene, mean of the bag's top-``k`` tiles."""

    def __init__(self, in_dim: int, n_genes: int, hidden: Sequence[int] = (256,), dropout: float = 0.25,
                 ks: Sequence[int] = (1, 2, 5, 10, 20, 50, 100)) -> None:
        super().__init__()
        self.in_dim, self.n_genes = int(in_dim), int(n_genes)
        self.ks = tuple(int(k) for k in ks)
        if not self.ks or min(self.ks) < 1:
            raise ValueError(f"ks must be positive integers, got {ks}")
        self.head = make_mlp(in_dim, hidden, n_genes, dropout)
        self.train_k: Optional[int] = None  # set by the trainer each step

    def forward(self, features: torch.Tensor, bag_index: torch.Tensor, n_bags: int) -> torch.Tensor:
        scores = self.head(features)
        if self.training and self.train_k is not None:
            return segment_topk_mean(scores, bag_index, n_bags, self.train_k)
        return torch.stack([segment_topk_mean(scores, bag_index, n_bags, k) for k in self.ks]).mean(0)

    def stream_init(self) -> Dict[str, Any]:
        return {"top": None, "kmax": max(self.ks)}

    def stream_update(self, state: Dict[str, Any], x: torch.Tensor) -> None:
        scores = self.head(x)
        both = scores if state["top"] is None else torch.cat([state["top"], scores])
        state["top"] = torch.topk(both, min(state["kmax"], len(both)), dim=0).values

    def stream_finish(self, state: Dict[str, Any]) -> torch.Tensor:
        top = state["top"]  # sorted descending, (min(kmax, n), G)
        csum = torch.cumsum(top, dim=0)
        preds = [csum[min(k, len(top)) - 1] / min(k, len(top)) for k in self.ks]
        return torch.stack(preds).mean(0)


class SumOfTiles(_BagRegressor):
    """CPNN without prototypes: ``e_i = softplus(MLP(f_i))`` (G >= 0), bag = normalised
    mean of ``e_i``; output log1p CP10k of that composition."""

    def __init__(self, in_dim: int, n_genes: int, hidden: Sequence[int] = (256,), dropout: float = 0.25) -> None:
        super().__init__()
        self.in_dim, self.n_genes = int(in_dim), int(n_genes)
        self.head = make_mlp(in_dim, hidden, n_genes, dropout)

    def set_output_bias(self, mean_target: torch.Tensor) -> None:
        # start every tile at the mean training composition: softplus(b) = expm1(target) / 1e4
        comp = torch.expm1(torch.as_tensor(mean_target, dtype=torch.float32)).clamp_min(1e-6) / 1e4
        last = self.head[-1]
        with torch.no_grad():
            last.bias.copy_(comp + torch.log(-torch.expm1(-comp)))  # inverse softplus

    def tile_expression(self, features: torch.Tensor) -> torch.Tensor:
        """``(N, G)`` non-negative per-tile expression (unnormalised)."""
        return nn.functional.softplus(self.head(features))

    @staticmethod
    def _to_log1p(mean_expr: torch.Tensor) -> torch.Tensor:
        return log1p_cp10k_torch(mean_expr, eps=1e-30)

    def forward(self, features: torch.Tensor, bag_index: torch.Tensor, n_bags: int) -> torch.Tensor:
        return self._to_log1p(segment_mean(self.tile_expression(features), bag_index, n_bags))

    def stream_init(self) -> Dict[str, Any]:
        return {"sum": torch.zeros(self.n_genes, dtype=torch.float64), "n": 0}

    def stream_update(self, state: Dict[str, Any], x: torch.Tensor) -> None:
        state["sum"] += self.tile_expression(x).double().sum(0)
        state["n"] += len(x)

    def stream_finish(self, state: Dict[str, Any]) -> torch.Tensor:
        return self._to_log1p((state["sum"] / max(state["n"], 1)).float())


SLIDE_BASELINES = {"meanpool_mlp": MeanPoolMLP, "abmil": ABMIL, "he2rna": HE2RNA, "sum_of_tiles": SumOfTiles}

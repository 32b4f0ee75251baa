"""Tensor-only building blocks: the CPNN network, its losses and baseline networks.

Nothing here knows about files or AnnData.
"""
from .network import CPNNModule, segment_mean
from . import losses

__all__ = ["CPNNModule", "segment_mean", "losses"]

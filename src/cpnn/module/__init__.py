"""Tensor-only building blocks: the CPNN network, its losses and baseline networks.

Nothing here knows about files or AnnData.
"""
from .network import BagAccumulator, CPNNModule, predict_bag_outputs, segment_mean
from . import losses

__all__ = ["BagAccumulator", "CPNNModule", "predict_bag_outputs", "segment_mean", "losses"]

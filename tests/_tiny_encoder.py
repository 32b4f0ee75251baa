"""A tiny registered encoder so that tests extracting features run in milliseconds, and
features that carry a synthetic section's true composition."""
from __future__ import annotations

import numpy as np
import torch

TINY = "tiny-issue16"


def register_tiny() -> None:
    """Register a tiny deterministic encoder (8-d, 32 px) under ``TINY`` (once)."""
    from cpnn.encoders import registry

    if TINY in registry.list_encoders():
        return

    class _Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.conv = torch.nn.Conv2d(3, 4, 5, stride=4)

        def forward(self, x):
            y = torch.relu(self.conv(x))
            return torch.cat([y.mean((2, 3)), y.amax((2, 3))], dim=1)

    @registry.register_encoder(TINY, dim=8, input_px=32, weights="offline", source="tests")
    def _factory(device="cpu", **kw):
        return registry.Encoder(TINY, _Net(), dim=8, input_px=32, mean=(0.5,) * 3, std=(0.25,) * 3)


def signal_features(adata, dim: int, seed: int) -> np.ndarray:
    """Features that carry the true composition (so a model has signal), plus noise."""
    rng = np.random.default_rng(seed)
    p = np.asarray(adata.obsm["true_proportions"], dtype=np.float32)
    mix = np.random.default_rng(0).normal(size=(p.shape[1], dim)).astype(np.float32)
    return p @ mix + 0.05 * rng.normal(size=(adata.n_obs, dim)).astype(np.float32)

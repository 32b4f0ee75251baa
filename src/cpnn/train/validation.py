"""The validation part carved from training data for early stopping — one rule for every model."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np

from ..config import TrainConfig
from ..errors import CPNNInputError


def carve_validation(n: int, train_config: TrainConfig, groups: Optional[Sequence] = None,
                     val_bags: Optional[Sequence[int]] = None, member: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """Training and validation indices of ``n`` observations (bags or spots).

    Parameters
    ----------
    n
        Number of observations.
    train_config
        Gives ``val_fraction``, ``early_stopping`` (none: no validation part) and ``seed``.
    groups
        Group (patient / section / slide) of each observation. With at least 3 groups,
        whole groups are held out, taken in turn from one seeded permutation so that
        ensemble members validate on different groups; otherwise a random part of the
        observations, another one per member.
    val_bags
        Explicit validation indices; they win over everything else.
    member
        Ensemble member (0 for a single model).

    Returns
    -------
    (train, val)
        Sorted int64 index arrays; ``val`` is empty when early stopping is off.
    """
    tc = train_config
    all_idx = np.arange(n)
    if val_bags is not None:
        val = np.unique(np.asarray(val_bags, dtype=np.int64))
        return np.setdiff1d(all_idx, val), val
    if tc.val_fraction <= 0 or tc.early_stopping == "none":
        return all_idx, np.zeros(0, dtype=np.int64)
    if groups is not None:
        groups = np.asarray(groups)
        if len(groups) != n:
            raise CPNNInputError(f"{len(groups)} group labels for {n} observations", field="groups")
        uniq = np.unique(groups)
        if len(uniq) >= 3:
            order = np.random.default_rng(tc.seed).permutation(uniq)
            n_val = max(1, int(round(tc.val_fraction * len(uniq))))
            start = (member * n_val) % len(uniq)
            val_groups = np.take(order, np.arange(start, start + n_val), mode="wrap")
            mask = np.isin(groups, val_groups)
            return all_idx[~mask], all_idx[mask]
    n_val = max(1, int(round(tc.val_fraction * n)))
    perm = np.random.default_rng(tc.seed + member).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])

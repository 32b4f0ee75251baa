"""Early stopping on a validation criterion, with the best weights kept in memory."""
from __future__ import annotations

import copy
import math
from typing import Any, Dict, Optional


class EarlyStopping:
    """Track a validation score per epoch; remember the best weights; say when to stop.

    Parameters
    ----------
    criterion
        Key of the epoch record to watch (``"val_pcc"`` and ``"val_pcc_comp"`` are
        maximised, any other key —
        e.g. ``"val_loss"`` — minimised), or ``"none"`` to never stop early.
    patience
        Epochs without improvement before :meth:`step` returns True.
    """

    def __init__(self, criterion: str, patience: int) -> None:
        self.criterion = criterion
        self.patience = int(patience)
        self.maximise = criterion in ("val_pcc", "val_pcc_comp")
        self.best_score = -math.inf if self.maximise else math.inf
        self.best_epoch = -1
        self.best_state: Optional[Dict[str, Any]] = None
        self.since_best = 0

    @property
    def active(self) -> bool:
        return self.criterion != "none"

    def step(self, epoch: int, record: Dict[str, float], module) -> bool:
        """Record ``epoch``'s score (copying ``module``'s weights if best); True = stop now."""
        if not self.active:
            return False
        score = record[self.criterion]
        improved = score > self.best_score if self.maximise else score < self.best_score
        if improved or self.best_state is None:
            self.best_score, self.best_epoch = float(score), epoch
            self.best_state = copy.deepcopy(module.state_dict())
            self.since_best = 0
        else:
            self.since_best += 1
        return self.since_best >= self.patience

    def restore(self, module) -> bool:
        """Load the best weights into ``module``; False when there were none (no validation)."""
        if self.best_state is None:
            return False
        module.load_state_dict(self.best_state)
        return True

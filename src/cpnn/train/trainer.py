"""The epoch loop every model trains with (CPNN on one or many processes, the slide
baselines, the MLP probe): seeded batch order, the caller's loss per batch, a finite-loss check, gradient
clipping, AdamW, StepLR, validation, early stopping with the best weights restored, and a
progress bar. Only the loss of a batch and the validation metrics differ between models.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from ..config import TrainConfig
from .early_stopping import EarlyStopping

#: ``step(bags, rng) -> (loss, parts)``: the loss of one batch of bag indices (a scalar
#: tensor) and its named parts (for the message of a non-finite loss).
StepFn = Callable[[np.ndarray, np.random.Generator], Tuple[torch.Tensor, Dict[str, torch.Tensor]]]


@dataclass
class TrainResult:
    """What happened during training."""

    history: List[Dict[str, float]] = field(default_factory=list)
    best_epoch: int = -1
    best_score: float = float("nan")
    epochs_run: int = 0
    seconds: float = 0.0
    criterion: str = "none"


def fit_epochs(
    module: torch.nn.Module,
    n_bags: int,
    train_config: TrainConfig,
    step: StepFn,
    validate: Optional[Callable[[], Dict[str, float]]] = None,
    reduce_loss: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    show_progress: bool = True,
    rng: Optional[np.random.Generator] = None,
) -> TrainResult:
    """Train ``module`` in place for up to ``max_epochs`` epochs; restore the best weights.

    Parameters
    ----------
    module
        Its parameters are optimised (AdamW ``lr``/``weight_decay``, StepLR
        ``step_size``/``gamma``, clipping at ``grad_clip``) and its best state restored.
    n_bags
        Training bags; each epoch visits a seeded permutation of them in batches of
        ``batch_size``.
    train_config
        The options above, ``seed`` (a generator made from it orders the batches and is
        passed to ``step``, e.g. for patch sampling), ``early_stopping``, ``patience``,
        ``progress`` and ``progress_desc``.
    step
        The loss of a batch (see :data:`StepFn`).
    validate
        Validation metrics after each epoch (keys ``val_*``), or None: no early stopping,
        the last epoch is kept.
    reduce_loss
        Applied to the epoch's summed training loss (e.g. an all-reduce across processes).
    show_progress
        False hides the bar even when ``train_config.progress`` asks for it (other ranks).
    rng
        The generator of the batch order (default: a new one from ``train_config.seed``),
        for a caller that drew from it already (e.g. its validation carve).

    Returns
    -------
    TrainResult
    """
    tc = train_config
    rng = np.random.default_rng(tc.seed) if rng is None else rng
    opt = torch.optim.AdamW(module.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=tc.step_size, gamma=tc.gamma)
    criterion = tc.early_stopping if validate is not None else "none"
    stopper = EarlyStopping(criterion, tc.patience)
    result = TrainResult(criterion=criterion)
    t0 = time.perf_counter()
    bar = None
    if tc.progress and show_progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=tc.max_epochs, desc=tc.progress_desc, unit="epoch", leave=False)
    try:
        for epoch in range(tc.max_epochs):
            module.train()
            order = rng.permutation(n_bags)
            loss_sum = torch.zeros((), dtype=torch.float64)
            n_steps = 0
            for start in range(0, n_bags, tc.batch_size):
                loss, parts = step(order[start:start + tc.batch_size], rng)
                if not torch.isfinite(loss):
                    bad = {k: float(v.detach()) for k, v in parts.items()}
                    raise FloatingPointError(
                        f"non-finite training loss at epoch {epoch} ({bad}); check the inputs for NaN/inf "
                        "or lower the learning rate")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if tc.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(module.parameters(), tc.grad_clip)
                opt.step()
                loss_sum += loss.detach().double().cpu()
                n_steps += 1
            if reduce_loss is not None:
                loss_sum = reduce_loss(loss_sum)
            sched.step()
            record = {"epoch": epoch, "train_loss": float(loss_sum) / max(n_steps, 1)}
            if validate is not None:
                record.update(validate())
            result.history.append(record)
            result.epochs_run = epoch + 1
            stop = stopper.step(epoch, record, module)
            if bar is not None:
                bar.update(1)
                bar.set_postfix({k: f"{v:.4g}" for k, v in record.items()
                                 if k in ("train_loss", "val_loss", "val_pcc")})
            if stop:
                break
    finally:
        if bar is not None:
            bar.close()
    if stopper.restore(module):
        result.best_epoch, result.best_score = stopper.best_epoch, stopper.best_score
    else:
        result.best_epoch = result.epochs_run - 1
    result.seconds = time.perf_counter() - t0
    return result

"""Plain-PyTorch training loop for CPNN (method §5, docs/ARCHITECTURE.md, with the weak points fixed).

- Early stopping on a validation part carved from the *training* data; the best weights
  are restored at the end.
- Every tile of a validation/test bag is used, deterministically; random subsampling of
  large bags happens only in training steps.
- One seed drives batch order and patch sampling.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np
import torch

from .._numerics import composition_log1p, log1p_cp10k, mean_column_pearson
from ..config import CPNNConfig, TrainConfig
from ..module import losses
from ..module.network import CPNNModule, predict_bag_outputs
from .bags import BagData
from .early_stopping import EarlyStopping


@dataclass
class TrainResult:
    """What happened during training."""

    history: List[Dict[str, float]] = field(default_factory=list)
    best_epoch: int = -1
    best_score: float = float("nan")
    epochs_run: int = 0
    seconds: float = 0.0
    criterion: str = "none"


def _bag_loss(
    module: CPNNModule,
    out: Dict[str, torch.Tensor],
    counts: torch.Tensor,
    targets: Optional[torch.Tensor],
    config: CPNNConfig,
) -> Dict[str, torch.Tensor]:
    expr = losses.expression_loss(config.loss, out["bag_expr"], counts, module.log_theta)
    total = expr
    parts = {"expr": expr}
    if targets is not None and config.composition_weight > 0:
        comp = losses.composition_loss(out["bag_weights"], targets, getattr(module, "composition_type_weights", None))
        total = total + config.composition_weight * comp
        parts["composition"] = comp
    if config.template_weight > 0 and config.learn_prototypes:
        tmpl = module.template_penalty()
        total = total + config.template_weight * tmpl
        parts["template"] = tmpl
    parts["total"] = total
    return parts


def predict_bags(
    module: CPNNModule,
    data: BagData,
    chunk_patches: int = 16384,
    device: str = "cpu",
    return_patch_outputs: bool = True,
) -> Dict[str, np.ndarray]:
    """Deterministic prediction of one network on every patch of every bag, in chunks.

    The single-network case of :func:`cpnn.module.network.predict_bag_outputs`.

    Returns
    -------
    dict
        ``bag_expr`` (B, G) and ``bag_weights`` (B, K); with ``return_patch_outputs``
        also ``weights`` (N, K) and ``spot_expr`` (N, G) per patch.
    """
    return predict_bag_outputs([module], data.features, data.offsets, chunk_patches=chunk_patches,
                               device=device, return_patch_outputs=return_patch_outputs)


def _mean_gene_pearson(pred_comp: np.ndarray, counts: np.ndarray) -> float:
    """Mean over genes of Pearson across bags, on log1p CP10k (constant genes skipped)."""
    return mean_column_pearson(composition_log1p(np.asarray(pred_comp, np.float64)), log1p_cp10k(counts))


def validation_metrics(module, bag_expr: np.ndarray, bag_weights: np.ndarray, data: BagData,
                       config: CPNNConfig, device: str = "cpu") -> Dict[str, float]:
    """Validation losses and mean per-gene Pearson from predicted bag outputs."""
    out = {"bag_expr": torch.from_numpy(bag_expr).to(device), "bag_weights": torch.from_numpy(bag_weights).to(device)}
    targets = None if data.targets is None else torch.from_numpy(data.targets).to(device)
    with torch.no_grad():
        parts = _bag_loss(module, out, torch.from_numpy(data.counts).to(device), targets, config)
    metrics = {f"val_{k}": float(v) for k, v in parts.items()}
    metrics["val_pcc"] = _mean_gene_pearson(bag_expr, data.counts)
    metrics["val_loss"] = metrics.pop("val_total")
    if data.targets is not None:
        metrics["val_comp_r"] = mean_column_pearson(np.asarray(bag_weights, np.float64),
                                                    np.asarray(data.targets, np.float64))
        metrics["val_pcc_comp"] = metrics["val_pcc"] + (0.0 if math.isnan(metrics["val_comp_r"])
                                                        else metrics["val_comp_r"])
    else:
        metrics["val_pcc_comp"] = metrics["val_pcc"]
    return metrics


def _evaluate(module, data: BagData, config: CPNNConfig, device: str) -> Dict[str, float]:
    pred = predict_bags(module, data, device=device, return_patch_outputs=False)
    return validation_metrics(module, pred["bag_expr"], pred["bag_weights"], data, config, device)


def train_cpnn(
    module: CPNNModule,
    train: BagData,
    val: Optional[BagData],
    config: CPNNConfig,
    train_config: TrainConfig,
) -> TrainResult:
    """Fit ``module`` in place and restore its best weights.

    Parameters
    ----------
    module
        The network, initialised.
    train
        Training bags with ``counts`` (and optionally composition ``targets``).
    val
        Validation bags carved from the training data, or None (then no early stopping:
        the last epoch is kept).
    config, train_config
        Model and optimisation settings.

    Returns
    -------
    TrainResult
    """
    if train.counts is None:
        raise ValueError("training bags need counts")
    tc = train_config
    device = tc.device
    module.to(device)
    rng = np.random.default_rng(tc.seed)
    torch.manual_seed(tc.seed)
    opt = torch.optim.AdamW(module.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=tc.step_size, gamma=tc.gamma)
    features = torch.from_numpy(train.features)
    counts = torch.from_numpy(train.counts)
    targets = None if train.targets is None else torch.from_numpy(train.targets)

    criterion = tc.early_stopping if val is not None else "none"
    stopper = EarlyStopping(criterion, tc.patience)
    result = TrainResult(criterion=criterion)
    t0 = time.perf_counter()
    bar = None
    if tc.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=tc.max_epochs, desc=tc.progress_desc, unit="epoch", leave=False)
    try:
        for epoch in range(tc.max_epochs):
            module.train()
            order = rng.permutation(train.n_bags)
            totals = []
            for start in range(0, train.n_bags, tc.batch_size):
                bags = order[start : start + tc.batch_size]
                rows, local = train.patch_index(bags, tc.max_patches_per_bag, rng)
                out = module(
                    features[rows].to(device), torch.from_numpy(local).to(device), n_bags=len(bags)
                )
                parts = _bag_loss(
                    module,
                    out,
                    counts[bags].to(device),
                    None if targets is None else targets[bags].to(device),
                    config,
                )
                if not torch.isfinite(parts["total"]):
                    bad = {k: float(v.detach()) for k, v in parts.items()}
                    raise FloatingPointError(
                        f"non-finite training loss at epoch {epoch} ({bad}); check the inputs for NaN/inf "
                        "or lower the learning rate"
                    )
                opt.zero_grad(set_to_none=True)
                parts["total"].backward()
                if tc.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(module.parameters(), tc.grad_clip)
                opt.step()
                totals.append(float(parts["total"].detach()))
            sched.step()
            record = {"epoch": epoch, "train_loss": float(np.mean(totals))}
            if val is not None:
                record.update(_evaluate(module, val, config, device))
            result.history.append(record)
            result.epochs_run = epoch + 1
            stop = stopper.step(epoch, record, module)
            if bar is not None:
                bar.update(1)
                shown = {k: f"{v:.4g}" for k, v in record.items() if k in ("train_loss", "val_loss", "val_pcc")}
                bar.set_postfix(shown)
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

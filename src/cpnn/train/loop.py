"""Plain-PyTorch training loop for CPNN (method §5, docs/ARCHITECTURE.md, with the weak points fixed).

- Early stopping on a validation part carved from the *training* data; the best weights
  are restored at the end.
- Every tile of a validation/test bag is used, deterministically; random subsampling of
  large bags happens only in training steps.
- One seed drives batch order and patch sampling.
"""
from __future__ import annotations

import math
import warnings
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from .._numerics import composition_log1p, log1p_cp10k, mean_column_pearson
from ..config import CPNNConfig, TrainConfig
from ..module import losses
from ..module.network import CPNNModule, predict_bag_outputs
from .bags import BagData
from .trainer import TrainResult, fit_epochs


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


def world() -> Tuple[int, int]:
    """``(rank, world_size)`` of the initialised process group, ``(0, 1)`` without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _LossModule(torch.nn.Module):
    """Forward = network + loss, so that DDP sees every parameter the loss uses.

    ``log_theta`` and the prototypes enter the loss outside ``CPNNModule.forward``; DDP only
    synchronises parameters reached from the wrapped module's forward.
    """

    def __init__(self, module: CPNNModule, config: CPNNConfig) -> None:
        super().__init__()
        self.net = module
        self.config = config

    def forward(self, features, local, n_bags, counts, targets, scale):
        out = self.net(features, local, n_bags=n_bags)
        parts = _bag_loss(self.net, out, counts, targets, self.config)
        template = parts.get("template")
        bag_part = parts["total"] - template if template is not None else parts["total"]
        # scale: this process's share of the global batch (0 for a padding bag)
        return bag_part * scale + (template if template is not None else 0.0)


def _split_rows(rows: np.ndarray, local: np.ndarray, mine: np.ndarray, n_batch: int) -> Tuple[np.ndarray, np.ndarray]:
    """Rows and renumbered bag ids of the batch positions ``mine`` (of ``n_batch``)."""
    keep = np.isin(local, mine)
    remap = np.full(n_batch, -1, dtype=np.int64)
    remap[mine] = np.arange(len(mine))
    return rows[keep], remap[local[keep]]


def _gather_val_predictions(module: CPNNModule, val: BagData, device: str, rank: int, n_proc: int):
    """Predict this process's share of the validation bags and gather all of them, in order."""
    idx = np.arange(rank, val.n_bags, n_proc)
    part = predict_bags(module, val.subset(idx), device=device, return_patch_outputs=False) if len(idx) else None
    if n_proc == 1:
        return part["bag_expr"], part["bag_weights"]
    import torch.distributed as dist

    gathered: List[Optional[dict]] = [None] * n_proc
    dist.all_gather_object(gathered, {"idx": idx, "pred": part})
    bag_expr = np.empty((val.n_bags, module.n_genes), dtype=np.float32)
    bag_w = np.empty((val.n_bags, module.n_types), dtype=np.float32)
    for item in gathered:
        if item["pred"] is not None:
            bag_expr[item["idx"]] = item["pred"]["bag_expr"]
            bag_w[item["idx"]] = item["pred"]["bag_weights"]
    return bag_expr, bag_w


def _val_metrics(module: CPNNModule, val: BagData, config: CPNNConfig, device: str, rank: int,
                 n_proc: int) -> Dict[str, float]:
    """Validation metrics of every process's gathered predictions (identical everywhere)."""
    bag_expr, bag_w = _gather_val_predictions(module, val, device, rank, n_proc)
    return validation_metrics(module, bag_expr, bag_w, val, config, device)


def train_cpnn(
    module: CPNNModule,
    train: BagData,
    val: Optional[BagData],
    config: CPNNConfig,
    train_config: TrainConfig,
    device: Optional[str] = None,
) -> TrainResult:
    """Fit ``module`` in place and restore its best weights: the one CPNN training loop.

    On one process it trains on every bag of each step. Under an initialised process group
    of ``N > 1`` processes (``torchrun``) the same loop is data-parallel: every process draws
    the same seeded permutation and patch subsample (``batch_size`` is the global batch),
    takes the step's bags ``rank, rank + N, ...``, scales its loss by its share so that
    DDP's gradient average is the global batch's, and all processes compute the same
    validation metrics from gathered predictions (see docs/DISTRIBUTED.md).

    Parameters
    ----------
    module
        The network, initialised (identically on every process).
    train
        Training bags with ``counts`` (and optionally composition ``targets``); features
        may be memory-mapped (each step copies only its rows).
    val
        Validation bags carved from the training data, or None (then no early stopping:
        the last epoch is kept).
    config, train_config
        Model and optimisation settings.
    device
        Defaults to ``train_config.device``.

    Returns
    -------
    TrainResult
    """
    if train.counts is None:
        raise ValueError("training bags need counts")
    rank, n_proc = world()
    tc = train_config
    device = device or tc.device
    if n_proc > 1 and config.loss == "pearson":
        warnings.warn("loss='pearson' correlates bags within a batch; with several processes each "
                      "process correlates its own share, so results differ from one process", stacklevel=2)
    module.to(device)
    wrapped = None
    if n_proc > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # unused parameters exist for some configs (e.g. log_theta without the NB loss)
        wrapped = DDP(_LossModule(module, config),
                      device_ids=[int(device.split(":")[1])] if device.startswith("cuda") else None,
                      find_unused_parameters=True)
    torch.manual_seed(tc.seed)
    with warnings.catch_warnings():
        # memory-mapped, read-only features: torch warns that they are not writable; they are
        # only ever indexed (copied) here
        warnings.simplefilter("ignore", UserWarning)
        features = torch.from_numpy(np.asarray(train.features))
    counts = torch.from_numpy(train.counts)
    targets = None if train.targets is None else torch.from_numpy(train.targets)

    def step(bags: np.ndarray, rng: np.random.Generator):
        # every process draws the whole batch's subsample so the rng stays in step
        rows, local = train.patch_index(bags, tc.max_patches_per_bag, rng)
        if wrapped is None:
            out = module(features[rows].to(device), torch.from_numpy(local).to(device), n_bags=len(bags))
            parts = _bag_loss(module, out, counts[bags].to(device),
                              None if targets is None else targets[bags].to(device), config)
            return parts["total"], parts
        mine = np.arange(rank, len(bags), n_proc)
        scale = len(mine) * n_proc / len(bags)
        if len(mine) == 0:  # fewer bags than processes: a zero-weight stand-in bag
            mine, scale = np.arange(1), 0.0
        my_rows, my_local = _split_rows(rows, local, mine, len(bags))
        my_bags = bags[mine]
        loss = wrapped(features[my_rows].to(device), torch.from_numpy(my_local).to(device), len(mine),
                       counts[my_bags].to(device), None if targets is None else targets[my_bags].to(device), scale)
        return loss, {"total": loss}

    def reduce_loss(loss_sum: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        # sum over processes of the scaled losses = N x the global-batch loss
        # (the unscaled template term is counted N times, hence the division)
        dist.all_reduce(loss_sum)
        return loss_sum / n_proc

    validate = None if val is None else (lambda: _val_metrics(module, val, config, device, rank, n_proc))
    return fit_epochs(module, train.n_bags, tc, step, validate,
                      reduce_loss=reduce_loss if n_proc > 1 else None, show_progress=rank == 0)

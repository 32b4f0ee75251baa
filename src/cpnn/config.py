"""Typed configuration of the CPNN network and of its training.

The reference code switched behaviour on substrings of a version name; here every
variant of the method (docs/ARCHITECTURE.md, "The method as implemented") is a named, typed option, validated on construction, and the whole
resolved configuration is written beside every run.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

LOSSES = ("nb", "poisson", "mse_log1p", "pearson")
LEVELS = ("spot", "bulk")
EARLY_STOPPING = ("val_loss", "val_pcc", "val_pcc_comp", "none")
FEATURE_SCALING = ("robust", "standard", "none")
RESIDUAL_HEADS = ("none", "ridge", "blend", "stacked")


@dataclass
class CPNNConfig:
    """Architecture and loss of a CPNN model.

    Parameters
    ----------
    hidden
        Hidden layer widths of the MLP mapping a patch feature to cell-type logits
        (the paper: ``(1024, 512)``). An empty tuple gives a linear map.
    dropout
        Dropout on the input and hidden layers (0 = the paper's).
    loss
        ``"nb"`` negative-binomial NLL of raw counts with learnable gene-wise dispersion
        (the paper's default), ``"poisson"``, ``"mse_log1p"`` (MSE on log1p CP10k) or
        ``"pearson"`` (1 - per-gene Pearson across the batch, on log1p CP10k).
    learn_prototypes
        Learn the prototype matrix ``T`` (initialised at ``log T0``) or keep it frozen.
    gene_factors
        Use the gene-wise platform factors ``a_g`` (scale) and ``b_g`` (offset).
    normalise_prototypes
        Use ``softmax_genes(T)`` (each type contributes a composition, the paper's spot
        head) instead of ``exp(T)`` (types keep their per-cell size).
    composition_weight
        Weight of the composition loss (mean weights vs deconvolution targets).
    template_weight
        Weight of the regulariser keeping ``softmax(T)`` near ``softmax(log T0)``.
    feature_scaling
        ``"robust"`` (median / IQR, clipped), ``"standard"`` (z-score, clipped) or
        ``"none"``. Fitted on training features only. ImageNet features of H&E have
        near-constant dimensions, so plain z-scoring explodes on new patients.
    composition_balance
        Weight each type's term of the composition loss by the inverse of its target
        variance over the training bags (weights normalised to mean 1), so that rare
        types (B cells, endothelium) count as much as abundant ones; False is the paper's
        plain mean over types.
    input_pca
        Project the scaled features on their first ``input_pca`` principal components
        (fitted on the training features) before the MLP; 0 keeps every dimension.
    residual_head
        ``"none"`` (expression is the cell-type mixture only), ``"ridge"``: after
        training, a ridge map from a spot's features to what the mixture leaves
        unexplained on log1p CP10k (cell states shared across types), kept only when
        inner cross-validation over the training groups says it improves the prediction
        (:class:`cpnn.model.residual.ResidualHead`); ``"blend"``: the same inner
        cross-validation may also choose ``c * mixture + ridge`` with one mixture weight
        ``c`` in (0.75, 0.5, 0.25) for every gene (the mixture blended with a linear probe);
        or ``"stacked"``: it may choose ``a_g * mixture + ridge`` with a non-negative
        mixture coefficient per gene. Spot level only; the cell-type weights are never
        changed by it.
    """

    hidden: Tuple[int, ...] = (1024, 512)
    dropout: float = 0.0
    loss: str = "nb"
    learn_prototypes: bool = True
    gene_factors: bool = True
    normalise_prototypes: bool = False
    composition_weight: float = 1e3
    template_weight: float = 1e3
    feature_scaling: str = "robust"
    input_pca: int = 0
    composition_balance: bool = False
    residual_head: str = "none"

    def __post_init__(self) -> None:
        self.hidden = tuple(int(h) for h in self.hidden)
        _check_choice("loss", self.loss, LOSSES)
        _check_choice("feature_scaling", self.feature_scaling, FEATURE_SCALING)
        _check_choice("residual_head", self.residual_head, RESIDUAL_HEADS)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.input_pca < 0:
            raise ValueError(f"input_pca must be >= 0 (0 = no projection), got {self.input_pca}")
        if self.composition_weight < 0 or self.template_weight < 0:
            raise ValueError("composition_weight and template_weight must be >= 0")


@dataclass
class TrainConfig:
    """Optimisation settings (the paper's unless stated; method §5 in docs/ARCHITECTURE.md).

    Parameters
    ----------
    lr, weight_decay
        AdamW learning rate and decoupled weight decay.
    max_epochs
        Upper bound on epochs.
    batch_size
        Bags (slides or spots) per optimisation step.
    max_patches_per_bag
        During training, bags larger than this are subsampled (at random, seeded) each
        step; validation and prediction always use every patch.
    step_size, gamma
        StepLR schedule.
    grad_clip
        Max gradient norm (0 disables).
    early_stopping
        ``"val_pcc"`` (mean per-gene Pearson on the validation part; default),
        ``"val_loss"`` (the paper's: validation loss), ``"val_pcc_comp"`` (``val_pcc`` plus
        the mean per-type Pearson, across validation bags, between predicted weights and
        composition targets: the epoch where both expression and weights are best) or
        ``"none"``.
    patience
        Epochs without improvement before stopping.
    val_fraction
        Fraction of the *training* data held out for early stopping (grouped by
        ``groups`` when given). Never the test fold.
    n_models
        Ensemble size. Each member is trained with its own validation part (the next
        group(s) in a seeded rotation when there are groups, else another random part)
        and its own seed; predictions are averaged. Averaging members stopped on
        different validation parts makes early stopping far less noisy on small data.
    refit
        After early stopping, retrain each member from its initialisation on *all* the
        training data (its validation part included) for the number of epochs its
        validation chose — what a ridge probe does after choosing its penalty by inner
        cross-validation, so that no training section is left unused by the final model.
        Doubles the training time.
    seed
        Seeds the split, the initialisation, the batch order and patch sampling.
    device
        ``"cpu"`` or a torch device string.
    progress
        Show a progress bar.
    progress_desc
        Label of that bar (an ensemble labels each member's, e.g. ``"member 2/4"``).
    """

    lr: float = 1e-3
    weight_decay: float = 1e-2
    max_epochs: int = 200
    batch_size: int = 8
    max_patches_per_bag: int = 4096
    step_size: int = 50
    gamma: float = 0.9
    grad_clip: float = 0.5
    early_stopping: str = "val_pcc"
    patience: int = 30
    val_fraction: float = 0.15
    n_models: int = 1
    refit: bool = False
    seed: int = 0
    device: str = "cpu"
    progress: bool = True
    progress_desc: str = "training"

    def __post_init__(self) -> None:
        _check_choice("early_stopping", self.early_stopping, EARLY_STOPPING)
        if self.batch_size < 1 or self.max_epochs < 1:
            raise ValueError("batch_size and max_epochs must be >= 1")
        if self.n_models < 1:
            raise ValueError(f"n_models must be >= 1, got {self.n_models}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")


def _check_choice(name: str, value: Any, choices: Tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def config_to_dict(cfg: Any) -> Dict[str, Any]:
    """Plain-dict view of a config dataclass (tuples become lists, for JSON/YAML)."""
    out = dataclasses.asdict(cfg)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


def config_from_dict(cls: type, data: Optional[Dict[str, Any]]) -> Any:
    """Build ``cls`` from a dict, rejecting unknown keys with the list of valid ones."""
    from .errors import CPNNInputError  # a ValueError: callers catching that still do

    data = dict(data or {})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise CPNNInputError(
            f"unknown {cls.__name__} option(s): {', '.join(unknown)}; "
            f"valid options: {', '.join(sorted(known))}", field=cls.__name__,
            fix="correct the option's name in the --config YAML")
    try:
        return cls(**data)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, CPNNInputError):
            raise
        raise CPNNInputError(f"invalid {cls.__name__} option: {exc}", field=cls.__name__,
                             fix="correct the value in the --config YAML (or the matching flag, e.g. --epochs)"
                             ) from None

"""User-facing slide-level baselines: fit / predict on lists of bags of patch features.

All baselines share one protocol with :class:`cpnn.model.CPNN`: features scaled by a
:class:`FeatureScaler` fitted on training bags; a validation part carved from the
training bags (by group when there are >= 3 groups) for early stopping on the mean
per-gene validation Pearson (or the validation loss); bags larger than
``max_patches_per_bag`` subsampled only in training steps; every patch used,
deterministically, at validation and prediction. They are trained with MSE on
log1p CP10k of the bag's counts (the scale every method is scored on).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np

from .._numerics import log1p_cp10k as _log1p_cp10k
from .._numerics import mean_column_pearson
from ..config import TrainConfig
from ..errors import CPNNInputError
from ..train.trainer import fit_epochs
from ..train.validation import carve_validation
from .scaling import FeatureScaler

BASELINE_NAMES = ("meanpool_mlp", "abmil", "he2rna", "sum_of_tiles")
BASELINE_FORMAT = "cpnn-slide-baseline"


def log1p_cp10k(counts: np.ndarray) -> np.ndarray:
    """``log1p(counts / row sum * 1e4)`` as float32 (rows with zero total stay zero)."""
    return _log1p_cp10k(counts, dtype=np.float32)


mean_gene_pearson = mean_column_pearson  # mean over genes of Pearson across bags


def _bags_from_list(bags) -> "Any":
    from ..train.bags import BagData

    if not isinstance(bags, (list, tuple)) or not len(bags):
        raise CPNNInputError("bags must be a non-empty list of (n_tiles, D) feature arrays", field="bags")
    arrays = []
    for i, b in enumerate(bags):
        a = np.asarray(b, dtype=np.float32)
        if a.ndim != 2 or len(a) == 0:
            raise CPNNInputError(f"bag {i} has shape {a.shape}; expected (n_tiles >= 1, D)", field="bags")
        if not np.isfinite(a).all():
            raise CPNNInputError(f"bag {i} has NaN/inf features", field="bags", fix="re-extract those tiles")
        arrays.append(a)
    dims = {a.shape[1] for a in arrays}
    if len(dims) != 1:
        raise CPNNInputError(f"bags have different feature dimensions {sorted(dims)}", field="bags",
                             fix="use features of one encoder")
    return BagData.from_bags(arrays)


class SlideBaseline:
    """A bag-level expression regressor (see :mod:`cpnn.module.slide_baselines`).

    Parameters
    ----------
    kind
        ``"meanpool_mlp"``, ``"abmil"``, ``"he2rna"`` or ``"sum_of_tiles"``.
    genes
        Gene names (the column order of the counts given to :meth:`fit`).
    train_config
        Optimisation and early stopping (the same :class:`cpnn.TrainConfig` as CPNN).
    feature_scaling
        ``"robust"`` (default), ``"standard"`` or ``"none"``.
    **module_kw
        Passed to the module (e.g. ``hidden``, ``dropout``, ``embed_dim``, ``ks``).
    """

    def __init__(self, kind: str, genes: Sequence[str], train_config: Optional[TrainConfig] = None,
                 feature_scaling: str = "robust", **module_kw: Any) -> None:
        if kind not in BASELINE_NAMES:
            raise ValueError(f"kind must be one of {', '.join(BASELINE_NAMES)}; got {kind!r}")
        self.kind = kind
        self.genes = [str(g) for g in genes]
        self.train_config = train_config or TrainConfig()
        self.feature_scaling = feature_scaling
        self.module_kw = dict(module_kw)
        self.module = None
        self.scaler: Optional[FeatureScaler] = None
        self.history: List[Dict[str, float]] = []
        self.best_epoch = -1
        self.split: Dict[str, list] = {}

    def _build(self, in_dim: int):
        import torch

        from ..module.slide_baselines import SLIDE_BASELINES

        torch.manual_seed(self.train_config.seed)
        self.module = SLIDE_BASELINES[self.kind](in_dim, len(self.genes), **self.module_kw)
        return self.module

    # ------------------------------------------------------------------ training
    def fit(self, bags: Sequence[np.ndarray], counts, groups: Optional[Sequence] = None,
            val_bags: Optional[Sequence[int]] = None) -> "SlideBaseline":
        """Train on a list of ``(n_b, D)`` bags and their ``(B, G)`` raw counts.

        Parameters
        ----------
        bags
            One feature array per bag (slide / region).
        counts
            Raw counts per bag, columns in ``self.genes`` order.
        groups
            Group (patient / section) of each bag, for the validation carve.
        val_bags
            Explicit validation bag indices.

        Returns
        -------
        SlideBaseline
            ``self`` with the best validation epoch's weights.
        """
        import torch

        data = _bags_from_list(bags)
        y = np.asarray(counts, dtype=np.float64)
        if y.shape != (data.n_bags, len(self.genes)):
            raise CPNNInputError(f"counts have shape {y.shape}; expected ({data.n_bags}, {len(self.genes)})",
                                 field="counts", fix="one row of raw counts per bag, genes in self.genes order")
        if (y < 0).any() or not np.isfinite(y).all() or (y.sum(1) == 0).any():
            raise CPNNInputError("counts must be finite, non-negative, with a positive total per bag",
                                 field="counts")
        target = log1p_cp10k(y)
        self.scaler = FeatureScaler.fit(data.features, self.feature_scaling)
        data.features = self.scaler.transform(data.features)
        data.counts = target  # the regression target travels with the bags through subset()
        tr_idx, va_idx = carve_validation(data.n_bags, self.train_config, groups, val_bags)
        self.split = {"train": tr_idx.tolist(), "val": va_idx.tolist()}
        train = data.subset(tr_idx)
        val = data.subset(va_idx) if len(va_idx) else None

        tc = self.train_config
        module = self._build(data.features.shape[1])
        module.set_output_bias(torch.from_numpy(train.counts.mean(0)))
        feats = torch.from_numpy(train.features)
        ytr = torch.from_numpy(train.counts)

        def step(b: np.ndarray, rng: np.random.Generator):
            rows, local = train.patch_index(b, tc.max_patches_per_bag, rng)
            if hasattr(module, "train_k"):
                module.train_k = int(rng.choice(module.ks))
            loss = torch.mean((module(feats[rows], torch.from_numpy(local), len(b)) - ytr[b]) ** 2)
            return loss, {"mse": loss}

        def validate():
            pv = self._predict_data(val)
            pcc = mean_gene_pearson(pv, val.counts)
            # no composition here: val_pcc_comp is val_pcc
            return {"val_loss": float(np.mean((pv - val.counts) ** 2)), "val_pcc": pcc, "val_pcc_comp": pcc}

        result = fit_epochs(module, train.n_bags, tc, step, None if val is None else validate)
        self.history, self.best_epoch, self.seconds = result.history, result.best_epoch, result.seconds
        module.eval()
        return self

    # ------------------------------------------------------------------ inference
    def _predict_data(self, data, chunk_patches: int = 16384) -> np.ndarray:
        import torch

        module = self.module
        module.eval()
        out = np.empty((data.n_bags, len(self.genes)), dtype=np.float32)
        with torch.no_grad():
            for b in range(data.n_bags):
                s, e = int(data.offsets[b]), int(data.offsets[b + 1])
                state = module.stream_init()
                for c in range(s, e, chunk_patches):
                    module.stream_update(state, torch.from_numpy(data.features[c:min(e, c + chunk_patches)]))
                out[b] = module.stream_finish(state).numpy()
        return out

    def predict(self, bags: Sequence[np.ndarray], chunk_patches: int = 16384) -> np.ndarray:
        """``(B, G)`` predicted log1p CP10k per bag; every tile used, in bounded-memory chunks."""
        if self.module is None:
            raise RuntimeError("this baseline is not trained yet: call fit()")
        data = _bags_from_list(bags)
        if data.features.shape[1] != self.module.in_dim:
            raise CPNNInputError(f"features have {data.features.shape[1]} dimensions, the model "
                                 f"{self.module.in_dim}", field="features")
        data.features = self.scaler.transform(data.features)
        return self._predict_data(data, chunk_patches)

    # ------------------------------------------------------------------ files
    def save(self, path: Union[str, os.PathLike]) -> Path:
        """Write one self-describing file (kind, genes, options, scaler, weights), atomically."""
        if self.module is None:
            raise RuntimeError("this baseline is not trained yet: call fit()")
        from ..config import config_to_dict
        from .cpnn_model import _jsonable
        from .files import write_model_file

        payload = {
            "format": BASELINE_FORMAT, "kind": self.kind, "genes": self.genes,
            "train_config": config_to_dict(self.train_config), "feature_scaling": self.feature_scaling,
            "module_kw": _jsonable(self.module_kw), "in_dim": int(self.module.in_dim),
            "scaler": self.scaler.to_dict(), "state_dict": self.module.state_dict(),
            "history": _jsonable(self.history), "best_epoch": int(self.best_epoch), "split": self.split,
        }
        return write_model_file(path, payload)

    @classmethod
    def load(cls, path: Union[str, os.PathLike], genes: Optional[Sequence[str]] = None) -> "SlideBaseline":
        """Read a file written by :meth:`save`; ``genes`` (optional) must match its gene order."""
        from ..config import config_from_dict
        from .cpnn_model import _raise_gene_mismatch
        from .files import read_model_file

        path = Path(path)
        payload = read_model_file(path, BASELINE_FORMAT, "slide-baseline", "SlideBaseline.save",
                                  "CPNN models load with cpnn.CPNN.load")
        if genes is not None and list(genes) != payload["genes"]:
            _raise_gene_mismatch(path, payload["genes"], list(genes))
        model = cls(payload["kind"], payload["genes"], config_from_dict(TrainConfig, payload["train_config"]),
                    payload["feature_scaling"], **payload["module_kw"])
        model.scaler = FeatureScaler.from_dict(payload["scaler"])
        model._build(int(payload["in_dim"])).load_state_dict(payload["state_dict"])
        model.module.eval()
        model.history, model.best_epoch, model.split = payload["history"], payload["best_epoch"], payload["split"]
        return model

"""The CPNN model users hold: owns gene and cell-type names, scaling, training, files."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Union

import numpy as np
from scipy import sparse

from .. import __version__
from ..config import CPNNConfig, TrainConfig, config_from_dict, config_to_dict
from ..errors import CPNNInputError
from .files import read_model_file, write_model_file
from .scaling import FeatureScaler

#: Version of the model file layout; 2 added ``preset``. Files of a newer version are refused.
FORMAT_VERSION = 2


def _dense_counts(counts, genes: Sequence[str], what: str = "counts") -> np.ndarray:
    """Counts as a dense float32 array whose columns follow ``genes``.

    AnnData inputs are aligned by ``var_names``; arrays must already be in gene order.
    """
    try:  # AnnData without importing anndata eagerly
        var_names = counts.var_names
    except AttributeError:
        var_names = None
    if var_names is not None:
        adata = counts
        index = {g: i for i, g in enumerate(map(str, var_names))}
        missing = [g for g in genes if g not in index]
        if missing:
            raise CPNNInputError(
                f"{len(missing)} of the model's {len(genes)} genes are absent from the {what} "
                f"(e.g. {', '.join(missing[:5])})",
                field="var_names",
                fix="use data measured on the same gene panel, or rebuild the prototypes on the shared genes",
            )
        x = adata.layers["counts"] if "counts" in getattr(adata, "layers", {}) else adata.X
        cols = [index[g] for g in genes]
        x = x[:, cols]
    else:
        x = counts
    x = x.toarray() if sparse.issparse(x) else np.asarray(x)
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != len(genes):
        raise CPNNInputError(
            f"{what} has shape {x.shape}; expected (observations, {len(genes)}) in the model's gene order",
            field=what,
            fix="pass an AnnData (aligned by gene name) or reorder the columns",
        )
    if not np.isfinite(x).all():
        raise CPNNInputError(f"{what} contains NaN or infinite values", field=what, fix="remove or impute them")
    if (x < 0).any():
        raise CPNNInputError(f"{what} contains negative values; raw counts are required", field=what,
                             fix="pass raw UMI/read counts, not normalised or scaled data")
    return x


class CPNN:
    """Cell-type Prototype-informed Neural Network.

    Parameters
    ----------
    prototypes
        A :class:`cpnn.prototypes.Prototypes` (or any object with ``values`` K x G,
        ``cell_types`` and ``genes``); its genes define the model's gene order.
    config
        Architecture and loss (:class:`cpnn.CPNNConfig`).
    train_config
        Optimisation (:class:`cpnn.TrainConfig`).
    encoder
        Optional description of the features' origin (``name``, ``patch_um``, ``out_px``,
        ...); saved with the model and checked at prediction time.
    preset
        Name of the :mod:`cpnn.presets` preset that ``config`` / ``train_config`` start from
        when they are not given (default ``"slide"``: the paper's network, early stopping on
        validation Pearson); recorded in the model file.

    Examples
    --------
    >>> model = CPNN(prototypes, CPNNConfig(loss="nb"), TrainConfig(max_epochs=50))
    >>> model.fit(train_features, train_counts, composition_targets="deconvolve")
    >>> out = model.predict(test_features)
    >>> out["weights"].shape, out["spot_expr"].shape
    """

    def __init__(
        self,
        prototypes: Any,
        config: Optional[CPNNConfig] = None,
        train_config: Optional[TrainConfig] = None,
        encoder: Optional[Dict[str, Any]] = None,
        preset: Optional[str] = None,
    ) -> None:
        values = np.asarray(prototypes.values, dtype=np.float64)
        if values.ndim != 2 or values.shape[0] != len(prototypes.cell_types) or values.shape[1] != len(prototypes.genes):
            raise CPNNInputError(
                f"prototype matrix has shape {values.shape} for {len(prototypes.cell_types)} types and "
                f"{len(prototypes.genes)} genes",
                field="prototypes.values",
            )
        if not np.isfinite(values).all() or (values < 0).any():
            raise CPNNInputError("prototypes must be finite and non-negative", field="prototypes.values")
        self.prototype_values = values.astype(np.float32)
        self.cell_types = [str(c) for c in prototypes.cell_types]
        self.genes = [str(g) for g in prototypes.genes]
        self.prototype_provenance = dict(getattr(prototypes, "provenance", {}) or {})
        self.prototype_provenance.setdefault("method", getattr(prototypes, "method", None))
        self.prototype_provenance.setdefault("label_key", getattr(prototypes, "label_key", None))
        from ..presets import get_preset

        self.preset = preset or "slide"
        try:
            defaults = get_preset(self.preset)
        except ValueError as exc:
            raise CPNNInputError(str(exc), field="preset") from None
        self.config = config or defaults.model
        self.train_config = train_config or defaults.train
        self.encoder = dict(encoder or {})
        self.modules: list = []
        self.train_results: list = []
        self.scaler: Optional[FeatureScaler] = None
        self.log_platform_factor: Optional[np.ndarray] = None
        self.split: Dict[str, list] = {}
        self.residual = None  # ResidualHead when config.residual_head is not "none"

    # ------------------------------------------------------------------ helpers
    @property
    def module(self):
        """The (first) trained network; an ensemble holds the others in ``modules``."""
        return self.modules[0] if self.modules else None

    @property
    def train_result(self):
        """Training record of the first member (all members: ``train_results``)."""
        return self.train_results[0] if self.train_results else None

    @property
    def n_types(self) -> int:
        return len(self.cell_types)

    @property
    def n_genes(self) -> int:
        return len(self.genes)

    def _log_prototypes(self) -> np.ndarray:
        v = self.prototype_values.astype(np.float64)
        # a pseudo-count far below any expressed value keeps log finite for zeros
        floor = 1e-6 * max(float(v.mean()), 1e-30)
        return np.log(v + floor).astype(np.float32)

    def _build_module(self, in_dim: int, seed: Optional[int] = None):
        import torch

        from ..module.network import CPNNModule

        torch.manual_seed(self.train_config.seed if seed is None else seed)
        lpf = None if self.log_platform_factor is None else torch.from_numpy(self.log_platform_factor)
        return CPNNModule(in_dim, torch.from_numpy(self._log_prototypes()), self.config, lpf)

    @staticmethod
    def _as_bags(features, bags=None):
        from ..train.bags import BagData

        if isinstance(features, (list, tuple)):
            return BagData.from_bags([np.asarray(f, dtype=np.float32) for f in features])
        features = np.asarray(features, dtype=np.float32)
        if features.ndim == 3 and bags is None:
            # (spots, sub-patches, dims): every spot a bag of its k sub-patches
            n, k, d = features.shape
            if k == 0:
                raise CPNNInputError("features have 0 sub-patches per spot", field="features")
            return CPNN._as_bags(features.reshape(n * k, d), np.arange(0, n * k + 1, k))
        if features.ndim != 2:
            raise CPNNInputError(f"features must be a 2-D array (patches x dims) or 3-D (spots x sub-patches x "
                                 f"dims), got shape {features.shape}", field="features")
        if not np.isfinite(features).all():
            bad = np.unique(np.nonzero(~np.isfinite(features))[0])
            raise CPNNInputError(f"features contain NaN/inf in {len(bad)} rows (first: {bad[:5].tolist()})",
                                 field="features", fix="re-extract those patches or drop them")
        if bags is None:
            return BagData.from_spots(features)
        offsets = np.asarray(bags, dtype=np.int64)
        if offsets.ndim != 1 or len(offsets) < 2 or offsets[0] != 0 or offsets[-1] != len(features):
            raise CPNNInputError(f"bag offsets must run from 0 to the number of patches ({len(features)})",
                                 field="bags", fix="pass offsets like [0, n_1, n_1 + n_2, ...]")
        empty = np.nonzero(np.diff(offsets) <= 0)[0]
        if len(empty):
            raise CPNNInputError(f"{len(empty)} bag(s) have no patches (first: {empty[:5].tolist()})",
                                 field="bags", fix="drop slides/regions without tissue tiles before predicting")
        return BagData(features, offsets)

    # ------------------------------------------------------------------ training
    def fit(
        self,
        features,
        counts,
        *,
        bags=None,
        composition_targets: Union[None, str, np.ndarray] = "deconvolve",
        groups: Optional[Sequence] = None,
        val_bags: Optional[Sequence[int]] = None,
        deconvolution_kwargs: Optional[Dict[str, Any]] = None,
        residual_groups: Optional[Sequence] = None,
    ) -> "CPNN":
        """Train on bags of patch features with one count vector per bag.

        Parameters
        ----------
        features
            ``(N, D)`` array — one patch per observation (spot level); ``(N, k, D)`` — each
            observation a bag of ``k`` sub-patches; a ``(P, D)`` array with ``bags``
            offsets, or a list of ``(n_b, D)`` arrays, one per bag (slide level).
        counts
            ``(B, G)`` raw counts per bag, columns in ``self.genes`` order, or an AnnData
            (aligned by gene name).
        bags
            ``(B + 1,)`` offsets into ``features`` when it is one array of several bags.
        composition_targets
            ``"deconvolve"`` (default: deconvolve these training counts against the
            prototypes, method §2, docs/ARCHITECTURE.md, and initialise ``a_g`` with the platform factor),
            a ``(B, K)`` array, or None (no composition loss).
        groups
            Group (patient / section / slide) of each bag; the validation part for early
            stopping is carved group-wise when there are at least 3 groups.
        val_bags
            Explicit indices of the validation bags (overrides the automatic carve).
        deconvolution_kwargs
            Passed to :func:`cpnn.prototypes.deconvolve`.
        residual_groups
            Groups held out together by the residual head's inner cross-validation
            (default ``groups``); pass patients when the training data has several, so
            that the head is kept only if it carries to new patients.

        Returns
        -------
        CPNN
            ``self``, trained, with the best validation epoch's weights.
        """
        data = self._as_bags(features, bags)
        if self.config.residual_head != "none" and int(data.sizes.max()) > 1 and np.ndim(features) != 3:
            raise CPNNInputError(
                "residual_head applies to spot-level models (one patch or one bag of sub-patches per spot); "
                "these bags look like slides", field="config.residual_head",
                fix="train slide-level models with --residual-head none (residual_head='none' in Python)")
        y = _dense_counts(counts, self.genes)
        if y.shape[0] != data.n_bags:
            raise CPNNInputError(f"{y.shape[0]} count rows for {data.n_bags} bags of features", field="counts",
                                 fix="give one count vector per spot/slide, in the order of the features")
        empty = np.nonzero(y.sum(axis=1) == 0)[0]
        if len(empty):
            raise CPNNInputError(f"{len(empty)} observations have zero counts over the model's genes "
                                 f"(first: {empty[:5].tolist()})", field="counts",
                                 fix="drop empty spots/samples before training")
        data.counts = y
        targets = self._composition_targets(composition_targets, y, deconvolution_kwargs)
        data.targets = targets

        self.scaler = FeatureScaler.fit(data.features, self.config.feature_scaling,
                                        n_components=self.config.input_pca, seed=self.train_config.seed)
        data.features = self.scaler.transform(data.features)

        import dataclasses

        from ..train.validation import carve_validation

        train_cpnn = _trainer()
        self.modules, self.train_results = [], []
        members = []
        wants_residual = self.config.residual_head != "none"
        # out-of-fold mixture: each bag predicted by the members that never trained on it
        oof_sum = np.zeros((data.n_bags, len(self.genes)), dtype=np.float64) if wants_residual else None
        oof_n = np.zeros(data.n_bags, dtype=np.int64)
        for member in range(self.train_config.n_models):
            train_idx, val_idx = carve_validation(data.n_bags, self.train_config, groups, val_bags, member)
            members.append({"train": train_idx.tolist(), "val": val_idx.tolist()})
            seed = self.train_config.seed + member
            balance = self._composition_balance(data.targets, train_idx)
            module = self._new_member(data.features.shape[1], seed, balance)
            tc = dataclasses.replace(self.train_config, seed=seed, progress_desc=_member_label(
                self.train_config.progress_desc, member, self.train_config.n_models))
            val = data.subset(val_idx) if len(val_idx) else None
            result = train_cpnn(module, data.subset(train_idx), val, self.config, tc)
            if wants_residual and len(val_idx):
                from ..train.loop import predict_bags

                oof = predict_bags(module, val, device=self.train_config.device, return_patch_outputs=False)
                oof_sum[val_idx] += oof["bag_expr"]
                oof_n[val_idx] += 1
            if self.train_config.refit and val is not None:
                # same initialisation, every training bag, the epochs validation chose
                members[-1]["refit_epochs"] = int(result.best_epoch) + 1
                module = self._new_member(data.features.shape[1], seed, balance)
                train_cpnn(module, data, None, self.config,
                           dataclasses.replace(tc, max_epochs=int(result.best_epoch) + 1, early_stopping="none",
                                               progress_desc=f"{tc.progress_desc} refit"))
            self.train_results.append(result)
            self.modules.append(module.to(self.train_config.device))
        self.split = dict(members[0])
        if len(members) > 1:
            self.split["members"] = members
        self.residual = None
        if wants_residual:
            self.residual = self._fit_residual(data, y, groups if residual_groups is None else residual_groups,
                                               oof_sum, oof_n)
        return self

    def _fit_residual(self, data, counts: np.ndarray, groups, oof_sum: np.ndarray, oof_n: np.ndarray):
        """The residual head, cross-fitted: bag-mean scaled features -> observed minus
        *out-of-fold* mixture log1p CP10k, on the training spots that some member held out
        for validation (see :mod:`cpnn.model.residual`). Fitting it on the mixture's
        in-sample predictions would teach it the networks' training error, not what the
        mixture misses on new tissue, and make its keep/drop choice optimistic."""
        from .._numerics import composition_log1p, log1p_cp10k
        from .residual import ResidualHead

        rows = np.flatnonzero(oof_n > 0)
        if len(rows) < 4:
            raise CPNNInputError(
                f"the residual head is fitted on out-of-fold predictions, but only {len(rows)} training "
                "observations were held out by an ensemble member", field="config.residual_head",
                fix="train an ensemble with validation parts (n_models >= 2, val_fraction > 0, "
                    "early stopping on) or use residual_head='none'")
        mix = oof_sum[rows] / oof_n[rows, None]
        head_groups = None if groups is None else np.asarray(groups)[rows]
        forms = ("additive",) + ((self.config.residual_head,) if self.config.residual_head in ("blend", "stacked") else ())
        head = ResidualHead(seed=self.train_config.seed, forms=forms).fit(
            data.bag_means()[rows], composition_log1p(mix), log1p_cp10k(counts[rows]), head_groups)
        head.oof_fraction_ = float(len(rows) / data.n_bags)
        return head

    def _new_member(self, in_dim: int, seed: int, balance=None):
        """A freshly initialised ensemble member (``seed``) with its composition type weights."""
        module = self._build_module(in_dim, seed)
        if balance is not None:
            module.composition_type_weights.copy_(balance)
        return module

    def _composition_balance(self, targets: Optional[np.ndarray], train_idx: np.ndarray):
        """Inverse-variance type weights (mean 1) from the training bags' targets, or None."""
        if not self.config.composition_balance or targets is None or len(train_idx) < 2:
            return None
        import torch

        var = np.asarray(targets, dtype=np.float64)[train_idx].var(axis=0)
        inv = 1.0 / np.maximum(var, 1e-2 * max(float(var.max()), 1e-12))  # at most 100x apart
        return torch.from_numpy((inv / inv.mean()).astype(np.float32))

    def _composition_targets(self, spec, counts: np.ndarray, kwargs) -> Optional[np.ndarray]:
        if spec is None:
            return None
        if isinstance(spec, str):
            if spec != "deconvolve":
                raise ValueError(f"composition_targets must be 'deconvolve', an array or None; got {spec!r}")
            from ..prototypes import deconvolve

            result = deconvolve(counts, self.prototype_values, seed=self.train_config.seed, **(kwargs or {}))
            if not np.isfinite(result.proportions).all():
                raise CPNNInputError("deconvolution gave non-finite proportions", field="composition_targets",
                                     fix="drop spots with very few counts (e.g. < 50 UMI) or pass targets explicitly")
            self.log_platform_factor = np.log(np.clip(result.platform_factor, 1e-8, None)).astype(np.float32)
            self.log_platform_factor -= self.log_platform_factor.mean()
            return np.asarray(result.proportions, dtype=np.float32)
        arr = np.asarray(spec, dtype=np.float32)
        if arr.shape != (counts.shape[0], self.n_types):
            raise CPNNInputError(f"composition targets have shape {arr.shape}; expected "
                                 f"({counts.shape[0]}, {self.n_types})", field="composition_targets")
        if not np.isfinite(arr).all() or (arr < 0).any():
            raise CPNNInputError("composition targets must be finite and non-negative", field="composition_targets")
        sums = arr.sum(axis=1, keepdims=True)
        return arr / np.where(sums > 0, sums, 1)

    # ------------------------------------------------------------------ inference
    def _check_fitted(self) -> None:
        if not self.modules or self.scaler is None:
            raise RuntimeError("this CPNN model is not trained yet: call fit() or CPNN.load()")

    def predict(self, features, bags=None, chunk_patches: int = 16384) -> Dict[str, np.ndarray]:
        """Predict cell-type weights and expression.

        Parameters
        ----------
        features
            As in :meth:`fit`. Every patch is used (no sampling).
        bags
            Optional offsets (slide level); without them each row is its own spot.
        chunk_patches
            Patches per forward chunk (bounds memory for very large bags).

        Returns
        -------
        dict
            ``weights`` (N, K) per patch; ``spot_expr`` (N, G) per-patch expression
            (a composition over genes); ``bag_expr`` (B, G); ``bag_weights`` (B, K).
            For ``(N, k, D)`` sub-patch features the patches are the ``N * k`` sub-patches
            and the bags the ``N`` spots (see :func:`per_observation`).
        """
        self._check_fitted()
        data = self._as_bags(features, bags)
        if data.features.shape[1] != self.scaler.in_dim:
            raise CPNNInputError(
                f"features have {data.features.shape[1]} dimensions but the model was trained on "
                f"{self.scaler.in_dim} (encoder {self.encoder.get('name', 'unknown')})",
                field="features", fix="extract features with the encoder the model was trained with",
            )
        data.features = self.scaler.transform(data.features)
        out = self._ensemble_outputs(data, chunk_patches)
        if self.residual is not None and self.residual.active:
            self._apply_residual(out, data, sub_patch_bags=np.ndim(features) == 3)
        return out

    def _ensemble_outputs(self, data, chunk_patches: int = 16384, return_patch_outputs: bool = True):
        """The mixture's outputs on scaled ``data``; members' compositions and weights are
        averaged (still compositions / simplices)."""
        from ..module.network import predict_bag_outputs

        return predict_bag_outputs(self.modules, data.features, data.offsets, chunk_patches=chunk_patches,
                                   device=self.train_config.device, return_patch_outputs=return_patch_outputs)

    def _apply_residual(self, out: Dict[str, np.ndarray], data, sub_patch_bags: bool) -> None:
        """Add the residual head's cell-state term (in place); the mixture-only
        expressions stay available as ``*_mixture``. Sub-patch bags are corrected per
        spot from their mean features; otherwise every patch is a spot-sized unit,
        corrected from its own features, and a bag's expression is the mean of its
        patches'."""
        if sub_patch_bags:
            out["bag_expr_mixture"] = out["bag_expr"]
            out["bag_expr"] = self.residual.correct(out["bag_expr"], data.bag_means())
            return
        out["spot_expr_mixture"], out["bag_expr_mixture"] = out["spot_expr"], out["bag_expr"]
        out["spot_expr"] = self.residual.correct(out["spot_expr"], data.features)
        bag_sum = np.add.reduceat(out["spot_expr"].astype(np.float64), data.offsets[:-1], axis=0)
        out["bag_expr"] = (bag_sum / bag_sum.sum(axis=1, keepdims=True)).astype(np.float32)

    def prototype_matrix(self) -> np.ndarray:
        """``(K, G)`` prototypes exactly as the trained network mixes them.

        ``exp(T)`` (or ``softmax_genes(T)`` with ``normalise_prototypes``), divided by one
        global constant so that an average type sums to 10,000: types keep their relative
        size, so ``p_ik * T_kg / sum_k p_ik * T_kg`` is each type's true share of gene g.
        """
        self._check_fitted()
        import torch

        mats = []
        with torch.no_grad():
            for m in self.modules:
                t = m.prototype_expression().double().cpu().numpy()
                mats.append(t / t.sum(axis=1).mean() * 1e4)
        return np.mean(mats, axis=0).astype(np.float32)

    # ------------------------------------------------------------------ files
    def save(self, path: Union[str, os.PathLike]) -> Path:
        """Write one self-describing file (config, names, provenance, encoder, weights)."""
        self._check_fitted()
        import torch

        payload = {
            "format": "cpnn-model",
            "format_version": FORMAT_VERSION,
            "cpnn_version": __version__,
            "preset": self.preset,
            "config": config_to_dict(self.config),
            "train_config": config_to_dict(self.train_config),
            "genes": self.genes,
            "cell_types": self.cell_types,
            "prototypes": torch.from_numpy(self.prototype_values),
            "prototype_provenance": _jsonable(self.prototype_provenance),
            "encoder": _jsonable(self.encoder),
            "in_dim": int(self.module.in_dim),
            "log_platform_factor": None if self.log_platform_factor is None else torch.from_numpy(self.log_platform_factor),
            "scaler": self.scaler.to_dict(),
            "state_dict": self.module.state_dict(),
            "member_state_dicts": [m.state_dict() for m in self.modules[1:]],
            "history": _jsonable(self.train_result.history if self.train_result else []),
            "best_epoch": int(self.train_result.best_epoch) if self.train_result else -1,
            "member_best_epochs": [int(r.best_epoch) for r in self.train_results],
            "split": self.split,
            "residual_head": None if self.residual is None else {
                k: torch.from_numpy(v) if isinstance(v, np.ndarray) else _jsonable(v)
                for k, v in self.residual.to_dict().items()},
        }
        return write_model_file(path, payload)

    @classmethod
    def load(cls, path: Union[str, os.PathLike], genes: Optional[Sequence[str]] = None,
             encoder: Union[None, str, Dict[str, Any]] = None) -> "CPNN":
        """Read a model written by :meth:`save`.

        Parameters
        ----------
        path
            The model file.
        genes
            If given, the gene order the caller expects; a mismatch raises an error that
            says what differs.
        encoder
            If given, the encoder name (or a dict with ``name``, ``patch_um``, ``out_px``,
            ``tta`` — e.g. a feature file's attributes) of the caller's features; must match.
        """
        path = Path(path)
        payload = read_model_file(path, "cpnn-model", "cpnn model", "CPNN.save / cpnn fit")
        version = payload.get("format_version")
        if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
            raise CPNNInputError(
                f"model file format version {version!r} is not one this cpnn {__version__} reads "
                f"(1 to {FORMAT_VERSION})", path=path, field="format_version",
                fix="load it with the cpnn version that wrote it (its 'cpnn_version' entry), or retrain")
        if genes is not None and list(genes) != payload["genes"]:
            _raise_gene_mismatch(path, payload["genes"], list(genes))
        check_encoder(payload.get("encoder") or {}, encoder, path)

        class _P:
            values = payload["prototypes"].numpy()
            cell_types = payload["cell_types"]
            genes = payload["genes"]
            provenance = payload["prototype_provenance"]

        model = cls(_P(), config_from_dict(CPNNConfig, payload["config"]),
                    config_from_dict(TrainConfig, payload["train_config"]), payload.get("encoder"))
        model.preset = payload.get("preset")  # None in version-1 files (every option is recorded)
        lpf = payload.get("log_platform_factor")
        model.log_platform_factor = None if lpf is None else lpf.numpy()
        model.scaler = FeatureScaler.from_dict(payload["scaler"])
        for state in [payload["state_dict"], *payload.get("member_state_dicts", [])]:
            module = model._build_module(int(payload["in_dim"]))
            module.load_state_dict(state)
            module.eval()
            model.modules.append(module)
        model.split = payload.get("split", {})
        if payload.get("residual_head") is not None:
            from .residual import ResidualHead

            model.residual = ResidualHead.from_dict(
                {k: v.numpy() if hasattr(v, "numpy") else v for k, v in payload["residual_head"].items()})
        from ..train.loop import TrainResult

        bests = payload.get("member_best_epochs") or [payload.get("best_epoch", -1)]
        model.train_results = [TrainResult(history=payload.get("history", []) if i == 0 else [], best_epoch=b)
                               for i, b in enumerate(bests)]
        return model


def _trainer():
    """``train_cpnn`` (the one loop); when ``torchrun`` started several processes
    (``WORLD_SIZE > 1``) the process group is joined first, so that the same loop trains
    data-parallel, every process ending with the same weights (see docs/DISTRIBUTED.md)."""
    from ..train.distributed import dist_env
    from ..train.loop import train_cpnn

    if dist_env()[1] > 1:
        from ..train.distributed import init_distributed

        _, _, device = init_distributed()
        return lambda *args: train_cpnn(*args, device=device)
    return train_cpnn


def per_observation(outputs: Dict[str, np.ndarray], features) -> Dict[str, np.ndarray]:
    """``expression`` and ``weights`` per observation from :meth:`CPNN.predict` outputs:
    the bag outputs when ``features`` were ``(N, k, D)`` sub-patch bags, else the patches'.
    With an active residual head, ``mixture`` is the expression of the cell-type mixture alone."""
    if np.ndim(features) == 3:
        out = {"expression": outputs["bag_expr"], "weights": outputs["bag_weights"]}
        mixture = outputs.get("bag_expr_mixture")
    else:
        out = {"expression": outputs["spot_expr"], "weights": outputs["weights"]}
        mixture = outputs.get("spot_expr_mixture")
    if mixture is not None:
        out["mixture"] = mixture
    return out


def check_encoder(saved: Dict[str, Any], given: Union[None, str, Dict[str, Any]], path=None) -> None:
    """Refuse features whose encoder or patch geometry differs from the model's.

    ``given`` is an encoder name or a dict with any of ``name``/``encoder``, ``patch_um``,
    ``out_px``, ``tta``, ``subpatch_grid`` (a feature file's attributes work as they are).
    A model record without ``subpatch_grid`` was trained on one patch per spot.
    """
    if given is None or not saved:
        return
    given = {"name": given} if isinstance(given, str) else dict(given)
    if "name" not in given and given.get("encoder"):
        given["name"] = given["encoder"]
    diffs = []
    for key in ("name", "patch_um", "out_px", "tta", "subpatch_grid"):
        a, b = saved.get(key), given.get(key)
        if key == "subpatch_grid" and a is None:
            a = 1
        if a is None or b is None:
            continue
        numeric = key in ("patch_um", "out_px", "subpatch_grid")
        same = abs(float(a) - float(b)) < 1e-6 * max(1.0, abs(float(a))) if numeric else a == b
        if not same:
            diffs.append(f"{key}: model {a!r}, features {b!r}")
    if diffs:
        raise CPNNInputError(
            "features do not match the model's encoder (" + "; ".join(diffs) + ")", path=path, field="encoder",
            fix=f"extract features with --encoder {saved.get('name')} --patch-um {saved.get('patch_um')}"
                + (f" --subpatch-grid {saved['subpatch_grid']}" if (saved.get("subpatch_grid") or 1) > 1 else ""),
        )


def _raise_gene_mismatch(path, saved, given) -> None:
    s, g = set(saved), set(given)
    if s == g:
        first = next(i for i, (a, b) in enumerate(zip(saved, given)) if a != b)
        detail = f"same genes in a different order (first difference at position {first}: model '{saved[first]}', given '{given[first]}')"
    else:
        detail = (f"{len(s - g)} model genes missing from the input (e.g. {', '.join(sorted(s - g)[:5])}), "
                  f"{len(g - s)} extra (e.g. {', '.join(sorted(g - s)[:5])})")
    raise CPNNInputError(f"gene order does not match the model: {detail}", path=path, field="genes",
                         fix="align the input's genes to the model's (CPNN.genes) before predicting")


def _jsonable(obj):
    """Lists/dicts/str/float only, so the file loads with torch's weights_only=True."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)


def _member_label(base: str, member: int, n_models: int) -> str:
    """Progress-bar label of one ensemble member: ``"member 2/4"`` (``base`` alone for one model)."""
    if n_models <= 1:
        return base
    return f"member {member + 1}/{n_models}" if base == "training" else f"{base}: member {member + 1}/{n_models}"

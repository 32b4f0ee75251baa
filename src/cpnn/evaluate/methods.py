"""Methods a benchmark compares, behind one registry.

A method is a function ``fn(train, test, ctx, /, **options) -> MethodOutput`` (positional-only
data arguments, so that options such as ``train:`` never clash with them):

* ``train`` is a :class:`TrainData` (features, raw counts of the fold's genes, groups
  and the fold's validation mask — all from the training folds);
* ``test`` is a :class:`TestData` with features, groups and ids only: **test targets are
  never handed to a method**, so no method can select anything on them;
* ``ctx`` is a :class:`MethodContext` (genes, seed, prototypes and deconvolution caches).

It returns predicted log1p CP10k expression of the test observations (genes in
``ctx.genes`` order) and, for CPNN-like methods, cell-type weights. Register new kinds
(e.g. slide-level baselines) with :func:`register_method`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import numpy as np

from .._numerics import composition_log1p
from ..errors import CPNNInputError
from .metrics import to_log1p_cp10k

_METHODS: Dict[str, Callable[..., "MethodOutput"]] = {}
#: method kind -> its runner on slide bags (registered by cpnn.evaluate.slide_methods)
BAG_RUNNERS: Dict[str, Callable[..., "MethodOutput"]] = {}
_OPTIONS: Dict[str, Any] = {}


@dataclass
class TrainData:
    """Training observations of one fold (validation part included, marked by ``val``)."""

    features: np.ndarray
    counts: np.ndarray
    groups: np.ndarray
    val: np.ndarray  # bool mask: the fold's validation part (for early stopping)
    ids: List[str] = field(default_factory=list)
    # genes outside the scored set (most expressed first) and their counts in these
    # training observations: a method may model more genes than it is scored on
    more_genes: List[str] = field(default_factory=list)
    more_counts: Optional[np.ndarray] = None


@dataclass
class TestData:
    """Test observations of one fold: inputs only, never their targets."""

    __test__ = False  # not a pytest test class

    features: np.ndarray
    groups: np.ndarray
    ids: List[str] = field(default_factory=list)


@dataclass
class MethodContext:
    """What a method may use besides its data: genes, seed and shared caches."""

    genes: List[str]
    seed: int
    fold: int
    gene_set: str
    prototypes: Callable[..., Any]  # prototypes(label=..., method=..., genes=None) -> Prototypes (ctx.genes by default)
    deconvolution: Callable[..., Any]  # deconvolution(prototypes, key, counts) -> Deconvolution (cached)
    encoder: Dict[str, Any] = field(default_factory=dict)
    progress: bool = False


@dataclass
class MethodOutput:
    """Predictions of one method on one fold's test observations."""

    expression: np.ndarray  # (N_test, G) log1p CP10k
    weights: Optional[np.ndarray] = None  # (N_test, K)
    cell_types: Optional[List[str]] = None
    info: Dict[str, Any] = field(default_factory=dict)


def register_method(kind: str, options=None):
    """Decorator registering ``fn(train, test, ctx, **options) -> MethodOutput`` as ``kind``.

    ``options``: the option names a config may give this kind (a sequence, or a function
    returning one, called when a config is checked); unknown options are then an error at
    load. None: not checked.
    """

    def deco(fn):
        _METHODS[kind] = fn
        _OPTIONS[kind] = options
        return fn

    return deco


def method_options(kind: str):
    """The valid options of ``kind`` (a tuple), or None when the kind does not declare them."""
    get_method(kind)
    opts = _OPTIONS.get(kind)
    return tuple(opts() if callable(opts) else opts) if opts is not None else None


def get_method(kind: str):
    """The registered method function of ``kind``."""
    if kind not in _METHODS:
        raise CPNNInputError(f"unknown method kind {kind!r}", field="methods[].kind",
                             fix=f"use one of {', '.join(sorted(_METHODS))} or register_method() your own")
    return _METHODS[kind]


def list_methods() -> List[str]:
    """Registered method kinds."""
    return sorted(_METHODS)


# --------------------------------------------------------------------------- CPNN
CPNN_SHORTCUTS = ("loss", "gene_factors", "learn_prototypes", "normalise_prototypes", "hidden", "dropout",
                  "composition_weight", "template_weight", "feature_scaling", "input_pca",
                  "composition_balance", "residual_head")


def cpnn_configs(options: Dict[str, Any], seed: int, progress: bool = False):
    """(CPNNConfig, TrainConfig) of a ``cpnn`` method entry.

    ``preset`` names a :mod:`cpnn.presets` preset: ``package`` (default; = ``spot``,
    ``cpnn fit``'s spot settings), ``paper`` (the paper's spot-level settings: its network
    and NB loss, its spot head ``p_i @ softmax_genes(T)`` without the platform factors, early
    stopping on the validation loss) or any other. ``model:``/``train:`` dicts and the
    shortcuts ``loss``, ``gene_factors``, ``learn_prototypes`` ... override them.
    """
    from ..presets import get_preset, preset_names

    name = options.get("preset", "package")
    try:
        preset = get_preset(name)
    except ValueError:
        raise CPNNInputError(f"unknown cpnn preset {name!r}", field="methods[].preset",
                             fix=f"use package or one of {', '.join(preset_names())}") from None
    model = dict(options.get("model") or {})
    for k in CPNN_SHORTCUTS:
        if k in options:
            model[k] = options[k]
    train = dict(options.get("train") or {})
    train["seed"] = int(options.get("seed", seed))
    train["progress"] = progress
    try:
        return preset.configs(model, train)
    except ValueError as exc:
        raise CPNNInputError(str(exc), field="methods[].model/train") from exc


def _mlp_options():
    import inspect

    from ..model.probes import MLPRegressor

    return [p for p in inspect.signature(MLPRegressor.__init__).parameters if p != "self"]


@register_method("cpnn", options=("preset", "label", "prototypes", "composition_targets", "deconvolution",
                                  "train_genes", "model", "train", "seed", *CPNN_SHORTCUTS))
def run_cpnn(train: TrainData, test: TestData, ctx: MethodContext, /, **options) -> MethodOutput:
    """CPNN at spot level. Options: ``preset``, ``label`` (reference column, or
    ``kmeans<k>``), ``prototypes`` (``regression``/``naive``), ``composition_targets``
    (``deconvolve``/``none``), ``deconvolution`` (kwargs), ``train_genes`` (model this
    many genes: the scored ones plus the training data's most expressed others; the
    prediction is renormalised over the scored genes), ``model``, ``train`` and the
    shortcuts of :func:`cpnn_configs`."""
    from ..model import CPNN

    if getattr(train.features, "dtype", None) == object:  # slide bags (data kinds bulk, pseudobulk)
        if "cpnn" not in BAG_RUNNERS:
            raise CPNNInputError("slide-level CPNN is not registered", field="methods[].kind",
                                 fix="import cpnn.evaluate (it registers cpnn.evaluate.slide_methods)")
        return BAG_RUNNERS["cpnn"](train, test, ctx, **options)
    t0 = time.perf_counter()
    cfg, tcfg = cpnn_configs(options, ctx.seed, ctx.progress)
    label, proto_method = options.get("label"), options.get("prototypes", "regression")
    protos = ctx.prototypes(label=label, method=proto_method)
    if list(protos.genes) != list(ctx.genes):
        raise CPNNInputError("prototype genes differ from the fold's gene set", field="genes",
                             fix="report this: gene sets are restricted to reference genes beforehand")
    n_scored = len(ctx.genes)
    counts = train.counts
    model_protos = protos
    n_extra = max(0, int(options.get("train_genes") or 0) - n_scored)
    if n_extra and train.more_genes:
        extra = list(train.more_genes[:n_extra])
        model_protos = ctx.prototypes(label=label, method=proto_method, genes=list(ctx.genes) + extra)
        if list(model_protos.genes) != list(ctx.genes) + extra:
            raise CPNNInputError("prototypes dropped or reordered training genes", field="genes",
                                 fix="report this: candidate genes are restricted to reference genes beforehand")
        counts = np.concatenate([train.counts, train.more_counts[:, :len(extra)]], axis=1)
    model = CPNN(model_protos, cfg, tcfg, encoder=ctx.encoder)
    model.preset = options.get("preset", "package")
    targets = deconvolution_targets(model, ctx, protos, train.counts, options, counts.shape[1] - n_scored)
    # one model: the split's validation part; an ensemble: each member validates on
    # another training group (all of them training data, never the test fold)
    val = np.flatnonzero(train.val) if train.val.any() and tcfg.n_models == 1 else None
    model.fit(train.features, counts, composition_targets=targets, groups=train.groups, val_bags=val)
    from ..model.cpnn_model import per_observation

    out = per_observation(model.predict(test.features), test.features)
    tr = model.train_result
    scored = out["expression"][:, :n_scored].astype(np.float64)
    scored /= scored.sum(axis=1, keepdims=True)
    return MethodOutput(
        expression=composition_log1p(scored),
        weights=out["weights"], cell_types=list(model.cell_types),
        info={"best_epoch": tr.best_epoch, "epochs_run": tr.epochs_run, "criterion": tr.criterion,
              "n_cell_types": len(model.cell_types), "n_model_genes": len(model.genes),
              **_residual_info(model.residual),
              "fit_seconds": round(time.perf_counter() - t0, 1)},
    )


def deconvolution_targets(model, ctx: MethodContext, protos, counts: np.ndarray, options: Dict[str, Any],
                          n_extra: int = 0) -> Optional[np.ndarray]:
    """Composition targets of a ``cpnn`` entry (``composition_targets: deconvolve`` or
    ``none``), setting ``model.log_platform_factor`` as ``CPNN.fit(..., "deconvolve")`` does.

    One deconvolution per (fold, gene set, prototypes) shared by all variants, over the
    scored genes; ``n_extra`` modelled genes beyond them start at the mean factor."""
    mode = options.get("composition_targets", "deconvolve")
    if mode in (None, "none"):
        return None
    if mode != "deconvolve":
        raise CPNNInputError(f"unknown composition_targets {mode!r}", field="methods[].composition_targets",
                             fix="use deconvolve or none")
    dec = ctx.deconvolution(protos, counts, **(options.get("deconvolution") or {}))
    lpf = np.log(np.clip(dec.platform_factor, 1e-8, None)).astype(np.float32)
    lpf = lpf - lpf.mean()
    model.log_platform_factor = np.concatenate([lpf, np.zeros(n_extra, np.float32)])
    return np.asarray(dec.proportions, dtype=np.float32)


# --------------------------------------------------------------------------- baselines
def spot_level(features: np.ndarray) -> np.ndarray:
    """One row per observation: ``(N, k, D)`` sub-patch features averaged over the
    sub-patches (methods without a bag head), slide bags (a 1-D object array of
    ``(n_i, D)``) averaged over their tiles, ``(N, D)`` unchanged."""
    if getattr(features, "dtype", None) == object:
        return np.stack([np.asarray(b, dtype=np.float64).mean(0) for b in features]).astype(np.float32)
    features = np.asarray(features, dtype=np.float32)
    return features.mean(axis=1) if features.ndim == 3 else features


def _residual_info(head) -> Dict[str, Any]:
    """The residual head's choice for results.csv (``info_residual_*`` columns)."""
    described = {} if head is None else head.describe()
    quantiles = described.get("mixture_coef_quantiles_10_50_90")
    return {"residual_alpha": described.get("alpha"), "residual_form": described.get("form"),
            "residual_mixture_coef_median": None if quantiles is None else quantiles[1],
            "residual_mixture_weight": described.get("mixture_weight")}


@register_method("ridge", options=("alphas", "n_components", "n_inner_folds", "seed"))
def run_ridge(train: TrainData, test: TestData, ctx: MethodContext, /, **options) -> MethodOutput:
    """HEST-Benchmark probe (standardise, PCA, ridge) on log1p CP10k. Options:
    ``alphas`` (``cv`` inner CV grouped by training groups, ``hest`` the published
    penalty, or a list), ``n_components`` (256), ``n_inner_folds`` (4)."""
    from ..model.probes import RidgeProbe

    probe = RidgeProbe(n_components=int(options.get("n_components", 256)), alphas=options.get("alphas", "cv"),
                       n_inner_folds=int(options.get("n_inner_folds", 4)), seed=int(options.get("seed", ctx.seed)))
    probe.fit(spot_level(train.features), to_log1p_cp10k(train.counts), groups=train.groups)
    return MethodOutput(expression=probe.predict(spot_level(test.features)), info={"alpha": probe.alpha_})


@register_method("mlp", options=_mlp_options)
def run_mlp(train: TrainData, test: TestData, ctx: MethodContext, /, **options) -> MethodOutput:
    """MLP regressor on log1p CP10k (:class:`cpnn.model.probes.MLPRegressor` options)."""
    from ..model.probes import MLPRegressor

    kw = {k: v for k, v in options.items() if k not in ("name", "kind")}
    kw.setdefault("seed", ctx.seed)
    try:
        mlp = MLPRegressor(**kw)
    except TypeError as exc:
        raise CPNNInputError(f"bad mlp option: {exc}", field="methods[]") from exc
    mlp.fit(spot_level(train.features), to_log1p_cp10k(train.counts), groups=train.groups)
    return MethodOutput(expression=mlp.predict(spot_level(test.features)))



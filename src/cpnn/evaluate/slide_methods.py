"""Slide-level benchmark methods: every observation is a bag of tile features (a slide, or
the pooled slides of one sample) with one bulk RNA-seq profile.

A slide-level benchmark (``data: {kind: bulk}``) hands methods a 1-D object array of
``(n_tiles, D)`` bags as ``features``. Registered here:

* ``cpnn`` on bags (dispatched from :func:`cpnn.evaluate.methods.run_cpnn`): CPNN with one
  bag per slide, composition targets from deconvolving the training bulks; presets as
  for spots (``package``: ``cpnn fit``'s defaults with 8 bags per step, as
  ``cpnn fit --level bulk`` trains; ``paper``: the paper's slide head, NB loss and
  METHOD.md §5 training, early stopping on the validation loss);
* ``meanpool_mlp``, ``abmil``, ``he2rna``, ``sum_of_tiles``: the slide baselines of
  :mod:`cpnn.model.slide_baselines` (same early stopping and validation carve);
* ``ridge`` and ``mlp`` work on bags as they are: :func:`cpnn.evaluate.methods.spot_level`
  mean-pools each bag (ridge on mean features).
"""
from __future__ import annotations

import time
from typing import List

import numpy as np

from ..errors import CPNNInputError
from .methods import (BAG_RUNNERS, MethodContext, MethodOutput, TestData, TrainData, cpnn_configs,
                      deconvolution_targets, register_method)

#: options of a slide baseline entry that go to the optimiser (the rest go to its module)
_TRAIN_KEYS = ("train", "seed", "feature_scaling")


def is_bags(features) -> bool:
    """Whether ``features`` is a 1-D object array of per-observation bags."""
    return isinstance(features, np.ndarray) and features.dtype == object


def bag_list(features) -> List[np.ndarray]:
    """Bags as a list of ``(n_i, D)`` float32 arrays: object arrays as they are, ``(N, k, D)``
    sub-patch features one bag per spot, ``(N, D)`` one patch per bag."""
    if is_bags(features):
        return [np.asarray(b, dtype=np.float32) for b in features]
    f = np.asarray(features, dtype=np.float32)
    return [x for x in (f if f.ndim == 3 else f[:, None, :])]


def _slide_train_config(options: dict, ctx: MethodContext, preset_train: dict):
    from ..config import TrainConfig, config_from_dict
    from ..presets import get_preset

    # the slide baselines train like `cpnn fit --level bulk` (the `bulk` preset's optimiser)
    train = {**get_preset("bulk").train_options(), **preset_train, **(options.get("train") or {})}
    train["seed"] = int(options.get("seed", ctx.seed))
    train["progress"] = ctx.progress
    try:
        return config_from_dict(TrainConfig, train)
    except ValueError as exc:
        raise CPNNInputError(str(exc), field="methods[].train") from exc


def run_cpnn_bags(train: TrainData, test: TestData, ctx: MethodContext, /, **options) -> MethodOutput:
    """CPNN on slide bags (see the module docstring). Options as for ``cpnn`` at spot level
    (``preset``, ``label``, ``prototypes``, ``composition_targets``, ``deconvolution``,
    ``model``, ``train`` and the shortcuts); ``residual_head`` is always off (a spot-level term)."""
    from ..model import CPNN

    t0 = time.perf_counter()
    # bags are slides or regions: the paper's slide head (METHOD.md §3: exp(a_g) e_i + exp(b_g),
    # exp(T)) for `paper`, and `cpnn fit --level bulk`'s settings (8 bags a step) for `package`
    preset = {"paper": "paper_slide", "package": "bulk"}.get(options.get("preset", "package"),
                                                             options.get("preset", "package"))
    cfg, tcfg = cpnn_configs({**options, "preset": preset, "residual_head": "none"}, ctx.seed, ctx.progress)
    protos = ctx.prototypes(label=options.get("label"), method=options.get("prototypes", "regression"))
    model = CPNN(protos, cfg, tcfg, encoder=ctx.encoder)
    targets = deconvolution_targets(model, ctx, protos, train.counts, options)
    val = np.flatnonzero(train.val) if train.val.any() and tcfg.n_models == 1 else None
    model.fit(bag_list(train.features), train.counts, composition_targets=targets, groups=train.groups, val_bags=val)
    out = model.predict(bag_list(test.features))
    tr = model.train_result
    return MethodOutput(
        expression=np.log1p(out["bag_expr"].astype(np.float64) * 1e4), weights=out["bag_weights"],
        cell_types=list(model.cell_types),
        info={"best_epoch": tr.best_epoch, "epochs_run": tr.epochs_run, "criterion": tr.criterion,
              "n_cell_types": len(model.cell_types), "fit_seconds": round(time.perf_counter() - t0, 1)})


def _baseline(kind: str):
    def run(train: TrainData, test: TestData, ctx: MethodContext, /, **options) -> MethodOutput:
        from ..model.slide_baselines import SlideBaseline

        tc = _slide_train_config(options, ctx, {})
        module_kw = {k: v for k, v in options.items() if k not in _TRAIN_KEYS}
        try:
            model = SlideBaseline(kind, ctx.genes, tc, feature_scaling=options.get("feature_scaling", "robust"),
                                  **module_kw)
            val = np.flatnonzero(train.val) if train.val.any() else None
            model.fit(bag_list(train.features), train.counts, groups=train.groups, val_bags=val)
        except TypeError as exc:
            raise CPNNInputError(f"bad {kind} option: {exc}", field="methods[]") from exc
        return MethodOutput(expression=model.predict(bag_list(test.features)),
                            info={"best_epoch": model.best_epoch, "epochs_run": len(model.history)})

    run.__name__ = f"run_{kind}"
    run.__doc__ = (f"Slide baseline ``{kind}`` (:class:`cpnn.model.slide_baselines.SlideBaseline`) on bags; "
                   "options: ``train`` (TrainConfig fields), ``seed``, ``feature_scaling`` and the module's "
                   "keywords (``hidden``, ``dropout``, ...).")
    return run


def _register() -> None:
    from ..model.slide_baselines import BASELINE_NAMES

    for kind in BASELINE_NAMES:
        register_method(kind)(_baseline(kind))


_register()


BAG_RUNNERS["cpnn"] = run_cpnn_bags  # `kind: cpnn` on slide bags

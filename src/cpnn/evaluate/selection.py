"""Nested selection: choose a method's options on the training groups of an outer fold only.

A benchmark method entry may list ``candidates`` — option name -> list of values, e.g.
``candidates: {loss: [nb, mse_log1p], hidden: [[256], [1024, 512]]}``. For each outer fold,
every combination is trained on inner folds made of that fold's *training* groups only
(leave one training group out, or grouped k-fold when there are more groups than
``max_inner_folds``) and scored on the held-out training group; the combination with the
best mean inner score is then trained on the whole outer training part and scored once on
the outer test fold. The outer test fold is never seen by a choice: it is not in the
arrays handed to :func:`select` at all.

Ties keep the first candidate in list order, so the first value of each list is the
preference when the data cannot tell the candidates apart. ``rule: one_se`` makes that
preference firmer: another candidate replaces the first only when it beats it by more than
one standard error of their paired per-inner-fold differences (:func:`choose`), so a
difference the inner folds cannot resolve never changes a default.
"""
from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from ..errors import CPNNInputError

#: the ``selection:`` section of a benchmark config
DEFAULT_SELECTION: Dict[str, Any] = {"metric": "scc_mean", "max_inner_folds": 4, "max_candidates": 32,
                                     "rule": "best"}
SELECTION_METRICS = ("scc_mean", "pcc_mean", "scc_median", "pcc_median")
SELECTION_RULES = ("best", "one_se")


def check_rule(rule: str) -> str:
    """``rule`` if it is one of :data:`SELECTION_RULES`, else a CPNNInputError naming them."""
    if rule not in SELECTION_RULES:
        raise CPNNInputError(f"unknown selection rule {rule!r}", field="selection.rule",
                             fix=f"use one of {', '.join(SELECTION_RULES)}")
    return rule


def choose(table: List[Dict[str, Any]], rule: str = "best") -> int:
    """Index of the winning candidate of a selection ``table`` (``options``, ``mean``, ``folds``).

    ``best``: the highest mean inner score; ties keep the earlier candidate.
    ``one_se``: the first candidate (the preferred one, e.g. the current default) unless
    another beats it on the paired per-inner-fold differences ``d_k = score_k - first_k`` by
    more than one standard error, ``mean(d) > sd(d) / sqrt(K)``; among those that do, the
    highest mean. With fewer than two usable inner folds there is no standard error and
    the first candidate is kept.
    """
    check_rule(rule)
    best = max(range(len(table)), key=lambda i: (table[i]["mean"], -i))
    if rule == "best":
        return best
    first = np.asarray(table[0]["folds"], dtype=np.float64)
    winners = []
    for i in range(1, len(table)):
        d = np.asarray(table[i]["folds"], dtype=np.float64) - first
        d = d[np.isfinite(d)]
        if len(d) >= 2 and d.mean() > d.std(ddof=1) / np.sqrt(len(d)):
            winners.append(i)
    return max(winners, key=lambda i: (table[i]["mean"], -i)) if winners else 0


def candidate_grid(candidates: Dict[str, Sequence[Any]], where: str = "methods[].candidates",
                   max_candidates: int = 32) -> List[Dict[str, Any]]:
    """Every combination of the candidate values, first values first.

    Parameters
    ----------
    candidates
        Option name -> non-empty list of values.
    where
        Config field named in errors.
    max_candidates
        Refuse grids larger than this (each combination is trained on every inner fold).

    Returns
    -------
    list of dict
        One option dict per combination; ``[{}]`` for no candidates.
    """
    if not candidates:
        return [{}]
    if not isinstance(candidates, dict):
        raise CPNNInputError(f"candidates must be a mapping option -> list of values, got {candidates!r}",
                             field=where, fix="e.g. candidates: {loss: [nb, mse_log1p]}")
    names = list(candidates)
    values = []
    for name in names:
        v = candidates[name]
        if not isinstance(v, (list, tuple)) or len(v) == 0:
            raise CPNNInputError(f"candidates for {name!r} must be a non-empty list, got {v!r}",
                                 field=f"{where}.{name}", fix=f"e.g. {name}: [a, b]")
        values.append(list(v))
    grid = [dict(zip(names, combo)) for combo in itertools.product(*values)]
    if len(grid) > max_candidates:
        raise CPNNInputError(f"{len(grid)} candidate combinations (more than {max_candidates}); each is trained "
                             "on every inner fold", field=where,
                             fix="list fewer values, or raise selection.max_candidates")
    return grid


def describe(choice: Dict[str, Any]) -> str:
    """A compact, stable text of one candidate combination (``{}`` for none)."""
    return json.dumps(choice, sort_keys=True, default=str) if choice else "{}"


def inner_splits(groups: np.ndarray, max_inner_folds: int, seed: int, val_fraction: float) -> List[dict]:
    """Inner folds over the training groups of one outer fold.

    Leave one group out when there are at most ``max_inner_folds`` groups, else grouped
    k-fold with ``max_inner_folds`` folds. Indices are positions in ``groups``.
    """
    from ..data.splits import grouped_folds, leave_one_group_out

    uniq = sorted(set(np.asarray(groups).tolist()))
    if len(uniq) < 2:
        raise CPNNInputError(f"nested selection needs at least 2 training groups, got {len(uniq)} ({uniq})",
                             field="methods[].candidates",
                             fix="drop the candidates of this method or use more groups (patients/sections)")
    if len(uniq) <= max_inner_folds:
        return leave_one_group_out(groups, seed=seed, val_fraction=val_fraction)
    return grouped_folds(groups, n_folds=max_inner_folds, seed=seed, val_fraction=val_fraction)


@dataclass
class Selection:
    """What nested selection chose for one method on one outer fold."""

    choice: Dict[str, Any]
    score: float  # mean inner score of the choice
    metric: str
    table: List[Dict[str, Any]] = field(default_factory=list)  # every candidate: options, mean, per inner fold
    inner_groups: List[List[str]] = field(default_factory=list)  # held-out groups of each inner fold

    def to_dict(self) -> Dict[str, Any]:
        return {"choice": self.choice, "score": self.score, "metric": self.metric, "table": self.table,
                "inner_test_groups": self.inner_groups}


def select(
    grid: List[Dict[str, Any]],
    train_and_score: Callable[[Dict[str, Any], np.ndarray, np.ndarray, np.ndarray, int], Dict[str, float]],
    groups: np.ndarray,
    *,
    metric: str = "scc_mean",
    max_inner_folds: int = 4,
    seed: int = 0,
    val_fraction: float = 0.2,
    log: Optional[Callable[[str], None]] = None,
    rule: str = "best",
) -> Selection:
    """Score every candidate on inner folds of the training groups; keep the best.

    Parameters
    ----------
    grid
        Candidate option dicts (:func:`candidate_grid`).
    train_and_score
        ``f(options, inner_train_idx, inner_val_mask, inner_test_idx, inner_fold) -> metrics``:
        trains on ``inner_train_idx`` (positions in ``groups``; ``inner_val_mask`` marks its
        early-stopping part) and returns the metrics of the predictions on ``inner_test_idx``.
    groups
        Group of each training observation of the outer fold (never the outer test fold).
    metric
        Key of the metrics to maximise (mean over inner folds).
    max_inner_folds, seed, val_fraction
        See :func:`inner_splits`.
    log
        Optional progress callback.
    rule
        ``"best"`` or ``"one_se"`` (see :func:`choose`).

    Returns
    -------
    Selection
    """
    check_rule(rule)  # before any training
    if metric not in SELECTION_METRICS:
        raise CPNNInputError(f"unknown selection metric {metric!r}", field="selection.metric",
                             fix=f"use one of {', '.join(SELECTION_METRICS)}")
    if len(grid) == 1:
        return Selection(grid[0], float("nan"), metric, [{"options": grid[0], "mean": float("nan"), "folds": []}])
    folds = inner_splits(groups, max_inner_folds, seed, val_fraction)
    table = []
    for c, options in enumerate(grid):
        scores = []
        for f in folds:
            tr = np.sort(np.asarray(f["train"] + f["val"], dtype=np.int64))
            val_mask = np.isin(tr, np.asarray(f["val"], dtype=np.int64))
            te = np.asarray(f["test"], dtype=np.int64)
            met = train_and_score(options, tr, val_mask, te, int(f["fold"]))
            scores.append(float(met[metric]))
            if log is not None:
                log(f"  candidate {c + 1}/{len(grid)} {describe(options)} inner fold {f['fold'] + 1}/{len(folds)} "
                    f"(held out {','.join(map(str, f['test_groups']))}): {metric} {scores[-1]:.3f}")
        mean = float(np.nanmean(scores)) if np.isfinite(scores).any() else float("-inf")
        table.append({"options": options, "mean": mean, "folds": scores})
    best = choose(table, rule)
    return Selection(grid[best], table[best]["mean"], metric, table,
                     [list(map(str, f["test_groups"])) for f in folds])

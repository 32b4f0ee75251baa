"""Group-aware (patient- or section-wise) cross-validation splits, saved as JSON.

No group ever appears on two sides of a fold. The reference code split by *sample*,
so sections of one patient could sit in train and test; here the caller chooses the
grouping (patient where there are several, section otherwise, and says which).

A fold is a dict::

    {"fold": i, "train": [...], "val": [...], "test": [...],
     "train_groups": [...], "val_groups": [...], "test_groups": [...],
     "val_mode": "none" | "groups" | "observations"}

``val_mode == "observations"`` means fewer than 3 training groups were left, so the
validation part is a seeded random subset of the training *observations*: it then
shares groups with the training part (fine for early stopping, not for reporting).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd

from cpnn.errors import CPNNInputError
from cpnn.utils import write_json

SPLITS_FORMAT = "cpnn-splits"
SPLITS_VERSION = 1
N_ORDERS = 64


def _as_groups(groups: Sequence[Any]) -> np.ndarray:
    g = pd.Series(list(groups), dtype=object)
    if g.isna().any():
        raise CPNNInputError(f"{int(g.isna().sum())} observation(s) have no group.",
                             field="groups", fix="give every observation a patient/section label.")
    return g.astype(str).to_numpy()


def _labels(idx: np.ndarray, ids: Optional[Sequence[Any]]) -> list:
    if ids is None:
        return [int(i) for i in idx]
    return [ids[int(i)] if not isinstance(ids[int(i)], np.generic) else ids[int(i)].item() for i in idx]


def _carve_val(
    train_groups: list[str], g: np.ndarray, val_fraction: float, rng: np.random.Generator
) -> tuple[list[str], np.ndarray, np.ndarray, str]:
    """Split training observations into (train, val) index arrays."""
    train_idx = np.flatnonzero(np.isin(g, train_groups))
    if val_fraction <= 0:
        return [], train_idx, np.array([], dtype=np.int64), "none"
    if len(train_groups) >= 3:
        order = rng.permutation(len(train_groups))
        target = val_fraction * len(train_idx)
        val_groups: list[str] = []
        n = 0
        for j in order:
            if len(val_groups) >= len(train_groups) - 1:  # keep >= 1 group for training
                break
            if val_groups and n >= target:
                break
            val_groups.append(train_groups[j])
            n += int((g == train_groups[j]).sum())
        val_mask = np.isin(g[train_idx], val_groups)
        return sorted(val_groups), train_idx[~val_mask], train_idx[val_mask], "groups"
    if len(train_idx) < 2:
        raise CPNNInputError(
            f"{len(train_idx)} training observation(s): nothing to carve a validation part from.",
            field="val_fraction", fix="use val_fraction=0 or fewer folds.",
        )
    n_val = int(round(val_fraction * len(train_idx)))
    n_val = min(max(n_val, 1), len(train_idx) - 1)
    perm = rng.permutation(len(train_idx))
    val = np.sort(train_idx[perm[:n_val]])
    tr = np.sort(train_idx[perm[n_val:]])
    return [], tr, val, "observations"


def _fold_dict(i, g, test_groups, train_groups, val_fraction, rng, ids) -> dict:
    val_groups, tr, va, mode = _carve_val(train_groups, g, val_fraction, rng)
    te = np.flatnonzero(np.isin(g, test_groups))
    return {
        "fold": int(i),
        "train": _labels(tr, ids),
        "val": _labels(va, ids),
        "test": _labels(te, ids),
        "train_groups": sorted(set(train_groups) - set(val_groups)),
        "val_groups": val_groups,
        "test_groups": sorted(test_groups),
        "val_mode": mode,
    }


def _check_args(n_obs: int, ids, val_fraction: float) -> None:
    if ids is not None and len(ids) != n_obs:
        raise CPNNInputError(f"ids has {len(ids)} entries for {n_obs} groups.", field="ids",
                             fix="give one id per observation.")
    if not 0 <= val_fraction < 1:
        raise CPNNInputError(f"val_fraction must be in [0, 1), got {val_fraction}.",
                             field="val_fraction", fix="use e.g. 0.2, or 0 for no validation part.")


def grouped_folds(
    groups: Sequence[Any],
    n_folds: int = 4,
    seed: int = 0,
    val_fraction: float = 0.0,
    ids: Optional[Sequence[Any]] = None,
) -> list[dict]:
    """K folds with whole groups (patients or sections) on one side only.

    Groups are shuffled with ``seed`` and dealt greedily to the fold with the fewest
    observations so far; of 64 seeded shuffles the best balanced is kept, so folds are
    balanced in observations, not only in groups.

    Parameters
    ----------
    groups
        Group label of each observation (e.g. ``adata.obs["patient"]``).
    n_folds
        Number of folds (>= 2, <= number of groups).
    seed
        Seed of the shuffle and of the validation carve-out.
    val_fraction
        Fraction of each fold's training observations moved to a validation part:
        whole groups when >= 3 training groups remain, else random observations
        (``val_mode`` says which). 0 gives an empty ``val``.
    ids
        Optional observation ids to return instead of integer positions.

    Returns
    -------
    list[dict]
        One dict per fold (see the module docstring).
    """
    g = _as_groups(groups)
    _check_args(len(g), ids, val_fraction)
    uniq = sorted(set(g.tolist()))
    if n_folds < 2:
        raise CPNNInputError(f"n_folds must be >= 2, got {n_folds}.", field="n_folds",
                             fix="use leave_one_group_out for one fold per group.")
    if len(uniq) < n_folds:
        raise CPNNInputError(
            f"{len(uniq)} group(s) for {n_folds} folds: {uniq[:10]}.", field="n_folds",
            fix=f"use n_folds <= {len(uniq)} (or group by a finer unit, e.g. section, and say so).",
        )
    rng = np.random.default_rng(seed)
    sizes = pd.Series(g).value_counts()
    size_of = np.array([int(sizes[u]) for u in uniq])
    best: Optional[tuple[int, np.ndarray]] = None
    # greedy dealing in a random order can leave one large patient unbalanced; of
    # N_ORDERS seeded orders keep the one with the smallest largest fold
    for _ in range(N_ORDERS):
        assign = np.empty(len(uniq), dtype=np.int64)
        load = np.zeros(n_folds, dtype=np.int64)
        for j in rng.permutation(len(uniq)):
            # empty folds have load 0 < any group size, so each fold gets a group first
            k = int(np.argmin(load))
            assign[j] = k
            load[k] += size_of[j]
        if best is None or load.max() < best[0]:
            best = (int(load.max()), assign)
    fold_of = {u: int(k) for u, k in zip(uniq, best[1])}
    folds = []
    for i in range(n_folds):
        test_groups = [u for u in uniq if fold_of[u] == i]
        train_groups = [u for u in uniq if fold_of[u] != i]
        folds.append(_fold_dict(i, g, test_groups, train_groups, val_fraction, rng, ids))
    return folds


def leave_one_group_out(
    groups: Sequence[Any],
    seed: int = 0,
    val_fraction: float = 0.0,
    ids: Optional[Sequence[Any]] = None,
) -> list[dict]:
    """One fold per group (sorted by label): that group is the test set.

    ``seed``, ``val_fraction`` and ``ids`` as in :func:`grouped_folds`.
    """
    g = _as_groups(groups)
    _check_args(len(g), ids, val_fraction)
    uniq = sorted(set(g.tolist()))
    if len(uniq) < 2:
        raise CPNNInputError(f"only {len(uniq)} group(s); need >= 2.", field="groups",
                             fix="give observations from at least two patients/sections.")
    rng = np.random.default_rng(seed)
    return [_fold_dict(i, g, [u], [v for v in uniq if v != u], val_fraction, rng, ids)
            for i, u in enumerate(uniq)]


def patient_transfer(
    sections: Sequence[Any],
    patients: Sequence[Any],
    seed: int = 0,
    val_fraction: float = 0.0,
    ids: Optional[Sequence[Any]] = None,
) -> list[dict]:
    """Train on every section of one patient, test on the next patient's sections.

    The setting users meet when they apply a model trained on one patient's serial
    sections to a new patient (HER2ST: train on C2-C6, test on another patient). With the
    patients sorted by label, fold ``i`` trains on the sections of patient ``i`` and tests
    on those of patient ``i + 1`` (cyclically), so every patient is trained on once and
    tested on once. Groups are *sections*: the validation part and any inner folds are
    whole sections of the training patient, as they would be for a user with one patient.

    Parameters
    ----------
    sections
        Section label of each observation (the groups of the folds).
    patients
        Patient label of each observation; every section must belong to one patient.
    seed, val_fraction, ids
        As in :func:`grouped_folds`.

    Returns
    -------
    list[dict]
        One fold per patient; ``train_patient`` and ``test_patient`` name the two.
    """
    g = _as_groups(sections)
    pat = _as_groups(patients)
    if len(pat) != len(g):
        raise CPNNInputError(f"{len(pat)} patient labels for {len(g)} observations.", field="patients",
                             fix="give one patient label per observation.")
    _check_args(len(g), ids, val_fraction)
    owner = pd.DataFrame({"section": g, "patient": pat}).drop_duplicates()
    shared = owner["section"][owner["section"].duplicated()].unique().tolist()
    if shared:
        raise CPNNInputError(f"section(s) {shared[:5]} carry more than one patient label.",
                             field="obs['patient']", fix="give every section of a patient the same patient id.")
    uniq = sorted(set(pat.tolist()))
    if len(uniq) < 2:
        raise CPNNInputError(f"only {len(uniq)} patient(s); patient_transfer needs >= 2.", field="obs['patient']",
                             fix="use leave_one_group_out by section for one patient (and say it measures new "
                                 "sections, not new patients).")
    sections_of = {p: sorted(owner.loc[owner["patient"] == p, "section"].tolist()) for p in uniq}
    rng = np.random.default_rng(seed)
    folds = []
    for i, p in enumerate(uniq):
        q = uniq[(i + 1) % len(uniq)]
        fold = _fold_dict(i, g, sections_of[q], sections_of[p], val_fraction, rng, ids)
        fold.update({"train_patient": p, "test_patient": q})
        folds.append(fold)
    return folds


def check_no_leakage(splits: Sequence[dict], groups: Sequence[Any], ids: Optional[Sequence[Any]] = None) -> None:
    """Raise CPNNInputError if any group sits on two sides of a fold (val excepted when
    ``val_mode == "observations"``) or a fold's parts overlap."""
    g = _as_groups(groups)
    pos = None if ids is None else {v: i for i, v in enumerate(ids)}
    for f in splits:
        parts = {}
        for side in ("train", "val", "test"):
            idx = f.get(side, [])
            idx = [pos[v] for v in idx] if pos is not None else [int(v) for v in idx]
            parts[side] = idx
        sets = {k: set(v) for k, v in parts.items()}
        if (sets["train"] & sets["test"]) or (sets["val"] & sets["test"]) or (sets["train"] & sets["val"]):
            raise CPNNInputError(f"fold {f.get('fold')}: an observation is on two sides.",
                                 field="splits", fix="rebuild the splits.")
        gs = {k: set(g[v].tolist()) for k, v in parts.items()}
        pairs = [("train", "test"), ("val", "test")]
        if f.get("val_mode") != "observations":
            pairs.append(("train", "val"))
        for a, b in pairs:
            shared = gs[a] & gs[b]
            if shared:
                raise CPNNInputError(
                    f"fold {f.get('fold')}: group(s) {sorted(shared)[:5]} in both {a} and {b}.",
                    field="splits", fix="rebuild the splits with grouped_folds.")


def save_splits(path: os.PathLike | str, splits: Sequence[dict], meta: Optional[dict] = None) -> Path:
    """Write splits (and ``meta``: grouping key, seed, dataset...) to a JSON file, atomically."""
    path = Path(path)
    write_json(path, {"format": SPLITS_FORMAT, "version": SPLITS_VERSION,
                      "meta": dict(meta or {}), "folds": list(splits)})
    return path


def load_splits(path: os.PathLike | str) -> tuple[list[dict], dict]:
    """Read splits written by :func:`save_splits`; returns ``(folds, meta)``."""
    import json

    path = Path(path)
    if not path.is_file():
        raise CPNNInputError("splits file not found.", path=path, fix="create it with save_splits.")
    try:
        obj = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CPNNInputError(f"invalid JSON ({exc}).", path=path, fix="re-create it with save_splits.") from exc
    if not isinstance(obj, dict) or obj.get("format") != SPLITS_FORMAT or "folds" not in obj:
        raise CPNNInputError("not a cpnn splits file.", path=path, field="format",
                             fix="create it with cpnn.data.save_splits.")
    for f in obj["folds"]:
        missing = [k for k in ("fold", "train", "test") if k not in f]
        if missing:
            raise CPNNInputError(f"a fold lacks {missing}.", path=path, field="folds",
                                 fix="re-create it with save_splits.")
        f.setdefault("val", [])
    return obj["folds"], obj.get("meta", {})

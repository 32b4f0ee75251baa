"""Grouped splits: no group on two sides, determinism, validation carve-out, JSON round trip."""
from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cpnn.data import check_no_leakage, grouped_folds, leave_one_group_out, load_splits, save_splits
from cpnn.errors import CPNNInputError


def _groups_of(fold, groups, side):
    return {groups[i] for i in fold[side]}


def _assert_partition(folds, groups):
    n = len(groups)
    tested = []
    for f in folds:
        tr, va, te = set(f["train"]), set(f["val"]), set(f["test"])
        assert not (tr & va) and not (tr & te) and not (va & te)
        assert tr | va | te == set(range(n))  # every observation used once per fold
        g_tr, g_va, g_te = (_groups_of(f, groups, s) for s in ("train", "val", "test"))
        assert not (g_tr & g_te) and not (g_va & g_te)
        if f["val_mode"] == "groups":
            assert not (g_tr & g_va)
        assert sorted(g_te) == f["test_groups"]
        tested.extend(f["test"])
    assert sorted(tested) == list(range(n))  # each observation tested exactly once


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 12), min_size=2, max_size=15),
    n_folds=st.integers(2, 6),
    seed=st.integers(0, 2**31 - 1),
    val_fraction=st.sampled_from([0.0, 0.1, 0.25, 0.5]),
)
def test_no_group_on_two_sides(sizes, n_folds, seed, val_fraction):
    groups = np.repeat([f"P{i}" for i in range(len(sizes))], sizes)
    groups = np.random.default_rng(seed).permutation(groups).tolist()
    if len(sizes) < n_folds:
        with pytest.raises(CPNNInputError, match="group"):
            grouped_folds(groups, n_folds=n_folds, seed=seed)
        return
    plain = grouped_folds(groups, n_folds=n_folds, seed=seed)
    if val_fraction > 0 and min(len(f["train"]) for f in plain) < 2:
        with pytest.raises(CPNNInputError, match="nothing to carve"):
            grouped_folds(groups, n_folds=n_folds, seed=seed, val_fraction=val_fraction)
        return
    folds = grouped_folds(groups, n_folds=n_folds, seed=seed, val_fraction=val_fraction)
    # the validation carve-out never changes which groups are tested
    assert [f["test"] for f in folds] == [f["test"] for f in plain]
    assert len(folds) == n_folds and all(f["test"] for f in folds)
    _assert_partition(folds, groups)
    check_no_leakage(folds, groups)
    for f in folds:
        if val_fraction == 0:
            assert f["val"] == [] and f["val_mode"] == "none"
        else:
            assert f["val"] and f["train"]
            n_train_groups = len(set(groups)) - len(f["test_groups"])
            assert f["val_mode"] == ("groups" if n_train_groups >= 3 else "observations")


def test_deterministic_and_seed_dependent():
    groups = [f"P{i % 9}" for i in range(90)]
    a = grouped_folds(groups, n_folds=3, seed=7, val_fraction=0.2)
    b = grouped_folds(groups, n_folds=3, seed=7, val_fraction=0.2)
    assert a == b
    others = [grouped_folds(groups, n_folds=3, seed=s)[0]["test_groups"] for s in range(10)]
    assert len({tuple(o) for o in others}) > 1


def test_balanced_by_observations():
    groups = ["big"] * 50 + [f"s{i}" for i in range(10) for _ in range(5)]
    folds = grouped_folds(groups, n_folds=2, seed=0)
    sizes = sorted(len(f["test"]) for f in folds)
    assert sizes == [50, 50]


def test_ids_and_leave_one_group_out(tmp_path):
    groups = ["A", "A", "B", "C", "C", "C"]
    ids = [f"spot{i}" for i in range(6)]
    folds = leave_one_group_out(groups, ids=ids)
    assert [f["test_groups"] for f in folds] == [["A"], ["B"], ["C"]]
    assert folds[0]["test"] == ["spot0", "spot1"]
    assert folds[2]["train"] == ["spot0", "spot1", "spot2"]
    check_no_leakage(folds, groups, ids=ids)
    # 2 training groups only -> observation-wise validation, said so
    v = leave_one_group_out(groups, val_fraction=0.5, seed=1)
    assert all(f["val_mode"] == "observations" for f in v)
    path = save_splits(tmp_path / "splits.json", v, {"group_key": "patient", "seed": 1})
    loaded, meta = load_splits(path)
    assert loaded == v and meta == {"group_key": "patient", "seed": 1}
    assert json.loads(path.read_text())["format"] == "cpnn-splits"


def test_errors():
    with pytest.raises(CPNNInputError, match=r"2 group\(s\) for 4 folds"):
        grouped_folds(["a", "b", "a"], n_folds=4)
    with pytest.raises(CPNNInputError, match="no group"):
        grouped_folds(["a", None, "b"], n_folds=2)
    with pytest.raises(CPNNInputError, match="val_fraction"):
        grouped_folds(["a", "b"], n_folds=2, val_fraction=1.0)
    leaky = [{"fold": 0, "train": [0], "val": [], "test": [1], "val_mode": "none"}]
    with pytest.raises(CPNNInputError, match="in both train and test"):
        check_no_leakage(leaky, ["a", "a"])


def test_load_rejects_other_json(tmp_path):
    p = tmp_path / "x.json"
    p.write_text(json.dumps({"folds": []}))
    with pytest.raises(CPNNInputError, match="not a cpnn splits file"):
        load_splits(p)
    with pytest.raises(CPNNInputError, match="not found"):
        load_splits(tmp_path / "missing.json")


def test_patient_transfer_trains_on_one_patient_and_tests_on_the_next():
    from cpnn.data import patient_transfer

    # 3 patients with 3, 2 and 4 sections of 5 observations each
    sections = [f"{p}{k}" for p, n in (("A", 3), ("B", 2), ("C", 4)) for k in range(n) for _ in range(5)]
    patients = [s[0] for s in sections]
    folds = patient_transfer(sections, patients, seed=0, val_fraction=0.3)
    assert [(f["train_patient"], f["test_patient"]) for f in folds] == [("A", "B"), ("B", "C"), ("C", "A")]
    for f in folds:
        seen = {sections[i] for i in f["train"] + f["val"]}
        assert {s[0] for s in seen} == {f["train_patient"]}  # only the training patient's sections
        assert {patients[i] for i in f["test"]} == {f["test_patient"]}
        assert len(f["test"]) == 5 * sum(s[0] == f["test_patient"] for s in set(sections))
        if f["val_mode"] == "groups":  # validation is whole sections of the training patient
            assert not ({sections[i] for i in f["val"]} & {sections[i] for i in f["train"]})
    assert folds[0]["val_mode"] == "groups" and folds[1]["val_mode"] == "observations"
    check_no_leakage(folds, sections)


def test_patient_transfer_errors():
    from cpnn.data import patient_transfer

    with pytest.raises(CPNNInputError, match="more than one patient"):
        patient_transfer(["s1", "s1", "s2"], ["A", "B", "B"])
    with pytest.raises(CPNNInputError, match="only 1 patient"):
        patient_transfer(["s1", "s2"], ["A", "A"])
    with pytest.raises(CPNNInputError, match="patient labels"):
        patient_transfer(["s1", "s2"], ["A"])

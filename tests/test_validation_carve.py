"""One validation-carve rule for CPNN members and slide baselines."""
import numpy as np
import pytest

from cpnn.config import TrainConfig
from cpnn.errors import CPNNInputError
from cpnn.train.validation import carve_validation


def test_members_validate_on_different_whole_groups():
    groups = np.repeat(["A", "B", "C", "D"], 5)
    tc = TrainConfig(val_fraction=0.25, seed=1, progress=False)
    held = []
    for member in range(4):
        tr, va = carve_validation(len(groups), tc, groups, member=member)
        assert len(set(groups[va])) == 1 and not set(groups[va]) & set(groups[tr])
        assert sorted(np.concatenate([tr, va]).tolist()) == list(range(20))
        held.append(groups[va][0])
    assert sorted(held) == ["A", "B", "C", "D"]  # each group validates one member
    again = carve_validation(len(groups), tc, groups, member=2)[1]
    assert np.array_equal(again, carve_validation(len(groups), tc, groups, member=2)[1])


def test_explicit_none_and_ungrouped_carves():
    tc = TrainConfig(val_fraction=0.2, seed=0, progress=False)
    tr, va = carve_validation(10, tc, val_bags=[7, 3, 3])
    assert va.tolist() == [3, 7] and 3 not in tr and len(tr) == 8
    tr, va = carve_validation(10, TrainConfig(early_stopping="none", progress=False))
    assert len(va) == 0 and len(tr) == 10
    a = carve_validation(50, tc, groups=["x"] * 25 + ["y"] * 25, member=0)[1]  # < 3 groups: random spots
    b = carve_validation(50, tc, groups=None, member=1)[1]
    assert len(a) == 10 and len(b) == 10 and not np.array_equal(a, b)
    with pytest.raises(CPNNInputError, match="group labels"):
        carve_validation(10, tc, groups=["a"] * 9)

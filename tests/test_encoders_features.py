"""CLAM / TRIDENT / cpnn patch feature files."""
from __future__ import annotations

import h5py
import numpy as np
import pytest

from cpnn.encoders import read_feature_attrs, read_feature_file, write_feature_file
from cpnn.errors import CPNNInputError


def _data(n=5, d=7, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)).astype(np.float32), rng.integers(0, 10_000, size=(n, 2))


def test_round_trip(tmp_path):
    feats, coords = _data()
    ids = ["AAAC-1", "AAAG-1", "ünï", "x", "y"]
    path = write_feature_file(tmp_path / "s.h5", feats, coords,
                              attrs={"encoder": "efficientnet-lite0", "patch_size_px": 224,
                                     "patch_um": 112.0, "mpp": 0.5, "level0_mpp": 0.25,
                                     "patch_size_level0": 448, "extra": {"a": 1}, "skip": None},
                              ids=ids)
    ff = read_feature_file(path)
    np.testing.assert_array_equal(ff.features, feats)
    np.testing.assert_array_equal(ff.coords, coords)
    assert ff.features.dtype == np.float32 and ff.coords.dtype == np.int64
    assert ff.ids == ids and len(ff) == 5
    a = ff.attrs
    assert a["encoder"] == "efficientnet-lite0" and a["patch_size_px"] == 224
    assert a["patch_um"] == 112.0 and a["mpp"] == 0.5 and a["level0_mpp"] == 0.25
    assert a["complete"] == 1 and a["cpnn_version"]
    assert a["tta"] is None and "skip" not in a
    assert a["extra"] == '{"a": 1}'
    # TRIDENT-style geometry on coords, as plain h5py sees it
    with h5py.File(path, "r") as fh:
        assert fh["coords"].attrs["patch_size"] == 224
        assert fh["coords"].attrs["patch_size_level0"] == 448
        assert fh["features"].dtype == np.float32
    assert read_feature_attrs(path)["encoder"] == "efficientnet-lite0"
    # no temporary files left next to it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.h5"]


def test_clam_file_written_by_hand(tmp_path):
    """CLAM: features (1, N, D) or (N, D), coords (N, 2), no cpnn attributes."""
    feats, coords = _data(4, 1024)
    for shape in [(1, 4, 1024), (4, 1024)]:
        path = tmp_path / f"clam{len(shape)}.h5"
        with h5py.File(path, "w") as fh:
            fh.create_dataset("features", data=feats.reshape(shape))
            dc = fh.create_dataset("coords", data=coords.astype(np.int32))
            dc.attrs["patch_level"] = 0
            dc.attrs["patch_size"] = 256
        ff = read_feature_file(path)
        assert ff.features.shape == (4, 1024)
        np.testing.assert_array_equal(ff.features, feats)
        np.testing.assert_array_equal(ff.coords, coords)
        assert ff.ids is None
        assert ff.attrs["encoder"] is None and ff.attrs["mpp"] is None
        assert ff.attrs["complete"] is None
        assert ff.attrs["patch_level"] == 0 and ff.attrs["patch_size_px"] == 256


def test_trident_attrs_fill_geometry(tmp_path):
    feats, coords = _data(3, 16)
    path = tmp_path / "trident.h5"
    with h5py.File(path, "w") as fh:
        fh.create_dataset("features", data=feats.astype(np.float64))
        dc = fh.create_dataset("coords", data=coords.astype(np.float64))
        dc.attrs.update({"patch_size": 256, "patch_size_level0": 512,
                         "level0_magnification": 40, "target_magnification": 20,
                         "name": b"slide-1"})
        fh.attrs["level0_mpp"] = 0.25
    ff = read_feature_file(path)
    assert ff.features.dtype == np.float32 and ff.coords.dtype == np.int64
    assert ff.attrs["patch_size_px"] == 256 and ff.attrs["patch_size_level0"] == 512
    assert ff.attrs["level0_magnification"] == 40 and ff.attrs["name"] == "slide-1"
    assert ff.attrs["patch_um"] == pytest.approx(128.0)
    assert ff.attrs["mpp"] == pytest.approx(0.5)


def _hand_file(path, feats=None, coords=None, ids=None):
    with h5py.File(path, "w") as fh:
        if feats is not None:
            fh.create_dataset("features", data=feats)
        if coords is not None:
            fh.create_dataset("coords", data=coords)
        if ids is not None:
            fh.create_dataset("ids", data=np.array(ids, dtype=object), dtype=h5py.string_dtype())
    return path


@pytest.mark.parametrize("case, field, message", [
    ("no_features", "features", "no 'features' dataset"),
    ("no_coords", "coords", "no 'coords' dataset"),
    ("n_mismatch", "coords", "5 feature rows but 4 coords"),
    ("nan", "features", "NaN or infinite values \\(first at row 2\\)"),
    ("inf", "features", "NaN or infinite"),
    ("coords_shape", "coords", "expected \\(N, 2\\)"),
    ("ids", "ids", "4 ids for 5"),
    ("feat_3d", "features", "expected \\(N, D\\)"),
])
def test_bad_files(tmp_path, case, field, message):
    feats, coords = _data()
    path = tmp_path / f"{case}.h5"
    if case == "no_features":
        _hand_file(path, coords=coords)
    elif case == "no_coords":
        _hand_file(path, feats=feats)
    elif case == "n_mismatch":
        _hand_file(path, feats, coords[:4])
    elif case in ("nan", "inf"):
        feats[2, 3] = np.nan if case == "nan" else np.inf
        _hand_file(path, feats, coords)
    elif case == "coords_shape":
        _hand_file(path, feats, np.zeros((5, 3)))
    elif case == "ids":
        _hand_file(path, feats, coords, ids=["a", "b", "c", "d"])
    elif case == "feat_3d":
        _hand_file(path, feats.reshape(5, 7, 1), coords)
    with pytest.raises(CPNNInputError) as info:
        read_feature_file(path)
    assert info.value.field == field and str(path) in str(info.value)
    assert info.value.fix
    import re
    assert re.search(message, str(info.value))


def test_truncated_and_corrupt_files(tmp_path):
    feats, coords = _data(2000, 64)
    good = write_feature_file(tmp_path / "good.h5", feats, coords, attrs={"encoder": "x"})
    raw = good.read_bytes()
    cut = tmp_path / "cut.h5"
    cut.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CPNNInputError, match="truncated or corrupt") as info:
        read_feature_file(cut)
    assert str(cut) in str(info.value)
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"this is not hdf5" * 100)
    with pytest.raises(CPNNInputError, match="truncated or corrupt"):
        read_feature_file(junk)
    with pytest.raises(CPNNInputError, match="truncated or corrupt"):
        read_feature_attrs(junk)
    with pytest.raises(CPNNInputError, match="not found"):
        read_feature_file(tmp_path / "missing.h5")


def test_write_validation(tmp_path):
    feats, coords = _data()
    with pytest.raises(CPNNInputError, match="coords"):
        write_feature_file(tmp_path / "a.h5", feats, coords[:3])
    with pytest.raises(CPNNInputError, match="whole numbers"):
        write_feature_file(tmp_path / "a.h5", feats, coords + 0.5)
    with pytest.raises(CPNNInputError, match="not unique"):
        write_feature_file(tmp_path / "a.h5", feats, coords, ids=list("abcda"))
    bad = feats.copy()
    bad[1, 1] = np.inf
    with pytest.raises(CPNNInputError, match="NaN or infinite"):
        write_feature_file(tmp_path / "a.h5", bad, coords)
    with pytest.raises(CPNNInputError, match=r"\(N, D\)"):
        write_feature_file(tmp_path / "a.h5", feats[0], coords)
    assert not any(tmp_path.iterdir())  # nothing written by failed calls

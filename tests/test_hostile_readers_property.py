"""Property-based tests of the readers: any input either reads back exactly or fails clearly."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from cpnn.errors import CPNNInputError

FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

counts_arrays = hnp.arrays(np.int64, hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=7),
                           elements=st.integers(0, 10_000))


@FAST
@given(counts=counts_arrays, sep=st.sampled_from([",", "\t"]))
def test_bulk_table_round_trip(counts, sep):
    """Integer tables of any shape read back with the same numbers, samples x genes."""
    from cpnn.data import read_bulk_table

    n_genes, n_samples = counts.shape
    genes = [f"GENE{i}" for i in range(n_genes)]
    samples = [f"sample-{j}" for j in range(n_samples)]
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / ("t.csv" if sep == "," else "t.tsv")
        lines = [sep.join(["gene"] + samples)] + [sep.join([g] + [str(v) for v in row]) for g, row in zip(genes, counts)]
        p.write_text("\n".join(lines) + "\n")
        a = read_bulk_table(p, orientation="genes_x_samples")
    assert list(a.obs_names) == samples and list(a.var_names) == genes
    np.testing.assert_array_equal(a.X.toarray(), counts.T.astype(np.float32))


@FAST
@given(
    base=hnp.arrays(np.float64, (6, 5), elements=st.integers(0, 50).map(float)),
    bad=st.lists(st.tuples(st.integers(0, 5), st.integers(0, 4),
                           st.sampled_from([np.nan, np.inf, -np.inf, -1.0, 0.5, 2.25, 3.0])), max_size=3),
)
def test_count_validation_is_exact(base, bad):
    """check_counts raises iff a value is NaN/inf, negative or fractional; else returns it unchanged."""
    from cpnn.data._validate import check_counts

    x = base.copy()
    for i, j, v in bad:
        x[i, j] = v
    invalid = (~np.isfinite(x)).any() or (x < 0).any() or (np.isfinite(x) & (x != np.round(x))).any()
    if invalid:
        with pytest.raises(CPNNInputError) as info:
            check_counts(x, path="/data/sample.h5ad", field="X")
        assert "sample.h5ad" in str(info.value) and "[X]" in str(info.value)
    else:
        out = check_counts(x, path="/data/sample.h5ad", field="X")
        np.testing.assert_array_equal(out.toarray(), x.astype(np.float32))


@pytest.fixture(scope="module")
def feature_file_bytes():
    from cpnn.encoders import write_feature_file

    rng = np.random.default_rng(0)
    feats = rng.normal(size=(200, 32)).astype(np.float32)
    coords = rng.integers(0, 10_000, size=(200, 2))
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "f.h5"
        write_feature_file(p, feats, coords, attrs={"encoder": "x"})
        return p.read_bytes(), feats, coords


@FAST
@given(cut=st.floats(0.0, 0.999))
def test_feature_file_truncated_anywhere(feature_file_bytes, cut):
    """A feature file cut at any byte never yields numbers: it fails with a clear message."""
    from cpnn.encoders import read_feature_file

    data, _feats, _coords = feature_file_bytes
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "damaged.h5"
        p.write_bytes(data[: int(len(data) * cut)])
        with pytest.raises(CPNNInputError) as info:
            read_feature_file(p)
    assert "damaged.h5" in str(info.value)


@FAST
@given(n=st.integers(1, 8), g=st.integers(1, 6), seed=st.integers(0, 2**16),
       dup_obs=st.booleans(), bad_value=st.sampled_from([None, np.nan, -2.0, 1.5]))
def test_spatial_h5ad_reads_exactly_or_fails_clearly(n, g, seed, dup_obs, bad_value):
    import anndata as ad
    import pandas as pd

    from cpnn.data import read_spatial_h5ad

    rng = np.random.default_rng(seed)
    X = rng.poisson(4, size=(n, g)).astype(np.float32)
    names = [f"s{i}" for i in range(n)]
    if dup_obs and n > 1:
        names[-1] = names[0]
    if bad_value is not None:
        X[rng.integers(n), rng.integers(g)] = bad_value
    a = ad.AnnData(X=X, obs=pd.DataFrame(index=names), var=pd.DataFrame(index=[f"G{j}" for j in range(g)]))
    a.obsm["spatial"] = rng.uniform(0, 500, size=(n, 2))
    expect_error = bad_value is not None or (dup_obs and n > 1)
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "spots.h5ad"
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # anndata warns about the duplicated names we made on purpose
            a.write_h5ad(p)
        if expect_error:
            with pytest.raises(CPNNInputError) as info:
                read_spatial_h5ad(p)
            assert "spots.h5ad" in str(info.value)
            return
        out = read_spatial_h5ad(p)
    np.testing.assert_array_equal(out.X.toarray(), X)
    np.testing.assert_allclose(out.obsm["spatial"], a.obsm["spatial"])
    assert list(out.obs_names) == names


# ------------------------------------------------------------------ ids as paths (issue 16)
hostile_ids = st.one_of(
    st.text(min_size=0, max_size=40),
    st.lists(st.sampled_from(["..", ".", "/", "\\", "a", "b", "\x00", "\n", " ", "C2", "~"]),
             min_size=1, max_size=8).map("".join),
)


@settings(max_examples=200, deadline=None)
@given(sample_id=hostile_ids)
def test_any_sample_id_stays_inside_its_folder(sample_id):
    """Every id either names a file directly inside the output folder or is refused clearly."""
    import warnings

    from cpnn.outputs import safe_stem

    folder = Path("/srv/out").resolve()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            stem = safe_stem(sample_id)
    except CPNNInputError as exc:
        assert "cannot be used as a file name" in str(exc)
        return
    for suffix in (".h5ad", ".h5", ""):
        target = folder / f"{stem}{suffix}"
        assert target.parent == folder and os.path.normpath(target) == str(target)
    assert "/" not in stem and "\\" not in stem and "\x00" not in stem and not stem.startswith(".")
    assert 0 < len(stem.encode('utf-8')) <= 120
    if stem == sample_id:
        return
    assert all(ch.isprintable() or ch == " " for ch in stem)


@settings(max_examples=100, deadline=None)
@given(ids=st.lists(hostile_ids, min_size=2, max_size=5))
def test_distinct_outputs_or_a_clear_error(ids):
    """Inputs never share an output file: distinct stems, or an error naming the clash."""
    import warnings

    from cpnn.outputs import unique_stems

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            stems = unique_stems([(i, f"in{k}.h5ad") for k, i in enumerate(ids)])
    except CPNNInputError as exc:
        assert "share the sample id" in str(exc) or "cannot be used as a file name" in str(exc)
        return
    assert len({s.casefold() for s in stems.values()}) == len(ids)


# ------------------------------------------------------------------ cache invalidation (issue 16)
@pytest.fixture(scope="module")
def tiny_encoder():
    pytest.importorskip("torch")
    from _tiny_encoder import TINY, register_tiny

    from cpnn.encoders import create_encoder

    register_tiny()
    return create_encoder(TINY)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**16), change=st.sampled_from(["none", "rot180", "flip", "pixel", "touch"]),
       as_file=st.booleans())
def test_cached_features_are_those_of_the_current_image(tiny_encoder, seed, change, as_file):
    """Whatever happened to the image since the cache was written, the features returned
    are those a fresh extraction of the current image gives."""
    from PIL import Image

    from cpnn.encoders import extract_spot_features
    from cpnn.image import ArraySlide, open_slide

    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, size=(64, 80, 3), dtype=np.uint8)
    centers = rng.uniform(10, 60, size=(4, 2))
    ids = [f"s{i}" for i in range(4)]
    if change == "rot180":
        new = np.ascontiguousarray(img[::-1, ::-1])
    elif change == "flip":
        new = np.ascontiguousarray(img[:, ::-1])
    elif change == "pixel":
        new = img.copy()
        new[32, 40] = 255 - new[32, 40]
    else:
        new = img
    with tempfile.TemporaryDirectory() as d:
        cache, png = Path(d) / "cache.h5", Path(d) / "he.png"

        def run(pixels, where):
            if not as_file:
                return extract_spot_features(ArraySlide(pixels, mpp=0.5), centers, ids, tiny_encoder, where,
                                             patch_um=12, progress=False).features
            if not png.exists() or not np.array_equal(np.asarray(Image.open(png)), pixels):
                st_old = png.stat() if png.exists() else None
                Image.fromarray(pixels).save(png)
                if st_old is not None:  # a hostile replacement keeps the old modification time
                    os.utime(png, ns=(st_old.st_atime_ns, st_old.st_mtime_ns))
            elif change == "touch":
                os.utime(png)
            with open_slide(png, mpp=0.5) as sl:
                return extract_spot_features(sl, centers, ids, tiny_encoder, where, patch_um=12,
                                             progress=False).features

        run(img, cache)
        got = run(new, cache)
        fresh = run(new, Path(d) / "fresh.h5")
    np.testing.assert_array_equal(got, fresh)

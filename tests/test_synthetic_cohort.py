"""Tests of the seeded synthetic cohort (cpnn.data.synthetic) against its own truth."""
from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from cpnn.data.synthetic import (
    CELL_TYPE_NAMES,
    MT_GENES,
    load_synthetic_cohort,
    make_synthetic_cohort,
)
from cpnn.errors import CPNNInputError

SMALL = dict(n_slides=4, image_px=640, spot_pitch_um=60.0, spot_diameter_um=60.0,
             n_genes=80, n_ref_cells=600)


@pytest.fixture(scope="module")
def cohort():
    return make_synthetic_cohort(seed=1, **SMALL)


def _arrays(c):
    """Every generated array of a cohort, by name."""
    out = {"prototypes": c.true_prototypes, "platform": c.platform_factor,
           "bulk_platform": c.bulk_platform_factor,
           "ref_X": c.reference.X.toarray(), "ref_labels": c.reference.obs["cell_type"].cat.codes,
           "ref_batch": c.reference.obs["batch"].cat.codes}
    for s in c.slides:
        out[f"{s.slide_id}/image"] = s.image
        out[f"{s.slide_id}/X"] = np.asarray(s.spots.X)
        out[f"{s.slide_id}/spatial"] = s.spots.obsm["spatial"]
        out[f"{s.slide_id}/props"] = s.spots.obsm["true_proportions"]
        out[f"{s.slide_id}/bulk"] = s.bulk_counts
        out[f"{s.slide_id}/bulk_props"] = s.bulk_proportions
        out[f"{s.slide_id}/cells"] = s.cells[["x", "y"]].to_numpy()
    return {k: np.asarray(v) for k, v in out.items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and a[k].tobytes() == b[k].tobytes()
        for k in a)


# ----------------------------------------------------------------------------- seeding
def test_same_seed_is_byte_identical_and_other_seeds_differ():
    kw = dict(n_slides=2, image_px=256, spot_pitch_um=40.0, spot_diameter_um=40.0,
              n_genes=60, n_ref_cells=100)
    a = _arrays(make_synthetic_cohort(seed=7, **kw))
    b = _arrays(make_synthetic_cohort(seed=7, **kw))
    c = _arrays(make_synthetic_cohort(seed=8, **kw))
    assert _same(a, b)
    differing = [k for k in a if a[k].shape != c[k].shape or a[k].tobytes() != c[k].tobytes()]
    assert "prototypes" in differing and "S01/image" in differing and "S01/X" in differing


def test_a_slide_does_not_depend_on_how_many_slides_are_made():
    kw = dict(n_patients=1, image_px=256, spot_pitch_um=40.0, spot_diameter_um=40.0,
              n_genes=60, n_ref_cells=100, seed=3)
    one = make_synthetic_cohort(n_slides=1, **kw).slides[0]
    two = make_synthetic_cohort(n_slides=2, **kw).slides[0]
    assert one.image.tobytes() == two.image.tobytes()
    assert np.array_equal(one.spots.X, two.spots.X)


# ----------------------------------------------------------------------------- structure
def test_shapes_keys_and_metadata(cohort):
    K, G = len(cohort.cell_types), len(cohort.genes)
    assert cohort.cell_types == list(CELL_TYPE_NAMES[:5])
    assert cohort.true_prototypes.shape == (K, G) and (cohort.true_prototypes > 0).all()
    assert len(set(cohort.genes)) == G and "EPCAM" in cohort.genes and "GENE001" in cohort.genes
    assert cohort.platform_factor.shape == (G,) and (cohort.platform_factor > 0).all()
    # per-cell totals differ by type
    assert np.ptp(cohort.true_prototypes.sum(axis=1)) > 100
    assert [s.patient_id for s in cohort.slides] == ["P01", "P01", "P02", "P02"]
    side = SMALL["image_px"]
    radius_px = SMALL["spot_diameter_um"] / 2 / 0.5
    for s in cohort.slides:
        assert s.image.shape == (side, side, 3) and s.image.dtype == np.uint8
        sp_ = s.spots
        n = sp_.n_obs
        assert n == 25  # 5 x 5 grid of 60-um spots over 320 um
        assert list(sp_.var_names) == cohort.genes
        assert list(sp_.obs_names) == [f"{s.slide_id}_{i}" for i in range(n)]
        assert (sp_.obs["section"] == s.slide_id).all()
        assert (sp_.obs["patient"] == s.patient_id).all()
        xy = sp_.obsm["spatial"]
        assert xy.shape == (n, 2)
        assert (xy - radius_px >= 0).all() and (xy + radius_px <= side).all()
        # x first: within a grid row (same array_row) x grows with array_col
        row0 = (sp_.obs["array_row"] == 0).to_numpy()
        assert np.all(np.diff(xy[row0, 0]) > 0) and np.ptp(xy[row0, 1]) == 0
        assert sp_.obsm["true_proportions"].shape == (n, K)
        meta = sp_.uns["cpnn_input"]
        assert meta == {"image_path": None, "mpp": 0.5, "spot_diameter_um": 60.0,
                        "sample_id": s.slide_id, "patient_id": s.patient_id}
        assert s.bulk_counts.shape == (G,) and s.bulk_proportions.shape == (K,)
        assert 1e6 <= s.bulk_counts.sum() <= 1e7


def test_proportions_and_cell_counts_match_a_brute_force_recount(cohort):
    K = len(cohort.cell_types)
    radius_px = SMALL["spot_diameter_um"] / 2 / 0.5
    for s in cohort.slides:
        cells_xy = s.cells[["x", "y"]].to_numpy()
        codes = s.cells["cell_type"].cat.codes.to_numpy()
        d2 = ((s.spots.obsm["spatial"][:, None, :] - cells_xy[None, :, :]) ** 2).sum(-1)
        inside = d2 <= radius_px ** 2
        counts = np.stack([(inside & (codes == k)[None, :]).sum(1) for k in range(K)], axis=1)
        np.testing.assert_array_equal(counts.sum(1), s.spots.obs["n_cells"].to_numpy())
        np.testing.assert_allclose(s.spots.obsm["true_proportions"],
                                   counts / counts.sum(1, keepdims=True), atol=1e-12)
        np.testing.assert_allclose(s.spots.obsm["true_proportions"].sum(1), 1.0)
        np.testing.assert_allclose(s.bulk_proportions, np.bincount(codes, minlength=K) / len(codes))
        # realistic density: one cell per ~8-13 um
        spacing_um = np.sqrt((SMALL["image_px"] * 0.5) ** 2 / len(codes))
        assert 7.0 < spacing_um < 13.0


def test_counts_are_non_negative_integers(cohort):
    for s in cohort.slides:
        X = np.asarray(s.spots.X)
        assert np.issubdtype(X.dtype, np.integer) and (X >= 0).all()
        assert np.issubdtype(s.bulk_counts.dtype, np.integer) and (s.bulk_counts >= 0).all()
    R = cohort.reference.X
    assert sp.issparse(R) and R.format == "csr"
    assert np.issubdtype(R.dtype, np.integer) and (R.data >= 0).all()


# ----------------------------------------------------------------------------- expression
def test_mean_spot_counts_track_proportions_times_prototypes(cohort):
    A = cohort.spots_anndata()
    X = np.asarray(A.X, dtype=float)
    n_cells = A.obs["n_cells"].to_numpy()[:, None]
    expected = (A.obsm["true_proportions"] * n_cells) @ cohort.true_prototypes
    expected *= (A.obs["capture_efficiency"].to_numpy()[:, None] * cohort.platform_factor)
    assert np.corrcoef(X.mean(0), expected.mean(0))[0, 1] > 0.9
    assert np.corrcoef(np.log1p(X.mean(0)), np.log1p(expected.mean(0)))[0, 1] > 0.95
    # the composition is visible per gene across spots too (markers follow their type)
    epcam = cohort.genes.index("EPCAM")
    epi = A.obsm["true_proportions"][:, cohort.cell_types.index("Epithelial")]
    assert np.corrcoef(X[:, epcam] / X.sum(1), epi)[0, 1] > 0.6
    # gene-wise overdispersion: the variance exceeds a Poisson one for high genes
    resid = X - expected
    hi = expected.mean(0) > 20
    assert (resid[:, hi] ** 2).mean() > 1.5 * expected[:, hi].mean()


def test_bulk_tracks_slide_composition(cohort):
    B = cohort.bulk_anndata()
    assert B.shape == (len(cohort.slides), len(cohort.genes))
    assert list(B.obs_names) == [s.slide_id for s in cohort.slides]
    assert B.obsm["true_proportions"].shape == (len(cohort.slides), len(cohort.cell_types))
    for i, s in enumerate(cohort.slides):
        n_k = s.bulk_proportions * len(s.cells)
        mean = cohort.bulk_platform_factor * (n_k @ cohort.true_prototypes)
        frac = np.asarray(B.X[i], dtype=float) / B.X[i].sum()
        assert np.corrcoef(np.log1p(frac * 1e6), np.log1p(mean / mean.sum() * 1e6))[0, 1] > 0.97
    # slides differ in composition, so bulk varies across slides
    assert B.obsm["true_proportions"].std(0).max() > 0.1


def test_composition_is_spatially_smooth(cohort):
    near, far = [], []
    for s in cohort.slides:
        P = s.spots.obsm["true_proportions"]
        P = P - P.mean(0)
        rc = s.spots.obs[["array_row", "array_col"]].to_numpy()
        dist = np.abs(rc[:, None, :] - rc[None, :, :]).sum(-1)
        i, j = np.nonzero(np.triu(dist == 1))
        near.append(np.stack([P[i].ravel(), P[j].ravel()]))
        i, j = np.nonzero(np.triu(dist >= 6))
        far.append(np.stack([P[i].ravel(), P[j].ravel()]))
    r_near = np.corrcoef(np.concatenate(near, 1))[0, 1]
    r_far = np.corrcoef(np.concatenate(far, 1))[0, 1]
    # 60-um spots hold ~30 cells, so sampling noise caps the neighbour correlation
    assert r_near > 0.3
    assert r_near > r_far + 0.3


# ----------------------------------------------------------------------------- image
def test_rendered_nuclei_differ_by_type(cohort):
    names = cohort.cell_types
    dark = {k: [] for k in names}
    for s in cohort.slides:
        grey = s.image.astype(float).mean(2)
        x = np.floor(s.cells["x"].to_numpy()).astype(int)
        y = np.floor(s.cells["y"].to_numpy()).astype(int)
        for k in names:
            m = (s.cells["cell_type"] == k).to_numpy()
            dark[k].append(255 - grey[y[m], x[m]])
    dark = {k: np.concatenate(v) for k, v in dark.items()}
    # lymphocytes: small, dense chromatin; epithelium: large pale vesicular nuclei
    assert dark["T-cells"].mean() > dark["Epithelial"].mean() + 20

    # Patch level: regress per-spot image statistics on the true proportions; the
    # fitted pure-type values must differ the way the morphologies do.
    r = int(SMALL["spot_diameter_um"] / 2 / 0.5)
    stats, props = [], []
    for s in cohort.slides:
        for (x, y) in s.spots.obsm["spatial"].astype(int):
            patch = s.image[y - r:y + r, x - r:x + r].reshape(-1, 3).astype(float)
            stats.append((255 - patch.mean(), (patch[:, 0] - patch[:, 1]).mean()))
        props.append(s.spots.obsm["true_proportions"])
    pure = np.linalg.lstsq(np.concatenate(props), np.array(stats), rcond=None)[0]
    darkness, redness = dict(zip(names, pure[:, 0])), dict(zip(names, pure[:, 1]))
    # epithelial sheets (big nuclei, lilac cytoplasm) are the darkest; vessels the palest
    assert darkness["Epithelial"] > max(darkness["T-cells"], darkness["Fibroblasts"]) + 15
    assert darkness["Endothelial"] < min(v for k, v in darkness.items() if k != "Endothelial")
    # eosin-rich stroma is far redder than lymphocyte aggregates
    assert redness["Fibroblasts"] > redness["T-cells"] + 25


def test_image_looks_like_h_and_e(cohort):
    img = np.concatenate([s.image.reshape(-1, 3) for s in cohort.slides]).astype(float)
    r, g, b = img.mean(0)
    # pink/purple: red and blue above green, not saturated, not blank
    assert r > g and b > g
    assert 100 < img.mean() < 235
    assert img.std() > 20


# ----------------------------------------------------------------------------- reference
def test_reference_recovers_prototypes_and_has_qc_structure(cohort):
    ref = cohort.reference
    assert list(ref.obs["cell_type"].cat.categories) == cohort.cell_types
    assert set(ref.obs["batch"]) == {"batch1", "batch2"}
    assert ref.obs["cell_type"].value_counts().min() >= 10
    names = list(ref.var_names)
    assert names[:len(cohort.genes)] == cohort.genes
    assert all(g in names for g in MT_GENES)
    assert ref.var["in_panel"].sum() == len(cohort.genes) and ref.n_vars > len(cohort.genes) + 40
    X = ref.X.toarray().astype(float)
    panel = X[:, :len(cohort.genes)]
    # per-type mean expression against the truth: each type matches itself best
    T = cohort.true_prototypes
    means = np.stack([panel[(ref.obs["cell_type"] == k).to_numpy()].mean(0)
                      for k in cohort.cell_types])
    C = np.corrcoef(np.log1p(means), np.log1p(T))[:len(T), len(T):]
    assert (np.diag(C) > 0.9).all()
    assert (C.argmax(1) == np.arange(len(T))).all()
    # damaged cells carry a high mitochondrial fraction
    mt = ref.var["mt"].to_numpy()
    frac = X[:, mt].sum(1) / X.sum(1)
    damaged = ref.obs["damaged"].to_numpy()
    assert damaged.any() and (frac[damaged] > 0.25).all() and np.median(frac[~damaged]) < 0.1


# ----------------------------------------------------------------------------- files
def test_save_and_load_round_trip(cohort, tmp_path):
    out = cohort.save(tmp_path / "cohort")
    for s in cohort.slides:
        assert (out / f"{s.slide_id}.png").is_file() and (out / f"{s.slide_id}.h5ad").is_file()
    for f in ("reference.h5ad", "bulk.h5ad", "truth.json"):
        assert (out / f).is_file()
    assert not list(out.rglob("*.part"))
    # a file reader sees a spatial sample with its image
    spots = ad.read_h5ad(out / f"{cohort.slides[0].slide_id}.h5ad")
    meta = spots.uns["cpnn_input"]
    assert meta["image_path"] == str((out / f"{cohort.slides[0].slide_id}.png").resolve())
    assert meta["mpp"] == 0.5 and meta["spot_diameter_um"] == 60.0

    back = load_synthetic_cohort(out)
    assert _same(_arrays(cohort), _arrays(back))
    assert back.cell_types == cohort.cell_types and back.genes == cohort.genes
    assert back.seed == cohort.seed and back.params == cohort.params
    for a, b in zip(cohort.slides, back.slides):
        assert (a.slide_id, a.patient_id) == (b.slide_id, b.patient_id)
        assert list(a.cells["cell_type"]) == list(b.cells["cell_type"])
        assert b.spots.uns["cpnn_input"]["image_path"].endswith(f"{a.slide_id}.png")
    assert json.loads((out / "truth.json").read_text())["params"]["n_slides"] == 4


def test_load_reports_missing_or_broken_files(cohort, tmp_path):
    with pytest.raises(CPNNInputError, match="truth.json"):
        load_synthetic_cohort(tmp_path)
    out = cohort.save(tmp_path / "c")
    (out / f"{cohort.slides[1].slide_id}.png").unlink()
    with pytest.raises(CPNNInputError, match=f"{cohort.slides[1].slide_id}.png"):
        load_synthetic_cohort(out)
    (out / "truth.json").write_text("{not json")
    with pytest.raises(CPNNInputError, match="JSON"):
        load_synthetic_cohort(out)


def test_spots_anndata_concatenates_and_selects(cohort):
    ids = [cohort.slides[2].slide_id, cohort.slides[0].slide_id]
    A = cohort.spots_anndata(ids)
    assert A.n_obs == sum(cohort.slide(i).spots.n_obs for i in ids)
    assert list(A.obs["section"].unique()) == ids
    assert A.obs_names.is_unique and np.issubdtype(A.X.dtype, np.integer)
    assert set(A.uns["cpnn_inputs"]) == set(ids)
    np.testing.assert_array_equal(A.obsm["true_proportions"][:25],
                                  cohort.slide(ids[0]).spots.obsm["true_proportions"])
    with pytest.raises(CPNNInputError, match="slide_id"):
        cohort.spots_anndata(["nope"])


# ----------------------------------------------------------------------------- arguments
@pytest.mark.parametrize("kw,field", [
    (dict(n_slides=0), "n_slides"),
    (dict(n_types=1), "n_types"),
    (dict(n_genes=20), "n_genes"),
    (dict(mpp=-1.0), "mpp"),
    (dict(spot_diameter_um=5.0), "spot_diameter_um"),
    (dict(image_px=100, spot_diameter_um=100.0), "image_px"),
    (dict(n_patients=30), "n_patients"),
    (dict(seed=-1), "seed"),
])
def test_bad_arguments_name_the_field(kw, field):
    with pytest.raises(CPNNInputError) as err:
        make_synthetic_cohort(**kw)
    assert err.value.field == field and err.value.fix


def test_more_than_eight_types_and_other_geometry():
    c = make_synthetic_cohort(n_slides=1, n_types=9, n_genes=100, image_px=300, mpp=1.0,
                              spot_pitch_um=55.0, spot_diameter_um=55.0, n_ref_cells=200)
    assert c.cell_types[-1] == "Type9" and c.true_prototypes.shape == (9, 100)
    s = c.slides[0]
    assert s.image.shape == (300, 300, 3)
    assert s.spots.obsm["true_proportions"].shape[1] == 9
    np.testing.assert_allclose(s.spots.obsm["true_proportions"].sum(1), 1.0)


def test_saved_slides_are_read_by_the_generic_spatial_reader(cohort, tmp_path):
    try:
        from cpnn.data.spatial_h5ad import read_spatial_h5ad
    except ImportError:  # the readers live in another part of the package
        pytest.skip("cpnn.data.spatial_h5ad is not available")
    out = cohort.save(tmp_path / "c")
    s = cohort.slides[0]
    a = read_spatial_h5ad(out / f"{s.slide_id}.h5ad", require_image=True)
    assert a.uns["cpnn_input"]["mpp"] == 0.5
    assert a.uns["cpnn_input"]["image_path"].endswith(f"{s.slide_id}.png")
    X = a.X.toarray() if sp.issparse(a.X) else np.asarray(a.X)
    np.testing.assert_array_equal(X, np.asarray(s.spots.X))
    np.testing.assert_array_equal(a.obsm["spatial"], s.spots.obsm["spatial"])


# ----------------------------------------------------------------------------- patient effects
PE_KW = dict(n_slides=4, n_patients=2, image_px=400, mpp=1.0, spot_pitch_um=80.0,
             spot_diameter_um=80.0, n_genes=60, n_ref_cells=100, seed=3)


@pytest.fixture(scope="module")
def plain_pe():
    return make_synthetic_cohort(**PE_KW)


def test_patient_effects_zero_is_byte_identical(plain_pe):
    from cpnn.data.synthetic import PATIENT_EFFECTS

    for zero in (0.0, 0, {}, {name: 0.0 for name in PATIENT_EFFECTS}):
        c = make_synthetic_cohort(**PE_KW, patient_effects=zero)
        assert _same(_arrays(plain_pe), _arrays(c))
        assert c.params == plain_pe.params and "patient_effects" not in c.params
        assert c.patient_effects == {} and "patient_effects" not in c.slides[0].spots.uns


def test_patient_effects_are_recorded_and_saved_only_when_used(tmp_path):
    c = make_synthetic_cohort(**PE_KW, patient_effects={"stain": 0.5})
    assert c.params["patient_effects"]["stain"] == 0.5
    assert c.params["patient_effects"]["tumour_state"] == 0.0
    assert set(c.patient_effects["patients"]) == {"P01", "P02"}
    assert c.slides[0].spots.uns["patient_effects"]["strengths"]["stain"] == 0.5
    back = load_synthetic_cohort(c.save(tmp_path / "c"))
    assert back.patient_effects["patients"]["P01"]["stain_h"] == \
        pytest.approx(c.patient_effects["patients"]["P01"]["stain_h"])


@pytest.mark.parametrize("bad", [-1.0, float("nan"), {"stian": 1.0}, {"stain": "x"}, True])
def test_bad_patient_effects_name_the_field(bad):
    with pytest.raises(CPNNInputError) as err:
        make_synthetic_cohort(**PE_KW, patient_effects=bad)
    assert "patient_effects" in err.value.field and err.value.fix


def _mean_colour(c):
    return np.array([s.image.reshape(-1, 3).mean(0) for s in c.slides])


def test_stain_effect_shifts_image_colour_per_patient(plain_pe):
    shifted = make_synthetic_cohort(**PE_KW, patient_effects={"stain": 1.0})
    delta = _mean_colour(shifted) - _mean_colour(plain_pe)  # slides x RGB
    assert np.abs(delta).max(axis=1).min() > 2.0  # every slide's colour moved
    # the two sections of a patient move alike (one patient's stain), the patients differ
    p1, p2 = delta[:2], delta[2:]
    assert np.abs(p1[0] - p1[1]).max() < 0.5 * np.abs(p1).max()
    assert np.abs(p2[0] - p2[1]).max() < 0.5 * np.abs(p2).max()
    assert np.abs(p1.mean(0) - p2.mean(0)).max() > 2.0
    # the cells and the counts are untouched: only the image changed
    for a, b in zip(plain_pe.slides, shifted.slides):
        assert np.array_equal(a.spots.X, b.spots.X)


def test_scanner_effect_blurs_and_compresses(plain_pe):
    scanned = make_synthetic_cohort(**PE_KW, patient_effects={"scanner": 1.0})
    for a, b in zip(plain_pe.slides, scanned.slides):
        sharp = np.abs(np.diff(a.image.astype(float), axis=1)).mean()
        soft = np.abs(np.diff(b.image.astype(float), axis=1)).mean()
        assert soft < 0.9 * sharp
        assert np.array_equal(a.spots.X, b.spots.X)


def _patient_props(c):
    return np.array([np.mean([s.spots.obsm["true_proportions"].mean(0)
                              for s in c.slides if s.patient_id == p], axis=0)
                     for p in ("P01", "P02")])


def test_composition_effect_shifts_patient_mean_proportions(plain_pe):
    tilted = make_synthetic_cohort(**PE_KW, patient_effects={"composition": 1.5})
    before, after = _patient_props(plain_pe), _patient_props(tilted)
    assert np.abs(after - before).sum(axis=1).min() > 0.1
    for p, pid in enumerate(("P01", "P02")):
        tilt = np.asarray(tilted.patient_effects["patients"][pid]["composition_tilt"])
        up, down = int(np.argmax(tilt)), int(np.argmin(tilt))
        assert after[p, up] > before[p, up] and after[p, down] <= before[p, down] + 1e-9


def _mixture_residual(c):
    """Median over slides of the relative residual of the best non-negative prototype
    mixture fitted to the slide's pooled spots (pooling averages the count noise away)."""
    from scipy.optimize import nnls

    protos = c.true_prototypes.T  # G x K
    out = []
    for s in c.slides:
        a = s.spots
        y = np.asarray(a.X, dtype=float) / (a.obs["capture_efficiency"].to_numpy()[:, None]
                                           * c.platform_factor[None, :])
        pooled = y.sum(axis=0)
        _, res = nnls(protos, pooled)
        out.append(res / np.linalg.norm(pooled))
    return float(np.median(out))


def test_tumour_state_makes_expression_leave_the_prototype_mixture():
    kw = {**PE_KW, "n_types": 2, "n_genes": 40}  # two types: many spots rich in tumour cells
    plain = make_synthetic_cohort(**kw)
    state = make_synthetic_cohort(**kw, patient_effects={"tumour_state": 1.0})
    assert np.array_equal(plain.slides[0].image, state.slides[0].image)
    assert _mixture_residual(state) > 2.0 * _mixture_residual(plain)


def test_inflammation_program_follows_immune_density():
    kw = {**PE_KW, "n_types": 2, "n_genes": 60}  # Epithelial (inflamed) and T-cells (immune)
    plain = make_synthetic_cohort(**kw)
    infl = make_synthetic_cohort(**kw, patient_effects={"inflammation": 1.0})
    assert infl.patient_effects["immune_types"] == ["T-cells"]
    up = np.asarray(infl.patient_effects["inflammation_program"]) > 0.3
    mixed, lift = [], []
    for a, b in zip(plain.slides, infl.slides):
        t = a.spots.obsm["true_proportions"][:, 1]
        # the program needs inflamed cells among immune ones: strongest in mixed spots
        mixed.append(t * (1 - t))
        xa, xb = np.asarray(a.spots.X, float), np.asarray(b.spots.X, float)
        lift.append(np.log1p(xb[:, up].sum(1)) - np.log1p(xa[:, up].sum(1)))
    mixed, lift = np.concatenate(mixed), np.concatenate(lift)
    assert np.corrcoef(mixed, lift)[0, 1] > 0.4
    assert lift[mixed > 0.15].mean() > lift[mixed < 0.05].mean() + 0.1

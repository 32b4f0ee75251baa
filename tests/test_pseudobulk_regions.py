"""Pseudo-bulk regions: a partition of the spots, exact sums, bulk-trained CPNN."""
from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

from cpnn.errors import CPNNInputError
from cpnn.workflows.pseudobulk import fit_bulk_model, make_regions, region_bags, spot_pitch_um
from cpnn.workflows.spatial import SpatialSample


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def grid_section(sid="S1", nx=10, ny=8, pitch_um=200.0, mpp=0.7, jitter=0.08, seed=0, n_genes=15, hole=True):
    """Legacy-ST-like grid with jittered centres, a hole, and Poisson counts."""
    rng = np.random.default_rng(seed)
    gy, gx = np.meshgrid(np.arange(ny), np.arange(nx), indexing="ij")
    keep = np.ones(gx.size, bool)
    if hole:
        keep &= ~((gx.ravel() == 4) & (gy.ravel() == 4))
    ax, ay = gx.ravel()[keep], gy.ravel()[keep]
    xy = (np.stack([ax, ay], 1) * pitch_um + 1000.0) / mpp
    xy += rng.normal(scale=jitter * pitch_um / mpp, size=xy.shape)
    x = rng.poisson(5.0, size=(len(xy), n_genes)).astype(np.float32)
    x[:, 0] += 1
    a = ad.AnnData(X=sparse.csr_matrix(x), obs=pd.DataFrame({"array_x": ax, "array_y": ay},
                                                            index=[f"{i}x{j}" for i, j in zip(ax, ay)]),
                   var=pd.DataFrame(index=[f"g{j}" for j in range(n_genes)]))
    a.obsm["spatial"] = xy
    a.uns["cpnn_input"] = {"mpp": mpp, "sample_id": sid, "spot_diameter_um": 100.0}
    return a


def test_regions_partition_spots_into_blocks_of_neighbours():
    a = grid_section()
    reg = make_regions(a, block_spots=3)
    assert reg.info["pitch_um"] == pytest.approx(200.0, rel=0.1)  # measured from the centres
    allm = np.concatenate(reg.members)
    assert sorted(allm.tolist()) == list(range(a.n_obs))  # every spot exactly once
    assert (reg.labels >= 0).all() and len(set(reg.names)) == len(reg)
    for r, m in enumerate(reg.members):
        assert (reg.labels[m] == r).all()
        ax, ay = a.obs["array_x"].to_numpy()[m], a.obs["array_y"].to_numpy()[m]
        # neighbours: a block spans at most 3 array steps each way, and lines up with the grid
        assert np.ptp(ax) <= 2 and np.ptp(ay) <= 2
        assert len(set(ax // 3)) == 1 and len(set(ay // 3)) == 1
    sizes = sorted(len(m) for m in reg.members)
    assert sizes[-1] == 9 and 8 in sizes  # interior blocks full, the one with the hole has 8


def test_region_counts_are_sums_and_min_spots_drops_small_regions():
    a = grid_section(nx=7, ny=5)
    s = SpatialSample("S1", a, features=np.random.default_rng(0).normal(size=(a.n_obs, 4)).astype(np.float32))
    genes = ["g3", "g0", "g7"]  # not in var order: the bulk follows the requested order
    reg = make_regions(a, block_spots=3, min_spots=4)
    assert reg.info["n_spots_dropped"] == int((reg.labels < 0).sum()) > 0
    assert all(len(m) >= 4 for m in reg.members)
    rb = region_bags([s], genes, block_spots=3, min_spots=4)
    dense = pd.DataFrame(a.X.toarray(), columns=a.var_names)
    want = dense[genes].groupby(reg.labels).sum()
    want = want.loc[want.index >= 0].to_numpy()
    np.testing.assert_allclose(rb.counts, want)
    for bag, m in zip(rb.bags, rb.members):
        np.testing.assert_array_equal(bag, s.features[m])
    assert list(rb.sections) == ["S1"] * len(rb.bags)


def test_regions_need_microns_per_pixel():
    a = grid_section()
    a.uns["cpnn_input"] = {"sample_id": "S1"}
    with pytest.raises(CPNNInputError, match="microns per pixel"):
        make_regions(a)
    a.uns["cpnn_input"] = {"sample_id": "S1", "mpp": 0.7, "inter_spot_distance_um": 150.0}
    assert spot_pitch_um(a) == 150.0
    with pytest.raises(CPNNInputError, match="block_spots"):
        make_regions(a, block_spots=0)


def test_fit_bulk_model_trains_on_regions_and_predicts_spots(tmp_path):
    from cpnn.model import CPNN
    from cpnn.workflows.fit import FitOptions

    rng = np.random.default_rng(0)
    k, g, d = 3, 15, 6
    protos_v = rng.gamma(1.0, 1.0, size=(k, g)) + 0.05

    class P:
        values = protos_v
        cell_types = ["A", "B", "C"]
        genes = [f"g{j}" for j in range(g)]
        provenance = {"method": "test"}

    samples = []
    for i in range(3):
        a = grid_section(f"S{i}", seed=i)
        samples.append(SpatialSample(f"S{i}", a, features=rng.normal(size=(a.n_obs, d)).astype(np.float32)))
    opts = FitOptions(reference="protos.tsv", level="bulk")
    opts.model.update(hidden=[8])
    opts.train.update(max_epochs=3)
    model = fit_bulk_model(samples, P(), opts, progress=False)
    assert model.encoder["level"] == "bulk"
    assert model.encoder["training"]["n_regions"] == sum(len(make_regions(s.adata, 3, 2)) for s in samples)
    assert model.train_config.batch_size == 8  # region default, not the spot default
    out = model.predict(samples[0].features)
    assert out["weights"].shape == (samples[0].adata.n_obs, k)
    np.testing.assert_allclose(out["spot_expr"].sum(1), 1.0, rtol=1e-4)
    path = model.save(tmp_path / "m.cpnn")
    again = CPNN.load(path)
    assert again.encoder["level"] == "bulk" and again.prototype_provenance["trained_level"] == "bulk"
    np.testing.assert_allclose(again.predict(samples[0].features)["weights"], out["weights"], rtol=1e-5)


def test_run_fit_level_bulk_then_ordinary_predict(tmp_path):
    """The ``cpnn fit --level bulk`` / ``cpnn predict`` path on feature files."""
    from cpnn.encoders import write_feature_file
    from cpnn.prototypes import Prototypes
    from cpnn.workflows.fit import FitOptions, run_fit, run_predict

    rng = np.random.default_rng(1)
    g, d = 15, 6
    Prototypes(values=(rng.gamma(1.0, 1.0, size=(3, g)) + 0.05).astype(np.float32), cell_types=["A", "B", "C"],
               genes=[f"g{j}" for j in range(g)], method="naive", label_key="type").save(tmp_path / "protos.tsv")
    feats = tmp_path / "feats"
    samples = []
    for i in range(3):
        a = grid_section(f"S{i}", seed=10 + i)
        f = rng.normal(size=(a.n_obs, d)).astype(np.float32)
        write_feature_file(feats / f"S{i}.h5", f, np.zeros((a.n_obs, 2), np.int64),
                           attrs={"encoder": "efficientnet-lite0", "patch_um": 112.0, "patch_size_px": 224,
                                  "tta": "none"}, ids=list(a.obs_names))
        samples.append(SpatialSample(f"S{i}", a))
    opts = FitOptions(reference=str(tmp_path / "protos.tsv"), level="bulk")
    opts.model.update(hidden=[8])
    opts.train.update(max_epochs=2)
    run = tmp_path / "run"
    model = run_fit(samples[:2], opts, run, features_dir=feats, progress=False)
    assert model.encoder["level"] == "bulk" and model.encoder["training"]["sections"] == ["S0", "S1"]
    import json

    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["level"] == "bulk" and metrics["residual_head"] is None  # a spot-level term only
    held_out = [SpatialSample("S2", samples[2].adata)]
    pred = run_predict(run, held_out, tmp_path / "pred.h5ad", features_dir=feats, progress=False)[0]
    assert pred.n_obs == samples[2].adata.n_obs and pred.obsm["cpnn_weights"].shape[1] == 3
    assert pred.uns["cpnn"]["encoder"]["level"] == "bulk"

"""DDP training: 1 process reproduces train_cpnn; 2 gloo processes under torchrun match it."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cpnn.config import CPNNConfig, TrainConfig
from cpnn.module.network import CPNNModule
from cpnn.train import BagData, predict_bags, train_cpnn
from cpnn.train.distributed import (
    load_training_job,
    run_training_job,
    save_training_job,
    train_cpnn_distributed,
)

# relative tolerance of the 2-process run against the 1-process run: they differ only in
# the order of floating-point sums (DDP's all-reduce), over a few AdamW steps
RTOL = 1e-5


def _problem(seed=0, n_train=19, n_val=6, dim=16, k=4, g=30):
    rng = np.random.default_rng(seed)
    protos = rng.gamma(1.0, 1.0, size=(k, g)) + 0.01
    centres = rng.normal(size=(k, dim)).astype(np.float32)

    def bags(n):
        feats, counts, targets = [], [], []
        for _ in range(n):
            size = int(rng.integers(3, 21))
            w = rng.dirichlet(np.ones(k))
            types = rng.choice(k, size=size, p=w)
            feats.append((centres[types] + 0.3 * rng.normal(size=(size, dim))).astype(np.float32))
            counts.append(rng.poisson(200 * (w @ protos) / (w @ protos).sum() * 10))
            targets.append(w)
        return BagData.from_bags(feats, np.array(counts, np.float32), np.array(targets, np.float32))

    config = CPNNConfig(hidden=(32, 16), dropout=0.0, composition_weight=10.0, template_weight=10.0,
                        feature_scaling="none")
    # max_patches_per_bag below the largest bag: subsampling is exercised too; 19 training
    # bags in batches of 6 leave a last batch of 1 bag (one process gets a stand-in bag)
    tc = TrainConfig(max_epochs=4, batch_size=6, max_patches_per_bag=12, early_stopping="val_pcc",
                     patience=50, seed=3, progress=False, lr=3e-3)
    return bags(n_train), bags(n_val), np.log(protos).astype(np.float32), config, tc


def _module(train, log_protos, config, tc):
    torch.manual_seed(tc.seed)
    return CPNNModule(train.features.shape[1], torch.from_numpy(log_protos), config)


def _assert_state_close(a, b, rtol=RTOL):
    assert a.keys() == b.keys()
    for key in a:
        x, y = a[key].double(), b[key].double()
        scale = max(float(y.abs().max()), 1e-3)
        err = float((x - y).abs().max())
        assert err <= rtol * scale, f"{key}: max abs diff {err:.3g} > {rtol} x {scale:.3g}"


def test_single_process_equals_train_cpnn():
    train, val, log_protos, config, tc = _problem()
    ref = _module(train, log_protos, config, tc)
    res_ref = train_cpnn(ref, train, val, config, tc)
    mod = _module(train, log_protos, config, tc)
    res = train_cpnn_distributed(mod, train, val, config, tc)
    # the same arithmetic in the same order on one process: identical, not just close
    for k, v in ref.state_dict().items():
        assert torch.equal(v, mod.state_dict()[k]), k
    assert res.best_epoch == res_ref.best_epoch
    for r1, r2 in zip(res.history, res_ref.history):
        assert r1.keys() == r2.keys()
        for key in r1:
            assert r1[key] == pytest.approx(r2[key], rel=1e-6), key


def test_job_folder_round_trip(tmp_path):
    train, val, log_protos, config, tc = _problem()
    save_training_job(tmp_path / "job", train, log_protos, config, tc, val=val)
    job = load_training_job(tmp_path / "job")
    assert isinstance(job["train"].features, np.memmap) or isinstance(job["train"].features.base, np.memmap)
    np.testing.assert_array_equal(np.asarray(job["train"].features), train.features)
    np.testing.assert_array_equal(job["val"].offsets, val.offsets)
    assert job["config"] == config and job["train_config"] == tc


def test_job_folder_missing_is_clear(tmp_path):
    from cpnn.errors import CPNNInputError

    with pytest.raises(CPNNInputError, match="job.json"):
        load_training_job(tmp_path)


@pytest.mark.slow
def test_two_gloo_processes_match_one(tmp_path):
    train, val, log_protos, config, tc = _problem()
    job = save_training_job(tmp_path / "job", train, log_protos, config, tc, val=val)
    # reference: the same job on this single process
    one = run_training_job(job, tmp_path / "one")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME=env.get("GLOO_SOCKET_IFNAME", "lo"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "cpnn.train.distributed", str(job), "--out", str(tmp_path / "two")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    a = torch.load(tmp_path / "two" / "module.pt", weights_only=True)
    b = torch.load(one, weights_only=True)
    assert a["world_size"] == 2 and b["world_size"] == 1
    _assert_state_close(a["state_dict"], b["state_dict"])
    assert a["best_epoch"] == b["best_epoch"]
    for r2, r1 in zip(a["history"], b["history"]):
        for key in ("train_loss", "val_loss", "val_pcc"):
            assert r2[key] == pytest.approx(r1[key], rel=1e-4, abs=1e-6), key
    # and the predictions of the two trained networks agree
    preds = []
    for state in (a["state_dict"], b["state_dict"]):
        m = _module(train, log_protos, config, tc)
        m.load_state_dict(state)
        preds.append(predict_bags(m, val, return_patch_outputs=False)["bag_expr"])
    np.testing.assert_allclose(preds[0], preds[1], rtol=1e-4, atol=1e-9)

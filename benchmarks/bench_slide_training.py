"""Slide-level training cost: cpnn's bag head vs a plain-torch floor vs the old per-patch head.

Three ways to run the same epochs on the same bags (random features: the cost does not
depend on their values), each in a fresh subprocess so that its peak RSS
(``resource.getrusage``) is its own:

- ``product``: ``CPNN.fit`` as users call it (feature scaling, composition and template
  terms, AdamW, clipping), whose bag head works from the bags' mean weights;
- ``floor``: the least any implementation must do, in plain torch: the MLP forward and
  backward over every tile, the bag mean of the weights, one ``B x G`` head and NB loss;
- ``old``: ``CPNN.fit`` with the head as it was before issue 15 (every tile's expression,
  tiles x genes, and its gradient, then the bag mean).

``--setting small`` (default): 16 bags x 4,096 tiles x 512-d, 5,000 genes, 9 types,
2 epochs, in memory::

    OMP_NUM_THREADS=1 python benchmarks/bench_slide_training.py --out runs/slide_training

``--setting paper``: the paper's slide setting (1,000 bags x 4,096 tiles x 512-d, every
gene, K = 9 and 29), with features streamed from one HDF5 file per slide (a batch's
slides are read at each step; never all in memory). ``--paper-bags`` of the 1,000 bags
are run and the epoch is extrapolated linearly in the number of steps (the per-step cost
does not depend on the other slides)::

    OMP_NUM_THREADS=1 python benchmarks/bench_slide_training.py --setting paper --paper-bags 16

The streamed loop is this script's (the package trains from in-memory or memory-mapped
features): ``product`` there is the package's network and loss (``CPNNModule``,
``cpnn.train.loop._bag_loss``) fed by the reader, without feature scaling.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MODES = ("floor", "product", "old")


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _problem(n_bags, tiles, dim, n_types, n_genes, seed=0):
    rng = np.random.default_rng(seed)
    protos = rng.gamma(0.5, 1.0, size=(n_types, n_genes)).astype(np.float32) + 1e-3
    counts = rng.poisson(2e4 * protos.mean(0) / protos.mean(0).sum(), size=(n_bags, n_genes)).astype(np.float32)
    counts[:, 0] += 1  # no empty bag
    targets = rng.dirichlet(np.ones(n_types), size=n_bags).astype(np.float32)
    return protos, counts, targets


def _features(n_bags, tiles, dim, seed=1):
    return np.random.default_rng(seed).standard_normal((n_bags * tiles, dim), dtype=np.float32)


class _Protos:
    def __init__(self, values):
        self.values = values
        self.cell_types = [f"t{k}" for k in range(values.shape[0])]
        self.genes = [f"g{j}" for j in range(values.shape[1])]
        self.provenance = {}


def _old_forward(self, features, bag_index=None, n_bags=None, patch_outputs=False):
    """The head before issue 15: every tile's expression (tiles x genes), then the bag mean."""
    import torch

    from cpnn.module.network import segment_mean

    weights = self.weights(features)
    patch_expr = self._apply_gene_factors(weights @ self.prototype_expression())
    spot_expr = patch_expr / patch_expr.sum(dim=1, keepdim=True)
    if n_bags is None:
        n_bags = int(bag_index.max().item()) + 1
    bag_raw = segment_mean(patch_expr, bag_index, n_bags)
    return {"weights": weights, "spot_expr": spot_expr,
            "bag_expr": bag_raw / bag_raw.sum(dim=1, keepdim=True).clamp_min(torch.tensor(1e-30)),
            "bag_weights": segment_mean(weights, bag_index, n_bags)}


def _floor_model(dim, n_types, n_genes, hidden):
    """Plain torch: MLP -> softmax -> bag mean -> (B, K) @ exp(T) with gene factors -> NB."""
    import torch
    from torch import nn

    layers, width = [], dim
    for h in hidden:
        layers += [nn.Linear(width, h), nn.GELU()]
        width = h
    layers.append(nn.Linear(width, n_types))

    class Floor(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = nn.Sequential(*layers)
            self.log_t = nn.Parameter(torch.randn(n_types, n_genes))
            self.a = nn.Parameter(torch.zeros(n_genes))
            self.b = nn.Parameter(torch.full((n_genes,), -23.0))
            self.log_theta = nn.Parameter(torch.full((n_genes,), 2.3))

        def forward(self, x, seg, n_bags, counts):
            w = torch.softmax(self.mlp(x), dim=1)
            sums = w.new_zeros((n_bags, w.shape[1])).index_add_(0, seg, w)
            bw = sums / torch.bincount(seg, minlength=n_bags).clamp_min(1)[:, None]
            e = torch.exp(self.a) * (bw @ torch.exp(self.log_t)) + torch.exp(self.b)
            mu = e / e.sum(1, keepdim=True) * counts.sum(1, keepdim=True)
            th = torch.exp(self.log_theta)
            ll = (torch.lgamma(counts + th) - torch.lgamma(th) - torch.lgamma(counts + 1)
                  + th * torch.log(th / (th + mu)) + counts * torch.log(mu / (th + mu) + 1e-10))
            return -ll.mean()

    return Floor()


def _batches(n_bags, batch_size, epochs, seed=0):
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        order = rng.permutation(n_bags)
        for s in range(0, n_bags, batch_size):
            yield np.sort(order[s:s + batch_size])


def _floor_step_fn(a, n_genes):
    import torch

    model = _floor_model(a.dim, a.types, n_genes, a.hidden)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step(x, seg, n_bags, counts, targets):
        loss = model(x, seg, n_bags, counts)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def _package_step_fn(a, protos, old):
    """One step of ``cpnn.train.loop.train_cpnn`` (network, loss, AdamW, clipping)."""
    import torch

    from cpnn.config import CPNNConfig
    from cpnn.module.network import CPNNModule
    from cpnn.train.loop import _bag_loss

    if old:
        CPNNModule.forward = _old_forward
    cfg = CPNNConfig(hidden=tuple(a.hidden))
    torch.manual_seed(0)
    module = CPNNModule(a.dim, torch.from_numpy(np.log(protos)), cfg)
    module.train()
    opt = torch.optim.AdamW(module.parameters(), lr=1e-3, weight_decay=1e-2)

    def step(x, seg, n_bags, counts, targets):
        out = module(x, seg, n_bags=n_bags)
        loss = _bag_loss(module, out, counts, targets, cfg)["total"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 0.5)
        opt.step()
    return step


def _warm_up() -> None:
    """Pay torch's one-off costs before the clock starts: the first optimiser imports
    torch._dynamo (seconds), the first GELU/linear/backward load their kernels."""
    import torch

    lin = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(lin.parameters())
    torch.nn.functional.gelu(lin(torch.randn(3, 4))).sum().backward()
    opt.step()


def run_small(a) -> dict:
    """One mode, in memory, in this process."""
    import torch

    protos, counts, targets = _problem(a.bags, a.tiles, a.dim, a.types, a.genes)
    feats = _features(a.bags, a.tiles, a.dim)
    offsets = np.arange(a.bags + 1) * a.tiles
    from cpnn.config import CPNNConfig, TrainConfig
    from cpnn.model import CPNN
    from cpnn.module.network import CPNNModule

    _warm_up()
    rss0 = _peak_rss_gib()
    t0 = time.perf_counter()
    if a.mode == "floor":
        step = _floor_step_fn(a, a.genes)
        x_all = torch.from_numpy(feats)
        c_all = torch.from_numpy(counts)
        for bags in _batches(a.bags, a.batch_size, a.epochs):
            rows = np.concatenate([np.arange(offsets[b], offsets[b + 1]) for b in bags])
            seg = torch.from_numpy(np.repeat(np.arange(len(bags)), a.tiles))
            step(x_all[rows], seg, len(bags), c_all[bags], None)
    else:
        if a.mode == "old":
            CPNNModule.forward = _old_forward
        model = CPNN(_Protos(protos), CPNNConfig(hidden=tuple(a.hidden)),
                     TrainConfig(max_epochs=a.epochs, batch_size=a.batch_size, early_stopping="none",
                                 max_patches_per_bag=a.tiles, progress=False, seed=0))
        model.fit(feats, counts, bags=offsets, composition_targets=targets)
    return {"seconds": time.perf_counter() - t0, "peak_rss_gib": _peak_rss_gib(), "rss_before_gib": rss0}


def _write_slides(folder: Path, n_bags, tiles, dim):
    import h5py

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for b in range(n_bags):
        p = folder / f"slide{b:04d}.h5"
        if not p.exists():
            with h5py.File(p, "w") as fh:
                fh["features"] = np.random.default_rng(100 + b).standard_normal((tiles, dim), dtype=np.float32)
        paths.append(p)
    return paths


def run_paper(a) -> dict:
    """One mode of the paper setting: features streamed from one h5 per slide."""
    import h5py
    import torch

    protos, counts, targets = _problem(a.paper_bags, a.tiles, a.dim, a.types, a.genes)
    paths = _write_slides(Path(a.h5_dir), a.paper_bags, a.tiles, a.dim)
    if a.mode == "floor":
        step = _floor_step_fn(a, a.genes)
    else:
        step = _package_step_fn(a, protos, old=a.mode == "old")
    c_all, t_all = torch.from_numpy(counts), torch.from_numpy(targets)
    _warm_up()
    rss0 = _peak_rss_gib()
    t0 = time.perf_counter()
    read = 0.0
    n_steps = 0
    for bags in _batches(a.paper_bags, a.batch_size, 1):
        r0 = time.perf_counter()
        parts = []
        for b in bags:
            with h5py.File(paths[b], "r") as fh:
                parts.append(fh["features"][:])
        x = torch.from_numpy(np.concatenate(parts))
        read += time.perf_counter() - r0
        seg = torch.from_numpy(np.repeat(np.arange(len(bags)), [len(p) for p in parts]))
        step(x, seg, len(bags), c_all[bags], t_all[bags])
        n_steps += 1
    secs = time.perf_counter() - t0
    full_steps = -(-1000 // a.batch_size)
    return {"seconds": secs, "read_seconds": read, "steps": n_steps, "peak_rss_gib": _peak_rss_gib(),
            "rss_before_gib": rss0, "epoch_seconds_1000_bags": secs / n_steps * full_steps}


def _child(a, mode, **extra) -> dict:
    cmd = [sys.executable, __file__, "--child", "--mode", mode, "--setting", a.setting,
           "--bags", str(a.bags), "--tiles", str(a.tiles), "--dim", str(a.dim), "--genes", str(extra.get("genes", a.genes)),
           "--types", str(extra.get("types", a.types)), "--epochs", str(a.epochs), "--batch-size", str(a.batch_size),
           "--threads", str(a.threads), "--paper-bags", str(a.paper_bags), "--h5-dir", str(a.h5_dir),
           "--hidden", *map(str, a.hidden)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--setting", choices=["small", "paper"], default="small")
    p.add_argument("--modes", default="floor,product,old", help="comma-separated subset of " + ",".join(MODES))
    p.add_argument("--repeats", type=int, default=1, help="runs per mode (the fastest is kept)")
    p.add_argument("--bags", type=int, default=16)
    p.add_argument("--tiles", type=int, default=4096)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--genes", type=int, default=5000)
    p.add_argument("--types", type=int, default=9)
    p.add_argument("--paper-types", default="9,29")
    p.add_argument("--paper-genes", type=int, default=20000, help="'every gene': a whole transcriptome")
    p.add_argument("--paper-bags", type=int, default=16, help="slides actually run in --setting paper")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--hidden", type=int, nargs="*", default=[1024, 512], help="the paper's MLP")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--h5-dir", default=None, help="where the per-slide h5 files go (default: a temp folder)")
    p.add_argument("--out", default=None, help="folder for results.json")
    p.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        import torch

        torch.set_num_threads(a.threads)
        res = run_small(a) if a.setting == "small" else run_paper(a)
        print(json.dumps(res))
        return 0
    modes = [m for m in a.modes.split(",") if m]
    tmp = None
    if a.h5_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="cpnn_slides_")
        a.h5_dir = tmp.name
    results = {"settings": {k: v for k, v in vars(a).items() if k not in ("child", "mode", "out")},
               "threads": a.threads, "cpu_count": os.cpu_count(), "runs": []}
    grid = [dict()] if a.setting == "small" else [
        {"types": int(k), "genes": a.paper_genes} for k in a.paper_types.split(",")]
    for extra in grid:
        # modes in turn, repeat after repeat: on a shared machine each mode then sees the
        # same mix of load; the fastest run of each is kept
        runs = {m: [] for m in modes}
        for _ in range(a.repeats):
            for mode in modes:
                runs[mode].append(_child(a, mode, **extra))
                print(json.dumps({"mode": mode, **extra, **runs[mode][-1]}), flush=True)
        for mode in modes:
            best = min(runs[mode], key=lambda r: r["seconds"])
            row = {"mode": mode, **extra, **best, "all_seconds": [r["seconds"] for r in runs[mode]],
                   "all_peak_rss_gib": [r["peak_rss_gib"] for r in runs[mode]]}
            results["runs"].append(row)
    by = {(r.get("types"), r["mode"]): r for r in results["runs"]}
    for (k, mode), r in by.items():
        floor = by.get((k, "floor"))
        if floor and mode != "floor":
            r["x_floor_time"] = r["seconds"] / floor["seconds"]
            r["over_floor_rss_gib"] = r["peak_rss_gib"] - floor["peak_rss_gib"]
            print(f"K={k or a.types} {mode}: {r['x_floor_time']:.2f}x the floor's time, "
                  f"{r['over_floor_rss_gib']:+.2f} GiB peak RSS over the floor")
    if a.out:
        from cpnn.utils import write_json

        Path(a.out).mkdir(parents=True, exist_ok=True)
        write_json(Path(a.out) / f"results_{a.setting}.json", results)
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())

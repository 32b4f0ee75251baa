"""One training epoch: cpnn's vectorised loop vs a per-bag Python loop (the reference code's way).

Both do the same arithmetic on the same batches of 8 bags (CPNN head, NB loss, composition
and template terms, AdamW, clipping): the vectorised loop runs one forward pass over all
tiles of a batch and averages bags with a segment mean; the per-bag loop forwards each bag
separately and averages the bag losses. Prints both epoch times and their ratio.

    python benchmarks/bench_epoch_speed.py                      # 1,000 bags x 4,096 tiles x 64-d
    python benchmarks/bench_epoch_speed.py --bags 32 --threads 2  # a quick run (time scales with bags)

Features are random (the timing does not depend on their values); at 64-d, 1,000 x 4,096
tiles take 1.0 GiB (features at 512-d would take 8.4 GiB: use --dim 512 on a big machine).
"""
from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch

from cpnn.config import CPNNConfig, TrainConfig
from cpnn.module.network import CPNNModule
from cpnn.train import BagData, train_cpnn
from cpnn.train.loop import _bag_loss


def make_data(n_bags: int, tiles: int, dim: int, n_types: int, n_genes: int, seed: int) -> tuple:
    rng = np.random.default_rng(seed)
    feats = rng.standard_normal((n_bags * tiles, dim), dtype=np.float32)
    offsets = np.arange(n_bags + 1, dtype=np.int64) * tiles
    protos = rng.gamma(1.0, 1.0, size=(n_types, n_genes)).astype(np.float32) + 1e-3
    counts = rng.poisson(2000 * protos.mean(0) / protos.mean(0).sum(), size=(n_bags, n_genes)).astype(np.float32)
    targets = rng.dirichlet(np.ones(n_types), size=n_bags).astype(np.float32)
    return BagData(feats, offsets, counts, targets), np.log(protos)


def per_bag_epoch(module: CPNNModule, data: BagData, config: CPNNConfig, tc: TrainConfig) -> float:
    """The reference code's pattern: a Python loop over the bags of each batch."""
    rng = np.random.default_rng(tc.seed)
    opt = torch.optim.AdamW(module.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    features = torch.from_numpy(data.features)
    counts = torch.from_numpy(data.counts)
    targets = torch.from_numpy(data.targets)
    module.train()
    t0 = time.perf_counter()
    order = rng.permutation(data.n_bags)
    for start in range(0, data.n_bags, tc.batch_size):
        bags = order[start : start + tc.batch_size]
        total = 0.0
        for b in bags:
            x = features[data.offsets[b] : data.offsets[b + 1]]
            out = module(x, torch.zeros(len(x), dtype=torch.long), n_bags=1)
            total = total + _bag_loss(module, out, counts[b : b + 1], targets[b : b + 1], config)["total"]
        loss = total / len(bags)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), tc.grad_clip)
        opt.step()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bags", type=int, default=1000)
    ap.add_argument("--tiles", type=int, default=4096)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--hidden", default="1024,512", help="MLP widths (the paper's 1024,512)")
    ap.add_argument("--types", type=int, default=9)
    ap.add_argument("--genes", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    hidden = tuple(int(h) for h in args.hidden.split(",") if h)
    t = time.perf_counter()
    data, log_protos = make_data(args.bags, args.tiles, args.dim, args.types, args.genes, args.seed)
    print(f"data: {args.bags} bags x {args.tiles} tiles x {args.dim}-d "
          f"({data.features.nbytes / 2**30:.2f} GiB) in {time.perf_counter() - t:.1f} s; "
          f"head {hidden}, {args.types} types, {args.genes} genes, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads")
    config = CPNNConfig(hidden=hidden, feature_scaling="none")
    tc = TrainConfig(max_epochs=1, batch_size=args.batch_size, max_patches_per_bag=args.tiles,
                     early_stopping="none", progress=False, seed=args.seed)

    def fresh() -> CPNNModule:
        torch.manual_seed(args.seed)
        return CPNNModule(args.dim, torch.from_numpy(log_protos), config)

    # warm-up (first optimizer creation imports torch._dynamo; allocator warm-up)
    train_cpnn(fresh(), data.subset(np.arange(min(args.batch_size, args.bags))), None, config, tc)
    vec = train_cpnn(fresh(), data, None, config, tc).seconds
    loop = per_bag_epoch(fresh(), data, config, tc)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"vectorised epoch (cpnn.train.train_cpnn): {vec:8.2f} s  ({vec / args.bags * 1e3:.1f} ms/bag)")
    print(f"per-bag Python loop epoch:                 {loop:8.2f} s  ({loop / args.bags * 1e3:.1f} ms/bag)")
    print(f"ratio per-bag / vectorised: {loop / vec:.2f}x   peak RSS {peak:.2f} GiB")
    if args.bags != 1000:
        print(f"extrapolated to 1,000 bags: vectorised {vec / args.bags * 1000:.0f} s, "
              f"per-bag {loop / args.bags * 1000:.0f} s")


if __name__ == "__main__":
    main()

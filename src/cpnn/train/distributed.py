"""Data-parallel CPNN training with PyTorch's DistributedDataParallel (DDP).

One code path trains on 1 process (no ``torch.distributed`` at all) or on N processes
started by ``torchrun``; the N-process run follows the same optimisation trajectory as the
1-process run with the same settings, up to floating-point summation order.

Semantics (see ``docs/DISTRIBUTED.md``)
-------------------------------------
- ``TrainConfig.batch_size`` is the **global** batch: every step, all processes draw the
  same seeded permutation of the bags and the same patch subsample (exactly as
  :func:`cpnn.train.train_cpnn` does), and process ``r`` takes bags ``r, r + N, ...`` of
  the step's batch. Changing the number of processes does not change what a step sees.
- Each process scales its loss by ``n_local * N / n_global`` so that DDP's gradient
  *average* equals the gradient of the mean loss over the global batch (the template
  regulariser, which does not depend on bags, is added unscaled by every process).
  This is exact for every loss that is a mean over bags (``nb``, ``poisson``,
  ``mse_log1p``, the composition loss); ``pearson`` is a correlation across the batch's
  bags and is computed per process (a warning says so).
- Validation bags are split across processes, their predictions gathered, and every
  process computes the same metrics, so early stopping stops everyone at the same epoch.
- Only rank 0 writes files.

Launch (one node, 2 processes; ``gloo`` on CPU, ``nccl`` when CUDA is available)::

    torchrun --standalone --nproc_per_node 2 -m cpnn.train.distributed JOB_DIR --out RUN_DIR

where ``JOB_DIR`` was written by :func:`save_training_job`. Features are memory-mapped,
so the processes of one node share one copy in the page cache.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..config import CPNNConfig, TrainConfig, config_from_dict, config_to_dict
from ..errors import CPNNInputError
from ..module.network import CPNNModule
from .bags import BagData
from .loop import TrainResult, train_cpnn

JOB_FORMAT = "cpnn-training-job"


# ---------------------------------------------------------------------------- process group
def dist_env() -> Tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from the variables ``torchrun`` sets (0, 1, 0 without)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return rank, world, local


def init_distributed(backend: Optional[str] = None) -> Tuple[int, int, str]:
    """Join the process group ``torchrun`` describes; a no-op for a single process.

    Parameters
    ----------
    backend
        ``"gloo"`` or ``"nccl"``; default ``nccl`` when CUDA is available, else ``gloo``.

    Returns
    -------
    (rank, world_size, device)
        ``device`` is ``cuda:LOCAL_RANK`` with CUDA, else ``cpu``.
    """
    import torch.distributed as dist

    rank, world, local = dist_env()
    use_cuda = torch.cuda.is_available()
    device = f"cuda:{local}" if use_cuda else "cpu"
    if use_cuda:
        torch.cuda.set_device(local)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend=backend or ("nccl" if use_cuda else "gloo"))
    return rank, world, device


def train_cpnn_distributed(
    module: CPNNModule,
    train: BagData,
    val: Optional[BagData],
    config: CPNNConfig,
    train_config: TrainConfig,
    device: Optional[str] = None,
) -> TrainResult:
    """Fit ``module`` in place, data-parallel over the processes of the current group.

    The same loop as :func:`cpnn.train.train_cpnn` (which is data-parallel whenever a
    process group of several processes is initialised); kept under this name for callers
    that want to say so. Without a process group (or with one process) it is
    ``train_cpnn`` itself.

    Parameters
    ----------
    module
        The network, initialised identically on every process (seed it the same way).
    train
        Training bags with ``counts`` (every process holds the same ``BagData``; memory-map
        the features to share them). Each process reads only the rows of its bags.
    val
        Validation bags, or None (no early stopping; the last epoch is kept).
    config, train_config
        Model and optimisation settings (``batch_size`` is global).
    device
        Defaults to ``train_config.device`` (``init_distributed`` returns the right one).

    Returns
    -------
    TrainResult
        Identical on every process; the best weights are restored in ``module``.
    """
    return train_cpnn(module, train, val, config, train_config, device=device)


# ---------------------------------------------------------------------------- job folders
def save_training_job(
    path: os.PathLike | str,
    train: BagData,
    log_prototypes: np.ndarray,
    config: CPNNConfig,
    train_config: TrainConfig,
    val: Optional[BagData] = None,
    log_platform_factor: Optional[np.ndarray] = None,
    genes: Optional[Sequence[str]] = None,
    cell_types: Optional[Sequence[str]] = None,
) -> Path:
    """Write everything a (distributed) training run needs into a folder of ``.npy`` files.

    Parameters
    ----------
    path
        Folder to create. Features go to ``features.npy`` (memory-mapped by every process).
    train, val
        Bags with counts (features already scaled as the model expects).
    log_prototypes
        ``(K, G)`` log of the initial prototypes.
    config, train_config
        Saved as JSON in ``job.json``.
    log_platform_factor
        Optional ``(G,)`` initial gene scale.
    genes, cell_types
        Optional names, kept in ``job.json`` for provenance.

    Returns
    -------
    pathlib.Path
        The folder.
    """
    from ..utils import atomic_path, write_json

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    arrays = {"features": train.features, "offsets": train.offsets, "counts": train.counts,
              "targets": train.targets, "log_prototypes": np.asarray(log_prototypes, np.float32),
              "log_platform_factor": log_platform_factor}
    if val is not None:
        arrays.update({"val_features": val.features, "val_offsets": val.offsets, "val_counts": val.counts,
                       "val_targets": val.targets})
    for name, arr in arrays.items():
        if arr is None:
            continue
        with atomic_path(path / f"{name}.npy", suffix=".npy") as tmp, open(tmp, "wb") as fh:
            np.save(fh, np.asarray(arr))
    write_json(path / "job.json", {
        "format": JOB_FORMAT, "config": config_to_dict(config), "train_config": config_to_dict(train_config),
        "arrays": sorted(k for k, v in arrays.items() if v is not None),
        "genes": None if genes is None else list(map(str, genes)),
        "cell_types": None if cell_types is None else list(map(str, cell_types)),
    })
    return path


def load_training_job(path: os.PathLike | str):
    """Read a folder written by :func:`save_training_job` (features memory-mapped).

    Returns
    -------
    dict
        ``train`` and ``val`` (BagData or None), ``log_prototypes``, ``log_platform_factor``,
        ``config``, ``train_config``, ``meta`` (the parsed ``job.json``).
    """
    path = Path(path)
    meta_path = path / "job.json"
    if not meta_path.is_file():
        raise CPNNInputError("not a cpnn training job folder (no job.json)", path=path,
                             fix="write it with cpnn.train.distributed.save_training_job")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise CPNNInputError(f"job.json is not valid JSON ({exc})", path=meta_path) from None
    if meta.get("format") != JOB_FORMAT:
        raise CPNNInputError(f"job.json has format {meta.get('format')!r}, expected {JOB_FORMAT!r}",
                             path=meta_path, field="format")

    def arr(name: str, mmap: bool = False):
        if name not in meta.get("arrays", []):
            return None
        f = path / f"{name}.npy"
        try:
            return np.load(f, mmap_mode="r" if mmap else None)
        except (OSError, ValueError, EOFError) as exc:
            raise CPNNInputError(f"unreadable array ({exc})", path=f, field=name,
                                 fix="rewrite the job with save_training_job") from None

    train = BagData(arr("features", True), arr("offsets"), arr("counts"), arr("targets"))
    val = None
    if "val_features" in meta["arrays"]:
        val = BagData(arr("val_features", True), arr("val_offsets"), arr("val_counts"), arr("val_targets"))
    return {
        "train": train, "val": val, "log_prototypes": arr("log_prototypes"),
        "log_platform_factor": arr("log_platform_factor"),
        "config": config_from_dict(CPNNConfig, meta["config"]),
        "train_config": config_from_dict(TrainConfig, meta["train_config"]), "meta": meta,
    }


def run_training_job(job_dir: os.PathLike | str, out_dir: os.PathLike | str,
                     backend: Optional[str] = None) -> Optional[Path]:
    """Train the job in ``job_dir`` on this process group; rank 0 writes ``out_dir/module.pt``.

    ``module.pt`` holds ``state_dict``, ``history``, ``best_epoch``, ``world_size`` and the
    configs; ``out_dir/history.json`` the per-epoch record. Returns the file on rank 0.
    """
    import torch.distributed as dist

    from ..utils import atomic_path, write_json

    rank, world, device = init_distributed(backend)
    try:
        job = load_training_job(job_dir)
        config, tc = job["config"], job["train_config"]
        torch.manual_seed(tc.seed)  # same initial weights on every process, as CPNN does
        lpf = job["log_platform_factor"]
        module = CPNNModule(job["train"].features.shape[1], torch.from_numpy(job["log_prototypes"]), config,
                            None if lpf is None else torch.from_numpy(np.asarray(lpf)))
        result = train_cpnn_distributed(module, job["train"], job["val"], config, tc, device=device)
        out = None
        if rank == 0:
            out_dir = Path(out_dir)
            out = out_dir / "module.pt"
            payload = {"state_dict": {k: v.cpu() for k, v in module.state_dict().items()},
                       "history": result.history, "best_epoch": result.best_epoch, "world_size": world,
                       "config": config_to_dict(config), "train_config": config_to_dict(tc),
                       "seconds": result.seconds}
            with atomic_path(out) as tmp:
                torch.save(payload, tmp)
            write_json(out_dir / "history.json", {"world_size": world, "best_epoch": result.best_epoch,
                                                  "seconds": result.seconds, "history": result.history})
        if world > 1:
            dist.barrier()
        return out
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m cpnn.train.distributed JOB_DIR --out RUN_DIR`` (under ``torchrun``)."""
    p = argparse.ArgumentParser(prog="python -m cpnn.train.distributed",
                                description="Train a CPNN job folder on all processes torchrun started.")
    p.add_argument("job", help="folder written by cpnn.train.distributed.save_training_job")
    p.add_argument("--out", required=True, help="output folder (rank 0 writes module.pt, history.json)")
    p.add_argument("--backend", choices=["gloo", "nccl"], default=None)
    args = p.parse_args(argv)
    try:
        out = run_training_job(args.job, args.out, args.backend)
    except CPNNInputError as exc:
        print(f"cpnn: error: {exc}", file=sys.stderr)
        return 2
    if out is not None:
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

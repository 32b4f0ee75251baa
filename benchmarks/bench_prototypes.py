"""Wall time of naive and regression prototypes on the real Wu et al. CID4465 reference.

Usage: python benchmarks/bench_prototypes.py [--data-dir ../shared/data] [--threads N]
Prints one line per (labels, genes, method): types x genes, wall and CPU seconds,
regression iterations and final NLL.
"""
from __future__ import annotations

import argparse
import time
import warnings

from cpnn.prototypes import build_prototypes, read_reference, reference_qc
from cpnn.utils import find_data_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data-dir", default=None, help="shared data folder (default: CPNN_DATA_DIR or ../shared/data)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    args = ap.parse_args()
    root = find_data_dir(args.data_dir)
    if root is None:
        raise SystemExit("data folder not found: pass --data-dir or set CPNN_DATA_DIR")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    panel = [ln.strip() for ln in open(root / "her2st" / "her2st_785_genes.txt") if ln.strip()]
    warnings.simplefilter("ignore")
    t = time.perf_counter()
    raw = read_reference(root / "reference" / "wu2021_CID4465.h5ad", "celltype_major")
    print(f"read_reference: {raw.n_obs} cells x {raw.n_vars} genes, {time.perf_counter() - t:.2f} s")
    for key in ("celltype_major", "celltype_minor"):
        ref = reference_qc(raw, key)
        qc = ref.uns["cpnn"]["reference_qc"]
        print(f"{key}: after QC {qc['n_cells_after']} cells x {qc['n_genes_after']} genes, "
              f"labels dropped {qc['labels_dropped']}")
        for gname, genes in (("her2st785", panel), ("allQC", None)):
            for method in ("naive", "regression"):
                w, c = time.perf_counter(), time.process_time()
                p = build_prototypes(ref, key, method=method, genes=genes)
                wall, cpu = time.perf_counter() - w, time.process_time() - c
                extra = ""
                if method == "regression":
                    pv = p.provenance
                    extra = (f" iters={pv['iterations']} evals={pv['function_evaluations']} "
                             f"converged={pv['converged']} nll/count={pv['nll_per_count']:.4f}")
                print(f"  {key:15s} {gname:10s} {method:10s} {p.n_types:2d} x {p.n_genes:5d} "
                      f"wall={wall:6.2f}s cpu={cpu:6.2f}s{extra}", flush=True)


if __name__ == "__main__":
    main()

"""How well does `cpnn.prototypes.deconvolve` recover slide-bulk compositions of the synthetic
generator, given the TRUE prototypes? (Why slide-level CPNN's composition targets fail.)

Usage: python benchmarks/bulk_deconvolution_check.py   (about 1 minute on 2 cores)

Prints, per cell type, the Pearson correlation across 16 slides between deconvolved and true
proportions (default settings, then longer runs), and the same on one slide's spots.
"""
import warnings

import numpy as np


def per_type_r(est, true):
    return [round(float(np.corrcoef(est[:, k], true[:, k])[0, 1]), 3) for k in range(true.shape[1])]


def main() -> int:
    from cpnn._constants import TRUE_PROPORTIONS
    from cpnn.data.synthetic import make_synthetic_cohort
    from cpnn.prototypes import deconvolve

    warnings.simplefilter("ignore")
    c = make_synthetic_cohort(n_slides=16, n_patients=16, image_px=512, seed=0)
    y = np.stack([s.bulk_counts for s in c.slides]).astype(np.float32)
    p = np.stack([s.bulk_proportions for s in c.slides])
    print(f"16 slide bulks, {int(y.sum(1).min()):,}-{int(y.sum(1).max()):,} reads; true proportion sd per type "
          f"{p.std(0).round(3).tolist()}")
    for kw in ({}, {"tol": 1e-9}, {"tol": 1e-9, "max_iter": 5000}):
        d = deconvolve(y, c.true_prototypes, seed=0, **kw)
        print(f"bulk {kw or 'defaults'}: {d.n_iter} updates, mean proportions {d.proportions.mean(0).round(2).tolist()}, "
              f"per-type r {per_type_r(d.proportions, p)}")
    sp = c.slides[0].spots
    x = np.asarray(sp.X.toarray() if hasattr(sp.X, "toarray") else sp.X, dtype=np.float32)
    d = deconvolve(x, c.true_prototypes, seed=0)
    print(f"spots of {c.slides[0].slide_id} (defaults): per-type r {per_type_r(d.proportions, np.asarray(sp.obsm[TRUE_PROPORTIONS]))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

#!/usr/bin/env bash
# Quick HER2ST spot-level benchmark (CPNN, ridge probe x2, MLP) -> BENCHMARKS.md numbers.
#
#   benchmarks/run_her2st_benchmark.sh [OUT_DIR] [extra `cpnn benchmark` flags]
#
# Needs the shared data folder (CPNN_DATA_DIR, or ../shared/data beside the checkout).
# Features are extracted once into ~/.cache/cpnn/her2st_features (about 1 min per section
# on 2 cores) and reused; point CPNN_FEATURE_CACHE at a folder of {section}_none.h5 files
# to reuse features made elsewhere. THREADS (default 2) caps BLAS/torch threads: on a
# machine shared with other jobs, THREADS=1 avoids thread oversubscription.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-runs/her2st_quick}"
shift || true
threads="${THREADS:-2}"
export OMP_NUM_THREADS="$threads" OPENBLAS_NUM_THREADS="$threads" MKL_NUM_THREADS="$threads"
config="$here/configs/her2st_quick.yaml"
if [[ -n "${CPNN_FEATURE_CACHE:-}" ]]; then
  tmpcfg="$(mktemp --suffix=.yaml)"
  sed "s#^  cache_dir: .*#  cache_dir: ${CPNN_FEATURE_CACHE}#" "$config" > "$tmpcfg"
  config="$tmpcfg"
fi
/usr/bin/env time -p cpnn benchmark "$config" --out "$out" --no-progress "$@"

#!/usr/bin/env bash
# Partition benchmark: ddm's k-means vs scikit-learn on the 60,000 x 784 Fashion-MNIST pixels, K = 8,
# same settings, 2 threads each, alternating runs on one machine (compare ratios within one run).
# Needs: apt-get install dataset-fashion-mnist; a venv with numpy scikit-learn threadpoolctl at $PY.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-/tmp/ddm-peer/venv/bin/python}
PEER=${PEER:-../shared/bench/kmeans_sklearn.py}
REPS=${REPS:-3}
export RAYON_NUM_THREADS=2
cargo build --release -q -p ddm-datasets --example bench_kmeans
BIN=target/release/examples/bench_kmeans
echo "# $(date -u +%FT%TZ) $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
for rep in $(seq "$REPS"); do
  for pca in 0 64; do
    "$PY" "$PEER" --k 8 --threads 2 --pca "$pca" | sed 's/^{/{"impl": "sklearn", /'
    "$BIN" --k 8 --pca "$pca"
  done
  for pca in 0 64; do
    "$PY" scripts/kmeans_two_stage_sklearn.py --k 8 --fine 1024 --threads 2 --pca "$pca"
    "$BIN" --k 8 --pca "$pca" --two-stage 1024
  done
done

#!/bin/bash
# Benchmark (not a test): ddm's VAE (encode, decode, training step) against diffusers'
# AutoencoderKL (scripts/bench_vae.py), in alternating rounds on this machine, each program with
# the CPU's widest SIMD and then restricted to AVX2 + FMA at run time: ddm by DDM_CPU_CAPABILITY,
# PyTorch by ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA and MKL_ENABLE_INSTRUCTIONS (README, Results
# and benchmarks). Prints one JSON line per program per round, and the FMA peak of each round.
#   cargo build --release --workspace --examples
#   ROUNDS=3 CONFIG=small BATCH=64 ITERS=5 PY=/tmp/ddm-peer/venv/bin/python scripts/bench_vae_rounds.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
CONFIG=${CONFIG:-small}
BATCH=${BATCH:-64}
ITERS=${ITERS:-5}
PY=${PY:-/tmp/ddm-peer/venv/bin/python}
SIMD=${SIMD:-"avx512 avx2"}
FMA=${TMPDIR:-/tmp}/ddm-fma-peak
gcc -O3 -march=native -pthread scripts/fma_peak.c -o "$FMA"
grep -m1 "model name" /proc/cpuinfo
grep -m1 flags /proc/cpuinfo | tr ' ' '\n' | grep -E '^(avx|avx2|fma|avx512.*)$' | tr '\n' ' '; echo
args=(--config "$CONFIG" --batch "$BATCH" --iters "$ITERS")
for r in $(seq "$ROUNDS"); do
  echo "== round $r $(date +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
  for simd in $SIMD; do
    if [ "$simd" = avx2 ]; then
      DDM_CPU_CAPABILITY=avx2 target/release/examples/bench_vae "${args[@]}"
      ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \
        "$PY" scripts/bench_vae.py "${args[@]}" --threads 2
    else
      target/release/examples/bench_vae "${args[@]}"
      "$PY" scripts/bench_vae.py "${args[@]}" --threads 2
    fi
  done
  "$FMA" | tail -1
done

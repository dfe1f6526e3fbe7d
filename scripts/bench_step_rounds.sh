#!/bin/bash
# Benchmark (not a test): ddm's DiT training step and forward against the PyTorch peer, in
# alternating rounds on this machine, with the CPU's FMA peak read in each round (README, Results
# and benchmarks). Prints one JSON line per program per round.
#   cargo build --release --workspace --examples
#   ROUNDS=3 PEER=/path/to/dit_fm.py-dir PY=/tmp/ddm-peer/venv/bin/python scripts/bench_step_rounds.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
PEER=${PEER:-../shared/bench}
PY=${PY:-/tmp/ddm-peer/venv/bin/python}
FMA=${TMPDIR:-/tmp}/ddm-fma-peak
gcc -O3 -march=native -pthread scripts/fma_peak.c -o "$FMA"
grep -m1 "model name" /proc/cpuinfo
grep -m1 flags /proc/cpuinfo | tr ' ' '\n' | grep -E '^(avx|avx2|fma|avx512.*)$' | tr '\n' ' '; echo
for r in $(seq "$ROUNDS"); do
  echo "== round $r $(date +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
  target/release/examples/bench_step --size DiT-Bench/4 --steps 15 --fwd-iters 5 | grep '"impl"'
  (cd "$PEER" && "$PY" dit_fm.py bench --model a --threads 2 --steps 20 --fwd-iters 5 | grep RESULT)
  "$FMA" | tail -1
done

#!/bin/bash
# Benchmark (not a test): ddm's DiT training step and forward against the PyTorch peer, in
# alternating rounds on this machine, with the CPU's FMA peak read in each round (README, Results
# and benchmarks). Prints one JSON line per program per round. SIMD="avx512 avx2" runs each
# program twice a round, the second time restricted to AVX2 + FMA at run time: ddm by
# DDM_CPU_CAPABILITY, PyTorch by ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA and MKL_ENABLE_INSTRUCTIONS.
#   cargo build --release --workspace --examples
#   ROUNDS=3 PEER=/path/to/dit_fm.py-dir PY=/tmp/ddm-peer/venv/bin/python scripts/bench_step_rounds.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
PEER=${PEER:-../shared/bench}
PY=${PY:-/tmp/ddm-peer/venv/bin/python}
SIMD=${SIMD:-widest}
FMA=${TMPDIR:-/tmp}/ddm-fma-peak
gcc -O3 -march=native -pthread scripts/fma_peak.c -o "$FMA"
grep -m1 "model name" /proc/cpuinfo
grep -m1 flags /proc/cpuinfo | tr ' ' '\n' | grep -E '^(avx|avx2|fma|avx512.*)$' | tr '\n' ' '; echo
ddm() { target/release/examples/bench_step --size DiT-Bench/4 --steps 15 --fwd-iters 5 | grep '"impl"'; }
peer() { (cd "$PEER" && "$PY" dit_fm.py bench --model a --threads 2 --steps 20 --fwd-iters 5 | grep RESULT); }
for r in $(seq "$ROUNDS"); do
  echo "== round $r $(date +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
  for simd in $SIMD; do
    if [ "$simd" = avx2 ]; then
      DDM_CPU_CAPABILITY=avx2 ddm
      ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 peer
    else
      ddm
      peer
    fi
  done
  "$FMA" | tail -1
done

#!/usr/bin/env bash
# Issue 36 measurements (README "The quickstart: where its ten minutes go"): which expert settings
# buy the most FD per CPU minute of the quickstart's islands. Each configuration trains K = 4
# class-conditional experts on the class-conditional paper table's partition (4 island processes,
# 2 at a time, one thread each, batch 32, as the quickstart runs them), registers them with that
# table's class-conditioned router (DiT-XS/4, 800 steps) and scores 500 class-balanced top-1
# samples (UniPC, 8 steps, seed 0) at guidance 1.5, 2 and 3 with `ddm eval images`.
# Run from the repository root after
#   cargo run --release -- experiment paper-table --out runs/paper-table-cond --conditional --skip-gmm --checkpoints 1
# About 7 min per DiT-T/4 configuration of 1800 steps on 2 cores; writes runs/quickstart-sweep/.
set -euo pipefail
DDM=${DDM:-$PWD/target/release/ddm}
PT=${PT:-$PWD/runs/paper-table-cond/fashion-mnist-conditional}
OUT=${OUT:-$PWD/runs/quickstart-sweep}
P=$PT/partition-clustered

# One configuration: NAME MODEL STEPS LR [more trainer flags].
config() {
  local name=$1 model=$2 steps=$3 lr=$4 o=$OUT/$1 t0 g k
  shift 4
  [ -f "$o/fd.json" ] && return
  mkdir -p "$o"
  t0=$(date +%s)
  for pair in "0 1" "2 3"; do
    for k in $pair; do
      RAYON_NUM_THREADS=1 RUST_LOG=warn "$DDM" train --partition "$P" --cluster "$k" --out "$o/expert-$k" \
        --model "$model" --steps "$steps" --batch-size 32 --lr "$lr" --class-conditional \
        --checkpoint-every 100000 --quiet "$@" > "$o/train-$k.log" 2>&1 &
    done
    wait
  done
  echo "$(( $(date +%s) - t0 ))" > "$o/islands-seconds.txt"
  "$DDM" register --registry "$o/registry" --partition "$P" --replace "$o"/expert-{0,1,2,3}/expert.safetensors \
    "$PT/train/clustered-router/router.safetensors" > /dev/null
  for g in 1.5 2 3; do
    "$DDM" sample --registry "$o/registry" --strategy top-1 --class all --n 500 --steps 8 --solver unipc \
      --guidance "$g" --seed 0 --quiet --out "$o/top-1-g$g.png" > /dev/null
  done
  "$DDM" eval images --quiet --json "$o/fd.json" "$o"/*.safetensors > "$o/eval.txt"
  echo "$(date +%T) $name"
}

config T4-1200 DiT-T/4 1200 5e-4          # the quickstart's budget before
config T4-1800 DiT-T/4 1800 5e-4          # 1.5x the steps: the budget chosen
config T2-440 DiT-T/2 440 5e-4            # patch 2 (4x the tokens) in the time of T4-1800
# No EMA configuration: below ~4500 steps the decay is the warm-up's (1 + s) / (10 + s), 0.995 at
# step 1800, whatever --ema-decay above it says (--ema-decay 0.998 gave bit-identical experts).
config T4-1800-lr1e-3 DiT-T/4 1800 1e-3

# One row per configuration: FD at each guidance, and the islands' wall time.
python3 - "$OUT" > "$OUT/table.md" <<'PY'
import json, os, sys
out = sys.argv[1]
print("| configuration | islands wall s | FD, guidance 1.5 | 2 | 3 |")
print("|---|---:|---:|---:|---:|")
for name in sorted(os.listdir(out)):
    path = os.path.join(out, name, "fd.json")
    if not os.path.exists(path):
        continue
    fd = json.load(open(path))
    by = {os.path.basename(k): v["fd"] for k, v in fd.items() if k != "floor"}
    wall = open(os.path.join(out, name, "islands-seconds.txt")).read().strip()
    cells = [f"{by.get(f'top-1-g{g}.safetensors', float('nan')):.2f}" for g in ("1.5", "2", "3")]
    print(f"| {name} | {wall} | " + " | ".join(cells) + " |")
PY
cat "$OUT/table.md"

#!/usr/bin/env bash
# Issue 32: the shape of the beta step schedule (`--schedule beta:A:B`), chosen for few steps.
# Samples the class-conditional paper table's ensemble (top-1 and trajectory, UniPC (`ddm
# sample`'s solver), 4, 6 and 8 evaluations, N = 500 class-balanced) with every shape of a grid, on
# sampling seed 1, so that the rows README reports (seed 0, scripts/fd_vs_nfe.sh) are not the
# ones the shape was chosen on. Prints the shapes by their mean FD over those 6 runs; `uniform`
# and SD3's `shifted:3` are scored beside them. About 20 min on 2 cores.
# Run from the repository root after
#   cargo run --release -- experiment paper-table --out runs/paper-table-cond --conditional --skip-gmm --checkpoints 1
set -euo pipefail
DDM=${DDM:-$PWD/target/release/ddm}
PT=${PT:-$PWD/runs/paper-table-cond/fashion-mnist-conditional}
OUT=${OUT:-$PWD/runs/tune-schedule}
SHAPES=${SHAPES:-"0.4 0.6 0.8 1"}
mkdir -p "$OUT"
schedules="uniform shifted:3"
for a in $SHAPES; do
  for b in $SHAPES; do
    [ "$a $b" = "1 1" ] || schedules="$schedules beta:$a:$b" # Beta(1, 1) is uniform
  done
done
for schedule in $schedules; do
  for system in top-1 trajectory; do
    for nfe in 4 6 8; do
      name="$system-unipc-${schedule//:/_}-$nfe"
      [ -f "$OUT/$name.safetensors" ] && continue
      "$DDM" sample --registry "$PT/registry/clustered-100" --strategy "$system" --class all \
        --n 500 --steps "$nfe" --solver unipc --schedule "$schedule" --seed 1 --quiet \
        --out "$OUT/$name.png" > /dev/null
    done
  done
  echo "$(date +%T) $schedule"
done
"$DDM" eval images --quiet --json "$OUT/fd.json" "$OUT"/*.safetensors > "$OUT/eval.txt"
python3 - "$OUT/fd.json" <<'PY' | tee "$OUT/table.md"
import collections, json, os, statistics, sys
fd = json.load(open(sys.argv[1]))
by = collections.defaultdict(dict)
for path, r in fd.items():
    if path != "floor":
        system, solver, schedule, nfe = os.path.basename(path)[: -len(".safetensors")].rsplit("-", 3)
        by[schedule.replace("_", ":")][(system, solver, int(nfe))] = r["fd"]
runs = sorted(next(iter(by.values())))
print("| schedule | mean FD | " + " | ".join(f"{s} {o} {n}" for s, o, n in runs) + " |")
print("|---|---:|" + "---:|" * len(runs))
for schedule, row in sorted(by.items(), key=lambda kv: statistics.mean(kv[1].values())):
    cells = " | ".join(f"{row[r]:.2f}" for r in runs)
    print(f"| {schedule} | {statistics.mean(row.values()):.3f} | {cells} |")
PY

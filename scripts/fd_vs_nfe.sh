#!/usr/bin/env bash
# Issue 32 measurements (README "Sampling in fewer steps"): FD against the number of velocity
# evaluations (NFE) for the class-conditional paper table's monolith and ensemble (top-1,
# trajectory, full), with each solver and schedule, N = 500 class-balanced samples, seed 0.
# Run from the repository root after
#   cargo run --release -- experiment paper-table --out runs/paper-table-cond --conditional --skip-gmm --checkpoints 1
# Writes runs/fd-vs-nfe/ (samples, fd.json, fd-vs-nfe.png, table.md). About 30 min on 2 cores.
# Heun spends 2 evaluations a step, so its NFE 4 is 2 steps; odd NFEs round its steps down.
# SEED=1 OUT=runs/fd-vs-nfe-seed1 draws the same rows from other noise.
set -euo pipefail
DDM=${DDM:-$PWD/target/release/ddm}
PT=${PT:-$PWD/runs/paper-table-cond/fashion-mnist-conditional}
OUT=${OUT:-$PWD/runs/fd-vs-nfe}
SEED=${SEED:-0}
NFES=${NFES:-"4 6 8 12 16 25 50"}
mkdir -p "$OUT"
# One system with one solver and schedule at every NFE of $3.
sweep() {
  local system=$1 solver=$2 nfes=$3 schedule=${4:-uniform} src steps name
  case $system in
    monolith) src=(--checkpoint "$PT/registry/monolith-100.safetensors") ;;
    *) src=(--registry "$PT/registry/clustered-100" --strategy "$system") ;;
  esac
  for nfe in $nfes; do
    steps=$nfe
    [ "$solver" = heun ] && steps=$((nfe / 2))
    name="$system-$solver-${schedule//:/_}-$nfe" # no colon in a file name: shifted_3
    [ -f "$OUT/$name.safetensors" ] && continue
    "$DDM" sample "${src[@]}" --class all --n 500 --steps "$steps" --solver "$solver" \
      --schedule "$schedule" --seed "$SEED" --quiet --out "$OUT/$name.png" > /dev/null
    echo "$(date +%T) $name"
  done
}
for solver in ${SOLVERS:-euler heun dpm++2m unipc}; do
  for system in monolith top-1 trajectory; do
    sweep $system $solver "$NFES"
  done
  sweep full $solver "4 8 16" # four experts a step: the costliest system, fewer points
  sweep top-1 $solver "4 6 8 12 16" shifted:3
  for system in monolith top-1 trajectory; do
    # The beta schedule's shape chosen on seed 1 by scripts/tune_schedule.sh, and (multistep
    # solvers only) the shape beta sampling and diffusers use.
    sweep $system $solver "4 6 8 12 16" beta:1:0.8
    case $solver in dpm++2m | unipc) sweep $system $solver "4 6 8 12 16" beta:0.6:0.6 ;; esac
  done
done
"$DDM" eval images --quiet --json "$OUT/fd.json" "$OUT"/*.safetensors > "$OUT/eval.txt"
cargo run --release -q -p ddm-eval --example fd_vs_nfe_plot -- "$OUT/fd.json" "$OUT/fd-vs-nfe.png"
# One row per system, solver and schedule: FD at each NFE, and the sampler's own time per image
# (integration only, from each sample's report) at the largest NFE.
python3 - "$OUT" > "$OUT/table.md" <<'PY'
import json, os, sys
out = sys.argv[1]
fd = json.load(open(os.path.join(out, "fd.json")))
rows, nfes = {}, set()
for path, r in fd.items():
    if path == "floor":
        continue
    base = os.path.basename(path)[: -len(".safetensors")]
    system, solver, schedule, nfe = base.rsplit("-", 3) if base.count("-") >= 3 else (base, "", "", "0")
    rep = json.load(open(os.path.join(out, base + ".json")))
    nfe = int(nfe)
    nfes.add(nfe)
    rows.setdefault((system, rep["solver"], rep["schedule"]), {})[nfe] = (r["fd"], 1e3 * rep["seconds"] / rep["n"])
nfes = sorted(nfes)
print("| system | solver | schedule | " + " | ".join(f"NFE {n}" for n in nfes) + " | ms/img at the largest NFE |")
print("|---|---|---|" + "---:|" * (len(nfes) + 1))
for (system, solver, schedule), by in sorted(rows.items()):
    cells = [f"{by[n][0]:.2f}" if n in by else "–" for n in nfes]
    print(f"| {system} | {solver} | {schedule} | " + " | ".join(cells) + f" | {by[max(by)][1]:.1f} |")
print(f"\nFloor (real test images vs real training images, N = 500): FD {fd['floor']['fd']:.2f}")
PY
cat "$OUT/table.md"

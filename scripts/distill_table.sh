#!/usr/bin/env bash
# Issue 17 measurements (README "Distillation and heterogeneous ensembles"): a distilled student and heterogeneous ensembles beside the unconditional
# paper table's clustered-100 ensemble (K = 4 DiT-T/4, 800 steps at batch 16) and its monolith.
# Run from the repository root after `ddm experiment paper-table --out runs/paper-table-uncond
# --skip-gmm --checkpoints 1` (README); writes runs/distill/. About 1 h on 2 cores.
set -euo pipefail
DDM=${DDM:-$PWD/target/release/ddm}
mkdir -p runs/distill && cd runs/distill
PT=../paper-table-uncond/fashion-mnist
P=$PT/partition-clustered
REG=$PT/registry/clustered-100
TR=$PT/train
log() { echo "$(date +%T) $*"; }
# Same settings as the experts' (paper table): lr 5e-4, warm-up 100, EMA 0.999.
COMMON="--lr 5e-4 --warmup-steps 100 --ema-decay 0.999 --checkpoint-every 200 --quiet"
log student own-cluster
$DDM distill --registry $REG --partition $P --out student-own --model DiT-T/4 --steps 800 --batch-size 64 $COMMON
for c in 1 2; do
  log epsilon expert $c
  $DDM train --partition $P --cluster $c --out eps-$c --model DiT-T/4 --steps 800 --batch-size 16 --objective epsilon-cosine $COMMON
done
log larger expert 0
$DDM train --partition $P --cluster 0 --out bench-0 --model DiT-Bench/4 --steps 800 --batch-size 16 $COMMON
log registries
rm -rf reg-eps reg-size
# Mixed objectives: experts 1 and 2 epsilon, 0 and 3 velocity; the same router.
$DDM register --registry reg-eps --partition $P $TR/clustered-expert-0/expert.safetensors eps-1/expert.safetensors eps-2/expert.safetensors $TR/clustered-expert-3/expert.safetensors $TR/clustered-router/router.safetensors
# Mixed sizes: a DiT-Bench/4 expert on the largest cluster (0).
$DDM register --registry reg-size --partition $P bench-0/expert.safetensors $TR/clustered-expert-1/expert.safetensors $TR/clustered-expert-2/expert.safetensors $TR/clustered-expert-3/expert.safetensors $TR/clustered-router/router.safetensors
log sampling
S="--n 500 --steps 16 --seed 0 --quiet"
mkdir -p samples
$DDM sample --checkpoint $PT/registry/monolith-100.safetensors $S --out samples/monolith.png
$DDM sample --checkpoint student-own/expert.safetensors $S --out samples/student-own.png
for st in trajectory full; do
  $DDM sample --registry $REG --strategy $st $S --out samples/teacher-$st.png
  $DDM sample --registry reg-eps --strategy $st $S --out samples/eps-$st.png
  $DDM sample --registry reg-size --strategy $st $S --out samples/size-$st.png
done
log scoring
for f in samples/*.safetensors; do
  echo "== $f"; $DDM eval images $f --json ${f%.safetensors}.scores.json | tail -3
done
log student 267
$DDM distill --registry $REG --partition $P --out student-own-267 --model DiT-T/4 --steps 267 --batch-size 64 $COMMON
log monolith 267
$DDM train --partition $P --monolith --out monolith-267 --model DiT-T/4 --steps 267 --batch-size 64 $COMMON
S="--n 500 --steps 16 --seed 0 --quiet"
for m in student-own-267 monolith-267; do
  $DDM sample --checkpoint $m/expert.safetensors $S --out samples/$m.png
  $DDM eval images samples/$m.safetensors --json samples/$m.scores.json | tail -2
done
log done
# The epsilon rows of README were sampled again after x0_hat was clamped to the data's range:
# the `eps-*` samples above are those (the unclamped figures are quoted in README's text).

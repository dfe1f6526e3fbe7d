#!/usr/bin/env bash
# Issue 18 measurement (README "Latent space"): the unconditional paper table's clustered ensemble
# (K = 4, DiT-T/4 experts on 1 x 28 x 28 pixels, 800 steps at batch 16, a DiT-XS/4 router) redone in
# the latent space of a VAE ddm trains itself: DiT-T/1 experts on 4 x 7 x 7 latents (the same 49
# tokens, so the same FLOPs per step), the same steps, batch, lr and router recipe, sampled with the
# same noise settings and decoded before scoring. Writes runs/latent/. Run from the repository
# root after `cargo build --release`. About 35 min on 2 cores (the VAE 12, the latent ensemble 10, the pixel one 11).
set -euo pipefail
DDM=${DDM:-$PWD/target/release/ddm}
VAE_MODEL=${VAE_MODEL:-vae:3:8:4}
VAE_STEPS=${VAE_STEPS:-1500}
mkdir -p runs/latent && cd runs/latent
log() { echo "$(date +%T) $*"; }
log train-autoencoder $VAE_MODEL $VAE_STEPS steps
$DDM train-autoencoder --data fashion-mnist --out vae --model $VAE_MODEL --steps $VAE_STEPS --batch-size 64 --lr 1e-3 --checkpoint-every 500 --quiet
log encode
$DDM encode --vae vae/autoencoder.safetensors --data fashion-mnist --out latents.safetensors --quiet
log partition
$DDM partition --data tensors:latents.safetensors --k 4 --out part
# The paper table's expert and router settings.
COMMON="--lr 5e-4 --warmup-steps 100 --ema-decay 0.999 --checkpoint-every 200 --quiet"
for c in 0 1 2 3; do
  log expert $c
  $DDM train --partition part --cluster $c --out expert-$c --model DiT-T/1 --steps 800 --batch-size 16 $COMMON
done
log router
$DDM train-router --partition part --out router --model DiT-XS/1 --expert-model DiT-T/1 --steps 800 --batch-size 64 --eval-samples 500 $COMMON
rm -rf reg
$DDM register --registry reg expert-*/expert.safetensors router/router.safetensors vae/autoencoder.safetensors
log sampling
mkdir -p samples
for st in trajectory full; do
  $DDM sample --registry reg --strategy $st --decode --n 500 --steps 16 --seed 0 --quiet --out samples/latent-$st.png
  $DDM eval images samples/latent-$st.safetensors --json samples/latent-$st.scores.json | tail -3
done
$DDM sample --registry reg --strategy trajectory --decode --n 64 --steps 16 --seed 0 --quiet --out samples/latent-trajectory-64.png
log "the VAE's floor: its reconstructions of the test images"
$DDM encode --vae vae/autoencoder.safetensors --data fashion-mnist:test --out test-latents.safetensors --reconstructions samples/reconstructions-test.safetensors --quiet
$DDM eval images samples/reconstructions-test.safetensors --json samples/reconstructions-test.scores.json | tail -3
# The pixel-space side at equal training FLOPs: the paper table's 800-step clustered experts
# (after `ddm experiment paper-table --out runs/paper-table-uncond --skip-gmm --checkpoints 1`),
# resumed to 1487 steps: +687 steps x 4.0 GFLOPs x 4 experts = the VAE's training (9.95 TFLOPs)
# plus an upper bound of encoding the 60,000 images (1.04). Same router (the paper table's).
if [ -d ../paper-table-uncond/fashion-mnist/train ]; then
  PT=../paper-table-uncond/fashion-mnist
  for c in 0 1 2 3; do
    log pixel expert $c to 1487 steps
    rm -rf pixel-$c && cp -r $PT/train/clustered-expert-$c pixel-$c && rm -f pixel-$c/train.lock
    $DDM train --partition $PT/partition-clustered --cluster $c --out pixel-$c --model DiT-T/4 --steps 1487 --batch-size 16 $COMMON
  done
  rm -rf reg-pixel
  $DDM register --registry reg-pixel pixel-*/expert.safetensors $PT/train/clustered-router/router.safetensors
  for st in trajectory full; do
    $DDM sample --registry reg-pixel --strategy $st --n 500 --steps 16 --seed 0 --quiet --out samples/pixel-1487-$st.png
    $DDM eval images samples/pixel-1487-$st.safetensors --json samples/pixel-1487-$st.scores.json | tail -3
  done
  $DDM sample --registry reg-pixel --strategy trajectory --n 64 --steps 16 --seed 0 --quiet --out samples/pixel-1487-trajectory-64.png
fi
log done

#!/usr/bin/env bash
# Benchmark (not a test): ddm's first figures on a GPU (issue 34), in one run.
#
# A GPU machine lent to a session reaches no package registry and receives at most 64 MiB, so the
# script has two halves:
#   scripts/gpu_bench.sh pack       here: build, then copy the two programs it runs (stripped) into
#                                   gpu-bench/ (git-ignored), the folder to carry to the GPU machine
#   scripts/gpu_bench.sh run [--device cuda] [--peak-tflops T] [--size DiT-B/2] [--k 4]
#                                   there: the measurements, one JSON line each, then a summary
#
# `run` measures, on the device:
#   1. a DiT training step (forward, backward, AdamW, EMA) at batch 256 on Stable Diffusion's
#      latents of 256 x 256 images (4 x 32 x 32: DiT-B/2 sees 256 tokens), f32, and the sampling
#      forward of 256 samples; achieved TFLOP/s (a step counted as 3 forwards of the model's FLOPs)
#      and MFU against the datasheet's dense FP32 peak (known for H100, H200, A100, L40S; else pass
#      --peak-tflops). MFU against the TF32 tensor-core peak is printed beside it. Then the same
#      step and forward with the self-attention composed of burn's ops (`DDM_GPU_ATTENTION=composite`)
#      instead of ddm's CubeCL kernels: what the kernels gain or cost on this GPU.
#   2. the same step and forward in bf16 (`--precision bf16`: f32 master weights, AdamW and EMA in
#      f32), or in f16 where the device has no bf16 (Vulkan), with the MFU against the datasheet's
#      dense 16-bit tensor-core peak.
#   3. a routed sampling step: K experts of that size trained 2 steps each on the device (on the
#      Fashion-MNIST images embedded in ddm: the step's cost does not depend on what the weights
#      learned), a router, a registry, then `ddm sample --n 256 --steps 8` with `full` and
#      `top-1`, reading the report's seconds per step (model loading included).
# It needs nothing on the GPU machine but the driver (and, for cuda, NVRTC and the CUDA headers:
# README, Backends). `--device wgpu` runs it through Vulkan instead; `wgpu:software` on lavapipe
# is how it was checked without a GPU (with `--size DiT-T/4`).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cd "$here/.."
out=gpu-bench

case "${1:-}" in
pack)
  # The tests' build compiles the examples too, so after `cargo test --release --workspace` this
  # compiles nothing. Stripped, the two programs are ~175 MB; xz brings them to ~33 MB.
  cargo build --release --workspace --bin ddm --examples
  rm -rf "$out" && mkdir -p "$out/bin"
  for bin in target/release/ddm target/release/examples/bench_step; do
    strip -o "$out/bin/$(basename "$bin")" "$bin"
  done
  tar -C "$out" -cJf "$out/bin.tar.xz" bin && rm -rf "$out/bin"
  cp scripts/gpu_bench.sh "$out/"
  du -sh "$out"
  echo "carry $out/ to the GPU machine and run: $out/gpu_bench.sh run [--device cuda]"
  ;;
run)
  shift
  device=cuda size=DiT-B/2 k=4 peak=""
  while [ $# -gt 0 ]; do
    case "$1" in
    --device) device=$2; shift 2 ;;
    --size) size=$2; shift 2 ;;
    --k) k=$2; shift 2 ;;
    --peak-tflops) peak=$2; shift 2 ;;
    *) echo "gpu_bench.sh run: unknown option $1" >&2; exit 2 ;;
    esac
  done
  # The packed programs (unpacked once beside the script), else this checkout's build.
  if [ -f "$here/bin.tar.xz" ] && [ ! -x "$here/bin/ddm" ]; then tar -C "$here" -xJf "$here/bin.tar.xz"; fi
  if [ -x "$here/bin/ddm" ]; then
    ddm=$here/bin/ddm bench_step=$here/bin/bench_step
  else
    ddm=$(pwd)/target/release/ddm bench_step=$(pwd)/target/release/examples/bench_step
  fi
  for p in "$ddm" "$bench_step"; do
    [ -x "$p" ] || { echo "gpu_bench.sh: $p missing: run 'scripts/gpu_bench.sh pack' first" >&2; exit 2; }
  done

  # The GPU and its datasheet peaks (dense, TFLOP/s: FP32 on CUDA cores, TF32 and BF16/FP16 on
  # tensor cores).
  gpu=$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1 || true)
  tf32=""
  case "$gpu" in
  *H100*PCIe*) fp32=51.2 tf32=378 half=756 ;;
  *H100*NVL*) fp32=60 tf32=417.5 half=835 ;;
  *H100* | *H200* | *GH200*) fp32=66.9 tf32=494.7 half=989.4 ;;
  *A100*) fp32=19.5 tf32=156 half=312 ;;
  *L40S*) fp32=91.6 tf32=183 half=362 ;;
  *) fp32="" half="" ;;
  esac
  peak=${peak:-$fp32}
  echo "{\"gpu\": \"${gpu:-unknown (no nvidia-smi)}\", \"device\": \"$device\", \"fp32_peak_tflops\": \"${peak:-unknown}\", \"tf32_peak_tflops\": \"${tf32:-unknown}\", \"bf16_peak_tflops\": \"${half:-unknown}\", \"cpu\": \"$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)\"}"

  # 1. The training step and the sampling forward, f32.
  step=$("$bench_step" --device "$device" --size "$size" --image 32 --channels 4 --batch 256 \
    --steps 10 --fwd-iters 5 ${peak:+--peak-tflops "$peak"})
  echo "$step"
  DDM_GPU_ATTENTION=composite "$bench_step" --device "$device" --size "$size" --image 32 --channels 4 \
    --batch 256 --steps 10 --fwd-iters 5 ${peak:+--peak-tflops "$peak"}
  # 2. The same in bf16, else f16 (a device without bf16 arithmetic refuses it by name).
  err=$(mktemp)
  for precision in bf16 f16; do
    if "$bench_step" --device "$device" --size "$size" --image 32 --channels 4 --batch 256 \
      --steps 10 --fwd-iters 5 --precision "$precision" ${half:+--peak-tflops "$half"} 2>"$err"; then
      break
    fi
    printf '{"precision": "%s", "measured": false, "why": "%s"}\n' "$precision" "$(tail -1 "$err" | tr '"' "'")"
  done
  rm -f "$err"

  # 3. A routed sampling step: K experts of `size` and a router, trained 2 steps each on the device.
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  "$ddm" partition --data default --k "$k" --out "$work/p" --quiet >/dev/null
  experts=()
  for c in $(seq 0 $((k - 1))); do
    "$ddm" train --partition "$work/p" --cluster "$c" --out "$work/e$c" --model "$size" \
      --steps 2 --batch-size 16 --device "$device" --quiet >/dev/null
    experts+=("$work/e$c/expert.safetensors")
  done
  "$ddm" train-router --partition "$work/p" --out "$work/r" --model DiT-XS/4 --steps 2 \
    --batch-size 16 --eval-samples 16 --device "$device" --quiet >/dev/null
  "$ddm" register --registry "$work/reg" --partition "$work/p" "${experts[@]}" \
    "$work/r/router.safetensors" >/dev/null
  for strategy in full top-1; do
    "$ddm" sample --registry "$work/reg" --strategy "$strategy" --n 256 --steps 8 --seed 0 \
      --out "$work/s-$strategy.png" --device "$device" --quiet >/dev/null
    r="$work/s-$strategy.json"
    val() { grep -o "\"$1\": *[0-9.e+-]*" "$r" | head -1 | sed 's/.*: *//'; }
    echo "{\"routed_sampling\": \"$strategy\", \"k\": $k, \"n\": 256, \"steps\": 8, \"seconds\": $(val seconds), \"seconds_per_step\": $(val seconds_per_step), \"expert_evaluations\": $(val expert_evaluations)}"
  done

  # Summary: the TF32 MFU of the f32 step (the FP32 one is in the line above).
  if [ -n "$tf32" ]; then
    tflops=$(printf '%s' "$step" | grep -o '"step_tflops": [0-9.]*' | grep -o '[0-9.]*$')
    fwd=$(printf '%s' "$step" | grep -o '"fwd256_tflops": [0-9.]*' | grep -o '[0-9.]*$')
    awk -v s="$tflops" -v f="$fwd" -v p="$tf32" \
      'BEGIN { printf "{\"tf32_peak_tflops\": %s, \"mfu_step_vs_tf32\": %.4f, \"mfu_fwd256_vs_tf32\": %.4f}\n", p, s / p, f / p }'
  fi
  ;;
*)
  sed -n '2,28p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
  ;;
esac

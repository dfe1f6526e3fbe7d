"""Benchmark (not a test): the matrix products of a DiT-Bench/4 training step in PyTorch, the
shapes of `cargo run --release --example bench_matmul` (ddm), in GFLOP/s, each the median of
--iters runs.

    python scripts/bench_matmul.py [--iters 20] [--threads 2]
"""
import argparse
import time

import torch

p = argparse.ArgumentParser()
p.add_argument("--iters", type=int, default=20)
p.add_argument("--threads", type=int, default=2)
a = p.parse_args()
torch.set_num_threads(a.threads)
tokens, d = 3136, 256
shapes = [
    ("qkv  x W", tokens, d, 3 * d, False, False),
    ("proj x W", tokens, d, d, False, False),
    ("fc1  x W", tokens, d, 4 * d, False, False),
    ("fc2  x W", tokens, 4 * d, d, False, False),
    ("qkv  dy Wt", tokens, 3 * d, d, False, True),
    ("fc1  dy Wt", tokens, 4 * d, d, False, True),
    ("qkv  xt dy", d, tokens, 3 * d, True, False),
    ("fc2  xt dy", 4 * d, tokens, d, True, False),
]
total = [0.0, 0.0]
for name, m, k, n, lt, rt in shapes:
    lhs = torch.randn(k, m).t() if lt else torch.randn(m, k)
    rhs = torch.randn(n, k).t() if rt else torch.randn(k, n)
    times = []
    for _ in range(a.iters + 2):
        t0 = time.perf_counter()
        lhs @ rhs
        times.append(time.perf_counter() - t0)
    times = sorted(times[2:])
    med = times[len(times) // 2]
    gflop = 2 * m * k * n / 1e9
    total[0] += gflop
    total[1] += med
    print(f"{name:12} [{m} x {k}] x [{k} x {n}]: {med * 1e3:.2f} ms, {gflop / med:.1f} GFLOP/s")
print(f"all: {total[0] / total[1]:.1f} GFLOP/s")

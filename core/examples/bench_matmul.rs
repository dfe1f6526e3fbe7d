//! Benchmark (not a test): the matrix products of a DiT-Bench/4 training step (batch 64: 3136
//! tokens, hidden 256, MLP 1024) through burn on the CPU backend, in GFLOP/s, each the median of
//! `--iters` runs. `scripts/bench_matmul.py` times the same shapes in PyTorch. Then the fused
//! attention of one block (`fused::attention`), forward and forward + backward.
//!
//! cargo build --release --workspace --examples && target/release/examples/bench_matmul [--iters 20]

use std::time::Instant;

use ddm_core::burn::prelude::*;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let iters: usize = args
        .iter()
        .position(|a| a == "--iters")
        .and_then(|i| args.get(i + 1))
        .map(|v| v.parse().expect("--iters N"))
        .unwrap_or(20);
    let device = ddm_core::device::cpu();
    let (tokens, d) = (3136, 256);
    // (name, m, k, n, lhs transposed, rhs transposed): the forward y = x W, and backward
    // dx = dy Wᵀ and dW = xᵀ dy, as burn's autodiff computes them (transposed views).
    let shapes = [
        ("qkv  x W", tokens, d, 3 * d, false, false),
        ("proj x W", tokens, d, d, false, false),
        ("fc1  x W", tokens, d, 4 * d, false, false),
        ("fc2  x W", tokens, 4 * d, d, false, false),
        ("qkv  dy Wt", tokens, 3 * d, d, false, true),
        ("fc1  dy Wt", tokens, 4 * d, d, false, true),
        ("qkv  xt dy", d, tokens, 3 * d, true, false),
        ("fc2  xt dy", 4 * d, tokens, d, true, false),
    ];
    let mut total = (0.0, 0.0);
    for (name, m, k, n, lt, rt) in shapes {
        let dist = burn::tensor::Distribution::Normal(0.0, 1.0);
        let lhs = if lt {
            Tensor::<2>::random([k, m], dist, &device).transpose()
        } else {
            Tensor::<2>::random([m, k], dist, &device)
        };
        let rhs = if rt {
            Tensor::<2>::random([n, k], dist, &device).transpose()
        } else {
            Tensor::<2>::random([k, n], dist, &device)
        };
        let median = median_secs(iters, &|| {
            let y = lhs.clone().matmul(rhs.clone());
            let _ = y.slice([0..1, 0..1]).into_scalar::<f32>();
        });
        let gflop = 2.0 * (m * k * n) as f64 / 1e9;
        total.0 += gflop;
        total.1 += median;
        println!(
            "{name:12} [{m} x {k}] x [{k} x {n}]: {:.2} ms, {:.1} GFLOP/s",
            median * 1e3,
            gflop / median
        );
    }
    println!("all: {:.1} GFLOP/s", total.0 / total.1);

    // The attention of one block (4 heads of 64, 49 tokens, 64 samples), the fused op: forward
    // alone (as a sampler runs it) and forward + backward (as a training step does).
    let (n, t, heads) = (64, 49, 4);
    let qkv = Tensor::<3>::random(
        [n, t, 3 * d],
        burn::tensor::Distribution::Normal(0.0, 1.0),
        &device,
    );
    let gflop = 2.0 * 2.0 * (n * heads * t * t * (d / heads)) as f64 / 1e9;
    let fwd = median_secs(iters, &|| {
        let y = ddm_core::fused::attention(qkv.clone(), heads);
        let _ = y.slice([0..1, 0..1, 0..1]).into_scalar::<f32>();
    });
    println!(
        "attention forward [{n} x {t} x {}]: {:.2} ms, {:.1} GFLOP/s",
        3 * d,
        fwd * 1e3,
        gflop / fwd
    );
    let both = median_secs(iters, &|| {
        let x = qkv.clone().autodiff().require_grad();
        let y = ddm_core::fused::attention(x.clone(), heads);
        let g = y.sum().backward();
        let _ = x.grad(&g).unwrap().slice([0..1, 0..1, 0..1]).into_scalar::<f32>();
    });
    println!(
        "attention forward + backward: {:.2} ms, {:.1} GFLOP/s",
        both * 1e3,
        3.0 * gflop / both
    );
}

/// The median wall time of `iters` runs of `f`, after two warm-up runs.
fn median_secs(iters: usize, f: &dyn Fn()) -> f64 {
    let mut times: Vec<f64> = (0..iters + 2)
        .map(|_| {
            let t0 = Instant::now();
            f();
            t0.elapsed().as_secs_f64()
        })
        .collect();
    times.drain(..2);
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

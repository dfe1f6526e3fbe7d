//! Benchmark (not a test): the 3 x 3 convolutions of the small VAE (`vae:3:32:4` on 28 x 28, batch
//! 64: 32, 64 and 128 channels on 28 x 28, 14 x 14 and 7 x 7 maps) through burn on the CPU backend:
//! the forward, and the input and weight gradients (one backward), in GFLOP/s, each the median of
//! `--iters` runs.
//!
//! cargo build --release --workspace --examples && target/release/examples/bench_conv [--iters 10]

use std::time::Instant;

use ddm_core::burn::prelude::*;
use ddm_core::burn::tensor::module::conv2d;
use ddm_core::burn::tensor::ops::ConvOptions;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let iters: usize = args
        .iter()
        .position(|a| a == "--iters")
        .and_then(|i| args.get(i + 1))
        .map(|v| v.parse().expect("--iters N"))
        .unwrap_or(10);
    let batch = 64;
    let device = ddm_core::device::cpu();
    println!("cpu_simd {}, batch {batch}", ddm_core::device::cpu_simd());
    // (c_in, c_out, side)
    let shapes = [
        (32, 32, 28),
        (64, 32, 28),
        (64, 64, 14),
        (128, 64, 14),
        (128, 128, 7),
    ];
    let mut total = (0.0, 0.0, 0.0);
    for (c_in, c_out, side) in shapes {
        let dist = burn::tensor::Distribution::Normal(0.0, 1.0);
        let x = Tensor::<4>::random([batch, c_in, side, side], dist, &device);
        let w = Tensor::<4>::random([c_out, c_in, 3, 3], dist, &device);
        let b = Tensor::<1>::random([c_out], dist, &device);
        let options = ConvOptions::new([1, 1], [1, 1], [1, 1], 1);
        let fwd = median_secs(iters, &|| {
            let y = conv2d(x.clone(), w.clone(), Some(b.clone()), options.clone());
            let _ = y.slice([0..1, 0..1, 0..1, 0..1]).into_scalar::<f32>();
        });
        let both = median_secs(iters, &|| {
            let (x, w) = (
                x.clone().autodiff().require_grad(),
                w.clone().autodiff().require_grad(),
            );
            let y = conv2d(x.clone(), w.clone(), Some(b.clone().autodiff()), options.clone());
            let g = y.sum().backward();
            let _ = x
                .grad(&g)
                .unwrap()
                .slice([0..1, 0..1, 0..1, 0..1])
                .into_scalar::<f32>();
            let _ = w
                .grad(&g)
                .unwrap()
                .slice([0..1, 0..1, 0..1, 0..1])
                .into_scalar::<f32>();
        });
        let gflop = 2.0 * (batch * c_out * side * side * c_in * 9) as f64 / 1e9;
        total.0 += gflop;
        total.1 += fwd;
        total.2 += both;
        println!(
            "{c_in:3} -> {c_out:3} on {side:2} x {side:2}: forward {:.2} ms, {:.1} GFLOP/s; forward + backward {:.2} ms, {:.1} GFLOP/s",
            fwd * 1e3,
            gflop / fwd,
            both * 1e3,
            3.0 * gflop / both
        );
    }
    println!(
        "all: forward {:.1} GFLOP/s, forward + backward {:.1} GFLOP/s",
        total.0 / total.1,
        3.0 * total.0 / total.2
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

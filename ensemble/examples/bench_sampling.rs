//! Benchmark (not a test): time per sampling step of the routed ensemble against single experts,
//! on one batch. Targets (issue 6): top-1 <= 1.10 x one expert; full <= 1.05 x K x one expert.
//!
//! cargo run --release -p ddm-ensemble --example bench_sampling -- REGISTRY [--batch 64] [--reps 10]

use std::time::Instant;

use ddm_core::burn::prelude::*;
use ddm_core::condition::Condition;
use ddm_core::flow::{self, Drift};
use ddm_core::host::HostTensor;
use ddm_ensemble::registry::Registry;
use ddm_ensemble::sampler::{Ensemble, ExpertSlot, LearnedRouter};
use ddm_ensemble::strategy::Strategy;
use rand::SeedableRng;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let reg_dir = args
        .get(1)
        .expect("usage: bench_sampling REGISTRY [--batch N] [--reps R]");
    let flag = |name: &str, d: usize| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let (batch, reps) = (flag("--batch", 64), flag("--reps", 10));
    let device = ddm_core::device::cpu();
    let reg = Registry::open(std::path::Path::new(reg_dir)).unwrap();
    let k = reg.index.k;
    let per: usize = reg.index.data.shape.iter().product();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let x = flow::randn(vec![batch, per], &mut rng);
    let t: Vec<f32> = (0..batch).map(|i| 0.2 + 0.6 * i as f32 / batch as f32).collect();
    let run = |f: &mut dyn Drift<2>| -> f64 {
        let mut go = || {
            HostTensor::from_tensor(
                f.drift(
                    x.to_tensor::<2>(&device),
                    Tensor::from_floats(t.as_slice(), &device),
                    &Condition::none(),
                )
                .unwrap(),
            )
        };
        go(); // warm-up (and lazy loading)
        let mut times: Vec<f64> = (0..reps)
            .map(|_| {
                let t0 = Instant::now();
                go();
                t0.elapsed().as_secs_f64()
            })
            .collect();
        times.sort_by(f64::total_cmp);
        times[times.len() / 2] // median
    };
    let experts: Vec<_> = (0..k).map(|c| reg.expert(c, &device).unwrap()).collect();
    let single: Vec<f64> = experts.iter().map(|e| run(&mut e.as_ref())).collect();
    let one = single.iter().sum::<f64>() / k as f64;
    let router = || {
        Box::new(LearnedRouter {
            net: reg.router(&device).unwrap(),
            k,
        }) as Box<dyn ddm_ensemble::sampler::Posterior>
    };
    let mk = |s: Strategy| {
        let slots = (0..k)
            .map(|c| ExpertSlot::ready(reg.expert(c, &device).unwrap()))
            .collect();
        Ensemble::new(slots, Some(router()), s, 0).unwrap()
    };
    let top1 = run(&mut mk(Strategy::TopK { k: 1 }));
    let full = run(&mut mk(Strategy::Full));
    let top2 = run(&mut mk(Strategy::TopK { k: 2 }));
    println!(
        "{{\"batch\": {batch}, \"k\": {k}, \"threads\": \"{}\", \"single_expert_ms\": {:.1}, \"top1_ms\": {:.1}, \"top2_ms\": {:.1}, \"full_ms\": {:.1}, \"top1_over_single\": {:.3}, \"full_over_k_single\": {:.3}}}",
        std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "all".into()),
        one * 1e3,
        top1 * 1e3,
        top2 * 1e3,
        full * 1e3,
        top1 / one,
        full / (k as f64 * one)
    );
}

//! Benchmark (not a test): k-means on the 60,000 x 784 Fashion-MNIST training pixels, with the
//! settings of the scikit-learn peer (README, Benchmarks: k-means++, n_init 1, max_iter 100, tol 1e-4).
//! Prints one JSON line like the peer. Data loading is outside the timed region, as in the peer.
//!
//! cargo run --release -p ddm-datasets --example bench_kmeans -- [--k 8] [--pca 0] [--two-stage FINE]

use std::time::Instant;

use ddm_datasets::Source;
use ddm_datasets::kmeans::{KMeansConfig, kmeans, two_stage};
use ddm_datasets::linalg::Pca;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str, default: usize| -> usize {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let (k, pca, fine, seed) = (
        flag("--k", 8),
        flag("--pca", 0),
        flag("--two-stage", 0),
        flag("--seed", 0) as u64,
    );
    let fm = ddm_datasets::idx::FashionMnist {
        dir: None,
        split: ddm_datasets::idx::Split::Train,
        download: false,
    };
    let d = fm
        .load()
        .expect("Fashion-MNIST (apt-get install dataset-fashion-mnist)");
    let n = d.len();
    let x = d.gather(&(0..n).collect::<Vec<_>>());
    let t0 = Instant::now();
    let (x, dims) = if pca > 0 {
        let p = Pca::fit(&x, n, 784, pca);
        (p.project(&x, n), pca)
    } else {
        (x, 784)
    };
    let pca_seconds = t0.elapsed().as_secs_f64();
    let cfg = KMeansConfig::new(k, seed);
    let r = if fine > 0 {
        two_stage(&x, dims, fine, 20_000, &cfg)
    } else {
        kmeans(&x, dims, None, &cfg)
    }
    .unwrap();
    let dt = t0.elapsed().as_secs_f64();
    let mut counts = vec![0usize; k];
    r.assignment.iter().for_each(|&a| counts[a as usize] += 1);
    println!(
        "{{\"impl\": \"ddm\", \"k\": {k}, \"n\": {n}, \"dims\": {dims}, \"pca\": {pca}, \"two_stage_fine\": {fine}, \"seconds\": {dt:.3}, \"pca_seconds\": {pca_seconds:.3}, \"iterations\": {}, \"inertia\": {:.1}, \"threads\": {}, \"counts\": {counts:?}}}",
        r.iterations,
        r.inertia,
        rayon::current_num_threads()
    );
}

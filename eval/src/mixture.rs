//! Exact evaluation on Gaussian mixtures, where the true velocity and the true distribution are
//! known in closed form (`ddm_core::gmm`):
//! - the mean squared error of a velocity field against the closed-form velocity, per t bin, on
//!   points x_t = (1 - t) x0 + t e of the true path;
//! - the energy distance between samples and fresh draws from the mixture;
//! - the mode weights the samples recover (each sample goes to its most probable component).

use ddm_core::burn::prelude::*;
use ddm_core::condition::Condition;
use ddm_core::flow::{self, Drift, VelocityError};
use ddm_core::gmm::GaussianMixture;
use ddm_core::host::HostTensor;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::knn::sq_distances;

/// Mean over points and dimensions of |v_field - v_exact|^2, for `bins` equal t bins of
/// `per_bin` points each (t spread evenly inside the bin).
pub fn velocity_mse_by_bin(
    field: &mut dyn Drift<2>,
    g: &GaussianMixture,
    bins: usize,
    per_bin: usize,
    seed: u64,
    device: &Device,
) -> Result<Vec<f64>, VelocityError> {
    let d = g.dim();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..bins)
        .map(|b| {
            let (x0, _) = g.sample(per_bin, &mut rng);
            let e = flow::randn(vec![per_bin, d], &mut rng);
            let ts: Vec<f64> = (0..per_bin)
                .map(|i| (b as f64 + (i as f64 + rng.random::<f64>()) / per_bin as f64) / bins as f64)
                .collect();
            let t = Tensor::<1>::from_data(
                TensorData::new(ts.iter().map(|&t| t as f32).collect::<Vec<_>>(), [per_bin]),
                device,
            );
            let x_t = flow::interpolate(x0.to_tensor::<2>(device), e.to_tensor::<2>(device), t.clone());
            let xt = HostTensor::from_tensor(x_t.clone()).data; // [per_bin * d]
            let v = HostTensor::from_tensor(field.drift(x_t, t, &Condition::none())?);
            let mut total = 0.0;
            for (i, &t) in ts.iter().enumerate() {
                let x: Vec<f64> = xt[i * d..(i + 1) * d].iter().map(|&v| v as f64).collect();
                let exact = g.velocity(&x, t);
                for (j, e) in exact.iter().enumerate() {
                    let diff = v.data[i * d + j] as f64 - e;
                    total += diff * diff;
                }
            }
            Ok(total / (per_bin * d) as f64)
        })
        .collect()
}

/// The energy distance 2 E|X - Y| - E|X - X'| - E|Y - Y'| between the row sets `a` and `b`
/// (within-set terms exclude pairs of a point with itself, so it is ~0 for two draws of one law).
pub fn energy_distance(a: &[f32], b: &[f32], dim: usize) -> f64 {
    let mean_dist = |x: &[f32], y: &[f32], same: bool| {
        let (nx, ny) = (x.len() / dim, y.len() / dim);
        let d = sq_distances(x, y, dim);
        let sum: f64 = d.iter().map(|&v| (v as f64).sqrt()).sum();
        // The diagonal of a set against itself is ~0 (rounding), and left out of the count.
        let count = if same { nx * (ny - 1) } else { nx * ny };
        let diag: f64 = if same {
            (0..nx).map(|i| (d[i * ny + i] as f64).sqrt()).sum()
        } else {
            0.0
        };
        (sum - diag) / count as f64
    };
    2.0 * mean_dist(a, b, false) - mean_dist(a, a, true) - mean_dist(b, b, true)
}

/// The fraction of samples whose most probable component (posterior at t = 0) is each k.
pub fn mode_weights(x: &[f32], g: &GaussianMixture) -> Vec<f64> {
    let d = g.dim();
    let n = x.len() / d;
    let mut w = vec![0f64; g.k()];
    for row in x.chunks(d) {
        let xs: Vec<f64> = row.iter().map(|&v| v as f64).collect();
        let p = g.posterior(&xs, 0.0);
        let k = (0..p.len()).max_by(|&a, &b| p[a].total_cmp(&p[b])).unwrap_or(0);
        w[k] += 1.0;
    }
    w.iter_mut().for_each(|v| *v /= n.max(1) as f64);
    w
}

/// All exact metrics of one system on a mixture.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MixtureReport {
    pub n: usize,
    /// Velocity MSE per t bin (10 bins over [0, 1]).
    pub velocity_mse_by_bin: Vec<f64>,
    /// Their mean.
    pub velocity_mse: f64,
    /// Energy distance of the samples to as many fresh draws.
    pub energy_distance: f64,
    pub mode_weights: Vec<f64>,
    /// Total-variation distance of the recovered mode weights to the true ones.
    pub mode_weight_tv: f64,
}

/// Evaluate `field` (and `samples` it produced, `[N, dim]`) on the mixture `g`.
pub fn evaluate(
    field: &mut dyn Drift<2>,
    samples: &[f32],
    g: &GaussianMixture,
    seed: u64,
    device: &Device,
) -> Result<MixtureReport, VelocityError> {
    let d = g.dim();
    let n = samples.len() / d;
    let by_bin = velocity_mse_by_bin(field, g, 10, 500, seed, device)?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0xd4a3);
    let (fresh, _) = g.sample(n, &mut rng);
    let weights = mode_weights(samples, g);
    Ok(MixtureReport {
        n,
        velocity_mse: by_bin.iter().sum::<f64>() / by_bin.len() as f64,
        velocity_mse_by_bin: by_bin,
        energy_distance: energy_distance(samples, &fresh.data, d),
        mode_weight_tv: 0.5
            * weights
                .iter()
                .zip(&g.weights)
                .map(|(a, b)| (a - b).abs())
                .sum::<f64>(),
        mode_weights: weights,
    })
}

//! How good is a router, by noise level: accuracy, cross-entropy and expected calibration error
//! (ECE, 10 confidence bins) per t bin, and at t = 1 how far its prediction is from the prior w_k
//! (mean total-variation distance; the ideal router predicts exactly w_k there).

use ddm_core::burn::prelude::*;
use ddm_core::burn::tensor::activation::softmax;
use ddm_core::flow;
use ddm_core::host::HostTensor;
use ddm_datasets::Dataset;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::net::RouterNet;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BinReport {
    pub t_lo: f64,
    pub t_hi: f64,
    pub accuracy: f64,
    pub cross_entropy: f64,
    pub ece: f64,
    /// Mean total-variation distance between the prediction and the prior.
    pub tv_to_prior: f64,
}

/// Evaluate on `n_eval` samples (seeded), 10 t bins plus t = 1 exactly.
pub fn evaluate(
    net: &RouterNet,
    data: &Dataset,
    clusters: &[u32],
    priors: &[f64],
    n_eval: usize,
    seed: u64,
    device: &Device,
) -> Vec<BinReport> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n = data.len();
    let idx: Vec<usize> = rand::seq::index::sample(&mut rng, n, n_eval.min(n)).into_vec();
    let x0 = data.gather(&idx);
    let per = data.sample_size();
    let k = priors.len();
    let mut bins: Vec<(f64, f64)> = (0..10)
        .map(|b| (b as f64 / 10.0, (b + 1) as f64 / 10.0))
        .collect();
    bins.push((1.0, 1.0));
    let mut out = vec![];
    for (lo, hi) in bins {
        let m = idx.len();
        let t: Vec<f32> = (0..m)
            .map(|_| (lo + (hi - lo) * rng.random::<f64>()) as f32)
            .collect();
        let e = flow::randn(vec![m, per], &mut rng);
        let mut probs = Vec::with_capacity(m * k);
        for c in (0..m).step_by(256) {
            let r = c..(c + 256).min(m);
            let b = r.len();
            let x0b =
                HostTensor::new(vec![b, per], x0[r.start * per..r.end * per].to_vec()).to_tensor::<2>(device);
            let eb = HostTensor::new(vec![b, per], e.data[r.start * per..r.end * per].to_vec())
                .to_tensor::<2>(device);
            let tb = Tensor::<1>::from_data(TensorData::new(t[r.clone()].to_vec(), [b]), device);
            let x_t = flow::interpolate(x0b, eb, tb.clone());
            probs.extend(HostTensor::from_tensor(softmax(net.logits(x_t, tb), 1)).data);
        }
        let (mut correct, mut ce, mut tv) = (0usize, 0f64, 0f64);
        let mut conf_bins = vec![(0f64, 0f64, 0usize); 10]; // (sum conf, sum correct, count)
        for (i, &s) in idx.iter().enumerate() {
            let p = &probs[i * k..(i + 1) * k];
            let (arg, conf) = p
                .iter()
                .enumerate()
                .fold((0, f32::MIN), |a, (j, &v)| if v > a.1 { (j, v) } else { a });
            let target = clusters[s] as usize;
            let hit = arg == target;
            correct += hit as usize;
            ce -= (p[target] as f64).max(1e-12).ln();
            tv += 0.5
                * p.iter()
                    .zip(priors)
                    .map(|(a, b)| (*a as f64 - b).abs())
                    .sum::<f64>();
            let cb = ((conf as f64 * 10.0) as usize).min(9);
            conf_bins[cb].0 += conf as f64;
            conf_bins[cb].1 += hit as usize as f64;
            conf_bins[cb].2 += 1;
        }
        let m = m as f64;
        let ece = conf_bins
            .iter()
            .filter(|b| b.2 > 0)
            .map(|b| (b.0 - b.1).abs() / m)
            .sum();
        out.push(BinReport {
            t_lo: lo,
            t_hi: hi,
            accuracy: correct as f64 / m,
            cross_entropy: ce / m,
            ece,
            tv_to_prior: tv / m,
        });
    }
    out
}

/// A markdown table of the reports.
pub fn table(reports: &[BinReport], priors: &[f64]) -> String {
    let max_prior = priors.iter().cloned().fold(0.0, f64::max);
    let mut s = "| t | accuracy | cross-entropy | ECE | TV to prior |\n|---|---|---|---|---|\n".to_string();
    for r in reports {
        let t = if r.t_lo == r.t_hi {
            format!("{:.1}", r.t_lo)
        } else {
            format!("{:.1}-{:.1}", r.t_lo, r.t_hi)
        };
        s.push_str(&format!(
            "| {t} | {:.3} | {:.3} | {:.3} | {:.3} |\n",
            r.accuracy, r.cross_entropy, r.ece, r.tv_to_prior
        ));
    }
    s.push_str(&format!(
        "\n(largest prior w_k = {max_prior:.3}: the accuracy of always guessing that cluster)\n"
    ));
    s
}

//! How good is a router, by noise level: accuracy, cross-entropy and expected calibration error
//! (ECE, 10 confidence bins) per t bin, and how far its prediction is from what the ideal router
//! returns at t = 1 (mean total-variation distance): the prior w_k, or p(k | c) when the router is
//! told the class c. A conditioned router is evaluated both ways: without the class (the null
//! class) and with it.

use ddm_core::burn::prelude::*;
use ddm_core::burn::tensor::activation::softmax;
use ddm_core::condition::Condition;
use ddm_core::flow;
use ddm_core::host::HostTensor;
use ddm_datasets::Dataset;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use ddm_router::net::RouterNet;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BinReport {
    pub t_lo: f64,
    pub t_hi: f64,
    pub accuracy: f64,
    pub cross_entropy: f64,
    pub ece: f64,
    /// Mean total-variation distance between the prediction and the t = 1 ideal: the prior
    /// w_k, or p(k | c) when the router was given the class (None when it was given
    /// conditioning vectors or token sequences: their p(k | c) has no count to compare with).
    pub tv_to_prior: Option<f64>,
}

/// A router's evaluation: without the condition, and (a conditioned router on data that has the
/// condition: labels, conditioning vectors) with it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RouterEval {
    pub without_class: Vec<BinReport>,
    /// Given the condition: `class`, `vector`, `tokens`, or several joined by `and`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub given: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub with_condition: Option<Vec<BinReport>>,
}

impl RouterEval {
    /// Parse a `router-eval.json`: this format, or the earlier one (a list of bins, without
    /// the class).
    pub fn parse(text: &str) -> serde_json::Result<Self> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Either {
            Now(RouterEval),
            Before(Vec<BinReport>),
        }
        Ok(match serde_json::from_str(text)? {
            Either::Now(e) => e,
            Either::Before(bins) => RouterEval {
                without_class: bins,
                given: None,
                with_condition: None,
            },
        })
    }
}

/// p(k | c) for every class c, from the clusters and labels of the same samples: row c sums to 1
/// (rows of absent classes are uniform).
pub fn class_priors(clusters: &[u32], labels: &[u32], k: usize, classes: usize) -> Vec<Vec<f64>> {
    let mut counts = vec![vec![0f64; k]; classes];
    for (&c, &l) in clusters.iter().zip(labels) {
        counts[l as usize][c as usize] += 1.0;
    }
    counts
        .into_iter()
        .map(|row| {
            let z: f64 = row.iter().sum();
            row.iter()
                .map(|v| if z > 0.0 { v / z } else { 1.0 / k as f64 })
                .collect()
        })
        .collect()
}

/// Evaluate `net` without the condition, and also with it if the router is conditioned and `data`
/// has what it reads (labels, conditioning vectors, token sequences). `n_eval` samples (seeded),
/// 10 t bins plus t = 1 exactly.
pub fn evaluate(
    net: &RouterNet,
    data: &Dataset,
    clusters: &[u32],
    k: usize,
    n_eval: usize,
    seed: u64,
    device: &Device,
) -> RouterEval {
    let given = Given {
        labels: data.labels.as_ref().filter(|_| net.classes() > 0),
        vectors: data.cond.is_some() && net.condition_dim().is_some(),
        tokens: data.tokens.is_some() && net.token_dim().is_some(),
    };
    let with_condition = given
        .name()
        .map(|_| evaluate_given(net, data, clusters, k, given, n_eval, seed, device));
    let without_class = if net.routes_without_class() {
        evaluate_given(net, data, clusters, k, Given::default(), n_eval, seed, device)
    } else {
        vec![]
    };
    RouterEval {
        without_class,
        given: given.name(),
        with_condition,
    }
}

/// What the router is given of each sample's condition.
#[derive(Debug, Clone, Copy, Default)]
struct Given<'a> {
    /// The classes (None: not given).
    labels: Option<&'a Vec<u32>>,
    /// The conditioning vectors.
    vectors: bool,
    /// The token sequences.
    tokens: bool,
}

impl Given<'_> {
    /// `class`, `vector`, `tokens` or several joined by `and`; None: nothing is given.
    fn name(&self) -> Option<String> {
        let parts: Vec<&str> = [
            (self.labels.is_some(), "class"),
            (self.vectors, "vector"),
            (self.tokens, "tokens"),
        ]
        .into_iter()
        .filter_map(|(given, name)| given.then_some(name))
        .collect();
        (!parts.is_empty()).then(|| parts.join(" and "))
    }
}

/// Evaluate with the parts of the condition in `given` given to the router.
#[allow(clippy::too_many_arguments)]
fn evaluate_given(
    net: &RouterNet,
    data: &Dataset,
    clusters: &[u32],
    k: usize,
    given: Given<'_>,
    n_eval: usize,
    seed: u64,
    device: &Device,
) -> Vec<BinReport> {
    let labels = given.labels;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n = data.len();
    let idx: Vec<usize> = rand::seq::index::sample(&mut rng, n, n_eval.min(n)).into_vec();
    let x0 = data.gather(&idx);
    let per = data.sample_size();
    // The t = 1 ideal per sample: p(k | c_i), or the prior.
    let ideal: Vec<Vec<f64>> = match labels {
        Some(l) => class_priors(clusters, l, k, net.classes()),
        None => class_priors(clusters, &vec![0; clusters.len()], k, 1),
    };
    let ideal_of = |s: usize| &ideal[labels.map_or(0, |l| l[s] as usize)];
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
            let rows = &idx[r.clone()];
            let c = Condition {
                class: labels.map(|l| {
                    let y: Vec<i64> = rows.iter().map(|&s| l[s] as i64).collect();
                    Tensor::<1, Int>::from_data(TensorData::new(y, [b]), device)
                }),
                vector: given
                    .vectors
                    .then(|| data.gather_cond(rows))
                    .flatten()
                    .map(|c| c.to_tensor::<2>(device)),
                tokens: given
                    .tokens
                    .then(|| data.gather_tokens(rows))
                    .flatten()
                    .map(|t| t.to_tensors(device)),
            };
            let x_t = flow::interpolate(x0b, eb, tb.clone());
            probs.extend(HostTensor::from_tensor(softmax(net.logits(x_t, tb, &c), 1)).data);
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
                    .zip(ideal_of(s))
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
            tv_to_prior: (!given.vectors && !given.tokens).then_some(tv / m),
        });
    }
    out
}

/// Markdown tables of an evaluation: without the class, and with it.
pub fn tables(e: &RouterEval, priors: &[f64]) -> String {
    let mut s = String::new();
    if !e.without_class.is_empty() {
        s.push_str("Without the class (TV to the prior w_k):\n\n");
        s.push_str(&table(&e.without_class, priors));
    }
    if let (Some(w), Some(given)) = (&e.with_condition, &e.given) {
        let tv = match given.as_str() {
            "class" => " (TV to p(k | c))",
            _ => "",
        };
        s.push_str(&format!("\nWith the {given}{tv}:\n\n"));
        s.push_str(&table(w, priors));
    }
    s
}

/// A markdown table of the reports.
pub fn table(reports: &[BinReport], priors: &[f64]) -> String {
    let max_prior = priors.iter().cloned().fold(0.0, f64::max);
    let mut s =
        "| t | accuracy | cross-entropy | ECE | TV to ideal at t = 1 |\n|---|---|---|---|---|\n".to_string();
    for r in reports {
        let t = if r.t_lo == r.t_hi {
            format!("{:.1}", r.t_lo)
        } else {
            format!("{:.1}-{:.1}", r.t_lo, r.t_hi)
        };
        s.push_str(&format!(
            "| {t} | {:.3} | {:.3} | {:.3} | {} |\n",
            r.accuracy,
            r.cross_entropy,
            r.ece,
            r.tv_to_prior.map_or("–".to_string(), |v| format!("{v:.3}"))
        ));
    }
    s.push_str(&format!(
        "\n(largest prior w_k = {max_prior:.3}: the accuracy of always guessing that cluster)\n"
    ));
    s
}

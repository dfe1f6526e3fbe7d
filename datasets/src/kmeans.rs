//! k-means: Lloyd's algorithm with k-means++ initialisation, restarts, a mini-batch option,
//! optional balanced (capacity-constrained) assignment, sample weights, and the paper's two-stage
//! form (fine centroids on a subsample, then K coarse centroids over them). Deterministic for a seed.
//!
//! Distances are matrix products: |x - c|^2 = |x|^2 - 2 x·c + |c|^2, with x·c from `gemm`
//! (see `linalg`). Written here rather than taken from linfa because linfa's k-means took 99 s for
//! K = 8 on the 60,000 x 784 Fashion-MNIST pixels on a 2-core development machine, far slower than
//! scikit-learn (`examples/bench_kmeans.rs` measures ours); the target is to be no slower than scikit-learn.
//!
//! Convergence follows scikit-learn: stop when the squared centroid shift summed over clusters is
//! at most `tol` times the mean per-feature variance of the data, or when no label changes.

use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::linalg::matmul_abt;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KMeansConfig {
    pub k: usize,
    /// Lloyd iterations (or mini-batch steps) at most.
    pub max_iter: usize,
    /// Relative tolerance (scikit-learn's definition).
    pub tol: f64,
    /// Restarts; the run with the lowest inertia wins.
    pub n_init: usize,
    pub seed: u64,
    /// Mini-batch k-means with batches of this size (None: full Lloyd).
    pub batch_size: Option<usize>,
    /// Capacity-constrained assignment: every cluster gets at most ceil(n / k) samples.
    pub balanced: bool,
}

impl KMeansConfig {
    pub fn new(k: usize, seed: u64) -> Self {
        Self {
            k,
            max_iter: 100,
            tol: 1e-4,
            n_init: 1,
            seed,
            batch_size: None,
            balanced: false,
        }
    }
}

#[derive(Debug, Clone)]
pub struct KMeansResult {
    /// `[k, dim]`
    pub centroids: Vec<f32>,
    pub assignment: Vec<u32>,
    /// Sum of (weighted) squared distances to the assigned centroid.
    pub inertia: f64,
    pub iterations: usize,
}

fn row(x: &[f32], i: usize, d: usize) -> &[f32] {
    &x[i * d..(i + 1) * d]
}

fn sq_norms(x: &[f32], d: usize) -> Vec<f32> {
    x.par_chunks(d).map(|r| r.iter().map(|v| v * v).sum()).collect()
}

/// Squared distances `[n, k]` of every point to every centroid.
fn distances(x: &[f32], xn: &[f32], c: &[f32], n: usize, k: usize, d: usize) -> Vec<f32> {
    let cn = sq_norms(c, d);
    let mut dots = matmul_abt(x, c, n, k, d);
    dots.par_chunks_mut(k).enumerate().for_each(|(i, r)| {
        for (j, v) in r.iter_mut().enumerate() {
            *v = (xn[i] - 2.0 * *v + cn[j]).max(0.0);
        }
    });
    dots
}

/// Nearest centroid of each point, and its squared distance.
pub fn assign(x: &[f32], c: &[f32], d: usize) -> (Vec<u32>, Vec<f32>) {
    let (n, k) = (x.len() / d, c.len() / d);
    let xn = sq_norms(x, d);
    nearest(&distances(x, &xn, c, n, k, d), k)
}

fn nearest(dist: &[f32], k: usize) -> (Vec<u32>, Vec<f32>) {
    dist.par_chunks(k)
        .map(|r| {
            let (j, v) =
                r.iter().enumerate().fold(
                    (0, f32::INFINITY),
                    |(bj, bv), (j, &v)| if v < bv { (j, v) } else { (bj, bv) },
                );
            (j as u32, v)
        })
        .unzip()
}

/// Capacity-constrained assignment: pairs (point, cluster) by increasing distance, each point
/// takes the first cluster that still has room (capacity ceil(n / k)).
fn balanced_assign(dist: &[f32], n: usize, k: usize) -> (Vec<u32>, Vec<f32>) {
    let cap = n.div_ceil(k);
    let mut pairs: Vec<(f32, u32, u32)> = (0..n)
        .flat_map(|i| (0..k).map(move |j| (i, j)))
        .map(|(i, j)| (dist[i * k + j], i as u32, j as u32))
        .collect();
    pairs.par_sort_unstable_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    let (mut label, mut dmin) = (vec![u32::MAX; n], vec![0f32; n]);
    let mut room = vec![cap; k];
    for (dv, i, j) in pairs {
        let (i, j) = (i as usize, j as usize);
        if label[i] == u32::MAX && room[j] > 0 {
            label[i] = j as u32;
            dmin[i] = dv;
            room[j] -= 1;
        }
    }
    (label, dmin)
}

/// k-means++ (greedy, as scikit-learn: 2 + ln k candidates per step, keep the best).
fn kmeans_pp(x: &[f32], xn: &[f32], w: &[f32], n: usize, d: usize, k: usize, rng: &mut impl Rng) -> Vec<f32> {
    let trials = 2 + (k as f64).ln() as usize;
    let pick_weighted = |p: &[f32], rng: &mut dyn rand::RngCore| -> usize {
        let total: f64 = p.iter().map(|&v| v as f64).sum();
        if total <= 0.0 {
            return rng.random_range(0..n);
        }
        let mut r = rng.random::<f64>() * total;
        for (i, &v) in p.iter().enumerate() {
            r -= v as f64;
            if r <= 0.0 {
                return i;
            }
        }
        n - 1
    };
    let mut centers = Vec::with_capacity(k * d);
    let first = pick_weighted(w, rng);
    centers.extend_from_slice(row(x, first, d));
    let mut closest: Vec<f32> = distances(x, xn, row(x, first, d), n, 1, d);
    for _ in 1..k {
        let pot: Vec<f32> = closest.iter().zip(w).map(|(a, b)| a * b).collect();
        let cand: Vec<usize> = (0..trials).map(|_| pick_weighted(&pot, rng)).collect();
        let cand_x: Vec<f32> = cand.iter().flat_map(|&i| row(x, i, d).iter().copied()).collect();
        let dist = distances(x, xn, &cand_x, n, trials, d); // [n, trials]
        let (mut best, mut best_pot) = (0, f64::INFINITY);
        for t in 0..trials {
            let p: f64 = (0..n)
                .map(|i| (closest[i].min(dist[i * trials + t]) * w[i]) as f64)
                .sum();
            if p < best_pot {
                (best, best_pot) = (t, p);
            }
        }
        centers.extend_from_slice(row(x, cand[best], d));
        for i in 0..n {
            closest[i] = closest[i].min(dist[i * trials + best]);
        }
    }
    centers
}

/// Weighted sums per cluster -> new centroids; an empty cluster takes the point farthest from its
/// centroid (as scikit-learn relocates empty clusters).
fn update(x: &[f32], w: &[f32], label: &[u32], dmin: &[f32], old: &[f32], k: usize, d: usize) -> Vec<f32> {
    let (sums, mass) = x
        .par_chunks(d * 1024)
        .enumerate()
        .map(|(b, blk)| {
            let (mut s, mut m) = (vec![0f64; k * d], vec![0f64; k]);
            for (r, xr) in blk.chunks(d).enumerate() {
                let i = b * 1024 + r;
                let j = label[i] as usize;
                m[j] += w[i] as f64;
                for (acc, &v) in s[j * d..(j + 1) * d].iter_mut().zip(xr) {
                    *acc += (v * w[i]) as f64;
                }
            }
            (s, m)
        })
        .reduce(
            || (vec![0f64; k * d], vec![0f64; k]),
            |(mut a, mut am), (b, bm)| {
                a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
                am.iter_mut().zip(bm).for_each(|(x, y)| *x += y);
                (a, am)
            },
        );
    let mut c = old.to_vec();
    let mut far: Vec<usize> = (0..label.len()).collect();
    far.sort_by(|&a, &b| dmin[b].total_cmp(&dmin[a]));
    let mut far = far.into_iter();
    for j in 0..k {
        if mass[j] > 0.0 {
            for t in 0..d {
                c[j * d + t] = (sums[j * d + t] / mass[j]) as f32;
            }
        } else if let Some(i) = far.next() {
            c[j * d..(j + 1) * d].copy_from_slice(row(x, i, d));
        }
    }
    c
}

fn mean_variance(x: &[f32], w: &[f32], n: usize, d: usize) -> f64 {
    let wsum: f64 = w.iter().map(|&v| v as f64).sum();
    let mut mean = vec![0f64; d];
    for i in 0..n {
        for t in 0..d {
            mean[t] += (x[i * d + t] * w[i]) as f64;
        }
    }
    mean.iter_mut().for_each(|m| *m /= wsum);
    let mut var = 0f64;
    for i in 0..n {
        for t in 0..d {
            var += w[i] as f64 * (x[i * d + t] as f64 - mean[t]).powi(2);
        }
    }
    var / wsum / d as f64
}

/// Cluster `x` `[n, d]` (optionally weighted) into `cfg.k` clusters.
pub fn kmeans(x: &[f32], d: usize, weights: Option<&[f32]>, cfg: &KMeansConfig) -> Result<KMeansResult> {
    let n = x.len() / d.max(1);
    let k = cfg.k;
    if k == 0 {
        return Err(Error::Invalid("k must be at least 1".into()));
    }
    if k > n {
        return Err(Error::Invalid(format!(
            "k = {k} is larger than the number of samples ({n})"
        )));
    }
    let ones;
    let w = match weights {
        Some(w) => w,
        None => {
            ones = vec![1f32; n];
            &ones
        }
    };
    let xn = sq_norms(x, d);
    let tol = cfg.tol * mean_variance(x, w, n, d);
    let mut best: Option<KMeansResult> = None;
    for run in 0..cfg.n_init.max(1) {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(cfg.seed.wrapping_add(run as u64));
        let mut c = kmeans_pp(x, &xn, w, n, d, k, &mut rng);
        let mut label = vec![u32::MAX; n];
        let mut iterations = 0;
        if let Some(bs) = cfg.batch_size {
            // Mini-batch (Sculley 2010): per-centroid learning rate 1 / (points seen).
            let mut seen = vec![0f64; k];
            for _ in 0..cfg.max_iter {
                iterations += 1;
                let idx: Vec<usize> = (0..bs.min(n)).map(|_| rng.random_range(0..n)).collect();
                let xb: Vec<f32> = idx.iter().flat_map(|&i| row(x, i, d).iter().copied()).collect();
                let (lb, _) = assign(&xb, &c, d);
                for (r, &j) in lb.iter().enumerate() {
                    let j = j as usize;
                    seen[j] += w[idx[r]] as f64;
                    let eta = (w[idx[r]] as f64 / seen[j]) as f32;
                    for t in 0..d {
                        c[j * d + t] += eta * (xb[r * d + t] - c[j * d + t]);
                    }
                }
            }
        } else {
            for _ in 0..cfg.max_iter {
                iterations += 1;
                let dist = distances(x, &xn, &c, n, k, d);
                let (lb, dmin) = if cfg.balanced {
                    balanced_assign(&dist, n, k)
                } else {
                    nearest(&dist, k)
                };
                let changed = lb != label;
                label = lb;
                let new_c = update(x, w, &label, &dmin, &c, k, d);
                let shift: f64 = new_c.iter().zip(&c).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
                c = new_c;
                if !changed || shift <= tol {
                    break;
                }
            }
        }
        let dist = distances(x, &xn, &c, n, k, d);
        let (label, dmin) = if cfg.balanced {
            balanced_assign(&dist, n, k)
        } else {
            nearest(&dist, k)
        };
        let inertia: f64 = dmin.iter().zip(w).map(|(a, b)| (a * b) as f64).sum();
        if best.as_ref().is_none_or(|b| inertia < b.inertia) {
            best = Some(KMeansResult {
                centroids: c,
                assignment: label,
                inertia,
                iterations,
            });
        }
    }
    Ok(best.expect("at least one run"))
}

/// The paper's two-stage clustering: `fine` centroids by k-means on a subsample of at most
/// `subsample` points, then `k` coarse centroids by k-means over the fine centroids weighted by
/// how many points each holds. Every point takes the coarse cluster of its nearest fine centroid.
/// Returns the coarse result (centroids `[k, d]` are the weighted means of their fine centroids).
pub fn two_stage(
    x: &[f32],
    d: usize,
    fine: usize,
    subsample: usize,
    cfg: &KMeansConfig,
) -> Result<KMeansResult> {
    let n = x.len() / d;
    let fine = fine.min(n);
    if cfg.k > fine {
        return Err(Error::Invalid(format!(
            "k = {} is larger than the {fine} fine centroids",
            cfg.k
        )));
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(cfg.seed ^ 0x5eed);
    let sub: Vec<usize> = if n > subsample {
        rand::seq::index::sample(&mut rng, n, subsample).into_vec()
    } else {
        (0..n).collect()
    };
    let xs: Vec<f32> = sub.iter().flat_map(|&i| row(x, i, d).iter().copied()).collect();
    let fine_cfg = KMeansConfig {
        k: fine,
        balanced: false,
        n_init: 1,
        ..cfg.clone()
    };
    let f = kmeans(&xs, d, None, &fine_cfg)?;
    // Every point -> nearest fine centroid; fine centroids weighted by their populations.
    let (fine_label, _) = assign(x, &f.centroids, d);
    let mut counts = vec![0f32; fine];
    for &l in &fine_label {
        counts[l as usize] += 1.0;
    }
    let keep: Vec<usize> = (0..fine).filter(|&j| counts[j] > 0.0).collect();
    if keep.len() < cfg.k {
        return Err(Error::Invalid(format!(
            "only {} non-empty fine clusters for k = {}",
            keep.len(),
            cfg.k
        )));
    }
    let fc: Vec<f32> = keep
        .iter()
        .flat_map(|&j| row(&f.centroids, j, d).iter().copied())
        .collect();
    let fw: Vec<f32> = keep.iter().map(|&j| counts[j]).collect();
    let coarse = kmeans(
        &fc,
        d,
        Some(&fw),
        &KMeansConfig {
            balanced: false,
            ..cfg.clone()
        },
    )?;
    let mut fine_to_coarse = vec![0u32; fine];
    for (r, &j) in keep.iter().enumerate() {
        fine_to_coarse[j] = coarse.assignment[r];
    }
    let assignment: Vec<u32> = fine_label.iter().map(|&l| fine_to_coarse[l as usize]).collect();
    let (_, dmin) = assign(x, &coarse.centroids, d);
    Ok(KMeansResult {
        inertia: dmin.iter().map(|&v| v as f64).sum(),
        centroids: coarse.centroids,
        assignment,
        iterations: f.iterations + coarse.iterations,
    })
}

/// The baseline: a seeded random split into `k` clusters of (almost) equal size.
pub fn random_partition(n: usize, k: usize, seed: u64) -> Result<Vec<u32>> {
    if k == 0 || k > n {
        return Err(Error::Invalid(format!(
            "k = {k} must be between 1 and the number of samples ({n})"
        )));
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut order: Vec<usize> = (0..n).collect();
    rand::seq::SliceRandom::shuffle(&mut order[..], &mut rng);
    let mut label = vec![0u32; n];
    for (r, &i) in order.iter().enumerate() {
        label[i] = (r * k / n) as u32;
    }
    Ok(label)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ddm_core::gmm::GaussianMixture;

    /// Four well-separated blobs in 5-D: k-means recovers them exactly (up to relabelling).
    fn blobs(n: usize, seed: u64) -> (Vec<f32>, Vec<usize>) {
        let means = vec![
            vec![5.0, 0.0, 0.0, 0.0, 1.0],
            vec![-5.0, 0.0, 0.0, 0.0, 1.0],
            vec![0.0, 5.0, 0.0, -3.0, 0.0],
            vec![0.0, -5.0, 3.0, 0.0, 0.0],
        ];
        let g = GaussianMixture {
            weights: vec![0.1, 0.2, 0.3, 0.4],
            vars: vec![vec![0.3; 5]; 4],
            means,
        };
        let (x, ks) = g.sample(n, &mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
        (x.data, ks)
    }

    /// Fraction of points whose cluster agrees with the truth under the best relabelling.
    fn agreement(label: &[u32], truth: &[usize], k: usize) -> f64 {
        let mut m = vec![vec![0usize; k]; k];
        for (&l, &t) in label.iter().zip(truth) {
            m[l as usize][t] += 1;
        }
        // Each found cluster maps to its majority true cluster; must be a bijection to count.
        let map: Vec<usize> = m.iter().map(|r| (0..k).max_by_key(|&t| r[t]).unwrap()).collect();
        let mut seen = map.clone();
        seen.sort();
        seen.dedup();
        if seen.len() != k {
            return 0.0;
        }
        label
            .iter()
            .zip(truth)
            .filter(|(l, t)| map[**l as usize] == **t)
            .count() as f64
            / truth.len() as f64
    }

    #[test]
    fn recovers_known_clusters() {
        let (x, truth) = blobs(4000, 1);
        let r = kmeans(&x, 5, None, &KMeansConfig::new(4, 0)).unwrap();
        assert!(agreement(&r.assignment, &truth, 4) > 0.999);
        let r = kmeans(
            &x,
            5,
            None,
            &KMeansConfig {
                batch_size: Some(256),
                max_iter: 200,
                ..KMeansConfig::new(4, 0)
            },
        )
        .unwrap();
        assert!(agreement(&r.assignment, &truth, 4) > 0.99, "mini-batch");
        let r = two_stage(&x, 5, 64, 2000, &KMeansConfig::new(4, 0)).unwrap();
        assert!(agreement(&r.assignment, &truth, 4) > 0.99, "two-stage");
    }

    #[test]
    fn deterministic_for_a_seed() {
        let (x, _) = blobs(2000, 2);
        let a = kmeans(&x, 5, None, &KMeansConfig::new(3, 7)).unwrap();
        let b = kmeans(&x, 5, None, &KMeansConfig::new(3, 7)).unwrap();
        assert_eq!(a.assignment, b.assignment);
        assert_eq!(a.centroids, b.centroids);
    }

    #[test]
    fn balanced_caps_cluster_sizes() {
        let (x, _) = blobs(1000, 3);
        let r = kmeans(
            &x,
            5,
            None,
            &KMeansConfig {
                balanced: true,
                ..KMeansConfig::new(4, 0)
            },
        )
        .unwrap();
        let mut counts = [0; 4];
        r.assignment.iter().for_each(|&l| counts[l as usize] += 1);
        assert!(counts.iter().all(|&c| c == 250), "{counts:?}");
    }

    #[test]
    fn random_partition_is_even_and_seeded() {
        let a = random_partition(1003, 4, 9).unwrap();
        let mut counts = [0; 4];
        a.iter().for_each(|&l| counts[l as usize] += 1);
        assert!(counts.iter().all(|&c| (250..=251).contains(&c)), "{counts:?}");
        assert_eq!(a, random_partition(1003, 4, 9).unwrap());
        assert_ne!(a, random_partition(1003, 4, 10).unwrap());
    }

    #[test]
    fn k_larger_than_n_is_an_error() {
        let e = kmeans(&[0.0; 6], 2, None, &KMeansConfig::new(4, 0)).unwrap_err();
        assert!(
            e.to_string().contains("larger than the number of samples (3)"),
            "{e}"
        );
        assert!(random_partition(3, 4, 0).is_err());
    }
}

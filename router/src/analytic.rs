//! The analytic router (beyond the published systems): from statistics each island computes on its
//! own shard (count, mean, diagonal variance), the Gaussian approximation of the posterior
//!
//!   p(k | x_t, t) ∝ w_k N(x_t; (1 - t) mu_k, (1 - t)^2 Sigma_k + t^2 I),   w_k = n_k / sum n.
//!
//! No training; a new expert joins by publishing its statistics. This is the posterior of the
//! Gaussian mixture with those weights, means and variances, so the formula has one home:
//! [`ddm_core::gmm::GaussianMixture::posterior`] (f64, exact for Gaussian clusters).
//!
//! Conditioned on a class c (when the islands published their label counts n_{k,c}), the prior
//! w_k becomes p(k | c) = n_{k,c} / sum_j n_{j,c}:
//!
//!   p(k | x_t, t, c) ∝ p(k | c) N(x_t; (1 - t) mu_k, (1 - t)^2 Sigma_k + t^2 I),
//!
//! exact at t = 1 (where the likelihood is the same for every k) and exact for all t when every
//! class lives in one cluster; otherwise the cluster's Gaussian stands in for its class-c part.
//!
//! Conditioned on a pooled vector c (a caption's text embedding; the islands published the mean
//! and diagonal variance of their samples' vectors), each cluster's Gaussian of c weighs it too:
//!
//!   p(k | x_t, t, c) ∝ p(k) N(c; m_k, S_k) N(x_t; (1 - t) mu_k, (1 - t)^2 Sigma_k + t^2 I),
//!
//! which takes x and c independent given the cluster (the same mixture formula, once over c at
//! t = 0, then over x_t). The zero vector is the null condition (what condition dropout trains):
//! it leaves the prior. Token sequences are not read: a sequence has no Gaussian here.

use std::path::Path;

use anyhow::{Context, bail};
use ddm_core::gmm::GaussianMixture;
use ddm_core::stats::ClusterStats;

/// The smallest variance of a conditioning vector's coordinate (a cluster whose captions all share
/// a value would otherwise have none).
const CONDITION_VAR_FLOOR: f64 = 1e-6;

/// Per-cluster Gaussians and priors: the mixture the clusters would form if each were Gaussian.
#[derive(Debug, Clone, PartialEq)]
pub struct AnalyticRouter {
    pub mixture: GaussianMixture,
    /// p(k | c): row c holds the K cluster probabilities of class c (None: unconditioned, some
    /// island published no label counts).
    pub class_priors: Option<Vec<Vec<f64>>>,
    /// Each cluster's Gaussian of its conditioning vectors, as a mixture over c (None: some island
    /// published none, or they differ in width).
    pub condition: Option<GaussianMixture>,
}

impl AnalyticRouter {
    /// From each cluster's statistics (in cluster order); priors from the counts, class priors
    /// from the label counts when every cluster has them (for the same number of classes).
    pub fn from_stats(stats: &[ClusterStats]) -> Self {
        let total: f64 = stats.iter().map(|s| s.count as f64).sum();
        let labels: Option<Vec<&Vec<usize>>> = stats.iter().map(|s| s.label_counts.as_ref()).collect();
        let class_priors = labels
            .filter(|l| l.iter().all(|c| c.len() == l[0].len()))
            .map(|l| {
                (0..l[0].len())
                    .map(|c| {
                        let z: f64 = l.iter().map(|counts| counts[c] as f64).sum();
                        l.iter()
                            .map(|counts| {
                                if z > 0.0 {
                                    counts[c] as f64 / z
                                } else {
                                    1.0 / l.len() as f64
                                }
                            })
                            .collect()
                    })
                    .collect()
            });
        let weights: Vec<f64> = stats.iter().map(|s| s.count as f64 / total).collect();
        let condition = stats
            .iter()
            .map(|s| s.condition.as_ref())
            .collect::<Option<Vec<_>>>()
            .filter(|c| c.iter().all(|m| m.mean.len() == c[0].mean.len()))
            .map(|c| GaussianMixture {
                weights: weights.clone(),
                means: c.iter().map(|m| m.mean.clone()).collect(),
                vars: c
                    .iter()
                    .map(|m| m.var.iter().map(|v| v.max(CONDITION_VAR_FLOOR)).collect())
                    .collect(),
            });
        Self {
            mixture: GaussianMixture {
                weights,
                means: stats.iter().map(|s| s.mean.clone()).collect(),
                vars: stats.iter().map(|s| s.var.clone()).collect(),
            },
            class_priors,
            condition,
        }
    }

    /// Read `cluster-stats.safetensors` files (one per island), checking they come from one
    /// partition and cover clusters 0..K exactly once.
    pub fn from_files(files: &[&Path], partition: &str) -> anyhow::Result<Self> {
        let mut found: Vec<Option<ClusterStats>> = vec![None; files.len()];
        for f in files {
            let (meta, s) = ClusterStats::load(f)?;
            if meta.partition != partition {
                bail!(
                    "{}: statistics of partition {}, not {partition}",
                    f.display(),
                    meta.partition
                );
            }
            let k = meta
                .cluster
                .with_context(|| format!("{}: statistics of a monolith, not a cluster", f.display()))?;
            let slot = found
                .get_mut(k)
                .with_context(|| format!("{}: cluster {k} out of range 0..{}", f.display(), files.len()))?;
            if slot.replace(s).is_some() {
                bail!("{}: a second statistics file for cluster {k}", f.display());
            }
        }
        let stats: Vec<ClusterStats> = found
            .into_iter()
            .map(|s| s.expect("k files, k distinct clusters"))
            .collect();
        Ok(Self::from_stats(&stats))
    }

    pub fn k(&self) -> usize {
        self.mixture.k()
    }

    /// Classes the router can condition on (0: the islands published no label counts).
    pub fn classes(&self) -> usize {
        self.class_priors.as_ref().map_or(0, |p| p.len())
    }

    /// The width of the conditioning vectors it weighs clusters by (None: it reads none).
    pub fn condition_dim(&self) -> Option<usize> {
        self.condition.as_ref().map(|g| g.means[0].len())
    }

    /// p(k | x_t, t) for every k.
    pub fn posterior(&self, x: &[f64], t: f64) -> Vec<f64> {
        self.mixture.posterior(x, t)
    }

    /// p(k | x_t, t, c) for every k; `class` None (or a router without class priors) gives
    /// p(k | x_t, t). Panics on a class out of range (callers check against [`Self::classes`]).
    pub fn posterior_given(&self, x: &[f64], t: f64, class: Option<usize>) -> Vec<f64> {
        self.posterior_with(x, t, class, None)
    }

    /// p(k | x_t, t, class, c) for every k: the class's prior (or w_k), weighed by each cluster's
    /// Gaussian of the conditioning vector `c` (of [`Self::condition_dim`] values) when the router
    /// has them and `c` is not the zero vector (the null condition).
    pub fn posterior_with(&self, x: &[f64], t: f64, class: Option<usize>, c: Option<&[f64]>) -> Vec<f64> {
        let prior = match (&self.class_priors, class) {
            (Some(p), Some(class)) => &p[class],
            _ => &self.mixture.weights,
        };
        match (&self.condition, c) {
            (Some(g), Some(c)) if c.iter().any(|&v| v != 0.0) => {
                // p(k | class, c): the mixture over c at t = 0 is its own likelihood.
                let given_c = g.posterior_with_weights(c, 0.0, prior);
                self.mixture.posterior_with_weights(x, t, &given_c)
            }
            _ => self.mixture.posterior_with_weights(x, t, prior),
        }
    }
}

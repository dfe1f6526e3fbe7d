//! The analytic router (beyond the published systems): from statistics each island computes on its
//! own shard (count, mean, diagonal variance), the Gaussian approximation of the posterior
//!
//!   p(k | x_t, t) ∝ w_k N(x_t; (1 - t) mu_k, (1 - t)^2 Sigma_k + t^2 I),   w_k = n_k / sum n.
//!
//! No training; a new expert joins by publishing its statistics. This is the posterior of the
//! Gaussian mixture with those weights, means and variances, so the formula has one home:
//! [`ddm_core::gmm::GaussianMixture::posterior`] (f64, exact for Gaussian clusters).

use std::path::Path;

use anyhow::{Context, bail};
use ddm_core::gmm::GaussianMixture;
use ddm_core::stats::ClusterStats;

/// Per-cluster Gaussians and priors: the mixture the clusters would form if each were Gaussian.
#[derive(Debug, Clone, PartialEq)]
pub struct AnalyticRouter {
    pub mixture: GaussianMixture,
}

impl AnalyticRouter {
    /// From each cluster's statistics (in cluster order); priors from the counts.
    pub fn from_stats(stats: &[ClusterStats]) -> Self {
        let total: f64 = stats.iter().map(|s| s.count as f64).sum();
        Self {
            mixture: GaussianMixture {
                weights: stats.iter().map(|s| s.count as f64 / total).collect(),
                means: stats.iter().map(|s| s.mean.clone()).collect(),
                vars: stats.iter().map(|s| s.var.clone()).collect(),
            },
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

    /// p(k | x_t, t) for every k.
    pub fn posterior(&self, x: &[f64], t: f64) -> Vec<f64> {
        self.mixture.posterior(x, t)
    }
}

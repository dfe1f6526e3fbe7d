//! The analytic router (beyond the published systems): from statistics each island computes on its
//! own shard (count, mean, diagonal variance), the Gaussian approximation of the posterior
//!
//!   p(k | x_t, t) ∝ w_k N(x_t; (1 - t) mu_k, (1 - t)^2 Sigma_k + t^2 I),   w_k = n_k / sum n.
//!
//! No training; a new expert joins by publishing its statistics. For a mixture of Gaussian clusters
//! it is exact (the test oracle). Computed in f64 with log-sum-exp.

use std::path::Path;

use anyhow::{Context, bail};
use ddm_trainer::stats::ClusterStats;

/// Per-cluster Gaussians and priors.
#[derive(Debug, Clone, PartialEq)]
pub struct AnalyticRouter {
    pub priors: Vec<f64>,
    pub means: Vec<Vec<f64>>,
    pub vars: Vec<Vec<f64>>,
}

impl AnalyticRouter {
    /// From each cluster's statistics (in cluster order); priors from the counts.
    pub fn from_stats(stats: &[ClusterStats]) -> Self {
        let total: f64 = stats.iter().map(|s| s.count as f64).sum();
        Self {
            priors: stats.iter().map(|s| s.count as f64 / total).collect(),
            means: stats.iter().map(|s| s.mean.clone()).collect(),
            vars: stats.iter().map(|s| s.var.clone()).collect(),
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
        self.priors.len()
    }

    /// log p(k | x_t, t) for every k.
    pub fn log_posterior(&self, x: &[f64], t: f64) -> Vec<f64> {
        let lj: Vec<f64> = (0..self.k())
            .map(|k| {
                let mut lp = self.priors[k].ln();
                for (j, &xj) in x.iter().enumerate() {
                    let var = (1.0 - t).powi(2) * self.vars[k][j] + t * t;
                    let r = xj - (1.0 - t) * self.means[k][j];
                    lp -= 0.5 * (r * r / var + var.ln());
                }
                lp
            })
            .collect();
        let m = lj.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = m + lj.iter().map(|l| (l - m).exp()).sum::<f64>().ln();
        lj.into_iter().map(|l| l - lse).collect()
    }

    pub fn posterior(&self, x: &[f64], t: f64) -> Vec<f64> {
        self.log_posterior(x, t).into_iter().map(f64::exp).collect()
    }
}

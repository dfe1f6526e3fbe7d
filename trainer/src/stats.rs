//! Per-cluster statistics that an island computes on its own shard and publishes beside its
//! expert: sample count, mean and diagonal variance (in the models' value range). From these
//! alone the analytic router approximates the posterior p(k | x_t) (crate `ddm-router`); no
//! training, and a new expert joins by publishing its statistics.
//!
//! File: `OUT/cluster-stats.safetensors` with `mean` [X], `var` [X] and header JSON (`ddm-stats`):
//! count, cluster, partition fingerprint.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::Context;
use ddm_core::host::{HostTensor, RawTensor, TensorFile, raw_to_safetensors_bytes};
use ddm_datasets::Dataset;
use ddm_datasets::partition::PartitionManifest;
use serde::{Deserialize, Serialize};

use crate::island::Target;

pub const STATS_FILE: &str = "cluster-stats.safetensors";
const META_KEY: &str = "ddm-stats";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatsMeta {
    pub count: usize,
    pub cluster: Option<usize>,
    pub partition: String,
}

/// Count, mean and diagonal variance of a set of samples (f64 accumulation).
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterStats {
    pub count: usize,
    pub mean: Vec<f64>,
    pub var: Vec<f64>,
}

impl ClusterStats {
    pub fn of(data: &Dataset) -> Self {
        let (n, d) = (data.len(), data.sample_size());
        let (mut s, mut s2) = (vec![0f64; d], vec![0f64; d]);
        for chunk in (0..n).collect::<Vec<_>>().chunks(4096) {
            let x = data.gather(chunk);
            for row in x.chunks(d) {
                for j in 0..d {
                    let v = row[j] as f64;
                    s[j] += v;
                    s2[j] += v * v;
                }
            }
        }
        let mean: Vec<f64> = s.iter().map(|v| v / n as f64).collect();
        let var = s2
            .iter()
            .zip(&mean)
            .map(|(q, m)| (q / n as f64 - m * m).max(0.0))
            .collect();
        Self { count: n, mean, var }
    }

    pub fn save(&self, path: &Path, manifest: &PartitionManifest, target: Target) -> anyhow::Result<()> {
        let d = self.mean.len();
        let f = |v: &[f64]| RawTensor::f32(&HostTensor::new(vec![d], v.iter().map(|&x| x as f32).collect()));
        let t = BTreeMap::from([
            ("mean".to_string(), f(&self.mean)),
            ("var".to_string(), f(&self.var)),
        ]);
        let meta = StatsMeta {
            count: self.count,
            cluster: match target {
                Target::Cluster(k) => Some(k),
                Target::Monolith => None,
            },
            partition: manifest.fingerprint.clone(),
        };
        let md = HashMap::from([(META_KEY.to_string(), serde_json::to_string(&meta)?)]);
        ddm_core::fsio::write_bytes_atomic(path, &raw_to_safetensors_bytes(&t, Some(md))?)?;
        Ok(())
    }

    pub fn load(path: &Path) -> anyhow::Result<(StatsMeta, Self)> {
        let f = TensorFile::read(path)?;
        let meta: StatsMeta = serde_json::from_str(
            f.metadata
                .get(META_KEY)
                .with_context(|| format!("{}: not a ddm cluster-statistics file", path.display()))?,
        )?;
        let g =
            |n: &str| -> anyhow::Result<Vec<f64>> { Ok(f.f32(n)?.data.iter().map(|&v| v as f64).collect()) };
        Ok((
            meta.clone(),
            Self {
                count: meta.count,
                mean: g("mean")?,
                var: g("var")?,
            },
        ))
    }
}

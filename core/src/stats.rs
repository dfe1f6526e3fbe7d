//! The per-cluster statistics file: what an island computes on its own shard and publishes beside
//! its expert (sample count, mean and diagonal variance, in the models' value range). From these
//! alone the analytic router approximates the posterior p(k | x_t) (crate `ddm-router`); no
//! training, and a new expert joins by publishing its statistics.
//!
//! File: `OUT/cluster-stats.safetensors` with `mean` [X], `var` [X] and header JSON under the key
//! `ddm-stats`: count, cluster (absent for a monolith), partition fingerprint, and for labelled
//! data the count of each class (what the conditioned analytic router's p(k | c) is made of); for
//! data with conditioning vectors (a caption's pooled text embedding) also their mean `c_mean`
//! [Dc] and diagonal variance `c_var` [Dc]. Written by the trainer, read by the registry and the
//! analytic router: a contract, so it lives here.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::host::{HostTensor, RawTensor, TensorFile, raw_to_safetensors_bytes};

pub const STATS_FILE: &str = "cluster-stats.safetensors";
const META_KEY: &str = "ddm-stats";

/// The header of a statistics file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatsMeta {
    pub count: usize,
    /// The cluster these samples form; `None` for the monolith (all data).
    pub cluster: Option<usize>,
    /// The fingerprint of the partition the cluster belongs to.
    pub partition: String,
    /// Samples of each class 0..C in the cluster (labelled data only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label_counts: Option<Vec<usize>>,
}

/// Count, mean and diagonal variance of a set of samples (f64 accumulation), and for labelled data
/// how many samples of each class there are.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterStats {
    pub count: usize,
    pub mean: Vec<f64>,
    pub var: Vec<f64>,
    pub label_counts: Option<Vec<usize>>,
    /// Mean and diagonal variance of the samples' conditioning vectors (data that has them).
    pub condition: Option<Moments>,
}

/// Mean and diagonal variance of a set of vectors.
#[derive(Debug, Clone, PartialEq)]
pub struct Moments {
    pub mean: Vec<f64>,
    pub var: Vec<f64>,
}

/// Sums and sums of squares, fed one sample at a time (data too large to hold at once).
pub struct Accumulator {
    n: usize,
    s: Vec<f64>,
    s2: Vec<f64>,
}

impl Accumulator {
    pub fn new(d: usize) -> Self {
        Self {
            n: 0,
            s: vec![0.0; d],
            s2: vec![0.0; d],
        }
    }

    /// Add one flattened sample.
    pub fn add(&mut self, row: &[f32]) {
        for ((s, s2), &v) in self.s.iter_mut().zip(&mut self.s2).zip(row) {
            let v = v as f64;
            *s += v;
            *s2 += v * v;
        }
        self.n += 1;
    }

    pub fn finish(self) -> ClusterStats {
        let n = self.n as f64;
        let mean: Vec<f64> = self.s.iter().map(|v| v / n).collect();
        let var = self
            .s2
            .iter()
            .zip(&mean)
            .map(|(q, m)| (q / n - m * m).max(0.0))
            .collect();
        ClusterStats {
            count: self.n,
            mean,
            var,
            label_counts: None,
            condition: None,
        }
    }
}

impl ClusterStats {
    /// The statistics of `rows`, each a flattened sample of `d` values.
    pub fn of_rows<'a>(d: usize, rows: impl IntoIterator<Item = &'a [f32]>) -> Self {
        let mut acc = Accumulator::new(d);
        rows.into_iter().for_each(|r| acc.add(r));
        acc.finish()
    }

    /// Write the file atomically.
    pub fn save(&self, path: &Path, cluster: Option<usize>, partition: &str) -> Result<()> {
        let d = self.mean.len();
        let f = |v: &[f64]| RawTensor::f32(&HostTensor::new(vec![d], v.iter().map(|&x| x as f32).collect()));
        let mut t = BTreeMap::from([
            ("mean".to_string(), f(&self.mean)),
            ("var".to_string(), f(&self.var)),
        ]);
        if let Some(c) = &self.condition {
            let f = |v: &[f64]| {
                RawTensor::f32(&HostTensor::new(
                    vec![v.len()],
                    v.iter().map(|&x| x as f32).collect(),
                ))
            };
            t.insert("c_mean".to_string(), f(&c.mean));
            t.insert("c_var".to_string(), f(&c.var));
        }
        let meta = StatsMeta {
            count: self.count,
            cluster,
            partition: partition.to_string(),
            label_counts: self.label_counts.clone(),
        };
        let json = crate::json::to_string(&format!("{}: statistics", path.display()), &meta)?;
        let md = HashMap::from([(META_KEY.to_string(), json)]);
        crate::fsio::write_bytes_atomic(path, &raw_to_safetensors_bytes(&t, Some(md))?)
    }

    /// Read a file written by [`ClusterStats::save`].
    pub fn load(path: &Path) -> Result<(StatsMeta, Self)> {
        Self::from_file(&TensorFile::read(path)?)
    }

    /// [`ClusterStats::load`] of a file already read.
    pub fn from_file(f: &TensorFile) -> Result<(StatsMeta, Self)> {
        let path = &f.path;
        let bad = |reason: String| Error::BadMetadata {
            path: path.to_path_buf(),
            reason,
        };
        let json = f
            .metadata
            .get(META_KEY)
            .ok_or_else(|| bad("not a ddm cluster-statistics file (no `ddm-stats` header)".into()))?;
        let meta: StatsMeta = serde_json::from_str(json).map_err(|e| bad(e.to_string()))?;
        let g = |n: &str| -> Result<Vec<f64>> { Ok(f.f32(n)?.data.iter().map(|&v| v as f64).collect()) };
        let (mean, var) = (g("mean")?, g("var")?);
        if mean.len() != var.len() {
            return Err(bad(format!("mean has {} values, var {}", mean.len(), var.len())));
        }
        if let Some(l) = &meta.label_counts
            && l.iter().sum::<usize>() != meta.count
        {
            return Err(bad(format!(
                "label counts sum to {}, but the cluster has {} samples",
                l.iter().sum::<usize>(),
                meta.count
            )));
        }
        let condition = match f.contains("c_mean") {
            false => None,
            true => {
                let (mean, var) = (g("c_mean")?, g("c_var")?);
                if mean.is_empty() || mean.len() != var.len() {
                    return Err(bad(format!(
                        "c_mean has {} values, c_var {}",
                        mean.len(),
                        var.len()
                    )));
                }
                Some(Moments { mean, var })
            }
        };
        Ok((
            meta.clone(),
            Self {
                count: meta.count,
                mean,
                var,
                label_counts: meta.label_counts,
                condition,
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moments_and_round_trip() {
        let rows: [&[f32]; 3] = [&[1.0, 0.0], &[2.0, 0.0], &[3.0, 3.0]];
        let mut s = ClusterStats::of_rows(2, rows);
        s.label_counts = Some(vec![2, 0, 1]);
        s.condition = Some(Moments {
            mean: vec![0.5, -1.0, 2.0],
            var: vec![0.25, 1.0, 0.0],
        });
        assert_eq!(s.count, 3);
        assert_eq!(s.mean, vec![2.0, 1.0]);
        assert!((s.var[0] - 2.0 / 3.0).abs() < 1e-12 && (s.var[1] - 2.0).abs() < 1e-12);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(STATS_FILE);
        s.save(&p, Some(1), "abc").unwrap();
        let (meta, back) = ClusterStats::load(&p).unwrap();
        assert_eq!(
            (meta.count, meta.cluster, meta.partition.as_str()),
            (3, Some(1), "abc")
        );
        assert_eq!(back.mean, s.mean);
        assert_eq!(back.label_counts, Some(vec![2, 0, 1]));
        assert_eq!(back.condition, s.condition);
        // Written as f32: equal to f32 precision.
        assert!((back.var[0] - s.var[0]).abs() < 1e-6);
    }
}

//! The partition directory (a contract; see docs/ARCHITECTURE.md): everything K islands need, one shard each.
//!
//! ```text
//! DIR/partition.json          dataset identity + fingerprint, K, method, seed, per-cluster counts,
//!                             priors w_k and dominant labels, sha256 and size of every file
//! DIR/centroids.safetensors   `centroids` [K, F] in feature space (+ `pca_mean`, `pca_components`)
//! DIR/assignment.safetensors  `cluster` [N]: the cluster of every sample
//! DIR/shard-K.safetensors     exactly cluster K's samples: `x` [n_k, ...] (u8 images or f32),
//!                             `y` [n_k] labels if any, `index` [n_k] positions in the dataset
//! ```
//! An island needs `partition.json` and its own shard, nothing else. The directory is written in
//! a temporary directory beside the destination and renamed into place at the end, so a failure
//! leaves nothing behind. Shards are verified against partition.json's sha256 when loaded.

//!
//! [`cluster`](mod@cluster) groups the samples, [`write`](mod@write) writes the directory,
//! [`read`](mod@read) reads and verifies it, [`describe`](mod@describe) shows it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::dataset::DatasetInfo;
use crate::features::{Distance, FeatureMethod};

pub mod cluster;
pub mod describe;
pub mod read;
pub mod write;

pub use cluster::{Clustering, cluster, cluster_with};
pub use describe::describe;
pub use read::{Partition, load_shard, read_manifest, verify};
pub use write::write;

/// The partition format version this build writes and reads.
pub const PARTITION_FORMAT: u32 = 1;
pub const MANIFEST: &str = "partition.json";
/// Header key of a shard's JSON metadata.
pub const SHARD_META_KEY: &str = "ddm-shard";

/// How samples are grouped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Algorithm {
    /// Plain k-means (k-means++, Lloyd; optional mini-batch and balanced assignment).
    Kmeans {
        max_iter: usize,
        n_init: usize,
        batch_size: Option<usize>,
        balanced: bool,
    },
    /// The paper's two-stage k-means: `fine` centroids on up to `subsample` points, then K coarse.
    TwoStage {
        fine: usize,
        subsample: usize,
        max_iter: usize,
    },
    /// Random equal-size shards: the baseline.
    Random,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PartitionConfig {
    pub k: usize,
    pub features: FeatureMethod,
    pub distance: Distance,
    pub algorithm: Algorithm,
    pub seed: u64,
}

/// One cluster of partition.json.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterEntry {
    pub id: usize,
    pub count: usize,
    /// w_k = n_k / N.
    pub prior: f64,
    pub shard: String,
    /// Samples per label in this cluster (if the data has labels).
    #[serde(default)]
    pub label_counts: Option<Vec<usize>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileEntry {
    pub sha256: String,
    pub bytes: u64,
}

/// partition.json.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PartitionManifest {
    pub format_version: u32,
    /// sha256 over the dataset fingerprint, K, the method, the seed and the assignment.
    pub fingerprint: String,
    pub dataset: DatasetInfo,
    pub k: usize,
    pub config: PartitionConfig,
    pub clusters: Vec<ClusterEntry>,
    /// Every other file of the directory, by name.
    pub files: BTreeMap<String, FileEntry>,
    /// k-means inertia in feature space (None for random shards).
    #[serde(default)]
    pub inertia: Option<f64>,
    pub seconds: f64,
}

impl PartitionManifest {
    pub fn priors(&self) -> Vec<f64> {
        self.clusters.iter().map(|c| c.prior).collect()
    }
}

/// The shard file name of cluster `k`.
pub fn shard_name(k: usize) -> String {
    format!("shard-{k}.safetensors")
}

/// A shard's header metadata.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShardMeta {
    pub format_version: u32,
    pub partition: String,
    pub cluster: usize,
    pub dataset: DatasetInfo,
}

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

pub mod cluster;
pub mod describe;
pub mod read;
pub mod write;

pub use cluster::{Clustering, cluster, cluster_with};
pub use describe::describe;
pub use read::{Partition, load_shard, read_manifest, verify};
pub use write::write;

pub use ddm_core::partition::{
    Algorithm, ClusterEntry, FileEntry, MANIFEST, PARTITION_FORMAT, PartitionConfig, PartitionManifest,
    SHARD_META_KEY, ShardMeta, shard_name,
};

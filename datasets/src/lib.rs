//! ddm-datasets: where samples come from and how they are split into islands.
//!
//! The data flow: a [`Source`] (IDX/Fashion-MNIST, the embedded subset, CIFAR-10, an image
//! folder, safetensors tensors, a Gaussian mixture) loads a [`Dataset`]; [`features`] turns it into
//! clustering vectors (pixels, PCA, or embeddings computed elsewhere); [`kmeans`] clusters them
//! (plain, mini-batch, balanced, or the paper's two-stage fine -> coarse; or random shards);
//! [`partition`] writes the partition directory: `partition.json` plus one shard per cluster, which
//! is all one island needs.

pub mod captions;
pub mod cifar;
pub mod dataset;
pub mod describe;
pub mod embedded;
pub mod error;
pub mod features;
pub mod folder;
pub mod idx;
pub mod kmeans;
pub mod linalg;
pub mod mixture;
pub mod partition;
pub mod source;
pub mod tensors;

pub use dataset::{Dataset, DatasetInfo, Source, Values};
pub use error::{Error, Result};
pub use source::parse_source;

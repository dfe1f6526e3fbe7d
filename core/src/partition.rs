//! The partition contract as the inference side reads it: `partition.json`'s types (the dataset's
//! identity, K, how the samples were grouped, each cluster's prior and shard) and a shard's header.
//! Writing a partition (features, k-means) and reading shards live in `ddm-datasets`; islands,
//! routers and registries need only these types, so they sit upstream of both.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::clip::TextSpace;
use crate::error::{Error, Result};
use crate::gmm::GaussianMixture;
use crate::vae::LatentSpace;

/// What a dataset is, without its samples: travels in partition.json and shard headers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetInfo {
    /// Identity, e.g. `fashion-mnist/train`.
    pub name: String,
    /// sha256 over shape, values and labels: the same samples give the same fingerprint.
    pub fingerprint: String,
    pub len: usize,
    /// Per-sample shape: `[C, H, W]` for images, `[X]` for vectors.
    pub shape: Vec<usize>,
    /// Value range the models see after scaling.
    pub range: [f32; 2],
    /// `u8` (images, scaled to [-1, 1]) or `f32`.
    pub dtype: String,
    #[serde(default)]
    pub num_classes: Option<usize>,
    #[serde(default)]
    pub class_names: Option<Vec<String>>,
    /// For Gaussian-mixture data: the mixture itself, so later stages compute exact answers.
    #[serde(default)]
    pub mixture: Option<GaussianMixture>,
    /// For VAE latents (`ddm encode`): the latent space, which every model trained on them records.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latent: Option<LatentSpace>,
    /// For conditioning vectors made from captions (`ddm encode-text`): the text encoder's space,
    /// which every model that reads them records.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<TextSpace>,
}

/// The most values one sample may have (a 4096 x 4096 RGB image has 50 M).
pub const MAX_SAMPLE_VALUES: usize = 1 << 26;

/// Whether a per-sample shape is one a model can hold: not empty, no zero, at most
/// [`MAX_SAMPLE_VALUES`] values.
pub fn check_sample_shape(shape: &[usize]) -> std::result::Result<(), String> {
    let values = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    match values {
        _ if shape.is_empty() || shape.contains(&0) => Err(format!("sample shape {shape:?} has no values")),
        Some(v) if v <= MAX_SAMPLE_VALUES => Ok(()),
        _ => Err(format!(
            "sample shape {shape:?} has more than {MAX_SAMPLE_VALUES} values"
        )),
    }
}

impl DatasetInfo {
    /// What a recorded dataset identity must hold: a usable sample shape and value range.
    pub fn check(&self) -> std::result::Result<(), String> {
        check_sample_shape(&self.shape)?;
        crate::checkpoint::check_range(self.range)
    }
}

/// How samples become clustering vectors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum FeatureMethod {
    /// The samples themselves, flattened.
    Raw,
    /// The top `dims` principal components of the flattened samples.
    Pca { dims: usize },
    /// Rows of `embeddings` `[N, E]` in a safetensors file.
    Embeddings { path: PathBuf },
}

impl FromStr for FeatureMethod {
    type Err = Error;

    /// `raw`, `pca:64`, `embeddings:FILE`.
    fn from_str(s: &str) -> Result<Self> {
        match s.split_once(':') {
            None if s == "raw" => Ok(FeatureMethod::Raw),
            Some(("pca", d)) => d
                .parse()
                .ok()
                .filter(|&d: &usize| d > 0)
                .map(|dims| FeatureMethod::Pca { dims })
                .ok_or_else(|| {
                    Error::Invalid(format!("bad PCA size in `{s}`: expected pca:<dims>, e.g. pca:64"))
                }),
            Some(("embeddings", p)) if !p.is_empty() => Ok(FeatureMethod::Embeddings { path: p.into() }),
            _ => Err(Error::Invalid(format!(
                "unknown features `{s}`: expected raw, pca:<dims> or embeddings:<file>"
            ))),
        }
    }
}

impl std::fmt::Display for FeatureMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FeatureMethod::Raw => write!(f, "raw"),
            FeatureMethod::Pca { dims } => write!(f, "pca:{dims}"),
            FeatureMethod::Embeddings { path } => write!(f, "embeddings:{}", path.display()),
        }
    }
}

/// The distance k-means uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Distance {
    L2,
    /// 1 - cosine similarity (rows L2-normalised, then L2 k-means).
    Cosine,
}

impl FromStr for Distance {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "l2" => Ok(Distance::L2),
            "cosine" => Ok(Distance::Cosine),
            _ => Err(Error::Invalid(format!(
                "unknown distance `{s}`: expected l2 or cosine"
            ))),
        }
    }
}

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

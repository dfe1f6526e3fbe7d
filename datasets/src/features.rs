//! Clustering features: what k-means sees. Raw pixels (scaled to [-1, 1]), PCA to d dimensions,
//! or embeddings computed elsewhere (DINOv2, CLIP; a safetensors file aligned by index). With the
//! cosine distance, feature rows are L2-normalised first (k-means on the unit sphere).

use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::dataset::Dataset;
use crate::error::{Error, Result};
use crate::linalg::Pca;

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

/// Clustering features `[n, dim]` and the fitted PCA, if any.
pub struct Features {
    pub data: Vec<f32>,
    pub n: usize,
    pub dim: usize,
    pub pca: Option<Pca>,
}

/// Compute the clustering features of every sample.
pub fn compute(dataset: &Dataset, method: &FeatureMethod, distance: Distance) -> Result<Features> {
    let n = dataset.len();
    let all: Vec<usize> = (0..n).collect();
    let (mut data, dim, pca) = match method {
        FeatureMethod::Raw => (dataset.gather(&all), dataset.sample_size(), None),
        FeatureMethod::Pca { dims } => {
            let x = dataset.gather(&all);
            let p = Pca::fit(&x, n, dataset.sample_size(), *dims);
            (p.project(&x, n), p.d, Some(p))
        }
        FeatureMethod::Embeddings { path } => {
            let (e, data) = crate::tensors::read_embeddings(path, n)?;
            (data, e, None)
        }
    };
    if distance == Distance::Cosine {
        for row in data.chunks_mut(dim) {
            let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
            row.iter_mut().for_each(|v| *v /= norm);
        }
    }
    Ok(Features { data, n, dim, pca })
}

//! Clustering features: what k-means sees. Raw pixels (scaled to [-1, 1]), PCA to d dimensions,
//! or embeddings computed elsewhere (DINOv2, CLIP; a safetensors file aligned by index). With the
//! cosine distance, feature rows are L2-normalised first (k-means on the unit sphere).

use crate::dataset::Dataset;
use crate::error::Result;
use crate::linalg::Pca;

pub use ddm_core::partition::{Distance, FeatureMethod};

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

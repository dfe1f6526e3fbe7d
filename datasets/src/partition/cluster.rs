//! Grouping a dataset's samples into K clusters (k-means variants in a feature space, or random
//! equal shards), and the partition's fingerprint.

use ddm_core::digest::sha256_hex;
use ddm_core::progress::Progress;

use super::{Algorithm, PartitionConfig};
use crate::dataset::{Dataset, DatasetInfo};
use crate::error::{Error, Result};
use crate::features;
use crate::kmeans::{self, KMeansConfig};
use crate::linalg::Pca;

/// The result of clustering a dataset.
pub struct Clustering {
    pub assignment: Vec<u32>,
    /// `[K, F]` in feature space (empty for random shards).
    pub centroids: Vec<f32>,
    pub feature_dim: usize,
    pub pca: Option<Pca>,
    pub inertia: Option<f64>,
}

/// Cluster `dataset` as `config` says.
pub fn cluster(dataset: &Dataset, config: &PartitionConfig) -> Result<Clustering> {
    cluster_with(dataset, config, &())
}

/// [`cluster`], reporting its phases (features, k-means) to `progress`.
pub fn cluster_with(
    dataset: &Dataset,
    config: &PartitionConfig,
    progress: &dyn Progress,
) -> Result<Clustering> {
    let n = dataset.len();
    if config.k == 0 || config.k > n {
        return Err(Error::Invalid(format!(
            "K = {} must be between 1 and the number of samples ({n}) in {}",
            config.k, dataset.name
        )));
    }
    if let Algorithm::Random = config.algorithm {
        return Ok(Clustering {
            assignment: kmeans::random_partition(n, config.k, config.seed)?,
            centroids: vec![],
            feature_dim: 0,
            pca: None,
            inertia: None,
        });
    }
    progress.begin(&format!("features ({})", config.features), 0);
    let f = features::compute(dataset, &config.features, config.distance)?;
    progress.finish();
    progress.begin(&format!("k-means, K = {}", config.k), 0);
    let r = match &config.algorithm {
        Algorithm::Kmeans {
            max_iter,
            n_init,
            batch_size,
            balanced,
        } => {
            let cfg = KMeansConfig {
                max_iter: *max_iter,
                n_init: *n_init,
                batch_size: *batch_size,
                balanced: *balanced,
                ..KMeansConfig::new(config.k, config.seed)
            };
            kmeans::kmeans(&f.data, f.dim, None, &cfg)?
        }
        Algorithm::TwoStage {
            fine,
            subsample,
            max_iter,
        } => {
            let cfg = KMeansConfig {
                max_iter: *max_iter,
                ..KMeansConfig::new(config.k, config.seed)
            };
            kmeans::two_stage(&f.data, f.dim, *fine, *subsample, &cfg)?
        }
        Algorithm::Random => unreachable!("handled above"),
    };
    progress.finish();
    Ok(Clustering {
        assignment: r.assignment,
        centroids: r.centroids,
        feature_dim: f.dim,
        pca: f.pca,
        inertia: Some(r.inertia),
    })
}

pub(super) fn fingerprint(info: &DatasetInfo, config: &PartitionConfig, assignment: &[u32]) -> String {
    let mut bytes = Vec::with_capacity(assignment.len() * 4 + 256);
    bytes.extend(info.fingerprint.as_bytes());
    bytes.extend(serde_json::to_vec(config).expect("config serialises"));
    for a in assignment {
        bytes.extend(a.to_le_bytes());
    }
    sha256_hex(&bytes)
}

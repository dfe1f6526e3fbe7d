//! Evaluating generated images against real ones, all in the committed classifier's feature space
//! (pixels for the memorisation check):
//! - FD against the real test set's statistics (cached per classifier and data);
//! - improved precision / recall (k = 3) against a seeded real subset of the same size;
//! - the histogram of predicted classes, and its total-variation distance to the real one;
//! - the mean distance from each sample to its nearest training image (per-pixel RMS).
//!
//! `floor` evaluates real training images exactly like samples: the numbers a perfect generator
//! would get at the same N (FD is biased upwards at small N, so compare against it).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use ddm_core::host::{HostTensor, TensorFile, write_tensors};
use ddm_datasets::Dataset;
use rand::SeedableRng;
use rand::seq::index::sample as sample_indices;
use serde::{Deserialize, Serialize};

use crate::classifier::FeatureNet;
use crate::fd::{Gaussian, frechet_distance};
use crate::knn;

/// k of the k-NN manifolds (Kynkäänniemi et al. use 3).
pub const PR_K: usize = 3;

/// A real image set in feature space.
pub struct RealSet {
    pub name: String,
    pub features: Vec<f32>,
    pub gaussian: Gaussian,
    /// Fraction of the set per predicted class.
    pub class_histogram: Vec<f64>,
}

fn histogram(pred: &[u32], classes: usize) -> Vec<f64> {
    let mut h = vec![0f64; classes];
    for &p in pred {
        h[p as usize] += 1.0;
    }
    h.iter_mut().for_each(|v| *v /= pred.len().max(1) as f64);
    h
}

fn cache_path(net: &FeatureNet, data: &Dataset) -> PathBuf {
    ddm_core::env::cache_dir().join("eval").join(format!(
        "reference-{}-{}.safetensors",
        &net.sha256[..16],
        &data.fingerprint()[..16]
    ))
}

impl RealSet {
    /// The statistics of `data` in `net`'s features; read from ddm's cache (`$DDM_CACHE/eval/`,
    /// keyed by the classifier's and the data's hashes) when computed before.
    pub fn of(net: &FeatureNet, data: &Dataset) -> anyhow::Result<Self> {
        let d = net.feature_dim();
        let c = net.classes();
        let path = cache_path(net, data);
        if path.exists() {
            let f = TensorFile::read(&path)?;
            let features = f.f32("features")?;
            let hist = f.f32("class_histogram")?;
            if features.shape == vec![data.len(), d] && hist.shape == vec![c] {
                return Ok(Self {
                    name: data.name.clone(),
                    gaussian: Gaussian::fit(&features.data, data.len(), d),
                    class_histogram: hist.data.iter().map(|&v| v as f64).collect(),
                    features: features.data,
                });
            }
            tracing::warn!(
                "ignoring the cached statistics {} (unexpected shapes)",
                path.display()
            );
        }
        let all: Vec<usize> = (0..data.len()).collect();
        let x = data.gather(&all);
        let features = net.features(&x)?;
        let class_histogram = histogram(&net.predict(&x)?, c);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        write_tensors(
            &path,
            &BTreeMap::from([
                (
                    "features".to_string(),
                    HostTensor::new(vec![data.len(), d], features.clone()),
                ),
                (
                    "class_histogram".to_string(),
                    HostTensor::new(vec![c], class_histogram.iter().map(|&v| v as f32).collect()),
                ),
            ]),
            &BTreeMap::new(),
        )?;
        Ok(Self {
            name: data.name.clone(),
            gaussian: Gaussian::fit(&features, data.len(), d),
            features,
            class_histogram,
        })
    }
}

/// What `ddm eval` reports for one set of images.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageReport {
    pub n: usize,
    /// Fréchet distance to the reference set, in the classifier's features.
    pub fd: f64,
    pub precision: f64,
    pub recall: f64,
    /// Fraction of samples per predicted class.
    pub class_histogram: Vec<f64>,
    /// Total-variation distance between that histogram and the reference set's.
    pub class_tv: f64,
    /// Mean distance to the nearest training image, as per-pixel RMS in the data range.
    pub nn_train_rms: f64,
}

/// Everything needed to evaluate image sets: the classifier, the real reference (test) set and
/// the training set.
pub struct ImageEval {
    pub net: FeatureNet,
    pub reference: RealSet,
    pub reference_data: Dataset,
    pub train: Dataset,
    /// The training images in the data range, `[N, X]` (for nearest-neighbour distances).
    train_pixels: Vec<f32>,
}

impl ImageEval {
    pub fn new(net: FeatureNet, reference_data: Dataset, train: Dataset) -> anyhow::Result<Self> {
        for d in [&reference_data, &train] {
            if d.sample_size() != net.input_dim() {
                bail!(
                    "{} has samples of shape {:?}, the classifier takes {:?}",
                    d.name,
                    d.shape,
                    net.meta.data.shape
                );
            }
        }
        let all: Vec<usize> = (0..train.len()).collect();
        Ok(Self {
            reference: RealSet::of(&net, &reference_data)?,
            net,
            reference_data,
            train_pixels: train.gather(&all),
            train,
        })
    }

    /// Evaluate `samples` (`[N, X]` in the data range). `seed` picks the real subset that
    /// precision and recall compare against (same seed and N: same subset).
    pub fn evaluate(&self, samples: &[f32], seed: u64) -> anyhow::Result<ImageReport> {
        let x_dim = self.net.input_dim();
        let n = samples.len() / x_dim;
        if n < PR_K + 2 || samples.len() != n * x_dim {
            bail!(
                "need at least {} samples of {x_dim} values, got {} values",
                PR_K + 2,
                samples.len()
            );
        }
        let d = self.net.feature_dim();
        let features = self.net.features(samples)?;
        let fd = frechet_distance(&Gaussian::fit(&features, n, d), &self.reference.gaussian);
        let real = self.reference_subset(n, seed);
        let pr = knn::precision_recall(&real, &features, d, PR_K);
        let class_histogram = histogram(&self.net.predict(samples)?, self.net.classes());
        let class_tv = 0.5
            * class_histogram
                .iter()
                .zip(&self.reference.class_histogram)
                .map(|(a, b)| (a - b).abs())
                .sum::<f64>();
        let [lo, hi] = self.net.meta.data.range;
        let clamped: Vec<f32> = samples.iter().map(|v| v.clamp(lo, hi)).collect();
        let nn = knn::nearest_distances(&clamped, &self.train_pixels, x_dim);
        let nn_train_rms = nn.iter().map(|&v| v as f64).sum::<f64>() / n as f64 / (x_dim as f64).sqrt();
        Ok(ImageReport {
            n,
            fd,
            precision: pr.precision,
            recall: pr.recall,
            class_histogram,
            class_tv,
            nn_train_rms,
        })
    }

    fn reference_subset(&self, n: usize, seed: u64) -> Vec<f32> {
        let d = self.net.feature_dim();
        let total = self.reference_data.len();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0x7e57);
        let idx = sample_indices(&mut rng, total, n.min(total));
        let mut out = Vec::with_capacity(n * d);
        for i in idx.iter() {
            out.extend_from_slice(&self.reference.features[i * d..(i + 1) * d]);
        }
        out
    }

    /// The real-vs-real floor at N: N random training images evaluated as if they were samples,
    /// except the nearest-training-neighbour distance, which is taken for N test images (a
    /// training image's own distance would be 0).
    pub fn floor(&self, n: usize, seed: u64) -> anyhow::Result<ImageReport> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0xf100);
        let idx: Vec<usize> = sample_indices(&mut rng, self.train.len(), n.min(self.train.len())).into_vec();
        let mut r = self.evaluate(&self.train.gather(&idx), seed)?;
        let test_idx: Vec<usize> = sample_indices(
            &mut rng,
            self.reference_data.len(),
            n.min(self.reference_data.len()),
        )
        .into_vec();
        let x_dim = self.net.input_dim();
        let nn = knn::nearest_distances(&self.reference_data.gather(&test_idx), &self.train_pixels, x_dim);
        r.nn_train_rms = nn.iter().map(|&v| v as f64).sum::<f64>() / nn.len() as f64 / (x_dim as f64).sqrt();
        Ok(r)
    }
}

/// One line per metric, for the terminal.
pub fn format_report(name: &str, r: &ImageReport, class_names: Option<&[String]>) -> String {
    let mut s = format!(
        "{name}: N = {}  FD {:.3}  precision {:.3}  recall {:.3}  class TV {:.3}  nn-train RMS {:.4}\n  classes:",
        r.n, r.fd, r.precision, r.recall, r.class_tv, r.nn_train_rms
    );
    for (i, f) in r.class_histogram.iter().enumerate() {
        let label = class_names
            .and_then(|c| c.get(i))
            .cloned()
            .unwrap_or_else(|| i.to_string());
        s.push_str(&format!(" {label} {:.0}%", 100.0 * f));
    }
    s.push('\n');
    s
}

/// The samples of a `ddm sample` output (`x0`) or any safetensors with `x`, flattened to [N, X].
pub fn read_samples(path: &Path) -> anyhow::Result<HostTensor> {
    let f = TensorFile::read(path)?;
    let name = ["x0", "x"]
        .into_iter()
        .find(|n| f.contains(n))
        .with_context(|| format!("{}: no tensor named x0 or x", path.display()))?;
    let t = f.f32(name)?;
    if t.shape.len() < 2 {
        bail!(
            "{}: `{name}` has shape {:?}; expected [N, ...]",
            path.display(),
            t.shape
        );
    }
    let n = t.shape[0];
    Ok(HostTensor::new(vec![n, t.numel() / n], t.data))
}

//! Synthetic Gaussian mixtures from a small JSON spec, sampled with a seed. The spec travels with
//! the data (in `Dataset::mixture`, partition.json and shard headers), so later stages can compute
//! the exact posterior and velocity (`ddm_core::gmm`).
//!
//! Spec: `{"weights": [0.5, 0.5], "means": [[-2, 0], [2, 0]], "vars": [[0.1, 0.1], [0.1, 0.1]],
//! "n": 10000, "seed": 0}` (diagonal covariances; `n` and `seed` optional).

use std::path::PathBuf;

use ddm_core::gmm::GaussianMixture;
use rand::SeedableRng;
use serde::Deserialize;

use crate::dataset::{Dataset, Source, Values};
use crate::error::{Error, Result};

#[derive(Debug, Clone, Deserialize)]
pub struct MixtureSpec {
    #[serde(flatten)]
    pub mixture: GaussianMixture,
    #[serde(default = "default_n")]
    pub n: usize,
    #[serde(default)]
    pub seed: u64,
}

/// The most values (n x d) a mixture spec may ask for: 1 GiB of f32.
pub const MAX_VALUES: usize = 1 << 28;

fn default_n() -> usize {
    10_000
}

impl MixtureSpec {
    /// Read and validate a spec file (JSON).
    pub fn read(path: &std::path::Path) -> Result<MixtureSpec> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let spec: MixtureSpec =
            serde_json::from_str(&text).map_err(|e| Error::bad(path, format!("not a mixture spec: {e}")))?;
        spec.validate().map_err(|e| Error::bad(path, e))?;
        Ok(spec)
    }

    pub fn validate(&self) -> std::result::Result<(), String> {
        let m = &self.mixture;
        let k = m.weights.len();
        if k == 0 || m.means.len() != k || m.vars.len() != k {
            return Err(format!(
                "weights, means and vars must have the same number of components (got {k}, {}, {})",
                m.means.len(),
                m.vars.len()
            ));
        }
        let d = m.means[0].len();
        if d == 0 || m.means.iter().chain(&m.vars).any(|v| v.len() != d) {
            return Err("every mean and variance needs the same, non-zero dimension".into());
        }
        if m.weights.iter().any(|&w| !(w.is_finite() && w > 0.0))
            || m.vars.iter().flatten().any(|&v| !(v.is_finite() && v > 0.0))
        {
            return Err("weights and variances must be positive, finite numbers".into());
        }
        if m.means.iter().flatten().any(|v| !v.is_finite()) {
            return Err("means must be finite numbers".into());
        }
        // The samples are drawn into memory: n x d values.
        if self.n == 0 || self.n.saturating_mul(d) > MAX_VALUES {
            return Err(format!(
                "n = {} samples of {d} values: n must be at least 1 and n x d at most {MAX_VALUES}",
                self.n
            ));
        }
        if ((m.weights.iter().sum::<f64>()) - 1.0).abs() > 1e-6 {
            return Err(format!("weights sum to {}, not 1", m.weights.iter().sum::<f64>()));
        }
        Ok(())
    }

    pub fn dataset(&self, name: String) -> Dataset {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(self.seed);
        let (x, ks) = self.mixture.sample(self.n, &mut rng);
        Dataset {
            name,
            shape: vec![self.mixture.dim()],
            values: Values::F32(x.data),
            labels: Some(ks.into_iter().map(|k| k as u32).collect()),
            num_classes: Some(self.mixture.k()),
            class_names: None,
            mixture: Some(self.mixture.clone()),
            latent: None,
            text: None,
            cond: None,
            tokens: None,
        }
    }
}

/// A Gaussian mixture described by a JSON spec file.
pub struct MixtureFile {
    pub path: PathBuf,
}

impl Source for MixtureFile {
    fn describe(&self) -> String {
        format!("gaussian mixture ({})", self.path.display())
    }

    fn load(&self) -> Result<Dataset> {
        let spec = MixtureSpec::read(&self.path)?;
        Ok(spec.dataset(format!("gmm:{}", self.path.display())))
    }
}

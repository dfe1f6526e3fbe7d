//! `Dataset`: samples in memory, whatever source they came from, and the `Source` trait that every
//! loader implements (IDX, embedded Fashion-MNIST, CIFAR-10, image folders, safetensors tensors,
//! Gaussian mixtures). Trainer and router only ever see a `Dataset` (usually one island's shard).
//!
//! Images are kept as `u8` and scaled to [-1, 1] when a batch is gathered (`x / 127.5 - 1`);
//! vector data is kept as `f32` as given.

use ddm_core::clip::TextSpace;
use ddm_core::digest::hex;
use ddm_core::gmm::GaussianMixture;
use ddm_core::host::HostTensor;
use ddm_core::vae::LatentSpace;
use sha2::{Digest, Sha256};

use crate::error::Result;

pub use ddm_core::partition::{DatasetInfo, MAX_SAMPLE_VALUES, check_sample_shape};

/// Sample values: images as bytes, anything else as floats.
#[derive(Debug, Clone, PartialEq)]
pub enum Values {
    U8(Vec<u8>),
    F32(Vec<f32>),
}

/// Per-sample token sequences (a caption's token states): embeddings `[N, L, Dt]` and their mask
/// `[N, L]` (1: a token, 0: padding).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenSequences {
    pub embeddings: HostTensor,
    pub mask: HostTensor,
}

impl TokenSequences {
    /// The sequences as tensors on `device`.
    pub fn to_tensors(&self, device: &ddm_core::burn::prelude::Device) -> ddm_core::condition::Tokens {
        ddm_core::condition::Tokens {
            embeddings: self.embeddings.to_tensor::<3>(device),
            mask: self.mask.to_tensor::<2>(device),
        }
    }

    /// The sequences of `indices`.
    pub fn gather(&self, indices: &[usize]) -> Self {
        Self {
            embeddings: gather_rows(&self.embeddings, indices),
            mask: gather_rows(&self.mask, indices),
        }
    }

    /// `c_tokens` `[n, L, Dt]` and `c_mask` `[n, L]` of a tensors file (`path`, named in errors),
    /// if it has them: finite, the mask of zeros and ones.
    pub fn read(f: &ddm_core::host::TensorFile, path: &std::path::Path, n: usize) -> Result<Option<Self>> {
        if !f.contains("c_tokens") {
            return Ok(None);
        }
        let bad = |m: String| Err(crate::error::Error::bad(path, m));
        let (embeddings, mask) = (f.f32("c_tokens")?, f.f32("c_mask")?);
        let s = &embeddings.shape;
        if s.len() != 3 || s[0] != n || s[1] == 0 || s[2] == 0 {
            return bad(format!(
                "`c_tokens` has shape {s:?}; expected [{n}, L, Dt] (one token sequence per sample)"
            ));
        }
        if mask.shape != [n, s[1]] {
            return bad(format!(
                "`c_mask` has shape {:?}; expected [{n}, {}]",
                mask.shape, s[1]
            ));
        }
        if embeddings.data.iter().any(|v| !v.is_finite()) {
            return bad("`c_tokens` has non-finite values".into());
        }
        if let Some(v) = mask.data.iter().find(|v| **v != 0.0 && **v != 1.0) {
            return bad(format!("`c_mask` holds {v}; expected 1 (a token) or 0 (padding)"));
        }
        Ok(Some(Self { embeddings, mask }))
    }

    /// Width Dt of a token's embedding.
    pub fn dim(&self) -> usize {
        self.embeddings.shape[2]
    }

    /// The sequence length L.
    pub fn length(&self) -> usize {
        self.embeddings.shape[1]
    }
}

/// Rows `indices` of a `[N, ...]` tensor.
fn gather_rows(t: &HostTensor, indices: &[usize]) -> HostTensor {
    let per: usize = t.shape[1..].iter().product();
    let data = indices
        .iter()
        .flat_map(|&i| t.data[i * per..(i + 1) * per].iter().copied())
        .collect();
    let mut shape = t.shape.clone();
    shape[0] = indices.len();
    HostTensor::new(shape, data)
}

/// Samples in memory.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub name: String,
    /// Per-sample shape.
    pub shape: Vec<usize>,
    pub values: Values,
    /// Labels (class ids), if the source has them.
    pub labels: Option<Vec<u32>>,
    pub num_classes: Option<usize>,
    pub class_names: Option<Vec<String>>,
    pub mixture: Option<GaussianMixture>,
    /// Per-sample conditioning vectors `c` `[N, Dc]` (a `tensors:` file's `c`), if any: what a
    /// router conditioned on vectors reads.
    pub cond: Option<HostTensor>,
    /// Per-sample token sequences (a `tensors:` file's `c_tokens` and `c_mask`), if any: what a
    /// PixArt reads by cross-attention.
    pub tokens: Option<TokenSequences>,
    /// For VAE latents: the latent space they are in (a `tensors:` file written by `ddm encode`).
    pub latent: Option<LatentSpace>,
    /// For conditioning vectors from captions: the text space they are in (which encoder; a
    /// `tensors:` file written by `ddm encode-text`).
    pub text: Option<TextSpace>,
}

impl Dataset {
    pub fn len(&self) -> usize {
        let per = self.sample_size();
        match &self.values {
            Values::U8(v) => v.len() / per,
            Values::F32(v) => v.len() / per,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Values per sample.
    pub fn sample_size(&self) -> usize {
        self.shape.iter().product::<usize>().max(1)
    }

    pub fn range(&self) -> [f32; 2] {
        match &self.values {
            Values::U8(_) => [-1.0, 1.0],
            Values::F32(v) => {
                let (lo, hi) = v.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &x| {
                    (a.min(x), b.max(x))
                });
                if v.is_empty() { [0.0, 0.0] } else { [lo, hi] }
            }
        }
    }

    /// sha256 over shape, values and labels.
    pub fn fingerprint(&self) -> String {
        let mut h = Sha256::new();
        h.update(format!("{:?}", self.shape).as_bytes());
        match &self.values {
            Values::U8(v) => {
                h.update(b"u8");
                h.update(v);
            }
            Values::F32(v) => {
                h.update(b"f32");
                for x in v {
                    h.update(x.to_le_bytes());
                }
            }
        }
        if let Some(l) = &self.labels {
            h.update(b"labels");
            for x in l {
                h.update(x.to_le_bytes());
            }
        }
        if let Some(l) = &self.latent {
            h.update(format!("latent {l:?}").as_bytes());
        }
        if let Some(c) = &self.cond {
            h.update(format!("cond {:?}", c.shape).as_bytes());
            for x in &c.data {
                h.update(x.to_le_bytes());
            }
        }
        if let Some(t) = &self.tokens {
            h.update(format!("tokens {:?}", t.embeddings.shape).as_bytes());
            for x in t.embeddings.data.iter().chain(&t.mask.data) {
                h.update(x.to_le_bytes());
            }
        }
        hex(&h.finalize())
    }

    pub fn info(&self) -> DatasetInfo {
        DatasetInfo {
            name: self.name.clone(),
            fingerprint: self.fingerprint(),
            len: self.len(),
            shape: self.shape.clone(),
            range: self.range(),
            dtype: match self.values {
                Values::U8(_) => "u8".into(),
                Values::F32(_) => "f32".into(),
            },
            num_classes: self.num_classes,
            class_names: self.class_names.clone(),
            mixture: self.mixture.clone(),
            latent: self.latent.clone(),
            text: self.text.clone(),
        }
    }

    /// Samples `indices` scaled to the models' range, row-major `[indices.len(), ...]`.
    pub fn gather(&self, indices: &[usize]) -> Vec<f32> {
        let per = self.sample_size();
        let mut out = Vec::with_capacity(indices.len() * per);
        for &i in indices {
            match &self.values {
                Values::U8(v) => {
                    out.extend(v[i * per..(i + 1) * per].iter().map(|&b| b as f32 / 127.5 - 1.0))
                }
                Values::F32(v) => out.extend_from_slice(&v[i * per..(i + 1) * per]),
            }
        }
        out
    }

    /// Count, mean and diagonal variance of every sample, and the count of each class for
    /// labelled data (what an island publishes for the analytic router), read in pieces of 4096
    /// samples.
    pub fn cluster_stats(&self) -> ddm_core::stats::ClusterStats {
        let (n, d) = (self.len(), self.sample_size());
        let mut acc = ddm_core::stats::Accumulator::new(d);
        for piece in (0..n).collect::<Vec<_>>().chunks(4096) {
            self.gather(piece).chunks(d).for_each(|row| acc.add(row));
        }
        let mut stats = acc.finish();
        if let Some(c) = &self.cond {
            let dc = c.shape[1];
            let c = ddm_core::stats::ClusterStats::of_rows(dc, c.data.chunks(dc));
            stats.condition = Some(ddm_core::stats::Moments {
                mean: c.mean,
                var: c.var,
            });
        }
        if let (Some(labels), Some(classes)) = (&self.labels, self.num_classes) {
            let mut counts = vec![0usize; classes];
            labels.iter().for_each(|&l| counts[l as usize] += 1);
            stats.label_counts = Some(counts);
        }
        stats
    }

    /// The conditioning vectors of `indices` `[indices.len(), Dc]`, if any.
    pub fn gather_cond(&self, indices: &[usize]) -> Option<HostTensor> {
        self.cond.as_ref().map(|c| gather_rows(c, indices))
    }

    /// The token sequences of `indices`, if any.
    pub fn gather_tokens(&self, indices: &[usize]) -> Option<TokenSequences> {
        self.tokens.as_ref().map(|t| t.gather(indices))
    }

    /// The labels of `indices`, if any.
    pub fn gather_labels(&self, indices: &[usize]) -> Option<Vec<u32>> {
        self.labels
            .as_ref()
            .map(|l| indices.iter().map(|&i| l[i]).collect())
    }

    /// The samples of `parts`, in order, as one dataset named `name`. The parts must share shape
    /// and value type (the shards of one partition do); labels are kept only if every part has them.
    pub fn concat(parts: Vec<Dataset>, name: String) -> Result<Dataset> {
        let mut it = parts.into_iter();
        let mut all = it
            .next()
            .ok_or_else(|| crate::error::Error::Invalid(format!("{name}: nothing to concatenate")))?;
        for p in it {
            if p.shape != all.shape {
                return Err(crate::error::Error::Invalid(format!(
                    "{name}: samples of shape {:?} ({}) and {:?} ({}) cannot be one dataset",
                    all.shape, all.name, p.shape, p.name
                )));
            }
            match (&mut all.values, p.values) {
                (Values::U8(a), Values::U8(b)) => a.extend(b),
                (Values::F32(a), Values::F32(b)) => a.extend(b),
                _ => {
                    return Err(crate::error::Error::Invalid(format!(
                        "{name}: u8 and f32 samples cannot be one dataset ({} and {})",
                        all.name, p.name
                    )));
                }
            }
            all.labels = match (all.labels.take(), p.labels) {
                (Some(mut a), Some(b)) => {
                    a.extend(b);
                    Some(a)
                }
                _ => None,
            };
            all.cond = match (all.cond.take(), p.cond) {
                (Some(mut a), Some(b)) if a.shape[1] == b.shape[1] => {
                    a.shape[0] += b.shape[0];
                    a.data.extend(b.data);
                    Some(a)
                }
                _ => None,
            };
            all.tokens = match (all.tokens.take(), p.tokens) {
                (Some(mut a), Some(b)) if a.embeddings.shape[1..] == b.embeddings.shape[1..] => {
                    a.embeddings.shape[0] += b.embeddings.shape[0];
                    a.embeddings.data.extend(b.embeddings.data);
                    a.mask.shape[0] += b.mask.shape[0];
                    a.mask.data.extend(b.mask.data);
                    Some(a)
                }
                _ => None,
            };
        }
        all.name = name;
        Ok(all)
    }

    /// A new dataset of the samples at `indices` (in that order).
    pub fn subset(&self, indices: &[usize]) -> Dataset {
        let per = self.sample_size();
        let values = match &self.values {
            Values::U8(v) => Values::U8(
                indices
                    .iter()
                    .flat_map(|&i| v[i * per..(i + 1) * per].iter().copied())
                    .collect(),
            ),
            Values::F32(v) => Values::F32(
                indices
                    .iter()
                    .flat_map(|&i| v[i * per..(i + 1) * per].iter().copied())
                    .collect(),
            ),
        };
        Dataset {
            name: self.name.clone(),
            shape: self.shape.clone(),
            values,
            labels: self.gather_labels(indices),
            num_classes: self.num_classes,
            class_names: self.class_names.clone(),
            mixture: self.mixture.clone(),
            cond: self.gather_cond(indices),
            tokens: self.gather_tokens(indices),
            latent: self.latent.clone(),
            text: self.text.clone(),
        }
    }

    /// The raw `u8` bytes of sample `i` (images only).
    pub fn image_bytes(&self, i: usize) -> Option<&[u8]> {
        let per = self.sample_size();
        match &self.values {
            Values::U8(v) => Some(&v[i * per..(i + 1) * per]),
            Values::F32(_) => None,
        }
    }
}

/// A place samples come from. `ddm --data` strings parse into one (see [`crate::source`]).
pub trait Source {
    /// A one-line description for progress messages and errors.
    fn describe(&self) -> String;
    /// Read all samples.
    fn load(&self) -> Result<Dataset>;
    /// The captions the source carries, one per sample in `load`'s order, if it has them (an
    /// image folder's `captions.jsonl` or `NAME.txt` files).
    fn captions(&self) -> Result<Option<Vec<String>>> {
        Ok(None)
    }
}

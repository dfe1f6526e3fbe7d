//! Building a model's parameters, either freshly initialised or from a PyTorch-named state dict.
//!
//! Each model has a single `build(config, &mut impl ParamSource)` that names every parameter once,
//! in PyTorch DiT vocabulary (`blocks.3.attn.qkv`, ...). [`RandomInit`] fills them as the reference
//! initialises them; [`StateLoader`] takes them from a file, checking every name and shape.
//! The naming table for export is the model's `state_dict`, next to its `build`; a round-trip test
//! covers that the two agree.
//!
//! **The one renaming rule** between PyTorch and burn: a Linear weight is `[out, in]` in PyTorch
//! and in our files, `[in, out]` in burn; it is transposed at this boundary. Conv, embedding and
//! buffer tensors keep their layout.

use std::collections::BTreeMap;
use std::path::PathBuf;

use burn::module::{Param, ParamId};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Embedding, EmbeddingConfig, Linear};
use burn::prelude::*;
use rand::SeedableRng;
use rand_distr::{Distribution as _, StandardNormal, Uniform};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::host::HostTensor;

/// How a freshly built parameter is initialised (ignored when loading).
#[derive(Debug, Clone, Copy)]
pub enum Init {
    /// Xavier/Glorot uniform: U(-a, a), a = sqrt(6 / (fan_in + fan_out)).
    Xavier,
    /// N(0, std^2).
    Normal(f64),
    /// Zeros (adaLN-Zero modulation and output layers).
    Zeros,
}

/// Where a model's parameters come from. Linear biases are zero when initialised.
pub trait ParamSource {
    fn device(&self) -> &Device;
    /// A Linear layer named `name` (`name.weight` `[d_out, d_in]`, `name.bias` `[d_out]`).
    fn linear(&mut self, name: &str, d_in: usize, d_out: usize, init: Init) -> Result<Linear>;
    /// A patch-embedding convolution (kernel = stride = `patch`): `name.weight` `[c_out, c_in, p, p]`.
    fn patch_conv(
        &mut self,
        name: &str,
        c_in: usize,
        c_out: usize,
        patch: usize,
        init: Init,
    ) -> Result<Conv2d>;
    /// An embedding table: `name.weight` `[n, d]`.
    fn embedding(&mut self, name: &str, n: usize, d: usize, init: Init) -> Result<Embedding>;
    /// A fixed (untrained) buffer such as `pos_embed`; `computed` is its value when initialising.
    fn buffer(&mut self, name: &str, computed: HostTensor) -> Result<HostTensor>;
}

/// A trainable parameter whose id is derived from its PyTorch name.
///
/// burn keys optimizer state by `ParamId`; ids that follow the name make a model rebuilt from a
/// file line up with the optimizer state saved beside it, which is what makes resuming exact.
pub fn named_param<const D: usize>(name: &str, value: Tensor<D>) -> Param<Tensor<D>> {
    let h = Sha256::digest(name.as_bytes());
    let id = ParamId::from(u64::from_le_bytes(
        h[..8].try_into().expect("sha256 has 32 bytes"),
    ));
    // `consume` keeps from_tensor's trainable flag; `from_mapped_value` sets the id.
    let (_, value, mapper) = Param::from_tensor(value).consume();
    Param::from_mapped_value(id, value, mapper)
}

fn linear_from(name: &str, w_out_in: &HostTensor, b: &HostTensor, device: &Device) -> Linear {
    Linear {
        weight: named_param(
            &format!("{name}.weight"),
            w_out_in.transpose2().to_tensor::<2>(device),
        ),
        bias: Some(named_param(&format!("{name}.bias"), b.to_tensor::<1>(device))),
    }
}

fn conv_from(name: &str, w: &HostTensor, b: &HostTensor, patch: usize, device: &Device) -> Conv2d {
    let (c_out, c_in) = (w.shape[0], w.shape[1]);
    let mut conv = Conv2dConfig::new([c_in, c_out], [patch, patch])
        .with_stride([patch, patch])
        .init(device);
    conv.weight = named_param(&format!("{name}.weight"), w.to_tensor::<4>(device));
    conv.bias = Some(named_param(&format!("{name}.bias"), b.to_tensor::<1>(device)));
    conv
}

fn embedding_from(name: &str, w: &HostTensor, device: &Device) -> Embedding {
    let mut emb = EmbeddingConfig::new(w.shape[0], w.shape[1]).init(device);
    emb.weight = named_param(&format!("{name}.weight"), w.to_tensor::<2>(device));
    emb
}

/// Fresh parameters from a seeded RNG on the host: the same seed gives the same model on every
/// backend.
pub struct RandomInit {
    rng: rand_chacha::ChaCha8Rng,
    device: Device,
}

impl RandomInit {
    pub fn new(seed: u64, device: &Device) -> Self {
        Self {
            rng: rand_chacha::ChaCha8Rng::seed_from_u64(seed),
            device: device.clone(),
        }
    }

    fn fill(&mut self, shape: Vec<usize>, fan_in: usize, fan_out: usize, init: Init) -> HostTensor {
        let n: usize = shape.iter().product();
        let data = match init {
            Init::Zeros => vec![0.0; n],
            Init::Normal(std) => (0..n)
                .map(|_| {
                    let z: f64 = StandardNormal.sample(&mut self.rng);
                    (std * z) as f32
                })
                .collect(),
            Init::Xavier => {
                let a = (6.0 / (fan_in + fan_out) as f64).sqrt() as f32;
                let u = Uniform::new_inclusive(-a, a).expect("xavier bound is finite and positive");
                (0..n).map(|_| u.sample(&mut self.rng)).collect()
            }
        };
        HostTensor::new(shape, data)
    }
}

impl ParamSource for RandomInit {
    fn device(&self) -> &Device {
        &self.device
    }

    fn linear(&mut self, name: &str, d_in: usize, d_out: usize, init: Init) -> Result<Linear> {
        let w = self.fill(vec![d_out, d_in], d_in, d_out, init);
        let b = HostTensor::new(vec![d_out], vec![0.0; d_out]);
        Ok(linear_from(name, &w, &b, &self.device))
    }

    fn patch_conv(
        &mut self,
        name: &str,
        c_in: usize,
        c_out: usize,
        patch: usize,
        init: Init,
    ) -> Result<Conv2d> {
        // DiT initialises the patch conv like a Linear over the flattened patch.
        let w = self.fill(vec![c_out, c_in, patch, patch], c_in * patch * patch, c_out, init);
        let b = HostTensor::new(vec![c_out], vec![0.0; c_out]);
        Ok(conv_from(name, &w, &b, patch, &self.device))
    }

    fn embedding(&mut self, name: &str, n: usize, d: usize, init: Init) -> Result<Embedding> {
        let w = self.fill(vec![n, d], n, d, init);
        Ok(embedding_from(name, &w, &self.device))
    }

    fn buffer(&mut self, _name: &str, computed: HostTensor) -> Result<HostTensor> {
        Ok(computed)
    }
}

/// Parameters taken from named tensors (a state dict), every name and shape checked.
/// Call [`StateLoader::finish`] after building to refuse tensors the model does not have.
pub struct StateLoader {
    origin: PathBuf,
    tensors: BTreeMap<String, HostTensor>,
    device: Device,
}

impl StateLoader {
    /// `origin` is the file the tensors came from, named in every error.
    pub fn new(origin: impl Into<PathBuf>, tensors: BTreeMap<String, HostTensor>, device: &Device) -> Self {
        Self {
            origin: origin.into(),
            tensors,
            device: device.clone(),
        }
    }

    fn take(&mut self, name: &str, expected: &[usize]) -> Result<HostTensor> {
        let t = self.tensors.remove(name).ok_or_else(|| Error::MissingTensor {
            path: self.origin.clone(),
            name: name.to_string(),
        })?;
        if t.shape != expected {
            return Err(Error::ShapeMismatch {
                path: self.origin.clone(),
                name: name.to_string(),
                expected: expected.to_vec(),
                actual: t.shape,
            });
        }
        Ok(t)
    }

    /// Refuse leftovers: tensors in the file that the model has no place for.
    pub fn finish(self, arch: &str) -> Result<()> {
        if self.tensors.is_empty() {
            return Ok(());
        }
        let mut names: Vec<_> = self.tensors.into_keys().collect();
        let more = names.len().saturating_sub(8);
        names.truncate(8);
        let mut names = names.join(", ");
        if more > 0 {
            names.push_str(&format!(" and {more} more"));
        }
        Err(Error::UnexpectedTensors {
            path: self.origin,
            arch: arch.to_string(),
            names,
        })
    }
}

impl ParamSource for StateLoader {
    fn device(&self) -> &Device {
        &self.device
    }

    fn linear(&mut self, name: &str, d_in: usize, d_out: usize, _init: Init) -> Result<Linear> {
        let w = self.take(&format!("{name}.weight"), &[d_out, d_in])?;
        let b = self.take(&format!("{name}.bias"), &[d_out])?;
        Ok(linear_from(name, &w, &b, &self.device))
    }

    fn patch_conv(
        &mut self,
        name: &str,
        c_in: usize,
        c_out: usize,
        patch: usize,
        _init: Init,
    ) -> Result<Conv2d> {
        let w = self.take(&format!("{name}.weight"), &[c_out, c_in, patch, patch])?;
        let b = self.take(&format!("{name}.bias"), &[c_out])?;
        Ok(conv_from(name, &w, &b, patch, &self.device))
    }

    fn embedding(&mut self, name: &str, n: usize, d: usize, _init: Init) -> Result<Embedding> {
        let w = self.take(&format!("{name}.weight"), &[n, d])?;
        Ok(embedding_from(name, &w, &self.device))
    }

    fn buffer(&mut self, name: &str, computed: HostTensor) -> Result<HostTensor> {
        self.take(name, &computed.shape)
    }
}

/// Collects a model's tensors under PyTorch names (the inverse of [`StateLoader`]).
#[derive(Default)]
pub struct StateDict(pub BTreeMap<String, HostTensor>);

impl StateDict {
    pub fn linear(&mut self, name: &str, l: &Linear) {
        let w = HostTensor::from_tensor(l.weight.val()).transpose2();
        self.0.insert(format!("{name}.weight"), w);
        if let Some(b) = &l.bias {
            self.0
                .insert(format!("{name}.bias"), HostTensor::from_tensor(b.val()));
        }
    }

    pub fn conv(&mut self, name: &str, c: &Conv2d) {
        self.0
            .insert(format!("{name}.weight"), HostTensor::from_tensor(c.weight.val()));
        if let Some(b) = &c.bias {
            self.0
                .insert(format!("{name}.bias"), HostTensor::from_tensor(b.val()));
        }
    }

    pub fn embedding(&mut self, name: &str, e: &Embedding) {
        self.0
            .insert(format!("{name}.weight"), HostTensor::from_tensor(e.weight.val()));
    }

    pub fn tensor<const D: usize>(&mut self, name: &str, t: &Tensor<D>) {
        self.0
            .insert(name.to_string(), HostTensor::from_tensor(t.clone()));
    }
}

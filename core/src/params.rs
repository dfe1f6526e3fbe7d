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
use burn::nn::{
    Embedding, EmbeddingConfig, GroupNorm, GroupNormConfig, LayerNorm, LayerNormConfig, Linear,
    PaddingConfig2d,
};
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
    /// PyTorch's default for Conv and Linear weights: U(-b, b), b = 1 / sqrt(fan_in).
    FanIn,
}

/// A convolution's geometry: square kernel, stride, and zero padding (top, left, bottom, right;
/// asymmetric for the VAE's downsampler).
#[derive(Debug, Clone, Copy)]
pub struct ConvSpec {
    pub c_in: usize,
    pub c_out: usize,
    pub kernel: usize,
    pub stride: usize,
    pub padding: [usize; 4],
}

impl ConvSpec {
    /// A `kernel x kernel` convolution, stride 1, padded to keep the size (odd kernels).
    pub fn same(c_in: usize, c_out: usize, kernel: usize) -> Self {
        let p = kernel / 2;
        Self {
            c_in,
            c_out,
            kernel,
            stride: 1,
            padding: [p; 4],
        }
    }
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
    /// A convolution `name.weight` `[c_out, c_in, k, k]`, `name.bias` `[c_out]` (zero when
    /// initialised).
    fn conv(&mut self, name: &str, spec: ConvSpec, init: Init) -> Result<Conv2d>;
    /// A GroupNorm with affine parameters `name.weight` (ones) and `name.bias` (zeros), `[channels]`.
    fn group_norm(&mut self, name: &str, groups: usize, channels: usize, eps: f64) -> Result<GroupNorm>;
    /// A LayerNorm with affine parameters `name.weight` (ones) and `name.bias` (zeros), `[d]`.
    fn layer_norm(&mut self, name: &str, d: usize, eps: f64) -> Result<LayerNorm>;
    /// An embedding table: `name.weight` `[n, d]`.
    fn embedding(&mut self, name: &str, n: usize, d: usize, init: Init) -> Result<Embedding>;
    /// A fixed (untrained) buffer such as `pos_embed`; `computed` is its value when initialising.
    fn buffer(&mut self, name: &str, computed: HostTensor) -> Result<HostTensor>;
    /// A trained table `name` `[rows, cols]` used as it is (PixArt's `scale_shift_table`).
    fn table(&mut self, name: &str, rows: usize, cols: usize, init: Init) -> Result<Param<Tensor<2>>>;
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
    let spec = ConvSpec {
        c_in: w.shape[1],
        c_out: w.shape[0],
        kernel: patch,
        stride: patch,
        padding: [0; 4],
    };
    conv_spec_from(name, spec, w, b, device)
}

fn conv_spec_from(name: &str, spec: ConvSpec, w: &HostTensor, b: &HostTensor, device: &Device) -> Conv2d {
    let [top, left, bottom, right] = spec.padding;
    let mut conv = Conv2dConfig::new([spec.c_in, spec.c_out], [spec.kernel, spec.kernel])
        .with_stride([spec.stride, spec.stride])
        .with_padding(PaddingConfig2d::Explicit(top, left, bottom, right))
        .init(device);
    conv.weight = named_param(&format!("{name}.weight"), w.to_tensor::<4>(device));
    conv.bias = Some(named_param(&format!("{name}.bias"), b.to_tensor::<1>(device)));
    conv
}

fn group_norm_from(
    name: &str,
    groups: usize,
    eps: f64,
    w: &HostTensor,
    b: &HostTensor,
    device: &Device,
) -> GroupNorm {
    let mut norm = GroupNormConfig::new(groups, w.shape[0])
        .with_epsilon(eps)
        .init(device);
    norm.gamma = Some(named_param(&format!("{name}.weight"), w.to_tensor::<1>(device)));
    norm.beta = Some(named_param(&format!("{name}.bias"), b.to_tensor::<1>(device)));
    norm
}

fn check_groups(name: &str, groups: usize, channels: usize) -> Result<()> {
    if groups == 0 || !channels.is_multiple_of(groups) {
        return Err(Error::InvalidConfig(format!(
            "{name}: {channels} channels cannot be split into {groups} groups"
        )));
    }
    Ok(())
}

fn layer_norm_from(name: &str, eps: f64, w: &HostTensor, b: &HostTensor, device: &Device) -> LayerNorm {
    let mut norm = LayerNormConfig::new(w.shape[0]).with_epsilon(eps).init(device);
    norm.gamma = named_param(&format!("{name}.weight"), w.to_tensor::<1>(device));
    norm.beta = Some(named_param(&format!("{name}.bias"), b.to_tensor::<1>(device)));
    norm
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
            Init::FanIn => {
                let a = (1.0 / fan_in.max(1) as f64).sqrt() as f32;
                let u = Uniform::new_inclusive(-a, a).expect("fan-in bound is finite and positive");
                (0..n).map(|_| u.sample(&mut self.rng)).collect()
            }
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

    fn conv(&mut self, name: &str, spec: ConvSpec, init: Init) -> Result<Conv2d> {
        let k2 = spec.kernel * spec.kernel;
        let w = self.fill(
            vec![spec.c_out, spec.c_in, spec.kernel, spec.kernel],
            spec.c_in * k2,
            spec.c_out * k2,
            init,
        );
        let b = HostTensor::new(vec![spec.c_out], vec![0.0; spec.c_out]);
        Ok(conv_spec_from(name, spec, &w, &b, &self.device))
    }

    fn group_norm(&mut self, name: &str, groups: usize, channels: usize, eps: f64) -> Result<GroupNorm> {
        check_groups(name, groups, channels)?;
        let w = HostTensor::new(vec![channels], vec![1.0; channels]);
        let b = HostTensor::new(vec![channels], vec![0.0; channels]);
        Ok(group_norm_from(name, groups, eps, &w, &b, &self.device))
    }

    fn layer_norm(&mut self, name: &str, d: usize, eps: f64) -> Result<LayerNorm> {
        let w = HostTensor::new(vec![d], vec![1.0; d]);
        let b = HostTensor::new(vec![d], vec![0.0; d]);
        Ok(layer_norm_from(name, eps, &w, &b, &self.device))
    }

    fn embedding(&mut self, name: &str, n: usize, d: usize, init: Init) -> Result<Embedding> {
        let w = self.fill(vec![n, d], n, d, init);
        Ok(embedding_from(name, &w, &self.device))
    }

    fn table(&mut self, name: &str, rows: usize, cols: usize, init: Init) -> Result<Param<Tensor<2>>> {
        let w = self.fill(vec![rows, cols], cols, rows, init);
        Ok(named_param(name, w.to_tensor::<2>(&self.device)))
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

    fn conv(&mut self, name: &str, spec: ConvSpec, _init: Init) -> Result<Conv2d> {
        let k = spec.kernel;
        let w = self.take(&format!("{name}.weight"), &[spec.c_out, spec.c_in, k, k])?;
        let b = self.take(&format!("{name}.bias"), &[spec.c_out])?;
        Ok(conv_spec_from(name, spec, &w, &b, &self.device))
    }

    fn group_norm(&mut self, name: &str, groups: usize, channels: usize, eps: f64) -> Result<GroupNorm> {
        check_groups(name, groups, channels)?;
        let w = self.take(&format!("{name}.weight"), &[channels])?;
        let b = self.take(&format!("{name}.bias"), &[channels])?;
        Ok(group_norm_from(name, groups, eps, &w, &b, &self.device))
    }

    fn layer_norm(&mut self, name: &str, d: usize, eps: f64) -> Result<LayerNorm> {
        let w = self.take(&format!("{name}.weight"), &[d])?;
        let b = self.take(&format!("{name}.bias"), &[d])?;
        Ok(layer_norm_from(name, eps, &w, &b, &self.device))
    }

    fn embedding(&mut self, name: &str, n: usize, d: usize, _init: Init) -> Result<Embedding> {
        let w = self.take(&format!("{name}.weight"), &[n, d])?;
        Ok(embedding_from(name, &w, &self.device))
    }

    fn buffer(&mut self, name: &str, computed: HostTensor) -> Result<HostTensor> {
        self.take(name, &computed.shape)
    }

    fn table(&mut self, name: &str, rows: usize, cols: usize, _init: Init) -> Result<Param<Tensor<2>>> {
        let w = self.take(name, &[rows, cols])?;
        Ok(named_param(name, w.to_tensor::<2>(&self.device)))
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

    pub fn group_norm(&mut self, name: &str, g: &GroupNorm) {
        for (suffix, p) in [("weight", &g.gamma), ("bias", &g.beta)] {
            if let Some(p) = p {
                self.0
                    .insert(format!("{name}.{suffix}"), HostTensor::from_tensor(p.val()));
            }
        }
    }

    pub fn layer_norm(&mut self, name: &str, n: &LayerNorm) {
        self.0
            .insert(format!("{name}.weight"), HostTensor::from_tensor(n.gamma.val()));
        if let Some(b) = &n.beta {
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

//! `Model`: whatever network a checkpoint holds (a DiT or an MLP), seen as a velocity field.
//!
//! Models take data of any rank `[N, ...]` and reshape it to what the network needs (DiT:
//! `[N, C, S, S]`, MLP: `[N, X]`), so samplers and the ensemble never care which one it is.

use std::collections::BTreeMap;

use burn::prelude::*;
use serde::{Deserialize, Serialize};

use crate::clip::ClipTextConfig;
use crate::dit::{DiT, DiTConfig};
use crate::error::{Error, Result};
use crate::flow::{Condition, VelocityError, VelocityField};
use crate::host::HostTensor;
use crate::mlp::{Mlp, MlpConfig};
use crate::params::{ParamSource, RandomInit, StateLoader};
use crate::pixart::{PixArt, PixArtConfig};
use crate::vae::AutoencoderKLConfig;

/// A model's architecture and hyper-parameters. Serialised with an `arch` tag (`"dit"`, `"mlp"`,
/// `"vae"`), as in checkpoint metadata and `ddm import --config`.
///
/// `Vae` is the autoencoder latents come from and `ClipText` the text encoder captions go through
/// (`"clip-text"`): a checkpoint can hold them, but they are not velocity fields
/// ([`ModelConfig::build`] refuses them; [`AutoencoderKLConfig::build`] and
/// [`ClipTextConfig::build`] build them).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "arch", rename_all = "lowercase")]
pub enum ModelConfig {
    Dit(DiTConfig),
    Mlp(MlpConfig),
    /// PixArt-α's transformer: a DiT that reads the caption's tokens by cross-attention
    /// (`"pixart"`).
    #[serde(rename = "pixart")]
    PixArt(PixArtConfig),
    Vae(AutoencoderKLConfig),
    #[serde(rename = "clip-text")]
    ClipText(ClipTextConfig),
}

impl ModelConfig {
    /// The unconditional network called `name` for samples of `shape` (of the data `data_name`,
    /// named in errors): `mlp` (an MLP of `mlp_hidden` x `mlp_depth` over the flattened sample),
    /// or a DiT size (`DiT-T/4`, `DiT-S/2`, ...) for square images `[C, S, S]`. What `--model`
    /// means for experts, routers and classifiers alike.
    pub fn named(
        name: &str,
        data_name: &str,
        shape: &[usize],
        mlp_hidden: usize,
        mlp_depth: usize,
    ) -> Result<Self> {
        if name.eq_ignore_ascii_case("mlp") {
            let mut m = MlpConfig::new(shape.iter().product());
            (m.hidden_size, m.depth) = (mlp_hidden, mlp_depth);
            return Ok(ModelConfig::Mlp(m));
        }
        if shape.len() != 3 || shape[1] != shape[2] {
            return Err(Error::InvalidConfig(format!(
                "a DiT needs square images [C, S, S]; {data_name} has samples of shape {shape:?} (use --model mlp for vectors)"
            )));
        }
        if let Some(size) = name
            .strip_prefix("PixArt-")
            .or_else(|| name.strip_prefix("pixart-"))
        {
            return Ok(ModelConfig::PixArt(PixArtConfig::named(
                size, shape[1], shape[0],
            )?));
        }
        let mut dit = DiTConfig::named(name, shape[1], shape[0])?;
        dit.class_dropout_prob = 0.0;
        Ok(ModelConfig::Dit(dit))
    }

    /// This network conditioned on `classes` classes, with label dropout `dropout` (> 0 gives the
    /// null class classifier-free guidance needs).
    pub fn with_classes(self, classes: usize, dropout: f64) -> Result<Self> {
        match self {
            ModelConfig::Dit(mut c) => {
                c.num_classes = classes;
                c.class_dropout_prob = dropout;
                c.validate()?;
                Ok(ModelConfig::Dit(c))
            }
            ModelConfig::Mlp(mut c) => {
                c.num_classes = classes;
                c.class_dropout_prob = dropout;
                c.validate()?;
                Ok(ModelConfig::Mlp(c))
            }
            ModelConfig::PixArt(_) => Err(Error::InvalidConfig(
                "a PixArt reads captions (token sequences), not classes".into(),
            )),
            ModelConfig::Vae(_) | ModelConfig::ClipText(_) => Err(self.not_a_velocity_field()),
        }
    }

    /// This network also reading per-sample conditioning vectors of width `dim` (a caption's
    /// pooled text embedding) through its `c_embedder`, dropped to the zero vector with
    /// probability `dropout` in training (> 0 gives classifier-free guidance its null vector).
    pub fn with_condition_vectors(self, dim: usize, dropout: f64) -> Result<Self> {
        match self {
            ModelConfig::Dit(mut c) => {
                c.condition_dim = dim;
                c.class_dropout_prob = dropout;
                c.validate()?;
                Ok(ModelConfig::Dit(c))
            }
            ModelConfig::Mlp(mut c) => {
                c.condition_dim = dim;
                c.class_dropout_prob = dropout;
                c.validate()?;
                Ok(ModelConfig::Mlp(c))
            }
            ModelConfig::PixArt(_) => Err(Error::InvalidConfig(
                "a PixArt reads captions as token sequences, not pooled vectors".into(),
            )),
            ModelConfig::Vae(_) | ModelConfig::ClipText(_) => Err(self.not_a_velocity_field()),
        }
    }

    /// This PixArt reading token sequences of `length` tokens of width `dim` (the caption's
    /// token states), each replaced by the null sequence with probability `dropout` in training
    /// (> 0 gives classifier-free guidance its null caption).
    pub fn with_caption_tokens(self, dim: usize, length: usize, dropout: f64) -> Result<Self> {
        match self {
            ModelConfig::PixArt(mut c) => {
                c.caption_channels = dim;
                c.caption_length = Some(length);
                c.caption_dropout_prob = dropout;
                c.validate()?;
                Ok(ModelConfig::PixArt(c))
            }
            _ => Err(Error::InvalidConfig(format!(
                "a model of arch \"{}\" reads no token sequences (--model PixArt-<size>/<patch> does)",
                self.arch()
            ))),
        }
    }

    /// Width of the token embeddings (a caption's sequence) the network reads by
    /// cross-attention (0: none).
    pub fn token_dim(&self) -> usize {
        match self {
            ModelConfig::PixArt(c) => c.caption_channels,
            _ => 0,
        }
    }

    /// Width of the conditioning vectors the network reads (0: none).
    pub fn condition_dim(&self) -> usize {
        match self {
            ModelConfig::Dit(c) => c.condition_dim,
            ModelConfig::Mlp(c) => c.condition_dim,
            ModelConfig::PixArt(_) | ModelConfig::Vae(_) | ModelConfig::ClipText(_) => 0,
        }
    }

    /// The configuration is one ddm can build: consistent, and within sane sizes.
    pub fn validate(&self) -> Result<()> {
        match self {
            ModelConfig::Dit(c) => c.validate(),
            ModelConfig::Mlp(c) => c.validate(),
            ModelConfig::PixArt(c) => c.validate(),
            ModelConfig::Vae(c) => c.validate(),
            ModelConfig::ClipText(c) => c.validate(),
        }
    }

    /// A lower estimate of the activations one training sample keeps for the backward pass.
    pub fn activation_bytes_per_sample(&self) -> f64 {
        4.0 * match self {
            ModelConfig::Dit(c) => c.activation_floats_per_sample(),
            ModelConfig::Mlp(c) => c.activation_floats_per_sample(),
            ModelConfig::PixArt(c) => c.activation_floats_per_sample(),
            ModelConfig::Vae(c) => c.activation_floats_per_sample(),
            ModelConfig::ClipText(c) => c.activation_floats_per_sample(),
        }
    }

    /// Whether the network computes in bf16/f16 when its parameters are cast
    /// ([`crate::precision::cast`]): every tensor its forward makes follows their dtype. The
    /// velocity networks (DiT, MLP, PixArt), not the VAE or the text encoder.
    pub fn computes_in_half(&self) -> bool {
        matches!(
            self,
            ModelConfig::Dit(_) | ModelConfig::Mlp(_) | ModelConfig::PixArt(_)
        )
    }

    pub fn arch(&self) -> &'static str {
        match self {
            ModelConfig::Dit(_) => "dit",
            ModelConfig::Mlp(_) => "mlp",
            ModelConfig::PixArt(_) => "pixart",
            ModelConfig::Vae(_) => "vae",
            ModelConfig::ClipText(_) => "clip-text",
        }
    }

    /// The per-sample data shape the model reads and writes (`[C, S, S]` or `[X]`).
    pub fn data_shape(&self) -> Vec<usize> {
        match self {
            ModelConfig::Dit(c) => vec![c.in_channels, c.input_size, c.input_size],
            ModelConfig::Mlp(c) => vec![c.dim],
            ModelConfig::PixArt(c) => vec![c.in_channels, c.input_size, c.input_size],
            ModelConfig::Vae(c) => c.image_shape(),
            ModelConfig::ClipText(c) => c.data_shape(),
        }
    }

    /// Classes the model is conditioned on (0: unconditional). Ask this, not the variant: a new
    /// architecture that takes classes answers here and every caller follows.
    pub fn num_classes(&self) -> usize {
        match self {
            ModelConfig::Dit(c) => c.num_classes,
            ModelConfig::Mlp(c) => c.num_classes,
            ModelConfig::PixArt(_) | ModelConfig::Vae(_) | ModelConfig::ClipText(_) => 0,
        }
    }

    /// Whether the model was trained with label dropout, so it has a null class (id
    /// `num_classes`) for classifier-free guidance.
    pub fn has_null_class(&self) -> bool {
        match self {
            ModelConfig::Dit(c) => c.class_rows() > c.num_classes,
            ModelConfig::Mlp(c) => c.class_rows() > c.num_classes,
            ModelConfig::PixArt(_) | ModelConfig::Vae(_) | ModelConfig::ClipText(_) => false,
        }
    }

    /// Whether the model learnt a null condition for classifier-free guidance: it was trained
    /// with condition dropout (a class-conditional model has its null class; one that reads
    /// vectors saw the zero vector).
    pub fn has_null_condition(&self) -> bool {
        match self {
            ModelConfig::Dit(c) => c.class_dropout_prob > 0.0,
            ModelConfig::Mlp(c) => c.class_dropout_prob > 0.0,
            ModelConfig::PixArt(c) => c.caption_dropout_prob > 0.0 || c.null_caption_length.is_some(),
            ModelConfig::Vae(_) | ModelConfig::ClipText(_) => false,
        }
    }

    pub fn flops_per_sample(&self) -> f64 {
        match self {
            ModelConfig::Dit(c) => c.flops_per_sample(),
            ModelConfig::Mlp(c) => c.flops_per_sample(),
            ModelConfig::PixArt(c) => c.flops_per_sample(),
            ModelConfig::Vae(c) => c.flops_per_sample(),
            ModelConfig::ClipText(c) => c.flops_per_sample(),
        }
    }

    pub fn build(&self, src: &mut impl ParamSource) -> Result<Model> {
        Ok(match self {
            ModelConfig::Dit(c) => Model::Dit(c.build(src)?),
            ModelConfig::Mlp(c) => Model::Mlp(c.build(src)?),
            ModelConfig::PixArt(c) => Model::PixArt(c.build(src)?),
            ModelConfig::Vae(_) | ModelConfig::ClipText(_) => return Err(self.not_a_velocity_field()),
        })
    }

    /// A freshly initialised model (seeded, backend-independent).
    pub fn init(&self, seed: u64, device: &Device) -> Result<Model> {
        self.build(&mut RandomInit::new(seed, device))
    }

    /// A model from PyTorch-named tensors; every name and shape is checked, leftovers refused.
    /// `origin` (a file path) is named in errors.
    pub fn load(
        &self,
        tensors: BTreeMap<String, HostTensor>,
        origin: &std::path::Path,
        device: &Device,
    ) -> Result<Model> {
        let mut loader = StateLoader::new(origin, tensors, device);
        let model = self.build(&mut loader)?;
        loader.finish(self.arch())?;
        Ok(model)
    }
}

impl ModelConfig {
    fn not_a_velocity_field(&self) -> Error {
        let what = match self {
            ModelConfig::ClipText(_) => {
                "a text encoder (arch \"clip-text\") is not a velocity field: it encodes captions"
            }
            _ => "an autoencoder (arch \"vae\") is not a velocity field: it encodes and decodes latents",
        };
        Error::InvalidConfig(format!("{what}, it cannot be an expert, router or classifier"))
    }
}

/// A DiT or an MLP. (Models are few and long-lived, so the size gap between variants is moot.)
#[derive(Module, Debug)]
#[allow(clippy::large_enum_variant)]
pub enum Model {
    Dit(DiT),
    Mlp(Mlp),
    PixArt(PixArt),
}

impl Model {
    /// All tensors under their PyTorch names.
    pub fn state_dict(&self) -> BTreeMap<String, HostTensor> {
        match self {
            Model::Dit(m) => m.state_dict().0,
            Model::Mlp(m) => m.state_dict().0,
            Model::PixArt(m) => m.state_dict().0,
        }
    }

    /// The model's prediction for a batch of any rank `[N, ...]` whose per-sample size matches
    /// the model (velocity, or noise for an epsilon expert), given the batch's condition (the
    /// network reads the parts it was trained on: its class, its vector).
    pub fn predict<const D: usize>(&self, x: Tensor<D>, t: Tensor<1>, cond: &Condition) -> Tensor<D> {
        let shape = x.dims();
        let n = shape[0];
        match self {
            Model::Dit(m) => {
                let c = m.config();
                let x = x.reshape([n, c.in_channels, c.input_size, c.input_size]);
                m.forward(x, t, cond).reshape(shape)
            }
            Model::Mlp(m) => {
                let x = x.reshape([n as i64, -1]);
                m.forward(x, t, cond).reshape(shape)
            }
            Model::PixArt(m) => {
                let c = m.config();
                let x = x.reshape([n, c.in_channels, c.input_size, c.input_size]);
                m.forward(x, t, cond).reshape(shape)
            }
        }
    }

    /// Width of the conditioning vectors the network reads (0: none).
    pub fn condition_dim(&self) -> usize {
        match self {
            Model::Dit(m) => m.config().condition_dim,
            Model::Mlp(m) => m.config().condition_dim,
            Model::PixArt(_) => 0,
        }
    }

    /// Width of the token embeddings the network reads by cross-attention (0: none).
    pub fn token_dim(&self) -> usize {
        match self {
            Model::PixArt(m) => m.config().caption_channels,
            Model::Dit(_) | Model::Mlp(_) => 0,
        }
    }
}

impl<const D: usize> VelocityField<D> for Model {
    /// The network's prediction; it reads the condition's class and vector (token sequences
    /// reach the networks that read them). A vector of another width is refused.
    fn velocity(&self, x_t: Tensor<D>, t: Tensor<1>, c: &Condition) -> Result<Tensor<D>, VelocityError> {
        let want = self.condition_dim();
        if let Some(v) = &c.vector
            && want > 0
            && v.dims()[1] != want
        {
            return Err(VelocityError::Model(Error::InvalidConfig(format!(
                "conditioning vectors of width {}, but the model reads vectors of width {want}",
                v.dims()[1]
            ))));
        }
        let want = self.token_dim();
        if let Some(tokens) = &c.tokens
            && want > 0
            && tokens.embeddings.dims()[2] != want
        {
            return Err(VelocityError::Model(Error::InvalidConfig(format!(
                "token embeddings of width {}, but the model reads tokens of width {want}",
                tokens.embeddings.dims()[2]
            ))));
        }
        Ok(self.predict(x_t, t, c))
    }
}

/// Check a batch's per-sample shape against the model's before running it.
pub fn check_data_shape(config: &ModelConfig, shape: &[usize], what: &str) -> Result<()> {
    let want = config.data_shape();
    if shape.len() < 2 || shape[1..].iter().product::<usize>() != want.iter().product::<usize>() {
        return Err(Error::InvalidConfig(format!(
            "{what} has shape {shape:?}, but the model takes [N, {}]",
            want.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_mlp_outputs_zero_and_round_trips() {
        let device = crate::device::cpu();
        let config = ModelConfig::Mlp(MlpConfig {
            hidden_size: 32,
            ..MlpConfig::new(3)
        });
        let m = config.init(1, &device).unwrap();
        let x = Tensor::<2>::random([4, 3], burn::tensor::Distribution::Default, &device);
        let t = Tensor::<1>::from_floats([0.1, 0.2, 0.3, 0.9], &device);
        assert!(
            HostTensor::from_tensor(m.predict(x, t, &Condition::none()))
                .data
                .iter()
                .all(|&v| v == 0.0)
        );
        let sd = m.state_dict();
        let back = config
            .load(sd.clone(), std::path::Path::new("mem"), &device)
            .unwrap();
        assert_eq!(back.state_dict(), sd);
    }

    /// A network that reads conditioning vectors: different vectors, different velocities; no
    /// vector is the null (zero) vector; a vector of another width is refused, not run.
    #[test]
    fn vectors_reach_the_network_and_none_is_the_zero_vector() {
        let device = crate::device::cpu();
        for config in [
            ModelConfig::Mlp(MlpConfig {
                hidden_size: 16,
                ..MlpConfig::new(4)
            }),
            ModelConfig::named("DiT-XS/2", "x", &[1, 4, 4], 0, 0).unwrap(),
        ] {
            let config = config.with_condition_vectors(3, 0.1).unwrap();
            assert_eq!(config.condition_dim(), 3);
            // adaLN-Zero and zero output layers make a fresh model constant: perturb every tensor.
            let mut sd = config.init(2, &device).unwrap().state_dict();
            for (i, t) in sd.values_mut().enumerate() {
                for (j, v) in t.data.iter_mut().enumerate() {
                    *v += 0.1 * (((i * 31 + j * 17) % 13) as f32 / 6.0 - 1.0);
                }
            }
            let m = config.load(sd, std::path::Path::new("mem"), &device).unwrap();
            let per = config.data_shape().iter().product::<usize>();
            let x = Tensor::<2>::random([2, per], burn::tensor::Distribution::Default, &device);
            let t = Tensor::<1>::from_floats([0.3, 0.8], &device);
            let v =
                |c: &Condition| HostTensor::from_tensor(m.velocity(x.clone(), t.clone(), c).unwrap()).data;
            let a = Condition::vector(Tensor::<2>::from_floats(
                [[1.0, 0.0, -1.0], [0.5, 0.5, 0.5]],
                &device,
            ));
            let b = Condition::vector(Tensor::<2>::from_floats(
                [[0.0, 2.0, 1.0], [-1.0, 0.0, 0.3]],
                &device,
            ));
            let zero = Condition::vector(Tensor::<2>::zeros([2, 3], &device));
            assert_ne!(v(&a), v(&b), "{}", config.arch());
            assert_eq!(v(&Condition::none()), v(&zero), "{}", config.arch());
            let wide = Condition::vector(Tensor::<2>::zeros([2, 5], &device));
            let err = m.velocity(x.clone(), t.clone(), &wide).unwrap_err().to_string();
            assert!(err.contains("width 5") && err.contains("width 3"), "{err}");
        }
    }
}

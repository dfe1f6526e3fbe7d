//! `Model`: whatever network a checkpoint holds (a DiT or an MLP), seen as a velocity field.
//!
//! Models take data of any rank `[N, ...]` and reshape it to what the network needs (DiT:
//! `[N, C, S, S]`, MLP: `[N, X]`), so samplers and the ensemble never care which one it is.

use std::collections::BTreeMap;

use burn::prelude::*;
use serde::{Deserialize, Serialize};

use crate::dit::{DiT, DiTConfig};
use crate::error::{Error, Result};
use crate::flow::VelocityField;
use crate::host::HostTensor;
use crate::mlp::{Mlp, MlpConfig};
use crate::params::{ParamSource, RandomInit, StateLoader};

/// A model's architecture and hyper-parameters. Serialised with an `arch` tag (`"dit"`, `"mlp"`),
/// as in checkpoint metadata and `ddm import --config`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "arch", rename_all = "lowercase")]
pub enum ModelConfig {
    Dit(DiTConfig),
    Mlp(MlpConfig),
}

impl ModelConfig {
    pub fn arch(&self) -> &'static str {
        match self {
            ModelConfig::Dit(_) => "dit",
            ModelConfig::Mlp(_) => "mlp",
        }
    }

    /// The per-sample data shape the model reads and writes (`[C, S, S]` or `[X]`).
    pub fn data_shape(&self) -> Vec<usize> {
        match self {
            ModelConfig::Dit(c) => vec![c.in_channels, c.input_size, c.input_size],
            ModelConfig::Mlp(c) => vec![c.dim],
        }
    }

    pub fn num_classes(&self) -> usize {
        match self {
            ModelConfig::Dit(c) => c.num_classes,
            ModelConfig::Mlp(_) => 0,
        }
    }

    pub fn flops_per_sample(&self) -> f64 {
        match self {
            ModelConfig::Dit(c) => c.flops_per_sample(),
            ModelConfig::Mlp(c) => c.flops_per_sample(),
        }
    }

    pub fn build(&self, src: &mut impl ParamSource) -> Result<Model> {
        Ok(match self {
            ModelConfig::Dit(c) => Model::Dit(c.build(src)?),
            ModelConfig::Mlp(c) => Model::Mlp(c.build(src)?),
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

/// A DiT or an MLP. (Models are few and long-lived, so the size gap between variants is moot.)
#[derive(Module, Debug)]
#[allow(clippy::large_enum_variant)]
pub enum Model {
    Dit(DiT),
    Mlp(Mlp),
}

impl Model {
    /// All tensors under their PyTorch names.
    pub fn state_dict(&self) -> BTreeMap<String, HostTensor> {
        match self {
            Model::Dit(m) => m.state_dict().0,
            Model::Mlp(m) => m.state_dict().0,
        }
    }

    /// The model's prediction for a batch of any rank `[N, ...]` whose per-sample size matches
    /// the model (velocity, or noise for an epsilon expert).
    pub fn predict<const D: usize>(
        &self,
        x: Tensor<D>,
        t: Tensor<1>,
        y: Option<Tensor<1, Int>>,
    ) -> Tensor<D> {
        let shape = x.dims();
        let n = shape[0];
        match self {
            Model::Dit(m) => {
                let c = m.config();
                let x = x.reshape([n, c.in_channels, c.input_size, c.input_size]);
                m.forward(x, t, y).reshape(shape)
            }
            Model::Mlp(m) => {
                let x = x.reshape([n as i64, -1]);
                m.forward(x, t).reshape(shape)
            }
        }
    }
}

impl<const D: usize> VelocityField<D> for Model {
    fn velocity(&self, x_t: Tensor<D>, t: Tensor<1>, y: Option<Tensor<1, Int>>) -> Tensor<D> {
        self.predict(x_t, t, y)
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
            HostTensor::from_tensor(m.predict(x, t, None))
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
}

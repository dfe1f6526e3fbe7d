//! The floating-point precision a network computes in: f32, or bf16/f16 with f32 master weights.
//!
//! Mixed precision keeps the parameters (and the optimizer's moments, the EMA and the checkpoints)
//! in f32 and runs the forward on a copy cast to the compute dtype: [`cast`] maps every parameter
//! through `Tensor::cast`, which autodiff records, so the gradients land on the f32 parameters.
//! A network cast this way reads and returns f32 at its boundary (the DiT casts its inputs to its
//! parameters' dtype and its output back), so samplers and losses are unchanged.
//!
//! burn 0.22 does not check dtypes in binary ops: on wgpu an f16 tensor added to an f32 one gives
//! wrong values without an error (the CPU backend panics). So every tensor a forward creates or
//! keeps as a constant must follow its input's dtype; [`like`] is the helper for that.

use std::fmt;
use std::str::FromStr;

use burn::module::{Module, ModuleMapper, Param};
use burn::prelude::*;
use burn::tensor::{DType, FloatDType};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// `--precision`: the dtype of the forward and backward passes (`"f32"`, `"bf16"`, `"f16"` in a
/// training config).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    Bf16,
    F16,
}

impl Precision {
    pub fn dtype(self) -> FloatDType {
        match self {
            Precision::F32 => FloatDType::F32,
            Precision::Bf16 => FloatDType::BF16,
            Precision::F16 => FloatDType::F16,
        }
    }

    /// An error naming the flag when `device` cannot compute in this precision.
    pub fn check(self, device: &Device) -> Result<()> {
        if device.supports_dtype(self.dtype()) {
            return Ok(());
        }
        Err(Error::Device(format!(
            "--precision {self}: this device has no {self} arithmetic (f16 needs a GPU with 16-bit float shaders; bf16 a CUDA GPU or the CPU)"
        )))
    }
}

impl FromStr for Precision {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" => Ok(Precision::F32),
            "bf16" => Ok(Precision::Bf16),
            "f16" => Ok(Precision::F16),
            other => Err(Error::Invalid(format!(
                "--precision {other}: expected f32, bf16 or f16"
            ))),
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
            Precision::F16 => "f16",
        })
    }
}

/// Maps every float parameter to one dtype.
struct Cast(FloatDType);

impl ModuleMapper for Cast {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let dtype = DType::from(self.0);
        param.map(|t| like(t, dtype))
    }
}

/// `module` with its float parameters in `precision`'s dtype (parameters already in it unchanged).
/// Under autodiff the cast is part of the graph: gradients flow back to the original parameters.
pub fn cast<M: Module>(module: M, precision: Precision) -> M {
    module.map(&mut Cast(precision.dtype()))
}

/// `x` in `reference`'s float dtype (unchanged when they already agree).
pub fn like<const D: usize>(x: Tensor<D>, reference: DType) -> Tensor<D> {
    if x.dtype() == reference {
        x
    } else {
        x.cast(FloatDType::from(reference))
    }
}

#[cfg(test)]
mod tests {
    use burn::module::ModuleVisitor;
    use burn::optim::GradientsParams;
    use burn::tensor::Distribution;

    use super::*;
    use crate::condition::Condition;
    use crate::dit::{DiT, DiTConfig};
    use crate::host::HostTensor;
    use crate::params::RandomInit;

    /// Every parameter moved off adaLN-Zero's zeros (a fresh DiT predicts exactly zero), as a new
    /// leaf that takes gradients.
    struct Perturb;

    impl ModuleMapper for Perturb {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            param.map(|t| {
                let noise = Tensor::random(t.shape(), Distribution::Normal(0.0, 0.05), &t.device());
                let leaf = (t.clone().detach() + noise).detach();
                if t.is_require_grad() {
                    leaf.require_grad()
                } else {
                    leaf
                }
            })
        }
    }

    /// Every gradient of `model`'s parameters, flattened in visiting order.
    struct Grads<'a>(&'a GradientsParams, Vec<f32>, Vec<DType>);

    impl ModuleVisitor for Grads<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let g = self.0.get::<D>(param.id).expect("every parameter has a gradient");
            self.2.push(g.dtype());
            self.1.extend(HostTensor::from_tensor(g).data);
        }
    }

    fn dit(device: &Device) -> DiT {
        let mut config = DiTConfig::named("DiT-T/4", 16, 3).unwrap();
        config.num_classes = 5;
        config
            .build(&mut RandomInit::new(0, device))
            .unwrap()
            .map(&mut Perturb)
    }

    fn inputs(device: &Device) -> (Tensor<4>, Tensor<1>, Condition) {
        let x = Tensor::<4>::random([3, 3, 16, 16], Distribution::Normal(0.0, 1.0), device);
        let t = Tensor::<1>::from_floats([0.1, 0.5, 0.9], device);
        (
            x,
            t,
            Condition::class(Tensor::<1, Int>::from_ints([0, 4, 5], device)),
        )
    }

    /// ||a - b|| / ||b||.
    fn relative_error(a: &[f32], b: &[f32]) -> f32 {
        let diff: f32 = a.iter().zip(b).map(|(a, b)| (a - b).powi(2)).sum();
        let norm: f32 = b.iter().map(|b| b.powi(2)).sum();
        (diff / norm).sqrt()
    }

    #[test]
    fn precision_parses_and_names_the_flag() {
        for p in [Precision::F32, Precision::Bf16, Precision::F16] {
            assert_eq!(p.to_string().parse::<Precision>().unwrap(), p);
        }
        let e = "fp8".parse::<Precision>().unwrap_err().to_string();
        assert!(e.contains("--precision fp8") && e.contains("bf16"), "{e}");
    }

    /// A DiT cast to bf16 on the CPU (whose backend panics on mixed dtypes, so a tensor the forward
    /// leaves in f32 fails here) reads and returns f32 and predicts what the f32 DiT does, to bf16's
    /// 8 bits of mantissa.
    #[test]
    fn a_bf16_dit_speaks_f32_and_predicts_close_to_the_f32_one() {
        let device = crate::device::cpu();
        let model = dit(&device);
        let (x, t, c) = inputs(&device);
        let full = HostTensor::from_tensor(model.forward(x.clone(), t.clone(), &c)).data;
        let half = cast(model, Precision::Bf16);
        let v = half.forward(x, t, &c);
        assert_eq!(v.dtype(), DType::F32);
        let half = HostTensor::from_tensor(v).data;
        let err = relative_error(&half, &full);
        assert!(err > 0.0 && err < 0.05, "relative error {err}");
    }

    /// Mixed precision's backward: a loss computed by the bf16 copy puts f32 gradients on the f32
    /// parameters, close to the f32 forward's own.
    #[test]
    fn gradients_through_a_bf16_copy_reach_the_f32_parameters() {
        let device = crate::device::cpu().autodiff();
        let model = dit(&device);
        let (x, t, c) = inputs(&device);
        let grads = |m: &DiT| {
            let loss = m.forward(x.clone(), t.clone(), &c).powi_scalar(2).mean();
            GradientsParams::from_grads(loss.backward(), &model)
        };
        let full = grads(&model);
        let half = grads(&cast(model.clone(), Precision::Bf16));
        let (mut a, mut b) = (Grads(&full, vec![], vec![]), Grads(&half, vec![], vec![]));
        model.visit(&mut a);
        model.visit(&mut b);
        assert!(b.2.iter().all(|&d| d == DType::F32), "{:?}", b.2);
        let err = relative_error(&b.1, &a.1);
        assert!(err > 0.0 && err < 0.1, "relative error {err}");
    }

    /// The MLP expert (vector data) too: class and vector conditioned, cast to bf16 on the CPU, it
    /// reads and returns f32 and predicts what the f32 MLP does.
    #[test]
    fn a_bf16_mlp_speaks_f32_and_predicts_close_to_the_f32_one() {
        use crate::mlp::{Mlp, MlpConfig};
        let device = crate::device::cpu();
        let config = MlpConfig {
            hidden_size: 32,
            num_classes: 5,
            class_dropout_prob: 0.1,
            condition_dim: 4,
            ..MlpConfig::new(6)
        };
        let model: Mlp = config
            .build(&mut RandomInit::new(0, &device))
            .unwrap()
            .map(&mut Perturb);
        let x = Tensor::<2>::random([3, 6], Distribution::Normal(0.0, 1.0), &device);
        let t = Tensor::<1>::from_floats([0.1, 0.5, 0.9], &device);
        let c = Condition {
            vector: Some(Tensor::<2>::random(
                [3, 4],
                Distribution::Normal(0.0, 1.0),
                &device,
            )),
            ..Condition::class(Tensor::<1, Int>::from_ints([0, 4, 5], &device))
        };
        let full = HostTensor::from_tensor(model.forward(x.clone(), t.clone(), &c)).data;
        let v = cast(model, Precision::Bf16).forward(x, t, &c);
        assert_eq!(v.dtype(), DType::F32);
        let err = relative_error(&HostTensor::from_tensor(v).data, &full);
        assert!(err > 0.0 && err < 0.05, "relative error {err}");
    }

    /// PixArt too (the text-to-image expert): cast to bf16 on the CPU, with captions, a caption of
    /// padding only (read as the stored null caption, a constant the cast does not reach) and no
    /// caption at all, it reads and returns f32, predicts what the f32 PixArt does, and its
    /// backward puts f32 gradients on the f32 parameters.
    #[test]
    fn a_bf16_pixart_predicts_close_to_the_f32_one_and_trains() {
        use crate::pixart::{PixArt, PixArtConfig};
        let device = crate::device::cpu().autodiff();
        let mut config = PixArtConfig::named("XS/2", 8, 1).unwrap();
        (config.caption_channels, config.caption_length) = (8, Some(4));
        (config.null_caption_length, config.caption_dropout_prob) = (Some(3), 0.1);
        let model: PixArt = config
            .build(&mut RandomInit::new(0, &device))
            .unwrap()
            .map(&mut Perturb);
        let x = Tensor::<4>::random([3, 1, 8, 8], Distribution::Normal(0.0, 1.0), &device);
        let t = Tensor::<1>::from_floats([0.1, 0.5, 0.9], &device);
        let embeddings = Tensor::<3>::random([3, 4, 8], Distribution::Normal(0.0, 1.0), &device);
        let mask = Tensor::<2>::from_floats([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0], [0.0; 4]], &device);
        for c in [Condition::tokens(embeddings, mask), Condition::none()] {
            let run = |m: &PixArt| {
                let v = m.forward(x.clone(), t.clone(), &c);
                assert_eq!(v.dtype(), DType::F32);
                let grads = GradientsParams::from_grads(v.clone().powi_scalar(2).mean().backward(), &model);
                let mut g = Grads(&grads, vec![], vec![]);
                model.visit(&mut g);
                (HostTensor::from_tensor(v).data, g.1, g.2)
            };
            let (full, full_grads, _) = run(&model);
            let (half, half_grads, dtypes) = run(&cast(model.clone(), Precision::Bf16));
            assert!(dtypes.iter().all(|&d| d == DType::F32), "{dtypes:?}");
            let (dv, dg) = (
                relative_error(&half, &full),
                relative_error(&half_grads, &full_grads),
            );
            assert!(dv > 0.0 && dv < 0.05, "prediction: relative error {dv}");
            assert!(dg > 0.0 && dg < 0.1, "gradients: relative error {dg}");
        }
    }
}

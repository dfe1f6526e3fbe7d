//! Dynamic loss scaling, for training in f16 (bf16 has f32's exponent range and needs none).
//!
//! f16's smallest normal number is 6e-5: many gradients of a DiT are smaller and would flush to
//! zero in the f16 backward. The loss is multiplied by a large `scale` before the backward, so the
//! f16 gradients are `scale` times larger, and the f32 gradients of the master weights are divided
//! by it again before the optimizer. When a gradient overflows (inf or NaN) the step is skipped
//! and the scale halved; after [`GROWTH_INTERVAL`] good steps in a row it doubles. PyTorch's
//! `GradScaler` defaults, so a run behaves as one would expect from it.

use ddm_core::burn::module::{Module, ModuleVisitor, Param};
use ddm_core::burn::optim::GradientsParams;
use ddm_core::burn::prelude::*;
use serde::{Deserialize, Serialize};

/// The first scale (2^16).
pub const INITIAL: f64 = 65536.0;
/// Good steps in a row before the scale doubles.
pub const GROWTH_INTERVAL: u64 = 2000;
/// The scale never falls below 1: a loss that overflows f16 unscaled is a divergence, not a
/// scaling problem.
pub const MIN: f64 = 1.0;

/// The scaler's state, saved with the loop's (a resumed f16 run continues with the same scale).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LossScale {
    pub scale: f64,
    /// Good steps since the scale last changed.
    pub good_steps: u64,
    /// Steps skipped for overflowing gradients, over the whole run.
    pub skipped: u64,
}

impl Default for LossScale {
    fn default() -> Self {
        LossScale {
            scale: INITIAL,
            good_steps: 0,
            skipped: 0,
        }
    }
}

impl LossScale {
    /// Record one step's gradients: `finite` when none overflowed. Returns whether the optimizer
    /// should take the step.
    pub fn update(&mut self, finite: bool) -> bool {
        if !finite {
            self.scale = (self.scale / 2.0).max(MIN);
            self.good_steps = 0;
            self.skipped += 1;
            return false;
        }
        self.good_steps += 1;
        if self.good_steps == GROWTH_INTERVAL {
            self.scale *= 2.0;
            self.good_steps = 0;
        }
        true
    }
}

/// Divides every gradient of a module's parameters by the scale, and sums them all: the sum is
/// finite exactly when every gradient is (an inf or NaN anywhere makes it inf or NaN).
struct Unscale<'a> {
    grads: &'a mut GradientsParams,
    inverse: f64,
    sums: Vec<Tensor<1>>,
}

impl ModuleVisitor for Unscale<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(g) = self.grads.remove::<D>(param.id) {
            let g = g * self.inverse;
            self.sums.push(g.clone().sum());
            self.grads.register(param.id, g);
        }
    }
}

/// Divide `grads` (of `model`'s parameters) by `scale`; returns whether they are all finite.
/// One device sync, for the whole model.
pub fn unscale<M: Module>(model: &M, grads: &mut GradientsParams, scale: f64) -> bool {
    let mut v = Unscale {
        grads,
        inverse: 1.0 / scale,
        sums: Vec::new(),
    };
    model.visit(&mut v);
    if v.sums.is_empty() {
        return true;
    }
    let total = Tensor::cat(v.sums, 0).sum().into_scalar::<f32>();
    total.is_finite()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_overflow_halves_the_scale_and_skips_the_step() {
        let mut s = LossScale::default();
        assert!(s.update(true));
        assert!(!s.update(false));
        assert_eq!((s.scale, s.good_steps, s.skipped), (INITIAL / 2.0, 0, 1));
        for _ in 0..GROWTH_INTERVAL - 1 {
            assert!(s.update(true));
        }
        assert_eq!(s.scale, INITIAL / 2.0);
        assert!(s.update(true));
        assert_eq!((s.scale, s.good_steps), (INITIAL, 0));
    }

    #[test]
    fn the_scale_stops_at_one() {
        let mut s = LossScale::default();
        for _ in 0..40 {
            s.update(false);
        }
        assert_eq!((s.scale, s.skipped), (MIN, 40));
    }

    /// Gradients divided by the scale; an inf in any one of them is reported.
    #[test]
    fn unscaling_divides_and_detects_an_overflow() {
        use ddm_core::burn::nn::LinearConfig;
        let device = ddm_core::device::cpu().autodiff();
        let layer = LinearConfig::new(3, 2).init(&device);
        let x = Tensor::<2>::from_floats([[1.0, 2.0, 3.0]], &device);
        let grads_at = |factor: f32| {
            let loss = layer.forward(x.clone()).sum() * factor;
            GradientsParams::from_grads(loss.backward(), &layer)
        };
        let plain = grads_at(1.0);
        let mut scaled = grads_at(1024.0);
        assert!(unscale(&layer, &mut scaled, 1024.0));
        let w = |g: &GradientsParams| {
            ddm_core::host::HostTensor::from_tensor(g.get::<2>(layer.weight.id).unwrap()).data
        };
        assert_eq!(w(&scaled), w(&plain));
        let mut overflowed = grads_at(f32::INFINITY);
        assert!(!unscale(&layer, &mut overflowed, 1024.0));
    }

    /// A real f16 backward: at the first scale a gradient of 300 x 65536 overflows f16 (largest
    /// 65504) and is reported; unscaled, the same gradients are finite.
    #[test]
    fn an_overflowing_f16_backward_is_detected() {
        use ddm_core::burn::nn::LinearConfig;
        use ddm_core::precision::{Precision, cast};
        let device = ddm_core::device::cpu().autodiff();
        let layer = LinearConfig::new(3, 2).init(&device);
        let x = Tensor::<2>::from_floats([[100.0, 200.0, 300.0]], &device);
        let grads_at = |scale: f64| {
            let half = cast(layer.clone(), Precision::F16);
            let y = half.forward(x.clone().cast(Precision::F16.dtype()));
            let loss = y.cast(Precision::F32.dtype()).mean() * scale;
            let mut g = GradientsParams::from_grads(loss.backward(), &layer);
            unscale(&layer, &mut g, scale)
        };
        assert!(grads_at(1.0));
        assert!(!grads_at(INITIAL));
    }
}

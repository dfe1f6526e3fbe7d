//! The parameter updates of a training step, AdamW and the weight EMA, each one pass per
//! parameter on the CPU.
//!
//! burn's AdamW is about twenty tensor ops per parameter (the two moments, their bias corrections,
//! the step, the decay, and three more for per-parameter gradient clipping), and the EMA three:
//! with ~90 parameters that is ~2000 small passes, 8% of a DiT-Bench training step. Here each is one
//! kernel that updates the parameter and its moments in place:
//!
//! - [`AdamW`] is a burn [`Optimizer`] with burn's AdamW state ([`AdamWState`]), so optimizer
//!   records (and resumable training states) written by either load into the other. Its gradient
//!   clipping is burn's `GradientClippingConfig::Norm`: each parameter's gradient is scaled to an
//!   L2 norm of at most `clip_norm`.
//! - [`ema`] blends one parameter into its average.
//!
//! On any other device or dtype both run burn's ops (burn's own AdamW, and its clipping), which are
//! also the reference the kernels are tested against (`core/tests/update.rs`). Every element is
//! computed by the same operations on any thread count, and the clipping norm sums fixed-size
//! chunks in order, so a fixed seed gives the same bits on any number of threads.

use burn::backend::flex::{Flex, FlexTensor};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Dispatch, backend_extension};
use burn::grad_clipping::GradientClipping;
use burn::optim::{AdamWConfig, AdamWState, AdaptiveMomentumState, LearningRate, Optimizer};
use burn::prelude::*;
use rayon::prelude::*;

use crate::fused::{dense, fused_here, lane_sum, values, widest_simd};

/// AdamW (decoupled weight decay), with optional per-parameter gradient clipping by norm.
#[derive(Clone, Debug)]
pub struct AdamW {
    pub beta_1: f32,
    pub beta_2: f32,
    pub epsilon: f32,
    pub weight_decay: f32,
    /// Scale each parameter's gradient to an L2 norm of at most this (None: no clipping).
    pub clip_norm: Option<f32>,
}

impl AdamW {
    /// burn's `AdamWConfig` defaults (betas 0.9, 0.999, epsilon 1e-5) with this weight decay.
    pub fn new(weight_decay: f32, clip_norm: Option<f32>) -> Self {
        Self {
            beta_1: 0.9,
            beta_2: 0.999,
            epsilon: 1e-5,
            weight_decay,
            clip_norm,
        }
    }

    /// The same optimizer as burn's ops (the path off the CPU, and the kernels' reference).
    pub fn composite(&self) -> AdamWConfig {
        AdamWConfig::new()
            .with_beta_1(self.beta_1)
            .with_beta_2(self.beta_2)
            .with_epsilon(self.epsilon)
            .with_weight_decay(self.weight_decay)
    }
}

impl Optimizer for AdamW {
    type State<const D: usize> = AdamWState<D>;

    fn step<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<D>,
        grad: Tensor<D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<D>, Option<Self::State<D>>) {
        if !fused_here(&tensor) {
            let grad = match self.clip_norm {
                Some(c) => GradientClipping::Norm(c).clip_gradient(grad),
                None => grad,
            };
            return self.composite().build().step(lr, tensor, grad, state);
        }
        // A first step starts from zero moments: 0 * beta + g * (1 - beta) is burn's first moment
        // to the bit.
        let (time, moment_1, moment_2) = match state {
            Some(s) => (s.momentum.time + 1, s.momentum.moment_1, s.momentum.moment_2),
            None => (1, tensor.zeros_like(), tensor.zeros_like()),
        };
        let (tensor, moment_1, moment_2) = <Dispatch as UpdateOps>::adamw(
            tensor.into_dispatch(),
            grad.into_dispatch(),
            moment_1.into_dispatch(),
            moment_2.into_dispatch(),
            lr,
            self.beta_1,
            self.beta_2,
            self.epsilon,
            self.weight_decay,
            time,
            self.clip_norm.unwrap_or(0.0),
        );
        let momentum = AdaptiveMomentumState::new(
            time,
            Tensor::from_dispatch(moment_1),
            Tensor::from_dispatch(moment_2),
        );
        (Tensor::from_dispatch(tensor), Some(AdamWState::new(momentum)))
    }

    fn to_device<const D: usize>(mut state: Self::State<D>, device: &Device) -> Self::State<D> {
        state.momentum.moment_1 = state.momentum.moment_1.to_device(device);
        state.momentum.moment_2 = state.momentum.moment_2.to_device(device);
        state
    }
}

/// One EMA step of a parameter: `average * decay + current * (1 - decay)` (same shapes).
pub fn ema<const D: usize>(average: Tensor<D>, current: Tensor<D>, decay: f64) -> Tensor<D> {
    if fused_here(&average) {
        Tensor::from_dispatch(<Dispatch as UpdateOps>::ema(
            average.into_dispatch(),
            current.into_dispatch(),
            decay,
        ))
    } else {
        average * decay + current * (1.0 - decay)
    }
}

// ------------------------------------------------------------------------------------------------
// The extension and its CPU kernels (Flex, f32)
// ------------------------------------------------------------------------------------------------

/// The fused updates, routed by `Dispatch` to the CPU backend (parameters are plain tensors when
/// they are updated: no autodiff).
#[backend_extension(Flex)]
pub trait UpdateOps: Backend {
    /// One AdamW step of `param` from `grad` (clipped to norm `clip_norm` first when it is > 0),
    /// `moment_1`, `moment_2` at step `time` (1 for the first): (param, moment_1, moment_2).
    #[allow(clippy::too_many_arguments)]
    fn adamw(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        moment_1: FloatTensor<Self>,
        moment_2: FloatTensor<Self>,
        lr: f64,
        beta_1: f32,
        beta_2: f32,
        epsilon: f32,
        weight_decay: f32,
        time: usize,
        clip_norm: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
    /// `average * decay + current * (1 - decay)`.
    fn ema(average: FloatTensor<Self>, current: FloatTensor<Self>, decay: f64) -> FloatTensor<Self>;
}

/// Elements per rayon task (and per partial sum of the clipping norm: fixed, so the norm has the
/// same bits on any thread count).
const CHUNK: usize = 1 << 14;

/// A dense f32 tensor whose buffer holds exactly its values, to update in place (`storage_mut`
/// copies it first only when the buffer is shared).
fn updatable(t: FlexTensor) -> FlexTensor {
    let t = dense(t);
    let n = t.layout().shape().num_elements();
    if t.layout().contiguous_offsets() == Some((0, n)) && t.bytes().len() == n * 4 {
        t
    } else {
        FlexTensor::from_data(TensorData::new(values(&t).to_vec(), t.layout().shape().to_vec()))
    }
}

/// The scalars of one AdamW step, as the kernel uses them.
struct Step {
    /// Gradient scale (1 without clipping).
    clip: f32,
    beta_1: f32,
    beta_2: f32,
    /// 1 - beta_1^t and 1 - beta_2^t.
    correction_1: f32,
    correction_2: f32,
    epsilon: f32,
    /// 1 - lr * weight decay.
    decay: f32,
    lr: f32,
}

widest_simd! {
    fn adamw_chunk(p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], s: &Step) {
        assert!(m.len() == p.len() && v.len() == p.len() && g.len() == p.len());
        let (f1, f2) = (1.0 - s.beta_1, 1.0 - s.beta_2);
        for (((p, m), v), &g) in p.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(g) {
            let g = g * s.clip;
            *m = *m * s.beta_1 + g * f1;
            *v = *v * s.beta_2 + g * g * f2;
            let delta = (*m / s.correction_1) / ((*v / s.correction_2).sqrt() + s.epsilon);
            *p = *p * s.decay - delta * s.lr;
        }
    }
}

widest_simd! {
    fn sum_squares(g: &[f32], out: &mut f32) {
        *out = lane_sum(g, g, |a, b| a * b);
    }
}

widest_simd! {
    fn ema_chunk(average: &mut [f32], current: &[f32], decay: f32, rest: f32) {
        assert_eq!(average.len(), current.len());
        for (a, &c) in average.iter_mut().zip(current) {
            *a = *a * decay + c * rest;
        }
    }
}

impl UpdateOps for Flex {
    fn adamw(
        param: FlexTensor,
        grad: FlexTensor,
        moment_1: FlexTensor,
        moment_2: FlexTensor,
        lr: f64,
        beta_1: f32,
        beta_2: f32,
        epsilon: f32,
        weight_decay: f32,
        time: usize,
        clip_norm: f32,
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        let (mut param, mut m, mut v) = (updatable(param), updatable(moment_1), updatable(moment_2));
        let grad = dense(grad);
        let g = values(&grad);
        assert_eq!(
            g.len(),
            param.layout().shape().num_elements(),
            "gradient and parameter sizes differ"
        );
        // burn's clip_by_norm: g * min(1, c / (|g| + the smallest positive f32)).
        let clip = if clip_norm > 0.0 {
            let parts: Vec<f32> = g
                .par_chunks(CHUNK)
                .map(|c| {
                    let mut s = 0.0;
                    sum_squares(c, &mut s);
                    s
                })
                .collect();
            let norm = parts.iter().sum::<f32>().sqrt();
            (clip_norm / (norm + f32::MIN_POSITIVE)).min(1.0)
        } else {
            1.0
        };
        let time = time as i32;
        let step = Step {
            clip,
            beta_1,
            beta_2,
            correction_1: 1.0 - beta_1.powi(time),
            correction_2: 1.0 - beta_2.powi(time),
            epsilon,
            decay: (1.0 - lr * weight_decay as f64) as f32,
            lr: lr as f32,
        };
        let (p, m_s, v_s) = (
            param.storage_mut::<f32>(),
            m.storage_mut::<f32>(),
            v.storage_mut::<f32>(),
        );
        p.par_chunks_mut(CHUNK)
            .zip(m_s.par_chunks_mut(CHUNK))
            .zip(v_s.par_chunks_mut(CHUNK))
            .zip(g.par_chunks(CHUNK))
            .for_each(|(((p, m), v), g)| adamw_chunk(p, m, v, g, &step));
        (param, m, v)
    }

    fn ema(average: FlexTensor, current: FlexTensor, decay: f64) -> FlexTensor {
        let mut average = updatable(average);
        let current = dense(current);
        let c = values(&current);
        let a = average.storage_mut::<f32>();
        assert_eq!(
            a.len(),
            c.len(),
            "an EMA parameter and its model's differ in size"
        );
        let (decay, rest) = (decay as f32, (1.0 - decay) as f32);
        a.par_chunks_mut(CHUNK)
            .zip(c.par_chunks(CHUNK))
            .for_each(|(a, c)| ema_chunk(a, c, decay, rest));
        average
    }
}

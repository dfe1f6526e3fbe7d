//! Flow matching: the one home of ddm's math convention.
//!
//! - Data `x0` (images scaled to [-1, 1]), noise `e ~ N(0, I)`, time `t` in [0, 1]:
//!   **t = 0 is data, t = 1 is noise.**
//! - Path: `x_t = (1 - t) x0 + t e`. Velocity target: `v = e - x0`.
//!   Loss: `|| v_theta(x_t, t) - (e - x0) ||^2`.
//! - Sampling integrates `dx/dt = v(x, t)` from t = 1 (noise) down to t = 0 (data), with Euler
//!   (`x_{t+h} = x_t + h v`, h < 0) or Heun (Euler plus a trapezoidal correction).
//!
//! Every other crate calls these functions; none re-derives them. See docs/ARCHITECTURE.md for how the global
//! velocity decomposes over experts: `v(x_t, t) = sum_k p(k | x_t, t) v_k(x_t, t)`.
//!
//! Experts trained with the DDPM epsilon objective join through [`EpsilonToVelocity`].

use burn::prelude::*;
use rand::Rng;
use rand_distr::{Distribution as _, StandardNormal};
use serde::{Deserialize, Serialize};

pub use crate::condition::Condition;
use crate::host::HostTensor;

/// Why a velocity could not be computed: a model that could not be loaded, a server that did not
/// answer, an answer that is not finite. Errors are values all the way through the sampler, so a
/// failing expert is the sampling's error (or, when tolerated, left out), never a panic or a
/// zero-filled answer.
#[derive(Debug, thiserror::Error)]
pub enum VelocityError {
    #[error(transparent)]
    Model(#[from] crate::error::Error),
    #[error("it answered {count} NaN or infinite velocities")]
    NonFinite { count: usize },
    /// Another cause (a served expert's transport, a checkpoint that would not load), with its
    /// chain.
    #[error("{0}")]
    Other(String),
    /// One expert of an ensemble failed; `place` says where it lives (`served at URL`, `from
    /// PATH`).
    #[error("expert {expert}, {place}: {source}")]
    Expert {
        expert: usize,
        place: String,
        #[source]
        source: Box<VelocityError>,
    },
    /// Every expert of an ensemble was lost.
    #[error("every expert is lost: nothing left to sample with")]
    NoExpertLeft,
}

impl VelocityError {
    /// An error of any other kind, its causes on one line.
    pub fn other(e: &(dyn std::error::Error + 'static)) -> Self {
        VelocityError::Other(crate::error::chain(e))
    }
}

/// A velocity field `v(x_t, t, c)`: what an expert is, to a sampler.
///
/// Local models, epsilon models behind [`EpsilonToVelocity`], closed-form fields (tests) and
/// remote experts implement it.
pub trait VelocityField<const D: usize> {
    /// # Shapes
    /// - `x_t`: `[N, ...]` (rank `D`)
    /// - `t`: `[N]`, flow time in [0, 1]
    /// - `c`: the condition of the N samples (a class-conditional field reads `c.class`)
    /// - returns `v`: the shape of `x_t`
    fn velocity(&self, x_t: Tensor<D>, t: Tensor<1>, c: &Condition) -> Result<Tensor<D>, VelocityError>;
}

impl<const D: usize, F: VelocityField<D> + ?Sized> VelocityField<D> for &F {
    fn velocity(&self, x_t: Tensor<D>, t: Tensor<1>, c: &Condition) -> Result<Tensor<D>, VelocityError> {
        (**self).velocity(x_t, t, c)
    }
}

impl<const D: usize, F: VelocityField<D> + ?Sized> VelocityField<D> for Box<F> {
    fn velocity(&self, x_t: Tensor<D>, t: Tensor<1>, c: &Condition) -> Result<Tensor<D>, VelocityError> {
        (**self).velocity(x_t, t, c)
    }
}

/// What an integrator steps along: a velocity field, or a sampler whose state changes as it goes
/// (a routed ensemble: its strategy's draws, a trajectory's experts, what it used).
pub trait Drift<const D: usize> {
    fn drift(&mut self, x_t: Tensor<D>, t: Tensor<1>, c: &Condition) -> Result<Tensor<D>, VelocityError>;
}

impl<const D: usize, F: VelocityField<D> + ?Sized> Drift<D> for &F {
    fn drift(&mut self, x_t: Tensor<D>, t: Tensor<1>, c: &Condition) -> Result<Tensor<D>, VelocityError> {
        self.velocity(x_t, t, c)
    }
}

/// Whether every value of `v` is finite (no NaN, no infinity): a device sync of one value.
pub fn all_finite<const D: usize>(v: &Tensor<D>) -> bool {
    v.clone().is_finite().all().into_scalar()
}

/// Reshape per-sample times `[N]` to `[N, 1, ..., 1]` so they broadcast over a rank-`D` batch.
pub fn expand_t<const D: usize>(t: Tensor<1>) -> Tensor<D> {
    let mut shape = [1usize; D];
    shape[0] = t.dims()[0];
    t.reshape(shape)
}

/// `x_t = (1 - t) x0 + t e`.
pub fn interpolate<const D: usize>(x0: Tensor<D>, e: Tensor<D>, t: Tensor<1>) -> Tensor<D> {
    let t: Tensor<D> = expand_t(t);
    x0 * (t.clone().neg() + 1.0) + e * t
}

/// The flow-matching regression target `v = e - x0`.
pub fn velocity_target<const D: usize>(x0: Tensor<D>, e: Tensor<D>) -> Tensor<D> {
    e - x0
}

/// Mean squared error between a predicted velocity and the target `e - x0` (a scalar `[1]`).
pub fn flow_matching_loss<const D: usize>(v_pred: Tensor<D>, x0: Tensor<D>, e: Tensor<D>) -> Tensor<1> {
    let diff = v_pred - velocity_target(x0, e);
    (diff.clone() * diff).mean()
}

/// How training draws t.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum TimeSampler {
    /// t ~ U(0, 1).
    Uniform,
    /// t = sigmoid(m + s z), z ~ N(0, 1) (SD3's logit-normal; m = 0, s = 1 is common).
    LogitNormal { mean: f64, std: f64 },
}

impl TimeSampler {
    pub fn sample(&self, n: usize, rng: &mut impl Rng) -> Vec<f32> {
        (0..n)
            .map(|_| match *self {
                TimeSampler::Uniform => rng.random::<f32>(),
                TimeSampler::LogitNormal { mean, std } => {
                    let z: f64 = StandardNormal.sample(rng);
                    (1.0 / (1.0 + (-(mean + std * z)).exp())) as f32
                }
            })
            .collect()
    }
}

/// Where the sampler places its steps between t = 1 and t = 0.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum StepSchedule {
    /// t_i = 1 - i / n.
    Uniform,
    /// SD3's shifted schedule: t' = s t / (1 + (s - 1) t). s > 1 spends more steps near noise.
    Shifted { shift: f64 },
    /// Beta sampling (Lee et al., 2024; diffusers' `use_beta_sigmas`), made for few steps:
    /// t_i = F^-1(1 - i / n), F the CDF of Beta(a, b). a = b < 1 puts more steps at both ends,
    /// near noise and near the data, and fewer in the middle; a = b = 1 is uniform.
    Beta { a: f64, b: f64 },
}

/// diffusers' default shape for beta sampling: Beta(0.6, 0.6).
pub const BETA_SHAPE: f64 = 0.6;

impl StepSchedule {
    /// The `steps + 1` times from 1 down to 0 (both included).
    pub fn times(&self, steps: usize) -> Vec<f64> {
        (0..=steps)
            .map(|i| {
                let t = 1.0 - i as f64 / steps as f64;
                match *self {
                    StepSchedule::Uniform => t,
                    StepSchedule::Shifted { shift } => shift * t / (1.0 + (shift - 1.0) * t),
                    StepSchedule::Beta { a, b } => beta_quantile(a, b, t),
                }
            })
            .collect()
    }
}

impl std::fmt::Display for StepSchedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StepSchedule::Uniform => write!(f, "uniform"),
            StepSchedule::Shifted { shift } => write!(f, "shifted:{shift}"),
            StepSchedule::Beta { a, b } => write!(f, "beta:{a}:{b}"),
        }
    }
}

impl std::str::FromStr for StepSchedule {
    type Err = String;

    /// `uniform`, `shifted:S` with S > 0 (SD3 samples with 3), or `beta` / `beta:A:B` with
    /// A, B > 0 (`beta` is Beta(0.6, 0.6)).
    fn from_str(s: &str) -> Result<Self, String> {
        let positive = |v: &str, what: &str| match v.parse::<f64>() {
            Ok(x) if x.is_finite() && x > 0.0 => Ok(x),
            _ => Err(format!("`{v}`: {what} is a number above 0")),
        };
        match s.split_once(':') {
            None if s == "uniform" => Ok(StepSchedule::Uniform),
            None if s == "beta" => Ok(StepSchedule::Beta {
                a: BETA_SHAPE,
                b: BETA_SHAPE,
            }),
            Some(("shifted", v)) => Ok(StepSchedule::Shifted {
                shift: positive(v, "the shift of `shifted:S` (SD3 uses 3)")?,
            }),
            Some(("beta", v)) => match v.split_once(':') {
                Some((a, b)) => Ok(StepSchedule::Beta {
                    a: positive(a, "the shape A of `beta:A:B`")?,
                    b: positive(b, "the shape B of `beta:A:B`")?,
                }),
                None => Err(format!(
                    "`{s}`: the beta schedule is `beta` or `beta:A:B` (two shapes)"
                )),
            },
            _ => Err(format!(
                "`{s}`: a schedule is `uniform`, `shifted:S` (S > 0), `beta` or `beta:A:B` (A, B > 0)"
            )),
        }
    }
}

/// The p-quantile of Beta(a, b), with the ends exact: the first step starts at pure noise and
/// the last ends at the data.
fn beta_quantile(a: f64, b: f64, p: f64) -> f64 {
    use statrs::distribution::{Beta, ContinuousCDF};
    if p <= 0.0 || p >= 1.0 {
        return p.clamp(0.0, 1.0);
    }
    // `--schedule` refuses shapes that are not positive and finite; a schedule built in code
    // with such shapes falls back to uniform.
    Beta::new(a, b).map_or(p, |d| d.inverse_cdf(p))
}

/// The ODE integrator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Solver {
    /// One velocity evaluation per step.
    Euler,
    /// Two evaluations per step (Euler predictor, trapezoidal corrector); second order.
    Heun,
    /// DPM-Solver++(2M) (Lu et al. 2022) in its flow-matching form ([`crate::multistep`]): one
    /// evaluation per step, the data prediction x0 = x_t - t v extrapolated linearly in log-SNR
    /// from this step's and the last step's; second order.
    #[serde(rename = "dpm++2m")]
    DpmSolver2m,
    /// UniPC (Zhao et al. 2023, B(h) = e^h - 1): DPM-Solver++(2M)'s step, then each sample
    /// corrected with the evaluation the next step makes there anyway; one evaluation per step.
    #[serde(rename = "unipc")]
    UniPc,
}

impl Solver {
    /// Velocity evaluations per step.
    pub fn evaluations_per_step(&self) -> usize {
        match self {
            Solver::Euler | Solver::DpmSolver2m | Solver::UniPc => 1,
            Solver::Heun => 2,
        }
    }

    /// The name the command line and reports use.
    pub fn name(&self) -> &'static str {
        match self {
            Solver::Euler => "euler",
            Solver::Heun => "heun",
            Solver::DpmSolver2m => "dpm++2m",
            Solver::UniPc => "unipc",
        }
    }
}

/// Integrate `dx/dt = v(x, t, c)` over `times` (from 1 towards 0), starting from `x1` (noise).
/// Multistep solvers keep their history per sample (rows of the batch).
///
/// # Shapes
/// - `x1`: `[N, ...]`; `c`: the N samples' condition; returns the sample at `times.last()` (t = 0:
///   data).
pub fn integrate<const D: usize>(
    field: &mut dyn Drift<D>,
    x1: Tensor<D>,
    c: &Condition,
    times: &[f64],
    solver: Solver,
) -> Result<Tensor<D>, VelocityError> {
    match solver {
        Solver::DpmSolver2m => return crate::multistep::integrate(field, x1, c, times, false),
        Solver::UniPc => return crate::multistep::integrate(field, x1, c, times, true),
        Solver::Euler | Solver::Heun => {}
    }
    let n = x1.dims()[0];
    let device = x1.device();
    let at = |t: f64| Tensor::<1>::full([n], t as f32, &device);
    let mut x = x1;
    for w in times.windows(2) {
        let (t, t_next) = (w[0], w[1]);
        let h = t_next - t; // negative: we move from noise towards data
        let v = field.drift(x.clone(), at(t), c)?;
        x = match solver {
            Solver::Heun => {
                let x_pred = x.clone() + v.clone() * h;
                let v_next = field.drift(x_pred, at(t_next), c)?;
                x + (v + v_next) * (h / 2.0)
            }
            _ => x + v * h, // Euler
        };
    }
    Ok(x)
}

/// A standard-normal host tensor, drawn from a seeded RNG (backend-independent noise).
pub fn randn(shape: Vec<usize>, rng: &mut impl Rng) -> HostTensor {
    let n = shape.iter().product();
    HostTensor::new(shape, (0..n).map(|_| StandardNormal.sample(rng)).collect())
}

/// Classifier-free guidance on a conditional velocity field:
/// v = v(x, t, null) + scale (v(x, t, c) - v(x, t, null)), the null condition being the null class,
/// zero vectors and padding-only sequences ([`Condition::null`]). Scale 1 is plain conditional
/// sampling; the conditional and null halves run as one batch of 2N. A class-conditional field
/// given no class reads the null class: without any condition the samples are unconditional.
pub struct ClassifierFreeGuidance<F> {
    pub inner: F,
    /// The null class id of a class-conditional field (DiT: `num_classes`); None: it reads no
    /// class.
    pub null_class: Option<usize>,
    pub scale: f64,
}

impl<F: VelocityField<2>> VelocityField<2> for ClassifierFreeGuidance<F> {
    fn velocity(&self, x_t: Tensor<2>, t: Tensor<1>, c: &Condition) -> Result<Tensor<2>, VelocityError> {
        let n = x_t.dims()[0];
        let device = x_t.device();
        let conditioned = !c.is_none();
        let mut c = c.clone();
        if let (Some(null), None) = (self.null_class, &c.class) {
            c.class = Some(Tensor::<1, Int>::full([n], null as i64, &device));
        }
        if !conditioned || self.scale == 1.0 {
            return self.inner.velocity(x_t, t, &c);
        }
        let mut null = c.null(n, self.null_class.unwrap_or(0), &device);
        if self.null_class.is_none() {
            null.class = c.class.clone(); // a field that reads no class is not guided on it
        }
        let v = self.inner.velocity(
            Tensor::cat(vec![x_t.clone(), x_t], 0), // [2N, X]
            Tensor::cat(vec![t.clone(), t], 0),
            &c.cat(null),
        )?;
        let (v_cond, v_null) = (v.clone().narrow(0, 0, n), v.narrow(0, n, n));
        Ok(v_null.clone() + (v_cond - v_null) * self.scale)
    }
}

// ------------------------------------------------------------------------------------------------
// Epsilon (DDPM) experts
// ------------------------------------------------------------------------------------------------

/// The noise schedule an epsilon-prediction (DDPM) expert was trained with, in continuous time
/// u in [0, 1] (u = timestep / T).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum DdpmSchedule {
    /// DDPM's linear betas (beta_start..beta_end over `steps`), as the continuous VP-SDE:
    /// alpha_bar(u) = exp(-(b0 u + (b1 - b0) u^2 / 2)), b0 = beta_start T, b1 = beta_end T.
    Linear {
        beta_start: f64,
        beta_end: f64,
        steps: usize,
    },
    /// Nichol & Dhariwal's cosine schedule: alpha_bar(u) = f(u) / f(0),
    /// f(u) = cos^2(pi/2 (u + s) / (1 + s)).
    Cosine { s: f64 },
}

impl DdpmSchedule {
    /// DDPM's default: betas 1e-4..0.02 over 1000 steps.
    pub fn linear_default() -> Self {
        DdpmSchedule::Linear {
            beta_start: 1e-4,
            beta_end: 0.02,
            steps: 1000,
        }
    }

    pub fn alpha_bar(&self, u: f64) -> f64 {
        match *self {
            DdpmSchedule::Linear {
                beta_start,
                beta_end,
                steps,
            } => {
                let (b0, b1) = (beta_start * steps as f64, beta_end * steps as f64);
                (-(b0 * u + (b1 - b0) * u * u / 2.0)).exp()
            }
            DdpmSchedule::Cosine { s } => {
                let f = |u: f64| ((u + s) / (1.0 + s) * std::f64::consts::FRAC_PI_2).cos().powi(2);
                f(u) / f(0.0)
            }
        }
    }

    /// [`DdpmSchedule::alpha_bar`] of every element of `u`, on its device.
    pub fn alpha_bar_tensor(&self, u: Tensor<1>) -> Tensor<1> {
        match *self {
            DdpmSchedule::Linear {
                beta_start,
                beta_end,
                steps,
            } => {
                let (b0, b1) = (beta_start * steps as f64, beta_end * steps as f64);
                (u.clone() * b0 + u.powf_scalar(2.0) * ((b1 - b0) / 2.0))
                    .neg()
                    .exp()
            }
            DdpmSchedule::Cosine { s } => {
                let f0 = (s / (1.0 + s) * std::f64::consts::FRAC_PI_2).cos().powi(2);
                ((u + s) * (std::f64::consts::FRAC_PI_2 / (1.0 + s)))
                    .cos()
                    .powf_scalar(2.0)
                    / f0
            }
        }
    }

    /// Whether the parameters make a schedule (positive, increasing betas; 0 < s < 1).
    pub fn validate(&self) -> Result<(), String> {
        match *self {
            DdpmSchedule::Linear {
                beta_start,
                beta_end,
                steps,
            } if !(beta_start > 0.0 && beta_end > beta_start && beta_end < 1.0 && steps > 0) => Err(format!(
                "a linear DDPM schedule needs 0 < beta_start < beta_end < 1 and steps > 0, got {beta_start}, {beta_end}, {steps}"
            )),
            DdpmSchedule::Cosine { s } if !(s > 0.0 && s < 1.0) => {
                Err(format!("a cosine DDPM schedule needs 0 < s < 1, got {s}"))
            }
            _ => Ok(()),
        }
    }

    /// The u in [0, 1] with `alpha_bar(u) = ab`, clamped to the schedule's range.
    pub fn u_for_alpha_bar(&self, ab: f64) -> f64 {
        let u = match *self {
            DdpmSchedule::Linear {
                beta_start,
                beta_end,
                steps,
            } => {
                let (b0, b1) = (beta_start * steps as f64, beta_end * steps as f64);
                let (a, b, c) = ((b1 - b0) / 2.0, b0, ab.max(1e-300).ln());
                if a.abs() < 1e-12 {
                    -c / b
                } else {
                    (-b + (b * b - 4.0 * a * c).sqrt()) / (2.0 * a)
                }
            }
            DdpmSchedule::Cosine { s } => {
                let f0 = (s / (1.0 + s) * std::f64::consts::FRAC_PI_2).cos().powi(2);
                (ab * f0).sqrt().clamp(0.0, 1.0).acos() / std::f64::consts::FRAC_PI_2 * (1.0 + s) - s
            }
        };
        u.clamp(0.0, 1.0)
    }
}

/// DDPM's forward process at continuous time u, what an epsilon expert trains on:
/// `x_u = sqrt(alpha_bar(u)) x0 + sqrt(1 - alpha_bar(u)) e`.
///
/// # Shapes
/// - `x0`, `e`: `[B, ...]`, `u`: `[B]` -> `[B, ...]`
pub fn ddpm_forward<const D: usize>(
    x0: Tensor<D>,
    e: Tensor<D>,
    u: Tensor<1>,
    schedule: &DdpmSchedule,
) -> Tensor<D> {
    let ab = schedule.alpha_bar_tensor(u);
    let (signal, noise) = (ab.clone().sqrt(), (ab.neg() + 1.0).clamp_min(0.0).sqrt());
    x0 * expand_t::<D>(signal) + e * expand_t::<D>(noise)
}

/// The epsilon-prediction loss: mean squared error of the predicted noise.
pub fn epsilon_loss<const D: usize>(e_pred: Tensor<D>, e: Tensor<D>) -> Tensor<1> {
    let diff = e_pred - e;
    (diff.clone() * diff).mean()
}

/// Near t = 1 the data coefficient alpha_t = 1 - t vanishes; dividing by it is kept >= this.
pub const MIN_ALPHA: f64 = 0.01;
/// The predicted x0 is clamped to [-X0_CLAMP, X0_CLAMP] before forming the velocity.
pub const X0_CLAMP: f64 = 20.0;

/// An epsilon-prediction expert seen as a velocity field.
///
/// **Time mapping** (matched signal-to-noise ratio): flow time t has SNR (1-t)^2 / t^2; the DDPM
/// time u with the same SNR has alpha_bar(u) = (1-t)^2 / ((1-t)^2 + t^2). With
/// r = sqrt((1-t)^2 + t^2), the DDPM input is x_u = x_t / r (so x_u = sqrt(ab) x0 + sqrt(1-ab) e),
/// and the inner model sees time u (it scales u internally, e.g. 1000 u for DiT: DDPM's step).
/// Then x0_hat = (x_t - t e_hat) / max(1 - t, MIN_ALPHA), clamped to +-X0_CLAMP, and
/// v = e_hat - x0_hat. Where u would leave [0, 1] it is clamped (the schedule's ends).
///
/// **Near t = 1** the division by 1 - t multiplies the epsilon error (by up to 1 / MIN_ALPHA =
/// 100 at the first sampling step): there the noise carries almost no information about x0, and
/// an epsilon network predicts e ~ x_t. So x0_hat is clamped to the data's range (`x0_range`,
/// DDPM samplers' "clip denoised"; +-X0_CLAMP when the range is unknown): without it a Fashion-MNIST
/// ensemble with two epsilon experts of four sampled at FD 16.9 (full) instead of 7.5.
///
/// The mapping is computed on the host: one device sync per call.
pub struct EpsilonToVelocity<M> {
    pub inner: M,
    pub schedule: DdpmSchedule,
    /// The range x0_hat is clamped to: the data's (`[-1, 1]` for images).
    pub x0_range: [f32; 2],
}

impl<M> EpsilonToVelocity<M> {
    /// The converted field, x0_hat clamped to `x0_range` (the data's range).
    pub fn new(inner: M, schedule: DdpmSchedule, x0_range: [f32; 2]) -> Self {
        Self {
            inner,
            schedule,
            x0_range,
        }
    }
}

impl<const D: usize, M: VelocityField<D>> VelocityField<D> for EpsilonToVelocity<M> {
    fn velocity(&self, x_t: Tensor<D>, t: Tensor<1>, c: &Condition) -> Result<Tensor<D>, VelocityError> {
        let device = x_t.device();
        let ts = HostTensor::from_tensor(t.clone()).data;
        let (mut scale, mut u, mut inv_alpha) = (vec![], vec![], vec![]);
        for &t in &ts {
            let t = t as f64;
            let (a, s) = (1.0 - t, t);
            let r = (a * a + s * s).sqrt();
            scale.push((1.0 / r) as f32);
            u.push(self.schedule.u_for_alpha_bar(a * a / (r * r)) as f32);
            inv_alpha.push((1.0 / a.max(MIN_ALPHA)) as f32);
        }
        let n = ts.len();
        let col = |v: Vec<f32>| expand_t::<D>(Tensor::<1>::from_data(TensorData::new(v, [n]), &device));
        let x_u = x_t.clone() * col(scale);
        let e_hat = self
            .inner
            .velocity(x_u, Tensor::from_data(TensorData::new(u, [n]), &device), c)?;
        let t_col: Tensor<D> = expand_t(t);
        let (lo, hi) = (
            (self.x0_range[0] as f64).max(-X0_CLAMP),
            (self.x0_range[1] as f64).min(X0_CLAMP),
        );
        let x0_hat = ((x_t - e_hat.clone() * t_col) * col(inv_alpha)).clamp(lo, hi);
        Ok(e_hat - x0_hat)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gmm::GaussianMixture;
    use rand::SeedableRng;

    fn dev() -> Device {
        crate::device::cpu()
    }

    #[test]
    fn interpolation_hits_data_at_0_and_noise_at_1() {
        let d = dev();
        let x0 = Tensor::<2>::from_floats([[1.0, 2.0], [3.0, 4.0]], &d);
        let e = Tensor::<2>::from_floats([[-1.0, 0.5], [0.0, 2.0]], &d);
        let t = Tensor::<1>::from_floats([0.0, 1.0], &d);
        let x_t = HostTensor::from_tensor(interpolate(x0, e, t)).data;
        assert_eq!(x_t, vec![1.0, 2.0, 0.0, 2.0]);
    }

    #[test]
    fn schedules_run_from_one_to_zero() {
        let beta = StepSchedule::Beta {
            a: BETA_SHAPE,
            b: BETA_SHAPE,
        };
        let all = [StepSchedule::Uniform, StepSchedule::Shifted { shift: 3.0 }, beta];
        for s in all {
            let ts = s.times(10);
            assert_eq!(ts.len(), 11);
            assert!((ts[0] - 1.0).abs() < 1e-12 && ts[10].abs() < 1e-12);
            assert!(ts.windows(2).all(|w| w[1] < w[0]));
        }
        // Shift > 1 puts the midpoint closer to noise.
        assert!(StepSchedule::Shifted { shift: 3.0 }.times(2)[1] > 0.5);
        // Beta(0.6, 0.6) is symmetric, and its first and last steps are shorter than uniform's.
        let ts = beta.times(8);
        assert!((ts[4] - 0.5).abs() < 1e-9);
        assert!(
            ts.iter()
                .zip(ts.iter().rev())
                .all(|(x, y)| (x + y - 1.0).abs() < 1e-9)
        );
        assert!(1.0 - ts[1] < 1.0 / 8.0 && ts[7] < 1.0 / 8.0);
        // Quantiles against closed forms: Beta(1, 1) is uniform, Beta(a, 1) has t = p^(1/a),
        // Beta(1/2, 1/2) (the arcsine law) has t = sin^2(pi p / 2).
        type ClosedForm = (f64, f64, fn(f64) -> f64); // Beta(a, b) and its quantile function
        let closed: [ClosedForm; 3] = [
            (1.0, 1.0, |p| p),
            (2.5, 1.0, |p| p.powf(1.0 / 2.5)),
            (0.5, 0.5, |p| (std::f64::consts::FRAC_PI_2 * p).sin().powi(2)),
        ];
        for (a, b, quantile) in closed {
            for (i, t) in (StepSchedule::Beta { a, b }).times(7).into_iter().enumerate() {
                let want = quantile(1.0 - i as f64 / 7.0);
                assert!((t - want).abs() < 1e-6, "Beta({a}, {b}) step {i}: {t} vs {want}");
            }
        }
        // `--schedule` spells them `uniform`, `shifted:S` and `beta[:A:B]`, and refuses the rest.
        for s in all.into_iter().chain([StepSchedule::Beta { a: 2.0, b: 0.5 }]) {
            assert_eq!(s.to_string().parse::<StepSchedule>(), Ok(s));
        }
        assert_eq!("beta".parse::<StepSchedule>(), Ok(beta));
        for bad in [
            "shifted:0",
            "shifted:-1",
            "shifted:nan",
            "shifted",
            "linear",
            "",
            "beta:0.6",
            "beta:0:1",
            "beta:1:inf",
            "beta:a:b",
            "beta:1:1:1",
        ] {
            assert!(bad.parse::<StepSchedule>().is_err(), "{bad}");
        }
    }

    #[test]
    fn time_samplers_stay_in_unit_interval() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        for s in [
            TimeSampler::Uniform,
            TimeSampler::LogitNormal { mean: 0.0, std: 1.0 },
        ] {
            let t = s.sample(10_000, &mut rng);
            assert!(t.iter().all(|&t| (0.0..=1.0).contains(&t)));
            let mean = t.iter().sum::<f32>() / t.len() as f32;
            assert!((mean - 0.5).abs() < 0.02, "{s:?} mean {mean}");
        }
    }

    /// The 2-D, two-component mixture the solver tests integrate exactly.
    fn two_gaussians() -> GaussianMixture {
        GaussianMixture {
            weights: vec![0.3, 0.7],
            means: vec![vec![-2.0, 1.0], vec![2.0, -1.0]],
            vars: vec![vec![0.25, 0.1], vec![0.5, 0.2]],
        }
    }

    /// Each solver's global error against steps, on a mixture whose velocity is exact (the
    /// reference: Heun at 2048 steps), falls as steps^-order: Euler 1; Heun, DPM-Solver++(2M) and
    /// UniPC 2 (slopes of log error against log steps between 16 and 64 steps).
    #[test]
    fn solvers_converge_at_their_order() {
        let gmm = two_gaussians();
        let d = dev();
        let field = gmm.field(&d);
        let x1 = randn(vec![256, 2], &mut rand_chacha::ChaCha8Rng::seed_from_u64(3)).to_tensor::<2>(&d);
        let run = |steps: usize, solver: Solver| {
            let times = StepSchedule::Uniform.times(steps);
            HostTensor::from_tensor(
                integrate(&mut &field, x1.clone(), &Condition::none(), &times, solver).unwrap(),
            )
            .data
        };
        let exact = run(2048, Solver::Heun);
        let error = |x: Vec<f32>| {
            let se: f64 = x.iter().zip(&exact).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
            (se / x.len() as f64).sqrt()
        };
        let slopes: Vec<(Solver, f64, f64)> =
            [Solver::Euler, Solver::Heun, Solver::DpmSolver2m, Solver::UniPc]
                .into_iter()
                .map(|solver| {
                    let (e16, e64) = (error(run(16, solver)), error(run(64, solver)));
                    (solver, (e16 / e64).ln() / 4f64.ln(), e16)
                })
                .collect();
        for (solver, slope, e16) in &slopes {
            let want = match solver {
                Solver::Euler => 1.0,
                _ => 2.0,
            };
            assert!(
                (slope - want).abs() < 0.35,
                "{solver:?}: slope {slope:.2} (error at 16 steps {e16:.2e})"
            );
        }
        // At one evaluation per step, the multistep solvers are far closer than Euler, and
        // UniPC's free corrector closer still.
        assert!(slopes[2].2 < 0.3 * slopes[0].2, "{slopes:?}");
        assert!(slopes[3].2 < slopes[2].2, "{slopes:?}");
    }

    /// Integrating the exact velocity of a 2-D, two-component Gaussian mixture from N(0, I)
    /// must land on the mixture: component weights, means and variances.
    #[test]
    fn euler_and_heun_transport_noise_to_the_mixture() {
        let gmm = two_gaussians();
        let d = dev();
        let n = 4000;
        for (solver, steps) in [(Solver::Euler, 200), (Solver::Heun, 30)] {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
            let x1 = randn(vec![n, 2], &mut rng).to_tensor::<2>(&d);
            let field = gmm.field(&d);
            let x0 = integrate(
                &mut &field,
                x1,
                &Condition::none(),
                &StepSchedule::Uniform.times(steps),
                solver,
            )
            .unwrap();
            let x0 = HostTensor::from_tensor(x0).data;
            // Assign each sample to its most probable component (the exact posterior at t = 0).
            let mut stats = [[0.0f64; 5]; 2]; // count, sum x, sum y, sum x^2, sum y^2
            for p in x0.chunks(2) {
                let post = gmm.posterior(&[p[0] as f64, p[1] as f64], 0.0);
                let k = usize::from(post[1] > post[0]);
                let (x, y) = (p[0] as f64, p[1] as f64);
                let s = &mut stats[k];
                s[0] += 1.0;
                s[1] += x;
                s[2] += y;
                s[3] += x * x;
                s[4] += y * y;
            }
            for (k, &s) in stats.iter().enumerate() {
                let w = s[0] / n as f64;
                let (mx, my) = (s[1] / s[0], s[2] / s[0]);
                let (vx, vy) = (s[3] / s[0] - mx * mx, s[4] / s[0] - my * my);
                let msg = format!("{solver:?} k={k}: w {w:.3} mean ({mx:.3},{my:.3}) var ({vx:.3},{vy:.3})");
                assert!((w - gmm.weights[k]).abs() < 0.03, "{msg}");
                assert!(
                    (mx - gmm.means[k][0]).abs() < 0.06 && (my - gmm.means[k][1]).abs() < 0.06,
                    "{msg}"
                );
                assert!((vx / gmm.vars[k][0] - 1.0).abs() < 0.12, "{msg}");
                assert!((vy / gmm.vars[k][1] - 1.0).abs() < 0.12, "{msg}");
            }
        }
    }

    /// v = y for every coordinate: guidance must give null + w (y - null).
    struct ByClass;
    impl VelocityField<2> for ByClass {
        fn velocity(&self, x_t: Tensor<2>, _t: Tensor<1>, c: &Condition) -> Result<Tensor<2>, VelocityError> {
            let [n, d] = x_t.dims();
            let y = c.class.clone().ok_or(VelocityError::Other("no labels".into()))?;
            Ok(y.float().reshape([n, 1]).repeat_dim(1, d))
        }
    }

    #[test]
    fn classifier_free_guidance_extrapolates_from_the_null_class() {
        let d = dev();
        let x = Tensor::<2>::zeros([3, 2], &d);
        let t = Tensor::<1>::from_floats([0.1, 0.5, 0.9], &d);
        let y = Tensor::<1, Int>::from_ints([1, 2, 3], &d);
        for (scale, want) in [
            (1.0, [1.0, 2.0, 3.0]),
            (0.0, [10.0; 3]),
            (2.0, [-8.0, -6.0, -4.0]),
        ] {
            let g = ClassifierFreeGuidance {
                inner: ByClass,
                null_class: Some(10),
                scale,
            };
            let v = HostTensor::from_tensor(
                g.velocity(x.clone(), t.clone(), &Condition::class(y.clone()))
                    .unwrap(),
            )
            .data;
            assert_eq!(
                v,
                want.iter()
                    .flat_map(|&w| [w as f32, w as f32])
                    .collect::<Vec<_>>(),
                "scale {scale}"
            );
        }
    }

    /// The exact field of Gaussian data N(mu, s2 I) whose mean is the conditioning vector
    /// (mu = c; the zero vector, the null condition, gives N(0, s2 I)).
    struct GaussianByVector {
        s2: f64,
    }
    impl VelocityField<2> for GaussianByVector {
        fn velocity(&self, x_t: Tensor<2>, t: Tensor<1>, c: &Condition) -> Result<Tensor<2>, VelocityError> {
            let [n, _] = x_t.dims();
            let mu = c.vector.clone().unwrap_or_else(|| x_t.zeros_like());
            let t = t.reshape([n, 1]);
            let s = t.clone().neg() + 1.0; // 1 - t
            let var = s.clone().powi_scalar(2) * self.s2 + t.clone().powi_scalar(2);
            let gain = (t - s.clone() * self.s2) / var;
            Ok(gain * (x_t - mu.clone() * s) - mu)
        }
    }

    /// The field of N(mu, s2 I) is affine in mu, so guidance at scale w from the null vector is
    /// the exact field of N(w mu, s2 I), whose flow carries noise x1 to w mu + s x1: the guided
    /// samples, integrated with Heun, land there (per sample, each with its own vector).
    #[test]
    fn guidance_on_vectors_has_its_closed_form_on_gaussians() {
        let d = dev();
        let s2 = 0.25f64;
        let mu = [[1.0f32, -2.0], [0.5, 3.0], [-1.5, 0.0]];
        let x1 = [[0.3f32, -1.1], [1.4, 0.2], [-0.7, 0.9]];
        let c = Condition::vector(Tensor::<2>::from_floats(mu, &d));
        let times = StepSchedule::Uniform.times(64);
        for scale in [0.0, 1.0, 3.0] {
            let g = ClassifierFreeGuidance {
                inner: GaussianByVector { s2 },
                null_class: None,
                scale,
            };
            let x0 = integrate(
                &mut &g,
                Tensor::<2>::from_floats(x1, &d),
                &c,
                &times,
                Solver::Heun,
            )
            .unwrap();
            let x0 = HostTensor::from_tensor(x0).data;
            for (i, (m, z)) in mu.iter().zip(&x1).enumerate() {
                for j in 0..2 {
                    let want = scale * m[j] as f64 + s2.sqrt() * z[j] as f64;
                    let got = x0[i * 2 + j] as f64;
                    assert!(
                        (got - want).abs() < 1e-3,
                        "scale {scale}, sample {i}: {got} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn ddpm_schedules_invert() {
        for s in [DdpmSchedule::linear_default(), DdpmSchedule::Cosine { s: 0.008 }] {
            for u in [0.0, 0.1, 0.37, 0.8, 0.99] {
                let back = s.u_for_alpha_bar(s.alpha_bar(u));
                assert!((back - u).abs() < 1e-6, "{s:?} u={u} back={back}");
            }
        }
    }

    /// The exact epsilon of Gaussian data, converted to velocity, is the exact velocity.
    #[test]
    fn epsilon_of_the_exact_field_converts_to_the_exact_velocity() {
        let gmm = GaussianMixture {
            weights: vec![1.0],
            means: vec![vec![0.7, -1.5]],
            vars: vec![vec![0.3, 2.0]],
        };
        let d = dev();
        for schedule in [DdpmSchedule::linear_default(), DdpmSchedule::Cosine { s: 0.008 }] {
            let eps = ExactEpsilon { gmm: &gmm, schedule };
            let field = EpsilonToVelocity::new(eps, schedule, [-X0_CLAMP as f32, X0_CLAMP as f32]);
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
            let ts: Vec<f32> = (0..64).map(|i| 0.05 + 0.85 * i as f32 / 63.0).collect();
            let x = randn(vec![64, 2], &mut rng);
            let got = field
                .velocity(
                    x.to_tensor::<2>(&d),
                    Tensor::from_floats(ts.as_slice(), &d),
                    &Condition::none(),
                )
                .unwrap();
            let got = HostTensor::from_tensor(got).data;
            for (i, &t) in ts.iter().enumerate() {
                let want = gmm.velocity(&[x.data[2 * i] as f64, x.data[2 * i + 1] as f64], t as f64);
                for j in 0..2 {
                    assert!(
                        (got[2 * i + j] as f64 - want[j]).abs() < 2e-3,
                        "{schedule:?} t={t}: {} vs {}",
                        got[2 * i + j],
                        want[j]
                    );
                }
            }
        }
    }

    /// E[e | x_u] for VP-noised Gaussian data: the exact epsilon predictor, in DDPM time u.
    struct ExactEpsilon<'a> {
        gmm: &'a GaussianMixture,
        schedule: DdpmSchedule,
    }

    impl VelocityField<2> for ExactEpsilon<'_> {
        fn velocity(&self, x_u: Tensor<2>, u: Tensor<1>, _c: &Condition) -> Result<Tensor<2>, VelocityError> {
            let device = x_u.device();
            let x = HostTensor::from_tensor(x_u);
            let u = HostTensor::from_tensor(u).data;
            let (mu, var) = (&self.gmm.means[0], &self.gmm.vars[0]);
            let mut out = vec![0.0f32; x.numel()];
            for i in 0..u.len() {
                let ab = self.schedule.alpha_bar(u[i] as f64);
                let (a, s) = (ab.sqrt(), (1.0 - ab).sqrt());
                for j in 0..2 {
                    let xv = x.data[2 * i + j] as f64;
                    out[2 * i + j] = (s / (a * a * var[j] + s * s) * (xv - a * mu[j])) as f32;
                }
            }
            Ok(HostTensor::new(x.shape, out).to_tensor(&device))
        }
    }
}

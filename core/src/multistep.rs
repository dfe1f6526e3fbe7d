//! Multistep solvers for the flow-matching ODE, in data-prediction form: DPM-Solver++(2M) (Lu et
//! al. 2022) and UniPC (Zhao et al. 2023, its B(h) = e^h - 1 variant), one velocity evaluation a
//! step each.
//!
//! With x_t = (1 - t) x0 + t e (alpha = 1 - t, sigma = t), log-SNR lambda = ln(alpha / sigma)
//! and the data prediction x0(x_t, t) = x_t - t v, the exact step from s to t is
//!   x_t = (sigma_t / sigma_s) x_s + sigma_t * integral over lambda of e^lambda x0(lambda).
//! With x0 held at D over the step this is `x_t = (t / s) x_s + w D`, w = (1 - t) - (1 - s) t / s
//! (for a linear interpolant, Euler when D is this step's prediction). The solvers choose D:
//! - DPM-Solver++(2M) extrapolates linearly in lambda from this step's prediction and the last
//!   step's (UniPC's predictor is the same);
//! - UniPC then corrects the sample it reached once the next step has evaluated the field there:
//!   the evaluation is reused, so the corrector is free.
//!
//! lambda is infinite at both ends: the first step (from t = 1) has no usable history and is first
//! order; the last (to t = 0, where the solution is x0 itself) extrapolates the prediction linearly
//! in t instead. History is per row: each sample keeps its own.

use burn::prelude::*;

use crate::condition::Condition;
use crate::flow::{Drift, VelocityError};

/// A data prediction and the time it was made at.
struct Prediction<const D: usize> {
    x0: Tensor<D>,
    t: f64,
}

/// lambda(t) = ln((1 - t) / t): -inf at t = 1, +inf at t = 0.
fn log_snr(t: f64) -> f64 {
    ((1.0 - t) / t).ln()
}

/// The step from `x` at `s` to `t` with the data prediction held at `d`.
fn step<const D: usize>(x: Tensor<D>, s: f64, t: f64, d: Tensor<D>) -> Tensor<D> {
    let ratio = t / s;
    x * ratio + d * hold_weight(s, t)
}

/// w = (1 - t) - (1 - s) t / s: how much of a held prediction the step from s to t takes in.
fn hold_weight(s: f64, t: f64) -> f64 {
    (1.0 - t) - (1.0 - s) * t / s
}

/// DPM-Solver++(2M)'s prediction for the step from `now.t` to `t`, given the one before.
fn extrapolate<const D: usize>(now: &Prediction<D>, before: Option<&Prediction<D>>, t: f64) -> Tensor<D> {
    let Some(before) = before else {
        return now.x0.clone();
    };
    let h = log_snr(t) - log_snr(now.t);
    // 1 / (2 r) with r = h_prev / h (0 when the last step came from t = 1), or at the last step
    // the line through the two predictions in t, read at t = 0.
    let k = match h.is_finite() {
        true => h / (2.0 * (log_snr(now.t) - log_snr(before.t))),
        false => now.t / (before.t - now.t),
    };
    now.x0.clone() * (1.0 + k) - before.x0.clone() * k
}

/// UniPC's corrector: the sample at `t` taken again from `x_s` at `s`, now that the field has been
/// evaluated at the predicted sample (`new`, at t). `at_s` is the prediction at s, `before` the
/// one before it (order 2 when it exists and is not at t = 1, else order 1).
fn correct<const D: usize>(
    x_s: Tensor<D>,
    at_s: &Prediction<D>,
    before: Option<&Prediction<D>>,
    new: &Tensor<D>,
    t: f64,
) -> Tensor<D> {
    let s = at_s.t;
    let m0 = at_s.x0.clone();
    let h = log_snr(t) - log_snr(s);
    let d_new = new.clone() - m0.clone(); // D1_t
    let correction = match before.filter(|b| log_snr(b.t).is_finite()) {
        Some(b) if h.is_finite() => {
            // Solve R rho = b (UniPC's order-2 system, B(h) = e^h - 1, hh = -h).
            let hh = -h;
            let phi_1 = hh.exp_m1();
            let phi_k1 = phi_1 / hh - 1.0;
            let b1 = phi_k1 / phi_1;
            let b2 = 2.0 * (phi_k1 / hh - 0.5) / phi_1;
            let rk = (log_snr(b.t) - log_snr(s)) / h;
            let rho0 = (b1 - b2) / (1.0 - rk);
            let rho1 = b1 - rho0;
            (b.x0.clone() - m0.clone()) * (rho0 / rk) + d_new * rho1
        }
        _ => d_new * 0.5,
    };
    // -alpha_t B(h) = w: the correction enters as the held prediction does.
    step(x_s, s, t, m0) + correction * hold_weight(s, t)
}

/// Integrate `dx/dt = v` over `times` (1 down to 0) with DPM-Solver++(2M), or UniPC when
/// `corrector`; one evaluation per step.
pub fn integrate<const D: usize>(
    field: &mut dyn Drift<D>,
    x1: Tensor<D>,
    c: &Condition,
    times: &[f64],
    corrector: bool,
) -> Result<Tensor<D>, VelocityError> {
    let n = x1.dims()[0];
    let device = x1.device();
    let mut x = x1;
    // The predictions of the last two steps (oldest first), and the sample the last step left.
    let mut history: Vec<Prediction<D>> = Vec::with_capacity(3);
    let mut last_sample: Option<Tensor<D>> = None;
    for w in times.windows(2) {
        let (t, t_next) = (w[0], w[1]);
        let v = field.drift(x.clone(), Tensor::<1>::full([n], t as f32, &device), c)?;
        let x0 = x.clone() - v * t;
        if let (true, Some(x_s), Some(at_s)) = (corrector, last_sample.take(), history.last()) {
            let before = history.len().checked_sub(2).map(|i| &history[i]);
            x = correct(x_s, at_s, before, &x0, t);
        }
        history.push(Prediction { x0, t });
        if history.len() > 2 {
            history.remove(0);
        }
        let now = history.last().expect("just pushed");
        let d = extrapolate(now, history.len().checked_sub(2).map(|i| &history[i]), t_next);
        last_sample = Some(x.clone());
        x = step(x, t, t_next, d);
    }
    Ok(x)
}

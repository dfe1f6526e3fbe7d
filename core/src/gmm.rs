//! Gaussian mixtures with diagonal covariances: the project's closed-form oracle.
//!
//! For data x0 ~ sum_k w_k N(mu_k, diag(s_k^2)) on the path x_t = (1 - t) x0 + t e, everything the
//! method needs has a closed form (docs/ARCHITECTURE.md, "The math convention"):
//! - the marginal of component k: x_t | k ~ N((1 - t) mu_k, (1 - t)^2 s_k^2 + t^2);
//! - the posterior (the ideal router): p(k | x_t) ∝ w_k N(x_t; (1 - t) mu_k, (1 - t)^2 s_k^2 + t^2);
//! - the velocity of the expert trained on component k alone:
//!   v_k = E[e - x0 | x_t, k] = (t - (1 - t) s_k^2) / var_k(t) (x_t - (1 - t) mu_k) - mu_k;
//! - the global velocity: v = sum_k p(k | x_t) v_k.
//!
//! Host-side, in f64. Tests of samplers, routers and the ensemble compare against these values.

use burn::prelude::*;
use rand::Rng;
use rand::distr::weighted::WeightedIndex;
use rand_distr::{Distribution as _, StandardNormal};
use serde::{Deserialize, Serialize};

use crate::flow::{Condition, VelocityError, VelocityField};
use crate::host::HostTensor;

/// A mixture of axis-aligned Gaussians in `dim` dimensions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GaussianMixture {
    /// Component weights w_k (sum to 1).
    pub weights: Vec<f64>,
    /// Component means mu_k, each of length `dim`.
    pub means: Vec<Vec<f64>>,
    /// Diagonal covariances s_k^2, each of length `dim`.
    pub vars: Vec<Vec<f64>>,
}

impl GaussianMixture {
    pub fn k(&self) -> usize {
        self.weights.len()
    }

    pub fn dim(&self) -> usize {
        self.means[0].len()
    }

    /// Draw `n` samples and their component ids.
    pub fn sample(&self, n: usize, rng: &mut impl Rng) -> (HostTensor, Vec<usize>) {
        let pick = WeightedIndex::new(&self.weights).expect("mixture weights are positive");
        let d = self.dim();
        let mut data = Vec::with_capacity(n * d);
        let mut ks = Vec::with_capacity(n);
        for _ in 0..n {
            let k = pick.sample(rng);
            for j in 0..d {
                let z: f64 = StandardNormal.sample(rng);
                data.push((self.means[k][j] + self.vars[k][j].sqrt() * z) as f32);
            }
            ks.push(k);
        }
        (HostTensor::new(vec![n, d], data), ks)
    }

    /// log w_k + log N(x_t; (1 - t) mu_k, var_k(t)) for every k.
    fn log_joint(&self, x: &[f64], t: f64, weights: &[f64]) -> Vec<f64> {
        (0..self.k())
            .map(|k| {
                let mut lp = weights[k].ln();
                for (j, &xj) in x.iter().enumerate() {
                    let var = (1.0 - t).powi(2) * self.vars[k][j] + t * t;
                    let r = xj - (1.0 - t) * self.means[k][j];
                    lp -= 0.5 * (r * r / var + var.ln() + (2.0 * std::f64::consts::PI).ln());
                }
                lp
            })
            .collect()
    }

    /// The posterior p(k | x_t, t): the ideal router.
    pub fn posterior(&self, x: &[f64], t: f64) -> Vec<f64> {
        self.posterior_with_weights(x, t, &self.weights)
    }

    /// The posterior with other component weights `weights` in place of w_k (they sum to 1; a
    /// zero weight gives probability 0): with p(k | c), the class-conditional posterior
    /// p(k | x_t, c) of components whose shape does not depend on c.
    pub fn posterior_with_weights(&self, x: &[f64], t: f64, weights: &[f64]) -> Vec<f64> {
        let lj = self.log_joint(x, t, weights);
        let m = lj.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let p: Vec<f64> = lj.iter().map(|l| (l - m).exp()).collect();
        let z: f64 = p.iter().sum();
        p.into_iter().map(|p| p / z).collect()
    }

    /// v_k(x_t, t): the optimal velocity of a model trained on component k alone.
    pub fn component_velocity(&self, k: usize, x: &[f64], t: f64) -> Vec<f64> {
        x.iter()
            .enumerate()
            .map(|(j, &xj)| {
                let (mu, s2) = (self.means[k][j], self.vars[k][j]);
                let var = (1.0 - t).powi(2) * s2 + t * t;
                (t - (1.0 - t) * s2) / var * (xj - (1.0 - t) * mu) - mu
            })
            .collect()
    }

    /// The global velocity sum_k p(k | x_t) v_k(x_t, t).
    pub fn velocity(&self, x: &[f64], t: f64) -> Vec<f64> {
        let p = self.posterior(x, t);
        let mut v = vec![0.0; x.len()];
        for (k, pk) in p.iter().enumerate() {
            for (vj, ckj) in v.iter_mut().zip(self.component_velocity(k, x, t)) {
                *vj += pk * ckj;
            }
        }
        v
    }

    /// The global velocity as a [`VelocityField`] on `device`.
    pub fn field(&self, device: &Device) -> MixtureField<'_> {
        MixtureField {
            gmm: self,
            component: None,
            device: device.clone(),
        }
    }

    /// The velocity of component `k` alone (a closed-form expert) as a [`VelocityField`].
    pub fn component_field(&self, k: usize, device: &Device) -> MixtureField<'_> {
        MixtureField {
            gmm: self,
            component: Some(k),
            device: device.clone(),
        }
    }
}

/// A closed-form velocity field of a [`GaussianMixture`] (whole, or one component).
pub struct MixtureField<'a> {
    gmm: &'a GaussianMixture,
    component: Option<usize>,
    device: Device,
}

impl VelocityField<2> for MixtureField<'_> {
    fn velocity(&self, x_t: Tensor<2>, t: Tensor<1>, _c: &Condition) -> Result<Tensor<2>, VelocityError> {
        let x = HostTensor::from_tensor(x_t);
        let t = HostTensor::from_tensor(t).data;
        let d = x.shape[1];
        let mut out = Vec::with_capacity(x.numel());
        for (i, row) in x.data.chunks(d).enumerate() {
            let row: Vec<f64> = row.iter().map(|&v| v as f64).collect();
            let v = match self.component {
                None => self.gmm.velocity(&row, t[i] as f64),
                Some(k) => self.gmm.component_velocity(k, &row, t[i] as f64),
            };
            out.extend(v.into_iter().map(|v| v as f32));
        }
        Ok(HostTensor::new(x.shape, out).to_tensor(&self.device))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The component velocity is E[e - x0 | x_t]: check it against a Monte-Carlo estimate.
    #[test]
    fn component_velocity_is_the_conditional_expectation() {
        use rand::SeedableRng;
        let g = GaussianMixture {
            weights: vec![1.0],
            means: vec![vec![1.5]],
            vars: vec![vec![0.4]],
        };
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let t = 0.6;
        // Bin samples of x_t near x* and average e - x0 there.
        let x_star = 0.5;
        let (mut sum, mut n) = (0.0, 0.0);
        for _ in 0..400_000 {
            let z0: f64 = StandardNormal.sample(&mut rng);
            let e: f64 = StandardNormal.sample(&mut rng);
            let x0 = 1.5 + 0.4f64.sqrt() * z0;
            let xt = (1.0 - t) * x0 + t * e;
            if (xt - x_star).abs() < 0.01 {
                sum += e - x0;
                n += 1.0;
            }
        }
        let mc = sum / n;
        let exact = g.component_velocity(0, &[x_star], t)[0];
        assert!((mc - exact).abs() < 0.05, "mc {mc} exact {exact} (n = {n})");
    }

    #[test]
    fn posterior_is_the_prior_at_pure_noise() {
        let g = GaussianMixture {
            weights: vec![0.2, 0.5, 0.3],
            means: vec![vec![-3.0, 0.0], vec![0.0, 3.0], vec![3.0, 0.0]],
            vars: vec![vec![0.1, 0.1]; 3],
        };
        let p = g.posterior(&[0.4, -1.0], 1.0);
        for (a, b) in p.iter().zip(&g.weights) {
            assert!((a - b).abs() < 1e-12);
        }
        let p0 = g.posterior(&[2.9, 0.1], 0.0);
        assert!(p0[2] > 0.999);
    }
}

//! The router's side of the sampler: anything that gives the cluster posterior per sample,
//! p(k | x_t, t), or p(k | x_t, t, c) when it is conditioned and given the condition.

use ddm_core::burn::prelude::*;
use ddm_core::burn::tensor::activation::softmax;
use ddm_core::condition::Condition;
use ddm_core::host::HostTensor;
use ddm_router::analytic::AnalyticRouter;
use ddm_router::net::RouterNet;

/// The cluster posterior per sample.
pub trait Posterior {
    fn k(&self) -> usize;
    /// Classes the posterior is conditioned on (0: it ignores any class it is given).
    fn classes(&self) -> usize;
    /// The length of the conditioning vectors it reads (None: it reads none).
    fn condition_dim(&self) -> Option<usize> {
        None
    }
    /// The width of the token states it reads (None: it reads no token sequences).
    fn token_dim(&self) -> Option<usize> {
        None
    }
    /// # Shapes
    /// - `x_t`: `[N, X]`, `t`: `[N]`, `c`: the N samples' condition (a class id `[N]`, the null
    ///   class = `classes()`; vectors `[N, Dc]`; token sequences `[N, L, Dt]` + `[N, L]`) -> N
    ///   rows of K probabilities
    fn probs(&self, x_t: &Tensor<2>, t: &Tensor<1>, c: &Condition) -> Vec<Vec<f64>>;
}

/// A trained router network.
pub struct LearnedRouter {
    pub net: RouterNet,
    pub k: usize,
}

impl Posterior for LearnedRouter {
    fn k(&self) -> usize {
        self.k
    }

    fn classes(&self) -> usize {
        self.net.classes()
    }

    fn condition_dim(&self) -> Option<usize> {
        self.net.condition_dim()
    }

    fn token_dim(&self) -> Option<usize> {
        self.net.token_dim()
    }

    fn probs(&self, x_t: &Tensor<2>, t: &Tensor<1>, c: &Condition) -> Vec<Vec<f64>> {
        let logits = self.net.logits(x_t.clone(), t.clone(), c);
        let p = HostTensor::from_tensor(softmax(logits, 1)); // device sync
        p.data
            .chunks(self.k)
            .map(|r| r.iter().map(|&v| v as f64).collect())
            .collect()
    }
}

impl Posterior for AnalyticRouter {
    fn k(&self) -> usize {
        AnalyticRouter::k(self)
    }

    fn classes(&self) -> usize {
        AnalyticRouter::classes(self)
    }

    fn condition_dim(&self) -> Option<usize> {
        AnalyticRouter::condition_dim(self)
    }

    /// Conditioning vectors weigh each cluster by its Gaussian of them (when the islands published
    /// one); token sequences are ignored: the analytic router has no model of p(k | c) for them.
    fn probs(&self, x_t: &Tensor<2>, t: &Tensor<1>, c: &Condition) -> Vec<Vec<f64>> {
        let x = HostTensor::from_tensor(x_t.clone());
        let t = HostTensor::from_tensor(t.clone()).data;
        let classes = AnalyticRouter::classes(self);
        // Class ids per row; the null class (and any id of an unconditioned router) is None.
        let y: Vec<Option<usize>> = match c.class_ids() {
            Some(ids) if classes > 0 => ids
                .into_iter()
                .map(|c| (c >= 0 && (c as usize) < classes).then_some(c as usize))
                .collect(),
            _ => vec![None; t.len()],
        };
        // Vectors per row, for a router that reads them.
        let vectors: Vec<Option<Vec<f64>>> = match (&c.vector, self.condition_dim()) {
            (Some(v), Some(dc)) => HostTensor::from_tensor(v.clone())
                .data
                .chunks(dc)
                .map(|r| Some(r.iter().map(|&v| v as f64).collect()))
                .collect(),
            _ => vec![None; t.len()],
        };
        let d = x.shape[1];
        x.data
            .chunks(d)
            .zip(t)
            .zip(y)
            .zip(vectors)
            .map(|(((r, t), class), v)| {
                let r: Vec<f64> = r.iter().map(|&v| v as f64).collect();
                self.posterior_with(&r, t as f64, class, v.as_deref())
            })
            .collect()
    }
}

//! Data parallelism inside one island: several devices train one model on each batch.
//!
//! The first device holds the weights, the optimizer and the EMA. Before each step every further
//! device gets a copy of the weights ([`replicas`]); the task computes each replica's loss on its
//! share of the batch ([`shards`], `Task::shard_losses`), weighted by that share; each replica's
//! backward runs on its device; the gradients are summed on the first device ([`gather`]), which
//! takes the optimizer step. The result is the one-device step on the same batch, up to the order
//! of floating-point sums. The weights and gradients travel through burn's `to_device` (through
//! host memory where a backend has no device-to-device copy): a gather and a broadcast, not an
//! all-reduce.

use ddm_core::burn::module::{Module, ModuleVisitor, Param};
use ddm_core::burn::optim::GradientsParams;
use ddm_core::burn::prelude::*;

/// `b` rows split across `n` devices as evenly as possible: each device's `(start, len)`, the
/// first `b % n` one row longer.
pub fn shards(b: usize, n: usize) -> Vec<(usize, usize)> {
    let mut start = 0;
    (0..n)
        .map(|i| {
            let len = b / n + usize::from(i < b % n);
            start += len;
            (start - len, len)
        })
        .collect()
}

/// The model on every device: itself on the first, a copy (new leaves with the same parameter
/// ids, taking gradients) on each further one.
pub fn replicas<M: Module + Clone>(model: &M, devices: &[Device]) -> Vec<M> {
    let mut all = vec![model.clone()];
    all.extend(devices.iter().skip(1).map(|d| model.clone().fork(d)));
    all
}

/// Sums each parameter's gradients from every replica onto `device`.
struct Gather<'a> {
    parts: Vec<GradientsParams>,
    sum: GradientsParams,
    device: &'a Device,
}

impl ModuleVisitor for Gather<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let mut total: Option<Tensor<D>> = None;
        for part in &mut self.parts {
            if let Some(g) = part.remove::<D>(param.id) {
                let g = g.to_device(self.device);
                total = Some(match total {
                    Some(t) => t + g,
                    None => g,
                });
            }
        }
        if let Some(t) = total {
            self.sum.register(param.id, t);
        }
    }
}

/// The replicas' gradients of `model`'s parameters, summed on `device` (one replica's unchanged).
pub fn gather<M: Module>(model: &M, mut parts: Vec<GradientsParams>, device: &Device) -> GradientsParams {
    if parts.len() == 1 {
        return parts.remove(0);
    }
    let mut g = Gather {
        parts,
        sum: GradientsParams::new(),
        device,
    };
    model.visit(&mut g);
    g.sum
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_cover_the_batch_evenly() {
        assert_eq!(shards(10, 3), vec![(0, 4), (4, 3), (7, 3)]);
        assert_eq!(shards(8, 2), vec![(0, 4), (4, 4)]);
        assert_eq!(shards(5, 1), vec![(0, 5)]);
    }
}

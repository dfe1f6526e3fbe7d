//! GroupNorm with its affine and an optional SiLU after it, as one op: every norm of the VAE
//! (`silu(norm(x))` before each convolution of a ResNet block and before `conv_out`, plain before
//! the mid block's attention).
//!
//! burn's `nn::GroupNorm` composes it of eight ops (mean, subtract, square, mean, divide, reshape,
//! scale, shift) and a SiLU adds two; backward, autodiff materialises the broadcast statistics and
//! reduces the broadcast affine's gradients, about 17% of a VAE training step. Here it is one pass
//! forward (statistics, normalise, affine, SiLU) and one backward (recomputing the statistics from
//! the input), through the same backend extension mechanism as [`crate::fused`]: [`GroupNormOps`]
//! runs the kernels on the CPU backend (f32) and its autodiff; any other device or dtype runs
//! [`composite`], which is also the reference the kernels are tested against
//! (`core/tests/fused.rs`).
//!
//! Each (sample, group) is one task; the gradients of gamma and beta are summed per sample in the
//! task and then over samples in order, so the results are the same bits on any thread count.
//!
//! Letters in shape comments: N batch, C channels, G groups, S positions (H x W), M = C / G x S,
//! the values one group's statistics are taken over.

use crate::fused::{dense, fused_here, lane_sum, par_fill, part, parts, sum, tensor, values, widest_simd};
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::{Autodiff, NodeId};
use burn::backend::flex::ops::vexp::sigmoid_f32;
use burn::backend::flex::{Flex, FlexTensor};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Dispatch, backend_extension};
use burn::prelude::*;
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// `silu?(γ (x - mean) / sqrt(var + eps) + β)`, mean and (biased) variance over each group of
/// `C / groups` consecutive channels and all positions of a sample, γ and β per channel.
///
/// # Shapes
/// - `x`: `[N, C, *]` (any rank from 3), `gamma`, `beta`: `[C]` -> `[N, C, *]`
pub fn group_norm<const D: usize>(
    x: Tensor<D>,
    gamma: Tensor<1>,
    beta: Tensor<1>,
    groups: usize,
    eps: f64,
    silu: bool,
) -> Tensor<D> {
    let [n, c] = [x.dims()[0], x.dims()[1]];
    assert!(
        D >= 3 && c.is_multiple_of(groups) && gamma.dims() == [c] && beta.dims() == [c],
        "group_norm takes [N, C, *] with C a multiple of the groups and [C] gamma and beta"
    );
    if !fused_here(&x) {
        return composite::group_norm(x, gamma, beta, groups, eps, silu);
    }
    // [N, C, *] -> [N, C, S]: the kernels see each sample's channels as rows of positions.
    let dims = x.dims();
    let x = x.reshape([n, c, dims[2..].iter().product()]);
    let y = <Dispatch as GroupNormOps>::group_norm(
        x.into_dispatch(),
        gamma.into_dispatch(),
        beta.into_dispatch(),
        groups,
        eps,
        silu,
    );
    Tensor::<3>::from_dispatch(y).reshape(dims)
}

/// The same operation composed of burn ops (as burn's `nn::GroupNorm`, then SiLU): the path on GPU
/// backends, and the reference the kernels are tested against.
pub mod composite {
    use burn::prelude::*;
    use burn::tensor::DType;
    use burn::tensor::activation::silu as silu_op;

    pub fn group_norm<const D: usize>(
        x: Tensor<D>,
        gamma: Tensor<1>,
        beta: Tensor<1>,
        groups: usize,
        eps: f64,
        silu: bool,
    ) -> Tensor<D> {
        let dims = x.dims();
        let (n, c) = (dims[0], dims[1]);
        let dtype = x.dtype();
        // [N, C, *] -> [N, G, M]; statistics in f32 whatever the dtype (a half sum of squares
        // overflows), as burn's GroupNorm.
        let g = x.reshape([n, groups, dims[1..].iter().product::<usize>() / groups]);
        let g = if dtype == DType::F32 {
            g
        } else {
            g.cast(DType::F32)
        };
        let centred = g.clone() - g.mean_dim(2);
        let var = centred.clone().square().mean_dim(2);
        let xhat = (centred / (var + eps).sqrt()).cast(dtype).reshape(dims);
        let mut affine = [1; D];
        affine[1] = c;
        let y = xhat * gamma.reshape(affine) + beta.reshape(affine);
        if silu { silu_op(y) } else { y }
    }
}

// ------------------------------------------------------------------------------------------------
// The extension: the forward routed through Dispatch, the backward on the inner backend
// ------------------------------------------------------------------------------------------------

/// GroupNorm (+ SiLU), routed by `Dispatch` to the CPU backend and its autodiff.
#[backend_extension(Flex, Autodiff)]
pub trait GroupNormOps: Backend {
    /// `x`: `[N, C, S]`, `gamma`, `beta`: `[C]` -> `[N, C, S]`.
    fn group_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        groups: usize,
        eps: f64,
        silu: bool,
    ) -> FloatTensor<Self>;
}

/// The sizes and constants of one call, which the backward needs again.
#[derive(Clone, Copy, Debug)]
pub struct GroupNormArgs {
    pub groups: usize,
    pub eps: f64,
    pub silu: bool,
}

/// The backward of [`GroupNormOps::group_norm`] on a concrete backend.
pub trait GroupNormBackward: Backend {
    /// (d/dx `[N, C, S]`, d/dgamma `[C]`, d/dbeta `[C]`) given the output's gradient `grad`.
    fn group_norm_backward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        args: GroupNormArgs,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
}

impl<B: GroupNormOps + GroupNormBackward, C: CheckpointStrategy> GroupNormOps for Autodiff<B, C> {
    fn group_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        groups: usize,
        eps: f64,
        silu: bool,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct GroupNorm;

        impl<B: GroupNormBackward> Backward<B, 3> for GroupNorm {
            /// (x, gamma, beta, the call's constants)
            type State = (NodeId, NodeId, NodeId, GroupNormArgs);

            fn backward(
                self,
                ops: Ops<Self::State, 3>,
                grads: &mut Gradients,
                checkpointer: &mut Checkpointer,
            ) {
                let [node_x, node_gamma, node_beta] = ops.parents;
                let grad = grads.consume::<B>(&ops.node);
                let (x, gamma, beta, args) = ops.state;
                let x = checkpointer.retrieve_node_output(x);
                let gamma = checkpointer.retrieve_node_output(gamma);
                let beta = checkpointer.retrieve_node_output(beta);
                let (dx, dgamma, dbeta) = B::group_norm_backward(x, gamma, beta, grad, args);
                for (node, g) in [(node_x, dx), (node_gamma, dgamma), (node_beta, dbeta)] {
                    if let Some(node) = node {
                        grads.register::<B>(node.id, g);
                    }
                }
            }
        }

        let args = GroupNormArgs { groups, eps, silu };
        let parents = [x.node(), gamma.node(), beta.node()];
        match GroupNorm.prepare::<C>(parents).compute_bound().stateful() {
            OpsKind::Tracked(mut prep) => {
                let state = (
                    prep.checkpoint(&x),
                    prep.checkpoint(&gamma),
                    prep.checkpoint(&beta),
                    args,
                );
                let y = B::group_norm(
                    x.into_primitive(),
                    gamma.into_primitive(),
                    beta.into_primitive(),
                    groups,
                    eps,
                    silu,
                );
                prep.finish(state, y)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::group_norm(
                x.into_primitive(),
                gamma.into_primitive(),
                beta.into_primitive(),
                groups,
                eps,
                silu,
            )),
        }
    }
}

// ------------------------------------------------------------------------------------------------
// CPU kernels (Flex, f32)
// ------------------------------------------------------------------------------------------------

/// `[N, C, S]` of a rank-3 tensor, checking `[C]` gamma and beta and the groups against it.
fn ncs(x: &FlexTensor, gamma: &FlexTensor, beta: &FlexTensor, groups: usize) -> (usize, usize, usize) {
    let s = x.layout().shape();
    assert_eq!(s.num_dims(), 3, "the GroupNorm kernels take [N, C, S]");
    let (n, c, len) = (s[0], s[1], s[2]);
    assert!(
        groups > 0 && c.is_multiple_of(groups),
        "{c} channels in {groups} groups"
    );
    for v in [gamma, beta] {
        assert_eq!(v.layout().shape().as_slice(), &[c], "gamma and beta must be [C]");
    }
    (n, c, len)
}

/// Mean and 1/sqrt(var + eps) of one group's values (biased variance, two passes).
#[inline(always)]
fn group_stats(x: &[f32], eps: f32) -> (f32, f32) {
    let m = x.len() as f32;
    let mean = sum(x) / m;
    let var = lane_sum(x, x, |v, _| (v - mean) * (v - mean)) / m;
    (mean, 1.0 / (var + eps).sqrt())
}

widest_simd! {
    fn group_forward(x: &[f32], gamma: &[f32], beta: &[f32], eps: f32, silu: bool, y: &mut [MaybeUninit<f32>]) {
        // x, y: [C / G, S] of one (sample, group); gamma, beta: the group's [C / G].
        let s = x.len() / gamma.len();
        assert!(y.len() == x.len() && x.len() == s * gamma.len() && beta.len() == gamma.len());
        let (mean, rstd) = group_stats(x, eps);
        for ((x, y), (&gamma, &beta)) in x.chunks_exact(s).zip(y.chunks_exact_mut(s)).zip(gamma.iter().zip(beta)) {
            let affine = x.iter().map(|&x| (x - mean) * rstd * gamma + beta);
            if silu {
                y.iter_mut().zip(affine).for_each(|(y, v)| _ = y.write(v * sigmoid_f32(v)));
            } else {
                y.iter_mut().zip(affine).for_each(|(y, v)| _ = y.write(v));
            }
        }
    }
}

widest_simd! {
    fn group_backward(
        x: &[f32],
        affine: (&[f32], &[f32]),
        g: &[f32],
        consts: (f32, bool),
        dx: &mut [MaybeUninit<f32>],
        sums: (&mut [f32], &mut [f32]),
    ) {
        let ((gamma, beta), (eps, silu), (dgamma, dbeta)) = (affine, consts, sums);
        // x, g, dx: [C / G, S] of one (sample, group); gamma, beta, dgamma, dbeta: its [C / G].
        let s = x.len() / gamma.len();
        assert!(g.len() == x.len() && dx.len() == x.len() && x.len() == s * gamma.len());
        let (mean, rstd) = group_stats(x, eps);
        // d x̂ = dy γ, dy the gradient before the SiLU; kept for the second pass.
        let mut dxhat = vec![0f32; x.len()];
        let rows = x.chunks_exact(s).zip(g.chunks_exact(s)).zip(dxhat.chunks_exact_mut(s));
        for (c, ((x, g), d)) in rows.enumerate() {
            if silu {
                // d/dv [v s(v)] = s (1 + v (1 - s)), v the affine's output
                for ((d, &x), &g) in d.iter_mut().zip(x).zip(g) {
                    let v = (x - mean) * rstd * gamma[c] + beta[c];
                    let sg = sigmoid_f32(v);
                    *d = g * sg * (1.0 + v * (1.0 - sg));
                }
            } else {
                d.copy_from_slice(g);
            }
            dgamma[c] = lane_sum(d, x, |d, x| d * ((x - mean) * rstd));
            dbeta[c] = sum(d);
            d.iter_mut().for_each(|d| *d *= gamma[c]);
        }
        // dx = rstd (d x̂ - mean(d x̂) - x̂ mean(d x̂ x̂))
        let m = x.len() as f32;
        let a = sum(&dxhat) / m;
        let b = lane_sum(&dxhat, x, |d, x| d * ((x - mean) * rstd)) / m;
        for ((dx, &d), &x) in dx.iter_mut().zip(&dxhat).zip(x) {
            dx.write(rstd * (d - a - (x - mean) * rstd * b));
        }
    }
}

impl GroupNormOps for Flex {
    fn group_norm(
        x: FlexTensor,
        gamma: FlexTensor,
        beta: FlexTensor,
        groups: usize,
        eps: f64,
        silu: bool,
    ) -> FlexTensor {
        let (x, gamma, beta) = (dense(x), dense(gamma), dense(beta));
        let (n, c, s) = ncs(&x, &gamma, &beta, groups);
        let (xs, gamma, beta) = (values(&x), values(&gamma), values(&beta));
        let (cg, len) = (c / groups, c / groups * s);
        // One (sample, group) per task: its [C / G, S] values, its channels' gamma and beta.
        let y = par_fill(n * c * s, len, parts(n * c * s, len), |i, y, ()| {
            let g = i % groups;
            group_forward(
                part(xs, i, len),
                part(gamma, g, cg),
                part(beta, g, cg),
                eps as f32,
                silu,
                y,
            )
        });
        tensor(y, vec![n, c, s])
    }
}

impl GroupNormBackward for Flex {
    fn group_norm_backward(
        x: FlexTensor,
        gamma: FlexTensor,
        beta: FlexTensor,
        grad: FlexTensor,
        args: GroupNormArgs,
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        let groups = args.groups;
        let (x, gamma, beta, grad) = (dense(x), dense(gamma), dense(beta), dense(grad));
        let (n, c, s) = ncs(&x, &gamma, &beta, groups);
        let (xs, gamma, beta, g) = (values(&x), values(&gamma), values(&beta), values(&grad));
        let (cg, len) = (c / groups, c / groups * s);
        // Each task writes its sample's [C / G] rows of d gamma and d beta ([N, C] each); the
        // samples are then added in order.
        let (mut dgamma, mut dbeta) = (vec![0f32; n * c], vec![0f32; n * c]);
        let sums = dgamma.par_chunks_mut(cg).zip(dbeta.par_chunks_mut(cg));
        let dx = par_fill(n * c * s, len, sums, |i, dx, sums| {
            let k = i % groups;
            let affine = (part(gamma, k, cg), part(beta, k, cg));
            group_backward(
                part(xs, i, len),
                affine,
                part(g, i, len),
                (args.eps as f32, args.silu),
                dx,
                sums,
            )
        });
        let over_samples = |d: Vec<f32>| {
            let total = d.chunks_exact(c).fold(vec![0f32; c], |mut t, row| {
                t.iter_mut().zip(row).for_each(|(t, r)| *t += r);
                t
            });
            tensor(total, vec![c])
        };
        (
            tensor(dx, vec![n, c, s]),
            over_samples(dgamma),
            over_samples(dbeta),
        )
    }
}

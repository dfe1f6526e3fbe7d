//! Fused operations of the DiT and PixArt blocks, forward and backward.
//!
//! Written as burn tensor ops, each of these is a chain of passes over memory, and autodiff adds
//! as many again backward: the tanh GELU is seven ops on the widest activation of the block, the
//! LayerNorm + adaLN modulation six, the gated residual two. Here each is one op with a
//! hand-written backward (one pass forward, one backward), through burn's backend extension
//! mechanism:
//!
//! - [`FusedOps`] is the extension trait, routed by burn's `Dispatch` to `Flex` (the CPU kernels
//!   below) and to `Autodiff<Flex>` (which records a node whose backward calls [`FusedBackward`]).
//! - On any other device (wgpu, CUDA) or dtype the functions here run the composite burn ops,
//!   which are also the reference the kernels are tested against (`core/tests/fused.rs`).
//!
//! Every kernel computes each element with the same operations whatever the thread count, and the
//! reductions (the gradients of the per-sample modulation vectors) add over tokens in order, so
//! results are deterministic for a fixed seed on any number of threads.
//!
//! Letters in shape comments: N batch, T tokens, D hidden, L keys of a cross-attention (a caption).

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, unary};
use burn::backend::autodiff::{Autodiff, NodeId};
use burn::backend::flex::ops::vexp::{exp_f32, sigmoid_f32};
use burn::backend::flex::{Flex, FlexTensor};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Dispatch, DispatchDevice, backend_extension};
use burn::prelude::*;
use burn::tensor::DType;
use rayon::prelude::*;
use std::mem::MaybeUninit;

// ------------------------------------------------------------------------------------------------
// The operations on burn tensors (what the model calls)
// ------------------------------------------------------------------------------------------------

/// sqrt(2 / pi), the tanh GELU's constant.
const SQRT_2_OVER_PI: f32 = 0.797_884_6;
/// The tanh GELU's cubic coefficient.
const GELU_C: f32 = 0.044_715;

/// Whether a tensor runs the fused kernels: f32 on the CPU backend (with or without autodiff).
pub fn fused_here<const D: usize>(x: &Tensor<D>) -> bool {
    x.dtype() == DType::F32 && matches!(x.device().inner().as_dispatch(), DispatchDevice::Flex(_))
}

/// GELU with the tanh approximation (the reference's `nn.GELU(approximate="tanh")`), as the
/// identical `x * sigmoid(2 z)`, z = sqrt(2/pi) (x + 0.044715 x^3).
pub fn gelu_tanh<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    if fused_here(&x) {
        Tensor::from_dispatch(<Dispatch as FusedOps>::gelu_tanh(x.into_dispatch()))
    } else {
        composite::gelu_tanh(x)
    }
}

/// LayerNorm over D without affine parameters, then adaLN modulation: `x̂ (1 + scale) + shift`.
///
/// # Shapes
/// - `x`: `[N, T, D]`, `shift`, `scale`: `[N, D]` -> `[N, T, D]`
pub fn layer_norm_modulate(x: Tensor<3>, shift: Tensor<2>, scale: Tensor<2>, eps: f64) -> Tensor<3> {
    if fused_here(&x) {
        Tensor::from_dispatch(<Dispatch as FusedOps>::layer_norm_modulate(
            x.into_dispatch(),
            shift.into_dispatch(),
            scale.into_dispatch(),
            eps,
        ))
    } else {
        composite::layer_norm_modulate(x, shift, scale, eps)
    }
}

/// The adaLN-Zero gated residual: `x + gate h`, the gate broadcast over tokens.
///
/// # Shapes
/// - `x`, `h`: `[N, T, D]`, `gate`: `[N, D]` -> `[N, T, D]`
pub fn gated_residual(x: Tensor<3>, gate: Tensor<2>, h: Tensor<3>) -> Tensor<3> {
    if fused_here(&x) {
        Tensor::from_dispatch(<Dispatch as FusedOps>::gated_residual(
            x.into_dispatch(),
            gate.into_dispatch(),
            h.into_dispatch(),
        ))
    } else {
        composite::gated_residual(x, gate, h)
    }
}

/// Multi-head self-attention, softmax(q kᵀ / sqrt(hd)) v per head, straight from the fused qkv
/// projection to the token-major output the `proj` layer reads (no permuted copies of q, k, v or
/// of the output, one softmax pass).
///
/// # Shapes
/// - `qkv`: `[N, T, 3D]` (q, k, v, each `[h, hd]` per token) -> `[N, T, D]`
pub fn attention(qkv: Tensor<3>, heads: usize) -> Tensor<3> {
    if fused_here(&qkv) {
        return Tensor::from_dispatch(<Dispatch as FusedOps>::attention(qkv.into_dispatch(), heads));
    }
    #[cfg(feature = "gpu")]
    if crate::gpu::runs(&qkv) {
        return crate::gpu::attention(qkv, heads);
    }
    composite::attention(qkv, heads)
}

/// Multi-head cross-attention with a bias added to every score of a key (a caption's mask as 0 or
/// -10000): softmax(q kᵀ / sqrt(hd) + bias) v per head, from the queries and the keys and values
/// side by side to the token-major output the output projection reads. `bias` is a constant: it
/// gets no gradient.
///
/// # Shapes
/// - `q`: `[N, T, D]`, `kv`: `[N, L, 2D]` (k, then v, each `[h, hd]` per key), `bias`: `[N, L]`
///   -> `[N, T, D]`
pub fn cross_attention(q: Tensor<3>, kv: Tensor<3>, bias: Tensor<2>, heads: usize) -> Tensor<3> {
    if fused_here(&q) {
        return Tensor::from_dispatch(<Dispatch as FusedOps>::cross_attention(
            q.into_dispatch(),
            kv.into_dispatch(),
            bias.into_dispatch(),
            heads,
        ));
    }
    #[cfg(feature = "gpu")]
    if crate::gpu::runs(&q) {
        return crate::gpu::cross_attention(q, kv, bias, heads);
    }
    composite::cross_attention(q, kv, bias, heads)
}

/// LayerNorm over the last axis without affine parameters, with the given eps:
/// `(x - mean) / sqrt(var + eps)`.
pub fn layer_norm_eps<const D: usize>(x: Tensor<D>, eps: f64) -> Tensor<D> {
    let (var, mean) = x.clone().var_mean_bias(D - 1);
    (x - mean) / (var + eps).sqrt()
}

/// The same operations composed of burn ops: the path on GPU backends, and the reference the
/// fused kernels are tested against.
pub mod composite {
    use burn::prelude::*;
    use burn::tensor::activation::sigmoid;

    pub fn gelu_tanh<const D: usize>(x: Tensor<D>) -> Tensor<D> {
        let x3 = x.clone() * x.clone() * x.clone();
        let z = (x.clone() + x3 * super::GELU_C as f64) * (2.0 * super::SQRT_2_OVER_PI as f64);
        x * sigmoid(z)
    }

    pub fn layer_norm_modulate(x: Tensor<3>, shift: Tensor<2>, scale: Tensor<2>, eps: f64) -> Tensor<3> {
        let xhat = super::layer_norm_eps(x, eps);
        xhat * (scale.unsqueeze_dim::<3>(1) + 1.0) + shift.unsqueeze_dim::<3>(1)
    }

    pub fn gated_residual(x: Tensor<3>, gate: Tensor<2>, h: Tensor<3>) -> Tensor<3> {
        x + gate.unsqueeze_dim::<3>(1) * h
    }

    pub fn attention(qkv: Tensor<3>, heads: usize) -> Tensor<3> {
        use burn::tensor::module::attention;
        use burn::tensor::ops::AttentionModuleOptions;
        let [n, t, d3] = qkv.dims();
        let (d, hd) = (d3 / 3, d3 / 3 / heads);
        let qkv = qkv.reshape([n, t, 3, heads, hd]).permute([2, 0, 3, 1, 4]); // [3, N, h, T, hd]
        let part = |i: usize| qkv.clone().narrow(0, i, 1).reshape([n, heads, t, hd]);
        let options = AttentionModuleOptions::default();
        let out = attention(part(0), part(1), part(2), None, None, options); // [N, h, T, hd]
        out.swap_dims(1, 2).reshape([n, t, d])
    }

    pub fn cross_attention(q: Tensor<3>, kv: Tensor<3>, bias: Tensor<2>, heads: usize) -> Tensor<3> {
        use burn::tensor::module::attention;
        use burn::tensor::ops::AttentionModuleOptions;
        let [n, t, d] = q.dims();
        let (l, hd) = (kv.dims()[1], d / heads);
        let q = q.reshape([n, t, heads, hd]).swap_dims(1, 2); // [N, h, T, hd]
        let kv = kv.reshape([n, l, 2, heads, hd]).permute([2, 0, 3, 1, 4]); // [2, N, h, L, hd]
        let part = |i: usize| kv.clone().narrow(0, i, 1).reshape([n, heads, l, hd]);
        let bias = bias.reshape([n, 1, 1, l]).expand([n, heads, t, l]); // [N, h, T, L]
        let options = AttentionModuleOptions::default();
        let out = attention(q, part(0), part(1), None, Some(bias), options); // [N, h, T, hd]
        out.swap_dims(1, 2).reshape([n, t, d])
    }
}

// ------------------------------------------------------------------------------------------------
// The extension: forward ops routed through Dispatch, backward ops on the inner backend
// ------------------------------------------------------------------------------------------------

/// The fused forward operations, routed by `Dispatch` to the CPU backend and its autodiff.
#[backend_extension(Flex, Autodiff)]
pub trait FusedOps: Backend {
    /// `x * sigmoid(2 sqrt(2/pi) (x + 0.044715 x^3))`.
    fn gelu_tanh(x: FloatTensor<Self>) -> FloatTensor<Self>;
    /// `x`: `[N, T, D]`, `shift`, `scale`: `[N, D]` -> `[N, T, D]`.
    fn layer_norm_modulate(
        x: FloatTensor<Self>,
        shift: FloatTensor<Self>,
        scale: FloatTensor<Self>,
        eps: f64,
    ) -> FloatTensor<Self>;
    /// `x`, `h`: `[N, T, D]`, `gate`: `[N, D]` -> `[N, T, D]`.
    fn gated_residual(
        x: FloatTensor<Self>,
        gate: FloatTensor<Self>,
        h: FloatTensor<Self>,
    ) -> FloatTensor<Self>;
    /// `qkv`: `[N, T, 3D]` -> `[N, T, D]`.
    fn attention(qkv: FloatTensor<Self>, heads: usize) -> FloatTensor<Self>;
    /// `q`: `[N, T, D]`, `kv`: `[N, L, 2D]`, `bias`: `[N, L]` -> `[N, T, D]`.
    fn cross_attention(
        q: FloatTensor<Self>,
        kv: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        heads: usize,
    ) -> FloatTensor<Self>;
}

/// The backward of each fused op on a concrete backend: the gradients of its inputs given the
/// gradient `grad` of its output.
pub trait FusedBackward: Backend {
    /// d/dx of [`FusedOps::gelu_tanh`].
    fn gelu_tanh_backward(x: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self>;
    /// (d/dx `[N, T, D]`, d/dshift `[N, D]`, d/dscale `[N, D]`) of [`FusedOps::layer_norm_modulate`].
    fn layer_norm_modulate_backward(
        x: FloatTensor<Self>,
        scale: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        eps: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
    /// (d/dgate `[N, D]`, d/dh `[N, T, D]`) of [`FusedOps::gated_residual`] (d/dx is `grad`).
    fn gated_residual_backward(
        gate: FloatTensor<Self>,
        h: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);
    /// [`FusedOps::attention`] that also returns the attention probabilities `[N, h, T, T]`.
    fn attention_train(qkv: FloatTensor<Self>, heads: usize) -> (FloatTensor<Self>, FloatTensor<Self>);
    /// d/dqkv `[N, T, 3D]` of [`FusedOps::attention`], from its probabilities.
    fn attention_backward(
        qkv: FloatTensor<Self>,
        probs: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        heads: usize,
    ) -> FloatTensor<Self>;
    /// [`FusedOps::cross_attention`] that also returns the attention probabilities `[N, h, T, L]`.
    fn cross_attention_train(
        q: FloatTensor<Self>,
        kv: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        heads: usize,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);
    /// (d/dq `[N, T, D]`, d/dkv `[N, L, 2D]`) of [`FusedOps::cross_attention`], from its
    /// probabilities.
    fn cross_attention_backward(
        q: FloatTensor<Self>,
        kv: FloatTensor<Self>,
        probs: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        heads: usize,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);
}

impl<B: FusedOps + FusedBackward, C: CheckpointStrategy> FusedOps for Autodiff<B, C> {
    fn gelu_tanh(x: FloatTensor<Self>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct GeluTanh;

        impl<B: FusedBackward> Backward<B, 1> for GeluTanh {
            type State = NodeId;

            fn backward(self, ops: Ops<NodeId, 1>, grads: &mut Gradients, checkpointer: &mut Checkpointer) {
                let x = checkpointer.retrieve_node_output(ops.state);
                unary::<B, _>(ops.parents, ops.node, grads, |g| B::gelu_tanh_backward(x, g));
            }
        }

        match GeluTanh.prepare::<C>([x.node()]).compute_bound().stateful() {
            OpsKind::Tracked(mut prep) => {
                let state = prep.checkpoint(&x);
                prep.finish(state, B::gelu_tanh(x.into_primitive()))
            }
            OpsKind::UnTracked(prep) => prep.finish(B::gelu_tanh(x.into_primitive())),
        }
    }

    fn layer_norm_modulate(
        x: FloatTensor<Self>,
        shift: FloatTensor<Self>,
        scale: FloatTensor<Self>,
        eps: f64,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct LayerNormModulate;

        impl<B: FusedBackward> Backward<B, 3> for LayerNormModulate {
            /// (x, scale, eps)
            type State = (NodeId, NodeId, f64);

            fn backward(
                self,
                ops: Ops<Self::State, 3>,
                grads: &mut Gradients,
                checkpointer: &mut Checkpointer,
            ) {
                let [node_x, node_shift, node_scale] = ops.parents;
                let grad = grads.consume::<B>(&ops.node);
                let (x, scale, eps) = ops.state;
                let (x, scale) = (
                    checkpointer.retrieve_node_output(x),
                    checkpointer.retrieve_node_output(scale),
                );
                let (dx, dshift, dscale) = B::layer_norm_modulate_backward(x, scale, grad, eps);
                for (node, g) in [(node_x, dx), (node_shift, dshift), (node_scale, dscale)] {
                    if let Some(node) = node {
                        grads.register::<B>(node.id, g);
                    }
                }
            }
        }

        let parents = [x.node(), shift.node(), scale.node()];
        match LayerNormModulate.prepare::<C>(parents).compute_bound().stateful() {
            OpsKind::Tracked(mut prep) => {
                let state = (prep.checkpoint(&x), prep.checkpoint(&scale), eps);
                let y = B::layer_norm_modulate(
                    x.into_primitive(),
                    shift.into_primitive(),
                    scale.into_primitive(),
                    eps,
                );
                prep.finish(state, y)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::layer_norm_modulate(
                x.into_primitive(),
                shift.into_primitive(),
                scale.into_primitive(),
                eps,
            )),
        }
    }

    fn gated_residual(
        x: FloatTensor<Self>,
        gate: FloatTensor<Self>,
        h: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct GatedResidual;

        impl<B: FusedBackward> Backward<B, 3> for GatedResidual {
            /// (gate, h)
            type State = (NodeId, NodeId);

            fn backward(
                self,
                ops: Ops<Self::State, 3>,
                grads: &mut Gradients,
                checkpointer: &mut Checkpointer,
            ) {
                let [node_x, node_gate, node_h] = ops.parents;
                let grad = grads.consume::<B>(&ops.node);
                let (gate, h) = ops.state;
                let (gate, h) = (
                    checkpointer.retrieve_node_output(gate),
                    checkpointer.retrieve_node_output(h),
                );
                let (dgate, dh) = B::gated_residual_backward(gate, h, grad.clone());
                for (node, g) in [(node_x, grad), (node_gate, dgate), (node_h, dh)] {
                    if let Some(node) = node {
                        grads.register::<B>(node.id, g);
                    }
                }
            }
        }

        let parents = [x.node(), gate.node(), h.node()];
        match GatedResidual.prepare::<C>(parents).compute_bound().stateful() {
            OpsKind::Tracked(mut prep) => {
                let state = (prep.checkpoint(&gate), prep.checkpoint(&h));
                let y = B::gated_residual(x.into_primitive(), gate.into_primitive(), h.into_primitive());
                prep.finish(state, y)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::gated_residual(
                x.into_primitive(),
                gate.into_primitive(),
                h.into_primitive(),
            )),
        }
    }

    fn attention(qkv: FloatTensor<Self>, heads: usize) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct Attention;

        impl<B: FusedBackward> Backward<B, 1> for Attention {
            /// (qkv, the probabilities, heads)
            type State = (NodeId, FloatTensor<B>, usize);

            fn backward(
                self,
                ops: Ops<Self::State, 1>,
                grads: &mut Gradients,
                checkpointer: &mut Checkpointer,
            ) {
                let (qkv, probs, heads) = ops.state;
                let qkv = checkpointer.retrieve_node_output(qkv);
                unary::<B, _>(ops.parents, ops.node, grads, |g| {
                    B::attention_backward(qkv, probs, g, heads)
                });
            }
        }

        match Attention.prepare::<C>([qkv.node()]).compute_bound().stateful() {
            OpsKind::Tracked(mut prep) => {
                let state = prep.checkpoint(&qkv);
                let (out, probs) = B::attention_train(qkv.into_primitive(), heads);
                prep.finish((state, probs, heads), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(<B as FusedOps>::attention(qkv.into_primitive(), heads)),
        }
    }

    fn cross_attention(
        q: FloatTensor<Self>,
        kv: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        heads: usize,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct CrossAttention;

        impl<B: FusedBackward> Backward<B, 2> for CrossAttention {
            /// (q, kv, the probabilities, heads)
            type State = (NodeId, NodeId, FloatTensor<B>, usize);

            fn backward(
                self,
                ops: Ops<Self::State, 2>,
                grads: &mut Gradients,
                checkpointer: &mut Checkpointer,
            ) {
                let [node_q, node_kv] = ops.parents;
                let grad = grads.consume::<B>(&ops.node);
                let (q, kv, probs, heads) = ops.state;
                let (q, kv) = (
                    checkpointer.retrieve_node_output(q),
                    checkpointer.retrieve_node_output(kv),
                );
                let (dq, dkv) = B::cross_attention_backward(q, kv, probs, grad, heads);
                for (node, g) in [(node_q, dq), (node_kv, dkv)] {
                    if let Some(node) = node {
                        grads.register::<B>(node.id, g);
                    }
                }
            }
        }

        // The bias is a constant (a mask): not a parent, no gradient.
        let bias = bias.into_primitive();
        match CrossAttention
            .prepare::<C>([q.node(), kv.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let (q_id, kv_id) = (prep.checkpoint(&q), prep.checkpoint(&kv));
                let (out, probs) =
                    B::cross_attention_train(q.into_primitive(), kv.into_primitive(), bias, heads);
                prep.finish((q_id, kv_id, probs, heads), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(<B as FusedOps>::cross_attention(
                q.into_primitive(),
                kv.into_primitive(),
                bias,
                heads,
            )),
        }
    }
}

// ------------------------------------------------------------------------------------------------
// CPU kernels (Flex, f32)
// ------------------------------------------------------------------------------------------------

/// Elements per rayon task in the element-wise kernels.
const CHUNK: usize = 1 << 12;

/// A dense f32 copy-free view when the tensor is already contiguous (a copy otherwise).
pub(crate) fn dense(t: FlexTensor) -> FlexTensor {
    assert_eq!(t.dtype(), DType::F32, "fused kernels take f32 tensors");
    if t.layout().contiguous_offsets().is_some() {
        t
    } else {
        t.to_contiguous()
    }
}

pub(crate) fn values(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>().expect("dense f32 tensor")
}

pub(crate) fn tensor(data: Vec<f32>, shape: Vec<usize>) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(data, shape))
}

/// `len` values written by `fill(i, part, extra_i)` on the i-th `piece`-sized part, the parts in
/// parallel, with no zeroing pass first (it cost ~4% of a training step). `extra` gives each part
/// its own item (e.g. its sample's rows of a gradient being summed), one per part.
pub(crate) fn par_fill<X: Send>(
    len: usize,
    piece: usize,
    extra: impl IndexedParallelIterator<Item = X>,
    fill: impl Fn(usize, &mut [MaybeUninit<f32>], X) + Sync,
) -> Vec<f32> {
    let piece = piece.max(1);
    assert_eq!(extra.len(), len.div_ceil(piece), "one extra item per part");
    let mut v = Vec::with_capacity(len);
    v.spare_capacity_mut()[..len]
        .par_chunks_mut(piece)
        .zip(extra)
        .enumerate()
        .for_each(|(i, (part, x))| fill(i, part, x));
    // SAFETY: every part was given to `fill` (one extra item per part, asserted above), and every
    // kernel writes every element of its part (each asserts that its output has the length of its
    // input and writes one element per input element).
    unsafe { v.set_len(len) };
    v
}

/// The i-th `len`-long part of `s`.
pub(crate) fn part(s: &[f32], i: usize, len: usize) -> &[f32] {
    &s[i * len..][..len]
}

/// One unit item per part, for [`par_fill`] without extras.
pub(crate) fn parts(len: usize, piece: usize) -> rayon::iter::RepeatN<()> {
    rayon::iter::repeat_n((), len.div_ceil(piece.max(1)))
}

/// `[N, T, D]` of a rank-3 tensor and checks `[N, D]` vectors against it.
fn ntd(x: &FlexTensor, vectors: &[&FlexTensor]) -> (usize, usize, usize) {
    let s = x.layout().shape();
    assert_eq!(s.num_dims(), 3, "fused DiT ops take [N, T, D] tokens");
    let (n, t, d) = (s[0], s[1], s[2]);
    for v in vectors {
        assert_eq!(
            v.layout().shape().as_slice(),
            &[n, d],
            "a per-sample vector must be [N, D]"
        );
    }
    (n, t, d)
}

/// Runs `$body` compiled for AVX-512 or AVX2 when the CPU has them (so LLVM vectorises it with
/// the widest registers; `DDM_CPU_CAPABILITY=avx2` keeps AVX-512 out), else as is. No fused multiply-adds are enabled, so every path computes
/// the same bits.
macro_rules! widest_simd {
    (fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn generic($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                fn v4($($arg: $ty),*) { generic($($arg),*) }
                #[target_feature(enable = "avx2")]
                fn v3($($arg: $ty),*) { generic($($arg),*) }
                if burn::backend::flex::ops::vexp::avx512() {
                    // SAFETY: the CPU has AVX-512F.
                    return unsafe { v4($($arg),*) };
                }
                if std::is_x86_feature_detected!("avx2") {
                    // SAFETY: the CPU has AVX2.
                    return unsafe { v3($($arg),*) };
                }
            }
            generic($($arg),*)
        }
    };
}
pub(crate) use widest_simd;

/// Σ f(a_i, b_i) in 16 independent lanes (so it vectorises; the same order on every CPU).
#[inline(always)]
pub(crate) fn lane_sum(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> f32 {
    assert_eq!(a.len(), b.len());
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (a, b) in ca.zip(cb) {
        for l in 0..16 {
            acc[l] += f(a[l], b[l]);
        }
    }
    for (l, (&a, &b)) in ra.iter().zip(rb).enumerate() {
        acc[l] += f(a, b);
    }
    acc.iter().sum()
}

/// Σ a_i.
#[inline(always)]
pub(crate) fn sum(a: &[f32]) -> f32 {
    lane_sum(a, a, |a, _| a)
}

/// max a_i in 16 independent lanes (a sequential fold waits on every comparison: it was half of the
/// softmax's time). -inf for an empty slice.
#[inline(always)]
fn max(a: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 16];
    let chunks = a.chunks_exact(16);
    for (l, &v) in chunks.remainder().iter().enumerate() {
        acc[l] = acc[l].max(v);
    }
    for c in chunks {
        for l in 0..16 {
            acc[l] = acc[l].max(c[l]);
        }
    }
    acc.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v))
}

widest_simd! {
    fn gelu_forward(x: &[f32], y: &mut [MaybeUninit<f32>]) {
        assert_eq!(x.len(), y.len());
        for (y, &x) in y.iter_mut().zip(x) {
            let z = (x + x * x * x * GELU_C) * (2.0 * SQRT_2_OVER_PI);
            y.write(x * sigmoid_f32(z));
        }
    }
}

widest_simd! {
    fn gelu_backward(x: &[f32], g: &[f32], dx: &mut [MaybeUninit<f32>]) {
        assert!(x.len() == dx.len() && g.len() == dx.len());
        // d/dx [x s(2z)] = s + x s (1 - s) 2 z', z' = sqrt(2/pi) (1 + 3 c x^2)
        for ((dx, &x), &g) in dx.iter_mut().zip(x).zip(g) {
            let z = (x + x * x * x * GELU_C) * (2.0 * SQRT_2_OVER_PI);
            let s = sigmoid_f32(z);
            let dz = (1.0 + 3.0 * GELU_C * x * x) * (2.0 * SQRT_2_OVER_PI);
            dx.write(g * (s + x * s * (1.0 - s) * dz));
        }
    }
}

/// Mean and 1/sqrt(var + eps) of one token (biased variance, as PyTorch's LayerNorm).
#[inline(always)]
fn row_stats(x: &[f32], eps: f32) -> (f32, f32) {
    let d = x.len() as f32;
    let mean = sum(x) / d;
    let var = lane_sum(x, x, |v, _| (v - mean) * (v - mean)) / d;
    (mean, 1.0 / (var + eps).sqrt())
}

widest_simd! {
    fn ln_modulate_sample(x: &[f32], shift: &[f32], scale: &[f32], eps: f32, y: &mut [MaybeUninit<f32>]) {
        let d = shift.len();
        assert!(x.len() == y.len() && x.len().is_multiple_of(d));
        for (x, y) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)) {
            let (mean, rstd) = row_stats(x, eps);
            for (((y, &x), &sh), &sc) in y.iter_mut().zip(x).zip(shift).zip(scale) {
                y.write((x - mean) * rstd * (1.0 + sc) + sh);
            }
        }
    }
}

widest_simd! {
    fn ln_modulate_sample_backward(
        x: &[f32],
        scale: &[f32],
        g: &[f32],
        eps: f32,
        dx: &mut [MaybeUninit<f32>],
        dshift: &mut [f32],
        dscale: &mut [f32],
    ) {
        let d = scale.len();
        assert!(x.len() == dx.len() && g.len() == dx.len() && x.len().is_multiple_of(d));
        let mut xhat = vec![0f32; d];
        let mut gh = vec![0f32; d];
        for ((x, g), dx) in x.chunks_exact(d).zip(g.chunks_exact(d)).zip(dx.chunks_exact_mut(d)) {
            let (mean, rstd) = row_stats(x, eps);
            let rows = xhat.iter_mut().zip(gh.iter_mut()).zip(x.iter().zip(g)).zip(scale);
            for (((xhat, gh), (&x, &g)), &scale) in rows {
                *xhat = (x - mean) * rstd;
                *gh = g * (1.0 + scale);
            }
            for (((dshift, dscale), &g), &xhat) in dshift.iter_mut().zip(dscale.iter_mut()).zip(g).zip(&xhat) {
                *dshift += g;
                *dscale += g * xhat;
            }
            // dx = rstd (gh - mean(gh) - x̂ mean(gh x̂))
            let a = sum(&gh) / d as f32;
            let b = lane_sum(&gh, &xhat, |g, x| g * x) / d as f32;
            for ((dx, &gh), &xhat) in dx.iter_mut().zip(&gh).zip(&xhat) {
                dx.write(rstd * (gh - a - xhat * b));
            }
        }
    }
}

widest_simd! {
    fn gated_residual_sample(x: &[f32], gate: &[f32], h: &[f32], y: &mut [MaybeUninit<f32>]) {
        let d = gate.len();
        assert!(x.len() == y.len() && h.len() == y.len() && x.len().is_multiple_of(d));
        for ((x, h), y) in x.chunks_exact(d).zip(h.chunks_exact(d)).zip(y.chunks_exact_mut(d)) {
            for (((y, &x), &h), &gate) in y.iter_mut().zip(x).zip(h).zip(gate) {
                y.write(x + gate * h);
            }
        }
    }
}

widest_simd! {
    fn gated_residual_sample_backward(
        gate: &[f32],
        h: &[f32],
        g: &[f32],
        dgate: &mut [f32],
        dh: &mut [MaybeUninit<f32>],
    ) {
        let d = gate.len();
        assert!(h.len() == dh.len() && g.len() == dh.len() && h.len().is_multiple_of(d));
        for ((h, g), dh) in h.chunks_exact(d).zip(g.chunks_exact(d)).zip(dh.chunks_exact_mut(d)) {
            for ((((dh, dgate), &g), &h), &gate) in dh.iter_mut().zip(dgate.iter_mut()).zip(g).zip(h).zip(gate) {
                dh.write(g * gate);
                *dgate += g * h;
            }
        }
    }
}

/// `dst[m, n] = beta * lhs[m, k] rhs[k, n]` on strided f32 matrices, on the calling thread (the
/// callers run one sample per task). Each matrix is (pointer, row stride, column stride).
///
/// # Safety
/// Each pointer must address every element its strides reach for the given sizes.
unsafe fn matmul(
    (m, n, k): (usize, usize, usize),
    dst: (*mut f32, isize, isize),
    lhs: (*const f32, isize, isize),
    rhs: (*const f32, isize, isize),
    beta: f32,
) {
    // SAFETY: forwarded from the caller. gemm takes column stride before row stride and computes
    // dst = alpha dst + beta lhs rhs, not reading dst when `read_dst` is false.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.0,
            dst.2,
            dst.1,
            false,
            lhs.0,
            lhs.2,
            lhs.1,
            rhs.0,
            rhs.2,
            rhs.1,
            0.0,
            beta,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

widest_simd! {
    fn softmax_rows(s: &mut [f32], t: usize) {
        for row in s.chunks_exact_mut(t) {
            let max = max(row);
            for v in row.iter_mut() {
                *v = exp_f32(*v - max);
            }
            let inv = 1.0 / sum(row);
            row.iter_mut().for_each(|v| *v *= inv);
        }
    }
}

widest_simd! {
    fn softmax_rows_backward(p: &[f32], dp: &mut [f32], t: usize, scale: f32) {
        // dS = P (dP - rowsum(dP P)) scale, in place in dp.
        for (p, dp) in p.chunks_exact(t).zip(dp.chunks_exact_mut(t)) {
            let dot = lane_sum(p, dp, |p, g| p * g);
            for (p, g) in p.iter().zip(dp.iter_mut()) {
                *g = p * (*g - dot) * scale;
            }
        }
    }
}

/// Sizes of one sample's attention: tokens, hidden, heads, head size.
#[derive(Clone, Copy)]
struct AttnDims {
    t: usize,
    d: usize,
    heads: usize,
    hd: usize,
}

impl AttnDims {
    fn of(qkv: &FlexTensor, heads: usize) -> (usize, Self) {
        let s = qkv.layout().shape();
        assert_eq!(s.num_dims(), 3, "attention takes qkv as [N, T, 3D]");
        let (n, t, d3) = (s[0], s[1], s[2]);
        assert!(
            heads > 0 && d3 % (3 * heads) == 0,
            "attention: 3D = {d3} is not 3 x {heads} heads x head size"
        );
        (
            n,
            Self {
                t,
                d: d3 / 3,
                heads,
                hd: d3 / 3 / heads,
            },
        )
    }

    fn scale(&self) -> f32 {
        1.0 / (self.hd as f32).sqrt()
    }
}

/// One sample's attention: `qkv` `[T, 3D]` -> `out` `[T, D]` (every element written), each head's
/// probabilities into `probs` `[h, T, T]`.
fn attention_sample(qkv: &[f32], a: AttnDims, out: &mut [MaybeUninit<f32>], probs: &mut [f32]) {
    let AttnDims { t, d, hd, .. } = a;
    assert!(qkv.len() == t * 3 * d && out.len() == t * d && probs.len() == a.heads * t * t);
    let (row3, row) = (3 * d as isize, d as isize);
    for (head, p) in probs.chunks_exact_mut(t * t).enumerate() {
        let (q, k, v) = (
            &qkv[head * hd..],
            &qkv[d + head * hd..],
            &qkv[2 * d + head * hd..],
        );
        // SAFETY: q, k, v are [T, hd] at row stride 3D inside qkv; p is [T, T]; this head's
        // output columns are [T, hd] at row stride D inside out.
        unsafe {
            // S = q kᵀ scale: [T, hd] x [hd, T] (kᵀ: row stride 1, column stride 3D)
            matmul(
                (t, t, hd),
                (p.as_mut_ptr(), t as isize, 1),
                (q.as_ptr(), row3, 1),
                (k.as_ptr(), 1, row3),
                a.scale(),
            );
        }
        softmax_rows(p, t);
        let o = out[head * hd..].as_mut_ptr().cast::<f32>();
        // SAFETY: as above. O = P v: [T, T] x [T, hd]
        unsafe {
            matmul(
                (t, hd, t),
                (o, row, 1),
                (p.as_ptr(), t as isize, 1),
                (v.as_ptr(), row3, 1),
                1.0,
            )
        };
    }
}

/// One sample's d qkv `[T, 3D]` (every element written) from its qkv, probabilities `[h, T, T]`
/// and output gradient `[T, D]`.
fn attention_sample_backward(
    qkv: &[f32],
    probs: &[f32],
    g: &[f32],
    a: AttnDims,
    dqkv: &mut [MaybeUninit<f32>],
) {
    let AttnDims { t, d, hd, .. } = a;
    assert!(
        qkv.len() == t * 3 * d
            && dqkv.len() == t * 3 * d
            && g.len() == t * d
            && probs.len() == a.heads * t * t
    );
    let (row3, row, tt) = (3 * d as isize, d as isize, t as isize);
    let mut ds = vec![0f32; t * t];
    for (head, p) in probs.chunks_exact(t * t).enumerate() {
        let (q, k, v) = (
            &qkv[head * hd..],
            &qkv[d + head * hd..],
            &qkv[2 * d + head * hd..],
        );
        let go = &g[head * hd..];
        let dq = dqkv[head * hd..].as_mut_ptr().cast::<f32>();
        let dk = dqkv[d + head * hd..].as_mut_ptr().cast::<f32>();
        let dv = dqkv[2 * d + head * hd..].as_mut_ptr().cast::<f32>();
        // SAFETY: q, k, v, dq, dk, dv are [T, hd] at row stride 3D inside qkv and dqkv; go is
        // [T, hd] at row stride D inside g; p and ds are [T, T].
        unsafe {
            // dV = Pᵀ dO: [T, T] x [T, hd]
            matmul(
                (t, hd, t),
                (dv, row3, 1),
                (p.as_ptr(), 1, tt),
                (go.as_ptr(), row, 1),
                1.0,
            );
            // dP = dO vᵀ: [T, hd] x [hd, T]
            matmul(
                (t, t, hd),
                (ds.as_mut_ptr(), tt, 1),
                (go.as_ptr(), row, 1),
                (v.as_ptr(), 1, row3),
                1.0,
            );
        }
        softmax_rows_backward(p, &mut ds, t, a.scale());
        // SAFETY: as above. dQ = dS k, dK = dSᵀ q: [T, T] x [T, hd]
        unsafe {
            matmul(
                (t, hd, t),
                (dq, row3, 1),
                (ds.as_ptr(), tt, 1),
                (k.as_ptr(), row3, 1),
                1.0,
            );
            matmul(
                (t, hd, t),
                (dk, row3, 1),
                (ds.as_ptr(), 1, tt),
                (q.as_ptr(), row3, 1),
                1.0,
            );
        }
    }
}

/// Sizes of one sample's cross-attention: query tokens, keys, hidden, heads, head size.
#[derive(Clone, Copy)]
struct CrossDims {
    t: usize,
    l: usize,
    d: usize,
    heads: usize,
    hd: usize,
}

impl CrossDims {
    fn of(q: &FlexTensor, kv: &FlexTensor, heads: usize) -> (usize, Self) {
        let (s, sk) = (q.layout().shape(), kv.layout().shape());
        assert!(
            s.num_dims() == 3 && sk.num_dims() == 3,
            "cross-attention takes q as [N, T, D] and kv as [N, L, 2D]"
        );
        let (n, t, d, l) = (s[0], s[1], s[2], sk[1]);
        assert_eq!(
            (sk[0], sk[2]),
            (n, 2 * d),
            "cross-attention: kv must be [N, L, 2D] for q [N, T, D]"
        );
        assert!(
            heads > 0 && d % heads == 0 && l > 0,
            "cross-attention: D = {d} is not {heads} heads x head size, or no keys"
        );
        (
            n,
            Self {
                t,
                l,
                d,
                heads,
                hd: d / heads,
            },
        )
    }

    /// The bias, checked to be `[N, L]`.
    fn bias<'a>(&self, n: usize, bias: &'a FlexTensor) -> &'a [f32] {
        assert_eq!(
            bias.layout().shape().as_slice(),
            &[n, self.l],
            "cross-attention: the bias must be [N, L]"
        );
        values(bias)
    }

    fn scale(&self) -> f32 {
        1.0 / (self.hd as f32).sqrt()
    }
}

/// One sample's cross-attention: `q` `[T, D]`, `kv` `[L, 2D]`, `bias` `[L]` -> `out` `[T, D]`
/// (every element written), each head's probabilities into `probs` `[h, T, L]`.
fn cross_attention_sample(
    q: &[f32],
    kv: &[f32],
    bias: &[f32],
    a: CrossDims,
    out: &mut [MaybeUninit<f32>],
    probs: &mut [f32],
) {
    let CrossDims { t, l, d, hd, .. } = a;
    assert!(
        q.len() == t * d
            && kv.len() == l * 2 * d
            && bias.len() == l
            && out.len() == t * d
            && probs.len() == a.heads * t * l
    );
    let (row, row2, ll) = (d as isize, 2 * d as isize, l as isize);
    for (head, p) in probs.chunks_exact_mut(t * l).enumerate() {
        let (qh, k, v) = (&q[head * hd..], &kv[head * hd..], &kv[d + head * hd..]);
        // SAFETY: qh is [T, hd] at row stride D inside q; k, v are [L, hd] at row stride 2D inside
        // kv; p is [T, L]; this head's output columns are [T, hd] at row stride D inside out.
        unsafe {
            // S = q kᵀ scale: [T, hd] x [hd, L] (kᵀ: row stride 1, column stride 2D)
            matmul(
                (t, l, hd),
                (p.as_mut_ptr(), ll, 1),
                (qh.as_ptr(), row, 1),
                (k.as_ptr(), 1, row2),
                a.scale(),
            );
        }
        for scores in p.chunks_exact_mut(l) {
            scores.iter_mut().zip(bias).for_each(|(s, b)| *s += b);
        }
        softmax_rows(p, l);
        let o = out[head * hd..].as_mut_ptr().cast::<f32>();
        // SAFETY: as above. O = P v: [T, L] x [L, hd]
        unsafe {
            matmul(
                (t, hd, l),
                (o, row, 1),
                (p.as_ptr(), ll, 1),
                (v.as_ptr(), row2, 1),
                1.0,
            )
        };
    }
}

/// One sample's d q `[T, D]` (every element written) and d kv `[L, 2D]` from its q, kv,
/// probabilities `[h, T, L]` and output gradient `[T, D]`.
fn cross_attention_sample_backward(
    (q, kv, probs, g): (&[f32], &[f32], &[f32], &[f32]),
    a: CrossDims,
    dq: &mut [MaybeUninit<f32>],
    dkv: &mut [f32],
) {
    let CrossDims { t, l, d, hd, .. } = a;
    assert!(
        q.len() == t * d
            && dq.len() == t * d
            && kv.len() == l * 2 * d
            && dkv.len() == l * 2 * d
            && g.len() == t * d
            && probs.len() == a.heads * t * l
    );
    let (row, row2, ll) = (d as isize, 2 * d as isize, l as isize);
    let mut ds = vec![0f32; t * l];
    for (head, p) in probs.chunks_exact(t * l).enumerate() {
        let (qh, k, v) = (&q[head * hd..], &kv[head * hd..], &kv[d + head * hd..]);
        let go = &g[head * hd..];
        let dqh = dq[head * hd..].as_mut_ptr().cast::<f32>();
        let dk = dkv[head * hd..].as_mut_ptr();
        let dv = dkv[d + head * hd..].as_mut_ptr();
        // SAFETY: qh, go, dqh are [T, hd] at row stride D inside q, g, dq; k, v, dk, dv are
        // [L, hd] at row stride 2D inside kv and dkv; p and ds are [T, L].
        unsafe {
            // dV = Pᵀ dO: [L, T] x [T, hd]
            matmul(
                (l, hd, t),
                (dv, row2, 1),
                (p.as_ptr(), 1, ll),
                (go.as_ptr(), row, 1),
                1.0,
            );
            // dP = dO vᵀ: [T, hd] x [hd, L]
            matmul(
                (t, l, hd),
                (ds.as_mut_ptr(), ll, 1),
                (go.as_ptr(), row, 1),
                (v.as_ptr(), 1, row2),
                1.0,
            );
        }
        softmax_rows_backward(p, &mut ds, l, a.scale());
        // SAFETY: as above. dQ = dS k: [T, L] x [L, hd]; dK = dSᵀ q: [L, T] x [T, hd]
        unsafe {
            matmul(
                (t, hd, l),
                (dqh, row, 1),
                (ds.as_ptr(), ll, 1),
                (k.as_ptr(), row2, 1),
                1.0,
            );
            matmul(
                (l, hd, t),
                (dk, row2, 1),
                (ds.as_ptr(), 1, ll),
                (qh.as_ptr(), row, 1),
                1.0,
            );
        }
    }
}

impl FusedOps for Flex {
    fn gelu_tanh(x: FlexTensor) -> FlexTensor {
        let x = dense(x);
        let xs = values(&x);
        let y = par_fill(xs.len(), CHUNK, parts(xs.len(), CHUNK), |i, y, ()| {
            gelu_forward(&xs[i * CHUNK..][..y.len()], y)
        });
        tensor(y, x.layout().shape().to_vec())
    }

    fn layer_norm_modulate(x: FlexTensor, shift: FlexTensor, scale: FlexTensor, eps: f64) -> FlexTensor {
        let (x, shift, scale) = (dense(x), dense(shift), dense(scale));
        let (n, t, d) = ntd(&x, &[&shift, &scale]);
        let (xs, shift, scale) = (values(&x), values(&shift), values(&scale));
        // One sample per task: its [T, D] tokens, its [D] shift and scale.
        let y = par_fill(n * t * d, t * d, parts(n * t * d, t * d), |i, y, ()| {
            ln_modulate_sample(
                part(xs, i, t * d),
                part(shift, i, d),
                part(scale, i, d),
                eps as f32,
                y,
            )
        });
        tensor(y, vec![n, t, d])
    }

    fn gated_residual(x: FlexTensor, gate: FlexTensor, h: FlexTensor) -> FlexTensor {
        let (x, gate, h) = (dense(x), dense(gate), dense(h));
        let (n, t, d) = ntd(&x, &[&gate]);
        assert_eq!(
            h.layout().shape(),
            x.layout().shape(),
            "gated_residual: x and h differ in shape"
        );
        let (xs, gate, hs) = (values(&x), values(&gate), values(&h));
        let y = par_fill(n * t * d, t * d, parts(n * t * d, t * d), |i, y, ()| {
            gated_residual_sample(part(xs, i, t * d), part(gate, i, d), part(hs, i, t * d), y)
        });
        tensor(y, vec![n, t, d])
    }

    fn attention(qkv: FlexTensor, heads: usize) -> FlexTensor {
        let qkv = dense(qkv);
        let (n, a) = AttnDims::of(&qkv, heads);
        let AttnDims { t, d, .. } = a;
        let xs = values(&qkv);
        // Without autodiff the probabilities are one sample's scratch, not an [N, h, T, T] tensor.
        let out = par_fill(n * t * d, t * d, parts(n * t * d, t * d), |i, out, ()| {
            let mut probs = vec![0f32; heads * t * t];
            attention_sample(part(xs, i, 3 * t * d), a, out, &mut probs)
        });
        tensor(out, vec![n, t, d])
    }

    fn cross_attention(q: FlexTensor, kv: FlexTensor, bias: FlexTensor, heads: usize) -> FlexTensor {
        let (q, kv, bias) = (dense(q), dense(kv), dense(bias));
        let (n, a) = CrossDims::of(&q, &kv, heads);
        let CrossDims { t, l, d, .. } = a;
        let (qs, kvs, bs) = (values(&q), values(&kv), a.bias(n, &bias));
        // Without autodiff the probabilities are one sample's scratch.
        let out = par_fill(n * t * d, t * d, parts(n * t * d, t * d), |i, out, ()| {
            let mut probs = vec![0f32; heads * t * l];
            let (q, kv) = (part(qs, i, t * d), part(kvs, i, 2 * l * d));
            cross_attention_sample(q, kv, part(bs, i, l), a, out, &mut probs)
        });
        tensor(out, vec![n, t, d])
    }
}

impl FusedBackward for Flex {
    fn cross_attention_train(
        q: FlexTensor,
        kv: FlexTensor,
        bias: FlexTensor,
        heads: usize,
    ) -> (FlexTensor, FlexTensor) {
        let (q, kv, bias) = (dense(q), dense(kv), dense(bias));
        let (n, a) = CrossDims::of(&q, &kv, heads);
        let CrossDims { t, l, d, .. } = a;
        let (qs, kvs, bs) = (values(&q), values(&kv), a.bias(n, &bias));
        let mut probs = vec![0f32; n * heads * t * l];
        let piece = (heads * t * l).max(1);
        let out = par_fill(n * t * d, t * d, probs.par_chunks_mut(piece), |i, out, probs| {
            let (q, kv) = (part(qs, i, t * d), part(kvs, i, 2 * l * d));
            cross_attention_sample(q, kv, part(bs, i, l), a, out, probs)
        });
        (tensor(out, vec![n, t, d]), tensor(probs, vec![n, heads, t, l]))
    }

    fn cross_attention_backward(
        q: FlexTensor,
        kv: FlexTensor,
        probs: FlexTensor,
        grad: FlexTensor,
        heads: usize,
    ) -> (FlexTensor, FlexTensor) {
        let (q, kv, probs, grad) = (dense(q), dense(kv), dense(probs), dense(grad));
        let (n, a) = CrossDims::of(&q, &kv, heads);
        let CrossDims { t, l, d, .. } = a;
        let (qs, kvs, ps, g) = (values(&q), values(&kv), values(&probs), values(&grad));
        // Each sample's task also writes its own rows of d kv.
        let mut dkv = vec![0f32; n * l * 2 * d];
        let dq = par_fill(
            n * t * d,
            t * d,
            dkv.par_chunks_mut((2 * l * d).max(1)),
            |i, dq, dkv| {
                let inputs = (
                    part(qs, i, t * d),
                    part(kvs, i, 2 * l * d),
                    part(ps, i, heads * t * l),
                    part(g, i, t * d),
                );
                cross_attention_sample_backward(inputs, a, dq, dkv)
            },
        );
        (tensor(dq, vec![n, t, d]), tensor(dkv, vec![n, l, 2 * d]))
    }

    fn attention_train(qkv: FlexTensor, heads: usize) -> (FlexTensor, FlexTensor) {
        let qkv = dense(qkv);
        let (n, a) = AttnDims::of(&qkv, heads);
        let AttnDims { t, d, .. } = a;
        let xs = values(&qkv);
        let mut probs = vec![0f32; n * heads * t * t];
        let piece = (heads * t * t).max(1);
        let out = par_fill(n * t * d, t * d, probs.par_chunks_mut(piece), |i, out, probs| {
            attention_sample(part(xs, i, 3 * t * d), a, out, probs)
        });
        (tensor(out, vec![n, t, d]), tensor(probs, vec![n, heads, t, t]))
    }

    fn attention_backward(qkv: FlexTensor, probs: FlexTensor, grad: FlexTensor, heads: usize) -> FlexTensor {
        let (qkv, probs, grad) = (dense(qkv), dense(probs), dense(grad));
        let (n, a) = AttnDims::of(&qkv, heads);
        let AttnDims { t, d, .. } = a;
        let (xs, ps, g) = (values(&qkv), values(&probs), values(&grad));
        let dqkv = par_fill(
            n * t * 3 * d,
            t * 3 * d,
            parts(n * t * 3 * d, t * 3 * d),
            |i, dqkv, ()| {
                let p = part(ps, i, heads * t * t);
                attention_sample_backward(part(xs, i, 3 * t * d), p, part(g, i, t * d), a, dqkv)
            },
        );
        tensor(dqkv, vec![n, t, 3 * d])
    }

    fn gelu_tanh_backward(x: FlexTensor, grad: FlexTensor) -> FlexTensor {
        let (x, grad) = (dense(x), dense(grad));
        let (xs, g) = (values(&x), values(&grad));
        assert_eq!(xs.len(), g.len(), "gelu_tanh_backward: x and grad differ in size");
        let dx = par_fill(xs.len(), CHUNK, parts(xs.len(), CHUNK), |i, dx, ()| {
            let at = i * CHUNK;
            gelu_backward(&xs[at..][..dx.len()], &g[at..][..dx.len()], dx)
        });
        tensor(dx, x.layout().shape().to_vec())
    }

    fn layer_norm_modulate_backward(
        x: FlexTensor,
        scale: FlexTensor,
        grad: FlexTensor,
        eps: f64,
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        let (x, scale, grad) = (dense(x), dense(scale), dense(grad));
        let (n, t, d) = ntd(&x, &[&scale]);
        let (xs, scale, g) = (values(&x), values(&scale), values(&grad));
        // Each sample's task also sums its rows of d shift and d scale over its tokens, in order.
        let (mut dshift, mut dscale) = (vec![0f32; n * d], vec![0f32; n * d]);
        let sums = dshift
            .par_chunks_mut(d.max(1))
            .zip(dscale.par_chunks_mut(d.max(1)));
        let dx = par_fill(n * t * d, t * d, sums, |i, dx, (dshift, dscale)| {
            let (x, g) = (part(xs, i, t * d), part(g, i, t * d));
            ln_modulate_sample_backward(x, part(scale, i, d), g, eps as f32, dx, dshift, dscale)
        });
        (
            tensor(dx, vec![n, t, d]),
            tensor(dshift, vec![n, d]),
            tensor(dscale, vec![n, d]),
        )
    }

    fn gated_residual_backward(
        gate: FlexTensor,
        h: FlexTensor,
        grad: FlexTensor,
    ) -> (FlexTensor, FlexTensor) {
        let (gate, h, grad) = (dense(gate), dense(h), dense(grad));
        let (n, t, d) = ntd(&h, &[&gate]);
        let (gate, hs, g) = (values(&gate), values(&h), values(&grad));
        let mut dgate = vec![0f32; n * d];
        let dh = par_fill(
            n * t * d,
            t * d,
            dgate.par_chunks_mut(d.max(1)),
            |i, dh, dgate| {
                gated_residual_sample_backward(
                    part(gate, i, d),
                    part(hs, i, t * d),
                    part(g, i, t * d),
                    dgate,
                    dh,
                )
            },
        );
        (tensor(dgate, vec![n, d]), tensor(dh, vec![n, t, d]))
    }
}

//! The DiT's self-attention and PixArt's cross-attention on the GPU backends (wgpu, CUDA):
//! memory-efficient CubeCL kernels.
//!
//! Composed of burn ops, attention materialises the scores `[N, h, T, L]` forward and keeps them for
//! the backward, plus permuted copies of q, k, v and the output. These kernels never hold a score
//! matrix: the forward streams the keys of one query row with an online softmax (flash attention's
//! running maximum and sum) and keeps only the row's log-sum-exp `[N, h, T]`; the backward
//! recomputes each probability from it. They read q, k, v straight from the projections (the fused
//! qkv of self-attention; q and the keys and values side by side of cross-attention, whose caption
//! mask is a bias added to each key's score) and write the token-major layout the output
//! projection reads, as the CPU kernels do.
//!
//! - [`FlashOps`] is the extension trait: burn's `Dispatch` routes it to the cubecl backend (through
//!   operation fusion, where it is one opaque operation) and to its autodiff, which records a node
//!   whose backward calls [`FlashBackward`].
//! - One GPU thread owns one query row (forward, dq) or one key row (dk, dv) and loops over the
//!   other side in order, accumulating in f32 whatever the tensors' dtype (f32, f16, bf16), so
//!   results are deterministic. The kernels are not tiled through shared memory or tensor cores: they
//!   are the memory-efficient form, checked against the composite ops (`tests/gpu.rs`), not a tuned
//!   one.
//!
//! Letters in shape comments: N batch, T tokens (queries), L keys (T for self-attention, a
//! caption's tokens for cross-attention), D hidden = h heads x hd head width.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, unary};
use burn::backend::autodiff::{Autodiff, NodeId};
use burn::backend::cubecl::dtype_to_storage_type;
use burn::backend::fusion::custom::TensorSpec;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Dispatch, DispatchDevice, backend_extension};
use burn::tensor::{DType, Shape};
use burn_cubecl::CubeBackend;
use burn_cubecl::cubecl;
use burn_cubecl::cubecl::prelude::*;
use burn_cubecl::cubecl::{CubeDim, calculate_cube_count_elemwise};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;
use std::sync::atomic::{AtomicBool, Ordering};

/// Whether [`crate::fused::attention`] and [`crate::fused::cross_attention`] run these kernels on
/// the GPU backends (default) or burn's composite ops; ddm sets it from `DDM_GPU_ATTENTION` when it
/// opens a GPU device.
static KERNELS: AtomicBool = AtomicBool::new(true);

/// Run the kernels (`true`) or burn's composite ops (`false`) on the GPU backends from now on.
pub fn use_kernels(on: bool) {
    KERNELS.store(on, Ordering::Relaxed);
}

/// Whether a tensor runs these kernels: on the cubecl backend (wgpu, CUDA), in f32, f16 or bf16,
/// unless [`use_kernels`] turned them off.
pub fn runs<const D: usize>(x: &burn::tensor::Tensor<D>) -> bool {
    matches!(x.device().inner().as_dispatch(), DispatchDevice::Cube(_))
        && matches!(x.dtype(), DType::F32 | DType::F16 | DType::BF16)
        && KERNELS.load(Ordering::Relaxed)
}

/// [`crate::fused::attention`] through the kernels.
///
/// # Shapes
/// - `qkv`: `[N, T, 3D]` (q, k, v, each `[h, hd]` per token) -> `[N, T, D]`
pub fn attention(qkv: burn::tensor::Tensor<3>, heads: usize) -> burn::tensor::Tensor<3> {
    burn::tensor::Tensor::from_dispatch(<Dispatch as FlashOps>::flash_attention(
        qkv.into_dispatch(),
        heads,
    ))
}

/// [`crate::fused::cross_attention`] through the kernels.
///
/// # Shapes
/// - `q`: `[N, T, D]`, `kv`: `[N, L, 2D]` (k, then v, each `[h, hd]` per key), `bias`: `[N, L]`
///   -> `[N, T, D]`
pub fn cross_attention(
    q: burn::tensor::Tensor<3>,
    kv: burn::tensor::Tensor<3>,
    bias: burn::tensor::Tensor<2>,
    heads: usize,
) -> burn::tensor::Tensor<3> {
    burn::tensor::Tensor::from_dispatch(<Dispatch as FlashOps>::flash_cross_attention(
        q.into_dispatch(),
        kv.into_dispatch(),
        bias.into_dispatch(),
        heads,
    ))
}

/// The self- and cross-attention, routed by `Dispatch` to the cubecl backend and its autodiff.
#[backend_extension(Cube, Fusion, Autodiff)]
pub trait FlashOps: Backend {
    /// `qkv`: `[N, T, 3D]` -> `[N, T, D]`.
    #[fusion(dtype = qkv, shape = output_shape(qkv))]
    fn flash_attention(qkv: FloatTensor<Self>, heads: usize) -> FloatTensor<Self>;
    /// `q`: `[N, T, D]`, `kv`: `[N, L, 2D]`, `bias`: `[N, L]` (a constant: no gradient) ->
    /// `[N, T, D]`.
    #[fusion(dtype = q, shape = q)]
    fn flash_cross_attention(
        q: FloatTensor<Self>,
        kv: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        heads: usize,
    ) -> FloatTensor<Self>;
}

/// The forward that keeps what the backward needs, and the backward, on a concrete backend.
#[backend_extension(Cube, Fusion)]
pub trait FlashBackward: Backend {
    /// ([`FlashOps::flash_attention`]'s output, the log-sum-exp of every score row `[N, h, T]` in
    /// f32).
    #[fusion(meta = |qkv: &TensorSpec, heads: &usize| (
        TensorSpec::new(output_shape(&qkv.shape), qkv.dtype),
        TensorSpec::new(lse_shape(&qkv.shape, *heads), DType::F32),
    ))]
    fn flash_attention_train(qkv: FloatTensor<Self>, heads: usize) -> (FloatTensor<Self>, FloatTensor<Self>);
    /// d/dqkv `[N, T, 3D]` of [`FlashOps::flash_attention`], from its output and log-sum-exp.
    #[fusion(dtype = qkv, shape = qkv)]
    fn flash_attention_backward(
        qkv: FloatTensor<Self>,
        out: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        heads: usize,
    ) -> FloatTensor<Self>;
    /// ([`FlashOps::flash_cross_attention`]'s output, the log-sum-exp of every score row
    /// `[N, h, T]` in f32).
    #[fusion(meta = |q: &TensorSpec, _kv: &TensorSpec, _bias: &TensorSpec, heads: &usize| (
        TensorSpec::new(q.shape.clone(), q.dtype),
        TensorSpec::new(Shape::new([q.shape[0], *heads, q.shape[1]]), DType::F32),
    ))]
    fn flash_cross_attention_train(
        q: FloatTensor<Self>,
        kv: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        heads: usize,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);
    /// (d/dq `[N, T, D]`, d/dkv `[N, L, 2D]`) of [`FlashOps::flash_cross_attention`], from its
    /// output and log-sum-exp.
    #[fusion(meta = |q: &TensorSpec, kv: &TensorSpec, _bias: &TensorSpec, _out: &TensorSpec, _lse: &TensorSpec, _grad: &TensorSpec, _heads: &usize| (
        TensorSpec::new(q.shape.clone(), q.dtype),
        TensorSpec::new(kv.shape.clone(), kv.dtype),
    ))]
    #[allow(clippy::too_many_arguments)]
    fn flash_cross_attention_backward(
        q: FloatTensor<Self>,
        kv: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        out: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        heads: usize,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);
}

/// `[N, T, 3D]` -> `[N, T, D]`.
fn output_shape(qkv: &Shape) -> Shape {
    Shape::new([qkv[0], qkv[1], qkv[2] / 3])
}

/// `[N, T, 3D]` -> `[N, h, T]`.
fn lse_shape(qkv: &Shape, heads: usize) -> Shape {
    Shape::new([qkv[0], heads, qkv[1]])
}

impl<B: FlashOps + FlashBackward, C: CheckpointStrategy> FlashOps for Autodiff<B, C> {
    fn flash_attention(qkv: FloatTensor<Self>, heads: usize) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct FlashAttention;

        impl<B: FlashBackward> Backward<B, 1> for FlashAttention {
            /// (qkv, the output, its log-sum-exp, heads)
            type State = (NodeId, FloatTensor<B>, FloatTensor<B>, usize);

            fn backward(
                self,
                ops: Ops<Self::State, 1>,
                grads: &mut Gradients,
                checkpointer: &mut Checkpointer,
            ) {
                let (qkv, out, lse, heads) = ops.state;
                let qkv = checkpointer.retrieve_node_output(qkv);
                unary::<B, _>(ops.parents, ops.node, grads, |g| {
                    B::flash_attention_backward(qkv, out, lse, g, heads)
                });
            }
        }

        match FlashAttention
            .prepare::<C>([qkv.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let state = prep.checkpoint(&qkv);
                let (out, lse) = B::flash_attention_train(qkv.into_primitive(), heads);
                prep.finish((state, out.clone(), lse, heads), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::flash_attention(qkv.into_primitive(), heads)),
        }
    }

    fn flash_cross_attention(
        q: FloatTensor<Self>,
        kv: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        heads: usize,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct FlashCrossAttention;

        impl<B: FlashBackward> Backward<B, 2> for FlashCrossAttention {
            /// (q, kv, the bias, the output, its log-sum-exp, heads)
            type State = (
                NodeId,
                NodeId,
                FloatTensor<B>,
                FloatTensor<B>,
                FloatTensor<B>,
                usize,
            );

            fn backward(
                self,
                ops: Ops<Self::State, 2>,
                grads: &mut Gradients,
                checkpointer: &mut Checkpointer,
            ) {
                let [node_q, node_kv] = ops.parents;
                let grad = grads.consume::<B>(&ops.node);
                let (q, kv, bias, out, lse, heads) = ops.state;
                let (q, kv) = (
                    checkpointer.retrieve_node_output(q),
                    checkpointer.retrieve_node_output(kv),
                );
                let (dq, dkv) = B::flash_cross_attention_backward(q, kv, bias, out, lse, grad, heads);
                for (node, g) in [(node_q, dq), (node_kv, dkv)] {
                    if let Some(node) = node {
                        grads.register::<B>(node.id, g);
                    }
                }
            }
        }

        // The bias is a constant (a mask): not a parent, no gradient.
        let bias = bias.into_primitive();
        match FlashCrossAttention
            .prepare::<C>([q.node(), kv.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let (q_id, kv_id) = (prep.checkpoint(&q), prep.checkpoint(&kv));
                let (out, lse) = B::flash_cross_attention_train(
                    q.into_primitive(),
                    kv.into_primitive(),
                    bias.clone(),
                    heads,
                );
                prep.finish((q_id, kv_id, bias, out.clone(), lse, heads), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::flash_cross_attention(
                q.into_primitive(),
                kv.into_primitive(),
                bias,
                heads,
            )),
        }
    }
}

// ------------------------------------------------------------------------------------------------
// The kernels
// ------------------------------------------------------------------------------------------------

/// Where one attention's rows live, as the kernels index them: the queries of sample n, token i,
/// head h at `(n T + i) q_stride + h hd` of `q`; its keys (values) at
/// `(n L + j) kv_stride + k_off (v_off) + h hd` of `kv`; its output at `(n T + i) D + h hd`.
/// Self-attention reads all three from one `[N, T, 3D]` tensor; cross-attention reads q `[N, T, D]`
/// and keys and values side by side from `[N, L, 2D]`.
#[derive(CubeType, CubeLaunch, Clone, Copy)]
struct Layout {
    queries: usize,
    keys: usize,
    heads: usize,
    q_stride: usize,
    kv_stride: usize,
    k_off: usize,
    v_off: usize,
    scale: f32,
}

/// One query row: the online softmax over every key (plus the key's bias when there is one), then
/// `out` = Σ p v and `lse` = log Σ exp(s).
#[cube(launch, address_type = "dynamic")]
fn forward_kernel<F: Float>(
    q: &Tensor<F>,
    kv: &Tensor<F>,
    bias: &Tensor<F>,
    out: &mut Tensor<F>,
    lse: &mut Tensor<f32>,
    at: Layout,
    #[comptime] hd: usize,
    #[comptime] has_bias: bool,
    #[define(F)] _dtype: ElemType,
) {
    let r = ABSOLUTE_POS;
    if r >= lse.len() {
        terminate!();
    }
    // Row r of [N, h, T] is query i of head h of sample n.
    let n = r / (at.heads * at.queries);
    let head = ((r / at.queries) % at.heads) * hd;
    let i = r % at.queries;
    let q_at = (n * at.queries + i) * at.q_stride + head;

    let mut qs = Array::<f32>::new(hd);
    let mut acc = Array::<f32>::new(hd);
    for c in 0..hd {
        qs[c] = f32::cast_from(q[q_at + c]) * at.scale;
        acc[c] = f32::new(0.0);
    }
    let mut row_max = f32::new(-1.0e30);
    let mut sum = f32::new(0.0);
    for j in 0..at.keys {
        let row = (n * at.keys + j) * at.kv_stride + head;
        let k_at = row + at.k_off;
        let v_at = row + at.v_off;
        let mut s = f32::new(0.0);
        for c in 0..hd {
            s += qs[c] * f32::cast_from(kv[k_at + c]);
        }
        if has_bias {
            s += f32::cast_from(bias[n * at.keys + j]);
        }
        let new_max = max(row_max, s);
        let correction = (row_max - new_max).exp();
        let p = (s - new_max).exp();
        sum = sum * correction + p;
        for c in 0..hd {
            acc[c] = acc[c] * correction + p * f32::cast_from(kv[v_at + c]);
        }
        row_max = new_max;
    }
    let out_at = (n * at.queries + i) * at.heads * hd + head;
    for c in 0..hd {
        out[out_at + c] = F::cast_from(acc[c] / sum);
    }
    lse[r] = row_max + sum.ln();
}

/// One query row of the backward: `dq` = scale Σ_j p (dp - δ) k_j, with dp = dout · v_j and
/// δ = dout · out (written to `delta` for the key-side kernel). `dq` has q's layout.
#[cube(launch, address_type = "dynamic")]
fn dq_kernel<F: Float>(
    q: &Tensor<F>,
    kv: &Tensor<F>,
    bias: &Tensor<F>,
    out: &Tensor<F>,
    lse: &Tensor<f32>,
    grad: &Tensor<F>,
    delta: &mut Tensor<f32>,
    dq: &mut Tensor<F>,
    at: Layout,
    #[comptime] hd: usize,
    #[comptime] has_bias: bool,
    #[define(F)] _dtype: ElemType,
) {
    let r = ABSOLUTE_POS;
    if r >= lse.len() {
        terminate!();
    }
    // Row r of [N, h, T] is query i of head h of sample n.
    let n = r / (at.heads * at.queries);
    let head = ((r / at.queries) % at.heads) * hd;
    let i = r % at.queries;
    let q_at = (n * at.queries + i) * at.q_stride + head;
    let out_at = (n * at.queries + i) * at.heads * hd + head;

    let mut qs = Array::<f32>::new(hd);
    let mut dout = Array::<f32>::new(hd);
    let mut dqs = Array::<f32>::new(hd);
    let mut dot = f32::new(0.0);
    for c in 0..hd {
        qs[c] = f32::cast_from(q[q_at + c]) * at.scale;
        dout[c] = f32::cast_from(grad[out_at + c]);
        dot += dout[c] * f32::cast_from(out[out_at + c]);
        dqs[c] = f32::new(0.0);
    }
    delta[r] = dot;
    let row_lse = lse[r];
    for j in 0..at.keys {
        let row = (n * at.keys + j) * at.kv_stride + head;
        let k_at = row + at.k_off;
        let v_at = row + at.v_off;
        let mut s = f32::new(0.0);
        let mut dp = f32::new(0.0);
        for c in 0..hd {
            s += qs[c] * f32::cast_from(kv[k_at + c]);
            dp += dout[c] * f32::cast_from(kv[v_at + c]);
        }
        if has_bias {
            s += f32::cast_from(bias[n * at.keys + j]);
        }
        let ds = (s - row_lse).exp() * (dp - dot);
        for c in 0..hd {
            dqs[c] += ds * f32::cast_from(kv[k_at + c]);
        }
    }
    for c in 0..hd {
        dq[q_at + c] = F::cast_from(dqs[c] * at.scale);
    }
}

/// One key row of the backward: `dk` = scale Σ_i p (dp - δ_i) q_i and `dv` = Σ_i p dout_i.
/// `dkv` has kv's layout.
#[cube(launch, address_type = "dynamic")]
fn dkv_kernel<F: Float>(
    q: &Tensor<F>,
    kv: &Tensor<F>,
    bias: &Tensor<F>,
    lse: &Tensor<f32>,
    grad: &Tensor<F>,
    delta: &Tensor<f32>,
    dkv: &mut Tensor<F>,
    at: Layout,
    #[comptime] hd: usize,
    #[comptime] has_bias: bool,
    #[define(F)] _dtype: ElemType,
) {
    let r = ABSOLUTE_POS;
    // One row per key and head: [N, L] rows of kv (N x T of qkv), times h.
    if r >= dkv.len() / at.kv_stride * at.heads {
        terminate!();
    }
    // Row r of [N, h, L] is key j of head h of sample n; the query rows of its (n, h) in
    // [N, h, T] start at (n h + head) T.
    let n = r / (at.heads * at.keys);
    let h = (r / at.keys) % at.heads;
    let head = h * hd;
    let j = r % at.keys;
    let row = (n * at.keys + j) * at.kv_stride + head;
    let k_at = row + at.k_off;
    let v_at = row + at.v_off;
    let first_row = (n * at.heads + h) * at.queries;
    let mut b = f32::new(0.0);
    if has_bias {
        b = f32::cast_from(bias[n * at.keys + j]);
    }

    let mut ks = Array::<f32>::new(hd);
    let mut vs = Array::<f32>::new(hd);
    let mut dk = Array::<f32>::new(hd);
    let mut dv = Array::<f32>::new(hd);
    for c in 0..hd {
        ks[c] = f32::cast_from(kv[k_at + c]) * at.scale;
        vs[c] = f32::cast_from(kv[v_at + c]);
        dk[c] = f32::new(0.0);
        dv[c] = f32::new(0.0);
    }
    for query in 0..at.queries {
        let q_at = (n * at.queries + query) * at.q_stride + head;
        let out_at = (n * at.queries + query) * at.heads * hd + head;
        let mut s = b;
        let mut dp = f32::new(0.0);
        for c in 0..hd {
            s += ks[c] * f32::cast_from(q[q_at + c]);
            dp += vs[c] * f32::cast_from(grad[out_at + c]);
        }
        let p = (s - lse[first_row + query]).exp();
        let ds = p * (dp - delta[first_row + query]);
        for c in 0..hd {
            dk[c] += ds * f32::cast_from(q[q_at + c]);
            dv[c] += p * f32::cast_from(grad[out_at + c]);
        }
    }
    for c in 0..hd {
        dkv[k_at + c] = F::cast_from(dk[c] * at.scale);
        dkv[v_at + c] = F::cast_from(dv[c]);
    }
}

// ------------------------------------------------------------------------------------------------
// The launches
// ------------------------------------------------------------------------------------------------

/// The problem a launch solves: N samples, T queries, L keys, h heads of width hd, and where the
/// rows live.
struct Dims {
    samples: usize,
    queries: usize,
    keys: usize,
    heads: usize,
    hd: usize,
    /// (q row stride, kv row stride, keys' offset, values' offset) within a row
    strides: (usize, usize, usize, usize),
}

impl Dims {
    /// Self-attention on `[N, T, 3D]`.
    fn of(qkv: &CubeTensor, heads: usize) -> Self {
        let shape = qkv.meta.shape();
        let (samples, tokens, d3) = (shape[0], shape[1], shape[2]);
        assert!(
            heads > 0 && d3 % (3 * heads) == 0,
            "flash attention: qkv width {d3} is not 3 x {heads} heads"
        );
        let d = d3 / 3;
        Self {
            samples,
            queries: tokens,
            keys: tokens,
            heads,
            hd: d / heads,
            strides: (d3, d3, d, 2 * d),
        }
    }

    /// Cross-attention of q `[N, T, D]` to kv `[N, L, 2D]`.
    fn cross(q: &CubeTensor, kv: &CubeTensor, heads: usize) -> Self {
        let (qs, kvs) = (q.meta.shape(), kv.meta.shape());
        let (samples, queries, d) = (qs[0], qs[1], qs[2]);
        assert!(
            heads > 0 && d % heads == 0 && kvs[0] == samples && kvs[2] == 2 * d,
            "flash cross-attention: q {qs:?} and kv {kvs:?} do not fit {heads} heads"
        );
        Self {
            samples,
            queries,
            keys: kvs[1],
            heads,
            hd: d / heads,
            strides: (d, 2 * d, 0, d),
        }
    }

    /// Query rows `[N, h, T]`.
    fn rows(&self) -> usize {
        self.samples * self.heads * self.queries
    }

    /// Key rows `[N, h, L]`.
    fn key_rows(&self) -> usize {
        self.samples * self.heads * self.keys
    }

    fn layout(&self) -> LayoutLaunch {
        let (q_stride, kv_stride, k_off, v_off) = self.strides;
        LayoutLaunch::new(
            self.queries,
            self.keys,
            self.heads,
            q_stride,
            kv_stride,
            k_off,
            v_off,
            (self.hd as f32).sqrt().recip(),
        )
    }

    /// (cube count, cube dim): one unit per row of `rows` rows.
    fn grid(tensor: &CubeTensor, rows: usize) -> (CubeCount, CubeDim) {
        let dim = CubeDim::new(&tensor.client, rows);
        (calculate_cube_count_elemwise(&tensor.client, rows, dim), dim)
    }
}

fn empty_like(like: &CubeTensor, shape: Shape, dtype: DType) -> CubeTensor {
    empty_device_dtype(like.client.clone(), like.device.clone(), shape, dtype)
}

fn address_type(tensors: &[&CubeTensor]) -> AddressType {
    tensors
        .iter()
        .map(|t| t.required_address_type())
        .max()
        .unwrap_or_default()
}

/// An attention's inputs: q, kv (the same tensor for self-attention) and the keys' bias if any.
struct Inputs {
    q: CubeTensor,
    kv: CubeTensor,
    bias: Option<CubeTensor>,
    dims: Dims,
}

impl Inputs {
    fn attention(qkv: CubeTensor, heads: usize) -> Self {
        let qkv = into_contiguous(qkv);
        let dims = Dims::of(&qkv, heads);
        Self {
            q: qkv.clone(),
            kv: qkv,
            bias: None,
            dims,
        }
    }

    fn cross(q: CubeTensor, kv: CubeTensor, bias: CubeTensor, heads: usize) -> Self {
        let (q, kv) = (into_contiguous(q), into_contiguous(kv));
        // The bias in the tensors' dtype, one value per key: [N, L].
        let bias = into_contiguous(burn_cubecl::kernel::cast(bias, q.dtype));
        let dims = Dims::cross(&q, &kv, heads);
        Self {
            q,
            kv,
            bias: Some(bias),
            dims,
        }
    }

    /// The bias argument: the bias, or q standing in (never read) when there is none.
    fn bias_arg(&self) -> CubeTensor {
        self.bias.clone().unwrap_or_else(|| self.q.clone())
    }
}

/// (output `[N, T, D]`, log-sum-exp `[N, h, T]` in f32).
fn forward(inputs: Inputs) -> (CubeTensor, CubeTensor) {
    let Inputs {
        ref q,
        ref kv,
        ref dims,
        ..
    } = inputs;
    let out = empty_like(
        q,
        Shape::new([dims.samples, dims.queries, dims.heads * dims.hd]),
        q.dtype,
    );
    let lse = empty_like(
        q,
        Shape::new([dims.samples, dims.heads, dims.queries]),
        DType::F32,
    );
    if dims.rows() == 0 {
        return (out, lse);
    }
    let (count, dim) = Dims::grid(q, dims.rows());
    let address = address_type(&[q, kv, &out, &lse]);
    let dtype = dtype_to_storage_type(q.dtype);
    forward_kernel::launch(
        &q.client,
        count,
        dim,
        address,
        q.clone().into_tensor_arg(),
        kv.clone().into_tensor_arg(),
        inputs.bias_arg().into_tensor_arg(),
        out.clone().into_tensor_arg(),
        lse.clone().into_tensor_arg(),
        dims.layout(),
        dims.hd,
        inputs.bias.is_some(),
        dtype,
    );
    (out, lse)
}

/// (dq, dkv) into `dq` and `dkv` (the same tensor, `[N, T, 3D]`, for self-attention).
fn backward(
    inputs: &Inputs,
    out: CubeTensor,
    lse: CubeTensor,
    grad: CubeTensor,
    dq: &CubeTensor,
    dkv: &CubeTensor,
) {
    let (out, lse, grad) = (into_contiguous(out), into_contiguous(lse), into_contiguous(grad));
    let Inputs { q, kv, dims, .. } = inputs;
    if dims.rows() == 0 || dims.key_rows() == 0 {
        return;
    }
    let delta = empty_like(q, lse.meta.shape().clone(), DType::F32);
    let address = address_type(&[q, kv, &out, &grad, dq, dkv]);
    let dtype = dtype_to_storage_type(q.dtype);
    let has_bias = inputs.bias.is_some();
    let (count, dim) = Dims::grid(q, dims.rows());
    dq_kernel::launch(
        &q.client,
        count,
        dim,
        address,
        q.clone().into_tensor_arg(),
        kv.clone().into_tensor_arg(),
        inputs.bias_arg().into_tensor_arg(),
        out.into_tensor_arg(),
        lse.clone().into_tensor_arg(),
        grad.clone().into_tensor_arg(),
        delta.clone().into_tensor_arg(),
        dq.clone().into_tensor_arg(),
        dims.layout(),
        dims.hd,
        has_bias,
        dtype,
    );
    let (count, dim) = Dims::grid(q, dims.key_rows());
    dkv_kernel::launch(
        &q.client,
        count,
        dim,
        address,
        q.clone().into_tensor_arg(),
        kv.clone().into_tensor_arg(),
        inputs.bias_arg().into_tensor_arg(),
        lse.into_tensor_arg(),
        grad.into_tensor_arg(),
        delta.into_tensor_arg(),
        dkv.clone().into_tensor_arg(),
        dims.layout(),
        dims.hd,
        has_bias,
        dtype,
    );
}

impl FlashOps for CubeBackend {
    fn flash_attention(qkv: CubeTensor, heads: usize) -> CubeTensor {
        forward(Inputs::attention(qkv, heads)).0
    }

    fn flash_cross_attention(q: CubeTensor, kv: CubeTensor, bias: CubeTensor, heads: usize) -> CubeTensor {
        forward(Inputs::cross(q, kv, bias, heads)).0
    }
}

impl FlashBackward for CubeBackend {
    fn flash_attention_train(qkv: CubeTensor, heads: usize) -> (CubeTensor, CubeTensor) {
        forward(Inputs::attention(qkv, heads))
    }

    fn flash_attention_backward(
        qkv: CubeTensor,
        out: CubeTensor,
        lse: CubeTensor,
        grad: CubeTensor,
        heads: usize,
    ) -> CubeTensor {
        let inputs = Inputs::attention(qkv, heads);
        // dq at the q columns, dk and dv at the k and v columns of one [N, T, 3D].
        let dqkv = empty_like(&inputs.q, inputs.q.meta.shape().clone(), inputs.q.dtype);
        backward(&inputs, out, lse, grad, &dqkv, &dqkv);
        dqkv
    }

    fn flash_cross_attention_train(
        q: CubeTensor,
        kv: CubeTensor,
        bias: CubeTensor,
        heads: usize,
    ) -> (CubeTensor, CubeTensor) {
        forward(Inputs::cross(q, kv, bias, heads))
    }

    fn flash_cross_attention_backward(
        q: CubeTensor,
        kv: CubeTensor,
        bias: CubeTensor,
        out: CubeTensor,
        lse: CubeTensor,
        grad: CubeTensor,
        heads: usize,
    ) -> (CubeTensor, CubeTensor) {
        let inputs = Inputs::cross(q, kv, bias, heads);
        let dq = empty_like(&inputs.q, inputs.q.meta.shape().clone(), inputs.q.dtype);
        let dkv = empty_like(&inputs.kv, inputs.kv.meta.shape().clone(), inputs.kv.dtype);
        backward(&inputs, out, lse, grad, &dq, &dkv);
        (dq, dkv)
    }
}

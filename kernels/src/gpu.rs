//! The DiT's self-attention on the GPU backends (wgpu, CUDA): memory-efficient CubeCL kernels.
//!
//! Composed of burn ops, attention materialises the scores `[N, h, T, T]` forward and keeps them for
//! the backward, plus permuted copies of q, k, v and the output. These kernels never hold a score
//! matrix: the forward streams the keys of one query row with an online softmax (flash attention's
//! running maximum and sum) and keeps only the row's log-sum-exp `[N, h, T]`; the backward
//! recomputes each probability from it. They read q, k, v straight from the fused qkv projection and
//! write the token-major layout the output projection reads, as the CPU kernels do.
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
//! Letters in shape comments: N batch, T tokens, D hidden = h heads x hd head width.

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

/// Whether [`crate::fused::attention`] runs these kernels on the GPU backends (default) or burn's
/// composite ops; ddm sets it from `DDM_GPU_ATTENTION` when it opens a GPU device.
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

/// The self-attention, routed by `Dispatch` to the cubecl backend and its autodiff.
#[backend_extension(Cube, Fusion, Autodiff)]
pub trait FlashOps: Backend {
    /// `qkv`: `[N, T, 3D]` -> `[N, T, D]`.
    #[fusion(dtype = qkv, shape = output_shape(qkv))]
    fn flash_attention(qkv: FloatTensor<Self>, heads: usize) -> FloatTensor<Self>;
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
}

// ------------------------------------------------------------------------------------------------
// The kernels
// ------------------------------------------------------------------------------------------------

/// One query row: the online softmax over every key, then `out` = Σ p v and `lse` = log Σ exp(s).
#[cube(launch, address_type = "dynamic")]
fn forward_kernel<F: Float>(
    qkv: &Tensor<F>,
    out: &mut Tensor<F>,
    lse: &mut Tensor<f32>,
    tokens: usize,
    heads: usize,
    scale: f32,
    #[comptime] hd: usize,
    #[define(F)] _dtype: ElemType,
) {
    let r = ABSOLUTE_POS;
    if r >= lse.len() {
        terminate!();
    }
    // Row r of [N, h, T] is token i of head h of sample n.
    let d = heads * hd;
    let d3 = 3 * d;
    let sample = (r / (heads * tokens)) * tokens * d3;
    let head = ((r / tokens) % heads) * hd;
    let i = r % tokens;
    let q_at = sample + i * d3 + head;

    let mut q = Array::<f32>::new(hd);
    let mut acc = Array::<f32>::new(hd);
    for c in 0..hd {
        q[c] = f32::cast_from(qkv[q_at + c]) * scale;
        acc[c] = f32::new(0.0);
    }
    let mut row_max = f32::new(-1.0e30);
    let mut sum = f32::new(0.0);
    for j in 0..tokens {
        let k_at = sample + j * d3 + d + head;
        let mut s = f32::new(0.0);
        for c in 0..hd {
            s += q[c] * f32::cast_from(qkv[k_at + c]);
        }
        let new_max = max(row_max, s);
        let correction = (row_max - new_max).exp();
        let p = (s - new_max).exp();
        sum = sum * correction + p;
        let v_at = k_at + d;
        for c in 0..hd {
            acc[c] = acc[c] * correction + p * f32::cast_from(qkv[v_at + c]);
        }
        row_max = new_max;
    }
    let out_at = sample / 3 + i * d + head;
    for c in 0..hd {
        out[out_at + c] = F::cast_from(acc[c] / sum);
    }
    lse[r] = row_max + sum.ln();
}

/// One query row of the backward: `dq` = scale Σ_j p (dp - δ) k_j, with dp = dout · v_j and
/// δ = dout · out (written to `delta` for the key-side kernel).
#[cube(launch, address_type = "dynamic")]
fn dq_kernel<F: Float>(
    qkv: &Tensor<F>,
    out: &Tensor<F>,
    lse: &Tensor<f32>,
    grad: &Tensor<F>,
    delta: &mut Tensor<f32>,
    dqkv: &mut Tensor<F>,
    tokens: usize,
    heads: usize,
    scale: f32,
    #[comptime] hd: usize,
    #[define(F)] _dtype: ElemType,
) {
    let r = ABSOLUTE_POS;
    if r >= lse.len() {
        terminate!();
    }
    // Row r of [N, h, T] is token i of head h of sample n.
    let d = heads * hd;
    let d3 = 3 * d;
    let sample = (r / (heads * tokens)) * tokens * d3;
    let head = ((r / tokens) % heads) * hd;
    let i = r % tokens;
    let q_at = sample + i * d3 + head;
    let out_at = sample / 3 + i * d + head;

    let mut q = Array::<f32>::new(hd);
    let mut dout = Array::<f32>::new(hd);
    let mut dq = Array::<f32>::new(hd);
    let mut dot = f32::new(0.0);
    for c in 0..hd {
        q[c] = f32::cast_from(qkv[q_at + c]) * scale;
        dout[c] = f32::cast_from(grad[out_at + c]);
        dot += dout[c] * f32::cast_from(out[out_at + c]);
        dq[c] = f32::new(0.0);
    }
    delta[r] = dot;
    let row_lse = lse[r];
    for j in 0..tokens {
        let k_at = sample + j * d3 + d + head;
        let v_at = k_at + d;
        let mut s = f32::new(0.0);
        let mut dp = f32::new(0.0);
        for c in 0..hd {
            s += q[c] * f32::cast_from(qkv[k_at + c]);
            dp += dout[c] * f32::cast_from(qkv[v_at + c]);
        }
        let ds = (s - row_lse).exp() * (dp - dot);
        for c in 0..hd {
            dq[c] += ds * f32::cast_from(qkv[k_at + c]);
        }
    }
    for c in 0..hd {
        dqkv[q_at + c] = F::cast_from(dq[c] * scale);
    }
}

/// One key row of the backward: `dk` = scale Σ_i p (dp - δ_i) q_i and `dv` = Σ_i p dout_i.
#[cube(launch, address_type = "dynamic")]
fn dkv_kernel<F: Float>(
    qkv: &Tensor<F>,
    lse: &Tensor<f32>,
    grad: &Tensor<F>,
    delta: &Tensor<f32>,
    dqkv: &mut Tensor<F>,
    tokens: usize,
    heads: usize,
    scale: f32,
    #[comptime] hd: usize,
    #[define(F)] _dtype: ElemType,
) {
    let r = ABSOLUTE_POS;
    if r >= lse.len() {
        terminate!();
    }
    // Row r of [N, h, T] is key j of head h of sample n; the query rows of its (n, h) start at
    // r - j.
    let d = heads * hd;
    let d3 = 3 * d;
    let sample = (r / (heads * tokens)) * tokens * d3;
    let head = ((r / tokens) % heads) * hd;
    let j = r % tokens;
    let k_at = sample + j * d3 + d + head;
    let v_at = k_at + d;
    let first_row = r - j;

    let mut k = Array::<f32>::new(hd);
    let mut v = Array::<f32>::new(hd);
    let mut dk = Array::<f32>::new(hd);
    let mut dv = Array::<f32>::new(hd);
    for c in 0..hd {
        k[c] = f32::cast_from(qkv[k_at + c]) * scale;
        v[c] = f32::cast_from(qkv[v_at + c]);
        dk[c] = f32::new(0.0);
        dv[c] = f32::new(0.0);
    }
    for query in 0..tokens {
        let q_at = sample + query * d3 + head;
        let out_at = sample / 3 + query * d + head;
        let mut s = f32::new(0.0);
        let mut dp = f32::new(0.0);
        for c in 0..hd {
            s += k[c] * f32::cast_from(qkv[q_at + c]);
            dp += v[c] * f32::cast_from(grad[out_at + c]);
        }
        let p = (s - lse[first_row + query]).exp();
        let ds = p * (dp - delta[first_row + query]);
        for c in 0..hd {
            dk[c] += ds * f32::cast_from(qkv[q_at + c]);
            dv[c] += p * f32::cast_from(grad[out_at + c]);
        }
    }
    for c in 0..hd {
        dqkv[k_at + c] = F::cast_from(dk[c] * scale);
        dqkv[v_at + c] = F::cast_from(dv[c]);
    }
}

// ------------------------------------------------------------------------------------------------
// The launches
// ------------------------------------------------------------------------------------------------

/// The problem a launch solves: `[N, T, 3D]` with h heads of width hd.
struct Dims {
    samples: usize,
    tokens: usize,
    heads: usize,
    hd: usize,
}

impl Dims {
    fn of(qkv: &CubeTensor, heads: usize) -> Self {
        let shape = qkv.meta.shape();
        let (samples, tokens, d3) = (shape[0], shape[1], shape[2]);
        assert!(
            heads > 0 && d3 % (3 * heads) == 0,
            "flash attention: qkv width {d3} is not 3 x {heads} heads"
        );
        Self {
            samples,
            tokens,
            heads,
            hd: d3 / 3 / heads,
        }
    }

    fn rows(&self) -> usize {
        self.samples * self.heads * self.tokens
    }

    fn scale(&self) -> f32 {
        (self.hd as f32).sqrt().recip()
    }

    /// (cube count, cube dim): one unit per score row.
    fn grid(&self, tensor: &CubeTensor) -> (CubeCount, CubeDim) {
        let dim = CubeDim::new(&tensor.client, self.rows());
        (
            calculate_cube_count_elemwise(&tensor.client, self.rows(), dim),
            dim,
        )
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

/// (output `[N, T, D]`, log-sum-exp `[N, h, T]` in f32).
fn forward(qkv: CubeTensor, heads: usize) -> (CubeTensor, CubeTensor) {
    let qkv = into_contiguous(qkv);
    let dims = Dims::of(&qkv, heads);
    let out = empty_like(&qkv, output_shape(qkv.meta.shape()), qkv.dtype);
    let lse = empty_like(&qkv, Shape::new([dims.samples, heads, dims.tokens]), DType::F32);
    if dims.rows() == 0 {
        return (out, lse);
    }
    let (count, dim) = dims.grid(&qkv);
    let address = address_type(&[&qkv, &out, &lse]);
    let dtype = dtype_to_storage_type(qkv.dtype);
    let client = qkv.client.clone();
    forward_kernel::launch(
        &client,
        count,
        dim,
        address,
        qkv.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        lse.clone().into_tensor_arg(),
        dims.tokens,
        dims.heads,
        dims.scale(),
        dims.hd,
        dtype,
    );
    (out, lse)
}

fn backward(qkv: CubeTensor, out: CubeTensor, lse: CubeTensor, grad: CubeTensor, heads: usize) -> CubeTensor {
    let (qkv, out, lse, grad) = (
        into_contiguous(qkv),
        into_contiguous(out),
        into_contiguous(lse),
        into_contiguous(grad),
    );
    let dims = Dims::of(&qkv, heads);
    let dqkv = empty_like(&qkv, qkv.meta.shape().clone(), qkv.dtype);
    if dims.rows() == 0 {
        return dqkv;
    }
    let delta = empty_like(&qkv, lse.meta.shape().clone(), DType::F32);
    let (count, dim) = dims.grid(&qkv);
    let address = address_type(&[&qkv, &out, &grad, &dqkv]);
    let dtype = dtype_to_storage_type(qkv.dtype);
    dq_kernel::launch(
        &qkv.client,
        count.clone(),
        dim,
        address,
        qkv.clone().into_tensor_arg(),
        out.into_tensor_arg(),
        lse.clone().into_tensor_arg(),
        grad.clone().into_tensor_arg(),
        delta.clone().into_tensor_arg(),
        dqkv.clone().into_tensor_arg(),
        dims.tokens,
        dims.heads,
        dims.scale(),
        dims.hd,
        dtype,
    );
    dkv_kernel::launch(
        &qkv.client,
        count,
        dim,
        address,
        qkv.clone().into_tensor_arg(),
        lse.into_tensor_arg(),
        grad.into_tensor_arg(),
        delta.into_tensor_arg(),
        dqkv.clone().into_tensor_arg(),
        dims.tokens,
        dims.heads,
        dims.scale(),
        dims.hd,
        dtype,
    );
    dqkv
}

impl FlashOps for CubeBackend {
    fn flash_attention(qkv: CubeTensor, heads: usize) -> CubeTensor {
        forward(qkv, heads).0
    }
}

impl FlashBackward for CubeBackend {
    fn flash_attention_train(qkv: CubeTensor, heads: usize) -> (CubeTensor, CubeTensor) {
        forward(qkv, heads)
    }

    fn flash_attention_backward(
        qkv: CubeTensor,
        out: CubeTensor,
        lse: CubeTensor,
        grad: CubeTensor,
        heads: usize,
    ) -> CubeTensor {
        backward(qkv, out, lse, grad, heads)
    }
}

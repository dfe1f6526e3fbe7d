//! DiT: the Diffusion Transformer of Peebles & Xie, "Scalable Diffusion Models with Transformers"
//! (arXiv 2212.09748), exactly as the public PyTorch reference (facebookresearch/DiT `models.py`).
//!
//! In reading order: helpers (sin-cos embeddings, `modulate`, layer norm), the embedders, the
//! adaLN-Zero block, the final layer, the model; its hyper-parameters, named sizes, FLOPs and
//! construction are in [`config`](DiTConfig). Parameter names follow the
//! reference (`x_embedder.proj.weight`, `blocks.3.adaLN_modulation.1.weight`, ...), so weights move
//! between PyTorch and ddm both ways (see `params.rs`).
//!
//! Letters in shape comments: N batch, C channels, H/W image side, P patch, T tokens, D hidden,
//! h heads, F frequency-embedding size.

use burn::nn::conv::Conv2d;
use burn::nn::{Embedding, Linear};
use burn::prelude::*;
use burn::tensor::activation::silu;
use serde::{Deserialize, Serialize};

use crate::condition::Condition;
use crate::error::{Error, Result};
use crate::fused::{gated_residual, layer_norm_modulate};
use crate::host::HostTensor;
use crate::params::{Init, ParamSource, StateDict};
use crate::precision::like;

mod config;
pub mod diffusers;
pub use config::{DIT_SIZES, DiTConfig, parse_size_name};

// ------------------------------------------------------------------------------------------------
// Helpers
// ------------------------------------------------------------------------------------------------

/// The reference's LayerNorm: no affine parameters, eps 1e-6.
const LN_EPS: f64 = 1e-6;

/// LayerNorm over the last axis without affine parameters.
pub fn layer_norm<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    layer_norm_eps(x, LN_EPS)
}

/// [`layer_norm`] with another eps (diffusers' DiT uses `norm_eps` before the MLP).
pub use crate::fused::layer_norm_eps;

/// GELU with the tanh approximation (the reference's `nn.GELU(approximate="tanh")`), written as
/// the identical `x * sigmoid(2 z)`, z = sqrt(2/pi) (x + 0.044715 x^3): one `exp` per element
/// instead of `powf` + `tanh` (burn's `gelu_approximate`), one fused op on the CPU (`fused.rs`).
pub use crate::fused::gelu_tanh;

/// A Linear layer over tokens, as one `[N*T, D]` matmul (rather than N small batched ones).
///
/// # Shapes
/// - `x`: `[N, T, D_in]` -> `[N, T, D_out]`
pub(crate) fn linear_tokens(layer: &Linear, x: Tensor<3>) -> Tensor<3> {
    let [n, t, d] = x.dims();
    let y = layer.forward(x.reshape([n * t, d])); // [N*T, D_out]
    let d_out = y.dims()[1];
    y.reshape([n, t, d_out])
}

/// Tokens back into images: `[N, g*g, P*P*C]` -> `[N, C, g*P, g*P]` ("nhwpqc -> nchpwq").
pub(crate) fn unpatchify(x: Tensor<3>, g: usize, p: usize, c: usize) -> Tensor<4> {
    let [n, _, _] = x.dims();
    x.reshape([n, g, g, p, p, c])
        .permute([0, 5, 1, 3, 2, 4]) // [N, C, g, P, g, P]
        .reshape([n, c, g * p, g * p])
}

/// DiT's sinusoidal timestep embedding: `[cos, sin]` of `t * exp(-ln(10000) i / (F/2 - shift))`
/// (`shift` 0 in the PyTorch reference, 1 in diffusers' `DiTTransformer2DModel`).
///
/// # Shapes
/// - `t`: `[N]` (already scaled, e.g. 1000 t) -> `[N, F]`
pub fn timestep_embedding(t: Tensor<1>, dim: usize, shift: f64) -> Tensor<2> {
    let half = dim / 2;
    let freqs: Vec<f32> = (0..half)
        .map(|i| (-(10000f64.ln()) * i as f64 / (half as f64 - shift)).exp() as f32)
        .collect();
    let n = t.dims()[0];
    let freqs = TensorData::new(freqs, [half]);
    let freqs = Tensor::<1>::from_data(freqs, (&t.device(), t.dtype())).reshape([1, half]); // t's dtype
    let args = t.reshape([n, 1]) * freqs; // [N, F/2]
    Tensor::cat(vec![args.clone().cos(), args.sin()], 1) // [N, F]
}

/// 1-D sin-cos embedding of positions (MAE/DiT): `[sin(pos w), cos(pos w)]`, w_i = 10000^(-i/(d/2)).
fn sincos_1d(dim: usize, pos: &[f64]) -> Vec<Vec<f64>> {
    let half = dim / 2;
    pos.iter()
        .map(|&p| {
            let args: Vec<f64> = (0..half)
                .map(|i| p / 10000f64.powf(i as f64 / half as f64))
                .collect();
            args.iter()
                .map(|a| a.sin())
                .chain(args.iter().map(|a| a.cos()))
                .collect()
        })
        .collect()
}

/// The fixed 2-D sin-cos position embedding `[1, T, D]` for a `grid x grid` token grid.
/// As in the reference, the first D/2 channels encode the column (w) and the rest the row (h).
pub fn pos_embed_2d(dim: usize, grid: usize) -> HostTensor {
    pos_embed_2d_scaled(dim, grid, 1.0)
}

/// [`pos_embed_2d`] at positions divided by `scale` (diffusers' `interpolation_scale`).
pub fn pos_embed_2d_scaled(dim: usize, grid: usize, scale: f64) -> HostTensor {
    let cols: Vec<f64> = (0..grid * grid).map(|r| (r % grid) as f64 / scale).collect();
    let rows: Vec<f64> = (0..grid * grid).map(|r| (r / grid) as f64 / scale).collect();
    let (ew, eh) = (sincos_1d(dim / 2, &cols), sincos_1d(dim / 2, &rows));
    let data = ew
        .into_iter()
        .zip(eh)
        .flat_map(|(a, b)| a.into_iter().chain(b))
        .map(|v| v as f32)
        .collect();
    HostTensor::new(vec![1, grid * grid, dim], data)
}

// ------------------------------------------------------------------------------------------------
// Embedders
// ------------------------------------------------------------------------------------------------

/// Embeds flow time t in [0, 1]: sinusoid of `t_scale * t`, then MLP (Linear, SiLU, Linear).
#[derive(Module, Debug)]
pub struct TimestepEmbedder {
    mlp_0: Linear,
    mlp_2: Linear,
    #[module(skip)]
    freq_dim: usize,
    #[module(skip)]
    t_scale: f64,
    #[module(skip)]
    freq_shift: f64,
}

impl TimestepEmbedder {
    /// `freq` is the sinusoid: (size F, time scale, frequency shift).
    pub fn build(
        src: &mut impl ParamSource,
        prefix: &str,
        hidden: usize,
        (freq_dim, t_scale, freq_shift): (usize, f64, f64),
    ) -> Result<Self> {
        Ok(Self {
            // The reference initialises both layers N(0, 0.02^2).
            mlp_0: src.linear(&format!("{prefix}.mlp.0"), freq_dim, hidden, Init::Normal(0.02))?,
            mlp_2: src.linear(&format!("{prefix}.mlp.2"), hidden, hidden, Init::Normal(0.02))?,
            freq_dim,
            t_scale,
            freq_shift,
        })
    }

    /// # Shapes
    /// - `t`: `[N]` in [0, 1] -> `[N, D]`
    pub fn forward(&self, t: Tensor<1>) -> Tensor<2> {
        // In t's dtype (f32: 1000 t has too few bits in bf16 for the sinusoid), then the MLP's.
        let freq = timestep_embedding(t * self.t_scale, self.freq_dim, self.freq_shift); // [N, F]
        let freq = like(freq, self.mlp_0.weight.val().dtype());
        self.mlp_2.forward(silu(self.mlp_0.forward(freq))) // [N, D]
    }

    pub fn export(&self, prefix: &str, sd: &mut StateDict) {
        sd.linear(&format!("{prefix}.mlp.0"), &self.mlp_0);
        sd.linear(&format!("{prefix}.mlp.2"), &self.mlp_2);
    }
}

/// The conditioning vector c = t_embedder(t) + y_embedder(y): the model's one (the PyTorch
/// reference), or each block's own (diffusers' `DiTTransformer2DModel`, `per_block_conditioning`).
#[derive(Module, Debug)]
pub struct Conditioning {
    t_embedder: TimestepEmbedder,
    y_embedder: Option<Embedding>,
}

impl Conditioning {
    /// `prefix` is "" for the model's, "blocks.3." for a block's.
    fn build(src: &mut impl ParamSource, prefix: &str, config: &DiTConfig) -> Result<Self> {
        let d = config.hidden_size;
        Ok(Self {
            t_embedder: TimestepEmbedder::build(
                src,
                &format!("{prefix}t_embedder"),
                d,
                (config.frequency_embedding_size, config.t_scale, config.freq_shift),
            )?,
            y_embedder: if config.num_classes > 0 {
                Some(src.embedding(
                    &format!("{prefix}y_embedder.embedding_table"),
                    config.class_rows(),
                    d,
                    Init::Normal(0.02),
                )?)
            } else {
                None
            },
        })
    }

    /// # Shapes
    /// - `t`: `[N]`, `y`: `[N]` -> `[N, D]`
    fn forward(&self, t: Tensor<1>, y: Option<Tensor<1, Int>>) -> Tensor<2> {
        let c = self.t_embedder.forward(t); // [N, D]
        match (&self.y_embedder, y) {
            (Some(emb), Some(y)) => c + emb.weight.val().select(0, y), // [N, D]
            _ => c,
        }
    }

    fn export(&self, prefix: &str, sd: &mut StateDict) {
        self.t_embedder.export(&format!("{prefix}t_embedder"), sd);
        if let Some(e) = &self.y_embedder {
            sd.embedding(&format!("{prefix}y_embedder.embedding_table"), e);
        }
    }
}

/// A model's projection of the condition's vector `[N, Dc]` (the zero vector, the null condition,
/// when it has none) -> `[N, D]`; None for a model that reads no vectors.
pub fn vector_embedding(
    c_embedder: Option<&Linear>,
    cond: &Condition,
    n: usize,
    device: &Device,
) -> Option<Tensor<2>> {
    let embed = c_embedder?;
    let dtype = embed.weight.val().dtype();
    let v = match &cond.vector {
        Some(v) => like(v.clone(), dtype),
        None => Tensor::<2>::zeros([n, embed.weight.dims()[0]], (device, dtype)),
    };
    Some(embed.forward(v))
}

// ------------------------------------------------------------------------------------------------
// The adaLN-Zero block
// ------------------------------------------------------------------------------------------------

/// Multi-head self-attention with a fused qkv projection (with bias), scale 1/sqrt(head_dim).
#[derive(Module, Debug)]
pub struct Attention {
    qkv: Linear,
    proj: Linear,
    #[module(skip)]
    heads: usize,
}

impl Attention {
    /// # Shapes
    /// - `x`: `[N, T, D]` -> `[N, T, D]`
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let qkv = linear_tokens(&self.qkv, x); // [N, T, 3D]
        linear_tokens(&self.proj, crate::fused::attention(qkv, self.heads)) // [N, T, D]
    }
}

/// A DiT block with adaLN-Zero conditioning: attention and MLP residual branches, each modulated
/// (shift, scale) and gated by the conditioning vector c.
#[derive(Module, Debug)]
pub struct DiTBlock {
    attn: Attention,
    mlp_fc1: Linear,
    mlp_fc2: Linear,
    ada_ln: Linear,
    /// The block's own conditioning (diffusers' layout); None: the model's.
    cond: Option<Conditioning>,
    /// eps of the LayerNorm before the MLP (`DiTConfig::mlp_norm_eps`).
    #[module(skip)]
    mlp_norm_eps: f64,
}

impl DiTBlock {
    fn build(src: &mut impl ParamSource, prefix: &str, config: &DiTConfig) -> Result<Self> {
        let p = |s: &str| format!("{prefix}.{s}");
        let (hidden, heads) = (config.hidden_size, config.num_heads);
        let mlp_hidden = (hidden as f64 * config.mlp_ratio) as usize;
        Ok(Self {
            cond: if config.per_block_conditioning {
                Some(Conditioning::build(src, &format!("{prefix}."), config)?)
            } else {
                None
            },
            mlp_norm_eps: config.mlp_norm_eps,
            attn: Attention {
                qkv: src.linear(&p("attn.qkv"), hidden, 3 * hidden, Init::Xavier)?,
                proj: src.linear(&p("attn.proj"), hidden, hidden, Init::Xavier)?,
                heads,
            },
            mlp_fc1: src.linear(&p("mlp.fc1"), hidden, mlp_hidden, Init::Xavier)?,
            mlp_fc2: src.linear(&p("mlp.fc2"), mlp_hidden, hidden, Init::Xavier)?,
            // adaLN-Zero: the modulation starts at zero, so every gate is 0 and the block is the
            // identity at initialisation.
            ada_ln: src.linear(&p("adaLN_modulation.1"), hidden, 6 * hidden, Init::Zeros)?,
        })
    }

    /// # Shapes
    /// - `x`: `[N, T, D]`, `c`: `[N, D]` -> `[N, T, D]`
    pub fn forward(&self, x: Tensor<3>, c: Tensor<2>) -> Tensor<3> {
        let m = self.ada_ln.forward(silu(c)).chunk(6, 1); // 6 x [N, D]
        let (shift_msa, scale_msa, gate_msa) = (m[0].clone(), m[1].clone(), m[2].clone());
        let (shift_mlp, scale_mlp, gate_mlp) = (m[3].clone(), m[4].clone(), m[5].clone());
        // LayerNorm + modulation, and the gated residual, are each one fused op (`fused.rs`).
        let h = layer_norm_modulate(x.clone(), shift_msa, scale_msa, LN_EPS);
        let x = gated_residual(x, gate_msa, self.attn.forward(h));
        let h = layer_norm_modulate(x.clone(), shift_mlp, scale_mlp, self.mlp_norm_eps);
        let h = linear_tokens(&self.mlp_fc2, gelu_tanh(linear_tokens(&self.mlp_fc1, h)));
        gated_residual(x, gate_mlp, h)
    }

    fn export(&self, prefix: &str, sd: &mut StateDict) {
        let p = |s: &str| format!("{prefix}.{s}");
        sd.linear(&p("attn.qkv"), &self.attn.qkv);
        sd.linear(&p("attn.proj"), &self.attn.proj);
        sd.linear(&p("mlp.fc1"), &self.mlp_fc1);
        sd.linear(&p("mlp.fc2"), &self.mlp_fc2);
        sd.linear(&p("adaLN_modulation.1"), &self.ada_ln);
        if let Some(c) = &self.cond {
            c.export(&format!("{prefix}."), sd);
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Final layer
// ------------------------------------------------------------------------------------------------

/// Final adaLN (shift, scale) + Linear to P*P*C_out values per token. Zero-initialised, so a fresh
/// DiT predicts exactly zero.
#[derive(Module, Debug)]
pub struct FinalLayer {
    ada_ln: Linear,
    linear: Linear,
}

impl FinalLayer {
    /// # Shapes
    /// - `x`: `[N, T, D]`, `c`: `[N, D]` -> `[N, T, P*P*C_out]`
    pub fn forward(&self, x: Tensor<3>, c: Tensor<2>) -> Tensor<3> {
        let m = self.ada_ln.forward(silu(c)).chunk(2, 1); // 2 x [N, D]
        let h = layer_norm_modulate(x, m[0].clone(), m[1].clone(), LN_EPS);
        linear_tokens(&self.linear, h)
    }
}

// ------------------------------------------------------------------------------------------------
// The model
// ------------------------------------------------------------------------------------------------

/// The Diffusion Transformer: patchify, add positions, condition on time (and class), N adaLN-Zero
/// blocks, final layer, unpatchify.
#[derive(Module, Debug)]
pub struct DiT {
    x_embedder: Conv2d,
    /// The conditioning every block reads; None when each block has its own.
    cond: Option<Conditioning>,
    /// Projects a per-sample conditioning vector into the conditioning (`condition_dim` > 0).
    c_embedder: Option<Linear>,
    /// Fixed 2-D sin-cos position embedding `[1, T, D]`; not trained.
    pos_embed: Tensor<3>,
    blocks: Vec<DiTBlock>,
    /// The velocity head; None for a trunk (`DiTConfig::build_trunk`).
    final_layer: Option<FinalLayer>,
    #[module(skip)]
    config: DiTConfig,
}

impl DiT {
    pub fn config(&self) -> &DiTConfig {
        &self.config
    }

    /// The trunk shared by the velocity head and (later) the router's head: tokens after the last
    /// block and the conditioning vector.
    ///
    /// `extra`, if given, is added to the conditioning vector (a router's projection of a
    /// per-sample conditioning vector).
    ///
    /// # Shapes
    /// - `x`: `[N, C, S, S]`, `t`: `[N]`, `y`: `[N]`, `extra`: `[N, D]` -> (`[N, T, D]`, `[N, D]`)
    pub fn trunk(
        &self,
        x: Tensor<4>,
        t: Tensor<1>,
        y: Option<Tensor<1, Int>>,
        extra: Option<Tensor<2>>,
    ) -> (Tensor<3>, Tensor<2>) {
        let [n, _, _, _] = x.dims();
        let (g, d) = (self.config.grid(), self.config.hidden_size);
        let x = self.x_embedder.forward(x); // [N, D, S/P, S/P]
        let pos = like(self.pos_embed.clone(), x.dtype()); // a constant: not cast with the parameters
        let mut x = x.reshape([n, d, g * g]).swap_dims(1, 2) + pos; // [N, T, D]
        let with_extra = |c: Tensor<2>| match &extra {
            Some(e) => c + e.clone(), // [N, D]
            None => c,
        };
        let shared = self
            .cond
            .as_ref()
            .map(|c| with_extra(c.forward(t.clone(), y.clone())));
        // The head reads the model's conditioning, or (diffusers' layout) the first block's.
        let mut head_c = shared.clone();
        for block in &self.blocks {
            let c = match &block.cond {
                Some(own) => with_extra(own.forward(t.clone(), y.clone())),
                None => shared
                    .clone()
                    .expect("a DiT without per-block conditioning has its own"),
            }; // [N, D]
            head_c.get_or_insert_with(|| c.clone());
            x = block.forward(x, c); // [N, T, D]
        }
        (x, head_c.expect("a DiT has at least one block"))
    }

    /// Predict the velocity (or, for an epsilon expert, the noise).
    ///
    /// # Shapes
    /// - `x`: `[N, C, S, S]`, `t`: `[N]` in [0, 1]; the condition's class `[N]` (null class =
    ///   num_classes) and vector `[N, condition_dim]` (absent: the null, zero, vector)
    /// - returns `[N, C, S, S]` (with `learn_sigma`, the first C of the 2C output channels)
    ///
    /// It computes in its parameters' dtype (`precision::cast`) and returns `x`'s.
    pub fn forward(&self, x: Tensor<4>, t: Tensor<1>, cond: &Condition) -> Tensor<4> {
        let io = x.dtype();
        let dtype = self.x_embedder.weight.val().dtype();
        let x = like(x, dtype); // t stays f32: the timestep embedder casts after its sinusoid
        let extra = vector_embedding(self.c_embedder.as_ref(), cond, x.dims()[0], &x.device());
        let (x, c) = self.trunk(x, t, cond.class.clone(), extra);
        let head = self
            .final_layer
            .as_ref()
            .expect("forward needs the velocity head; trunks are for routers");
        let x = head.forward(x, c); // [N, T, P*P*C_out]
        let x = self.unpatchify(x); // [N, C_out, S, S]
        let x = if self.config.learn_sigma {
            x.narrow(1, 0, self.config.in_channels)
        } else {
            x
        };
        like(x, io)
    }

    /// `[N, T, P*P*C]` -> `[N, C, S, S]` ("nhwpqc -> nchpwq").
    fn unpatchify(&self, x: Tensor<3>) -> Tensor<4> {
        let c = &self.config;
        unpatchify(x, c.grid(), c.patch_size, c.out_channels())
    }

    /// All tensors under their PyTorch reference names.
    pub fn state_dict(&self) -> StateDict {
        let mut sd = StateDict::default();
        sd.conv("x_embedder.proj", &self.x_embedder);
        if let Some(l) = &self.c_embedder {
            sd.linear("c_embedder", l);
        }
        if let Some(c) = &self.cond {
            c.export("", &mut sd);
        }
        sd.tensor("pos_embed", &self.pos_embed);
        for (i, b) in self.blocks.iter().enumerate() {
            b.export(&format!("blocks.{i}"), &mut sd);
        }
        if let Some(f) = &self.final_layer {
            sd.linear("final_layer.adaLN_modulation.1", &f.ada_ln);
            sd.linear("final_layer.linear", &f.linear);
        }
        sd
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::RandomInit;

    #[test]
    fn gelu_tanh_equals_the_tanh_form() {
        let device = crate::device::cpu();
        let x = Tensor::<1>::from_floats([-6.0, -2.5, -1.0, -0.1, 0.0, 0.3, 1.0, 2.0, 7.0], &device);
        let a = HostTensor::from_tensor(gelu_tanh(x.clone())).data;
        let b = HostTensor::from_tensor(burn::tensor::activation::gelu_approximate(x)).data;
        for (a, b) in a.iter().zip(&b) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
    }

    #[test]
    fn named_sizes_parse() {
        let c = DiTConfig::named("DiT-S/2", 32, 4).unwrap();
        assert_eq!(
            (c.hidden_size, c.depth, c.num_heads, c.patch_size),
            (384, 12, 6, 2)
        );
        assert_eq!(DiTConfig::named("dit-xl/8", 32, 4).unwrap().hidden_size, 1152);
        assert!(
            DiTConfig::named("DiT-Q/2", 32, 4)
                .unwrap_err()
                .to_string()
                .contains("unknown DiT size")
        );
        assert!(DiTConfig::named("DiT-S/3", 32, 4).is_err());
        assert!(
            DiTConfig::named("DiT-T/8", 28, 1)
                .unwrap_err()
                .to_string()
                .contains("multiple of patch_size")
        );
    }

    /// adaLN-Zero: a freshly built DiT predicts exactly zero, whatever the input.
    #[test]
    fn fresh_dit_outputs_exactly_zero() {
        let device = crate::device::cpu();
        let mut config = DiTConfig::named("DiT-T/4", 16, 3).unwrap();
        config.num_classes = 5;
        let dit = config.build(&mut RandomInit::new(0, &device)).unwrap();
        let x = Tensor::<4>::random(
            [3, 3, 16, 16],
            burn::tensor::Distribution::Normal(0.0, 3.0),
            &device,
        );
        let t = Tensor::<1>::from_floats([0.0, 0.5, 1.0], &device);
        let y = Tensor::<1, Int>::from_ints([0, 4, 5], &device);
        let v = HostTensor::from_tensor(dit.forward(x, t, &Condition::class(y)));
        assert_eq!(v.shape, vec![3, 3, 16, 16]);
        assert!(v.data.iter().all(|&v| v == 0.0));
        // ...and the block gates are zero too, so every block starts as the identity.
        let sd = dit.state_dict().0;
        assert!(
            sd["blocks.0.adaLN_modulation.1.weight"]
                .data
                .iter()
                .all(|&v| v == 0.0)
        );
        assert!(
            sd["blocks.3.adaLN_modulation.1.bias"]
                .data
                .iter()
                .all(|&v| v == 0.0)
        );
        assert!(sd["blocks.0.attn.qkv.weight"].data.iter().any(|&v| v != 0.0));
    }

    #[test]
    fn same_seed_same_weights() {
        let device = crate::device::cpu();
        let config = DiTConfig::named("DiT-T/4", 8, 1).unwrap();
        let a = config
            .build(&mut RandomInit::new(5, &device))
            .unwrap()
            .state_dict()
            .0;
        let b = config
            .build(&mut RandomInit::new(5, &device))
            .unwrap()
            .state_dict()
            .0;
        let c = config
            .build(&mut RandomInit::new(6, &device))
            .unwrap()
            .state_dict()
            .0;
        assert_eq!(a, b);
        assert_ne!(a["blocks.0.attn.qkv.weight"], c["blocks.0.attn.qkv.weight"]);
    }

    #[test]
    fn flops_are_about_twice_the_parameter_count_times_tokens() {
        // For a DiT the matmul FLOPs dominate: ~2 * params_in_blocks * T.
        let c = DiTConfig::named("DiT-XL/2", 32, 4).unwrap();
        let gflops = c.flops_per_sample() / 1e9;
        // The DiT paper lists DiT-XL/2 at 118.6 GFLOPs (counting a multiply-add as one FLOP).
        assert!((gflops / 2.0 - 118.6).abs() / 118.6 < 0.05, "{gflops}");
    }
}

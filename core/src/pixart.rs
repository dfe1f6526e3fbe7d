//! PixArt-α's transformer (Chen et al., "PixArt-α: Fast Training of Diffusion Transformer for
//! Photorealistic Text-to-Image Synthesis", arXiv 2310.00426), as diffusers'
//! `PixArtTransformer2DModel`: a DiT whose blocks read the caption's token sequence through
//! cross-attention, conditioned on time by adaLN-single (one modulation MLP for the whole model and
//! a learnt `scale_shift_table` per block, in place of DiT's per-block adaLN MLPs).
//!
//! Per block: x += gate_msa · SelfAttn(LN(x) (1 + scale_msa) + shift_msa);
//! x += CrossAttn(x, caption); x += gate_mlp · FF(LN(x) (1 + scale_mlp) + shift_mlp).
//!
//! Parameter names are diffusers' (`transformer_blocks.3.attn2.to_q.weight`, ...), so a
//! `PixArtTransformer2DModel` checkpoint loads as it is saved (`ddm import --from diffusers`).
//! The null caption (classifier-free guidance, caption dropout) is the sequence of padding only:
//! every key masked alike, so cross-attention reads the mean of the projected zero tokens.
//!
//! Letters in shape comments: N batch, C channels, S image side, P patch, T image tokens,
//! L caption tokens, D hidden, Dc caption width, h heads, F frequency-embedding size.

use std::collections::BTreeMap;

use burn::module::Param;
use burn::nn::Linear;
use burn::nn::conv::Conv2d;
use burn::prelude::*;
use burn::tensor::activation::silu;
use burn::tensor::module::linear;
use serde::{Deserialize, Serialize};

use crate::condition::{Condition, Tokens};
use crate::dit::diffusers::{gelu_approximate, yes};
use crate::dit::{gelu_tanh, linear_tokens, pos_embed_2d_scaled, timestep_embedding, unpatchify};
use crate::error::{Error, Result};
use crate::fused::{gated_residual, layer_norm_modulate};
use crate::host::HostTensor;
use crate::params::{Init, ParamSource, StateDict};
use crate::precision::like;

/// The additive bias of a masked caption token (diffusers': `(1 - mask) * -10000`).
const MASKED: f64 = -10000.0;

/// PixArt's hyper-parameters (diffusers' `config.json` names in the comments).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PixArtConfig {
    /// Image side S (`sample_size`).
    pub input_size: usize,
    pub patch_size: usize,
    pub in_channels: usize,
    /// D = heads x head width (`num_attention_heads * attention_head_dim`).
    pub hidden_size: usize,
    /// Blocks (`num_layers`).
    pub depth: usize,
    pub num_heads: usize,
    /// Width of the caption's token embeddings (`caption_channels`; T5-XXL: 4096).
    pub caption_channels: usize,
    /// Also predict a variance (`out_channels` = 2C): the first C channels are the prediction.
    #[serde(default)]
    pub learn_sigma: bool,
    /// The network sees `t_scale * t` in its timestep embedding (diffusers' 1000 steps).
    #[serde(default = "default_t_scale")]
    pub t_scale: f64,
    /// The position embedding's positions are divided by this (`interpolation_scale`).
    #[serde(default = "one")]
    pub interpolation_scale: f64,
    /// Probability that training replaces a caption by the null caption (0: guidance cannot
    /// be used).
    #[serde(default)]
    pub caption_dropout_prob: f64,
    /// The caption's token length L the model was trained on (the text space's); None: not
    /// known (an imported PixArt), and FLOPs are stated for PixArt-α's 120 T5 tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caption_length: Option<usize>,
    /// The length of the null caption stored with the weights (`null_caption.*`: the text
    /// encoder's tokens for the empty prompt, which an imported PixArt was trained to read as no
    /// caption); None: the null caption is padding only, as ddm's training drops captions to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub null_caption_length: Option<usize>,
}

fn default_t_scale() -> f64 {
    1000.0
}
fn one() -> f64 {
    1.0
}

/// Size of the sinusoidal timestep features (diffusers' `Timesteps(256)`).
const FREQ_DIM: usize = 256;
/// eps of every LayerNorm (`norm_eps`, and the output norm's fixed 1e-6).
const LN_EPS: f64 = 1e-6;
/// The feed-forward's widening (diffusers' `FeedForward(mult=4)`).
const FF_MULT: usize = 4;

impl PixArtConfig {
    /// The PixArt of a DiT size (`S/2`: DiT-S's width, depth and heads, patch 2) for images
    /// `[C, S, S]`, reading captions of width 1 until [`crate::model::ModelConfig::with_caption_tokens`]
    /// sets the data's.
    pub fn named(size: &str, input_size: usize, in_channels: usize) -> Result<Self> {
        let dit = crate::dit::DiTConfig::named(size, input_size, in_channels).map_err(|_| {
            Error::InvalidConfig(format!(
                "unknown PixArt size `PixArt-{size}`: expected PixArt-<size>/<patch> with a DiT size (e.g. PixArt-S/2)"
            ))
        })?;
        let config = Self {
            input_size,
            patch_size: dit.patch_size,
            in_channels,
            hidden_size: dit.hidden_size,
            depth: dit.depth,
            num_heads: dit.num_heads,
            caption_channels: 1,
            learn_sigma: false,
            t_scale: default_t_scale(),
            interpolation_scale: 1.0,
            caption_dropout_prob: 0.0,
            caption_length: None,
            null_caption_length: None,
        };
        config.validate()?;
        Ok(config)
    }

    /// Tokens per side: S / P.
    pub fn grid(&self) -> usize {
        self.input_size / self.patch_size
    }

    pub fn out_channels(&self) -> usize {
        if self.learn_sigma {
            2 * self.in_channels
        } else {
            self.in_channels
        }
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidConfig(format!("PixArt config: {m}")));
        if self.patch_size == 0 || !self.input_size.is_multiple_of(self.patch_size) {
            return bad(format!(
                "input_size {} must be a positive multiple of patch_size {}",
                self.input_size, self.patch_size
            ));
        }
        if self.num_heads == 0 || !self.hidden_size.is_multiple_of(self.num_heads) {
            return bad(format!(
                "hidden_size {} must be a multiple of num_heads {}",
                self.hidden_size, self.num_heads
            ));
        }
        if !self.hidden_size.is_multiple_of(4) {
            return bad(format!(
                "hidden_size {} must be a multiple of 4 (the 2-D position embedding)",
                self.hidden_size
            ));
        }
        let lengths = [self.caption_length, self.null_caption_length];
        if self.depth == 0
            || self.in_channels == 0
            || self.caption_channels == 0
            || lengths.contains(&Some(0))
        {
            return bad(
                "depth, in_channels, caption_channels, caption_length and null_caption_length must be positive"
                    .into(),
            );
        }
        if !(0.0..1.0).contains(&self.caption_dropout_prob) {
            return bad(format!(
                "caption_dropout_prob {} must be in [0, 1)",
                self.caption_dropout_prob
            ));
        }
        if !(self.interpolation_scale > 0.0 && self.interpolation_scale.is_finite()) {
            return bad(format!(
                "interpolation_scale {} must be positive",
                self.interpolation_scale
            ));
        }
        let tokens = self.grid().pow(2);
        for (name, v, max) in [
            ("input_size", self.input_size, 1 << 14),
            ("in_channels", self.in_channels, 1 << 12),
            ("hidden_size", self.hidden_size, 1 << 15),
            ("depth", self.depth, 1 << 10),
            ("caption_channels", self.caption_channels, 1 << 16),
            ("caption_length", self.caption_length.unwrap_or(1), 1 << 16),
            (
                "null_caption_length",
                self.null_caption_length.unwrap_or(1),
                1 << 16,
            ),
            (
                "tokens x hidden_size",
                tokens.saturating_mul(self.hidden_size),
                1 << 28,
            ),
        ] {
            if v > max {
                return bad(format!("{name} {v} is larger than {max}"));
            }
        }
        Ok(())
    }

    /// Forward FLOPs per sample (multiply-adds x 2) for a caption of `caption_tokens` tokens.
    pub fn flops_per_sample_with(&self, caption_tokens: usize) -> f64 {
        let (t, l, d) = (
            self.grid().pow(2) as f64,
            caption_tokens as f64,
            self.hidden_size as f64,
        );
        let dc = self.caption_channels as f64;
        let self_attn = 4.0 * t * d * d + 2.0 * t * t * d;
        let cross_attn = 2.0 * t * d * d + 2.0 * l * d * d + 2.0 * t * l * d;
        let ff = 2.0 * t * d * (FF_MULT as f64 * d);
        let block = self_attn + cross_attn + ff;
        let p2c = (self.patch_size.pow(2) * self.in_channels) as f64;
        let embed = t * p2c * d + l * (dc * d + d * d) + FREQ_DIM as f64 * d + d * d + d * 6.0 * d;
        let head = t * d * (self.patch_size.pow(2) * self.out_channels()) as f64;
        2.0 * (self.depth as f64 * block + embed + head)
    }

    /// Forward FLOPs per sample for a caption of the length the model was trained on, or of
    /// PixArt-α's 120 T5 tokens where that is not known.
    pub fn flops_per_sample(&self) -> f64 {
        self.flops_per_sample_with(self.caption_length.unwrap_or(120))
    }

    /// Floats one training sample keeps for the backward pass (a lower estimate).
    pub fn activation_floats_per_sample(&self) -> f64 {
        let (t, d) = (self.grid().pow(2) as f64, self.hidden_size as f64);
        let per_block = t * d * (12.0 + 2.0 * FF_MULT as f64) + 2.0 * t * t * self.num_heads as f64;
        self.depth as f64 * per_block
    }

    pub fn build(&self, src: &mut impl ParamSource) -> Result<PixArt> {
        self.validate()?;
        let d = self.hidden_size;
        let pos = pos_embed_2d_scaled(d, self.grid(), self.interpolation_scale);
        Ok(PixArt {
            patch: src.patch_conv(
                "pos_embed.proj",
                self.in_channels,
                d,
                self.patch_size,
                Init::Xavier,
            )?,
            pos_embed: pos.to_tensor::<3>(src.device()),
            t_linear_1: src.linear(
                "adaln_single.emb.timestep_embedder.linear_1",
                FREQ_DIM,
                d,
                Init::Normal(0.02),
            )?,
            t_linear_2: src.linear(
                "adaln_single.emb.timestep_embedder.linear_2",
                d,
                d,
                Init::Normal(0.02),
            )?,
            t_block: src.linear("adaln_single.linear", d, 6 * d, Init::Normal(0.02))?,
            caption_1: src.linear(
                "caption_projection.linear_1",
                self.caption_channels,
                d,
                Init::Normal(0.02),
            )?,
            caption_2: src.linear("caption_projection.linear_2", d, d, Init::Normal(0.02))?,
            blocks: (0..self.depth)
                .map(|i| PixArtBlock::build(src, &format!("transformer_blocks.{i}"), self))
                .collect::<Result<_>>()?,
            scale_shift_table: src.table("scale_shift_table", 2, d, Init::Normal(1.0 / (d as f64).sqrt()))?,
            proj_out: src.linear(
                "proj_out",
                d,
                self.patch_size.pow(2) * self.out_channels(),
                Init::Zeros,
            )?,
            null_caption: match self.null_caption_length {
                Some(l) => Some(NullCaption::build(src, l, self.caption_channels)?),
                None => None,
            },
            config: self.clone(),
        })
    }
}

// ------------------------------------------------------------------------------------------------
// Attention
// ------------------------------------------------------------------------------------------------

/// diffusers' `Attention` with separate q, k, v projections: self-attention (keys from the image
/// tokens) or cross-attention (keys from the caption), scale 1/sqrt(head width).
#[derive(Module, Debug)]
pub struct MultiHeadAttention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    #[module(skip)]
    heads: usize,
}

impl MultiHeadAttention {
    fn build(src: &mut impl ParamSource, prefix: &str, d: usize, heads: usize) -> Result<Self> {
        let p = |s: &str| format!("{prefix}.{s}");
        Ok(Self {
            to_q: src.linear(&p("to_q"), d, d, Init::Xavier)?,
            to_k: src.linear(&p("to_k"), d, d, Init::Xavier)?,
            to_v: src.linear(&p("to_v"), d, d, Init::Xavier)?,
            to_out: src.linear(&p("to_out.0"), d, d, Init::Xavier)?,
            heads,
        })
    }

    /// Self-attention of the image tokens: the q, k, v projections as one (their weights side by
    /// side), then the fused attention the DiT runs.
    ///
    /// # Shapes
    /// - `x`: `[N, T, D]` -> `[N, T, D]`
    pub fn self_attention(&self, x: Tensor<3>) -> Tensor<3> {
        let qkv = side_by_side(&[&self.to_q, &self.to_k, &self.to_v], x); // [N, T, 3D]
        linear_tokens(&self.to_out, crate::fused::attention(qkv, self.heads))
    }

    /// The image tokens attend over the caption's tokens, `bias` added to every score of a
    /// caption token (0 for a token, -10000 for padding); k and v projected as one.
    ///
    /// # Shapes
    /// - `x`: `[N, T, D]`, `keys`: `[N, L, D]`, `bias`: `[N, L]` -> `[N, T, D]`
    pub fn cross_attention(&self, x: Tensor<3>, keys: Tensor<3>, bias: Tensor<2>) -> Tensor<3> {
        let q = linear_tokens(&self.to_q, x); // [N, T, D]
        let kv = side_by_side(&[&self.to_k, &self.to_v], keys); // [N, L, 2D]
        linear_tokens(
            &self.to_out,
            crate::fused::cross_attention(q, kv, bias, self.heads),
        )
    }

    fn export(&self, prefix: &str, sd: &mut StateDict) {
        let p = |s: &str| format!("{prefix}.{s}");
        sd.linear(&p("to_q"), &self.to_q);
        sd.linear(&p("to_k"), &self.to_k);
        sd.linear(&p("to_v"), &self.to_v);
        sd.linear(&p("to_out.0"), &self.to_out);
    }
}

/// Linear layers of the same input as one: their weights `[D_in, D_out_i]` (and biases) side by
/// side, one matmul. (Layers of which only some have a bias run one by one.)
///
/// # Shapes
/// - `x`: `[N, T, D_in]` -> `[N, T, sum of D_out_i]`
fn side_by_side(layers: &[&Linear], x: Tensor<3>) -> Tensor<3> {
    let biases: Vec<Option<Tensor<1>>> = layers.iter().map(|l| l.bias.as_ref().map(|b| b.val())).collect();
    let bias = match biases.iter().filter(|b| b.is_some()).count() {
        0 => None,
        k if k == layers.len() => Some(Tensor::cat(biases.into_iter().flatten().collect(), 0)),
        _ => return Tensor::cat(layers.iter().map(|l| linear_tokens(l, x.clone())).collect(), 2),
    };
    let [n, t, d] = x.dims();
    let weight = Tensor::cat(layers.iter().map(|l| l.weight.val()).collect(), 1); // [D_in, sum D_out]
    let y = linear(x.reshape([n * t, d]), weight, bias); // [N*T, sum D_out]
    let d_out = y.dims()[1];
    y.reshape([n, t, d_out])
}

// ------------------------------------------------------------------------------------------------
// The block
// ------------------------------------------------------------------------------------------------

/// A PixArt block: self-attention and feed-forward modulated and gated by adaLN-single (the
/// model's time modulation plus the block's `scale_shift_table`), cross-attention to the caption
/// between them, unmodulated.
#[derive(Module, Debug)]
pub struct PixArtBlock {
    attn1: MultiHeadAttention,
    attn2: MultiHeadAttention,
    ff_1: Linear,
    ff_2: Linear,
    /// `[6, D]`: shift, scale, gate of the self-attention, then of the feed-forward.
    scale_shift_table: Param<Tensor<2>>,
}

impl PixArtBlock {
    fn build(src: &mut impl ParamSource, prefix: &str, config: &PixArtConfig) -> Result<Self> {
        let p = |s: &str| format!("{prefix}.{s}");
        let (d, heads) = (config.hidden_size, config.num_heads);
        Ok(Self {
            attn1: MultiHeadAttention::build(src, &p("attn1"), d, heads)?,
            attn2: MultiHeadAttention::build(src, &p("attn2"), d, heads)?,
            ff_1: src.linear(&p("ff.net.0.proj"), d, FF_MULT * d, Init::Xavier)?,
            ff_2: src.linear(&p("ff.net.2"), FF_MULT * d, d, Init::Xavier)?,
            scale_shift_table: src.table(
                &p("scale_shift_table"),
                6,
                d,
                Init::Normal(1.0 / (d as f64).sqrt()),
            )?,
        })
    }

    /// # Shapes
    /// - `x`: `[N, T, D]`, `time`: `[N, 6D]` (adaLN-single's), `caption`: `[N, L, D]`,
    ///   `bias`: `[N, L]` -> `[N, T, D]`
    pub fn forward(&self, x: Tensor<3>, time: Tensor<2>, caption: Tensor<3>, bias: Tensor<2>) -> Tensor<3> {
        let [n, _, d] = x.dims();
        let m = time.reshape([n, 6, d]) + self.scale_shift_table.val().unsqueeze_dim::<3>(0); // [N, 6, D]
        let part = |i: usize| m.clone().narrow(1, i, 1).reshape([n, d]); // [N, D]
        let h = layer_norm_modulate(x.clone(), part(0), part(1), LN_EPS);
        let x = gated_residual(x, part(2), self.attn1.self_attention(h));
        let x = x.clone() + self.attn2.cross_attention(x, caption, bias);
        let h = layer_norm_modulate(x.clone(), part(3), part(4), LN_EPS);
        let h = linear_tokens(&self.ff_2, gelu_tanh(linear_tokens(&self.ff_1, h)));
        gated_residual(x, part(5), h)
    }

    fn export(&self, prefix: &str, sd: &mut StateDict) {
        let p = |s: &str| format!("{prefix}.{s}");
        self.attn1.export(&p("attn1"), sd);
        self.attn2.export(&p("attn2"), sd);
        sd.linear(&p("ff.net.0.proj"), &self.ff_1);
        sd.linear(&p("ff.net.2"), &self.ff_2);
        sd.tensor(&p("scale_shift_table"), &self.scale_shift_table.val());
    }
}

// ------------------------------------------------------------------------------------------------
// The model
// ------------------------------------------------------------------------------------------------

/// PixArt-α's transformer: patchify, add positions, project the caption, N blocks, the output
/// modulation, unpatchify.
#[derive(Module, Debug)]
pub struct PixArt {
    patch: Conv2d,
    /// Fixed 2-D sin-cos position embedding `[1, T, D]`; not trained, not saved (diffusers
    /// computes it too).
    pos_embed: Tensor<3>,
    t_linear_1: Linear,
    t_linear_2: Linear,
    /// adaLN-single: the time embedding -> the 6 modulation vectors every block adds its own to.
    t_block: Linear,
    caption_1: Linear,
    caption_2: Linear,
    blocks: Vec<PixArtBlock>,
    /// `[2, D]`: the output modulation's shift and scale.
    scale_shift_table: Param<Tensor<2>>,
    proj_out: Linear,
    /// The null caption stored with the weights (None: padding only is the null caption).
    null_caption: Option<NullCaption>,
    #[module(skip)]
    config: PixArtConfig,
}

/// A fixed (untrained) null caption: the text encoder's token states for the empty prompt,
/// `embeddings` `[L, Dc]` and `mask` `[L]`, which the model reads wherever it is given a caption
/// of padding only (ddm's null caption: classifier-free guidance's null half, no caption).
#[derive(Module, Debug)]
pub struct NullCaption {
    embeddings: Tensor<2>,
    mask: Tensor<1>,
}

impl NullCaption {
    fn build(src: &mut impl ParamSource, length: usize, channels: usize) -> Result<Self> {
        let embeddings = src.buffer(
            "null_caption.embeddings",
            HostTensor::new(vec![length, channels], vec![0.0; length * channels]),
        )?;
        let mask = src.buffer(
            "null_caption.mask",
            HostTensor::new(vec![length], vec![1.0; length]),
        )?;
        Ok(Self {
            embeddings: embeddings.to_tensor::<2>(src.device()),
            mask: mask.to_tensor::<1>(src.device()),
        })
    }

    /// `tokens` with every row of padding only replaced by the null caption. Both are padded
    /// to the longer length first: padding is masked, so it changes no attention output.
    ///
    /// # Shapes
    /// - `tokens`: `[N, L, Dc]` + `[N, L]` -> `[N, max(L, L0), Dc]` + `[N, max(L, L0)]`
    fn replace_padding_only(&self, tokens: Tokens) -> Tokens {
        let [n, l, dc] = tokens.embeddings.dims();
        let l0 = self.mask.dims()[0];
        let len = l.max(l0);
        let pad = |e: Tensor<3>, m: Tensor<2>| {
            let [rows, have, _] = e.dims();
            match len - have {
                0 => (e, m),
                more => {
                    let device = e.device();
                    (
                        Tensor::cat(vec![e, Tensor::zeros([rows, more, dc], &device)], 1),
                        Tensor::cat(vec![m, Tensor::zeros([rows, more], &device)], 1),
                    )
                }
            }
        };
        let (e, m) = pad(tokens.embeddings, tokens.mask);
        let (e0, m0) = pad(
            self.embeddings.clone().unsqueeze_dim::<3>(0),
            self.mask.clone().unsqueeze_dim::<2>(0),
        ); // [1, len, Dc], [1, len]
        let empty = m.clone().sum_dim(1).equal_elem(0.0).float(); // [N, 1]: 1 for padding only
        let keep = empty.clone().neg() + 1.0;
        Tokens {
            embeddings: e * keep.clone().reshape([n, 1, 1])
                + e0.expand([n, len, dc]) * empty.clone().reshape([n, 1, 1]),
            mask: m * keep + m0.expand([n, len]) * empty,
        }
    }
}

impl PixArt {
    pub fn config(&self) -> &PixArtConfig {
        &self.config
    }

    /// The caption of `cond` projected to the model's width, and its mask as attention bias (the
    /// null caption when there is none: one padding token, or the stored null caption, which
    /// also replaces any caption of padding only).
    ///
    /// # Shapes
    /// -> (`[N, L, D]`, `[N, L]`)
    fn caption(&self, cond: &Condition, n: usize, device: &Device) -> (Tensor<3>, Tensor<2>) {
        let tokens = match &cond.tokens {
            Some(t) => t.clone(),
            None => Tokens {
                embeddings: Tensor::zeros([n, 1, self.config.caption_channels], device),
                mask: Tensor::zeros([n, 1], device),
            },
        };
        let Tokens { embeddings, mask } = match &self.null_caption {
            Some(null) => null.replace_padding_only(tokens), // in the tokens' dtype (f32)
            None => tokens,
        };
        // Then in the parameters' dtype (`precision::cast`): the null caption is a constant.
        let dtype = self.caption_1.weight.val().dtype();
        let (embeddings, mask) = (like(embeddings, dtype), like(mask, dtype));
        let caption = linear_tokens(
            &self.caption_2,
            gelu_tanh(linear_tokens(&self.caption_1, embeddings)),
        );
        let bias = (mask.neg() + 1.0) * MASKED; // [N, L]: 0 for a token, -10000 for padding
        (caption, bias)
    }

    /// The prediction (velocity, or noise for an epsilon model) for images conditioned on
    /// `cond.tokens` (the caption's token embeddings, width `caption_channels`).
    ///
    /// # Shapes
    /// - `x`: `[N, C, S, S]`, `t`: `[N]` in [0, 1] -> `[N, C, S, S]`
    ///
    /// It computes in its parameters' dtype (`precision::cast`) and returns `x`'s; `t` goes
    /// through the sinusoid in f32, as in the DiT.
    pub fn forward(&self, x: Tensor<4>, t: Tensor<1>, cond: &Condition) -> Tensor<4> {
        let [n, _, _, _] = x.dims();
        let (g, d) = (self.config.grid(), self.config.hidden_size);
        let device = x.device();
        let io = x.dtype();
        let x = self.patch.forward(like(x, self.patch.weight.val().dtype())); // [N, D, S/P, S/P]
        let pos = like(self.pos_embed.clone(), x.dtype()); // a constant: not cast with the parameters
        let mut x = x.reshape([n, d, g * g]).swap_dims(1, 2) + pos; // [N, T, D]
        let freq = timestep_embedding(t * self.config.t_scale, FREQ_DIM, 0.0); // [N, F]
        let freq = like(freq, self.t_linear_1.weight.val().dtype());
        let time = self.t_linear_2.forward(silu(self.t_linear_1.forward(freq))); // [N, D]
        let modulation = self.t_block.forward(silu(time.clone())); // [N, 6D]
        let (caption, bias) = self.caption(cond, n, &device);
        for block in &self.blocks {
            x = block.forward(x, modulation.clone(), caption.clone(), bias.clone()); // [N, T, D]
        }
        let m = self.scale_shift_table.val().unsqueeze_dim::<3>(0) + time.unsqueeze_dim::<3>(1); // [N, 2, D]
        let (shift, scale) = (
            m.clone().narrow(1, 0, 1).reshape([n, d]),
            m.narrow(1, 1, 1).reshape([n, d]),
        );
        let x = linear_tokens(&self.proj_out, layer_norm_modulate(x, shift, scale, LN_EPS)); // [N, T, P*P*C_out]
        let (p, c) = (self.config.patch_size, self.config.out_channels());
        let x = unpatchify(x, g, p, c); // [N, C_out, S, S]
        let x = match self.config.learn_sigma {
            true => x.narrow(1, 0, self.config.in_channels),
            false => x,
        };
        like(x, io)
    }

    /// Every parameter under its diffusers name.
    pub fn state_dict(&self) -> StateDict {
        let mut sd = StateDict::default();
        sd.conv("pos_embed.proj", &self.patch);
        sd.linear("adaln_single.emb.timestep_embedder.linear_1", &self.t_linear_1);
        sd.linear("adaln_single.emb.timestep_embedder.linear_2", &self.t_linear_2);
        sd.linear("adaln_single.linear", &self.t_block);
        sd.linear("caption_projection.linear_1", &self.caption_1);
        sd.linear("caption_projection.linear_2", &self.caption_2);
        for (i, b) in self.blocks.iter().enumerate() {
            b.export(&format!("transformer_blocks.{i}"), &mut sd);
        }
        sd.tensor("scale_shift_table", &self.scale_shift_table.val());
        sd.linear("proj_out", &self.proj_out);
        if let Some(null) = &self.null_caption {
            sd.tensor("null_caption.embeddings", &null.embeddings);
            sd.tensor("null_caption.mask", &null.mask);
        }
        sd
    }
}

// ------------------------------------------------------------------------------------------------
// diffusers' directory
// ------------------------------------------------------------------------------------------------

/// diffusers' `PixArtTransformer2DModel` config.json (the fields ddm reads).
#[derive(Debug, Deserialize)]
struct DiffusersPixArt {
    num_attention_heads: usize,
    attention_head_dim: usize,
    in_channels: usize,
    #[serde(default)]
    out_channels: Option<usize>,
    num_layers: usize,
    sample_size: usize,
    patch_size: usize,
    #[serde(default)]
    cross_attention_dim: Option<usize>,
    #[serde(default)]
    caption_channels: Option<usize>,
    #[serde(default = "gelu_approximate")]
    activation_fn: String,
    #[serde(default = "ada_norm_single")]
    norm_type: String,
    #[serde(default)]
    norm_elementwise_affine: bool,
    #[serde(default = "ln_eps")]
    norm_eps: f64,
    #[serde(default = "yes")]
    attention_bias: bool,
    #[serde(default)]
    interpolation_scale: Option<f64>,
    #[serde(default)]
    use_additional_conditions: Option<bool>,
}

fn ada_norm_single() -> String {
    "ada_norm_single".into()
}
fn ln_eps() -> f64 {
    LN_EPS
}

/// The diffusers class this module reads.
pub const DIFFUSERS_CLASS: &str = "PixArtTransformer2DModel";

/// Read a diffusers `PixArtTransformer2DModel` directory (`config.json`,
/// `diffusion_pytorch_model.safetensors`): the equivalent ddm config and its tensors (diffusers'
/// names are ddm's; building the model checks every one).
pub fn read_diffusers(dir: &std::path::Path) -> Result<(PixArtConfig, BTreeMap<String, HostTensor>)> {
    let crate::diffusers::Directory {
        config: c,
        config_path,
        tensors,
    } = crate::diffusers::read::<DiffusersPixArt>(dir, DIFFUSERS_CLASS)?;
    let bad = |reason: String| Error::BadMetadata {
        path: config_path.clone(),
        reason,
    };
    let hidden = c.num_attention_heads * c.attention_head_dim;
    let unsupported = [
        (
            c.activation_fn != "gelu-approximate",
            format!("activation_fn {:?}", c.activation_fn),
        ),
        (
            c.norm_type != "ada_norm_single",
            format!("norm_type {:?}", c.norm_type),
        ),
        (c.norm_elementwise_affine, "norm_elementwise_affine true".into()),
        (c.norm_eps != LN_EPS, format!("norm_eps {}", c.norm_eps)),
        (!c.attention_bias, "attention_bias false".into()),
        (
            c.cross_attention_dim != Some(hidden),
            format!(
                "cross_attention_dim {:?} (ddm's PixArt attends to the caption projected to the hidden width {hidden})",
                c.cross_attention_dim
            ),
        ),
        (
            c.use_additional_conditions.unwrap_or(c.sample_size == 128),
            "resolution and aspect-ratio conditions (use_additional_conditions, PixArt-α at 1024 px)".into(),
        ),
    ];
    if let Some((_, what)) = unsupported.iter().find(|(bad, _)| *bad) {
        return Err(bad(format!("{what} is not supported by ddm's PixArt")));
    }
    let caption_channels = c
        .caption_channels
        .ok_or_else(|| bad("no caption_channels: a PixArt without a caption projection".into()))?;
    let learn_sigma = match c.out_channels.unwrap_or(c.in_channels) {
        o if o == c.in_channels => false,
        o if o == 2 * c.in_channels => true,
        o => {
            return Err(bad(format!(
                "out_channels {o}: ddm reads in_channels ({}) or twice as many (learned sigma)",
                c.in_channels
            )));
        }
    };
    let config = PixArtConfig {
        input_size: c.sample_size,
        patch_size: c.patch_size,
        in_channels: c.in_channels,
        hidden_size: hidden,
        depth: c.num_layers,
        num_heads: c.num_attention_heads,
        caption_channels,
        learn_sigma,
        t_scale: default_t_scale(),
        interpolation_scale: c
            .interpolation_scale
            .unwrap_or((c.sample_size / 64).max(1) as f64),
        caption_dropout_prob: 0.0,
        caption_length: None,
        null_caption_length: None,
    };
    config.validate().map_err(|e| bad(e.to_string()))?;
    Ok((config, tensors))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::RandomInit;

    fn tensor<const D: usize>(shape: [usize; D], seed: u64, device: &Device) -> Tensor<D> {
        let n = shape.iter().product();
        let data = (0..n)
            .map(|i| ((i as u64 * 2654435761 + seed * 97) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        HostTensor::new(shape.to_vec(), data).to_tensor::<D>(device)
    }

    /// A PixArt's stated FLOPs grow with the caption length it was trained on (cross-attention
    /// and the caption projection); an imported one, whose length is not known, states 120.
    #[test]
    fn flops_count_the_trained_caption_length() {
        let c = PixArtConfig::named("XS/2", 8, 1).unwrap();
        assert_eq!(c.flops_per_sample(), c.flops_per_sample_with(120));
        let crate::model::ModelConfig::PixArt(trained) = crate::model::ModelConfig::PixArt(c)
            .with_caption_tokens(32, 16, 0.1)
            .unwrap()
        else {
            unreachable!("a PixArt stays a PixArt")
        };
        assert_eq!(trained.caption_length, Some(16));
        assert_eq!(trained.flops_per_sample(), trained.flops_per_sample_with(16));
        assert!(trained.flops_per_sample() < trained.flops_per_sample_with(120));
    }

    /// Cross-attention's gradients (with respect to the image tokens, the caption tokens and a
    /// projection's weight; on this device, through the fused CPU kernel's backward) are the
    /// loss's central differences; a masked caption token gets no gradient, and changing it
    /// changes nothing.
    #[test]
    fn cross_attention_gradients_match_finite_differences() {
        let device = crate::device::cpu().autodiff();
        let (n, t, l, d) = (2, 5, 4, 8);
        let attn = MultiHeadAttention::build(&mut RandomInit::new(7, &device), "attn2", d, 2).unwrap();
        let x = tensor([n, t, d], 1, &device);
        let keys = tensor([n, l, d], 2, &device);
        let w = tensor([n, t, d], 3, &device);
        // Sample 0 masks its last caption token.
        let mask = Tensor::<2>::from_floats([[1.0, 1.0, 1.0, 0.0], [1.0; 4]], &device);
        let bias = (mask.neg() + 1.0) * MASKED;
        let loss = |attn: &MultiHeadAttention, x: Tensor<3>, keys: Tensor<3>| {
            (attn.cross_attention(x, keys, bias.clone()) * w.clone()).sum()
        };
        let (xg, kg) = (x.clone().require_grad(), keys.clone().require_grad());
        let grads = loss(&attn, xg.clone(), kg.clone()).backward();
        let dx = HostTensor::from_tensor(xg.grad(&grads).unwrap()).data;
        let dk = HostTensor::from_tensor(kg.grad(&grads).unwrap()).data;
        let dq = HostTensor::from_tensor(attn.to_q.weight.grad(&grads).unwrap()).data;

        assert!(
            dk.iter().chain(&dx).filter(|g| g.abs() > 1e-2).count() > 20,
            "gradients vanish"
        );

        let h = 1e-2f32;
        let value = |x: Tensor<3>, keys: Tensor<3>, attn: &MultiHeadAttention| -> f32 {
            HostTensor::from_tensor(loss(attn, x, keys)).data[0]
        };
        let nudged = |t: &Tensor<3>, i: usize, by: f32| {
            let mut host = HostTensor::from_tensor(t.clone());
            host.data[i] += by;
            host.to_tensor::<3>(&device)
        };
        for i in (0..n * t * d).step_by(7) {
            let fd = (value(nudged(&x, i, h), keys.clone(), &attn)
                - value(nudged(&x, i, -h), keys.clone(), &attn))
                / (2.0 * h);
            assert!(
                (fd - dx[i]).abs() < 2e-3 * (1.0 + fd.abs()),
                "d x[{i}]: {fd} vs {}",
                dx[i]
            );
        }
        for i in (0..n * l * d).step_by(5) {
            let fd = (value(x.clone(), nudged(&keys, i, h), &attn)
                - value(x.clone(), nudged(&keys, i, -h), &attn))
                / (2.0 * h);
            assert!(
                (fd - dk[i]).abs() < 2e-3 * (1.0 + fd.abs()),
                "d keys[{i}]: {fd} vs {}",
                dk[i]
            );
        }
        // The masked token (sample 0, token 3): no gradient, no effect.
        for j in 0..d {
            let i = 3 * d + j;
            assert!(dk[i].abs() < 1e-6, "masked token gradient {}", dk[i]);
            assert_eq!(
                value(x.clone(), nudged(&keys, i, 1.0), &attn),
                value(x.clone(), keys.clone(), &attn)
            );
        }
        // A weight of the query projection `[D_in, D_out]` (burn's layout).
        let wq = HostTensor::from_tensor(attn.to_q.weight.val());
        for i in (0..d * d).step_by(9) {
            let with = |by: f32| {
                let mut a = attn.clone();
                let mut host = wq.clone();
                host.data[i] += by;
                a.to_q.weight = crate::params::named_param("q", host.to_tensor::<2>(&device));
                value(x.clone(), keys.clone(), &a)
            };
            let fd = (with(h) - with(-h)) / (2.0 * h);
            assert!(
                (fd - dq[i]).abs() < 2e-3 * (1.0 + fd.abs()),
                "d to_q[{i}]: {fd} vs {}",
                dq[i]
            );
        }
    }

    /// A PixArt with a stored null caption reads it wherever it is given padding only, or no
    /// caption: exactly what the same weights give for that caption spelled out (at any padded
    /// length); real captions are read as before.
    #[test]
    fn a_stored_null_caption_is_read_for_padding_only() {
        let device = crate::device::cpu();
        let mut config = PixArtConfig::named("XS/2", 8, 1).unwrap();
        config.caption_channels = 6;
        let load = |config: &PixArtConfig, tensors: BTreeMap<String, HostTensor>| {
            let mut src = crate::params::StateLoader::new("test", tensors, &device);
            let model = config.build(&mut src).unwrap();
            src.finish("pixart").unwrap();
            model
        };
        // Random weights, the output projection too (it starts at zero).
        let mut tensors = config
            .build(&mut RandomInit::new(3, &device))
            .unwrap()
            .state_dict()
            .0;
        let out = tensors["proj_out.weight"].shape.clone();
        let n_out = out.iter().product::<usize>();
        let w = (0..n_out).map(|i| (i as f32 * 0.71).cos() * 0.2).collect();
        tensors.insert("proj_out.weight".into(), HostTensor::new(out, w));
        let plain = load(&config, tensors.clone());
        // The null caption: 2 tokens.
        let null = HostTensor::new(vec![2, 6], (0..12).map(|i| (i as f32 * 0.37).sin()).collect());
        tensors.insert("null_caption.embeddings".into(), null.clone());
        tensors.insert("null_caption.mask".into(), HostTensor::new(vec![2], vec![1.0; 2]));
        config.null_caption_length = Some(2);
        let stored = load(&config, tensors);
        assert!(crate::model::ModelConfig::PixArt(config.clone()).has_null_condition());

        let x = tensor([2, 1, 8, 8], 4, &device);
        let t = Tensor::<1>::from_floats([0.3, 0.8], &device);
        let v = |model: &PixArt, e: Tensor<3>, m: Tensor<2>| {
            HostTensor::from_tensor(model.forward(x.clone(), t.clone(), &Condition::tokens(e, m))).data
        };
        // Row 0 a caption of 3 tokens out of 4, row 1 padding only.
        let caption = tensor([2, 4, 6], 5, &device);
        let mask = Tensor::<2>::from_floats([[1.0, 1.0, 1.0, 0.0], [0.0; 4]], &device);
        let got = v(&stored, caption.clone(), mask.clone());
        // Spelled out: row 1 is the null caption, padded to 4 tokens.
        let null_row = Tensor::cat(
            vec![null.to_tensor::<2>(&device), Tensor::zeros([2, 6], &device)],
            0,
        )
        .reshape([1, 4, 6]);
        let spelled = Tensor::cat(vec![caption.clone().narrow(0, 0, 1), null_row], 0);
        let spelled_mask = Tensor::<2>::from_floats([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]], &device);
        let want = v(&plain, spelled, spelled_mask);
        let diff = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
        assert!(diff(&got, &want) < 1e-6, "{}", diff(&got, &want));
        // Without the stored null caption, padding only is another input.
        assert!(diff(&v(&plain, caption, mask), &want) > 1e-4);
        // No caption at all: the null caption, at its own length.
        let none = HostTensor::from_tensor(stored.forward(x.clone(), t.clone(), &Condition::none())).data;
        let null_both = null
            .to_tensor::<2>(&device)
            .unsqueeze_dim::<3>(0)
            .repeat_dim(0, 2);
        let want = v(&plain, null_both, Tensor::ones([2, 2], &device));
        assert!(diff(&none, &want) < 1e-5, "{}", diff(&none, &want));
    }
}

//! AutoencoderKL: the KL-regularised convolutional autoencoder of latent diffusion (Rombach et al.,
//! "High-Resolution Image Synthesis with Latent Diffusion Models", arXiv 2112.10752), exactly as
//! diffusers' `AutoencoderKL` — its config.json parses as [`AutoencoderKLConfig`] and its
//! parameters keep diffusers' names (`encoder.down_blocks.0.resnets.0.conv1.weight`, ...), so Stable
//! Diffusion's VAE loads as it is and a VAE trained by ddm loads in diffusers.
//!
//! In reading order: the config; the pieces (ResNet block, spatial self-attention, down/upsampler,
//! the mid block); the encoder and decoder; the model (encode to the posterior's mean and log
//! variance, decode); the latent space experts are trained in ([`LatentSpace`]).
//!
//! Letters in shape comments: N batch, C image channels, S image side, L latent channels, s latent
//! side, Ci/Co a block's channels in/out, H/W a feature map's sides.

use burn::nn::conv::Conv2d;
use burn::nn::{GroupNorm, Linear};
use burn::prelude::*;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use serde::{Deserialize, Serialize};

use std::collections::BTreeMap;

use crate::error::{Error, Result};
use crate::group_norm;
use crate::host::HostTensor;
use crate::params::{ConvSpec, Init, ParamSource, StateDict, StateLoader};

/// diffusers' VAE uses eps 1e-6 in every GroupNorm.
const GN_EPS: f64 = 1e-6;

// ------------------------------------------------------------------------------------------------
// Config
// ------------------------------------------------------------------------------------------------

/// An AutoencoderKL's hyper-parameters under diffusers' names and defaults (diffusers' config.json
/// parses as this; its `_class_name`-style keys are ignored).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AutoencoderKLConfig {
    #[serde(default = "d_channels")]
    pub in_channels: usize,
    #[serde(default = "d_channels")]
    pub out_channels: usize,
    #[serde(default = "d_down")]
    pub down_block_types: Vec<String>,
    #[serde(default = "d_up")]
    pub up_block_types: Vec<String>,
    /// Channels per level; a 2x downsampling between consecutive levels.
    #[serde(default = "d_block_out")]
    pub block_out_channels: Vec<usize>,
    #[serde(default = "d_one")]
    pub layers_per_block: usize,
    #[serde(default = "d_act")]
    pub act_fn: String,
    #[serde(default = "d_latent")]
    pub latent_channels: usize,
    #[serde(default = "d_groups")]
    pub norm_num_groups: usize,
    /// The image side S the VAE was made for (it is convolutional; ddm encodes S x S images).
    #[serde(default = "d_sample")]
    pub sample_size: usize,
    /// Latents are scaled by this before diffusion (`z * scaling_factor`), to about unit variance.
    #[serde(default = "d_scaling")]
    pub scaling_factor: f64,
    /// Subtracted before scaling when present (`(z - shift) * scaling`).
    #[serde(default)]
    pub shift_factor: Option<f64>,
    #[serde(default = "d_true")]
    pub mid_block_add_attention: bool,
    #[serde(default = "d_true")]
    pub use_quant_conv: bool,
    #[serde(default = "d_true")]
    pub use_post_quant_conv: bool,
}

fn d_channels() -> usize {
    3
}
fn d_down() -> Vec<String> {
    vec!["DownEncoderBlock2D".into()]
}
fn d_up() -> Vec<String> {
    vec!["UpDecoderBlock2D".into()]
}
fn d_block_out() -> Vec<usize> {
    vec![64]
}
fn d_one() -> usize {
    1
}
fn d_act() -> String {
    "silu".into()
}
fn d_latent() -> usize {
    4
}
fn d_groups() -> usize {
    32
}
fn d_sample() -> usize {
    32
}
fn d_scaling() -> f64 {
    0.18215
}
fn d_true() -> bool {
    true
}

impl AutoencoderKLConfig {
    /// A small VAE for `channels x side x side` images: `levels` levels of `width`, `2 width`, ...
    /// channels (capped at 4 width), `latent` latent channels; latents are `side / 2^(levels-1)`.
    pub fn small(channels: usize, side: usize, levels: usize, width: usize, latent: usize) -> Result<Self> {
        if !(1..=8).contains(&levels) || !(1..=1 << 12).contains(&width) {
            return Err(Error::InvalidConfig(format!(
                "AutoencoderKL: {levels} levels of width {width}; expected 1 to 8 levels of width 1 to 4096"
            )));
        }
        let block_out_channels: Vec<usize> = (0..levels).map(|i| width << i.min(2)).collect();
        let config = Self {
            in_channels: channels,
            out_channels: channels,
            down_block_types: vec!["DownEncoderBlock2D".into(); levels],
            up_block_types: vec!["UpDecoderBlock2D".into(); levels],
            block_out_channels,
            layers_per_block: 1,
            act_fn: "silu".into(),
            latent_channels: latent,
            norm_num_groups: (width / 4).clamp(1, 32),
            sample_size: side,
            scaling_factor: 1.0,
            shift_factor: None,
            mid_block_add_attention: true,
            use_quant_conv: true,
            use_post_quant_conv: true,
        };
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidConfig(format!("AutoencoderKL: {m}")));
        let levels = self.block_out_channels.len();
        if levels == 0 || levels > 8 {
            return bad(format!("block_out_channels has {levels} levels; expected 1 to 8"));
        }
        if let Some(t) = self.down_block_types.iter().find(|t| *t != "DownEncoderBlock2D") {
            return bad(format!(
                "down block type `{t}` is not supported (only DownEncoderBlock2D)"
            ));
        }
        if let Some(t) = self.up_block_types.iter().find(|t| *t != "UpDecoderBlock2D") {
            return bad(format!(
                "up block type `{t}` is not supported (only UpDecoderBlock2D)"
            ));
        }
        if self.down_block_types.len() != levels || self.up_block_types.len() != levels {
            return bad(format!(
                "{} down and {} up block types for {levels} levels of block_out_channels",
                self.down_block_types.len(),
                self.up_block_types.len()
            ));
        }
        if self.act_fn != "silu" {
            return bad(format!("act_fn `{}` is not supported (only silu)", self.act_fn));
        }
        for (name, v, max) in [
            ("in_channels", self.in_channels, 1 << 10),
            ("out_channels", self.out_channels, 1 << 10),
            ("latent_channels", self.latent_channels, 1 << 10),
            ("layers_per_block", self.layers_per_block, 64),
            ("sample_size", self.sample_size, 1 << 14),
        ] {
            if v == 0 || v > max {
                return bad(format!("{name} {v} must be in 1..={max}"));
            }
        }
        for &c in &self.block_out_channels {
            if c == 0 || c > 1 << 14 || self.norm_num_groups == 0 || !c.is_multiple_of(self.norm_num_groups) {
                return bad(format!(
                    "block_out_channels {:?} must be positive multiples of norm_num_groups {}",
                    self.block_out_channels, self.norm_num_groups
                ));
            }
        }
        let f = self.downsampling();
        if !self.sample_size.is_multiple_of(f) {
            return bad(format!(
                "sample_size {} is not a multiple of the downsampling factor {f}: the decoder would not give back the image's size",
                self.sample_size
            ));
        }
        if !(self.scaling_factor.is_finite() && self.scaling_factor > 0.0) {
            return bad(format!("scaling_factor {} must be positive", self.scaling_factor));
        }
        if self.shift_factor.is_some_and(|s| !s.is_finite()) {
            return bad("shift_factor must be finite".into());
        }
        Ok(())
    }

    /// The side ratio between images and latents: 2^(levels - 1).
    pub fn downsampling(&self) -> usize {
        1 << (self.block_out_channels.len().saturating_sub(1))
    }

    /// Images `[C, S, S]`.
    pub fn image_shape(&self) -> Vec<usize> {
        vec![self.in_channels, self.sample_size, self.sample_size]
    }

    /// Latents `[L, s, s]`, s = S / 2^(levels - 1).
    pub fn latent_shape(&self) -> Vec<usize> {
        let s = self.sample_size / self.downsampling();
        vec![self.latent_channels, s, s]
    }

    /// FLOPs of one image's encode + decode (multiply-adds count 2): the convolutions, the two
    /// mid-block attentions and their projections. Norms and activations are left out.
    pub fn flops_per_sample(&self) -> f64 {
        let conv = |ci: usize, co: usize, k: usize, side: usize| 2.0 * (ci * co * k * k * side * side) as f64;
        let resnet = |ci: usize, co: usize, side: usize| {
            conv(ci, co, 3, side) + conv(co, co, 3, side) + if ci != co { conv(ci, co, 1, side) } else { 0.0 }
        };
        let attn = |c: usize, side: usize| {
            let t = (side * side) as f64;
            if self.mid_block_add_attention {
                2.0 * t * (4 * c * c) as f64 + 2.0 * 2.0 * t * t * c as f64
            } else {
                0.0
            }
        };
        let boc = &self.block_out_channels;
        let (l, lpb) = (self.latent_channels, self.layers_per_block);
        let s_min = self.sample_size / self.downsampling();
        let top = *boc.last().expect("validated: at least one level");
        let mid = |side: usize| 2.0 * resnet(top, top, side) + attn(top, side);
        // Encoder.
        let mut side = self.sample_size;
        let mut f = conv(self.in_channels, boc[0], 3, side);
        let mut prev = boc[0];
        for (i, &co) in boc.iter().enumerate() {
            for j in 0..lpb {
                f += resnet(if j == 0 { prev } else { co }, co, side);
            }
            prev = co;
            if i + 1 < boc.len() {
                side /= 2;
                f += conv(co, co, 3, side);
            }
        }
        f += mid(side) + conv(top, 2 * l, 3, side);
        if self.use_quant_conv {
            f += conv(2 * l, 2 * l, 1, side);
        }
        // Decoder.
        if self.use_post_quant_conv {
            f += conv(l, l, 1, s_min);
        }
        let mut side = s_min;
        f += conv(l, top, 3, side) + mid(side);
        let mut prev = top;
        for (i, &co) in boc.iter().rev().enumerate() {
            for j in 0..=lpb {
                f += resnet(if j == 0 { prev } else { co }, co, side);
            }
            prev = co;
            if i + 1 < boc.len() {
                side *= 2;
                f += conv(co, co, 3, side);
            }
        }
        f + conv(boc[0], self.out_channels, 3, side)
    }

    /// A lower estimate of the activations one training image keeps for the backward pass, in
    /// floats: each ResNet block's two feature maps at every level, both ways.
    pub fn activation_floats_per_sample(&self) -> f64 {
        let mut side = self.sample_size;
        let mut floats = 0.0;
        for &c in &self.block_out_channels {
            floats += (2 * (2 * self.layers_per_block + 1) * c * side * side) as f64;
            side /= 2;
        }
        floats
    }

    /// Build the model from `src` (fresh initialisation or a state dict).
    pub fn build(&self, src: &mut impl ParamSource) -> Result<AutoencoderKL> {
        self.validate()?;
        let l = self.latent_channels;
        Ok(AutoencoderKL {
            encoder: Encoder::build(src, self)?,
            decoder: Decoder::build(src, self)?,
            quant_conv: if self.use_quant_conv {
                Some(src.conv("quant_conv", ConvSpec::same(2 * l, 2 * l, 1), Init::FanIn)?)
            } else {
                None
            },
            post_quant_conv: if self.use_post_quant_conv {
                Some(src.conv("post_quant_conv", ConvSpec::same(l, l, 1), Init::FanIn)?)
            } else {
                None
            },
            config: self.clone(),
        })
    }
}

// ------------------------------------------------------------------------------------------------
// Pieces
// ------------------------------------------------------------------------------------------------

/// Whether a [`norm`] is followed by SiLU.
const SILU: bool = true;

/// `silu(norm(x))` (or `norm(x)`) as one op: the fused GroupNorm on the CPU, burn's ops elsewhere.
///
/// # Shapes
/// - `x`: `[N, C, H, W]` -> `[N, C, H, W]`
fn norm(norm: &GroupNorm, x: Tensor<4>, silu: bool) -> Tensor<4> {
    match (&norm.gamma, &norm.beta) {
        (Some(gamma), Some(beta)) => {
            group_norm::group_norm(x, gamma.val(), beta.val(), norm.num_groups, norm.epsilon, silu)
        }
        // Not built by this file (its norms are affine), but correct all the same.
        _ if silu => burn::tensor::activation::silu(norm.forward(x)),
        _ => norm.forward(x),
    }
}

/// GroupNorm, SiLU, 3x3 conv, twice, plus the (1x1-projected when the width changes) input.
#[derive(Module, Debug)]
struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
}

impl ResnetBlock {
    fn build(
        src: &mut impl ParamSource,
        prefix: &str,
        c_in: usize,
        c_out: usize,
        groups: usize,
    ) -> Result<Self> {
        let p = |s: &str| format!("{prefix}.{s}");
        Ok(Self {
            norm1: src.group_norm(&p("norm1"), groups, c_in, GN_EPS)?,
            conv1: src.conv(&p("conv1"), ConvSpec::same(c_in, c_out, 3), Init::FanIn)?,
            norm2: src.group_norm(&p("norm2"), groups, c_out, GN_EPS)?,
            conv2: src.conv(&p("conv2"), ConvSpec::same(c_out, c_out, 3), Init::FanIn)?,
            conv_shortcut: if c_in != c_out {
                Some(src.conv(&p("conv_shortcut"), ConvSpec::same(c_in, c_out, 1), Init::FanIn)?)
            } else {
                None
            },
        })
    }

    /// # Shapes
    /// - `x`: `[N, Ci, H, W]` -> `[N, Co, H, W]`
    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let h = self.conv1.forward(norm(&self.norm1, x.clone(), SILU));
        let h = self.conv2.forward(norm(&self.norm2, h, SILU));
        match &self.conv_shortcut {
            Some(s) => s.forward(x) + h,
            None => x + h,
        }
    }

    fn export(&self, prefix: &str, sd: &mut StateDict) {
        let p = |s: &str| format!("{prefix}.{s}");
        sd.group_norm(&p("norm1"), &self.norm1);
        sd.conv(&p("conv1"), &self.conv1);
        sd.group_norm(&p("norm2"), &self.norm2);
        sd.conv(&p("conv2"), &self.conv2);
        if let Some(s) = &self.conv_shortcut {
            sd.conv(&p("conv_shortcut"), s);
        }
    }
}

/// Single-head self-attention over the H x W positions of a feature map (the mid block's), with a
/// GroupNorm before and the input added after.
#[derive(Module, Debug)]
struct SpatialAttention {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
}

impl SpatialAttention {
    fn build(src: &mut impl ParamSource, prefix: &str, c: usize, groups: usize) -> Result<Self> {
        let p = |s: &str| format!("{prefix}.{s}");
        Ok(Self {
            group_norm: src.group_norm(&p("group_norm"), groups, c, GN_EPS)?,
            to_q: src.linear(&p("to_q"), c, c, Init::FanIn)?,
            to_k: src.linear(&p("to_k"), c, c, Init::FanIn)?,
            to_v: src.linear(&p("to_v"), c, c, Init::FanIn)?,
            to_out: src.linear(&p("to_out.0"), c, c, Init::FanIn)?,
        })
    }

    /// # Shapes
    /// - `x`: `[N, C, H, W]` -> `[N, C, H, W]`
    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let [n, c, h, w] = x.dims();
        let tokens = norm(&self.group_norm, x.clone(), !SILU)
            .reshape([n, c, h * w])
            .swap_dims(1, 2)
            .reshape([n * h * w, c]); // [N*H*W, C]
        let head = |l: &Linear| l.forward(tokens.clone()).reshape([n, 1, h * w, c]); // [N, 1, HW, C]
        let out = attention(
            head(&self.to_q),
            head(&self.to_k),
            head(&self.to_v),
            None,
            None,
            AttentionModuleOptions::default(),
        ) // [N, 1, HW, C]
        .reshape([n * h * w, c]);
        let out = self
            .to_out
            .forward(out)
            .reshape([n, h * w, c])
            .swap_dims(1, 2)
            .reshape([n, c, h, w]);
        out + x
    }

    fn export(&self, prefix: &str, sd: &mut StateDict) {
        let p = |s: &str| format!("{prefix}.{s}");
        sd.group_norm(&p("group_norm"), &self.group_norm);
        sd.linear(&p("to_q"), &self.to_q);
        sd.linear(&p("to_k"), &self.to_k);
        sd.linear(&p("to_v"), &self.to_v);
        sd.linear(&p("to_out.0"), &self.to_out);
    }
}

/// ResNet, attention, ResNet at the lowest resolution.
#[derive(Module, Debug)]
struct MidBlock {
    resnet0: ResnetBlock,
    attention: Option<SpatialAttention>,
    resnet1: ResnetBlock,
}

impl MidBlock {
    fn build(
        src: &mut impl ParamSource,
        prefix: &str,
        c: usize,
        config: &AutoencoderKLConfig,
    ) -> Result<Self> {
        let g = config.norm_num_groups;
        Ok(Self {
            resnet0: ResnetBlock::build(src, &format!("{prefix}.resnets.0"), c, c, g)?,
            attention: if config.mid_block_add_attention {
                Some(SpatialAttention::build(
                    src,
                    &format!("{prefix}.attentions.0"),
                    c,
                    g,
                )?)
            } else {
                None
            },
            resnet1: ResnetBlock::build(src, &format!("{prefix}.resnets.1"), c, c, g)?,
        })
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let mut x = self.resnet0.forward(x);
        if let Some(a) = &self.attention {
            x = a.forward(x);
        }
        self.resnet1.forward(x)
    }

    fn export(&self, prefix: &str, sd: &mut StateDict) {
        self.resnet0.export(&format!("{prefix}.resnets.0"), sd);
        if let Some(a) = &self.attention {
            a.export(&format!("{prefix}.attentions.0"), sd);
        }
        self.resnet1.export(&format!("{prefix}.resnets.1"), sd);
    }
}

/// One level: ResNet blocks, then (except at the last level) a 2x down- or upsampler conv.
#[derive(Module, Debug)]
struct Level {
    resnets: Vec<ResnetBlock>,
    sampler: Option<Conv2d>,
}

impl Level {
    fn export(&self, prefix: &str, sampler: &str, sd: &mut StateDict) {
        for (j, r) in self.resnets.iter().enumerate() {
            r.export(&format!("{prefix}.resnets.{j}"), sd);
        }
        if let Some(s) = &self.sampler {
            sd.conv(&format!("{prefix}.{sampler}.0.conv"), s);
        }
    }
}

/// Nearest-neighbour 2x upsampling: burn's `interpolate` (a gather per channel plane, and a
/// scatter-add backward; output pixel i reads input pixel floor(i / 2), as PyTorch's `nearest`).
///
/// # Shapes
/// - `x`: `[N, C, H, W]` -> `[N, C, 2H, 2W]`
fn upsample_nearest_2x(x: Tensor<4>) -> Tensor<4> {
    use burn::tensor::module::interpolate;
    use burn::tensor::ops::{InterpolateMode, InterpolateOptions};
    let [_, _, h, w] = x.dims();
    interpolate(
        x,
        InterpolateOptions::new(InterpolateMode::Nearest).with_output_size([2 * h, 2 * w]),
    )
}

// ------------------------------------------------------------------------------------------------
// Encoder and decoder
// ------------------------------------------------------------------------------------------------

/// Image -> the posterior's parameters: conv_in, levels going down, mid block, GroupNorm, SiLU,
/// conv_out to 2L channels (mean and log variance).
#[derive(Module, Debug)]
struct Encoder {
    conv_in: Conv2d,
    down_blocks: Vec<Level>,
    mid_block: MidBlock,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    fn build(src: &mut impl ParamSource, c: &AutoencoderKLConfig) -> Result<Self> {
        let (boc, g) = (&c.block_out_channels, c.norm_num_groups);
        let top = *boc.last().expect("validated: at least one level");
        let conv_in = src.conv(
            "encoder.conv_in",
            ConvSpec::same(c.in_channels, boc[0], 3),
            Init::FanIn,
        )?;
        let mut down_blocks = Vec::with_capacity(boc.len());
        let mut prev = boc[0];
        for (i, &co) in boc.iter().enumerate() {
            let prefix = format!("encoder.down_blocks.{i}");
            let resnets = (0..c.layers_per_block)
                .map(|j| {
                    let ci = if j == 0 { prev } else { co };
                    ResnetBlock::build(src, &format!("{prefix}.resnets.{j}"), ci, co, g)
                })
                .collect::<Result<_>>()?;
            // diffusers pads (0, 1, 0, 1) then convolves with stride 2 and no padding.
            let sampler = if i + 1 < boc.len() {
                let spec = ConvSpec {
                    c_in: co,
                    c_out: co,
                    kernel: 3,
                    stride: 2,
                    padding: [0, 0, 1, 1],
                };
                Some(src.conv(&format!("{prefix}.downsamplers.0.conv"), spec, Init::FanIn)?)
            } else {
                None
            };
            down_blocks.push(Level { resnets, sampler });
            prev = co;
        }
        Ok(Self {
            conv_in,
            down_blocks,
            mid_block: MidBlock::build(src, "encoder.mid_block", top, c)?,
            conv_norm_out: src.group_norm("encoder.conv_norm_out", g, top, GN_EPS)?,
            conv_out: src.conv(
                "encoder.conv_out",
                ConvSpec::same(top, 2 * c.latent_channels, 3),
                Init::FanIn,
            )?,
        })
    }

    /// # Shapes
    /// - `x`: `[N, C, S, S]` -> `[N, 2L, s, s]`
    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let mut x = self.conv_in.forward(x);
        for level in &self.down_blocks {
            for r in &level.resnets {
                x = r.forward(x);
            }
            if let Some(down) = &level.sampler {
                x = down.forward(x); // [N, Co, H/2, W/2]
            }
        }
        let x = self.mid_block.forward(x);
        self.conv_out.forward(norm(&self.conv_norm_out, x, SILU))
    }

    fn export(&self, sd: &mut StateDict) {
        sd.conv("encoder.conv_in", &self.conv_in);
        for (i, level) in self.down_blocks.iter().enumerate() {
            level.export(&format!("encoder.down_blocks.{i}"), "downsamplers", sd);
        }
        self.mid_block.export("encoder.mid_block", sd);
        sd.group_norm("encoder.conv_norm_out", &self.conv_norm_out);
        sd.conv("encoder.conv_out", &self.conv_out);
    }
}

/// Latent -> image: conv_in, mid block, levels going up (one more ResNet block per level than the
/// encoder), GroupNorm, SiLU, conv_out.
#[derive(Module, Debug)]
struct Decoder {
    conv_in: Conv2d,
    mid_block: MidBlock,
    up_blocks: Vec<Level>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    fn build(src: &mut impl ParamSource, c: &AutoencoderKLConfig) -> Result<Self> {
        let (boc, g) = (&c.block_out_channels, c.norm_num_groups);
        let top = *boc.last().expect("validated: at least one level");
        let conv_in = src.conv(
            "decoder.conv_in",
            ConvSpec::same(c.latent_channels, top, 3),
            Init::FanIn,
        )?;
        let mid_block = MidBlock::build(src, "decoder.mid_block", top, c)?;
        let mut up_blocks = Vec::with_capacity(boc.len());
        let mut prev = top;
        for (i, &co) in boc.iter().rev().enumerate() {
            let prefix = format!("decoder.up_blocks.{i}");
            let resnets = (0..=c.layers_per_block)
                .map(|j| {
                    let ci = if j == 0 { prev } else { co };
                    ResnetBlock::build(src, &format!("{prefix}.resnets.{j}"), ci, co, g)
                })
                .collect::<Result<_>>()?;
            let sampler = if i + 1 < boc.len() {
                Some(src.conv(
                    &format!("{prefix}.upsamplers.0.conv"),
                    ConvSpec::same(co, co, 3),
                    Init::FanIn,
                )?)
            } else {
                None
            };
            up_blocks.push(Level { resnets, sampler });
            prev = co;
        }
        Ok(Self {
            conv_in,
            mid_block,
            up_blocks,
            conv_norm_out: src.group_norm("decoder.conv_norm_out", g, boc[0], GN_EPS)?,
            conv_out: src.conv(
                "decoder.conv_out",
                ConvSpec::same(boc[0], c.out_channels, 3),
                Init::FanIn,
            )?,
        })
    }

    /// # Shapes
    /// - `z`: `[N, L, s, s]` -> `[N, C, S, S]`
    fn forward(&self, z: Tensor<4>) -> Tensor<4> {
        let mut x = self.mid_block.forward(self.conv_in.forward(z));
        for level in &self.up_blocks {
            for r in &level.resnets {
                x = r.forward(x);
            }
            if let Some(up) = &level.sampler {
                x = up.forward(upsample_nearest_2x(x)); // [N, Co, 2H, 2W]
            }
        }
        self.conv_out.forward(norm(&self.conv_norm_out, x, SILU))
    }

    fn export(&self, sd: &mut StateDict) {
        sd.conv("decoder.conv_in", &self.conv_in);
        self.mid_block.export("decoder.mid_block", sd);
        for (i, level) in self.up_blocks.iter().enumerate() {
            level.export(&format!("decoder.up_blocks.{i}"), "upsamplers", sd);
        }
        sd.group_norm("decoder.conv_norm_out", &self.conv_norm_out);
        sd.conv("decoder.conv_out", &self.conv_out);
    }
}

// ------------------------------------------------------------------------------------------------
// The model
// ------------------------------------------------------------------------------------------------

/// The posterior q(z | x) = N(mean, exp(logvar)), per latent element.
#[derive(Debug, Clone)]
pub struct Posterior {
    /// `[N, L, s, s]`
    pub mean: Tensor<4>,
    /// `[N, L, s, s]`, clamped to [-30, 20] as diffusers does.
    pub logvar: Tensor<4>,
}

impl Posterior {
    /// z = mean + exp(logvar / 2) e, with e ~ N(0, I) given `[N, L, s, s]`.
    pub fn sample(&self, e: Tensor<4>) -> Tensor<4> {
        self.mean.clone() + (self.logvar.clone() * 0.5).exp() * e
    }

    /// KL(q || N(0, I)) per sample, summed over the latent's elements: `[N]`.
    pub fn kl(&self) -> Tensor<1> {
        let [n, _, _, _] = self.mean.dims();
        let m = self.mean.clone();
        let terms = m.clone() * m + self.logvar.clone().exp() - self.logvar.clone() - 1.0; // [N, L, s, s]
        terms.reshape([n as i32, -1]).sum_dim(1).reshape([n]) * 0.5
    }
}

/// diffusers' AutoencoderKL: encode images to a Gaussian posterior over latents, decode latents to
/// images.
#[derive(Module, Debug)]
pub struct AutoencoderKL {
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    #[module(skip)]
    config: AutoencoderKLConfig,
}

impl AutoencoderKL {
    pub fn config(&self) -> &AutoencoderKLConfig {
        &self.config
    }

    /// # Shapes
    /// - `x`: `[N, C, S, S]` in [-1, 1] -> the posterior over `[N, L, s, s]`
    pub fn encode(&self, x: Tensor<4>) -> Posterior {
        let mut h = self.encoder.forward(x); // [N, 2L, s, s]
        if let Some(q) = &self.quant_conv {
            h = q.forward(h);
        }
        let parts = h.chunk(2, 1); // 2 x [N, L, s, s]
        Posterior {
            mean: parts[0].clone(),
            logvar: parts[1].clone().clamp(-30.0, 20.0),
        }
    }

    /// # Shapes
    /// - `z`: `[N, L, s, s]` (unscaled) -> `[N, C, S, S]`
    pub fn decode(&self, z: Tensor<4>) -> Tensor<4> {
        let z = match &self.post_quant_conv {
            Some(p) => p.forward(z),
            None => z,
        };
        self.decoder.forward(z)
    }

    /// All tensors under diffusers' names.
    pub fn state_dict(&self) -> StateDict {
        let mut sd = StateDict::default();
        self.encoder.export(&mut sd);
        self.decoder.export(&mut sd);
        if let Some(q) = &self.quant_conv {
            sd.conv("quant_conv", q);
        }
        if let Some(p) = &self.post_quant_conv {
            sd.conv("post_quant_conv", p);
        }
        sd
    }
}

/// Read a diffusers AutoencoderKL directory (`config.json`, `diffusion_pytorch_model.safetensors`):
/// its config and tensors, not yet checked against each other (building the model does that).
pub fn read_diffusers(dir: &std::path::Path) -> Result<(AutoencoderKLConfig, BTreeMap<String, HostTensor>)> {
    let d = crate::diffusers::read::<AutoencoderKLConfig>(dir, "AutoencoderKL")?;
    d.config.validate().map_err(|e| d.bad(e.to_string()))?;
    Ok((d.config, d.tensors))
}

impl AutoencoderKLConfig {
    /// The model from named tensors (diffusers' names), every name and shape checked, leftovers
    /// refused. `origin` is named in errors.
    pub fn load(
        &self,
        tensors: BTreeMap<String, HostTensor>,
        origin: &std::path::Path,
        device: &Device,
    ) -> Result<AutoencoderKL> {
        let mut loader = StateLoader::new(origin, tensors, device);
        let vae = self.build(&mut loader)?;
        loader.finish("vae")?;
        Ok(vae)
    }
}

// ------------------------------------------------------------------------------------------------
// The latent space
// ------------------------------------------------------------------------------------------------

/// The space an expert was trained in when it was trained on latents: which VAE made them (the
/// sha256 of its checkpoint's tensors) and how they were scaled. Experts of one ensemble must
/// share it; sampling decodes with that VAE.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LatentSpace {
    /// sha256 (hex) of the VAE checkpoint's tensors (its `tensors_sha256`).
    pub vae_sha256: String,
    pub scaling_factor: f64,
    #[serde(default)]
    pub shift_factor: Option<f64>,
    /// Latents `[L, s, s]` and the images they decode to `[C, S, S]`.
    pub latent_shape: Vec<usize>,
    pub image_shape: Vec<usize>,
}

impl LatentSpace {
    pub fn of(config: &AutoencoderKLConfig, vae_sha256: &str) -> Self {
        Self {
            vae_sha256: vae_sha256.to_string(),
            scaling_factor: config.scaling_factor,
            shift_factor: config.shift_factor,
            latent_shape: config.latent_shape(),
            image_shape: config.image_shape(),
        }
    }

    /// A VAE latent -> what diffusion models: `(z - shift) * scaling`.
    pub fn to_model<const D: usize>(&self, z: Tensor<D>) -> Tensor<D> {
        (z - self.shift_factor.unwrap_or(0.0)) * self.scaling_factor
    }

    /// What diffusion models -> a VAE latent: `x / scaling + shift`.
    pub fn to_vae<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        x / self.scaling_factor + self.shift_factor.unwrap_or(0.0)
    }

    /// A short name for messages: the VAE's first 12 hex digits and the scaling.
    pub fn describe(&self) -> String {
        format!(
            "VAE {} (scaling {}{})",
            crate::text::short(&self.vae_sha256, 12),
            self.scaling_factor,
            self.shift_factor
                .map(|s| format!(", shift {s}"))
                .unwrap_or_default()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::RandomInit;

    #[test]
    fn shapes_round_trip_and_names_match_the_state_dict() {
        let device = crate::device::cpu();
        let config = AutoencoderKLConfig::small(1, 28, 3, 8, 4).unwrap();
        assert_eq!(config.latent_shape(), vec![4, 7, 7]);
        let vae = config.build(&mut RandomInit::new(0, &device)).unwrap();
        let x = Tensor::<4>::random([2, 1, 28, 28], burn::tensor::Distribution::Default, &device);
        let post = vae.encode(x);
        assert_eq!(post.mean.dims(), [2, 4, 7, 7]);
        assert_eq!(vae.decode(post.mean).dims(), [2, 1, 28, 28]);
        // Rebuilt from its own state dict: every name taken, nothing left over.
        let sd = vae.state_dict().0;
        let mut loader = crate::params::StateLoader::new("mem", sd.clone(), &device);
        let back = config.build(&mut loader).unwrap();
        loader.finish("vae").unwrap();
        assert_eq!(back.state_dict().0, sd);
    }

    /// burn's autodiff through the whole VAE (asymmetric-padded strided convs, GroupNorm, the
    /// broadcast upsampling, attention) against central finite differences in f64 terms: the
    /// gradient of the training loss's pieces w.r.t. the input image, at odd channel counts.
    #[test]
    fn gradients_match_finite_differences() {
        let device = crate::device::cpu().autodiff();
        let mut config = AutoencoderKLConfig::small(3, 8, 2, 6, 3).unwrap();
        config.norm_num_groups = 3;
        let vae = config.build(&mut RandomInit::new(1, &device)).unwrap();
        let n = 3 * 8 * 8;
        let x0: Vec<f32> = (0..n).map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0).collect();
        let loss = |x: Tensor<4>| {
            let p = vae.encode(x);
            let r = vae.decode(p.mean.clone());
            (r.clone() * r).sum() + p.kl().sum()
        };
        let x = Tensor::<4>::from_data(TensorData::new(x0.clone(), [1, 3, 8, 8]), &device).require_grad();
        let grads = loss(x.clone()).backward();
        let g = HostTensor::from_tensor(x.grad(&grads).unwrap()).data;
        let at = |v: Vec<f32>| {
            loss(Tensor::<4>::from_data(TensorData::new(v, [1, 3, 8, 8]), &device)).into_scalar::<f32>()
                as f64
        };
        let scale = g.iter().fold(0.0f32, |m, v| m.max(v.abs())) as f64;
        for i in [0, 7, 8, 63, 64, 100, 191] {
            let h = 1e-2;
            let (mut up, mut down) = (x0.clone(), x0.clone());
            up[i] += h;
            down[i] -= h;
            let fd = (at(up) - at(down)) / (2.0 * h as f64);
            assert!(
                (fd - g[i] as f64).abs() <= 2e-2 * scale,
                "d loss / d x[{i}]: autodiff {} vs finite difference {fd} (largest {scale})",
                g[i]
            );
        }
    }

    #[test]
    fn upsampling_repeats_each_pixel() {
        let device = crate::device::cpu();
        let x = Tensor::<4>::from_floats([[[[1.0, 2.0], [3.0, 4.0]]]], &device);
        let y = HostTensor::from_tensor(upsample_nearest_2x(x));
        assert_eq!(y.shape, vec![1, 1, 4, 4]);
        assert_eq!(
            y.data,
            vec![1., 1., 2., 2., 1., 1., 2., 2., 3., 3., 4., 4., 3., 3., 4., 4.]
        );
    }

    #[test]
    fn bad_configs_are_named() {
        let mut c = AutoencoderKLConfig::small(1, 28, 3, 8, 4).unwrap();
        c.sample_size = 30;
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("downsampling factor 4")
        );
        let mut c = AutoencoderKLConfig::small(1, 28, 3, 8, 4).unwrap();
        c.down_block_types[1] = "AttnDownEncoderBlock2D".into();
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("AttnDownEncoderBlock2D")
        );
    }
}

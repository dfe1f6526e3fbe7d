//! A DiT's hyper-parameters (the PyTorch reference's config JSON), its named sizes (`DiT-S/2`),
//! its FLOPs, and how it is built from named parameters. The network itself is the parent module.

use super::*;

/// A DiT's hyper-parameters, in the PyTorch reference's vocabulary (the JSON of its
/// `*.config.json` files parses as this).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiTConfig {
    /// Image side S (images are S x S).
    pub input_size: usize,
    /// Patch side P; T = (S / P)^2 tokens.
    pub patch_size: usize,
    pub in_channels: usize,
    pub hidden_size: usize,
    pub depth: usize,
    pub num_heads: usize,
    #[serde(default = "default_mlp_ratio")]
    pub mlp_ratio: f64,
    /// 0: unconditional. Otherwise classes 0..num_classes, plus a null class (id num_classes) for
    /// classifier-free guidance when `class_dropout_prob > 0`.
    #[serde(default)]
    pub num_classes: usize,
    #[serde(default = "default_class_dropout")]
    pub class_dropout_prob: f64,
    /// The reference's option to also predict a variance: outputs 2C channels, the first C are
    /// the prediction.
    #[serde(default)]
    pub learn_sigma: bool,
    #[serde(default = "default_freq")]
    pub frequency_embedding_size: usize,
    /// The network sees `t_scale * t` in its timestep embedding (DiT's 1000 steps).
    #[serde(default = "default_t_scale")]
    pub t_scale: f64,
    /// diffusers' `DiTTransformer2DModel` layout: every block has its own timestep and class
    /// embedders (`blocks.N.t_embedder`, `blocks.N.y_embedder`), the final layer reads block 0's.
    #[serde(default, skip_serializing_if = "is_false")]
    pub per_block_conditioning: bool,
    /// The timestep sinusoid's frequency shift (diffusers' `downscale_freq_shift`): 0 in the
    /// PyTorch reference, 1 in `DiTTransformer2DModel`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub freq_shift: f64,
    /// eps of each block's LayerNorm before the MLP: 1e-6 like every other norm in the PyTorch
    /// reference; diffusers' `DiTTransformer2DModel` uses its `norm_eps` (1e-5) there.
    #[serde(default = "default_ln_eps", skip_serializing_if = "is_default_ln_eps")]
    pub mlp_norm_eps: f64,
    /// Width of the per-sample conditioning vectors (a caption's pooled text embedding) the model
    /// reads: projected by `c_embedder` and added to the conditioning like the class embedding
    /// (adaLN). 0: none. The zero vector is the null condition (dropped with
    /// `class_dropout_prob` in training).
    #[serde(default, skip_serializing_if = "is_zero_usize")]
    pub condition_dim: usize,
}

fn is_zero_usize(x: &usize) -> bool {
    *x == 0
}

fn default_ln_eps() -> f64 {
    1e-6
}
fn is_default_ln_eps(x: &f64) -> bool {
    *x == 1e-6
}

fn is_false(b: &bool) -> bool {
    !*b
}
fn is_zero(x: &f64) -> bool {
    *x == 0.0
}

fn default_mlp_ratio() -> f64 {
    4.0
}
fn default_class_dropout() -> f64 {
    0.1
}
fn default_freq() -> usize {
    256
}
fn default_t_scale() -> f64 {
    1000.0
}

impl DiTConfig {
    /// A config from a named size (`DiT-S/2`, `DiT-T/4`, ...; see [`DIT_SIZES`]) for images of
    /// `channels x input_size x input_size`.
    pub fn named(name: &str, input_size: usize, in_channels: usize) -> Result<Self> {
        let (size, patch) = parse_size_name(name)?;
        let &(_, hidden_size, depth, num_heads) = DIT_SIZES
            .iter()
            .find(|s| s.0.eq_ignore_ascii_case(size))
            .expect("parse_size_name only returns known sizes");
        let config = Self {
            input_size,
            patch_size: patch,
            in_channels,
            hidden_size,
            depth,
            num_heads,
            mlp_ratio: 4.0,
            num_classes: 0,
            class_dropout_prob: 0.1,
            learn_sigma: false,
            frequency_embedding_size: 256,
            t_scale: 1000.0,
            per_block_conditioning: false,
            freq_shift: 0.0,
            mlp_norm_eps: 1e-6,
            condition_dim: 0,
        };
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidConfig(m));
        if self.patch_size == 0 || !self.input_size.is_multiple_of(self.patch_size) {
            return bad(format!(
                "input_size {} is not a multiple of patch_size {}",
                self.input_size, self.patch_size
            ));
        }
        if self.num_heads == 0 || !self.hidden_size.is_multiple_of(self.num_heads) {
            return bad(format!(
                "hidden_size {} is not a multiple of num_heads {}",
                self.hidden_size, self.num_heads
            ));
        }
        if !self.hidden_size.is_multiple_of(4) {
            return bad(format!(
                "hidden_size {} must be a multiple of 4 (2-D sin-cos position embedding)",
                self.hidden_size
            ));
        }
        if !(self.mlp_norm_eps > 0.0 && self.mlp_norm_eps <= 1e-2) {
            return bad(format!("mlp_norm_eps {} must be in (0, 0.01]", self.mlp_norm_eps));
        }
        if !(0.0..=1.0).contains(&self.freq_shift) {
            return bad(format!("freq_shift {} must be in [0, 1]", self.freq_shift));
        }
        if !self.frequency_embedding_size.is_multiple_of(2) || self.frequency_embedding_size < 4 {
            return bad(format!(
                "frequency_embedding_size {} must be even",
                self.frequency_embedding_size
            ));
        }
        if self.depth == 0 || self.in_channels == 0 {
            return bad("depth and in_channels must be positive".into());
        }
        if !(0.0..1.0).contains(&self.class_dropout_prob) {
            return bad(format!(
                "class_dropout_prob {} must be in [0, 1)",
                self.class_dropout_prob
            ));
        }
        // Sizes a real DiT never exceeds, checked before anything is allocated from them (a
        // header claiming a 2^40-wide model is refused, not attempted).
        let tokens = (self.input_size / self.patch_size).pow(2);
        for (name, v, max) in [
            ("input_size", self.input_size, 1 << 14),
            ("in_channels", self.in_channels, 1 << 12),
            ("hidden_size", self.hidden_size, 1 << 15),
            ("depth", self.depth, 1 << 10),
            ("num_classes", self.num_classes, 1 << 24),
            ("condition_dim", self.condition_dim, 1 << 16),
            ("frequency_embedding_size", self.frequency_embedding_size, 1 << 14),
            (
                "tokens x hidden_size",
                tokens.saturating_mul(self.hidden_size),
                1 << 28,
            ),
        ] {
            if v > max {
                return bad(format!(
                    "{name} {v} is beyond any DiT ddm can hold (at most {max})"
                ));
            }
        }
        if !(self.mlp_ratio.is_finite() && self.mlp_ratio > 0.0 && self.mlp_ratio <= 64.0) {
            return bad(format!("mlp_ratio {} must be in (0, 64]", self.mlp_ratio));
        }
        Ok(())
    }

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

    /// Rows of the class embedding table: the classes, plus the null class when CFG dropout is on.
    pub fn class_rows(&self) -> usize {
        self.num_classes + usize::from(self.class_dropout_prob > 0.0)
    }

    /// Forward FLOPs per sample (multiply-adds count 2), for training-cost accounting.
    pub fn flops_per_sample(&self) -> f64 {
        let (t, d) = ((self.grid() * self.grid()) as f64, self.hidden_size as f64);
        let mlp = (d * self.mlp_ratio).floor();
        let per_block = 2.0 * t * (d * 3.0 * d + d * d + 2.0 * d * mlp) // qkv, proj, mlp
            + 2.0 * 2.0 * t * t * d // q k^T and attn v
            + 2.0 * d * 6.0 * d; // adaLN modulation
        let p2c = (self.patch_size * self.patch_size) as f64;
        let conditionings = if self.per_block_conditioning {
            self.depth
        } else {
            1
        } as f64;
        let embed = 2.0 * t * p2c * self.in_channels as f64 * d
            + conditionings * 2.0 * (self.frequency_embedding_size as f64 * d + d * d);
        let fin = 2.0 * (d * 2.0 * d + t * d * p2c * self.out_channels() as f64);
        embed + self.depth as f64 * per_block + fin
    }

    /// A lower estimate of the activations one training sample keeps for the backward pass, in
    /// floats: per block the token stream at its widths (normalised, q k v, attention output,
    /// MLP hidden) and the attention matrix per head.
    pub fn activation_floats_per_sample(&self) -> f64 {
        let (t, d) = ((self.grid() * self.grid()) as f64, self.hidden_size as f64);
        let mlp = (d * self.mlp_ratio).floor();
        self.depth as f64 * (t * (6.0 * d + 2.0 * mlp) + self.num_heads as f64 * t * t)
    }

    /// Build the model from `src` (fresh initialisation or a state dict).
    pub fn build(&self, src: &mut impl ParamSource) -> Result<DiT> {
        self.build_inner(src, true)
    }

    /// Build only the trunk (embedders and blocks, no velocity head): what the router reuses.
    pub fn build_trunk(&self, src: &mut impl ParamSource) -> Result<DiT> {
        self.build_inner(src, false)
    }

    fn build_inner(&self, src: &mut impl ParamSource, head: bool) -> Result<DiT> {
        self.validate()?;
        let d = self.hidden_size;
        let pos = src.buffer("pos_embed", pos_embed_2d(d, self.grid()))?;
        Ok(DiT {
            // The reference initialises the patch conv like a Linear (xavier over [D, C*P*P]).
            x_embedder: src.patch_conv(
                "x_embedder.proj",
                self.in_channels,
                d,
                self.patch_size,
                Init::Xavier,
            )?,
            cond: if self.per_block_conditioning {
                None
            } else {
                Some(Conditioning::build(src, "", self)?)
            },
            c_embedder: match self.condition_dim {
                0 => None,
                dc => Some(src.linear("c_embedder", dc, d, Init::Xavier)?),
            },
            pos_embed: pos.to_tensor::<3>(src.device()),
            blocks: (0..self.depth)
                .map(|i| DiTBlock::build(src, &format!("blocks.{i}"), self))
                .collect::<Result<_>>()?,
            final_layer: if head {
                Some(FinalLayer {
                    ada_ln: src.linear("final_layer.adaLN_modulation.1", d, 2 * d, Init::Zeros)?,
                    linear: src.linear(
                        "final_layer.linear",
                        d,
                        self.patch_size * self.patch_size * self.out_channels(),
                        Init::Zeros,
                    )?,
                })
            } else {
                None
            },
            config: self.clone(),
        })
    }
}

/// The named sizes: (name, hidden D, depth, heads). S/B/L/XL are the DiT paper's; XS (the default
/// router trunk), T ("tiny") and Bench (the PyTorch peer's "bench-dit", README's Benchmarks) train on a CPU.
pub const DIT_SIZES: &[(&str, usize, usize, usize)] = &[
    ("XS", 64, 2, 2),
    ("T", 128, 4, 4),
    ("Bench", 256, 6, 4),
    ("S", 384, 12, 6),
    ("B", 768, 12, 12),
    ("L", 1024, 24, 16),
    ("XL", 1152, 28, 16),
];

/// Parse `DiT-S/2` (case-insensitive; the `DiT-` prefix optional) into (size, patch).
pub fn parse_size_name(name: &str) -> Result<(&str, usize)> {
    let err = || {
        let sizes: Vec<_> = DIT_SIZES.iter().map(|s| s.0).collect();
        Error::InvalidConfig(format!(
            "unknown DiT size `{name}`: expected DiT-<size>/<patch> with size one of {} and patch 1, 2, 4 or 8 (e.g. DiT-S/2; patch 1 for small latents)",
            sizes.join(", ")
        ))
    };
    let rest = name
        .strip_prefix("DiT-")
        .or_else(|| name.strip_prefix("dit-"))
        .unwrap_or(name);
    let (size, patch) = rest.split_once('/').ok_or_else(err)?;
    let patch: usize = patch.parse().map_err(|_| err())?;
    if !DIT_SIZES.iter().any(|s| s.0.eq_ignore_ascii_case(size)) || ![1, 2, 4, 8].contains(&patch) {
        return Err(err());
    }
    Ok((size, patch))
}

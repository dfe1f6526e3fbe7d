//! An MLP denoiser for vector data (the 2-D and N-D Gaussian-mixture sets).
//!
//! Same timestep embedding as DiT (sinusoid of 1000 t, then an MLP), and, when class-conditional,
//! DiT's class embedding (a table with a null row for classifier-free guidance) added to it.
//! Residual blocks add this conditioning vector before each block; the output layer is
//! zero-initialised, so a fresh model predicts exactly zero, like DiT.
//!
//! Letters in shape comments: N batch, X data dimension, D hidden.

use burn::nn::{Embedding, Linear};
use burn::prelude::*;
use burn::tensor::activation::silu;
use serde::{Deserialize, Serialize};

use crate::condition::Condition;
use crate::dit::TimestepEmbedder;
use crate::error::{Error, Result};
use crate::params::{Init, ParamSource, StateDict};
use crate::precision::like;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MlpConfig {
    /// Data dimension X.
    pub dim: usize,
    #[serde(default = "default_hidden")]
    pub hidden_size: usize,
    /// Number of residual blocks.
    #[serde(default = "default_depth")]
    pub depth: usize,
    #[serde(default = "default_freq")]
    pub frequency_embedding_size: usize,
    #[serde(default = "default_t_scale")]
    pub t_scale: f64,
    /// Output width (default: `dim`, a velocity). The MLP router sets it to K (logits).
    #[serde(default)]
    pub out_dim: Option<usize>,
    /// 0: unconditional. Otherwise classes 0..num_classes, plus a null class (id num_classes)
    /// when `class_dropout_prob > 0`, as in [`crate::dit::DiTConfig`].
    #[serde(default)]
    pub num_classes: usize,
    #[serde(default)]
    pub class_dropout_prob: f64,
    /// Width of the per-sample conditioning vectors the model reads (`c_embedder`), as in
    /// [`crate::dit::DiTConfig`]; 0: none.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub condition_dim: usize,
}

fn is_zero(x: &usize) -> bool {
    *x == 0
}

fn default_hidden() -> usize {
    256
}
fn default_depth() -> usize {
    3
}
fn default_freq() -> usize {
    256
}
fn default_t_scale() -> f64 {
    1000.0
}

impl MlpConfig {
    pub fn new(dim: usize) -> Self {
        Self {
            dim,
            hidden_size: 256,
            depth: 3,
            frequency_embedding_size: 256,
            t_scale: 1000.0,
            out_dim: None,
            num_classes: 0,
            class_dropout_prob: 0.0,
            condition_dim: 0,
        }
    }

    /// Rows of the class-embedding table: the classes, plus the null class if trained with
    /// label dropout.
    pub fn class_rows(&self) -> usize {
        self.num_classes + usize::from(self.num_classes > 0 && self.class_dropout_prob > 0.0)
    }

    pub fn validate(&self) -> Result<()> {
        if self.dim == 0 || self.hidden_size == 0 || !self.frequency_embedding_size.is_multiple_of(2) {
            return Err(Error::InvalidConfig(format!(
                "MLP needs dim > 0, hidden_size > 0 and an even frequency_embedding_size, got {self:?}"
            )));
        }
        if !(0.0..1.0).contains(&self.class_dropout_prob) {
            return Err(Error::InvalidConfig(format!(
                "class_dropout_prob {} must be in [0, 1)",
                self.class_dropout_prob
            )));
        }
        for (name, v, max) in [
            ("dim", self.dim, 1 << 24),
            ("hidden_size", self.hidden_size, 1 << 15),
            ("depth", self.depth, 1 << 10),
            ("out_dim", self.out_dim.unwrap_or(0), 1 << 24),
            ("num_classes", self.num_classes, 1 << 24),
            ("condition_dim", self.condition_dim, 1 << 16),
            ("frequency_embedding_size", self.frequency_embedding_size, 1 << 14),
        ] {
            if v > max {
                return Err(Error::InvalidConfig(format!(
                    "{name} {v} is beyond any MLP ddm can hold (at most {max})"
                )));
            }
        }
        if !self.t_scale.is_finite() {
            return Err(Error::InvalidConfig(format!(
                "t_scale {} must be finite",
                self.t_scale
            )));
        }
        Ok(())
    }

    /// A lower estimate of the activations one training sample keeps, in floats.
    pub fn activation_floats_per_sample(&self) -> f64 {
        (self.depth as f64 + 2.0) * 3.0 * self.hidden_size as f64
    }

    /// Forward FLOPs per sample.
    pub fn flops_per_sample(&self) -> f64 {
        let (x, d, f) = (
            self.dim as f64,
            self.hidden_size as f64,
            self.frequency_embedding_size as f64,
        );
        let out = self.out_dim.unwrap_or(self.dim) as f64;
        2.0 * (x * d + f * d + d * d + self.depth as f64 * 2.0 * d * d + d * out)
    }

    pub fn build(&self, src: &mut impl ParamSource) -> Result<Mlp> {
        self.validate()?;
        let (x, d) = (self.dim, self.hidden_size);
        Ok(Mlp {
            x_embedder: src.linear("x_embedder", x, d, Init::Xavier)?,
            t_embedder: TimestepEmbedder::build(
                src,
                "t_embedder",
                d,
                (self.frequency_embedding_size, self.t_scale, 0.0),
            )?,
            c_embedder: match self.condition_dim {
                0 => None,
                dc => Some(src.linear("c_embedder", dc, d, Init::Xavier)?),
            },
            y_embedder: if self.num_classes > 0 {
                Some(src.embedding(
                    "y_embedder.embedding_table",
                    self.class_rows(),
                    d,
                    Init::Normal(0.02),
                )?)
            } else {
                None
            },
            blocks: (0..self.depth)
                .map(|i| {
                    Ok(MlpBlock {
                        fc1: src.linear(&format!("blocks.{i}.fc1"), d, d, Init::Xavier)?,
                        fc2: src.linear(&format!("blocks.{i}.fc2"), d, d, Init::Xavier)?,
                    })
                })
                .collect::<Result<_>>()?,
            // Zero-initialised output: a fresh model predicts exactly zero velocity.
            final_layer: src.linear("final_layer", d, self.out_dim.unwrap_or(x), Init::Zeros)?,
            config: self.clone(),
        })
    }
}

#[derive(Module, Debug)]
pub struct MlpBlock {
    fc1: Linear,
    fc2: Linear,
}

/// The MLP velocity model.
#[derive(Module, Debug)]
pub struct Mlp {
    x_embedder: Linear,
    t_embedder: TimestepEmbedder,
    y_embedder: Option<Embedding>,
    c_embedder: Option<Linear>,
    blocks: Vec<MlpBlock>,
    final_layer: Linear,
    #[module(skip)]
    config: MlpConfig,
}

impl Mlp {
    pub fn config(&self) -> &MlpConfig {
        &self.config
    }

    /// # Shapes
    /// - `x`: `[N, X]`, `t`: `[N]` in [0, 1]; the condition's class `[N]` (null class =
    ///   num_classes; ignored by an unconditional model) and vector `[N, condition_dim]` (absent:
    ///   the null, zero, vector) -> `[N, out_dim]` (`[N, X]` for a velocity)
    ///
    /// It computes in its parameters' dtype (`precision::cast`) and returns `x`'s.
    pub fn forward(&self, x: Tensor<2>, t: Tensor<1>, cond: &Condition) -> Tensor<2> {
        let io = x.dtype();
        let extra = crate::dit::vector_embedding(self.c_embedder.as_ref(), cond, x.dims()[0], &x.device());
        let out = self
            .final_layer
            .forward(self.features_with(x, t, cond.class.clone(), extra)); // [N, X]
        like(out, io)
    }

    /// The output layer on features (a router's logits from [`Self::features_with`]).
    pub fn head(&self, features: Tensor<2>) -> Tensor<2> {
        self.final_layer.forward(features)
    }

    /// The last hidden layer, what the output layer reads (a classifier's feature space).
    ///
    /// # Shapes
    /// - `x`: `[N, X]`, `t`: `[N]`, `y`: `[N]` -> `[N, D]`
    pub fn features(&self, x: Tensor<2>, t: Tensor<1>, y: Option<Tensor<1, Int>>) -> Tensor<2> {
        self.features_with(x, t, y, None)
    }

    /// [`Self::features`] with `extra` `[N, D]` added to the conditioning vector (a router's
    /// projection of a per-sample conditioning vector).
    pub fn features_with(
        &self,
        x: Tensor<2>,
        t: Tensor<1>,
        y: Option<Tensor<1, Int>>,
        extra: Option<Tensor<2>>,
    ) -> Tensor<2> {
        let mut c = self.t_embedder.forward(t); // [N, D]
        if let Some(extra) = extra {
            c = c + extra; // [N, D]
        }
        if let (Some(emb), Some(y)) = (&self.y_embedder, y) {
            c = c + emb.weight.val().select(0, y); // [N, D]
        }
        let x = like(x, self.x_embedder.weight.val().dtype()); // t stays f32 (the embedder casts)
        let mut h = self.x_embedder.forward(x); // [N, D]
        for b in &self.blocks {
            h = h.clone() + b.fc2.forward(silu(b.fc1.forward(silu(h + c.clone())))); // [N, D]
        }
        silu(h)
    }

    pub fn state_dict(&self) -> StateDict {
        let mut sd = StateDict::default();
        sd.linear("x_embedder", &self.x_embedder);
        self.t_embedder.export("t_embedder", &mut sd);
        if let Some(e) = &self.y_embedder {
            sd.embedding("y_embedder.embedding_table", e);
        }
        if let Some(l) = &self.c_embedder {
            sd.linear("c_embedder", l);
        }
        for (i, b) in self.blocks.iter().enumerate() {
            sd.linear(&format!("blocks.{i}.fc1"), &b.fc1);
            sd.linear(&format!("blocks.{i}.fc2"), &b.fc2);
        }
        sd.linear("final_layer", &self.final_layer);
        sd
    }
}

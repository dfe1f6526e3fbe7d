//! The text encoder: `transformers`' `CLIPTextModel` (the text half of CLIP, the encoder Stable
//! Diffusion, PixArt's predecessors and Paris condition on), under transformers' parameter names so
//! `ddm import --from transformers-clip` reads a saved model as it is.
//!
//! Token ids `[N, L]` -> token embeddings + learned positions -> `num_hidden_layers` pre-LayerNorm
//! blocks of causal self-attention and an MLP -> a final LayerNorm: the token states `[N, L, D]`.
//! The pooled vector `[N, D]` is the state at the end-of-text token. Text goes in through
//! [`crate::tokenizer::TextTokenizer`].

use std::collections::BTreeMap;
use std::path::Path;

use burn::nn::{Embedding, LayerNorm, Linear};
use burn::prelude::*;
use burn::tensor::activation::{gelu, gelu_approximate, sigmoid};
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::host::HostTensor;
use crate::params::{Init, ParamSource, StateDict, StateLoader};
use crate::tokenizer::{Pad, TextTokenizer};

/// transformers' `CLIPTextConfig` (its config.json; the defaults are transformers', which are
/// CLIP ViT-B/32's text tower).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClipTextConfig {
    #[serde(default = "d_vocab")]
    pub vocab_size: usize,
    #[serde(default = "d_hidden")]
    pub hidden_size: usize,
    #[serde(default = "d_intermediate")]
    pub intermediate_size: usize,
    #[serde(default = "d_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "d_heads")]
    pub num_attention_heads: usize,
    /// The longest token sequence (77 for CLIP): the length every caption is padded to.
    #[serde(default = "d_positions")]
    pub max_position_embeddings: usize,
    /// `quick_gelu` (CLIP's), `gelu` or `gelu_new` (tanh approximation).
    #[serde(default = "d_act")]
    pub hidden_act: String,
    #[serde(default = "d_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "d_bos")]
    pub bos_token_id: i64,
    /// The end-of-text token whose state is the pooled vector. transformers' legacy rule: when it
    /// is 2 (configs made before the field was right), the pooled state is at the largest id.
    #[serde(default = "d_eos")]
    pub eos_token_id: i64,
    #[serde(default = "d_pad")]
    pub pad_token_id: i64,
}

fn d_vocab() -> usize {
    49408
}
fn d_hidden() -> usize {
    512
}
fn d_intermediate() -> usize {
    2048
}
fn d_layers() -> usize {
    12
}
fn d_heads() -> usize {
    8
}
fn d_positions() -> usize {
    77
}
fn d_act() -> String {
    "quick_gelu".into()
}
fn d_eps() -> f64 {
    1e-5
}
fn d_bos() -> i64 {
    49406
}
fn d_eos() -> i64 {
    49407
}
fn d_pad() -> i64 {
    1
}

/// The activations transformers' CLIP configs name.
const ACTIVATIONS: [&str; 3] = ["quick_gelu", "gelu", "gelu_new"];

impl ClipTextConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidConfig(format!("CLIP text encoder: {m}")));
        if self.vocab_size == 0 || self.vocab_size > 1 << 20 {
            return bad(format!("vocab_size {} (expected 1 ..= 1048576)", self.vocab_size));
        }
        if self.num_attention_heads == 0 || !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return bad(format!(
                "hidden_size {} cannot be split into {} heads",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if self.hidden_size > 8192 || self.intermediate_size == 0 || self.intermediate_size > 65536 {
            return bad(format!(
                "hidden_size {} / intermediate_size {} out of range",
                self.hidden_size, self.intermediate_size
            ));
        }
        if self.num_hidden_layers == 0 || self.num_hidden_layers > 128 {
            return bad(format!(
                "num_hidden_layers {} (expected 1 ..= 128)",
                self.num_hidden_layers
            ));
        }
        if self.max_position_embeddings < 2 || self.max_position_embeddings > 4096 {
            return bad(format!(
                "max_position_embeddings {} (expected 2 ..= 4096)",
                self.max_position_embeddings
            ));
        }
        if !ACTIVATIONS.contains(&self.hidden_act.as_str()) {
            return bad(format!(
                "hidden_act `{}` (expected one of {})",
                self.hidden_act,
                ACTIVATIONS.join(", ")
            ));
        }
        if !(self.layer_norm_eps > 0.0 && self.layer_norm_eps < 1.0) {
            return bad(format!(
                "layer_norm_eps {} (expected in (0, 1))",
                self.layer_norm_eps
            ));
        }
        let vocab = self.vocab_size as i64;
        if !(0..vocab).contains(&self.eos_token_id) {
            return bad(format!(
                "eos_token_id {} outside the vocabulary of {vocab}",
                self.eos_token_id
            ));
        }
        Ok(())
    }

    /// The per-sample shape a text-encoder checkpoint records: the token positions `[L]`.
    pub fn data_shape(&self) -> Vec<usize> {
        vec![self.max_position_embeddings]
    }

    /// Forward FLOPs for one full-length caption (multiply-adds count 2).
    pub fn flops_per_sample(&self) -> f64 {
        let (l, d, m) = (
            self.max_position_embeddings as f64,
            self.hidden_size as f64,
            self.intermediate_size as f64,
        );
        let per_layer = 2.0 * l * (4.0 * d * d + 2.0 * d * m) + 4.0 * l * l * d;
        self.num_hidden_layers as f64 * per_layer
    }

    /// Floats kept per caption for a backward pass (a lower estimate).
    pub fn activation_floats_per_sample(&self) -> f64 {
        let (l, d, m) = (
            self.max_position_embeddings as f64,
            self.hidden_size as f64,
            self.intermediate_size as f64,
        );
        let heads = self.num_attention_heads as f64;
        self.num_hidden_layers as f64 * (l * (8.0 * d + 2.0 * m) + heads * l * l)
    }

    /// Build the encoder from `src` (fresh initialisation or a state dict).
    pub fn build(&self, src: &mut impl ParamSource) -> Result<ClipTextModel> {
        self.validate()?;
        let d = self.hidden_size;
        let init = Init::Normal(0.02);
        let layers = (0..self.num_hidden_layers)
            .map(|i| EncoderLayer::build(src, &format!("encoder.layers.{i}"), self))
            .collect::<Result<Vec<_>>>()?;
        Ok(ClipTextModel {
            token_embedding: src.embedding("embeddings.token_embedding", self.vocab_size, d, init)?,
            position_embedding: src.embedding(
                "embeddings.position_embedding",
                self.max_position_embeddings,
                d,
                Init::Normal(0.01),
            )?,
            layers,
            final_layer_norm: src.layer_norm("final_layer_norm", d, self.layer_norm_eps)?,
            config: self.clone(),
        })
    }

    /// The encoder from named tensors (transformers' names), every name and shape checked,
    /// leftovers refused. `origin` is named in errors.
    pub fn load(
        &self,
        tensors: BTreeMap<String, HostTensor>,
        origin: &Path,
        device: &Device,
    ) -> Result<ClipTextModel> {
        let mut loader = StateLoader::new(origin, tensors, device);
        let model = self.build(&mut loader)?;
        loader.finish("clip-text")?;
        Ok(model)
    }
}

/// What the encoder gives for a batch of captions.
#[derive(Debug, Clone)]
pub struct TextEncoding {
    /// The final LayerNorm's token states `[N, L, D]`.
    pub tokens: Tensor<3>,
    /// The state at each caption's end-of-text token `[N, D]`.
    pub pooled: Tensor<2>,
}

/// transformers' `CLIPTextModel`.
#[derive(Module, Debug)]
pub struct ClipTextModel {
    token_embedding: Embedding,
    position_embedding: Embedding,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
    #[module(skip)]
    config: ClipTextConfig,
}

impl ClipTextModel {
    pub fn config(&self) -> &ClipTextConfig {
        &self.config
    }

    /// Encode token ids `[N, L]` (L <= max_position_embeddings) whose `mask` `[N, L]` is 1 at
    /// tokens and 0 at padding (padding after the text, as the tokenizer writes it).
    pub fn forward(&self, ids: Tensor<2, Int>, mask: Tensor<2>) -> TextEncoding {
        let [n, l] = ids.dims();
        let d = self.config.hidden_size;
        let positions = Tensor::<1, Int>::arange(0..l as i64, &ids.device()).reshape([1, l]);
        let mut h = self.token_embedding.forward(ids.clone()) + self.position_embedding.forward(positions); // [N, L, D]
        // A padding key is hidden from every query (causality is the attention's option).
        let padding =
            mask.equal_elem(0.0)
                .reshape([n, 1, 1, l])
                .expand([n, self.config.num_attention_heads, l, l]);
        for layer in &self.layers {
            h = layer.forward(h, padding.clone(), &self.config);
        }
        let tokens = self.final_layer_norm.forward(h); // [N, L, D]
        let at = self.end_of_text(ids); // [N]
        let pooled = tokens
            .clone()
            .gather(1, at.reshape([n, 1, 1]).expand([n, 1, d])) // [N, 1, D]
            .reshape([n, d]);
        TextEncoding { tokens, pooled }
    }

    /// The pooled vectors `[N, D]` of `captions`, tokenized and encoded `batch` at a time, on the
    /// host.
    pub fn encode_pooled(
        &self,
        tokenizer: &TextTokenizer,
        captions: &[String],
        batch: usize,
    ) -> Result<HostTensor> {
        let device = self.token_embedding.weight.device();
        let mut pooled = Vec::with_capacity(captions.len() * self.config.hidden_size);
        for chunk in captions.chunks(batch.max(1)) {
            let (ids, mask) = tokenizer.encode(chunk)?.to_tensors(&device);
            pooled.extend(HostTensor::from_tensor(self.forward(ids, mask).pooled).data);
        }
        Ok(HostTensor::new(
            vec![captions.len(), self.config.hidden_size],
            pooled,
        ))
    }

    /// Each row's end-of-text position `[N]`: the first `eos_token_id`, or (transformers' legacy
    /// rule for configs whose `eos_token_id` is 2) the largest id.
    fn end_of_text(&self, ids: Tensor<2, Int>) -> Tensor<1, Int> {
        let [n, _] = ids.dims();
        let hits = match self.config.eos_token_id {
            2 => ids,
            eos => ids.equal_elem(eos).int(),
        };
        hits.argmax(1).reshape([n])
    }

    /// All tensors under transformers' names.
    pub fn state_dict(&self) -> StateDict {
        let mut sd = StateDict::default();
        sd.embedding("embeddings.token_embedding", &self.token_embedding);
        sd.embedding("embeddings.position_embedding", &self.position_embedding);
        for (i, layer) in self.layers.iter().enumerate() {
            layer.export(&format!("encoder.layers.{i}"), &mut sd);
        }
        sd.layer_norm("final_layer_norm", &self.final_layer_norm);
        sd
    }
}

/// LayerNorm, causal self-attention, residual; LayerNorm, MLP, residual.
#[derive(Module, Debug)]
struct EncoderLayer {
    layer_norm1: LayerNorm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

impl EncoderLayer {
    fn build(src: &mut impl ParamSource, prefix: &str, c: &ClipTextConfig) -> Result<Self> {
        let p = |s: &str| format!("{prefix}.{s}");
        let (d, m, eps) = (c.hidden_size, c.intermediate_size, c.layer_norm_eps);
        let init = Init::Normal(0.02);
        Ok(Self {
            layer_norm1: src.layer_norm(&p("layer_norm1"), d, eps)?,
            q_proj: src.linear(&p("self_attn.q_proj"), d, d, init)?,
            k_proj: src.linear(&p("self_attn.k_proj"), d, d, init)?,
            v_proj: src.linear(&p("self_attn.v_proj"), d, d, init)?,
            out_proj: src.linear(&p("self_attn.out_proj"), d, d, init)?,
            layer_norm2: src.layer_norm(&p("layer_norm2"), d, eps)?,
            fc1: src.linear(&p("mlp.fc1"), d, m, init)?,
            fc2: src.linear(&p("mlp.fc2"), m, d, init)?,
        })
    }

    /// # Shapes
    /// - `x`: `[N, L, D]` -> `[N, L, D]`; `padding`: `[N, H, L, L]`, true where the key is padding
    fn forward(&self, x: Tensor<3>, padding: Tensor<4, Bool>, c: &ClipTextConfig) -> Tensor<3> {
        let [n, l, d] = x.dims();
        let heads = c.num_attention_heads;
        let h = self.layer_norm1.forward(x.clone());
        let split = |lin: &Linear| {
            lin.forward(h.clone())
                .reshape([n, l, heads, d / heads])
                .swap_dims(1, 2)
        }; // [N, H, L, Dh]
        let options = AttentionModuleOptions {
            is_causal: true,
            ..Default::default()
        };
        let a = attention(
            split(&self.q_proj),
            split(&self.k_proj),
            split(&self.v_proj),
            Some(padding),
            None,
            options,
        ) // [N, H, L, Dh]
        .swap_dims(1, 2)
        .reshape([n, l, d]);
        let x = x + self.out_proj.forward(a);
        let h = self.fc1.forward(self.layer_norm2.forward(x.clone()));
        let h = match c.hidden_act.as_str() {
            "quick_gelu" => h.clone() * sigmoid(h * 1.702),
            "gelu" => gelu(h),
            _ => gelu_approximate(h),
        };
        x + self.fc2.forward(h)
    }

    fn export(&self, prefix: &str, sd: &mut StateDict) {
        let p = |s: &str| format!("{prefix}.{s}");
        sd.layer_norm(&p("layer_norm1"), &self.layer_norm1);
        sd.linear(&p("self_attn.q_proj"), &self.q_proj);
        sd.linear(&p("self_attn.k_proj"), &self.k_proj);
        sd.linear(&p("self_attn.v_proj"), &self.v_proj);
        sd.linear(&p("self_attn.out_proj"), &self.out_proj);
        sd.layer_norm(&p("layer_norm2"), &self.layer_norm2);
        sd.linear(&p("mlp.fc1"), &self.fc1);
        sd.linear(&p("mlp.fc2"), &self.fc2);
    }
}

/// The space text conditions live in: which encoder made them (the sha256 of its checkpoint's
/// tensors) and their shapes. Data, experts and routers conditioned on text record it; what was
/// made by one encoder is refused beside another's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TextSpace {
    /// sha256 (hex) of the text encoder checkpoint's tensors (its `tensors_sha256`).
    pub encoder_sha256: String,
    /// The width D of pooled vectors and token states.
    pub dim: usize,
    /// The token sequence length L.
    pub length: usize,
}

impl TextSpace {
    pub fn of(config: &ClipTextConfig, encoder_sha256: &str) -> Self {
        Self {
            encoder_sha256: encoder_sha256.to_string(),
            dim: config.hidden_size,
            length: config.max_position_embeddings,
        }
    }

    /// A short name for messages: the encoder's first 12 hex digits and the shapes.
    pub fn describe(&self) -> String {
        format!(
            "text encoder {} (D {}, L {})",
            crate::text::short(&self.encoder_sha256, 12),
            self.dim,
            self.length
        )
    }
}

/// transformers' config.json for a text encoder: a `CLIPTextModel`'s (`model_type`
/// `clip_text_model`), or a whole `CLIPModel`'s whose `text_config` is read.
#[derive(Deserialize)]
struct SavedConfig {
    #[serde(default)]
    model_type: Option<String>,
    #[serde(default)]
    text_config: Option<serde_json::Value>,
}

/// The weights file `save_pretrained` writes.
pub const TRANSFORMERS_WEIGHTS: &str = "model.safetensors";

/// Read a transformers CLIP directory (`config.json`, `model.safetensors`): the text encoder's
/// config and its tensors, named as transformers 5 saves a `CLIPTextModel` (`encoder.layers.0...`;
/// the `text_model.` prefix of files saved by transformers 4 and of a whole `CLIPModel` is
/// dropped). A `CLIPModel`'s vision tower, projections and logit scale are left out, and so is a
/// `position_ids` buffer (older transformers saved it).
pub fn read_transformers(dir: &Path) -> Result<(ClipTextConfig, BTreeMap<String, HostTensor>)> {
    let config_path = dir.join("config.json");
    let bad = |reason: String| Error::BadMetadata {
        path: config_path.clone(),
        reason,
    };
    let text = std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
    let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(format!("not JSON: {e}")))?;
    let saved: SavedConfig =
        serde_json::from_value(value.clone()).map_err(|e| bad(format!("not a transformers config: {e}")))?;
    let text_config = match (saved.model_type.as_deref(), saved.text_config) {
        (Some("clip"), Some(t)) => t,
        (Some("clip_text_model") | None, _) => value,
        (Some(other), _) => {
            return Err(bad(format!(
                "model_type `{other}`: expected a CLIPTextModel (`clip_text_model`) or a CLIPModel (`clip`)"
            )));
        }
    };
    let config: ClipTextConfig =
        serde_json::from_value(text_config).map_err(|e| bad(format!("not a CLIP text config: {e}")))?;
    config.validate().map_err(|e| bad(e.to_string()))?;
    let file = crate::host::TensorFile::read(&dir.join(TRANSFORMERS_WEIGHTS))?;
    let not_text = [
        "vision_model.",
        "visual_projection.",
        "text_projection.",
        "logit_scale",
    ];
    let tensors = file
        .names()
        .filter(|n| !not_text.iter().any(|p| n.starts_with(p)) && !n.ends_with("position_ids"))
        .map(|n| {
            Ok((
                n.strip_prefix("text_model.").unwrap_or(n).to_string(),
                file.f32(n)?,
            ))
        })
        .collect::<Result<_>>()?;
    Ok((config, tensors))
}

/// transformers' `tokenizer_config.json`, for the padding token it names (CLIP's is its
/// end-of-text token; Stable Diffusion 2 pads with `!`).
#[derive(Deserialize)]
struct TokenizerConfig {
    #[serde(default)]
    pad_token: Option<serde_json::Value>,
}

/// Read the tokenizer saved beside a transformers text encoder: `tokenizer.json` in `dir` (or in
/// `dir/../tokenizer/`, Stable Diffusion's layout), padded with `tokenizer_config.json`'s
/// `pad_token` if it names one, else with the end-of-text token, to `max_position_embeddings`.
pub fn read_transformers_tokenizer(dir: &Path, config: &ClipTextConfig) -> Result<TextTokenizer> {
    let candidates = [dir.to_path_buf(), dir.join("..").join("tokenizer")];
    let Some(found) = candidates.iter().find(|d| d.join("tokenizer.json").is_file()) else {
        return Err(Error::InvalidConfig(format!(
            "{}: no tokenizer.json here or in ../tokenizer/ (a transformers fast tokenizer saves one: \
             `CLIPTokenizerFast.from_pretrained(DIR).save_pretrained(DIR)`)",
            dir.display()
        )));
    };
    let path = found.join("tokenizer.json");
    let json = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let config_path = found.join("tokenizer_config.json");
    let named_pad = match std::fs::read_to_string(&config_path) {
        Ok(text) => {
            let c: TokenizerConfig = serde_json::from_str(&text).map_err(|e| Error::BadMetadata {
                path: config_path.clone(),
                reason: format!("not a tokenizer config: {e}"),
            })?;
            match c.pad_token {
                Some(serde_json::Value::String(s)) => Some(s),
                Some(serde_json::Value::Object(o)) => {
                    o.get("content").and_then(|c| c.as_str()).map(str::to_string)
                }
                _ => None,
            }
        }
        Err(_) => None,
    };
    // No padding token named: the end-of-text token, by its id in the encoder's config.
    let pad = match &named_pad {
        Some(token) => Pad::Token(token),
        None => Pad::Id(config.eos_token_id as u32),
    };
    TextTokenizer::from_json(
        &json,
        &path.display().to_string(),
        config.max_position_embeddings,
        pad,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::RandomInit;

    fn tiny() -> ClipTextConfig {
        let mut c: ClipTextConfig = serde_json::from_str("{}").unwrap();
        (c.vocab_size, c.hidden_size, c.intermediate_size) = (50, 16, 24);
        (
            c.num_hidden_layers,
            c.num_attention_heads,
            c.max_position_embeddings,
        ) = (2, 2, 8);
        (c.bos_token_id, c.eos_token_id) = (48, 49);
        c
    }

    #[test]
    fn names_round_trip_and_padding_does_not_reach_the_text() {
        let device = crate::device::cpu();
        let config = tiny();
        let model = config.build(&mut RandomInit::new(3, &device)).unwrap();
        let sd = model.state_dict().0;
        let back = config.load(sd.clone(), Path::new("mem"), &device).unwrap();
        assert_eq!(back.state_dict().0, sd);

        // The same caption padded with two different tokens: the text's states and the pooled
        // state do not move (causal attention, padding keys hidden).
        let ids = |pad: i64| Tensor::<2, Int>::from_ints([[48, 5, 7, 49, pad, pad, pad, pad]], &device);
        let mask = Tensor::<2>::from_floats([[1., 1., 1., 1., 0., 0., 0., 0.]], &device);
        let a = model.forward(ids(49), mask.clone());
        let b = model.forward(ids(3), mask);
        let text = |e: &TextEncoding| HostTensor::from_tensor(e.tokens.clone().narrow(1, 0, 4)).data;
        assert_eq!(text(&a), text(&b));
        assert_eq!(
            HostTensor::from_tensor(a.pooled.clone()).data,
            HostTensor::from_tensor(a.tokens.narrow(1, 3, 1).reshape([1, 16])).data
        );
    }

    /// A whole `CLIPModel` saved by transformers 4: `text_model.`-prefixed names beside a vision
    /// tower and projections, the text config nested. The text encoder's tensors come out under
    /// ddm's names; the rest is left out; another model type is refused by name.
    #[test]
    fn reads_the_text_half_of_a_clip_model() {
        let device = crate::device::cpu();
        let dir = tempfile::tempdir().unwrap();
        let config = tiny();
        let sd = config
            .build(&mut RandomInit::new(4, &device))
            .unwrap()
            .state_dict()
            .0;
        let mut saved: BTreeMap<String, HostTensor> = sd
            .iter()
            .map(|(k, v)| (format!("text_model.{k}"), v.clone()))
            .collect();
        for name in [
            "vision_model.embeddings.patch_embedding.weight",
            "text_projection.weight",
            "logit_scale",
        ] {
            saved.insert(name.into(), HostTensor::new(vec![2], vec![0.5, 1.5]));
        }
        crate::host::write_tensors(&dir.path().join(TRANSFORMERS_WEIGHTS), &saved, &BTreeMap::new()).unwrap();
        let text_config = serde_json::to_value(&config).unwrap();
        let write_config =
            |v: serde_json::Value| std::fs::write(dir.path().join("config.json"), v.to_string()).unwrap();
        write_config(serde_json::json!({"model_type": "clip", "text_config": text_config}));
        let (read, tensors) = read_transformers(dir.path()).unwrap();
        assert_eq!((read, tensors), (config, sd));

        write_config(serde_json::json!({"model_type": "t5"}));
        let err = read_transformers(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("config.json") && err.contains("model_type `t5`"),
            "{err}"
        );
    }

    #[test]
    fn bad_configs_are_named() {
        let mut c = tiny();
        c.hidden_act = "relu".into();
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("hidden_act `relu`")
        );
        let mut c = tiny();
        c.num_attention_heads = 3;
        assert!(c.validate().unwrap_err().to_string().contains("3 heads"));
    }
}

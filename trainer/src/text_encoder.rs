//! The text-encoder task (`ddm train-text-encoder`): a CLIP text tower trained from scratch,
//! contrastively, on captioned images, for users (and ddm's own text demo) who have captions but
//! no pretrained encoder. CLIP's objective: a batch of B (image, caption) pairs, both sides
//! projected to a shared space and L2-normalised, cosine similarities divided by a temperature;
//! the loss is the symmetric cross-entropy of finding each image's caption among the B captions
//! and each caption's image among the B images.
//!
//! The text side is transformers' `CLIPTextModel` ([`ddm_core::clip`]) over a word-level tokenizer
//! of the captions' vocabulary; the image side is a small MLP on the pixels, used only here. The
//! checkpoint written at the end holds the text tower and its tokenizer: a text encoder like an
//! imported one (`ddm encode-text --encoder`), whose pooled vector is the end-of-text state.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use ddm_core::burn;
use ddm_core::burn::nn::Linear;
use ddm_core::burn::prelude::*;
use ddm_core::burn::tensor::activation::gelu;
use ddm_core::checkpoint::{Checkpoint, CheckpointMeta, TrainingSummary};
use ddm_core::clip::{ClipTextConfig, ClipTextModel};
use ddm_core::host::HostTensor;
use ddm_core::model::ModelConfig;
use ddm_core::params::{Init, ParamSource};
use ddm_core::tokenizer::{TextTokenizer, TokenBatch};
use ddm_datasets::Dataset;
use rand_chacha::ChaCha8Rng;

use crate::config::TrainConfig;
use crate::router::cross_entropy;
use crate::task::{Batch, Net, Task, TrainData};

pub const TEXT_ENCODER_FILE: &str = "text-encoder.safetensors";
/// `--model` for a text encoder: `clip:WIDTH:LAYERS:HEADS`.
pub const DEFAULT_MODEL: &str = "clip:128:2:4";
/// CLIP's initial temperature, kept fixed: similarities are divided by it.
pub const TEMPERATURE: f64 = 0.07;

/// The text tower's config for `clip:WIDTH:LAYERS:HEADS` over `tokenizer`'s vocabulary and length
/// (MLP 4 x WIDTH, CLIP's quick GELU; start, end of text and padding as [`ddm_core::tokenizer::word_level`]
/// numbers them).
pub fn text_config(model: &str, tokenizer: &TextTokenizer) -> anyhow::Result<ClipTextConfig> {
    let parts: Vec<&str> = model.split(':').collect();
    let nums: Option<Vec<usize>> = parts[1..].iter().map(|s| s.parse().ok()).collect();
    let (width, layers, heads) = match (parts.first(), nums.as_deref()) {
        (Some(&"clip"), Some(&[w, l, h])) => (w, l, h),
        _ => bail!(
            "--model {model}: a text encoder is `clip:WIDTH:LAYERS:HEADS` (e.g. {DEFAULT_MODEL}: a CLIP text \
             tower of WIDTH channels, LAYERS blocks, HEADS attention heads)"
        ),
    };
    let mut c: ClipTextConfig = serde_json::from_str("{}").expect("transformers' defaults");
    c.vocab_size = tokenizer.vocab_size();
    (c.hidden_size, c.intermediate_size) = (width, 4 * width);
    (c.num_hidden_layers, c.num_attention_heads) = (layers, heads);
    c.max_position_embeddings = tokenizer.length();
    (c.bos_token_id, c.eos_token_id, c.pad_token_id) = (0, 1, 1);
    c.validate().with_context(|| format!("--model {model}"))?;
    Ok(c)
}

/// The two towers CLIP trains together.
#[derive(Module, Debug)]
pub struct ContrastivePair {
    text: ClipTextModel,
    /// Pooled text state `[B, D]` -> the shared space `[B, D]`.
    text_projection: Linear,
    /// Pixels `[B, X]` -> `[B, 4D]` -> the shared space `[B, D]`.
    image_fc1: Linear,
    image_fc2: Linear,
}

impl Net for ContrastivePair {
    fn state_dict(&self) -> BTreeMap<String, HostTensor> {
        let mut sd = self.text.state_dict();
        sd.linear("text_projection", &self.text_projection);
        sd.linear("image_tower.fc1", &self.image_fc1);
        sd.linear("image_tower.fc2", &self.image_fc2);
        sd.0
    }
}

/// Rows scaled to unit length.
///
/// # Shapes
/// - `x`: `[B, D]` -> `[B, D]`
fn unit_rows(x: Tensor<2>) -> Tensor<2> {
    let norm = (x.clone() * x.clone()).sum_dim(1).sqrt().clamp_min(1e-6); // [B, 1]
    x / norm
}

impl ContrastivePair {
    /// Cosine similarities of every image with every caption, over the temperature.
    ///
    /// # Shapes
    /// - `x`: `[B, X]`, `ids` and `mask`: `[B, L]` -> `[B (images), B (captions)]`
    fn logits(&self, x: Tensor<2>, ids: Tensor<2, Int>, mask: Tensor<2>) -> Tensor<2> {
        let text = self.text_projection.forward(self.text.forward(ids, mask).pooled); // [B, D]
        let image = self.image_fc2.forward(gelu(self.image_fc1.forward(x))); // [B, D]
        unit_rows(image).matmul(unit_rows(text).transpose()) / TEMPERATURE
    }
}

/// Train a text encoder on `data`'s images and their `captions` (caption i describes sample i).
pub struct TextEncoderTask {
    pub data: Dataset,
    pub captions: Vec<String>,
    pub tokenizer: TextTokenizer,
    /// Every caption's ids and mask, tokenized once.
    tokens: TokenBatch,
}

impl TextEncoderTask {
    pub fn new(data: Dataset, captions: Vec<String>, tokenizer: TextTokenizer) -> anyhow::Result<Self> {
        if captions.len() != data.len() {
            bail!(
                "{} captions for {} samples of {}: one caption per sample, in order",
                captions.len(),
                data.len(),
                data.name
            );
        }
        let tokens = tokenizer.encode(&captions)?;
        Ok(Self {
            data,
            captions,
            tokenizer,
            tokens,
        })
    }

    /// The ids `[B, L]` and mask `[B, L]` of captions `rows`.
    fn gather(&self, rows: &[u32], device: &Device) -> (Tensor<2, Int>, Tensor<2>) {
        let l = self.tokens.length;
        let mut batch = TokenBatch {
            ids: Vec::with_capacity(rows.len() * l),
            mask: Vec::with_capacity(rows.len() * l),
            n: rows.len(),
            length: l,
        };
        for &r in rows {
            let span = r as usize * l..(r as usize + 1) * l;
            batch.ids.extend_from_slice(&self.tokens.ids[span.clone()]);
            batch.mask.extend_from_slice(&self.tokens.mask[span]);
        }
        batch.to_tensors(device)
    }
}

impl Task for TextEncoderTask {
    type Net = ContrastivePair;

    fn name(&self) -> String {
        "text-encoder".into()
    }

    /// The samples, each batch row's target its caption's index; the fingerprint covers the
    /// captions too (a resumed run must see the same ones).
    fn data(&self) -> anyhow::Result<TrainData> {
        let mut h = ddm_core::digest::Sha256Stream::default();
        h.update(self.data.fingerprint().as_bytes());
        for c in &self.captions {
            h.update(c.as_bytes());
            h.update(b"\n");
        }
        Ok(TrainData {
            data: self.data.clone(),
            targets: Some((0..self.data.len() as u32).collect()),
            fingerprint: h.finish(),
        })
    }

    fn net_config(&self, config: &TrainConfig, _data: &Dataset) -> anyhow::Result<ModelConfig> {
        Ok(ModelConfig::ClipText(text_config(
            &config.model,
            &self.tokenizer,
        )?))
    }

    fn build(&self, net: &ModelConfig, src: &mut impl ParamSource) -> anyhow::Result<ContrastivePair> {
        let ModelConfig::ClipText(c) = net else {
            bail!("a text-encoder task cannot train a {}", net.arch());
        };
        let d = c.hidden_size;
        Ok(ContrastivePair {
            text: c.build(src)?,
            text_projection: src.linear("text_projection", d, d, Init::Xavier)?,
            image_fc1: src.linear("image_tower.fc1", self.data.sample_size(), 4 * d, Init::Xavier)?,
            image_fc2: src.linear("image_tower.fc2", 4 * d, d, Init::Xavier)?,
        })
    }

    /// # Shapes
    /// - `batch.x0`: `[B, X]`, `batch.targets`: B caption indices -> `[1]`
    fn loss(
        &self,
        net: &ContrastivePair,
        batch: Batch<'_>,
        _config: &TrainConfig,
        _net_config: &ModelConfig,
        _rng: &mut ChaCha8Rng,
    ) -> anyhow::Result<Tensor<1>> {
        let rows = batch
            .targets
            .context("text-encoder batches carry caption indices")?;
        let (ids, mask) = self.gather(rows, &batch.x0.device());
        let logits = net.logits(batch.x0, ids, mask); // [B, B]: row i's match is column i
        let diagonal: Vec<u32> = (0..rows.len() as u32).collect();
        let images_to_captions = cross_entropy(logits.clone(), &diagonal);
        let captions_to_images = cross_entropy(logits.transpose(), &diagonal);
        Ok((images_to_captions + captions_to_images) / 2.0)
    }

    fn finish(
        &self,
        out: &Path,
        ema: &ContrastivePair,
        _net_config: &ModelConfig,
        summary: TrainingSummary,
        data: &TrainData,
    ) -> anyhow::Result<PathBuf> {
        let accuracy = retrieval_accuracy(self, ema, &data.data)?;
        let mut meta = CheckpointMeta::text_encoder(ema.text.config().clone(), self.tokenizer.to_json()?);
        meta.source = Some(format!(
            "ddm train-text-encoder on {} and {} captions (contrastive, temperature {TEMPERATURE})",
            data.data.name,
            self.captions.len()
        ));
        meta.extra.insert("retrieval_top1".into(), accuracy.into());
        meta.training = Some(summary);
        let path = out.join(TEXT_ENCODER_FILE);
        Checkpoint {
            meta,
            tensors: ema.text.state_dict().0,
        }
        .save(&path)?;
        tracing::info!(
            "caption -> image retrieval among 256 training pairs: top-1 {:.1}% (chance {:.1}%)",
            100.0 * accuracy,
            100.0 / 256.0
        );
        Ok(path)
    }
}

/// Over evenly spaced groups of 256 training pairs (up to 8): how often a caption's most similar
/// image in its group is its own.
pub fn retrieval_accuracy(
    task: &TextEncoderTask,
    net: &ContrastivePair,
    data: &Dataset,
) -> anyhow::Result<f64> {
    let device = net
        .devices()
        .first()
        .cloned()
        .unwrap_or_else(ddm_core::device::cpu);
    let group = 256.min(data.len());
    let groups = (data.len() / group).min(8);
    let (mut hits, mut total) = (0usize, 0usize);
    for g in 0..groups {
        let rows: Vec<u32> = (0..group)
            .map(|i| ((g * data.len() / groups) + i) as u32)
            .collect();
        let idx: Vec<usize> = rows.iter().map(|&r| r as usize).collect();
        let x = HostTensor::new(vec![group, data.sample_size()], data.gather(&idx)).to_tensor::<2>(&device);
        let (ids, mask) = task.gather(&rows, &device);
        let best = net.logits(x, ids, mask).transpose().argmax(1); // [B, 1]: each caption's image
        let best: Vec<i64> = best.into_data().convert::<i64>().iter::<i64>().collect();
        hits += best.iter().enumerate().filter(|&(i, &j)| i as i64 == j).count();
        total += group;
    }
    Ok(hits as f64 / total.max(1) as f64)
}

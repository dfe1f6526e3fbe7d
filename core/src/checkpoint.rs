//! The checkpoint file (a contract; see docs/ARCHITECTURE.md): one `.safetensors` file holding the model's
//! tensors under PyTorch DiT names, with a JSON document under the header's `__metadata__` key
//! `ddm` that says what the model is, what data it models and where it came from.
//!
//! Integrity: the metadata carries the sha256 of the data section, checked on every read, so a
//! flipped bit anywhere in the weights is an error rather than a silently wrong model. A truncated
//! file, a damaged header, missing, extra or mis-shaped tensors and an unknown format version are
//! errors that name the file. Writes are atomic.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use burn::prelude::*;
use serde::{Deserialize, Serialize};

use crate::clip::{ClipTextConfig, ClipTextModel, TextSpace};
use crate::error::{Error, Result};
use crate::flow::DdpmSchedule;
use crate::host::{HostTensor, TensorFile};
use crate::model::{Model, ModelConfig};
use crate::tokenizer::{Pad, TextTokenizer};
use crate::vae::{AutoencoderKL, LatentSpace};

/// The checkpoint format this build writes. Version 3 seals the whole file: the metadata carries
/// its own seal (`sha256_of_the_rest`), the sha256 of the data section (`tensors_sha256`) and of
/// the header's tensor table (`table_sha256`: which name points at which bytes), and all three are
/// required. Version 2 sealed the metadata but not the table; version 1 may carry no seal at all.
/// Older files are read (they verify as far as their format goes, and [`Checkpoint::sealed`] says
/// whether that is the whole file); a registry accepts only whole seals (`ddm import --from ddm`
/// re-seals an older file); a format-1 file without any seal is refused (`ddm import --from ddm
/// --trust-unsealed` re-seals one the user trusts). Requiring each seal by version means a damaged seal cannot pass for
/// an absent one (a fuzzed training state did exactly that).
pub const FORMAT_VERSION: u32 = 3;
/// The oldest format this build reads.
pub const OLDEST_FORMAT_VERSION: u32 = 1;
/// The most clusters (islands) a partition, a router or a registry may have.
pub const MAX_CLUSTERS: usize = 4096;

/// Cluster priors w_k as every file that carries them must hold them: K of them (1 <= K <=
/// [`MAX_CLUSTERS`]), each finite and in [0, 1], summing to 1.
pub fn check_priors(priors: &[f64]) -> std::result::Result<(), String> {
    if priors.is_empty() || priors.len() > MAX_CLUSTERS {
        return Err(format!("{} priors: expected 1 ..= {MAX_CLUSTERS}", priors.len()));
    }
    if let Some(p) = priors
        .iter()
        .find(|p| !(p.is_finite() && (0.0..=1.0).contains(*p)))
    {
        return Err(format!("a prior of {p}: each must be in [0, 1]"));
    }
    let sum: f64 = priors.iter().sum();
    if (sum - 1.0).abs() > 1e-6 {
        return Err(format!("the priors sum to {sum}, not 1"));
    }
    Ok(())
}

/// A data value range as files carry it: finite, low below high.
pub fn check_range(range: [f32; 2]) -> std::result::Result<(), String> {
    if !(range[0].is_finite() && range[1].is_finite() && range[0] < range[1]) {
        return Err(format!(
            "value range {range:?}: expected two finite numbers, low below high"
        ));
    }
    Ok(())
}

/// The `__metadata__` key holding ddm's JSON.
pub const METADATA_KEY: &str = "ddm";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Expert,
    Router,
    /// The image classifier whose features `ddm eval` measures samples in.
    Classifier,
    /// The VAE whose latents experts are trained on (`ddm train-autoencoder`, `ddm import --from
    /// diffusers-vae`).
    Autoencoder,
    /// The text encoder captions go through (`ddm import --from transformers-clip`), with its
    /// tokenizer.
    #[serde(rename = "text-encoder")]
    TextEncoder,
}

impl std::fmt::Display for Role {
    /// The role as ddm names it in files (`expert`, `router`, `classifier`, `autoencoder`).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Expert => "expert",
            Role::Router => "router",
            Role::Classifier => "classifier",
            Role::Autoencoder => "autoencoder",
            Role::TextEncoder => "text-encoder",
        })
    }
}

/// What the network predicts.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Objective {
    /// The flow-matching velocity e - x0 (ddm's native objective).
    Velocity,
    /// DDPM noise prediction; converted to velocity at inference (`flow::EpsilonToVelocity`).
    Epsilon { schedule: DdpmSchedule },
}

impl std::fmt::Display for Objective {
    /// `velocity`, `epsilon (DDPM linear betas 0.0001..0.02 over 1000 steps)`, `epsilon (cosine
    /// schedule, s = 0.008)`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Objective::Velocity => write!(f, "velocity"),
            Objective::Epsilon {
                schedule:
                    DdpmSchedule::Linear {
                        beta_start,
                        beta_end,
                        steps,
                    },
            } => write!(
                f,
                "epsilon (DDPM linear betas {beta_start}..{beta_end} over {steps} steps)"
            ),
            Objective::Epsilon {
                schedule: DdpmSchedule::Cosine { s },
            } => write!(f, "epsilon (cosine schedule, s = {s})"),
        }
    }
}

/// The data a model was trained on: per-sample shape and value range.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataSpec {
    /// Per-sample shape, e.g. `[1, 28, 28]` or `[2]`.
    pub shape: Vec<usize>,
    /// Value range of the data the model saw (images: [-1, 1]).
    pub range: [f32; 2],
}

impl std::fmt::Display for DataSpec {
    /// `samples of shape [1, 28, 28] in [-1, 1]`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "samples of shape {:?} in [{}, {}]",
            self.shape, self.range[0], self.range[1]
        )
    }
}

/// How a checkpoint was trained (filled by the trainer).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingSummary {
    pub steps: u64,
    pub samples_seen: u64,
    /// Estimated training FLOPs (forward + backward ~ 3x forward).
    pub flops: f64,
    pub seed: u64,
    pub wall_time_s: f64,
    pub final_loss: Option<f64>,
    pub backend: String,
    /// EMA decay of the weights stored, if they are an EMA.
    pub ema: Option<f64>,
}

/// The `ddm` metadata document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointMeta {
    pub format_version: u32,
    pub role: Role,
    pub model: ModelConfig,
    pub data: DataSpec,
    pub objective: Objective,
    /// Fingerprint of the partition the model was trained on (None: not from a partition).
    #[serde(default)]
    pub partition: Option<String>,
    /// The cluster k an expert was trained on.
    #[serde(default)]
    pub cluster: Option<usize>,
    /// A router's K.
    #[serde(default)]
    pub num_clusters: Option<usize>,
    /// A router's cluster priors w_k.
    #[serde(default)]
    pub priors: Option<Vec<f64>>,
    /// The latent space a model was trained in (None: pixel space or plain vectors).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latent: Option<LatentSpace>,
    /// A router conditioned on per-sample conditioning vectors: their length (the data's `c`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub condition_dim: Option<usize>,
    /// A router conditioned on per-sample token sequences (a caption's token states): their
    /// width Dt (the data's `c_tokens`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub condition_token_dim: Option<usize>,
    /// The text space of the conditioning vectors a model reads (which encoder made them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<TextSpace>,
    /// A text encoder's tokenizer: the `tokenizer.json` text, its padding and length set (sealed
    /// with the rest of the file, so the ids a caption becomes cannot drift from the weights).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer: Option<String>,
    #[serde(default)]
    pub training: Option<TrainingSummary>,
    /// Free-form provenance, e.g. "imported from PyTorch weights x.safetensors".
    #[serde(default)]
    pub source: Option<String>,
    /// Further facts about the model (e.g. a router's FLOPs as a fraction of one expert's).
    #[serde(default)]
    pub extra: BTreeMap<String, serde_json::Value>,
    /// sha256 (hex) of the file's data section; written by [`Checkpoint::save`].
    #[serde(default)]
    pub tensors_sha256: String,
    /// sha256 (hex) of the header's tensor table ([`crate::host::table_sha256`]); written by
    /// [`Checkpoint::save`] (format 3 on).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub table_sha256: String,
}

impl CheckpointMeta {
    /// Whether the recorded values are usable: a valid model, a finite data range, priors that
    /// are a distribution, K and the cluster in range, the data shape the model's.
    fn check_values(&self) -> std::result::Result<(), String> {
        self.model.validate().map_err(|e| format!("model: {e}"))?;
        check_range(self.data.range).map_err(|e| format!("data: {e}"))?;
        if let Some(p) = &self.priors {
            check_priors(p).map_err(|e| format!("priors: {e}"))?;
        }
        if let Some(k) = self.num_clusters.filter(|&k| k == 0 || k > MAX_CLUSTERS) {
            return Err(format!("num_clusters {k}: expected 1 ..= {MAX_CLUSTERS}"));
        }
        if let Some(c) = self.cluster.filter(|&c| c >= MAX_CLUSTERS) {
            return Err(format!("cluster {c}: expected 0 ..= {}", MAX_CLUSTERS - 1));
        }
        if self.data.shape != self.model.data_shape() {
            return Err(format!(
                "data shape {:?} does not match the model's {:?}",
                self.data.shape,
                self.model.data_shape()
            ));
        }
        let is_text_encoder = matches!(self.model, ModelConfig::ClipText(_));
        if (self.role == Role::TextEncoder) != is_text_encoder {
            return Err(format!(
                "role {} with a model of arch {}",
                self.role,
                self.model.arch()
            ));
        }
        if (self.role == Role::TextEncoder) != self.tokenizer.is_some() {
            return Err(match self.tokenizer {
                None => "a text encoder without its tokenizer".into(),
                Some(_) => format!("a tokenizer in a checkpoint of role {}", self.role),
            });
        }
        Ok(())
    }

    /// Metadata for an expert with no partition or training history yet.
    pub fn expert(model: ModelConfig, range: [f32; 2], objective: Objective) -> Self {
        Self::new(Role::Expert, model, range, objective)
    }

    /// Metadata for the router of partition `partition` (K = `priors.len()` clusters with these
    /// priors w_k). A router predicts cluster logits; `objective` is not read for it.
    pub fn router(model: ModelConfig, range: [f32; 2], partition: &str, priors: Vec<f64>) -> Self {
        let mut m = Self::new(Role::Router, model, range, Objective::Velocity);
        m.partition = Some(partition.to_string());
        m.num_clusters = Some(priors.len());
        m.priors = Some(priors);
        m
    }

    /// Metadata for an image classifier (the feature space of `ddm eval`); `objective` is not read
    /// for it.
    pub fn classifier(model: ModelConfig, range: [f32; 2]) -> Self {
        Self::new(Role::Classifier, model, range, Objective::Velocity)
    }

    /// Metadata for a text encoder with its tokenizer (a `tokenizer.json` text); the data it reads
    /// are token ids.
    pub fn text_encoder(config: ClipTextConfig, tokenizer: String) -> Self {
        let range = [0.0, config.vocab_size as f32];
        let mut m = Self::new(
            Role::TextEncoder,
            ModelConfig::ClipText(config),
            range,
            Objective::Velocity,
        );
        m.tokenizer = Some(tokenizer);
        m
    }

    /// Metadata for a VAE (`model` is `ModelConfig::Vae`) of images in `range`.
    pub fn autoencoder(model: ModelConfig, range: [f32; 2]) -> Self {
        Self::new(Role::Autoencoder, model, range, Objective::Velocity)
    }

    fn new(role: Role, model: ModelConfig, range: [f32; 2], objective: Objective) -> Self {
        Self {
            format_version: FORMAT_VERSION,
            role,
            data: DataSpec {
                shape: model.data_shape(),
                range,
            },
            model,
            objective,
            partition: None,
            cluster: None,
            num_clusters: None,
            priors: None,
            training: None,
            source: None,
            extra: BTreeMap::new(),
            condition_dim: None,
            condition_token_dim: None,
            latent: None,
            text: None,
            tokenizer: None,
            tensors_sha256: String::new(),
            table_sha256: String::new(),
        }
    }
}

/// A checkpoint in memory: metadata and named tensors.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub meta: CheckpointMeta,
    pub tensors: BTreeMap<String, HostTensor>,
}

impl Checkpoint {
    pub fn from_model(model: &Model, meta: CheckpointMeta) -> Self {
        Self {
            meta,
            tensors: model.state_dict(),
        }
    }

    /// Serialise with the data-section checksum filled in.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let no_ints = BTreeMap::new();
        // The data section does not depend on the metadata, so hash it from a first pass.
        let first = crate::host::to_safetensors_bytes(&self.tensors, &no_ints, None)?;
        let mut meta = self.meta.clone();
        meta.tensors_sha256 = crate::digest::sha256_hex(crate::host::data_section(&first));
        // The table, like the data, does not depend on the metadata (offsets count from the data
        // section's start).
        meta.table_sha256 = crate::host::table_sha256_of(&first)?;
        let json = crate::json::to_string("the checkpoint's metadata", &meta)?;
        // The metadata's own checksum, over the JSON exactly as written (sealed into it: one
        // metadata key keeps the file's bytes deterministic): an edit of the header (a cluster id,
        // a partition) is caught like a flipped weight.
        let json = crate::digest::seal_json(&json, &crate::digest::sha256_hex(json.as_bytes()));
        let md = HashMap::from([(METADATA_KEY.to_string(), json)]);
        crate::host::to_safetensors_bytes(&self.tensors, &no_ints, Some(md))
    }

    /// Write atomically (temp file, fsync, rename).
    pub fn save(&self, path: &Path) -> Result<()> {
        let bytes = self.to_bytes()?;
        crate::fsio::write_bytes_atomic(path, &bytes)
    }

    /// Read and verify a checkpoint: header, metadata version, checksum.
    pub fn read(path: &Path) -> Result<Self> {
        let file = TensorFile::read(path)?;
        Self::from_file(file)
    }

    /// Parse and verify a file read already: every seal its format has (a format-1 file without
    /// a seal is refused: nothing in it can be verified).
    pub fn from_file(file: TensorFile) -> Result<Self> {
        Self::parse(file, false)
    }

    /// [`Checkpoint::from_file`], accepting a format-1 file without a seal (for re-sealing a file
    /// the user trusts: `ddm import --from ddm --trust-unsealed`).
    pub fn from_unsealed_file(file: TensorFile) -> Result<Self> {
        Self::parse(file, true)
    }

    fn parse(file: TensorFile, allow_unsealed: bool) -> Result<Self> {
        let path = file.path.clone();
        let json = file
            .metadata
            .get(METADATA_KEY)
            .ok_or_else(|| Error::MissingMetadata { path: path.clone() })?;
        let bad = |reason: String| Error::BadMetadata {
            path: path.clone(),
            reason,
        };
        let value: serde_json::Value =
            serde_json::from_str(json).map_err(|e| bad(format!("not JSON: {e}")))?;
        let version = value
            .get("format_version")
            .and_then(|v| v.as_u64())
            .ok_or_else(|| bad("no format_version".into()))?;
        if !(OLDEST_FORMAT_VERSION as u64..=FORMAT_VERSION as u64).contains(&version) {
            return Err(Error::UnsupportedVersion {
                path,
                found: version,
                supported: FORMAT_VERSION,
            });
        }
        let meta: CheckpointMeta = serde_json::from_value(value).map_err(|e| bad(e.to_string()))?;
        // Version 1 may predate the metadata checksum; from version 2 it is required.
        match crate::digest::unseal_json(json) {
            Some((body, want)) => {
                let own = crate::digest::sha256_hex(body.as_bytes());
                if own != want {
                    return Err(bad(format!(
                        "the metadata hashes to {own}, but records {want}: the header was edited after it was written"
                    )));
                }
            }
            None if version >= 2 => {
                return Err(bad(
                    "the metadata's checksum (`sha256_of_the_rest`, its last field) is missing or damaged"
                        .into(),
                ));
            }
            None if !allow_unsealed => {
                return Err(bad(
                    "a format-1 checkpoint without a seal: its metadata cannot be verified; re-seal a file you trust with `ddm import --from ddm FILE --trust-unsealed --out NEW`"
                        .into(),
                ));
            }
            None => {}
        }
        let actual = crate::digest::sha256_hex(file.data_bytes());
        if actual != meta.tensors_sha256 {
            return Err(Error::Checksum {
                path,
                expected: meta.tensors_sha256,
                actual,
            });
        }
        let table = file.table_sha256();
        match meta.table_sha256.as_str() {
            "" if version >= 3 => {
                return Err(bad(
                    "the tensor table's checksum (`table_sha256`) is missing".into()
                ));
            }
            "" => {}
            want if want != table => {
                return Err(bad(format!(
                    "the tensor table hashes to {table}, but records {want}: which name points at which bytes was edited after it was written"
                )));
            }
            _ => {}
        }
        meta.check_values().map_err(bad)?;
        let mut tensors = BTreeMap::new();
        for name in file.names() {
            let t = file.f32(name)?;
            // A model with NaN or infinite weights answers NaN: refused here, for every use.
            let count = t.data.iter().filter(|v| !v.is_finite()).count();
            if count > 0 {
                return Err(Error::NonFinite {
                    path,
                    name: name.to_string(),
                    count,
                });
            }
            tensors.insert(name.to_string(), t);
        }
        Ok(Self { meta, tensors })
    }

    /// Whether the file's seal covers all of it (format 3 on): metadata, tensor table and data.
    /// Older formats verify only what their seal covered.
    pub fn sealed(&self) -> bool {
        self.meta.format_version >= 3
    }

    /// Build the VAE a `Role::Autoencoder` checkpoint holds, checking every tensor name and shape.
    pub fn autoencoder(&self, path: &Path, device: &Device) -> Result<AutoencoderKL> {
        let ModelConfig::Vae(config) = &self.meta.model else {
            return Err(Error::BadMetadata {
                path: path.to_path_buf(),
                reason: format!(
                    "holds a model of role {} ({}), not an autoencoder",
                    self.meta.role,
                    self.meta.model.arch()
                ),
            });
        };
        config.load(self.tensors.clone(), path, device)
    }

    /// Build the text encoder and tokenizer a `Role::TextEncoder` checkpoint holds.
    pub fn text_encoder(&self, path: &Path, device: &Device) -> Result<(ClipTextModel, TextTokenizer)> {
        let bad = |reason: String| Error::BadMetadata {
            path: path.to_path_buf(),
            reason,
        };
        let (ModelConfig::ClipText(config), Some(json)) = (&self.meta.model, &self.meta.tokenizer) else {
            return Err(bad(format!(
                "holds a model of role {} ({}), not a text encoder",
                self.meta.role,
                self.meta.model.arch()
            )));
        };
        let origin = format!("{}: its tokenizer", path.display());
        // The stored tokenizer sets its own padding; the end-of-text id is the fallback.
        let pad = Pad::Id(config.eos_token_id as u32);
        let tokenizer = TextTokenizer::from_json(json, &origin, config.max_position_embeddings, pad)?;
        Ok((config.load(self.tensors.clone(), path, device)?, tokenizer))
    }

    /// The text space of the encoder this checkpoint holds (its tensors' sha256 names it).
    pub fn text_space(&self) -> Option<TextSpace> {
        match &self.meta.model {
            ModelConfig::ClipText(c) => Some(TextSpace::of(c, &self.meta.tensors_sha256)),
            _ => None,
        }
    }

    /// The latent space of the VAE this checkpoint holds (its tensors' sha256 names it).
    pub fn latent_space(&self) -> Option<LatentSpace> {
        match &self.meta.model {
            ModelConfig::Vae(c) => Some(LatentSpace::of(c, &self.meta.tensors_sha256)),
            _ => None,
        }
    }

    /// Build the model on `device`, checking every tensor name and shape. `path` is named in errors.
    pub fn model(&self, path: &Path, device: &Device) -> Result<Model> {
        self.meta.model.load(self.tensors.clone(), path, device)
    }
}

/// Read a checkpoint and build its model in one go.
pub fn load(path: &Path, device: &Device) -> Result<(CheckpointMeta, Model)> {
    let ckpt = Checkpoint::read(path)?;
    let model = ckpt.model(path, device)?;
    Ok((ckpt.meta, model))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dit::DiTConfig;
    use crate::flow::VelocityField;

    fn setup() -> (tempfile::TempDir, std::path::PathBuf, Checkpoint, Model, Device) {
        let device = crate::device::cpu();
        let mut dit = DiTConfig::named("DiT-T/4", 8, 1).unwrap();
        dit.depth = 2;
        let config = ModelConfig::Dit(dit);
        // Give the zero-initialised layers values too, so outputs are non-trivial.
        let mut sd = config.init(3, &device).unwrap().state_dict();
        for (i, t) in sd.values_mut().enumerate() {
            for (j, v) in t.data.iter_mut().enumerate() {
                *v += 0.01 * (((i * 31 + j * 17) % 13) as f32 - 6.0);
            }
        }
        let model = config.load(sd, Path::new("mem"), &device).unwrap();
        let ckpt = Checkpoint::from_model(
            &model,
            CheckpointMeta::expert(config, [-1.0, 1.0], Objective::Velocity),
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("expert.safetensors");
        ckpt.save(&path).unwrap();
        (dir, path, ckpt, model, device)
    }

    #[test]
    fn an_edited_header_is_caught() {
        let (dir, _path, mut ckpt, _model, _device) = setup();
        ckpt.meta.cluster = Some(1);
        let bytes = ckpt.to_bytes().unwrap();
        let p = dir.path().join("edited.safetensors");
        // One byte of the header: the cluster id 1 -> 2 (the tensors and their checksum unchanged).
        let at = bytes.windows(7).position(|w| w == b"cluster").unwrap();
        let digit = at + bytes[at..].iter().position(|&b| b == b'1').unwrap();
        let mut raw = bytes.clone();
        raw[digit] = b'2';
        std::fs::write(&p, &raw).unwrap();
        let e = Checkpoint::read(&p).unwrap_err().to_string();
        assert!(
            e.contains("edited.safetensors") && e.contains("header was edited"),
            "{e}"
        );
        // Unedited, it reads back.
        std::fs::write(&p, &bytes).unwrap();
        assert_eq!(Checkpoint::read(&p).unwrap().meta.cluster, Some(1));
    }

    /// The file's header with `edit` applied to its JSON (tensor table and metadata), the data
    /// section unchanged.
    fn edit_header(bytes: &[u8], edit: impl FnOnce(&mut serde_json::Value)) -> Vec<u8> {
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
        edit(&mut header);
        let h = header.to_string().into_bytes();
        [
            (h.len() as u64).to_le_bytes().to_vec(),
            h,
            bytes[8 + n..].to_vec(),
        ]
        .concat()
    }

    #[test]
    fn an_edited_tensor_table_is_caught() {
        let (dir, path, ..) = setup();
        let bytes = std::fs::read(&path).unwrap();
        // Two tensors of one shape swap their bytes: the data, its checksum and the metadata are
        // unchanged, the model is not.
        let swapped = edit_header(&bytes, |h| {
            let a = h["blocks.0.attn.proj.weight"]["data_offsets"].clone();
            let b = h["blocks.1.attn.proj.weight"]["data_offsets"].clone();
            h["blocks.0.attn.proj.weight"]["data_offsets"] = b;
            h["blocks.1.attn.proj.weight"]["data_offsets"] = a;
        });
        let p = dir.path().join("swapped.safetensors");
        std::fs::write(&p, &swapped).unwrap();
        let e = Checkpoint::read(&p).unwrap_err().to_string();
        assert!(
            e.contains("swapped.safetensors") && e.contains("tensor table"),
            "{e}"
        );

        // Re-labelled as format 2 (whose seal did not cover the table): the seal catches it; with
        // the seal removed too, so does the format (2 requires a seal).
        let relabel = |keep_seal: bool| {
            edit_header(&swapped, |h| {
                let json = h["__metadata__"]["ddm"].as_str().unwrap().to_string();
                let (body, sha) = crate::digest::unseal_json(&json).unwrap();
                let body = body.replace("\"format_version\":3", "\"format_version\":2");
                let json = if keep_seal {
                    crate::digest::seal_json(&body, &sha)
                } else {
                    body
                };
                h["__metadata__"]["ddm"] = json.into();
            })
        };
        for (keep, says) in [(true, "header was edited"), (false, "missing or damaged")] {
            std::fs::write(&p, relabel(keep)).unwrap();
            let e = Checkpoint::read(&p).unwrap_err().to_string();
            assert!(e.contains(says), "{e}");
        }
        // A format-1 file without a seal is refused, unless asked for (to re-seal it).
        let v1 = edit_header(&bytes, |h| {
            let json = h["__metadata__"]["ddm"].as_str().unwrap().to_string();
            let (body, _) = crate::digest::unseal_json(&json).unwrap();
            h["__metadata__"]["ddm"] = body
                .replace("\"format_version\":3", "\"format_version\":1")
                .into();
        });
        std::fs::write(&p, &v1).unwrap();
        let e = Checkpoint::read(&p).unwrap_err().to_string();
        assert!(
            e.contains("without a seal") && e.contains("--trust-unsealed"),
            "{e}"
        );
        let old = Checkpoint::from_unsealed_file(TensorFile::read(&p).unwrap()).unwrap();
        assert!(!old.sealed());
        // Unedited, it reads back sealed whole.
        assert!(Checkpoint::read(&path).unwrap().sealed());
    }

    #[test]
    fn save_then_load_is_bit_identical() {
        let (_dir, path, ckpt, model, device) = setup();
        let (meta, back) = load(&path, &device).unwrap();
        assert_eq!(meta.model, ckpt.meta.model);
        assert_eq!(meta.tensors_sha256.len(), 64);
        let (a, b) = (model.state_dict(), back.state_dict());
        assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
        for (k, t) in &a {
            let same = t
                .data
                .iter()
                .zip(&b[k].data)
                .all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(same && t.shape == b[k].shape, "{k} differs");
        }
        let x = Tensor::<4>::random([2, 1, 8, 8], burn::tensor::Distribution::Default, &device);
        let t = Tensor::<1>::from_floats([0.3, 0.8], &device);
        let none = crate::condition::Condition::none();
        let va = HostTensor::from_tensor(model.velocity(x.clone(), t.clone(), &none).unwrap());
        let vb = HostTensor::from_tensor(back.velocity(x, t, &none).unwrap());
        assert!(va.data.iter().any(|&v| v != 0.0));
        assert_eq!(va, vb);
        // Saving again gives the same bytes.
        assert_eq!(
            std::fs::read(&path).unwrap(),
            Checkpoint::read(&path).unwrap().to_bytes().unwrap()
        );
    }

    fn err_of(path: &Path) -> String {
        match load(path, &crate::device::cpu()) {
            Ok(_) => panic!("{} loaded, expected an error", path.display()),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn truncated_file_is_a_clear_error() {
        let (_dir, path, ..) = setup();
        let bytes = std::fs::read(&path).unwrap();
        for keep in [0, 5, 100, bytes.len() / 2, bytes.len() - 1] {
            std::fs::write(&path, &bytes[..keep]).unwrap();
            let e = err_of(&path);
            assert!(e.contains(&path.display().to_string()), "{e}");
            assert!(e.contains("truncated or corrupted"), "{e}");
        }
    }

    #[test]
    fn flipped_bytes_are_caught() {
        let (_dir, path, ..) = setup();
        let bytes = std::fs::read(&path).unwrap();
        let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        // A byte of the header's JSON (its opening brace), a byte of the ddm metadata, a data byte.
        let meta_at = 8 + String::from_utf8_lossy(&bytes[8..8 + header_len])
            .find("hidden_size")
            .unwrap();
        for (at, what) in [
            (8, "truncated or corrupted"),
            (meta_at, "metadata"),
            (bytes.len() - 3, "checksum"),
        ] {
            let mut b = bytes.clone();
            b[at] ^= 0x20;
            std::fs::write(&path, &b).unwrap();
            let e = err_of(&path);
            assert!(
                e.contains(&path.display().to_string()) && e.contains(what),
                "flip at {at}: {e}"
            );
        }
    }

    fn rewrite(path: &Path, edit: impl FnOnce(&mut Checkpoint)) {
        let mut ckpt = Checkpoint::read(path).unwrap();
        edit(&mut ckpt);
        ckpt.save(path).unwrap();
    }

    #[test]
    fn missing_extra_and_misshaped_tensors_are_named() {
        let (_dir, path, ..) = setup();
        let orig = std::fs::read(&path).unwrap();
        rewrite(&path, |c| {
            c.tensors.remove("blocks.1.attn.proj.weight");
        });
        let e = err_of(&path);
        assert!(e.contains("`blocks.1.attn.proj.weight` is missing"), "{e}");

        std::fs::write(&path, &orig).unwrap();
        rewrite(&path, |c| {
            c.tensors
                .insert("blocks.9.extra".into(), HostTensor::new(vec![1], vec![0.0]));
        });
        let e = err_of(&path);
        assert!(
            e.contains("unexpected tensor") && e.contains("blocks.9.extra"),
            "{e}"
        );

        std::fs::write(&path, &orig).unwrap();
        rewrite(&path, |c| {
            c.tensors.insert(
                "final_layer.linear.bias".into(),
                HostTensor::new(vec![3], vec![0.0; 3]),
            );
        });
        let e = err_of(&path);
        assert!(
            e.contains("`final_layer.linear.bias` has shape [3], expected [16]"),
            "{e}"
        );
    }

    #[test]
    fn unknown_format_version_and_foreign_files_are_refused() {
        let (_dir, path, ..) = setup();
        rewrite(&path, |c| c.meta.format_version = 99);
        let e = err_of(&path);
        assert!(e.contains("format version 99 is not supported"), "{e}");

        let plain = path.with_file_name("plain.safetensors");
        crate::host::write_tensors(
            &plain,
            &BTreeMap::from([("w".to_string(), HostTensor::new(vec![1], vec![1.0]))]),
            &BTreeMap::new(),
        )
        .unwrap();
        let e = err_of(&plain);
        assert!(e.contains("not a ddm checkpoint"), "{e}");
        let e = err_of(&path.with_file_name("absent.safetensors"));
        assert!(
            e.contains("absent.safetensors") && e.contains("No such file"),
            "{e}"
        );
    }
}

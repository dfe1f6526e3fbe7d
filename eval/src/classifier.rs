//! The Fashion-MNIST classifier whose feature space `ddm eval` measures samples in (the role
//! Inception-v3 plays for FID on ImageNet). Built like the router (a small DiT trunk, mean-pooled,
//! normalised, then a linear head to the 10 classes; t fixed at 0) and trained by the trainer's own
//! loop as a third task, so it is deterministic, resumable and logged like experts and routers.
//! The features are the pooled, normalised tokens the head reads.
//!
//! The weights every FD in this project uses are committed in `eval/assets/` and compiled into the
//! binary ([`FeatureNet::embedded`]); their sha256 and the command that made them are in
//! `eval/assets/README.md`.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use ddm_core::burn;
use ddm_core::burn::prelude::*;
use ddm_core::checkpoint::{Checkpoint, CheckpointMeta, Role, TrainingSummary};
use ddm_core::condition::Condition;
use ddm_core::host::{HostTensor, TensorFile};
use ddm_core::model::ModelConfig;
use ddm_core::params::{ParamSource, StateLoader};
use ddm_datasets::Dataset;
use ddm_router::net::{RouterInputs, RouterNet};
use ddm_trainer::config::TrainConfig;
use ddm_trainer::router::{cross_entropy, network_config};
use ddm_trainer::task::{Batch, Task, TrainData};
use rand_chacha::ChaCha8Rng;

pub const CLASSIFIER_FILE: &str = "classifier.safetensors";

/// The committed classifier (see `eval/assets/README.md`).
pub const EMBEDDED_BYTES: &[u8] = include_bytes!("../assets/fashion-mnist-classifier.safetensors");
/// The sha256 of its weights (the checkpoint's data section, `tensors_sha256`): FD values are
/// comparable only between runs that print the same one. (The file's own hash also covers the
/// wall time recorded in its metadata, which no rerun reproduces.)
pub const EMBEDDED_SHA256: &str = "17cd45477f2d7c96256ae2eda707a81ae9953478a9c7811548294e260d6cc187";

/// The classifier network: built like a router (a DiT trunk, mean-pooled and normalised, then a
/// linear head; or an MLP), with the classes as its outputs and t fixed at 0.
#[derive(Module, Debug)]
pub struct Classifier {
    net: RouterNet,
}

impl Classifier {
    fn t_zero(&self, n: usize, device: &Device) -> Tensor<1> {
        Tensor::zeros([n], device)
    }

    /// # Shapes
    /// - `x`: `[N, X]` in the data range -> `[N, classes]`
    pub fn logits(&self, x: Tensor<2>) -> Tensor<2> {
        let [n, _] = x.dims();
        let t = self.t_zero(n, &x.device());
        self.net.logits(x, t, &Condition::none())
    }

    /// # Shapes
    /// - `x`: `[N, X]` -> `[N, D]`
    pub fn features(&self, x: Tensor<2>) -> Tensor<2> {
        let [n, _] = x.dims();
        let t = self.t_zero(n, &x.device());
        self.net.features(x, t, &Condition::none())
    }
}

impl ddm_trainer::task::Net for Classifier {
    fn state_dict(&self) -> std::collections::BTreeMap<String, HostTensor> {
        self.net.state_dict()
    }
}

/// The classifier's network for `data` with these settings (`model`: a DiT size or `mlp`): the
/// router's, with the class count as its output width.
pub fn classifier_config(
    config: &TrainConfig,
    data: &Dataset,
    classes: usize,
) -> anyhow::Result<ModelConfig> {
    Ok(match network_config(config, data, classes)? {
        // The head's width is the class count, carried like a router's K.
        ModelConfig::Dit(mut dit) => {
            dit.num_classes = classes;
            ModelConfig::Dit(dit)
        }
        mlp => mlp,
    })
}

fn classes_of(config: &ModelConfig) -> usize {
    match config {
        ModelConfig::Dit(c) => c.num_classes,
        ModelConfig::Mlp(m) => m.out_dim.unwrap_or(0),
        ModelConfig::PixArt(_) | ModelConfig::Vae(_) | ModelConfig::ClipText(_) => 0,
    }
}

fn build(config: &ModelConfig, src: &mut impl ParamSource) -> anyhow::Result<Classifier> {
    let classes = classes_of(config);
    if classes == 0 {
        bail!("a classifier config needs its class count, got {config:?}");
    }
    // A classifier's DiT config carries the class count in `num_classes` as its head width;
    // the network itself is not conditioned on a class (it predicts one).
    let trunk = match config {
        ModelConfig::Dit(c) => ModelConfig::Dit(ddm_core::dit::DiTConfig {
            num_classes: 0,
            ..c.clone()
        }),
        mlp => mlp.clone(),
    };
    Ok(Classifier {
        net: RouterNet::build(&trunk, classes, RouterInputs::default(), src)?,
    })
}

/// Classifier training as a task of the trainer's loop: cross-entropy on clean labelled images.
/// Its data is a labelled dataset, not a partition.
pub struct ClassifierTask {
    pub data: Dataset,
}

impl Task for ClassifierTask {
    type Net = Classifier;

    fn name(&self) -> String {
        "classifier".into()
    }

    fn data(&self) -> anyhow::Result<TrainData> {
        let d = &self.data;
        let labels = d
            .labels
            .clone()
            .with_context(|| format!("{}: a classifier needs labelled data", d.name))?;
        Ok(TrainData {
            data: d.clone(),
            targets: Some(labels),
            fingerprint: d.fingerprint(),
        })
    }

    fn net_config(&self, config: &TrainConfig, data: &Dataset) -> anyhow::Result<ModelConfig> {
        let classes = data
            .num_classes
            .with_context(|| format!("{}: no class count", data.name))?;
        classifier_config(config, data, classes)
    }

    fn build(&self, net: &ModelConfig, src: &mut impl ParamSource) -> anyhow::Result<Classifier> {
        build(net, src)
    }

    fn loss(
        &self,
        net: &Classifier,
        batch: Batch<'_>,
        _: &TrainConfig,
        _: &ModelConfig,
        _: &mut ChaCha8Rng,
    ) -> anyhow::Result<Tensor<1>> {
        let labels = batch.targets.context("classifier batches carry labels")?;
        Ok(cross_entropy(net.logits(batch.x0), labels))
    }

    fn finish(
        &self,
        out: &Path,
        ema: &Classifier,
        net_config: &ModelConfig,
        summary: TrainingSummary,
        train: &TrainData,
    ) -> anyhow::Result<PathBuf> {
        let data = &train.data;
        let mut meta = CheckpointMeta::classifier(net_config.clone(), data.range());
        meta.source = Some(format!("ddm eval train-classifier on {}", data.name));
        if let Some(names) = &data.class_names {
            meta.extra
                .insert("class_names".into(), serde_json::to_value(names)?);
        }
        meta.training = Some(summary);
        let path = out.join(CLASSIFIER_FILE);
        Checkpoint {
            meta,
            tensors: ddm_trainer::task::Net::state_dict(ema),
        }
        .save(&path)?;
        Ok(path)
    }
}

/// A trained classifier, ready to embed images.
pub struct FeatureNet {
    net: Classifier,
    pub meta: CheckpointMeta,
    /// sha256 of the weights (`tensors_sha256`, verified on load): names the feature space.
    pub sha256: String,
    pub device: Device,
}

impl FeatureNet {
    /// From checkpoint bytes (`origin` is named in errors).
    pub fn from_bytes(origin: &Path, bytes: Vec<u8>, device: &Device) -> anyhow::Result<Self> {
        let ckpt = Checkpoint::from_file(TensorFile::from_bytes(origin, bytes)?)?;
        let sha256 = ckpt.meta.tensors_sha256.clone();
        if ckpt.meta.role != Role::Classifier {
            bail!(
                "{}: a checkpoint of role {}, not a classifier (make one with ddm eval train-classifier)",
                origin.display(),
                ckpt.meta.role
            );
        }
        let mut src = StateLoader::new(origin, ckpt.tensors, device);
        let net = build(&ckpt.meta.model, &mut src)?;
        src.finish("classifier")?;
        Ok(Self {
            net,
            meta: ckpt.meta,
            sha256,
            device: device.clone(),
        })
    }

    pub fn read(path: &Path, device: &Device) -> anyhow::Result<Self> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        Self::from_bytes(path, bytes, device)
    }

    /// The committed classifier, checked against its recorded sha256.
    pub fn embedded(device: &Device) -> anyhow::Result<Self> {
        let f = Self::from_bytes(
            Path::new("<embedded fashion-mnist-classifier.safetensors>"),
            EMBEDDED_BYTES.to_vec(),
            device,
        )?;
        if f.sha256 != EMBEDDED_SHA256 {
            bail!(
                "the embedded classifier's weights have sha256 {}, expected {EMBEDDED_SHA256}",
                f.sha256
            );
        }
        Ok(f)
    }

    /// `--classifier FILE`, or the embedded one.
    pub fn open(path: Option<&Path>, device: &Device) -> anyhow::Result<Self> {
        match path {
            Some(p) => Self::read(p, device),
            None => Self::embedded(device),
        }
    }

    pub fn input_dim(&self) -> usize {
        self.meta.data.shape.iter().product()
    }

    pub fn feature_dim(&self) -> usize {
        match &self.meta.model {
            ModelConfig::Mlp(m) => m.hidden_size,
            ModelConfig::Dit(c) => c.hidden_size,
            ModelConfig::PixArt(_) | ModelConfig::Vae(_) | ModelConfig::ClipText(_) => 0, // a classifier is never one (checked when it is read)
        }
    }

    pub fn classes(&self) -> usize {
        classes_of(&self.meta.model)
    }

    fn check(&self, x: &[f32]) -> anyhow::Result<usize> {
        let d = self.input_dim();
        if x.is_empty() || !x.len().is_multiple_of(d) {
            bail!(
                "the classifier takes samples of {d} values ({:?}); got {} values",
                self.meta.data.shape,
                x.len()
            );
        }
        Ok(x.len() / d)
    }

    /// Run `f` over `x` in batches, clamping samples to the data range first (generated samples
    /// can overshoot it; a saved image could not).
    fn batched(
        &self,
        x: &[f32],
        width: usize,
        f: impl Fn(Tensor<2>) -> Tensor<2>,
    ) -> anyhow::Result<Vec<f32>> {
        let n = self.check(x)?;
        let d = self.input_dim();
        let [lo, hi] = self.meta.data.range;
        let mut out = Vec::with_capacity(n * width);
        for chunk in x.chunks(1024 * d) {
            let m = chunk.len() / d;
            let clamped: Vec<f32> = chunk.iter().map(|v| v.clamp(lo, hi)).collect();
            let t = HostTensor::new(vec![m, d], clamped).to_tensor::<2>(&self.device);
            out.extend(HostTensor::from_tensor(f(t)).data);
        }
        Ok(out)
    }

    /// Features `[N, D]` of samples `x` (`[N, X]`, row-major, in the data range).
    pub fn features(&self, x: &[f32]) -> anyhow::Result<Vec<f32>> {
        self.batched(x, self.feature_dim(), |t| self.net.features(t))
    }

    /// Predicted class of each sample.
    pub fn predict(&self, x: &[f32]) -> anyhow::Result<Vec<u32>> {
        let c = self.classes();
        let logits = self.batched(x, c, |t| self.net.logits(t))?;
        Ok(logits
            .chunks(c)
            .map(|r| (0..c).max_by(|&a, &b| r[a].total_cmp(&r[b])).unwrap_or(0) as u32)
            .collect())
    }

    /// Accuracy on a labelled dataset.
    pub fn accuracy(&self, data: &Dataset) -> anyhow::Result<f64> {
        let labels = data
            .labels
            .as_ref()
            .with_context(|| format!("{} has no labels", data.name))?;
        let all: Vec<usize> = (0..data.len()).collect();
        let pred = self.predict(&data.gather(&all))?;
        Ok(pred.iter().zip(labels).filter(|(p, l)| p == l).count() as f64 / labels.len() as f64)
    }
}

/// The committed classifier's network and length of training.
pub const DEFAULT_MODEL: &str = "DiT-XS/4";
pub const DEFAULT_STEPS: u64 = 4000;

/// Train the classifier on the labelled images of `data` (a `--data` source) into `out`,
/// resumably, with the trainer's loop.
pub fn train(
    data: &str,
    out: &Path,
    config: TrainConfig,
    devices: ddm_core::device::Devices,
    progress: bool,
) -> anyhow::Result<ddm_trainer::train::Outcome> {
    let data = crate::load_data(data, false)?;
    ddm_trainer::train::run(
        &ClassifierTask { data },
        ddm_trainer::train::Run {
            out: out.to_path_buf(),
            config,
            devices,
            progress,
        },
    )
}

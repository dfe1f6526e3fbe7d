//! What a training run optimises: one loop (`train::run`), several tasks. An expert regresses the
//! flow-matching velocity ([`crate::expert`]); a router ([`crate::router`]) classifies which cluster a noised sample
//! came from. A task says what data it reads, which network it trains, its loss, and what it
//! writes at the end; the loop owns batching, randomness, the optimizer, EMA, checkpoints,
//! metrics and plots.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ddm_core::burn::module::Module;
use ddm_core::burn::prelude::*;
use ddm_core::checkpoint::TrainingSummary;
use ddm_core::condition::{Condition, Tokens};
use ddm_core::host::HostTensor;
use ddm_core::model::{Model, ModelConfig};
use ddm_core::params::ParamSource;
use ddm_core::precision::Precision;
use ddm_datasets::Dataset;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::config::TrainConfig;

/// A trainable network whose tensors have (PyTorch-style) names.
pub trait Net: Module + Sized {
    fn state_dict(&self) -> BTreeMap<String, HostTensor>;
}

impl Net for Model {
    fn state_dict(&self) -> BTreeMap<String, HostTensor> {
        Model::state_dict(self)
    }
}

/// The noised batch both tasks start from: e ~ N(0, I) then t from the config's time sampler,
/// drawn from `rng` in that order, and x_t = (1 - t) x0 + t e.
///
/// # Shapes
/// - `x0`: `[B, X]` -> (`e` `[B, X]`, `t` `[B]`, `x_t` `[B, X]`)
pub fn noise(
    x0: &Tensor<2>,
    config: &TrainConfig,
    rng: &mut ChaCha8Rng,
) -> (Tensor<2>, Tensor<1>, Tensor<2>) {
    let device = x0.device();
    let [b, x] = x0.dims();
    let e = ddm_core::flow::randn(vec![b, x], rng).to_tensor::<2>(&device);
    let t = Tensor::<1>::from_data(TensorData::new(config.time_sampler.sample(b, rng), [b]), &device);
    let x_t = ddm_core::flow::interpolate(x0.clone(), e.clone(), t.clone());
    (e, t, x_t)
}

/// The class input of a training batch for a network conditioned on `classes` classes (None for
/// an unconditional one): each label replaced by the null class (id `classes`) with probability
/// `dropout`, one draw from `rng` per sample.
pub fn dropped_labels(
    batch: &Batch<'_>,
    classes: usize,
    dropout: f64,
    rng: &mut ChaCha8Rng,
) -> Option<Tensor<1, Int>> {
    if classes == 0 {
        return None;
    }
    let labels = batch.labels.expect("class-conditional data has labels");
    let y: Vec<i64> = labels
        .iter()
        .map(|&l| {
            if rng.random::<f64>() < dropout {
                classes as i64
            } else {
                l as i64
            }
        })
        .collect();
    Some(Tensor::<1, Int>::from_data(
        TensorData::new(y, [labels.len()]),
        &batch.x0.device(),
    ))
}

/// The batch's conditioning vectors, each replaced by the zero vector (the null condition) with
/// probability `dropout`, one draw from `rng` per sample.
///
/// # Shapes
/// - `batch.cond`: `[B, Dc]` -> `[B, Dc]`
pub fn dropped_vectors(batch: &Batch<'_>, dropout: f64, rng: &mut ChaCha8Rng) -> Tensor<2> {
    let c = batch
        .cond
        .clone()
        .expect("data a network reads vectors of has conditioning vectors");
    let [b, _] = c.dims();
    let keep: Vec<f32> = (0..b)
        .map(|_| if rng.random::<f64>() < dropout { 0.0 } else { 1.0 })
        .collect();
    let keep = Tensor::<2>::from_data(TensorData::new(keep, [b, 1]), &c.device());
    c * keep
}

/// The batch's token sequences, each replaced by the null sequence (zeros, every token padding)
/// with probability `dropout`, one draw from `rng` per sample.
pub fn dropped_tokens(batch: &Batch<'_>, dropout: f64, rng: &mut ChaCha8Rng) -> Tokens {
    let Tokens { embeddings, mask } = batch
        .tokens
        .clone()
        .expect("data a network reads token sequences of has them");
    let [b, _, _] = embeddings.dims();
    let keep: Vec<f32> = (0..b)
        .map(|_| if rng.random::<f64>() < dropout { 0.0 } else { 1.0 })
        .collect();
    let keep = Tensor::<1>::from_data(TensorData::new(keep, [b]), &embeddings.device());
    Tokens {
        embeddings: embeddings * keep.clone().reshape([b, 1, 1]),
        mask: mask * keep.reshape([b, 1]),
    }
}

/// The batch's condition as a network of `config` reads it (its classes, vectors and token
/// sequences; none of those it does not read), each part dropped to its null with probability
/// `dropout` (drawn from `rng` in that order).
pub fn dropped_condition(
    batch: &Batch<'_>,
    config: &ModelConfig,
    dropout: f64,
    rng: &mut ChaCha8Rng,
) -> Condition {
    let class = dropped_labels(batch, config.num_classes(), dropout, rng);
    let vector = (config.condition_dim() > 0).then(|| dropped_vectors(batch, dropout, rng));
    let tokens = (config.token_dim() > 0).then(|| dropped_tokens(batch, dropout, rng));
    Condition {
        class,
        vector,
        tokens,
    }
}

/// What a task trains on.
pub struct TrainData {
    pub data: Dataset,
    /// Per-sample targets of the task (a router's cluster ids, a classifier's labels).
    pub targets: Option<Vec<u32>>,
    /// Names the source (a partition's fingerprint, or the dataset's): a resumed run must see the
    /// same one.
    pub fingerprint: String,
}

/// One batch as the loss sees it.
pub struct Batch<'a> {
    /// Samples in the models' range, `[B, X]` (flattened).
    pub x0: Tensor<2>,
    /// Class labels of the samples, if the data has them.
    pub labels: Option<&'a [u32]>,
    /// Per-sample targets of the task (a router's cluster ids).
    pub targets: Option<&'a [u32]>,
    /// Per-sample conditioning vectors `[B, Dc]`, if the data has them.
    pub cond: Option<Tensor<2>>,
    /// Per-sample token sequences (`[B, L, Dt]` and their mask `[B, L]`), if the data has them.
    pub tokens: Option<Tokens>,
}

pub trait Task {
    type Net: Net;

    /// Short name, recorded in the state (`cluster:2`, `monolith`, `router`).
    fn name(&self) -> String;

    /// The samples to train on (from the task's own source: a partition's shard, all shards, a
    /// labelled dataset), per-sample targets if the task has them, and the source's fingerprint.
    fn data(&self) -> anyhow::Result<TrainData>;

    /// The network's configuration for this data.
    fn net_config(&self, config: &TrainConfig, data: &Dataset) -> anyhow::Result<ModelConfig>;

    /// Build the network (fresh, or from saved tensors).
    fn build(&self, net: &ModelConfig, src: &mut impl ParamSource) -> anyhow::Result<Self::Net>;

    /// Whether this task's network of `net` may train in `precision`: cast by
    /// `precision::cast`, it computes in its parameters' dtype and returns an f32 loss. Only f32,
    /// unless a task knows better.
    fn trains_in(&self, net: &ModelConfig, precision: Precision) -> bool {
        let _ = net;
        precision == Precision::F32
    }

    /// Whether [`Task::shard_losses`] splits a batch across several devices.
    fn data_parallel(&self) -> bool {
        false
    }

    /// The loss of one batch computed by several replicas of the network, `replicas[i]` on
    /// `devices[i]` (data parallel): the randomness drawn for the whole batch exactly as
    /// [`Task::loss`] draws it, then each replica's loss on its share of the rows
    /// ([`crate::parallel::shards`]), weighted by that share, so the losses sum to the batch's loss and the summed
    /// gradients are the one-device gradients. Tasks that are not [`Task::data_parallel`] take
    /// one replica.
    fn shard_losses(
        &self,
        replicas: &[Self::Net],
        devices: &[Device],
        batch: Batch<'_>,
        config: &TrainConfig,
        net_config: &ModelConfig,
        rng: &mut ChaCha8Rng,
    ) -> anyhow::Result<Vec<Tensor<1>>> {
        let _ = devices;
        match replicas {
            [net] => Ok(vec![self.loss(net, batch, config, net_config, rng)?]),
            _ => anyhow::bail!("{} trains on one device: pass a single --device", self.name()),
        }
    }

    /// The loss of one batch. All randomness comes from `rng`, in a fixed order.
    fn loss(
        &self,
        net: &Self::Net,
        batch: Batch<'_>,
        config: &TrainConfig,
        net_config: &ModelConfig,
        rng: &mut ChaCha8Rng,
    ) -> anyhow::Result<Tensor<1>>;

    /// Write the final artefact from the EMA weights; returns its path.
    fn finish(
        &self,
        out: &Path,
        ema: &Self::Net,
        net_config: &ModelConfig,
        summary: TrainingSummary,
        data: &TrainData,
    ) -> anyhow::Result<PathBuf>;

    /// Something to look at every `sample_every` steps (an expert's sample grid).
    fn snapshot(
        &self,
        _ema: &Self::Net,
        _net_config: &ModelConfig,
        _path: &Path,
        _seed: u64,
    ) -> anyhow::Result<()> {
        Ok(())
    }
}

//! The router task (one loop, two losses): cross-entropy between
//! the router's logits for a noised sample x_t and the cluster id of its clean sample, with t drawn
//! like the experts' and clusters at their natural frequencies, so the prior w_k is learned. The
//! router needs only images and cluster ids (and, conditioned with `--class-conditional`, the
//! labels, each replaced by the null class with the label-dropout probability, so one router
//! learns both p(k | x_t, t, c) and p(k | x_t, t)); it never touches an expert.

use std::path::{Path, PathBuf};

use crate::router_eval as eval;
use anyhow::Context;
use ddm_core::burn::prelude::*;
use ddm_core::burn::tensor::activation::log_softmax;
use ddm_core::checkpoint::{Checkpoint, CheckpointMeta, TrainingSummary};
use ddm_core::condition::Condition;
use ddm_core::model::ModelConfig;
use ddm_core::params::ParamSource;
use ddm_datasets::Dataset;
use ddm_datasets::partition::Partition;
use ddm_router::net::{RouterInputs, RouterNet, router_config};
use rand_chacha::ChaCha8Rng;

use crate::config::TrainConfig;
use crate::task::{Batch, Net, Task, TrainData};

pub const ROUTER_FILE: &str = "router.safetensors";
/// The default router trunk: a DiT-XS (about a tenth of a DiT-T expert's forward FLOPs).
pub const DEFAULT_ROUTER_MODEL: &str = "DiT-XS/4";
pub const EVAL_FILE: &str = "router-eval.json";

/// The network of a router-shaped classifier with `k` outputs for `data`: a named DiT trunk for
/// square images, or (`model = "mlp"`) the MLP with K outputs.
pub fn network_config(config: &TrainConfig, data: &Dataset, k: usize) -> anyhow::Result<ModelConfig> {
    let net = ModelConfig::named(
        &config.model,
        &data.name,
        &data.shape,
        config.mlp_hidden,
        config.mlp_depth,
    )?;
    Ok(router_config(net, k))
}

/// The router's network: [`network_config`], conditioned on the labels with
/// `--class-conditional` (label dropout `--class-dropout` gives the null class).
pub fn router_network(config: &TrainConfig, data: &Dataset, k: usize) -> anyhow::Result<ModelConfig> {
    let net = network_config(config, data, k)?;
    if !config.class_conditional {
        return Ok(net);
    }
    let classes = data
        .num_classes
        .context("a class-conditional router needs labelled data; this partition's data has no labels")?;
    Ok(net.with_classes(classes, config.class_dropout)?)
}

/// Mean cross-entropy of `logits` (`[B, K]`) against the ids `targets` (`B` of them).
pub fn cross_entropy(logits: Tensor<2>, targets: &[u32]) -> Tensor<1> {
    let device = logits.device();
    let ids: Vec<i64> = targets.iter().map(|&c| c as i64).collect();
    let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [targets.len(), 1]), &device);
    log_softmax(logits, 1).gather(1, ids).mean().neg()
}

pub struct RouterTask {
    /// The partition whose cluster ids the router learns (every shard is read).
    pub partition: Partition,
    /// The experts' network, to state the router's cost as a fraction of one expert's.
    pub expert_model: String,
    /// Samples for the evaluation printed at the end.
    pub eval_samples: usize,
    /// The data's per-sample conditioning the router reads: vectors `c` of this length
    /// ([`Partition::condition_dim`]), token sequences of this width ([`Partition::token_dim`]).
    pub inputs: RouterInputs,
}

impl Task for RouterTask {
    type Net = RouterNet;

    fn name(&self) -> String {
        "router".into()
    }

    fn data(&self) -> anyhow::Result<TrainData> {
        let (data, clusters) = self.partition.all()?;
        let found = data.cond.as_ref().map(|c| c.shape[1]);
        if self.inputs.vector.is_some() && found != self.inputs.vector {
            anyhow::bail!(
                "{}: the router is to read conditioning vectors of length {}, but the partition's data has {}",
                self.partition.dir().display(),
                self.inputs.vector.unwrap_or(0),
                found.map_or("none".to_string(), |d| format!("vectors of length {d}"))
            );
        }
        let found = data.tokens.as_ref().map(|t| t.embeddings.shape[2]);
        if self.inputs.tokens.is_some() && found != self.inputs.tokens {
            anyhow::bail!(
                "{}: the router is to read token states of width {}, but the partition's data has {}",
                self.partition.dir().display(),
                self.inputs.tokens.unwrap_or(0),
                found.map_or("no token sequences".to_string(), |d| format!(
                    "token states of width {d}"
                ))
            );
        }
        Ok(TrainData {
            data,
            targets: Some(clusters),
            fingerprint: self.partition.fingerprint().to_string(),
        })
    }

    fn net_config(&self, config: &TrainConfig, data: &Dataset) -> anyhow::Result<ModelConfig> {
        router_network(config, data, self.partition.k())
    }

    fn build(&self, net: &ModelConfig, src: &mut impl ParamSource) -> anyhow::Result<RouterNet> {
        Ok(RouterNet::build(net, self.partition.k(), self.inputs, src)?)
    }

    fn loss(
        &self,
        net: &RouterNet,
        batch: Batch<'_>,
        config: &TrainConfig,
        net_config: &ModelConfig,
        rng: &mut ChaCha8Rng,
    ) -> anyhow::Result<Tensor<1>> {
        let (_, t, x_t) = crate::task::noise(&batch.x0, config, rng);
        let targets = batch.targets.context("router batches carry cluster ids")?;
        let dropout = config.class_dropout;
        let c = Condition {
            class: crate::task::dropped_labels(&batch, net_config.num_classes(), dropout, rng),
            vector: self
                .inputs
                .vector
                .map(|_| crate::task::dropped_vectors(&batch, dropout, rng)),
            tokens: self
                .inputs
                .tokens
                .map(|_| crate::task::dropped_tokens(&batch, dropout, rng)),
        };
        Ok(cross_entropy(net.logits(x_t, t, &c), targets))
    }

    fn finish(
        &self,
        out: &Path,
        ema: &RouterNet,
        net_config: &ModelConfig,
        summary: TrainingSummary,
        train: &TrainData,
    ) -> anyhow::Result<PathBuf> {
        let (manifest, data) = (self.partition.manifest(), &train.data);
        let priors = manifest.priors();
        let mut meta = CheckpointMeta::router(
            net_config.clone(),
            manifest.dataset.range,
            &manifest.fingerprint,
            priors.clone(),
        );
        meta.source = Some(format!("ddm train-router on {}", manifest.dataset.name));
        meta.condition_dim = self.inputs.vector;
        meta.condition_token_dim = self.inputs.tokens;
        meta.text = manifest
            .dataset
            .text
            .clone()
            .filter(|_| self.inputs != RouterInputs::default());
        meta.latent = manifest.dataset.latent.clone();
        // Cost relative to one expert (per forward pass).
        let expert = TrainConfig {
            model: self.expert_model.clone(),
            ..TrainConfig::default()
        };
        if let Ok(expert) = crate::expert::model_config(&expert, data) {
            let frac = net_config.flops_per_sample() / expert.flops_per_sample();
            meta.extra
                .insert("expert_model".into(), self.expert_model.clone().into());
            meta.extra
                .insert("flops_fraction_of_one_expert".into(), frac.into());
        }
        let device = ema
            .devices()
            .first()
            .cloned()
            .unwrap_or_else(ddm_core::device::cpu);
        let reports = eval::evaluate(
            ema,
            data,
            train.targets.as_deref().expect("router data has cluster ids"),
            manifest.k,
            self.eval_samples,
            summary.seed ^ 0xe7a1,
            &device,
        );
        meta.extra.insert("eval".into(), serde_json::to_value(&reports)?);
        meta.training = Some(summary);
        let path = out.join(ROUTER_FILE);
        Checkpoint {
            meta,
            tensors: ema.state_dict(),
        }
        .save(&path)?;
        ddm_core::fsio::write_bytes_atomic(
            &out.join(EVAL_FILE),
            &ddm_core::json::to_vec_pretty(EVAL_FILE, &reports)?,
        )?;
        Ok(path)
    }
}

impl Net for RouterNet {
    fn state_dict(&self) -> std::collections::BTreeMap<String, ddm_core::host::HostTensor> {
        RouterNet::state_dict(self)
    }
}

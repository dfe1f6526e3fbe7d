//! Router training as a task of the trainer's loop (one loop, two losses): cross-entropy between
//! the router's logits for a noised sample x_t and the cluster id of its clean sample, with t drawn
//! like the experts' and clusters at their natural frequencies, so the prior w_k is learned. The
//! router needs only images and cluster ids; it never touches an expert.

use std::path::{Path, PathBuf};

use anyhow::bail;
use ddm_core::burn::prelude::*;
use ddm_core::burn::tensor::activation::log_softmax;
use ddm_core::checkpoint::{Checkpoint, CheckpointMeta, Objective, Role, TrainingSummary};
use ddm_core::dit::DiTConfig;
use ddm_core::mlp::MlpConfig;
use ddm_core::model::ModelConfig;
use ddm_core::params::ParamSource;
use ddm_datasets::Dataset;
use ddm_datasets::partition::PartitionManifest;
use ddm_trainer::config::TrainConfig;
use ddm_trainer::task::{Batch, Task};
use rand_chacha::ChaCha8Rng;

use crate::eval;
use crate::net::{RouterNet, router_config};

pub const ROUTER_FILE: &str = "router.safetensors";
pub const EVAL_FILE: &str = "router-eval.json";

/// The network of a router-shaped classifier with `k` outputs for `data`: a named DiT trunk for
/// square images, or (`model = "mlp"`) the MLP with K outputs. `what` names it in errors.
pub fn network_config(
    config: &TrainConfig,
    data: &Dataset,
    k: usize,
    what: &str,
) -> anyhow::Result<ModelConfig> {
    if config.model.eq_ignore_ascii_case("mlp") {
        let mut m = MlpConfig::new(data.sample_size());
        (m.hidden_size, m.depth) = (config.mlp_hidden, config.mlp_depth);
        return Ok(router_config(ModelConfig::Mlp(m), k));
    }
    let s = &data.shape;
    if s.len() != 3 || s[1] != s[2] {
        bail!(
            "a DiT {what} needs square images [C, S, S]; {} has shape {s:?} (use --model mlp)",
            data.name
        );
    }
    let mut dit = DiTConfig::named(&config.model, s[1], s[0])?;
    dit.class_dropout_prob = 0.0;
    Ok(ModelConfig::Dit(dit))
}

/// Mean cross-entropy of `logits` (`[B, K]`) against the ids `targets` (`B` of them).
pub fn cross_entropy(logits: Tensor<2>, targets: &[u32]) -> Tensor<1> {
    let device = logits.device();
    let ids: Vec<i64> = targets.iter().map(|&c| c as i64).collect();
    let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [targets.len(), 1]), &device);
    log_softmax(logits, 1).gather(1, ids).mean().neg()
}

pub struct RouterTask {
    pub k: usize,
    /// The experts' network, to state the router's cost as a fraction of one expert's.
    pub expert_model: String,
    /// Samples for the evaluation printed at the end.
    pub eval_samples: usize,
}

impl Task for RouterTask {
    type Net = RouterNet;

    fn name(&self) -> String {
        "router".into()
    }

    fn data(&self, dir: &Path, manifest: &PartitionManifest) -> anyhow::Result<(Dataset, Option<Vec<u32>>)> {
        let (d, c) = ddm_trainer::island::load_all_with_clusters(dir, manifest)?;
        Ok((d, Some(c)))
    }

    fn net_config(&self, config: &TrainConfig, data: &Dataset) -> anyhow::Result<ModelConfig> {
        network_config(config, data, self.k, "router")
    }

    fn build(&self, net: &ModelConfig, src: &mut impl ParamSource) -> anyhow::Result<RouterNet> {
        Ok(RouterNet::build(net, self.k, src)?)
    }

    fn loss(
        &self,
        net: &RouterNet,
        batch: Batch<'_>,
        config: &TrainConfig,
        _: &ModelConfig,
        rng: &mut ChaCha8Rng,
    ) -> Tensor<1> {
        let (_, t, x_t) = ddm_trainer::task::noise(&batch.x0, config, rng);
        let targets = batch.targets.expect("router batches carry cluster ids");
        cross_entropy(net.logits(x_t, t), targets)
    }

    fn finish(
        &self,
        out: &Path,
        ema: &RouterNet,
        net_config: &ModelConfig,
        summary: TrainingSummary,
        data: &Dataset,
        targets: Option<&[u32]>,
        manifest: &PartitionManifest,
    ) -> anyhow::Result<PathBuf> {
        let priors = manifest.priors();
        let mut meta =
            CheckpointMeta::expert(net_config.clone(), manifest.dataset.range, Objective::Velocity);
        meta.role = Role::Router;
        meta.partition = Some(manifest.fingerprint.clone());
        meta.num_clusters = Some(self.k);
        meta.priors = Some(priors.clone());
        meta.source = Some(format!("ddm train-router on {}", manifest.dataset.name));
        // Cost relative to one expert (per forward pass).
        if let Ok(expert) = ddm_trainer::train::model_config(
            &TrainConfig {
                model: self.expert_model.clone(),
                ..TrainConfig::default()
            },
            data,
        ) {
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
            targets.expect("router data has cluster ids"),
            &priors,
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
            serde_json::to_string_pretty(&reports)?.as_bytes(),
        )?;
        println!("{}", eval::table(&reports, &priors));
        Ok(path)
    }
}

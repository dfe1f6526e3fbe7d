//! The expert task: regress the flow-matching velocity on one cluster's shard (or, for the
//! monolith baseline, on all of them). At the end it writes the EMA weights as the expert's
//! checkpoint, the shard's statistics for the analytic router, and a grid of samples.

use std::path::{Path, PathBuf};

use anyhow::Context;
use ddm_core::burn::module::Module;
use ddm_core::burn::prelude::*;
use ddm_core::checkpoint::{Checkpoint, CheckpointMeta, Objective, TrainingSummary};
use ddm_core::condition::Condition;
use ddm_core::flow::{self, Solver, StepSchedule};
use ddm_core::host::HostTensor;
use ddm_core::model::{Model, ModelConfig};
use ddm_core::params::ParamSource;
use ddm_core::precision::Precision;
use ddm_core::stats::STATS_FILE;
use ddm_datasets::Dataset;
use ddm_datasets::partition::Partition;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::config::TrainConfig;
use crate::island::{self, Target};
use crate::task::{Batch, Task, TrainData};

pub const EXPERT_FILE: &str = "expert.safetensors";

/// Train an expert on one cluster (or the monolith on all of them): flow matching, or DDPM's
/// epsilon objective.
pub struct ExpertTask {
    pub partition: Partition,
    pub target: Target,
    /// What the network learns to predict (the run's `objective`).
    pub objective: Objective,
}

impl ExpertTask {
    /// The objective's loss of `net` on one batch: the velocity regressed onto e - x0, or DDPM's
    /// noise onto e.
    ///
    /// # Shapes
    /// - `input`, `x0`, `e`: `[B, X]`, `t`: `[B]` -> `[1]`
    fn objective_loss(
        &self,
        net: &Model,
        input: Tensor<2>,
        t: Tensor<1>,
        c: &Condition,
        x0: Tensor<2>,
        e: Tensor<2>,
    ) -> Tensor<1> {
        let prediction = net.predict(input, t, c);
        match &self.objective {
            Objective::Velocity => flow::flow_matching_loss(prediction, x0, e),
            Objective::Epsilon { .. } => flow::epsilon_loss(prediction, e),
        }
    }
}

impl Task for ExpertTask {
    type Net = Model;

    fn name(&self) -> String {
        match self.target {
            Target::Cluster(k) => format!("cluster:{k}"),
            Target::Monolith => "monolith".into(),
        }
    }

    fn data(&self) -> anyhow::Result<TrainData> {
        Ok(TrainData {
            data: island::load(&self.partition, self.target)?,
            targets: None,
            fingerprint: self.partition.fingerprint().to_string(),
        })
    }

    fn net_config(&self, config: &TrainConfig, data: &Dataset) -> anyhow::Result<ModelConfig> {
        model_config(config, data)
    }

    fn build(&self, net: &ModelConfig, src: &mut impl ParamSource) -> anyhow::Result<Model> {
        Ok(net.build(src)?)
    }

    /// DiT, MLP and PixArt experts compute in bf16 or f16 ([`ModelConfig::computes_in_half`]).
    fn trains_in(&self, net: &ModelConfig, precision: Precision) -> bool {
        precision == Precision::F32 || net.computes_in_half()
    }

    fn loss(
        &self,
        net: &Model,
        batch: Batch<'_>,
        config: &TrainConfig,
        net_config: &ModelConfig,
        rng: &mut ChaCha8Rng,
    ) -> anyhow::Result<Tensor<1>> {
        let device = batch.x0.device();
        let mut losses = self.shard_losses(
            std::slice::from_ref(net),
            &[device],
            batch,
            config,
            net_config,
            rng,
        )?;
        Ok(losses.remove(0))
    }

    fn data_parallel(&self) -> bool {
        true
    }

    /// The batch's draws on the first device (e, t, then the condition's dropout), then each
    /// replica's rows moved to its device.
    fn shard_losses(
        &self,
        replicas: &[Model],
        devices: &[Device],
        batch: Batch<'_>,
        config: &TrainConfig,
        net_config: &ModelConfig,
        rng: &mut ChaCha8Rng,
    ) -> anyhow::Result<Vec<Tensor<1>>> {
        let (e, t, x_t) = crate::task::noise(&batch.x0, config, rng);
        let c = crate::task::dropped_condition(&batch, net_config, config.class_dropout, rng);
        // The network's input: x_t, or for an epsilon expert (t is then DDPM's continuous time
        // u) the same draws through DDPM's forward process.
        let input = match &self.objective {
            Objective::Velocity => x_t,
            Objective::Epsilon { schedule } => {
                flow::ddpm_forward(batch.x0.clone(), e.clone(), t.clone(), schedule)
            }
        };
        if let [net] = replicas {
            return Ok(vec![self.objective_loss(net, input, t, &c, batch.x0, e)]);
        }
        let b = batch.x0.dims()[0];
        let losses = crate::parallel::shards(b, replicas.len())
            .into_iter()
            .zip(replicas.iter().zip(devices))
            .map(|((start, len), (net, device))| {
                let rows = |x: &Tensor<2>| x.clone().narrow(0, start, len).to_device(device); // [len, X]
                let t = t.clone().narrow(0, start, len).to_device(device);
                let c = c.narrow(start, len).to_device(device);
                let loss = self.objective_loss(net, rows(&input), t, &c, rows(&batch.x0), rows(&e));
                loss * (len as f64 / b as f64) // this replica's share of the batch mean
            })
            .collect();
        Ok(losses)
    }

    fn finish(
        &self,
        out: &Path,
        ema: &Model,
        net_config: &ModelConfig,
        summary: TrainingSummary,
        data: &TrainData,
    ) -> anyhow::Result<PathBuf> {
        let manifest = self.partition.manifest();
        // The range of the whole dataset, not of this shard: every expert of a partition (and the
        // registry) must agree on it, and for vector data each shard's min/max differ.
        let mut meta = CheckpointMeta::expert(net_config.clone(), manifest.dataset.range, self.objective);
        meta.partition = Some(manifest.fingerprint.clone());
        meta.cluster = self.target.cluster();
        meta.latent = manifest.dataset.latent.clone();
        meta.condition_dim = Some(net_config.condition_dim()).filter(|&d| d > 0);
        let reads_text = meta.condition_dim.is_some() || net_config.token_dim() > 0;
        meta.text = manifest.dataset.text.clone().filter(|_| reads_text);
        meta.source = Some(format!(
            "ddm-trainer {} on {}",
            self.name(),
            manifest.dataset.name
        ));
        let seed = summary.seed;
        meta.training = Some(summary);
        let path = out.join(EXPERT_FILE);
        Checkpoint {
            meta,
            tensors: ema.state_dict(),
        }
        .save(&path)?;
        // The statistics the analytic router needs: count, mean and diagonal variance of the shard.
        data.data.cluster_stats().save(
            &out.join(STATS_FILE),
            self.target.cluster(),
            &manifest.fingerprint,
        )?;
        write_samples(
            ema,
            net_config,
            &self.objective,
            manifest.dataset.range,
            &out.join("samples.png"),
            seed,
        )?;
        Ok(path)
    }

    fn snapshot(&self, ema: &Model, net_config: &ModelConfig, path: &Path, seed: u64) -> anyhow::Result<()> {
        let range = self.partition.manifest().dataset.range;
        write_samples(ema, net_config, &self.objective, range, path, seed)
    }
}

/// The expert's network for this data (`--model`, conditioned on the labels with
/// `--class-conditional`, on the conditioning vectors with `--condition-vectors`).
pub fn model_config(config: &TrainConfig, data: &Dataset) -> anyhow::Result<ModelConfig> {
    let mut net = ModelConfig::named(
        &config.model,
        &data.name,
        &data.shape,
        config.mlp_hidden,
        config.mlp_depth,
    )?;
    if let ModelConfig::PixArt(_) = net {
        let tokens = data.tokens.as_ref().with_context(|| {
            format!(
                "--model {}: a PixArt reads each caption's token sequence, but {} has none (`c_tokens` and `c_mask` in a tensors: file: ddm encode-text --tokens --data)",
                config.model, data.name
            )
        })?;
        net = net.with_caption_tokens(tokens.dim(), tokens.length(), config.class_dropout)?;
    }
    if config.condition_vectors {
        let c = data.cond.as_ref().with_context(|| {
            format!(
                "--condition-vectors, but {} has no conditioning vectors (`c` in a tensors: file: ddm encode-text --data)",
                data.name
            )
        })?;
        net = net.with_condition_vectors(c.shape[1], config.class_dropout)?;
    }
    if !config.class_conditional {
        return Ok(net);
    }
    let classes = data
        .num_classes
        .context("--class-conditional needs labelled data; this data has no labels")?;
    Ok(net.with_classes(classes, config.class_dropout)?)
}

/// A grid of 16 EMA samples (Euler, 32 steps), for images.
pub fn write_samples(
    ema: &Model,
    config: &ModelConfig,
    objective: &Objective,
    range: [f32; 2],
    path: &Path,
    seed: u64,
) -> anyhow::Result<()> {
    let shape = config.data_shape();
    if shape.len() != 3 || !(shape[0] == 1 || shape[0] == 3) {
        return Ok(());
    }
    let device = ema
        .devices()
        .first()
        .cloned()
        .unwrap_or_else(ddm_core::device::cpu);
    let n = 16;
    let per: usize = shape.iter().product();
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5a5a);
    let x1 = flow::randn(vec![n, per], &mut rng).to_tensor::<2>(&device);
    let classes = config.num_classes() as i64;
    let y = (classes > 0).then(|| {
        let ids: Vec<i64> = (0..n as i64).map(|i| i % classes).collect();
        Tensor::<1, Int>::from_data(TensorData::new(ids, [n]), &device)
    });
    let times = StepSchedule::Uniform.times(32);
    let c = Condition::maybe_class(y);
    let x0 = match objective {
        Objective::Velocity => flow::integrate(&mut &*ema, x1, &c, &times, Solver::Euler)?,
        Objective::Epsilon { schedule } => {
            let field = flow::EpsilonToVelocity::new(ema, *schedule, range);
            flow::integrate(&mut &field, x1, &c, &times, Solver::Euler)?
        }
    };
    let px = ddm_core::grid::to_u8(&HostTensor::from_tensor(x0).data);
    let cells: Vec<Option<&[u8]>> = px.chunks(per).map(Some).collect();
    let layout = ddm_core::grid::Layout::for_people(8, shape[1]);
    ddm_core::grid::write_grid_png_with(path, &cells, [shape[0], shape[1], shape[2]], &layout)?;
    Ok(())
}

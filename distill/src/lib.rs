//! Distillation: one dense student trained to reproduce the ensemble, cheaper to serve than K
//! experts and a router. The student regresses the teacher's velocity at noised data points:
//! x0 from the partition's data (every cluster), e and t drawn as for an expert, x_t = (1 - t) x0
//! + t e, and the target
//!
//! - `own-cluster` (the DDM paper's): the expert of x0's own cluster, v_c(x_t). Its average over
//!   the clusters that could have produced x_t is the ensemble's velocity sum_k p(k | x_t) v_k, so
//!   the student learns that without a router, at one expert per sample;
//! - `routed`: the routed ensemble's velocity with a sampling strategy (`full` is the exact
//!   mixture with a perfect router).
//!
//! The loop is an island's ([`ddm_trainer::train::run`]: resumable, metrics, EMA, the same
//! outputs); the teacher runs without gradients, and its FLOPs, counted from the rows each expert
//! and the router computed, are added to the student's training FLOPs. The student is an expert
//! checkpoint of the partition with no cluster: `ddm sample --checkpoint` samples it.

use std::cell::{Cell, RefCell};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use anyhow::{Context, bail};
use ddm_core::burn::prelude::*;
use ddm_core::checkpoint::{Checkpoint, CheckpointMeta, Objective, TrainingSummary};
use ddm_core::condition::{Condition, Tokens};
use ddm_core::flow::Drift;
use ddm_core::host::HostTensor;
use ddm_core::model::{Model, ModelConfig};
use ddm_core::params::ParamSource;
use ddm_datasets::Dataset;
use ddm_ensemble::experts::Guidance;
use ddm_ensemble::registry::Registry;
use ddm_ensemble::sample::RouterChoice;
use ddm_ensemble::sampler::{Ensemble, ExpertSlot, LearnedRouter, Posterior};
use ddm_ensemble::strategy::Strategy;
use ddm_trainer::config::TrainConfig;
use ddm_trainer::task::{Batch, Task, TrainData};
use rand_chacha::ChaCha8Rng;

pub const STUDENT_FILE: &str = "expert.safetensors";

/// Which velocity the student regresses.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Target {
    /// The expert of each sample's own cluster (the DDM paper's distillation).
    OwnCluster,
    /// The routed ensemble with this strategy.
    Routed(Strategy),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::OwnCluster => write!(f, "own-cluster"),
            Target::Routed(s) => write!(f, "routed ({s})"),
        }
    }
}

/// The posterior of the `own-cluster` target: one-hot on each row's cluster, set before every
/// teacher call.
struct OwnClusters {
    k: usize,
    rows: RefCell<Vec<usize>>,
}

struct Shared(Rc<OwnClusters>);

impl Posterior for Shared {
    fn k(&self) -> usize {
        self.0.k
    }
    fn classes(&self) -> usize {
        0
    }
    fn probs(&self, x_t: &Tensor<2>, _t: &Tensor<1>, _c: &Condition) -> Vec<Vec<f64>> {
        let rows = self.0.rows.borrow();
        assert_eq!(rows.len(), x_t.dims()[0], "one cluster per row");
        rows.iter()
            .map(|&c| (0..self.0.k).map(|j| if j == c { 1.0 } else { 0.0 }).collect())
            .collect()
    }
}

/// The teacher: the ensemble, how to ask it, and what it costs. (The ensemble is behind a
/// `RefCell`: a task's loss takes `&self`, and the ensemble's draws and usage change as it runs.)
pub struct Teacher<'a> {
    ensemble: RefCell<Ensemble<'a>>,
    own: Option<Rc<OwnClusters>>,
    /// Where the experts run.
    device: Device,
    /// Forward FLOPs per row of each expert, and of the router.
    expert_flops: Vec<f64>,
    router_flops: f64,
    /// FLOPs and rows of the calls so far (this process).
    spent: Cell<(f64, u64)>,
    description: String,
}

impl<'a> Teacher<'a> {
    /// A teacher of K experts (in memory or loaded on first use): `posterior` is the router for a
    /// routed target (ignored for own-cluster). `expert_flops` and `router_flops` are forward
    /// FLOPs per row.
    pub fn new(
        experts: Vec<ExpertSlot<'a>>,
        posterior: Option<Box<dyn Posterior + 'a>>,
        target: Target,
        device: &Device,
        expert_flops: Vec<f64>,
        router_flops: f64,
        description: String,
    ) -> anyhow::Result<Self> {
        let k = experts.len();
        let (ensemble, own) = match target {
            Target::OwnCluster => {
                let own = Rc::new(OwnClusters {
                    k,
                    rows: RefCell::new(vec![]),
                });
                let router: Box<dyn Posterior + 'a> = Box::new(Shared(own.clone()));
                let e = Ensemble::new(experts, Some(router), Strategy::TopK { k: 1 }, 0)?;
                (e.route_without_class(), Some(own))
            }
            Target::Routed(strategy) => (Ensemble::new(experts, posterior, strategy, 0)?, None),
        };
        // Every expert in memory before training: a bad checkpoint fails here, not mid-run.
        let mut ensemble = ensemble;
        ensemble.load_all()?;
        Ok(Self {
            ensemble: RefCell::new(ensemble),
            own,
            device: device.clone(),
            expert_flops,
            router_flops: if target == Target::OwnCluster {
                0.0
            } else {
                router_flops
            },
            spent: Cell::new((0.0, 0)),
            description,
        })
    }

    /// The route the router is told the class by (a class-conditioned router).
    pub fn route_without_class(self) -> Self {
        Self {
            ensemble: RefCell::new(self.ensemble.into_inner().route_without_class()),
            ..self
        }
    }

    /// The teacher's velocity at `x_t` (rows of `clusters`) under the condition `c` (the
    /// student's: its dropped labels, vectors and token sequences), as a constant on `x_t`'s device; an expert
    /// that fails (a server that stopped answering) is the error.
    ///
    /// # Shapes
    /// - `x_t`: `[B, X]`, `t`: `[B]`, `c`: B rows, `clusters`: B ids -> `[B, X]`
    pub fn velocity(
        &self,
        x_t: &Tensor<2>,
        t: &Tensor<1>,
        c: &Condition,
        clusters: Option<&[u32]>,
    ) -> anyhow::Result<Tensor<2>> {
        let out_device = x_t.device();
        if let Some(own) = &self.own {
            let rows = clusters.context("own-cluster distillation needs each sample's cluster")?;
            *own.rows.borrow_mut() = rows.iter().map(|&c| c as usize).collect();
        }
        // Through the host: the teacher's tensors carry no autodiff graph.
        let x = HostTensor::from_tensor(x_t.clone()).to_tensor::<2>(&self.device);
        let tt = HostTensor::from_tensor(t.clone()).to_tensor::<1>(&self.device);
        let cc = Condition {
            class: c.class_ids().map(|ids| {
                let n = ids.len();
                Tensor::<1, Int>::from_data(TensorData::new(ids, [n]), &self.device)
            }),
            vector: c
                .vector
                .clone()
                .map(|v| HostTensor::from_tensor(v).to_tensor::<2>(&self.device)),
            tokens: c.tokens.as_ref().map(|s| Tokens {
                embeddings: HostTensor::from_tensor(s.embeddings.clone()).to_tensor::<3>(&self.device),
                mask: HostTensor::from_tensor(s.mask.clone()).to_tensor::<2>(&self.device),
            }),
        };
        let mut ensemble = self.ensemble.borrow_mut();
        let v = ensemble.drift(x, tt, &cc).context("the teacher failed")?;
        let (mut flops, mut rows) = self.spent.get();
        for u in ensemble.usage.drain(..) {
            flops += u
                .rows_per_expert
                .iter()
                .zip(&self.expert_flops)
                .map(|(&r, f)| r as f64 * f)
                .sum::<f64>()
                + u.router_rows as f64 * self.router_flops;
        }
        rows += x_t.dims()[0] as u64;
        self.spent.set((flops, rows));
        Ok(HostTensor::from_tensor(v).to_tensor::<2>(&out_device))
    }

    /// Teacher forward FLOPs per distilled sample, measured so far.
    pub fn flops_per_sample(&self) -> f64 {
        let (flops, rows) = self.spent.get();
        if rows == 0 { 0.0 } else { flops / rows as f64 }
    }
}

/// The teacher of a registry: its experts (every cluster's, local or served) and, for a routed
/// target, its router.
pub fn registry_teacher<'a>(
    reg: &'a Registry,
    target: Target,
    router: RouterChoice,
    device: &Device,
) -> anyhow::Result<Teacher<'a>> {
    let k = reg.index.k;
    let missing: Vec<usize> = (0..k).filter(|c| !reg.index.experts.contains_key(c)).collect();
    if !missing.is_empty() {
        bail!(
            "{}: experts missing for clusters {missing:?}; distillation needs the whole ensemble",
            reg.dir.display()
        );
    }
    // The student's condition reaches every expert: its classes, vectors and token sequences (or
    // their null).
    let classes = reg.expert_classes()?;
    let guidance = Guidance {
        max_class: classes.checked_sub(1),
        vectors: reg
            .index
            .experts
            .values()
            .any(|e| e.condition_dim.is_some() || e.token_dim.is_some()),
        scale: 1.0,
    };
    let experts = (0..k)
        .map(|c| reg.expert_slot(c, device, guidance))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut expert_flops = vec![];
    for c in 0..k {
        let e = &reg.index.experts[&c];
        expert_flops.push(match &e.remote {
            Some(_) => 0.0, // counted by its server, not here
            None => reg
                .verified_checkpoint(ddm_ensemble::registry::claims::Claim::Expert(c))?
                .1
                .meta
                .model
                .flops_per_sample(),
        });
    }
    if expert_flops.contains(&0.0) {
        tracing::warn!("served experts' FLOPs are not counted in the student's training cost");
    }
    let (posterior, router_flops, router_sees_class): (Option<Box<dyn Posterior + 'a>>, f64, bool) =
        match target {
            Target::Routed(s) if s.uses_router() => match router {
                RouterChoice::Learned => {
                    let net = reg.router(device)?;
                    let flops = net.config().flops_per_sample();
                    let sees = net.classes() > 0 && net.classes() == classes;
                    if sees && !net.routes_without_class() {
                        // The student's dropped labels reach the router as the null class.
                        bail!(
                            "the router is conditioned on the class and has no null class (trained without condition dropout): use --teacher own-cluster or --router analytic"
                        );
                    }
                    (Some(Box::new(LearnedRouter { net, k })), flops, sees)
                }
                RouterChoice::Analytic => {
                    let r = reg.analytic_router()?;
                    let rc = Posterior::classes(&r);
                    let sees = rc > 0 && rc == classes;
                    (Some(Box::new(r)), 0.0, sees)
                }
            },
            _ => (None, 0.0, false),
        };
    let description = format!("{target} teacher from the registry {}", reg.dir.display());
    let teacher = Teacher::new(
        experts,
        posterior,
        target,
        device,
        expert_flops,
        router_flops,
        description,
    )?;
    Ok(if router_sees_class {
        teacher
    } else {
        teacher.route_without_class()
    })
}

/// Train a student on a teacher.
pub struct DistillTask<'a> {
    pub teacher: Teacher<'a>,
    /// The student's data (with each sample's cluster as its target, for own-cluster).
    pub data: Box<dyn Fn() -> anyhow::Result<TrainData> + 'a>,
    /// The data's value range and partition, recorded in the student's checkpoint.
    pub range: [f32; 2],
    pub partition: Option<String>,
    /// The latent space of the teacher's experts (None: pixel space), recorded for the student.
    pub latent: Option<ddm_core::vae::LatentSpace>,
    /// The text space of the experts' conditioning vectors, recorded for a student that reads
    /// them.
    pub text: Option<ddm_core::clip::TextSpace>,
}

impl Task for DistillTask<'_> {
    type Net = Model;

    fn name(&self) -> String {
        "student".into()
    }

    fn data(&self) -> anyhow::Result<TrainData> {
        (self.data)()
    }

    fn net_config(&self, config: &TrainConfig, data: &Dataset) -> anyhow::Result<ModelConfig> {
        ddm_trainer::expert::model_config(config, data)
    }

    fn build(&self, net: &ModelConfig, src: &mut impl ParamSource) -> anyhow::Result<Model> {
        Ok(net.build(src)?)
    }

    fn loss(
        &self,
        net: &Model,
        batch: Batch<'_>,
        config: &TrainConfig,
        net_config: &ModelConfig,
        rng: &mut ChaCha8Rng,
    ) -> anyhow::Result<Tensor<1>> {
        let (_, t, x_t) = ddm_trainer::task::noise(&batch.x0, config, rng);
        // The student's condition, dropped, is the teacher's: the student learns the teacher's
        // field given what the student reads (its null condition for what it does not).
        let c = ddm_trainer::task::dropped_condition(&batch, net_config, config.class_dropout, rng);
        let target = self.teacher.velocity(&x_t, &t, &c, batch.targets)?;
        let v = net.predict(x_t, t, &c);
        let diff = v - target;
        Ok((diff.clone() * diff).mean())
    }

    fn finish(
        &self,
        out: &Path,
        ema: &Model,
        net_config: &ModelConfig,
        mut summary: TrainingSummary,
        _data: &TrainData,
    ) -> anyhow::Result<PathBuf> {
        let mut meta = CheckpointMeta::expert(net_config.clone(), self.range, Objective::Velocity);
        meta.partition = self.partition.clone();
        meta.latent = self.latent.clone();
        meta.condition_dim = Some(net_config.condition_dim()).filter(|&d| d > 0);
        let reads_text = meta.condition_dim.is_some() || net_config.token_dim() > 0;
        meta.text = self.text.clone().filter(|_| reads_text);
        meta.source = Some(format!(
            "ddm distill: a student of the {}",
            self.teacher.description
        ));
        let teacher_flops = self.teacher.flops_per_sample() * summary.samples_seen as f64;
        meta.extra.insert("student_flops".into(), summary.flops.into());
        meta.extra.insert("teacher_flops".into(), teacher_flops.into());
        summary.flops += teacher_flops;
        let seed = summary.seed;
        meta.training = Some(summary);
        let path = out.join(STUDENT_FILE);
        Checkpoint {
            meta,
            tensors: ema.state_dict(),
        }
        .save(&path)?;
        ddm_trainer::expert::write_samples(
            ema,
            net_config,
            &Objective::Velocity,
            self.range,
            &out.join("samples.png"),
            seed,
        )?;
        Ok(path)
    }

    fn snapshot(&self, ema: &Model, net_config: &ModelConfig, path: &Path, seed: u64) -> anyhow::Result<()> {
        ddm_trainer::expert::write_samples(ema, net_config, &Objective::Velocity, self.range, path, seed)
    }
}

/// The data of a partition for distillation: every shard, each sample's cluster its target.
pub fn partition_data(partition: &ddm_datasets::partition::Partition) -> anyhow::Result<TrainData> {
    let (data, clusters) = partition.all().context("reading the partition's shards")?;
    Ok(TrainData {
        data,
        targets: Some(clusters),
        fingerprint: partition.fingerprint().to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ddm_core::flow::{VelocityError, VelocityField};

    /// A field whose velocity is each sample's count of caption tokens (0 without a caption).
    struct CountsTokens;

    impl VelocityField<2> for CountsTokens {
        fn velocity(&self, x_t: Tensor<2>, _t: Tensor<1>, c: &Condition) -> Result<Tensor<2>, VelocityError> {
            let [n, d] = x_t.dims();
            Ok(match &c.tokens {
                None => x_t.zeros_like(),
                Some(s) => s.mask.clone().sum_dim(1).expand([n, d]), // [N, 1] -> [N, X]
            })
        }
    }

    /// The student's token sequences reach the teacher's experts (a PixArt teacher reads them).
    #[test]
    fn the_teacher_reads_the_students_token_sequences() {
        let device = ddm_core::device::cpu();
        let teacher = Teacher::new(
            vec![ExpertSlot::ready(Box::new(CountsTokens))],
            None,
            Target::OwnCluster,
            &device,
            vec![1.0],
            0.0,
            "a test teacher".into(),
        )
        .unwrap();
        let x = Tensor::<2>::zeros([2, 3], &device);
        let t = Tensor::<1>::ones([2], &device);
        let mask = Tensor::<2>::from_floats([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0]], &device);
        let c = Condition::tokens(Tensor::<3>::ones([2, 4, 5], &device), mask);
        let v = teacher.velocity(&x, &t, &c, Some(&[0, 0])).unwrap();
        assert_eq!(
            HostTensor::from_tensor(v).data,
            vec![2.0, 2.0, 2.0, 3.0, 3.0, 3.0]
        );
    }
}

//! `ddm distill`: one dense student trained on the ensemble's velocity.

use std::path::PathBuf;

use anyhow::bail;
use clap::{Args, ValueEnum};
use ddm_datasets::partition::Partition;
use ddm_distill::{DistillTask, Target, partition_data, registry_teacher};
use ddm_ensemble::registry::{Location, Registry};
use ddm_ensemble::sample::RouterChoice;
use ddm_ensemble::strategy::Strategy;

use super::sample::RouterArg;
use super::settings::{TrainSettings, run_task};

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum TeacherArg {
    /// The expert of each sample's own cluster (the DDM paper's distillation; no router, one
    /// expert per sample).
    OwnCluster,
    /// The routed ensemble with --strategy (default full: every expert, weighted by the router).
    Routed,
}

/// Distill the registry's ensemble into one dense student: the student regresses the teacher's
/// velocity at noised points of the partition's data, with the island's training loop (resumable:
/// rerun the same command; metrics, EMA, sample grids). Writes OUT/expert.safetensors, an expert
/// of the partition with no cluster (sample it with `ddm sample --checkpoint`), whose training
/// FLOPs include the teacher's forwards.
#[derive(Args, Debug)]
#[command(after_help = EXAMPLES)]
pub struct DistillArgs {
    /// The registry whose ensemble is the teacher.
    #[arg(long)]
    pub registry: Location,
    /// The registry's partition: the student trains on all of its shards.
    #[arg(long)]
    pub partition: PathBuf,
    /// Output directory.
    #[arg(long)]
    pub out: PathBuf,
    /// What the student regresses.
    #[arg(long, value_enum, default_value = "own-cluster")]
    pub teacher: TeacherArg,
    /// The routed teacher's strategy: full, top-K, sample[:T], nucleus:P[:T], threshold:TAU.
    #[arg(long)]
    pub strategy: Option<String>,
    /// The routed teacher's router.
    #[arg(long, value_enum, default_value = "learned")]
    pub router: RouterArg,
    #[command(flatten)]
    pub settings: TrainSettings,
}

const EXAMPLES: &str = "Examples:
  ddm distill --registry reg --partition part --out student --model DiT-T/4 --steps 4000
  ddm distill --registry reg --partition part --out student-full --teacher routed --strategy full
  ddm distill --registry pixart-reg --partition part-of-captions --out student --model PixArt-XS/2 --class-dropout 0.1
  ddm sample --checkpoint student/expert.safetensors --n 64 --out student.png";

pub fn run(args: DistillArgs) -> anyhow::Result<u8> {
    let config = args.settings.resolve_config()?;
    if config.objective != ddm_core::checkpoint::Objective::Velocity {
        bail!("a student predicts the velocity: remove `objective` from the --config file");
    }
    let target = match (args.teacher, &args.strategy) {
        (TeacherArg::OwnCluster, Some(_)) => bail!("--strategy is for --teacher routed"),
        (TeacherArg::OwnCluster, None) => Target::OwnCluster,
        (TeacherArg::Routed, s) => {
            let s: Strategy = s
                .as_deref()
                .unwrap_or("full")
                .parse()
                .map_err(|e: String| anyhow::anyhow!(e))?;
            if matches!(s, Strategy::Trajectory | Strategy::Oracle { .. }) {
                bail!(
                    "--strategy {s}: a teacher answers each noised point on its own; use full, top-K, sample, nucleus or threshold"
                );
            }
            Target::Routed(s)
        }
    };
    let partition = Partition::open(&args.partition)?;
    let reg = Registry::open(&args.registry.local()?)?;
    if reg.index.partition != partition.fingerprint() {
        bail!(
            "the registry {} holds experts of partition {}, but {} is partition {}",
            args.registry,
            ddm_core::text::short(&reg.index.partition, 12),
            args.partition.display(),
            ddm_core::text::short(partition.fingerprint(), 12)
        );
    }
    let classes = reg.expert_classes()?;
    let vectors = reg.index.experts.values().any(|e| e.condition_dim.is_some());
    let tokens = reg.index.experts.values().any(|e| e.token_dim.is_some());
    let mut config = config;
    // The student sees what the experts see: the class, the conditioning vectors, the caption's
    // tokens (a PixArt student reads them from the partition's data).
    config.class_conditional |= classes > 0;
    config.condition_vectors |= vectors;
    if tokens && !config.model.starts_with("PixArt-") {
        bail!(
            "the experts are PixArts reading each caption's token sequence, and --model {} reads none: distill into a PixArt (--model PixArt-XS/2, or another PixArt-<size>/<patch>)",
            config.model
        );
    }
    if (classes > 0 || vectors || tokens) && config.class_dropout > 0.0 {
        // The student's dropped conditions reach the experts as the null class and the zero
        // vector: they must have learnt them.
        if let Some((&k, _)) = reg.index.experts.iter().find(|(_, e)| e.remote.is_none()) {
            let (_, ckpt) = reg.verified_checkpoint(ddm_ensemble::registry::claims::Claim::Expert(k))?;
            if !ckpt.meta.model.has_null_condition() {
                bail!(
                    "the experts were trained without condition dropout (no null class, vector or caption): distill with --class-dropout 0"
                );
            }
        }
    }
    let device = ddm_core::device::device(args.settings.device.primary())?;
    let router = match args.router {
        RouterArg::Learned => RouterChoice::Learned,
        RouterArg::Analytic => RouterChoice::Analytic,
    };
    let teacher = registry_teacher(&reg, target, router, &device)?;
    let range = partition.manifest().dataset.range;
    let task = DistillTask {
        teacher,
        data: Box::new(|| partition_data(&partition)),
        range,
        partition: Some(partition.fingerprint().to_string()),
        latent: reg.index.latent.clone(),
        text: reg.index.text.clone(),
    };
    run_task(&task, &args.settings, config, &args.out)
}

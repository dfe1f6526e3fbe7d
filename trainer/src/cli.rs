//! The command line of an island: shared by the `ddm-trainer` binary and `ddm train`.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use ddm_core::flow::TimeSampler;

use crate::config::TrainConfig;
use crate::island::{self, Target};
use crate::train::{ExpertTask, Outcome, Run};

/// Train one expert on one island: reads the partition's partition.json and this island's shard
/// (verified by sha256), trains with flow matching, and writes OUT/expert.safetensors (EMA weights)
/// plus OUT/train-state.safetensors (the whole loop state, saved every --checkpoint-every steps),
/// OUT/metrics.jsonl and sample grids. Opens no network connection.
///
/// Rerunning the same command resumes from the last checkpoint. SIGINT/SIGTERM save the state and
/// exit with status 3 (resumable). A non-finite loss stops the run with status 2 and keeps the last
/// good checkpoint.
#[derive(Args, Debug)]
pub struct TrainArgs {
    /// The partition directory (`ddm partition --out`); only partition.json and this island's
    /// shard are read.
    #[arg(long)]
    pub partition: PathBuf,
    /// The cluster to train (default: $SLURM_ARRAY_TASK_ID, else $JOB_COMPLETION_INDEX).
    #[arg(long, conflicts_with = "monolith")]
    pub cluster: Option<usize>,
    /// Train on all shards together: the monolith baseline.
    #[arg(long)]
    pub monolith: bool,
    /// Output directory (checkpoints, metrics, samples).
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub settings: TrainSettings,
}

/// The training settings shared by experts (`ddm train`) and routers (`ddm train-router`).
#[derive(Args, Debug, Clone)]
pub struct TrainSettings {
    /// A TOML file of training settings (keys as the flags below, with underscores); flags win.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Network: a DiT size (DiT-T/4, DiT-Bench/4, DiT-S/2, DiT-B/2, ...) or `mlp` [default: DiT-T/4].
    #[arg(long)]
    pub model: Option<String>,
    /// MLP width (vector data) [default: 256].
    #[arg(long)]
    pub mlp_hidden: Option<usize>,
    /// MLP residual blocks (vector data) [default: 3].
    #[arg(long)]
    pub mlp_depth: Option<usize>,
    /// Optimizer steps [default: 2000].
    #[arg(long)]
    pub steps: Option<u64>,
    /// Batch size [default: 64].
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Peak learning rate [default: 1e-4].
    #[arg(long)]
    pub lr: Option<f64>,
    /// Warm-up steps [default: 100].
    #[arg(long)]
    pub warmup_steps: Option<u64>,
    /// AdamW weight decay [default: 0].
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// Gradient-norm clipping, 0 = off [default: 1.0].
    #[arg(long)]
    pub grad_clip: Option<f64>,
    /// EMA decay [default: 0.999].
    #[arg(long)]
    pub ema_decay: Option<f64>,
    /// Time sampler: uniform, or logit-normal:MEAN:STD [default: uniform].
    #[arg(long)]
    pub time_sampler: Option<String>,
    /// Condition on class labels (with label dropout for guidance).
    #[arg(long)]
    pub class_conditional: bool,
    /// Label dropout probability for guidance [default: 0.1].
    #[arg(long)]
    pub class_dropout: Option<f64>,
    /// Save the training state every N steps [default: 500].
    #[arg(long)]
    pub checkpoint_every: Option<u64>,
    /// Write a grid of samples every N steps, 0 = only at the end [default: 0].
    #[arg(long)]
    pub sample_every: Option<u64>,
    /// Metrics line every N steps [default: 10].
    #[arg(long)]
    pub log_every: Option<u64>,
    /// Seed [default: 0].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Backend: cpu, wgpu, cuda.
    #[arg(long, default_value = "cpu")]
    pub device: ddm_core::device::DeviceChoice,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

fn parse_time_sampler(s: &str) -> anyhow::Result<TimeSampler> {
    if s == "uniform" {
        return Ok(TimeSampler::Uniform);
    }
    let parts: Vec<&str> = s.split(':').collect();
    match parts.as_slice() {
        ["logit-normal"] => Ok(TimeSampler::LogitNormal { mean: 0.0, std: 1.0 }),
        ["logit-normal", m, s] => Ok(TimeSampler::LogitNormal {
            mean: m.parse()?,
            std: s.parse()?,
        }),
        _ => anyhow::bail!("unknown time sampler `{s}`: expected uniform or logit-normal[:MEAN:STD]"),
    }
}

impl TrainSettings {
    /// Defaults, then the TOML file, then the flags.
    pub fn resolve_config(&self) -> anyhow::Result<TrainConfig> {
        let mut c = match &self.config {
            Some(p) => {
                let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
                toml::from_str(&text).with_context(|| format!("{}: not a training config", p.display()))?
            }
            None => TrainConfig::default(),
        };
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = &self.$f { c.$f = v.clone(); } )* };
        }
        set!(
            model,
            mlp_hidden,
            mlp_depth,
            steps,
            batch_size,
            lr,
            warmup_steps,
            weight_decay,
            grad_clip,
            ema_decay,
            class_dropout,
            checkpoint_every,
            sample_every,
            log_every,
            seed
        );
        if let Some(s) = &self.time_sampler {
            c.time_sampler = parse_time_sampler(s)?;
        }
        c.class_conditional |= self.class_conditional;
        c.validate()
            .map_err(|e| anyhow::anyhow!("bad training config: {e}"))?;
        Ok(c)
    }
}

/// Exit status of an interrupted (resumable) run.
pub const EXIT_INTERRUPTED: u8 = 3;

/// Print how a run ended; returns the process exit status (0 done, 3 interrupted).
pub fn report(outcome: Outcome, out: &std::path::Path) -> u8 {
    match outcome {
        Outcome::Finished {
            checkpoint,
            final_loss,
        } => {
            println!(
                "wrote {} (final loss {:.4})",
                checkpoint.display(),
                final_loss.unwrap_or(f64::NAN)
            );
            0
        }
        Outcome::Interrupted { step } => {
            eprintln!(
                "interrupted: state saved at step {step} in {}; rerun the same command to resume",
                out.display()
            );
            EXIT_INTERRUPTED
        }
    }
}

/// Run `task` on a partition with these settings; prints the outcome, returns the exit status.
pub fn run_task<T: crate::task::Task>(
    task: &T,
    settings: &TrainSettings,
    config: crate::config::TrainConfig,
    partition: &std::path::Path,
    manifest: ddm_datasets::partition::PartitionManifest,
    out: &std::path::Path,
) -> anyhow::Result<u8> {
    let outcome = crate::train::run(
        task,
        Run {
            partition_dir: partition.to_path_buf(),
            manifest,
            out: out.to_path_buf(),
            config,
            device: settings.device,
            progress: !settings.quiet,
        },
    )?;
    Ok(report(outcome, out))
}

/// Run an island from its arguments; returns the process exit status.
pub fn run(args: TrainArgs) -> anyhow::Result<u8> {
    let config = args.settings.resolve_config()?;
    let manifest = ddm_datasets::partition::read_manifest(&args.partition)?;
    let target = if args.monolith {
        Target::Monolith
    } else {
        Target::Cluster(island::resolve_cluster(args.cluster)?)
    };
    run_task(
        &ExpertTask { target },
        &args.settings,
        config,
        &args.partition,
        manifest,
        &args.out,
    )
}

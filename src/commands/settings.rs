//! The training settings every training verb shares (`ddm train`, `ddm-trainer`,
//! `ddm train-router`, `ddm eval train-classifier`): flags over a TOML file over
//! [`TrainConfig::default`], which is also where every `[default: ...]` in `--help` comes from.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, ValueEnum};
use ddm_core::checkpoint::Objective;
use ddm_core::flow::DdpmSchedule;
use ddm_core::flow::TimeSampler;
use ddm_trainer::config::TrainConfig;
use ddm_trainer::task::Task;
use ddm_trainer::train::{Outcome, Run};

/// `WHAT [default: VALUE]`, the value read from [`TrainConfig::default`].
fn default_help(what: &str, value: impl std::fmt::Display) -> String {
    format!("{what} [default: {value}]")
}

fn time_sampler_name(t: &TimeSampler) -> String {
    match t {
        TimeSampler::Uniform => "uniform".into(),
        TimeSampler::LogitNormal { mean, std } => format!("logit-normal:{mean}:{std}"),
    }
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum ObjectiveArg {
    /// The network predicts the flow-matching velocity e - x0.
    Velocity,
    /// DDPM noise prediction with the linear beta schedule (1e-4..0.02 over 1000 steps).
    EpsilonLinear,
    /// DDPM noise prediction with the cosine schedule (s = 0.008).
    EpsilonCosine,
}

impl ObjectiveArg {
    pub fn objective(self) -> Objective {
        match self {
            ObjectiveArg::Velocity => Objective::Velocity,
            ObjectiveArg::EpsilonLinear => Objective::Epsilon {
                schedule: DdpmSchedule::linear_default(),
            },
            ObjectiveArg::EpsilonCosine => Objective::Epsilon {
                schedule: DdpmSchedule::Cosine { s: 0.008 },
            },
        }
    }
}

/// The training settings shared by experts (`ddm train`) and routers (`ddm train-router`).
#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Training settings")]
pub struct TrainSettings {
    /// A TOML file of training settings (keys as the flags below, with underscores); flags win.
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[arg(long, help = default_help("Network: a DiT size (DiT-T/4, DiT-Bench/4, DiT-S/2, DiT-B/2, ...), `mlp`, or a PixArt of a DiT size (PixArt-S/2: cross-attention to each caption's token states, `c_tokens` from ddm encode-text --tokens)", TrainConfig::default().model))]
    pub model: Option<String>,
    #[arg(long, value_parser = super::values::count(1, super::values::MAX_WIDTH), help = default_help("MLP width (vector data)", TrainConfig::default().mlp_hidden))]
    pub mlp_hidden: Option<usize>,
    #[arg(long, value_parser = super::values::count(0, super::values::MAX_DEPTH), help = default_help("MLP residual blocks (vector data)", TrainConfig::default().mlp_depth))]
    pub mlp_depth: Option<usize>,
    #[arg(long, value_parser = super::values::count64(1, super::values::MAX_STEPS), help = default_help("Optimizer steps", TrainConfig::default().steps))]
    pub steps: Option<u64>,
    #[arg(long, value_parser = super::values::count(1, super::values::MAX_BATCH), help = default_help("Batch size", TrainConfig::default().batch_size))]
    pub batch_size: Option<usize>,
    #[arg(long, value_parser = super::values::positive, help = default_help("Peak learning rate", TrainConfig::default().lr))]
    pub lr: Option<f64>,
    #[arg(long, value_parser = super::values::count64(0, super::values::MAX_STEPS), help = default_help("Warm-up steps", TrainConfig::default().warmup_steps))]
    pub warmup_steps: Option<u64>,
    #[arg(long, value_parser = super::values::non_negative, help = default_help("AdamW weight decay", TrainConfig::default().weight_decay))]
    pub weight_decay: Option<f64>,
    #[arg(long, value_parser = super::values::non_negative, help = default_help("Gradient-norm clipping, 0 = off", TrainConfig::default().grad_clip))]
    pub grad_clip: Option<f64>,
    #[arg(long, value_parser = super::values::below_one, help = default_help("EMA decay, reached after the warm-up min(decay, (1 + step) / (10 + step)): 0.995 at step 1800, 0.999 only after about 9000 steps, so a shorter run ignores a decay above its own", TrainConfig::default().ema_decay))]
    pub ema_decay: Option<f64>,
    #[arg(long, help = default_help("Time sampler: uniform, or logit-normal:MEAN:STD", time_sampler_name(&TrainConfig::default().time_sampler)))]
    pub time_sampler: Option<String>,
    /// Condition on class labels (with label dropout for guidance).
    #[arg(long)]
    pub class_conditional: bool,
    #[arg(long, value_parser = super::values::below_one, help = default_help("Label dropout probability for guidance", TrainConfig::default().class_dropout))]
    pub class_dropout: Option<f64>,
    #[arg(long, value_parser = super::values::count64(1, super::values::MAX_STEPS), help = default_help("Save the training state every N steps", TrainConfig::default().checkpoint_every))]
    pub checkpoint_every: Option<u64>,
    #[arg(long, value_parser = super::values::count64(0, super::values::MAX_STEPS), help = default_help("Write a grid of samples every N steps, 0 = only at the end", TrainConfig::default().sample_every))]
    pub sample_every: Option<u64>,
    #[arg(long, value_parser = super::values::count64(1, super::values::MAX_STEPS), help = default_help("Metrics line every N steps", TrainConfig::default().log_every))]
    pub log_every: Option<u64>,
    #[arg(long, help = default_help("Seed", TrainConfig::default().seed))]
    pub seed: Option<u64>,
    #[arg(long, help = default_help("Compute precision: f32, or bf16/f16 with f32 master weights, optimizer and EMA (f16 with loss scaling; bf16 for CUDA GPUs, f16 for Vulkan/Metal ones; on the CPU f32 is fastest)", TrainConfig::default().precision))]
    pub precision: Option<ddm_core::precision::Precision>,
    /// Backend: cpu, wgpu[:API][:ADAPTER], cuda[:N]. Several, comma-separated (cuda:0,cuda:1,...),
    /// train an expert data parallel: each computes a share of every batch, the first holds the
    /// weights (the same result as one device, to floating-point rounding).
    #[arg(long, default_value = "cpu")]
    pub device: ddm_core::device::Devices,
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
            seed,
            precision
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
pub fn report(outcome: Outcome, out: &Path) -> u8 {
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

/// Run `task` with these settings (the bar hidden with `--quiet`).
pub fn train<T: Task>(
    task: &T,
    settings: &TrainSettings,
    config: TrainConfig,
    out: &Path,
) -> anyhow::Result<Outcome> {
    ddm_trainer::train::run(
        task,
        Run {
            out: out.to_path_buf(),
            config,
            devices: settings.device.clone(),
            progress: !settings.quiet,
        },
    )
}

/// Run `task` with these settings; prints the outcome, returns the exit status.
pub fn run_task<T: Task>(
    task: &T,
    settings: &TrainSettings,
    config: TrainConfig,
    out: &Path,
) -> anyhow::Result<u8> {
    Ok(report(train(task, settings, config, out)?, out))
}

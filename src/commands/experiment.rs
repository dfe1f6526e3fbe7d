//! `ddm experiment paper-table`: ensemble vs FLOP-matched monolith (the experiment itself is
//! `ddm_eval::paper_table`).

use std::path::PathBuf;

use clap::{Args, Subcommand};
use ddm_eval::paper_table::{self, PaperTableConfig};

/// Run the paper's comparison at a size this machine can afford: FLOP-matched monolith vs routed
/// ensembles of a clustered and a random partition, at 25/50/75/100% of the training budget, on
/// Fashion-MNIST (FD etc. in the committed classifier's features) and on a Gaussian mixture
/// (exact metrics). Writes OUT/table.md, OUT/fashion-mnist/fd.png, OUT/gmm/mixture.png and every
/// row to OUT/*/results.jsonl. Rerunning the same command resumes.
#[derive(Args, Debug)]
#[command(
    after_help = "Examples:\n  ddm experiment paper-table --out runs/paper-table\n  ddm experiment paper-table --gmm-only --gmm-steps 500 --out runs/gmm-table"
)]
pub struct ExperimentArgs {
    #[command(subcommand)]
    pub command: ExperimentCommand,
}

#[derive(Subcommand, Debug)]
pub enum ExperimentCommand {
    /// Monolith vs ensembles (top-1, top-2, full, sample, threshold, analytic top-1, random top-1);
    /// class-conditional (--conditional) and text-conditional (--text) settings.
    PaperTable(PaperTableArgs),
}

#[derive(Args, Debug, Clone)]
pub struct PaperTableArgs {
    #[arg(long, default_value = "runs/paper-table")]
    pub out: PathBuf,
    /// Training images (see `ddm partition --data`).
    #[arg(long, default_value = "fashion-mnist")]
    pub data: String,
    /// Real images the samples are compared with.
    #[arg(long, default_value = "fashion-mnist:test")]
    pub reference: String,
    /// Islands / clusters.
    #[arg(long, value_parser = super::values::count(1, super::values::MAX_CLUSTERS), default_value_t = 4)]
    pub k: usize,
    /// Expert and monolith network.
    #[arg(long, default_value = "DiT-T/4")]
    pub model: String,
    /// The monolith's batch B; each expert trains with B / K.
    #[arg(long, value_parser = super::values::count(1, super::values::MAX_BATCH), default_value_t = 64)]
    pub batch_size: usize,
    /// Training steps of the monolith and of every expert.
    #[arg(long, value_parser = super::values::count64(1, super::values::MAX_STEPS), default_value_t = 800)]
    pub steps: u64,
    #[arg(long, value_parser = super::values::positive, default_value_t = 5e-4)]
    pub lr: f64,
    /// Router network.
    #[arg(long, default_value = "DiT-XS/4")]
    pub router_model: String,
    /// Router steps (default: --steps).
    #[arg(long, value_parser = super::values::count64(1, super::values::MAX_STEPS))]
    pub router_steps: Option<u64>,
    /// Router batch (default: --batch-size).
    #[arg(long, value_parser = super::values::count(1, super::values::MAX_BATCH))]
    pub router_batch_size: Option<usize>,
    /// Checkpoints: evaluate after each 1/C of the steps.
    #[arg(long, value_parser = super::values::count64(1, 100), default_value_t = 4)]
    pub checkpoints: u64,
    /// Samples per system and checkpoint (same noise for every system).
    #[arg(long, value_parser = super::values::count(1, super::values::MAX_SAMPLES), default_value_t = 500)]
    pub n: usize,
    /// Steps per sample (of --solver).
    #[arg(long, value_parser = super::values::count(1, super::values::MAX_SAMPLING_STEPS), default_value_t = 16)]
    pub sample_steps: usize,
    /// The solver every system samples with (as in `ddm sample`); a resumed run keeps its own.
    #[arg(long, value_enum, default_value = "euler")]
    pub solver: super::sample::SolverArg,
    /// Where the steps fall: `uniform`, `shifted:S` or `beta[:A:B]` (as in `ddm sample`).
    #[arg(long, default_value = "uniform")]
    pub schedule: ddm_core::flow::StepSchedule,
    /// tau of the threshold strategy.
    #[arg(long, value_parser = super::values::probability, default_value_t = 0.1)]
    pub threshold: f64,
    /// A classifier checkpoint (default: the committed one).
    #[arg(long)]
    pub classifier: Option<PathBuf>,
    /// Gaussian-mixture setting: steps (monolith batch 256, experts 256 / K, MLP 256 x 3).
    #[arg(long, value_parser = super::values::count64(1, super::values::MAX_STEPS), default_value_t = 2000)]
    pub gmm_steps: u64,
    /// Only the Gaussian-mixture setting.
    #[arg(long, conflicts_with = "skip_gmm")]
    pub gmm_only: bool,
    /// Skip the Gaussian-mixture setting.
    #[arg(long)]
    pub skip_gmm: bool,
    /// Run the class-conditional Fashion-MNIST setting (OUT/fashion-mnist-conditional) instead of
    /// the unconditional one: conditional experts and monolith, a router with and one without the
    /// class, class-balanced samples, guided rows.
    #[arg(long)]
    pub conditional: bool,
    /// Run the text-conditional Fashion-MNIST setting (OUT/fashion-mnist-text) instead: captions
    /// measured from the images (`ddm data captions`), a text encoder trained on them in the run,
    /// experts, monolith and a router reading each caption's vector (and a router without it),
    /// samples asked for prompts made from test images, scored for prompt adherence too.
    #[arg(long, conflicts_with_all = ["conditional", "gmm_only"])]
    pub text: bool,
    /// The text setting's text encoder (clip:128:2:4, batch 256): training steps.
    #[arg(long, value_parser = super::values::count64(1, super::values::MAX_STEPS), default_value_t = 600)]
    pub text_encoder_steps: u64,
    /// Classifier-free guidance scale of the guided rows (with --conditional or --text).
    #[arg(long, value_parser = super::values::guidance, default_value_t = 2.0)]
    pub guidance: f64,
    #[arg(long, default_value = "cpu")]
    pub device: ddm_core::device::DeviceChoice,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// No progress bars.
    #[arg(long)]
    pub quiet: bool,
}

impl From<PaperTableArgs> for PaperTableConfig {
    fn from(a: PaperTableArgs) -> Self {
        PaperTableConfig {
            out: a.out,
            data: a.data,
            reference: a.reference,
            k: a.k,
            model: a.model,
            batch_size: a.batch_size,
            steps: a.steps,
            lr: a.lr,
            router_model: a.router_model,
            router_steps: a.router_steps,
            router_batch_size: a.router_batch_size,
            checkpoints: a.checkpoints,
            n: a.n,
            sample_steps: a.sample_steps,
            solver: a.solver.into(),
            schedule: a.schedule,
            threshold: a.threshold,
            classifier: a.classifier,
            gmm_steps: a.gmm_steps,
            gmm_only: a.gmm_only,
            skip_gmm: a.skip_gmm,
            conditional: a.conditional,
            text: a.text,
            text_encoder_steps: a.text_encoder_steps,
            guidance: a.guidance,
            device: a.device,
            seed: a.seed,
            quiet: a.quiet,
        }
    }
}

pub fn run(args: ExperimentArgs) -> anyhow::Result<u8> {
    match args.command {
        ExperimentCommand::PaperTable(a) => {
            let (doc, path) = paper_table::run(&a.into())?;
            println!("{doc}\nwrote {}", path.display());
            Ok(0)
        }
    }
}

//! `ddm sample`: generate from the routed ensemble.

use std::path::PathBuf;

use clap::{Args, ValueEnum};
use ddm_core::flow::Solver;
use ddm_ensemble::sample::{Classes, Decode, RouterChoice, SampleOptions, Source};
use ddm_ensemble::strategy::Strategy;

use super::DeviceArgs;

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum RouterArg {
    /// The registered, trained router.
    Learned,
    /// The analytic router from the islands' statistics (no training).
    Analytic,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum SolverArg {
    /// One evaluation per step, first order.
    Euler,
    /// Two evaluations per step, second order.
    Heun,
    /// DPM-Solver++(2M): one evaluation per step, second order (multistep, per sample); in
    /// README's FD-vs-NFE table, 6 of its steps match 50 Euler steps for the routed ensemble.
    #[value(name = "dpm++2m")]
    DpmSolver2m,
    /// UniPC: DPM-Solver++(2M) plus a corrector that reuses the next step's evaluation; one
    /// evaluation per step. In README's table, 4 of its steps match 50 Euler steps for the routed
    /// ensemble.
    #[value(name = "unipc")]
    UniPc,
}

impl From<SolverArg> for Solver {
    fn from(s: SolverArg) -> Self {
        match s {
            SolverArg::Euler => Solver::Euler,
            SolverArg::Heun => Solver::Heun,
            SolverArg::DpmSolver2m => Solver::DpmSolver2m,
            SolverArg::UniPc => Solver::UniPc,
        }
    }
}

/// Sample from the routed ensemble: at every step, for every sample, the router weights the experts
/// and the strategy picks which run (grouped so each expert runs once per step). Writes a PNG grid
/// (OUT), the samples (OUT with .safetensors) and a report (OUT with .json: expert usage per step
/// range, time per step, peak memory).
#[derive(Args, Debug)]
#[command(after_help = EXAMPLES)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["registry", "checkpoint"])))]
pub struct SampleArgs {
    /// The registry: a directory, or an object store (s3://bucket/prefix, gs://, az://;
    /// credentials and endpoint from the environment, e.g. AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL).
    #[arg(long)]
    pub registry: Option<ddm_ensemble::registry::Location>,
    /// Sample one dense checkpoint instead of a registry's ensemble: a monolith, a student from
    /// `ddm distill`, or a single expert.
    #[arg(long, conflicts_with_all = ["strategy", "allow_missing", "max_memory"])]
    pub checkpoint: Option<PathBuf>,
    /// Number of samples.
    #[arg(long, default_value_t = 64, value_parser = super::values::count(1, super::values::MAX_SAMPLES))]
    pub n: usize,
    /// Integration steps from t = 1 to 0. The default, 12 UniPC steps, comes from README's
    /// FD-vs-NFE measurements: at a quarter of the cost of 50 Euler steps, as good or at most 0.13
    /// FD worse on every registry measured (class-conditional top-1, trajectory and monolith;
    /// unconditional trajectory). A class-conditional ensemble needs only 8.
    #[arg(long, default_value_t = 12, value_parser = super::values::count(1, super::values::MAX_SAMPLING_STEPS))]
    pub steps: usize,
    /// Samples integrated at once: --n samples are drawn in batches of this many (the noise is
    /// the same as in one batch; the memory is one batch's).
    #[arg(long, default_value_t = 1024, value_parser = super::values::count(1, super::values::MAX_BATCH))]
    pub batch_size: usize,
    /// full, top-1, top-K, sample[:T], nucleus:P[:T], threshold:TAU, trajectory, oracle:K.
    /// Default: top-1 when the router sees the class (--class with a class-conditioned router),
    /// else trajectory (the paper table in README measured both).
    #[arg(long)]
    pub strategy: Option<String>,
    #[arg(long, value_enum, default_value = "learned")]
    pub router: RouterArg,
    /// The ODE solver (default: unipc, see --steps).
    #[arg(long, value_enum, default_value = "unipc")]
    pub solver: SolverArg,
    /// Where the steps fall between noise (t = 1) and data: `uniform`, `shifted:S` (SD3's
    /// schedule, S > 1 spends more steps near noise), or `beta` / `beta:A:B` (beta sampling,
    /// made for few steps: Beta(0.6, 0.6) puts more steps near noise and near the data).
    #[arg(long, default_value = "uniform")]
    pub schedule: ddm_core::flow::StepSchedule,
    /// Sample even if some experts are missing (their islands failed) or fail while sampling (a
    /// server that stops answering, a checkpoint that is gone or corrupted): the router's weights
    /// are renormalised over the experts present.
    #[arg(long)]
    pub allow_missing: bool,
    /// Keep the loaded experts' weights under this many MiB: the least recently used are unloaded
    /// and loaded again when next selected (same samples, more time). For ensembles larger than
    /// memory.
    #[arg(long, value_name = "MIB", value_parser = super::values::mib)]
    pub max_memory: Option<u64>,
    /// Sample this class, or `all` for equal counts of every class (class-conditional experts
    /// only).
    #[arg(long)]
    pub class: Option<Classes>,
    /// The per-sample condition, a safetensors file, row i for sample i: pooled vectors `c`
    /// [N, Dc] (models trained with --condition-vectors), and/or token sequences `c_tokens`
    /// [N, L, Dt] with their mask `c_mask` [N, L] (a PixArt's caption; a router trained with
    /// --condition-tokens).
    #[arg(long)]
    pub condition: Option<PathBuf>,
    /// Sample this prompt (every sample): encoded with --text-encoder into the vector and token
    /// states that models trained on `ddm encode-text` output read (--condition-vectors,
    /// --condition-tokens, a PixArt).
    #[arg(long, conflicts_with_all = ["condition", "prompts"], requires = "text_encoder")]
    pub prompt: Option<String>,
    /// Prompts from a file (one a line, or a .jsonl with a `caption` field a line): sample i gets
    /// prompt i modulo their count.
    #[arg(long, conflicts_with = "condition", requires = "text_encoder")]
    pub prompts: Option<PathBuf>,
    /// The text encoder prompts go through: the one whose vectors the models were trained on
    /// (`ddm import --from transformers-clip`; the registry checks it).
    #[arg(long)]
    pub text_encoder: Option<PathBuf>,
    /// Classifier-free guidance scale on the condition: --class, --condition or prompts (1 =
    /// none; 0 to 100). The experts must have been trained with condition dropout.
    #[arg(long, default_value_t = 1.0, value_parser = super::values::guidance)]
    pub guidance: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Experts trained on VAE latents: decode the samples into images with the registry's VAE
    /// (the PNG shows images; OUT's .safetensors holds the images as `x0`, the samples as
    /// `latents`).
    #[arg(long)]
    pub decode: bool,
    /// Decode with this autoencoder checkpoint instead (it must be the experts' VAE; needed with
    /// --checkpoint). Implies --decode.
    #[arg(long)]
    pub vae: Option<PathBuf>,
    /// The PNG grid to write.
    #[arg(long, default_value = "samples.png")]
    pub out: PathBuf,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// The precision the experts compute in: f32, or bf16/f16 (their f32 weights cast when
    /// loaded; the router, the solver and the decoder stay f32). For GPUs: bf16 on CUDA, f16 on
    /// Vulkan/Metal; on the CPU f32 is fastest.
    #[arg(long, default_value = "f32")]
    pub precision: ddm_core::precision::Precision,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

const EXAMPLES: &str = "Examples:
  ddm sample --registry reg --strategy top-1 --n 64 --out samples.png
  ddm sample --registry reg --strategy sample --router analytic --n 500 --steps 16 --out s.png
  ddm sample --registry reg --class 3 --guidance 2 --allow-missing
  ddm sample --registry reg --class all --strategy trajectory --n 100 --out balanced.png
  ddm sample --registry reg --strategy top-2 --max-memory 2048
  ddm sample --checkpoint student/expert.safetensors --n 64 --out student.png
  ddm sample --registry latent-reg --decode --n 64 --out decoded.png
  ddm sample --registry text-reg --prompt \"a dark ankle boot\" --text-encoder text-encoder.safetensors --guidance 3 --n 16";

pub fn run(args: SampleArgs) -> anyhow::Result<()> {
    let strategy: Option<Strategy> = match &args.strategy {
        Some(s) => Some(s.parse().map_err(|e: String| anyhow::anyhow!(e))?),
        None => None,
    };
    let bar = crate::ui::Bar::new(args.quiet);
    let condition = condition_input(&args)?;
    let options = SampleOptions {
        source: match (args.registry, args.checkpoint) {
            (Some(r), _) => Source::Registry(r.local()?),
            (None, Some(c)) => Source::Checkpoint(c),
            (None, None) => unreachable!("clap requires one"),
        },
        n: args.n,
        steps: args.steps,
        solver: args.solver.into(),
        schedule: args.schedule,
        strategy,
        router: match args.router {
            RouterArg::Learned => RouterChoice::Learned,
            RouterArg::Analytic => RouterChoice::Analytic,
        },
        allow_missing: args.allow_missing,
        max_memory: args.max_memory,
        batch: args.batch_size,
        class: args.class,
        guidance: args.guidance,
        condition,
        seed: args.seed,
        out: args.out,
        device: args.device.device()?,
        precision: args.precision,
        decode: match (args.vae, args.decode) {
            (Some(v), _) => Decode::File(v),
            (None, true) => Decode::Registry,
            (None, false) => Decode::No,
        },
    };
    let report = ddm_ensemble::sample::sample(&options, &bar)?;
    println!(
        "wrote {} ({} samples, {} steps, {:.3} s/step, strategy {}, experts used {:?})",
        report.png, report.n, report.steps, report.seconds_per_step, report.strategy, report.experts_loaded
    );
    Ok(())
}

/// `--condition FILE`, or `--prompt` / `--prompts` encoded with `--text-encoder`: sample i gets
/// prompt i modulo their count.
fn condition_input(args: &SampleArgs) -> anyhow::Result<Option<ddm_ensemble::sample::ConditionInput>> {
    use ddm_ensemble::sample::ConditionInput;
    let prompts = match (&args.prompt, &args.prompts) {
        (Some(p), _) => vec![p.clone()],
        (None, Some(file)) => ddm_datasets::captions::read_captions(file)?,
        (None, None) => return Ok(args.condition.clone().map(ConditionInput::File)),
    };
    let path = args
        .text_encoder
        .as_ref()
        .expect("clap requires --text-encoder with prompts");
    Ok(Some(ddm_ensemble::sample::prompt_condition(
        &prompts, path, args.n,
    )?))
}

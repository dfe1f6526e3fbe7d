//! `ddm eval-router`: a trained router's accuracy, cross-entropy and calibration per noise level.

use std::path::PathBuf;

use clap::Args;

/// Evaluate a trained router on a partition's data: accuracy, cross-entropy and calibration per t
/// bin, without the class and (a conditioned router) with it. The router must belong to this
/// partition (same fingerprint and K).
#[derive(Args, Debug)]
#[command(
    after_help = "Example:\n  ddm eval-router --router router/router.safetensors --partition part --samples 5000"
)]
pub struct EvalRouterArgs {
    /// The router checkpoint.
    #[arg(long)]
    pub router: PathBuf,
    /// The partition it was trained on.
    #[arg(long)]
    pub partition: PathBuf,
    /// Samples to evaluate.
    #[arg(long, value_parser = super::values::count(1, super::values::MAX_SAMPLES), default_value_t = 2000)]
    pub samples: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value = "cpu")]
    pub device: ddm_core::device::DeviceChoice,
    /// Print the per-bin reports as JSON instead of the table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: EvalRouterArgs) -> anyhow::Result<()> {
    let device = ddm_core::device::device(args.device)?;
    let partition = ddm_datasets::partition::Partition::open(&args.partition)?;
    let (_, net) = ddm_router::load_checked(&args.router, partition.manifest(), &device)?;
    let (data, clusters) = partition.all()?;
    let priors = partition.manifest().priors();
    let k = partition.k();
    let r = ddm_trainer::router_eval::evaluate(&net, &data, &clusters, k, args.samples, args.seed, &device);
    match args.json {
        true => println!("{}", serde_json::to_string_pretty(&r)?),
        false => print!("{}", ddm_trainer::router_eval::tables(&r, &priors)),
    }
    Ok(())
}

//! `ddm train-router` and `ddm eval-router`.

use std::path::PathBuf;

use clap::Args;
use ddm_trainer::cli::TrainSettings;

use crate::task::RouterTask;

/// The default router trunk: a DiT-XS (about a tenth of a DiT-T expert's forward FLOPs).
pub const DEFAULT_ROUTER_MODEL: &str = "DiT-XS/4";

/// Train the router: a classifier of which cluster a noised sample x_t came from (its posterior
/// p(k | x_t, t)). Reads every shard of the partition (images and cluster ids only; never an
/// expert), trains with the same loop as the experts (resumable, EMA, metrics, loss curve), and
/// writes OUT/router.safetensors and OUT/router-eval.json (accuracy, cross-entropy and calibration
/// per t bin), printing that table.
#[derive(Args, Debug)]
pub struct TrainRouterArgs {
    /// The partition directory.
    #[arg(long)]
    pub partition: PathBuf,
    /// Output directory.
    #[arg(long)]
    pub out: PathBuf,
    /// The experts' network, to state the router's cost as a fraction of one expert's.
    #[arg(long, default_value = "DiT-T/4")]
    pub expert_model: String,
    /// Samples in the final evaluation.
    #[arg(long, default_value_t = 2000)]
    pub eval_samples: usize,
    #[command(flatten)]
    pub settings: TrainSettings,
}

pub fn train(args: TrainRouterArgs) -> anyhow::Result<u8> {
    let mut config = args.settings.resolve_config()?;
    if args.settings.model.is_none() && args.settings.config.is_none() {
        config.model = DEFAULT_ROUTER_MODEL.into();
    }
    let manifest = ddm_datasets::partition::read_manifest(&args.partition)?;
    let task = RouterTask {
        k: manifest.k,
        expert_model: args.expert_model.clone(),
        eval_samples: args.eval_samples,
    };
    ddm_trainer::cli::run_task(
        &task,
        &args.settings,
        config,
        &args.partition,
        manifest,
        &args.out,
    )
}

/// Evaluate a trained router on a partition's data: accuracy, cross-entropy and calibration per t
/// bin. The router must belong to this partition (same fingerprint and K).
#[derive(Args, Debug)]
pub struct EvalRouterArgs {
    /// The router checkpoint.
    #[arg(long)]
    pub router: PathBuf,
    /// The partition it was trained on.
    #[arg(long)]
    pub partition: PathBuf,
    /// Samples to evaluate.
    #[arg(long, default_value_t = 2000)]
    pub samples: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value = "cpu")]
    pub device: ddm_core::device::DeviceChoice,
}

pub fn eval(args: EvalRouterArgs) -> anyhow::Result<()> {
    let device = ddm_core::device::device(args.device)?;
    let manifest = ddm_datasets::partition::read_manifest(&args.partition)?;
    let (_, net) = crate::load_checked(&args.router, &manifest, &device)?;
    let (data, clusters) = ddm_trainer::island::load_all_with_clusters(&args.partition, &manifest)?;
    let priors = manifest.priors();
    let r = crate::eval::evaluate(&net, &data, &clusters, &priors, args.samples, args.seed, &device);
    print!("{}", crate::eval::table(&r, &priors));
    Ok(())
}

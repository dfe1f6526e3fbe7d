//! `ddm train-router`: the router, trained by the trainer's loop on every shard's images and
//! cluster ids (never an expert).

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use ddm_datasets::partition::Partition;
use ddm_router::net::RouterInputs;
use ddm_trainer::router::{DEFAULT_ROUTER_MODEL, EVAL_FILE, RouterTask};
use ddm_trainer::router_eval::{RouterEval, tables};
use ddm_trainer::train::Outcome;

use super::settings::{TrainSettings, report, train};

/// Train the router: a classifier of which cluster a noised sample x_t came from (its posterior
/// p(k | x_t, t)). Reads every shard of the partition (images and cluster ids only; never an
/// expert), trains with the same loop as the experts (resumable, EMA, metrics, loss curve), and
/// writes OUT/router.safetensors and OUT/router-eval.json (accuracy, cross-entropy and calibration
/// per t bin), printing that table. With --class-conditional the router also sees the class c
/// (p(k | x_t, t, c); label dropout --class-dropout teaches it the unconditional case too), as the
/// DDM paper's router does: then p(k | c) is sharp from the first step.
#[derive(Args, Debug)]
#[command(after_help = EXAMPLES)]
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
    #[arg(long, value_parser = super::values::count(1, super::values::MAX_SAMPLES), default_value_t = 2000)]
    pub eval_samples: usize,
    /// Condition on the data's per-sample conditioning vectors `c` (a `tensors:` file's `c`
    /// [N, Dc], e.g. text embeddings): a linear projection of c joins the router's conditioning;
    /// --class-dropout also zeroes c, so the router learns the unconditional case too.
    #[arg(long)]
    pub condition_vectors: bool,
    /// Condition on the data's per-sample token sequences (a `tensors:` file's `c_tokens`
    /// [N, L, Dt] and `c_mask` [N, L], from `ddm encode-text --tokens`; what PixArt experts read):
    /// each sequence's mean token, padding left out, is projected into the router's conditioning;
    /// --class-dropout also drops the sequence to padding only, the null caption.
    #[arg(long)]
    pub condition_tokens: bool,
    #[command(flatten)]
    pub settings: TrainSettings,
}

const EXAMPLES: &str = "Examples:
  ddm train-router --partition part --out router
  ddm train-router --partition part --out router --model DiT-T/4 --steps 4000
  ddm train-router --partition part --out router --class-conditional --class-dropout 0.2
  ddm train-router --partition part-of-tensors --out router --condition-vectors --model mlp
  ddm train-router --partition part-of-captions --out router --condition-tokens --class-dropout 0.1";

pub fn run(args: TrainRouterArgs) -> anyhow::Result<u8> {
    let mut config = args.settings.resolve_config()?;
    if config.objective != ddm_core::checkpoint::Objective::Velocity {
        anyhow::bail!(
            "`objective` is an expert's setting: a router or classifier has none (remove it from the --config file)"
        );
    }
    if args.settings.model.is_none() && args.settings.config.is_none() {
        config.model = DEFAULT_ROUTER_MODEL.into();
    }
    let partition = Partition::open(&args.partition)?;
    let vector = match args.condition_vectors {
        false => None,
        true => Some(partition.condition_dim()?.with_context(|| {
            format!(
                "{}: --condition-vectors, but the partition's data has no conditioning vectors (`c` in a tensors: file)",
                args.partition.display()
            )
        })?),
    };
    let tokens = match args.condition_tokens {
        false => None,
        true => Some(partition.token_dim()?.with_context(|| {
            format!(
                "{}: --condition-tokens, but the partition's data has no token sequences (`c_tokens` and `c_mask` in a tensors: file: ddm encode-text --tokens --data)",
                args.partition.display()
            )
        })?),
    };
    let task = RouterTask {
        partition,
        expert_model: args.expert_model.clone(),
        eval_samples: args.eval_samples,
        inputs: RouterInputs { vector, tokens },
    };
    let outcome = train(&task, &args.settings, config, &args.out)?;
    if let Outcome::Finished { .. } = outcome {
        // The evaluation the task wrote: accuracy, cross-entropy, calibration per t bin.
        let path = args.out.join(EVAL_FILE);
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let eval = RouterEval::parse(&text)
            .with_context(|| format!("{}: not a router evaluation", path.display()))?;
        println!("{}", tables(&eval, &task.partition.manifest().priors()));
    }
    Ok(report(outcome, &args.out))
}

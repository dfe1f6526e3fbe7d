//! `ddm train` and the `ddm-trainer` binary: one expert on one island.

use std::path::PathBuf;

use clap::Args;
use ddm_datasets::partition::Partition;
use ddm_trainer::expert::ExpertTask;
use ddm_trainer::island::{self, Target};
use ddm_trainer::train::Outcome;

use ddm_ensemble::registry::Location;

use super::settings::{ObjectiveArg, TrainSettings, report, train};

/// Train one expert on one island: reads the partition's partition.json and this island's shard
/// (verified by sha256), trains with flow matching, and writes OUT/expert.safetensors (EMA weights)
/// plus OUT/train-state.safetensors (the whole loop state, saved every --checkpoint-every steps),
/// OUT/metrics.jsonl and sample grids. Opens no network connection, unless --register names a
/// registry in an object store.
///
/// Rerunning the same command resumes from the last checkpoint. SIGINT/SIGTERM save the state and
/// exit with status 3 (resumable). A non-finite loss stops the run with status 2 and keeps the last
/// good checkpoint.
#[derive(Args, Debug)]
#[command(after_help = EXAMPLES)]
pub struct TrainArgs {
    /// The partition directory (`ddm partition --out`); only partition.json and this island's
    /// shard are read.
    #[arg(long)]
    pub partition: PathBuf,
    /// The cluster to train (default: $SLURM_ARRAY_TASK_ID, else $JOB_COMPLETION_INDEX).
    #[arg(long, value_parser = super::values::count(0, super::values::MAX_CLUSTERS - 1), conflicts_with = "monolith")]
    pub cluster: Option<usize>,
    /// Train on all shards together: the monolith baseline.
    #[arg(long)]
    pub monolith: bool,
    /// Output directory (checkpoints, metrics, samples).
    #[arg(long)]
    pub out: PathBuf,
    /// What the expert learns to predict: the flow-matching velocity, or DDPM's noise (converted
    /// to velocity when sampled, so the experts of one ensemble may differ). Default: velocity, or
    /// the --config file's `objective`.
    #[arg(long, value_enum)]
    pub objective: Option<ObjectiveArg>,
    /// When the expert is finished, register it (and its cluster statistics) here: a directory or
    /// s3:// / gs:// / az:// (see `ddm register`). A rerun of a finished island does not register
    /// it twice.
    #[arg(long, conflicts_with = "monolith")]
    pub register: Option<Location>,
    /// Condition the expert on the data's per-sample conditioning vectors `c` (a caption's
    /// pooled text embedding: `ddm encode-text --data`), through adaLN like the class; each is
    /// dropped to the zero vector (the null condition, for guidance) with --class-dropout.
    #[arg(long)]
    pub condition_vectors: bool,
    #[command(flatten)]
    pub settings: TrainSettings,
}

const EXAMPLES: &str = "Examples:
  ddm train --partition part --cluster 2 --out expert-2
  ddm train --partition part --cluster 3 --out expert-3 --objective epsilon-cosine --model DiT-S/4
  sbatch --array=0-7 --wrap 'ddm-trainer --partition part --out expert-$SLURM_ARRAY_TASK_ID --model DiT-S/2'
  ddm-trainer --partition part --cluster 1 --out expert-1 --register s3://experts/run-1";

/// Run an island from its arguments; returns the process exit status.
pub fn run(args: TrainArgs) -> anyhow::Result<u8> {
    let mut config = args.settings.resolve_config()?;
    config.condition_vectors |= args.condition_vectors;
    if let Some(o) = args.objective {
        config.objective = o.objective();
    }
    let partition = Partition::open(&args.partition)?;
    let target = if args.monolith {
        Target::Monolith
    } else {
        Target::Cluster(island::resolve_cluster(args.cluster)?)
    };
    let manifest = partition.manifest().clone();
    let task = ExpertTask {
        partition,
        target,
        objective: config.objective,
    };
    let outcome = train(&task, &args.settings, config, &args.out)?;
    let checkpoint = match &outcome {
        Outcome::Finished { checkpoint, .. } => Some(checkpoint.clone()),
        Outcome::Interrupted { .. } => None,
    };
    let status = report(outcome, &args.out);
    // The island pushes its own result. A rerun of a finished island finds the same file
    // registered and writes nothing.
    if let (Some(registry), Some(checkpoint)) = (&args.register, checkpoint) {
        for r in registry.register(&[checkpoint], Some(&manifest), false)? {
            println!("registered {r} in {registry}");
        }
    }
    Ok(status)
}

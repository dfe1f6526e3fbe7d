//! `ddm launch slurm|k8s`: the job files that start K islands (one per cluster) and the router on
//! a scheduler. Each island is `ddm-trainer` with its cluster from the scheduler's array index
//! (`SLURM_ARRAY_TASK_ID`, `JOB_COMPLETION_INDEX`), resumable, and registers its own expert when
//! it finishes (`--register`). Every value a user gives reaches the job files through [`quote`]:
//! checked for where it goes and quoted for it, or refused naming its flag.

mod k8s;
mod quote;
mod slurm;

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use ddm_ensemble::registry::Location;

/// Write (and with --submit, submit) the jobs that train every island of a partition and its
/// router on a scheduler.
#[derive(Args, Debug)]
#[command(after_help = EXAMPLES)]
pub struct LaunchArgs {
    #[command(subcommand)]
    pub scheduler: Scheduler,
}

const EXAMPLES: &str = "Examples:
  ddm launch slurm --partition /shared/part --out /shared/run --registry s3://experts/run-1 --time 12:00:00 --gpus-per-task 1 --submit -- --model DiT-S/2 --steps 200000 --device wgpu
  ddm launch k8s --partition /data/part --out /data/run --image registry.example/ddm:0.1 --pvc ddm-data --registry s3://experts/run-1 -- --model DiT-S/2
  kubectl apply -f /data/run/launch/";

#[derive(Subcommand, Debug)]
pub enum Scheduler {
    /// An sbatch array script (one island per array task; requeued near the time limit after
    /// saving) and a router job that runs after every island succeeded.
    Slurm(SlurmArgs),
    /// An Indexed Job (one island per completion index) and a router Job, as JSON manifests for
    /// `kubectl apply -f OUT/launch/`.
    K8s(K8sArgs),
}

/// What every scheduler needs.
#[derive(Args, Debug)]
pub struct Common {
    /// The partition directory, as the jobs see it (a shared filesystem or volume).
    #[arg(long)]
    pub partition: PathBuf,
    /// Where the islands write (OUT/expert-K, OUT/router) and the job files go (OUT/launch).
    #[arg(long)]
    pub out: PathBuf,
    /// Each island registers its expert here when it finishes, and the router job the router:
    /// a directory on a shared filesystem, or s3:// gs:// az://.
    #[arg(long)]
    pub registry: Option<String>,
    /// No router job.
    #[arg(long)]
    pub no_router: bool,
    /// Flags for `ddm train-router` (one string, split as a shell would), e.g. "--steps 4000".
    #[arg(long, default_value = "", allow_hyphen_values = true)]
    pub router_flags: String,
    /// Flags for every island's `ddm-trainer` (after `--`), e.g. `-- --model DiT-S/2 --steps 20000`.
    #[arg(last = true)]
    pub trainer_flags: Vec<String>,
}

#[derive(Args, Debug)]
pub struct SlurmArgs {
    #[command(flatten)]
    pub common: Common,
    /// Wall-clock limit of each island's run (sbatch --time); an island saves and requeues itself
    /// --grace seconds before it.
    #[arg(long)]
    pub time: Option<String>,
    /// Seconds before the time limit at which an island is told to save and requeue (at most
    /// 65535, sbatch's limit).
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u32).range(0..=65535))]
    pub grace: u32,
    /// sbatch --partition (Slurm's partition: a queue, not ddm's).
    #[arg(long)]
    pub slurm_partition: Option<String>,
    #[arg(long)]
    pub account: Option<String>,
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub cpus_per_task: Option<u32>,
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub gpus_per_task: Option<u32>,
    /// sbatch --mem (e.g. 16G).
    #[arg(long)]
    pub mem: Option<String>,
    /// Islands running at once (sbatch --array=0-K%N).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_running: Option<u32>,
    /// Directory of the `ddm` and `ddm-trainer` binaries on the compute nodes (default: this
    /// ddm's own directory, if ddm-trainer is beside it; else whatever PATH finds there).
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// Submit with sbatch (the router with --dependency=afterok on the islands' array).
    #[arg(long)]
    pub submit: bool,
    /// Print what was written and submitted as one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct K8sArgs {
    #[command(flatten)]
    pub common: Common,
    /// The container image with `ddm` and `ddm-trainer` on its PATH.
    #[arg(long)]
    pub image: String,
    /// A PersistentVolumeClaim holding the partition and the outputs, mounted at --mount.
    #[arg(long)]
    pub pvc: Option<String>,
    #[arg(long, default_value = "/data")]
    pub mount: PathBuf,
    /// Islands running at once (default: all K).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub parallelism: Option<u32>,
    /// Kubernetes resources.limits for each island, e.g. `nvidia.com/gpu=1,cpu=8,memory=32Gi`.
    #[arg(long, value_delimiter = ',')]
    pub limits: Vec<String>,
    /// A Secret whose keys become environment variables (e.g. AWS_ACCESS_KEY_ID for an s3:// registry).
    #[arg(long)]
    pub env_secret: Option<String>,
    /// The Jobs' name prefix (a Kubernetes name: lower-case letters, digits and `-`).
    #[arg(long, default_value = "ddm")]
    pub name: String,
}

pub fn run(args: LaunchArgs) -> anyhow::Result<()> {
    match args.scheduler {
        Scheduler::Slurm(a) => slurm::write(a),
        Scheduler::K8s(a) => k8s::write(a),
    }
}

/// The flags the launcher sets for each island itself.
const SET_FOR_ISLANDS: [&str; 5] = ["--cluster", "--monolith", "--out", "--partition", "--register"];
/// The flags the launcher sets for the router itself.
const SET_FOR_ROUTER: [&str; 2] = ["--out", "--partition"];

/// Refuse a flag the launcher sets, in any spelling clap accepts (`--out x`, `--out=x`).
fn refuse_reserved(flags: &[String], reserved: &[&str], whose: &str) -> anyhow::Result<()> {
    for f in flags {
        let name = f.split_once('=').map_or(f.as_str(), |(n, _)| n);
        if reserved.contains(&name) {
            bail!("{f}: set by the launcher for each {whose}; leave it out of the {whose}'s flags");
        }
    }
    Ok(())
}

/// What every scheduler's files are made of, checked: K from the partition's manifest, the
/// registry as `--registry` reads it, the router's flags split as a shell would.
struct Checked {
    k: usize,
    router_flags: Vec<String>,
}

fn prepare(c: &Common) -> anyhow::Result<Checked> {
    quote::path("--partition", &c.partition)?;
    quote::path("--out", &c.out)?;
    let manifest = ddm_datasets::partition::read_manifest(&c.partition)?;
    if manifest.k == 0 {
        bail!("{}: the partition has no clusters", c.partition.display());
    }
    if let Some(r) = &c.registry {
        quote::no_control("--registry", r)?;
        r.parse::<Location>()
            .map_err(|e| anyhow::anyhow!("--registry {r}: {e}"))?;
    }
    refuse_reserved(&c.trainer_flags, &SET_FOR_ISLANDS, "island")?;
    let router_flags = shlex::split(&c.router_flags)
        .with_context(|| format!("--router-flags {:?}: unbalanced quotes", c.router_flags))?;
    refuse_reserved(&router_flags, &SET_FOR_ROUTER, "router")?;
    Ok(Checked {
        k: manifest.k,
        router_flags,
    })
}

//! `ddm register` and `ddm registry list|verify|remove`.

use std::path::PathBuf;

use anyhow::bail;
use clap::{Args, Subcommand};
use ddm_ensemble::registry;

/// Add experts and a router to a registry: each checkpoint's checksum, partition, data spec, cluster
/// id and K are verified; anything incompatible is refused and the registry left untouched. Safe to
/// run from several processes at once (file lock). An expert's cluster-stats.safetensors, if beside
/// it, is registered too (for `ddm sample --router analytic`).
#[derive(Args, Debug)]
pub struct RegisterArgs {
    /// The registry directory (created if new).
    #[arg(long)]
    pub registry: PathBuf,
    /// The partition (needed for a new registry unless a router is among the files).
    #[arg(long)]
    pub partition: Option<PathBuf>,
    /// Replace an already registered expert of the same cluster (or the router).
    #[arg(long)]
    pub replace: bool,
    /// Checkpoints: expert.safetensors and router.safetensors files, folders written by
    /// `ddm registry export`, or http:// URLs (append `#sha256=HEX` to verify the download).
    #[arg(required = true)]
    pub checkpoints: Vec<String>,
}

pub fn register(args: RegisterArgs) -> anyhow::Result<()> {
    let manifest = match &args.partition {
        Some(p) => Some(ddm_datasets::partition::read_manifest(p)?),
        None => None,
    };
    let files = registry::expand_sources(
        &args.checkpoints,
        &ddm_datasets::env::cache_dir().join("downloads"),
    )?;
    for line in registry::register(&args.registry, &files, manifest.as_ref(), args.replace)? {
        println!("registered {line}");
    }
    Ok(())
}

/// Look at, check or edit a registry.
#[derive(Args, Debug)]
pub struct RegistryArgs {
    /// The registry directory.
    #[arg(long)]
    pub registry: PathBuf,
    #[command(subcommand)]
    pub command: RegistryCommand,
}

#[derive(Subcommand, Debug)]
pub enum RegistryCommand {
    /// The experts (by cluster), the router and the statistics registered.
    List,
    /// Re-hash every blob and report each problem (keeps going after the first).
    Verify,
    /// Write the published layout: expert_K/{config.json, model.safetensors}, router/, index.json.
    Export {
        /// The folder to write.
        #[arg(long)]
        out: PathBuf,
    },
    /// Remove the expert of a cluster, or the router.
    Remove {
        #[arg(long)]
        cluster: Option<usize>,
        #[arg(long)]
        router: bool,
    },
}

pub fn registry_cmd(args: RegistryArgs) -> anyhow::Result<()> {
    match args.command {
        RegistryCommand::List => print!("{}", registry::Registry::open(&args.registry)?.list()),
        RegistryCommand::Verify => {
            let problems = registry::verify(&args.registry)?;
            for p in &problems {
                eprintln!("problem: {p}");
            }
            if !problems.is_empty() {
                bail!("{} problem(s) in {}", problems.len(), args.registry.display());
            }
            println!("{}: every blob matches its sha256", args.registry.display());
        }
        RegistryCommand::Export { out } => {
            let written = registry::export(&args.registry, &out)?;
            println!(
                "exported {} models to {} (register them elsewhere with `ddm register {}`)",
                written.len(),
                out.display(),
                out.display()
            );
        }
        RegistryCommand::Remove { cluster, router } => {
            if cluster.is_none() && !router {
                bail!("say what to remove: --cluster K or --router");
            }
            registry::remove(&args.registry, cluster, router)?;
            println!("removed");
        }
    }
    Ok(())
}

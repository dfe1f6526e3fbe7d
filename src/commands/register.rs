//! `ddm register` and `ddm registry list|verify|remove`.

use std::path::PathBuf;

use anyhow::bail;
use clap::{Args, Subcommand};
use ddm_ensemble::registry::{self, Location};

/// Add experts and a router to a registry: each checkpoint's checksum, partition, data spec, cluster
/// id and K are verified; anything incompatible is refused and the registry left untouched. Safe to
/// run from several processes at once (file lock). An expert's cluster-stats.safetensors, if beside
/// it, is registered too (for `ddm sample --router analytic`).
#[derive(Args, Debug)]
#[command(after_help = REGISTER_EXAMPLES)]
pub struct RegisterArgs {
    /// The registry (created if new): a directory, or an object store (s3://bucket/prefix, gs://, az://;
    /// credentials and endpoint from the environment, e.g. AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL).
    #[arg(long)]
    pub registry: Location,
    /// The partition (needed for a new registry unless a router is among the files).
    #[arg(long)]
    pub partition: Option<PathBuf>,
    /// Replace an already registered expert of the same cluster (or the router).
    #[arg(long)]
    pub replace: bool,
    /// Checkpoints: expert.safetensors and router.safetensors files, folders written by
    /// `ddm registry export`, or http(s):// URLs (append `#sha256=HEX` to verify the download;
    /// DDM_CA_CERT names extra trusted root certificates, PEM).
    #[arg(required_unless_present = "remote")]
    pub checkpoints: Vec<String>,
    /// Register the experts a `ddm serve` at this URL serves (checked against the registry's
    /// partition; sampling calls them over the network). DDM_SERVE_TOKEN is sent if set.
    #[arg(long, conflicts_with = "checkpoints")]
    pub remote: Option<String>,
    /// With --remote: only these experts (comma-separated cluster ids).
    #[arg(long, value_parser = super::values::count(0, super::values::MAX_CLUSTERS - 1), value_delimiter = ',', requires = "remote")]
    pub clusters: Option<Vec<usize>>,
    /// Print what was registered as JSON lines (role, cluster, k, source, sha256).
    #[arg(long)]
    pub json: bool,
}

const REGISTER_EXAMPLES: &str = "Examples:
  ddm register --registry reg --partition part expert-*/expert.safetensors router/router.safetensors
  ddm register --registry reg --replace expert-3/expert.safetensors
  ddm register --registry reg 'https://host/expert-2.safetensors#sha256=HEX'
  ddm register --registry reg --remote http://island-2:8470 --clusters 2
  AWS_ENDPOINT_URL=http://127.0.0.1:9000 ddm register --registry s3://experts/run-1 --partition part expert-0/expert.safetensors";

pub fn register(args: RegisterArgs) -> anyhow::Result<()> {
    let manifest = match &args.partition {
        Some(p) => Some(ddm_datasets::partition::read_manifest(p)?),
        None => None,
    };
    let registered = match &args.remote {
        Some(url) => {
            args.registry
                .register_remote(url, args.clusters.as_deref(), manifest.as_ref(), args.replace)?
        }
        None => {
            let files =
                registry::expand_sources(&args.checkpoints, &ddm_core::env::cache_dir().join("downloads"))?;
            args.registry.register(&files, manifest.as_ref(), args.replace)?
        }
    };
    for r in registered {
        match args.json {
            true => println!("{}", serde_json::to_string(&r)?),
            false => println!("registered {r}"),
        }
    }
    Ok(())
}

/// Look at, check or edit a registry.
#[derive(Args, Debug)]
#[command(
    after_help = "Examples:\n  ddm registry --registry reg list\n  ddm registry --registry reg verify --json\n  ddm registry --registry reg export --out published\n  ddm registry --registry reg remove --cluster 2\n  ddm registry --registry reg gc --dry-run"
)]
pub struct RegistryArgs {
    /// The registry: a directory, or an object store (s3://bucket/prefix, gs://, az://;
    /// credentials and endpoint from the environment, e.g. AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL).
    #[arg(long)]
    pub registry: Location,
    /// `list` prints registry.json; `verify` prints {"ok": .., "problems": [..]}.
    #[arg(long, global = true)]
    pub json: bool,
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
    /// Delete blobs no entry names (left by --replace, remove, or a killed registration).
    Gc {
        /// Only list them.
        #[arg(long)]
        dry_run: bool,
    },
    /// Remove the expert of a cluster, or the router.
    Remove {
        #[arg(long, value_parser = super::values::count(0, super::values::MAX_CLUSTERS - 1))]
        cluster: Option<usize>,
        #[arg(long)]
        router: bool,
    },
}

pub fn registry_cmd(args: RegistryArgs) -> anyhow::Result<()> {
    match args.command {
        RegistryCommand::List => {
            let reg = registry::Registry {
                dir: args.registry.to_string().into(),
                index: args.registry.index()?,
                precision: Default::default(),
            };
            match args.json {
                true => println!("{}", serde_json::to_string_pretty(&reg.index)?),
                false => print!("{}", reg.list()),
            }
        }
        RegistryCommand::Verify => {
            let problems = args.registry.verify()?;
            if args.json {
                let v = serde_json::json!({ "ok": problems.is_empty(), "problems": problems });
                println!("{v}");
            }
            for p in &problems {
                eprintln!("problem: {p}");
            }
            if !problems.is_empty() {
                bail!("{} problem(s) in {}", problems.len(), args.registry);
            }
            if !args.json {
                println!("{}: every blob matches its sha256", args.registry);
            }
        }
        RegistryCommand::Export { out } => {
            let written = registry::export(&args.registry.local()?, &out)?;
            println!(
                "exported {} models to {} (register them elsewhere with `ddm register {}`)",
                written.len(),
                out.display(),
                out.display()
            );
        }
        RegistryCommand::Gc { dry_run } => {
            let (files, bytes) = args.registry.gc(dry_run)?;
            for f in &files {
                println!("{} {}", if dry_run { "would remove" } else { "removed" }, f);
            }
            println!(
                "{} unreferenced file(s), {:.1} MB{}",
                files.len(),
                bytes as f64 / 1e6,
                if dry_run {
                    " (dry run: nothing removed)"
                } else {
                    ""
                }
            );
        }
        RegistryCommand::Remove { cluster, router } => {
            if cluster.is_none() && !router {
                bail!("say what to remove: --cluster K or --router");
            }
            args.registry.remove(cluster, router)?;
            println!("removed");
        }
    }
    Ok(())
}

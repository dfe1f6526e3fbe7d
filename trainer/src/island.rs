//! Which cluster this island trains, and its data.
//!
//! The cluster comes from `--cluster`, else from a scheduler's array index, so K islands can be
//! one array job. Environment variables read (all of them, here only):
//! - `SLURM_ARRAY_TASK_ID` (Slurm job arrays, `sbatch --array=0-3`)
//! - `JOB_COMPLETION_INDEX` (Kubernetes indexed Jobs)

use std::path::Path;

use anyhow::{Context, bail};
use ddm_datasets::Dataset;
use ddm_datasets::partition::{self, PartitionManifest};

/// What an island trains on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// One cluster: an expert.
    Cluster(usize),
    /// The union of all shards: the monolith baseline the paper compares against.
    Monolith,
}

/// `--cluster`, else `SLURM_ARRAY_TASK_ID`, else `JOB_COMPLETION_INDEX`.
pub fn resolve_cluster(flag: Option<usize>) -> anyhow::Result<usize> {
    if let Some(k) = flag {
        return Ok(k);
    }
    for var in ["SLURM_ARRAY_TASK_ID", "JOB_COMPLETION_INDEX"] {
        if let Ok(v) = std::env::var(var) {
            return v
                .trim()
                .parse()
                .with_context(|| format!("${var} = `{v}` is not a cluster index"));
        }
    }
    bail!(
        "no cluster given: pass --cluster K (or --monolith), or run as an array job (SLURM_ARRAY_TASK_ID, JOB_COMPLETION_INDEX)"
    )
}

/// Load the island's data: its verified shard, or every shard for the monolith.
pub fn load(dir: &Path, manifest: &PartitionManifest, target: Target) -> anyhow::Result<Dataset> {
    Ok(match target {
        Target::Cluster(k) => partition::load_shard(dir, manifest, k)?,
        Target::Monolith => load_all_with_clusters(dir, manifest)?.0,
    })
}

/// Every shard, concatenated, with each sample's cluster id (what a router trains on).
pub fn load_all_with_clusters(
    dir: &Path,
    manifest: &PartitionManifest,
) -> anyhow::Result<(Dataset, Vec<u32>)> {
    let shards = (0..manifest.k)
        .map(|k| partition::load_shard(dir, manifest, k))
        .collect::<Result<Vec<_>, _>>()?;
    let clusters: Vec<u32> = shards
        .iter()
        .enumerate()
        .flat_map(|(k, s)| std::iter::repeat_n(k as u32, s.len()))
        .collect();
    Ok((
        concat(shards, format!("{}[all clusters]", manifest.dataset.name)),
        clusters,
    ))
}

fn concat(shards: Vec<Dataset>, name: String) -> Dataset {
    use ddm_datasets::Values;
    let mut it = shards.into_iter();
    let mut all = it.next().expect("a partition has at least one cluster");
    for s in it {
        match (&mut all.values, s.values) {
            (Values::U8(a), Values::U8(b)) => a.extend(b),
            (Values::F32(a), Values::F32(b)) => a.extend(b),
            _ => unreachable!("the shards of one partition share a dtype"),
        }
        if let (Some(a), Some(b)) = (&mut all.labels, s.labels) {
            a.extend(b);
        }
    }
    all.name = name;
    all
}

//! Which cluster this island trains, and its data.
//!
//! The cluster comes from `--cluster`, else from a scheduler's array index, so K islands can be
//! one array job. Environment variables read (all of them, here only):
//! - `SLURM_ARRAY_TASK_ID` (Slurm job arrays, `sbatch --array=0-3`)
//! - `JOB_COMPLETION_INDEX` (Kubernetes indexed Jobs)

use anyhow::bail;
use ddm_datasets::Dataset;
use ddm_datasets::partition::Partition;

/// What an island trains on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// One cluster: an expert.
    Cluster(usize),
    /// The union of all shards: the monolith baseline the paper compares against.
    Monolith,
}

impl Target {
    /// The cluster an expert trains on; `None` for the monolith.
    pub fn cluster(self) -> Option<usize> {
        match self {
            Target::Cluster(k) => Some(k),
            Target::Monolith => None,
        }
    }
}

/// `--cluster`, else `SLURM_ARRAY_TASK_ID`, else `JOB_COMPLETION_INDEX`.
pub fn resolve_cluster(flag: Option<usize>) -> anyhow::Result<usize> {
    if let Some(k) = flag {
        return Ok(k);
    }
    if let Some((k, _)) = ddm_core::env::array_index()? {
        return Ok(k);
    }
    bail!(
        "no cluster given: pass --cluster K (or --monolith), or run as an array job (SLURM_ARRAY_TASK_ID, JOB_COMPLETION_INDEX)"
    )
}

/// Load the island's data: its verified shard, or every shard for the monolith.
pub fn load(partition: &Partition, target: Target) -> anyhow::Result<Dataset> {
    Ok(match target {
        Target::Cluster(k) => partition.shard(k)?,
        Target::Monolith => partition.all()?.0,
    })
}

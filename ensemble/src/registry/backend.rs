//! Where a registry lives, as one seam. A [`Backend`] reads the index, registers (plans against
//! the index it read, stores the blobs, then replaces the index atomically: under a file lock in a
//! directory, by a conditional put on the ETag in an object store), verifies, removes and
//! collects unnamed blobs. Checking what is registered and planning the new index is shared by
//! every backend (`register::plan`), as are reading the checkpoints (`read_checkpoints`) and asking
//! a server what it serves (`served_checkpoints`). A new place to keep registries is one file that
//! implements [`Backend`], and its URL scheme in [`Location`]'s `from_str`.

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use anyhow::Context;
use ddm_core::checkpoint::CheckpointMeta;
use ddm_core::partition::PartitionManifest;

use super::dir::DirRegistry;
use super::index::Index;
use super::register::{Origin, Registered, read_checkpoints, served_checkpoints};
use super::store::StoreRegistry;

/// What a place that keeps registries does; see the module documentation.
pub trait Backend: Send + Sync {
    /// The registry's address, as the user wrote it (no credentials).
    fn url(&self) -> String;
    /// A directory holding the registry, for reading: the directory itself, or a local cache
    /// pulled now (the index and every blob it names, each checked).
    fn local(&self) -> anyhow::Result<PathBuf>;
    /// The index, if a registry is here (without fetching any blob).
    fn index(&self) -> anyhow::Result<Option<Index>>;
    /// Register checked checkpoints: plan against the index as read, store the blobs the plan
    /// names, then replace the index, so that no concurrent registration is lost.
    fn register(
        &self,
        metas: &[(Origin, CheckpointMeta)],
        partition: Option<&PartitionManifest>,
        replace: bool,
    ) -> anyhow::Result<Vec<Registered>>;
    /// Every entry's blob hashed again (a store's fetched, not its cache) and its claim checked:
    /// a line per entry.
    fn verify(&self) -> anyhow::Result<Vec<String>>;
    /// Remove an expert (by cluster) or the router.
    fn remove(&self, cluster: Option<usize>, router: bool) -> anyhow::Result<()>;
    /// The blobs no entry names (deleted unless `dry_run`): their names and bytes.
    fn gc(&self, dry_run: bool) -> anyhow::Result<(Vec<String>, u64)>;
}

/// Where a registry is: a directory (`file://` URLs included) or an object store.
#[derive(Clone)]
pub struct Location(Arc<dyn Backend>);

impl FromStr for Location {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let backend: Arc<dyn Backend> = match s.split_once("://") {
            None => Arc::new(DirRegistry::new(s)),
            Some(("file", path)) => Arc::new(DirRegistry::new(path)),
            Some(_) => Arc::new(StoreRegistry::new(s).map_err(|e| format!("{e:#}"))?),
        };
        Ok(Location(backend))
    }
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.url())
    }
}

impl std::fmt::Debug for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Location({})", self.0.url())
    }
}

impl Location {
    /// See [`Backend::local`].
    pub fn local(&self) -> anyhow::Result<PathBuf> {
        self.0.local()
    }

    /// The registry's index; an error when there is none.
    pub fn index(&self) -> anyhow::Result<Index> {
        self.0
            .index()?
            .with_context(|| format!("{}: no registry here (ddm register creates one)", self.0.url()))
    }

    /// Register checkpoint files (an expert's `cluster-stats.safetensors` beside it comes along).
    /// `partition` gives K and the data spec when the registry is new (a router gives K too). A
    /// file the registry already holds (same sha256, same place) is not registered again.
    pub fn register(
        &self,
        paths: &[PathBuf],
        partition: Option<&PartitionManifest>,
        replace: bool,
    ) -> anyhow::Result<Vec<Registered>> {
        self.0.register(&read_checkpoints(paths)?, partition, replace)
    }

    /// Register experts served by a `ddm serve` at `url` (those of `clusters`, or all it serves):
    /// their metadata is checked as a file's would be, and each entry records the URL and the
    /// served checkpoint's sha256.
    pub fn register_remote(
        &self,
        url: &str,
        clusters: Option<&[usize]>,
        partition: Option<&PartitionManifest>,
        replace: bool,
    ) -> anyhow::Result<Vec<Registered>> {
        self.0
            .register(&served_checkpoints(url, clusters)?, partition, replace)
    }

    /// See [`Backend::verify`].
    pub fn verify(&self) -> anyhow::Result<Vec<String>> {
        self.0.verify()
    }

    /// See [`Backend::remove`].
    pub fn remove(&self, cluster: Option<usize>, router: bool) -> anyhow::Result<()> {
        self.0.remove(cluster, router)
    }

    /// See [`Backend::gc`].
    pub fn gc(&self, dry_run: bool) -> anyhow::Result<(Vec<String>, u64)> {
        self.0.gc(dry_run)
    }
}

//! The directory backend: a registry in a directory (local, or a shared filesystem), written under
//! an exclusive file lock, its index replaced atomically (temporary file + rename).

use std::path::{Path, PathBuf};

use ddm_core::checkpoint::CheckpointMeta;
use ddm_core::partition::PartitionManifest;

use super::backend::Backend;
use super::index::{Index, read_index};
use super::register::{Origin, Registered};

/// A registry directory.
pub struct DirRegistry {
    dir: PathBuf,
}

impl DirRegistry {
    pub fn new(dir: impl AsRef<Path>) -> Self {
        Self {
            dir: dir.as_ref().to_path_buf(),
        }
    }
}

impl Backend for DirRegistry {
    fn url(&self) -> String {
        self.dir.display().to_string()
    }

    fn local(&self) -> anyhow::Result<PathBuf> {
        Ok(self.dir.clone())
    }

    fn index(&self) -> anyhow::Result<Option<Index>> {
        read_index(&self.dir)
    }

    fn register(
        &self,
        metas: &[(Origin, CheckpointMeta)],
        partition: Option<&PartitionManifest>,
        replace: bool,
    ) -> anyhow::Result<Vec<Registered>> {
        super::register::commit(&self.dir, metas, partition, replace)
    }

    fn verify(&self) -> anyhow::Result<Vec<String>> {
        super::verify(&self.dir)
    }

    fn remove(&self, cluster: Option<usize>, router: bool) -> anyhow::Result<()> {
        super::remove(&self.dir, cluster, router)
    }

    fn gc(&self, dry_run: bool) -> anyhow::Result<(Vec<String>, u64)> {
        let (files, bytes) = super::gc(&self.dir, dry_run)?;
        Ok((files.iter().map(|f| f.display().to_string()).collect(), bytes))
    }
}

//! Registries in object stores (`s3://bucket/prefix`, `gs://bucket/prefix`, `az://container/prefix`):
//! the layout of a registry directory (`registry.json`, `blobs/<sha256>.safetensors`) where islands
//! on other machines can reach it.
//!
//! Writers take no lock. Blobs are content-addressed and put before the index names them; the
//! index is replaced with a conditional put (create-only for a new registry, a match of the ETag
//! read after), and a writer that loses a race reads the index again, checks its files against
//! it again and retries. So registrations racing from many machines all land, a killed writer
//! leaves at most a blob no entry names (`registry gc` removes it), and a reader sees the index
//! before or after a registration, never between.
//!
//! Readers pull the index and the blobs it names into a local cache
//! (`$DDM_CACHE/registries/<hash of the URL>/`, a registry directory), hashing each blob as it
//! arrives; a cached blob that still hashes right is not fetched again. Sampling, serving and
//! distilling then read the cache, and re-hash every blob they load, as for any directory.
//!
//! Credentials and endpoints come from the environment as the providers' tools set them
//! (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION`,
//! `AWS_ENDPOINT_URL` and `AWS_ALLOW_HTTP=true` for an S3-compatible server; `GOOGLE_*`;
//! `AZURE_*`), else the machine's metadata service. ddm never prints them.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use ddm_core::checkpoint::CheckpointMeta;
use ddm_core::digest::{Sha256Stream, sha256_file, sha256_hex};
use ddm_core::partition::PartitionManifest;
use futures_util::StreamExt;
use object_store::path::Path as StorePath;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutPayload, UpdateVersion};

use super::index::{Entry, INDEX, Index, parse_index};
use super::register::{Origin, Plan, Registered, plan};

/// How many times a writer re-reads the index after losing a race before it gives up.
const MAX_CONFLICTS: u32 = 200;
/// `registry gc` on a store leaves blobs younger than this (`DDM_REGISTRY_GC_GRACE`, seconds): a
/// registration puts its blobs before its index, so a young unnamed blob may be one in flight.
const DEFAULT_GC_GRACE_S: u64 = 3600;

/// A registry under a prefix of an object store.
pub struct StoreRegistry {
    /// As the user wrote it (no credentials: those come from the environment).
    pub url: String,
    store: Arc<dyn ObjectStore>,
    prefix: StorePath,
}

impl std::fmt::Debug for StoreRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreRegistry").field("url", &self.url).finish()
    }
}

impl StoreRegistry {
    /// The store a URL names, configured from the environment. Builds no connection yet.
    pub fn new(url: &str) -> anyhow::Result<Self> {
        ddm_net::install_crypto_provider();
        let (scheme, rest) = url.split_once("://").context("not a URL")?;
        let prefix = rest
            .split_once('/')
            .map(|(_, p)| p)
            .unwrap_or("")
            .trim_matches('/');
        let bad = |e: object_store::Error| anyhow::anyhow!("{url}: {e}");
        let store: Arc<dyn ObjectStore> = match scheme {
            "s3" | "s3a" => Arc::new(
                object_store::aws::AmazonS3Builder::from_env()
                    .with_url(url)
                    .build()
                    .map_err(bad)?,
            ),
            "gs" => Arc::new(
                object_store::gcp::GoogleCloudStorageBuilder::from_env()
                    .with_url(url)
                    .build()
                    .map_err(bad)?,
            ),
            "az" | "azure" | "abfs" | "abfss" => Arc::new(
                object_store::azure::MicrosoftAzureBuilder::from_env()
                    .with_url(url)
                    .build()
                    .map_err(bad)?,
            ),
            other => bail!(
                "{url}: `{other}://` is not a registry location (a directory, file://, s3://, gs:// or az://)"
            ),
        };
        Ok(Self {
            url: url.trim_end_matches('/').to_string(),
            store,
            prefix: StorePath::parse(prefix).with_context(|| format!("{url}: not an object path"))?,
        })
    }

    fn path(&self, rel: &str) -> StorePath {
        StorePath::from_iter(self.prefix.parts().chain(StorePath::from(rel).parts()))
    }

    /// The URL of an object of the registry, for messages.
    fn name(&self, rel: &str) -> String {
        format!("{}/{rel}", self.url)
    }

    fn blob_rel(sha256: &str) -> String {
        format!("blobs/{sha256}.safetensors")
    }

    /// Run one async operation on a runtime of its own (the CLI is synchronous).
    fn block_on<T>(&self, f: impl Future<Output = T>) -> anyhow::Result<T> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start an async runtime")?;
        Ok(rt.block_on(f))
    }

    /// The index and the version it was read at (for the conditional put that replaces it).
    async fn read_index(&self) -> anyhow::Result<Option<(Index, Vec<u8>, UpdateVersion)>> {
        let name = self.name(INDEX);
        match self.store.get(&self.path(INDEX)).await {
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {name}")),
            Ok(got) => {
                let version = UpdateVersion {
                    e_tag: got.meta.e_tag.clone(),
                    version: got.meta.version.clone(),
                };
                let bytes = got.bytes().await.with_context(|| format!("reading {name}"))?;
                Ok(Some((parse_index(&bytes, &name)?, bytes.to_vec(), version)))
            }
        }
    }

    pub fn index(&self) -> anyhow::Result<Option<Index>> {
        Ok(self.block_on(self.read_index())??.map(|(i, _, _)| i))
    }

    /// Replace the index read at `version` (None: there was none) with `index`; false when
    /// another writer replaced it first.
    async fn put_index(&self, index: &Index, version: Option<UpdateVersion>) -> anyhow::Result<bool> {
        let mode = match version {
            None => PutMode::Create,
            Some(v) => PutMode::Update(v),
        };
        let json = ddm_core::json::to_vec_pretty(INDEX, index)?;
        match self
            .store
            .put_opts(&self.path(INDEX), PutPayload::from(json), mode.into())
            .await
        {
            Ok(_) => Ok(true),
            Err(object_store::Error::Precondition { .. } | object_store::Error::AlreadyExists { .. }) => {
                Ok(false)
            }
            Err(e) => Err(e).with_context(|| format!("writing {}", self.name(INDEX))),
        }
    }

    /// Re-read, change and conditionally replace the index until no other writer came between.
    /// `change` gets the index as read (None: no registry yet) and returns the index to write
    /// (None: nothing to write) and its result; it runs again after every lost race.
    async fn update<T>(
        &self,
        mut change: impl AsyncFnMut(Option<Index>) -> anyhow::Result<(Option<Index>, T)>,
    ) -> anyhow::Result<T> {
        for attempt in 0..MAX_CONFLICTS {
            let (old, version) = match self.read_index().await? {
                Some((i, _, v)) => (Some(i), Some(v)),
                None => (None, None),
            };
            let (new, out) = change(old).await?;
            let Some(new) = new else { return Ok(out) };
            if self.put_index(&new, version).await? {
                return Ok(out);
            }
            // Lost a race: back off a random while (growing), then read again.
            let ms = 5 + rand::random_range(0..20 * u64::from(attempt.min(10) + 1));
            tracing::debug!("{}: changed by another writer; retrying", self.name(INDEX));
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        bail!(
            "{}: gave up after {MAX_CONFLICTS} conflicting writes by other registrations",
            self.name(INDEX)
        )
    }

    /// Put a local file as a content-addressed blob, unless the store has it.
    async fn put_blob(&self, path: &Path, sha256: &str) -> anyhow::Result<()> {
        let rel = Self::blob_rel(sha256);
        let dest = self.path(&rel);
        if self.store.head(&dest).await.is_ok() {
            return Ok(());
        }
        let data = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        if sha256_hex(&data) != sha256 {
            bail!("{}: changed while being registered", path.display());
        }
        tracing::info!(
            "uploading {} ({} bytes) to {}",
            path.display(),
            data.len(),
            self.name(&rel)
        );
        match self
            .store
            .put_opts(&dest, PutPayload::from(data), PutMode::Create.into())
            .await
        {
            Ok(_) | Err(object_store::Error::AlreadyExists { .. }) => Ok(()),
            Err(e) => Err(e).with_context(|| format!("uploading {} to {}", path.display(), self.name(&rel))),
        }
    }

    /// Register: blobs first (kept across retries), then the index, conditionally.
    pub(crate) fn register(
        &self,
        metas: &[(Origin, CheckpointMeta)],
        partition: Option<&PartitionManifest>,
        replace: bool,
    ) -> anyhow::Result<Vec<Registered>> {
        let mut uploaded = std::collections::BTreeSet::new();
        let cache = self.cache_dir();
        self.block_on(self.update(async |old: Option<Index>| {
            // Entries written before ddm recorded their classes are read from their blobs.
            for e in old.iter().flat_map(|i| i.experts.values().chain(i.router.iter())) {
                let blob = e.blob(&cache);
                if e.classes.is_none() && e.remote.is_none() && !blob.exists() {
                    std::fs::create_dir_all(cache.join("blobs"))?;
                    self.fetch_blob(e, &blob).await?;
                }
            }
            let Plan {
                index,
                blobs,
                lines,
                changed,
            } = plan(old, metas, partition, replace, &|e| e.classes(&cache))?;
            if !changed {
                return Ok((None, lines));
            }
            // Blobs before the index that names them (once each, however many retries).
            for b in &blobs {
                if uploaded.insert(b.sha256.clone()) {
                    self.put_blob(&b.path, &b.sha256).await?;
                }
            }
            Ok((Some(index), lines))
        }))?
    }

    /// Remove an expert (by cluster) or the router.
    pub fn remove(&self, cluster: Option<usize>, router: bool) -> anyhow::Result<()> {
        let url = self.url.clone();
        self.block_on(self.update(async |idx: Option<Index>| {
            let mut idx = idx.with_context(|| format!("{url}: no registry here"))?;
            idx.remove(cluster, router)?;
            Ok((Some(idx), ()))
        }))?
    }

    /// This registry's local cache directory.
    pub fn cache_dir(&self) -> PathBuf {
        ddm_core::env::cache_dir()
            .join("registries")
            .join(&sha256_hex(self.url.as_bytes())[..16])
    }

    /// Stream an entry's blob through `sink`, hashing it on the way; its sha256. Errors name the
    /// object's URL.
    async fn stream_blob(
        &self,
        e: &Entry,
        mut sink: impl FnMut(&[u8]) -> anyhow::Result<()>,
    ) -> anyhow::Result<String> {
        let rel = Self::blob_rel(&e.sha256);
        let name = self.name(&rel);
        let got = self
            .store
            .get(&self.path(&rel))
            .await
            .with_context(|| format!("fetching {name} (named by {})", self.name(INDEX)))?;
        let mut hash = Sha256Stream::default();
        let mut stream = got.into_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.with_context(|| format!("fetching {name}"))?;
            hash.update(&chunk);
            sink(&chunk)?;
        }
        Ok(hash.finish())
    }

    /// Download a blob to `dest`, hashing it on the way; refused (and not kept) unless it hashes
    /// to the entry's sha256.
    async fn fetch_blob(&self, e: &Entry, dest: &Path) -> anyhow::Result<()> {
        let name = self.name(&Self::blob_rel(&e.sha256));
        let dir = dest.parent().context("a blob path has a parent")?;
        let mut tmp = tempfile::Builder::new()
            .prefix(".ddm-fetch-")
            .tempfile_in(dir)
            .with_context(|| format!("creating a file in {}", dir.display()))?;
        let got = self
            .stream_blob(e, |chunk| {
                std::io::Write::write_all(&mut tmp, chunk)
                    .with_context(|| format!("writing {}", dest.display()))
            })
            .await?;
        if got != e.sha256 {
            bail!(
                "{name}: hashes to {got}, but the registry names {} (a corrupted or replaced blob); not used",
                e.sha256
            );
        }
        tmp.persist(dest)
            .with_context(|| format!("moving {} into place", dest.display()))?;
        Ok(())
    }

    /// Pull the index and every blob it names into the local cache; returns the cache directory
    /// (a registry directory). The cache's index is written last, so it never names a blob the
    /// cache lacks.
    pub fn pull(&self) -> anyhow::Result<PathBuf> {
        let cache = self.cache_dir();
        let blobs = cache.join("blobs");
        std::fs::create_dir_all(&blobs).with_context(|| format!("creating {}", blobs.display()))?;
        self.block_on(async {
            let (idx, raw, _) = self
                .read_index()
                .await?
                .with_context(|| format!("{}: no registry here", self.url))?;
            for e in idx.blob_entries() {
                let dest = e.blob(&cache);
                if dest.exists() && sha256_file(&dest)? == e.sha256 {
                    continue;
                }
                tracing::info!(
                    "fetching {} ({} bytes)",
                    self.name(&Self::blob_rel(&e.sha256)),
                    e.bytes
                );
                self.fetch_blob(e, &dest).await?;
            }
            ddm_core::fsio::write_bytes_atomic(&cache.join(INDEX), &raw)?;
            anyhow::Ok(())
        })??;
        Ok(cache)
    }

    /// Fetch every blob again and hash it; ask every server of a remote expert. Every problem.
    pub fn verify(&self) -> anyhow::Result<Vec<String>> {
        let idx = self
            .index()?
            .with_context(|| format!("{}: no registry here", self.url))?;
        Ok(super::publish::verify_index(&idx, &|e| {
            let name = self.name(&Self::blob_rel(&e.sha256));
            let mut bytes = vec![];
            self.block_on(self.stream_blob(e, |chunk| {
                bytes.extend_from_slice(chunk);
                Ok(())
            }))??;
            Ok((std::path::PathBuf::from(name), bytes))
        }))
    }

    /// Delete the blobs no entry names, older than the grace period (younger ones may belong to
    /// a registration in flight). With `dry_run`, only lists them.
    pub fn gc(&self, dry_run: bool) -> anyhow::Result<(Vec<String>, u64)> {
        let grace = ddm_core::env::registry_gc_grace()?.map_or(DEFAULT_GC_GRACE_S, |d| d.as_secs());
        let idx = self
            .index()?
            .with_context(|| format!("{}: no registry here", self.url))?;
        let named: std::collections::BTreeSet<String> =
            idx.blob_entries().map(|e| Self::blob_rel(&e.sha256)).collect();
        self.block_on(async {
            let prefix = self.path("blobs");
            let mut listed = self.store.list(Some(&prefix));
            let mut orphans = vec![];
            let now = super::index::now();
            while let Some(meta) = listed.next().await {
                let meta = meta.with_context(|| format!("listing {}", self.name("blobs")))?;
                let rel = format!("blobs/{}", meta.location.filename().unwrap_or_default());
                let age = now.saturating_sub(meta.last_modified.timestamp().max(0) as u64);
                if !named.contains(&rel) && age >= grace {
                    orphans.push((meta.location.clone(), self.name(&rel), meta.size));
                }
            }
            orphans.sort_by(|a, b| a.1.cmp(&b.1));
            if !dry_run {
                for (path, name, _) in &orphans {
                    self.store
                        .delete(path)
                        .await
                        .with_context(|| format!("deleting {name}"))?;
                }
            }
            let bytes = orphans.iter().map(|o| o.2).sum();
            anyhow::Ok((orphans.into_iter().map(|o| o.1).collect(), bytes))
        })?
    }
}

impl super::backend::Backend for StoreRegistry {
    fn url(&self) -> String {
        self.url.clone()
    }

    fn local(&self) -> anyhow::Result<PathBuf> {
        self.pull()
    }

    fn index(&self) -> anyhow::Result<Option<Index>> {
        StoreRegistry::index(self)
    }

    fn register(
        &self,
        metas: &[(Origin, CheckpointMeta)],
        partition: Option<&PartitionManifest>,
        replace: bool,
    ) -> anyhow::Result<Vec<Registered>> {
        StoreRegistry::register(self, metas, partition, replace)
    }

    fn verify(&self) -> anyhow::Result<Vec<String>> {
        StoreRegistry::verify(self)
    }

    fn remove(&self, cluster: Option<usize>, router: bool) -> anyhow::Result<()> {
        StoreRegistry::remove(self, cluster, router)
    }

    fn gc(&self, dry_run: bool) -> anyhow::Result<(Vec<String>, u64)> {
        StoreRegistry::gc(self, dry_run)
    }
}

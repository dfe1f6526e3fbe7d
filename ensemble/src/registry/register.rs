//! Adding checkpoints to a registry and removing them: every check before any write, blobs
//! before the index, the index replaced atomically, all under an exclusive file lock.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use ddm_core::checkpoint::{Checkpoint, CheckpointMeta, Role};
use ddm_core::digest::{sha256_file, sha256_hex};
use ddm_core::partition::PartitionManifest;
use ddm_core::stats::{ClusterStats, STATS_FILE, StatsMeta};
use serde::Serialize;

use super::index::{Entry, FORMAT, INDEX, Index, LOCK, now, read_index};

/// A file on its way into a registry: where it is, its sha256 and size, hashed once when read.
#[derive(Debug, Clone)]
pub struct Blob {
    pub path: PathBuf,
    pub sha256: String,
    pub bytes: u64,
}

impl Blob {
    fn hash(path: &Path) -> anyhow::Result<Blob> {
        Ok(Blob {
            path: path.to_path_buf(),
            sha256: sha256_file(path)?,
            bytes: std::fs::metadata(path).map(|m| m.len()).unwrap_or(0),
        })
    }
}

/// An expert's statistics file found beside it, and whose they say they are.
pub struct StatsBeside {
    blob: Blob,
    meta: StatsMeta,
}

/// Where a checkpoint to register is: a file (with its statistics, for an expert that has them
/// beside it), or a server that serves it.
pub enum Origin {
    File { blob: Blob, stats: Option<StatsBeside> },
    Served { url: String, sha256: String, bytes: u64 },
}

impl Origin {
    fn name(&self) -> String {
        match self {
            Origin::File { blob, .. } => blob.path.display().to_string(),
            Origin::Served { url, .. } => url.clone(),
        }
    }

    /// The checkpoint as a blob (a served one's "path" is its URL), and the URL if it is served.
    fn blob(&self) -> (Blob, Option<String>) {
        match self {
            Origin::File { blob, .. } => (blob.clone(), None),
            Origin::Served { url, sha256, bytes } => (
                Blob {
                    path: PathBuf::from(url),
                    sha256: sha256.clone(),
                    bytes: *bytes,
                },
                Some(url.clone()),
            ),
        }
    }
}

/// What one registration would add.
enum Item {
    Expert {
        cluster: usize,
        blob: Blob,
        classes: usize,
        /// Width of the conditioning vectors it reads (None: none).
        condition_dim: Option<usize>,
        /// Width of the token embeddings it reads (None: none).
        token_dim: Option<usize>,
        /// Served at this URL (no blob is stored).
        remote: Option<String>,
    },
    Router {
        blob: Blob,
        k: usize,
        priors: Option<Vec<f64>>,
        classes: usize,
        /// Widths of the conditioning vectors and token states it reads (None: none).
        widths: (Option<usize>, Option<usize>),
    },
    Stats {
        cluster: usize,
        blob: Blob,
    },
    Vae {
        blob: Blob,
    },
}

/// One file a registration added (an expert's statistics come along unlisted).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Registered {
    /// `expert`, `router` or `vae`.
    pub role: &'static str,
    /// The expert's cluster.
    pub cluster: Option<usize>,
    /// The router's K.
    pub k: Option<usize>,
    pub source: String,
    pub sha256: String,
    /// The registry held this very file already (same sha256): nothing was written for it.
    pub already_registered: bool,
}

impl Registered {
    /// The line of a file the registry holds already.
    fn held(role: &'static str, cluster: Option<usize>, k: Option<usize>, source: &str, blob: &Blob) -> Self {
        Registered {
            role,
            cluster,
            k,
            source: source.to_string(),
            sha256: blob.sha256.clone(),
            already_registered: true,
        }
    }
}

impl std::fmt::Display for Registered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.cluster, self.k) {
            _ if self.role == "vae" => write!(
                f,
                "VAE: {} ({})",
                ddm_core::text::printable(&self.source),
                ddm_core::text::short(&self.sha256, 12)
            )?,
            (Some(c), _) => write!(
                f,
                "expert {c}: {} ({})",
                ddm_core::text::printable(&self.source),
                ddm_core::text::short(&self.sha256, 12)
            )?,
            (_, k) => write!(
                f,
                "router (K = {}): {} ({})",
                k.unwrap_or(0),
                ddm_core::text::printable(&self.source),
                ddm_core::text::short(&self.sha256, 12)
            )?,
        }
        if self.already_registered {
            write!(f, ", already registered")?;
        }
        Ok(())
    }
}

/// Read and check the checkpoints to register: each file's own checksum, finite weights, and its
/// sha256 (the registry's covers the whole file), from one read of the file. An expert's
/// statistics file beside it is read and hashed here too, so that planning reads nothing; the
/// file is read once more, and hashed again, only when it is copied into the registry.
pub(crate) fn read_checkpoints(paths: &[PathBuf]) -> anyhow::Result<Vec<(Origin, CheckpointMeta)>> {
    let mut metas = vec![];
    for p in paths {
        let raw = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
        let blob = Blob {
            path: p.clone(),
            sha256: sha256_hex(&raw),
            bytes: raw.len() as u64,
        };
        // Verifies the file's seals and that its weights are finite.
        let ckpt = Checkpoint::from_file(ddm_core::host::TensorFile::from_bytes(p, raw)?)?;
        if !ckpt.sealed() {
            bail!(
                "{}: written by an older ddm (checkpoint format {}), whose seal does not cover the whole file; \
                 re-seal it with `ddm import --from ddm {} --out NEW.safetensors` and register that",
                p.display(),
                ckpt.meta.format_version,
                p.display()
            );
        }
        let stats = p.with_file_name(STATS_FILE);
        let stats = match ckpt.meta.role == Role::Expert && stats.exists() {
            true => Some(StatsBeside {
                meta: ClusterStats::load(&stats)?.0,
                blob: Blob::hash(&stats)?,
            }),
            false => None,
        };
        metas.push((Origin::File { blob, stats }, ckpt.meta));
    }
    Ok(metas)
}

/// Register checkpoint files into the registry directory `dir` (see
/// [`super::Location::register`]).
pub fn register(
    dir: &Path,
    paths: &[PathBuf],
    partition: Option<&PartitionManifest>,
    replace: bool,
) -> anyhow::Result<Vec<Registered>> {
    commit(dir, &read_checkpoints(paths)?, partition, replace)
}

/// The experts a `ddm serve` at `url` serves (those of `clusters`, or all), as registration
/// origins with their metadata.
pub(crate) fn served_checkpoints(
    url: &str,
    clusters: Option<&[usize]>,
) -> anyhow::Result<Vec<(Origin, CheckpointMeta)>> {
    let client = crate::remote::Client::new(url)?;
    let served = client.metadata()?;
    let mut metas: Vec<(Origin, CheckpointMeta)> = vec![];
    for (&k, ck) in &served.experts {
        if clusters.is_some_and(|c| !c.contains(&k)) {
            continue;
        }
        if ck.meta.cluster != Some(k) {
            bail!(
                "{url}: serves as expert {k} a checkpoint of {}",
                ck.meta
                    .cluster
                    .map_or("no cluster".into(), |c| format!("cluster {c}"))
            );
        }
        metas.push((
            Origin::Served {
                url: client.base.clone(),
                sha256: ck.sha256.clone(),
                bytes: ck.bytes,
            },
            ck.meta.clone(),
        ));
    }
    if let Some(want) = clusters
        && let Some(k) = want.iter().find(|k| !served.experts.contains_key(k))
    {
        bail!(
            "{url}: serves no expert for cluster {k} (it serves {:?})",
            served.experts.keys().collect::<Vec<_>>()
        );
    }
    if metas.is_empty() {
        bail!("{url}: serves no expert");
    }
    Ok(metas)
}

/// The registration of a directory registry: its lock, then [`commit_locked`].
pub(crate) fn commit(
    dir: &Path,
    metas: &[(Origin, CheckpointMeta)],
    partition: Option<&PartitionManifest>,
    replace: bool,
) -> anyhow::Result<Vec<Registered>> {
    std::fs::create_dir_all(dir.join("blobs"))
        .with_context(|| format!("creating the registry {}", dir.display()))?;
    let _lock = lock_registry(dir)?;
    commit_locked(dir, metas, partition, replace)
}

/// The registration of a directory registry, under its lock: plan, then blobs, then the index.
fn commit_locked(
    dir: &Path,
    metas: &[(Origin, CheckpointMeta)],
    partition: Option<&PartitionManifest>,
    replace: bool,
) -> anyhow::Result<Vec<Registered>> {
    let plan = plan(read_index(dir)?, metas, partition, replace, &|e| e.classes(dir))?;
    if !plan.changed {
        return Ok(plan.lines);
    }
    for b in &plan.blobs {
        let stored = dir.join("blobs").join(format!("{}.safetensors", b.sha256));
        if !stored.exists() {
            let data = std::fs::read(&b.path).with_context(|| format!("reading {}", b.path.display()))?;
            if sha256_hex(&data) != b.sha256 {
                bail!("{}: changed while being registered", b.path.display());
            }
            ddm_core::fsio::write_bytes_atomic(&stored, &data)?;
        }
    }
    let json = ddm_core::json::to_vec_pretty(INDEX, &plan.index)?;
    ddm_core::fsio::write_bytes_atomic(&dir.join(INDEX), &json)?;
    Ok(plan.lines)
}

/// What one registration does, decided before anything is written: the index after it, the
/// files to store as blobs and a line per registered file. `changed` is false
/// when the registry holds every file already (then nothing is to be written).
pub struct Plan {
    pub index: Index,
    pub blobs: Vec<Blob>,
    pub lines: Vec<Registered>,
    pub changed: bool,
}

/// Check every checkpoint against the registry `existing` (or a new one, from `partition` or a
/// router), and plan the registration. `classes` gives the conditioning of an existing entry
/// that does not record it (read from its blob). Reads and writes nothing itself.
pub fn plan(
    existing: Option<Index>,
    metas: &[(Origin, CheckpointMeta)],
    partition: Option<&PartitionManifest>,
    replace: bool,
    classes: &dyn Fn(&Entry) -> anyhow::Result<usize>,
) -> anyhow::Result<Plan> {
    let is_new = existing.is_none();
    let mut idx = match existing {
        Some(idx) => idx,
        None => new_index(metas, partition)?,
    };
    // 1. Check everything first.
    let (mut items, mut lines) = (vec![], vec![]);
    for (origin, m) in metas {
        match check(&idx, origin, m, replace)? {
            Checked::Held(line) => lines.push(line),
            Checked::Add(new) => items.extend(new),
        }
        if idx.text.is_none() {
            idx.text = m.text.clone(); // the first model that reads text vectors names their space
        }
    }
    let named = idx.class_names.is_none() && name_classes(&mut idx, partition);
    let changed = is_new || named || !items.is_empty();
    check_conditioning(classes, &mut idx, &items)?;
    // 2. The entries, and the blobs they name.
    let blobs = add(items, &mut idx, &mut lines);
    Ok(Plan {
        index: idx,
        blobs,
        lines,
        changed,
    })
}

/// Record the partition's class names in a registry that has none (the partition must be the
/// registry's); true if it did.
fn name_classes(idx: &mut Index, partition: Option<&PartitionManifest>) -> bool {
    match partition {
        Some(m) if m.fingerprint == idx.partition && m.dataset.class_names.is_some() => {
            idx.class_names = m.dataset.class_names.clone();
            true
        }
        _ => false,
    }
}

/// A new registry's index: K, priors and partition from the partition (or a router among the
/// files), the data spec and latent space from the first model.
fn new_index(
    metas: &[(Origin, CheckpointMeta)],
    partition: Option<&PartitionManifest>,
) -> anyhow::Result<Index> {
    let (partition_fp, k, priors) = match partition {
        Some(m) => (m.fingerprint.clone(), m.k, Some(m.priors())),
        None => match metas.iter().find(|(_, m)| m.role == Role::Router) {
            Some((_, m)) => (
                m.partition.clone().context("the router names no partition")?,
                m.num_clusters.context("the router names no K")?,
                m.priors.clone(),
            ),
            None => bail!(
                "a new registry needs --partition DIR (or a router among the files) to know K and the partition"
            ),
        },
    };
    let first = metas
        .iter()
        .map(|(_, m)| m)
        .find(|m| matches!(m.role, Role::Expert | Role::Router))
        .context("nothing to register but a VAE: register the experts first (they say which latent space the registry is in)")?;
    Ok(Index {
        latent: first.latent.clone(),
        vae: None,
        text: None,
        data: first.data.clone(),
        format_version: FORMAT,
        partition: partition_fp,
        k,
        priors,
        router: None,
        experts: BTreeMap::new(),
        stats: BTreeMap::new(),
        class_names: None,
    })
}

/// One checkpoint, checked: the registry holds it already, or what it adds.
enum Checked {
    Held(Registered),
    Add(Vec<Item>),
}

/// Check one checkpoint against the registry: its role, space, partition and data, its place.
fn check(idx: &Index, origin: &Origin, m: &CheckpointMeta, replace: bool) -> anyhow::Result<Checked> {
    let name = origin.name();
    if m.role == Role::Autoencoder {
        return check_vae(idx, origin, m, replace);
    }
    if m.role == Role::TextEncoder {
        bail!(
            "{name}: a text encoder is not a member of an ensemble; `ddm encode-text` turns captions into the conditioning experts and routers read"
        );
    }
    check_same_ensemble(idx, &name, m)?;
    let (blob, remote) = origin.blob();
    // The same file from the same place: registered already.
    let held = |old: &Entry| old.sha256 == blob.sha256 && old.remote == remote;
    let refuse = |what: &str, old: &Entry| {
        anyhow::anyhow!(
            "{name}: {what} ({}); pass --replace to replace it",
            ddm_core::text::short(&old.sha256, 12)
        )
    };
    let classes = m.model.num_classes();
    match m.role {
        Role::Expert => {
            let cluster = m.cluster.with_context(|| {
                format!("{name}: an expert with no cluster id (a monolith cannot join an ensemble)")
            })?;
            if cluster >= idx.k {
                bail!("{name}: cluster {cluster} is out of range for K = {}", idx.k);
            }
            if let Some(old) = idx.experts.get(&cluster) {
                if held(old) {
                    return Ok(Checked::Held(Registered::held(
                        "expert",
                        Some(cluster),
                        None,
                        &name,
                        &blob,
                    )));
                }
                if !replace {
                    return Err(refuse(&format!("cluster {cluster} already has an expert"), old));
                }
            }
            let mut items = stats_item(idx, origin, cluster).into_iter().collect::<Vec<_>>();
            items.push(Item::Expert {
                cluster,
                blob,
                classes,
                condition_dim: Some(m.model.condition_dim()).filter(|&d| d > 0),
                token_dim: Some(m.model.token_dim()).filter(|&d| d > 0),
                remote,
            });
            Ok(Checked::Add(items))
        }
        Role::Classifier => bail!("{name}: a classifier (used by ddm eval) cannot join an ensemble"),
        Role::Autoencoder => unreachable!("VAEs are checked above"),
        Role::TextEncoder => unreachable!("text encoders are refused above"),
        Role::Router if remote.is_some() => {
            bail!("{name}: a served router cannot be registered; register its checkpoint file")
        }
        Role::Router => {
            let k = m.num_clusters.unwrap_or(0);
            if k != idx.k {
                bail!("{name}: a router for K = {k}, but the registry has K = {}", idx.k);
            }
            if let Some(old) = &idx.router {
                if held(old) {
                    return Ok(Checked::Held(Registered::held(
                        "router",
                        None,
                        Some(k),
                        &name,
                        &blob,
                    )));
                }
                if !replace {
                    return Err(refuse("the registry already has a router", old));
                }
            }
            let priors = m.priors.clone();
            Ok(Checked::Add(vec![Item::Router {
                blob,
                k,
                priors,
                classes,
                widths: (m.condition_dim, m.condition_token_dim),
            }]))
        }
    }
}

/// A model joins only an ensemble of its own space, partition and data.
fn check_same_ensemble(idx: &Index, name: &str, m: &CheckpointMeta) -> anyhow::Result<()> {
    if m.latent != idx.latent {
        let space = |l: &Option<ddm_core::vae::LatentSpace>| {
            l.as_ref().map_or("pixel space".to_string(), |l| {
                format!("the latent space of {}", l.describe())
            })
        };
        bail!(
            "{name}: trained in {}, but this registry's experts are in {}; an ensemble cannot mix spaces",
            space(&m.latent),
            space(&idx.latent)
        );
    }
    if let (Some(a), Some(b)) = (&m.text, &idx.text)
        && a != b
    {
        bail!(
            "{name}: reads the text (vectors or tokens) of {}, but this registry's models read that of {}",
            a.describe(),
            b.describe()
        );
    }
    if m.partition.as_deref() != Some(idx.partition.as_str()) {
        bail!(
            "{name}: trained on partition {}, but this registry is for partition {}",
            m.partition.as_deref().unwrap_or("(none)"),
            idx.partition
        );
    }
    if m.data != idx.data {
        bail!(
            "{name}: a model of {}, but the registry holds {}",
            m.data,
            idx.data
        );
    }
    Ok(())
}

/// The statistics beside an expert's file, when they are this cluster's of this partition.
fn stats_item(idx: &Index, origin: &Origin, cluster: usize) -> Option<Item> {
    let Origin::File { stats: Some(s), .. } = origin else {
        return None;
    };
    (s.meta.partition == idx.partition && s.meta.cluster == Some(cluster)).then(|| Item::Stats {
        cluster,
        blob: s.blob.clone(),
    })
}

/// A VAE joins a registry whose experts were trained in its latent space.
fn check_vae(idx: &Index, origin: &Origin, m: &CheckpointMeta, replace: bool) -> anyhow::Result<Checked> {
    let name = origin.name();
    let Origin::File { blob, .. } = origin else {
        bail!("{name}: a served VAE cannot be registered; register its checkpoint file");
    };
    let ddm_core::model::ModelConfig::Vae(config) = &m.model else {
        bail!(
            "{name}: an autoencoder checkpoint whose model is a {}",
            m.model.arch()
        );
    };
    let space = ddm_core::vae::LatentSpace::of(config, &m.tensors_sha256);
    match &idx.latent {
        None => bail!("{name}: a VAE, but this registry's experts were trained in pixel space"),
        Some(l) if *l != space => bail!(
            "{name}: this VAE's latent space is {}, but the registry's experts were trained in {}",
            space.describe(),
            l.describe()
        ),
        Some(_) => {}
    }
    if let Some(old) = &idx.vae {
        if old.sha256 == blob.sha256 {
            return Ok(Checked::Held(Registered::held("vae", None, None, &name, blob)));
        }
        // Same latent space (checked above), so the same weights: a re-saved copy.
        if !replace {
            bail!(
                "{name}: the registry already has a VAE ({}); pass --replace",
                ddm_core::text::short(&old.sha256, 12)
            );
        }
    }
    Ok(Checked::Add(vec![Item::Vae { blob: blob.clone() }]))
}

/// Enter the checked items into the index, a line each (statistics come along unlisted); the
/// blobs to store (a served expert has none).
fn add(items: Vec<Item>, idx: &mut Index, lines: &mut Vec<Registered>) -> Vec<Blob> {
    let mut blobs = vec![];
    for item in items {
        let (blob, classes, (condition_dim, token_dim), remote) = match &item {
            Item::Expert {
                blob,
                classes,
                condition_dim,
                token_dim,
                remote,
                ..
            } => (
                blob.clone(),
                Some(*classes),
                (*condition_dim, *token_dim),
                remote.clone(),
            ),
            Item::Router {
                blob,
                classes,
                widths,
                ..
            } => (blob.clone(), Some(*classes), *widths, None),
            Item::Stats { blob, .. } | Item::Vae { blob } => (blob.clone(), None, (None, None), None),
        };
        let entry = Entry {
            sha256: blob.sha256.clone(),
            bytes: blob.bytes,
            source: blob.path.display().to_string(),
            registered_at: now(),
            classes,
            condition_dim,
            token_dim,
            remote: remote.clone(),
        };
        let line = |role, cluster, k| Registered {
            role,
            cluster,
            k,
            source: blob.path.display().to_string(),
            sha256: blob.sha256.clone(),
            already_registered: false,
        };
        if remote.is_none() {
            blobs.push(blob.clone());
        }
        match item {
            Item::Expert { cluster, .. } => {
                lines.push(line("expert", Some(cluster), None));
                idx.experts.insert(cluster, entry);
            }
            Item::Router { priors, k, .. } => {
                lines.push(line("router", None, Some(k)));
                if idx.priors.is_none() {
                    idx.priors = priors;
                }
                idx.router = Some(entry);
            }
            Item::Stats { cluster, .. } => {
                idx.stats.insert(cluster, entry);
            }
            Item::Vae { .. } => {
                lines.push(line("vae", None, None));
                idx.vae = Some(entry);
            }
        }
    }
    blobs
}

/// The experts of one registry share their conditioning (all unconditional, or all on the same C
/// classes), and a class-conditioned router serves experts conditioned on the same classes. An
/// unconditioned router may serve conditional experts: it routes on x_t alone, so at t = 1 it
/// returns the prior, not p(k | c) (allowed, with a warning here and in `ddm sample`).
///
/// Entries registered before ddm recorded their classes get them filled in (read once from the
/// blob), so later registrations do not read those blobs again.
fn check_conditioning(
    classes: &dyn Fn(&Entry) -> anyhow::Result<usize>,
    idx: &mut Index,
    items: &[Item],
) -> anyhow::Result<()> {
    for e in idx.experts.values_mut().chain(idx.router.as_mut()) {
        if e.classes.is_none() {
            e.classes = Some(classes(e)?);
        }
    }
    // Every expert after this registration, with its classes.
    let mut experts: BTreeMap<usize, (usize, String)> = BTreeMap::new();
    for (&c, e) in &idx.experts {
        experts.insert(c, (classes(e)?, e.source.clone()));
    }
    let mut router = match &idx.router {
        Some(e) => Some((classes(e)?, e.source.clone())),
        None => None,
    };
    for item in items {
        match item {
            Item::Expert {
                cluster,
                blob,
                classes,
                ..
            } => {
                experts.insert(*cluster, (*classes, blob.path.display().to_string()));
            }
            Item::Router { blob, classes, .. } => router = Some((*classes, blob.path.display().to_string())),
            Item::Stats { .. } | Item::Vae { .. } => {}
        }
    }
    let describe = |c: usize| match c {
        0 => "unconditional".to_string(),
        c => format!("conditioned on {c} classes"),
    };
    let mut first: Option<(usize, usize, &String)> = None;
    for (&cluster, (classes, source)) in &experts {
        match first {
            None => first = Some((cluster, *classes, source)),
            Some((c0, classes0, source0)) if classes0 != *classes => bail!(
                "{source}: expert {cluster} is {}, but expert {c0} ({source0}) is {}; one ensemble's experts share their conditioning",
                describe(*classes),
                describe(classes0)
            ),
            Some(_) => {}
        }
    }
    if let (Some((r, source)), Some((_, e, _))) = (&router, first) {
        if *r > 0 && *r != e {
            bail!(
                "{source}: the router is {}, but the experts are {}; train the router with the experts' conditioning",
                describe(*r),
                describe(e)
            );
        }
        if *r == 0 && e > 0 {
            tracing::warn!(
                "{source}: an unconditioned router for experts {}: it routes on x_t alone (the prior at t = 1, not p(k | c)); train it with --class-conditional for class-aware routing",
                describe(e)
            );
        }
    }
    Ok(())
}

/// How long a registration waits for another one's lock (`DDM_REGISTRY_LOCK_WAIT`, seconds).
const DEFAULT_LOCK_WAIT_S: f64 = 300.0;

/// The registry's exclusive lock (released when the file is dropped). Waits for another process
/// that holds it, saying so once, and gives up with an error naming the lock file after
/// `DDM_REGISTRY_LOCK_WAIT` seconds (default 300) rather than waiting forever on a hung one.
fn lock_registry(dir: &Path) -> anyhow::Result<File> {
    let path = dir.join(LOCK);
    let lock = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    let wait = ddm_core::env::registry_lock_wait()?.map_or(DEFAULT_LOCK_WAIT_S, |d| d.as_secs_f64());
    let start = std::time::Instant::now();
    let mut said = false;
    loop {
        match lock.try_lock() {
            Ok(()) => return Ok(lock),
            Err(std::fs::TryLockError::WouldBlock) => {
                if start.elapsed().as_secs_f64() >= wait {
                    bail!(
                        "{}: still locked by another process after {wait:.0} s (another `ddm register` or `registry remove` is running, or hung); set DDM_REGISTRY_LOCK_WAIT to wait longer",
                        path.display()
                    );
                }
                if !said {
                    tracing::warn!(
                        "{}: locked by another registration; waiting up to {wait:.0} s",
                        path.display()
                    );
                    said = true;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("locking {}", path.display()));
            }
        }
    }
}

/// Remove an expert (by cluster) or the router.
pub fn remove(dir: &Path, cluster: Option<usize>, router: bool) -> anyhow::Result<()> {
    let _lock = lock_registry(dir)?;
    let mut idx = read_index(dir)?.with_context(|| format!("{}: no registry here", dir.display()))?;
    idx.remove(cluster, router)?;
    ddm_core::fsio::write_bytes_atomic(&dir.join(INDEX), &ddm_core::json::to_vec_pretty(INDEX, &idx)?)?;
    Ok(())
}

/// Remove what no entry names: blobs of replaced or removed entries and temporary files that a
/// killed registration left in `blobs/`. Runs under the registry's lock, so no registration is
/// halfway. With `dry_run`, only lists them. Returns the files (to be) removed and their bytes.
pub fn gc(dir: &Path, dry_run: bool) -> anyhow::Result<(Vec<PathBuf>, u64)> {
    let _lock = lock_registry(dir)?;
    let idx = read_index(dir)?.with_context(|| format!("{}: no registry here", dir.display()))?;
    let named: std::collections::BTreeSet<PathBuf> = idx.blob_entries().map(|e| e.blob(dir)).collect();
    let blobs = dir.join("blobs");
    let mut orphans = vec![];
    let mut bytes = 0;
    for entry in std::fs::read_dir(&blobs).with_context(|| format!("reading {}", blobs.display()))? {
        let path = entry
            .with_context(|| format!("reading {}", blobs.display()))?
            .path();
        if path.is_file() && !named.contains(&path) {
            bytes += std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            orphans.push(path);
        }
    }
    orphans.sort();
    if !dry_run {
        for p in &orphans {
            std::fs::remove_file(p).with_context(|| format!("removing {}", p.display()))?;
        }
    }
    Ok((orphans, bytes))
}

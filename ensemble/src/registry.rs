//! The registry (a contract; see DESIGN.md): a directory with `registry.json` and content-addressed
//! blobs (`blobs/<sha256>.safetensors`). Registering verifies each checkpoint (its own checksum,
//! role, partition fingerprint, data spec, cluster id in range, K) and refuses anything else with a
//! clear message, leaving the registry untouched: every check runs before anything is written,
//! blobs are written before the index, and the index is replaced atomically. An exclusive file lock
//! around the read-modify-write makes concurrent registrations from several processes lose nothing.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use ddm_core::burn::prelude::*;
use ddm_core::checkpoint::{Checkpoint, CheckpointMeta, DataSpec, Objective, Role};
use ddm_core::flow::{EpsilonToVelocity, VelocityField};
use ddm_datasets::dataset::sha256_file;
use ddm_datasets::partition::PartitionManifest;
use ddm_router::analytic::AnalyticRouter;
use ddm_router::net::RouterNet;
use ddm_trainer::stats::ClusterStats;
use serde::{Deserialize, Serialize};

pub const INDEX: &str = "registry.json";
const LOCK: &str = "registry.lock";
const FORMAT: u32 = 1;

/// One registered file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub sha256: String,
    pub bytes: u64,
    /// Where it was registered from.
    pub source: String,
    /// Unix time of registration.
    pub registered_at: u64,
}

impl Entry {
    pub fn blob(&self, dir: &Path) -> PathBuf {
        dir.join("blobs").join(format!("{}.safetensors", self.sha256))
    }
}

/// registry.json.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Index {
    pub format_version: u32,
    /// The partition every entry belongs to.
    pub partition: String,
    pub k: usize,
    pub data: DataSpec,
    #[serde(default)]
    pub priors: Option<Vec<f64>>,
    #[serde(default)]
    pub router: Option<Entry>,
    /// Experts by cluster id.
    #[serde(default)]
    pub experts: BTreeMap<usize, Entry>,
    /// Per-cluster statistics (for the analytic router), by cluster id.
    #[serde(default)]
    pub stats: BTreeMap<usize, Entry>,
}

pub fn read_index(dir: &Path) -> anyhow::Result<Option<Index>> {
    let p = dir.join(INDEX);
    if !p.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
    let idx: Index =
        serde_json::from_str(&text).with_context(|| format!("{}: not a ddm registry index", p.display()))?;
    if idx.format_version != FORMAT {
        bail!(
            "{}: registry format {} is not supported (this ddm reads {FORMAT})",
            p.display(),
            idx.format_version
        );
    }
    Ok(Some(idx))
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// What one registration would add.
enum Item {
    Expert {
        cluster: usize,
        path: PathBuf,
        sha: String,
        bytes: u64,
    },
    Router {
        path: PathBuf,
        sha: String,
        bytes: u64,
        k: usize,
        priors: Option<Vec<f64>>,
    },
    Stats {
        cluster: usize,
        path: PathBuf,
        sha: String,
        bytes: u64,
    },
}

/// Register checkpoints (experts, a router; an expert's `cluster-stats.safetensors` beside it
/// comes along). `partition` gives K and the data spec when the registry is new (a router gives K
/// too). Returns one line per registered file.
pub fn register(
    dir: &Path,
    paths: &[PathBuf],
    partition: Option<&PartitionManifest>,
    replace: bool,
) -> anyhow::Result<Vec<String>> {
    std::fs::create_dir_all(dir.join("blobs"))
        .with_context(|| format!("creating the registry {}", dir.display()))?;
    let lock =
        File::create(dir.join(LOCK)).with_context(|| format!("creating {}", dir.join(LOCK).display()))?;
    lock.lock()
        .with_context(|| format!("locking {}", dir.join(LOCK).display()))?;

    let mut idx = read_index(dir)?;
    // 1. Read and check everything first.
    let mut items = vec![];
    let mut metas: Vec<(PathBuf, CheckpointMeta)> = vec![];
    for p in paths {
        let ckpt = Checkpoint::read(p)?; // verifies the file's own checksum
        metas.push((p.clone(), ckpt.meta));
    }
    if idx.is_none() {
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
        let data = metas
            .first()
            .map(|(_, m)| m.data.clone())
            .context("nothing to register")?;
        idx = Some(Index {
            format_version: FORMAT,
            partition: partition_fp,
            k,
            data,
            priors,
            router: None,
            experts: BTreeMap::new(),
            stats: BTreeMap::new(),
        });
    }
    let mut idx = idx.expect("set above");
    for (p, m) in &metas {
        let name = p.display();
        if m.partition.as_deref() != Some(idx.partition.as_str()) {
            bail!(
                "{name}: trained on partition {}, but this registry is for partition {}",
                m.partition.as_deref().unwrap_or("(none)"),
                idx.partition
            );
        }
        if m.data != idx.data {
            bail!(
                "{name}: data spec {:?} does not match the registry's {:?}",
                m.data,
                idx.data
            );
        }
        let sha = sha256_file(p)?;
        let bytes = std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        match m.role {
            Role::Expert => {
                let cluster = m.cluster.with_context(|| {
                    format!("{name}: an expert with no cluster id (a monolith cannot join an ensemble)")
                })?;
                if cluster >= idx.k {
                    bail!("{name}: cluster {cluster} is out of range for K = {}", idx.k);
                }
                if let Some(old) = idx.experts.get(&cluster)
                    && old.sha256 != sha
                    && !replace
                {
                    bail!(
                        "{name}: cluster {cluster} already has an expert ({}); pass --replace to replace it",
                        &old.sha256[..12]
                    );
                }
                let stats = p.with_file_name(ddm_trainer::stats::STATS_FILE);
                if stats.exists() {
                    let (sm, _) = ClusterStats::load(&stats)?;
                    if sm.partition == idx.partition && sm.cluster == Some(cluster) {
                        let s = sha256_file(&stats)?;
                        let b = std::fs::metadata(&stats).map(|m| m.len()).unwrap_or(0);
                        items.push(Item::Stats {
                            cluster,
                            path: stats,
                            sha: s,
                            bytes: b,
                        });
                    }
                }
                items.push(Item::Expert {
                    cluster,
                    path: p.clone(),
                    sha,
                    bytes,
                });
            }
            Role::Classifier => {
                bail!("{name}: a classifier (used by ddm eval) cannot join an ensemble")
            }
            Role::Router => {
                let k = m.num_clusters.unwrap_or(0);
                if k != idx.k {
                    bail!("{name}: a router for K = {k}, but the registry has K = {}", idx.k);
                }
                if let Some(old) = &idx.router
                    && old.sha256 != sha
                    && !replace
                {
                    bail!(
                        "{name}: the registry already has a router ({}); pass --replace",
                        &old.sha256[..12]
                    );
                }
                items.push(Item::Router {
                    path: p.clone(),
                    sha,
                    bytes,
                    k,
                    priors: m.priors.clone(),
                });
            }
        }
    }
    // 2. Blobs (content-addressed; atomic), then the index (atomic).
    let mut lines = vec![];
    for item in items {
        let (path, sha, bytes) = match &item {
            Item::Expert { path, sha, bytes, .. }
            | Item::Router { path, sha, bytes, .. }
            | Item::Stats { path, sha, bytes, .. } => (path.clone(), sha.clone(), *bytes),
        };
        let entry = Entry {
            sha256: sha.clone(),
            bytes,
            source: path.display().to_string(),
            registered_at: now(),
        };
        let blob = entry.blob(dir);
        if !blob.exists() {
            let data = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            if ddm_datasets::dataset::sha256_hex(&data) != sha {
                bail!("{}: changed while being registered", path.display());
            }
            ddm_core::fsio::write_bytes_atomic(&blob, &data)?;
        }
        match item {
            Item::Expert { cluster, .. } => {
                lines.push(format!("expert {cluster}: {} ({})", path.display(), &sha[..12]));
                idx.experts.insert(cluster, entry);
            }
            Item::Router { priors, k, .. } => {
                lines.push(format!("router (K = {k}): {} ({})", path.display(), &sha[..12]));
                if idx.priors.is_none() {
                    idx.priors = priors;
                }
                idx.router = Some(entry);
            }
            Item::Stats { cluster, .. } => {
                idx.stats.insert(cluster, entry);
            }
        }
    }
    let json = serde_json::to_vec_pretty(&idx)?;
    ddm_core::fsio::write_bytes_atomic(&dir.join(INDEX), &json)?;
    Ok(lines)
}

/// Remove an expert (by cluster) or the router.
pub fn remove(dir: &Path, cluster: Option<usize>, router: bool) -> anyhow::Result<()> {
    let lock = File::create(dir.join(LOCK))?;
    lock.lock()?;
    let mut idx = read_index(dir)?.with_context(|| format!("{}: no registry here", dir.display()))?;
    if let Some(k) = cluster {
        idx.experts
            .remove(&k)
            .with_context(|| format!("no expert for cluster {k}"))?;
        idx.stats.remove(&k);
    }
    if router {
        idx.router.take().context("no router registered")?;
    }
    ddm_core::fsio::write_bytes_atomic(&dir.join(INDEX), &serde_json::to_vec_pretty(&idx)?)?;
    Ok(())
}

/// Re-hash every blob; every problem found (it keeps going after the first).
pub fn verify(dir: &Path) -> anyhow::Result<Vec<String>> {
    let idx = read_index(dir)?.with_context(|| format!("{}: no registry here", dir.display()))?;
    let mut problems = vec![];
    let entries = idx
        .experts
        .iter()
        .map(|(k, e)| (format!("expert {k}"), e))
        .chain(idx.router.iter().map(|e| ("router".to_string(), e)))
        .chain(idx.stats.iter().map(|(k, e)| (format!("statistics {k}"), e)));
    for (what, e) in entries {
        let blob = e.blob(dir);
        match sha256_file(&blob) {
            Ok(h) if h == e.sha256 => {}
            Ok(h) => problems.push(format!(
                "{what}: {} hashes to {h}, expected {}",
                blob.display(),
                e.sha256
            )),
            Err(err) => problems.push(format!("{what}: {err}")),
        }
    }
    Ok(problems)
}

/// Write the published folder layout: `expert_K/{config.json, model.safetensors}` per expert,
/// `router/{config.json, model.safetensors}`, and `index.json` (the registry's index). `config.json`
/// is the checkpoint's ddm metadata; `model.safetensors` is the checkpoint itself.
pub fn export(dir: &Path, out: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let idx = read_index(dir)?.with_context(|| format!("{}: no registry here", dir.display()))?;
    let mut written = vec![];
    let mut put = |folder: String, e: &Entry| -> anyhow::Result<()> {
        let f = out.join(&folder);
        std::fs::create_dir_all(&f).with_context(|| format!("creating {}", f.display()))?;
        let blob = e.blob(dir);
        let ckpt = Checkpoint::read(&blob)?;
        ddm_core::fsio::write_bytes_atomic(&f.join("config.json"), &serde_json::to_vec_pretty(&ckpt.meta)?)?;
        let bytes = std::fs::read(&blob).with_context(|| format!("reading {}", blob.display()))?;
        ddm_core::fsio::write_bytes_atomic(&f.join("model.safetensors"), &bytes)?;
        written.push(f);
        Ok(())
    };
    for (k, e) in &idx.experts {
        put(format!("expert_{k}"), e)?;
    }
    if let Some(e) = &idx.router {
        put("router".into(), e)?;
    }
    ddm_core::fsio::write_bytes_atomic(&out.join("index.json"), &serde_json::to_vec_pretty(&idx)?)?;
    Ok(written)
}

/// Expand what `ddm register` was given: an exported folder (with `index.json`) becomes its
/// `*/model.safetensors` files; an `http://` URL is downloaded into `cache` (with `#sha256=HEX`,
/// the file must hash to HEX before it is used); anything else is a path.
pub fn expand_sources(sources: &[String], cache: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = vec![];
    for s in sources {
        if let Some(rest) = s
            .strip_prefix("http://")
            .or_else(|| s.strip_prefix("https://").map(|_| ""))
        {
            if rest.is_empty() {
                bail!(
                    "{s}: https needs a TLS-enabled build; ddm fetches plain http:// (integrity comes from sha256)"
                );
            }
            let (url, want) = match s.split_once("#sha256=") {
                Some((u, h)) => (u.to_string(), Some(h.to_ascii_lowercase())),
                None => (s.clone(), None),
            };
            let bytes = reqwest::blocking::get(&url)
                .and_then(|r| r.error_for_status())
                .and_then(|r| r.bytes())
                .with_context(|| format!("downloading {url}"))?;
            let got = ddm_datasets::dataset::sha256_hex(&bytes);
            if let Some(want) = want
                && want != got
            {
                bail!("{url}: sha256 {got} does not match the expected {want}; not used");
            }
            std::fs::create_dir_all(cache).with_context(|| format!("creating {}", cache.display()))?;
            let p = cache.join(format!("{got}.safetensors"));
            ddm_core::fsio::write_bytes_atomic(&p, &bytes)?;
            out.push(p);
            continue;
        }
        let p = PathBuf::from(s);
        if p.is_dir() {
            if !p.join("index.json").exists() {
                bail!(
                    "{}: a directory, but not an exported registry (no index.json)",
                    p.display()
                );
            }
            let mut models: Vec<PathBuf> = std::fs::read_dir(&p)
                .with_context(|| format!("reading {}", p.display()))?
                .filter_map(|e| e.ok().map(|e| e.path().join("model.safetensors")))
                .filter(|m| m.exists())
                .collect();
            models.sort();
            out.extend(models);
        } else {
            out.push(p);
        }
    }
    Ok(out)
}

/// A loaded registry, ready to hand experts to the sampler.
pub struct Registry {
    pub dir: PathBuf,
    pub index: Index,
}

impl Registry {
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        let index = read_index(dir)?
            .with_context(|| format!("{}: no registry here (ddm register creates one)", dir.display()))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            index,
        })
    }

    /// Expert `k` as a velocity field on `device` (epsilon experts are converted).
    pub fn expert(&self, k: usize, device: &Device) -> anyhow::Result<Box<dyn VelocityField<2>>> {
        self.expert_guided(k, device, None)
    }

    /// Expert `k`, with classifier-free guidance at `guidance` (class id, scale) if given; the
    /// expert must be class-conditional.
    pub fn expert_guided(
        &self,
        k: usize,
        device: &Device,
        guidance: Option<(usize, f64)>,
    ) -> anyhow::Result<Box<dyn VelocityField<2>>> {
        let e = self
            .index
            .experts
            .get(&k)
            .with_context(|| format!("no expert registered for cluster {k}"))?;
        let (meta, model) = ddm_core::checkpoint::load(&e.blob(&self.dir), device)?;
        let conditional = match &meta.model {
            ddm_core::model::ModelConfig::Dit(c) if c.num_classes > 0 => Some(c.clone()),
            _ => None,
        };
        let field: Box<dyn VelocityField<2>> = match meta.objective {
            Objective::Velocity => Box::new(model),
            Objective::Epsilon { schedule } => Box::new(EpsilonToVelocity {
                inner: model,
                schedule,
            }),
        };
        let Some((class, scale)) = guidance else {
            return Ok(field);
        };
        let Some(c) = conditional else {
            bail!(
                "expert {k} ({}) is not class-conditional (train with --class-conditional); sample without --class",
                e.source
            );
        };
        if class >= c.num_classes {
            bail!(
                "class {class} is out of range: expert {k} knows classes 0..={}",
                c.num_classes - 1
            );
        }
        if scale != 1.0 && c.class_rows() == c.num_classes {
            bail!(
                "expert {k} was trained without label dropout (no null class), so it cannot use --guidance other than 1"
            );
        }
        Ok(Box::new(ddm_core::flow::ClassifierFreeGuidance {
            inner: field,
            null_class: c.num_classes,
            scale,
        }))
    }

    pub fn router(&self, device: &Device) -> anyhow::Result<RouterNet> {
        let e = self
            .index
            .router
            .as_ref()
            .context("no router registered (use --router analytic, or register one)")?;
        let path = e.blob(&self.dir);
        Ok(RouterNet::from_checkpoint(
            &path,
            Checkpoint::read(&path)?,
            device,
        )?)
    }

    /// The analytic router from the registered per-cluster statistics.
    pub fn analytic_router(&self) -> anyhow::Result<AnalyticRouter> {
        let stats = (0..self.index.k)
            .map(|k| {
                let e = self
                    .index
                    .stats
                    .get(&k)
                    .with_context(|| format!("no statistics registered for cluster {k}"))?;
                Ok(ClusterStats::load(&e.blob(&self.dir))?.1)
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(AnalyticRouter::from_stats(&stats))
    }

    pub fn list(&self) -> String {
        let i = &self.index;
        let mut s = format!(
            "registry {} (partition {}, K = {}, data {:?})\n",
            self.dir.display(),
            &i.partition[..12.min(i.partition.len())],
            i.k,
            i.data.shape
        );
        for k in 0..i.k {
            match i.experts.get(&k) {
                Some(e) => s.push_str(&format!(
                    "  expert {k}: {} ({} bytes) from {}\n",
                    &e.sha256[..12],
                    e.bytes,
                    e.source
                )),
                None => s.push_str(&format!("  expert {k}: missing\n")),
            }
        }
        match &i.router {
            Some(e) => s.push_str(&format!(
                "  router:   {} ({} bytes) from {}\n",
                &e.sha256[..12],
                e.bytes,
                e.source
            )),
            None => s.push_str("  router:   none\n"),
        }
        s.push_str(&format!(
            "  statistics for the analytic router: {} of {}\n",
            i.stats.len(),
            i.k
        ));
        s
    }
}

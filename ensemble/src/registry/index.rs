//! `registry.json`: the index of a registry directory, and its content-addressed blobs
//! (`blobs/<sha256>.safetensors`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use ddm_core::checkpoint::DataSpec;
use ddm_core::clip::TextSpace;
use ddm_core::vae::LatentSpace;
use serde::{Deserialize, Serialize};

pub const INDEX: &str = "registry.json";
pub(crate) const LOCK: &str = "registry.lock";
pub(crate) const FORMAT: u32 = 1;

/// One registered file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub sha256: String,
    pub bytes: u64,
    /// Where it was registered from.
    pub source: String,
    /// Unix time of registration.
    pub registered_at: u64,
    /// Classes an expert or router is conditioned on (0: unconditioned). Absent for statistics
    /// and in entries registered before ddm recorded it (then read from the blob).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classes: Option<usize>,
    /// Width of the conditioning vectors an expert or router reads (a caption's pooled text
    /// embedding); absent: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub condition_dim: Option<usize>,
    /// Width of the token embeddings an expert reads by cross-attention (a PixArt reading a
    /// caption's token states), or a router averages; absent: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_dim: Option<usize>,
    /// An expert served elsewhere (`ddm serve`): its server's base URL. `sha256` is then the
    /// served checkpoint's, checked against the server by `registry verify`; there is no blob.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote: Option<String>,
}

impl Entry {
    pub fn blob(&self, dir: &Path) -> PathBuf {
        dir.join("blobs").join(format!("{}.safetensors", self.sha256))
    }

    /// Classes the checkpoint is conditioned on: recorded in the entry, or read from its blob.
    pub fn classes(&self, dir: &Path) -> anyhow::Result<usize> {
        match self.classes {
            Some(c) => Ok(c),
            None => Ok(ddm_core::checkpoint::Checkpoint::read(&self.blob(dir))?
                .meta
                .model
                .num_classes()),
        }
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
    /// The latent space every expert and the router were trained in (None: pixel space).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latent: Option<LatentSpace>,
    /// The VAE of that latent space, which `ddm sample --decode` decodes with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vae: Option<Entry>,
    /// The text space of the conditioning vectors its models read (which text encoder made
    /// them): what `ddm sample --prompt` encodes prompts into.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<TextSpace>,
    /// The names of the data's classes, from the partition (`ddm sample --class all` labels its
    /// grid's columns with them); absent for unlabelled data and registries made without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class_names: Option<Vec<String>>,
}

pub fn read_index(dir: &Path) -> anyhow::Result<Option<Index>> {
    let p = dir.join(INDEX);
    if !p.exists() {
        return Ok(None);
    }
    let text = std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
    parse_index(&text, &p.display().to_string()).map(Some)
}

/// An index's bytes (read from `name`), parsed and checked.
pub(crate) fn parse_index(text: &[u8], name: &str) -> anyhow::Result<Index> {
    let idx: Index =
        serde_json::from_slice(text).with_context(|| format!("{name}: not a ddm registry index"))?;
    if idx.format_version != FORMAT {
        bail!(
            "{name}: registry format {} is not supported (this ddm reads {FORMAT})",
            idx.format_version
        );
    }
    idx.check()
        .with_context(|| format!("{name}: an inconsistent registry index"))?;
    Ok(idx)
}

impl Index {
    /// Every entry: experts, statistics, the router, the VAE.
    pub fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.experts
            .values()
            .chain(self.stats.values())
            .chain(self.router.iter())
            .chain(self.vae.iter())
    }

    /// The entries with a blob (all but served experts).
    pub fn blob_entries(&self) -> impl Iterator<Item = &Entry> {
        self.entries().filter(|e| e.remote.is_none())
    }

    /// Remove the expert of `cluster` (with its statistics) and/or the router.
    pub fn remove(&mut self, cluster: Option<usize>, router: bool) -> anyhow::Result<()> {
        if let Some(k) = cluster {
            self.experts
                .remove(&k)
                .with_context(|| format!("no expert for cluster {k}"))?;
            self.stats.remove(&k);
        }
        if router {
            self.router.take().context("no router registered")?;
        }
        Ok(())
    }

    /// What the sampler relies on: K >= 1, a data shape with values, entries only for clusters
    /// 0..K, one prior per cluster, and every sha256 64 hex digits (a blob path built from it stays
    /// inside `blobs/`).
    pub fn check(&self) -> anyhow::Result<()> {
        if self.k == 0 || self.k > ddm_core::checkpoint::MAX_CLUSTERS {
            bail!(
                "k = {}: expected 1 ..= {}",
                self.k,
                ddm_core::checkpoint::MAX_CLUSTERS
            );
        }
        ddm_core::partition::check_sample_shape(&self.data.shape)
            .map_err(|e| anyhow::anyhow!("data: {e}"))?;
        ddm_core::checkpoint::check_range(self.data.range).map_err(|e| anyhow::anyhow!("data: {e}"))?;
        if let Some(p) = &self.priors {
            if p.len() != self.k {
                bail!("{} priors for k = {}", p.len(), self.k);
            }
            ddm_core::checkpoint::check_priors(p).map_err(|e| anyhow::anyhow!("priors: {e}"))?;
        }
        if self.vae.is_some() && self.latent.is_none() {
            bail!("a VAE, but the experts are in pixel space (no latent space recorded)");
        }
        if let Some(l) = &self.latent
            && l.latent_shape != self.data.shape
        {
            bail!(
                "data shape {:?}, but the latent space's latents are {:?}",
                self.data.shape,
                l.latent_shape
            );
        }
        for (what, map) in [("expert", &self.experts), ("statistics", &self.stats)] {
            if let Some(c) = map.keys().find(|&&c| c >= self.k) {
                bail!("{what} for cluster {c}, but k = {}", self.k);
            }
        }
        for e in self.entries() {
            if e.sha256.len() != 64
                || !e
                    .sha256
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
            {
                bail!(
                    "`{}` (from {}) is not a sha256 (64 lowercase hex digits)",
                    e.sha256,
                    e.source
                );
            }
        }
        Ok(())
    }
}

pub(crate) fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

//! What an index entry claims its blob to be, checked against the blob itself. The sha256 binds an
//! entry to bytes; this binds it to meaning: the blob named as expert k is an expert of cluster k
//! of this partition and data, the router is a router over these K clusters, statistics k are
//! cluster k's, the VAE is this latent space's. A hand-edited index that points one cluster's entry
//! at another cluster's file (whose sha256 is right) is refused by `registry verify` and by
//! everything that loads the entry.

use std::path::Path;

use anyhow::bail;
use ddm_core::checkpoint::{Checkpoint, Role};
use ddm_core::host::TensorFile;
use ddm_core::stats::{ClusterStats, StatsMeta};

use super::index::{Entry, Index};

/// Which entry of an index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    Expert(usize),
    Router,
    Stats(usize),
    Vae,
}

impl std::fmt::Display for Claim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Claim::Expert(k) => write!(f, "expert {k}"),
            Claim::Router => write!(f, "the router"),
            Claim::Stats(k) => write!(f, "statistics {k}"),
            Claim::Vae => write!(f, "the VAE"),
        }
    }
}

/// A blob parsed as its claim says: a checkpoint, or a cluster's statistics.
pub enum Parsed {
    Checkpoint(Box<Checkpoint>),
    Stats(StatsMeta, ClusterStats),
}

impl Claim {
    /// Every entry of `idx` with its claim.
    pub fn all(idx: &Index) -> Vec<(Claim, &Entry)> {
        let mut out: Vec<(Claim, &Entry)> = idx.experts.iter().map(|(&k, e)| (Claim::Expert(k), e)).collect();
        out.extend(idx.router.iter().map(|e| (Claim::Router, e)));
        out.extend(idx.stats.iter().map(|(&k, e)| (Claim::Stats(k), e)));
        out.extend(idx.vae.iter().map(|e| (Claim::Vae, e)));
        out
    }

    /// Parse a blob's bytes (read from `blob`) and check that it is what this claim says in `idx`.
    pub fn check(&self, idx: &Index, entry: &Entry, blob: &Path, bytes: Vec<u8>) -> anyhow::Result<Parsed> {
        let file = TensorFile::from_bytes(blob, bytes)?;
        let parsed = match self {
            Claim::Stats(_) => {
                let (meta, stats) = ClusterStats::from_file(&file)?;
                Parsed::Stats(meta, stats)
            }
            _ => Parsed::Checkpoint(Box::new(Checkpoint::from_file(file)?)),
        };
        let wrong = |is: String| -> anyhow::Result<Parsed> {
            bail!(
                "{}: registered as {self} of partition {}, but it is {is}",
                blob.display(),
                short(&idx.partition)
            )
        };
        match (&parsed, *self) {
            (Parsed::Stats(meta, stats), Claim::Stats(k)) => {
                let x: usize = idx.data.shape.iter().product();
                if meta.cluster != Some(k) || meta.partition != idx.partition {
                    return wrong(format!(
                        "the statistics of {} of partition {}",
                        cluster(meta.cluster),
                        short(&meta.partition)
                    ));
                }
                if stats.mean.len() != x {
                    return wrong(format!(
                        "statistics of {} values per sample, not {x}",
                        stats.mean.len()
                    ));
                }
            }
            (Parsed::Checkpoint(c), claim) => {
                let m = &c.meta;
                let role = match claim {
                    Claim::Expert(_) => Role::Expert,
                    Claim::Router => Role::Router,
                    _ => Role::Autoencoder,
                };
                if m.role != role {
                    return wrong(format!("a checkpoint whose role is {}", m.role));
                }
                match claim {
                    Claim::Expert(k)
                        if m.cluster != Some(k) || m.partition.as_deref() != Some(&idx.partition) =>
                    {
                        return wrong(format!(
                            "the expert of {} of partition {}",
                            cluster(m.cluster),
                            m.partition.as_deref().map_or("none".into(), short)
                        ));
                    }
                    Claim::Router
                        if m.num_clusters != Some(idx.k)
                            || m.partition.as_deref() != Some(&idx.partition) =>
                    {
                        return wrong(format!(
                            "a router over {} clusters of partition {}",
                            m.num_clusters.map_or("no".into(), |k| k.to_string()),
                            m.partition.as_deref().map_or("none".into(), short)
                        ));
                    }
                    Claim::Vae if c.latent_space().as_ref() != idx.latent.as_ref() => {
                        return wrong("the VAE of another latent space".into());
                    }
                    _ => {}
                }
                if matches!(claim, Claim::Expert(_) | Claim::Router) {
                    if m.data != idx.data {
                        return wrong(format!(
                            "a model of data {:?} in {:?}, not {:?} in {:?}",
                            m.data.shape, m.data.range, idx.data.shape, idx.data.range
                        ));
                    }
                    if m.latent != idx.latent {
                        return wrong("a model of another latent space".into());
                    }
                    if let Some(classes) = entry.classes
                        && classes != m.model.num_classes()
                    {
                        return wrong(format!(
                            "conditioned on {} classes, where the index records {classes}",
                            m.model.num_classes()
                        ));
                    }
                }
            }
            (Parsed::Stats(..), _) => unreachable!("only statistics claims parse as statistics"),
        }
        Ok(parsed)
    }
}

/// `cluster K`, or `no cluster` (a monolith's).
fn cluster(c: Option<usize>) -> String {
    c.map_or("no cluster".into(), |k| format!("cluster {k}"))
}

/// The first 12 characters of a fingerprint (for messages).
fn short(s: &str) -> String {
    s.chars().take(12).collect()
}

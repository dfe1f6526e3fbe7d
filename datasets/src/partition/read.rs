//! Reading a partition directory: partition.json (format and consistency checked) and shards
//! (sha256-verified against it), and re-hashing every file.

use std::path::{Path, PathBuf};

use ddm_core::digest::{sha256_file, sha256_hex};
use ddm_core::host::TensorFile;

use super::*;
use crate::dataset::{Dataset, Values};
use crate::error::{Error, Result};

/// An opened partition directory: `partition.json` read and checked on [`Partition::open`], shards
/// loaded (and sha256-verified) on demand. What islands, router training and registration hold
/// instead of a directory and a manifest side by side.
#[derive(Debug, Clone)]
pub struct Partition {
    dir: PathBuf,
    manifest: PartitionManifest,
}

impl Partition {
    pub fn open(dir: &Path) -> Result<Self> {
        Ok(Self {
            manifest: read_manifest(dir)?,
            dir: dir.to_path_buf(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn manifest(&self) -> &PartitionManifest {
        &self.manifest
    }

    /// K, the number of clusters (islands).
    pub fn k(&self) -> usize {
        self.manifest.k
    }

    /// Names this partition: same data, method, seed and assignment, same fingerprint.
    pub fn fingerprint(&self) -> &str {
        &self.manifest.fingerprint
    }

    /// Cluster `k`'s shard, verified.
    pub fn shard(&self, k: usize) -> Result<Dataset> {
        load_shard(&self.dir, &self.manifest, k)
    }

    /// The length of the data's per-sample conditioning vectors `c` (None: the data has none),
    /// read from the first non-empty shard.
    pub fn condition_dim(&self) -> Result<Option<usize>> {
        Ok(self
            .first_sample_shard()?
            .and_then(|s| s.cond.map(|c| c.shape[1])))
    }

    /// The width Dt of the data's token states (`c_tokens` of a tensors: file), read from the
    /// first non-empty shard; None: the data has no token sequences.
    pub fn token_dim(&self) -> Result<Option<usize>> {
        Ok(self
            .first_sample_shard()?
            .and_then(|s| s.tokens.map(|t| t.embeddings.shape[2])))
    }

    /// The first shard that holds samples (None: every shard is empty).
    fn first_sample_shard(&self) -> Result<Option<Dataset>> {
        for k in 0..self.k() {
            let shard = self.shard(k)?;
            if !shard.is_empty() {
                return Ok(Some(shard));
            }
        }
        Ok(None)
    }

    /// Every shard, concatenated in cluster order, with each sample's cluster id (what a router
    /// and the monolith baseline train on).
    pub fn all(&self) -> Result<(Dataset, Vec<u32>)> {
        let shards = (0..self.k()).map(|k| self.shard(k)).collect::<Result<Vec<_>>>()?;
        let clusters: Vec<u32> = shards
            .iter()
            .enumerate()
            .flat_map(|(k, s)| std::iter::repeat_n(k as u32, s.len()))
            .collect();
        let name = format!("{}[all clusters]", self.manifest.dataset.name);
        Ok((Dataset::concat(shards, name)?, clusters))
    }
}

/// Read `DIR/partition.json`.
pub fn read_manifest(dir: &Path) -> Result<PartitionManifest> {
    let p = dir.join(MANIFEST);
    let text = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::bad(&p, format!("not JSON: {e}")))?;
    match v.get("format_version").and_then(|v| v.as_u64()) {
        Some(v) if v == PARTITION_FORMAT as u64 => {}
        Some(v) => {
            return Err(Error::bad(
                &p,
                format!("partition format version {v} is not supported (this ddm reads {PARTITION_FORMAT})"),
            ));
        }
        None => return Err(Error::bad(&p, "no format_version: not a ddm partition.json")),
    }
    let m: PartitionManifest =
        serde_json::from_value(v).map_err(|e| Error::bad(&p, format!("bad partition.json: {e}")))?;
    if m.k == 0 {
        return Err(Error::bad(&p, "K = 0: a partition has at least one cluster"));
    }
    if m.k > ddm_core::checkpoint::MAX_CLUSTERS {
        return Err(Error::bad(
            &p,
            format!(
                "K = {}: at most {} clusters",
                m.k,
                ddm_core::checkpoint::MAX_CLUSTERS
            ),
        ));
    }
    if m.clusters.len() != m.k {
        return Err(Error::bad(
            &p,
            format!("K = {} but {} clusters are listed", m.k, m.clusters.len()),
        ));
    }
    if let Some((i, c)) = m.clusters.iter().enumerate().find(|(i, c)| c.id != *i) {
        return Err(Error::bad(&p, format!("cluster {i} is listed with id {}", c.id)));
    }
    ddm_core::checkpoint::check_priors(&m.priors()).map_err(|e| Error::bad(&p, format!("clusters: {e}")))?;
    m.dataset
        .check()
        .map_err(|e| Error::bad(&p, format!("dataset: {e}")))?;
    Ok(m)
}

/// Load cluster `k`'s shard: the file's sha256 must match partition.json, and its header must name
/// this partition and cluster.
pub fn load_shard(dir: &Path, manifest: &PartitionManifest, k: usize) -> Result<Dataset> {
    let entry = manifest.clusters.get(k).ok_or_else(|| {
        Error::Invalid(format!(
            "cluster {k} is out of range: the partition in {} has K = {}",
            dir.display(),
            manifest.k
        ))
    })?;
    let p = dir.join(&entry.shard);
    let want = manifest
        .files
        .get(&entry.shard)
        .ok_or_else(|| Error::bad(dir.join(MANIFEST), format!("no checksum for {}", entry.shard)))?;
    let bytes = std::fs::read(&p).map_err(|e| Error::io(&p, e))?;
    let got = sha256_hex(&bytes);
    if got != want.sha256 {
        return Err(Error::Checksum {
            path: p,
            expected: want.sha256.clone(),
            actual: got,
        });
    }
    let f = TensorFile::from_bytes(&p, bytes)?;
    let meta: ShardMeta = f
        .metadata
        .get(SHARD_META_KEY)
        .and_then(|m| serde_json::from_str(m).ok())
        .ok_or_else(|| Error::bad(&p, "no ddm-shard metadata"))?;
    if meta.partition != manifest.fingerprint || meta.cluster != k {
        return Err(Error::bad(
            &p,
            format!(
                "belongs to partition {} cluster {}, not {} cluster {k}",
                meta.partition, meta.cluster, manifest.fingerprint
            ),
        ));
    }
    let (dtype, shape) = f.info("x")?;
    let values = if dtype == ddm_core::host::Dtype::U8 {
        Values::U8(f.u8("x")?.1.to_vec())
    } else {
        Values::F32(f.f32("x")?.data)
    };
    let labels = if f.contains("y") {
        Some(f.i64("y")?.data.iter().map(|&v| v as u32).collect())
    } else {
        None
    };
    let cond = if f.contains("c") {
        let c = f.f32("c")?;
        if c.shape.len() != 2 || c.shape[0] != entry.count {
            return Err(Error::bad(
                &p,
                format!("`c` has shape {:?}, expected [{}, Dc]", c.shape, entry.count),
            ));
        }
        Some(c)
    } else {
        None
    };
    let d = &manifest.dataset;
    if shape.len() < 2 || shape[0] != entry.count || shape[1..] != d.shape[..] {
        return Err(Error::bad(
            &p,
            format!(
                "`x` has shape {shape:?}, partition.json says [{}, {:?}]",
                entry.count, d.shape
            ),
        ));
    }
    Ok(Dataset {
        name: format!("{}[cluster {k}]", d.name),
        shape: d.shape.clone(),
        values,
        labels,
        num_classes: d.num_classes,
        class_names: d.class_names.clone(),
        mixture: d.mixture.clone(),
        cond,
        tokens: crate::dataset::TokenSequences::read(&f, &p, entry.count)?,
        latent: d.latent.clone(),
        text: d.text.clone(),
    })
}

/// Re-hash every file of the partition; returns the problems found (empty: all good).
pub fn verify(dir: &Path) -> Result<Vec<String>> {
    let m = read_manifest(dir)?;
    let mut problems = vec![];
    for (name, e) in &m.files {
        let p = dir.join(name);
        match sha256_file(&p) {
            Ok(h) if h == e.sha256 => {}
            Ok(h) => problems.push(format!(
                "{}: sha256 {h}, partition.json says {}",
                p.display(),
                e.sha256
            )),
            Err(err) => problems.push(err.to_string()),
        }
    }
    Ok(problems)
}

//! Writing a partition directory: every shard and partition.json into a temporary directory,
//! renamed into place at the end.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use ddm_core::digest::sha256_hex;
use ddm_core::host::{HostTensor, RawTensor, raw_to_safetensors_bytes};

use super::cluster::{Clustering, fingerprint};
use super::*;
use crate::dataset::{Dataset, Values};
use crate::error::{Error, Result};

fn shard_bytes(dataset: &Dataset, idx: &[usize], meta: &ShardMeta) -> Result<Vec<u8>> {
    let sub = dataset.subset(idx);
    let mut shape = vec![idx.len()];
    shape.extend(&dataset.shape);
    let mut t = BTreeMap::new();
    t.insert(
        "x".to_string(),
        match &sub.values {
            Values::U8(v) => RawTensor::u8(shape, v.clone()),
            Values::F32(v) => RawTensor::f32(&HostTensor::new(shape, v.clone())),
        },
    );
    if let Some(c) = &sub.cond {
        t.insert("c".into(), RawTensor::f32(c));
    }
    if let Some(s) = &sub.tokens {
        t.insert("c_tokens".into(), RawTensor::f32(&s.embeddings));
        t.insert("c_mask".into(), RawTensor::f32(&s.mask));
    }
    if let Some(l) = &sub.labels {
        t.insert(
            "y".into(),
            RawTensor::i64(vec![idx.len()], &l.iter().map(|&v| v as i64).collect::<Vec<_>>()),
        );
    }
    t.insert(
        "index".into(),
        RawTensor::i64(
            vec![idx.len()],
            &idx.iter().map(|&v| v as i64).collect::<Vec<_>>(),
        ),
    );
    let md = HashMap::from([(
        SHARD_META_KEY.to_string(),
        ddm_core::json::to_string("a shard's header", meta)?,
    )]);
    Ok(raw_to_safetensors_bytes(&t, Some(md))?)
}

/// Whether `out` may become a partition directory: it does not exist, or `force` is given and it
/// is a partition directory (or an empty one). `--force` never replaces a file or a directory of
/// something else.
pub fn check_replaceable(out: &Path, force: bool) -> Result<()> {
    if !out.exists() {
        return Ok(());
    }
    if !force {
        return Err(Error::Invalid(format!(
            "{} already exists (pass --force to replace it)",
            out.display()
        )));
    }
    if !out.is_dir() {
        return Err(Error::Invalid(format!(
            "{} is a file, not a partition directory: --force replaces only a partition; choose another --out",
            out.display()
        )));
    }
    let empty = std::fs::read_dir(out)
        .map_err(|e| Error::io(out, e))?
        .next()
        .is_none();
    if !empty && !out.join(super::MANIFEST).exists() {
        return Err(Error::Invalid(format!(
            "{} is a directory without {}: --force replaces only a partition; choose another --out",
            out.display(),
            super::MANIFEST
        )));
    }
    Ok(())
}

/// Write the partition directory `out` for `dataset` clustered as `clustering`. Refuses an
/// existing `out` unless `force`. Nothing is left behind on failure.
pub fn write(
    out: &Path,
    dataset: &Dataset,
    config: &PartitionConfig,
    clustering: &Clustering,
    seconds: f64,
    force: bool,
) -> Result<PartitionManifest> {
    check_replaceable(out, force)?;
    let k = config.k;
    let info = dataset.info();
    let mut members: Vec<Vec<usize>> = vec![vec![]; k];
    for (i, &c) in clustering.assignment.iter().enumerate() {
        members[c as usize].push(i);
    }
    if let Some(empty) = members.iter().position(|m| m.is_empty()) {
        return Err(Error::Invalid(format!(
            "cluster {empty} of {k} is empty: use a smaller K, other features, or --balanced"
        )));
    }
    let fp = fingerprint(&info, config, &clustering.assignment);
    let tmp = ddm_core::fsio::TempDir::beside(out, "partition")?;
    let mut files = BTreeMap::new();
    let mut put = |name: &str, bytes: &[u8]| -> Result<()> {
        let p = tmp.path().join(name);
        ddm_core::fsio::write_bytes_atomic(&p, bytes)?;
        files.insert(
            name.to_string(),
            FileEntry {
                sha256: sha256_hex(bytes),
                bytes: bytes.len() as u64,
            },
        );
        Ok(())
    };
    // Centroids (and the PCA that maps samples to their feature space).
    let c = centroid_tensors(clustering, k);
    if !c.is_empty() {
        put("centroids.safetensors", &raw_to_safetensors_bytes(&c, None)?)?;
    }
    let a: Vec<i64> = clustering.assignment.iter().map(|&v| v as i64).collect();
    put(
        "assignment.safetensors",
        &raw_to_safetensors_bytes(
            &BTreeMap::from([("cluster".to_string(), RawTensor::i64(vec![a.len()], &a))]),
            None,
        )?,
    )?;
    let n = dataset.len();
    let mut clusters = vec![];
    for (j, idx) in members.iter().enumerate() {
        let meta = ShardMeta {
            format_version: PARTITION_FORMAT,
            partition: fp.clone(),
            cluster: j,
            dataset: info.clone(),
        };
        put(&shard_name(j), &shard_bytes(dataset, idx, &meta)?)?;
        clusters.push(ClusterEntry {
            id: j,
            count: idx.len(),
            prior: idx.len() as f64 / n as f64,
            shard: shard_name(j),
            label_counts: label_counts(dataset, idx),
        });
    }
    let manifest = PartitionManifest {
        format_version: PARTITION_FORMAT,
        fingerprint: fp,
        dataset: info,
        k,
        config: config.clone(),
        clusters,
        files,
        inertia: clustering.inertia,
        seconds,
    };
    let json = ddm_core::json::to_vec_pretty(MANIFEST, &manifest)?;
    ddm_core::fsio::write_bytes_atomic(&tmp.path().join(MANIFEST), &json)?;
    // Move into place: the directory appears whole or not at all.
    tmp.publish(out)?;
    Ok(manifest)
}

/// The centroids `[K, F]` and the PCA (`pca_mean` `[F0]`, `pca_components` `[F0, F]`) that maps
/// samples into their feature space, as tensors to write (none for random shards).
fn centroid_tensors(clustering: &Clustering, k: usize) -> BTreeMap<String, RawTensor> {
    let mut c = BTreeMap::new();
    if !clustering.centroids.is_empty() {
        let centroids = HostTensor::new(vec![k, clustering.feature_dim], clustering.centroids.clone());
        c.insert("centroids".into(), RawTensor::f32(&centroids));
    }
    if let Some(p) = &clustering.pca {
        let mean = HostTensor::new(vec![p.dim], p.mean.clone());
        let components = HostTensor::new(vec![p.dim, p.d], p.components.clone());
        c.insert("pca_mean".into(), RawTensor::f32(&mean));
        c.insert("pca_components".into(), RawTensor::f32(&components));
    }
    c
}

/// Samples per label among the samples `idx` (None for unlabelled data).
fn label_counts(dataset: &Dataset, idx: &[usize]) -> Option<Vec<usize>> {
    let l = dataset.labels.as_ref()?;
    let classes = dataset
        .num_classes
        .unwrap_or(0)
        .max(1 + *l.iter().max().unwrap_or(&0) as usize);
    let mut counts = vec![0usize; classes];
    idx.iter().for_each(|&i| counts[l[i] as usize] += 1);
    Some(counts)
}

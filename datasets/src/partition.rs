//! The partition directory (a contract; see DESIGN.md): everything K islands need, one shard each.
//!
//! ```text
//! DIR/partition.json          dataset identity + fingerprint, K, method, seed, per-cluster counts,
//!                             priors w_k and dominant labels, sha256 and size of every file
//! DIR/centroids.safetensors   `centroids` [K, F] in feature space (+ `pca_mean`, `pca_components`)
//! DIR/assignment.safetensors  `cluster` [N]: the cluster of every sample
//! DIR/shard-K.safetensors     exactly cluster K's samples: `x` [n_k, ...] (u8 images or f32),
//!                             `y` [n_k] labels if any, `index` [n_k] positions in the dataset
//! ```
//! An island needs `partition.json` and its own shard, nothing else. The directory is written in
//! a temporary directory beside the destination and renamed into place at the end, so a failure
//! leaves nothing behind. Shards are verified against partition.json's sha256 when loaded.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use ddm_core::host::{HostTensor, RawTensor, TensorFile, raw_to_safetensors_bytes};
use serde::{Deserialize, Serialize};

use crate::dataset::{Dataset, DatasetInfo, Values, sha256_file, sha256_hex};
use crate::error::{Error, Result};
use crate::features::{self, Distance, FeatureMethod};
use crate::kmeans::{self, KMeansConfig};
use crate::linalg::Pca;

/// The partition format version this build writes and reads.
pub const PARTITION_FORMAT: u32 = 1;
pub const MANIFEST: &str = "partition.json";
/// Header key of a shard's JSON metadata.
pub const SHARD_META_KEY: &str = "ddm-shard";

/// How samples are grouped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Algorithm {
    /// Plain k-means (k-means++, Lloyd; optional mini-batch and balanced assignment).
    Kmeans {
        max_iter: usize,
        n_init: usize,
        batch_size: Option<usize>,
        balanced: bool,
    },
    /// The paper's two-stage k-means: `fine` centroids on up to `subsample` points, then K coarse.
    TwoStage {
        fine: usize,
        subsample: usize,
        max_iter: usize,
    },
    /// Random equal-size shards: the baseline.
    Random,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PartitionConfig {
    pub k: usize,
    pub features: FeatureMethod,
    pub distance: Distance,
    pub algorithm: Algorithm,
    pub seed: u64,
}

/// One cluster of partition.json.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterEntry {
    pub id: usize,
    pub count: usize,
    /// w_k = n_k / N.
    pub prior: f64,
    pub shard: String,
    /// Samples per label in this cluster (if the data has labels).
    #[serde(default)]
    pub label_counts: Option<Vec<usize>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileEntry {
    pub sha256: String,
    pub bytes: u64,
}

/// partition.json.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PartitionManifest {
    pub format_version: u32,
    /// sha256 over the dataset fingerprint, K, the method, the seed and the assignment.
    pub fingerprint: String,
    pub dataset: DatasetInfo,
    pub k: usize,
    pub config: PartitionConfig,
    pub clusters: Vec<ClusterEntry>,
    /// Every other file of the directory, by name.
    pub files: BTreeMap<String, FileEntry>,
    /// k-means inertia in feature space (None for random shards).
    #[serde(default)]
    pub inertia: Option<f64>,
    pub seconds: f64,
}

impl PartitionManifest {
    pub fn priors(&self) -> Vec<f64> {
        self.clusters.iter().map(|c| c.prior).collect()
    }
}

/// The result of clustering a dataset.
pub struct Clustering {
    pub assignment: Vec<u32>,
    /// `[K, F]` in feature space (empty for random shards).
    pub centroids: Vec<f32>,
    pub feature_dim: usize,
    pub pca: Option<Pca>,
    pub inertia: Option<f64>,
}

/// Cluster `dataset` as `config` says.
pub fn cluster(dataset: &Dataset, config: &PartitionConfig) -> Result<Clustering> {
    let n = dataset.len();
    if config.k == 0 || config.k > n {
        return Err(Error::Invalid(format!(
            "K = {} must be between 1 and the number of samples ({n}) in {}",
            config.k, dataset.name
        )));
    }
    if let Algorithm::Random = config.algorithm {
        return Ok(Clustering {
            assignment: kmeans::random_partition(n, config.k, config.seed)?,
            centroids: vec![],
            feature_dim: 0,
            pca: None,
            inertia: None,
        });
    }
    let f = features::compute(dataset, &config.features, config.distance)?;
    let r = match &config.algorithm {
        Algorithm::Kmeans {
            max_iter,
            n_init,
            batch_size,
            balanced,
        } => {
            let cfg = KMeansConfig {
                max_iter: *max_iter,
                n_init: *n_init,
                batch_size: *batch_size,
                balanced: *balanced,
                ..KMeansConfig::new(config.k, config.seed)
            };
            kmeans::kmeans(&f.data, f.dim, None, &cfg)?
        }
        Algorithm::TwoStage {
            fine,
            subsample,
            max_iter,
        } => {
            let cfg = KMeansConfig {
                max_iter: *max_iter,
                ..KMeansConfig::new(config.k, config.seed)
            };
            kmeans::two_stage(&f.data, f.dim, *fine, *subsample, &cfg)?
        }
        Algorithm::Random => unreachable!("handled above"),
    };
    Ok(Clustering {
        assignment: r.assignment,
        centroids: r.centroids,
        feature_dim: f.dim,
        pca: f.pca,
        inertia: Some(r.inertia),
    })
}

fn fingerprint(info: &DatasetInfo, config: &PartitionConfig, assignment: &[u32]) -> String {
    let mut bytes = Vec::with_capacity(assignment.len() * 4 + 256);
    bytes.extend(info.fingerprint.as_bytes());
    bytes.extend(serde_json::to_vec(config).expect("config serialises"));
    for a in assignment {
        bytes.extend(a.to_le_bytes());
    }
    sha256_hex(&bytes)
}

/// The shard file name of cluster `k`.
pub fn shard_name(k: usize) -> String {
    format!("shard-{k}.safetensors")
}

/// A shard's header metadata.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShardMeta {
    pub format_version: u32,
    pub partition: String,
    pub cluster: usize,
    pub dataset: DatasetInfo,
}

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
        serde_json::to_string(meta).expect("serialises"),
    )]);
    Ok(raw_to_safetensors_bytes(&t, Some(md))?)
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
    if out.exists() && !force {
        return Err(Error::Invalid(format!(
            "{} already exists (pass --force to replace it)",
            out.display()
        )));
    }
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
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    let mut builder = tempfile::Builder::new();
    builder.prefix(".ddm-partition-");
    #[cfg(unix)]
    builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o755));
    let tmp = builder.tempdir_in(&parent).map_err(|e| Error::io(&parent, e))?;
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
    let mut c = BTreeMap::new();
    if !clustering.centroids.is_empty() {
        c.insert(
            "centroids".into(),
            RawTensor::f32(&HostTensor::new(
                vec![k, clustering.feature_dim],
                clustering.centroids.clone(),
            )),
        );
    }
    if let Some(p) = &clustering.pca {
        c.insert(
            "pca_mean".into(),
            RawTensor::f32(&HostTensor::new(vec![p.dim], p.mean.clone())),
        );
        c.insert(
            "pca_components".into(),
            RawTensor::f32(&HostTensor::new(vec![p.dim, p.d], p.components.clone())),
        );
    }
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
        let label_counts = dataset.labels.as_ref().map(|l| {
            let mut counts = vec![
                0usize;
                dataset
                    .num_classes
                    .unwrap_or(0)
                    .max(1 + *l.iter().max().unwrap_or(&0) as usize)
            ];
            idx.iter().for_each(|&i| counts[l[i] as usize] += 1);
            counts
        });
        clusters.push(ClusterEntry {
            id: j,
            count: idx.len(),
            prior: idx.len() as f64 / n as f64,
            shard: shard_name(j),
            label_counts,
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
    let json = serde_json::to_vec_pretty(&manifest).expect("manifest serialises");
    ddm_core::fsio::write_bytes_atomic(&tmp.path().join(MANIFEST), &json)?;
    // Move into place: the directory appears whole or not at all.
    let tmp_path = tmp.keep();
    if out.exists() {
        let old = parent.join(format!(".ddm-old-{}", std::process::id()));
        std::fs::rename(out, &old).map_err(|e| Error::io(out, e))?;
        std::fs::rename(&tmp_path, out).map_err(|e| Error::io(out, e))?;
        std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
    } else {
        std::fs::rename(&tmp_path, out).map_err(|e| Error::io(out, e))?;
    }
    Ok(manifest)
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
    if m.clusters.len() != m.k {
        return Err(Error::bad(
            &p,
            format!("K = {} but {} clusters are listed", m.k, m.clusters.len()),
        ));
    }
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

/// A table of the clusters (count, prior, dominant labels), and a PNG with a row of examples per
/// cluster written to `png`.
pub fn describe(dir: &Path, png: Option<&Path>, per_row: usize) -> Result<String> {
    let m = read_manifest(dir)?;
    let names = m.dataset.class_names.clone();
    let mut out = format!(
        "partition {} of {} ({} samples, shape {:?})\nK = {}, features {}, {:?}, seed {}\n\n{:>7} {:>7} {:>7}  dominant labels\n",
        &m.fingerprint[..12],
        m.dataset.name,
        m.dataset.len,
        m.dataset.shape,
        m.k,
        m.config.features,
        m.config.algorithm,
        m.config.seed,
        "cluster",
        "count",
        "prior"
    );
    for c in &m.clusters {
        let labels = match &c.label_counts {
            Some(counts) => {
                let mut order: Vec<usize> = (0..counts.len()).filter(|&l| counts[l] > 0).collect();
                order.sort_by_key(|&l| std::cmp::Reverse(counts[l]));
                order
                    .iter()
                    .take(3)
                    .map(|&l| {
                        let name = names
                            .as_ref()
                            .and_then(|n| n.get(l))
                            .cloned()
                            .unwrap_or_else(|| format!("label {l}"));
                        format!("{name} {:.0}%", 100.0 * counts[l] as f64 / c.count as f64)
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            }
            None => "(no labels)".into(),
        };
        out.push_str(&format!(
            "{:>7} {:>7} {:>7.4}  {labels}\n",
            c.id, c.count, c.prior
        ));
    }
    if let Some(png) = png {
        if m.dataset.dtype != "u8" || !matches!(m.dataset.shape.len(), 3) {
            out.push_str("(no example grid: the samples are not images)\n");
        } else {
            let mut cells: Vec<Option<Vec<u8>>> = vec![];
            for k in 0..m.k {
                let shard = load_shard(dir, &m, k)?;
                let step = (shard.len() / per_row).max(1);
                for r in 0..per_row {
                    cells.push(
                        (r * step < shard.len())
                            .then(|| shard.image_bytes(r * step).expect("u8 images").to_vec()),
                    );
                }
            }
            let refs: Vec<Option<&[u8]>> = cells.iter().map(|c| c.as_deref()).collect();
            let s = &m.dataset.shape;
            crate::grid::write_grid_png(png, &refs, [s[0], s[1], s[2]], per_row, 2, 40)?;
            out.push_str(&format!("\nexamples (one row per cluster): {}\n", png.display()));
        }
    }
    Ok(out)
}

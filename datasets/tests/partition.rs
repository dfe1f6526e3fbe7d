//! The partition directory: contents, determinism, integrity and failure modes.

use std::path::Path;

use ddm_datasets::features::{Distance, FeatureMethod};
use ddm_datasets::partition::{self, Algorithm, PartitionConfig};
use ddm_datasets::{Dataset, Source};

fn mixture(n: usize) -> Dataset {
    let spec: ddm_datasets::mixture::MixtureSpec = serde_json::from_str(&format!(
        r#"{{"weights": [0.2, 0.3, 0.5], "means": [[-4, 0], [4, 0], [0, 5]], "vars": [[0.2, 0.2], [0.2, 0.2], [0.2, 0.2]], "n": {n}, "seed": 3}}"#
    ))
    .unwrap();
    spec.dataset("gmm:test".into())
}

fn config(k: usize, algorithm: Algorithm) -> PartitionConfig {
    PartitionConfig {
        k,
        features: FeatureMethod::Raw,
        distance: Distance::L2,
        algorithm,
        seed: 0,
    }
}

fn kmeans() -> Algorithm {
    Algorithm::Kmeans {
        max_iter: 100,
        n_init: 1,
        batch_size: None,
        balanced: false,
    }
}

fn make(out: &Path, d: &Dataset, c: &PartitionConfig) -> partition::PartitionManifest {
    let cl = partition::cluster(d, c).unwrap();
    partition::write(out, d, c, &cl, 0.0, false).unwrap()
}

#[test]
fn shards_hold_every_sample_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let d = mixture(3000);
    let out = dir.path().join("p");
    let m = make(&out, &d, &config(3, kmeans()));
    assert_eq!(m.clusters.iter().map(|c| c.count).sum::<usize>(), 3000);
    assert!((m.priors().iter().sum::<f64>() - 1.0).abs() < 1e-12);
    // Mixture components are recovered: each cluster is (almost) one component.
    for c in &m.clusters {
        let lc = c.label_counts.as_ref().unwrap();
        assert!(*lc.iter().max().unwrap() as f64 > 0.99 * c.count as f64, "{lc:?}");
    }
    let mut seen = vec![0u8; 3000];
    for k in 0..3 {
        let shard = partition::load_shard(&out, &m, k).unwrap();
        assert_eq!(shard.len(), m.clusters[k].count);
        assert!(shard.mixture.is_some(), "the mixture spec travels with the shard");
        let f = ddm_core::host::TensorFile::read(&out.join(partition::shard_name(k))).unwrap();
        let index = f.i64("index").unwrap().data;
        for (r, &i) in index.iter().enumerate() {
            seen[i as usize] += 1;
            assert_eq!(
                shard.gather(&[r]),
                d.gather(&[i as usize]),
                "shard row {r} is sample {i}"
            );
        }
    }
    assert!(seen.iter().all(|&s| s == 1));
    assert!(partition::verify(&out).unwrap().is_empty());
}

#[test]
fn same_seed_same_fingerprint() {
    let dir = tempfile::tempdir().unwrap();
    let d = mixture(1000);
    let a = make(&dir.path().join("a"), &d, &config(3, kmeans()));
    let b = make(&dir.path().join("b"), &d, &config(3, kmeans()));
    assert_eq!(a.fingerprint, b.fingerprint);
    assert_eq!(a.files, b.files, "byte-identical files");
    let c = make(
        &dir.path().join("c"),
        &d,
        &PartitionConfig {
            seed: 1,
            ..config(3, Algorithm::Random)
        },
    );
    assert_ne!(a.fingerprint, c.fingerprint);
}

#[test]
fn random_baseline_and_two_stage() {
    let dir = tempfile::tempdir().unwrap();
    let d = mixture(2000);
    let r = make(&dir.path().join("r"), &d, &config(4, Algorithm::Random));
    assert!(r.clusters.iter().all(|c| c.count == 500));
    assert!(r.inertia.is_none());
    let t = make(
        &dir.path().join("t"),
        &d,
        &config(
            3,
            Algorithm::TwoStage {
                fine: 64,
                subsample: 1000,
                max_iter: 50,
            },
        ),
    );
    for c in &t.clusters {
        let lc = c.label_counts.as_ref().unwrap();
        assert!(*lc.iter().max().unwrap() as f64 > 0.98 * c.count as f64, "{lc:?}");
    }
}

#[test]
fn bad_partitions_leave_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let d = mixture(10);
    // K larger than the sample count.
    let e = partition::cluster(&d, &config(11, kmeans()))
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("K = 11") && e.contains("number of samples (10)"),
        "{e}"
    );
    // An empty cluster (an assignment that leaves cluster 2 without samples).
    let cl = partition::Clustering {
        assignment: vec![0, 1, 0, 1, 0, 1, 0, 1, 0, 1],
        centroids: vec![],
        feature_dim: 0,
        pca: None,
        inertia: None,
    };
    let out = dir.path().join("p");
    let e = partition::write(&out, &d, &config(3, Algorithm::Random), &cl, 0.0, false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("cluster 2 of 3 is empty"), "{e}");
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "no partial directory"
    );
    // An existing destination is refused.
    std::fs::create_dir(&out).unwrap();
    let e = partition::write(
        &out,
        &d,
        &config(2, Algorithm::Random),
        &partition::cluster(&d, &config(2, Algorithm::Random)).unwrap(),
        0.0,
        false,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("already exists"), "{e}");
}

#[test]
fn a_tampered_shard_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("p");
    let m = make(&out, &mixture(500), &config(2, kmeans()));
    let shard = out.join(partition::shard_name(1));
    let mut b = std::fs::read(&shard).unwrap();
    let last = b.len() - 1;
    b[last] ^= 1;
    std::fs::write(&shard, b).unwrap();
    let e = partition::load_shard(&out, &m, 1).unwrap_err().to_string();
    assert!(e.contains("shard-1.safetensors") && e.contains("sha256"), "{e}");
    assert!(partition::load_shard(&out, &m, 0).is_ok());
    let problems = partition::verify(&out).unwrap();
    assert_eq!(problems.len(), 1);
    assert!(problems[0].contains("shard-1"));
    let e = partition::load_shard(&out, &m, 5).unwrap_err().to_string();
    assert!(
        e.contains("cluster 5 is out of range") && e.contains("K = 2"),
        "{e}"
    );
}

/// The acceptance run on Debian's Fashion-MNIST (60,000 images): installed by .ci/run.
#[test]
#[ignore = "needs Debian's dataset-fashion-mnist (.ci/run installs it)"]
fn fashion_mnist_k4_on_the_debian_data() {
    let src = ddm_datasets::idx::FashionMnist {
        dir: None,
        split: ddm_datasets::idx::Split::Train,
        download: false,
    };
    let d = src.load().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let c = PartitionConfig {
        k: 4,
        features: FeatureMethod::Pca { dims: 64 },
        distance: Distance::L2,
        algorithm: Algorithm::TwoStage {
            fine: 1024,
            subsample: 20_000,
            max_iter: 100,
        },
        seed: 0,
    };
    let cl = partition::cluster(&d, &c).unwrap();
    let m = partition::write(&dir.path().join("p"), &d, &c, &cl, 0.0, false).unwrap();
    assert_eq!(m.clusters.iter().map(|c| c.count).sum::<usize>(), 60_000);
    assert!((m.priors().iter().sum::<f64>() - 1.0).abs() < 1e-12);
    let again = partition::cluster(&d, &c).unwrap();
    assert_eq!(again.assignment, cl.assignment, "same seed, same partition");
    // Coherent clusters: footwear (sandal 5, sneaker 7, ankle boot 9) does not mix with trousers (1).
    let footwear = |lc: &Vec<usize>| lc[5] + lc[7] + lc[9];
    let shoe_cluster = m
        .clusters
        .iter()
        .max_by_key(|c| footwear(c.label_counts.as_ref().unwrap()))
        .unwrap();
    let lc = shoe_cluster.label_counts.as_ref().unwrap();
    let n = shoe_cluster.count as f64;
    assert!(
        footwear(lc) as f64 > 0.55 * n,
        "the footwear cluster is mostly footwear: {lc:?}"
    );
    assert!(
        (lc[1] as f64) < 0.05 * n,
        "few trousers in the footwear cluster: {lc:?}"
    );
    assert!(
        lc[5] + lc[7] > 9_000,
        "it holds most of the 12,000 sandals and sneakers: {lc:?}"
    );
}

/// A partition.json that lists no clusters (`"k": 0, "clusters": []`) is refused on open with the
/// file named, instead of reaching code that assumes at least one cluster.
#[test]
fn a_partition_of_zero_clusters_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("p");
    make(&out, &mixture(300), &config(2, kmeans()));
    let path = out.join(partition::MANIFEST);
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    v["k"] = 0.into();
    v["clusters"] = serde_json::json!([]);
    std::fs::write(&path, serde_json::to_string(&v).unwrap()).unwrap();
    let e = partition::Partition::open(&out).unwrap_err().to_string();
    assert!(e.contains("partition.json") && e.contains("K = 0"), "{e}");
}

/// The Partition handle: K, fingerprint, verified shards, and all shards with their cluster ids.
#[test]
fn the_partition_handle_reads_shards_and_all() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("p");
    let m = make(&out, &mixture(900), &config(3, kmeans()));
    let p = partition::Partition::open(&out).unwrap();
    assert_eq!((p.k(), p.fingerprint()), (3, m.fingerprint.as_str()));
    let (all, clusters) = p.all().unwrap();
    assert_eq!((all.len(), clusters.len()), (900, 900));
    let mut start = 0;
    for k in 0..3 {
        let shard = p.shard(k).unwrap();
        assert_eq!(shard.len(), m.clusters[k].count);
        let rows: Vec<usize> = (start..start + shard.len()).collect();
        assert_eq!(
            all.gather(&rows),
            shard.gather(&(0..shard.len()).collect::<Vec<_>>())
        );
        assert!(
            clusters[start..start + shard.len()]
                .iter()
                .all(|&c| c == k as u32)
        );
        start += shard.len();
    }
    assert!(p.shard(3).is_err());
}

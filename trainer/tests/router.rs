//! The router (trained by the router task, and analytic) against the exact posterior of a Gaussian
//! mixture (K = 4 well-separated clusters).

use std::path::{Path, PathBuf};

use ddm_core::burn::prelude::*;
use ddm_core::burn::tensor::activation::softmax;
use ddm_core::condition::Condition;
use ddm_core::gmm::GaussianMixture;
use ddm_core::host::HostTensor;
use ddm_core::stats::ClusterStats;
use ddm_datasets::dataset::TokenSequences;
use ddm_datasets::features::{Distance, FeatureMethod};
use ddm_datasets::partition::{self, Algorithm, Partition, PartitionConfig, PartitionManifest};
use ddm_router::analytic::AnalyticRouter;
use ddm_router::net::RouterInputs;
use ddm_trainer::config::TrainConfig;
use ddm_trainer::router::RouterTask;
use ddm_trainer::train::Run;
use rand::SeedableRng;

fn mixture() -> GaussianMixture {
    GaussianMixture {
        weights: vec![0.1, 0.2, 0.3, 0.4],
        means: vec![vec![-3.0, 0.0], vec![3.0, 0.0], vec![0.0, 3.0], vec![0.0, -3.0]],
        vars: vec![vec![0.3, 0.3]; 4],
    }
}

/// A k-means partition of mixture samples, and the component behind each cluster.
fn partition_of(dir: &Path, n: usize) -> (PathBuf, PartitionManifest, Vec<usize>) {
    let spec: ddm_datasets::mixture::MixtureSpec =
        serde_json::from_value(serde_json::json!({"weights": [0.1, 0.2, 0.3, 0.4],
            "means": [[-3, 0], [3, 0], [0, 3], [0, -3]], "vars": [[0.3, 0.3], [0.3, 0.3], [0.3, 0.3], [0.3, 0.3]],
            "n": n, "seed": 5}))
        .unwrap();
    let d = spec.dataset("gmm:test".into());
    let c = PartitionConfig {
        k: 4,
        features: FeatureMethod::Raw,
        distance: Distance::L2,
        algorithm: Algorithm::Kmeans {
            max_iter: 100,
            n_init: 1,
            batch_size: None,
            balanced: false,
        },
        seed: 0,
    };
    let out = dir.join("partition");
    let m = partition::write(&out, &d, &c, &partition::cluster(&d, &c).unwrap(), 0.0, false).unwrap();
    let component: Vec<usize> = m
        .clusters
        .iter()
        .map(|c| {
            let lc = c.label_counts.as_ref().unwrap();
            (0..4).max_by_key(|&j| lc[j]).unwrap()
        })
        .collect();
    (out, m, component)
}

/// The analytic router built from the mixture's own parameters is the closed-form posterior.
#[test]
fn analytic_router_is_the_exact_posterior() {
    let g = mixture();
    let stats: Vec<ClusterStats> = (0..4)
        .map(|k| ClusterStats {
            count: (g.weights[k] * 1000.0) as usize,
            mean: g.means[k].clone(),
            var: g.vars[k].clone(),
            label_counts: None,
            condition: None,
        })
        .collect();
    let r = AnalyticRouter::from_stats(&stats);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let mut worst = 0f64;
    for i in 0..2000 {
        let t = i as f64 / 1999.0;
        let x = ddm_core::flow::randn(vec![2], &mut rng)
            .data
            .iter()
            .map(|&v| 3.0 * v as f64)
            .collect::<Vec<_>>();
        for (a, b) in r.posterior(&x, t).iter().zip(g.posterior(&x, t)) {
            worst = worst.max((a - b).abs());
        }
    }
    assert!(worst < 1e-5, "max |analytic - exact| = {worst}");
}

fn kl(p: &[f64], q: &[f64]) -> f64 {
    p.iter()
        .zip(q)
        .filter(|(a, _)| **a > 1e-12)
        .map(|(a, b)| a * (a / b.max(1e-12)).ln())
        .sum()
}

/// Mean KL(exact || router) per t bin (10 bins), over samples x_t of the mixture.
fn kl_by_bin(router: &dyn Fn(&[f64], f64) -> Vec<f64>, g: &GaussianMixture) -> Vec<f64> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    (0..10)
        .map(|b| {
            let (x0, _) = g.sample(400, &mut rng);
            let e = ddm_core::flow::randn(vec![400, 2], &mut rng);
            let mut total = 0.0;
            for i in 0..400 {
                let t = (b as f64 + (i as f64 + 0.5) / 400.0) / 10.0;
                let x: Vec<f64> = (0..2)
                    .map(|j| (1.0 - t) * x0.data[2 * i + j] as f64 + t * e.data[2 * i + j] as f64)
                    .collect();
                total += kl(&g.posterior(&x, t), &router(&x, t));
            }
            total / 400.0
        })
        .collect()
}

/// Train the MLP router (128 x 3, 2500 steps of 256, lr 2e-3) on `partition` into `dir/router`,
/// with `tweak` applied to the config; returns the run directory.
fn train_mlp_router(
    dir: &Path,
    partition: Partition,
    inputs: RouterInputs,
    tweak: impl FnOnce(&mut TrainConfig),
) -> PathBuf {
    let mut config = TrainConfig {
        model: "mlp".into(),
        mlp_hidden: 128,
        mlp_depth: 3,
        steps: 2500,
        batch_size: 256,
        lr: 2e-3,
        warmup_steps: 100,
        ema_decay: 0.99,
        checkpoint_every: 2500,
        ..TrainConfig::default()
    };
    tweak(&mut config);
    let out = dir.join("router");
    let task = RouterTask {
        partition,
        expert_model: "mlp".into(),
        eval_samples: 500,
        inputs,
    };
    let run = Run {
        out: out.clone(),
        config,
        devices: ddm_core::device::DeviceChoice::Cpu.into(),
        progress: false,
    };
    ddm_trainer::train::run(&task, run).unwrap();
    out
}

/// A trained MLP router is close to the exact posterior at every noise level; a router that
/// ignores t, or one with the wrong prior, is not (the same tolerance catches both).
#[test]
fn trained_router_matches_the_posterior_and_broken_ones_do_not() {
    let dir = tempfile::tempdir().unwrap();
    let (part, manifest, component) = partition_of(dir.path(), 8000);
    let g = mixture();
    let out = train_mlp_router(
        dir.path(),
        Partition::open(&part).unwrap(),
        RouterInputs::default(),
        |_| {},
    );

    let device = ddm_core::device::cpu();
    let (meta, net) = ddm_router::load_checked(&out.join("router.safetensors"), &manifest, &device).unwrap();
    assert_eq!(meta.priors.as_ref().unwrap().len(), 4);
    // The router's clusters are the mixture's components, relabelled.
    let trained = |x: &[f64], t: f64| -> Vec<f64> {
        let xt = HostTensor::new(vec![1, 2], x.iter().map(|&v| v as f32).collect()).to_tensor::<2>(&device);
        let tt = Tensor::<1>::from_floats([t as f32], &device);
        let p = HostTensor::from_tensor(softmax(net.logits(xt, tt, &Condition::none()), 1)).data;
        let mut q = vec![0.0; 4];
        for (k, &c) in component.iter().enumerate() {
            q[c] = p[k] as f64;
        }
        q
    };
    let ignores_t = |x: &[f64], _t: f64| g.posterior(x, 0.5);
    let uniform_prior = GaussianMixture {
        weights: vec![0.25; 4],
        ..g.clone()
    };
    let wrong_prior = |x: &[f64], t: f64| uniform_prior.posterior(x, t);

    const TOL: f64 = 0.04;
    let good = kl_by_bin(&trained, &g);
    println!("trained router, mean KL per t bin: {good:.4?}");
    assert!(good.iter().all(|&k| k < TOL), "trained router: {good:?}");
    for (name, bad) in [
        ("ignores t", kl_by_bin(&ignores_t, &g)),
        ("wrong prior", kl_by_bin(&wrong_prior, &g)),
    ] {
        println!("{name}: {bad:.4?}");
        assert!(
            bad.iter().any(|&k| k > TOL),
            "{name} should fail the tolerance: {bad:?}"
        );
    }
    // At pure noise the router predicts the prior.
    let at_noise = trained(&[0.3, -0.2], 1.0);
    for (a, w) in at_noise.iter().zip(&g.weights) {
        assert!((a - w).abs() < 0.05, "{at_noise:?} vs prior {:?}", g.weights);
    }
}

/// Statistics computed on each island's shard give an analytic router close to the exact one.
#[test]
fn analytic_router_from_shard_statistics() {
    let dir = tempfile::tempdir().unwrap();
    let (part, manifest, component) = partition_of(dir.path(), 8000);
    let stats: Vec<ClusterStats> = (0..4)
        .map(|k| {
            partition::load_shard(&part, &manifest, k)
                .unwrap()
                .cluster_stats()
        })
        .collect();
    let r = AnalyticRouter::from_stats(&stats);
    let g = mixture();
    let relabelled = |x: &[f64], t: f64| {
        let p = r.posterior(x, t);
        let mut q = vec![0.0; 4];
        for (k, &c) in component.iter().enumerate() {
            q[c] = p[k];
        }
        q
    };
    let kl = kl_by_bin(&relabelled, &g);
    assert!(kl.iter().all(|&k| k < 0.01), "{kl:?}");
}

#[test]
fn a_router_of_another_partition_or_k_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (part, manifest, _) = partition_of(dir.path(), 1000);
    let config = TrainConfig {
        model: "mlp".into(),
        mlp_hidden: 16,
        steps: 5,
        batch_size: 32,
        ..TrainConfig::default()
    };
    let out = dir.path().join("router");
    let task = RouterTask {
        partition: Partition::open(&part).unwrap(),
        expert_model: "mlp".into(),
        eval_samples: 100,
        inputs: RouterInputs::default(),
    };
    let run = Run {
        out: out.clone(),
        config,
        devices: ddm_core::device::DeviceChoice::Cpu.into(),
        progress: false,
    };
    ddm_trainer::train::run(&task, run).unwrap();
    let device = ddm_core::device::cpu();
    let path = out.join("router.safetensors");
    let mut other = manifest.clone();
    other.fingerprint = "f".repeat(64);
    let e = ddm_router::load_checked(&path, &other, &device)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("router.safetensors") && e.contains("not this partition"),
        "{e}"
    );
    let mut fewer = manifest.clone();
    fewer.k = 3;
    let e = ddm_router::load_checked(&path, &fewer, &device)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("K = 4") && e.contains("K = 3"), "{e}");
}

/// p(c | k) of the labelled mixture below: classes span clusters, and within a cluster the class
/// does not depend on x, so the class-conditional posterior has the closed form
/// p(k | x_t, c) ∝ w_k p(c | k) N_k(x_t) = p(k | c) N_k(x_t) (normalised over k).
const CLASS_GIVEN_COMPONENT: [[f64; 3]; 4] =
    [[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.0, 0.5, 0.5], [0.0, 0.0, 1.0]];

/// p(k | c) of that mixture, exactly.
fn exact_class_priors(g: &GaussianMixture) -> Vec<Vec<f64>> {
    (0..3)
        .map(|c| {
            let joint: Vec<f64> = (0..4)
                .map(|k| g.weights[k] * CLASS_GIVEN_COMPONENT[k][c])
                .collect();
            let z: f64 = joint.iter().sum();
            joint.iter().map(|j| j / z).collect()
        })
        .collect()
}

/// A k-means partition of mixture samples labelled with 3 classes drawn from p(c | k), and the
/// component behind each cluster (the mixture mean nearest the cluster's mean).
fn labelled_partition(dir: &Path, n: usize) -> (PathBuf, PartitionManifest, Vec<usize>) {
    labelled_partition_with(dir, n, Conditioning::Labels)
}

/// [`labelled_partition`], and with `vectors` each sample also carries a conditioning vector:
/// its class one-hot plus N(0, 0.1^2) noise (`c` `[N, 3]`).
fn labelled_partition_with(
    dir: &Path,
    n: usize,
    conditioning: Conditioning,
) -> (PathBuf, PartitionManifest, Vec<usize>) {
    use rand::Rng;
    let spec: ddm_datasets::mixture::MixtureSpec =
        serde_json::from_value(serde_json::json!({"weights": [0.1, 0.2, 0.3, 0.4],
            "means": [[-3, 0], [3, 0], [0, 3], [0, -3]], "vars": [[0.3, 0.3], [0.3, 0.3], [0.3, 0.3], [0.3, 0.3]],
            "n": n, "seed": 6}))
        .unwrap();
    let mut d = spec.dataset("gmm:labelled".into());
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let labels = d.labels.as_ref().unwrap().iter().map(|&k| {
        let u: f64 = rng.random();
        let p = CLASS_GIVEN_COMPONENT[k as usize];
        if u < p[0] {
            0
        } else if u < p[0] + p[1] {
            1
        } else {
            2
        }
    });
    d.labels = Some(labels.collect());
    d.num_classes = Some(3);
    d.class_names = None;
    // Each label as a noisy one-hot vector.
    let noise = ddm_core::flow::randn(vec![n, 3], &mut rng);
    let one_hots: Vec<f32> = d
        .labels
        .as_ref()
        .unwrap()
        .iter()
        .zip(noise.data.chunks(3))
        .flat_map(|(&l, e)| (0..3).map(move |j| (j == l as usize) as u8 as f32 + 0.1 * e[j]))
        .collect();
    match conditioning {
        Conditioning::Labels => {}
        Conditioning::Vectors => d.cond = Some(HostTensor::new(vec![n, 3], one_hots)),
        Conditioning::Tokens => d.tokens = Some(token_sequences(&one_hots, &mut rng)),
    }
    let c = PartitionConfig {
        k: 4,
        features: FeatureMethod::Raw,
        distance: Distance::L2,
        algorithm: Algorithm::Kmeans {
            max_iter: 100,
            n_init: 1,
            batch_size: None,
            balanced: false,
        },
        seed: 0,
    };
    let out = dir.join("partition");
    let m = partition::write(&out, &d, &c, &partition::cluster(&d, &c).unwrap(), 0.0, false).unwrap();
    let g = mixture();
    let component = (0..4)
        .map(|k| {
            let mean = partition::load_shard(&out, &m, k).unwrap().cluster_stats().mean;
            (0..4)
                .min_by(|&a, &b| {
                    let dist = |j: usize| (0..2).map(|i| (mean[i] - g.means[j][i]).powi(2)).sum::<f64>();
                    dist(a).total_cmp(&dist(b))
                })
                .unwrap()
        })
        .collect();
    (out, m, component)
}

/// What a labelled partition's samples carry of their label besides the label itself.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Conditioning {
    Labels,
    /// A noisy one-hot vector `c` `[3]`.
    Vectors,
    /// A sequence of L = 4 token slots: 1 to 3 tokens, one of them the noisy one-hot and the
    /// others small noise, then padding that holds large junk (masked out, so it must not count).
    Tokens,
}

/// Token sequences `[N, 4, 3]` + mask `[N, 4]` that carry the rows of `one_hots` `[N, 3]` as
/// [`Conditioning::Tokens`] says.
fn token_sequences(one_hots: &[f32], rng: &mut rand_chacha::ChaCha8Rng) -> TokenSequences {
    use rand::Rng;
    const L: usize = 4;
    let n = one_hots.len() / 3;
    let (mut embeddings, mut mask) = (vec![0f32; n * L * 3], vec![0f32; n * L]);
    for (i, one_hot) in one_hots.chunks(3).enumerate() {
        let len = rng.random_range(1..L);
        let at = rng.random_range(0..len);
        for j in 0..L {
            let token: [f32; 3] = match j {
                _ if j == at => [one_hot[0], one_hot[1], one_hot[2]],
                _ if j < len => [0.0; 3].map(|_| 0.1 * (rng.random::<f32>() - 0.5)),
                _ => [0.0; 3].map(|_| 5.0 * rng.random::<f32>()),
            };
            embeddings[(i * L + j) * 3..(i * L + j + 1) * 3].copy_from_slice(&token);
            mask[i * L + j] = (j < len) as u8 as f32;
        }
    }
    TokenSequences {
        embeddings: HostTensor::new(vec![n, L, 3], embeddings),
        mask: HostTensor::new(vec![n, L], mask),
    }
}

/// The conditioned analytic router (label counts from each island) is the closed-form
/// class-conditional posterior at every t; at t = 1 it is p(k | c).
#[test]
fn conditioned_analytic_router_is_the_exact_class_posterior() {
    let g = mixture();
    let pkc = exact_class_priors(&g);
    // Label counts proportional to w_k p(c | k), as an island of 10^6 samples would count them.
    let stats: Vec<ClusterStats> = (0..4)
        .map(|k| ClusterStats {
            count: 1_000_000,
            mean: g.means[k].clone(),
            var: g.vars[k].clone(),
            label_counts: Some(
                (0..3)
                    .map(|c| (g.weights[k] * CLASS_GIVEN_COMPONENT[k][c] * 1e7).round() as usize)
                    .collect(),
            ),
            condition: None,
        })
        .collect();
    let r = AnalyticRouter::from_stats(&stats);
    assert_eq!(r.classes(), 3);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    let mut worst = 0f64;
    for i in 0..1000 {
        let t = i as f64 / 999.0;
        let x: Vec<f64> = ddm_core::flow::randn(vec![2], &mut rng)
            .data
            .iter()
            .map(|&v| 3.0 * v as f64)
            .collect();
        for (c, prior) in pkc.iter().enumerate() {
            let exact = g.posterior_with_weights(&x, t, prior);
            for (a, b) in r.posterior_given(&x, t, Some(c)).iter().zip(&exact) {
                worst = worst.max((a - b).abs());
            }
        }
    }
    assert!(worst < 1e-6, "max |analytic - exact| = {worst}");
    for (c, prior) in pkc.iter().enumerate() {
        let at_noise = r.posterior_given(&[0.7, -1.1], 1.0, Some(c));
        for (a, b) in at_noise.iter().zip(prior) {
            assert!(
                (a - b).abs() < 1e-9,
                "class {c}: {at_noise:?} vs p(k | c) {prior:?}"
            );
        }
    }
    // Without the class: the unconditioned posterior.
    assert_eq!(
        r.posterior_given(&[0.7, -1.1], 0.4, None),
        r.posterior(&[0.7, -1.1], 0.4)
    );
}

/// A router trained with the class (and condition dropout) predicts p(k | c) at t = 1 and the
/// prior without the class; given the class, it is close to the exact class posterior at every
/// noise level. The analytic router built from the islands' real label counts agrees.
#[test]
fn conditioned_router_learns_p_k_given_c() {
    let dir = tempfile::tempdir().unwrap();
    let (part, manifest, component) = labelled_partition(dir.path(), 8000);
    let g = mixture();
    let pkc = exact_class_priors(&g);
    let out = train_mlp_router(
        dir.path(),
        Partition::open(&part).unwrap(),
        RouterInputs::default(),
        |c| {
            c.class_conditional = true;
            c.class_dropout = 0.2;
        },
    );
    let device = ddm_core::device::cpu();
    let (meta, net) = ddm_router::load_checked(&out.join("router.safetensors"), &manifest, &device).unwrap();
    assert_eq!(meta.model.num_classes(), 3);
    assert!(net.routes_without_class());
    let routed = |x: &[f64], t: f64, c: Option<i64>| -> Vec<f64> {
        let xt = HostTensor::new(vec![1, 2], x.iter().map(|&v| v as f32).collect()).to_tensor::<2>(&device);
        let tt = Tensor::<1>::from_floats([t as f32], &device);
        let y = c.map(|c| Tensor::<1, Int>::from_data(TensorData::new(vec![c], [1]), &device));
        let p = HostTensor::from_tensor(softmax(net.logits(xt, tt, &Condition::maybe_class(y)), 1)).data;
        let mut q = vec![0.0; 4];
        for (k, &comp) in component.iter().enumerate() {
            q[comp] = p[k] as f64;
        }
        q
    };
    for (c, prior) in pkc.iter().enumerate() {
        let at_noise = routed(&[0.3, -0.2], 1.0, Some(c as i64));
        for (a, b) in at_noise.iter().zip(prior) {
            assert!(
                (a - b).abs() < 0.06,
                "class {c} at t = 1: {at_noise:?} vs p(k | c) {prior:?}"
            );
        }
        let given = |x: &[f64], t: f64| routed(x, t, Some(c as i64));
        // KL to the exact class posterior, over x_t of the whole mixture, per t bin.
        let exact = GaussianMixture {
            weights: prior.iter().map(|p| p.max(1e-300)).collect(),
            ..g.clone()
        };
        let kl = kl_by_bin(&given, &exact);
        println!("class {c}: mean KL to the exact class posterior per t bin: {kl:.4?}");
        assert!(kl.iter().all(|&k| k < 0.05), "class {c}: {kl:?}");
    }
    let unconditioned = routed(&[0.3, -0.2], 1.0, None);
    for (a, w) in unconditioned.iter().zip(&g.weights) {
        assert!((a - w).abs() < 0.06, "{unconditioned:?} vs prior {:?}", g.weights);
    }
    // The router's own evaluation, with the class: near-zero distance to p(k | c) at t = 1.
    let report = ddm_trainer::router_eval::evaluate(
        &net,
        &Partition::open(&part).unwrap().all().unwrap().0,
        &Partition::open(&part).unwrap().all().unwrap().1,
        4,
        1000,
        0,
        &device,
    );
    let with = report
        .with_condition
        .as_ref()
        .expect("a conditioned router is evaluated with the class");
    assert_eq!(report.given.as_deref(), Some("class"));
    let without = &report.without_class;
    // Without the class the router learnt from the 20% of examples whose class was dropped: its
    // distance is larger (0.058 with burn's AdamW, 0.060 with ddm's fused one, which differs in
    // rounding only), and a router blind to the prior would be at 0.2 (uniform vs 0.1..0.4).
    assert!(
        with[10].tv_to_prior.unwrap() < 0.06 && without[10].tv_to_prior.unwrap() < 0.08,
        "{report:?}"
    );
    // At t = 1 the class carries information the noise does not.
    assert!(with[10].accuracy > without[10].accuracy + 0.1, "{report:?}");

    // The analytic router from the shards' own label counts: p(k | c) within sampling error.
    let stats: Vec<ClusterStats> = (0..4)
        .map(|k| {
            partition::load_shard(&part, &manifest, k)
                .unwrap()
                .cluster_stats()
        })
        .collect();
    let analytic = AnalyticRouter::from_stats(&stats);
    for (c, prior) in pkc.iter().enumerate() {
        let p = analytic.posterior_given(&[0.0, 0.0], 1.0, Some(c));
        for (k, &comp) in component.iter().enumerate() {
            assert!((p[k] - prior[comp]).abs() < 0.03, "class {c}: {p:?} vs {prior:?}");
        }
    }
}

/// A router conditioned on per-sample conditioning vectors (noisy class one-hots; no labels
/// given): at t = 1 it predicts p(k | c) for a class's vector and the prior for the zero vector
/// (the null condition condition-dropout trains).
#[test]
fn vector_conditioned_router_learns_p_k_given_c() {
    let dir = tempfile::tempdir().unwrap();
    let (part, manifest, component) = labelled_partition_with(dir.path(), 8000, Conditioning::Vectors);
    let g = mixture();
    let pkc = exact_class_priors(&g);
    let partition = Partition::open(&part).unwrap();
    assert_eq!(partition.condition_dim().unwrap(), Some(3));
    let inputs = RouterInputs {
        vector: Some(3),
        tokens: None,
    };
    let out = train_mlp_router(dir.path(), partition, inputs, |c| c.class_dropout = 0.2);
    let device = ddm_core::device::cpu();
    let (meta, net) = ddm_router::load_checked(&out.join("router.safetensors"), &manifest, &device).unwrap();
    assert_eq!(
        (meta.condition_dim, net.condition_dim(), net.classes()),
        (Some(3), Some(3), 0)
    );
    let at_noise = |c: [f32; 3]| -> Vec<f64> {
        let xt = Tensor::<2>::from_floats([[0.3, -0.2]], &device);
        let tt = Tensor::<1>::from_floats([1.0], &device);
        let c = Tensor::<2>::from_floats([c], &device);
        let p = HostTensor::from_tensor(softmax(net.logits(xt, tt, &Condition::vector(c)), 1)).data;
        let mut q = vec![0.0; 4];
        for (k, &comp) in component.iter().enumerate() {
            q[comp] = p[k] as f64;
        }
        q
    };
    for (class, prior) in pkc.iter().enumerate() {
        let mut c = [0.0; 3];
        c[class] = 1.0;
        let p = at_noise(c);
        for (a, b) in p.iter().zip(prior) {
            assert!(
                (a - b).abs() < 0.06,
                "class {class} at t = 1: {p:?} vs p(k | c) {prior:?}"
            );
        }
    }
    let null = at_noise([0.0; 3]);
    for (a, w) in null.iter().zip(&g.weights) {
        assert!(
            (a - w).abs() < 0.06,
            "zero vector: {null:?} vs prior {:?}",
            g.weights
        );
    }
    // The analytic router from the shards' own statistics of c (each cluster's Gaussian of its
    // vectors): at t = 1 nearer p(k | c) than the prior is (a Gaussian over noisy one-hots is an
    // approximation, sharper than the truth where a cluster holds one class), and the zero vector
    // leaves the prior.
    let stats: Vec<ClusterStats> = (0..4)
        .map(|k| {
            partition::load_shard(&part, &manifest, k)
                .unwrap()
                .cluster_stats()
        })
        .collect();
    let analytic = AnalyticRouter::from_stats(&stats);
    assert_eq!(analytic.condition_dim(), Some(3));
    let tv = |p: &[f64], q: &[f64]| 0.5 * p.iter().zip(q).map(|(a, b)| (a - b).abs()).sum::<f64>();
    let x = [0.3, -0.2];
    for (class, exact) in pkc.iter().enumerate() {
        let mut c = [0.0; 3];
        c[class] = 1.0;
        let p = analytic.posterior_with(&x, 1.0, None, Some(&c));
        let mut q = vec![0.0; 4];
        for (k, &comp) in component.iter().enumerate() {
            q[comp] = p[k];
        }
        println!("class {class}: analytic p(k | c) {q:.3?}, exact {exact:.3?}");
        assert!(
            tv(&q, exact) < tv(&g.weights, exact),
            "class {class}: {q:?} is no nearer {exact:?} than the prior"
        );
    }
    assert_eq!(
        analytic.posterior_with(&x, 1.0, None, Some(&[0.0; 3])),
        analytic.posterior(&x, 1.0)
    );

    // Its evaluation reports accuracy with the vectors (no closed-form TV for vectors).
    let (data, clusters) = Partition::open(&part).unwrap().all().unwrap();
    let report = ddm_trainer::router_eval::evaluate(&net, &data, &clusters, 4, 1000, 0, &device);
    assert_eq!(report.given.as_deref(), Some("vector"));
    let with = report.with_condition.as_ref().unwrap();
    assert!(with[10].tv_to_prior.is_none());
    assert!(
        with[10].accuracy > report.without_class[10].accuracy + 0.1,
        "{report:?}"
    );
}

/// A router conditioned on per-sample token sequences (a noisy class one-hot among small-noise
/// tokens, padding full of junk; no labels given): at t = 1 it predicts p(k | c) for a class's
/// sequence and the prior for the all-padding sequence (the null caption condition dropout
/// trains), and what padding holds changes nothing.
#[test]
fn token_conditioned_router_learns_p_k_given_the_caption() {
    let dir = tempfile::tempdir().unwrap();
    let (part, manifest, component) = labelled_partition_with(dir.path(), 8000, Conditioning::Tokens);
    let g = mixture();
    let pkc = exact_class_priors(&g);
    let partition = Partition::open(&part).unwrap();
    assert_eq!(
        (partition.token_dim().unwrap(), partition.condition_dim().unwrap()),
        (Some(3), None)
    );
    let inputs = RouterInputs {
        vector: None,
        tokens: Some(3),
    };
    let out = train_mlp_router(dir.path(), partition, inputs, |c| c.class_dropout = 0.2);
    let device = ddm_core::device::cpu();
    let (meta, net) = ddm_router::load_checked(&out.join("router.safetensors"), &manifest, &device).unwrap();
    assert_eq!(
        (
            meta.condition_token_dim,
            meta.condition_dim,
            net.inputs(),
            net.classes()
        ),
        (Some(3), None, inputs, 0)
    );
    // Sequences of 4 slots: `tokens` real ones, then padding holding `junk`.
    let at_noise = |tokens: &[[f32; 3]], junk: f32| -> Vec<f64> {
        let xt = Tensor::<2>::from_floats([[0.3, -0.2]], &device);
        let tt = Tensor::<1>::from_floats([1.0], &device);
        let mut e = [[junk; 3]; 4];
        e[..tokens.len()].copy_from_slice(tokens);
        let mask: Vec<f32> = (0..4).map(|j| (j < tokens.len()) as u8 as f32).collect();
        let c = Condition::tokens(
            Tensor::<3>::from_floats([e], &device),
            Tensor::<2>::from_data(TensorData::new(mask, [1, 4]), &device),
        );
        let p = HostTensor::from_tensor(softmax(net.logits(xt, tt, &c), 1)).data;
        let mut q = vec![0.0; 4];
        for (k, &comp) in component.iter().enumerate() {
            q[comp] = p[k] as f64;
        }
        q
    };
    for (class, prior) in pkc.iter().enumerate() {
        let mut one_hot = [0.0; 3];
        one_hot[class] = 1.0;
        let p = at_noise(&[one_hot, [0.0; 3]], 0.0);
        for (a, b) in p.iter().zip(prior) {
            assert!(
                (a - b).abs() < 0.06,
                "class {class} at t = 1: {p:?} vs p(k | c) {prior:?}"
            );
        }
        let junk = at_noise(&[one_hot, [0.0; 3]], 7.0);
        let moved = p
            .iter()
            .zip(&junk)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(moved < 1e-6, "padding's content moved the router by {moved}");
    }
    let null = at_noise(&[], 3.0);
    for (a, w) in null.iter().zip(&g.weights) {
        assert!(
            (a - w).abs() < 0.06,
            "all padding: {null:?} vs prior {:?}",
            g.weights
        );
    }
    // Its evaluation reports accuracy with the token sequences.
    let (data, clusters) = Partition::open(&part).unwrap().all().unwrap();
    let report = ddm_trainer::router_eval::evaluate(&net, &data, &clusters, 4, 1000, 0, &device);
    assert_eq!(report.given.as_deref(), Some("tokens"));
    let with = report.with_condition.as_ref().unwrap();
    assert!(with[10].tv_to_prior.is_none());
    assert!(
        with[10].accuracy > report.without_class[10].accuracy + 0.1,
        "{report:?}"
    );
}

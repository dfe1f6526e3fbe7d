//! A student distilled from exact experts reaches the closed-form velocity: on a Gaussian mixture,
//! the expert of each component is its exact velocity field and the router the exact posterior, so
//! the ensemble is the mixture's velocity, which an MLP student must learn from the teacher alone.

use ddm_core::burn::prelude::*;
use ddm_core::checkpoint::Checkpoint;
use ddm_core::condition::Condition;
use ddm_core::flow::VelocityField;
use ddm_core::gmm::GaussianMixture;
use ddm_core::host::HostTensor;
use ddm_datasets::{Dataset, Values};
use ddm_distill::{DistillTask, Target, Teacher};
use ddm_ensemble::sampler::{ExpertSlot, Posterior};
use ddm_ensemble::strategy::Strategy;
use ddm_trainer::config::TrainConfig;
use ddm_trainer::task::TrainData;
use ddm_trainer::train::{Outcome, Run};
use rand::{Rng, SeedableRng};

fn mixture() -> GaussianMixture {
    GaussianMixture {
        weights: vec![0.4, 0.6],
        means: vec![vec![-2.0, 0.5], vec![2.0, -0.5]],
        vars: vec![vec![0.2, 0.1], vec![0.1, 0.3]],
    }
}

/// The exact posterior p(k | x_t): the ideal router.
struct ExactRouter<'a>(&'a GaussianMixture);

impl Posterior for ExactRouter<'_> {
    fn k(&self) -> usize {
        self.0.k()
    }
    fn classes(&self) -> usize {
        0
    }
    fn probs(&self, x_t: &Tensor<2>, t: &Tensor<1>, _: &Condition) -> Vec<Vec<f64>> {
        let x = HostTensor::from_tensor(x_t.clone());
        let t = HostTensor::from_tensor(t.clone()).data;
        x.data
            .chunks(2)
            .zip(t)
            .map(|(r, t)| self.0.posterior(&[r[0] as f64, r[1] as f64], t as f64))
            .collect()
    }
}

/// Train a student on `target` and return (its relative squared error against the mixture's
/// velocity on fresh noised points, teacher FLOPs per sample recorded, samples seen).
fn distill(target: Target, steps: u64) -> (f64, f64, u64) {
    let gmm = mixture();
    let device = ddm_core::device::cpu();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let (x, components) = gmm.sample(4000, &mut rng);
    let data = Dataset {
        name: "mixture".into(),
        shape: vec![2],
        values: Values::F32(x.data),
        labels: None,
        num_classes: None,
        class_names: None,
        mixture: None,
        cond: None,
        tokens: None,
        latent: None,
        text: None,
    };
    let range = data.range();
    let experts: Vec<ExpertSlot> = (0..2)
        .map(|c| ExpertSlot::ready(Box::new(gmm.component_field(c, &device))))
        .collect();
    // Forward "FLOPs": 1 per expert row, 0.5 per router row, to check the accounting.
    let teacher = Teacher::new(
        experts,
        Some(Box::new(ExactRouter(&gmm))),
        target,
        &device,
        vec![1.0, 1.0],
        0.5,
        "exact mixture".into(),
    )
    .unwrap();
    let clusters: Vec<u32> = components.iter().map(|&c| c as u32).collect();
    let task = DistillTask {
        teacher,
        data: Box::new(move || {
            Ok(TrainData {
                data: data.clone(),
                targets: Some(clusters.clone()),
                fingerprint: "mixture".into(),
            })
        }),
        range,
        latent: None,
        text: None,
        partition: None,
    };
    let out = tempfile::tempdir().unwrap();
    let config = TrainConfig {
        model: "mlp".into(),
        mlp_hidden: 128,
        mlp_depth: 3,
        steps,
        batch_size: 256,
        lr: 2e-3,
        warmup_steps: 50,
        ema_decay: 0.99,
        checkpoint_every: steps,
        ..TrainConfig::default()
    };
    let outcome = ddm_trainer::train::run(
        &task,
        Run {
            out: out.path().to_path_buf(),
            config,
            devices: ddm_core::device::DeviceChoice::Cpu.into(),
            progress: false,
        },
    )
    .unwrap();
    let Outcome::Finished { checkpoint, .. } = outcome else {
        panic!("not finished")
    };
    let ckpt = Checkpoint::read(&checkpoint).unwrap();
    let training = ckpt.meta.training.clone().unwrap();
    let teacher_flops = ckpt.meta.extra["teacher_flops"].as_f64().unwrap();
    assert_eq!(ckpt.meta.cluster, None);
    let student = ckpt.model(&checkpoint, &device).unwrap();

    // Fresh noised points, t in [0.05, 0.95].
    let n = 2000;
    let (x0, _) = gmm.sample(n, &mut rng);
    let (mut xt, mut ts) = (vec![], vec![]);
    for row in x0.data.chunks(2) {
        let t: f64 = rng.random_range(0.05..0.95);
        let e: [f64; 2] = [
            rng.sample(rand_distr::StandardNormal),
            rng.sample(rand_distr::StandardNormal),
        ];
        for (a, b) in row.iter().zip(e) {
            xt.push(((1.0 - t) * *a as f64 + t * b) as f32);
        }
        ts.push(t as f32);
    }
    let v = student
        .velocity(
            HostTensor::new(vec![n, 2], xt.clone()).to_tensor::<2>(&device),
            HostTensor::new(vec![n], ts.clone()).to_tensor::<1>(&device),
            &ddm_core::condition::Condition::none(),
        )
        .unwrap();
    let v = HostTensor::from_tensor(v).data;
    let (mut err, mut norm) = (0.0, 0.0);
    for i in 0..n {
        let exact = gmm.velocity(&[xt[2 * i] as f64, xt[2 * i + 1] as f64], ts[i] as f64);
        for d in 0..2 {
            err += (v[2 * i + d] as f64 - exact[d]).powi(2);
            norm += exact[d].powi(2);
        }
    }
    (
        err / norm,
        teacher_flops / training.samples_seen as f64,
        training.samples_seen,
    )
}

#[test]
fn a_student_of_exact_experts_learns_the_mixture_velocity() {
    let (untrained, _, _) = distill(Target::Routed(Strategy::Full), 1);
    println!("an untrained student: relative error {untrained:.3e}");
    assert!(untrained > 0.3);
    let (routed, flops, seen) = distill(Target::Routed(Strategy::Full), 1500);
    println!("routed (full, exact router): relative error {routed:.3e}, teacher FLOPs per sample {flops}");
    assert_eq!(seen, 1500 * 256);
    assert!(
        (flops - 2.5).abs() < 1e-9,
        "full: both experts and the router per sample, got {flops}"
    );
    assert!(routed < 0.01, "relative squared error {routed}");

    let (own, flops, _) = distill(Target::OwnCluster, 1500);
    println!("own-cluster: relative error {own:.3e}, teacher FLOPs per sample {flops}");
    assert!(
        (flops - 1.0).abs() < 1e-9,
        "own-cluster: one expert per sample, got {flops}"
    );
    assert!(own < 0.03, "relative squared error {own}");
}

//! The evaluation metrics against definitions and an independent implementation.

use ddm_core::flow::{self, Solver, StepSchedule};
use ddm_core::gmm::GaussianMixture;
use ddm_eval::fd::{Gaussian, frechet_distance, frechet_distance_of};
use ddm_eval::knn::precision_recall;
use ddm_eval::mixture;
use rand::SeedableRng;

fn random_features(n: usize, d: usize, seed: u64) -> Vec<f32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    flow::randn(vec![n, d], &mut rng).data
}

#[test]
fn fd_of_a_set_with_itself_is_zero_and_grows_with_a_shift() {
    let d = 16;
    let a = random_features(800, d, 1);
    let b = random_features(800, d, 2);
    let self_fd = frechet_distance_of(&a, &a, d);
    assert!(self_fd.abs() < 1e-9, "FD(a, a) = {self_fd}");
    let same_law = frechet_distance_of(&a, &b, d);
    let mut last = same_law;
    for shift in [0.25f32, 0.5, 1.0] {
        let shifted: Vec<f32> = b.iter().map(|v| v + shift).collect();
        let fd = frechet_distance_of(&a, &shifted, d);
        // The mean term alone adds d * shift^2.
        assert!(fd > last, "shift {shift}: FD {fd} <= {last}");
        assert!(
            (fd - same_law - d as f64 * (shift as f64).powi(2)).abs()
                < 0.2 * d as f64 * (shift as f64).powi(2) + 0.1
        );
        last = fd;
    }
}

/// scipy's sqrtm-based formula (pytorch-fid's), computed once by scripts/fd_reference.py.
#[test]
fn fd_matches_scipy_reference() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../testdata/eval/fd_reference.json");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let d = v["dim"].as_u64().unwrap() as usize;
    let to = |k: &str| -> Vec<f32> {
        v[k].as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect()
    };
    let (a, b) = (to("a"), to("b"));
    let expected = v["fd_ab"].as_f64().unwrap();
    let ours = frechet_distance_of(&a, &b, d);
    assert!(
        (ours - expected).abs() < 1e-6 * expected.max(1.0),
        "ddm FD {ours} vs scipy {expected}"
    );
    assert!(frechet_distance_of(&a, &a, d) < 1e-8);
}

#[test]
fn fd_is_symmetric_and_uses_unbiased_covariance() {
    let d = 8;
    let a = random_features(200, d, 3);
    let b: Vec<f32> = random_features(300, d, 4).iter().map(|v| 1.5 * v).collect();
    let (ga, gb) = (Gaussian::fit(&a, 200, d), Gaussian::fit(&b, 300, d));
    assert!((frechet_distance(&ga, &gb) - frechet_distance(&gb, &ga)).abs() < 1e-9);
    // Unbiased variance of [1, 2, 3] is 1.
    let g = Gaussian::fit(&[1.0, 2.0, 3.0], 3, 1);
    assert!((g.cov[0] - 1.0).abs() < 1e-12);
}

#[test]
fn precision_and_recall_of_identical_sets_are_one_and_drop_for_disjoint_ones() {
    let d = 8;
    let a = random_features(400, d, 5);
    let pr = precision_recall(&a, &a, d, 3);
    assert_eq!((pr.precision, pr.recall), (1.0, 1.0));
    let far: Vec<f32> = a.iter().map(|v| v + 50.0).collect();
    let pr = precision_recall(&a, &far, d, 3);
    assert_eq!((pr.precision, pr.recall), (0.0, 0.0));
    // A generator that covers only half the real data: full precision, about half the recall.
    let half: Vec<f32> = a.chunks(d).filter(|r| r[0] > 0.0).flatten().copied().collect();
    let pr = precision_recall(&a, &half, d, 3);
    assert!(pr.precision > 0.95, "{pr:?}");
    assert!(pr.recall < 0.8 && pr.recall > 0.3, "{pr:?}");
}

fn ring() -> GaussianMixture {
    ddm_eval::paper_table::ring_mixture()
}

#[test]
fn gaussian_mixture_metrics_are_zero_for_the_exact_field() {
    let g = ring();
    let device = ddm_core::device::cpu();
    let exact = g.field(&device);
    let mse = mixture::velocity_mse_by_bin(&mut &exact, &g, 10, 200, 0, &device).unwrap();
    assert!(mse.iter().all(|&m| m < 1e-9), "{mse:?}");

    // Samples of the exact field (Heun, fine steps) vs fresh draws: energy distance ~0, the mode
    // weights recovered.
    let n = 3000;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
    let x1 = flow::randn(vec![n, 2], &mut rng).to_tensor::<2>(&device);
    let x = ddm_core::host::HostTensor::from_tensor(
        flow::integrate(
            &mut &exact,
            x1,
            &ddm_core::condition::Condition::none(),
            &StepSchedule::Uniform.times(100),
            Solver::Heun,
        )
        .unwrap(),
    );
    let r = mixture::evaluate(&mut &exact, &x.data, &g, 1, &device).unwrap();
    assert!(r.velocity_mse < 1e-9, "{r:?}");
    assert!(r.energy_distance < 0.01, "{r:?}");
    assert!(r.mode_weight_tv < 0.03, "{r:?}");

    // A field that is wrong (the mixture shifted by 1): every metric sees it.
    let mut shifted = g.clone();
    shifted.means.iter_mut().for_each(|m| m[0] += 1.0);
    let wrong = shifted.field(&device);
    let (w, _) = shifted.sample(n, &mut rng);
    let bad = mixture::evaluate(&mut &wrong, &w.data, &g, 1, &device).unwrap();
    assert!(bad.velocity_mse > 0.1, "{bad:?}");
    assert!(
        bad.energy_distance > 10.0 * r.energy_distance.max(0.01),
        "{bad:?}"
    );
}

#[test]
fn energy_distance_of_two_draws_is_small_and_of_different_laws_large() {
    let g = ring();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    let (a, _) = g.sample(2000, &mut rng);
    let (b, _) = g.sample(2000, &mut rng);
    let same = mixture::energy_distance(&a.data, &b.data, 2);
    let only_one_mode: Vec<f32> = a
        .data
        .chunks(2)
        .filter(|r| r[0] > 0.0)
        .flatten()
        .copied()
        .collect();
    let diff = mixture::energy_distance(&only_one_mode, &b.data, 2);
    assert!(same.abs() < 0.01, "{same}");
    assert!(diff > 0.3, "{diff}");
    let w = mixture::mode_weights(&a.data, &g);
    for (x, y) in w.iter().zip(&g.weights) {
        assert!((x - y).abs() < 0.03, "{w:?} vs {:?}", g.weights);
    }
}

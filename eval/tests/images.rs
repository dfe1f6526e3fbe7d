//! The committed classifier and the image metrics on real Fashion-MNIST (Debian's
//! dataset-fashion-mnist package, which CI installs).

use ddm_eval::classifier::{EMBEDDED_SHA256, FeatureNet};
use ddm_eval::images::{ImageEval, RealSet};

fn load(s: &str) -> ddm_datasets::Dataset {
    ddm_datasets::parse_source(s, false).unwrap().load().unwrap()
}

#[test]
fn committed_classifier_is_the_recorded_one_and_classifies() {
    let net = FeatureNet::embedded(&ddm_core::device::cpu()).unwrap();
    assert_eq!(net.sha256, EMBEDDED_SHA256);
    assert_eq!((net.input_dim(), net.classes(), net.feature_dim()), (784, 10, 64));
    let test = load("fashion-mnist:test");
    let acc = net.accuracy(&test).unwrap();
    assert!(acc > 0.87, "test accuracy {acc}");
}

#[test]
fn real_images_score_near_the_floor_and_noise_far_from_it() {
    let dir = tempfile::tempdir().unwrap();
    // SAFETY: set before any thread of this test reads it; the cache key is per test dir.
    unsafe { std::env::set_var("DDM_CACHE", dir.path()) };
    let device = ddm_core::device::cpu();
    let test = load("fashion-mnist:test");
    let train = load("fashion-mnist");
    let eval = ImageEval::new(FeatureNet::embedded(&device).unwrap(), test.clone(), train).unwrap();
    // The reference statistics were cached, and read back identically.
    let cached = RealSet::of(&eval.net, &test).unwrap();
    assert_eq!(cached.gaussian, eval.reference.gaussian);
    assert!(std::fs::read_dir(dir.path().join("eval")).unwrap().count() == 1);

    let n = 400;
    let floor = eval.floor(n, 0).unwrap();
    // FD is biased upwards at small N (and its scale is the features'): the floor is what real
    // images get at this N, which is why every table prints it.
    assert!(
        floor.fd > 0.0 && floor.precision > 0.6 && floor.recall > 0.6,
        "{floor:?}"
    );
    assert!(floor.class_tv < 0.1, "{floor:?}");
    // Uniform noise in the data range: far away, little precision, no recall, two classes.
    let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(0);
    let noise: Vec<f32> = (0..n * 784)
        .map(|_| rand::Rng::random_range(&mut rng, -1.0f32..1.0))
        .collect();
    let bad = eval.evaluate(&noise, 0).unwrap();
    assert!(bad.fd > 10.0 * floor.fd, "noise {bad:?} vs floor {floor:?}");
    assert!(
        bad.precision < 0.5 * floor.precision && bad.recall < 0.05,
        "{bad:?}"
    );
    assert!(bad.class_tv > 0.3, "{bad:?}");
    assert!(bad.nn_train_rms > 2.0 * floor.nn_train_rms, "{bad:?}");
    // Training images are their own nearest neighbours.
    let idx: Vec<usize> = (0..50).collect();
    let memorised = eval.evaluate(&eval.train.gather(&idx), 0).unwrap();
    assert!(memorised.nn_train_rms < 1e-3, "{memorised:?}");
}

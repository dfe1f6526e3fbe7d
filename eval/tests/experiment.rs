//! The paper-table experiment end to end at toy size (Gaussian mixture: seconds): every system
//! at every checkpoint, the table and plot, and resuming.

use ddm_eval::experiment::{self, Judge, Setting, read_rows, systems};
use ddm_trainer::config::TrainConfig;

#[test]
fn paper_table_runs_and_resumes_on_a_mixture() {
    let dir = tempfile::tempdir().unwrap();
    let g = ddm_eval::cli::ring_mixture();
    let spec = ddm_datasets::mixture::MixtureSpec {
        mixture: g.clone(),
        n: 2000,
        seed: 0,
    };
    let data = spec.dataset("gmm:ring".into());
    let train = TrainConfig {
        model: "mlp".into(),
        mlp_hidden: 64,
        mlp_depth: 2,
        steps: 60,
        batch_size: 64,
        lr: 1e-3,
        warmup_steps: 10,
        checkpoint_every: 1000,
        ..TrainConfig::default()
    };
    let setting = Setting {
        name: "gmm".into(),
        k: 4,
        clustering: experiment::default_clustering(4, &data, 0),
        expert: train.clone(),
        router: train,
        stages: 2,
        n: 200,
        sample_steps: 10,
        threshold: 0.1,
        device: ddm_core::device::DeviceChoice::Cpu,
        seed: 0,
        progress: false,
    };
    let judge = Judge::Mixture(g);
    let rows = experiment::run(&setting, dir.path(), &data, &judge).unwrap();
    let names = systems(0.1);
    assert_eq!(rows.len(), 2 * names.len());
    for pct in [50, 100] {
        for s in &names {
            let r = rows
                .iter()
                .find(|r| r.stage_pct == pct && r.system == s.name)
                .unwrap_or_else(|| panic!("no row for {} at {pct}%", s.name));
            let m = r.mixture.as_ref().unwrap();
            assert!(m.energy_distance.is_finite() && m.velocity_mse.is_finite());
            assert!(r.train_flops > 0.0 && r.sample_gflops > 0.0);
        }
    }
    // FLOP matching: the ensemble's experts cost what the monolith costs (+ the router).
    let at = |name: &str| {
        rows.iter()
            .find(|r| r.stage_pct == 100 && r.system == name)
            .unwrap()
    };
    let (mono, ens) = (at("monolith"), at("clustered top-1"));
    assert!(ens.train_flops > mono.train_flops && ens.train_flops < 2.5 * mono.train_flops);
    // Top-1 runs one expert per sample and step; full runs all K.
    let full = at("clustered full");
    assert!((full.sample_gflops - ens.sample_gflops) > 2.0 * mono.sample_gflops);
    // Stage snapshots are registries of their own.
    assert!(dir.path().join("registry/clustered-50/registry.json").exists());
    assert!(dir.path().join("registry/monolith-100.safetensors").exists());

    // A rerun finds every row and trains nothing more; the wall time accumulates.
    let first = experiment::wall_seconds(dir.path());
    assert!(first > 0.0);
    let again = experiment::run(&setting, dir.path(), &data, &judge).unwrap();
    assert!(experiment::wall_seconds(dir.path()) > first);
    assert_eq!(again.len(), rows.len());
    assert_eq!(
        read_rows(&dir.path().join("results.jsonl")).unwrap().len(),
        rows.len()
    );

    let md = ddm_eval::report::markdown("Gaussian mixture", &rows, None, "toy");
    for s in &names {
        assert!(md.contains(&s.name), "{} missing from\n{md}", s.name);
    }
    let png = dir.path().join("plot.png");
    ddm_eval::report::plot(&png, "toy", &rows, None).unwrap();
    assert!(std::fs::metadata(&png).unwrap().len() > 1000);
}

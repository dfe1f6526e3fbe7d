//! The paper-table experiment end to end at toy size (Gaussian mixture: seconds): every system
//! at every checkpoint, the table and plot, and resuming.

use ddm_eval::experiment::{self, Judge, Setting, read_rows, systems};
use ddm_trainer::config::TrainConfig;

#[test]
fn paper_table_runs_and_resumes_on_a_mixture() {
    let dir = tempfile::tempdir().unwrap();
    let g = ddm_eval::paper_table::ring_mixture();
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
        solver: ddm_core::flow::Solver::Euler,
        schedule: ddm_core::flow::StepSchedule::Uniform,
        threshold: 0.1,
        device: ddm_core::device::DeviceChoice::Cpu,
        seed: 0,
        progress: false,
        conditional: None,
    };
    let judge = Judge::Mixture(g);
    let rows = experiment::run(&setting, dir.path(), &data, &judge).unwrap();
    let names = systems(&setting);
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
    // Rows sampled one way are not resumed another way.
    let unipc = Setting {
        solver: ddm_core::flow::Solver::UniPc,
        ..setting.clone()
    };
    let e = experiment::run(&unipc, dir.path(), &data, &judge)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("`euler uniform`") && e.contains("`unipc uniform`"),
        "{e}"
    );

    let md = ddm_eval::report::markdown("Gaussian mixture", &rows, None, "toy");
    for s in &names {
        assert!(md.contains(&s.name), "{} missing from\n{md}", s.name);
    }
    let png = dir.path().join("plot.png");
    ddm_eval::report::plot(&png, "toy", &rows, None).unwrap();
    assert!(std::fs::metadata(&png).unwrap().len() > 1000);
}

/// A results.jsonl that mixes image and mixture rows (or has a row with neither) is refused with
/// the file and line named; before, the table writer panicked on such a file.
#[test]
fn a_results_file_mixing_image_and_mixture_rows_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("results.jsonl");
    let base = serde_json::json!({
        "setting": "s", "stage_pct": 100, "system": "monolith",
        "train_flops": 1.0, "sample_gflops": 1.0, "sample_seconds": 1.0,
    });
    let mut mixture = base.clone();
    mixture["mixture"] = serde_json::json!({
        "n": 10, "velocity_mse_by_bin": [0.1], "velocity_mse": 0.1, "energy_distance": 0.2,
        "mode_weights": [1.0], "mode_weight_tv": 0.0,
    });
    let mut image = base.clone();
    image["images"] = serde_json::json!({
        "n": 10, "fd": 1.0, "precision": 0.5, "recall": 0.5, "class_histogram": [1.0],
        "class_tv": 0.0, "nn_train_rms": 0.1,
    });
    let write = |rows: &[&serde_json::Value]| {
        let text: Vec<String> = rows.iter().map(|r| r.to_string()).collect();
        std::fs::write(&path, text.join("\n")).unwrap();
    };
    write(&[&mixture, &mixture]);
    assert_eq!(read_rows(&path).unwrap().len(), 2);
    write(&[&mixture, &image]);
    let e = read_rows(&path).unwrap_err().to_string();
    assert!(
        e.contains("results.jsonl line 2") && e.contains("image row"),
        "{e}"
    );
    write(&[&base]);
    let e = read_rows(&path).unwrap_err().to_string();
    assert!(e.contains("line 1") && e.contains("exactly one"), "{e}");
}

/// The class-conditional setting at toy size (mixture components as classes): conditional experts
/// and monolith, a registry with a conditioned router and one with an unconditioned router beside
/// the same experts, every row including the guided ones and the per-trajectory strategy.
#[test]
fn class_conditional_paper_table_on_a_mixture() {
    let dir = tempfile::tempdir().unwrap();
    let g = ddm_eval::paper_table::ring_mixture();
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
        steps: 40,
        batch_size: 64,
        lr: 1e-3,
        warmup_steps: 10,
        checkpoint_every: 1000,
        class_conditional: true,
        ..TrainConfig::default()
    };
    let setting = Setting {
        name: "gmm-conditional".into(),
        k: 4,
        clustering: experiment::default_clustering(4, &data, 0),
        expert: train.clone(),
        router: train,
        stages: 1,
        n: 160,
        sample_steps: 8,
        solver: ddm_core::flow::Solver::Euler,
        schedule: ddm_core::flow::StepSchedule::Uniform,
        threshold: 0.1,
        device: ddm_core::device::DeviceChoice::Cpu,
        seed: 0,
        progress: false,
        conditional: Some(experiment::Conditional {
            classes: 8,
            guidance: 2.0,
            text: None,
        }),
    };
    let rows = experiment::run(&setting, dir.path(), &data, &Judge::Mixture(g)).unwrap();
    let names = systems(&setting);
    assert_eq!(rows.len(), names.len());
    for s in &names {
        assert!(rows.iter().any(|r| r.system == s.name), "no row for {}", s.name);
    }
    let at = |name: &str| rows.iter().find(|r| r.system == name).unwrap();
    // Guidance doubles the model rows; the per-trajectory strategy asks the router once.
    let (top1, guided) = (at("clustered top-1"), at("clustered top-1, guidance 2"));
    assert!(guided.sample_gflops > 1.4 * top1.sample_gflops); // here the router costs what an expert does
    let (traj, top1) = (at("clustered trajectory"), at("clustered top-1"));
    assert!(traj.sample_gflops < top1.sample_gflops);
    let device = ddm_core::device::cpu();
    for (reg, classes) in [("clustered-100", 8), ("clustered-plain-100", 0)] {
        let r = ddm_ensemble::registry::Registry::open(&dir.path().join("registry").join(reg)).unwrap();
        assert_eq!(r.router(&device).unwrap().classes(), classes, "{reg}");
        assert_eq!(r.expert_classes().unwrap(), 8);
    }
    assert!(!dir.path().join("partition-random").exists());
}

/// The text setting at toy size on real images: captions measured from Fashion-MNIST, a text
/// encoder trained in the run, experts and a router reading the captions' vectors, samples asked
/// for test prompts and scored on whether they show them.
#[test]
fn text_setting_trains_on_captions_and_scores_prompt_adherence() {
    use ddm_eval::classifier::FeatureNet;
    use ddm_eval::experiment::text;
    use ddm_eval::images::ImageEval;
    let dir = tempfile::tempdir().unwrap();
    // SAFETY: set before any thread of this test reads it.
    unsafe { std::env::set_var("DDM_CACHE", dir.path().join("cache")) };
    let load = |s: &str| ddm_datasets::parse_source(s, false).unwrap().load().unwrap();
    let mut data = load("fashion-mnist-10k");
    let reference = load("fashion-mnist:test");
    let device = ddm_core::device::cpu();
    let eval = ImageEval::new(
        FeatureNet::embedded(&device).unwrap(),
        reference.clone(),
        data.clone(),
    )
    .unwrap();
    let expert = TrainConfig {
        model: "DiT-T/4".into(),
        steps: 12,
        batch_size: 16,
        lr: 1e-3,
        warmup_steps: 2,
        checkpoint_every: 1000,
        condition_vectors: true,
        ..TrainConfig::default()
    };
    let router = TrainConfig {
        model: "DiT-XS/4".into(),
        condition_vectors: false,
        ..expert.clone()
    };
    let mut setting = Setting {
        name: "fashion-mnist-text".into(),
        k: 2,
        clustering: experiment::default_clustering(2, &data, 0),
        expert,
        router,
        stages: 1,
        n: 40,
        sample_steps: 3,
        solver: ddm_core::flow::Solver::Euler,
        schedule: ddm_core::flow::StepSchedule::Uniform,
        threshold: 0.1,
        device: ddm_core::device::DeviceChoice::Cpu,
        seed: 0,
        progress: false,
        conditional: Some(experiment::Conditional {
            classes: 10,
            guidance: 2.0,
            text: None,
        }),
    };
    let encoder = TrainConfig {
        model: "clip:32:1:2".into(),
        steps: 20,
        batch_size: 64,
        lr: 1e-3,
        checkpoint_every: 1000,
        ..TrainConfig::default()
    };
    let prompts = text::prepare(&setting, dir.path(), &encoder, &mut data, &reference).unwrap();
    // Every training image got its caption's 32-wide vector; the prompts are class-balanced and
    // each says at least two attributes.
    assert_eq!(data.cond.as_ref().unwrap().shape, vec![data.len(), 32]);
    assert_eq!(prompts.vectors.shape, vec![40, 32]);
    assert_eq!(prompts.classes[..12], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]);
    assert!(prompts.said.iter().all(|s| s.iter().flatten().count() >= 2));
    let labels = reference.labels.as_ref().unwrap();
    assert!(
        prompts
            .sources
            .iter()
            .zip(&prompts.classes)
            .all(|(&i, &c)| labels[i] == c)
    );
    // Adherence of the prompts' own images: every attribute (cut where the prompts were), most
    // classes; shown each other's images (shifted by one: always another class), far less.
    let own = reference.gather(&prompts.sources);
    let real = text::adherence(&prompts, &own, &reference.shape, &eval.net).unwrap();
    assert_eq!(real.attributes, 1.0);
    assert!(real.class > 0.8, "{real:?}");
    let mut shifted = prompts.sources.clone();
    shifted.rotate_left(1);
    let wrong = text::adherence(&prompts, &reference.gather(&shifted), &reference.shape, &eval.net).unwrap();
    assert!(wrong.class < 0.25 && wrong.attributes < 0.8, "{wrong:?}");

    let space = data.text.clone().unwrap();
    setting.conditional.as_mut().unwrap().text = Some(std::sync::Arc::new(prompts));
    let rows = experiment::run(&setting, dir.path(), &data, &Judge::Images(Box::new(eval))).unwrap();
    let names = systems(&setting);
    assert_eq!(names.len(), 9);
    assert_eq!(rows.len(), names.len());
    for r in &rows {
        let a = r
            .adherence
            .unwrap_or_else(|| panic!("{}: no adherence", r.system));
        assert!(
            (0.0..=1.0).contains(&a.class) && (0.0..=1.0).contains(&a.attributes),
            "{a:?}"
        );
        assert!(r.images.as_ref().unwrap().fd.is_finite());
    }
    // The text router reads the caption vectors, the plain one does not; both registries
    // record the encoder's text space.
    for (reg, dim) in [("clustered-100", Some(32)), ("clustered-plain-100", None)] {
        let r = ddm_ensemble::registry::Registry::open(&dir.path().join("registry").join(reg)).unwrap();
        assert_eq!(r.router(&device).unwrap().condition_dim(), dim, "{reg}");
        assert_eq!(r.router(&device).unwrap().classes(), 0, "{reg}");
        assert_eq!(r.index.text.as_ref(), Some(&space), "{reg}");
    }
}

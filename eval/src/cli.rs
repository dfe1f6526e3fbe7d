//! `ddm eval ...` and `ddm experiment paper-table`.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use ddm_core::flow::{self, Solver, StepSchedule, VelocityField};
use ddm_core::gmm::GaussianMixture;
use ddm_core::host::{HostTensor, TensorFile};
use ddm_datasets::Dataset;
use ddm_datasets::mixture::MixtureSpec;
use ddm_trainer::cli::TrainSettings;
use ddm_trainer::config::TrainConfig;
use rand::SeedableRng;

use crate::classifier::{CLASSIFIER_FILE, ClassifierTask, FeatureNet};
use crate::experiment::{self, Judge, Row, Setting};
use crate::images::{ImageEval, format_report};

/// Evaluate samples: images in the committed Fashion-MNIST classifier's features (FD, precision /
/// recall, classes, memorisation), Gaussian-mixture samples exactly; or train that classifier.
#[derive(Args, Debug)]
pub struct EvalArgs {
    #[command(subcommand)]
    pub command: EvalCommand,
}

#[derive(Subcommand, Debug)]
#[allow(clippy::large_enum_variant)] // parsed once per process
pub enum EvalCommand {
    /// Score image samples (safetensors with `x0` or `x`, [N, C, H, W]) against the real test set,
    /// beside the real-vs-real floor at the same N.
    Images(EvalImagesArgs),
    /// Score a registry's ensemble (or one checkpoint) on a Gaussian mixture, exactly.
    Gmm(EvalGmmArgs),
    /// Train the feature classifier (deterministic; the committed one was made by this command
    /// with its defaults, see eval/assets/README.md).
    TrainClassifier(TrainClassifierArgs),
}

#[derive(Args, Debug)]
pub struct EvalImagesArgs {
    /// Sample files (`ddm sample` writes them beside its PNG).
    #[arg(required = true)]
    pub samples: Vec<PathBuf>,
    /// A classifier checkpoint (default: the committed one, compiled in).
    #[arg(long)]
    pub classifier: Option<PathBuf>,
    /// The real reference set (its statistics are cached in $DDM_CACHE/eval).
    #[arg(long, default_value = "fashion-mnist:test")]
    pub reference: String,
    /// The training set (nearest-neighbour distances and the floor).
    #[arg(long, default_value = "fashion-mnist")]
    pub train: String,
    /// Seeds the real subsets precision / recall and the floor use.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Also write the reports as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Allow downloading Fashion-MNIST when it is not on disk.
    #[arg(long)]
    pub download: bool,
}

#[derive(Args, Debug)]
pub struct EvalGmmArgs {
    /// The mixture spec the models were trained on (`--data gmm:SPEC.json`).
    #[arg(long)]
    pub mixture: PathBuf,
    /// A registry: score its ensemble with --strategy.
    #[arg(long, conflicts_with = "checkpoint")]
    pub registry: Option<PathBuf>,
    /// One expert checkpoint (e.g. a monolith) instead of a registry.
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    #[arg(long, default_value = "top-1")]
    pub strategy: ddm_ensemble::strategy::Strategy,
    /// Use the analytic router from the registered statistics.
    #[arg(long)]
    pub analytic: bool,
    #[arg(long, default_value_t = 2000)]
    pub n: usize,
    #[arg(long, default_value_t = 50)]
    pub steps: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

#[derive(Args, Debug)]
pub struct TrainClassifierArgs {
    /// Labelled training images.
    #[arg(long, default_value = "fashion-mnist")]
    pub data: String,
    /// Labelled test images (accuracy is printed at the end).
    #[arg(long, default_value = "fashion-mnist:test")]
    pub test_data: String,
    /// Output directory (a one-shard partition of the data, the run, classifier.safetensors).
    #[arg(long)]
    pub out: PathBuf,
    /// Training settings; unset ones default to DiT-XS/4, 4000 steps of batch 128, lr 1e-3.
    #[command(flatten)]
    pub settings: TrainSettings,
}

/// The committed classifier's network and length of training.
pub const DEFAULT_CLASSIFIER_MODEL: &str = "DiT-XS/4";
pub const DEFAULT_CLASSIFIER_STEPS: u64 = 4000;

fn load(data: &str, download: bool) -> anyhow::Result<Dataset> {
    let source = ddm_datasets::parse_source(data, download)?;
    source
        .load()
        .with_context(|| format!("loading {}", source.describe()))
}

pub fn eval(args: EvalArgs) -> anyhow::Result<u8> {
    match args.command {
        EvalCommand::Images(a) => eval_images(a).map(|()| 0),
        EvalCommand::Gmm(a) => eval_gmm(a).map(|()| 0),
        EvalCommand::TrainClassifier(a) => train_classifier(a),
    }
}

/// The samples of a `ddm sample` output (`x0`) or any safetensors with `x`, flattened to [N, X].
pub fn read_samples(path: &Path) -> anyhow::Result<HostTensor> {
    let f = TensorFile::read(path)?;
    let name = ["x0", "x"]
        .into_iter()
        .find(|n| f.contains(n))
        .with_context(|| format!("{}: no tensor named x0 or x", path.display()))?;
    let t = f.f32(name)?;
    if t.shape.len() < 2 {
        bail!(
            "{}: `{name}` has shape {:?}; expected [N, ...]",
            path.display(),
            t.shape
        );
    }
    let n = t.shape[0];
    Ok(HostTensor::new(vec![n, t.numel() / n], t.data))
}

fn eval_images(a: EvalImagesArgs) -> anyhow::Result<()> {
    let device = ddm_core::device::cpu();
    let net = FeatureNet::open(a.classifier.as_deref(), &device)?;
    eprintln!(
        "classifier {} (feature dim {})",
        &net.sha256[..16],
        net.feature_dim()
    );
    let names: Option<Vec<String>> = net
        .meta
        .extra
        .get("class_names")
        .and_then(|v| serde_json::from_value(v.clone()).ok());
    let eval = ImageEval::new(net, load(&a.reference, a.download)?, load(&a.train, a.download)?)?;
    let mut reports = serde_json::Map::new();
    let mut floor_n = None;
    for p in &a.samples {
        let x = read_samples(p)?;
        let r = eval.evaluate(&x.data, a.seed)?;
        print!(
            "{}",
            format_report(&p.display().to_string(), &r, names.as_deref())
        );
        floor_n.get_or_insert(r.n);
        reports.insert(p.display().to_string(), serde_json::to_value(&r)?);
    }
    if let Some(n) = floor_n {
        let f = eval.floor(n, a.seed)?;
        print!(
            "{}",
            format_report(
                "floor (real train images; nn-train for test images)",
                &f,
                names.as_deref()
            )
        );
        reports.insert("floor".into(), serde_json::to_value(&f)?);
    }
    if let Some(j) = &a.json {
        ddm_core::fsio::write_bytes_atomic(
            j,
            serde_json::to_string_pretty(&serde_json::Value::Object(reports))?.as_bytes(),
        )?;
    }
    Ok(())
}

fn read_mixture(path: &Path) -> anyhow::Result<MixtureSpec> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let spec: MixtureSpec =
        serde_json::from_str(&text).with_context(|| format!("{}: not a mixture spec", path.display()))?;
    spec.validate()
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(spec)
}

fn eval_gmm(a: EvalGmmArgs) -> anyhow::Result<()> {
    let g = read_mixture(&a.mixture)?.mixture;
    let device = ddm_core::device::cpu();
    let sample = |field: &dyn VelocityField<2>| {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(a.seed);
        let x1 = flow::randn(vec![a.n, g.dim()], &mut rng).to_tensor::<2>(&device);
        let times = StepSchedule::Uniform.times(a.steps);
        HostTensor::from_tensor(flow::integrate(field, x1, None, &times, Solver::Euler)).data
    };
    let report = match (&a.registry, &a.checkpoint) {
        (_, Some(c)) => {
            let (_, model) = ddm_core::checkpoint::load(c, &device)?;
            let x = sample(&model);
            crate::mixture::evaluate(&model, &x, &g, a.seed, &device)
        }
        (Some(r), None) => {
            let reg = ddm_ensemble::registry::Registry::open(r)?;
            let k = reg.index.k;
            let experts = (0..k)
                .map(|c| Ok(ddm_ensemble::sampler::ExpertSlot::ready(reg.expert(c, &device)?)))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let router: Box<dyn ddm_ensemble::sampler::Posterior> = if a.analytic {
                Box::new(reg.analytic_router()?)
            } else {
                Box::new(ddm_ensemble::sampler::LearnedRouter {
                    net: reg.router(&device)?,
                    k,
                })
            };
            let ens = ddm_ensemble::sampler::Ensemble::new(experts, Some(router), a.strategy, a.seed)?;
            let x = sample(&ens);
            crate::mixture::evaluate(&ens, &x, &g, a.seed, &device)
        }
        (None, None) => bail!("give --registry or --checkpoint"),
    };
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

fn train_classifier(a: TrainClassifierArgs) -> anyhow::Result<u8> {
    let mut s = a.settings.clone();
    s.model.get_or_insert(DEFAULT_CLASSIFIER_MODEL.into());
    s.steps.get_or_insert(DEFAULT_CLASSIFIER_STEPS);
    s.batch_size.get_or_insert(128);
    s.lr.get_or_insert(1e-3);
    s.checkpoint_every.get_or_insert(1000);
    let config = s.resolve_config()?;
    // The trainer's loop reads partitions: the classifier's is one shard holding everything.
    let part = a.out.join("partition");
    if !part.join("partition.json").exists() {
        let data = load(&a.data, false)?;
        let pc = ddm_datasets::partition::PartitionConfig {
            k: 1,
            features: ddm_datasets::features::FeatureMethod::Raw,
            distance: ddm_datasets::features::Distance::L2,
            algorithm: ddm_datasets::partition::Algorithm::Random,
            seed: config.seed,
        };
        let c = ddm_datasets::partition::cluster(&data, &pc)?;
        ddm_datasets::partition::write(&part, &data, &pc, &c, 0.0, false)?;
    }
    let manifest = ddm_datasets::partition::read_manifest(&part)?;
    let code = ddm_trainer::cli::run_task(&ClassifierTask, &s, config, &part, manifest, &a.out)?;
    if code != 0 {
        return Ok(code);
    }
    let path = a.out.join(CLASSIFIER_FILE);
    let net = FeatureNet::read(&path, &ddm_core::device::cpu())?;
    let test = load(&a.test_data, false)?;
    println!(
        "{}: weights sha256 {}\n  accuracy on {} ({} images): {:.4}",
        path.display(),
        net.sha256,
        test.name,
        test.len(),
        net.accuracy(&test)?
    );
    Ok(0)
}

/// Run the paper's comparison at a size this machine can afford: FLOP-matched monolith vs routed
/// ensembles of a clustered and a random partition, at 25/50/75/100% of the training budget, on
/// Fashion-MNIST (FD etc. in the committed classifier's features) and on a Gaussian mixture
/// (exact metrics). Writes OUT/table.md, OUT/fashion-mnist/fd.png, OUT/gmm/mixture.png and every
/// row to OUT/*/results.jsonl. Rerunning the same command resumes.
#[derive(Args, Debug)]
pub struct ExperimentArgs {
    #[command(subcommand)]
    pub command: ExperimentCommand,
}

#[derive(Subcommand, Debug)]
pub enum ExperimentCommand {
    /// Monolith vs ensembles (top-1, top-2, full, sample, threshold, analytic top-1, random top-1).
    PaperTable(PaperTableArgs),
}

#[derive(Args, Debug, Clone)]
pub struct PaperTableArgs {
    #[arg(long, default_value = "runs/paper-table")]
    pub out: PathBuf,
    /// Training images (see `ddm partition --data`).
    #[arg(long, default_value = "fashion-mnist")]
    pub data: String,
    /// Real images the samples are compared with.
    #[arg(long, default_value = "fashion-mnist:test")]
    pub reference: String,
    /// Islands / clusters.
    #[arg(long, default_value_t = 4)]
    pub k: usize,
    /// Expert and monolith network.
    #[arg(long, default_value = "DiT-T/4")]
    pub model: String,
    /// The monolith's batch B; each expert trains with B / K.
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Training steps of the monolith and of every expert.
    #[arg(long, default_value_t = 800)]
    pub steps: u64,
    #[arg(long, default_value_t = 5e-4)]
    pub lr: f64,
    /// Router network.
    #[arg(long, default_value = "DiT-XS/4")]
    pub router_model: String,
    /// Router steps (default: --steps).
    #[arg(long)]
    pub router_steps: Option<u64>,
    /// Router batch (default: --batch-size).
    #[arg(long)]
    pub router_batch_size: Option<usize>,
    /// Checkpoints: evaluate after each 1/C of the steps.
    #[arg(long, default_value_t = 4)]
    pub checkpoints: u64,
    /// Samples per system and checkpoint (same noise for every system).
    #[arg(long, default_value_t = 500)]
    pub n: usize,
    /// Euler steps per sample.
    #[arg(long, default_value_t = 16)]
    pub sample_steps: usize,
    /// tau of the threshold strategy.
    #[arg(long, default_value_t = 0.1)]
    pub threshold: f64,
    /// A classifier checkpoint (default: the committed one).
    #[arg(long)]
    pub classifier: Option<PathBuf>,
    /// Gaussian-mixture setting: steps (monolith batch 256, experts 256 / K, MLP 256 x 3).
    #[arg(long, default_value_t = 2000)]
    pub gmm_steps: u64,
    /// Only the Gaussian-mixture setting.
    #[arg(long, conflicts_with = "skip_gmm")]
    pub gmm_only: bool,
    /// Skip the Gaussian-mixture setting.
    #[arg(long)]
    pub skip_gmm: bool,
    #[arg(long, default_value = "cpu")]
    pub device: ddm_core::device::DeviceChoice,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// No progress bars.
    #[arg(long)]
    pub quiet: bool,
}

/// The mixture of the Gaussian-mixture setting: 8 modes on a ring of radius 4, weights 1..8 / 36
/// (so clusters of K = 4 hold unequal mass and small modes are easy to lose).
pub fn ring_mixture() -> GaussianMixture {
    let m = 8;
    let total: f64 = (1..=m).map(|i| i as f64).sum();
    GaussianMixture {
        weights: (1..=m).map(|i| i as f64 / total).collect(),
        means: (0..m)
            .map(|i| {
                let a = std::f64::consts::TAU * i as f64 / m as f64;
                vec![4.0 * a.cos(), 4.0 * a.sin()]
            })
            .collect(),
        vars: vec![vec![0.15, 0.15]; m],
    }
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let threads = rayon_threads();
    format!("{cpu}, {threads} threads")
}

fn rayon_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))
}

pub fn experiment(args: ExperimentArgs) -> anyhow::Result<u8> {
    match args.command {
        ExperimentCommand::PaperTable(a) => paper_table(a).map(|()| 0),
    }
}

fn paper_table(a: PaperTableArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let device = ddm_core::device::device(a.device)?;
    let command: Vec<String> = std::env::args().collect();
    let mut doc = format!(
        "# Paper table: ensemble vs FLOP-matched monolith\n\nCommand: `{}`  \nMachine: {}, device {:?}\n\n",
        command.join(" "),
        machine(),
        a.device
    );
    if !a.gmm_only {
        let data = load(&a.data, false)?;
        let net = FeatureNet::open(a.classifier.as_deref(), &device)?;
        let sha = net.sha256.clone();
        let eval = ImageEval::new(net, load(&a.reference, false)?, data.clone())?;
        let expert = TrainConfig {
            model: a.model.clone(),
            steps: a.steps,
            batch_size: a.batch_size,
            lr: a.lr,
            checkpoint_every: 200,
            ..TrainConfig::default()
        };
        let router = TrainConfig {
            model: a.router_model.clone(),
            steps: a.router_steps.unwrap_or(a.steps),
            batch_size: a.router_batch_size.unwrap_or(a.batch_size),
            lr: 1e-3,
            checkpoint_every: 200,
            ..TrainConfig::default()
        };
        let setting = Setting {
            name: "fashion-mnist".into(),
            k: a.k,
            clustering: experiment::default_clustering(a.k, &data, a.seed),
            expert: expert.clone(),
            router: router.clone(),
            stages: a.checkpoints,
            n: a.n,
            sample_steps: a.sample_steps,
            threshold: a.threshold,
            device: a.device,
            seed: a.seed,
            progress: !a.quiet,
        };
        let dir = a.out.join("fashion-mnist");
        let reference_len = eval.reference_data.len();
        let judge = Judge::Images(Box::new(eval));
        let rows = experiment::run(&setting, &dir, &data, &judge)?;
        let Judge::Images(eval) = &judge else {
            unreachable!("built above")
        };
        let floor = eval.floor(a.n, a.seed)?;
        let header = format!(
            "{} ({} training images), K = {}. Experts and monolith {} ({:.3} GFLOPs/forward), lr {}, {} steps; \
             monolith batch {}, experts batch {}. Router {} ({} steps, batch {}). Samples: N = {} per system \
             from the same noise, {} Euler steps. Scores in the features of the committed classifier \
             (sha256 {}…) against the {} test images. Wall time of this setting, all invocations: {:.1} min.",
            data.name,
            data.len(),
            a.k,
            a.model,
            experiment::expert_flops(&expert, &data)? / 1e9,
            a.lr,
            a.steps,
            a.batch_size,
            (a.batch_size / a.k).max(1),
            a.router_model,
            router.steps,
            router.batch_size,
            a.n,
            a.sample_steps,
            &sha[..16],
            reference_len,
            experiment::wall_seconds(&dir) / 60.0
        );
        doc.push_str(&crate::report::markdown(
            "Fashion-MNIST",
            &rows,
            Some(&floor),
            &header,
        ));
        doc.push_str(&diagnostics(&dir, a.k)?);
        crate::report::plot(
            &dir.join("fd.png"),
            "Fashion-MNIST: FD vs training FLOPs",
            &rows,
            Some(floor.fd),
        )?;
        doc.push_str("\n![FD vs training FLOPs](fashion-mnist/fd.png)\n\n");
    }
    if !a.skip_gmm {
        let g = ring_mixture();
        let dir = a.out.join("gmm");
        std::fs::create_dir_all(&dir)?;
        let spec = MixtureSpec {
            mixture: g.clone(),
            n: 20_000,
            seed: a.seed,
        };
        let data = spec.dataset("gmm:ring-8".into());
        let expert = TrainConfig {
            model: "mlp".into(),
            steps: a.gmm_steps,
            batch_size: 256,
            lr: 1e-3,
            checkpoint_every: 1000,
            ..TrainConfig::default()
        };
        // The router is a smaller MLP (about 6% of an expert's FLOPs, like DiT-XS/4 next to DiT-T/4
        // experts), at the monolith's batch.
        let router = TrainConfig {
            mlp_hidden: 64,
            mlp_depth: 2,
            ..expert.clone()
        };
        let setting = Setting {
            name: "gmm".into(),
            k: a.k,
            clustering: experiment::default_clustering(a.k, &data, a.seed),
            expert: expert.clone(),
            router,
            stages: a.checkpoints,
            n: 2000,
            sample_steps: 50,
            threshold: a.threshold,
            device: a.device,
            seed: a.seed,
            progress: !a.quiet,
        };
        let mut rows = experiment::run(&setting, &dir, &data, &Judge::Mixture(g.clone()))?;
        // The closed-form field as the floor row: what a perfect model scores with these samplers.
        let exact = g.field(&device);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(a.seed);
        let x1 = flow::randn(vec![setting.n, 2], &mut rng).to_tensor::<2>(&device);
        let x = HostTensor::from_tensor(flow::integrate(
            &exact,
            x1,
            None,
            &StepSchedule::Uniform.times(setting.sample_steps),
            Solver::Euler,
        ));
        let last = rows.iter().map(|r| r.stage_pct).max().unwrap_or(100);
        rows.push(Row {
            setting: "gmm".into(),
            stage_pct: last,
            system: "exact velocity (floor)".into(),
            train_flops: 0.0,
            sample_gflops: 0.0,
            sample_seconds: 0.0,
            images: None,
            mixture: Some(crate::mixture::evaluate(&exact, &x.data, &g, a.seed, &device)),
        });
        let header = format!(
            "8 Gaussians on a ring (weights 1..8 / 36, variance 0.15), 20,000 training points, K = {}. \
             MLP 256 x 3 experts and monolith, {} steps, monolith batch 256, experts batch {}; MLP 64 x 2 \
             router (batch 256, same steps). N = 2000 samples, 50 Euler steps. Wall time, all invocations: {:.1} min.",
            a.k,
            a.gmm_steps,
            256 / a.k,
            experiment::wall_seconds(&dir) / 60.0
        );
        doc.push_str(&crate::report::markdown("Gaussian mixture", &rows, None, &header));
        let plot_rows: Vec<Row> = rows.iter().filter(|r| r.train_flops > 0.0).cloned().collect();
        crate::report::plot(
            &dir.join("mixture.png"),
            "Gaussian mixture: energy distance vs training FLOPs",
            &plot_rows,
            None,
        )?;
        doc.push_str("\n![energy distance vs training FLOPs](gmm/mixture.png)\n");
    }
    let path = a.out.join("table.md");
    ddm_core::fsio::write_bytes_atomic(&path, doc.as_bytes())?;
    println!("{doc}\nwrote {}", path.display());
    Ok(())
}

/// What explains the result: cluster balance, each expert's final loss, the router's accuracy by
/// noise level (from the runs of the final stage).
fn diagnostics(dir: &Path, k: usize) -> anyhow::Result<String> {
    let mut s = String::from("\n### Diagnostics (final stage)\n\n");
    for which in experiment::PARTITIONS {
        let m = ddm_datasets::partition::read_manifest(&dir.join(format!("partition-{which}")))?;
        s.push_str(&format!("**{which} partition**: cluster sizes"));
        for c in &m.clusters {
            s.push_str(&format!(" {} ({:.0}%)", c.count, 100.0 * c.prior));
        }
        s.push_str("; expert final losses");
        for c in 0..k {
            let p = dir.join(format!(
                "train/{which}-expert-{c}/{}",
                ddm_trainer::train::EXPERT_FILE
            ));
            let loss = ddm_core::checkpoint::Checkpoint::read(&p)
                .ok()
                .and_then(|ck| ck.meta.training.and_then(|t| t.final_loss));
            s.push_str(&match loss {
                Some(l) => format!(" {l:.4}"),
                None => " –".into(),
            });
        }
        let mono = dir.join(format!("train/monolith/{}", ddm_trainer::train::EXPERT_FILE));
        if which == "clustered"
            && let Some(l) = ddm_core::checkpoint::Checkpoint::read(&mono)
                .ok()
                .and_then(|ck| ck.meta.training.and_then(|t| t.final_loss))
        {
            s.push_str(&format!(" (monolith {l:.4})"));
        }
        let eval = dir.join(format!("train/{which}-router/{}", ddm_router::task::EVAL_FILE));
        if let Ok(text) = std::fs::read_to_string(&eval)
            && let Ok(bins) = serde_json::from_str::<Vec<serde_json::Value>>(&text)
        {
            s.push_str("; router accuracy by t bin");
            for b in bins {
                if let Some(acc) = b.get("accuracy").and_then(|v| v.as_f64()) {
                    s.push_str(&format!(" {acc:.2}"));
                }
            }
        }
        s.push_str(".\n\n");
    }
    Ok(s)
}

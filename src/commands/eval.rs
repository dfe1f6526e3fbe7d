//! `ddm eval images | gmm | train-classifier`: score samples, or train the feature classifier.

use std::path::PathBuf;

use anyhow::bail;
use clap::{Args, Subcommand};
use ddm_core::condition::Condition;
use ddm_core::flow::{self, Drift, Solver, StepSchedule};
use ddm_core::host::HostTensor;
use ddm_core::progress::Progress;
use ddm_datasets::mixture::MixtureSpec;
use ddm_eval::classifier::{self, CLASSIFIER_FILE, FeatureNet};
use ddm_eval::images::{ImageEval, format_report};
use ddm_eval::load_data as load;
use rand::SeedableRng;

use super::settings::{TrainSettings, report};

const EVAL_EXAMPLES: &str = "Examples:
  ddm sample --registry reg --strategy sample --n 500 --out samples.png
  ddm eval images samples.safetensors --json scores.json
  ddm eval gmm --mixture ring.json --registry reg --strategy full";

/// Evaluate samples: images in the committed Fashion-MNIST classifier's features (FD, precision /
/// recall, classes, memorisation), Gaussian-mixture samples exactly; or train that classifier.
#[derive(Args, Debug)]
#[command(after_help = EVAL_EXAMPLES)]
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
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Args, Debug)]
pub struct EvalGmmArgs {
    /// The mixture spec the models were trained on (`--data gmm:SPEC.json`).
    #[arg(long)]
    pub mixture: PathBuf,
    /// A registry: score its ensemble with --strategy.
    #[arg(long, conflicts_with = "checkpoint")]
    pub registry: Option<ddm_ensemble::registry::Location>,
    /// One expert checkpoint (e.g. a monolith) instead of a registry.
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    #[arg(long, default_value = "top-1")]
    pub strategy: ddm_ensemble::strategy::Strategy,
    /// Use the analytic router from the registered statistics.
    #[arg(long)]
    pub analytic: bool,
    #[arg(long, value_parser = super::values::count(1, super::values::MAX_SAMPLES), default_value_t = 2000)]
    pub n: usize,
    #[arg(long, value_parser = super::values::count(1, super::values::MAX_SAMPLING_STEPS), default_value_t = 50)]
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
    /// Training settings; unset ones default to DiT-XS/4, 4000 steps of batch 128, lr 1e-3
    /// (the committed classifier's).
    #[command(flatten)]
    pub settings: TrainSettings,
}

pub fn run(args: EvalArgs) -> anyhow::Result<u8> {
    match args.command {
        EvalCommand::Images(a) => eval_images(a).map(|()| 0),
        EvalCommand::Gmm(a) => eval_gmm(a).map(|()| 0),
        EvalCommand::TrainClassifier(a) => train_classifier(a),
    }
}

fn eval_images(a: EvalImagesArgs) -> anyhow::Result<()> {
    let device = ddm_core::device::cpu();
    let net = FeatureNet::open(a.classifier.as_deref(), &device)?;
    tracing::info!(
        "classifier {} (feature dim {})",
        ddm_core::text::short(&net.sha256, 16),
        net.feature_dim()
    );
    let names: Option<Vec<String>> = net
        .meta
        .extra
        .get("class_names")
        .and_then(|v| serde_json::from_value(v.clone()).ok());
    // Steps: the reference statistics (cached after the first run), each sample file, the floor.
    let bar = crate::ui::Bar::new(a.quiet);
    bar.begin("eval images", a.samples.len() as u64 + 2);
    let eval = ImageEval::new(net, load(&a.reference, a.download)?, load(&a.train, a.download)?)?;
    bar.advance(1);
    let mut reports = serde_json::Map::new();
    let mut floor_n = None;
    for p in &a.samples {
        let x = ddm_eval::images::read_samples(p)?;
        let r = eval.evaluate(&x.data, a.seed)?;
        bar.advance(1);
        print!(
            "{}",
            format_report(&p.display().to_string(), &r, names.as_deref())
        );
        floor_n.get_or_insert(r.n);
        reports.insert(p.display().to_string(), serde_json::to_value(&r)?);
    }
    if let Some(n) = floor_n {
        let f = eval.floor(n, a.seed)?;
        bar.finish();
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

fn eval_gmm(a: EvalGmmArgs) -> anyhow::Result<()> {
    let g = MixtureSpec::read(&a.mixture)?.mixture;
    let device = ddm_core::device::cpu();
    let sample = |field: &mut dyn Drift<2>| -> anyhow::Result<Vec<f32>> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(a.seed);
        let x1 = flow::randn(vec![a.n, g.dim()], &mut rng).to_tensor::<2>(&device);
        let times = StepSchedule::Uniform.times(a.steps);
        let x0 = flow::integrate(field, x1, &Condition::none(), &times, Solver::Euler)?;
        Ok(HostTensor::from_tensor(x0).data)
    };
    let report = match (&a.registry, &a.checkpoint) {
        (_, Some(c)) => {
            let (_, model) = ddm_core::checkpoint::load(c, &device)?;
            let x = sample(&mut &model)?;
            ddm_eval::mixture::evaluate(&mut &model, &x, &g, a.seed, &device)?
        }
        (Some(r), None) => {
            let reg = ddm_ensemble::registry::Registry::open(&r.local()?)?;
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
            let mut ens = ddm_ensemble::sampler::Ensemble::new(experts, Some(router), a.strategy, a.seed)?;
            let x = sample(&mut ens)?;
            ddm_eval::mixture::evaluate(&mut ens, &x, &g, a.seed, &device)?
        }
        (None, None) => bail!("give --registry or --checkpoint"),
    };
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

fn train_classifier(a: TrainClassifierArgs) -> anyhow::Result<u8> {
    let mut s = a.settings.clone();
    s.model.get_or_insert(classifier::DEFAULT_MODEL.into());
    s.steps.get_or_insert(classifier::DEFAULT_STEPS);
    s.batch_size.get_or_insert(128);
    s.lr.get_or_insert(1e-3);
    s.checkpoint_every.get_or_insert(1000);
    let config = s.resolve_config()?;
    if config.objective != ddm_core::checkpoint::Objective::Velocity {
        anyhow::bail!(
            "`objective` is an expert's setting: a router or classifier has none (remove it from the --config file)"
        );
    }
    let outcome = classifier::train(&a.data, &a.out, config, s.device.clone(), !s.quiet)?;
    let code = report(outcome, &a.out);
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

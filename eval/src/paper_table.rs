//! `ddm experiment paper-table`: the paper's comparison at a size this machine can afford.
//! FLOP-matched monolith vs routed ensembles of a clustered and a random partition, at 25/50/75/100%
//! of the training budget, on Fashion-MNIST (FD etc. in the committed classifier's features) and on
//! a Gaussian mixture (exact metrics). Writes OUT/table.md, OUT/fashion-mnist/fd.png,
//! OUT/gmm/mixture.png and every row to OUT/*/results.jsonl; rerunning resumes ([`experiment`]).

use std::path::{Path, PathBuf};

use anyhow::Context;
use ddm_core::burn::prelude::Device;
use ddm_core::flow::{self, Solver, StepSchedule};
use ddm_core::gmm::GaussianMixture;
use ddm_core::host::HostTensor;
use ddm_datasets::mixture::MixtureSpec;
use ddm_ensemble::strategy::Strategy;
use ddm_trainer::config::TrainConfig;
use ddm_trainer::expert::EXPERT_FILE;
use rand::SeedableRng;

use crate::classifier::FeatureNet;
use crate::experiment::{self, Judge, Row, Setting};
use crate::images::ImageEval;
use crate::{mixture, report};

/// Every setting of the experiment (the command line's defaults are in `ddm experiment --help`).
#[derive(Debug, Clone)]
pub struct PaperTableConfig {
    pub out: PathBuf,
    /// Training images (a `--data` source).
    pub data: String,
    /// Real images the samples are compared with.
    pub reference: String,
    /// Islands / clusters.
    pub k: usize,
    /// Expert and monolith network.
    pub model: String,
    /// The monolith's batch B; each expert trains with B / K.
    pub batch_size: usize,
    /// Training steps of the monolith and of every expert.
    pub steps: u64,
    pub lr: f64,
    /// Router network.
    pub router_model: String,
    /// Router steps (`None`: `steps`).
    pub router_steps: Option<u64>,
    /// Router batch (`None`: `batch_size`).
    pub router_batch_size: Option<usize>,
    /// Evaluate after each 1/C of the steps.
    pub checkpoints: u64,
    /// Samples per system and checkpoint (same noise for every system).
    pub n: usize,
    /// Steps per sample.
    pub sample_steps: usize,
    /// The solver and schedule every system samples with.
    pub solver: Solver,
    pub schedule: StepSchedule,
    /// tau of the threshold strategy.
    pub threshold: f64,
    /// A classifier checkpoint (`None`: the committed one).
    pub classifier: Option<PathBuf>,
    /// Gaussian-mixture setting: steps (monolith batch 256, experts 256 / K, MLP 256 x 3).
    pub gmm_steps: u64,
    pub gmm_only: bool,
    pub skip_gmm: bool,
    /// Run the class-conditional Fashion-MNIST setting (in `OUT/fashion-mnist-conditional`)
    /// instead of the unconditional one.
    pub conditional: bool,
    /// Run the text-conditional Fashion-MNIST setting (in `OUT/fashion-mnist-text`) instead:
    /// captions measured from the images, a text encoder trained on them, experts, monolith and
    /// one router reading each caption's vector, samples asked for prompts made from test images.
    pub text: bool,
    /// The text setting's text encoder: training steps (`clip:128:2:4`, batch 256).
    pub text_encoder_steps: u64,
    /// The guided rows' scale in the class- and text-conditional settings.
    pub guidance: f64,
    pub device: ddm_core::device::DeviceChoice,
    pub seed: u64,
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

/// The CPU model and the thread count, for the table's header.
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
    let threads = ddm_core::env::threads();
    format!("{cpu}, {threads} threads")
}

/// Run (or resume) the experiment; returns the markdown table and where it was written.
pub fn run(a: &PaperTableConfig) -> anyhow::Result<(String, PathBuf)> {
    // The threshold strategy's own check (tau in (0, 1]), before hours of training.
    Strategy::Threshold { tau: a.threshold }
        .to_string()
        .parse::<Strategy>()
        .map_err(|e| anyhow::anyhow!("--threshold {}: {e}", a.threshold))?;
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
        doc.push_str(&images_section(a, &device)?);
    }
    if !a.skip_gmm {
        doc.push_str(&mixture_section(a, &device)?);
    }
    let path = a.out.join("table.md");
    ddm_core::fsio::write_bytes_atomic(&path, doc.as_bytes())?;
    Ok((doc, path))
}

/// The Fashion-MNIST setting: experts, monolith and router trained at each stage, scored in the
/// committed classifier's features; its table, diagnostics and plot as markdown.
fn images_section(a: &PaperTableConfig, device: &Device) -> anyhow::Result<String> {
    let mut doc = String::new();
    let mut data = crate::load_data(&a.data, false)?;
    let net = FeatureNet::open(a.classifier.as_deref(), device)?;
    let sha = net.sha256.clone();
    let eval = ImageEval::new(net, crate::load_data(&a.reference, false)?, data.clone())?;
    let expert = TrainConfig {
        model: a.model.clone(),
        steps: a.steps,
        batch_size: a.batch_size,
        lr: a.lr,
        checkpoint_every: 200,
        class_conditional: a.conditional,
        condition_vectors: a.text,
        ..TrainConfig::default()
    };
    let router = TrainConfig {
        model: a.router_model.clone(),
        steps: a.router_steps.unwrap_or(a.steps),
        batch_size: a.router_batch_size.unwrap_or(a.batch_size),
        lr: 1e-3,
        checkpoint_every: 200,
        class_conditional: a.conditional,
        ..TrainConfig::default()
    };
    let conditional = match a.conditional || a.text {
        true => Some(experiment::Conditional {
            classes: data
                .num_classes
                .context("the class- and text-conditional settings need labelled data")?,
            guidance: a.guidance,
            text: None,
        }),
        false => None,
    };
    let name = match (a.conditional, a.text) {
        (_, true) => "fashion-mnist-text",
        (true, false) => "fashion-mnist-conditional",
        (false, false) => "fashion-mnist",
    };
    let mut setting = Setting {
        conditional,
        name: name.into(),
        k: a.k,
        clustering: experiment::default_clustering(a.k, &data, a.seed),
        expert: expert.clone(),
        router: router.clone(),
        stages: a.checkpoints,
        n: a.n,
        sample_steps: a.sample_steps,
        solver: a.solver,
        schedule: a.schedule,
        threshold: a.threshold,
        device: a.device,
        seed: a.seed,
        progress: !a.quiet,
    };
    let dir = a.out.join(name);
    if a.text {
        let encoder = TrainConfig {
            model: ddm_trainer::text_encoder::DEFAULT_MODEL.into(),
            steps: a.text_encoder_steps,
            batch_size: 256,
            lr: 1e-3,
            checkpoint_every: 200,
            ..TrainConfig::default()
        };
        let prompts = experiment::text::prepare(&setting, &dir, &encoder, &mut data, &eval.reference_data)?;
        // Sample i's prompt on line i: the grids' cells read against it (10 a row).
        ddm_core::fsio::write_bytes_atomic(
            &dir.join("prompts.txt"),
            (prompts.captions.join("\n") + "\n").as_bytes(),
        )?;
        if let Some(c) = setting.conditional.as_mut() {
            c.text = Some(std::sync::Arc::new(prompts));
        }
    }
    let reference_len = eval.reference_data.len();
    let judge = Judge::Images(Box::new(eval));
    let rows = experiment::run(&setting, &dir, &data, &judge)?;
    let Judge::Images(eval) = &judge else {
        unreachable!("built above")
    };
    let floor = eval.floor(a.n, a.seed)?;
    let header = images_header(a, &data, &expert, &router, &sha, reference_len, &dir)?;
    let (title, header) = match &setting.conditional {
        Some(c) if c.text.is_some() => (
            "Fashion-MNIST, text-conditional",
            text_header(&header, &setting, &eval.net, &eval.reference_data, a)?,
        ),
        Some(c) => (
            "Fashion-MNIST, class-conditional",
            format!(
                "{header} Class-conditional: experts, monolith and router see the class (label dropout 0.1; \
                 the `router without c` rows use an unconditioned router beside the same experts); samples are \
                 class-balanced (N / {} per class); guided rows use classifier-free guidance {} (2 model rows \
                 per sample per step).",
                c.classes, c.guidance
            ),
        ),
        None => ("Fashion-MNIST", header),
    };
    doc.push_str(&report::markdown(title, &rows, Some(&floor), &header));
    doc.push_str(&diagnostics(&dir, a.k, &setting)?);
    report::plot(
        &dir.join("fd.png"),
        &format!("{title}: FD vs training FLOPs"),
        &rows,
        Some(floor.fd),
    )?;
    doc.push_str(&format!("\n![FD vs training FLOPs]({name}/fd.png)\n\n"));
    Ok(doc)
}

/// The text setting's part of the header: how captions, encoder, experts and router are made,
/// what the prompts are, and the adherence of the prompts' own test images (the ceiling).
fn text_header(
    header: &str,
    setting: &Setting,
    net: &FeatureNet,
    reference: &ddm_datasets::Dataset,
    a: &PaperTableConfig,
) -> anyhow::Result<String> {
    let p = setting.prompts().context("a text setting has prompts")?;
    let real = experiment::text::adherence(p, &reference.gather(&p.sources), &reference.shape, net)?;
    Ok(format!(
        "{header} Text-conditional: every training image's caption is measured from its pixels (its class and \
         two or three of shade, width, size, in six phrasings: `ddm data captions`); a CLIP text tower ({}, {} \
         steps, batch 256) is trained contrastively on those captions inside the run (caption -> image top-1 \
         among 256 training pairs: {:.1}%, chance 0.4%), and each caption's pooled vector ({} wide) is the \
         image's condition: experts and monolith read it through adaLN (condition dropout 0.1), the router \
         beside x_t (the `router without text` rows use an unconditioned router beside the same experts). \
         Sample i is asked for prompt i, made the same way from a test image of class i mod {} (e.g. \"{}\", \
         \"{}\"). *Prompted class*: samples the evaluation classifier gives the prompt's class; *prompted \
         attributes*: the attributes a prompt says that are measured on its sample (chance about 1/3). The \
         prompts' own test images score {:.3} and {:.3}. Guided rows: classifier-free guidance {} on the text \
         (the null condition is the zero vector).",
        ddm_trainer::text_encoder::DEFAULT_MODEL,
        a.text_encoder_steps,
        100.0 * p.retrieval_top1,
        p.vectors.shape[1],
        p.classes.iter().max().map_or(0, |c| c + 1),
        ddm_core::text::printable(&p.captions[0]),
        ddm_core::text::printable(&p.captions[p.captions.len().min(9) - 1]),
        real.class,
        real.attributes,
        a.guidance
    ))
}

/// The images setting's header: data, K, models, batches, sampling, the classifier, wall time.
fn images_header(
    a: &PaperTableConfig,
    data: &ddm_datasets::Dataset,
    expert: &TrainConfig,
    router: &TrainConfig,
    sha: &str,
    reference_len: usize,
    dir: &Path,
) -> anyhow::Result<String> {
    Ok(format!(
        "{} ({} training images), K = {}. Experts and monolith {} ({:.3} GFLOPs/forward), lr {}, {} steps; \
         monolith batch {}, experts batch {}. Router {} ({} steps, batch {}). Samples: N = {} per system \
         from the same noise, {}. Scores in the features of the committed classifier \
         (sha256 {}…) against the {} test images. Wall time of this setting, all invocations: {:.1} min.",
        data.name,
        data.len(),
        a.k,
        a.model,
        experiment::expert_flops(expert, data)? / 1e9,
        a.lr,
        a.steps,
        a.batch_size,
        (a.batch_size / a.k).max(1),
        a.router_model,
        router.steps,
        router.batch_size,
        a.n,
        steps_in_words(a, a.sample_steps),
        &sha[..16],
        reference_len,
        experiment::wall_seconds(dir) / 60.0
    ))
}

/// `16 Euler steps`, or `8 steps of unipc (shifted:3 schedule)`.
fn steps_in_words(a: &PaperTableConfig, steps: usize) -> String {
    match (a.solver, a.schedule) {
        (Solver::Euler, StepSchedule::Uniform) => format!("{steps} Euler steps"),
        (solver, schedule) => format!("{steps} steps of {} ({schedule} schedule)", solver.name()),
    }
}

/// The Gaussian-mixture setting, scored against the closed form, with the exact field as the
/// floor row; its table and plot as markdown.
fn mixture_section(a: &PaperTableConfig, device: &Device) -> anyhow::Result<String> {
    let mut doc = String::new();
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
        solver: a.solver,
        schedule: a.schedule,
        threshold: a.threshold,
        device: a.device,
        seed: a.seed,
        progress: !a.quiet,
        conditional: None,
    };
    let mut rows = experiment::run(&setting, &dir, &data, &Judge::Mixture(g.clone()))?;
    // The closed-form field as the floor row: what a perfect model scores with these samplers.
    let exact = g.field(device);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(a.seed);
    let x1 = flow::randn(vec![setting.n, 2], &mut rng).to_tensor::<2>(device);
    let x = HostTensor::from_tensor(flow::integrate(
        &mut &exact,
        x1,
        &ddm_core::condition::Condition::none(),
        &setting.schedule.times(setting.sample_steps),
        setting.solver,
    )?);
    let last = rows.iter().map(|r| r.stage_pct).max().unwrap_or(100);
    rows.push(Row {
        setting: "gmm".into(),
        stage_pct: last,
        system: "exact velocity (floor)".into(),
        train_flops: 0.0,
        sample_gflops: 0.0,
        sample_seconds: 0.0,
        images: None,
        mixture: Some(mixture::evaluate(&mut &exact, &x.data, &g, a.seed, device)?),
        adherence: None,
    });
    let header = format!(
        "8 Gaussians on a ring (weights 1..8 / 36, variance 0.15), 20,000 training points, K = {}. \
         MLP 256 x 3 experts and monolith, {} steps, monolith batch 256, experts batch {}; MLP 64 x 2 \
         router (batch 256, same steps). N = 2000 samples, {}. Wall time, all invocations: {:.1} min.",
        a.k,
        a.gmm_steps,
        256 / a.k,
        steps_in_words(a, 50),
        experiment::wall_seconds(&dir) / 60.0
    );
    doc.push_str(&report::markdown("Gaussian mixture", &rows, None, &header));
    let plot_rows: Vec<Row> = rows.iter().filter(|r| r.train_flops > 0.0).cloned().collect();
    report::plot(
        &dir.join("mixture.png"),
        "Gaussian mixture: energy distance vs training FLOPs",
        &plot_rows,
        None,
    )?;
    doc.push_str("\n![energy distance vs training FLOPs](gmm/mixture.png)\n");
    Ok(doc)
}

/// What explains the result: cluster balance, each expert's final loss, the router's accuracy by
/// noise level (from the runs of the final stage).
fn diagnostics(dir: &Path, k: usize, setting: &Setting) -> anyhow::Result<String> {
    let mut s = String::from("\n### Diagnostics (final stage)\n\n");
    for &which in setting.partitions() {
        let m = ddm_datasets::partition::read_manifest(&dir.join(format!("partition-{which}")))?;
        s.push_str(&format!("**{which} partition**: cluster sizes"));
        for c in &m.clusters {
            s.push_str(&format!(" {} ({:.0}%)", c.count, 100.0 * c.prior));
        }
        s.push_str("; expert final losses");
        for c in 0..k {
            let p = dir.join(format!("train/{which}-expert-{c}/{}", EXPERT_FILE));
            let loss = ddm_core::checkpoint::Checkpoint::read(&p)
                .ok()
                .and_then(|ck| ck.meta.training.and_then(|t| t.final_loss));
            s.push_str(&match loss {
                Some(l) => format!(" {l:.4}"),
                None => " –".into(),
            });
        }
        let mono = dir.join(format!("train/monolith/{}", EXPERT_FILE));
        if which == "clustered"
            && let Some(l) = ddm_core::checkpoint::Checkpoint::read(&mono)
                .ok()
                .and_then(|ck| ck.meta.training.and_then(|t| t.final_loss))
        {
            s.push_str(&format!(" (monolith {l:.4})"));
        }
        for name in setting.registries().iter().filter(|r| r.starts_with(which)) {
            let eval = dir.join(format!("train/{name}-router/{}", ddm_trainer::router::EVAL_FILE));
            if let Ok(text) = std::fs::read_to_string(&eval)
                && let Ok(e) = ddm_trainer::router_eval::RouterEval::parse(&text)
            {
                s.push_str(&format!("; {name} router accuracy by t bin"));
                for b in &e.without_class {
                    s.push_str(&format!(" {:.2}", b.accuracy));
                }
                if let (Some(w), Some(given)) = (&e.with_condition, &e.given) {
                    s.push_str(&format!(", given the {given}"));
                    for b in w {
                        s.push_str(&format!(" {:.2}", b.accuracy));
                    }
                }
            }
        }
        s.push_str(".\n\n");
    }
    Ok(s)
}

//! `ddm experiment paper-table`: does the routed ensemble of isolated experts match a monolith
//! trained with the same FLOPs? (PAPER.md's central claim, at a size this machine can run.)
//!
//! For one dataset (Fashion-MNIST, scored in the committed classifier's features; or a Gaussian
//! mixture, scored exactly):
//! 1. two partitions of the training set into K: clustered (ddm partition's defaults) and random;
//! 2. FLOP-matched training: the monolith with batch B, each of the K experts with batch B / K,
//!    the same number of steps; a router per partition (its FLOPs count on the ensemble's side);
//! 3. training in C stages (25/50/75/100% of the steps by default); after each, the experts and
//!    router are registered in a registry of that stage, and every system samples N images from
//!    the same noise with the same solver and steps, and is scored;
//! 4. rows go to `results.jsonl` (a rerun skips what is there: the experiment resumes), then
//!    `table.md` and `fd.png` / `mixture.png` are rewritten from all rows.
//!
//! Staged training is exact: the learning rate is constant after warm-up and a resumed run
//! continues bit-identically, so the 25% checkpoint is the 25% point of the full run.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use ddm_core::burn::prelude::*;
use ddm_core::checkpoint::Checkpoint;
use ddm_core::device::DeviceChoice;
use ddm_core::flow::{self, Solver, StepSchedule, VelocityField};
use ddm_core::gmm::GaussianMixture;
use ddm_core::host::HostTensor;
use ddm_core::model::ModelConfig;
use ddm_datasets::Dataset;
use ddm_datasets::features::{Distance, FeatureMethod};
use ddm_datasets::partition::{self, Algorithm, PartitionConfig, PartitionManifest};
use ddm_ensemble::registry::{self, Registry};
use ddm_ensemble::sampler::{Ensemble, ExpertSlot, LearnedRouter, Posterior};
use ddm_ensemble::strategy::Strategy;
use ddm_router::task::{ROUTER_FILE, RouterTask};
use ddm_trainer::config::TrainConfig;
use ddm_trainer::island::Target;
use ddm_trainer::train::{EXPERT_FILE, ExpertTask, Run};
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::images::{ImageEval, ImageReport};
use crate::mixture::MixtureReport;

/// The two partitions every experiment compares.
pub const PARTITIONS: [&str; 2] = ["clustered", "random"];

/// Everything one setting (images or a mixture) needs.
#[derive(Debug, Clone)]
pub struct Setting {
    /// `fashion-mnist` or `gmm`: names the run's sub-directory and tables.
    pub name: String,
    pub k: usize,
    pub clustering: PartitionConfig,
    /// The expert (and monolith) training config; `batch_size` is the monolith's B.
    pub expert: TrainConfig,
    pub router: TrainConfig,
    /// Training stages (checkpoints at s / stages of the steps).
    pub stages: u64,
    /// Samples per system and stage.
    pub n: usize,
    pub sample_steps: usize,
    pub threshold: f64,
    pub device: DeviceChoice,
    pub seed: u64,
    pub progress: bool,
}

/// A system being compared: the monolith, or an ensemble strategy on one partition.
#[derive(Debug, Clone, PartialEq)]
pub struct System {
    pub name: String,
    /// None: the monolith.
    pub partition: Option<&'static str>,
    pub strategy: Option<Strategy>,
    pub analytic: bool,
}

pub fn systems(threshold: f64) -> Vec<System> {
    let ens = |name: &str, partition, strategy: &str, analytic| System {
        name: name.to_string(),
        partition: Some(partition),
        strategy: Some(strategy.parse().expect("known strategy")),
        analytic,
    };
    vec![
        System {
            name: "monolith".into(),
            partition: None,
            strategy: None,
            analytic: false,
        },
        ens("clustered top-1", "clustered", "top-1", false),
        ens("clustered top-2", "clustered", "top-2", false),
        ens("clustered full", "clustered", "full", false),
        ens("clustered sample T=1", "clustered", "sample:1", false),
        ens(
            &format!("clustered threshold {threshold}"),
            "clustered",
            &format!("threshold:{threshold}"),
            false,
        ),
        ens("clustered top-1 analytic", "clustered", "top-1", true),
        ens("random top-1", "random", "top-1", false),
    ]
}

/// One row of results.jsonl.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Row {
    pub setting: String,
    pub stage_pct: u32,
    pub system: String,
    /// Training FLOPs of everything the system needs (experts + router, or the monolith).
    pub train_flops: f64,
    /// Sampling cost per sample: forward FLOPs of all expert rows and router calls.
    pub sample_gflops: f64,
    pub sample_seconds: f64,
    #[serde(default)]
    pub images: Option<ImageReport>,
    #[serde(default)]
    pub mixture: Option<MixtureReport>,
}

/// How samples are judged.
pub enum Judge {
    Images(Box<ImageEval>),
    Mixture(GaussianMixture),
}

fn stage_pct(s: u64, stages: u64) -> u32 {
    (100 * s / stages) as u32
}

/// The partition directory for `which`, made if missing.
fn ensure_partition(
    setting: &Setting,
    dir: &Path,
    which: &str,
    data: &Dataset,
) -> anyhow::Result<PartitionManifest> {
    let out = dir.join(format!("partition-{which}"));
    if out.join("partition.json").exists() {
        return Ok(partition::read_manifest(&out)?);
    }
    let config = match which {
        "clustered" => setting.clustering.clone(),
        _ => PartitionConfig {
            algorithm: Algorithm::Random,
            ..setting.clustering.clone()
        },
    };
    let t0 = Instant::now();
    let c = partition::cluster(data, &config)?;
    let m = partition::write(&out, data, &config, &c, t0.elapsed().as_secs_f64(), false)?;
    eprintln!("{}", partition::describe(&out, None, 0)?);
    Ok(m)
}

fn train_to(
    setting: &Setting,
    task: &impl ddm_trainer::task::Task,
    part_dir: &Path,
    manifest: &PartitionManifest,
    out: &Path,
    config: TrainConfig,
) -> anyhow::Result<()> {
    let outcome = ddm_trainer::train::run(
        task,
        Run {
            partition_dir: part_dir.to_path_buf(),
            manifest: manifest.clone(),
            out: out.to_path_buf(),
            config,
            device: setting.device,
            progress: setting.progress,
        },
    )?;
    match outcome {
        ddm_trainer::train::Outcome::Finished { .. } => Ok(()),
        ddm_trainer::train::Outcome::Interrupted { step } => {
            bail!(
                "interrupted at step {step} of {}; rerun the same command to resume",
                out.display()
            )
        }
    }
}

/// Train every model of the setting to stage `s` and register the stage's snapshots.
fn train_stage(
    setting: &Setting,
    dir: &Path,
    s: u64,
    manifests: &BTreeMap<&'static str, PartitionManifest>,
) -> anyhow::Result<()> {
    let pct = stage_pct(s, setting.stages);
    let steps = setting.expert.steps * s / setting.stages;
    let router_steps = setting.router.steps * s / setting.stages;
    let train = dir.join("train");
    let k = setting.k;
    let monolith = train.join("monolith");
    eprintln!(
        "== {}: stage {pct}% (expert steps {steps}, router steps {router_steps})",
        setting.name
    );
    let clustered = dir.join("partition-clustered");
    train_to(
        setting,
        &ExpertTask {
            target: Target::Monolith,
        },
        &clustered,
        &manifests["clustered"],
        &monolith,
        TrainConfig {
            steps,
            ..setting.expert.clone()
        },
    )?;
    for which in PARTITIONS {
        let part = dir.join(format!("partition-{which}"));
        let mut runs = vec![];
        for c in 0..k {
            let out = train.join(format!("{which}-expert-{c}"));
            train_to(
                setting,
                &ExpertTask {
                    target: Target::Cluster(c),
                },
                &part,
                &manifests[which],
                &out,
                TrainConfig {
                    steps,
                    batch_size: (setting.expert.batch_size / k).max(1),
                    ..setting.expert.clone()
                },
            )?;
            runs.push(out);
        }
        let rout = train.join(format!("{which}-router"));
        train_to(
            setting,
            &RouterTask {
                k,
                expert_model: setting.expert.model.clone(),
                eval_samples: 1000,
            },
            &part,
            &manifests[which],
            &rout,
            TrainConfig {
                steps: router_steps,
                ..setting.router.clone()
            },
        )?;
        // This stage's snapshot: a registry of its own.
        let reg = dir.join(format!("registry/{which}-{pct}"));
        let mut files: Vec<PathBuf> = runs.iter().map(|r| r.join(EXPERT_FILE)).collect();
        files.push(rout.join(ROUTER_FILE));
        registry::register(&reg, &files, Some(&manifests[which]), true)?;
    }
    let snap = dir.join(format!("registry/monolith-{pct}.safetensors"));
    std::fs::create_dir_all(snap.parent().unwrap())?;
    let tmp = snap.with_extension("tmp");
    std::fs::copy(monolith.join(EXPERT_FILE), &tmp)?;
    std::fs::rename(&tmp, &snap)?;
    Ok(())
}

/// Whether stage `pct` was trained and registered already (a resumed experiment then only
/// evaluates; the training runs may have moved on to later stages since).
fn stage_snapshot_complete(dir: &Path, pct: u32, k: usize) -> anyhow::Result<bool> {
    if !dir.join(format!("registry/monolith-{pct}.safetensors")).exists() {
        return Ok(false);
    }
    for which in PARTITIONS {
        match registry::read_index(&dir.join(format!("registry/{which}-{pct}")))? {
            Some(i) if i.experts.len() == k && i.router.is_some() => {}
            _ => return Ok(false),
        }
    }
    Ok(true)
}

/// Integrate N samples from the seeded noise with `field`; returns them and the seconds taken.
fn integrate(
    field: &dyn VelocityField<2>,
    setting: &Setting,
    shape: &[usize],
    device: &Device,
) -> (Vec<f32>, f64) {
    let per: usize = shape.iter().product();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(setting.seed);
    let x1 = flow::randn(vec![setting.n, per], &mut rng).to_tensor::<2>(device);
    let times = StepSchedule::Uniform.times(setting.sample_steps);
    let t0 = Instant::now();
    let x0 = HostTensor::from_tensor(flow::integrate(field, x1, None, &times, Solver::Euler));
    (x0.data, t0.elapsed().as_secs_f64())
}

fn write_grid(path: &Path, x: &[f32], shape: &[usize]) -> anyhow::Result<()> {
    if shape.len() != 3 || !(shape[0] == 1 || shape[0] == 3) {
        return Ok(());
    }
    let per: usize = shape.iter().product();
    let shown = &x[..(100 * per).min(x.len())];
    let px = ddm_datasets::grid::to_u8(shown);
    let cells: Vec<Option<&[u8]>> = px.chunks(per).map(Some).collect();
    std::fs::create_dir_all(path.parent().unwrap())?;
    ddm_datasets::grid::write_grid_png(path, &cells, [shape[0], shape[1], shape[2]], 10, 2, 40)?;
    Ok(())
}

fn judge(
    j: &Judge,
    field: &dyn VelocityField<2>,
    x: &[f32],
    seed: u64,
    device: &Device,
) -> anyhow::Result<(Option<ImageReport>, Option<MixtureReport>)> {
    Ok(match j {
        Judge::Images(e) => (Some(e.evaluate(x, seed)?), None),
        Judge::Mixture(g) => (None, Some(crate::mixture::evaluate(field, x, g, seed, device))),
    })
}

/// Sample and score one system at one stage.
fn evaluate_system(
    setting: &Setting,
    dir: &Path,
    pct: u32,
    sys: &System,
    judge_with: &Judge,
) -> anyhow::Result<Row> {
    let device = ddm_core::device::device(setting.device)?;
    let samples_png = dir.join(format!("samples/{pct}/{}.png", sys.name.replace(' ', "_")));
    let Some(which) = sys.partition else {
        let path = dir.join(format!("registry/monolith-{pct}.safetensors"));
        let (meta, model) = ddm_core::checkpoint::load(&path, &device)?;
        let (x, secs) = integrate(&model, setting, &meta.data.shape, &device);
        write_grid(&samples_png, &x, &meta.data.shape)?;
        let (images, mixture) = judge(judge_with, &model, &x, setting.seed, &device)?;
        return Ok(Row {
            setting: setting.name.clone(),
            stage_pct: pct,
            system: sys.name.clone(),
            train_flops: meta.training.as_ref().map(|t| t.flops).unwrap_or(0.0),
            sample_gflops: setting.sample_steps as f64 * meta.model.flops_per_sample() / 1e9,
            sample_seconds: secs / setting.n as f64,
            images,
            mixture,
        });
    };
    let reg = Registry::open(&dir.join(format!("registry/{which}-{pct}")))?;
    let k = reg.index.k;
    let strategy = sys.strategy.expect("an ensemble has a strategy");
    let experts: Vec<ExpertSlot> = (0..k)
        .map(|c| {
            let (reg, device) = (&reg, device.clone());
            ExpertSlot::lazy(move || reg.expert(c, &device))
        })
        .collect();
    let router_entry = reg
        .index
        .router
        .as_ref()
        .context("the stage registry has no router")?;
    let router_ckpt = Checkpoint::read(&router_entry.blob(&reg.dir))?;
    let router_flops = router_ckpt.meta.model.flops_per_sample();
    let mut train_flops = router_ckpt.meta.training.as_ref().map(|t| t.flops).unwrap_or(0.0);
    let mut expert_flops = 0.0;
    for e in reg.index.experts.values() {
        let c = Checkpoint::read(&e.blob(&reg.dir))?;
        train_flops += c.meta.training.as_ref().map(|t| t.flops).unwrap_or(0.0);
        expert_flops = c.meta.model.flops_per_sample();
    }
    let router: Option<Box<dyn Posterior>> = if sys.analytic {
        Some(Box::new(reg.analytic_router()?))
    } else {
        Some(Box::new(LearnedRouter {
            net: reg.router(&device)?,
            k,
        }))
    };
    let ensemble = Ensemble::new(experts, router, strategy, setting.seed)?;
    let shape = reg.index.data.shape.clone();
    let (x, secs) = integrate(&ensemble, setting, &shape, &device);
    if let Some(e) = ensemble.take_error() {
        return Err(e);
    }
    let rows: usize = ensemble
        .usage
        .borrow()
        .iter()
        .map(|u| u.rows_per_expert.iter().sum::<usize>())
        .sum();
    // The analytic router's cost is a few dot products per cluster: not counted.
    let router_cost = if sys.analytic || !strategy.uses_router() {
        0.0
    } else {
        setting.sample_steps as f64 * router_flops
    };
    let sample_gflops = (rows as f64 / setting.n as f64 * expert_flops + router_cost) / 1e9;
    write_grid(&samples_png, &x, &shape)?;
    let (images, mixture) = judge(judge_with, &ensemble, &x, setting.seed, &device)?;
    Ok(Row {
        setting: setting.name.clone(),
        stage_pct: pct,
        system: sys.name.clone(),
        train_flops,
        sample_gflops,
        sample_seconds: secs / setting.n as f64,
        images,
        mixture,
    })
}

pub fn read_rows(path: &Path) -> anyhow::Result<Vec<Row>> {
    if !path.exists() {
        return Ok(vec![]);
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l)
                .with_context(|| format!("{} line {}: not a result row", path.display(), i + 1))
        })
        .collect()
}

fn append_row(path: &Path, row: &Row) -> anyhow::Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    writeln!(f, "{}", serde_json::to_string(row)?)?;
    f.sync_all()?;
    Ok(())
}

/// Run (or resume) the experiment for one setting; returns every row.
pub fn run(setting: &Setting, dir: &Path, data: &Dataset, judge_with: &Judge) -> anyhow::Result<Vec<Row>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let t0 = Instant::now();
    let mut manifests = BTreeMap::new();
    for which in PARTITIONS {
        manifests.insert(which, ensure_partition(setting, dir, which, data)?);
    }
    let results = dir.join("results.jsonl");
    let mut rows = read_rows(&results)?;
    let systems = systems(setting.threshold);
    for s in 1..=setting.stages {
        let pct = stage_pct(s, setting.stages);
        let done = |name: &str, rows: &[Row]| rows.iter().any(|r| r.stage_pct == pct && r.system == name);
        if systems.iter().all(|sys| done(&sys.name, &rows)) {
            continue;
        }
        if !stage_snapshot_complete(dir, pct, setting.k)? {
            train_stage(setting, dir, s, &manifests)?;
        }
        for sys in &systems {
            if done(&sys.name, &rows) {
                continue;
            }
            let t0 = Instant::now();
            let row = evaluate_system(setting, dir, pct, sys, judge_with)
                .with_context(|| format!("evaluating {} at {pct}%", sys.name))?;
            eprintln!(
                "   {pct:>3}% {:<28} {}  ({:.0} s)",
                sys.name,
                crate::report::headline(&row),
                t0.elapsed().as_secs_f64()
            );
            append_row(&results, &row)?;
            rows.push(row);
        }
    }
    add_wall_seconds(dir, t0.elapsed().as_secs_f64())?;
    Ok(rows)
}

const WALL_FILE: &str = "wall-seconds.txt";

/// Seconds spent in [`run`] on this setting, over every invocation (a resumed run adds its own).
pub fn wall_seconds(dir: &Path) -> f64 {
    std::fs::read_to_string(dir.join(WALL_FILE))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0.0)
}

fn add_wall_seconds(dir: &Path, seconds: f64) -> anyhow::Result<()> {
    let total = wall_seconds(dir) + seconds;
    ddm_core::fsio::write_bytes_atomic(&dir.join(WALL_FILE), format!("{total:.6}\n").as_bytes())?;
    Ok(())
}

/// The default clustering of `ddm partition` (PCA-64 features, k-means++), or raw features for
/// low-dimensional vectors.
pub fn default_clustering(k: usize, data: &Dataset, seed: u64) -> PartitionConfig {
    PartitionConfig {
        k,
        features: if data.sample_size() > 64 {
            FeatureMethod::Pca { dims: 64 }
        } else {
            FeatureMethod::Raw
        },
        distance: Distance::L2,
        algorithm: Algorithm::Kmeans {
            max_iter: 100,
            n_init: 1,
            batch_size: None,
            balanced: false,
        },
        seed,
    }
}

/// The expert network's forward FLOPs per sample, for reports.
pub fn expert_flops(config: &TrainConfig, data: &Dataset) -> anyhow::Result<f64> {
    let m: ModelConfig = ddm_trainer::train::model_config(config, data)?;
    Ok(m.flops_per_sample())
}

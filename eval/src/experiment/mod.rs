//! `ddm experiment paper-table`: does the routed ensemble of isolated experts match a monolith
//! trained with the same FLOPs? (the paper's central claim, at a size this machine can run.)
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
//! A conditional setting (on the class, or on captions: [`text`](mod@text)) trains the clustered
//! partition only, with a router that sees the condition and one that does not.
//!
//! [`stages`](mod@stages) trains, [`score`](mod@score) samples and judges.
//!
//! Staged training is exact: the learning rate is constant after warm-up and a resumed run
//! continues bit-identically, so the 25% checkpoint is the 25% point of the full run.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use ddm_core::device::DeviceChoice;
use ddm_core::flow::{Solver, StepSchedule};
use ddm_core::gmm::GaussianMixture;
use ddm_core::model::ModelConfig;
use ddm_datasets::Dataset;
use ddm_datasets::features::{Distance, FeatureMethod};
use ddm_datasets::partition::{Algorithm, PartitionConfig};
use ddm_ensemble::strategy::Strategy;
use ddm_trainer::config::TrainConfig;
use serde::{Deserialize, Serialize};

use crate::images::{ImageEval, ImageReport};
use crate::mixture::MixtureReport;

mod score;
mod stages;
pub mod text;

pub use score::read_rows;
use score::{append_row, evaluate_system};
use stages::{ensure_partition, stage_snapshot_complete, train_stage};

/// The two partitions the unconditional experiment compares.
pub const PARTITIONS: [&str; 2] = ["clustered", "random"];

/// A conditional setting: experts, monolith and one router see the condition; samples are
/// class-balanced (sample i of class i mod C).
#[derive(Debug, Clone)]
pub struct Conditional {
    pub classes: usize,
    /// The guided rows' classifier-free guidance scale (the others use 1).
    pub guidance: f64,
    /// Text-conditional: the condition is each image's caption (the pooled vectors in the data's
    /// `cond`), and sample i reads prompt i. None: the condition is the class.
    pub text: Option<Arc<text::Prompts>>,
}

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
    /// How every system integrates its samples.
    pub solver: Solver,
    pub schedule: StepSchedule,
    pub threshold: f64,
    pub device: DeviceChoice,
    pub seed: u64,
    pub progress: bool,
    /// Conditional (on the class or on text): only the clustered partition, a conditioned router
    /// (registry `clustered`) and an unconditioned one (registry `clustered-plain`, same experts).
    pub conditional: Option<Conditional>,
}

impl Setting {
    /// The text setting's prompts, if it is one.
    pub fn prompts(&self) -> Option<&text::Prompts> {
        self.conditional.as_ref()?.text.as_deref()
    }

    /// The partitions trained.
    pub fn partitions(&self) -> &'static [&'static str] {
        match self.conditional {
            None => &PARTITIONS,
            Some(_) => &["clustered"],
        }
    }

    /// The registries of each stage (`registry/<name>-<pct>`).
    pub fn registries(&self) -> &'static [&'static str] {
        match self.conditional {
            None => &PARTITIONS,
            Some(_) => &["clustered", "clustered-plain"],
        }
    }
}

/// A system being compared: the monolith, or an ensemble strategy on one partition.
#[derive(Debug, Clone, PartialEq)]
pub struct System {
    pub name: String,
    /// None: the monolith.
    pub partition: Option<&'static str>,
    pub strategy: Option<Strategy>,
    pub analytic: bool,
    /// Classifier-free guidance scale (class-conditional settings; 1: none).
    pub guidance: f64,
}

/// The systems of a setting, in table order.
pub fn systems(setting: &Setting) -> Vec<System> {
    let ens = |name: &str, partition, strategy: &str, analytic| System {
        name: name.to_string(),
        partition: Some(partition),
        strategy: Some(strategy.parse().expect("known strategy")),
        analytic,
        guidance: 1.0,
    };
    let monolith = System {
        name: "monolith".into(),
        partition: None,
        strategy: None,
        analytic: false,
        guidance: 1.0,
    };
    let threshold = setting.threshold;
    // The unconditional and class-conditional settings compare these, in this order, after the
    // monolith.
    let mut systems = vec![
        monolith.clone(),
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
        ens("clustered trajectory", "clustered", "trajectory", false),
    ];
    match &setting.conditional {
        Some(c) if c.text.is_some() => {
            // The rows: top-1, trajectory and full, a router with and without the text,
            // guidance 1 and one guided scale.
            let g = c.guidance;
            let guided = |s: System| System {
                name: format!("{}, guidance {g}", s.name),
                guidance: g,
                ..s
            };
            let top1 = ens("clustered top-1", "clustered", "top-1", false);
            let trajectory = ens("clustered trajectory", "clustered", "trajectory", false);
            systems = vec![
                monolith.clone(),
                top1.clone(),
                trajectory.clone(),
                ens("clustered full", "clustered", "full", false),
                ens(
                    "clustered top-1, router without text",
                    "clustered-plain",
                    "top-1",
                    false,
                ),
                ens(
                    "clustered trajectory, router without text",
                    "clustered-plain",
                    "trajectory",
                    false,
                ),
                guided(monolith),
                guided(top1),
                guided(trajectory),
            ];
        }
        Some(c) => {
            let g = c.guidance;
            let guided = |s: System| System {
                name: format!("{}, guidance {g}", s.name),
                guidance: g,
                ..s
            };
            systems.extend([
                ens(
                    "clustered top-1, router without c",
                    "clustered-plain",
                    "top-1",
                    false,
                ),
                ens(
                    "clustered trajectory, router without c",
                    "clustered-plain",
                    "trajectory",
                    false,
                ),
                ens(
                    "clustered trajectory, analytic router",
                    "clustered",
                    "trajectory",
                    true,
                ),
                guided(monolith),
                guided(ens("clustered top-1", "clustered", "top-1", false)),
                guided(ens("clustered trajectory", "clustered", "trajectory", false)),
            ]);
        }
        None => systems.extend([
            ens("clustered top-1 analytic", "clustered", "top-1", true),
            ens("random top-1", "random", "top-1", false),
        ]),
    }
    systems
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
    /// The text setting's prompt adherence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adherence: Option<text::Adherence>,
}

impl Row {
    /// The score a row is ranked by: FD (images) or energy distance (mixtures).
    pub fn score(&self) -> f64 {
        match (&self.images, &self.mixture) {
            (Some(i), _) => i.fd,
            (_, Some(m)) => m.energy_distance,
            _ => f64::NAN,
        }
    }

    /// One line of the row's main scores, for logs.
    pub fn headline(&self) -> String {
        match (&self.images, &self.mixture) {
            (Some(i), _) => format!(
                "FD {:>7.3}  P {:.3}  R {:.3}  cls-TV {:.3}",
                i.fd, i.precision, i.recall, i.class_tv
            ),
            (_, Some(m)) => format!(
                "vel-MSE {:.4}  energy {:.4}  mode-TV {:.3}",
                m.velocity_mse, m.energy_distance, m.mode_weight_tv
            ),
            _ => String::new(),
        }
    }
}

/// How samples are judged.
pub enum Judge {
    Images(Box<ImageEval>),
    Mixture(GaussianMixture),
}

fn stage_pct(s: u64, stages: u64) -> u32 {
    (100 * s / stages) as u32
}

/// Run (or resume) the experiment for one setting; returns every row.
pub fn run(setting: &Setting, dir: &Path, data: &Dataset, judge_with: &Judge) -> anyhow::Result<Vec<Row>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    check_sampling(setting, dir)?;
    let t0 = Instant::now();
    let mut partitions = BTreeMap::new();
    for &which in setting.partitions() {
        partitions.insert(which, ensure_partition(setting, dir, which, data)?);
    }
    let results = dir.join("results.jsonl");
    let mut rows = read_rows(&results)?;
    let systems = systems(setting);
    for s in 1..=setting.stages {
        let pct = stage_pct(s, setting.stages);
        let done = |name: &str, rows: &[Row]| rows.iter().any(|r| r.stage_pct == pct && r.system == name);
        if systems.iter().all(|sys| done(&sys.name, &rows)) {
            continue;
        }
        if !stage_snapshot_complete(setting, dir, pct)? {
            train_stage(setting, dir, s, &partitions)?;
        }
        for sys in &systems {
            if done(&sys.name, &rows) {
                continue;
            }
            let t0 = Instant::now();
            let row = evaluate_system(setting, dir, pct, sys, judge_with)
                .with_context(|| format!("evaluating {} at {pct}%", sys.name))?;
            tracing::info!(
                "{pct:>3}% {:<28} {}  ({:.0} s)",
                sys.name,
                row.headline(),
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
const SAMPLING_FILE: &str = "sampling.txt";

/// The run's rows are all sampled one way: the first run records its solver and schedule, and a
/// resumed run must use the same (a run from before the file existed used Euler, uniform).
fn check_sampling(setting: &Setting, dir: &Path) -> anyhow::Result<()> {
    let this = format!("{} {}", setting.solver.name(), setting.schedule);
    let path = dir.join(SAMPLING_FILE);
    let recorded = match std::fs::read_to_string(&path) {
        Ok(s) => s.trim().to_string(),
        Err(_) if dir.join("results.jsonl").exists() => "euler uniform".into(),
        Err(_) => {
            ddm_core::fsio::write_bytes_atomic(&path, format!("{this}\n").as_bytes())?;
            return Ok(());
        }
    };
    if recorded != this {
        anyhow::bail!(
            "{} was sampled with `{recorded}` (solver, schedule); this run asks for `{this}`: use another --out, or the same --solver and --schedule",
            dir.display()
        );
    }
    Ok(())
}

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
    let m: ModelConfig = ddm_trainer::expert::model_config(config, data)?;
    Ok(m.flops_per_sample())
}

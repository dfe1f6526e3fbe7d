//! Training side of the experiment: the two partitions, and every model trained stage by stage
//! (each stage resumes the runs of the last), with a registry snapshot per stage.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::bail;
use ddm_datasets::Dataset;
use ddm_datasets::partition::{self, Algorithm, Partition, PartitionConfig};
use ddm_ensemble::registry;
use ddm_router::net::RouterInputs;
use ddm_trainer::config::TrainConfig;
use ddm_trainer::expert::{EXPERT_FILE, ExpertTask};
use ddm_trainer::island::Target;
use ddm_trainer::router::{ROUTER_FILE, RouterTask};
use ddm_trainer::train::Run;

use super::{Setting, stage_pct};

/// The partition directory for `which`, made if missing.
pub(super) fn ensure_partition(
    setting: &Setting,
    dir: &Path,
    which: &str,
    data: &Dataset,
) -> anyhow::Result<Partition> {
    let out = dir.join(format!("partition-{which}"));
    if out.join(partition::MANIFEST).exists() {
        return Ok(Partition::open(&out)?);
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
    partition::write(&out, data, &config, &c, t0.elapsed().as_secs_f64(), false)?;
    tracing::info!("{which} partition:\n{}", partition::describe(&out, None, 0)?);
    Ok(Partition::open(&out)?)
}

pub(super) fn train_to(
    setting: &Setting,
    task: &impl ddm_trainer::task::Task,
    out: &Path,
    config: TrainConfig,
) -> anyhow::Result<()> {
    let outcome = ddm_trainer::train::run(
        task,
        Run {
            out: out.to_path_buf(),
            config,
            devices: setting.device.into(),
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
pub(super) fn train_stage(
    setting: &Setting,
    dir: &Path,
    s: u64,
    partitions: &BTreeMap<&'static str, Partition>,
) -> anyhow::Result<()> {
    let pct = stage_pct(s, setting.stages);
    let steps = setting.expert.steps * s / setting.stages;
    let router_steps = setting.router.steps * s / setting.stages;
    let train = dir.join("train");
    let k = setting.k;
    let monolith = train.join("monolith");
    tracing::info!(
        "== {}: stage {pct}% (expert steps {steps}, router steps {router_steps})",
        setting.name
    );
    train_to(
        setting,
        &ExpertTask {
            partition: partitions["clustered"].clone(),
            target: Target::Monolith,
            objective: setting.expert.objective,
        },
        &monolith,
        TrainConfig {
            steps,
            ..setting.expert.clone()
        },
    )?;
    for &which in setting.partitions() {
        let mut runs = vec![];
        for c in 0..k {
            let out = train.join(format!("{which}-expert-{c}"));
            train_to(
                setting,
                &ExpertTask {
                    partition: partitions[which].clone(),
                    target: Target::Cluster(c),
                    objective: setting.expert.objective,
                },
                &out,
                TrainConfig {
                    steps,
                    batch_size: (setting.expert.batch_size / k).max(1),
                    ..setting.expert.clone()
                },
            )?;
            runs.push(out);
        }
        // The router (conditioned on the class or the text in a conditional setting), and there
        // also one without it, registered beside the same experts as `<which>-plain`.
        let mut routers = vec![(which.to_string(), setting.conditional.is_some())];
        if setting.conditional.is_some() {
            routers.push((format!("{which}-plain"), false));
        }
        let text_dim = setting.prompts().map(|p| p.vectors.shape[1]);
        for (name, conditioned) in routers {
            let rout = train.join(format!("{name}-router"));
            train_to(
                setting,
                &RouterTask {
                    partition: partitions[which].clone(),
                    expert_model: setting.expert.model.clone(),
                    eval_samples: 1000,
                    inputs: RouterInputs {
                        vector: text_dim.filter(|_| conditioned),
                        tokens: None,
                    },
                },
                &rout,
                TrainConfig {
                    steps: router_steps,
                    class_conditional: conditioned && text_dim.is_none(),
                    ..setting.router.clone()
                },
            )?;
            // This stage's snapshot: a registry of its own.
            let reg = dir.join(format!("registry/{name}-{pct}"));
            let mut files: Vec<PathBuf> = runs.iter().map(|r| r.join(EXPERT_FILE)).collect();
            files.push(rout.join(ROUTER_FILE));
            registry::register(&reg, &files, Some(partitions[which].manifest()), true)?;
        }
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
pub(super) fn stage_snapshot_complete(setting: &Setting, dir: &Path, pct: u32) -> anyhow::Result<bool> {
    let k = setting.k;
    if !dir.join(format!("registry/monolith-{pct}.safetensors")).exists() {
        return Ok(false);
    }
    for which in setting.registries() {
        match registry::read_index(&dir.join(format!("registry/{which}-{pct}")))? {
            Some(i) if i.experts.len() == k && i.router.is_some() => {}
            _ => return Ok(false),
        }
    }
    Ok(true)
}

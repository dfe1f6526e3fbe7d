//! `ddm launch slurm|k8s`: the job files that start K islands (one per cluster) and the router on
//! a scheduler. Each island is `ddm-trainer` with its cluster from the scheduler's array index
//! (`SLURM_ARRAY_TASK_ID`, `JOB_COMPLETION_INDEX`), resumable, and registers its own expert when
//! it finishes (`--register`).

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use ddm_ensemble::registry::Location;

/// Write (and with --submit, submit) the jobs that train every island of a partition and its
/// router on a scheduler.
#[derive(Args, Debug)]
#[command(after_help = EXAMPLES)]
pub struct LaunchArgs {
    #[command(subcommand)]
    pub scheduler: Scheduler,
}

const EXAMPLES: &str = "Examples:
  ddm launch slurm --partition /shared/part --out /shared/run --registry s3://experts/run-1 --time 12:00:00 --gpus-per-task 1 --submit -- --model DiT-S/2 --steps 200000 --device wgpu
  ddm launch k8s --partition /data/part --out /data/run --image registry.example/ddm:0.1 --pvc ddm-data --registry s3://experts/run-1 -- --model DiT-S/2
  kubectl apply -f /data/run/launch/";

#[derive(Subcommand, Debug)]
pub enum Scheduler {
    /// An sbatch array script (one island per array task; requeued near the time limit after
    /// saving) and a router job that runs after every island succeeded.
    Slurm(SlurmArgs),
    /// An Indexed Job (one island per completion index) and a router Job, as JSON manifests for
    /// `kubectl apply -f OUT/launch/`.
    K8s(K8sArgs),
}

/// What every scheduler needs.
#[derive(Args, Debug)]
pub struct Common {
    /// The partition directory, as the jobs see it (a shared filesystem or volume).
    #[arg(long)]
    pub partition: PathBuf,
    /// Where the islands write (OUT/expert-K, OUT/router) and the job files go (OUT/launch).
    #[arg(long)]
    pub out: PathBuf,
    /// Each island registers its expert here when it finishes, and the router job the router:
    /// a directory on a shared filesystem, or s3:// gs:// az://.
    #[arg(long)]
    pub registry: Option<String>,
    /// No router job.
    #[arg(long)]
    pub no_router: bool,
    /// Flags for `ddm train-router` (one string, split as a shell would), e.g. "--steps 4000".
    #[arg(long, default_value = "", allow_hyphen_values = true)]
    pub router_flags: String,
    /// Flags for every island's `ddm-trainer` (after `--`), e.g. `-- --model DiT-S/2 --steps 20000`.
    #[arg(last = true)]
    pub trainer_flags: Vec<String>,
}

#[derive(Args, Debug)]
pub struct SlurmArgs {
    #[command(flatten)]
    pub common: Common,
    /// Wall-clock limit of each island's run (sbatch --time); an island saves and requeues itself
    /// --grace seconds before it.
    #[arg(long)]
    pub time: Option<String>,
    /// Seconds before the time limit at which an island is told to save and requeue.
    #[arg(long, default_value_t = 300)]
    pub grace: u32,
    /// sbatch --partition (Slurm's partition: a queue, not ddm's).
    #[arg(long)]
    pub slurm_partition: Option<String>,
    #[arg(long)]
    pub account: Option<String>,
    #[arg(long)]
    pub cpus_per_task: Option<u32>,
    #[arg(long)]
    pub gpus_per_task: Option<u32>,
    /// sbatch --mem (e.g. 16G).
    #[arg(long)]
    pub mem: Option<String>,
    /// Islands running at once (sbatch --array=0-K%N).
    #[arg(long)]
    pub max_running: Option<usize>,
    /// Directory of the `ddm` and `ddm-trainer` binaries on the compute nodes (default: this
    /// ddm's own directory, if ddm-trainer is beside it; else whatever PATH finds there).
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// Submit with sbatch (the router with --dependency=afterok on the islands' array).
    #[arg(long)]
    pub submit: bool,
    /// Print what was written and submitted as one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct K8sArgs {
    #[command(flatten)]
    pub common: Common,
    /// The container image with `ddm` and `ddm-trainer` on its PATH.
    #[arg(long)]
    pub image: String,
    /// A PersistentVolumeClaim holding the partition and the outputs, mounted at --mount.
    #[arg(long)]
    pub pvc: Option<String>,
    #[arg(long, default_value = "/data")]
    pub mount: PathBuf,
    /// Islands running at once (default: all K).
    #[arg(long)]
    pub parallelism: Option<usize>,
    /// Kubernetes resources.limits for each island, e.g. `nvidia.com/gpu=1,cpu=8,memory=32Gi`.
    #[arg(long, value_delimiter = ',')]
    pub limits: Vec<String>,
    /// A Secret whose keys become environment variables (e.g. AWS_ACCESS_KEY_ID for an s3:// registry).
    #[arg(long)]
    pub env_secret: Option<String>,
    /// The Jobs' name prefix.
    #[arg(long, default_value = "ddm")]
    pub name: String,
}

pub fn run(args: LaunchArgs) -> anyhow::Result<()> {
    match args.scheduler {
        Scheduler::Slurm(a) => slurm(a),
        Scheduler::K8s(a) => k8s(a),
    }
}

/// K from the partition's manifest; the registry string checked as `--registry` would be.
fn prepare(c: &Common) -> anyhow::Result<usize> {
    let manifest = ddm_datasets::partition::read_manifest(&c.partition)?;
    if let Some(r) = &c.registry {
        r.parse::<Location>()
            .map_err(|e| anyhow::anyhow!("--registry {r}: {e}"))?;
    }
    for f in &c.trainer_flags {
        if ["--cluster", "--monolith", "--out", "--partition", "--register"].contains(&f.as_str()) {
            bail!("{f}: set by the launcher for each island; leave it out of the trainer flags");
        }
    }
    shlex::split(&c.router_flags)
        .with_context(|| format!("--router-flags {:?}: unbalanced quotes", c.router_flags))?;
    Ok(manifest.k)
}

/// One shell word.
fn q(s: &str) -> String {
    shlex::try_quote(s)
        .map(|c| c.into_owned())
        .unwrap_or_else(|_| s.replace('\0', ""))
}

fn qp(p: &Path) -> String {
    q(&p.display().to_string())
}

fn absolute(p: &Path) -> anyhow::Result<PathBuf> {
    std::path::absolute(p).with_context(|| format!("{}: cannot make it absolute", p.display()))
}

fn slurm(a: SlurmArgs) -> anyhow::Result<()> {
    let k = prepare(&a.common)?;
    let partition = absolute(&a.common.partition)?;
    let out = absolute(&a.common.out)?;
    let registry = match &a.common.registry {
        // A directory registry is named absolutely (jobs run elsewhere); URLs as given.
        Some(r) if !r.contains("://") => Some(absolute(Path::new(r))?.display().to_string()),
        r => r.clone(),
    };
    let bin = |name: &str| -> String {
        let dir = a.bin_dir.clone().or_else(|| {
            let me = std::env::current_exe().ok()?;
            let dir = me.parent()?.to_path_buf();
            dir.join("ddm-trainer").exists().then_some(dir)
        });
        match dir {
            Some(d) => qp(&d.join(name)),
            None => name.to_string(),
        }
    };
    let launch = out.join("launch");
    let logs = out.join("logs");
    for d in [&launch, &logs] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }

    let mut head = vec![];
    if let Some(t) = &a.time {
        head.push(format!("#SBATCH --time={t}"));
    }
    for (flag, v) in [
        ("partition", a.slurm_partition.clone()),
        ("account", a.account.clone()),
        ("cpus-per-task", a.cpus_per_task.map(|v| v.to_string())),
        ("gpus-per-task", a.gpus_per_task.map(|v| v.to_string())),
        ("mem", a.mem.clone()),
    ] {
        if let Some(v) = v {
            head.push(format!("#SBATCH --{flag}={v}"));
        }
    }
    let head = head.join("\n");
    let array = match a.max_running {
        Some(n) => format!("0-{}%{n}", k - 1),
        None => format!("0-{}", k - 1),
    };
    let register = registry
        .as_ref()
        .map(|r| format!(" --register {}", q(r)))
        .unwrap_or_default();
    let flags: String = a
        .common
        .trainer_flags
        .iter()
        .map(|f| format!(" {}", q(f)))
        .collect();
    let islands = format!(
        r#"#!/bin/bash
# Written by `ddm launch slurm` (ddm {version}): the {k} islands of {partition} as one array job,
# one island per array task (its cluster is SLURM_ARRAY_TASK_ID). An island resumes from its last
# state whenever it (re)starts. {grace} s before the time limit Slurm sends USR1: the island saves
# and the task requeues itself; on any other stop (scancel, preemption) it saves and exits with 3.
#SBATCH --job-name=ddm-islands
#SBATCH --array={array}
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@{grace}
#SBATCH --output={logs}/island-%a.out
{head}
set -u
near_limit=0
trap 'near_limit=1; kill -TERM "$pid" 2>/dev/null' USR1
trap 'kill -TERM "$pid" 2>/dev/null' TERM
{trainer} --partition {partition} --out {out}/expert-"$SLURM_ARRAY_TASK_ID" --quiet{register}{flags} &
pid=$!
# `wait` returns early when a trap runs: wait until the island has really exited.
while true; do
  wait "$pid"; status=$?
  kill -0 "$pid" 2>/dev/null || break
done
if [ "$status" -eq 3 ] && [ "$near_limit" -eq 1 ]; then
  echo "island $SLURM_ARRAY_TASK_ID: state saved before the time limit; requeueing"
  scontrol requeue "${{SLURM_ARRAY_JOB_ID}}_${{SLURM_ARRAY_TASK_ID}}"
fi
exit "$status"
"#,
        version = env!("CARGO_PKG_VERSION"),
        partition = qp(&partition),
        out = qp(&out),
        logs = qp(&logs),
        grace = a.grace,
        trainer = bin("ddm-trainer"),
    );
    let islands_path = launch.join("islands.sbatch");
    ddm_core::fsio::write_bytes_atomic(&islands_path, islands.as_bytes())?;

    let router_path = launch.join("router.sbatch");
    if !a.common.no_router {
        let router_flags: String = shlex::split(&a.common.router_flags)
            .unwrap_or_default()
            .iter()
            .map(|f| format!(" {}", q(f)))
            .collect();
        let register = match &registry {
            Some(r) => format!(
                "{} register --registry {} {}\n",
                bin("ddm"),
                q(r),
                qp(&out.join("router/router.safetensors"))
            ),
            None => String::new(),
        };
        let router = format!(
            r#"#!/bin/bash
# Written by `ddm launch slurm` (ddm {version}): the router of {partition}, after every island
# succeeded (submitted with --dependency=afterok on the islands' array). Resumable as an island is.
#SBATCH --job-name=ddm-router
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output={logs}/router.out
{head}
set -eu
{ddm} train-router --partition {partition} --out {out}/router --quiet{router_flags}
{register}"#,
            version = env!("CARGO_PKG_VERSION"),
            partition = qp(&partition),
            out = qp(&out),
            logs = qp(&logs),
            ddm = bin("ddm"),
        );
        ddm_core::fsio::write_bytes_atomic(&router_path, router.as_bytes())?;
    }

    let mut report = serde_json::json!({
        "islands_script": islands_path,
        "router_script": (!a.common.no_router).then_some(&router_path),
        "k": k,
    });
    if a.submit {
        let array_id = sbatch(&[], &islands_path)?;
        report["islands_job"] = array_id.clone().into();
        if !a.common.no_router {
            let dep = format!("--dependency=afterok:{array_id}");
            report["router_job"] = sbatch(&[&dep], &router_path)?.into();
        }
    }
    if a.json {
        println!("{report}");
    } else {
        println!("wrote {}", islands_path.display());
        if !a.common.no_router {
            println!("wrote {}", router_path.display());
        }
        match (&report["islands_job"], &report["router_job"]) {
            (serde_json::Value::String(i), r) => {
                println!("submitted the islands as array job {i} (tasks 0-{})", k - 1);
                if let serde_json::Value::String(r) = r {
                    println!("submitted the router as job {r} (after every island succeeded)");
                }
            }
            _ => println!(
                "submit with: jid=$(sbatch --parsable {}){}",
                islands_path.display(),
                if a.common.no_router {
                    String::new()
                } else {
                    format!(" && sbatch --dependency=afterok:$jid {}", router_path.display())
                }
            ),
        }
    }
    Ok(())
}

/// `sbatch --parsable [extra] script`; the job id.
fn sbatch(extra: &[&str], script: &Path) -> anyhow::Result<String> {
    let out = std::process::Command::new("sbatch")
        .arg("--parsable")
        .args(extra)
        .arg(script)
        .output()
        .context("running sbatch (is Slurm installed here?)")?;
    if !out.status.success() {
        bail!(
            "sbatch {} failed ({}): {}",
            script.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let id = String::from_utf8_lossy(&out.stdout);
    // --parsable prints `jobid` or `jobid;cluster`.
    Ok(id.trim().split(';').next().unwrap_or("").to_string())
}

fn k8s(a: K8sArgs) -> anyhow::Result<()> {
    let k = prepare(&a.common)?;
    let c = &a.common;
    let launch = c.out.join("launch");
    let partition = c.partition.display().to_string();
    let out = c.out.display().to_string();
    let mut limits = serde_json::Map::new();
    for l in &a.limits {
        let (key, v) = l
            .split_once('=')
            .with_context(|| format!("--limits {l}: expected NAME=QUANTITY, e.g. nvidia.com/gpu=1"))?;
        limits.insert(key.to_string(), v.into());
    }
    let volumes = match &a.pvc {
        Some(pvc) => serde_json::json!([{"name": "data", "persistentVolumeClaim": {"claimName": pvc}}]),
        None => serde_json::json!([]),
    };
    let mounts = match &a.pvc {
        Some(_) => serde_json::json!([{"name": "data", "mountPath": a.mount}]),
        None => serde_json::json!([]),
    };
    let env_from = match &a.env_secret {
        Some(s) => serde_json::json!([{"secretRef": {"name": s}}]),
        None => serde_json::json!([]),
    };
    let container = |name: &str, command: Vec<String>| {
        serde_json::json!({
            "name": name,
            "image": a.image,
            "command": command,
            "resources": {"limits": limits},
            "volumeMounts": mounts,
            "envFrom": env_from,
        })
    };
    // ddm-trainer takes its cluster from JOB_COMPLETION_INDEX, which Kubernetes sets in every pod
    // of an Indexed Job. The output folder names it through DDM_CLUSTER, set from the pod's
    // index annotation, as Kubernetes expands `$(VAR)` in a command only for variables in `env`.
    let mut island = vec![
        "ddm-trainer".to_string(),
        "--partition".into(),
        partition.clone(),
        "--out".into(),
        format!("{out}/expert-$(DDM_CLUSTER)"),
        "--quiet".into(),
    ];
    if let Some(r) = &c.registry {
        island.extend(["--register".into(), r.clone()]);
    }
    island.extend(c.trainer_flags.iter().cloned());
    let mut island = container("island", island);
    island["env"] = serde_json::json!([{"name": "DDM_CLUSTER", "valueFrom": {"fieldRef": {
        "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}}]);
    let islands = serde_json::json!({
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": format!("{}-islands", a.name), "labels": {"app.kubernetes.io/name": "ddm", "ddm/role": "island"}},
        "spec": {
            "completionMode": "Indexed",
            "completions": k,
            "parallelism": a.parallelism.unwrap_or(k).min(k),
            // A failed island retries (and resumes) without failing the others.
            "backoffLimitPerIndex": 6,
            "podFailurePolicy": {"rules": [
                // Status 3: interrupted with its state saved (SIGTERM on eviction or preemption); not a failure.
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
                // Status 2: a bad input or a diverged loss; retrying will not help.
                {"action": "FailIndex", "onExitCodes": {"containerName": "island", "operator": "In", "values": [2]}}
            ]},
            "template": {
                "metadata": {"labels": {"app.kubernetes.io/name": "ddm", "ddm/role": "island"}},
                "spec": {
                    "restartPolicy": "Never",
                    "terminationGracePeriodSeconds": 300,
                    "containers": [island],
                    "volumes": volumes,
                }
            }
        }
    });
    std::fs::create_dir_all(&launch).with_context(|| format!("creating {}", launch.display()))?;
    let islands_path = launch.join("islands-job.json");
    ddm_core::fsio::write_bytes_atomic(&islands_path, &serde_json::to_vec_pretty(&islands)?)?;
    println!("wrote {}", islands_path.display());
    if !c.no_router {
        let mut script = format!(
            "ddm train-router --partition {} --out {} --quiet",
            q(&partition),
            q(&format!("{out}/router"))
        );
        for f in shlex::split(&c.router_flags).unwrap_or_default() {
            script.push_str(&format!(" {}", q(&f)));
        }
        if let Some(r) = &c.registry {
            script.push_str(&format!(
                " && ddm register --registry {} {}",
                q(r),
                q(&format!("{out}/router/router.safetensors"))
            ));
        }
        let router = serde_json::json!({
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": format!("{}-router", a.name), "labels": {"app.kubernetes.io/name": "ddm", "ddm/role": "router"}},
            "spec": {
                "backoffLimit": 6,
                "template": {
                    "metadata": {"labels": {"app.kubernetes.io/name": "ddm", "ddm/role": "router"}},
                    "spec": {
                        "restartPolicy": "Never",
                        "terminationGracePeriodSeconds": 300,
                        // The router reads only the partition (never an expert): it needs no
                        // ordering against the islands.
                        "containers": [container("router", vec!["/bin/sh".into(), "-c".into(), script])],
                        "volumes": volumes,
                    }
                }
            }
        });
        let router_path = launch.join("router-job.json");
        ddm_core::fsio::write_bytes_atomic(&router_path, &serde_json::to_vec_pretty(&router)?)?;
        println!("wrote {}", router_path.display());
    }
    println!("apply with: kubectl apply -f {}", launch.display());
    Ok(())
}

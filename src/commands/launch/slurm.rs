//! `ddm launch slurm`: an sbatch array script for the islands and a script for the router.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

use super::quote::{self, sbatch_quoted, shell_word};
use super::{Checked, SlurmArgs};

/// The `#SBATCH` lines every job gets from the options (checked by their syntax, quoted).
fn directives(a: &SlurmArgs) -> anyhow::Result<String> {
    let mut lines = vec![];
    let mut add = |flag: &str, value: &str| lines.push(format!("#SBATCH --{flag}={}", sbatch_quoted(value)));
    if let Some(t) = &a.time {
        add("time", quote::slurm_time(t)?);
    }
    if let Some(p) = &a.slurm_partition {
        add("partition", quote::slurm_names("--slurm-partition", p, true)?);
    }
    if let Some(acc) = &a.account {
        add("account", quote::slurm_names("--account", acc, false)?);
    }
    if let Some(n) = a.cpus_per_task {
        add("cpus-per-task", &n.to_string());
    }
    if let Some(n) = a.gpus_per_task {
        add("gpus-per-task", &n.to_string());
    }
    if let Some(m) = &a.mem {
        add("mem", quote::slurm_memory(m)?);
    }
    Ok(lines.join("\n"))
}

/// Paths as the jobs name them, checked and quoted once.
struct Places {
    /// Shell words.
    partition: String,
    out: String,
    trainer: String,
    ddm: String,
    /// The logs directory, for `#SBATCH --output` (sbatch's quoting, `%` doubled).
    logs: String,
    registry: Option<String>,
    /// For the scripts' comments (no control characters).
    partition_text: String,
}

fn places(a: &SlurmArgs) -> anyhow::Result<(Places, PathBuf)> {
    let partition = absolute(&a.common.partition)?;
    let out = absolute(&a.common.out)?;
    let registry = match &a.common.registry {
        // A directory registry is named absolutely (jobs run elsewhere); URLs as given.
        Some(r) if !r.contains("://") => Some(absolute(Path::new(r))?.display().to_string()),
        r => r.clone(),
    };
    let bin_dir = match &a.bin_dir {
        Some(d) => Some(d.clone()),
        None => std::env::current_exe().ok().and_then(|me| {
            let dir = me.parent()?.to_path_buf();
            dir.join("ddm-trainer").exists().then_some(dir)
        }),
    };
    let bin = |name: &str| -> anyhow::Result<String> {
        match &bin_dir {
            Some(d) => shell_word("--bin-dir", quote::path("--bin-dir", &d.join(name))?),
            None => Ok(name.to_string()),
        }
    };
    let logs = out.join("logs");
    let p = Places {
        partition: shell_word("--partition", quote::path("--partition", &partition)?)?,
        out: shell_word("--out", quote::path("--out", &out)?)?,
        trainer: bin("ddm-trainer")?,
        ddm: bin("ddm")?,
        logs: quote::sbatch_file_name("--out", &logs)?,
        registry: registry
            .map(|r| shell_word("--registry", quote::no_control("--registry", &r)?))
            .transpose()?,
        partition_text: quote::path("--partition", &partition)?.to_string(),
    };
    Ok((p, out))
}

fn absolute(p: &Path) -> anyhow::Result<PathBuf> {
    std::path::absolute(p).with_context(|| format!("{}: cannot make it absolute", p.display()))
}

/// The islands' array script.
fn islands_script(a: &SlurmArgs, k: usize, p: &Places, head: &str) -> anyhow::Result<String> {
    let array = match a.max_running {
        Some(n) => format!("0-{}%{n}", k - 1),
        None => format!("0-{}", k - 1),
    };
    let register = p
        .registry
        .as_ref()
        .map(|r| format!(" --register {r}"))
        .unwrap_or_default();
    let mut flags = quote::shell_words("trainer flags", &a.common.trainer_flags)?;
    if !flags.is_empty() {
        flags.insert(0, ' ');
    }
    Ok(format!(
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
#SBATCH --output={output}
{head}
set -u
near_limit=0
trap 'near_limit=1; kill -TERM "$pid" 2>/dev/null' USR1
trap 'kill -TERM "$pid" 2>/dev/null' TERM
{trainer} --partition {partition_word} --out {out}/expert-"$SLURM_ARRAY_TASK_ID" --quiet{register}{flags} &
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
        partition = p.partition_text,
        partition_word = p.partition,
        out = p.out,
        output = sbatch_quoted(&format!("{}/island-%a.out", p.logs)),
        grace = a.grace,
        trainer = p.trainer,
    ))
}

/// The router's script: train it, then register it.
fn router_script(router_flags: &[String], p: &Places, head: &str) -> anyhow::Result<String> {
    let mut flags = quote::shell_words("--router-flags", router_flags)?;
    if !flags.is_empty() {
        flags.insert(0, ' ');
    }
    let register = match &p.registry {
        Some(r) => format!(
            "{} register --registry {r} {}/router/router.safetensors\n",
            p.ddm, p.out
        ),
        None => String::new(),
    };
    Ok(format!(
        r#"#!/bin/bash
# Written by `ddm launch slurm` (ddm {version}): the router of {partition}, after every island
# succeeded (submitted with --dependency=afterok on the islands' array). Resumable as an island is.
#SBATCH --job-name=ddm-router
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output={output}
{head}
set -eu
{ddm} train-router --partition {partition_word} --out {out}/router --quiet{flags}
{register}"#,
        version = env!("CARGO_PKG_VERSION"),
        partition = p.partition_text,
        partition_word = p.partition,
        out = p.out,
        output = sbatch_quoted(&format!("{}/router.out", p.logs)),
        ddm = p.ddm,
    ))
}

/// Write both scripts (and submit them with --submit); print what was done.
pub fn write(a: SlurmArgs) -> anyhow::Result<()> {
    let Checked { k, router_flags } = super::prepare(&a.common)?;
    let head = directives(&a)?;
    let (places, out) = places(&a)?;
    let launch = out.join("launch");
    for d in [&launch, &out.join("logs")] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let islands_path = launch.join("islands.sbatch");
    ddm_core::fsio::write_bytes_atomic(&islands_path, islands_script(&a, k, &places, &head)?.as_bytes())?;
    let router_path = launch.join("router.sbatch");
    if !a.common.no_router {
        let script = router_script(&router_flags, &places, &head)?;
        ddm_core::fsio::write_bytes_atomic(&router_path, script.as_bytes())?;
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
    match a.json {
        true => println!("{report}"),
        false => say(
            &report,
            k,
            &islands_path,
            (!a.common.no_router).then_some(&router_path),
        ),
    }
    Ok(())
}

/// What was written and submitted, or how to submit it.
fn say(report: &serde_json::Value, k: usize, islands: &Path, router: Option<&Path>) {
    println!("wrote {}", islands.display());
    if let Some(r) = router {
        println!("wrote {}", r.display());
    }
    match (&report["islands_job"], &report["router_job"]) {
        (serde_json::Value::String(i), r) => {
            println!("submitted the islands as array job {i} (tasks 0-{})", k - 1);
            if let serde_json::Value::String(r) = r {
                println!("submitted the router as job {r} (after every island succeeded)");
            }
        }
        _ => {
            let q = |p: &Path| {
                shlex::try_quote(&p.display().to_string())
                    .map(|c| c.into_owned())
                    .unwrap_or_default()
            };
            let router = router
                .map(|r| format!(" && sbatch --dependency=afterok:$jid {}", q(r)))
                .unwrap_or_default();
            println!("submit with: jid=$(sbatch --parsable {}){router}", q(islands));
        }
    }
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

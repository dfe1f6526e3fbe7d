//! `ddm launch k8s`: an Indexed Job for the islands and a Job for the router, as JSON manifests.

use anyhow::Context;
use serde_json::{Value, json};

use super::quote::{self, k8s_literal, shell_word};
use super::{Checked, K8sArgs};

/// The pod settings both Jobs share, checked as Kubernetes checks them.
struct Pod {
    image: String,
    limits: serde_json::Map<String, Value>,
    volumes: Value,
    mounts: Value,
    env_from: Value,
}

fn pod(a: &K8sArgs) -> anyhow::Result<Pod> {
    let mut limits = serde_json::Map::new();
    for l in &a.limits {
        let (name, quantity) = quote::k8s_limit(l)?;
        limits.insert(name.to_string(), quantity.into());
    }
    let mount = quote::path("--mount", &a.mount)?;
    if !a.mount.is_absolute() {
        anyhow::bail!("--mount {mount:?}: a container's mount path must be absolute");
    }
    let (volumes, mounts) = match &a.pvc {
        Some(pvc) => (
            json!([{"name": "data", "persistentVolumeClaim": {"claimName": quote::k8s_subdomain("--pvc", pvc)?}}]),
            json!([{"name": "data", "mountPath": mount}]),
        ),
        None => (json!([]), json!([])),
    };
    let env_from = match &a.env_secret {
        Some(s) => json!([{"secretRef": {"name": quote::k8s_subdomain("--env-secret", s)?}}]),
        None => json!([]),
    };
    Ok(Pod {
        image: quote::k8s_image(&a.image)?.to_string(),
        limits,
        volumes,
        mounts,
        env_from,
    })
}

impl Pod {
    /// A container running `command` (strings already escaped from Kubernetes' `$(VAR)`
    /// expansion with [`k8s_literal`], but for the references meant to expand).
    fn container(&self, name: &str, command: Vec<String>) -> Value {
        json!({
            "name": name,
            "image": self.image,
            "command": command,
            "resources": {"limits": self.limits},
            "volumeMounts": self.mounts,
            "envFrom": self.env_from,
        })
    }

    /// A Job around one container.
    fn job(&self, name: String, role: &str, spec: Value, container: Value) -> Value {
        let labels = json!({"app.kubernetes.io/name": "ddm", "ddm/role": role});
        let mut spec = spec;
        spec["template"] = json!({
            "metadata": {"labels": labels},
            "spec": {
                "restartPolicy": "Never",
                "terminationGracePeriodSeconds": 300,
                "containers": [container],
                "volumes": self.volumes,
            }
        });
        json!({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name, "labels": labels}, "spec": spec})
    }
}

/// The islands' Indexed Job: ddm-trainer takes its cluster from JOB_COMPLETION_INDEX, which
/// Kubernetes sets in every pod of an Indexed Job. The output folder names it through
/// DDM_CLUSTER, set from the pod's index annotation, as Kubernetes expands `$(VAR)` in a command
/// only for variables in `env`.
fn islands_job(a: &K8sArgs, k: usize, pod: &Pod, name: &str) -> anyhow::Result<Value> {
    let c = &a.common;
    let out = k8s_literal(quote::path("--out", &c.out)?);
    let mut command = vec![
        "ddm-trainer".to_string(),
        "--partition".into(),
        k8s_literal(quote::path("--partition", &c.partition)?),
        "--out".into(),
        format!("{out}/expert-$(DDM_CLUSTER)"),
        "--quiet".into(),
    ];
    if let Some(r) = &c.registry {
        command.extend(["--register".into(), k8s_literal(r)]);
    }
    command.extend(c.trainer_flags.iter().map(|f| k8s_literal(f)));
    let mut island = pod.container("island", command);
    island["env"] = json!([{"name": "DDM_CLUSTER", "valueFrom": {"fieldRef": {
        "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}}]);
    let parallelism = a.parallelism.map_or(k, |p| (p as usize).min(k));
    let spec = json!({
        "completionMode": "Indexed",
        "completions": k,
        "parallelism": parallelism,
        // A failed island retries (and resumes) without failing the others.
        "backoffLimitPerIndex": 6,
        "podFailurePolicy": {"rules": [
            // Status 3: interrupted with its state saved (SIGTERM on eviction or preemption); not a failure.
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
            // Status 2: a bad input or a diverged loss; retrying will not help.
            {"action": "FailIndex", "onExitCodes": {"containerName": "island", "operator": "In", "values": [2]}}
        ]},
    });
    Ok(pod.job(format!("{name}-islands"), "island", spec, island))
}

/// The router's Job: `train-router`, then `register`, as one `/bin/sh -c` script of quoted words.
/// The router reads only the partition (never an expert): it needs no ordering against the
/// islands.
fn router_job(a: &K8sArgs, router_flags: &[String], pod: &Pod, name: &str) -> anyhow::Result<Value> {
    let c = &a.common;
    let out = quote::path("--out", &c.out)?;
    let mut script = format!(
        "ddm train-router --partition {} --out {} --quiet",
        shell_word("--partition", quote::path("--partition", &c.partition)?)?,
        shell_word("--out", &format!("{out}/router"))?
    );
    for f in router_flags {
        script.push(' ');
        script.push_str(&shell_word("--router-flags", f)?);
    }
    if let Some(r) = &c.registry {
        script.push_str(&format!(
            " && ddm register --registry {} {}",
            shell_word("--registry", r)?,
            shell_word("--out", &format!("{out}/router/router.safetensors"))?
        ));
    }
    let command = vec!["/bin/sh".into(), "-c".into(), k8s_literal(&script)];
    let spec = json!({"backoffLimit": 6});
    Ok(pod.job(
        format!("{name}-router"),
        "router",
        spec,
        pod.container("router", command),
    ))
}

/// Write both manifests; print how to apply them.
pub fn write(a: K8sArgs) -> anyhow::Result<()> {
    let Checked { k, router_flags } = super::prepare(&a.common)?;
    // The longest suffix is "-islands"; a Job's name is a label of at most 63 characters.
    let name = quote::k8s_label("--name", &a.name, 63 - "-islands".len())?;
    let pod = pod(&a)?;
    let launch = a.common.out.join("launch");
    std::fs::create_dir_all(&launch).with_context(|| format!("creating {}", launch.display()))?;
    let islands_path = launch.join("islands-job.json");
    let islands = islands_job(&a, k, &pod, name)?;
    ddm_core::fsio::write_bytes_atomic(&islands_path, &serde_json::to_vec_pretty(&islands)?)?;
    println!("wrote {}", islands_path.display());
    if !a.common.no_router {
        let router_path = launch.join("router-job.json");
        let router = router_job(&a, &router_flags, &pod, name)?;
        ddm_core::fsio::write_bytes_atomic(&router_path, &serde_json::to_vec_pretty(&router)?)?;
        println!("wrote {}", router_path.display());
    }
    println!("apply with: kubectl apply -f {}", launch.display());
    Ok(())
}

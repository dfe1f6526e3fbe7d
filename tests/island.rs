//! The island binary under the conditions it must survive: SIGKILL and restart (bit-identical
//! result), no network interface at all, a diverging loss, SIGTERM, and array-job indices.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use ddm_core::checkpoint::Checkpoint;
use ddm_core::host::TensorFile;
use ddm_datasets::partition::{self, Algorithm, PartitionConfig};
use ddm_datasets::{Dataset, Values};

mod common;

/// A small partition of 8 x 8 grayscale images with two random shards of 64 images.
fn tiny_partition(dir: &Path) -> PathBuf {
    let n = 128;
    let pixels: Vec<u8> = (0..n * 64)
        .map(|i| ((i * 37 + (i / 64) * 11) % 256) as u8)
        .collect();
    let d = Dataset {
        name: "tiny".into(),
        shape: vec![1, 8, 8],
        values: Values::U8(pixels),
        labels: Some((0..n as u32).map(|i| i % 3).collect()),
        num_classes: Some(3),
        class_names: None,
        mixture: None,
        cond: None,
        tokens: None,
        latent: None,
        text: None,
    };
    let c = PartitionConfig {
        k: 2,
        features: ddm_datasets::features::FeatureMethod::Raw,
        distance: ddm_datasets::features::Distance::L2,
        algorithm: Algorithm::Random,
        seed: 0,
    };
    let out = dir.join("partition");
    partition::write(&out, &d, &c, &partition::cluster(&d, &c).unwrap(), 0.0, false).unwrap();
    out
}

fn trainer(part: &Path, out: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ddm-trainer"));
    c.args([
        "--partition",
        part.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--quiet",
    ]);
    // Defaults for these tests, unless the test passes its own.
    for (flag, value) in [
        ("--model", "DiT-T/4"),
        ("--batch-size", "8"),
        ("--warmup-steps", "5"),
        ("--lr", "1e-3"),
    ] {
        if !extra.contains(&flag) {
            c.args([flag, value]);
        }
    }
    c.args(extra)
        .env_remove("SLURM_ARRAY_TASK_ID")
        .env_remove("JOB_COMPLETION_INDEX");
    c
}

fn ok(out: Output) -> String {
    let (so, se) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success(),
        "ddm-trainer failed ({}): {so}\n{se}",
        out.status
    );
    so.into_owned()
}

fn step_of(out: &Path) -> Option<u64> {
    ddm_trainer::state::read_loop_state(out)
        .ok()
        .flatten()
        .map(|s| s.step)
}

fn wait_for_step(child: &mut Child, out: &Path, at_least: u64) -> u64 {
    let t0 = Instant::now();
    loop {
        if let Some(s) = step_of(out).filter(|&s| s >= at_least) {
            return s;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the trainer ended before step {at_least}"
        );
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "no checkpoint at step {at_least}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Model and EMA tensors of a training state, bit for bit.
fn state_tensors(out: &Path) -> Vec<(String, Vec<u32>)> {
    let f = TensorFile::read(&out.join("train-state.safetensors")).unwrap();
    f.names()
        .filter(|n| n.starts_with("model.") || n.starts_with("ema."))
        .map(|n| {
            (
                n.to_string(),
                f.f32(n).unwrap().data.iter().map(|v| v.to_bits()).collect(),
            )
        })
        .collect()
}

#[test]
fn sigkill_and_restart_gives_bit_identical_weights() {
    let dir = tempfile::tempdir().unwrap();
    let part = tiny_partition(dir.path());
    let args = ["--cluster", "1", "--steps", "300", "--checkpoint-every", "10"];
    // Uninterrupted.
    let a = dir.path().join("a");
    ok(trainer(&part, &a, &args).output().unwrap());
    // Killed part-way (after a checkpoint, between checkpoints), then restarted.
    let b = dir.path().join("b");
    let mut child = trainer(&part, &b, &args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let killed_at = wait_for_step(&mut child, &b, 40);
    std::thread::sleep(Duration::from_millis(3));
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let resumed_from = step_of(&b).unwrap();
    assert!(
        resumed_from >= killed_at && resumed_from < 300,
        "killed at {resumed_from}"
    );
    ok(trainer(&part, &b, &args).output().unwrap());

    let (ea, eb) = (
        Checkpoint::read(&a.join("expert.safetensors")).unwrap(),
        Checkpoint::read(&b.join("expert.safetensors")).unwrap(),
    );
    assert_eq!(
        ea.meta.tensors_sha256, eb.meta.tensors_sha256,
        "EMA expert weights differ after resume from {resumed_from}"
    );
    assert_eq!(state_tensors(&a), state_tensors(&b), "model/EMA state differs");
    assert_eq!(ea.meta.cluster, Some(1));
    assert_eq!(ea.meta.training.as_ref().unwrap().steps, 300);
    // The metrics log has each step once.
    let steps: Vec<u64> = std::fs::read_to_string(b.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(steps, (1..=30).map(|i| i * 10).collect::<Vec<_>>());
}

/// The island needs no network: it completes inside a network namespace with no interfaces.
#[test]
#[ignore = "needs `unshare -n` (root); CI runs it"]
fn trains_without_any_network_interface() {
    let probe = Command::new("unshare").args(["-n", "true"]).output();
    assert!(
        probe.as_ref().is_ok_and(|o| o.status.success()),
        "`unshare -n` is not permitted here ({probe:?})"
    );
    let dir = tempfile::tempdir().unwrap();
    let part = tiny_partition(dir.path());
    let out = dir.path().join("e");
    let inner = trainer(&part, &out, &["--cluster", "0", "--steps", "20"]);
    let mut c = Command::new("unshare");
    c.arg("-n").arg(inner.get_program()).args(inner.get_args());
    let so = ok(c.output().unwrap());
    assert!(so.contains("expert.safetensors"), "{so}");
    // Inside the namespace there really was no network: only a down loopback.
    let ip = Command::new("unshare")
        .args(["-n", "cat", "/proc/net/dev"])
        .output()
        .unwrap();
    let ifaces = String::from_utf8_lossy(&ip.stdout).lines().skip(2).count();
    assert_eq!(ifaces, 1, "only `lo` exists in the namespace");
}

#[test]
fn diverging_loss_stops_and_keeps_the_last_good_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let part = tiny_partition(dir.path());
    let out = dir.path().join("e");
    ok(trainer(
        &part,
        &out,
        &["--cluster", "0", "--steps", "10", "--checkpoint-every", "10"],
    )
    .output()
    .unwrap());
    let before = std::fs::read(out.join("train-state.safetensors")).unwrap();
    let expert_before = std::fs::read(out.join("expert.safetensors")).unwrap();
    // Resume with an absurd learning rate: the loss blows up to inf/NaN.
    let r = trainer(
        &part,
        &out,
        &[
            "--cluster",
            "0",
            "--steps",
            "200",
            "--checkpoint-every",
            "1000",
            "--lr",
            "1e30",
        ],
    )
    .output()
    .unwrap();
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(2), "{err}");
    assert!(
        err.contains("the loss became") && err.contains("last good checkpoint (step 10)"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(out.join("train-state.safetensors")).unwrap(),
        before,
        "checkpoint untouched"
    );
    assert_eq!(
        std::fs::read(out.join("expert.safetensors")).unwrap(),
        expert_before,
        "expert untouched"
    );
    // The divergence is marked for `ddm ui`, and cleared by the next run in the directory.
    let mark: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("diverged.json")).unwrap()).unwrap();
    assert_eq!(mark["last_good_checkpoint"], 10, "{mark}");
    assert!(mark["step"].as_u64().unwrap() > 10, "{mark}");
    ok(trainer(
        &part,
        &out,
        &["--cluster", "0", "--steps", "12", "--checkpoint-every", "10"],
    )
    .output()
    .unwrap());
    assert!(!out.join("diverged.json").exists(), "a good run clears the mark");
}

#[test]
fn sigterm_saves_a_resumable_state() {
    let dir = tempfile::tempdir().unwrap();
    let part = tiny_partition(dir.path());
    let out = dir.path().join("e");
    let args = ["--cluster", "0", "--steps", "100000", "--checkpoint-every", "10"];
    let mut child = trainer(&part, &out, &args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_step(&mut child, &out, 10);
    // A second trainer on the same directory is refused while the first runs.
    let second = trainer(&part, &out, &args).output().unwrap();
    let err = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(2), "{err}");
    assert!(
        err.contains("another trainer is running in this directory"),
        "{err}"
    );
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let r = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(3), "{err}");
    assert!(err.contains("rerun the same command to resume"), "{err}");
    let step = step_of(&out).unwrap();
    // The saved state resumes (finish right away by asking for the steps already done + 5).
    let so = ok(trainer(
        &part,
        &out,
        &[
            "--cluster",
            "0",
            "--steps",
            &(step + 5).to_string(),
            "--checkpoint-every",
            "10",
        ],
    )
    .output()
    .unwrap());
    assert!(so.contains("expert.safetensors"));
    assert_eq!(
        Checkpoint::read(&out.join("expert.safetensors"))
            .unwrap()
            .meta
            .training
            .unwrap()
            .steps,
        step + 5
    );
}

#[test]
fn array_job_indices_select_the_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let part = tiny_partition(dir.path());
    for (var, k) in [("SLURM_ARRAY_TASK_ID", 1usize), ("JOB_COMPLETION_INDEX", 0)] {
        let out = dir.path().join(format!("e-{var}"));
        ok(trainer(&part, &out, &["--steps", "3"])
            .env(var, k.to_string())
            .output()
            .unwrap());
        assert_eq!(
            Checkpoint::read(&out.join("expert.safetensors"))
                .unwrap()
                .meta
                .cluster,
            Some(k),
            "{var}"
        );
    }
    let r = trainer(&part, &dir.path().join("none"), &["--steps", "3"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&r.stderr).contains("no cluster given"));
    let r = trainer(&part, &dir.path().join("bad"), &["--steps", "3"])
        .env("SLURM_ARRAY_TASK_ID", "7")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        err.contains("cluster 7 is out of range") && err.contains("K = 2"),
        "{err}"
    );
}

#[test]
fn a_different_run_in_the_same_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let part = tiny_partition(dir.path());
    let out = dir.path().join("e");
    ok(trainer(&part, &out, &["--cluster", "0", "--steps", "3"])
        .output()
        .unwrap());
    let r = trainer(
        &part,
        &out,
        &["--cluster", "0", "--steps", "6", "--batch-size", "4"],
    )
    .output()
    .unwrap();
    let e = String::from_utf8_lossy(&r.stderr);
    // The setting that differs is named, in words (not a dump of the whole config).
    assert!(
        e.contains("holds a different run") && e.contains("batch_size: ") && e.contains(" then 4"),
        "{e}"
    );
    assert!(!e.contains("TrainConfig"), "{e}");
}

/// A flipped byte in the saved training state (weights, optimizer or loop state) stops the
/// resume with an error naming the file, instead of resuming into a different model.
#[test]
fn a_corrupted_training_state_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let part = tiny_partition(dir.path());
    let out = dir.path().join("e");
    let args = ["--cluster", "0", "--steps", "4", "--checkpoint-every", "2"];
    ok(trainer(&part, &out, &args).output().unwrap());
    let state = out.join("train-state.safetensors");
    let good = std::fs::read(&state).unwrap();
    let header = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
    let step_at = good
        .windows(8)
        .position(|w| w == b"\\\"step\\\"")
        .expect("the loop state's step");
    for (what, at) in [("a weight", good.len() - 3), ("the loop state", step_at + 9)] {
        assert!(at >= 8, "{what}");
        let mut bad = good.clone();
        bad[at] ^= if at >= 8 + header { 0x40 } else { 0x01 };
        std::fs::write(&state, &bad).unwrap();
        let r = trainer(
            &part,
            &out,
            &["--cluster", "0", "--steps", "6", "--checkpoint-every", "2"],
        )
        .output()
        .unwrap();
        let err = String::from_utf8_lossy(&r.stderr);
        assert_eq!(r.status.code(), Some(2), "{what}: {err}");
        assert!(
            err.contains("train-state.safetensors") && err.contains("corrupted"),
            "{what}: {err}"
        );
    }
    std::fs::write(&state, &good).unwrap();
    ok(trainer(
        &part,
        &out,
        &["--cluster", "0", "--steps", "6", "--checkpoint-every", "2"],
    )
    .output()
    .unwrap());
}

/// Fault drill: the disk fills up while an island saves its checkpoint. The previous checkpoint
/// is intact, the error names the problem, and the rerun resumes from it.
#[test]
fn a_full_disk_during_a_checkpoint_keeps_the_previous_one() {
    let dir = tempfile::tempdir().unwrap();
    let part = tiny_partition(dir.path());
    let out = dir.path().join("e");
    let args = ["--cluster", "0", "--steps", "4", "--checkpoint-every", "2"];
    ok(trainer(&part, &out, &args).output().unwrap());
    let state = out.join("train-state.safetensors");
    let before = std::fs::read(&state).unwrap();
    let more = ["--cluster", "0", "--steps", "8", "--checkpoint-every", "2"];
    let mut c = trainer(&part, &out, &more);
    let r = common::with_disk_limit(&mut c, before.len() as u64 / 2)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(2), "{err}");
    assert!(
        err.contains("File too large") || err.contains("No space"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(&state).unwrap(),
        before,
        "the previous checkpoint changed"
    );
    let leftovers: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".ddm-tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    ok(trainer(&part, &out, &more).output().unwrap());
    assert_eq!(step_of(&out), Some(8));
}

/// Several devices per island train experts: a router, which trains on one, refuses them by name,
/// and so does an island whose batch has fewer rows than it has devices (both before any device
/// is opened).
#[test]
fn several_devices_are_refused_where_they_cannot_split_the_batch() {
    let dir = tempfile::tempdir().unwrap();
    let part = tiny_partition(dir.path());
    let out = Command::new(env!("CARGO_BIN_EXE_ddm"))
        .args(["train-router", "--partition"])
        .arg(&part)
        .args(["--out"])
        .arg(dir.path().join("r"))
        .args(["--model", "DiT-T/4", "--steps", "2", "--quiet"])
        .args(["--device", "cpu,wgpu:software"])
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && e.contains("router trains on one device"),
        "{e}"
    );
    let out = trainer(
        &part,
        &dir.path().join("e"),
        &[
            "--cluster",
            "0",
            "--steps",
            "2",
            "--batch-size",
            "1",
            "--device",
            "wgpu,wgpu",
        ],
    )
    .output()
    .unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && e.contains("--device wgpu,wgpu: 2 devices need a --batch-size of at least 2"),
        "{e}"
    );
}

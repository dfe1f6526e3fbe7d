//! Helpers the integration tests share: run the `ddm` binary, check its exit, and a small
//! registry fixture (a Gaussian-mixture partition with untrained MLP experts).
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

pub fn ddm(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ddm"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("ddm runs")
}

/// The largest absolute difference between two equally long slices.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

pub fn ok(out: Output) -> String {
    let (so, se) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success(),
        "ddm failed: {}\nstdout: {so}\nstderr: {se}",
        out.status
    );
    so.into_owned()
}

pub fn fails(out: Output) -> String {
    let se = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "expected exit 2; stderr: {se}");
    se
}

/// A K-cluster random partition of a small Gaussian mixture, and one MLP expert checkpoint per
/// cluster made directly (no training needed to test the registry).
pub fn registry_fixture(dir: &Path, k: usize) -> Vec<PathBuf> {
    registry_fixture_with(dir, k, 0)
}

/// [`registry_fixture`] with experts conditioned on `classes` classes (and a null class) when
/// `classes > 0` (the mixture's two components are its labels).
pub fn registry_fixture_with(dir: &Path, k: usize, classes: usize) -> Vec<PathBuf> {
    std::fs::write(
        dir.join("gmm.json"),
        r#"{"weights": [0.5, 0.5], "means": [[-3, 0], [3, 0]], "vars": [[0.1, 0.1], [0.1, 0.1]], "n": 400}"#,
    )
    .unwrap();
    ok(ddm(
        dir,
        &[
            "partition",
            "--data",
            "gmm:gmm.json",
            "--k",
            &k.to_string(),
            "--algorithm",
            "random",
            "--out",
            "p",
        ],
    ));
    let manifest = serde_json::from_str::<serde_json::Value>(
        &std::fs::read_to_string(dir.join("p/partition.json")).unwrap(),
    )
    .unwrap();
    let fp = manifest["fingerprint"].as_str().unwrap().to_string();
    // The data's own range, as a trained checkpoint (a router, say) records it.
    let range: Vec<f32> = serde_json::from_value(manifest["dataset"]["range"].clone()).unwrap();
    let device = ddm_core::device::cpu();
    let config = ddm_core::model::ModelConfig::Mlp(ddm_core::mlp::MlpConfig {
        hidden_size: 8,
        depth: 1,
        num_classes: classes,
        class_dropout_prob: if classes > 0 { 0.1 } else { 0.0 },
        ..ddm_core::mlp::MlpConfig::new(2)
    });
    (0..k)
        .map(|c| {
            let model = config.init(c as u64, &device).unwrap();
            let mut meta = ddm_core::checkpoint::CheckpointMeta::expert(
                config.clone(),
                [range[0], range[1]],
                ddm_core::checkpoint::Objective::Velocity,
            );
            meta.partition = Some(fp.clone());
            meta.cluster = Some(c);
            let path = dir.join(format!("expert-{c}.safetensors"));
            ddm_core::checkpoint::Checkpoint::from_model(&model, meta)
                .save(&path)
                .unwrap();
            path
        })
        .collect()
}

/// Run `cmd` as if the disk filled up after `bytes`: every file it writes is capped at that size
/// (RLIMIT_FSIZE), and a write past it fails with EFBIG (SIGXFSZ ignored) as a full disk would
/// fail with ENOSPC.
pub fn with_disk_limit(cmd: &mut Command, bytes: u64) -> &mut Command {
    use std::os::unix::process::CommandExt;
    unsafe {
        cmd.pre_exec(move || {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let lim = libc::rlimit {
                rlim_cur: bytes,
                rlim_max: bytes,
            };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

/// Every file under `dir` with its bytes, sorted (to show nothing changed).
pub fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = vec![];
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let bytes = std::fs::read(&p).unwrap();
                out.push((p, bytes));
            }
        }
    }
    out.sort();
    out
}

/// A tiny 8 x 8 image dataset as IDX files in `dir` (created if absent): two kinds of images
/// (bright left or top half), labelled by kind.
pub fn tiny_images(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let n = 96u32;
    let mut img = vec![];
    for v in [0x803u32, n, 8, 8] {
        img.extend(v.to_be_bytes());
    }
    for i in 0..n {
        for p in 0..64u32 {
            // Two kinds of images: bright left half or bright top half.
            let on = if i % 2 == 0 { p % 8 < 4 } else { p / 8 < 4 };
            img.push(if on { 200 + (i % 50) as u8 } else { 10 });
        }
    }
    let mut lab = vec![];
    lab.extend(0x801u32.to_be_bytes());
    lab.extend(n.to_be_bytes());
    lab.extend((0..n).map(|i| (i % 2) as u8));
    std::fs::write(dir.join("train-images-idx3-ubyte"), img).unwrap();
    std::fs::write(dir.join("train-labels-idx1-ubyte"), lab).unwrap();
}

/// A `ddm serve` child, killed when dropped.
pub struct Server {
    pub child: Child,
    pub url: String,
}

impl Server {
    pub fn start(dir: &Path, args: &[&str], token: Option<&str>) -> Server {
        Self::start_verb(
            dir,
            "serve",
            &[args, &["--listen", "127.0.0.1:0"]].concat(),
            token,
        )
    }

    /// `ddm VERB ARGS` (a server that prints `listening on URL` when ready: `serve`, `ui`).
    pub fn start_verb(dir: &Path, verb: &str, args: &[&str], token: Option<&str>) -> Server {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ddm"));
        cmd.arg(verb)
            .args(args)
            .current_dir(dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env_remove("DDM_SERVE_TOKEN");
        if let Some(t) = token {
            cmd.env("DDM_SERVE_TOKEN", t);
        }
        let mut child = cmd.spawn().expect("ddm starts");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let Some(rest) = line.strip_prefix("listening on ") else {
            let mut err = String::new();
            child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
            panic!("ddm {verb} did not start: {line}\n{err}");
        };
        let url = rest.split_whitespace().next().unwrap().to_string();
        Server { child, url }
    }

    pub fn signal(&self, sig: i32) {
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// [`tiny_images`] in `dir/data`, partitioned at random into two shards in `dir/p`.
pub fn tiny_image_partition(dir: &Path) {
    tiny_images(&dir.join("data"));
    ok(ddm(
        dir,
        &[
            "partition",
            "--data",
            "idx:data",
            "--k",
            "2",
            "--features",
            "raw",
            "--algorithm",
            "random",
            "--out",
            "p",
        ],
    ));
}

/// `ddm train` of an expert on [`tiny_image_partition`]'s `dir/p`: `args` (its `--out` at least),
/// then these defaults for each flag `args` does not give: cluster 0, a DiT-T/4, batch 16, lr 1e-3,
/// 5 warm-up steps, no progress bar.
pub fn tiny_island(dir: &Path, args: &[&str]) -> Output {
    let mut all = vec!["train", "--partition", "p", "--quiet"];
    all.extend_from_slice(args);
    for (flag, value) in [
        ("--cluster", "0"),
        ("--model", "DiT-T/4"),
        ("--batch-size", "16"),
        ("--lr", "1e-3"),
        ("--warmup-steps", "5"),
    ] {
        if !args.contains(&flag) {
            all.extend([flag, value]);
        }
    }
    ddm(dir, &all)
}

/// An expert checkpoint's prediction (on the CPU) for the batch `x` `[N, ...]` at times `t`,
/// unconditioned.
pub fn prediction(checkpoint: &Path, x: &ddm_core::host::HostTensor, t: &[f32]) -> Vec<f32> {
    use ddm_core::flow::VelocityField;
    let device = ddm_core::device::cpu();
    let (_, model) = ddm_core::checkpoint::load(checkpoint, &device).unwrap();
    let n = t.len();
    let x =
        ddm_core::host::HostTensor::new(vec![n, x.data.len() / n], x.data.clone()).to_tensor::<2>(&device);
    let t = ddm_core::host::HostTensor::new(vec![n], t.to_vec()).to_tensor::<1>(&device);
    let v = model
        .velocity(x, t, &ddm_core::condition::Condition::none())
        .unwrap();
    ddm_core::host::HostTensor::from_tensor(v).data
}

/// An expert checkpoint's prediction at a fixed noisy batch (8 samples, t from 0.05 to 0.95), on
/// the CPU: what two checkpoints are compared by.
pub fn fixed_prediction(checkpoint: &Path) -> Vec<f32> {
    let meta = ddm_core::checkpoint::Checkpoint::read(checkpoint).unwrap().meta;
    let n = 8;
    let x = ddm_core::flow::randn(
        [vec![n], meta.model.data_shape()].concat(),
        &mut <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(7),
    );
    let t: Vec<f32> = (0..n).map(|i| 0.05 + 0.9 * i as f32 / (n - 1) as f32).collect();
    prediction(checkpoint, &x, &t)
}

/// ||a - b|| / ||b||.
pub fn relative_error(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let diff: f32 = a.iter().zip(b).map(|(a, b)| (a - b).powi(2)).sum();
    (diff / b.iter().map(|b| b.powi(2)).sum::<f32>()).sqrt()
}

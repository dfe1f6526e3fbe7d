//! End-to-end tests of the `ddm` binary, each in a fresh temporary directory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use ddm_core::host::{HostTensor, TensorFile, write_tensors};

mod common;
use common::{ddm, fails, ok, registry_fixture, tiny_images};

fn reference(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("testdata/reference")
        .join(name)
        .display()
        .to_string()
}

#[test]
fn help_lists_every_verb_and_each_has_help() {
    let dir = tempfile::tempdir().unwrap();
    let help = ok(ddm(dir.path(), &["--help"]));
    for verb in [
        "import",
        "predict",
        "info",
        "partition",
        "data",
        "train",
        "train-router",
        "train-autoencoder",
        "train-text-encoder",
        "encode",
        "encode-text",
        "eval-router",
        "register",
        "registry",
        "sample",
        "serve",
        "eval",
        "experiment",
    ] {
        assert!(help.contains(verb), "`ddm --help` does not list {verb}:\n{help}");
        let h = ok(ddm(dir.path(), &[verb, "--help"]));
        assert!(
            h.contains("Usage: ddm") && h.len() > 200,
            "{verb} --help is too thin:\n{h}"
        );
    }
}

/// `ddm import` + `ddm predict` reproduce the PyTorch reference's output from the command line.
#[test]
fn import_then_predict_reproduces_pytorch() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["dit-small", "dit-class"] {
        let ckpt = format!("{name}.safetensors");
        ok(ddm(
            dir.path(),
            &[
                "import",
                "--from",
                "pytorch",
                &reference(&format!("{name}.weights.safetensors")),
                "--config",
                &reference(&format!("{name}.config.json")),
                "--out",
                &ckpt,
            ],
        ));
        let info = ok(ddm(dir.path(), &["info", &ckpt]));
        assert!(
            info.contains("imported from PyTorch") && info.contains("verified"),
            "{info}"
        );
        let io = reference(&format!("{name}.io.safetensors"));
        ok(ddm(
            dir.path(),
            &[
                "predict",
                "--checkpoint",
                &ckpt,
                "--input",
                &io,
                "--out",
                "v.safetensors",
            ],
        ));
        let got = TensorFile::read(&dir.path().join("v.safetensors"))
            .unwrap()
            .f32("v")
            .unwrap();
        let want = TensorFile::read(Path::new(&io)).unwrap().f32("v").unwrap();
        assert_eq!(got.shape, want.shape);
        let err = got
            .data
            .iter()
            .zip(&want.data)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(err <= 1e-4, "{name}: max abs error {err}");
    }
}

#[test]
fn bad_inputs_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    // A config that does not fit the weights: the missing tensor is named.
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(reference("dit-small.config.json")).unwrap()).unwrap();
    let mut deeper = config.clone();
    deeper["depth"] = 3.into();
    std::fs::write(dir.path().join("deeper.json"), deeper.to_string()).unwrap();
    let weights = reference("dit-small.weights.safetensors");
    let e = fails(ddm(
        dir.path(),
        &[
            "import",
            &weights,
            "--config",
            "deeper.json",
            "--out",
            "x.safetensors",
        ],
    ));
    assert!(
        e.contains("`blocks.2.") && e.contains("is missing") && e.contains("dit-small.weights"),
        "{e}"
    );
    assert!(!dir.path().join("x.safetensors").exists());

    // A truncated checkpoint.
    ok(ddm(
        dir.path(),
        &[
            "import",
            &weights,
            "--config",
            &reference("dit-small.config.json"),
            "--out",
            "c.safetensors",
        ],
    ));
    let bytes = std::fs::read(dir.path().join("c.safetensors")).unwrap();
    std::fs::write(dir.path().join("cut.safetensors"), &bytes[..bytes.len() / 3]).unwrap();
    let io = reference("dit-small.io.safetensors");
    let e = fails(ddm(
        dir.path(),
        &[
            "predict",
            "--checkpoint",
            "cut.safetensors",
            "--input",
            &io,
            "--out",
            "v.st",
        ],
    ));
    assert!(
        e.contains("cut.safetensors") && e.contains("truncated or corrupted"),
        "{e}"
    );

    // Inputs of the wrong shape, and a device this build lacks.
    let x = HostTensor::new(vec![2, 3, 5], vec![0.0; 30]);
    let t = HostTensor::new(vec![2], vec![0.5; 2]);
    write_tensors(
        &dir.path().join("in.safetensors"),
        &BTreeMap::from([("x_t".into(), x), ("t".into(), t)]),
        &BTreeMap::new(),
    )
    .unwrap();
    let e = fails(ddm(
        dir.path(),
        &[
            "predict",
            "--checkpoint",
            "c.safetensors",
            "--input",
            "in.safetensors",
            "--out",
            "v.st",
        ],
    ));
    assert!(
        e.contains("`x_t` has shape [2, 3, 5]") && e.contains("[N, 1, 28, 28]"),
        "{e}"
    );
    // `--device cuda` where this build or this machine lacks CUDA: an error naming what is
    // missing (the cargo feature, or the NVIDIA driver on a machine without one), not a panic.
    let cuda = ddm(
        dir.path(),
        &[
            "predict",
            "--checkpoint",
            "c.safetensors",
            "--input",
            &io,
            "--out",
            "v.st",
            "--device",
            "cuda",
        ],
    );
    if !cfg!(feature = "cuda") {
        assert!(fails(cuda).contains("--features cuda"));
    } else if !std::path::Path::new("/proc/driver/nvidia").exists() {
        let e = fails(cuda);
        assert!(e.contains("--device cuda: ") && e.contains("libcuda.so"), "{e}");
        assert!(!e.contains("panicked"), "{e}");
    }

    // A missing file: its path and the OS's reason, each once.
    for args in [
        &["info", "missing.safetensors"][..],
        &[
            "register",
            "--registry",
            "reg",
            "--partition",
            "nowhere",
            "missing.safetensors",
        ],
    ] {
        let e = fails(ddm(dir.path(), args));
        assert_eq!(e.matches("(os error 2)").count(), 1, "{e}");
        assert!(e.contains("missing.safetensors") || e.contains("nowhere"), "{e}");
    }

    // A CPU capability the kernels would silently take for the default is refused by name.
    let out = Command::new(env!("CARGO_BIN_EXE_ddm"))
        .current_dir(dir.path())
        .args(["info", "missing.safetensors"])
        .env("DDM_CPU_CAPABILITY", "AVX-512")
        .output()
        .unwrap();
    let e = fails(out);
    assert!(e.contains("DDM_CPU_CAPABILITY") && e.contains("`AVX-512`"), "{e}");
}

/// `ddm partition` on a Gaussian mixture, then `--describe`; bad arguments are refused.
#[test]
fn partition_and_describe() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("gmm.json"),
        r#"{"weights": [0.5, 0.5], "means": [[-3, 0], [3, 0]], "vars": [[0.1, 0.1], [0.1, 0.1]], "n": 2000}"#,
    )
    .unwrap();
    let out = ok(ddm(
        dir.path(),
        &[
            "partition",
            "--data",
            "gmm:gmm.json",
            "--k",
            "2",
            "--features",
            "raw",
            "--algorithm",
            "kmeans",
            "--out",
            "p",
        ],
    ));
    assert!(out.contains("wrote p") && out.contains("0.5"), "{out}");
    for f in [
        "partition.json",
        "shard-0.safetensors",
        "shard-1.safetensors",
        "assignment.safetensors",
    ] {
        assert!(dir.path().join("p").join(f).exists(), "{f}");
    }
    let desc = ok(ddm(dir.path(), &["partition", "--describe", "p"]));
    assert!(desc.contains("K = 2") && desc.contains("label 0 100%"), "{desc}");
    let e = fails(ddm(
        dir.path(),
        &["partition", "--data", "gmm:gmm.json", "--k", "2", "--out", "p"],
    ));
    assert!(e.contains("already exists"), "{e}");
    let e = fails(ddm(
        dir.path(),
        &["partition", "--data", "gmm:gmm.json", "--k", "5000", "--out", "q"],
    ));
    assert!(e.contains("--k") && e.contains("5000 is not in 1..=4096"), "{e}");
    assert!(!dir.path().join("q").exists());
}

/// The embedded Fashion-MNIST subset needs no network and no package.
#[test]
fn embedded_data_info() {
    let dir = tempfile::tempdir().unwrap();
    let out = ok(ddm(
        dir.path(),
        &[
            "data",
            "info",
            "--data",
            "fashion-mnist-10k",
            "--png",
            "first.png",
        ],
    ));
    assert!(
        out.contains("10000") && out.contains("[1, 28, 28]") && out.contains("Ankle boot"),
        "{out}"
    );
    assert!(
        std::fs::read(dir.path().join("first.png"))
            .unwrap()
            .starts_with(b"\x89PNG")
    );
}

/// partition -> `ddm train` (an island) -> the expert checkpoint names its cluster and partition.
#[test]
fn train_an_island_expert() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("gmm.json"),
        r#"{"weights": [0.5, 0.5], "means": [[-3, 0], [3, 0]], "vars": [[0.1, 0.1], [0.1, 0.1]], "n": 1000}"#,
    )
    .unwrap();
    ok(ddm(
        dir.path(),
        &[
            "partition",
            "--data",
            "gmm:gmm.json",
            "--k",
            "2",
            "--features",
            "raw",
            "--algorithm",
            "kmeans",
            "--out",
            "p",
        ],
    ));
    let out = ok(ddm(
        dir.path(),
        &[
            "train",
            "--partition",
            "p",
            "--cluster",
            "1",
            "--out",
            "e1",
            "--model",
            "mlp",
            "--mlp-hidden",
            "32",
            "--steps",
            "50",
            "--quiet",
        ],
    ));
    assert!(out.contains("e1/expert.safetensors"), "{out}");
    let info = ok(ddm(dir.path(), &["info", "--json", "e1/expert.safetensors"]));
    let meta: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(meta["cluster"], 1);
    assert_eq!(meta["training"]["steps"], 50);
    let fp = std::fs::read_to_string(dir.path().join("p/partition.json")).unwrap();
    assert!(fp.contains(meta["partition"].as_str().unwrap()));
    assert!(dir.path().join("e1/metrics.jsonl").exists());
    let png = std::fs::read(dir.path().join("e1/loss.png")).unwrap();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 5000,
        "a loss curve with axes and labels"
    );
}

/// partition -> train-router -> eval-router and predict (logits); a router of another partition
/// is refused.
#[test]
fn router_verbs() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("gmm.json"),
        r#"{"weights": [0.3, 0.7], "means": [[-3, 0], [3, 0]], "vars": [[0.1, 0.1], [0.1, 0.1]], "n": 1000}"#,
    )
    .unwrap();
    for (name, seed) in [("p", "0"), ("q", "1")] {
        ok(ddm(
            dir.path(),
            &[
                "partition",
                "--data",
                "gmm:gmm.json",
                "--k",
                "2",
                "--features",
                "raw",
                "--algorithm",
                "random",
                "--seed",
                seed,
                "--out",
                name,
            ],
        ));
    }
    let out = ok(ddm(
        dir.path(),
        &[
            "train-router",
            "--partition",
            "p",
            "--out",
            "r",
            "--model",
            "mlp",
            "--mlp-hidden",
            "32",
            "--steps",
            "30",
            "--eval-samples",
            "200",
            "--quiet",
        ],
    ));
    assert!(
        out.contains("| t | accuracy") && out.contains("r/router.safetensors"),
        "{out}"
    );
    let table = ok(ddm(
        dir.path(),
        &[
            "eval-router",
            "--router",
            "r/router.safetensors",
            "--partition",
            "p",
            "--samples",
            "100",
        ],
    ));
    assert!(table.contains("| 1.0 |"), "{table}");
    let e = fails(ddm(
        dir.path(),
        &[
            "eval-router",
            "--router",
            "r/router.safetensors",
            "--partition",
            "q",
        ],
    ));
    assert!(e.contains("not this partition"), "{e}");
    // predict on a router writes logits [N, K].
    let x = HostTensor::new(vec![3, 2], vec![-3.0, 0.0, 3.0, 0.0, 0.0, 0.0]);
    let t = HostTensor::new(vec![3], vec![0.1, 0.5, 1.0]);
    write_tensors(
        &dir.path().join("in.safetensors"),
        &BTreeMap::from([("x_t".into(), x), ("t".into(), t)]),
        &BTreeMap::new(),
    )
    .unwrap();
    ok(ddm(
        dir.path(),
        &[
            "predict",
            "--checkpoint",
            "r/router.safetensors",
            "--input",
            "in.safetensors",
            "--out",
            "l.safetensors",
        ],
    ));
    let logits = TensorFile::read(&dir.path().join("l.safetensors"))
        .unwrap()
        .f32("logits")
        .unwrap();
    assert_eq!(logits.shape, vec![3, 2]);
    let info = ok(ddm(dir.path(), &["info", "--json", "r/router.safetensors"]));
    let meta: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(meta["role"], "router");
    assert_eq!(meta["num_clusters"], 2);
}

#[test]
fn eight_concurrent_registrations_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let experts = registry_fixture(dir.path(), 8);
    // One at a time into `reg`, all 8 at once into `reg2`: both end with all 8 experts.
    for e in &experts {
        ok(ddm(
            dir.path(),
            &[
                "register",
                "--registry",
                "reg",
                "--partition",
                "p",
                e.to_str().unwrap(),
            ],
        ));
    }
    let handles: Vec<_> = experts
        .iter()
        .map(|e| {
            Command::new(env!("CARGO_BIN_EXE_ddm"))
                .args([
                    "register",
                    "--registry",
                    "reg2",
                    "--partition",
                    "p",
                    e.to_str().unwrap(),
                ])
                .current_dir(dir.path())
                .stdout(std::process::Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    for mut h in handles {
        assert!(h.wait().unwrap().success());
    }
    for reg in ["reg", "reg2"] {
        let list = ok(ddm(dir.path(), &["registry", "--registry", reg, "list"]));
        assert_eq!(list.matches("  expert ").count(), 8, "{list}");
        assert!(!list.contains("missing"), "{list}");
    }
}

#[test]
fn corrupted_checkpoints_are_refused_and_verify_finds_flipped_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let experts = registry_fixture(dir.path(), 2);
    ok(ddm(
        dir.path(),
        &[
            "register",
            "--registry",
            "reg",
            "--partition",
            "p",
            experts[0].to_str().unwrap(),
        ],
    ));
    let before: Vec<(PathBuf, Vec<u8>)> = walk(&dir.path().join("reg"));
    // A corrupted checkpoint: refused, and not one byte of the registry changes.
    let mut b = std::fs::read(&experts[1]).unwrap();
    let at = b.len() - 5;
    b[at] ^= 0x10;
    std::fs::write(dir.path().join("bad.safetensors"), &b).unwrap();
    let e = fails(ddm(
        dir.path(),
        &["register", "--registry", "reg", "bad.safetensors"],
    ));
    assert!(e.contains("bad.safetensors") && e.contains("checksum"), "{e}");
    // Other weights for an already registered cluster need --replace.
    let mut other = ddm_core::checkpoint::Checkpoint::read(&experts[1]).unwrap();
    other.meta.cluster = Some(0);
    other.save(&dir.path().join("other-0.safetensors")).unwrap();
    let e = fails(ddm(
        dir.path(),
        &["register", "--registry", "reg", "other-0.safetensors"],
    ));
    assert!(
        e.contains("cluster 0 already has an expert") && e.contains("--replace"),
        "{e}"
    );
    assert_eq!(walk(&dir.path().join("reg")), before, "registry bytes unchanged");
    // verify: every blob re-hashed; a flipped byte is found.
    ok(ddm(dir.path(), &["registry", "--registry", "reg", "verify"]));
    let blob = std::fs::read_dir(dir.path().join("reg/blobs"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let mut b = std::fs::read(&blob).unwrap();
    b[100] ^= 1;
    std::fs::write(&blob, b).unwrap();
    let e = fails(ddm(dir.path(), &["registry", "--registry", "reg", "verify"]));
    assert!(e.contains("expert 0") && e.contains("1 problem"), "{e}");
}

fn walk(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = vec![];
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else if !p.ends_with("registry.lock") {
            out.push((p.clone(), std::fs::read(&p).unwrap()));
        }
    }
    out.sort();
    out
}

/// The whole mission in seconds: partition -> 2 island trainers -> router -> register -> sample.
#[test]
fn end_to_end_tiny_ensemble() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("data")).unwrap();
    tiny_images(&dir.path().join("data"));
    ok(ddm(
        dir.path(),
        &[
            "partition",
            "--data",
            "idx:data",
            "--k",
            "2",
            "--features",
            "raw",
            "--algorithm",
            "kmeans",
            "--out",
            "p",
        ],
    ));
    let common = [
        "--model",
        "DiT-XS/4",
        "--steps",
        "20",
        "--batch-size",
        "16",
        "--quiet",
    ];
    for k in ["0", "1"] {
        let out = format!("e{k}");
        let mut args = vec!["train", "--partition", "p", "--cluster", k, "--out", &out];
        args.extend(common);
        ok(ddm(dir.path(), &args));
    }
    let mut args = vec![
        "train-router",
        "--partition",
        "p",
        "--out",
        "r",
        "--eval-samples",
        "50",
    ];
    args.extend(common);
    ok(ddm(dir.path(), &args));
    ok(ddm(
        dir.path(),
        &[
            "register",
            "--registry",
            "reg",
            "e0/expert.safetensors",
            "e1/expert.safetensors",
            "r/router.safetensors",
        ],
    ));
    for strategy in ["top-1", "full"] {
        let png = format!("s-{strategy}.png");
        ok(ddm(
            dir.path(),
            &[
                "sample",
                "--registry",
                "reg",
                "--strategy",
                strategy,
                "--n",
                "8",
                "--steps",
                "5",
                "--out",
                &png,
            ],
        ));
        assert!(
            std::fs::read(dir.path().join(&png))
                .unwrap()
                .starts_with(b"\x89PNG")
        );
        let report: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join(format!("s-{strategy}.json"))).unwrap(),
        )
        .unwrap();
        assert_eq!(report["experts_present"], serde_json::json!([0, 1]), "{report}");
        assert_eq!(report["steps"], 5);
        assert!(!report["usage"].as_array().unwrap().is_empty());
    }
    // The analytic router works from the statistics the islands registered.
    ok(ddm(
        dir.path(),
        &[
            "sample",
            "--registry",
            "reg",
            "--router",
            "analytic",
            "--strategy",
            "full",
            "--n",
            "4",
            "--steps",
            "3",
            "--out",
            "a.png",
        ],
    ));
    // Unconditional experts cannot be sampled by class.
    let e = fails(ddm(
        dir.path(),
        &[
            "sample",
            "--registry",
            "reg",
            "--class",
            "0",
            "--n",
            "2",
            "--steps",
            "2",
            "--out",
            "c.png",
        ],
    ));
    assert!(e.contains("not class-conditional"), "{e}");
    // An island that failed: refused without --allow-missing, renormalised with it.
    ok(ddm(
        dir.path(),
        &["registry", "--registry", "reg", "remove", "--cluster", "1"],
    ));
    let e = fails(ddm(
        dir.path(),
        &[
            "sample",
            "--registry",
            "reg",
            "--n",
            "4",
            "--steps",
            "3",
            "--out",
            "m.png",
        ],
    ));
    assert!(
        e.contains("missing for clusters [1]") && e.contains("--allow-missing"),
        "{e}"
    );
    ok(ddm(
        dir.path(),
        &[
            "sample",
            "--registry",
            "reg",
            "--n",
            "4",
            "--steps",
            "3",
            "--allow-missing",
            "--out",
            "m.png",
        ],
    ));
}

/// `registry export` writes the published layout and `register` takes it back; experts can be
/// registered by URL, verified by sha256 before use.
#[test]
fn export_folder_and_url_registration() {
    use std::io::{BufRead, BufReader, Write};
    let dir = tempfile::tempdir().unwrap();
    let experts = registry_fixture(dir.path(), 2);
    let files: Vec<&str> = experts.iter().map(|e| e.to_str().unwrap()).collect();
    let mut args = vec!["register", "--registry", "reg", "--partition", "p"];
    args.extend(&files);
    ok(ddm(dir.path(), &args));
    ok(ddm(
        dir.path(),
        &["registry", "--registry", "reg", "export", "--out", "published"],
    ));
    for f in [
        "index.json",
        "expert_0/config.json",
        "expert_0/model.safetensors",
        "expert_1/model.safetensors",
    ] {
        assert!(dir.path().join("published").join(f).exists(), "{f}");
    }
    ok(ddm(
        dir.path(),
        &["register", "--registry", "reg2", "--partition", "p", "published"],
    ));
    assert_eq!(
        ok(ddm(dir.path(), &["registry", "--registry", "reg2", "list"]))
            .matches("  expert ")
            .count(),
        2
    );

    // A loopback HTTP server serving expert-1.
    let body = std::fs::read(&experts[1]).unwrap();
    let sha = ddm_core::digest::sha256_hex(&body);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in listener.incoming().take(2) {
            let mut s = s.unwrap();
            let mut line = String::new();
            BufReader::new(&s).read_line(&mut line).unwrap();
            s.write_all(
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                )
                .as_bytes(),
            )
            .unwrap();
            s.write_all(&body).unwrap();
        }
    });
    let env_cache = dir.path().join("cache");
    let run = |url: String| {
        Command::new(env!("CARGO_BIN_EXE_ddm"))
            .args(["register", "--registry", "reg3", "--partition", "p", &url])
            .env("DDM_CACHE", &env_cache)
            .current_dir(dir.path())
            .output()
            .unwrap()
    };
    let e = fails(run(format!(
        "http://{addr}/expert-1.safetensors#sha256={}",
        "0".repeat(64)
    )));
    assert!(e.contains("does not match the expected"), "{e}");
    ok(run(format!("http://{addr}/expert-1.safetensors#sha256={sha}")));
    assert!(ok(ddm(dir.path(), &["registry", "--registry", "reg3", "list"])).contains(&sha[..12]));
}

/// A PNG's width and height, from its header.
fn png_size(path: &Path) -> (u32, u32) {
    let b = std::fs::read(path).unwrap();
    let be = |i: usize| u32::from_be_bytes(b[i..i + 4].try_into().unwrap());
    (be(16), be(20))
}

/// The quickstart on labelled images (Fashion-MNIST, Debian's or the embedded 10k):
/// class-conditional islands and router, a grid with one named column per class, the
/// unconditional grid, and the samples scored beside the floor (or why not, without a test set).
#[test]
fn quickstart_draws_every_class_and_scores_its_samples() {
    let dir = tempfile::tempdir().unwrap();
    #[rustfmt::skip]
    let printed = ok(ddm(dir.path(), &[
        "quickstart", "--k", "2", "--expert-model", "DiT-XS/4", "--expert-steps", "10",
        "--router-model", "DiT-XS/4", "--router-steps", "5", "--n", "15", "--steps", "2",
        "--fd-samples", "35", "--out", "q",
    ]));
    let q = dir.path().join("q");
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(q.join("registry/registry.json")).unwrap()).unwrap();
    assert_eq!(index["class_names"][1], "Trouser", "{index}");
    assert_eq!(index["experts"]["0"]["classes"], 10, "class-conditional experts");
    assert_eq!(index["router"]["classes"], 10, "a router that sees the class");
    // 15 samples -> 2 of each class: two rows of ten columns of 28-pixel images drawn 3x (84
    // pixels and a 2-pixel border), under a band of class names.
    let (w, h) = png_size(&q.join("samples-by-class.png"));
    assert_eq!(w, 2 + 10 * (84 + 2));
    assert!(
        h > 2 + 2 * (84 + 2) + 14 && h < 2 + 2 * (84 + 2) + 40,
        "height {h}: two rows and the labels"
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(q.join("samples-by-class.json")).unwrap()).unwrap();
    assert_eq!(
        (
            report["class"].as_str(),
            report["strategy"].as_str(),
            report["n"].as_u64()
        ),
        (Some("all"), Some("top-1"), Some(20))
    );
    assert_eq!(report["solver"], "unipc");
    let uncond: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(q.join("samples-trajectory.json")).unwrap()).unwrap();
    assert!(uncond["class"].is_null(), "{uncond}");
    for says in [
        "samples-by-class.png",
        "one column per class",
        "samples-trajectory.png",
    ] {
        assert!(printed.contains(says), "{says}: {printed}");
    }
    // Scored beside the floor where the test set is on disk (Debian's package), else the reason.
    let scored = printed.lines().find(|l| l.contains("fd/")).expect("a score line");
    assert!(
        (scored.contains("40 such samples scored: FD ") && scored.contains("floor"))
            || scored.contains("not scored"),
        "{scored}"
    );
}

/// Class-conditional islands, sampled with a class and classifier-free guidance.
#[test]
fn class_conditional_guided_sampling() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("data")).unwrap();
    tiny_images(&dir.path().join("data"));
    ok(ddm(
        dir.path(),
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
    let common = [
        "--model",
        "DiT-XS/4",
        "--steps",
        "10",
        "--batch-size",
        "16",
        "--quiet",
    ];
    for k in ["0", "1"] {
        let out = format!("e{k}");
        let mut args = vec![
            "train",
            "--partition",
            "p",
            "--cluster",
            k,
            "--out",
            &out,
            "--class-conditional",
        ];
        args.extend(common);
        ok(ddm(dir.path(), &args));
    }
    let mut args = vec![
        "train-router",
        "--partition",
        "p",
        "--out",
        "r",
        "--eval-samples",
        "20",
    ];
    args.extend(common);
    ok(ddm(dir.path(), &args));
    ok(ddm(
        dir.path(),
        &[
            "register",
            "--registry",
            "reg",
            "e0/expert.safetensors",
            "e1/expert.safetensors",
            "r/router.safetensors",
        ],
    ));
    let sample = |extra: &[&str]| {
        let mut a = vec![
            "sample",
            "--registry",
            "reg",
            "--n",
            "4",
            "--steps",
            "3",
            "--out",
            "s.png",
        ];
        a.extend(extra);
        ddm(dir.path(), &a)
    };
    ok(sample(&["--class", "1", "--guidance", "2.0"]));
    ok(sample(&["--class", "0"]));
    let e = fails(sample(&["--class", "5"]));
    assert!(e.contains("class 5 is out of range"), "{e}");
    // Out-of-range settings are refused before anything runs.
    for (args, says) in [
        (&["--n", "0"][..], "invalid value '0' for '--n <N>'"),
        (&["--steps", "0"][..], "invalid value '0' for '--steps <STEPS>'"),
        (
            &["--class", "1", "--guidance", "NaN"][..],
            "for '--guidance <GUIDANCE>': `NaN` is not a finite number",
        ),
        (&["--strategy", "top-9"][..], "more experts than the K = 2"),
        (&["--strategy", "threshold:2"][..], "must be in (0, 1]"),
        (&["--strategy", "sample:0"][..], "positive number"),
        (
            &["--guidance", "2"][..],
            "guidance needs a condition: --class, --condition or --prompt",
        ),
    ] {
        let mut a = vec!["sample", "--registry", "reg", "--out", "bad.png"];
        a.extend(args);
        let e = fails(ddm(dir.path(), &a));
        assert!(e.contains(says), "{args:?}: {e}");
    }
    let report = |dir: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(dir.join("s.json")).unwrap()).unwrap()
    };
    // The unconditioned router serves conditional experts, and says it does not see the class.
    ok(sample(&["--class", "all", "--strategy", "trajectory"]));
    let r = report(dir.path());
    assert_eq!(
        (r["class"].as_str(), r["router_sees_class"].as_bool()),
        (Some("all"), Some(false))
    );
    assert_eq!(r["router_calls_per_sample"].as_f64(), Some(1.0));
    // The default strategy: per trajectory when the router does not see the class.
    ok(sample(&["--class", "all"]));
    assert_eq!(report(dir.path())["strategy"], "trajectory");

    // A conditioned router (with condition dropout): registered beside the conditional experts,
    // it sees the class.
    let mut args = vec![
        "train-router",
        "--partition",
        "p",
        "--out",
        "rc",
        "--eval-samples",
        "20",
        "--class-conditional",
        "--class-dropout",
        "0.2",
    ];
    args.extend(common);
    let printed = ok(ddm(dir.path(), &args));
    assert!(printed.contains("With the class"), "{printed}");
    ok(ddm(
        dir.path(),
        &[
            "register",
            "--registry",
            "reg",
            "--replace",
            "rc/router.safetensors",
        ],
    ));
    ok(sample(&["--class", "all", "--strategy", "top-1"]));
    let r = report(dir.path());
    assert_eq!(r["router_sees_class"].as_bool(), Some(true));
    assert_eq!(r["router_calls_per_sample"].as_f64(), Some(3.0));
    // ... and top-1 when it does.
    ok(sample(&["--class", "all"]));
    assert_eq!(report(dir.path())["strategy"], "top-1");
    ok(sample(&[])); // unconditional sampling: the router's null class
    let eval = ok(ddm(
        dir.path(),
        &[
            "eval-router",
            "--router",
            "rc/router.safetensors",
            "--partition",
            "p",
            "--samples",
            "20",
        ],
    ));
    assert!(
        eval.contains("Without the class") && eval.contains("With the class"),
        "{eval}"
    );

    // The same router for unconditional experts is refused, naming both sides.
    let mut args = vec!["train", "--partition", "p", "--cluster", "0", "--out", "u0"];
    args.extend(common);
    ok(ddm(dir.path(), &args));
    let e = fails(ddm(
        dir.path(),
        &[
            "register",
            "--registry",
            "reg2",
            "u0/expert.safetensors",
            "rc/router.safetensors",
        ],
    ));
    assert!(e.contains("conditioned on") && e.contains("unconditional"), "{e}");
    assert!(
        !dir.path().join("reg2/registry.json").exists(),
        "nothing registered"
    );
    // Experts of different conditioning cannot share a registry.
    let e = fails(ddm(
        dir.path(),
        &[
            "register",
            "--registry",
            "reg",
            "--replace",
            "u0/expert.safetensors",
        ],
    ));
    assert!(e.contains("share their conditioning"), "{e}");
}

/// `ddm eval images` on real test images (as a `ddm sample` output would hold them) scores them
/// near the real-vs-real floor; on noise, far from it; bad files get a clear error.
#[test]
fn eval_images_scores_samples_against_the_floor() {
    let dir = tempfile::tempdir().unwrap();
    let test = ddm_datasets::parse_source("fashion-mnist:test", false)
        .unwrap()
        .load()
        .unwrap();
    let n = 300;
    let idx: Vec<usize> = (0..n).map(|i| 5000 + i).collect();
    let write = |name: &str, data: Vec<f32>| {
        write_tensors(
            &dir.path().join(name),
            &BTreeMap::from([("x0".to_string(), HostTensor::new(vec![n, 1, 28, 28], data))]),
            &BTreeMap::new(),
        )
        .unwrap();
    };
    write("real.safetensors", test.gather(&idx));
    write(
        "flat.safetensors",
        (0..n * 784).map(|i| ((i % 784) as f32 / 392.0) - 1.0).collect(),
    );
    let out = ok(Command::new(env!("CARGO_BIN_EXE_ddm"))
        .args([
            "eval",
            "images",
            "real.safetensors",
            "flat.safetensors",
            "--json",
            "r.json",
        ])
        .current_dir(dir.path())
        .env("DDM_CACHE", dir.path().join("cache"))
        .output()
        .unwrap());
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("r.json")).unwrap()).unwrap();
    let fd = |k: &str| r[k]["fd"].as_f64().unwrap();
    assert!(fd("real.safetensors") < 2.0 * fd("floor"), "{out}");
    assert!(fd("flat.safetensors") > 10.0 * fd("floor"), "{out}");
    assert!(out.contains("precision") && out.contains("floor"), "{out}");
    // The reference statistics were cached.
    assert!(dir.path().join("cache/eval").read_dir().unwrap().count() == 1);

    std::fs::write(dir.path().join("junk.safetensors"), b"not a file").unwrap();
    let e = fails(ddm(dir.path(), &["eval", "images", "junk.safetensors"]));
    assert!(e.contains("junk.safetensors"), "{e}");
}

/// `ddm eval gmm` scores a checkpoint on its mixture exactly: a fresh (zero-velocity) expert has
/// the velocity error of predicting 0, and its samples collapse onto the noise's scale.
#[test]
fn eval_gmm_scores_a_checkpoint_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let experts = registry_fixture(dir.path(), 2);
    let out = ok(ddm(
        dir.path(),
        &[
            "eval",
            "gmm",
            "--mixture",
            "gmm.json",
            "--checkpoint",
            experts[0].to_str().unwrap(),
            "--n",
            "300",
            "--steps",
            "5",
        ],
    ));
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    let mse = r["velocity_mse"].as_f64().unwrap();
    // E|v|^2 per dimension of the true velocity is several units here; a zero field misses all of it.
    assert!(mse > 1.0, "{out}");
    assert_eq!(r["velocity_mse_by_bin"].as_array().unwrap().len(), 10);
    assert_eq!(r["mode_weights"].as_array().unwrap().len(), 2);
    assert!(r["energy_distance"].as_f64().unwrap() > 0.1, "{out}");
    let e = fails(ddm(
        dir.path(),
        &["eval", "gmm", "--mixture", "missing.json", "--checkpoint", "x"],
    ));
    assert!(e.contains("missing.json"), "{e}");
}

/// Per-sample conditioning vectors from a `tensors:` file reach the router: partition keeps them
/// in the shards, `train-router --condition-vectors` reads them, `eval-router` reports accuracy
/// with them, and `sample --condition` hands them to the router (checked against its length).
#[test]
fn conditioning_vectors_reach_the_router() {
    use ddm_core::host::HostIntTensor;
    let dir = tempfile::tempdir().unwrap();
    let n = 400;
    // Two clusters of 2-D points; c is a noisy one-hot of the cluster, y the cluster.
    let mut x = vec![];
    let mut c = vec![];
    let mut y = vec![];
    for i in 0..n {
        let k = i % 2;
        let j = (i as f32 * 0.37).sin() * 0.3;
        x.extend([if k == 0 { -2.0 + j } else { 2.0 + j }, j]);
        c.extend([(k == 0) as u8 as f32 + 0.1 * j, (k == 1) as u8 as f32 - 0.1 * j]);
        y.push(k as i64);
    }
    write_tensors(
        &dir.path().join("data.safetensors"),
        &BTreeMap::from([
            ("x".into(), HostTensor::new(vec![n, 2], x)),
            ("c".into(), HostTensor::new(vec![n, 2], c)),
        ]),
        &BTreeMap::from([(
            "y".into(),
            HostIntTensor {
                shape: vec![n],
                data: y,
            },
        )]),
    )
    .unwrap();
    ok(ddm(
        dir.path(),
        &[
            "partition",
            "--data",
            "tensors:data.safetensors",
            "--k",
            "2",
            "--features",
            "raw",
            "--out",
            "p",
        ],
    ));
    let common = [
        "--model",
        "mlp",
        "--mlp-hidden",
        "16",
        "--steps",
        "10",
        "--batch-size",
        "32",
        "--quiet",
    ];
    for k in ["0", "1"] {
        let out = format!("e{k}");
        let mut args = vec!["train", "--partition", "p", "--cluster", k, "--out", &out];
        args.extend(common);
        ok(ddm(dir.path(), &args));
    }
    let mut args = vec![
        "train-router",
        "--partition",
        "p",
        "--out",
        "r",
        "--eval-samples",
        "50",
        "--condition-vectors",
    ];
    args.extend(common);
    let printed = ok(ddm(dir.path(), &args));
    assert!(printed.contains("With the vector"), "{printed}");
    let meta: serde_json::Value =
        serde_json::from_str(&ok(ddm(dir.path(), &["info", "--json", "r/router.safetensors"]))).unwrap();
    assert_eq!(meta["condition_dim"], 2);
    ok(ddm(
        dir.path(),
        &[
            "register",
            "--registry",
            "reg",
            "e0/expert.safetensors",
            "e1/expert.safetensors",
            "r/router.safetensors",
        ],
    ));
    let cond = |rows: usize| {
        let c: Vec<f32> = (0..rows)
            .flat_map(|i| [(i % 2) as f32, 1.0 - (i % 2) as f32])
            .collect();
        write_tensors(
            &dir.path().join("c.safetensors"),
            &BTreeMap::from([("c".into(), HostTensor::new(vec![rows, 2], c))]),
            &BTreeMap::new(),
        )
        .unwrap();
    };
    let sample = |n: &str| {
        ddm(
            dir.path(),
            &[
                "sample",
                "--registry",
                "reg",
                "--n",
                n,
                "--steps",
                "3",
                "--condition",
                "c.safetensors",
                "--out",
                "s.png",
            ],
        )
    };
    cond(6);
    ok(sample("6"));
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("s.json")).unwrap()).unwrap();
    assert_eq!(report["router_sees_vectors"].as_bool(), Some(true));
    let e = fails(sample("4"));
    assert!(e.contains("c.safetensors") && e.contains("[4, 2]"), "{e}");
    // Without --condition the router routes on the null (zero) vector.
    ok(ddm(
        dir.path(),
        &[
            "sample",
            "--registry",
            "reg",
            "--n",
            "4",
            "--steps",
            "3",
            "--out",
            "s.png",
        ],
    ));
    // A router that reads no vectors refuses them.
    let mut args = vec![
        "train-router",
        "--partition",
        "p",
        "--out",
        "plain",
        "--eval-samples",
        "50",
    ];
    args.extend(common);
    ok(ddm(dir.path(), &args));
    ok(ddm(
        dir.path(),
        &[
            "register",
            "--registry",
            "reg",
            "--replace",
            "plain/router.safetensors",
        ],
    ));
    let e = fails(sample("6"));
    assert!(e.contains("neither the router nor the experts read any"), "{e}");
}

/// A registration waits for another one's lock, but not forever: it says which file is locked.
/// Empty inputs and negative training knobs get messages, not panics.
#[test]
fn held_locks_and_degenerate_inputs_end_with_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let experts = registry_fixture(dir.path(), 2);
    std::fs::create_dir(dir.path().join("reg")).unwrap();
    let held = std::fs::File::create(dir.path().join("reg/registry.lock")).unwrap();
    held.lock().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ddm"))
        .args([
            "register",
            "--registry",
            "reg",
            "--partition",
            "p",
            experts[0].to_str().unwrap(),
        ])
        .env("DDM_REGISTRY_LOCK_WAIT", "0.3")
        .current_dir(dir.path())
        .output()
        .unwrap();
    let e = fails(out);
    assert!(e.contains("registry.lock") && e.contains("still locked"), "{e}");
    assert!(!dir.path().join("reg/registry.json").exists());
    // Released: the same registration goes through.
    drop(held);
    ok(ddm(
        dir.path(),
        &[
            "register",
            "--registry",
            "reg",
            "--partition",
            "p",
            experts[0].to_str().unwrap(),
        ],
    ));

    // ddm predict on zero rows.
    write_tensors(
        &dir.path().join("empty.safetensors"),
        &BTreeMap::from([
            ("x_t".into(), HostTensor::new(vec![0, 2], vec![])),
            ("t".into(), HostTensor::new(vec![0], vec![])),
        ]),
        &BTreeMap::new(),
    )
    .unwrap();
    let e = fails(ddm(
        dir.path(),
        &[
            "predict",
            "--checkpoint",
            experts[0].to_str().unwrap(),
            "--input",
            "empty.safetensors",
            "--out",
            "v.safetensors",
        ],
    ));
    assert!(e.contains("empty.safetensors") && e.contains("no rows"), "{e}");
    // Negative gradient clipping.
    let e = fails(ddm(
        dir.path(),
        &[
            "train",
            "--partition",
            "p",
            "--cluster",
            "0",
            "--out",
            "x",
            "--model",
            "mlp",
            "--grad-clip=-1",
        ],
    ));
    assert!(e.contains("--grad-clip") && e.contains("-1 is below 0"), "{e}");
}

/// What the sampler trusts is checked when it loads it: a blob replaced after registration, an
/// index edited by hand (entries swapped, a path-like hash, a cluster out of range) and NaN weights
/// at registration are refused with an error naming the file, never sampled.
#[test]
fn tampered_registries_and_nan_weights_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let experts = registry_fixture(d, 2);
    let (e0, e1) = (experts[0].to_str().unwrap(), experts[1].to_str().unwrap());

    // NaN weights never enter a registry.
    let mut ckpt = ddm_core::checkpoint::Checkpoint::read(&experts[0]).unwrap();
    let (name, t) = ckpt.tensors.iter_mut().next().unwrap();
    let name = name.clone();
    t.data[0] = f32::NAN;
    ckpt.save(&d.join("nan.safetensors")).unwrap();
    let e = fails(ddm(
        d,
        &[
            "register",
            "--registry",
            "reg",
            "--partition",
            "p",
            "nan.safetensors",
        ],
    ));
    assert!(
        e.contains("nan.safetensors") && e.contains(&name) && e.contains("NaN"),
        "{e}"
    );
    assert!(
        !d.join("reg/registry.json").exists(),
        "a refused registration wrote an index"
    );

    ok(ddm(
        d,
        &["register", "--registry", "reg", "--partition", "p", e0, e1],
    ));
    let sample = || {
        ddm(
            d,
            &[
                "sample",
                "--registry",
                "reg",
                "--strategy",
                "oracle:0",
                "--n",
                "4",
                "--steps",
                "2",
                "--quiet",
            ],
        )
    };
    ok(sample());
    let index_path = d.join("reg/registry.json");
    let index = std::fs::read_to_string(&index_path).unwrap();
    let v: serde_json::Value = serde_json::from_str(&index).unwrap();
    let (sha0, sha1) = (
        v["experts"]["0"]["sha256"].as_str().unwrap().to_string(),
        v["experts"]["1"]["sha256"].as_str().unwrap().to_string(),
    );

    // Index entries swapped by hand: each blob hashes right, but holds the other cluster's expert.
    std::fs::write(
        &index_path,
        index
            .replace(&sha0, "SWAP")
            .replace(&sha1, &sha0)
            .replace("SWAP", &sha1),
    )
    .unwrap();
    let e = fails(sample());
    assert!(
        e.contains("registered as expert 0") && e.contains("the expert of cluster 1"),
        "{e}"
    );
    std::fs::write(&index_path, &index).unwrap();

    // A blob replaced after registration.
    let blob0 = d.join(format!("reg/blobs/{sha0}.safetensors"));
    let original = std::fs::read(&blob0).unwrap();
    std::fs::copy(d.join(format!("reg/blobs/{sha1}.safetensors")), &blob0).unwrap();
    let e = fails(sample());
    assert!(
        e.contains(&format!("hashes to {sha1}")) && e.contains("corrupted or replaced"),
        "{e}"
    );
    std::fs::write(&blob0, original).unwrap();

    // A hash that is a path, and a cluster out of range.
    std::fs::write(&index_path, index.replace(&sha0, "../../../etc/passwd")).unwrap();
    let e = fails(sample());
    assert!(
        e.contains("is not a sha256") && e.contains("registry.json"),
        "{e}"
    );
    let mut bad: serde_json::Value = serde_json::from_str(&index).unwrap();
    bad["experts"]["7"] = bad["experts"]["1"].clone();
    std::fs::write(&index_path, serde_json::to_string(&bad).unwrap()).unwrap();
    let e = fails(sample());
    assert!(e.contains("expert for cluster 7, but k = 2"), "{e}");
    std::fs::write(&index_path, &index).unwrap();
    ok(sample());
}

/// `registry gc` deletes what no entry names (replaced and removed entries' blobs, a killed
/// registration's temp file) and nothing else.
#[test]
fn registry_gc_collects_only_orphans() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let experts = registry_fixture(d, 2);
    let (e0, e1) = (experts[0].to_str().unwrap(), experts[1].to_str().unwrap());
    ok(ddm(
        d,
        &["register", "--registry", "reg", "--partition", "p", e0, e1],
    ));
    let mut other = ddm_core::checkpoint::Checkpoint::read(&experts[0]).unwrap();
    other.tensors.values_mut().next().unwrap().data[0] += 1.0;
    other.save(&d.join("e0b.safetensors")).unwrap();
    ok(ddm(
        d,
        &["register", "--registry", "reg", "--replace", "e0b.safetensors"],
    ));
    ok(ddm(
        d,
        &["registry", "--registry", "reg", "remove", "--cluster", "1"],
    ));
    std::fs::write(d.join("reg/blobs/.ddm-tmp-killed"), b"half a blob").unwrap();
    let blobs = || std::fs::read_dir(d.join("reg/blobs")).unwrap().count();
    assert_eq!(blobs(), 4);
    let out = ok(ddm(d, &["registry", "--registry", "reg", "gc", "--dry-run"]));
    assert!(
        out.contains("3 unreferenced file(s)") && out.contains("would remove"),
        "{out}"
    );
    assert_eq!(blobs(), 4, "a dry run removed something");
    let out = ok(ddm(d, &["registry", "--registry", "reg", "gc"]));
    assert!(out.contains("3 unreferenced file(s)"), "{out}");
    assert_eq!(blobs(), 1);
    ok(ddm(d, &["registry", "--registry", "reg", "verify"]));
    ok(ddm(
        d,
        &[
            "sample",
            "--registry",
            "reg",
            "--strategy",
            "oracle:0",
            "--allow-missing",
            "--n",
            "4",
            "--steps",
            "2",
            "--quiet",
        ],
    ));
}

/// `--force` replaces only a partition, and `sample --out DIR` is refused before anything is
/// written: a user's files are never the casualty of a wrong flag.
#[test]
fn wrong_outputs_damage_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let experts = registry_fixture(d, 2);
    std::fs::write(d.join("notes.txt"), b"my notes").unwrap();
    std::fs::create_dir_all(d.join("photos")).unwrap();
    std::fs::write(d.join("photos/cat.jpg"), b"a cat").unwrap();
    for out in ["notes.txt", "photos"] {
        let e = fails(ddm(
            d,
            &[
                "partition",
                "--data",
                "gmm:gmm.json",
                "--k",
                "2",
                "--algorithm",
                "random",
                "--force",
                "--out",
                out,
            ],
        ));
        assert!(e.contains("--force replaces only a partition"), "{e}");
    }
    assert_eq!(std::fs::read(d.join("notes.txt")).unwrap(), b"my notes");
    assert_eq!(std::fs::read(d.join("photos/cat.jpg")).unwrap(), b"a cat");
    // A partition is replaced with --force.
    ok(ddm(
        d,
        &[
            "partition",
            "--data",
            "gmm:gmm.json",
            "--k",
            "2",
            "--algorithm",
            "random",
            "--force",
            "--out",
            "p",
        ],
    ));

    let files: Vec<&str> = experts.iter().map(|e| e.to_str().unwrap()).collect();
    let mut args = vec!["register", "--registry", "reg", "--partition", "p"];
    args.extend(&files);
    ok(ddm(d, &args));
    let e = fails(ddm(
        d,
        &[
            "sample",
            "--registry",
            "reg",
            "--strategy",
            "oracle:0",
            "--out",
            "photos",
            "--quiet",
        ],
    ));
    assert!(e.contains("a directory; --out names the PNG grid"), "{e}");
    assert!(!d.join("photos.safetensors").exists() && !d.join("photos.json").exists());
}

/// Fault drills: the disk fills up (every file capped, writes fail with EFBIG) during a
/// registration and during a partition write. The registry and the output are as before, the
/// error names the problem, and the rerun completes.
#[test]
fn a_full_disk_loses_nothing() {
    use common::{snapshot, with_disk_limit};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let experts = registry_fixture(d, 2);
    let (e0, e1) = (experts[0].to_str().unwrap(), experts[1].to_str().unwrap());
    ok(ddm(d, &["register", "--registry", "reg", "--partition", "p", e0]));
    let before = snapshot(&d.join("reg"));
    let blob_bytes = std::fs::metadata(&experts[1]).unwrap().len();
    let run = |limit: u64, args: &[&str]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_ddm"));
        c.args(args).current_dir(d);
        with_disk_limit(&mut c, limit).output().unwrap()
    };
    let e = fails(run(blob_bytes / 2, &["register", "--registry", "reg", e1]));
    assert!(e.contains("File too large") || e.contains("No space"), "{e}");
    assert_eq!(
        snapshot(&d.join("reg")),
        before,
        "a failed registration changed the registry"
    );
    ok(ddm(d, &["registry", "--registry", "reg", "verify"]));
    ok(ddm(
        d,
        &["registry", "--registry", "reg", "export", "--out", "ex"],
    ));
    ok(ddm(d, &["register", "--registry", "reg", e1]));
    ok(ddm(d, &["registry", "--registry", "reg", "verify"]));

    // An export that does not fit: the previous export is intact, nothing left behind.
    let exported = snapshot(&d.join("ex"));
    let e = fails(run(
        blob_bytes / 2,
        &["registry", "--registry", "reg", "export", "--out", "ex"],
    ));
    assert!(e.contains("File too large") || e.contains("No space"), "{e}");
    assert_eq!(
        snapshot(&d.join("ex")),
        exported,
        "a failed export changed the previous one"
    );
    assert_eq!(leftovers(d), Vec::<String>::new());
    ok(ddm(
        d,
        &["registry", "--registry", "reg", "export", "--out", "ex"],
    ));
    assert!(d.join("ex/expert_1/model.safetensors").exists());

    // A partition whose shards do not fit: no output directory, and no temp directory left.
    let e = fails(run(
        2000,
        &[
            "partition",
            "--data",
            "gmm:gmm.json",
            "--k",
            "2",
            "--algorithm",
            "random",
            "--out",
            "p2",
        ],
    ));
    assert!(e.contains("File too large") || e.contains("No space"), "{e}");
    assert!(!d.join("p2").exists());
    assert_eq!(leftovers(d), Vec::<String>::new());
    ok(ddm(
        d,
        &[
            "partition",
            "--data",
            "gmm:gmm.json",
            "--k",
            "2",
            "--algorithm",
            "random",
            "--out",
            "p2",
        ],
    ));
}

/// Sizes that would allocate without bound are refused up front, naming the flag.
#[test]
fn absurd_sizes_are_refused_before_allocating() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    registry_fixture(d, 2);
    let e = fails(ddm(
        d,
        &[
            "train",
            "--partition",
            "p",
            "--cluster",
            "0",
            "--out",
            "e",
            "--model",
            "mlp",
            "--mlp-hidden",
            "65536",
            "--steps",
            "1",
            "--batch-size",
            "65536",
            "--quiet",
        ],
    ));
    assert!(
        e.contains("--batch-size 65536 needs at least") && e.contains("GB available"),
        "{e}"
    );
    std::fs::create_dir_all(d.join("imgs")).unwrap();
    let e = fails(ddm(
        d,
        &[
            "partition",
            "--data",
            "images:imgs@100000",
            "--k",
            "2",
            "--out",
            "q",
        ],
    ));
    assert!(e.contains("image size 100000") && e.contains("1 to 4096"), "{e}");
}

/// The registry fixture's K experts and a briefly trained MLP router, registered in `dir/reg`.
fn registered_with_router(d: &Path, k: usize) -> Vec<PathBuf> {
    let experts = registry_fixture(d, k);
    ok(ddm(
        d,
        &[
            "train-router",
            "--partition",
            "p",
            "--out",
            "r",
            "--model",
            "mlp",
            "--mlp-hidden",
            "8",
            "--steps",
            "10",
            "--eval-samples",
            "20",
            "--quiet",
        ],
    ));
    let mut args = vec![
        "register",
        "--registry",
        "reg",
        "--partition",
        "p",
        "r/router.safetensors",
    ];
    args.extend(experts.iter().map(|p| p.to_str().unwrap()));
    ok(ddm(d, &args));
    experts
}

/// `--allow-missing` covers an expert whose checkpoint is gone or corrupted: it is left out (the
/// router's weights renormalised) and reported; without the flag the error names the blob.
#[test]
fn a_lost_checkpoint_is_renormalised_away_with_allow_missing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    registered_with_router(d, 3);
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("reg/registry.json")).unwrap()).unwrap();
    let blob = |k: usize| {
        d.join(format!(
            "reg/blobs/{}.safetensors",
            index["experts"][k.to_string()]["sha256"].as_str().unwrap()
        ))
    };
    let sample = |out: &str, extra: &[&str]| {
        let mut a = vec![
            "sample",
            "--registry",
            "reg",
            "--n",
            "8",
            "--steps",
            "3",
            "--quiet",
            "--out",
            out,
        ];
        a.extend(extra);
        ddm(d, &a)
    };
    std::fs::remove_file(blob(1)).unwrap();
    let bytes = std::fs::read(blob(2)).unwrap();
    let mut flipped = bytes.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 1;
    std::fs::write(blob(2), &flipped).unwrap();

    let e = fails(sample("a.png", &["--strategy", "full"]));
    assert!(
        e.contains("loading expert 1") && e.contains(blob(1).file_name().unwrap().to_str().unwrap()),
        "{e}"
    );
    assert_eq!(e.matches("(os error 2)").count(), 1, "{e}");

    ok(sample("b.png", &["--strategy", "full", "--allow-missing"]));
    let rep: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("b.json")).unwrap()).unwrap();
    let lost = rep["experts_lost"].as_array().unwrap();
    assert_eq!(lost.len(), 2, "{rep}");
    assert_eq!(lost[0]["expert"], 1);
    let name = blob(1).file_name().unwrap().to_str().unwrap().to_string();
    assert!(lost[0]["location"].as_str().unwrap().ends_with(&name), "{rep}");
    assert_eq!(lost[0]["from_step"], 0);
    assert_eq!(lost[1]["expert"], 2);
    assert!(
        lost[1]["error"]
            .as_str()
            .unwrap()
            .contains("corrupted or replaced"),
        "{rep}"
    );
    // Only expert 0 ran, on every row of every step.
    let rows: u64 = rep["usage"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["rows_per_expert"][0].as_u64().unwrap())
        .sum();
    assert_eq!(rows, 8 * 3);
    // Which is what the oracle of expert 0 samples.
    ok(sample("c.png", &["--strategy", "oracle:0"]));
    assert_eq!(
        std::fs::read(d.join("b.safetensors")).unwrap(),
        std::fs::read(d.join("c.safetensors")).unwrap()
    );
}

/// `--max-memory`: the loaded experts' weights stay under the cap (least recently used unloaded,
/// reloaded when selected again) and the samples are the same as without it.
#[test]
fn a_memory_cap_unloads_experts_and_changes_no_sample() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let experts = registered_with_router(d, 4);
    let size = std::fs::metadata(&experts[0]).unwrap().len() as f64 / (1 << 20) as f64;
    let sample = |out: &str, extra: &[&str]| {
        let mut a = vec![
            "sample",
            "--registry",
            "reg",
            "--n",
            "16",
            "--steps",
            "4",
            "--quiet",
            "--out",
            out,
        ];
        a.extend(extra);
        ddm(d, &a)
    };
    let report = |name: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(d.join(name)).unwrap()).unwrap()
    };
    let cap = format!("{}", size * 2.5);
    for strategy in ["full", "top-2", "trajectory"] {
        ok(sample("free.png", &["--strategy", strategy]));
        ok(sample(
            "capped.png",
            &["--strategy", strategy, "--max-memory", &cap],
        ));
        assert_eq!(
            std::fs::read(d.join("free.safetensors")).unwrap(),
            std::fs::read(d.join("capped.safetensors")).unwrap(),
            "{strategy}"
        );
        let (free, capped) = (report("free.json"), report("capped.json"));
        assert_eq!(free["expert_evictions"], 0);
        assert!(
            capped["experts_held_peak"].as_u64().unwrap() <= 2,
            "{strategy}: {capped}"
        );
        if strategy == "full" {
            assert_eq!(free["experts_held_peak"], 4);
            // Every step needs all four; the two still held run first, so each step after the
            // first unloads only two (in order 0..4, all four: 14 over 4 steps).
            assert_eq!(capped["expert_evictions"], 2 * 4, "{capped}");
            let loads: u64 = capped["expert_loads"]
                .as_array()
                .unwrap()
                .iter()
                .map(|l| l.as_u64().unwrap())
                .sum();
            assert!(loads > 4, "{capped}");
        }
    }
    let e = fails(sample("tiny.png", &["--max-memory", &format!("{}", size / 2.0)]));
    assert!(e.contains("more than the memory cap"), "{e}");
    let e = fails(sample("zero.png", &["--max-memory", "0"]));
    assert!(e.contains("--max-memory"), "{e}");
}

/// `--solver` and `--schedule` reach the sampler: the report names both, counts evaluations by
/// the solver and reports usage at the schedule's times; a bad schedule is refused naming the
/// flag. (The solvers' accuracy is tested against closed forms in core and ensemble.)
#[test]
fn solvers_and_schedules_sample_the_ensemble() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    registered_with_router(d, 2);
    let mut seen = vec![];
    for (solver, schedule, evaluations) in [
        ("euler", "uniform", 6),
        ("heun", "uniform", 12),
        ("dpm++2m", "uniform", 6),
        ("dpm++2m", "shifted:3", 6),
        ("unipc", "uniform", 6),
    ] {
        ok(ddm(
            d,
            &[
                "sample",
                "--registry",
                "reg",
                "--n",
                "8",
                "--steps",
                "6",
                "--strategy",
                "full",
                "--solver",
                solver,
                "--schedule",
                schedule,
                "--quiet",
                "--out",
                "s.png",
            ],
        ));
        let report: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(d.join("s.json")).unwrap()).unwrap();
        assert_eq!(
            (report["solver"].as_str(), report["schedule"].as_str()),
            (Some(solver), Some(schedule))
        );
        // `full` runs both experts at every evaluation.
        assert_eq!(
            report["expert_evaluations"],
            2 * evaluations,
            "{solver} {schedule}: {report}"
        );
        // The times the usage is reported at are the schedule's.
        let times: Vec<f64> = report["usage"]
            .as_array()
            .unwrap()
            .iter()
            .map(|u| u["t_from"].as_f64().unwrap())
            .collect();
        seen.push((schedule, times));
    }
    assert_eq!(seen[0].1, seen[2].1);
    assert_ne!(seen[2].1, seen[3].1, "{seen:?}");
    let e = fails(ddm(
        d,
        &[
            "sample",
            "--registry",
            "reg",
            "--n",
            "4",
            "--schedule",
            "shifted:0",
            "--out",
            "b.png",
        ],
    ));
    assert!(e.contains("--schedule") && e.contains("above 0"), "{e}");
}

/// Run `ddm args` in `d` and SIGKILL it after `delay` unless it finished first; whether it
/// finished successfully.
fn killed_after(d: &Path, args: &[&str], delay: std::time::Duration) -> bool {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ddm"))
        .args(args)
        .current_dir(d)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.success();
        }
        if start.elapsed() >= delay {
            child.kill().unwrap(); // SIGKILL
            child.wait().unwrap();
            return false;
        }
        std::thread::sleep(std::time::Duration::from_micros(200));
    }
}

/// How long `ddm args` takes in `d` (it must succeed).
fn timed(d: &Path, args: &[&str]) -> std::time::Duration {
    let t = std::time::Instant::now();
    ok(ddm(d, args));
    t.elapsed()
}

/// Entries of `d` left by interrupted writes (`.ddm-*` temporary files and directories).
fn leftovers(d: &Path) -> Vec<String> {
    std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".ddm-"))
        .collect()
}

/// The experts `ddm registry list` shows registered (not missing).
fn registered(list: &str) -> Vec<usize> {
    list.lines()
        .filter_map(|l| l.strip_prefix("  expert "))
        .filter(|l| !l.ends_with("missing"))
        .map(|l| l.split(':').next().unwrap().parse().unwrap())
        .collect()
}

/// SIGKILL at random points (seeded) of `ddm partition --force`, of 8 concurrent `ddm register`
/// and of `ddm registry export`: afterwards the output is the old one or the new one, whole
/// (partitions and registries verify; an export registers), and a rerun completes and removes
/// what the killed run left.
#[test]
fn sigkill_at_random_points_loses_nothing() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(19);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut landed = [0usize; 3];
    let fraction =
        |rng: &mut rand_chacha::ChaCha8Rng, t: std::time::Duration| t.mul_f64(rng.random_range(0.0..2.0));

    // Partition: an existing partition replaced with --force by another one.
    let old = [
        "partition",
        "--data",
        "fashion-mnist-10k",
        "--k",
        "4",
        "--algorithm",
        "random",
        "--seed",
        "0",
        "--out",
        "part",
        "--quiet",
    ];
    let new = [
        "partition",
        "--data",
        "fashion-mnist-10k",
        "--k",
        "4",
        "--algorithm",
        "random",
        "--seed",
        "1",
        "--out",
        "part",
        "--quiet",
        "--force",
    ];
    let manifest = || {
        ddm_datasets::partition::read_manifest(&d.join("part"))
            .unwrap()
            .fingerprint
    };
    ok(ddm(d, &new[..new.len() - 1]));
    let new_fp = manifest();
    std::fs::remove_dir_all(d.join("part")).unwrap();
    let t = timed(d, &old);
    let old_fp = manifest();
    for _ in 0..8 {
        let finished = killed_after(d, &new, fraction(&mut rng, t));
        landed[0] += usize::from(!finished);
        let problems = ddm_datasets::partition::verify(&d.join("part")).unwrap();
        assert!(problems.is_empty(), "{problems:?}");
        let fp = manifest();
        assert!(fp == old_fp || fp == new_fp);
        if finished || fp == new_fp {
            ok(ddm(
                d,
                &old[..old.len() - 1]
                    .iter()
                    .chain(&["--force"])
                    .copied()
                    .collect::<Vec<_>>(),
            ));
        }
    }
    ok(ddm(d, &new));
    assert_eq!(manifest(), new_fp);
    assert_eq!(leftovers(d), Vec::<String>::new());

    // Registration: 8 islands register at once, each killed at its own random point.
    let experts = registry_fixture(d, 8);
    let register = |reg: &str, e: &Path| -> Vec<String> {
        [
            "register",
            "--registry",
            reg,
            "--partition",
            "p",
            e.to_str().unwrap(),
        ]
        .map(String::from)
        .to_vec()
    };
    let t = {
        let start = std::time::Instant::now();
        let all: Vec<_> = experts
            .iter()
            .map(|e| {
                Command::new(env!("CARGO_BIN_EXE_ddm"))
                    .args(register("timing", e))
                    .current_dir(d)
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .spawn()
                    .unwrap()
            })
            .collect();
        for mut c in all {
            assert!(c.wait().unwrap().success());
        }
        start.elapsed()
    };
    for round in 0..6 {
        let reg = format!("reg{round}");
        let delays: Vec<_> = experts.iter().map(|_| fraction(&mut rng, t)).collect();
        let finished: Vec<bool> = std::thread::scope(|s| {
            let handles: Vec<_> = experts
                .iter()
                .zip(&delays)
                .map(|(e, &delay)| {
                    let args = register(&reg, e);
                    s.spawn(move || {
                        killed_after(d, &args.iter().map(|a| a.as_str()).collect::<Vec<_>>(), delay)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        landed[1] += finished.iter().filter(|&&f| !f).count();
        if d.join(&reg).join("registry.json").exists() {
            ok(ddm(d, &["registry", "--registry", &reg, "verify"]));
            let list = ok(ddm(d, &["registry", "--registry", &reg, "list"]));
            // Every island that finished is there.
            for (k, _) in finished.iter().enumerate().filter(|(_, f)| **f) {
                assert!(registered(&list).contains(&k), "{list}");
            }
        } else {
            assert!(finished.iter().all(|f| !f));
        }
        // The killed ones, rerun, complete the registry.
        for (e, _) in experts.iter().zip(&finished).filter(|(_, f)| !**f) {
            ok(ddm(
                d,
                &register(&reg, e).iter().map(|a| a.as_str()).collect::<Vec<_>>(),
            ));
        }
        ok(ddm(d, &["registry", "--registry", &reg, "verify"]));
        let list = ok(ddm(d, &["registry", "--registry", &reg, "list"]));
        assert_eq!(registered(&list), (0..8).collect::<Vec<_>>(), "{list}");
        ok(ddm(d, &["registry", "--registry", &reg, "gc"]));
    }

    // Export: an export of 2 experts replaced by one of 8.
    let mut two = vec!["register", "--registry", "two", "--partition", "p"];
    two.extend(experts[..2].iter().map(|e| e.to_str().unwrap()));
    ok(ddm(d, &two));
    let export = |reg: &'static str| ["registry", "--registry", reg, "export", "--out", "ex"];
    let t = timed(d, &export("reg0"));
    let count = || {
        std::fs::read_dir(d.join("ex"))
            .unwrap()
            .filter(|e| e.as_ref().unwrap().path().is_dir())
            .count()
    };
    for round in 0..8 {
        ok(ddm(d, &export("two")));
        let finished = killed_after(d, &export("reg0"), fraction(&mut rng, t));
        landed[2] += usize::from(!finished);
        let n = count();
        assert!(n == 2 || n == 8, "{n} expert folders");
        assert!(!finished || n == 8);
        // What is there registers: every file matches the index it came with.
        let check = format!("check{round}");
        ok(ddm(
            d,
            &["register", "--registry", &check, "--partition", "p", "ex"],
        ));
        assert_eq!(
            registered(&ok(ddm(d, &["registry", "--registry", &check, "list"]))).len(),
            n
        );
    }
    ok(ddm(d, &export("reg0")));
    assert_eq!(count(), 8);
    assert_eq!(leftovers(d), Vec::<String>::new());
    eprintln!(
        "SIGKILL landed before the end in {} of 8 partitions, {} of 48 registrations, {} of 8 exports",
        landed[0], landed[1], landed[2]
    );
}

/// `ddm args` in `d`, run as an unprivileged user when the tests run as root (root writes
/// anywhere, so a read-only directory would not be read-only to it).
fn ddm_unprivileged(d: &Path, args: &[&str]) -> std::process::Output {
    use std::os::unix::process::CommandExt;
    let mut c = Command::new(env!("CARGO_BIN_EXE_ddm"));
    c.args(args).current_dir(d);
    if unsafe { libc::geteuid() } == 0 {
        c.uid(65534).gid(65534); // nobody
    }
    c.output().unwrap()
}

/// Make `p` and everything under it read-only (or, with `writable`, writable by anyone).
fn set_mode(p: &Path, writable: bool) {
    use std::os::unix::fs::PermissionsExt;
    let mode = |dir: bool| match (dir, writable) {
        (true, false) => 0o555,
        (false, false) => 0o444,
        (true, true) => 0o777,
        (false, true) => 0o666,
    };
    if p.is_dir() {
        for e in std::fs::read_dir(p).unwrap() {
            set_mode(&e.unwrap().path(), writable);
        }
    }
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode(p.is_dir()))).unwrap();
}

/// A read-only output directory (or registry) is a clear error naming it, before or without
/// touching anything; a read-only registry still samples.
#[test]
fn a_read_only_output_directory_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    set_mode(d, true);
    registered_with_router(d, 2);
    std::fs::create_dir(d.join("ro")).unwrap();
    std::fs::create_dir(d.join("rw")).unwrap();
    set_mode(&d.join("rw"), true);
    set_mode(&d.join("p"), false);
    set_mode(&d.join("reg"), false);
    set_mode(&d.join("ro"), false);
    let before = common::snapshot(&d.join("reg"));
    let cases: [&[&str]; 5] = [
        &[
            "partition",
            "--data",
            "gmm:gmm.json",
            "--k",
            "2",
            "--algorithm",
            "random",
            "--out",
            "ro/p",
            "--quiet",
        ],
        &[
            "train",
            "--partition",
            "p",
            "--cluster",
            "0",
            "--out",
            "ro/island",
            "--model",
            "mlp",
            "--steps",
            "2",
            "--quiet",
        ],
        &[
            "sample",
            "--registry",
            "reg",
            "--n",
            "4",
            "--steps",
            "2",
            "--out",
            "ro/s.png",
            "--quiet",
        ],
        &["registry", "--registry", "reg", "export", "--out", "ro/ex"],
        &[
            "register",
            "--registry",
            "reg",
            "--replace",
            "expert-1.safetensors",
        ],
    ];
    for args in cases {
        let e = fails(ddm_unprivileged(d, args));
        assert!(e.contains("Permission denied"), "{args:?}: {e}");
        let named = if args[0] == "register" { "reg" } else { "ro" };
        assert!(e.contains(named), "{args:?}: {e}");
        assert_eq!(std::fs::read_dir(d.join("ro")).unwrap().count(), 0, "{args:?}");
    }
    assert_eq!(common::snapshot(&d.join("reg")), before);
    ok(ddm_unprivileged(d, &["registry", "--registry", "reg", "verify"]));
    ok(ddm_unprivileged(
        d,
        &[
            "sample",
            "--registry",
            "reg",
            "--n",
            "4",
            "--steps",
            "2",
            "--out",
            "rw/s.png",
            "--quiet",
        ],
    ));
    assert!(d.join("rw/s.safetensors").exists());
    set_mode(d, true); // so the temporary directory can be removed
}

/// Mixed objectives in one ensemble: an island trains a DDPM (epsilon) expert natively, another a
/// flow-matching one; the registry takes both, the sampler mixes them in velocity space, and the
/// samples recover the mixture (its mode weights, a small energy distance).
#[test]
fn an_epsilon_expert_and_a_velocity_expert_sample_the_mixture() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(
        d.join("gmm.json"),
        r#"{"weights": [0.3, 0.7], "means": [[-3, 0], [3, 0]], "vars": [[0.1, 0.1], [0.1, 0.1]], "n": 2000}"#,
    )
    .unwrap();
    ok(ddm(
        d,
        &[
            "partition",
            "--data",
            "gmm:gmm.json",
            "--k",
            "2",
            "--features",
            "raw",
            "--out",
            "p",
            "--quiet",
        ],
    ));
    let train = |cluster: &str, out: &str, objective: &str| {
        ok(ddm(
            d,
            &[
                "train",
                "--partition",
                "p",
                "--cluster",
                cluster,
                "--out",
                out,
                "--model",
                "mlp",
                "--mlp-hidden",
                "64",
                "--steps",
                "800",
                "--batch-size",
                "128",
                "--lr",
                "2e-3",
                "--warmup-steps",
                "20",
                "--ema-decay",
                "0.99",
                "--objective",
                objective,
                "--quiet",
            ],
        ))
    };
    train("0", "e0", "epsilon-cosine");
    train("1", "e1", "velocity");
    let info: serde_json::Value =
        serde_json::from_str(&ok(ddm(d, &["info", "--json", "e0/expert.safetensors"]))).unwrap();
    assert_eq!(info["objective"]["kind"], "epsilon", "{info}");
    // Resuming with another objective is another run: refused.
    let e = fails(ddm(
        d,
        &[
            "train",
            "--partition",
            "p",
            "--cluster",
            "0",
            "--out",
            "e0",
            "--model",
            "mlp",
            "--mlp-hidden",
            "64",
            "--steps",
            "900",
            "--batch-size",
            "128",
            "--lr",
            "2e-3",
            "--warmup-steps",
            "20",
            "--ema-decay",
            "0.99",
            "--objective",
            "velocity",
            "--quiet",
        ],
    ));
    assert!(e.contains("different run"), "{e}");
    ok(ddm(
        d,
        &[
            "register",
            "--registry",
            "reg",
            "--partition",
            "p",
            "e0/expert.safetensors",
            "e1/expert.safetensors",
        ],
    ));
    let out = ok(ddm(
        d,
        &[
            "eval",
            "gmm",
            "--mixture",
            "gmm.json",
            "--registry",
            "reg",
            "--strategy",
            "full",
            "--analytic",
            "--n",
            "1000",
            "--steps",
            "30",
        ],
    ));
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    let w: Vec<f64> = serde_json::from_value(r["mode_weights"].clone()).unwrap();
    println!("mixed objectives: {out}");
    assert!((w[0] - 0.3).abs() < 0.06 && (w[1] - 0.7).abs() < 0.06, "{out}");
    assert!(r["energy_distance"].as_f64().unwrap() < 0.1, "{out}");
}

/// `ddm distill`: a student trained on the registry's experts (own-cluster and routed targets) is
/// an expert checkpoint with the teacher's FLOPs in its cost, sampled alone with `--checkpoint`;
/// the command resumes like an island and refuses targets that cannot be a teacher.
#[test]
fn distill_trains_a_student_that_samples_alone() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    registered_with_router(d, 2);
    let distill = |out: &str, extra: &[&str]| {
        let mut a = vec![
            "distill",
            "--registry",
            "reg",
            "--partition",
            "p",
            "--out",
            out,
            "--model",
            "mlp",
            "--mlp-hidden",
            "16",
            "--steps",
            "20",
            "--batch-size",
            "32",
            "--quiet",
        ];
        a.extend(extra);
        ddm(d, &a)
    };
    let out = ok(distill("own", &[]));
    assert!(out.contains("own/expert.safetensors"), "{out}");
    ok(distill("routed", &["--teacher", "routed", "--strategy", "top-1"]));
    let flops_of = |p: &str| {
        ddm_core::checkpoint::Checkpoint::read(&d.join(p))
            .unwrap()
            .meta
            .model
            .flops_per_sample()
    };
    let (expert, router) = (flops_of("expert-0.safetensors"), flops_of("r/router.safetensors"));
    for (name, per_sample) in [("own", expert), ("routed", expert + router)] {
        let info: serde_json::Value = serde_json::from_str(&ok(ddm(
            d,
            &["info", "--json", &format!("{name}/expert.safetensors")],
        )))
        .unwrap();
        assert_eq!(info["cluster"], serde_json::Value::Null);
        let (student, teacher) = (
            info["extra"]["student_flops"].as_f64().unwrap(),
            info["extra"]["teacher_flops"].as_f64().unwrap(),
        );
        let total = info["training"]["flops"].as_f64().unwrap();
        assert!((total - student - teacher).abs() <= 1e-6 * total, "{info}");
        // One expert per sample (top-1 or its own cluster's), and the router when routed.
        let seen = info["training"]["samples_seen"].as_f64().unwrap();
        assert!(
            (teacher - seen * per_sample).abs() <= 1e-6 * teacher,
            "{name}: {info}"
        );
        assert!(info["source"].as_str().unwrap().contains("teacher"), "{info}");
    }
    // Rerunning a finished run resumes at its end.
    ok(distill("own", &[]));
    ok(ddm(
        d,
        &[
            "sample",
            "--checkpoint",
            "own/expert.safetensors",
            "--n",
            "8",
            "--steps",
            "3",
            "--out",
            "s.png",
            "--quiet",
        ],
    ));
    let rep: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("s.json")).unwrap()).unwrap();
    assert_eq!(rep["experts_loaded"], serde_json::json!([0]));
    let e = fails(distill(
        "bad",
        &["--teacher", "routed", "--strategy", "trajectory"],
    ));
    assert!(e.contains("each noised point"), "{e}");
    let e = fails(distill("bad", &["--strategy", "full"]));
    assert!(e.contains("--teacher routed"), "{e}");
    let e = fails(ddm(
        d,
        &["sample", "--checkpoint", "r/router.safetensors", "--out", "r.png"],
    ));
    assert!(e.contains("role router"), "{e}");
}

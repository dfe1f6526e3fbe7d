//! Registries in an object store, against a real S3-protocol server on loopback (moto's, from
//! PyPI: `pip install 'moto[server]'`, which honours conditional puts). Each test starts its own
//! server. They are `#[ignore]`d with what they need, so a plain `cargo test` lists them as not run;
//! `cargo test -- --include-ignored` (what CI runs, after `.ci/run` installs moto) runs them, and
//! then a missing `moto_server` fails them.

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{fails, ok, registry_fixture};

/// A moto S3 server on a free loopback port, with one bucket; killed on drop.
struct S3 {
    child: Child,
    endpoint: String,
}

impl S3 {
    /// Panics, saying how to install it, when moto is not installed.
    fn start(test: &str) -> S3 {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = match Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
        {
            Ok(c) => c,
            Err(e) => {
                panic!("{test}: cannot start moto_server ({e}); install it with `pip install 'moto[server]'`")
            }
        };
        let s3 = S3 {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
        };
        let http = ddm_net::client().unwrap();
        let start = Instant::now();
        while http.get(&s3.endpoint).send().is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "moto_server did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let made = http.put(format!("{}/experts", s3.endpoint)).send().unwrap();
        assert!(
            made.status().is_success(),
            "creating the bucket: {}",
            made.status()
        );
        s3
    }

    /// `ddm` (or another of the package's binaries) with this server's endpoint, test credentials
    /// and a cache of its own under `dir`.
    fn command(&self, bin: &str, dir: &Path, cache: &str, args: &[&str]) -> Command {
        let mut c = Command::new(bin);
        c.args(args)
            .current_dir(dir)
            .env("AWS_ACCESS_KEY_ID", "ddm-test")
            .env("AWS_SECRET_ACCESS_KEY", "ddm-test-secret")
            .env("AWS_REGION", "us-east-1")
            .env("AWS_ENDPOINT_URL", &self.endpoint)
            .env("AWS_ALLOW_HTTP", "true")
            .env("DDM_CACHE", dir.join(cache))
            .env_remove("SLURM_ARRAY_TASK_ID")
            .env_remove("JOB_COMPLETION_INDEX");
        c
    }

    fn ddm(&self, dir: &Path, args: &[&str]) -> Output {
        self.command(env!("CARGO_BIN_EXE_ddm"), dir, "cache", args)
            .output()
            .unwrap()
    }

    /// The bucket as a client other than ddm sees it (to read and damage objects).
    fn bucket(&self) -> impl object_store::ObjectStore {
        object_store::aws::AmazonS3Builder::new()
            .with_bucket_name("experts")
            .with_endpoint(&self.endpoint)
            .with_allow_http(true)
            .with_region("us-east-1")
            .with_access_key_id("ddm-test")
            .with_secret_access_key("ddm-test-secret")
            .build()
            .unwrap()
    }

    fn get(&self, key: &str) -> Option<Vec<u8>> {
        use object_store::ObjectStoreExt;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let got = self.bucket().get(&key.into()).await.ok()?;
            Some(got.bytes().await.unwrap().to_vec())
        })
    }

    fn put(&self, key: &str, body: Vec<u8>) {
        use object_store::ObjectStoreExt;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(self.bucket().put(&key.into(), body.into())).unwrap();
    }
}

impl Drop for S3 {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A K-cluster partition `p` of a small Gaussian mixture and K islands trained on it for a few
/// steps (`island-C/expert.safetensors`, with its cluster statistics beside it).
fn islands(d: &Path, k: usize) -> Vec<std::path::PathBuf> {
    registry_fixture(d, k);
    (0..k)
        .map(|c| {
            let out = d.join(format!("island-{c}"));
            ok(Command::new(env!("CARGO_BIN_EXE_ddm-trainer"))
                .args([
                    "--partition",
                    "p",
                    "--cluster",
                    &c.to_string(),
                    "--model",
                    "mlp",
                    "--steps",
                    "20",
                    "--quiet",
                ])
                .arg("--out")
                .arg(&out)
                .current_dir(d)
                .env_remove("SLURM_ARRAY_TASK_ID")
                .env_remove("JOB_COMPLETION_INDEX")
                .output()
                .unwrap());
            out.join("expert.safetensors")
        })
        .collect()
}

fn index(s3: &S3, d: &Path, reg: &str) -> serde_json::Value {
    serde_json::from_str(&ok(s3.ddm(d, &["registry", "--registry", reg, "list", "--json"]))).unwrap()
}

fn samples(d: &Path, stem: &str) -> Vec<u8> {
    std::fs::read(d.join(format!("{stem}.safetensors"))).unwrap()
}

/// Eight `ddm register` processes start at once against one s3:// registry: each loses races on
/// the index and retries, and all eight experts land. The registry verifies, samples exactly as
/// a local registry of the same files does, and is listed, exported, edited and collected.
#[test]
#[ignore = "needs moto_server: pip install 'moto[server]' (.ci/run installs it)"]
fn concurrent_islands_register_into_s3_and_sampling_matches_a_local_copy() {
    let s3 = S3::start("concurrent_islands_register_into_s3");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let experts = islands(d, 8);
    let reg = "s3://experts/run-1";
    let racers: Vec<Child> = experts
        .iter()
        .map(|e| {
            s3.command(
                env!("CARGO_BIN_EXE_ddm"),
                d,
                "cache",
                &[
                    "register",
                    "--registry",
                    reg,
                    "--partition",
                    "p",
                    e.to_str().unwrap(),
                ],
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
        })
        .collect();
    for r in racers {
        ok(r.wait_with_output().unwrap());
    }
    let idx = index(&s3, d, reg);
    assert_eq!(idx["experts"].as_object().unwrap().len(), 8, "{idx}");
    let verified = ok(s3.ddm(d, &["registry", "--registry", reg, "verify"]));
    assert!(verified.contains("every blob matches"), "{verified}");

    // The same files in a local directory registry sample the same numbers.
    let mut args = vec!["register", "--registry", "local", "--partition", "p"];
    let paths: Vec<String> = experts.iter().map(|e| e.display().to_string()).collect();
    args.extend(paths.iter().map(String::as_str));
    ok(s3.ddm(d, &args));
    // The third sampler reuses the cache of the first (and still checks it).
    for (r, stem) in [(reg, "from-s3"), ("local", "from-dir"), (reg, "again")] {
        ok(s3.ddm(
            d,
            &[
                "sample",
                "--registry",
                r,
                "--router",
                "analytic",
                "--strategy",
                "full",
                "--n",
                "16",
                "--steps",
                "8",
                "--seed",
                "3",
                "--out",
                &format!("{stem}.png"),
                "--quiet",
            ],
        ));
    }
    assert_eq!(samples(d, "from-s3"), samples(d, "from-dir"));
    assert_eq!(samples(d, "again"), samples(d, "from-dir"));

    // Export from the store, then register the export elsewhere.
    ok(s3.ddm(
        d,
        &["registry", "--registry", reg, "export", "--out", "published"],
    ));
    ok(s3.ddm(
        d,
        &[
            "register",
            "--registry",
            "from-export",
            "--partition",
            "p",
            "published",
        ],
    ));

    // Remove, then collect: the removed expert's blob goes once it is past the grace period.
    ok(s3.ddm(d, &["registry", "--registry", reg, "remove", "--cluster", "5"]));
    let idx = index(&s3, d, reg);
    assert_eq!(idx["experts"].as_object().unwrap().len(), 7);
    let young = ok(s3.ddm(d, &["registry", "--registry", reg, "gc", "--dry-run"]));
    assert!(young.contains("0 unreferenced"), "{young}");
    let gc = ok(s3
        .command(
            env!("CARGO_BIN_EXE_ddm"),
            d,
            "cache",
            &["registry", "--registry", reg, "gc"],
        )
        .env("DDM_REGISTRY_GC_GRACE", "0")
        .output()
        .unwrap());
    assert!(gc.contains("2 unreferenced"), "{gc}"); // the expert and its statistics
    let verified = ok(s3.ddm(d, &["registry", "--registry", reg, "verify"]));
    assert!(verified.contains("every blob matches"), "{verified}");
}

/// A blob changed in the store after registration is refused: `verify` names it, and a sampler
/// with an empty cache stops with an error naming the object, before sampling anything.
#[test]
#[ignore = "needs moto_server: pip install 'moto[server]' (.ci/run installs it)"]
fn a_corrupted_blob_in_s3_is_refused() {
    let s3 = S3::start("a_corrupted_blob_in_s3_is_refused");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let experts = islands(d, 2);
    let reg = "s3://experts/corrupt";
    ok(s3.ddm(
        d,
        &[
            "register",
            "--registry",
            reg,
            "--partition",
            "p",
            experts[0].to_str().unwrap(),
            experts[1].to_str().unwrap(),
        ],
    ));
    let sha = index(&s3, d, reg)["experts"]["1"]["sha256"]
        .as_str()
        .unwrap()
        .to_string();
    let key = format!("corrupt/blobs/{sha}.safetensors");
    let mut blob = s3.get(&key).unwrap();
    let mid = blob.len() / 2;
    blob[mid] ^= 0x40;
    s3.put(&key, blob);

    let e = fails(s3.ddm(d, &["registry", "--registry", reg, "verify"]));
    assert!(
        e.contains("expert 1") && e.contains(&format!("s3://experts/{key}")),
        "{e}"
    );
    let e = fails(s3.ddm(
        d,
        &[
            "sample",
            "--registry",
            reg,
            "--router",
            "analytic",
            "--n",
            "4",
            "--out",
            "s.png",
            "--quiet",
        ],
    ));
    assert!(
        e.contains(&format!("s3://experts/{key}")) && e.contains("hashes to"),
        "{e}"
    );
    assert!(!d.join("s.png").exists());
    // Nothing unverified stays in the cache.
    let cached: Vec<_> = std::fs::read_dir(d.join("cache/registries"))
        .unwrap()
        .flat_map(|r| std::fs::read_dir(r.unwrap().path().join("blobs")).unwrap())
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(!cached.iter().any(|f| f.contains(&sha)), "{cached:?}");
}

/// SIGKILL at random points (seeded) of registrations into s3: afterwards the index is absent or
/// whole, names only blobs that are there (verify passes), and holds every registration that
/// finished; a rerun completes.
#[test]
#[ignore = "needs moto_server: pip install 'moto[server]' (.ci/run installs it)"]
fn a_killed_registration_leaves_no_dangling_entry() {
    use rand::{Rng, SeedableRng};
    let s3 = S3::start("a_killed_registration_leaves_no_dangling_entry");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let experts = registry_fixture(d, 4);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(15);
    let mut killed = 0;
    for round in 0..6 {
        let reg = format!("s3://experts/killed-{round}");
        let t = Instant::now();
        let probe = format!("s3://experts/probe-{round}");
        ok(s3.ddm(
            d,
            &[
                "register",
                "--registry",
                &probe,
                "--partition",
                "p",
                experts[0].to_str().unwrap(),
            ],
        ));
        let took = t.elapsed();
        let mut landed = vec![];
        for (c, e) in experts.iter().enumerate() {
            let mut child = s3
                .command(
                    env!("CARGO_BIN_EXE_ddm"),
                    d,
                    "cache",
                    &[
                        "register",
                        "--registry",
                        &reg,
                        "--partition",
                        "p",
                        e.to_str().unwrap(),
                    ],
                )
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let delay = took.mul_f64(rng.random_range(0.0..1.5));
            let start = Instant::now();
            let finished = loop {
                if let Some(s) = child.try_wait().unwrap() {
                    break s.success();
                }
                if start.elapsed() >= delay {
                    child.kill().unwrap();
                    child.wait().unwrap();
                    break false;
                }
                std::thread::sleep(Duration::from_micros(200));
            };
            if finished {
                landed.push(c);
            } else {
                killed += 1;
            }
        }
        if s3.get(&format!("killed-{round}/registry.json")).is_some() {
            let idx = index(&s3, d, &reg);
            for c in &landed {
                assert!(
                    idx["experts"].get(c.to_string()).is_some(),
                    "expert {c} lost: {idx}"
                );
            }
            ok(s3.ddm(d, &["registry", "--registry", &reg, "verify"]));
        } else {
            assert!(landed.is_empty());
        }
        // Rerun every registration: all land (those already there are not written again).
        for e in &experts {
            ok(s3.ddm(
                d,
                &[
                    "register",
                    "--registry",
                    &reg,
                    "--partition",
                    "p",
                    e.to_str().unwrap(),
                ],
            ));
        }
        assert_eq!(index(&s3, d, &reg)["experts"].as_object().unwrap().len(), 4);
        ok(s3.ddm(d, &["registry", "--registry", &reg, "verify"]));
    }
    assert!(
        killed > 0,
        "no registration was killed mid-run; the drill tested nothing"
    );
}

/// `ddm-trainer --register s3://...` pushes the island's expert when it finishes; rerunning the
/// finished island registers nothing new. A bad registry URL is refused before training.
#[test]
#[ignore = "needs moto_server: pip install 'moto[server]' (.ci/run installs it)"]
fn an_island_registers_its_own_expert() {
    let s3 = S3::start("an_island_registers_its_own_expert");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    registry_fixture(d, 2);
    let reg = "s3://experts/islands";
    let island = |c: &str| {
        s3.command(
            env!("CARGO_BIN_EXE_ddm-trainer"),
            d,
            "cache",
            &[
                "--partition",
                "p",
                "--cluster",
                c,
                "--out",
                &format!("island-{c}"),
                "--model",
                "mlp",
                "--steps",
                "20",
                "--quiet",
                "--register",
                reg,
            ],
        )
        .output()
        .unwrap()
    };
    let first = ok(island("1"));
    assert!(
        first.contains("registered expert 1") && !first.contains("already"),
        "{first}"
    );
    let idx = index(&s3, d, reg);
    let sha = idx["experts"]["1"]["sha256"].as_str().unwrap().to_string();
    assert_eq!(
        sha,
        ddm_core::digest::sha256_file(&d.join("island-1/expert.safetensors")).unwrap()
    );
    assert_eq!(
        idx["stats"].as_object().unwrap().len(),
        1,
        "the cluster statistics came along"
    );
    let again = ok(island("1"));
    assert!(again.contains("already registered"), "{again}");
    assert_eq!(index(&s3, d, reg)["experts"]["1"], idx["experts"]["1"]);

    let e = fails(
        s3.command(
            env!("CARGO_BIN_EXE_ddm-trainer"),
            d,
            "cache",
            &[
                "--partition",
                "p",
                "--cluster",
                "0",
                "--out",
                "x",
                "--register",
                "ftp://host/reg",
            ],
        )
        .output()
        .unwrap(),
    );
    assert!(
        e.contains("ftp://host/reg") && e.contains("not a registry location"),
        "{e}"
    );
    assert!(!d.join("x").exists());
}

//! `ddm launch` against real schedulers' formats: a real Slurm on this machine (Debian's
//! slurm-wlm and munge; the daemons started here without systemd) runs a K = 2 array of islands
//! that an interruption cannot change, and the Kubernetes manifests are parsed back.
//!
//! The Slurm test needs root (slurmd runs jobs as their user) and the packages: it is `#[ignore]`d
//! with what it needs, so a plain `cargo test` lists it as not run; `cargo test --
//! --include-ignored` (what CI runs, after `.ci/run` installs them) runs it, and fails without them.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use ddm_core::checkpoint::Checkpoint;

mod common;
use common::{ddm, ok, registry_fixture};

/// slurmctld + slurmd for one node (this machine, as `hostname -s`), on free loopback ports,
/// with their state in a temporary directory; stopped on drop.
struct Slurm {
    daemons: Vec<Child>,
    conf: PathBuf,
    _dir: tempfile::TempDir,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The path of a program in PATH or the sbin directories (root's tools live there).
fn program(name: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':')
        .map(PathBuf::from)
        .chain(["/usr/sbin", "/sbin", "/usr/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

impl Slurm {
    /// Panics, saying what is missing, without root or the packages.
    fn start() -> Slurm {
        assert!(
            unsafe { libc::geteuid() } == 0,
            "slurmd must run as root to start jobs, and these tests do not run as root"
        );
        let mut tools = vec![];
        for t in [
            "munged",
            "munge",
            "slurmctld",
            "slurmd",
            "sbatch",
            "squeue",
            "scontrol",
            "scancel",
        ] {
            match program(t) {
                Some(p) => tools.push(p),
                None => panic!("`{t}` not found: apt-get install slurm-wlm munge"),
            }
        }
        ensure_munged();
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for sub in ["state", "spool"] {
            std::fs::create_dir(d.join(sub)).unwrap();
        }
        let host = String::from_utf8(Command::new("hostname").arg("-s").output().unwrap().stdout)
            .unwrap()
            .trim()
            .to_string();
        let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        let conf = d.join("slurm.conf");
        std::fs::write(
            &conf,
            format!(
                "ClusterName=ddmtest\nSlurmctldHost={host}(127.0.0.1)\nSlurmctldPort={ctld}\nSlurmdPort={slurmd}\n\
                 AuthType=auth/munge\nCredType=cred/munge\nProctrackType=proctrack/linuxproc\nTaskPlugin=task/none\n\
                 SelectType=select/cons_tres\nSelectTypeParameters=CR_CPU\nSlurmUser=root\nSlurmdUser=root\n\
                 StateSaveLocation={d}/state\nSlurmdSpoolDir={d}/spool\nSlurmctldPidFile={d}/slurmctld.pid\n\
                 SlurmdPidFile={d}/slurmd.pid\nSlurmctldLogFile={d}/slurmctld.log\nSlurmdLogFile={d}/slurmd.log\n\
                 AccountingStorageType=accounting_storage/none\nJobAcctGatherType=jobacct_gather/none\n\
                 JobCompType=jobcomp/none\nMpiDefault=none\nReturnToService=2\nSchedulerType=sched/backfill\n\
                 KillWait=10\nMinJobAge=600\n\
                 NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN\n\
                 PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP\n",
                ctld = free_port(),
                slurmd = free_port(),
                d = d.display(),
            ),
        )
        .unwrap();
        let daemon = |name: &str| {
            Command::new(program(name).unwrap())
                .args(["-D", "-f"])
                .arg(&conf)
                .env("SLURM_CONF", &conf)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        };
        let slurm = Slurm {
            daemons: vec![daemon("slurmctld"), daemon("slurmd")],
            conf,
            _dir: dir,
        };
        let start = Instant::now();
        loop {
            let out = slurm.cmd("sinfo").args(["-h", "-o", "%T"]).output().unwrap();
            if String::from_utf8_lossy(&out.stdout).trim() == "idle" {
                break;
            }
            assert!(start.elapsed() < Duration::from_secs(60), "Slurm did not come up");
            std::thread::sleep(Duration::from_millis(200));
        }
        eprintln!("Slurm up in {:.1} s", start.elapsed().as_secs_f64());
        slurm
    }

    /// A Slurm client command for this cluster.
    fn cmd(&self, name: &str) -> Command {
        let mut c = Command::new(program(name).unwrap());
        c.env("SLURM_CONF", &self.conf);
        c
    }

    fn run(&self, name: &str, args: &[&str]) -> String {
        let out = self.cmd(name).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{name} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `JOBID STATE` of every job Slurm still lists (array tasks as `ARRAY_TASK`).
    fn jobs(&self) -> Vec<(String, String)> {
        self.run("squeue", &["-h", "-o", "%i %T"])
            .lines()
            .filter_map(|l| l.split_once(' '))
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }
}

impl Drop for Slurm {
    fn drop(&mut self) {
        let _ = self.cmd("scancel").args(["--user", "root"]).output();
        for d in &mut self.daemons {
            let _ = d.kill();
            let _ = d.wait();
        }
    }
}

/// munged, as Debian's service would run it (as user munge), unless one answers already.
fn ensure_munged() {
    let works = || {
        Command::new(program("munge").unwrap())
            .arg("-n")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if works() {
        return;
    }
    std::fs::create_dir_all("/run/munge").unwrap();
    assert!(
        Command::new("chown")
            .args(["munge:munge", "/run/munge"])
            .status()
            .unwrap()
            .success()
    );
    if !Path::new("/etc/munge/munge.key").exists() {
        let made = Command::new("runuser")
            .args(["-u", "munge", "--"])
            .arg(program("mungekey").expect("mungekey"))
            .arg("--create")
            .status()
            .unwrap();
        assert!(made.success(), "mungekey --create failed");
    }
    let started = Command::new("runuser")
        .args(["-u", "munge", "--"])
        .arg(program("munged").unwrap())
        .status()
        .unwrap();
    assert!(started.success(), "munged did not start");
    let t = Instant::now();
    while !works() {
        assert!(t.elapsed() < Duration::from_secs(10), "munge does not answer");
        std::thread::sleep(Duration::from_millis(100));
    }
}

const TRAINER: [&str; 6] = ["--model", "mlp", "--steps", "600", "--checkpoint-every", "50"];

/// The trained weights of a checkpoint, by name.
fn weights(path: &Path) -> Vec<(String, Vec<f32>)> {
    let mut w: Vec<_> = Checkpoint::read(path)
        .unwrap()
        .tensors
        .into_iter()
        .map(|(n, t)| (n, t.data))
        .collect();
    w.sort_by(|a, b| a.0.cmp(&b.0));
    w
}

fn steps_done(island: &Path) -> usize {
    std::fs::read_to_string(island.join("metrics.jsonl"))
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

/// `ddm launch slurm --submit` on a real Slurm: two islands as an array job, each interrupted
/// mid-run (task 0 told that its time limit is near, as `--signal` does: it saves and requeues
/// itself; task 1 requeued by `scontrol requeue`), then the router after both. Both experts and
/// the router land in the registry, and each expert is bit-identical to an uninterrupted island.
#[test]
#[ignore = "needs root, slurm-wlm and munge (.ci/run installs them)"]
fn a_slurm_array_of_islands_survives_requeues_and_registers_everything() {
    let slurm = Slurm::start();
    let t0 = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    registry_fixture(d, 2);
    let mut args = vec![
        "launch",
        "slurm",
        "--partition",
        "p",
        "--out",
        "run",
        "--registry",
        "reg",
        "--submit",
        "--json",
        "--router-flags",
        "--model mlp --steps 30 --eval-samples 50",
    ];
    args.push("--");
    args.extend(TRAINER);
    let out = ok(slurm
        .cmd(env!("CARGO_BIN_EXE_ddm"))
        .args(&args)
        .current_dir(d)
        .output()
        .unwrap());
    let launched: serde_json::Value = serde_json::from_str(&out).unwrap();
    let array = launched["islands_job"].as_str().unwrap().to_string();
    let router = launched["router_job"].as_str().unwrap().to_string();
    let script = std::fs::read_to_string(d.join("run/launch/islands.sbatch")).unwrap();
    assert!(
        script.contains("#SBATCH --array=0-1") && script.contains("#SBATCH --requeue"),
        "{script}"
    );

    // Interrupt each island once it has saved a state.
    let island = |c: usize| d.join(format!("run/expert-{c}"));
    let wait_for = |what: &str, f: &dyn Fn() -> bool| {
        let t = Instant::now();
        while !f() {
            assert!(
                t.elapsed() < Duration::from_secs(300),
                "timed out waiting for {what}; jobs: {:?}",
                slurm.jobs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    wait_for("both islands to save a state", &|| {
        steps_done(&island(0)) >= 2 && steps_done(&island(1)) >= 2
    });
    slurm.run("scancel", &["--batch", "--signal=USR1", &format!("{array}_0")]);
    slurm.run("scontrol", &["requeue", &format!("{array}_1")]);
    // A requeued job waits two minutes before it may start again; let it start now. (Not at once:
    // slurmd refuses a credential made in the second its predecessor's was revoked.)
    for task in ["0", "1"] {
        let id = format!("{array}_{task}");
        wait_for(&format!("{id} to be pending again"), &|| {
            slurm.jobs().iter().any(|(j, s)| *j == id && s == "PENDING")
        });
        std::thread::sleep(Duration::from_secs(2));
        slurm.run("scontrol", &["update", &format!("jobid={id}"), "StartTime=now"]);
    }
    wait_for("every job to finish", &|| slurm.jobs().is_empty());
    eprintln!("the Slurm run took {:.1} s", t0.elapsed().as_secs_f64());

    let log = |name: &str| std::fs::read_to_string(d.join("run/logs").join(name)).unwrap_or_default();
    for c in 0..2 {
        let l = log(&format!("island-{c}.out"));
        assert!(
            l.contains("interrupted: state saved"),
            "island {c} was not interrupted: {l}"
        );
        assert!(l.contains("resuming"), "island {c} did not resume: {l}");
        assert!(l.contains(&format!("registered expert {c}")), "{l}");
    }
    assert!(
        log("island-0.out").contains("requeueing"),
        "{}",
        log("island-0.out")
    );
    let reg = ok(ddm(d, &["registry", "--registry", "reg", "list", "--json"]));
    let idx: serde_json::Value = serde_json::from_str(&reg).unwrap();
    assert_eq!(idx["experts"].as_object().unwrap().len(), 2, "{idx}");
    assert!(
        idx["router"].is_object(),
        "router job {router} did not register: {}",
        log("router.out")
    );

    // The same islands without a scheduler or an interruption.
    for c in 0..2 {
        let reference = d.join(format!("ref-{c}"));
        let mut trainer = Command::new(env!("CARGO_BIN_EXE_ddm-trainer"));
        trainer
            .args(["--partition", "p", "--cluster", &c.to_string(), "--quiet"])
            .args(TRAINER)
            .arg("--out")
            .arg(&reference)
            .current_dir(d);
        let done: Output = trainer.output().unwrap();
        ok(done);
        assert!(
            weights(&island(c).join("expert.safetensors")) == weights(&reference.join("expert.safetensors")),
            "island {c} differs from an uninterrupted run"
        );
    }
}

/// `ddm launch k8s` writes an Indexed Job (one completion per cluster; the index is the cluster)
/// and a router Job; parsed back, their fields are what a cluster needs.
#[test]
fn k8s_manifests_are_indexed_jobs_over_the_partition() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    registry_fixture(d, 3);
    let out = ok(ddm(
        d,
        &[
            "launch",
            "k8s",
            "--partition",
            "p",
            "--out",
            "run",
            "--image",
            "ddm:test",
            "--pvc",
            "ddm-data",
            "--parallelism",
            "2",
            "--limits",
            "nvidia.com/gpu=1,memory=8Gi",
            "--registry",
            "s3://experts/run-1",
            "--env-secret",
            "s3-credentials",
            "--router-flags",
            "--steps 100",
            "--",
            "--model",
            "DiT-S/2",
        ],
    ));
    assert!(out.contains("kubectl apply -f"), "{out}");
    let read = |f: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(d.join("run/launch").join(f)).unwrap()).unwrap()
    };
    let job = read("islands-job.json");
    assert_eq!(job["kind"], "Job");
    let spec = &job["spec"];
    assert_eq!(spec["completionMode"], "Indexed");
    assert_eq!(spec["completions"], 3);
    assert_eq!(spec["parallelism"], 2);
    let pod = &spec["template"]["spec"];
    assert_eq!(pod["restartPolicy"], "Never");
    assert_eq!(
        pod["volumes"][0]["persistentVolumeClaim"]["claimName"],
        "ddm-data"
    );
    let c = &pod["containers"][0];
    assert_eq!(c["image"], "ddm:test");
    assert_eq!(c["volumeMounts"][0]["mountPath"], "/data");
    assert_eq!(c["resources"]["limits"]["nvidia.com/gpu"], "1");
    assert_eq!(c["envFrom"][0]["secretRef"]["name"], "s3-credentials");
    let command: Vec<&str> = c["command"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(&command[..3], ["ddm-trainer", "--partition", "p"]);
    assert!(
        command
            .windows(2)
            .any(|w| w == ["--out", "run/expert-$(DDM_CLUSTER)"]),
        "{command:?}"
    );
    assert!(
        command
            .windows(2)
            .any(|w| w == ["--register", "s3://experts/run-1"]),
        "{command:?}"
    );
    assert!(command.ends_with(&["--model", "DiT-S/2"]), "{command:?}");
    assert!(
        !command.contains(&"--cluster"),
        "the cluster is the completion index"
    );
    let env = &c["env"][0];
    assert_eq!(env["name"], "DDM_CLUSTER");
    assert_eq!(
        env["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    );
    let router = read("router-job.json");
    let script = router["spec"]["template"]["spec"]["containers"][0]["command"][2]
        .as_str()
        .unwrap();
    assert!(
        script.starts_with("ddm train-router --partition p --out run/router --quiet --steps 100"),
        "{script}"
    );
    assert!(
        script.ends_with("ddm register --registry s3://experts/run-1 run/router/router.safetensors"),
        "{script}"
    );

    // Flags the launcher sets itself are refused in the trainer's.
    let e = common::fails(ddm(
        d,
        &[
            "launch",
            "k8s",
            "--partition",
            "p",
            "--out",
            "x",
            "--image",
            "i",
            "--",
            "--cluster",
            "1",
        ],
    ));
    assert!(
        e.contains("--cluster") && e.contains("set by the launcher"),
        "{e}"
    );
}

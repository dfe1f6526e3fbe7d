//! Hostile values in every `ddm launch` option: arbitrary strings (newlines, quotes, `$()`,
//! backticks, `#`, `%`, unicode) either are refused naming their flag, or produce job files that
//! do exactly what was asked. Slurm's scripts are run by bash against stub programs that record
//! their arguments (so any other command is seen), and their `#SBATCH` lines are read as sbatch
//! reads them; Kubernetes' manifests are parsed, their commands expanded as Kubernetes expands
//! them, and the router's `sh -c` script run against the stubs.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use proptest::prelude::*;

mod common;

/// A partition made once for every case (only its manifest is read by `launch`).
fn partition() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap().keep();
        std::fs::write(
            dir.join("gmm.json"),
            r#"{"weights": [0.5, 0.5], "means": [[-3, 0], [3, 0]], "vars": [[0.1, 0.1], [0.1, 0.1]], "n": 40}"#,
        )
        .unwrap();
        common::ok(common::ddm(
            &dir,
            &["partition", "--data", "gmm:gmm.json", "--k", "2", "--algorithm", "random", "--out", "p"],
        ));
        dir.join("p")
    })
}

/// Programs the scripts may call, each recording its name and arguments in `$LOG` (a count line,
/// then each argument NUL-terminated). `ddm-canary` is what injected text tries to run.
fn stubs(dir: &Path) -> PathBuf {
    let bin = dir.join("stub-bin");
    std::fs::create_dir_all(&bin).unwrap();
    for name in ["ddm", "ddm-trainer", "scontrol", "ddm-canary"] {
        let p = bin.join(name);
        std::fs::write(
            &p,
            "#!/bin/bash\n{ printf '%s\\n' \"$(($# + 1))\"; printf '%s\\0' \"${0##*/}\" \"$@\"; } >> \"$LOG\"\n",
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    bin
}

/// The calls recorded in `log`: each call's program name and arguments.
fn calls(log: &Path) -> Vec<Vec<String>> {
    let bytes = std::fs::read(log).unwrap_or_default();
    let mut out = vec![];
    let mut rest = &bytes[..];
    while !rest.is_empty() {
        let nl = rest.iter().position(|&b| b == b'\n').unwrap();
        let n: usize = std::str::from_utf8(&rest[..nl]).unwrap().parse().unwrap();
        rest = &rest[nl + 1..];
        let mut call = vec![];
        for _ in 0..n {
            let end = rest.iter().position(|&b| b == 0).unwrap();
            call.push(String::from_utf8(rest[..end].to_vec()).unwrap());
            rest = &rest[end + 1..];
        }
        out.push(call);
    }
    out
}

/// Run `script` with `shell` (`/bin/bash FILE` or `/bin/sh -c TEXT`) with only the stubs on PATH;
/// the calls it made, after checking it ran nothing else.
fn run_with_stubs(shell: &[&str], dir: &Path, env: &[(&str, &str)]) -> Vec<Vec<String>> {
    let bin = dir.join("stub-bin");
    let log = dir.join("calls.log");
    let _ = std::fs::remove_file(&log);
    let out = Command::new(shell[0])
        .args(&shell[1..])
        .env_clear()
        .env("PATH", bin)
        .env("LOG", &log)
        .envs(env.iter().copied())
        .current_dir(dir)
        .output()
        .unwrap();
    // The stubs print nothing and the scripts nothing on stderr: anything there is a command that
    // was not found, a syntax error, or something else the script was not meant to do.
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.is_empty(), "{err}");
    let calls = calls(&log);
    assert!(
        calls.iter().all(|c| c[0] != "ddm-canary"),
        "injected text ran a command: {calls:?}"
    );
    calls
}

/// sbatch's reading of one `#SBATCH` line (its `_get_argument`): words split on whitespace, `'`
/// and `"` group, `\` escapes the next character, an unquoted `#` ends the line.
fn sbatch_words(line: &str) -> Vec<String> {
    let (mut words, mut cur, mut started) = (vec![], String::new(), false);
    let (mut quote, mut escape) = (None, false);
    for c in line.chars() {
        if escape {
            cur.push(c);
            escape = false;
            started = true;
        } else if c == '\\' {
            escape = true;
        } else if let Some(q) = quote {
            if c == q {
                quote = None;
            } else {
                cur.push(c);
            }
        } else if c == '"' || c == '\'' {
            quote = Some(c);
            started = true;
        } else if c == '#' {
            break;
        } else if c.is_whitespace() {
            if started {
                words.push(std::mem::take(&mut cur));
                started = false;
            }
        } else {
            cur.push(c);
            started = true;
        }
    }
    if started {
        words.push(cur);
    }
    words
}

/// The `#SBATCH` options of a script, as sbatch reads them (`--name=value` or `--name`).
fn directives(script: &str) -> Vec<String> {
    script
        .lines()
        .filter_map(|l| l.strip_prefix("#SBATCH"))
        .flat_map(sbatch_words)
        .collect()
}

/// Kubernetes' expansion of `$(VAR)` in a container's command: `$$` is `$`, a reference to a
/// defined variable is its value, anything else stays.
fn k8s_expand(s: &str, vars: &[(&str, &str)]) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'$' && i + 1 < b.len() {
            if b[i + 1] == b'$' {
                out.push(b'$');
                i += 2;
                continue;
            }
            if b[i + 1] == b'('
                && let Some(end) = s[i + 2..].find(')')
                && let Some((_, v)) = vars.iter().find(|(n, _)| *n == &s[i + 2..i + 2 + end])
            {
                out.extend(v.as_bytes());
                i += 2 + end + 1;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8(out).unwrap()
}

/// Arbitrary text, and text built from the pieces that break naive quoting.
fn hostile() -> impl Strategy<Value = String> {
    let piece = prop::sample::select(vec![
        "$(ddm-canary)",
        "`ddm-canary`",
        "\n",
        "\nddm-canary\n",
        "'",
        "\"",
        ";ddm-canary",
        "\\",
        "#",
        "%",
        "%j",
        " ",
        "é",
        "日本",
        "${IFS}",
        "&&ddm-canary",
        "|ddm-canary",
        ">x",
        "*",
        "$HOME",
        "\r",
        "\t",
        "--time=1",
        "=",
        "a",
        "1",
        "-",
        ".",
        "/",
        ":",
        ",",
        "$(DDM_CLUSTER)",
        "$$",
        "{",
        "}",
        "\u{a0}",
        "\u{85}",
    ]);
    prop_oneof![
        "\\PC{0,12}",
        any::<String>(),
        prop::collection::vec(piece, 1..8).prop_map(|v| v.concat()),
    ]
    .prop_filter("argv holds no NUL", |s| !s.contains('\0'))
}

#[derive(Debug, Clone, Copy)]
enum Slot {
    Time,
    SlurmPartition,
    Account,
    Mem,
    Partition,
    Out,
    Registry,
    BinDir,
    RouterFlags,
    TrainerFlag,
}

/// A case's directory with the partition reachable under `name` (relative to it). False when the
/// file system will not hold such a name.
fn link_partition(dir: &Path, name: &str) -> bool {
    let p = dir.join(name);
    if name.is_empty()
        || p.exists()
        || p.components()
            .any(|c| matches!(c, std::path::Component::ParentDir))
    {
        return false;
    }
    if let Some(parent) = p.parent()
        && std::fs::create_dir_all(parent).is_err()
    {
        return false;
    }
    std::os::unix::fs::symlink(partition(), &p).is_ok()
}

/// Whether a path-valued option may take `value` in a test: relative, inside the case's directory,
/// and not inside the shared partition (`p`). (ddm takes any path; a test writes only its own.)
fn contained(value: &str) -> bool {
    let p = Path::new(value);
    p.is_relative()
        && !p
            .components()
            .any(|c| matches!(c, std::path::Component::ParentDir))
        && p.components().next().is_some_and(|c| c.as_os_str() != "p")
}

fn slurm_case(slot: Slot, value: String) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let d = &dir.path().canonicalize().unwrap();
    if matches!(slot, Slot::Partition | Slot::Out | Slot::Registry | Slot::BinDir) {
        prop_assume!(contained(&value));
    }
    let bin = stubs(d);
    let (mut part, mut out, mut registry) = ("p".to_string(), "run".to_string(), "reg".to_string());
    let mut bin_dir = bin.clone();
    let mut extra: Vec<String> = vec![];
    let mut router_flags = "--steps 3".to_string();
    let mut trainer = vec!["--steps".to_string(), "5".to_string()];
    match slot {
        Slot::Time => extra = vec!["--time".into(), value.clone()],
        Slot::SlurmPartition => extra = vec!["--slurm-partition".into(), value.clone()],
        Slot::Account => extra = vec!["--account".into(), value.clone()],
        Slot::Mem => extra = vec!["--mem".into(), value.clone()],
        Slot::Partition => part = value.clone(),
        Slot::Out => out = value.clone(),
        Slot::Registry => registry = value.clone(),
        Slot::BinDir => {
            bin_dir = d.join(&value);
            prop_assume!(!value.is_empty() && std::fs::create_dir_all(&bin_dir).is_ok());
            for f in ["ddm", "ddm-trainer"] {
                prop_assume!(std::fs::copy(bin.join(f), bin_dir.join(f)).is_ok());
            }
        }
        Slot::RouterFlags => router_flags = value.clone(),
        Slot::TrainerFlag => trainer.push(value.clone()),
    }
    prop_assume!(link_partition(d, &part));
    let mut c = Command::new(env!("CARGO_BIN_EXE_ddm"));
    c.args([
        "launch",
        "slurm",
        "--partition",
        &part,
        "--out",
        &out,
        "--registry",
        &registry,
    ])
    .arg("--bin-dir")
    .arg(&bin_dir)
    .args(["--router-flags", &router_flags])
    .args(&extra)
    .arg("--")
    .args(&trainer)
    .current_dir(d);
    let o = c.output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    if !o.status.success() {
        // Refused: with an error that names what was wrong (never a panic).
        prop_assert_eq!(o.status.code(), Some(2), "{}", err);
        return Ok(());
    }
    let abs = |p: &str| std::path::absolute(d.join(p)).unwrap().display().to_string();
    let registry = if registry.contains("://") {
        registry.clone()
    } else {
        abs(&registry)
    };
    let launch = d.join(&out).join("launch");

    // The islands' script, as task 1 of the array runs it.
    let islands = launch.join("islands.sbatch");
    let script = std::fs::read_to_string(&islands).unwrap();
    let calls = run_with_stubs(
        &["/bin/bash", islands.to_str().unwrap()],
        d,
        &[("SLURM_ARRAY_TASK_ID", "1"), ("SLURM_ARRAY_JOB_ID", "7")],
    );
    let mut want = vec![
        "ddm-trainer".to_string(),
        "--partition".into(),
        abs(&part),
        "--out".into(),
        format!("{}/expert-1", abs(&out)),
        "--quiet".into(),
        "--register".into(),
        registry.clone(),
    ];
    want.extend(trainer.iter().cloned());
    prop_assert_eq!(&calls, &vec![want]);
    let mut sbatch = vec![
        "--job-name=ddm-islands".to_string(),
        "--array=0-1".into(),
        "--requeue".into(),
        "--open-mode=append".into(),
        "--signal=B:USR1@300".into(),
        format!(
            "--output={}/island-%a.out",
            Path::new(&abs(&out))
                .join("logs")
                .display()
                .to_string()
                .replace('%', "%%")
        ),
    ];
    if !extra.is_empty() {
        let flag = if extra[0] == "--slurm-partition" {
            "--partition"
        } else {
            &extra[0]
        };
        sbatch.push(format!("{flag}={}", extra[1]));
    }
    prop_assert_eq!(directives(&script), sbatch);

    // The router's script.
    let router = launch.join("router.sbatch");
    let calls = run_with_stubs(&["/bin/bash", router.to_str().unwrap()], d, &[]);
    let mut train = vec![
        "ddm".to_string(),
        "train-router".into(),
        "--partition".into(),
        abs(&part),
        "--out".into(),
        format!("{}/router", abs(&out)),
        "--quiet".into(),
    ];
    train.extend(shlex::split(&router_flags).unwrap());
    let register = vec![
        "ddm".to_string(),
        "register".into(),
        "--registry".into(),
        registry,
        format!("{}/router/router.safetensors", abs(&out)),
    ];
    prop_assert_eq!(calls, vec![train, register]);
    Ok(())
}

#[derive(Debug, Clone, Copy)]
enum K8sSlot {
    Name,
    Image,
    Pvc,
    EnvSecret,
    Limits,
    Mount,
    Partition,
    Out,
    Registry,
    RouterFlags,
    TrainerFlag,
}

fn k8s_case(slot: K8sSlot, value: String) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let d = &dir.path().canonicalize().unwrap();
    if matches!(slot, K8sSlot::Partition | K8sSlot::Out) {
        prop_assume!(contained(&value));
    }
    stubs(d);
    let (mut part, mut out, mut registry) = ("p".to_string(), "run".to_string(), "s3://b/r".to_string());
    let (mut name, mut image, mut pvc, mut secret, mut limits, mut mount) = (
        "ddm".to_string(),
        "ddm:test".to_string(),
        "data".to_string(),
        "creds".to_string(),
        "cpu=1".to_string(),
        "/data".to_string(),
    );
    let mut router_flags = "--steps 3".to_string();
    let mut trainer = vec!["--steps".to_string(), "5".to_string()];
    match slot {
        K8sSlot::Name => name = value.clone(),
        K8sSlot::Image => image = value.clone(),
        K8sSlot::Pvc => pvc = value.clone(),
        K8sSlot::EnvSecret => secret = value.clone(),
        K8sSlot::Limits => limits = value.clone(),
        K8sSlot::Mount => mount = value.clone(),
        K8sSlot::Partition => part = value.clone(),
        K8sSlot::Out => out = value.clone(),
        K8sSlot::Registry => registry = value.clone(),
        K8sSlot::RouterFlags => router_flags = value.clone(),
        K8sSlot::TrainerFlag => trainer.push(value.clone()),
    }
    prop_assume!(link_partition(d, &part));
    // `--limits` splits on commas, as documented: one entry per case here.
    prop_assume!(!limits.contains(','));
    let o = Command::new(env!("CARGO_BIN_EXE_ddm"))
        .args([
            "launch",
            "k8s",
            "--partition",
            &part,
            "--out",
            &out,
            "--registry",
            &registry,
        ])
        .args([
            "--name",
            &name,
            "--image",
            &image,
            "--pvc",
            &pvc,
            "--env-secret",
            &secret,
        ])
        .args([
            "--limits",
            &limits,
            "--mount",
            &mount,
            "--router-flags",
            &router_flags,
        ])
        .arg("--")
        .args(&trainer)
        .current_dir(d)
        .output()
        .unwrap();
    if !o.status.success() {
        prop_assert_eq!(o.status.code(), Some(2), "{}", String::from_utf8_lossy(&o.stderr));
        return Ok(());
    }
    let read = |f: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(d.join(&out).join("launch").join(f)).unwrap()).unwrap()
    };
    let job = read("islands-job.json");
    prop_assert_eq!(
        job["metadata"]["name"].as_str().unwrap(),
        format!("{name}-islands")
    );
    let pod = &job["spec"]["template"]["spec"];
    prop_assert_eq!(
        pod["volumes"][0]["persistentVolumeClaim"]["claimName"]
            .as_str()
            .unwrap(),
        pvc.as_str()
    );
    let c = &pod["containers"][0];
    prop_assert_eq!(c["image"].as_str().unwrap(), image.as_str());
    prop_assert_eq!(
        c["envFrom"][0]["secretRef"]["name"].as_str().unwrap(),
        secret.as_str()
    );
    prop_assert_eq!(
        c["volumeMounts"][0]["mountPath"].as_str().unwrap(),
        mount.as_str()
    );
    let (lname, lquantity) = limits.split_once('=').unwrap();
    prop_assert_eq!(c["resources"]["limits"][lname].as_str().unwrap(), lquantity);
    let vars = [("DDM_CLUSTER", "1")];
    let command: Vec<String> = c["command"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| k8s_expand(v.as_str().unwrap(), &vars))
        .collect();
    let mut want = vec![
        "ddm-trainer".to_string(),
        "--partition".into(),
        part.clone(),
        "--out".into(),
        format!("{out}/expert-1"),
        "--quiet".into(),
        "--register".into(),
        registry.clone(),
    ];
    want.extend(trainer.iter().cloned());
    prop_assert_eq!(command, want);

    let router = read("router-job.json");
    let c = &router["spec"]["template"]["spec"]["containers"][0]["command"];
    prop_assert_eq!(&c[0], "/bin/sh");
    let script = k8s_expand(c[2].as_str().unwrap(), &vars);
    let calls = run_with_stubs(&["/bin/sh", "-c", &script], d, &[]);
    let mut train = vec![
        "ddm".to_string(),
        "train-router".into(),
        "--partition".into(),
        part,
        "--out".into(),
        format!("{out}/router"),
        "--quiet".into(),
    ];
    train.extend(shlex::split(&router_flags).unwrap());
    let register = vec![
        "ddm".to_string(),
        "register".into(),
        "--registry".into(),
        registry,
        format!("{out}/router/router.safetensors"),
    ];
    prop_assert_eq!(calls, vec![train, register]);
    Ok(())
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|c| c.parse().ok())
            .unwrap_or(256),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn slurm_scripts_run_only_what_was_asked(
        slot in prop::sample::select(vec![
            Slot::Time, Slot::SlurmPartition, Slot::Account, Slot::Mem, Slot::Partition, Slot::Out,
            Slot::Registry, Slot::BinDir, Slot::RouterFlags, Slot::TrainerFlag,
        ]),
        value in hostile(),
    ) {
        slurm_case(slot, value)?;
    }

    #[test]
    fn k8s_manifests_carry_values_verbatim(
        slot in prop::sample::select(vec![
            K8sSlot::Name, K8sSlot::Image, K8sSlot::Pvc, K8sSlot::EnvSecret, K8sSlot::Limits,
            K8sSlot::Mount, K8sSlot::Partition, K8sSlot::Out, K8sSlot::Registry,
            K8sSlot::RouterFlags, K8sSlot::TrainerFlag,
        ]),
        value in hostile(),
    ) {
        k8s_case(slot, value)?;
    }
}

/// Values that once reached the scripts unquoted, and values that must pass as they are.
#[test]
fn known_injections_are_refused_and_plain_values_pass() {
    for (slot, v) in [
        (Slot::Time, "12:00:00\nddm-canary"),
        (Slot::Mem, "16G --wrap=ddm-canary"),
        (Slot::Account, "acct\n#SBATCH --uid=0"),
        (Slot::Out, "run\nddm-canary"),
        (Slot::TrainerFlag, "--cluster=3"),
        (Slot::RouterFlags, "--out=elsewhere"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        assert!(link_partition(d, "p"));
        let mut args: Vec<String> = ["launch", "slurm", "--partition", "p", "--out", "run"]
            .map(String::from)
            .to_vec();
        match slot {
            Slot::Time => args.extend(["--time".into(), v.into()]),
            Slot::Mem => args.extend(["--mem".into(), v.into()]),
            Slot::Account => args.extend(["--account".into(), v.into()]),
            Slot::Out => args[5] = v.into(),
            Slot::RouterFlags => args.extend(["--router-flags".into(), v.into()]),
            Slot::TrainerFlag => args.extend(["--".into(), v.into()]),
            _ => unreachable!(),
        }
        let o = Command::new(env!("CARGO_BIN_EXE_ddm"))
            .args(&args)
            .current_dir(d)
            .output()
            .unwrap();
        let err = common::fails(o);
        let flag = match slot {
            Slot::Time => "--time",
            Slot::Mem => "--mem",
            Slot::Account => "--account",
            Slot::Out => "--out",
            Slot::RouterFlags => "--out=elsewhere",
            Slot::TrainerFlag => "--cluster=3",
            _ => unreachable!(),
        };
        assert!(err.contains(flag), "{v:?}: {err}");
    }
    for (slot, v) in [
        (Slot::Time, "1-12:00:00"),
        (Slot::Mem, "32G"),
        (Slot::Out, "my run (2)/with 'quotes' and $dollars %j"),
        (Slot::TrainerFlag, "--name=$(not run) `nor this`; 'x'"),
        (Slot::RouterFlags, "--steps 10 --note 'a b'"),
    ] {
        slurm_case(slot, v.to_string()).unwrap();
    }
    for (slot, v) in [
        (K8sSlot::Name, "ddm-run-2"),
        (K8sSlot::Image, "registry.example/ddm:0.1@sha256:abc"),
        (K8sSlot::Pvc, "shared.data-1"),
        (K8sSlot::EnvSecret, "s3-credentials"),
        (K8sSlot::Limits, "nvidia.com/gpu=8"),
        (K8sSlot::Mount, "/mnt/with space/$(HOME)"),
        (K8sSlot::Out, "run $(DDM_CLUSTER) 'x'"),
        (K8sSlot::Registry, "s3://bucket/$(prefix)"),
        (K8sSlot::TrainerFlag, "--note=$(DDM_CLUSTER) `x`"),
        (K8sSlot::RouterFlags, "--steps 10 --note '$(x); y'"),
    ] {
        k8s_case(slot, v.to_string()).unwrap();
    }
}

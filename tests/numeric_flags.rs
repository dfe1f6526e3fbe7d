//! Every numeric flag of every verb at its type's extremes (0, -1, 2^32, 2^64 - 1, 2^64, 1e308,
//! inf, NaN, ...): a value outside the flag's stated range is refused by the parser, naming the
//! flag; a value inside it runs, in a small real context, to an end or an error (or is still
//! running when the test stops it): never a panic or an abort. The flags are found by walking the
//! command line (`ddm::cli::Cli`), so a new flag is covered without touching this test.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use clap::error::ErrorKind;
use clap::{CommandFactory, Parser};

mod common;

/// The values every numeric flag is tried with.
const EXTREMES: &[&str] = &[
    "0",
    "1",
    "-1",
    "65536",
    "4294967296",
    "9223372036854775807",
    "18446744073709551615",
    "18446744073709551616",
    "-9223372036854775809",
    "1e308",
    "-1e308",
    "1e-320",
    "inf",
    "nan",
];

/// A flag of a (sub)command: its path (`["eval", "images"]`), its long name and how many values
/// it takes.
struct Flag {
    path: Vec<String>,
    long: String,
    values: usize,
}

impl Flag {
    /// The command line `ddm PATH --flag VALUE...`.
    fn alone(&self, value: &str) -> Vec<String> {
        let mut argv = vec!["ddm".to_string()];
        argv.extend(self.path.iter().cloned());
        argv.push(self.long.clone());
        argv.extend(std::iter::repeat_n(value.to_string(), self.values));
        argv
    }

    /// Whether the flag's parser refuses `value` (clap checks a value as it reads it, before it
    /// looks for missing arguments): the error if it does.
    fn refuses(&self, value: &str) -> Option<clap::Error> {
        match ddm::cli::Cli::try_parse_from(self.alone(value)) {
            Err(e) if matches!(e.kind(), ErrorKind::InvalidValue | ErrorKind::ValueValidation) => Some(e),
            _ => None,
        }
    }
}

/// Every flag whose parser refuses a word but takes a number.
fn numeric_flags() -> Vec<Flag> {
    fn walk(cmd: &clap::Command, path: Vec<String>, out: &mut Vec<Flag>) {
        for arg in cmd.get_arguments() {
            let (Some(long), true) = (arg.get_long(), arg.get_action().takes_values()) else {
                continue;
            };
            let flag = Flag {
                path: path.clone(),
                long: format!("--{long}"),
                values: arg.get_num_args().map_or(1, |r| r.min_values().max(1)),
            };
            if flag.refuses("not-a-number").is_some()
                && (flag.refuses("1").is_none() || flag.refuses("0.5").is_none())
            {
                out.push(flag);
            }
        }
        for sub in cmd.get_subcommands() {
            let mut p = path.clone();
            p.push(sub.get_name().to_string());
            walk(sub, p, out);
        }
    }
    let mut cmd = ddm::cli::Cli::command();
    cmd.build();
    let mut out = vec![];
    walk(&cmd, vec![], &mut out);
    out
}

/// Files every context below refers to, made once: a Gaussian-mixture partition `p` with two MLP
/// experts (and their statistics), a trained MLP router, a registry `reg` of them, a tiny image
/// dataset, a VAE, a `ddm predict` input and samples to score.
fn fixture() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap().keep();
        let d = dir.as_path();
        let experts = common::registry_fixture(d, 2);
        common::ok(common::ddm(
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
                "2",
                "--batch-size",
                "8",
                "--eval-samples",
                "8",
                "--quiet",
            ],
        ));
        let mut reg = vec![
            "register",
            "--registry",
            "reg",
            "--partition",
            "p",
            "r/router.safetensors",
        ];
        let paths: Vec<String> = experts.iter().map(|e| e.display().to_string()).collect();
        reg.extend(paths.iter().map(String::as_str));
        common::ok(common::ddm(d, &reg));
        common::tiny_images(&d.join("imgs"));
        common::ok(common::ddm(
            d,
            &[
                "train-autoencoder",
                "--data",
                "idx:imgs",
                "--out",
                "vae",
                "--model",
                "vae:1:8:2",
                "--steps",
                "1",
                "--batch-size",
                "4",
                "--quiet",
            ],
        ));
        let clip = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/transformers/clip-tiny");
        common::ok(common::ddm(
            d,
            &[
                "import",
                "--from",
                "transformers-clip",
                clip.to_str().unwrap(),
                "--out",
                "te.safetensors",
            ],
        ));
        std::fs::write(d.join("captions.txt"), "a dark ankle boot\na light pullover\n").unwrap();
        common::ok(common::ddm(
            d,
            &[
                "data",
                "captions",
                "--data",
                "idx:imgs",
                "--out",
                "imgs-captions.jsonl",
            ],
        ));
        let x = ddm_core::host::HostTensor::new(vec![2, 2], vec![0.5, -0.5, 1.0, 0.0]);
        let t = ddm_core::host::HostTensor::new(vec![2], vec![0.3, 0.7]);
        ddm_core::host::write_tensors(
            &d.join("in.safetensors"),
            &[("x_t".into(), x), ("t".into(), t)].into(),
            &Default::default(),
        )
        .unwrap();
        // Fashion-MNIST-shaped samples for `eval images`.
        let n = 16 * 784;
        let x0 = ddm_core::host::HostTensor::new(
            vec![16, 1, 28, 28],
            (0..n).map(|i| ((i * 37) % 200) as f32 / 100.0 - 1.0).collect(),
        );
        ddm_core::host::write_tensors(
            &d.join("s.safetensors"),
            &[("x0".into(), x0)].into(),
            &Default::default(),
        )
        .unwrap();
        dir
    })
}

/// The smallest real run of a (sub)command: the words after `ddm`, with `{FLAG}` where the flag
/// under test goes. `F/` stands for the fixture's directory; `COPY:NAME` for a copy of the
/// fixture's NAME in the run's own directory (for commands that change what they are given).
fn context(path: &[String]) -> Option<Vec<String>> {
    let words: &[&str] = match path.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["import"] => &[
            "import",
            "--from",
            "ddm",
            "F/expert-0.safetensors",
            "--out",
            "i.safetensors",
            "{FLAG}",
        ],
        ["predict"] => &[
            "predict",
            "--checkpoint",
            "F/expert-0.safetensors",
            "--input",
            "F/in.safetensors",
            "--out",
            "v.safetensors",
            "{FLAG}",
        ],
        ["partition"] => &[
            "partition",
            "--data",
            "gmm:F/gmm.json",
            "--k",
            "2",
            "--out",
            "p",
            "{FLAG}",
        ],
        ["train"] => &[
            "train",
            "--partition",
            "F/p",
            "--cluster",
            "0",
            "--out",
            "e",
            "--model",
            "mlp",
            "--mlp-hidden",
            "8",
            "--steps",
            "2",
            "--batch-size",
            "8",
            "--quiet",
            "{FLAG}",
        ],
        ["train-router"] => &[
            "train-router",
            "--partition",
            "F/p",
            "--out",
            "r",
            "--model",
            "mlp",
            "--mlp-hidden",
            "8",
            "--steps",
            "2",
            "--batch-size",
            "8",
            "--eval-samples",
            "8",
            "--quiet",
            "{FLAG}",
        ],
        ["train-autoencoder"] => &[
            "train-autoencoder",
            "--data",
            "idx:F/imgs",
            "--out",
            "a",
            "--model",
            "vae:1:8:2",
            "--steps",
            "1",
            "--batch-size",
            "4",
            "--quiet",
            "{FLAG}",
        ],
        ["train-text-encoder"] => &[
            "train-text-encoder",
            "--data",
            "idx:F/imgs",
            "--captions",
            "F/imgs-captions.jsonl",
            "--out",
            "t",
            "--model",
            "clip:8:1:2",
            "--steps",
            "1",
            "--batch-size",
            "4",
            "--quiet",
            "{FLAG}",
        ],
        ["encode"] => &[
            "encode",
            "--vae",
            "F/vae/autoencoder.safetensors",
            "--data",
            "idx:F/imgs",
            "--out",
            "l.safetensors",
            "{FLAG}",
        ],
        ["data", "captions"] => &[
            "data",
            "captions",
            "--data",
            "idx:F/imgs",
            "--out",
            "c.jsonl",
            "{FLAG}",
        ],
        ["encode-text"] => &[
            "encode-text",
            "--encoder",
            "F/te.safetensors",
            "--captions",
            "F/captions.txt",
            "--out",
            "t.safetensors",
            "{FLAG}",
        ],
        ["eval-router"] => &[
            "eval-router",
            "--router",
            "F/r/router.safetensors",
            "--partition",
            "F/p",
            "--samples",
            "8",
            "{FLAG}",
        ],
        ["register"] => &[
            "register",
            "--registry",
            "reg",
            "--partition",
            "F/p",
            "{FLAG}",
            "F/expert-0.safetensors",
        ],
        ["registry", "remove"] => &[
            "registry",
            "--registry",
            "COPY:reg",
            "remove",
            "--cluster",
            "1",
            "{FLAG}",
        ],
        ["sample"] => &[
            "sample",
            "--registry",
            "F/reg",
            "--strategy",
            "full",
            "--n",
            "2",
            "--steps",
            "2",
            "--out",
            "s.png",
            "{FLAG}",
        ],
        ["distill"] => &[
            "distill",
            "--registry",
            "F/reg",
            "--partition",
            "F/p",
            "--out",
            "st",
            "--model",
            "mlp",
            "--mlp-hidden",
            "8",
            "--steps",
            "2",
            "--batch-size",
            "8",
            "--quiet",
            "{FLAG}",
        ],
        ["serve"] => &[
            "serve",
            "--registry",
            "F/reg",
            "--listen",
            "127.0.0.1:0",
            "{FLAG}",
        ],
        ["launch", "slurm"] => &["launch", "slurm", "--partition", "F/p", "--out", "run", "{FLAG}"],
        ["launch", "k8s"] => &[
            "launch",
            "k8s",
            "--partition",
            "F/p",
            "--out",
            "run",
            "--image",
            "ddm:test",
            "{FLAG}",
        ],
        ["quickstart"] => &[
            "quickstart",
            "--data",
            "gmm:F/gmm.json",
            "--k",
            "2",
            "--expert-model",
            "mlp",
            "--router-model",
            "mlp",
            "--expert-steps",
            "2",
            "--router-steps",
            "2",
            "--n",
            "4",
            "--steps",
            "2",
            "--out",
            "q",
            "{FLAG}",
        ],
        ["eval", "images"] => &["eval", "images", "{FLAG}", "F/s.safetensors"],
        ["eval", "gmm"] => &[
            "eval",
            "gmm",
            "--mixture",
            "F/gmm.json",
            "--registry",
            "F/reg",
            "--n",
            "16",
            "--steps",
            "2",
            "{FLAG}",
        ],
        ["eval", "train-classifier"] => &[
            "eval",
            "train-classifier",
            "--data",
            "idx:F/imgs",
            "--out",
            "c",
            "--steps",
            "1",
            "--batch-size",
            "4",
            "--quiet",
            "{FLAG}",
        ],
        ["experiment", "paper-table"] => &[
            "experiment",
            "paper-table",
            "--out",
            "x",
            "--gmm-only",
            "--gmm-steps",
            "2",
            "--n",
            "16",
            "--checkpoints",
            "1",
            "--quiet",
            "{FLAG}",
        ],
        _ => return None,
    };
    let f = fixture().display().to_string();
    Some(words.iter().map(|w| w.replace("F/", &format!("{f}/"))).collect())
}

/// `context` with `flag` set to `value` (in place of the context's own value for it).
fn argv(context: &[String], flag: &Flag, value: &str) -> Vec<String> {
    let mut out = vec![];
    let mut i = 0;
    while i < context.len() {
        match context[i].as_str() {
            w if w == flag.long => {
                i += 1 + flag.values;
                continue;
            }
            "{FLAG}" => {
                out.push(flag.long.clone());
                out.extend(std::iter::repeat_n(value.to_string(), flag.values));
            }
            w => out.push(w.to_string()),
        }
        i += 1;
    }
    out
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        match e.file_type().unwrap().is_dir() {
            true => copy_dir(&e.path(), &to.join(e.file_name())),
            false => {
                std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
            }
        }
    }
}

/// How a run ended.
enum End {
    Exited(i32, String),
    Signalled(i32, String),
    /// A server that said it is listening (it runs until stopped).
    Serving,
    StillRunning,
}

fn run(args: &[String], limit: Duration) -> End {
    let dir = tempfile::tempdir().unwrap();
    let err = dir.path().join("stderr");
    let args: Vec<String> = args
        .iter()
        .map(|a| match a.strip_prefix("COPY:") {
            Some(name) => {
                copy_dir(&fixture().join(name), &dir.path().join(name));
                name.to_string()
            }
            None => a.clone(),
        })
        .filter(|a| a != "{FLAG}")
        .collect();
    let mut child = Command::new(env!("CARGO_BIN_EXE_ddm"))
        .args(args)
        .current_dir(dir.path())
        .env("RUST_BACKTRACE", "0")
        .env("DDM_CACHE", dir.path().join("cache"))
        .stdout(std::fs::File::create(dir.path().join("stdout")).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let listening =
        || std::fs::read_to_string(dir.path().join("stdout")).is_ok_and(|o| o.starts_with("listening on"));
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        let serving = listening();
        if serving || start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            if serving {
                return End::Serving;
            }
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stderr = std::fs::read_to_string(&err).unwrap_or_default();
    use std::os::unix::process::ExitStatusExt;
    match status {
        None => End::StillRunning,
        Some(s) => match (s.code(), s.signal()) {
            (Some(c), _) => End::Exited(c, stderr),
            (None, Some(sig)) => End::Signalled(sig, stderr),
            _ => unreachable!("a process exits or is signalled"),
        },
    }
}

enum Outcome {
    Refused,
    Ran,
    Stopped,
    Failed(String),
}

/// `flag` set to `value`: refused by its parser (naming the flag), or run in its context.
fn try_value(flag: &Flag, value: &str, limit: Duration) -> Outcome {
    if let Some(e) = flag.refuses(value) {
        return match e.to_string().contains(&flag.long) {
            true => Outcome::Refused,
            false => Outcome::Failed(format!(
                "{} {value}: refused without naming the flag: {e}",
                flag.long
            )),
        };
    }
    let Some(context) = context(&flag.path) else {
        return Outcome::Failed(format!(
            "no context to run {} {} in",
            flag.path.join(" "),
            flag.long
        ));
    };
    let args = argv(&context, flag, value);
    match run(&args, limit) {
        End::Exited(101, err) => Outcome::Failed(format!("ddm {}: panicked\n{err}", args.join(" "))),
        End::Exited(_, err) if err.contains("panicked") => {
            Outcome::Failed(format!("ddm {}: a thread panicked\n{err}", args.join(" ")))
        }
        End::Exited(..) | End::Serving => Outcome::Ran,
        End::Signalled(sig, err) => Outcome::Failed(format!(
            "ddm {}: killed by signal {sig} (an abort?)\n{err}",
            args.join(" ")
        )),
        End::StillRunning => {
            if std::env::var_os("DDM_FLAG_RUN_LIST").is_some() {
                eprintln!("still running: ddm {}", args.join(" "));
            }
            Outcome::Stopped
        }
    }
}

/// Every context runs as it is (so a flag's value, not a mistyped context, is what each run tests).
fn check_contexts(flags: &[Flag], limit: Duration) {
    let mut paths: Vec<&Vec<String>> = flags.iter().map(|f| &f.path).collect();
    paths.dedup();
    for path in paths {
        let Some(args) = context(path) else { continue };
        match run(&args, limit) {
            End::Exited(0, _) | End::Serving | End::StillRunning => {}
            End::Exited(c, err) => panic!("the context `ddm {}` fails ({c}):\n{err}", args.join(" ")),
            End::Signalled(s, err) => panic!("the context `ddm {}` was killed ({s}):\n{err}", args.join(" ")),
        }
    }
}

#[test]
fn every_numeric_flag_at_its_types_extremes_is_an_error_never_a_panic() {
    let flags = numeric_flags();
    assert!(flags.len() > 50, "found only {} numeric flags", flags.len());
    let limit = Duration::from_secs(
        std::env::var("DDM_FLAG_RUN_LIMIT_S")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(3),
    );
    check_contexts(&flags, Duration::from_secs(60));
    // The runs, on two threads (each run is one small process).
    let cases: Vec<(&Flag, &str)> = flags
        .iter()
        .flat_map(|f| EXTREMES.iter().map(move |v| (f, *v)))
        .collect();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let outcomes = std::sync::Mutex::new(vec![]);
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(&(flag, value)) = cases.get(i) else { break };
                    let outcome = try_value(flag, value, limit);
                    outcomes.lock().unwrap().push(outcome);
                }
            });
        }
    });
    let (mut refused, mut ran, mut stopped) = (0, 0, 0);
    let mut failures = vec![];
    for o in outcomes.into_inner().unwrap() {
        match o {
            Outcome::Refused => refused += 1,
            Outcome::Ran => ran += 1,
            Outcome::Stopped => stopped += 1,
            Outcome::Failed(f) => failures.push(f),
        }
    }
    println!(
        "{} numeric flags x {} values: {refused} refused by their parsers, {ran} ran to an end or an error, {stopped} still running after {limit:?}",
        flags.len(),
        EXTREMES.len()
    );
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

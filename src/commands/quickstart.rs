//! `ddm quickstart`: the whole mission on the default data, in minutes on a laptop CPU.
//!
//! 1. partition Fashion-MNIST (the Debian package if installed, else the 10,000 images embedded in
//!    ddm) into K = 4 clusters;
//! 2. train the 4 experts as 4 separate `ddm-trainer` processes (islands; 2 at a time, one thread
//!    each) that share nothing but the partition directory: class-conditional when the data has
//!    labels (label dropout, for guidance), as in the paper's ImageNet setting;
//! 3. train the router (it sees the class too); 4. register everything;
//! 5. sample a grid with one column per class (top-1: the expert the router picks given the class,
//!    guided), the unconditional grid (one expert per trajectory), and 500 class-balanced samples
//!    scored by `ddm eval images` (Fashion-MNIST only);
//! 6. print where everything is and the FD beside its floor.
//!
//! The defaults were chosen by a measured sweep (README, "The quickstart's settings").

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Args;
use ddm_core::flow::StepSchedule;

use super::sample::SolverArg;

/// Run partition -> 4 island trainers -> router -> registry -> samples on the default data:
/// class-conditional experts and router when the data has labels, a grid of each class and an
/// unconditional grid, and the samples' FD beside the floor. The defaults (DiT-T/4, 1500 steps
/// at lr 1e-3, UniPC in 8 steps, guidance 1.5) come from a measured sweep: README, "The
/// quickstart".
#[derive(Args, Debug)]
#[command(
    after_help = "Examples:\n  ddm quickstart\n  ddm quickstart --data fashion-mnist --k 8 --expert-steps 4000 --out runs/k8\n  ddm quickstart --unconditional --out runs/quickstart-unconditional"
)]
pub struct QuickstartArgs {
    /// Where everything goes.
    #[arg(long, default_value = "runs/quickstart")]
    pub out: PathBuf,
    /// The data (see `ddm partition --data`).
    #[arg(long, default_value = "default")]
    pub data: String,
    /// Number of clusters / islands.
    #[arg(long, value_parser = super::values::count(1, 64), default_value_t = 4)]
    pub k: usize,
    /// The experts' network.
    #[arg(long, default_value = "DiT-T/4")]
    pub expert_model: String,
    /// Training steps per expert.
    #[arg(long, value_parser = super::values::count64(1, super::values::MAX_STEPS), default_value_t = 1500)]
    pub expert_steps: u64,
    /// The experts' peak learning rate.
    #[arg(long, value_parser = super::values::positive, default_value_t = 1e-3)]
    pub lr: f64,
    /// The router's network.
    #[arg(long, default_value = "DiT-XS/4")]
    pub router_model: String,
    /// Router training steps.
    #[arg(long, value_parser = super::values::count64(1, super::values::MAX_STEPS), default_value_t = 600)]
    pub router_steps: u64,
    /// Batch size of experts and router.
    #[arg(long, value_parser = super::values::count(1, super::values::MAX_BATCH), default_value_t = 32)]
    pub batch_size: usize,
    /// Islands training at the same time.
    #[arg(long, value_parser = super::values::count(1, 64), default_value_t = 2)]
    pub parallel: usize,
    /// Samples per grid (the class grid rounds it up to a multiple of the classes).
    #[arg(long, value_parser = super::values::count(1, super::values::MAX_SAMPLES), default_value_t = 100)]
    pub n: usize,
    /// Sampling steps.
    #[arg(long, value_parser = super::values::count(1, super::values::MAX_SAMPLING_STEPS), default_value_t = 8)]
    pub steps: usize,
    /// The sampling solver (see `ddm sample --solver`).
    #[arg(long, value_enum, default_value_t = SolverArg::UniPc)]
    pub solver: SolverArg,
    /// Where the sampling steps fall (see `ddm sample --schedule`).
    #[arg(long, default_value = "uniform")]
    pub schedule: StepSchedule,
    /// Classifier-free guidance scale of the class-conditional samples (1 = none).
    #[arg(long, default_value_t = 1.5, value_parser = super::values::guidance)]
    pub guidance: f64,
    /// Class-balanced samples scored by `ddm eval images` (FD, precision, recall; Fashion-MNIST
    /// only), 0 = none.
    #[arg(long, value_parser = super::values::count(0, super::values::MAX_SAMPLES), default_value_t = 500)]
    pub fd_samples: usize,
    /// Train unconditional experts and router even when the data has labels.
    #[arg(long)]
    pub unconditional: bool,
}

fn ddm_exe() -> anyhow::Result<PathBuf> {
    std::env::current_exe().context("cannot find the ddm executable")
}

/// The island binary: `ddm-trainer` beside `ddm`, else `ddm train` (the same code).
fn island_command() -> anyhow::Result<Command> {
    let exe = ddm_exe()?;
    let trainer = exe.with_file_name("ddm-trainer");
    Ok(if trainer.exists() {
        Command::new(trainer)
    } else {
        let mut c = Command::new(exe);
        c.arg("train");
        c
    })
}

/// Each island's step, loss and ETA while the islands run, read from the metrics.jsonl each
/// island writes (the islands stay separate processes that share nothing): one bar per island on
/// a terminal, a log line per island every 30 s elsewhere.
struct IslandProgress {
    multi: indicatif::MultiProgress,
    bars: Vec<indicatif::ProgressBar>,
    terminal: bool,
    last_log: Vec<Instant>,
}

impl IslandProgress {
    fn new(k: usize, steps: u64) -> Self {
        use std::io::IsTerminal;
        let multi = indicatif::MultiProgress::new();
        let style =
            indicatif::ProgressStyle::with_template("   {prefix} [{bar:30}] {pos}/{len} eta {eta} {msg}")
                .expect("static template")
                .progress_chars("=> ");
        let bars = (0..k)
            .map(|i| {
                // Hidden until `started` adds it to the MultiProgress (which draws it).
                let b = indicatif::ProgressBar::with_draw_target(
                    Some(steps),
                    indicatif::ProgressDrawTarget::hidden(),
                )
                .with_style(style.clone());
                b.set_prefix(format!("island {i}"));
                b.set_message("waiting");
                b
            })
            .collect();
        Self {
            multi,
            bars,
            terminal: std::io::stderr().is_terminal(),
            last_log: vec![Instant::now(); k],
        }
    }

    fn say(&self, line: String) {
        match self.terminal {
            true => {
                let _ = self.multi.println(line);
            }
            false => tracing::info!("{}", line.trim_start()),
        }
    }

    fn started(&mut self, k: usize) {
        let bar = self.multi.add(self.bars[k].clone());
        bar.set_message("started");
        bar.reset_eta();
        self.say(format!("   island {k}: started"));
    }

    /// The island's last metrics line: step and loss.
    fn update(&mut self, k: usize, out: &Path) {
        let Ok(text) = std::fs::read_to_string(out.join("metrics.jsonl")) else {
            return;
        };
        let Some(line) = text.lines().rev().find(|l| !l.trim().is_empty()) else {
            return;
        };
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            return; // a line being written
        };
        let step = v.get("step").and_then(|s| s.as_u64()).unwrap_or(0);
        let loss = v.get("loss").and_then(|l| l.as_f64()).unwrap_or(f64::NAN);
        let bar = &self.bars[k];
        if step > bar.position() {
            bar.set_position(step);
            bar.set_message(format!("loss {loss:.4}"));
        }
        if !self.terminal && self.last_log[k].elapsed().as_secs() >= 30 {
            self.last_log[k] = Instant::now();
            tracing::info!(
                "island {k}: step {step}/{} loss {loss:.4}",
                bar.length().unwrap_or(0)
            );
        }
    }

    fn done(&mut self, k: usize, seconds: f64) {
        let bar = &self.bars[k];
        bar.set_position(bar.length().unwrap_or(0));
        bar.finish_with_message("done");
        self.say(format!("   island {k}: done ({seconds:.0} s so far)"));
    }
}

fn run_ok(mut c: Command, what: &str) -> anyhow::Result<()> {
    let status = c.status().with_context(|| format!("cannot start {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

pub fn run(a: QuickstartArgs) -> anyhow::Result<()> {
    let t_all = Instant::now();
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let exe = ddm_exe()?;
    let (part, reg) = (a.out.join("partition"), a.out.join("registry"));
    // 1. Partition (kept if it is already there: rerunning the quickstart resumes).
    if !part.join("partition.json").exists() {
        eprintln!("== 1/6 partition {} into K = {}", a.data, a.k);
        let mut c = Command::new(&exe);
        c.args(["partition", "--data", &a.data, "--k", &a.k.to_string()])
            .arg("--out")
            .arg(&part);
        run_ok(c, "ddm partition")?;
    }
    let data = ddm_datasets::partition::read_manifest(&part)?.dataset;
    let images = data.shape.len() == 3;
    let classes = match (a.unconditional, images, data.num_classes) {
        (false, true, Some(c)) if c > 1 => Some(c),
        _ => None,
    };
    train_islands(&a, &part, classes.is_some())?;
    train_router(&a, &exe, &part, classes.is_some())?;
    register(&a, &exe, &part, &reg)?;
    let pictures = sample(&a, &exe, &reg, classes)?;
    let score = match (images, data.name.starts_with("fashion-mnist"), a.fd_samples) {
        (true, true, n) if n > 0 => score(&a, &exe, &reg, classes),
        _ => None,
    };
    println!(
        "\nquickstart done in {:.1} min. Outputs in {}:",
        t_all.elapsed().as_secs_f64() / 60.0,
        a.out.display()
    );
    println!("  partition/clusters.png   what each island got: a row of its images per cluster");
    println!("  expert-K/                each island's expert, loss.png, samples.png, metrics.jsonl");
    println!("  router/                  router.safetensors, router-eval.json (accuracy per noise level)");
    println!("  registry/                the verified registry (ddm registry --registry ... list)");
    for (name, what) in pictures {
        println!("  {name:<24} {what}");
    }
    if let Some(line) = score {
        println!("{line}");
    }
    let mut c = Command::new(&exe);
    c.args(["partition", "--describe"])
        .arg(&part)
        .stdout(std::process::Stdio::null());
    let _ = c.status();
    Ok(())
}

/// The sampling flags every picture shares.
fn sampling_args(a: &QuickstartArgs, reg: &Path) -> Vec<std::ffi::OsString> {
    let solver = clap::ValueEnum::to_possible_value(&a.solver).expect("every solver has a name");
    let mut v: Vec<std::ffi::OsString> = vec!["sample".into(), "--registry".into(), reg.into()];
    for (flag, value) in [
        ("--steps", a.steps.to_string()),
        ("--solver", solver.get_name().to_string()),
        ("--schedule", a.schedule.to_string()),
    ] {
        v.extend([flag.into(), value.into()]);
    }
    v
}

/// Step 5, the pictures: with classes, a grid of one column per class (top-1, guided) and the
/// unconditional grid (trajectory); without, trajectory and full. Returns (file, what it shows).
fn sample(
    a: &QuickstartArgs,
    exe: &Path,
    reg: &Path,
    classes: Option<usize>,
) -> anyhow::Result<Vec<(String, String)>> {
    let mut pictures = vec![];
    let mut draw = |name: &str, n: usize, extra: &[String], what: String| -> anyhow::Result<()> {
        eprintln!("== 5/6 sample {name}");
        let mut c = Command::new(exe);
        c.args(sampling_args(a, reg))
            .args(["--n", &n.to_string()])
            .args(extra)
            .arg("--out")
            .arg(a.out.join(name));
        run_ok(c, "ddm sample")?;
        pictures.push((name.to_string(), what));
        Ok(())
    };
    let n = a.n;
    match classes {
        Some(c) => {
            let per_class = n.div_ceil(c);
            let guided = ["--class", "all", "--guidance"].map(String::from);
            let mut extra = guided.to_vec();
            extra.push(a.guidance.to_string());
            draw(
                "samples-by-class.png",
                per_class * c,
                &extra,
                format!(
                    "{per_class} sample{} of each class, one column per class: the router sees the class, the expert it ranks first draws it (top-1), guidance {}",
                    if per_class == 1 { "" } else { "s" },
                    a.guidance
                ),
            )?;
            draw(
                "samples-trajectory.png",
                n,
                &["--strategy".into(), "trajectory".into()],
                format!(
                    "{n} samples without a class: one expert per sample, drawn by the router at the first step"
                ),
            )?;
        }
        None => {
            for (strategy, what) in [
                (
                    "trajectory",
                    "one expert per sample, drawn by the router at the first step",
                ),
                ("full", "every expert at every step, weighted by the router"),
            ] {
                draw(
                    &format!("samples-{strategy}.png"),
                    n,
                    &["--strategy".into(), strategy.into()],
                    format!("{n} samples, {what}"),
                )?;
            }
        }
    }
    Ok(pictures)
}

/// Step 6: FD, precision and recall of `fd_samples` samples drawn as the first picture was, beside the
/// floor (real training images against the test set at the same N). A failure (no test set on
/// this machine) is reported, not fatal: the run itself succeeded.
fn score(a: &QuickstartArgs, exe: &Path, reg: &Path, classes: Option<usize>) -> Option<String> {
    let dir = a.out.join("fd");
    // Class-balanced: a multiple of the classes.
    let n = classes.map_or(a.fd_samples, |c| a.fd_samples.div_ceil(c) * c);
    let run = || -> anyhow::Result<String> {
        eprintln!("== 6/6 score {n} samples (ddm eval images)");
        let mut c = Command::new(exe);
        c.args(sampling_args(a, reg))
            .args(["--n", &n.to_string(), "--quiet"])
            .arg("--out")
            .arg(dir.join("samples.png"))
            .stdout(std::process::Stdio::null());
        match classes {
            Some(_) => c.args(["--class", "all", "--guidance", &a.guidance.to_string()]),
            None => c.args(["--strategy", "trajectory"]),
        };
        run_ok(c, "ddm sample")?;
        let json = dir.join("fd.json");
        let mut e = Command::new(exe);
        e.args(["eval", "images", "--quiet", "--json"])
            .arg(&json)
            .arg(dir.join("samples.safetensors"))
            .stdout(std::process::Stdio::null());
        run_ok(e, "ddm eval images")?;
        let text = std::fs::read_to_string(&json).with_context(|| format!("reading {}", json.display()))?;
        let v: serde_json::Value = serde_json::from_str(&text)?;
        let get = |entry: &serde_json::Value, key: &str| entry.get(key).and_then(|x| x.as_f64());
        let ours = v
            .as_object()
            .and_then(|o| o.iter().find(|(k, _)| k.as_str() != "floor"))
            .map(|(_, r)| r.clone())
            .context("no score in the report")?;
        let floor = v.get("floor").context("no floor in the report")?;
        let f = |x: Option<f64>| x.map_or("?".into(), |x| format!("{x:.2}"));
        Ok(format!(
            "  fd/                      {n} such samples scored: FD {} (floor {}: real training images), precision {}, recall {}",
            f(get(&ours, "fd")),
            f(get(floor, "fd")),
            f(get(&ours, "precision")),
            f(get(&ours, "recall")),
        ))
    };
    Some(run().unwrap_or_else(|e| format!("  fd/                      not scored: {e:#}")))
}

/// 2. The islands: separate processes, `parallel` at a time, their threads shared out.
fn train_islands(a: &QuickstartArgs, part: &Path, class_conditional: bool) -> anyhow::Result<()> {
    eprintln!(
        "== 2/6 train {} experts ({}, {} steps) as separate island processes, {} at a time",
        a.k, a.expert_model, a.expert_steps, a.parallel
    );
    let t_islands = Instant::now();
    let threads =
        (std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2) / a.parallel.max(1)).max(1);
    let island_dir = |k: usize| a.out.join(format!("expert-{k}"));
    let mut pending: Vec<usize> = (0..a.k).rev().collect();
    let mut running: Vec<(usize, std::process::Child)> = vec![];
    let mut islands = IslandProgress::new(a.k, a.expert_steps);
    while !pending.is_empty() || !running.is_empty() {
        while running.len() < a.parallel.max(1) {
            let Some(k) = pending.pop() else { break };
            let mut c = island_command()?;
            c.arg("--partition")
                .arg(part)
                .args(["--cluster", &k.to_string()])
                .arg("--out")
                .arg(island_dir(k))
                .args(["--model", &a.expert_model, "--steps", &a.expert_steps.to_string()])
                .args([
                    "--batch-size",
                    &a.batch_size.to_string(),
                    "--lr",
                    &a.lr.to_string(),
                ])
                .args(["--checkpoint-every", "200", "--quiet"])
                .args(class_conditional.then_some("--class-conditional"))
                .env("RAYON_NUM_THREADS", threads.to_string())
                .env("RUST_LOG", "warn")
                .stdout(std::process::Stdio::null());
            islands.started(k);
            running.push((k, c.spawn().context("cannot start an island trainer")?));
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
        let mut still = vec![];
        for (k, mut child) in running {
            islands.update(k, &island_dir(k));
            match child.try_wait()? {
                Some(st) if st.success() => islands.done(k, t_islands.elapsed().as_secs_f64()),
                Some(st) => bail!("island {k} failed ({st}); see {}", island_dir(k).display()),
                None => still.push((k, child)),
            }
        }
        running = still;
    }
    Ok(())
}

/// 3. The router.
fn train_router(a: &QuickstartArgs, exe: &Path, part: &Path, class_conditional: bool) -> anyhow::Result<()> {
    eprintln!(
        "== 3/6 train the router ({}, {} steps)",
        a.router_model, a.router_steps
    );
    let mut c = Command::new(exe);
    c.arg("train-router")
        .arg("--partition")
        .arg(part)
        .arg("--out")
        .arg(a.out.join("router"))
        .args(["--model", &a.router_model, "--steps", &a.router_steps.to_string()])
        .args(["--batch-size", &a.batch_size.to_string(), "--lr", "1e-3"])
        .args([
            "--expert-model",
            &a.expert_model,
            "--eval-samples",
            "1000",
            "--quiet",
        ])
        .args(class_conditional.then_some("--class-conditional"));
    run_ok(c, "ddm train-router")
}

/// 4. The registry: every expert and the router.
fn register(a: &QuickstartArgs, exe: &Path, part: &Path, reg: &Path) -> anyhow::Result<()> {
    eprintln!("== 4/6 register");
    let mut c = Command::new(exe);
    c.arg("register")
        .arg("--registry")
        .arg(reg)
        .arg("--partition")
        .arg(part)
        .arg("--replace");
    for k in 0..a.k {
        c.arg(a.out.join(format!("expert-{k}/expert.safetensors")));
    }
    c.arg(a.out.join("router/router.safetensors"));
    run_ok(c, "ddm register")
}

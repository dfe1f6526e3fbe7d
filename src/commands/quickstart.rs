//! `ddm quickstart`: the whole mission on the default data, in minutes on a laptop CPU.
//!
//! 1. partition Fashion-MNIST (the Debian package if installed, else the 10,000 images embedded in
//!    ddm) into K = 4 clusters;
//! 2. train the 4 experts as 4 separate `ddm-trainer` processes (islands; 2 at a time, one thread
//!    each) that share nothing but the partition directory;
//! 3. train the router; 4. register everything; 5. sample 64 images with one expert per
//!    trajectory (`ddm sample`'s unconditional default, the best in README's paper table) and
//!    with full;
//! 6. print where everything is.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Args;

/// Run partition -> 4 island trainers -> router -> registry -> samples on the default data.
#[derive(Args, Debug)]
#[command(
    after_help = "Examples:\n  ddm quickstart\n  ddm quickstart --data fashion-mnist --k 8 --expert-steps 4000 --out runs/k8"
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
    #[arg(long, value_parser = super::values::count64(1, super::values::MAX_STEPS), default_value_t = 1200)]
    pub expert_steps: u64,
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
    /// Samples per strategy.
    #[arg(long, value_parser = super::values::count(1, super::values::MAX_SAMPLES), default_value_t = 64)]
    pub n: usize,
    /// Sampling steps.
    #[arg(long, value_parser = super::values::count(1, super::values::MAX_SAMPLING_STEPS), default_value_t = 50)]
    pub steps: usize,
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
        eprintln!("== 1/5 partition {} into K = {}", a.data, a.k);
        let mut c = Command::new(&exe);
        c.args(["partition", "--data", &a.data, "--k", &a.k.to_string()])
            .arg("--out")
            .arg(&part);
        run_ok(c, "ddm partition")?;
    }
    train_islands(&a, &part)?;
    train_router(&a, &exe, &part)?;
    register(&a, &exe, &part, &reg)?;
    for strategy in ["trajectory", "full"] {
        eprintln!("== 5/5 sample {} images with {strategy}", a.n);
        let mut c = Command::new(&exe);
        c.args(["sample", "--strategy", strategy, "--n", &a.n.to_string()])
            .args(["--steps", &a.steps.to_string()])
            .arg("--registry")
            .arg(&reg)
            .arg("--out")
            .arg(a.out.join(format!("samples-{strategy}.png")));
        run_ok(c, "ddm sample")?;
    }
    println!(
        "\nquickstart done in {:.1} min. Outputs in {}:",
        t_all.elapsed().as_secs_f64() / 60.0,
        a.out.display()
    );
    println!("  partition/clusters.png   what each island got (ddm partition --describe)");
    println!("  expert-K/                each island's expert, loss.png, samples.png, metrics.jsonl");
    println!("  router/                  router.safetensors, router-eval.json (accuracy per noise level)");
    println!("  registry/                the verified registry (ddm registry --registry ... list)");
    println!(
        "  samples-trajectory.png   {} samples, one expert per trajectory (+ .json report, .safetensors)",
        a.n
    );
    println!("  samples-full.png         {} samples, full mixture", a.n);
    let mut c = Command::new(&exe);
    c.args(["partition", "--describe"])
        .arg(&part)
        .stdout(std::process::Stdio::null());
    let _ = c.status();
    Ok(())
}

/// 2. The islands: separate processes, `parallel` at a time, their threads shared out.
fn train_islands(a: &QuickstartArgs, part: &Path) -> anyhow::Result<()> {
    eprintln!(
        "== 2/5 train {} experts ({}, {} steps) as separate island processes, {} at a time",
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
                .args(["--batch-size", &a.batch_size.to_string(), "--lr", "5e-4"])
                .args(["--checkpoint-every", "200", "--quiet"])
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
fn train_router(a: &QuickstartArgs, exe: &Path, part: &Path) -> anyhow::Result<()> {
    eprintln!(
        "== 3/5 train the router ({}, {} steps)",
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
        ]);
    run_ok(c, "ddm train-router")
}

/// 4. The registry: every expert and the router.
fn register(a: &QuickstartArgs, exe: &Path, part: &Path, reg: &Path) -> anyhow::Result<()> {
    eprintln!("== 4/5 register");
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

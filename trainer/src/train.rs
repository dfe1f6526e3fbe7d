//! The training loop, top to bottom: draw a batch; the task's loss (for an expert: t and noise,
//! x_t, flow-matching loss); backward; AdamW (warm-up, gradient clipping); EMA; log; checkpoint.
//! One island, one shard, no network. The state saved at each checkpoint is the loop's whole
//! state, so a restart of the same command continues exactly where the last checkpoint left off
//! (bit-identical on the CPU backend).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{Context, bail};
use ddm_core::burn::module::{Module, ModuleVisitor, Param};
use ddm_core::burn::optim::{GradientsParams, ModuleOptimizer};
use ddm_core::burn::prelude::*;
use ddm_core::checkpoint::TrainingSummary;
use ddm_core::device::Devices;
use ddm_core::host::HostTensor;
use ddm_core::params::RandomInit;
use ddm_core::precision::Precision;
use rand::{SeedableRng, seq::SliceRandom};
use rand_chacha::ChaCha8Rng;

use crate::config::TrainConfig;
use crate::metrics::{Line, Metrics};
use crate::state::{self, LoopState};
use crate::task::{Batch, Task};

/// Everything one run needs, validated.
pub struct Run {
    pub out: PathBuf,
    pub config: TrainConfig,
    /// The devices: the first holds the weights, each computes a share of every batch.
    pub devices: Devices,
    pub progress: bool,
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// All steps done; the final checkpoint is written.
    Finished {
        checkpoint: PathBuf,
        final_loss: Option<f64>,
    },
    /// SIGINT/SIGTERM: state saved at `step`; rerun the same command to resume.
    Interrupted { step: u64 },
}

/// AdamW with the run's weight decay and per-parameter gradient clipping, one fused pass per
/// parameter on the CPU (its state is burn's AdamW state: records load either way).
pub fn optimizer(config: &TrainConfig) -> ModuleOptimizer {
    let clip = (config.grad_clip > 0.0).then_some(config.grad_clip as f32);
    ModuleOptimizer::from(ddm_core::update::AdamW::new(config.weight_decay as f32, clip))
}

/// Global L2 norm of the gradients (for the metrics; clipping itself happens in the optimizer).
struct GradNorm<'a> {
    grads: &'a GradientsParams,
    sum: Vec<Tensor<1>>,
}

impl ModuleVisitor for GradNorm<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(g) = self.grads.get::<D>(param.id) {
            self.sum.push((g.clone() * g).sum());
        }
    }
}

/// Refuse a batch whose activations alone (a lower estimate) exceed the memory this machine has
/// available, before anything is allocated: an absurd `--batch-size` is an error, not an abort.
fn check_memory(net: &ddm_core::model::ModelConfig, batch_size: usize) -> anyhow::Result<()> {
    let Some(available) = ddm_core::host::available_memory() else {
        return Ok(());
    };
    let need = net.activation_bytes_per_sample() * batch_size as f64;
    if need > available {
        bail!(
            "--batch-size {batch_size} needs at least {:.1} GB of activations for this model, but the machine has {:.1} GB available; lower --batch-size",
            need / 1e9,
            available / 1e9
        );
    }
    Ok(())
}

/// Refuse several devices for a task that trains on one, or more devices than rows in a batch.
fn check_devices<T: Task>(task: &T, devices: &Devices, batch_size: usize) -> anyhow::Result<()> {
    let n = devices.choices().len();
    if n > 1 && !task.data_parallel() {
        bail!(
            "--device {devices}: {} trains on one device; pass a single --device",
            task.name()
        );
    }
    if n > batch_size {
        bail!("--device {devices}: {n} devices need a --batch-size of at least {n} (got {batch_size})");
    }
    Ok(())
}

/// Refuse a `--precision` the task's network or a device cannot compute in, before training.
fn check_precision<T: Task>(
    task: &T,
    net: &ddm_core::model::ModelConfig,
    precision: Precision,
    devices: &[Device],
) -> anyhow::Result<()> {
    if !task.trains_in(net, precision) {
        bail!(
            "--precision {precision}: {} trains a {} network in f32 only (mixed precision covers DiT, MLP and PixArt experts); use --precision f32",
            task.name(),
            net.arch()
        );
    }
    for device in devices {
        precision.check(device)?;
    }
    Ok(())
}

/// The lock file a running trainer holds in its output directory.
pub const LOCK_FILE: &str = "train.lock";

/// Written into the output directory when the loss stops being finite (JSON: the step, the loss
/// as text, the learning rate, the step of the last good checkpoint); removed when a run starts
/// there again. What `ddm ui` shows as a diverged island.
pub const DIVERGED_FILE: &str = "diverged.json";

/// Run (or resume) training for `task`. The output directory is locked for the whole run.
pub fn run<T: Task>(task: &T, run: Run) -> anyhow::Result<Outcome> {
    let Run {
        out,
        config,
        devices,
        progress,
    } = run;
    config
        .validate()
        .map_err(|e| anyhow::anyhow!("bad training config: {e}"))?;

    let train_data = task.data()?;
    let _lock = lock_out(&out)?;
    remove_divergence_mark(&out)?;
    let saved = state::read_loop_state(&out)?;
    if let Some(s) = &saved {
        check_same_run(s, &config, &task.name(), &train_data.fingerprint, &out)?;
    }
    let resolved = toml::to_string_pretty(&config)?;
    ddm_core::fsio::write_bytes_atomic(&out.join("config.toml"), resolved.as_bytes())
        .with_context(|| format!("the output directory {} is not writable", out.display()))?;

    let (data, targets) = (&train_data.data, &train_data.targets);
    let n = data.len();
    let net_config = task.net_config(&config, data)?;
    check_memory(&net_config, config.batch_size)?;
    check_devices(task, &devices, config.batch_size)?;
    let opened = devices.open()?;
    check_precision(task, &net_config, config.precision, &opened)?;
    let plain = opened[0].clone();
    let train_device = plain.clone().autodiff();
    // Data parallel: one replica of the model per further device, re-forked from the weights
    // before every step.
    let replica_devices: Vec<Device> = opened.iter().map(|d| d.clone().autodiff()).collect();
    if opened.len() > 1 {
        tracing::info!(
            "data parallel over {} devices ({devices}): each computes a share of every batch",
            opened.len()
        );
    }

    let start = Start {
        out: &out,
        config: &config,
        net_config: &net_config,
        fingerprint: &train_data.fingerprint,
    };
    let state::Loaded {
        state: mut st,
        mut model,
        mut ema,
        mut optim,
    } = start.load(task, saved.is_some(), &plain, &train_device)?;
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
    rng.set_word_pos(
        st.rng_word_pos
            .parse()
            .context("bad RNG position in the training state")?,
    );
    let mut perm = epoch_order(n, config.seed, st.epoch);
    let mut metrics = Metrics::open(&out, st.step)?;
    let per_sample = data.sample_size();
    let stop = stop_on_signals()?;

    let bar = progress_bar(progress, &config, &task.name(), st.step);
    let started = Instant::now();
    let wall_before = st.wall_time_s;
    let mut window = (Instant::now(), 0u64);
    let mut last_good_ckpt = st.step;

    while st.step < config.steps {
        // 1. The batch: the next samples of this epoch's permutation.
        let b = config.batch_size;
        let idx = next_batch(&mut st, &mut perm, n, b, config.seed);
        let x0 = HostTensor::new(vec![b, per_sample], data.gather(&idx)).to_tensor::<2>(&train_device);
        let labels = data.gather_labels(&idx);
        let cond = data.gather_cond(&idx).map(|c| c.to_tensor::<2>(&train_device));
        let tokens = data.gather_tokens(&idx).map(|s| s.to_tensors(&train_device));
        let batch_targets: Option<Vec<u32>> = targets.as_ref().map(|t| idx.iter().map(|&i| t[i]).collect());
        // 2. The task's loss (noise, times, labels drawn from the run's RNG).
        let batch = Batch {
            x0,
            labels: labels.as_deref(),
            targets: batch_targets.as_deref(),
            cond,
            tokens,
        };
        //    The weights on every device; in bf16/f16 the forward and backward run on a cast
        //    copy of the f32 weights.
        let replicas = crate::parallel::replicas(&model, &replica_devices);
        let losses = {
            let cast = cast_replicas(&replicas, config.precision);
            let compute = cast.as_deref().unwrap_or(&replicas);
            task.shard_losses(compute, &replica_devices, batch, &config, &net_config, &mut rng)?
        };
        let loss_value: f64 = losses.iter().map(|l| l.clone().into_scalar::<f32>() as f64).sum(); // sync
        if !loss_value.is_finite() {
            bar.abandon();
            return Err(diverged(&out, &st, &config, loss_value, last_good_ckpt));
        }
        // 3. Backward (on each device, summed on the first), optimizer step (AdamW with warm-up
        //    and clipping), EMA. In f16 a step whose gradients overflowed is skipped (the batch
        //    is still consumed).
        let (grads, take_step) = gradients(&model, losses, &replicas, &plain, &mut st);
        let log_now = (st.step + 1) % config.log_every == 0;
        let grad_norm = if log_now && take_step {
            grad_norm(&model, &grads)
        } else {
            0.0
        };
        let lr = config.lr_at(st.step);
        if take_step {
            model = optim.step(lr, model, grads);
        } else {
            tracing::warn!(
                "step {}: the f16 gradients overflowed; step skipped, loss scale now {}",
                st.step + 1,
                st.loss_scale.as_ref().map_or(0.0, |s| s.scale)
            );
        }
        ema = crate::ema::update(ema, &model.valid(), config.ema_decay_at(st.step));
        st.step += 1;
        st.samples_seen += b as u64;
        st.last_loss = Some(loss_value);
        st.rng_word_pos = rng.get_word_pos().to_string();
        bar.set_position(st.step);
        // 4. Log.
        window.1 += b as u64;
        if log_now {
            let secs = window.0.elapsed().as_secs_f64();
            let ips = window.1 as f64 / secs.max(1e-9);
            window = (Instant::now(), 0);
            bar.set_message(format!("loss {loss_value:.4} {ips:.1} img/s"));
            metrics.write(&Line {
                step: st.step,
                loss: loss_value,
                lr,
                grad_norm,
                img_per_s: ips,
                samples_seen: st.samples_seen,
                wall_time_s: wall_before + started.elapsed().as_secs_f64(),
                loss_scale: st.loss_scale.as_ref().map(|s| s.scale),
                skipped_steps: st.loss_scale.as_ref().map(|s| s.skipped),
            })?;
        }
        // 5. Checkpoint, loss curve, snapshots.
        st.wall_time_s = wall_before + started.elapsed().as_secs_f64();
        let interrupted = stop.load(Ordering::Relaxed);
        if st.step % config.checkpoint_every == 0 || st.step == config.steps || interrupted {
            state::save(&out, &st, &model, &ema, &optim)?;
            last_good_ckpt = st.step;
            let title = format!("{} {} ({})", task.name(), config.model, data.name);
            crate::plot::loss_curve(&out.join("loss.png"), &title, metrics.losses())?;
        }
        if config.sample_every > 0 && st.step % config.sample_every == 0 {
            let png = out.join(format!("samples-{:07}.png", st.step));
            task.snapshot(&ema, &net_config, &png, config.seed)?;
        }
        if interrupted {
            bar.abandon_with_message(format!("interrupted; state saved at step {}", st.step));
            return Ok(Outcome::Interrupted { step: st.step });
        }
    }
    bar.finish();

    let summary = summary(&st, &config, &net_config, &devices);
    let checkpoint = task.finish(&out, &ema, &net_config, summary, &train_data)?;
    Ok(Outcome::Finished {
        checkpoint,
        final_loss: st.last_loss,
    })
}

/// What a run starts from: its directory, configuration, network and data.
struct Start<'a> {
    out: &'a std::path::Path,
    config: &'a TrainConfig,
    net_config: &'a ddm_core::model::ModelConfig,
    fingerprint: &'a str,
}

impl Start<'_> {
    /// The saved state when the directory has one (`resume`), or a fresh network, its EMA, AdamW
    /// and a loop state at step 0.
    fn load<T: Task>(
        &self,
        task: &T,
        resume: bool,
        plain: &Device,
        train_device: &Device,
    ) -> anyhow::Result<state::Loaded<T::Net>> {
        let config = self.config;
        if resume {
            let mut l = state::load(task, self.out, plain, train_device, optimizer(config))?;
            l.state.config = config.clone(); // steps, lr and cadences may change on resume
            tracing::info!("resuming {} at step {}", self.out.display(), l.state.step);
            return Ok(l);
        }
        let model = task.build(self.net_config, &mut RandomInit::new(config.seed, train_device))?;
        Ok(state::Loaded {
            state: LoopState::fresh(config, self.net_config, task.name(), self.fingerprint),
            ema: model.valid(),
            model,
            optim: optimizer(config),
        })
    }
}

/// SIGINT/SIGTERM set the flag returned; the loop saves and stops at the next step boundary.
fn stop_on_signals() -> anyhow::Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, Arc::clone(&stop)).context("cannot install signal handlers")?;
    }
    Ok(stop)
}

/// In bf16/f16, a copy of each replica cast to `precision` (the forward and backward run on it,
/// the gradients land on the f32 weights); `None` in f32.
fn cast_replicas<N: Module + Clone>(replicas: &[N], precision: Precision) -> Option<Vec<N>> {
    (precision != Precision::F32).then(|| {
        replicas
            .iter()
            .map(|r| ddm_core::precision::cast(r.clone(), precision))
            .collect()
    })
}

/// The gradients of the replicas' losses, summed on the first device, and whether to take the
/// step. In f16 each loss is scaled for its backward and the sum unscaled; gradients that
/// overflowed skip the step and shrink the scale (`st.loss_scale`).
fn gradients<N: Module>(
    model: &N,
    losses: Vec<Tensor<1>>,
    replicas: &[N],
    first: &Device,
    st: &mut LoopState,
) -> (GradientsParams, bool) {
    let scale = st.loss_scale.as_ref().map(|s| s.scale);
    let parts = losses
        .into_iter()
        .zip(replicas)
        .map(|(loss, replica)| {
            let loss = match scale {
                Some(s) => loss * s,
                None => loss,
            };
            GradientsParams::from_grads(loss.backward(), replica)
        })
        .collect();
    let mut grads = crate::parallel::gather(model, parts, first);
    let take_step = match st.loss_scale.as_mut() {
        None => true,
        Some(scaler) => {
            let finite = crate::loss_scale::unscale(model, &mut grads, scaler.scale);
            scaler.update(finite)
        }
    };
    (grads, take_step)
}

/// The error of a loss that stopped being finite at the step after `st`'s, once the divergence
/// mark is written.
fn diverged(
    out: &std::path::Path,
    st: &LoopState,
    config: &TrainConfig,
    loss: f64,
    last_good: u64,
) -> anyhow::Error {
    let (step, lr) = (st.step + 1, config.lr_at(st.step));
    mark_divergence(out, step, loss, lr, last_good);
    anyhow::anyhow!(
        "the loss became {loss} at step {step} (lr {lr:.3e}); training stopped. The last good checkpoint \
         (step {last_good}) is intact in {}: rerun with a lower --lr to resume from it",
        state::path(out).display()
    )
}

/// Record that the loss stopped being finite ([`DIVERGED_FILE`]). Best effort: the error that
/// stops training says the same, so a mark that cannot be written is only logged.
fn mark_divergence(out: &std::path::Path, step: u64, loss: f64, lr: f64, last_good: u64) {
    let mark = serde_json::json!({
        "step": step,
        "loss": loss.to_string(),
        "lr": lr,
        "last_good_checkpoint": last_good,
    });
    let path = out.join(DIVERGED_FILE);
    if let Err(e) = ddm_core::fsio::write_bytes_atomic(&path, mark.to_string().as_bytes()) {
        tracing::warn!("writing {}: {e}", path.display());
    }
}

/// A run starting again clears the mark of an earlier divergence.
fn remove_divergence_mark(out: &std::path::Path) -> anyhow::Result<()> {
    let path = out.join(DIVERGED_FILE);
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", path.display()))
        }
        _ => Ok(()),
    }
}

/// Create and lock the output directory: one trainer per directory (a second one would
/// interleave checkpoints and metrics). Fails before any work if it is not writable.
fn lock_out(out: &std::path::Path) -> anyhow::Result<std::fs::File> {
    std::fs::create_dir_all(out)
        .with_context(|| format!("cannot create the output directory {}", out.display()))?;
    let lock_path = out.join(LOCK_FILE);
    let lock =
        std::fs::File::create(&lock_path).with_context(|| format!("creating {}", lock_path.display()))?;
    match lock.try_lock() {
        Ok(()) => Ok(lock),
        Err(std::fs::TryLockError::WouldBlock) => bail!(
            "{}: another trainer is running in this directory ({} is held); wait for it to finish or use another --out",
            out.display(),
            LOCK_FILE
        ),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("locking {}", lock_path.display()))
        }
    }
}

/// A saved state resumes only the same run: the same settings, target and data.
fn check_same_run(
    saved: &LoopState,
    config: &TrainConfig,
    target: &str,
    fingerprint: &str,
    out: &std::path::Path,
) -> anyhow::Result<()> {
    if saved.config.same_run(config) && saved.target == target && saved.partition == fingerprint {
        return Ok(());
    }
    let mut differs = saved.config.differences(config);
    if saved.target != target {
        differs.insert(0, format!("target: {} then {target}", saved.target));
    }
    if saved.partition != fingerprint {
        differs.insert(
            0,
            format!(
                "partition: {} then {}",
                ddm_core::text::short(&saved.partition, 12),
                ddm_core::text::short(fingerprint, 12)
            ),
        );
    }
    bail!(
        "{} holds a different run (saved, then asked for: {}); use a new --out, or the same settings to resume",
        out.display(),
        differs.join("; ")
    )
}

/// The order of the samples in `epoch`: a permutation drawn from the seed and the epoch alone, so
/// a resumed run sees the same order.
fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut p: Vec<usize> = (0..n).collect();
    p.shuffle(&mut ChaCha8Rng::seed_from_u64(
        seed ^ 0x0da7_a0de_u64.wrapping_mul(epoch + 1),
    ));
    p
}

/// The next `b` sample indices of the epoch's permutation, crossing into the next epoch (and its
/// permutation) when this one runs out; advances the state's epoch and position.
fn next_batch(st: &mut LoopState, perm: &mut Vec<usize>, n: usize, b: usize, seed: u64) -> Vec<usize> {
    let mut idx = Vec::with_capacity(b);
    while idx.len() < b {
        if st.pos == n {
            st.epoch += 1;
            st.pos = 0;
            *perm = epoch_order(n, seed, st.epoch);
        }
        let take = (b - idx.len()).min(n - st.pos);
        idx.extend_from_slice(&perm[st.pos..st.pos + take]);
        st.pos += take;
    }
    idx
}

/// The global L2 norm of the gradients (for the metrics; clipping happens in the optimizer).
fn grad_norm<M: Module>(model: &M, grads: &GradientsParams) -> f64 {
    let mut g = GradNorm { grads, sum: vec![] };
    model.visit(&mut g);
    Tensor::cat(g.sum, 0).sum().into_scalar::<f32>().sqrt() as f64
}

/// The step counter a person watches (hidden without `progress`).
fn progress_bar(progress: bool, config: &TrainConfig, target: &str, step: u64) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(config.steps);
    if !progress {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    bar.set_style(
        indicatif::ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {per_sec} eta {eta} {msg}")
            .expect("static template")
            .progress_chars("=> "),
    );
    bar.set_prefix(format!("{target} {}", config.model));
    bar.set_position(step);
    bar
}

/// What the final checkpoint records of its training.
fn summary(
    st: &LoopState,
    config: &TrainConfig,
    net_config: &ddm_core::model::ModelConfig,
    devices: &Devices,
) -> TrainingSummary {
    TrainingSummary {
        steps: st.step,
        samples_seen: st.samples_seen,
        // forward + backward ~ 3x the forward pass
        flops: 3.0 * net_config.flops_per_sample() * st.samples_seen as f64,
        seed: config.seed,
        wall_time_s: st.wall_time_s,
        final_loss: st.last_loss,
        backend: devices.to_string(),
        ema: Some(config.ema_decay),
    }
}
